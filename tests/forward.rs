//! Forward operations and statistics against the f64 reference, on both layouts and every backend.
#![allow(clippy::needless_range_loop)]

mod common;

use approx::assert_relative_eq;

use batchnorm::{
    Affine, BackwardMode, BatchNorm, ChannelStats, Layout, Momentum, RunningStats, RunningUpdate,
    SavedStats, SavedStatsMut, Shape, Variance,
};
use batchnorm_check::reference;
use common::*;

const LAYOUTS: [Layout; 2] = [Layout::Nchw, Layout::Nhwc];

/// Random γ (sign included) and β, one per channel.
fn affine_params(rng: &mut Rng, c: usize) -> (Vec<f32>, Vec<f32>) {
    (rng.normals(c, 0.0, 1.0), rng.normals(c, 0.0, 1.0))
}

/// Scale of the terms of `y = γ·x̂ + β` for element `i` of channel `c`.
fn y_scale(gamma: &[f32], beta: &[f32], xhat: f64, c: usize) -> f64 {
    (gamma[c] as f64).abs() * (1.0 + xhat.abs()) + (beta[c] as f64).abs()
}

#[test]
fn inference_matches_reference_on_sweep() {
    let mut worst = Worst::default();
    let mut rng = Rng::new(1);
    for shape in sweep_shapes() {
        for layout in LAYOUTS {
            let c = shape.c();
            let (means, stds) = ordinary(&mut rng, c);
            let x = tensor(&mut rng, shape, layout, &means, &stds);
            let (gamma, beta) = affine_params(&mut rng, c);
            let rmean: Vec<f32> = means.iter().map(|&m| m as f32 + 0.1).collect();
            let rvar: Vec<f32> = stds.iter().map(|&s| (s * s) as f32).collect();
            let want = reference::inference(
                &x,
                shape,
                layout,
                &rmean,
                &rvar,
                Some(&gamma),
                Some(&beta),
                1e-5,
            );
            let scale = |i: usize| {
                let ch = channel_of(shape, layout, i);
                let xhat = (x[i] as f64 - rmean[ch] as f64) / (rvar[ch] as f64 + 1e-5).sqrt();
                y_scale(&gamma, &beta, xhat, ch)
            };
            for bn in operators(shape, layout, 1e-5) {
                let running = RunningStats {
                    mean: &rmean,
                    var: &rvar,
                };
                let affine = Affine {
                    gamma: &gamma,
                    beta: &beta,
                };
                let mut y = vec![f32::NAN; x.len()];
                bn.inference(&x, &mut y, Some(affine), running).unwrap();
                let e = max_rel_err(&y, &want, scale);
                worst.note(&format!("inference {layout:?}"), e);
                assert!(
                    e <= fwd_tol(1),
                    "{shape:?} {layout:?} {:?}: error {e:e}",
                    bn.backend()
                );
                let mut inplace = x.clone();
                bn.inference_in_place(&mut inplace, Some(affine), running)
                    .unwrap();
                assert_eq!(inplace, y, "in-place differs from out-of-place");
            }
        }
    }
}

#[test]
fn inference_without_affine() {
    let mut rng = Rng::new(2);
    let shape = Shape::new(3, 5, 17).unwrap();
    for layout in LAYOUTS {
        let x = rng.normals(shape.len(), 1.0, 2.0);
        let (rmean, rvar) = (rng.normals(5, 1.0, 0.1), vec![4.0f32; 5]);
        let want = reference::inference(&x, shape, layout, &rmean, &rvar, None, None, 1e-3);
        for bn in operators(shape, layout, 1e-3) {
            let mut y = vec![f32::NAN; x.len()];
            bn.inference(
                &x,
                &mut y,
                None,
                RunningStats {
                    mean: &rmean,
                    var: &rvar,
                },
            )
            .unwrap();
            let e = max_rel_err(&y, &want, |i| 1.0 + want[i].abs());
            assert!(e <= fwd_tol(1), "{layout:?}: {e:e}");
        }
    }
}

