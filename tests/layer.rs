//! The stateful layer: several training steps and an evaluation step per preset, every buffer
//! checked against the framework's rule computed by hand (running statistics, batch counter)
//! and against the plain operations called with the same arguments (bit for bit: y, the saved
//! and running statistics, dx, dγ, dβ), for every storage type: the f32 layer on f32, f16 and
//! bf16 data, the f64 layer on f64 data (the plain ops are checked against references in
//! tests/forward.rs, tests/backward.rs, tests/storage.rs and tests/f64.rs).
#![allow(clippy::needless_range_loop)]

mod common;

use batchnorm::{
    Affine, BackwardMode, BatchNorm, BatchNormLayer, Error, GradMode, Layout, Momentum,
    Parallelism, Param, ParamGrads, Preset, Residency, RunningStats, RunningUpdate, SavedStats,
    SavedStatsMut, Shape, Variance, bf16, f16,
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
type Framework = (
    &'static str,
    BatchNormLayer,
    Box<dyn Fn(u64) -> Momentum>,
    Variance,
);

fn presets(layout: Layout) -> Vec<Framework> {
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
    // The f64 layer: the same presets, in f64.
    for (preset, f32_layer) in [
        (Preset::PyTorch, &p),
        (Preset::Keras, &k),
        (Preset::Onnx, &o),
    ] {
        let l = BatchNormLayer::<f64>::new(4, Layout::Nhwc, preset).unwrap();
        assert_eq!(
            (l.eps(), l.momentum(), l.var_estimator()),
            (
                f32_layer.eps(),
                f32_layer.momentum(),
                f32_layer.var_estimator()
            ),
            "{preset:?}"
        );
        assert!(l.is_training());
        assert_eq!(
            (l.gamma(), l.beta(), l.running_mean(), l.running_var()),
            (&[1.0; 4][..], &[0.0; 4][..], &[0.0; 4][..], &[1.0; 4][..])
        );
    }
}

/// The plain operator the layer runs for `shape`: its layout, ε, parallelism and backend, with
/// the default residency whatever the layer's (the results are the same bits).
fn plain_op<P: Param>(layer: &BatchNormLayer<P>, shape: Shape) -> BatchNorm {
    BatchNorm::on_backend(shape, layer.layout(), layer.backend())
        .unwrap()
        .with_eps(layer.eps())
        .unwrap()
        .with_parallelism(layer.parallelism())
}

/// One training step of `layer`, forward of `x` then backward of `dy`, against the plain
/// operations called with the layer's arguments: y, the saved statistics, the running update,
/// the batch counter, dx and the accumulated dγ and dβ, bit for bit. Returns y.
fn training_step_is_the_plain_ops<E: Store>(
    layer: &mut BatchNormLayer<E::Param>,
    (x, dy): (&[E], &[E]),
    shape: Shape,
    ctx: &str,
) -> Vec<E> {
    let t = layer.batches_tracked() + 1;
    let op = plain_op(layer, shape);
    let (gamma, beta) = (layer.gamma().to_vec(), layer.beta().to_vec());
    let affine = Some(Affine {
        gamma: &gamma,
        beta: &beta,
    });
    let (mut rm, mut rv) = (layer.running_mean().to_vec(), layer.running_var().to_vec());
    let (mut dg, mut db) = (layer.dgamma().to_vec(), layer.dbeta().to_vec());
    let nan = E::param(f64::NAN);
    let (mut sm, mut si) = (vec![nan; shape.c()], vec![nan; shape.c()]);
    let momentum = match layer.momentum() {
        Momentum::CumulativeAverage { .. } => Momentum::CumulativeAverage { batches_tracked: t },
        m => m,
    };
    let update = RunningUpdate {
        mean: &mut rm,
        var: &mut rv,
        momentum,
        var_estimator: layer.var_estimator(),
    };
    let saved = SavedStatsMut {
        mean: &mut sm,
        inv_std: &mut si,
    };
    let mut y_op = vec![E::round(f64::NAN); x.len()];
    op.training(x, &mut y_op, affine, Some(saved), Some(update))
        .unwrap();
    let mut y = vec![E::round(f64::NAN); x.len()];
    layer.forward(x, &mut y, shape).unwrap();
    assert_eq!(layer.batches_tracked(), t, "{ctx}");
    assert_eq!(bits(&y), bits(&y_op), "{ctx}: y");

    let mode = BackwardMode::Training(SavedStats {
        mean: &sm,
        inv_std: &si,
    });
    let grads = ParamGrads {
        dgamma: &mut dg,
        dbeta: &mut db,
        mode: GradMode::Accumulate,
    };
    let mut dx_op = vec![E::round(f64::NAN); x.len()];
    op.backward(x, dy, &mut dx_op, affine, mode, Some(grads))
        .unwrap();
    let mut dx = vec![E::round(f64::NAN); x.len()];
    layer.backward(x, dy, &mut dx).unwrap();
    assert_eq!(bits(&dx), bits(&dx_op), "{ctx}: dx");
    assert_layer_state(layer, [&sm, &si, &rm, &rv, &dg, &db], ctx);
    y
}

/// One evaluation step of `layer` (in evaluation mode) against the plain operations: y by
/// inference with the running statistics, which stay as they were, as does the batch counter;
/// dx and the accumulated dγ and dβ of the frozen statistics; bit for bit. Returns y.
fn evaluation_step_is_the_plain_ops<E: Store>(
    layer: &mut BatchNormLayer<E::Param>,
    (x, dy): (&[E], &[E]),
    shape: Shape,
    ctx: &str,
) -> Vec<E> {
    assert!(!layer.is_training());
    let op = plain_op(layer, shape);
    let (gamma, beta) = (layer.gamma().to_vec(), layer.beta().to_vec());
    let affine = Some(Affine {
        gamma: &gamma,
        beta: &beta,
    });
    let (rm, rv) = (layer.running_mean().to_vec(), layer.running_var().to_vec());
    let running = RunningStats {
        mean: &rm,
        var: &rv,
    };
    let (mut dg, mut db) = (layer.dgamma().to_vec(), layer.dbeta().to_vec());
    let tracked = layer.batches_tracked();
    let mut y_op = vec![E::round(f64::NAN); x.len()];
    op.inference(x, &mut y_op, affine, running).unwrap();
    let mut y = vec![E::round(f64::NAN); x.len()];
    layer.forward(x, &mut y, shape).unwrap();
    assert_eq!(bits(&y), bits(&y_op), "{ctx}: eval y");
    assert_eq!(layer.batches_tracked(), tracked, "{ctx}");
    assert_eq!(
        (bits(layer.running_mean()), bits(layer.running_var())),
        (bits(&rm), bits(&rv)),
        "{ctx}: running statistics changed in evaluation"
    );

    let grads = ParamGrads {
        dgamma: &mut dg,
        dbeta: &mut db,
        mode: GradMode::Accumulate,
    };
    let mut dx_op = vec![E::round(f64::NAN); x.len()];
    let mode = BackwardMode::Frozen(running);
    op.backward(x, dy, &mut dx_op, affine, mode, Some(grads))
        .unwrap();
    let mut dx = vec![E::round(f64::NAN); x.len()];
    layer.backward(x, dy, &mut dx).unwrap();
    assert_eq!(bits(&dx), bits(&dx_op), "{ctx}: frozen dx");
    assert_eq!(bits(layer.dgamma()), bits(&dg), "{ctx}: frozen dgamma");
    assert_eq!(bits(layer.dbeta()), bits(&db), "{ctx}: frozen dbeta");
    y
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
                let dy = rng.normals(x.len(), 0.0, 1.0);
                let prev: Vec<(f32, f32)> = (0..C)
                    .map(|c| (layer.running_mean()[c], layer.running_var()[c]))
                    .collect();
                let ctx = format!("{name} {layout:?} step {t}");
                training_step_is_the_plain_ops(&mut layer, (&x, &dy), shape, &ctx);

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
            }

            // Evaluation: the running statistics, nothing updated; the frozen gradient.
            layer.eval();
            let shape = Shape::new(3, C, 4).unwrap();
            let (means, stds) = ordinary(&mut rng, C);
            let x = tensor(&mut rng, shape, layout, &means, &stds);
            let dy = rng.normals(x.len(), 0.0, 1.0);
            let (rm, rv) = (layer.running_mean().to_vec(), layer.running_var().to_vec());
            layer.zero_grad();
            let ctx = format!("{name} {layout:?}");
            let y = evaluation_step_is_the_plain_ops(&mut layer, (&x, &dy), shape, &ctx);
            assert_eq!(layer.batches_tracked(), steps.len() as u64);
            let want = reference::inference(
                &x,
                shape,
                layout,
                &rm,
                &rv,
                Some(&gamma),
                Some(&beta),
                layer.eps(),
            );
            for (i, (&g, &w)) in y.iter().zip(&want).enumerate() {
                let c = channel_of(shape, layout, i);
                let xhat = (x[i] as f64 - rm[c] as f64) / (rv[c] as f64 + layer.eps()).sqrt();
                let scale = (gamma[c] as f64).abs() * (1.0 + xhat.abs()) + (beta[c] as f64).abs();
                assert!(
                    (g as f64 - w).abs() <= fwd_tol(1) * scale,
                    "{ctx} eval element {i}: {g} vs {w}"
                );
            }
        }
    }
}

