//! Fused forward ops (`relu(bn(x))`, `relu(bn(x) + z)`): bit for bit the plain op followed by the
//! epilogue, on the sweep shapes, both layouts, every backend, sequential and on rayon, out of
//! place and in place; the residual's length is checked; NaN stays in its channel. Their backward
//! is bit for bit the plain backward of the gradient through ReLU, and matches finite differences.

mod common;

use batchnorm::{
    Affine, BackwardEpilogue, BackwardMode, BatchNorm, Epilogue, Error, GradMode, Layout,
    ParamGrads, RunningStats, RunningUpdate, SavedStats, SavedStatsMut, Shape,
};
use common::*;

const LAYOUTS: [Layout; 2] = [Layout::Nchw, Layout::Nhwc];

/// The kernels' ReLU: `0 > v ? 0 : v` (NaN and −0 pass through).
fn relu(v: f32) -> f32 {
    if 0.0 > v { 0.0 } else { v }
}

fn compose(y: &[f32], z: Option<&[f32]>) -> Vec<f32> {
    match z {
        Some(z) => y.iter().zip(z).map(|(&a, &b)| relu(a + b)).collect(),
        None => y.iter().map(|&a| relu(a)).collect(),
    }
}

fn same(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|(x, y)| x.to_bits() == y.to_bits() || (x.is_nan() && y.is_nan()))
}

/// Training with every output; returns (y, saved mean, saved inv std, running mean, running var).
fn train(bn: &BatchNorm, x: &[f32], affine: Affine<'_>, epi: Epilogue<'_>) -> [Vec<f32>; 5] {
    let c = bn.shape().c();
    let mut y = vec![f32::NAN; x.len()];
    let (mut m, mut r) = (vec![0.0; c], vec![0.0; c]);
    let (mut rm, mut rv) = (vec![0.5; c], vec![2.0; c]);
    let saved = SavedStatsMut {
        mean: &mut m,
        inv_std: &mut r,
    };
    let update = (bn.shape().per_channel() > 1).then(|| RunningUpdate::pytorch(&mut rm, &mut rv));
    bn.training_fused(x, &mut y, Some(affine), Some(saved), update, epi)
        .unwrap();
    [y, m, r, rm, rv]
}