/// Runs a training forward and checks y, the saved statistics, the returned statistics and a
/// PyTorch-convention running update against the reference. Returns the worst y error.
fn check_training(
    bn: &BatchNorm,
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    want: &reference::Training,
) -> f64 {
    let shape = bn.shape();
    let (c, m) = (shape.c(), shape.per_channel());
    let tol = fwd_tol(m);
    let mut y = vec![f32::NAN; x.len()];
    let (mut mean, mut inv_std) = (vec![f32::NAN; c], vec![f32::NAN; c]);
    let (mut rmean, mut rvar) = (vec![0.5f32; c], vec![2.0f32; c]);
    let update = (m > 1).then(|| RunningUpdate::pytorch(&mut rmean, &mut rvar));
    let stats = bn
        .training(
            x,
            &mut y,
            Some(Affine { gamma, beta }),
            Some(SavedStatsMut {
                mean: &mut mean,
                inv_std: &mut inv_std,
            }),
            update,
        )
        .unwrap();
    let layout = bn.layout();
    let ctx = format!(
        "{shape:?} {layout:?} {:?} {:?}",
        bn.backend(),
        bn.parallelism()
    );
    let e = max_rel_err(&y, &want.y, |i| {
        let ch = channel_of(shape, layout, i);
        let xhat = (x[i] as f64 - want.mean[ch]) * want.inv_std[ch];
        y_scale(gamma, beta, xhat, ch)
    });
    assert!(e <= tol, "y: {ctx}: error {e:e} > {tol:e}");
    for ch in 0..c {
        let std = want.var[ch].sqrt();
        // The saved mean is the batch mean rounded to f32: within half an ulp plus the statistics error.
        let mean_scale = std + want.mean[ch].abs();
        let em = (mean[ch] as f64 - want.mean[ch]).abs() / mean_scale;
        assert!(em <= tol, "saved mean {ctx} ch {ch}: {em:e}");
        let ei = (inv_std[ch] as f64 / want.inv_std[ch] - 1.0).abs();
        assert!(ei <= tol, "saved inv_std {ctx} ch {ch}: {ei:e}");
        let s = stats.channels()[ch];
        assert_eq!(s.count(), m as u64);
        let es = (s.mean() - want.mean[ch]).abs() / (std + f64::MIN_POSITIVE);
        assert!(
            es <= tol || (s.mean() - want.mean[ch]).abs() <= EPS32 * want.mean[ch].abs(),
            "stats mean {ctx} ch {ch}: {es:e}"
        );
        let ev = (s.m2() / m as f64 - want.var[ch]).abs();
        assert!(
            ev <= tol * want.var[ch] + 1e-300,
            "stats var {ctx} ch {ch}: {ev:e} vs {}",
            want.var[ch]
        );
    }
    // The running variance is stored in f32: skip data whose variance does not fit.
    if m > 1 && want.var.iter().all(|&v| v < f32::MAX as f64 / 2.0) {
        let (rm, rv) = reference::running_update(
            &[0.5; 1].repeat(c),
            &[2.0; 1].repeat(c),
            want,
            Momentum::NewWeight(0.1),
            Variance::Unbiased,
        );
        for ch in 0..c {
            assert!(
                (rmean[ch] as f64 - rm[ch]).abs() <= tol * (rm[ch].abs() + want.var[ch].sqrt()),
                "running mean {ctx}"
            );
            assert!(
                (rvar[ch] as f64 / rv[ch] - 1.0).abs() <= tol,
                "running var {ctx}"
            );
        }
    }
    e
}

#[test]
fn training_matches_reference_on_sweep() {
    let mut worst = Worst::default();
    let mut rng = Rng::new(3);
    for shape in sweep_shapes() {
        for layout in LAYOUTS {
            let (means, stds) = ordinary(&mut rng, shape.c());
            let x = tensor(&mut rng, shape, layout, &means, &stds);
            let (gamma, beta) = affine_params(&mut rng, shape.c());
            let want = reference::training(&x, shape, layout, Some(&gamma), Some(&beta), 1e-5);
            for bn in operators(shape, layout, 1e-5) {
                let e = check_training(&bn, &x, &gamma, &beta, &want);
                worst.note(&format!("training y {layout:?}"), e);
            }
        }
    }
}

#[test]
fn statistics_match_reference_on_sweep() {
    let mut rng = Rng::new(4);
    for shape in sweep_shapes() {
        for layout in LAYOUTS {
            let (means, stds) = ordinary(&mut rng, shape.c());
            let x = tensor(&mut rng, shape, layout, &means, &stds);
            let want = reference::statistics(&x, shape, layout);
            let tol = stats_tol(shape.per_channel());
            for bn in operators(shape, layout, 1e-5) {
                let got = bn.statistics(&x).unwrap();
                for (g, w) in got.channels().iter().zip(&want) {
                    assert_eq!(g.count(), w.count());
                    let std = (w.m2() / w.count() as f64).sqrt();
                    assert!((g.mean() - w.mean()).abs() <= tol * (std + EPS32 * w.mean().abs()));
                    assert!(
                        (g.m2() - w.m2()).abs() <= tol * w.m2() + 1e-300,
                        "{shape:?} {layout:?}"
                    );
                }
            }
        }
    }
}

/// Data whose mean is large compared with its spread: where naive f32 batch norm loses digits.
fn offset_data(rng: &mut Rng, shape: Shape, layout: Layout, mean: f64, std: f64) -> Vec<f32> {
    let c = shape.c();
    let means: Vec<f64> = (0..c).map(|i| mean * (1.0 + 0.1 * i as f64)).collect();
    tensor(rng, shape, layout, &means, &vec![std; c])
}

