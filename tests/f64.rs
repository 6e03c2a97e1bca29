//! f64 data (f64 lanes, f64 parameters and statistics) against a reference computed more
//! precisely (`batchnorm_check::precise`, shared with the fuzz checker): the batch mean, the
//! deviations `x − μ` from it and every sum in double-double arithmetic. Every operation, both
//! layouts, every backend, sequential and rayon, odd sizes, and the offset data that cost f32
//! batch norm its digits (mean 1e4 with σ 1e-2, mean 3e6 with σ 4), values near 1e300, constant
//! channels, and NaN kept in its channel.
//!
//! Tolerance (`tol`): `(8 + 2·M)·u` of the size of the terms, u = 2⁻⁵³, M = N·HW values per
//! channel, plus `2u·|μ|` in every `x − μ`. Why: a handful of roundings per element (`x − μ`,
//! the scale and bias, one FMA, the saved statistics); the statistics are at worst a recursive f64
//! sum of M terms (the lanes, then blocks merged in order), which errs by up to (M − 1)·u of the
//! sum of magnitudes (Higham §4.2), doubled for the squared deviations. The batch mean itself is
//! an f64: `x − μ` cannot be better than half an ulp of μ, which the second term states (the f32
//! path's split mean has no f64 counterpart in f64 precision).

mod common;

use batchnorm::{
    Affine, BackwardEpilogue, BackwardMode, BatchNorm, Epilogue, Error, GradMode, Layout,
    ParamGrads, RunningStats, RunningUpdate, SavedStats, SavedStatsMut, Shape,
};
use batchnorm_check::precise::{Moments, sum};
use batchnorm_check::reference::channel;
use common::{Rng, channel_of, operators};

const U: f64 = f64::EPSILON / 2.0;

fn tol(m: usize) -> f64 {
    (8.0 + 2.0 * m as f64) * U
}

/// The data of one channel.
#[derive(Clone, Copy, Debug)]
enum Data {
    Ordinary,
    /// `mean ± std·N(0, 1)`.
    Offset(f64, f64),
    Constant(f64),
}

fn data(rng: &mut Rng, shape: Shape, layout: Layout, kinds: &[Data]) -> Vec<f64> {
    let mut x = vec![0.0; shape.len()];
    for n in 0..shape.n() {
        for c in 0..shape.c() {
            for s in 0..shape.hw() {
                x[shape.index(layout, n, c, s)] = match kinds[c % kinds.len()] {
                    Data::Ordinary => 3.0 * rng.uniform() - 1.0,
                    Data::Offset(m, sd) => m + sd * rng.normal(),
                    Data::Constant(v) => v,
                };
            }
        }
    }
    x
}

const KINDS: [Data; 6] = [
    Data::Ordinary,
    Data::Offset(1e4, 1e-2),
    Data::Offset(3e6, 4.0),
    Data::Offset(-1e300, 1e150),
    Data::Constant(123.456),
    Data::Offset(1e-300, 1e-302),
];

fn shapes() -> Vec<Shape> {
    let mut v = Vec::new();
    for (n, c, hw) in [
        (1, 1, 1),
        (2, 3, 1),
        (3, 6, 5),
        (2, 7, 17),
        (5, 13, 33),
        (1, 6, 4099),
        (1, 2, 20000),
        (2, 3, 16411),
        (64, 17, 1),
        (9, 40, 7),
        (4, 70, 9),
        // Whole vectors of channels per row: the NHWC register-group (column) kernels.
        (3, 32, 5),
        (2, 64, 3),
    ] {
        v.push(Shape::new(n, c, hw).unwrap());
    }
    v
}

/// γ, β of channel `c` as the tests draw them.
fn params(rng: &mut Rng, c: usize) -> (Vec<f64>, Vec<f64>) {
    let gamma = (0..c).map(|_| 0.5 + rng.uniform()).collect();
    let beta = (0..c).map(|_| rng.uniform() - 0.5).collect();
    (gamma, beta)
}

/// Asserts `|got − want| ≤ bound` naming what and where.
fn close(what: &str, got: f64, want: f64, bound: f64) {
    assert!(
        (got - want).abs() <= bound || (got == want),
        "{what}: got {got:e}, want {want:e}, error {:e} > bound {bound:e}",
        (got - want).abs()
    );
}