#[test]
fn fused_ops_equal_the_plain_op_then_the_epilogue() {
    let mut rng = Rng::new(61);
    // `sweep_shapes` includes the wide rows (`WIDE`).
    for shape in sweep_shapes() {
        let c = shape.c();
        let x = rng.normals(shape.len(), 0.3, 1.0);
        let z = rng.normals(shape.len(), 0.0, 1.0);
        let (gamma, beta) = (rng.normals(c, 1.0, 0.5), rng.normals(c, 0.0, 1.0));
        let (rmean, rvar) = (rng.normals(c, 0.3, 0.2), vec![1.3f32; c]);
        let affine = Affine {
            gamma: &gamma,
            beta: &beta,
        };
        let running = RunningStats {
            mean: &rmean,
            var: &rvar,
        };
        for layout in LAYOUTS {
            for bn in operators(shape, layout, 1e-5) {
                let ctx = format!(
                    "{shape:?} {layout:?} {:?} {:?}",
                    bn.backend(),
                    bn.parallelism()
                );
                let mut plain = vec![f32::NAN; x.len()];
                bn.inference(&x, &mut plain, Some(affine), running).unwrap();
                let trained = train(&bn, &x, affine, Epilogue::None);
                for (epi, z) in [
                    (Epilogue::Relu, None),
                    (Epilogue::AddRelu(&z), Some(&z[..])),
                ] {
                    let mut y = vec![f32::NAN; x.len()];
                    bn.inference_fused(&x, &mut y, Some(affine), running, epi)
                        .unwrap();
                    assert!(same(&y, &compose(&plain, z)), "inference {epi:?} {ctx}");
                    let mut buf = x.clone();
                    bn.inference_fused_in_place(&mut buf, Some(affine), running, epi)
                        .unwrap();
                    assert!(same(&buf, &y), "in place {epi:?} {ctx}");
                    let fused = train(&bn, &x, affine, epi);
                    assert!(
                        same(&fused[0], &compose(&trained[0], z)),
                        "training {epi:?} {ctx}"
                    );
                    for k in 1..5 {
                        assert!(
                            same(&fused[k], &trained[k]),
                            "training statistics {k} {ctx}"
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn relu_keeps_nan_in_its_channel_and_negative_zero() {
    let shape = Shape::new(3, 4, 19).unwrap();
    for layout in LAYOUTS {
        let mut x = Rng::new(62).normals(shape.len(), 0.0, 1.0);
        x[shape.index(layout, 1, 2, 5)] = f32::NAN;
        let (mean, var) = (vec![0.0f32; 4], vec![1.0f32; 4]);
        let running = RunningStats {
            mean: &mean,
            var: &var,
        };
        for bn in operators(shape, layout, 0.0) {
            let mut y = vec![0.0f32; x.len()];
            let z = vec![0.0f32; x.len()];
            bn.inference_fused(&x, &mut y, None, running, Epilogue::AddRelu(&z))
                .unwrap();
            for (i, &v) in y.iter().enumerate() {
                if i == shape.index(layout, 1, 2, 5) {
                    assert!(v.is_nan(), "relu(NaN) is NaN");
                } else {
                    assert!(v >= 0.0 && v == relu(x[i]), "element {i}: {v}");
                }
            }
            // Training: channel 2's statistics are NaN; the other channels are untouched by it.
            let mut yt = vec![0.0f32; x.len()];
            bn.training_fused(&x, &mut yt, None, None, None, Epilogue::Relu)
                .unwrap();
            for (i, &v) in yt.iter().enumerate() {
                let ch = channel_of(shape, layout, i);
                assert_eq!(v.is_nan(), ch == 2, "element {i} of channel {ch}");
            }
            // −0 stays −0: bn(−0) = fma(−0 − 0, 1, β) is −0 for β = −0.
            let x0 = vec![-0.0f32; x.len()];
            let (ones, neg_zeros) = (vec![1.0f32; 4], vec![-0.0f32; 4]);
            let affine = Some(Affine {
                gamma: &ones,
                beta: &neg_zeros,
            });
            bn.inference_fused(&x0, &mut y, affine, running, Epilogue::Relu)
                .unwrap();
            assert!(y.iter().all(|v| v.to_bits() == (-0.0f32).to_bits()));
        }
    }
}

#[test]
fn a_residual_of_the_wrong_length_is_an_error_and_nothing_is_written() {
    let shape = Shape::new(2, 3, 4).unwrap();
    let bn = BatchNorm::new(shape, Layout::Nchw).unwrap();
    let x = vec![1.0f32; 24];
    let z = vec![1.0f32; 23];
    let (mean, var) = (vec![0.0f32; 3], vec![1.0f32; 3]);
    let running = RunningStats {
        mean: &mean,
        var: &var,
    };
    let mut y = vec![7.0f32; 24];
    let err = Error::LengthMismatch {
        op: "inference_fused",
        arg: "z",
        expected: 24,
        actual: 23,
    };
    assert_eq!(
        bn.inference_fused(&x, &mut y, None, running, Epilogue::AddRelu(&z)),
        Err(err)
    );
    let r = bn.training_fused(&x, &mut y, None, None, None, Epilogue::AddRelu(&z));
    assert_eq!(
        r.unwrap_err(),
        Error::LengthMismatch {
            op: "training_fused",
            arg: "z",
            expected: 24,
            actual: 23,
        }
    );
    assert!(y.iter().all(|&v| v == 7.0), "nothing written");
}

/// ReLU's backward from the output: `dy` where `y > 0`, else 0.
fn relu_grad(dy: &[f32], y: &[f32]) -> Vec<f32> {
    dy.iter()
        .zip(y)
        .map(|(&g, &v)| if v > 0.0 { g } else { 0.0 })
        .collect()
}

#[test]
fn fused_backward_is_backward_of_the_gradient_through_relu() {
    let mut rng = Rng::new(63);
    // `sweep_shapes` includes the wide rows (`WIDE`).
    for shape in sweep_shapes() {
        let c = shape.c();
        let x = rng.normals(shape.len(), 0.3, 1.0);
        let z = rng.normals(shape.len(), 0.0, 1.0);
        let dy = rng.normals(shape.len(), 0.0, 1.0);
        let (gamma, beta) = (rng.normals(c, 1.0, 0.5), rng.normals(c, 0.0, 1.0));
        let affine = Affine {
            gamma: &gamma,
            beta: &beta,
        };
        let rvar = vec![1.3f32; c];
        for layout in LAYOUTS {
            for bn in operators(shape, layout, 1e-5) {
                let ctx = format!(
                    "{shape:?} {layout:?} {:?} {:?}",
                    bn.backend(),
                    bn.parallelism()
                );
                let [_, m, r, ..] = train(&bn, &x, affine, Epilogue::None);
                let modes = [
                    BackwardMode::Training(SavedStats {
                        mean: &m,
                        inv_std: &r,
                    }),
                    BackwardMode::Frozen(RunningStats {
                        mean: &m,
                        var: &rvar,
                    }),
                ];
                for (epi, zz) in [
                    (Epilogue::Relu, None),
                    (Epilogue::AddRelu(&z), Some(&z[..])),
                ] {
                    let y = train(&bn, &x, affine, epi)[0].clone();
                    let g = relu_grad(&dy, &y);
                    for mode in modes {
                        let plain = backward_with_grads(&bn, &x, &g, affine, mode);
                        let mut dx = vec![f32::NAN; x.len()];
                        let mut dz = vec![f32::NAN; x.len()];
                        let (mut dgamma, mut dbeta) = (vec![0.0; c], vec![0.0; c]);
                        let grads = ParamGrads {
                            dgamma: &mut dgamma,
                            dbeta: &mut dbeta,
                            mode: GradMode::Overwrite,
                        };
                        let fused = match zz {
                            None => BackwardEpilogue::Relu { y: &y },
                            Some(_) => BackwardEpilogue::AddRelu { y: &y, dz: &mut dz },
                        };
                        bn.backward_fused(&x, &dy, &mut dx, Some(affine), mode, Some(grads), fused)
                            .unwrap();
                        assert!(same(&dx, &plain.0), "dx {epi:?} {mode:?} {ctx}");
                        assert!(same(&dgamma, &plain.1), "dgamma {epi:?} {ctx}");
                        assert!(same(&dbeta, &plain.2), "dbeta {epi:?} {ctx}");
                        if zz.is_some() {
                            assert!(same(&dz, &g), "dz {epi:?} {ctx}");
                        }
                        // Without parameter gradients (the frozen mode then has no reduction to
                        // stage the gradient in).
                        let (mut dx, mut dz) = (vec![f32::NAN; x.len()], vec![f32::NAN; x.len()]);
                        let fused = match zz {
                            None => BackwardEpilogue::Relu { y: &y },
                            Some(_) => BackwardEpilogue::AddRelu { y: &y, dz: &mut dz },
                        };
                        bn.backward_fused(&x, &dy, &mut dx, Some(affine), mode, None, fused)
                            .unwrap();
                        assert!(
                            same(&dx, &plain.0),
                            "dx without grads {epi:?} {mode:?} {ctx}"
                        );
                        if zz.is_some() {
                            assert!(same(&dz, &g), "dz without grads {epi:?} {ctx}");
                        }
                    }
                }
            }
        }
    }
}

/// `backward` of `g` with dγ and dβ: (dx, dγ, dβ).
fn backward_with_grads(
    bn: &BatchNorm,
    x: &[f32],
    g: &[f32],
    affine: Affine<'_>,
    mode: BackwardMode<'_>,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let c = bn.shape().c();
    let mut dx = vec![f32::NAN; x.len()];
    let (mut dgamma, mut dbeta) = (vec![0.0; c], vec![0.0; c]);
    let grads = ParamGrads {
        dgamma: &mut dgamma,
        dbeta: &mut dbeta,
        mode: GradMode::Overwrite,
    };
    bn.backward(x, g, &mut dx, Some(affine), mode, Some(grads))
        .unwrap();
    (dx, dgamma, dbeta)
}

/// Finite differences of `L(x) = Σ w·relu(bn(x) + z)` (batch statistics, f64 reference) against
/// the fused backward's dx with `dy = w`. Central differences with step h = 1e-4 err by O(h²) ≈ 1e-8
/// of the derivative's scale; the f32 backward by about (8 + M)·u ≈ 4e-6 of its terms (M = 45);
/// the bound, 1e-4 of the largest |dx|, leaves room for both and still catches a wrong mask, a
/// missing dz term or a sign. Inputs whose perturbation moves any output across the ReLU kink are
/// skipped (the derivative is not defined there).
#[test]
fn fused_backward_matches_finite_differences() {
    use batchnorm_check::reference;
    let shape = Shape::new(3, 4, 15).unwrap();
    let c = shape.c();
    let mut rng = Rng::new(64);
    let x = rng.normals(shape.len(), 0.5, 1.0);
    let z = rng.normals(shape.len(), 0.0, 0.5);
    let w = rng.normals(shape.len(), 0.0, 1.0);
    let (gamma, beta) = (rng.normals(c, 1.0, 0.3), rng.normals(c, 0.2, 0.5));
    let affine = Affine {
        gamma: &gamma,
        beta: &beta,
    };
    let eps = 1e-5;
    for layout in LAYOUTS {
        // The pre-activations bn(x) + z in f64, and L.
        let pre = |x: &[f64]| -> Vec<f64> {
            let t = reference::training(
                x,
                shape,
                layout,
                Some(&to64(&gamma)),
                Some(&to64(&beta)),
                eps,
            );
            t.y.iter().zip(&z).map(|(y, &z)| y + z as f64).collect()
        };
        let loss =
            |p: &[f64]| -> f64 { p.iter().zip(&w).map(|(p, &w)| p.max(0.0) * w as f64).sum() };
        let bn = BatchNorm::new(shape, layout)
            .unwrap()
            .with_eps(eps)
            .unwrap();
        let [y, m, r, ..] = train(&bn, &x, affine, Epilogue::AddRelu(&z));
        let mode = BackwardMode::Training(SavedStats {
            mean: &m,
            inv_std: &r,
        });
        let (mut dx, mut dz) = (vec![0.0f32; x.len()], vec![0.0f32; x.len()]);
        let fused = BackwardEpilogue::AddRelu { y: &y, dz: &mut dz };
        bn.backward_fused(&x, &w, &mut dx, Some(affine), mode, None, fused)
            .unwrap();
        let x64 = to64(&x);
        let base = pre(&x64);
        let h = 1e-4;
        let mut numeric = vec![f64::NAN; x.len()];
        for j in 0..x.len() {
            let (mut a, mut b) = (x64.clone(), x64.clone());
            a[j] += h;
            b[j] -= h;
            let (pa, pb) = (pre(&a), pre(&b));
            let kink = (0..x.len())
                .any(|i| (pa[i] > 0.0) != (base[i] > 0.0) || (pb[i] > 0.0) != (base[i] > 0.0));
            if !kink {
                numeric[j] = (loss(&pa) - loss(&pb)) / (2.0 * h);
            }
        }
        let scale = numeric
            .iter()
            .filter(|v| v.is_finite())
            .fold(0.0f64, |a, v| a.max(v.abs()));
        let checked = numeric.iter().filter(|v| v.is_finite()).count();
        assert!(
            checked > x.len() / 2,
            "{layout:?}: only {checked} inputs away from a kink"
        );
        for j in (0..x.len()).filter(|&j| numeric[j].is_finite()) {
            let e = (dx[j] as f64 - numeric[j]).abs();
            assert!(
                e <= 1e-4 * scale,
                "{layout:?} dx[{j}] = {} vs {} (scale {scale})",
                dx[j],
                numeric[j]
            );
        }
        // dz = w where the output is positive.
        for i in 0..x.len() {
            let want = if base[i] > 0.0 { w[i] } else { 0.0 };
            assert!(base[i].abs() < 1e-6 || dz[i] == want, "{layout:?} dz[{i}]");
        }
    }
}

fn to64(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}
