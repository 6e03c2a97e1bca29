//! Backward pass (training mode and frozen statistics) against the f64 reference, on both layouts
//! and every backend, plus a finite-difference check of the reference gradients themselves.
#![allow(clippy::needless_range_loop)]

mod common;

use batchnorm::{
    Affine, BackwardMode, BatchNorm, GradMode, Layout, ParamGrads, RunningStats, SavedStats, Shape,
};
use batchnorm_check::reference;
use common::*;

const LAYOUTS: [Layout; 2] = [Layout::Nchw, Layout::Nhwc];

/// Error scales of the training-mode gradients, from the reference: per element of dx the size
/// of the terms `γ·r·(dy − Σdy/M − x̂·Σx̂dy/M)` with absolute values, per channel Σ|x̂·dy| for dγ
/// and Σ|dy| for dβ. The f32 kernels accumulate these sums, so their rounding scales with them.
struct Scales {
    dx: Vec<f64>,
    dgamma: Vec<f64>,
    dbeta: Vec<f64>,
}

fn training_scales(
    x: &[f32],
    dy: &[f32],
    shape: Shape,
    layout: Layout,
    gamma: &[f32],
    eps: f64,
) -> Scales {
    let t = reference::training(x, shape, layout, None, None, eps);
    let m = shape.per_channel() as f64;
    let (mut sum_dy, mut sum_xdy) = (vec![0.0; shape.c()], vec![0.0; shape.c()]);
    for i in 0..x.len() {
        let c = channel_of(shape, layout, i);
        let xhat = (x[i] as f64 - t.mean[c]) * t.inv_std[c];
        sum_dy[c] += (dy[i] as f64).abs();
        sum_xdy[c] += (xhat * dy[i] as f64).abs();
    }
    let dx = (0..x.len())
        .map(|i| {
            let c = channel_of(shape, layout, i);
            let xhat = (x[i] as f64 - t.mean[c]) * t.inv_std[c];
            (gamma[c] as f64).abs()
                * t.inv_std[c]
                * ((dy[i] as f64).abs() + sum_dy[c] / m + xhat.abs() * sum_xdy[c] / m)
        })
        .collect();
    Scales {
        dx,
        dgamma: sum_xdy,
        dbeta: sum_dy,
    }
}

/// Checks a training-mode backward (out of place, and in place bit-identical to it).
/// Returns the worst dx error relative to its scale.
fn check_training_backward(
    bn: &BatchNorm,
    x: &[f32],
    dy: &[f32],
    gamma: &[f32],
    worst: &mut Worst,
) {
    let shape = bn.shape();
    let (layout, c, m) = (bn.layout(), shape.c(), shape.per_channel());
    let beta = &vec![0.0f32; c][..]; // β does not enter dx; backward takes the forward's affine
    let (mean, inv_std) = forward_saved(bn, x);
    let want = reference::backward_training(x, dy, shape, layout, Some(gamma), bn.eps());
    let scales = training_scales(x, dy, shape, layout, gamma, bn.eps());
    let mode = BackwardMode::Training(SavedStats {
        mean: &mean,
        inv_std: &inv_std,
    });
    let mut dx = vec![f32::NAN; x.len()];
    let (mut dgamma, mut dbeta) = (vec![f32::NAN; c], vec![f32::NAN; c]);
    let grads = ParamGrads {
        dgamma: &mut dgamma,
        dbeta: &mut dbeta,
        mode: GradMode::Overwrite,
    };
    bn.backward(
        x,
        dy,
        &mut dx,
        Some(Affine { gamma, beta }),
        mode,
        Some(grads),
    )
    .unwrap();
    let tol = fwd_tol(m);
    let ctx = format!(
        "{shape:?} {layout:?} {:?} {:?}",
        bn.backend(),
        bn.parallelism()
    );
    let e = max_rel_err(&dx, &want.dx, |i| scales.dx[i]);
    worst.note(&format!("training dx {layout:?}"), e);
    assert!(e <= tol, "dx {ctx}: {e:e} > {tol:e}");
    let eg = max_rel_err(&dgamma, &want.dgamma, |c| {
        scales.dgamma[c] + f64::MIN_POSITIVE
    });
    let eb = max_rel_err(&dbeta, &want.dbeta, |c| scales.dbeta[c] + f64::MIN_POSITIVE);
    worst.note(&format!("training dgamma {layout:?}"), eg);
    worst.note(&format!("training dbeta {layout:?}"), eb);
    assert!(eg <= tol && eb <= tol, "dgamma {eg:e} dbeta {eb:e} {ctx}");

    let mut inplace = dy.to_vec();
    bn.backward_in_place(x, &mut inplace, Some(Affine { gamma, beta }), mode, None)
        .unwrap();
    assert_eq!(inplace, dx, "in-place dx differs {ctx}");
}