/// The naive one-pass variance in f32, `E[x²] − E[x]²`, as a counter-example.
fn naive_f32_variance(values: &[f32]) -> f64 {
    let n = values.len() as f32;
    let (s, q) = values
        .iter()
        .fold((0.0f32, 0.0f32), |(s, q), &v| (s + v, q + v * v));
    ((q / n) - (s / n) * (s / n)) as f64
}

#[test]
fn large_offsets_keep_ordinary_accuracy_and_naive_does_not() {
    let mut worst = Worst::default();
    let mut rng = Rng::new(5);
    for (mean, std) in [(1e4, 1e-2), (3e6, 4.0)] {
        for shape in [
            Shape::new(4, 3, 1000).unwrap(),
            Shape::new(2, 67, 65).unwrap(),
            Shape::new(64, 17, 1).unwrap(),
        ] {
            for layout in LAYOUTS {
                let x = offset_data(&mut rng, shape, layout, mean, std);
                let (gamma, beta) = affine_params(&mut rng, shape.c());
                let want = reference::training(&x, shape, layout, Some(&gamma), Some(&beta), 1e-5);
                for bn in operators(shape, layout, 1e-5) {
                    let e = check_training(&bn, &x, &gamma, &beta, &want);
                    worst.note(&format!("offset {mean:e} y {layout:?}"), e);
                }
                // The naive formula on the same data misses the variance by far more than our tolerance.
                let ch0 = reference::channel(&x, shape, layout, 0);
                let naive = naive_f32_variance(&ch0);
                let rel = (naive - want.var[0]).abs() / want.var[0];
                assert!(
                    rel > 100.0 * fwd_tol(shape.per_channel()),
                    "naive variance unexpectedly accurate: {rel:e}"
                );
            }
        }
    }
}

#[test]
fn constant_channels_give_exactly_beta() {
    let shape = Shape::new(3, 9, 37).unwrap();
    for layout in LAYOUTS {
        let consts: Vec<f64> = (0..9).map(|c| 123.456 * (c as f64 + 1.0) - 300.0).collect();
        let x = tensor(&mut Rng::new(6), shape, layout, &consts, &[0.0; 9]);
        let (gamma, beta) = affine_params(&mut Rng::new(7), 9);
        for bn in operators(shape, layout, 1e-5) {
            let mut y = vec![f32::NAN; x.len()];
            let (mut mean, mut inv_std) = (vec![0.0; 9], vec![0.0; 9]);
            let affine = Some(Affine {
                gamma: &gamma,
                beta: &beta,
            });
            bn.training(
                &x,
                &mut y,
                affine,
                Some(SavedStatsMut {
                    mean: &mut mean,
                    inv_std: &mut inv_std,
                }),
                None,
            )
            .unwrap();
            for (i, &v) in y.iter().enumerate() {
                assert_eq!(
                    v,
                    beta[channel_of(shape, layout, i)],
                    "{layout:?} element {i}"
                );
            }
            for c in 0..9 {
                assert_eq!(mean[c], consts[c] as f32);
                assert_eq!(inv_std[c], (1.0 / 1e-5f64.sqrt()) as f32);
            }
        }
    }
}

/// Channels of zeros of either sign have +0 mean and M2 on every schedule, for f32 and f64 data:
/// the kernels' sums start from the first values, not from +0, and must not leave a −0.
#[test]
fn zero_channels_have_positive_zero_statistics() {
    fn check<E: batchnorm::Element + Copy>(zero: E, neg: E, shape: Shape, layout: Layout) {
        // Channel 0 all −0, channel 1 all +0, channel 2 alternating.
        let x: Vec<E> = (0..shape.len())
            .map(|i| match channel_of(shape, layout, i) {
                0 => neg,
                1 => zero,
                _ if i % 2 == 0 => neg,
                _ => zero,
            })
            .collect();
        for bn in operators(shape, layout, 1e-5) {
            let got = bn.statistics(&x).unwrap();
            for (c, g) in got.channels().iter().enumerate() {
                assert_eq!(g.mean().to_bits(), 0, "{shape:?} {layout:?} channel {c}");
                assert_eq!(g.m2().to_bits(), 0, "{shape:?} {layout:?} channel {c}");
            }
        }
    }
    // Runs of whole accumulator groups (64 values on AVX-512, 32 on AVX2), where no +0 padding
    // enters the sums, and ragged ones.
    for (n, hw) in [
        (1, 7),
        (2, 7),
        (1, 49),
        (1, 64),
        (1, 128),
        (2, 64),
        (1, 4096),
        (1, 9000),
    ] {
        let shape = Shape::new(n, 3, hw).unwrap();
        for layout in LAYOUTS {
            check(0.0f32, -0.0f32, shape, layout);
            check(0.0f64, -0.0f64, shape, layout);
        }
    }
}

