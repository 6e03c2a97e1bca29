//! Half-precision storage (`f16`, `bf16`): every output of every operation (inference, training,
//! statistics, backward, their fused and in-place forms) is bit for bit the f32 path on the
//! up-converted data, rounded once to the storage type (the accuracy contract: no error beyond
//! the f32 path's plus the final rounding; per-channel outputs, which stay f32, are identical),
//! on the sweep and wide shapes, both layouts, every backend, sequential and on rayon, with
//! ordinary and special values (NaN, ±∞, subnormals, values that overflow f16). Rounding ties
//! are checked against hand-computed values.

mod common;

use batchnorm::{
    Affine, BackwardEpilogue, BackwardMode, BatchNorm, BatchStats, ChannelStats, Element, Epilogue,
    Error, GradMode, Layout, ParamGrads, RunningStats, RunningUpdate, SavedStats, SavedStatsMut,
    Shape, bf16, f16,
};
use common::*;

const LAYOUTS: [Layout; 2] = [Layout::Nchw, Layout::Nhwc];

/// Same bits, or both NaN (NaN payloads may differ between conversion instructions).
fn same<E: Element<Param = f32>>(a: &[E], b: &[E]) -> Option<usize> {
    let bits = |v: E| v.to_param();
    (0..a.len().max(b.len())).find(|&i| match (a.get(i), b.get(i)) {
        (Some(&x), Some(&y)) => {
            let (x, y) = (bits(x), bits(y));
            !(x.to_bits() == y.to_bits() || (x.is_nan() && y.is_nan()))
        }
        _ => true,
    })
}

fn to_f32<E: Element<Param = f32>>(v: &[E]) -> Vec<f32> {
    v.iter().map(|x| x.to_param()).collect()
}

fn from_f32<E: Element<Param = f32>>(v: &[f32]) -> Vec<E> {
    v.iter().map(|&x| E::from_param(x)).collect()
}

/// Values of `E` for a tensor: ordinary ones, and with `special`, a sprinkling of NaN, ±∞,
/// subnormals of f16, ±0 and values near f16's largest.
fn data<E: Element<Param = f32>>(rng: &mut Rng, n: usize, special: bool) -> Vec<E> {
    let mut v = rng.normals(n, 0.3, 2.0);
    if special {
        let specials = [
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            3.0e-7,
            -6.0e-8,
            0.0,
            -0.0,
            6.0e4,
            -6.5e4,
        ];
        for (i, x) in v.iter_mut().enumerate() {
            if i % 7 == 3 {
                *x = specials[(i / 7) % specials.len()];
            }
        }
    }
    from_f32(&v)
}

/// `inference_fused` (in place with `in_place`) on `E` data against the f32 path on the
/// up-converted data rounded once to `E`.
fn check_against_f32_path<E: Element<Param = f32>>(special: bool, seed: u64) {
    let mut rng = Rng::new(seed);
    // `sweep_shapes` includes the wide rows (`WIDE`).
    for shape in sweep_shapes() {
        let c = shape.c();
        let x: Vec<E> = data(&mut rng, shape.len(), special);
        let z: Vec<E> = data(&mut rng, shape.len(), false);
        let (x32, z32) = (to_f32(&x), to_f32(&z));
        let (gamma, beta) = (rng.normals(c, 1.0, 0.5), rng.normals(c, 0.0, 1.0));
        let mean = rng.normals(c, 0.3, 0.5);
        let var: Vec<f32> = rng.normals(c, 2.0, 0.5).iter().map(|v| v.abs()).collect();
        let affine = Some(Affine {
            gamma: &gamma,
            beta: &beta,
        });
        let running = RunningStats {
            mean: &mean,
            var: &var,
        };
        for layout in LAYOUTS {
            for bn in operators(shape, layout, 1e-5) {
                let ctx = format!(
                    "{} {shape:?} {layout:?} {:?} {:?}",
                    E::NAME,
                    bn.backend(),
                    bn.parallelism()
                );
                let epilogues: [(Epilogue<'_, E>, Epilogue<'_, f32>); 3] = [
                    (Epilogue::None, Epilogue::None),
                    (Epilogue::Relu, Epilogue::Relu),
                    (Epilogue::AddRelu(&z), Epilogue::AddRelu(&z32)),
                ];
                for (epi, epi32) in epilogues {
                    let mut y32 = vec![f32::NAN; x.len()];
                    bn.inference_fused(&x32, &mut y32, affine, running, epi32)
                        .unwrap();
                    let want: Vec<E> = from_f32(&y32);

                    let mut y = vec![E::from_param(f32::NAN); x.len()];
                    bn.inference_fused(&x, &mut y, affine, running, epi)
                        .unwrap();
                    if let Some(i) = same(&y, &want) {
                        panic!(
                            "{ctx} {epi:?}: y[{i}] = {:?}, f32 path rounded {:?} (x {:?})",
                            y[i], want[i], x[i]
                        );
                    }
                    let mut inout = x.clone();
                    bn.inference_fused_in_place(&mut inout, affine, running, epi)
                        .unwrap();
                    if let Some(i) = same(&inout, &want) {
                        panic!("{ctx} {epi:?} in place: element {i}");
                    }
                }
            }
        }
    }
}