#[test]
fn training_backward_matches_reference_on_sweep() {
    let mut worst = Worst::default();
    let mut rng = Rng::new(21);
    for shape in sweep_shapes() {
        for layout in LAYOUTS {
            let (means, stds) = ordinary(&mut rng, shape.c());
            let x = tensor(&mut rng, shape, layout, &means, &stds);
            let dy = rng.normals(shape.len(), 0.0, 1.0);
            let gamma = rng.normals(shape.c(), 0.0, 1.0);
            for bn in operators(shape, layout, 1e-5) {
                check_training_backward(&bn, &x, &dy, &gamma, &mut worst);
            }
        }
    }
}

#[test]
fn frozen_backward_matches_reference_on_sweep() {
    let mut worst = Worst::default();
    let mut rng = Rng::new(22);
    for shape in sweep_shapes() {
        for layout in LAYOUTS {
            let c = shape.c();
            let (means, stds) = ordinary(&mut rng, c);
            let x = tensor(&mut rng, shape, layout, &means, &stds);
            let dy = rng.normals(shape.len(), 0.0, 1.0);
            let gamma = rng.normals(c, 0.0, 1.0);
            let beta = vec![0.0f32; c]; // β does not enter dx; backward takes the forward's affine
            let rmean: Vec<f32> = means.iter().map(|&m| (m + 0.1) as f32).collect();
            let rvar: Vec<f32> = stds.iter().map(|&s| (s * s * 1.1) as f32).collect();
            let want = reference::backward_frozen(
                &x,
                &dy,
                shape,
                layout,
                &rmean,
                &rvar,
                Some(&gamma),
                1e-5,
            );
            let tol = fwd_tol(shape.per_channel());
            for bn in operators(shape, layout, 1e-5) {
                let mode = BackwardMode::Frozen(RunningStats {
                    mean: &rmean,
                    var: &rvar,
                });
                let mut dx = vec![f32::NAN; x.len()];
                let (mut dgamma, mut dbeta) = (vec![f32::NAN; c], vec![f32::NAN; c]);
                let grads = ParamGrads {
                    dgamma: &mut dgamma,
                    dbeta: &mut dbeta,
                    mode: GradMode::Overwrite,
                };
                bn.backward(
                    &x,
                    &dy,
                    &mut dx,
                    Some(Affine {
                        gamma: &gamma,
                        beta: &beta,
                    }),
                    mode,
                    Some(grads),
                )
                .unwrap();
                let e = max_rel_err(&dx, &want.dx, |i| want.dx[i].abs() + f64::MIN_POSITIVE);
                worst.note(&format!("frozen dx {layout:?}"), e);
                assert!(e <= fwd_tol(1), "frozen dx {shape:?} {layout:?}: {e:e}");
                // Scales: Σ|x − mean|·r·|dy| and Σ|dy| per channel.
                let (mut sg, mut sb) = (vec![0.0; c], vec![0.0; c]);
                for i in 0..x.len() {
                    let ch = channel_of(shape, layout, i);
                    let r = 1.0 / (rvar[ch] as f64 + 1e-5).sqrt();
                    sg[ch] += ((x[i] - rmean[ch]) as f64 * r * dy[i] as f64).abs();
                    sb[ch] += (dy[i] as f64).abs();
                }
                let eg = max_rel_err(&dgamma, &want.dgamma, |c| sg[c]);
                let eb = max_rel_err(&dbeta, &want.dbeta, |c| sb[c]);
                worst.note(&format!("frozen dgamma {layout:?}"), eg);
                assert!(eg <= tol && eb <= tol, "frozen dgamma {eg:e} dbeta {eb:e}");
                let mut inplace = dy.clone();
                let (mut dg2, mut db2) = (vec![0.0; c], vec![0.0; c]);
                let grads = ParamGrads {
                    dgamma: &mut dg2,
                    dbeta: &mut db2,
                    mode: GradMode::Overwrite,
                };
                bn.backward_in_place(
                    &x,
                    &mut inplace,
                    Some(Affine {
                        gamma: &gamma,
                        beta: &beta,
                    }),
                    mode,
                    Some(grads),
                )
                .unwrap();
                assert_eq!(inplace, dx);
                assert_eq!((dg2, db2), (dgamma, dbeta));
            }
        }
    }
}