#[test]
fn huge_values_do_not_overflow() {
    let mut rng = Rng::new(8);
    let shape = Shape::new(2, 5, 129).unwrap();
    for layout in LAYOUTS {
        // Values near 1e18 with a spread of 1e16, and values spread over ±1e38 (whose squares
        // overflow f32: the statistics must still be right).
        for (mean, std) in [(1e18, 1e16), (0.0, 1e37)] {
            let x = tensor(&mut rng, shape, layout, &[mean; 5], &[std; 5]);
            let (gamma, beta) = affine_params(&mut rng, 5);
            let want = reference::training(&x, shape, layout, Some(&gamma), Some(&beta), 1e-5);
            for bn in operators(shape, layout, 1e-5) {
                check_training(&bn, &x, &gamma, &beta, &want);
            }
        }
    }
}

#[test]
fn symmetric_pairs_give_exact_statistics() {
    // Pairs m ± d with dyadic d: mean exactly m, biased variance exactly Σd²/count.
    let shape = Shape::new(2, 6, 50).unwrap();
    for layout in LAYOUTS {
        let mut x = vec![0.0f32; shape.len()];
        let mut sum_d2 = [0.0f64; 6];
        for c in 0..6 {
            let m = 1000.0 * c as f64 - 2500.0;
            for k in 0..50 {
                let d = (k as f64 + 1.0) / 8.0 * (c as f64 + 1.0);
                x[shape.index(layout, 0, c, k)] = (m + d) as f32;
                x[shape.index(layout, 1, c, k)] = (m - d) as f32;
                sum_d2[c] += 2.0 * d * d;
            }
        }
        for bn in operators(shape, layout, 1e-5) {
            let stats = bn.statistics(&x).unwrap();
            for c in 0..6 {
                let s = stats.channels()[c];
                let (m, var) = (1000.0 * c as f64 - 2500.0, sum_d2[c] / 100.0);
                assert!(
                    (s.mean() - m).abs() <= 1e-6 * var.sqrt(),
                    "{layout:?} mean {}",
                    s.mean()
                );
                let v = s.variance(Variance::Biased).unwrap();
                assert!(
                    (v / var - 1.0).abs() <= stats_tol(100),
                    "{layout:?} var {v} vs {var}"
                );
            }
        }
    }
}

#[test]
fn nan_and_inf_stay_in_their_channel() {
    let mut rng = Rng::new(9);
    for shape in [
        Shape::new(2, 11, 40).unwrap(),
        Shape::new(3, 70, 1).unwrap(),
    ] {
        for layout in LAYOUTS {
            let c = shape.c();
            let (means, stds) = ordinary(&mut rng, c);
            let mut x = tensor(&mut rng, shape, layout, &means, &stds);
            x[shape.index(layout, 1, 2, 0)] = f32::NAN;
            x[shape.index(layout, 0, 5, shape.hw() - 1)] = f32::INFINITY;
            x[shape.index(layout, 0, 7, 0)] = f32::NEG_INFINITY; // the pivot itself
            let bad = [2, 5, 7];
            let (gamma, beta) = affine_params(&mut rng, c);
            for bn in operators(shape, layout, 1e-5) {
                let mut y = vec![f32::NAN; x.len()];
                let (mut mean, mut inv_std) = (vec![0.0; c], vec![0.0; c]);
                let (mut rm, mut rv) = (vec![0.0; c], vec![1.0; c]);
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
                        Some(RunningUpdate::pytorch(&mut rm, &mut rv)),
                    )
                    .unwrap();
                for (i, &v) in y.iter().enumerate() {
                    let ch = channel_of(shape, layout, i);
                    assert_eq!(
                        v.is_finite(),
                        !bad.contains(&ch),
                        "{layout:?} y[{i}] channel {ch}"
                    );
                }
                for ch in 0..c {
                    let finite = !bad.contains(&ch);
                    assert_eq!(stats.channels()[ch].mean().is_finite(), finite);
                    assert_eq!(rv[ch].is_finite() && rm[ch].is_finite(), finite);
                    let saved_finite = mean[ch].is_finite() && inv_std[ch].is_finite();
                    assert!(saved_finite || !finite, "saved statistics of channel {ch}");
                }
                let mut yi = vec![f32::NAN; x.len()];
                bn.inference(
                    &x,
                    &mut yi,
                    None,
                    RunningStats {
                        mean: &means.iter().map(|&m| m as f32).collect::<Vec<_>>(),
                        var: &vec![1.0; c],
                    },
                )
                .unwrap();
                for (i, &v) in yi.iter().enumerate() {
                    let ch = channel_of(shape, layout, i);
                    if !bad.contains(&ch) {
                        assert!(v.is_finite());
                    }
                }
            }
        }
    }
}