/// The outputs of a training forward: y, saved mean, saved inverse std, running mean and
/// variance (f32 per-channel values), and the batch statistics.
struct Trained<E> {
    y: Vec<E>,
    per_channel: [Vec<f32>; 4],
    stats: BatchStats,
}

fn train<E: Element<Param = f32>>(
    bn: &BatchNorm,
    x: &[E],
    affine: Affine<'_>,
    epi: Epilogue<'_, E>,
) -> Trained<E> {
    let c = bn.shape().c();
    let mut y = vec![E::from_param(f32::NAN); x.len()];
    let (mut m, mut r) = (vec![0.0; c], vec![0.0; c]);
    let (mut rm, mut rv) = (vec![0.5; c], vec![2.0; c]);
    let saved = SavedStatsMut {
        mean: &mut m,
        inv_std: &mut r,
    };
    let update = (bn.shape().per_channel() > 1).then(|| RunningUpdate::pytorch(&mut rm, &mut rv));
    let stats = bn
        .training_fused(x, &mut y, Some(affine), Some(saved), update, epi)
        .unwrap();
    Trained {
        y,
        per_channel: [m, r, rm, rv],
        stats,
    }
}

/// Same f32 bits or both NaN, elementwise.
fn same_f32(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|(x, y)| x.to_bits() == y.to_bits() || (x.is_nan() && y.is_nan()))
}

/// Same statistics (count, and mean and M2 bits or both NaN).
fn same_stats(a: &[ChannelStats], b: &[ChannelStats]) -> bool {
    let f = |x: f64, y: f64| x.to_bits() == y.to_bits() || (x.is_nan() && y.is_nan());
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|(p, q)| p.count() == q.count() && f(p.mean(), q.mean()) && f(p.m2(), q.m2()))
}

/// Backward (`mode`, `epi` as `None`, `Relu` or `AddRelu` from the forward's output `y`):
/// (dx, dγ, dβ, dz).
fn backward<E: Element<Param = f32>>(
    bn: &BatchNorm,
    (x, dy, y): (&[E], &[E], &[E]),
    affine: Affine<'_>,
    mode: BackwardMode<'_>,
    epi: usize,
) -> (Vec<E>, Vec<f32>, Vec<f32>, Vec<E>) {
    let c = bn.shape().c();
    let mut dx = vec![E::from_param(f32::NAN); x.len()];
    let mut dz = vec![E::from_param(f32::NAN); x.len()];
    let (mut dgamma, mut dbeta) = (vec![0.0; c], vec![0.0; c]);
    let grads = Some(ParamGrads {
        dgamma: &mut dgamma,
        dbeta: &mut dbeta,
        mode: GradMode::Overwrite,
    });
    let affine = Some(affine);
    match epi {
        0 => bn.backward(x, dy, &mut dx, affine, mode, grads),
        1 => {
            let e = BackwardEpilogue::Relu { y };
            bn.backward_fused(x, dy, &mut dx, affine, mode, grads, e)
        }
        _ => {
            let e = BackwardEpilogue::AddRelu { y, dz: &mut dz };
            bn.backward_fused(x, dy, &mut dx, affine, mode, grads, e)
        }
    }
    .unwrap();
    (dx, dgamma, dbeta, dz)
}

