//! Minimized regressions of what fuzzing found (see `fuzz/README.md`). Each test states the
//! expected behaviour from the f64 reference; each failed before its fix.

mod common;

use batchnorm::{
    BackwardMode, BatchNorm, GradMode, Layout, Momentum, ParamGrads, RunningStats, RunningUpdate,
    SavedStats, SavedStatsMut, Shape, Variance,
};
use batchnorm_check::reference;
use batchnorm_check::{self as check, Case, Data, Dims, Kind, Op, fwd_tol};
use common::forward_saved;

/// Training-mode backward (dx, dγ, dβ) with saved statistics from the forward.
fn training_backward(bn: &BatchNorm, x: &[f32], dy: &[f32]) -> (Vec<f32>, f32, f32) {
    let (mean, inv_std) = forward_saved(bn, x);
    let mode = BackwardMode::Training(SavedStats {
        mean: &mean,
        inv_std: &inv_std,
    });
    let mut dx = vec![f32::NAN; x.len()];
    let (mut dgamma, mut dbeta) = ([f32::NAN], [f32::NAN]);
    let grads = ParamGrads {
        dgamma: &mut dgamma,
        dbeta: &mut dbeta,
        mode: GradMode::Overwrite,
    };
    bn.backward(x, dy, &mut dx, None, mode, Some(grads))
        .unwrap();
    (dx, dgamma[0], dbeta[0])
}

/// Backward (training mode) accumulates Σ(x − K)·dy unnormalized in f32: with a spread of 1e20
/// and |dy| = 1e19 the products overflow, although x̂ = ±1, dγ = Σx̂·dy = 2e19 and dx = 0 are
/// ordinary numbers. The crate returns dγ = +Inf and dx = NaN.
#[test]
fn backward_training_unnormalized_products_overflow() {
    let shape = Shape::new(2, 1, 1).unwrap();
    let bn = BatchNorm::new(shape, Layout::Nchw).unwrap();
    let (x, dy) = ([1e20f32, -1e20], [1e19f32, -1e19]);
    let want = reference::backward_training(&x, &dy, shape, Layout::Nchw, None, 1e-5);
    assert!((want.dgamma[0] / 2e19 - 1.0).abs() < 1e-6 && want.dbeta[0] == 0.0);
    let (dx, dgamma, dbeta) = training_backward(&bn, &x, &dy);
    assert_eq!(dbeta, 0.0);
    assert!(
        (dgamma as f64 / want.dgamma[0] - 1.0).abs() <= fwd_tol(2),
        "dgamma {dgamma}"
    );
    // dx = γ·r·(dy − mean(dy) − x̂·dγ/M) = 1e-20·(±1e19 − 0 ∓ 1e19) = 0.
    assert!(dx.iter().all(|v| v.abs() <= 1e-6), "dx {dx:?}");
}

/// With a tiny variance and ε = 0, r = 1/σ is large and backward's f32 coefficient of (x − K),
/// `b = γ·r²·dγ/M`, overflows although `b·(x − K)` and dx are representable: two values one ulp
/// apart (r ≈ 1.7e7) and |dy| = 1e25. The exact dx is 0 (M = 2: x̂ = ±1); the crate returns ±Inf.
#[test]
fn backward_training_tiny_variance_coefficient_overflows() {
    let shape = Shape::new(2, 1, 1).unwrap();
    let bn = BatchNorm::new(shape, Layout::Nchw)
        .unwrap()
        .with_eps(0.0)
        .unwrap();
    let x = [1.0f32, 1.0 + f32::EPSILON];
    let dy = [1e25f32, -1e25];
    let want = reference::backward_training(&x, &dy, shape, Layout::Nchw, None, 0.0);
    assert!(want.dx.iter().all(|v| v.abs() <= 1e10), "{:?}", want.dx);
    let (dx, dgamma, _) = training_backward(&bn, &x, &dy);
    assert!(
        (dgamma as f64 / want.dgamma[0] - 1.0).abs() <= fwd_tol(2),
        "dgamma {dgamma} vs {}",
        want.dgamma[0]
    );
    // Error scale of dx: |γ|·r·(|dy| + mean|dy| + (1 + |x̂|)·mean((1 + |x̂|)·|dy|)) = 6e25·r.
    let r = 2.0 / f32::EPSILON as f64;
    let scale = 6e25 * r;
    for (g, w) in dx.iter().zip(&want.dx) {
        assert!((*g as f64 - w).abs() <= fwd_tol(2) * scale, "dx {dx:?}");
    }
}