#[test]
fn nchw_and_nhwc_agree() {
    let mut rng = Rng::new(10);
    for shape in [
        Shape::new(2, 13, 65).unwrap(),
        Shape::new(5, 64, 9).unwrap(),
        Shape::new(1, 3, 1000).unwrap(),
    ] {
        let (means, stds) = ordinary(&mut rng, shape.c());
        let x = tensor(&mut rng, shape, Layout::Nchw, &means, &stds);
        let xt = relayout(&x, shape, Layout::Nchw, Layout::Nhwc);
        let (gamma, beta) = affine_params(&mut rng, shape.c());
        let run = |layout: Layout, x: &[f32]| {
            let bn = BatchNorm::new(shape, layout).unwrap();
            let mut y = vec![f32::NAN; x.len()];
            let (mut m, mut r) = (vec![0.0; shape.c()], vec![0.0; shape.c()]);
            bn.training(
                x,
                &mut y,
                Some(Affine {
                    gamma: &gamma,
                    beta: &beta,
                }),
                Some(SavedStatsMut {
                    mean: &mut m,
                    inv_std: &mut r,
                }),
                None,
            )
            .unwrap();
            (y, m, r)
        };
        let (y1, m1, r1) = run(Layout::Nchw, &x);
        let (y2, m2, r2) = run(Layout::Nhwc, &xt);
        let y2 = relayout(&y2, shape, Layout::Nhwc, Layout::Nchw);
        let want = reference::training(&x, shape, Layout::Nchw, Some(&gamma), Some(&beta), 1e-5);
        let tol = 2.0 * fwd_tol(shape.per_channel());
        let y2f: Vec<f64> = y2.iter().map(|&v| v as f64).collect();
        assert!(max_rel_err(&y1, &y2f, |i| 1.0 + want.y[i].abs()) <= tol);
        for c in 0..shape.c() {
            assert!((m1[c] - m2[c]).abs() as f64 <= tol * (1.0 + m1[c].abs() as f64));
            assert!((r1[c] / r2[c] - 1.0).abs() as f64 <= tol);
        }
    }
}

#[test]
fn merged_partial_statistics_equal_whole_batch() {
    let mut rng = Rng::new(11);
    for layout in LAYOUTS {
        let whole_shape = Shape::new(12, 7, 33).unwrap();
        let x = offset_data(&mut rng, whole_shape, layout, 1e4, 1.0);
        let whole = BatchNorm::new(whole_shape, layout)
            .unwrap()
            .statistics(&x)
            .unwrap();
        // Samples are contiguous in both layouts: split the batch 5 + 4 + 3.
        let per_sample = 7 * 33;
        let mut merged: Option<batchnorm::BatchStats> = None;
        let mut start = 0;
        for n in [5, 4, 3] {
            let part = BatchNorm::new(Shape::new(n, 7, 33).unwrap(), layout).unwrap();
            let s = part
                .statistics(&x[start * per_sample..(start + n) * per_sample])
                .unwrap();
            match merged.as_mut() {
                None => merged = Some(s),
                Some(m) => m.merge(&s).unwrap(),
            }
            start += n;
        }
        let merged = merged.unwrap();
        let tol = stats_tol(12 * 33);
        for (a, b) in merged.channels().iter().zip(whole.channels()) {
            assert_eq!(a.count(), b.count());
            let std = (b.m2() / b.count() as f64).sqrt();
            assert!((a.mean() - b.mean()).abs() <= tol * std);
            assert!((a.m2() / b.m2() - 1.0).abs() <= tol);
        }
        // Merging is order-independent up to rounding, and merging with empty is the identity.
        let s = ChannelStats::new(4, 2.0, 3.0);
        assert_eq!(s.merge(&ChannelStats::default()), s);
        assert_eq!(ChannelStats::default().merge(&s), s);
    }
}

