//! Every kind of bad input returns its documented error, and nothing is written.

use batchnorm::{
    Affine, Backend, BackwardMode, BatchNorm, BatchNormLayer, BatchStats, ChannelStats, Error,
    GradMode, Layout, Momentum, ParamGrads, RunningStats, RunningUpdate, SavedStats, SavedStatsMut,
    Shape, Variance,
};

#[test]
fn shapes() {
    assert_eq!(Shape::new(0, 3, 4), Err(Error::ZeroDimension { dim: "N" }));
    assert_eq!(Shape::new(2, 0, 4), Err(Error::ZeroDimension { dim: "C" }));
    assert_eq!(Shape::new(2, 3, 0), Err(Error::ZeroDimension { dim: "HW" }));
    assert_eq!(
        Shape::with_spatial(2, 3, &[4, 0]),
        Err(Error::ZeroDimension { dim: "spatial[1]" })
    );
    assert!(matches!(
        Shape::new(usize::MAX, 2, 2),
        Err(Error::ShapeOverflow { .. })
    ));
    assert!(matches!(
        Shape::new(1 << 40, 1 << 20, 1 << 3),
        Err(Error::ShapeOverflow { .. })
    ));
    assert!(matches!(
        Shape::with_spatial(1, 1, &[1 << 40, 1 << 40]),
        Err(Error::ShapeOverflow { .. })
    ));
    assert_eq!(Shape::with_spatial(2, 3, &[]).unwrap().hw(), 1);
}

#[test]
fn epsilon_and_momentum() {
    let bn = BatchNorm::new(Shape::new(2, 1, 2).unwrap(), Layout::Nchw).unwrap();
    for eps in [-1e-5, f64::NAN, f64::INFINITY, (-0.0f64).next_down()] {
        assert!(
            matches!(bn.with_eps(eps), Err(Error::InvalidEpsilon { .. })),
            "{eps}"
        );
    }
    assert!(bn.with_eps(0.0).is_ok());
    let x = [1.0f32, 2.0, 3.0, 4.0];
    for (momentum, want) in [
        (
            Momentum::NewWeight(1.5),
            Error::InvalidMomentum { momentum: 1.5 },
        ),
        (
            Momentum::NewWeight(-0.1),
            Error::InvalidMomentum { momentum: -0.1 },
        ),
        (
            Momentum::OldWeight(f64::NAN),
            Error::InvalidMomentum { momentum: f64::NAN },
        ),
        (
            Momentum::CumulativeAverage { batches_tracked: 0 },
            Error::ZeroBatchesTracked,
        ),
    ] {
        let (mut rm, mut rv) = ([7.0f32], [7.0f32]);
        let (mut m, mut r) = ([7.0f32], [7.0f32]);
        let mut y = [7.0f32; 4];
        let update = RunningUpdate {
            mean: &mut rm,
            var: &mut rv,
            momentum,
            var_estimator: Variance::Biased,
        };
        let err = bn
            .training(
                &x,
                &mut y,
                None,
                Some(SavedStatsMut {
                    mean: &mut m,
                    inv_std: &mut r,
                }),
                Some(update),
            )
            .unwrap_err();
        match (&err, &want) {
            (Error::InvalidMomentum { momentum: a }, Error::InvalidMomentum { momentum: b }) => {
                assert!(a == b || (a.is_nan() && b.is_nan()))
            }
            _ => assert_eq!(err, want),
        }
        assert_eq!(
            (y, m, r, rm, rv),
            ([7.0; 4], [7.0], [7.0], [7.0], [7.0]),
            "nothing written"
        );
    }
}