/// Statistics, training (every epilogue) and backward (both modes, every epilogue, and in
/// place) on `E` data in `layout` against the f32 path on the up-converted data.
fn check_training_against_f32_path<E: Element<Param = f32>>(
    special: bool,
    seed: u64,
    layout: Layout,
) {
    let mut rng = Rng::new(seed);
    // `sweep_shapes` includes the wide rows (`WIDE`).
    let mut shapes = sweep_shapes();
    // Channels of three whole statistics sub-runs (4096 values) and a tail in NCHW: the passes
    // of half data's sub-runs overlap, and must still give the f32 path's bits.
    shapes.push(Shape::new(1, 2, 3 * 4096 + 5).unwrap());
    for shape in shapes {
        let c = shape.c();
        let x: Vec<E> = data(&mut rng, shape.len(), special);
        let z: Vec<E> = data(&mut rng, shape.len(), false);
        let dy: Vec<E> = data(&mut rng, shape.len(), false);
        let (x32, z32, dy32) = (to_f32(&x), to_f32(&z), to_f32(&dy));
        let (gamma, beta) = (rng.normals(c, 1.0, 0.5), rng.normals(c, 0.0, 1.0));
        let affine = Affine {
            gamma: &gamma,
            beta: &beta,
        };
        let rvar = vec![1.3f32; c];
        // The f32 path once per backend, on its sequential operator: its results are the same
        // bits on every schedule (tests/determinism.rs), so each operator's half results are
        // checked against them (the eight training tests 49.3 → 40.1 s of test time, against
        // the f32 path on every operator: test profile, AMD EPYC family 25 model 17).
        let ops = operators(shape, layout, 1e-5);
        for same_backend in ops.chunk_by(|a, b| a.backend() == b.backend()) {
            let f32_path = &same_backend[0];
            let ctx = |bn: &BatchNorm| {
                format!(
                    "{} {shape:?} {layout:?} {:?} {:?}",
                    E::NAME,
                    bn.backend(),
                    bn.parallelism()
                )
            };
            let want = f32_path.statistics(&x32).unwrap();
            for bn in same_backend {
                let stats = bn.statistics(&x).unwrap();
                assert!(
                    same_stats(stats.channels(), want.channels()),
                    "statistics {}",
                    ctx(bn)
                );
            }

            let epilogues: [(Epilogue<'_, E>, Epilogue<'_, f32>); 3] = [
                (Epilogue::None, Epilogue::None),
                (Epilogue::Relu, Epilogue::Relu),
                (Epilogue::AddRelu(&z), Epilogue::AddRelu(&z32)),
            ];
            for (k, (epi, epi32)) in epilogues.into_iter().enumerate() {
                let want = train(f32_path, &x32, affine, epi32);
                let want_y = from_f32::<E>(&want.y);
                for bn in same_backend {
                    let got = train(bn, &x, affine, epi);
                    if let Some(i) = same(&got.y, &want_y) {
                        panic!("training y[{i}] {epi:?} {}", ctx(bn));
                    }
                    for (g, w) in got.per_channel.iter().zip(&want.per_channel) {
                        assert!(
                            same_f32(g, w),
                            "training per-channel outputs {epi:?} {}",
                            ctx(bn)
                        );
                    }
                    let (s, w) = (got.stats.channels(), want.stats.channels());
                    assert!(same_stats(s, w), "training statistics {epi:?} {}", ctx(bn));
                }

                // The backward from the forward's outputs, which every operator's half run
                // matched: its saved statistics, and y rounded to `E`.
                let [m, r, ..] = &want.per_channel;
                let modes = [
                    BackwardMode::Training(SavedStats {
                        mean: m,
                        inv_std: r,
                    }),
                    BackwardMode::Frozen(RunningStats {
                        mean: m,
                        var: &rvar,
                    }),
                ];
                let y32 = to_f32(&want_y);
                for mode in modes {
                    let (dx32, dg32, db32, dz32) =
                        backward(f32_path, (&x32, &dy32, &y32), affine, mode, k);
                    let (want_dx, want_dz) = (from_f32::<E>(&dx32), from_f32::<E>(&dz32));
                    for bn in same_backend {
                        let ctx = ctx(bn);
                        let (dx, dg, db, dz) = backward(bn, (&x, &dy, &want_y), affine, mode, k);
                        if let Some(i) = same(&dx, &want_dx) {
                            panic!("backward dx[{i}] epilogue {k} {mode:?} {ctx}");
                        }
                        assert!(same_f32(&dg, &dg32), "dgamma epilogue {k} {mode:?} {ctx}");
                        assert!(same_f32(&db, &db32), "dbeta epilogue {k} {mode:?} {ctx}");
                        if k == 2 && same(&dz, &want_dz).is_some() {
                            panic!("dz {mode:?} {ctx}");
                        }
                        if k == 0 {
                            let mut inout = dy.clone();
                            bn.backward_in_place(&x, &mut inout, Some(affine), mode, None)
                                .unwrap();
                            if let Some(i) = same(&inout, &dx) {
                                panic!("backward in place dx[{i}] {mode:?} {ctx}");
                            }
                        }
                    }
                }
            }
        }
    }
}