/// Loss `Σ w·y` of the reference training forward, in f64.
fn loss(x: &[f64], shape: Shape, layout: Layout, gamma: &[f64], beta: &[f64], w: &[f64]) -> f64 {
    let t = reference::training(x, shape, layout, Some(gamma), Some(beta), 1e-5);
    t.y.iter().zip(w).map(|(y, w)| y * w).sum()
}

#[test]
fn reference_gradients_match_finite_differences() {
    let mut rng = Rng::new(23);
    for shape in [Shape::new(3, 4, 5).unwrap(), Shape::new(2, 3, 1).unwrap()] {
        for layout in LAYOUTS {
            let c = shape.c();
            let x32 = rng.normals(shape.len(), 0.5, 2.0);
            let w32 = rng.normals(shape.len(), 0.0, 1.0);
            let g32 = rng.normals(c, 1.0, 0.5);
            let b32 = rng.normals(c, 0.0, 1.0);
            let f = |v: &[f32]| v.iter().map(|&a| a as f64).collect::<Vec<f64>>();
            let (x, w, gamma, beta) = (f(&x32), f(&w32), f(&g32), f(&b32));
            let eps = 1e-5;
            let grads = reference::backward_training(&x, &w, shape, layout, Some(&gamma), eps);
            // Central differences: truncation ~h², rounding ~1e-16/h; both far below 1e-7.
            let h = 1e-5;
            let fd = |perturb: &dyn Fn(f64) -> f64| (perturb(h) - perturb(-h)) / (2.0 * h);
            for i in 0..x.len() {
                let d = fd(&|e| {
                    let mut xp = x.clone();
                    xp[i] += e;
                    loss(&xp, shape, layout, &gamma, &beta, &w)
                });
                assert!(
                    (d - grads.dx[i]).abs() <= 1e-7 * (1.0 + d.abs()),
                    "dx[{i}] fd {d} vs {}",
                    grads.dx[i]
                );
            }
            for ch in 0..c {
                let dg = fd(&|e| {
                    let mut gp = gamma.clone();
                    gp[ch] += e;
                    loss(&x, shape, layout, &gp, &beta, &w)
                });
                let db = fd(&|e| {
                    let mut bp = beta.clone();
                    bp[ch] += e;
                    loss(&x, shape, layout, &gamma, &bp, &w)
                });
                assert!((dg - grads.dgamma[ch]).abs() <= 1e-7 * (1.0 + dg.abs()));
                assert!((db - grads.dbeta[ch]).abs() <= 1e-7 * (1.0 + db.abs()));
            }
            // And the f32 kernels agree with these reference gradients (same f32 inputs).
            let mut worst = Worst::default();
            for bn in operators(shape, layout, 1e-5) {
                check_training_backward(&bn, &x32, &w32, &g32, &mut worst);
            }
        }
    }
}

#[test]
fn constant_channels_and_large_offsets() {
    let mut worst = Worst::default();
    let mut rng = Rng::new(24);
    for shape in [
        Shape::new(4, 3, 1000).unwrap(),
        Shape::new(2, 67, 65).unwrap(),
        Shape::new(64, 17, 1).unwrap(),
    ] {
        for layout in LAYOUTS {
            let c = shape.c();
            for (mean, std) in [(123.456, 0.0), (1e4, 1e-2), (3e6, 4.0)] {
                let means: Vec<f64> = (0..c).map(|i| mean * (1.0 + 0.1 * i as f64)).collect();
                let x = tensor(&mut rng, shape, layout, &means, &vec![std; c]);
                let dy = rng.normals(shape.len(), 0.0, 1.0);
                let gamma = rng.normals(c, 0.0, 1.0);
                let beta = vec![0.0f32; c]; // β does not enter dx; backward takes the forward's affine
                for bn in operators(shape, layout, 1e-5) {
                    if std == 0.0 {
                        // Zero variance, ε > 0: x̂ = 0, finite gradients dx = γ·r·(dy − mean(dy)).
                        let (m, r) = forward_saved(&bn, &x);
                        let mut dx = vec![f32::NAN; x.len()];
                        let mode = BackwardMode::Training(SavedStats {
                            mean: &m,
                            inv_std: &r,
                        });
                        bn.backward(
                            &x,
                            &dy,
                            &mut dx,
                            Some(Affine {
                                gamma: &gamma,
                                beta: &beta,
                            }),
                            mode,
                            None,
                        )
                        .unwrap();
                        assert!(dx.iter().all(|v| v.is_finite()));
                    }
                    check_training_backward(&bn, &x, &dy, &gamma, &mut worst);
                }
            }
        }
    }
}