#[test]
fn lengths_are_named() {
    let shape = Shape::new(2, 3, 4).unwrap();
    let bn = BatchNorm::new(shape, Layout::Nhwc).unwrap();
    let (x, short) = (vec![1.0f32; 24], vec![1.0f32; 23]);
    let mut y = vec![7.0f32; 24];
    let (c3, c2) = ([1.0f32; 3], [1.0f32; 2]);
    let running = RunningStats {
        mean: &c3,
        var: &c3,
    };
    let mismatch = |op, arg, expected, actual| Error::LengthMismatch {
        op,
        arg,
        expected,
        actual,
    };

    assert_eq!(
        bn.statistics(&short).unwrap_err(),
        mismatch("statistics", "x", 24, 23)
    );
    assert_eq!(
        bn.inference(&short, &mut y, None, running).unwrap_err(),
        mismatch("inference", "x", 24, 23)
    );
    assert_eq!(
        bn.inference(&x, &mut y[..20], None, running).unwrap_err(),
        mismatch("inference", "y", 24, 20)
    );
    let bad = RunningStats {
        mean: &c2,
        var: &c3,
    };
    assert_eq!(
        bn.inference(&x, &mut y, None, bad).unwrap_err(),
        mismatch("inference", "running_mean", 3, 2)
    );
    let bad = RunningStats {
        mean: &c3,
        var: &c2,
    };
    assert_eq!(
        bn.inference(&x, &mut y, None, bad).unwrap_err(),
        mismatch("inference", "running_var", 3, 2)
    );
    let affine = Some(Affine {
        gamma: &c2,
        beta: &c3,
    });
    assert_eq!(
        bn.inference(&x, &mut y, affine, running).unwrap_err(),
        mismatch("inference", "gamma", 3, 2)
    );
    let affine = Some(Affine {
        gamma: &c3,
        beta: &c2,
    });
    assert_eq!(
        bn.inference(&x, &mut y, affine, running).unwrap_err(),
        mismatch("inference", "beta", 3, 2)
    );
    let mut xs = short.clone();
    assert_eq!(
        bn.inference_in_place(&mut xs, None, running).unwrap_err(),
        mismatch("inference_in_place", "x", 24, 23)
    );
    assert!(y.iter().all(|&v| v == 7.0), "nothing written on error");

    let (mut m3, mut r3, mut m2) = ([0.0f32; 3], [0.0f32; 3], [0.0f32; 2]);
    let saved = SavedStatsMut {
        mean: &mut m2,
        inv_std: &mut r3,
    };
    assert_eq!(
        bn.training(&x, &mut y, None, Some(saved), None)
            .unwrap_err(),
        mismatch("training", "saved_mean", 3, 2)
    );
    let saved = SavedStatsMut {
        mean: &mut m3,
        inv_std: &mut m2,
    };
    assert_eq!(
        bn.training(&x, &mut y, None, Some(saved), None)
            .unwrap_err(),
        mismatch("training", "saved_inv_std", 3, 2)
    );
    let (mut rm, mut rv2) = ([0.0f32; 3], [0.0f32; 2]);
    let saved = SavedStatsMut {
        mean: &mut m3,
        inv_std: &mut r3,
    };
    let update = Some(RunningUpdate::pytorch(&mut rm, &mut rv2));
    assert_eq!(
        bn.training(&x, &mut y, None, Some(saved), update)
            .unwrap_err(),
        mismatch("training", "running_var", 3, 2)
    );

    let saved = SavedStats {
        mean: &c3,
        inv_std: &c3,
    };
    let mode = BackwardMode::Training(saved);
    let mut dx = vec![7.0f32; 24];
    assert_eq!(
        bn.backward(&x, &short, &mut dx, None, mode, None)
            .unwrap_err(),
        mismatch("backward", "dy", 24, 23)
    );
    assert_eq!(
        bn.backward(&short, &x, &mut dx, None, mode, None)
            .unwrap_err(),
        mismatch("backward", "x", 24, 23)
    );
    assert_eq!(
        bn.backward(&x, &x, &mut dx[..1], None, mode, None)
            .unwrap_err(),
        mismatch("backward", "dx", 24, 1)
    );
    assert_eq!(
        bn.backward(
            &x,
            &x,
            &mut dx,
            Some(Affine {
                gamma: &c2,
                beta: &c3
            }),
            mode,
            None
        )
        .unwrap_err(),
        mismatch("backward", "gamma", 3, 2)
    );
    assert_eq!(
        bn.backward(
            &x,
            &x,
            &mut dx,
            Some(Affine {
                gamma: &c3,
                beta: &c2
            }),
            mode,
            None
        )
        .unwrap_err(),
        mismatch("backward", "beta", 3, 2)
    );
    let bad = BackwardMode::Training(SavedStats {
        mean: &c3,
        inv_std: &c2,
    });
    assert_eq!(
        bn.backward(&x, &x, &mut dx, None, bad, None).unwrap_err(),
        mismatch("backward", "saved_inv_std", 3, 2)
    );
    let bad = BackwardMode::Frozen(RunningStats {
        mean: &c2,
        var: &c3,
    });
    assert_eq!(
        bn.backward(&x, &x, &mut dx, None, bad, None).unwrap_err(),
        mismatch("backward", "running_mean", 3, 2)
    );
    let (mut dg, mut db) = ([0.0f32; 2], [0.0f32; 3]);
    let grads = Some(ParamGrads {
        dgamma: &mut dg,
        dbeta: &mut db,
        mode: GradMode::Overwrite,
    });
    assert_eq!(
        bn.backward(&x, &x, &mut dx, None, mode, grads).unwrap_err(),
        mismatch("backward", "dgamma", 3, 2)
    );
    let mut g = short.clone();
    assert_eq!(
        bn.backward_in_place(&x, &mut g, None, mode, None)
            .unwrap_err(),
        mismatch("backward_in_place", "dy_dx", 24, 23)
    );
    assert!(dx.iter().all(|&v| v == 7.0), "nothing written on error");
}

#[test]
fn statistics_errors() {
    let mut a = BatchStats::from_channels(vec![ChannelStats::default(); 3]);
    let b = BatchStats::from_channels(vec![ChannelStats::default(); 2]);
    assert_eq!(
        a.merge(&b),
        Err(Error::ChannelMismatch {
            expected: 3,
            actual: 2
        })
    );
    let one = ChannelStats::new(1, 2.0, 0.0);
    assert_eq!(
        one.variance(Variance::Unbiased),
        Err(Error::TooFewValues { per_channel: 1 })
    );
    assert_eq!(one.variance(Variance::Biased), Ok(0.0));
    assert_eq!(
        ChannelStats::default().variance(Variance::Biased),
        Err(Error::TooFewValues { per_channel: 0 })
    );
}