// One test per type, kind of values and layout, so the harness spreads them over the cores
// (per type and kind they took 27–34 s each under AddressSanitizer, the suite's longest there).
#[test]
fn f16_training_statistics_and_backward_are_the_f32_path_rounded_once_nchw() {
    check_training_against_f32_path::<f16>(false, 75, Layout::Nchw);
}

#[test]
fn f16_training_statistics_and_backward_are_the_f32_path_rounded_once_nhwc() {
    check_training_against_f32_path::<f16>(false, 75, Layout::Nhwc);
}

#[test]
fn bf16_training_statistics_and_backward_are_the_f32_path_rounded_once_nchw() {
    check_training_against_f32_path::<bf16>(false, 76, Layout::Nchw);
}

#[test]
fn bf16_training_statistics_and_backward_are_the_f32_path_rounded_once_nhwc() {
    check_training_against_f32_path::<bf16>(false, 76, Layout::Nhwc);
}

#[test]
fn f16_training_with_special_values_is_the_f32_path_rounded_once_nchw() {
    check_training_against_f32_path::<f16>(true, 77, Layout::Nchw);
}

#[test]
fn f16_training_with_special_values_is_the_f32_path_rounded_once_nhwc() {
    check_training_against_f32_path::<f16>(true, 77, Layout::Nhwc);
}

#[test]
fn bf16_training_with_special_values_is_the_f32_path_rounded_once_nchw() {
    check_training_against_f32_path::<bf16>(true, 78, Layout::Nchw);
}

#[test]
fn bf16_training_with_special_values_is_the_f32_path_rounded_once_nhwc() {
    check_training_against_f32_path::<bf16>(true, 78, Layout::Nhwc);
}

#[test]
fn f16_inference_is_the_f32_path_rounded_once() {
    check_against_f32_path::<f16>(false, 71);
}

#[test]
fn bf16_inference_is_the_f32_path_rounded_once() {
    check_against_f32_path::<bf16>(false, 72);
}

#[test]
fn f16_inference_with_special_values_is_the_f32_path_rounded_once() {
    check_against_f32_path::<f16>(true, 73);
}

#[test]
fn bf16_inference_with_special_values_is_the_f32_path_rounded_once() {
    check_against_f32_path::<bf16>(true, 74);
}

/// y = x + β exactly in f32 (ε = 0, variance 1, mean 0, γ = 1), with x = 1 and β chosen so that
/// y lies exactly halfway between two values of the storage type, or beyond f16's range:
/// `want` holds the correctly rounded results (to nearest, ties to even), written by hand; a NaN
/// in `want` asks for any NaN.
fn check_rounding<E: Element<Param = f32>>(gamma: f32, betas: &[f32], want: &[f32]) {
    let c = betas.len();
    // 37 values per channel: whole vectors and a partial one on every backend.
    for layout in LAYOUTS {
        let shape = Shape::new(1, c, 37).unwrap();
        for bn in operators(shape, layout, 0.0) {
            let x = vec![E::from_param(1.0); shape.len()];
            let mut y = vec![E::from_param(f32::NAN); shape.len()];
            let gamma = vec![gamma; c];
            let (mean, var) = (vec![0.0f32; c], vec![1.0f32; c]);
            let affine = Some(Affine {
                gamma: &gamma,
                beta: betas,
            });
            let running = RunningStats {
                mean: &mean,
                var: &var,
            };
            bn.inference(&x, &mut y, affine, running).unwrap();
            for (i, v) in y.iter().enumerate() {
                let ch = channel_of(shape, layout, i);
                let got = v.to_param();
                let both_nan = got.is_nan() && want[ch].is_nan();
                assert!(
                    both_nan || got.to_bits() == want[ch].to_bits(),
                    "{} {layout:?} {:?} element {i} (channel {ch}): {:?}, want {}",
                    E::NAME,
                    bn.backend(),
                    v,
                    want[ch]
                );
            }
        }
    }
}

#[test]
fn bf16_output_rounds_to_nearest_even() {
    // bf16 keeps 8 significant bits: near 1 its spacing is 2⁻⁷. 1 + 2⁻⁸ is a tie between 1 and
    // 1 + 2⁻⁷ (even: 1); 1 + 3·2⁻⁸ a tie between 1 + 2⁻⁷ and 1 + 2⁻⁶ (even: 1 + 2⁻⁶);
    // 1 + 2⁻⁸ + 2⁻¹⁶ is above the tie (1 + 2⁻⁷).
    let t = 2f32.powi(-8);
    let betas = [t, 3.0 * t, t + 2f32.powi(-16), -t / 2.0];
    let want = [1.0, 1.0 + 4.0 * t, 1.0 + 2.0 * t, 1.0];
    check_rounding::<bf16>(1.0, &betas, &want);
}