#[test]
fn running_update_conventions_match_hand_computed_values() {
    // One channel with values 1, 2, 3, 4: mean 2.5, biased var 1.25, unbiased var 5/3.
    let shape = Shape::new(2, 1, 2).unwrap();
    let x = [1.0f32, 2.0, 3.0, 4.0];
    let cases = [
        // (momentum, estimator, expected running mean, expected running var) from (0, 1)
        (
            Momentum::NewWeight(0.1),
            Variance::Unbiased,
            0.25,
            0.9 + 0.1 * 5.0 / 3.0,
        ), // PyTorch
        (
            Momentum::OldWeight(0.9),
            Variance::Biased,
            0.25,
            0.9 + 0.1 * 1.25,
        ), // ONNX
        (
            Momentum::OldWeight(0.99),
            Variance::Biased,
            0.025,
            0.99 + 0.01 * 1.25,
        ), // Keras
        (
            Momentum::CumulativeAverage { batches_tracked: 4 },
            Variance::Unbiased,
            0.625,
            1.0 + (5.0 / 3.0 - 1.0) / 4.0,
        ),
        (Momentum::NewWeight(1.0), Variance::Biased, 2.5, 1.25),
        (Momentum::NewWeight(0.0), Variance::Biased, 0.0, 1.0),
    ];
    for layout in LAYOUTS {
        for (momentum, est, want_mean, want_var) in cases {
            let bn = BatchNorm::new(shape, layout).unwrap();
            let (mut rm, mut rv) = ([0.0f32], [1.0f32]);
            let (mut m, mut r) = ([0.0f32], [0.0f32]);
            let mut y = [0.0f32; 4];
            let update = RunningUpdate {
                mean: &mut rm,
                var: &mut rv,
                momentum,
                var_estimator: est,
            };
            bn.training(
                &x,
                &mut y,
                None,
                Some(SavedStatsMut {
                    mean: &mut m,
                    inv_std: &mut r,
                }),
                Some(update),
            )
            .unwrap();
            // Blended in f64 from exact batch statistics, then rounded to f32 once: within half
            // an ulp, relative u (2u allowed for the batch statistics' own rounding).
            assert_relative_eq!(
                rm[0] as f64,
                want_mean,
                epsilon = 0.0,
                max_relative = 2.0 * EPS32
            );
            assert_relative_eq!(
                rv[0] as f64,
                want_var,
                epsilon = 0.0,
                max_relative = 2.0 * EPS32
            );
            assert_eq!(m[0], 2.5);
        }
    }
    // The presets name the same conventions.
    let (mut a, mut b) = ([0.0f32], [0.0f32]);
    let p = RunningUpdate::pytorch(&mut a, &mut b);
    assert_eq!(
        (p.momentum, p.var_estimator),
        (Momentum::NewWeight(0.1), Variance::Unbiased)
    );
    let o = RunningUpdate::onnx(&mut a, &mut b);
    assert_eq!(
        (o.momentum, o.var_estimator),
        (Momentum::OldWeight(0.9), Variance::Biased)
    );
    let k = RunningUpdate::keras(&mut a, &mut b);
    assert_eq!(
        (k.momentum, k.var_estimator),
        (Momentum::OldWeight(0.99), Variance::Biased)
    );
}

#[test]
fn one_value_per_channel() {
    let shape = Shape::new(1, 4, 1).unwrap();
    let x = [1.0f32, 2.0, 3.0, 4.0];
    let beta = [0.5f32, -1.0, 2.0, 0.0];
    let gamma = [1.0f32; 4];
    for layout in LAYOUTS {
        let bn = BatchNorm::new(shape, layout).unwrap();
        let (mut rm, mut rv) = ([0.0f32; 4], [1.0f32; 4]);
        let (mut m, mut r) = ([0.0f32; 4], [0.0f32; 4]);
        let mut y = [f32::NAN; 4];
        let err = bn
            .training(
                &x,
                &mut y,
                None,
                Some(SavedStatsMut {
                    mean: &mut m,
                    inv_std: &mut r,
                }),
                Some(RunningUpdate::pytorch(&mut rm, &mut rv)),
            )
            .unwrap_err();
        assert_eq!(err, batchnorm::Error::TooFewValues { per_channel: 1 });
        assert!(y.iter().all(|v| v.is_nan()), "nothing written on error");
        // With the biased estimator it is well defined: x̂ = 0, y = β.
        let update = RunningUpdate::onnx(&mut rm, &mut rv);
        bn.training(
            &x,
            &mut y,
            Some(Affine {
                gamma: &gamma,
                beta: &beta,
            }),
            Some(SavedStatsMut {
                mean: &mut m,
                inv_std: &mut r,
            }),
            Some(update),
        )
        .unwrap();
        assert_eq!(y, beta);
    }
}

