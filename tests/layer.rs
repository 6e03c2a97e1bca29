//! The stateful layer: several training steps and an evaluation step per preset, every buffer
//! checked against the framework's rule computed by hand (running statistics, batch counter)
//! and against the plain operations called with the same arguments (bit for bit: y, the saved
//! statistics, dx, dγ, dβ).
#![allow(clippy::needless_range_loop)]

mod common;

use batchnorm::{
    Affine, BackwardMode, BatchNorm, BatchNormLayer, Error, GradMode, Layout, Momentum, ParamGrads,
    RunningStats, SavedStats, SavedStatsMut, Shape, Variance,
};
use batchnorm_check::reference;
use common::*;

const C: usize = 3;

/// The framework's rule for one step, from the layer's previous f32 state and the exact batch
/// statistics: `(mean, var)` blended in f64, rounded once to f32.
fn rule(momentum: Momentum, est: Variance, prev: (f32, f32), stats: (f64, f64, f64)) -> (f64, f64) {
    let (mean, biased, unbiased) = stats;
    let var = match est {
        Variance::Biased => biased,
        Variance::Unbiased => unbiased,
    };
    let (old, new) = match momentum {
        Momentum::NewWeight(m) => (1.0 - m, m),
        Momentum::OldWeight(m) => (m, 1.0 - m),
        Momentum::CumulativeAverage { batches_tracked: t } => {
            ((t as f64 - 1.0) / t as f64, 1.0 / t as f64)
        }
    };
    (
        old * prev.0 as f64 + new * mean,
        old * prev.1 as f64 + new * var,
    )
}

/// `got` within the stated tolerance of `want`: the layer blends its own batch statistics (within
/// `stats_tol(M)` of the exact ones, relative to `scale`, weighted by at most 1) and rounds once
/// to f32 (half an ulp; one more for a value within the statistics' error of a rounding boundary).
fn close(got: f32, want: f64, scale: f64, m: usize) -> bool {
    (got as f64 - want).abs() <= stats_tol(m) * scale + 2.0 * EPS32 * want.abs()
}

/// A preset under test: its name, the layer, its rule as a function of the step (1, 2, ...) and
/// the framework's running-variance estimator (stated here, not read from the layer).
type Preset = (
    &'static str,
    BatchNormLayer,
    Box<dyn Fn(u64) -> Momentum>,
    Variance,
);

fn presets(layout: Layout) -> Vec<Preset> {
    vec![
        (
            "pytorch",
            BatchNormLayer::pytorch(C, layout).unwrap(),
            Box::new(|_| Momentum::NewWeight(0.1)),
            Variance::Unbiased,
        ),
        (
            "pytorch momentum=0.3",
            BatchNormLayer::pytorch(C, layout)
                .unwrap()
                .with_momentum(Some(0.3))
                .unwrap(),
            Box::new(|_| Momentum::NewWeight(0.3)),
            Variance::Unbiased,
        ),
        (
            "pytorch momentum=None",
            BatchNormLayer::pytorch(C, layout)
                .unwrap()
                .with_momentum(None)
                .unwrap(),
            Box::new(|t| Momentum::CumulativeAverage { batches_tracked: t }),
            Variance::Unbiased,
        ),
        (
            "keras",
            BatchNormLayer::keras(C, layout).unwrap(),
            Box::new(|_| Momentum::OldWeight(0.99)),
            Variance::Biased,
        ),
        (
            "keras momentum=0.9",
            BatchNormLayer::keras(C, layout)
                .unwrap()
                .with_momentum(Some(0.9))
                .unwrap(),
            Box::new(|_| Momentum::OldWeight(0.9)),
            Variance::Biased,
        ),
        (
            "onnx",
            BatchNormLayer::onnx(C, layout).unwrap(),
            Box::new(|_| Momentum::OldWeight(0.9)),
            Variance::Biased,
        ),
    ]
}

#[test]
fn presets_hold_the_frameworks_defaults() {
    let p = BatchNormLayer::pytorch(4, Layout::Nchw).unwrap();
    assert_eq!(
        (p.eps(), p.momentum(), p.var_estimator()),
        (1e-5, Momentum::NewWeight(0.1), Variance::Unbiased)
    );
    let k = BatchNormLayer::keras(4, Layout::Nhwc).unwrap();
    assert_eq!(
        (k.eps(), k.momentum(), k.var_estimator()),
        (1e-3, Momentum::OldWeight(0.99), Variance::Biased)
    );
    let o = BatchNormLayer::onnx(4, Layout::Nchw).unwrap();
    assert_eq!(
        (o.eps(), o.momentum(), o.var_estimator()),
        (1e-5, Momentum::OldWeight(0.9), Variance::Biased)
    );
    for l in [&p, &k, &o] {
        assert!(l.is_training());
        assert_eq!(l.gamma(), &[1.0; 4]);
        assert_eq!(l.beta(), &[0.0; 4]);
        assert_eq!(l.running_mean(), &[0.0; 4]);
        assert_eq!(l.running_var(), &[1.0; 4]);
        assert_eq!(l.batches_tracked(), 0);
    }
}