#[test]
fn bf16_subnormal_output_rounds_to_nearest_even() {
    // With γ = 0 the output is β. bf16 subnormals are multiples of 2⁻¹³³ (7 fraction bits below
    // 2⁻¹²⁶, as in f32): 3·2⁻¹³³ is one; 2⁻¹³⁴ is a tie between 0 and 2⁻¹³³ (even: 0); 3·2⁻¹³⁴
    // a tie between 2⁻¹³³ and 2⁻¹³² (even: 2⁻¹³²); −5·2⁻¹⁴⁰ rounds to −0; the largest f32
    // subnormal rounds up to the smallest normal 2⁻¹²⁶. (AVX512-BF16's `vcvtneps2bf16` would
    // read these as zero.)
    // 2ᵉ from its bits (powi would go through 2⁻ᵉ, which overflows f32 here).
    let p = |e: i32| match e {
        -149..=-127 => f32::from_bits(1 << (e + 149)),
        _ => f32::from_bits(((e + 127) as u32) << 23),
    };
    let betas = [
        3.0 * p(-133),
        p(-134),
        3.0 * p(-134),
        -5.0 * p(-140),
        p(-126) - p(-149),
    ];
    let want = [3.0 * p(-133), 0.0, p(-132), -0.0, p(-126)];
    check_rounding::<bf16>(0.0, &betas, &want);
    // A subnormal channel next to normal ones, in one vector (NHWC rows of 4 channels).
    let betas = [p(-134), 0.5, 3.0 * p(-134), -2.0];
    let want = [0.0, 0.5, p(-132), -2.0];
    check_rounding::<bf16>(0.0, &betas, &want);
}

#[test]
fn half_nan_output_stays_nan() {
    // With γ = 0 the output is β. A NaN whose fraction is all ones would carry into the sign bit
    // (−0) if rounded as a number, and one whose fraction lies in the low 16 bits only would
    // truncate to ∞: both must stay NaN, and a neighbouring channel keep its value.
    let nan = |bits: u32| f32::from_bits(bits);
    let betas = [nan(0x7FFF_FFFF), 0.5, nan(0xFFFF_FFFF), nan(0x7F80_0001)];
    let want = [f32::NAN, 0.5, f32::NAN, f32::NAN];
    check_rounding::<bf16>(0.0, &betas, &want);
    check_rounding::<f16>(0.0, &betas, &want);
}

#[test]
fn f16_output_rounds_to_nearest_even_and_overflows_to_infinity() {
    // f16 keeps 11 significant bits: near 1 its spacing is 2⁻¹⁰. Ties as for bf16; beyond
    // 65520 (halfway from 65504, the largest f16, to 2¹⁶) a result is +∞, below −65520 −∞.
    let t = 2f32.powi(-11);
    let betas = [t, 3.0 * t, 7.0e4, -7.0e4, 65000.0];
    let want = [
        1.0,
        1.0 + 4.0 * t,
        f32::INFINITY,
        f32::NEG_INFINITY,
        // 65001 rounds to the nearest multiple of 32 (f16's spacing there): 64992.
        64992.0,
    ];
    check_rounding::<f16>(1.0, &betas, &want);
}

#[test]
fn half_lengths_are_checked_and_nothing_is_written() {
    let shape = Shape::new(2, 3, 5).unwrap();
    let bn = BatchNorm::new(shape, Layout::Nchw).unwrap();
    let (mean, var) = ([0.0f32; 3], [1.0f32; 3]);
    let running = RunningStats {
        mean: &mean,
        var: &var,
    };
    let x = vec![f16::ONE; shape.len()];
    let mut y = vec![f16::NAN; shape.len() - 1];
    let err = bn.inference(&x, &mut y, None, running).unwrap_err();
    assert!(
        matches!(err, Error::LengthMismatch { arg: "y", .. }),
        "{err}"
    );
    assert!(y.iter().all(|v| v.is_nan()));
    let mut y = vec![f16::NAN; shape.len()];
    let z = vec![f16::ONE; 3];
    let err = bn
        .inference_fused(&x, &mut y, None, running, Epilogue::AddRelu(&z))
        .unwrap_err();
    assert!(
        matches!(err, Error::LengthMismatch { arg: "z", .. }),
        "{err}"
    );
    assert!(y.iter().all(|v| v.is_nan()));
}