#[test]
fn training_forward_matches_the_precise_reference() {
    let mut rng = Rng::new(64);
    for shape in shapes() {
        for layout in [Layout::Nchw, Layout::Nhwc] {
            let x = data(&mut rng, shape, layout, &KINDS);
            let (gamma, beta) = params(&mut rng, shape.c());
            let m = shape.per_channel();
            let refs: Vec<Moments> = (0..shape.c())
                .map(|c| Moments::new(&channel(&x, shape, layout, c)))
                .collect();
            let eps = 1e-5;
            let mut first: Option<Vec<u64>> = None;
            for bn in operators(shape, layout, eps) {
                let c = shape.c();
                let mut y = vec![f64::NAN; x.len()];
                let (mut mean, mut inv_std) = (vec![f64::NAN; c], vec![f64::NAN; c]);
                let (mut rm, mut rv) = (vec![0.5; c], vec![2.0; c]);
                let stats = bn
                    .training(
                        &x,
                        &mut y,
                        Some(Affine {
                            gamma: &gamma,
                            beta: &beta,
                        }),
                        Some(SavedStatsMut {
                            mean: &mut mean,
                            inv_std: &mut inv_std,
                        }),
                        Some(RunningUpdate::onnx(&mut rm, &mut rv)),
                    )
                    .unwrap();
                let label = format!("{shape:?} {layout:?} {:?}", bn.backend());
                for (ch, r) in refs.iter().enumerate() {
                    let sd = r.var().sqrt();
                    let what = format!("{label} channel {ch} mean");
                    close(
                        &what,
                        mean[ch],
                        r.mean(),
                        tol(m) * sd + 2.0 * U * r.mean().abs(),
                    );
                    let s = &stats.channels()[ch];
                    let what = format!("{label} channel {ch} variance");
                    close(&what, s.m2() / m as f64, r.var(), tol(m) * r.var());
                    let want_r = 1.0 / (r.var() + eps).sqrt();
                    let what = format!("{label} channel {ch} inv_std");
                    close(&what, inv_std[ch], want_r, tol(m) * want_r);
                    // ONNX: old-value weight 0.9, biased variance.
                    let what = format!("{label} channel {ch} running_var");
                    close(
                        &what,
                        rv[ch],
                        0.9 * 2.0 + 0.1 * r.var(),
                        tol(m) * (1.8 + r.var()),
                    );
                    let (want, mean_bound) = (
                        0.45 + 0.1 * r.mean(),
                        tol(m) * sd + 2.0 * U * r.mean().abs(),
                    );
                    close(
                        &format!("{label} channel {ch} running_mean"),
                        rm[ch],
                        want,
                        0.1 * mean_bound + 2.0 * U * want.abs(),
                    );
                }
                for (i, &got) in y.iter().enumerate() {
                    let ch = channel_of(shape, layout, i);
                    let r = &refs[ch];
                    let alpha = gamma[ch] / (r.var() + eps).sqrt();
                    let d = r.dev(x[i]);
                    let want = alpha * d + beta[ch];
                    let terms = alpha.abs() * (r.var().sqrt() + d.abs()) + beta[ch].abs();
                    let bound = tol(m) * terms + 2.0 * U * alpha.abs() * r.mean().abs();
                    close(&format!("{label} y[{i}] (channel {ch})"), got, want, bound);
                    if let Data::Constant(_) = KINDS[ch % KINDS.len()] {
                        assert_eq!(got, beta[ch], "{label}: a constant channel gives y = β");
                    }
                }
                // Every backend and thread count of one layout alike, bit for bit per backend.
                let bits: Vec<u64> = y.iter().map(|v| v.to_bits()).collect();
                if bn.parallelism() == batchnorm::Parallelism::Sequential {
                    first = Some(bits);
                } else {
                    assert_eq!(first.as_ref(), Some(&bits), "{label}: rayon differs");
                }
            }
        }
    }
}