/// Frozen backward sums Σ(x − running_mean)·dy in f32 before scaling by r: x = 1e20 and
/// dy = 1e19 overflow, although dγ = r·Σ(x − mean)·dy = 2e20 (r = 1e-19). The crate returns +Inf.
#[test]
fn backward_frozen_unnormalized_products_overflow() {
    let shape = Shape::new(2, 1, 1).unwrap();
    let bn = BatchNorm::new(shape, Layout::Nchw).unwrap();
    let (x, dy) = ([1e20f32, 1e20], [1e19f32, 1e19]);
    let (rmean, rvar) = ([0.0f32], [1e38f32]);
    let want = reference::backward_frozen(&x, &dy, shape, Layout::Nchw, &rmean, &rvar, None, 1e-5);
    let mut dx = [f32::NAN; 2];
    let (mut dgamma, mut dbeta) = ([f32::NAN], [f32::NAN]);
    let grads = ParamGrads {
        dgamma: &mut dgamma,
        dbeta: &mut dbeta,
        mode: GradMode::Overwrite,
    };
    let mode = BackwardMode::Frozen(RunningStats {
        mean: &rmean,
        var: &rvar,
    });
    bn.backward(&x, &dy, &mut dx, None, mode, Some(grads))
        .unwrap();
    assert!(
        (dgamma[0] as f64 / want.dgamma[0] - 1.0).abs() <= fwd_tol(2),
        "dgamma {} vs {}",
        dgamma[0],
        want.dgamma[0]
    );
}

/// `Momentum::OldWeight(m)` with a tiny m: the crate converts it to the new-value weight
/// `w = 1 − m` in f64 and blends with `1 − w`, which is 0, not m, for m < 2⁻⁵³ (and inexact below
/// about 2⁻²⁹). Running mean 1e30, batch mean 0, m = 1e-20: ONNX's `m·old + (1 − m)·batch` is
/// 1e10; the crate returns 0.
#[test]
fn old_weight_tiny_momentum_keeps_the_old_share() {
    let shape = Shape::new(2, 1, 1).unwrap();
    let bn = BatchNorm::new(shape, Layout::Nchw).unwrap();
    let x = [-1.0f32, 1.0];
    let (mut rmean, mut rvar) = ([1e30f32], [1e30f32]);
    let (mut mean, mut inv_std) = ([0.0f32], [0.0f32]);
    let mut y = [0.0f32; 2];
    let update = RunningUpdate {
        mean: &mut rmean,
        var: &mut rvar,
        momentum: Momentum::OldWeight(1e-20),
        var_estimator: Variance::Biased,
    };
    let saved = SavedStatsMut {
        mean: &mut mean,
        inv_std: &mut inv_std,
    };
    bn.training(&x, &mut y, None, Some(saved), Some(update))
        .unwrap();
    // m·old + (1 − m)·batch: mean 1e-20·1e30 + 0, variance 1e10 + 1.
    assert!(
        (rmean[0] as f64 / 1e10 - 1.0).abs() <= 1e-6,
        "running mean {}",
        rmean[0]
    );
    assert!(
        (rvar[0] as f64 / (1e10 + 1.0) - 1.0).abs() <= 1e-6,
        "running var {}",
        rvar[0]
    );
}