#[test]
fn backends() {
    assert_eq!(Backend::from_name("avx2"), Some(Backend::Avx2Fma));
    assert_eq!(Backend::from_name("nope"), None);
    assert!(Backend::Portable.is_available());
    let bn = BatchNorm::new(Shape::new(1, 1, 1).unwrap(), Layout::Nchw).unwrap();
    for b in Backend::ALL {
        match bn.with_backend(b) {
            Ok(op) => assert!(b.is_available() && op.backend() == b),
            Err(e) => assert_eq!(e, Error::BackendUnavailable { backend: b.name() }),
        }
    }
    // The default backend is the forced one when BATCHNORM_BACKEND is set, else the best.
    match std::env::var("BATCHNORM_BACKEND") {
        Ok(name) => assert_eq!(
            Backend::detect().name(),
            name,
            "forced backend was not used"
        ),
        Err(_) => assert_eq!(Backend::detect(), Backend::available()[0]),
    }
    // Messages name the argument and both values.
    let msg = Error::LengthMismatch {
        op: "inference",
        arg: "gamma",
        expected: 3,
        actual: 2,
    }
    .to_string();
    assert_eq!(msg, "inference: `gamma` has length 2, expected 3");
    // Which spatial dimension is zero, and what to do about too few values.
    let zero = Shape::with_spatial(2, 3, &[5, 7, 0])
        .unwrap_err()
        .to_string();
    assert_eq!(zero, "dimension spatial[2] is zero; it must be at least 1");
    let few = Error::TooFewValues { per_channel: 1 }.to_string();
    assert!(few.contains("Variance::Biased"), "{few}");
}

/// An invalid `BATCHNORM_BACKEND` is a clear error from every operation (never a silent
/// substitute, never an illegal instruction), unless the API chooses a backend. The variable is
/// read once per process, so the check runs in a child process of this test binary.
#[test]
fn invalid_forced_backend_is_an_error() {
    if std::env::var_os("BATCHNORM_TEST_CHILD").is_some() {
        let shape = Shape::new(1, 2, 3).unwrap();
        let want = Error::UnknownBackend {
            name: "bogus".into(),
        };
        // Reported where the operator (or the layer) is built.
        assert_eq!(BatchNorm::new(shape, Layout::Nchw).unwrap_err(), want);
        assert_eq!(BatchNormLayer::pytorch(2, Layout::Nchw).unwrap_err(), want);
        // A backend chosen by the caller runs, and is the one named.
        let chosen = BatchNorm::on_backend(shape, Layout::Nchw, Backend::Portable).unwrap();
        assert_eq!(chosen.backend(), Backend::Portable);
        assert!(chosen.statistics(&[0.0; 6]).is_ok());
        return;
    }
    let status = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "invalid_forced_backend_is_an_error",
            "--exact",
            "--test-threads=1",
        ])
        .env("BATCHNORM_TEST_CHILD", "1")
        .env("BATCHNORM_BACKEND", "bogus")
        .status()
        .unwrap();
    assert!(status.success(), "child test failed");
}

/// The `_into` forms check the length of the statistics they write, write nothing on error, and
/// otherwise give exactly what the returning forms give.
#[test]
fn into_forms_check_the_statistics_length_and_match_the_returning_forms() {
    let bn = BatchNorm::new(Shape::new(2, 3, 5).unwrap(), Layout::Nhwc).unwrap();
    let x: Vec<f32> = (0..30).map(|i| (i * 7 % 11) as f32 - 4.5).collect();
    let mut short = vec![ChannelStats::new(9, 9.0, 9.0); 2];
    let mismatch = |op| Error::LengthMismatch {
        op,
        arg: "stats",
        expected: 3,
        actual: 2,
    };
    assert_eq!(
        bn.statistics_into(&x, &mut short),
        Err(mismatch("statistics_into"))
    );
    let mut y = vec![7.0f32; 30];
    let epi = batchnorm::Epilogue::None;
    assert_eq!(
        bn.training_into(&x, &mut y, None, None, None, epi, Some(&mut short)),
        Err(mismatch("training_into"))
    );
    assert!(short.iter().all(|s| *s == ChannelStats::new(9, 9.0, 9.0)));
    assert!(y.iter().all(|&v| v == 7.0));

    let mut stats = vec![ChannelStats::default(); 3];
    bn.statistics_into(&x, &mut stats).unwrap();
    assert_eq!(stats, bn.statistics(&x).unwrap().channels());
    let mut y2 = vec![0.0f32; 30];
    let returned = bn.training(&x, &mut y2, None, None, None).unwrap();
    let mut into = vec![ChannelStats::default(); 3];
    bn.training_into(&x, &mut y, None, None, None, epi, Some(&mut into))
        .unwrap();
    assert_eq!(into, returned.channels());
    assert_eq!(y, y2);
}