/// The layer of every preset (PyTorch's also with `momentum=None`) on data of type `E`, on every
/// backend under test, sequential and on rayon, both layouts, odd channel counts and shapes that
/// change from step to step: three training steps and an evaluation step, each bit for bit the
/// plain operations'.
fn layer_is_the_plain_ops<E: Store>(seed: u64) {
    let mut rng = Rng::new(seed);
    // (C, the steps' (N, HW)): C = 1, primes, wider than a vector; N·HW = 1 only in evaluation.
    let cases: [(usize, &[(usize, usize)]); 4] = [
        (1, &[(3, 7), (2, 1), (1, 65)]),
        (5, &[(2, 9), (1, 17), (4, 3)]),
        (19, &[(3, 3), (2, 1), (1, 33)]),
        (67, &[(2, 5), (1, 9), (3, 2)]),
    ];
    let presets = [
        (Preset::PyTorch, Some(0.1)),
        (Preset::PyTorch, None),
        (Preset::Keras, Some(0.99)),
        (Preset::Onnx, Some(0.9)),
    ];
    for (c, steps) in cases {
        for layout in [Layout::Nchw, Layout::Nhwc] {
            for backend in backends() {
                for par in [Parallelism::Sequential, Parallelism::Rayon] {
                    for (preset, momentum) in presets {
                        let mut layer = BatchNormLayer::<E::Param>::new(c, layout, preset)
                            .unwrap()
                            .with_momentum(momentum)
                            .unwrap()
                            .with_backend(backend)
                            .unwrap()
                            .with_parallelism(par);
                        // With rayon, the layer takes its tensors to live in memory (outputs
                        // stored past the caches), against plain ops of the default residency.
                        if par == Parallelism::Rayon {
                            layer = layer.with_residency(Residency::Memory);
                            assert_eq!(layer.residency(), Residency::Memory);
                        }
                        let gamma = params_of::<E>(&mut rng, c, 0.5, 1.0);
                        let beta = params_of::<E>(&mut rng, c, 0.0, 1.0);
                        layer.set_affine(&gamma, &beta).unwrap();
                        let ctx = format!(
                            "{} C={c} {layout:?} {backend:?} {par:?} {preset:?} {momentum:?}",
                            E::NAME
                        );
                        let data = |rng: &mut Rng, (n, hw)| {
                            let shape = Shape::new(n, c, hw).unwrap();
                            let (means, stds) = ordinary(rng, c);
                            let x: Vec<E> = tensor_of(rng, shape, layout, &means, &stds);
                            (shape, x, normals_of::<E>(rng, shape.len(), 0.0, 1.0))
                        };
                        for (t, &step) in steps.iter().enumerate() {
                            let (shape, x, dy) = data(&mut rng, step);
                            let ctx = format!("{ctx} step {} {shape:?}", t + 1);
                            training_step_is_the_plain_ops(&mut layer, (&x, &dy), shape, &ctx);
                        }
                        layer.eval();
                        let (shape, x, dy) = data(&mut rng, (1, 1));
                        evaluation_step_is_the_plain_ops(&mut layer, (&x, &dy), shape, &ctx);
                    }
                }
            }
        }
    }
}

#[test]
fn f64_layer_is_the_plain_f64_ops() {
    layer_is_the_plain_ops::<f64>(71);
}

#[test]
fn f32_layer_on_f16_and_bf16_data_is_the_plain_ops() {
    layer_is_the_plain_ops::<f16>(72);
    layer_is_the_plain_ops::<bf16>(73);
}

#[test]
fn f32_layer_is_the_plain_ops_on_every_backend_and_schedule() {
    layer_is_the_plain_ops::<f32>(74);
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