/// Channels whose mean is tiny next to their spread (the layers after a bias-free 1×1 conv): the
/// mean, and so the running mean, must be as accurate as a double-precision sum, as PyTorch's is.
///
/// Each channel is shuffled pairs (v, −v) of N(0, 1) values plus one value δ (and a 0 when the
/// count is even), so its exact mean is δ/M ≈ 1e-8 while σ ≈ 1. Bound: the mean is a sum of
/// `x − K` in f64 lanes (K the channel's pivot, |K| ≤ max|x|): a recursive f64 sum of M terms errs
/// by at most (M + 8)·2⁻⁵³·Σ|x − K| ≤ (M + 8)·2⁻⁵³·2·M·max|x| (Higham §4.2, with the lane tree),
/// so the mean by (M + 8)·2⁻⁵³·2·max|x|: about 1e-11, 0.1% of the mean. f32 lanes (the crate
/// before) err by about 1e-8·σ here, 100% of the mean.
#[test]
fn tiny_means_are_as_accurate_as_a_double_sum() {
    let cases = [
        (Layout::Nchw, [4, 3, 12501]),  // long runs (two-pass per piece)
        (Layout::Nchw, [256, 16, 49]),  // short runs, channel groups
        (Layout::Nhwc, [200, 3, 250]),  // narrow rows (periodic lanes)
        (Layout::Nhwc, [100, 70, 100]), // wide rows (register groups and a tail)
        (Layout::Nchw, [20000, 5, 1]),  // HW = 1 (row driver)
    ];
    let mut rng = Rng::new(20_261_201);
    for (layout, [n, c, hw]) in cases {
        let shape = Shape::new(n, c, hw).unwrap();
        let m = n * hw;
        let mut x = vec![0.0f32; shape.len()];
        let mut exact_mean = vec![0.0f64; c];
        let mut max_abs = vec![0.0f64; c];
        for ch in 0..c {
            let delta = 1e-3 * (ch + 1) as f32;
            let mut values: Vec<f32> = Vec::with_capacity(m);
            while values.len() + 2 < m {
                let v = rng.normal() as f32;
                values.extend([v, -v]);
            }
            values.push(delta);
            values.resize(m, 0.0);
            for i in (1..m).rev() {
                values.swap(i, rng.below(i + 1));
            }
            exact_mean[ch] = delta as f64 / m as f64;
            max_abs[ch] = values.iter().fold(0.0, |a, &v| a.max(v.abs() as f64));
            for (i, &v) in values.iter().enumerate() {
                x[shape.index(layout, i / hw, ch, i % hw)] = v;
            }
        }
        let unit = f64::EPSILON / 2.0;
        for bn in operators(shape, layout, 1e-5) {
            let (mut mean, mut inv_std) = (vec![0.0; c], vec![0.0; c]);
            let (mut running_mean, mut running_var) = (vec![0.0; c], vec![1.0; c]);
            let mut y = vec![0.0; x.len()];
            let saved = SavedStatsMut {
                mean: &mut mean,
                inv_std: &mut inv_std,
            };
            let update = RunningUpdate::pytorch(&mut running_mean, &mut running_var);
            let stats = bn
                .training(&x, &mut y, None, Some(saved), Some(update))
                .unwrap();
            for ch in 0..c {
                let bound = (m + 8) as f64 * unit * 2.0 * max_abs[ch];
                let got = stats.channels()[ch].mean();
                let want = exact_mean[ch];
                assert!(
                    (got - want).abs() <= bound,
                    "{layout:?} {n}x{c}x{hw} {:?} channel {ch}: mean {got:e} vs {want:e} \
                     (bound {bound:e})",
                    bn.backend()
                );
                // PyTorch's rule from 0: 0.1·mean, rounded once to f32.
                let rm = 0.1 * want;
                let half_ulp = (rm as f32).abs() as f64 * EPS32;
                assert!(
                    (running_mean[ch] as f64 - rm).abs() <= half_ulp + 0.1 * bound,
                    "{layout:?} {n}x{c}x{hw} {:?} channel {ch}: running mean {} vs {rm:e}",
                    bn.backend(),
                    running_mean[ch]
                );
            }
        }
    }
}

#[test]
fn presets_take_another_momentum_and_estimator() {
    let shape = Shape::new(4, 3, 5).unwrap();
    let x = Rng::new(12).normals(shape.len(), 2.0, 1.0);
    for layout in LAYOUTS {
        let bn = BatchNorm::new(shape, layout).unwrap();
        let exact = reference::training(&x, shape, layout, None, None, bn.eps());
        let (mut rm, mut rv) = (vec![1.0f32; 3], vec![2.0f32; 3]);
        let update = RunningUpdate::pytorch(&mut rm, &mut rv)
            .with_momentum(Momentum::NewWeight(0.25))
            .with_var_estimator(Variance::Biased);
        assert_eq!(update.momentum, Momentum::NewWeight(0.25));
        let mut y = vec![0.0; x.len()];
        // No saved statistics asked for.
        bn.training(&x, &mut y, None, None, Some(update)).unwrap();
        for c in 0..3 {
            // Blended in f64 from the batch statistics, rounded to f32 once (2u as above).
            let want_mean = 0.75 * 1.0 + 0.25 * exact.mean[c];
            let want_var = 0.75 * 2.0 + 0.25 * exact.var[c];
            assert_relative_eq!(rm[c] as f64, want_mean, max_relative = 2.0 * EPS32);
            assert_relative_eq!(rv[c] as f64, want_var, max_relative = 2.0 * EPS32);
        }
    }
}