#[test]
fn accumulate_adds_to_existing_gradients() {
    let mut rng = Rng::new(25);
    let shape = Shape::new(2, 5, 30).unwrap();
    for layout in LAYOUTS {
        let x = rng.normals(shape.len(), 0.0, 1.0);
        let dy = rng.normals(shape.len(), 0.0, 1.0);
        let bn = BatchNorm::new(shape, layout).unwrap();
        let (m, r) = forward_saved(&bn, &x);
        let mode = BackwardMode::Training(SavedStats {
            mean: &m,
            inv_std: &r,
        });
        let mut dx = vec![0.0; x.len()];
        let (mut g1, mut b1) = (vec![0.0f32; 5], vec![0.0f32; 5]);
        let grads = ParamGrads {
            dgamma: &mut g1,
            dbeta: &mut b1,
            mode: GradMode::Overwrite,
        };
        bn.backward(&x, &dy, &mut dx, None, mode, Some(grads))
            .unwrap();
        let (mut g2, mut b2) = (vec![1.0f32; 5], vec![-2.0f32; 5]);
        let grads = ParamGrads {
            dgamma: &mut g2,
            dbeta: &mut b2,
            mode: GradMode::Accumulate,
        };
        bn.backward(&x, &dy, &mut dx, None, mode, Some(grads))
            .unwrap();
        for c in 0..5 {
            assert!((g2[c] - (1.0 + g1[c])).abs() <= 2.0 * f32::EPSILON * (1.0 + g1[c].abs()));
            assert!((b2[c] - (-2.0 + b1[c])).abs() <= 2.0 * f32::EPSILON * (2.0 + b1[c].abs()));
        }
    }
}

#[test]
fn without_affine_gamma_is_one() {
    let mut rng = Rng::new(26);
    let shape = Shape::new(3, 7, 11).unwrap();
    for layout in LAYOUTS {
        let x = rng.normals(shape.len(), 1.0, 3.0);
        let dy = rng.normals(shape.len(), 0.0, 1.0);
        let (ones, zeros) = (vec![1.0f32; 7], vec![0.0f32; 7]);
        for bn in operators(shape, layout, 1e-5) {
            let (m, r) = forward_saved(&bn, &x);
            let mode = BackwardMode::Training(SavedStats {
                mean: &m,
                inv_std: &r,
            });
            let mut a = vec![f32::NAN; x.len()];
            let mut b = vec![f32::NAN; x.len()];
            bn.backward(&x, &dy, &mut a, None, mode, None).unwrap();
            bn.backward(
                &x,
                &dy,
                &mut b,
                Some(Affine {
                    gamma: &ones,
                    beta: &zeros,
                }),
                mode,
                None,
            )
            .unwrap();
            assert_eq!(a, b);
        }
    }
}

/// A gradient of negative zeros sums to +0 in every schedule: dβ = Σdy and dγ = Σdy·x̂ come out
/// as +0.0, never −0.0, whether the runs are short (one kernel call per sample and group of
/// channels, sample 0's sums written in place), long (pieces) or rows of interleaved channels,
/// for one sample and several.
#[test]
fn negative_zero_gradients_sum_to_positive_zero() {
    let mut rng = Rng::new(27);
    // 64 and 128: runs of whole accumulator groups, where no +0 padding enters the sums.
    for (n, hw) in [(1, 7), (3, 7), (1, 1), (1, 64), (1, 128), (2, 3000)] {
        let shape = Shape::new(n, 9, hw).unwrap();
        for layout in LAYOUTS {
            let x = rng.normals(shape.len(), 1.0, 2.0);
            let dy = vec![-0.0f32; shape.len()];
            for bn in operators(shape, layout, 1e-5) {
                let (m, r) = forward_saved(&bn, &x);
                let mode = BackwardMode::Training(SavedStats {
                    mean: &m,
                    inv_std: &r,
                });
                let (mut dg, mut db) = (vec![f32::NAN; 9], vec![f32::NAN; 9]);
                let grads = ParamGrads {
                    dgamma: &mut dg,
                    dbeta: &mut db,
                    mode: GradMode::Overwrite,
                };
                let mut dx = vec![f32::NAN; x.len()];
                bn.backward(&x, &dy, &mut dx, None, mode, Some(grads))
                    .unwrap();
                for (what, v) in [("dgamma", &dg), ("dbeta", &db)] {
                    let bits: Vec<u32> = v.iter().map(|v| v.to_bits()).collect();
                    assert_eq!(bits, vec![0; 9], "{what}, {n}x9x{hw} {layout:?}: {v:?}");
                }
            }
        }
    }
}