#[test]
fn inference_fused_and_in_place_match_the_reference() {
    let mut rng = Rng::new(65);
    for shape in shapes() {
        for layout in [Layout::Nchw, Layout::Nhwc] {
            let c = shape.c();
            let x = data(&mut rng, shape, layout, &KINDS[..3]);
            let z = data(&mut rng, shape, layout, &[Data::Ordinary]);
            let (gamma, beta) = params(&mut rng, c);
            let mean: Vec<f64> = (0..c).map(|_| rng.uniform()).collect();
            let var: Vec<f64> = (0..c).map(|_| 0.25 + rng.uniform()).collect();
            for bn in operators(shape, layout, 1e-3) {
                let affine = Affine {
                    gamma: &gamma,
                    beta: &beta,
                };
                let running = RunningStats {
                    mean: &mean,
                    var: &var,
                };
                for epi in [Epilogue::None, Epilogue::Relu, Epilogue::AddRelu(&z)] {
                    let mut y = vec![f64::NAN; x.len()];
                    bn.inference_fused(&x, &mut y, Some(affine), running, epi)
                        .unwrap();
                    let mut inout = x.clone();
                    bn.inference_fused_in_place(&mut inout, Some(affine), running, epi)
                        .unwrap();
                    assert!(
                        y.iter()
                            .zip(&inout)
                            .all(|(a, b)| a.to_bits() == b.to_bits())
                    );
                    for (i, &got) in y.iter().enumerate() {
                        let ch = channel_of(shape, layout, i);
                        let alpha = gamma[ch] / (var[ch] + 1e-3).sqrt();
                        let d = x[i] - mean[ch];
                        let mut want = alpha * d + beta[ch];
                        let mut terms = alpha.abs() * d.abs() + beta[ch].abs();
                        if let Epilogue::AddRelu(z) = epi {
                            want += z[i];
                            terms += z[i].abs();
                        }
                        if !matches!(epi, Epilogue::None) {
                            want = want.max(0.0);
                        }
                        close(
                            &format!("{shape:?} {layout:?} y[{i}]"),
                            got,
                            want,
                            8.0 * U * terms,
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn backward_matches_the_precise_reference() {
    let mut rng = Rng::new(66);
    for shape in shapes() {
        for layout in [Layout::Nchw, Layout::Nhwc] {
            let c = shape.c();
            let m = shape.per_channel();
            let x = data(&mut rng, shape, layout, &KINDS[..3]);
            let dy = data(&mut rng, shape, layout, &[Data::Ordinary]);
            let (gamma, beta) = params(&mut rng, c);
            let refs: Vec<Moments> = (0..c)
                .map(|ch| Moments::new(&channel(&x, shape, layout, ch)))
                .collect();
            let eps = 1e-5;
            for bn in operators(shape, layout, eps) {
                let affine = Some(Affine {
                    gamma: &gamma,
                    beta: &beta,
                });
                let (mut mean, mut inv_std) = (vec![0.0; c], vec![0.0; c]);
                let mut y = vec![0.0; x.len()];
                let saved = SavedStatsMut {
                    mean: &mut mean,
                    inv_std: &mut inv_std,
                };
                bn.training(&x, &mut y, affine, Some(saved), None).unwrap();
                let saved = SavedStats {
                    mean: &mean,
                    inv_std: &inv_std,
                };
                let mut dx = vec![f64::NAN; x.len()];
                let (mut dg, mut db) = (vec![f64::NAN; c], vec![f64::NAN; c]);
                let grads = ParamGrads {
                    dgamma: &mut dg,
                    dbeta: &mut db,
                    mode: GradMode::Overwrite,
                };
                let mode = BackwardMode::Training(saved);
                bn.backward(&x, &dy, &mut dx, affine, mode, Some(grads))
                    .unwrap();
                // In place and through ReLU's backward agree with the plain call.
                let mut dy_dx = dy.clone();
                bn.backward_in_place(&x, &mut dy_dx, affine, mode, None)
                    .unwrap();
                assert!(
                    dx.iter()
                        .zip(&dy_dx)
                        .all(|(a, b)| a.to_bits() == b.to_bits())
                );
                let ones = vec![1.0; x.len()];
                let mut dx_relu = vec![f64::NAN; x.len()];
                let epi = BackwardEpilogue::Relu { y: &ones };
                bn.backward_fused(&x, &dy, &mut dx_relu, affine, mode, None, epi)
                    .unwrap();
                assert!(
                    dx.iter()
                        .zip(&dx_relu)
                        .all(|(a, b)| a.to_bits() == b.to_bits())
                );

                let label = format!("{shape:?} {layout:?} {:?}", bn.backend());
                let mut want_dx = vec![0.0; x.len()];
                for (ch, r) in refs.iter().enumerate() {
                    let rr = 1.0 / (r.var() + eps).sqrt();
                    let idx: Vec<usize> = (0..x.len())
                        .filter(|&i| channel_of(shape, layout, i) == ch)
                        .collect();
                    let xhat = |i: usize| r.dev(x[i]) * rr;
                    let dbeta = sum(idx.iter().map(|&i| dy[i]));
                    let dgamma = sum(idx.iter().map(|&i| xhat(i) * dy[i]));
                    let sdy = sum(idx.iter().map(|&i| dy[i].abs()));
                    let sxdy = sum(idx.iter().map(|&i| (1.0 + xhat(i).abs()) * dy[i].abs()));
                    close(&format!("{label} dbeta {ch}"), db[ch], dbeta, tol(m) * sdy);
                    let mean_err = 2.0 * U * r.mean().abs() * rr * sdy;
                    close(
                        &format!("{label} dgamma {ch}"),
                        dg[ch],
                        dgamma,
                        tol(m) * sxdy + mean_err,
                    );
                    let a = gamma[ch] * rr;
                    for &i in &idx {
                        want_dx[i] = a * (dy[i] - dbeta / m as f64 - xhat(i) * dgamma / m as f64);
                        let terms = a.abs()
                            * (dy[i].abs()
                                + sdy / m as f64
                                + (1.0 + xhat(i).abs()) * sxdy / m as f64);
                        let mean_term = 4.0 * U * r.mean().abs() * rr * (sdy + sxdy) / m as f64;
                        let bound = tol(m) * terms + a.abs() * mean_term;
                        close(&format!("{label} dx[{i}]"), dx[i], want_dx[i], bound);
                    }
                }
                // Frozen statistics: dx = γ·r·dy exactly as computed in f64.
                let running = RunningStats {
                    mean: &mean,
                    var: &inv_std,
                };
                let mode = BackwardMode::Frozen(running);
                let mut dx = vec![f64::NAN; x.len()];
                bn.backward(&x, &dy, &mut dx, affine, mode, None).unwrap();
                for (i, &got) in dx.iter().enumerate() {
                    let ch = channel_of(shape, layout, i);
                    let a = gamma[ch] / (inv_std[ch] + eps).sqrt();
                    close(
                        &format!("{label} frozen dx[{i}]"),
                        got,
                        a * dy[i],
                        4.0 * U * (a * dy[i]).abs(),
                    );
                }
            }
        }
    }
}

#[test]
fn statistics_of_f64_data_and_nan_stays_in_its_channel() {
    let mut rng = Rng::new(67);
    let shape = Shape::new(5, 7, 33).unwrap();
    for layout in [Layout::Nchw, Layout::Nhwc] {
        let x = data(&mut rng, shape, layout, &KINDS);
        for bn in operators(shape, layout, 1e-5) {
            let stats = bn.statistics(&x).unwrap();
            let mut bad = x.clone();
            bad[shape.index(layout, 2, 3, 5)] = f64::NAN;
            bad[shape.index(layout, 4, 5, 0)] = f64::INFINITY;
            let poisoned = bn.statistics(&bad).unwrap();
            for c in 0..shape.c() {
                let (a, b) = (&stats.channels()[c], &poisoned.channels()[c]);
                let r = Moments::new(&channel(&x, shape, layout, c));
                let m = shape.per_channel();
                let what = format!("{layout:?} {:?} channel {c}", bn.backend());
                close(
                    &what,
                    a.mean(),
                    r.mean(),
                    tol(m) * r.var().sqrt() + 2.0 * U * r.mean().abs(),
                );
                if c == 3 || c == 5 {
                    assert!(!b.mean().is_finite() || !b.m2().is_finite(), "{what}");
                } else {
                    assert_eq!(
                        (a.mean().to_bits(), a.m2().to_bits()),
                        (b.mean().to_bits(), b.m2().to_bits()),
                        "{what}: another channel's NaN changed it"
                    );
                }
            }
        }
    }
}

#[test]
fn f64_length_errors_name_the_argument_and_write_nothing() {
    let shape = Shape::new(2, 3, 4).unwrap();
    let bn = BatchNorm::new(shape, Layout::Nchw).unwrap();
    let x = vec![1.0f64; shape.len()];
    let mut y = vec![7.0f64; shape.len()];
    let running = RunningStats {
        mean: &[0.0f64; 3],
        var: &[1.0f64; 2],
    };
    let err = bn.inference(&x, &mut y, None, running).unwrap_err();
    assert!(
        matches!(
            err,
            Error::LengthMismatch {
                arg: "running_var",
                ..
            }
        ),
        "{err}"
    );
    assert!(y.iter().all(|&v| v == 7.0));
    let err = bn.training(&x[1..], &mut y, None, None, None).unwrap_err();
    assert!(
        matches!(err, Error::LengthMismatch { arg: "x", .. }),
        "{err}"
    );
    assert!(y.iter().all(|&v| v == 7.0));
}