/// Inference, training and the backward (dx, in training mode, dy aligned, x moving with dx)
/// write the same bits from every start of x and y (dx) within a cache line as from line-aligned
/// tensors: the elementwise passes peel a head to aligned outputs (NCHW runs one by one; NHWC
/// rows of whole lines by rotating the channels), which must neither move nor change a value. On
/// every backend, sequential and parallel, f32, f64, bf16 and f16 data, rows of whole lines (16,
/// 48 and 80 f32 channels, 64 of every type) and not (24), x as misaligned as y (a `Vec` from
/// `malloc`) and x aligned. One test per storage type, each its own process under valgrind in
/// .ci/run (all four in one took 87 s there, the longest test by far).
fn same_bits_from_every_start<E: Store>() {
    let size = size_of::<E>();
    let line = 64 / size;
    for layout in LAYOUTS {
        for (c, hw) in [(16, 1100), (48, 353), (80, 211), (24, 700), (64, 260)] {
            let shape = Shape::new(2, c, hw).unwrap();
            let len = shape.len();
            let mut rng = Rng::new(c as u64);
            let values = rng.normals(len, 0.5, 2.0);
            let params = |k: u64| -> Vec<E::Param> {
                Rng::new(k)
                    .normals(c, 0.0, 1.0)
                    .iter()
                    .map(|&v| E::param(v as f64))
                    .collect()
            };
            let (gamma, beta, rmean) = (params(1), params(2), params(3));
            let rvar: Vec<E::Param> = (0..c).map(|i| E::param(1.0 + i as f64 / 8.0)).collect();
            let inv_std: Vec<E::Param> = (0..c)
                .map(|i| E::param(1.0 / (1.0 + i as f64 / 8.0).sqrt()))
                .collect();
            let dy: Vec<E> = rng
                .normals(len, 0.0, 1.0)
                .iter()
                .map(|&v| E::round(v as f64))
                .collect();
            // Buffers with room to start anywhere in a line past the first aligned element.
            let aligned = |buf: &[E]| (64 - buf.as_ptr() as usize % 64) % 64 / size;
            let mut xbuf = vec![E::round(0.0); len + 2 * line];
            let mut ybuf = vec![E::round(0.0); len + 2 * line];
            // y (dx for the backward) of the operation `op`.
            let run = |bn: &BatchNorm, x: &[E], y: &mut [E], op: &str| {
                let affine = Some(Affine {
                    gamma: &gamma,
                    beta: &beta,
                });
                let running = RunningStats {
                    mean: &rmean,
                    var: &rvar,
                };
                match op {
                    "training" => {
                        bn.training(x, y, affine, None, None).unwrap();
                    }
                    "inference" => bn.inference(x, y, affine, running).unwrap(),
                    _ => {
                        let saved = SavedStats {
                            mean: &rmean,
                            inv_std: &inv_std,
                        };
                        let mode = BackwardMode::Training(saved);
                        bn.backward(x, &dy, y, affine, mode, None).unwrap()
                    }
                }
            };
            for bn in operators(shape, layout, 1e-5) {
                for op in ["inference", "training", "backward"] {
                    let mut want = Vec::new();
                    // The backward (its reduction and dx pass, the costliest under valgrind in
                    // .ci/run) with x as misaligned as dx only, as a `Vec` from `malloc` has it.
                    let moves: &[bool] = if op == "backward" {
                        &[true]
                    } else {
                        &[true, false]
                    };
                    for start in 0..line {
                        for &x_moves in moves {
                            let (xa, ya) = (aligned(&xbuf), aligned(&ybuf));
                            let xs = xa + if x_moves { start } else { 0 };
                            for (to, &v) in xbuf[xs..xs + len].iter_mut().zip(&values) {
                                *to = E::round(v as f64);
                            }
                            let y = &mut ybuf[ya + start..ya + start + len];
                            run(&bn, &xbuf[xs..xs + len], y, op);
                            let bits: Vec<u64> = y.iter().map(|v| bits_of(v)).collect();
                            if want.is_empty() {
                                want = bits;
                            } else {
                                assert!(
                                    want == bits,
                                    "{} {layout:?} c {c} {:?} {op} start {start} x \
                                     moves {x_moves}",
                                    E::NAME,
                                    bn.backend()
                                );
                            }
                        }
                    }
                }
            }
        }
    }
}

/// The bits of a value of any storage type.
fn bits_of<E>(v: &E) -> u64 {
    let mut b = [0u8; 8];
    // SAFETY: `E` is a plain float of at most 8 bytes (f16, bf16, f32, f64).
    unsafe {
        std::ptr::copy_nonoverlapping((v as *const E).cast::<u8>(), b.as_mut_ptr(), size_of::<E>())
    };
    u64::from_le_bytes(b)
}

/// [`same_bits_from_every_start`] for f32 data.
#[test]
fn outputs_from_every_start_of_a_line_are_the_same_bits_f32() {
    same_bits_from_every_start::<f32>();
}

/// [`same_bits_from_every_start`] for f64 data.
#[test]
fn outputs_from_every_start_of_a_line_are_the_same_bits_f64() {
    same_bits_from_every_start::<f64>();
}

/// [`same_bits_from_every_start`] for bf16 data.
#[test]
fn outputs_from_every_start_of_a_line_are_the_same_bits_bf16() {
    same_bits_from_every_start::<batchnorm::bf16>();
}

/// [`same_bits_from_every_start`] for f16 data.
#[test]
fn outputs_from_every_start_of_a_line_are_the_same_bits_f16() {
    same_bits_from_every_start::<batchnorm::f16>();
}