#[test]
fn training_steps_and_evaluation_follow_each_frameworks_rule() {
    let mut rng = Rng::new(7);
    // The batch size changes from step to step, as the last batch of an epoch does.
    let steps = [(4, 5), (3, 7), (5, 5), (2, 9)];
    for layout in [Layout::Nchw, Layout::Nhwc] {
        for (name, mut layer, momentum_at, est) in presets(layout) {
            let (gamma, beta) = (rng.normals(C, 0.5, 1.0), rng.normals(C, 0.0, 1.0));
            layer.set_affine(&gamma, &beta).unwrap();
            for (step, &(n, hw)) in steps.iter().enumerate() {
                let t = step as u64 + 1;
                let shape = Shape::new(n, C, hw).unwrap();
                let (means, stds) = ordinary(&mut rng, C);
                let x = tensor(&mut rng, shape, layout, &means, &stds);
                let prev: Vec<(f32, f32)> = (0..C)
                    .map(|c| (layer.running_mean()[c], layer.running_var()[c]))
                    .collect();
                let mut y = vec![f32::NAN; x.len()];
                layer.forward(&x, &mut y, shape).unwrap();
                let ctx = format!("{name} {layout:?} step {t}");
                assert_eq!(layer.batches_tracked(), t, "{ctx}");

                // Running statistics: the framework's rule, by hand.
                let exact = reference::training(&x, shape, layout, None, None, layer.eps());
                let m = shape.per_channel();
                for c in 0..C {
                    let stats = (exact.mean[c], exact.var[c], exact.var_unbiased[c]);
                    let (want_mean, want_var) = rule(momentum_at(t), est, prev[c], stats);
                    let sigma = exact.var[c].sqrt();
                    let (rm, rv) = (layer.running_mean()[c], layer.running_var()[c]);
                    assert!(
                        close(rm, want_mean, sigma.max(exact.mean[c].abs()), m),
                        "{ctx} channel {c}: running mean {rm}, want {want_mean}"
                    );
                    assert!(
                        close(rv, want_var, exact.var_unbiased[c], m),
                        "{ctx} channel {c}: running var {rv}, want {want_var}"
                    );
                }

                // y and the saved statistics: the plain operation with the same arguments.
                let op = BatchNorm::new(shape, layout)
                    .unwrap()
                    .with_eps(layer.eps())
                    .unwrap();
                let (mut sm, mut si) = (vec![0.0; C], vec![0.0; C]);
                let mut y_op = vec![0.0; x.len()];
                let affine = Affine {
                    gamma: &gamma,
                    beta: &beta,
                };
                let saved = SavedStatsMut {
                    mean: &mut sm,
                    inv_std: &mut si,
                };
                op.training(&x, &mut y_op, Some(affine), Some(saved), None)
                    .unwrap();
                assert_eq!(bits(&y), bits(&y_op), "{ctx}: y");
                assert_eq!(bits(layer.saved_mean()), bits(&sm), "{ctx}: saved mean");
                assert_eq!(bits(layer.saved_inv_std()), bits(&si), "{ctx}: inv std");

                // Backward: dx as the plain op's; dγ, dβ accumulated over the steps.
                let dy = rng.normals(x.len(), 0.0, 1.0);
                let (dg0, db0) = (layer.dgamma().to_vec(), layer.dbeta().to_vec());
                let mut dx = vec![f32::NAN; x.len()];
                layer.backward(&x, &dy, &mut dx).unwrap();
                let (mut dx_op, mut dg, mut db) = (vec![0.0; x.len()], dg0.clone(), db0.clone());
                let mode = BackwardMode::Training(SavedStats {
                    mean: &sm,
                    inv_std: &si,
                });
                let grads = ParamGrads {
                    dgamma: &mut dg,
                    dbeta: &mut db,
                    mode: GradMode::Accumulate,
                };
                op.backward(
                    &x,
                    &dy,
                    &mut dx_op,
                    Some(Affine {
                        gamma: &gamma,
                        beta: &beta,
                    }),
                    mode,
                    Some(grads),
                )
                .unwrap();
                assert_eq!(bits(&dx), bits(&dx_op), "{ctx}: dx");
                assert_eq!(bits(layer.dgamma()), bits(&dg), "{ctx}: dgamma");
                assert_eq!(bits(layer.dbeta()), bits(&db), "{ctx}: dbeta");
            }

            // Evaluation: the running statistics, nothing updated.
            layer.eval();
            let shape = Shape::new(3, C, 4).unwrap();
            let (means, stds) = ordinary(&mut rng, C);
            let x = tensor(&mut rng, shape, layout, &means, &stds);
            let before = (layer.running_mean().to_vec(), layer.running_var().to_vec());
            let mut y = vec![f32::NAN; x.len()];
            layer.forward(&x, &mut y, shape).unwrap();
            assert_eq!(layer.batches_tracked(), steps.len() as u64);
            assert_eq!(
                (layer.running_mean(), layer.running_var()),
                (&before.0[..], &before.1[..])
            );
            let want = reference::inference(
                &x,
                shape,
                layout,
                &before.0,
                &before.1,
                Some(&gamma),
                Some(&beta),
                layer.eps(),
            );
            for (i, (&g, &w)) in y.iter().zip(&want).enumerate() {
                let c = channel_of(shape, layout, i);
                let xhat =
                    (x[i] as f64 - before.0[c] as f64) / (before.1[c] as f64 + layer.eps()).sqrt();
                let scale = (gamma[c] as f64).abs() * (1.0 + xhat.abs()) + (beta[c] as f64).abs();
                assert!(
                    (g as f64 - w).abs() <= fwd_tol(1) * scale,
                    "{name} {layout:?} eval element {i}: {g} vs {w}"
                );
            }
            // Evaluation backward: the frozen statistics' gradient.
            let dy = rng.normals(x.len(), 0.0, 1.0);
            let mut dx = vec![f32::NAN; x.len()];
            layer.zero_grad();
            layer.backward(&x, &dy, &mut dx).unwrap();
            let op = BatchNorm::new(shape, layout)
                .unwrap()
                .with_eps(layer.eps())
                .unwrap();
            let (mut dx_op, mut dg, mut db) = (vec![0.0; x.len()], vec![0.0; C], vec![0.0; C]);
            let running = RunningStats {
                mean: &before.0,
                var: &before.1,
            };
            let grads = ParamGrads {
                dgamma: &mut dg,
                dbeta: &mut db,
                mode: GradMode::Overwrite,
            };
            op.backward(
                &x,
                &dy,
                &mut dx_op,
                Some(Affine {
                    gamma: &gamma,
                    beta: &beta,
                }),
                BackwardMode::Frozen(running),
                Some(grads),
            )
            .unwrap();
            assert_eq!(bits(&dx), bits(&dx_op), "{name} {layout:?}: frozen dx");
            assert_eq!(
                bits(layer.dgamma()),
                bits(&dg),
                "{name} {layout:?}: frozen dgamma"
            );
            assert_eq!(
                bits(layer.dbeta()),
                bits(&db),
                "{name} {layout:?}: frozen dbeta"
            );
        }
    }
}