/// The f32 lane sums of backward exceed the stated tolerance `(8 + 2·sqrt(min(M, 132)))·u`
/// (which assumes rounding errors that grow like a random walk) on one large term followed by
/// many equal small ones in the same lane: 2²⁴ then ones every 64 elements (the same lane for
/// every backend), so each `+1` is rounded away. dβ = Σdy = 2²⁴ + 127 comes out as 2²⁴ + 64
/// (AVX2, portable) or 2²⁴ (AVX-512): an error of 63u to 126u relative to Σ|dy|.
#[test]
fn reduction_error_grows_linearly_on_one_large_term_and_many_small() {
    let m = 8192;
    let shape = Shape::new(1, 1, m).unwrap();
    let mut dy = vec![0.0f32; m];
    for (i, v) in dy.iter_mut().enumerate().step_by(64) {
        *v = if i == 0 { 16_777_216.0 } else { 1.0 };
    }
    let x: Vec<f32> = (0..m).map(|i| (i % 7) as f32).collect();
    let exact: f64 = dy.iter().map(|&v| v as f64).sum();
    let (rmean, rvar) = ([0.0f32], [1.0f32]);
    for backend in check::backends() {
        let bn = BatchNorm::new(shape, Layout::Nchw)
            .unwrap()
            .with_backend(backend)
            .unwrap();
        let mut dx = vec![0.0f32; m];
        let (mut dgamma, mut dbeta) = ([0.0f32], [0.0f32]);
        let grads = ParamGrads {
            dgamma: &mut dgamma,
            dbeta: &mut dbeta,
            mode: GradMode::Overwrite,
        };
        let mode = BackwardMode::Frozen(RunningStats {
            mean: &rmean,
            var: &rvar,
        });
        bn.backward(&x, &dy, &mut dx, None, mode, Some(grads))
            .unwrap();
        let err = (dbeta[0] as f64 - exact).abs() / exact;
        assert!(
            err <= fwd_tol(m),
            "{backend:?}: dbeta {} vs {exact}: {:.1}u, tolerance {:.1}u",
            dbeta[0],
            err / (f32::EPSILON as f64 / 2.0),
            fwd_tol(m) / (f32::EPSILON as f64 / 2.0)
        );
    }
}

/// The same growth in the statistics (Welford lanes), minimized from a fuzz case: NHWC
/// 4 × 47 × 125, sparse data (mostly zero, a few values up to ±1.7e3). The mean of channel 12
/// is off by 31.5u relative to σ, above the 31u tolerance.
#[test]
fn statistics_mean_error_grows_on_sparse_data() {
    // Bytes 103, 205, 253: N = 4, C = 47, HW = 1000 shrunk to 125 (`check::MAX_ELEMS`).
    let case = Case {
        dims: Dims {
            n: 103,
            c: 205,
            spatial: vec![253],
            extreme: 0,
        },
        nhwc: true,
        x: Data {
            kinds: vec![Kind::Sparse],
            seed: 173,
            specials: vec![],
        },
        ..Case::default()
    };
    for b in 0..check::backends().len() {
        let case = Case {
            backend: b as u8,
            ..case.clone()
        };
        check::check(Op::Statistics, &case).unwrap();
    }
}

/// `../shared/findings/statistics-nhwc-mean-bound` (NHWC 255x48x173x62, mixed magnitudes; mean
/// off by 47u against the 31u bound on AVX2), minimized: 4097 positive values near 1 whose first
/// value is 3e6. The first value is the channel's pivot, so every other deviation `x − K` is near
/// −3e6 and the f32 Welford mean of the lanes rounded by u·3e6 at every step: 31u to 34u relative
/// to σ ≈ 4.7e4 on every backend. The mean is now an f64 sum of the deviations.
#[test]
fn statistics_mean_with_an_outlier_pivot() {
    let bytes = [
        0xff, 0x01, 0x00, 0x00, 0x06, 0x00, 0x01, 0x11, 0x00, 0x01, 0x00, 0x00, 0x17, 0x00, 0x00,
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
        0x00, 0x00, 0x00, 0x00,
    ];
    let case = Case::from_bytes(&bytes);
    assert_eq!(case.x.specials, vec![(0, check::Value::Offset3e6)]);
    for b in 0..check::backends().len() {
        for nhwc in [false, true] {
            let case = Case {
                backend: b as u8,
                nhwc,
                ..case.clone()
            };
            check::check(Op::Statistics, &case).unwrap();
        }
    }
    // The finding itself, as found (merged into the corpus).
    let found = std::fs::read("fuzz/corpus/statistics/finding-statistics-nhwc-mean-bound")
        .expect("the finding is in the statistics corpus");
    check::check(Op::Statistics, &Case::from_bytes(&found)).unwrap();
}