#[test]
fn errors_change_nothing() {
    let mut layer = BatchNormLayer::pytorch(2, Layout::Nchw).unwrap();
    let (x, dy) = (vec![1.0f32; 8], vec![1.0f32; 8]);
    let mut dx = vec![0.0f32; 8];
    assert_eq!(layer.backward(&x, &dy, &mut dx), Err(Error::NoForward));
    // The wrong channel count.
    let mut y = vec![0.0f32; 12];
    let wrong = Shape::new(2, 3, 2).unwrap();
    assert_eq!(
        layer.forward(&[0.0; 12], &mut y, wrong),
        Err(Error::ChannelMismatch {
            expected: 2,
            actual: 3
        })
    );
    // One value per channel: PyTorch's unbiased running variance is undefined.
    let one = Shape::new(1, 2, 1).unwrap();
    let mut y1 = vec![0.0f32; 2];
    assert_eq!(
        layer.forward(&[1.0, 2.0], &mut y1, one),
        Err(Error::TooFewValues { per_channel: 1 })
    );
    assert_eq!(layer.batches_tracked(), 0);
    assert_eq!(layer.running_mean(), &[0.0, 0.0]);
    assert_eq!(layer.running_var(), &[1.0, 1.0]);
    assert_eq!(layer.backward(&x, &dy, &mut dx), Err(Error::NoForward));
    assert!(matches!(
        BatchNormLayer::pytorch(0, Layout::Nhwc),
        Err(Error::ZeroDimension { dim: "C" })
    ));
    assert!(matches!(
        BatchNormLayer::keras(2, Layout::Nhwc)
            .unwrap()
            .with_momentum(Some(1.5)),
        Err(Error::InvalidMomentum { .. })
    ));
    assert!(matches!(
        BatchNormLayer::keras(2, Layout::Nhwc)
            .unwrap()
            .with_eps(-1.0),
        Err(Error::InvalidEpsilon { .. })
    ));
    assert!(matches!(
        layer.set_affine(&[1.0], &[0.0, 0.0]),
        Err(Error::LengthMismatch { arg: "gamma", .. })
    ));
    assert_eq!(layer.gamma(), &[1.0, 1.0]);
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}
