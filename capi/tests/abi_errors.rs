//! The C ABI's argument checks, called from Rust through the same `extern "C"` functions: every
//! function with a null operator, null required pointers, a null buffer with a nonzero length,
//! unknown codes and overlapping buffers gets its status, a message, and writes nothing.

mod common;

use std::ffi::CStr;
use std::ptr::{null, null_mut};

use batchnorm_capi::*;
use common::{Op, create, desc, message, t, td, tdm, tm};

#[test]
fn every_function_reports_bad_arguments_and_writes_nothing() {
    let op = create(&desc(2, 3, 4, BN_LAYOUT_NHWC, 0, BN_DTYPE_F32));
    let x: Vec<f32> = (0..24).map(|i| i as f32 * 0.5 - 3.0).collect();
    let (mean, var) = ([0.0f32; 3], [1.0f32; 3]);
    let running = BnRunning {
        mean: t(&mean),
        var: t(&var),
    };
    let mut y = vec![7.0f32; 24];
    let untouched = |v: &[f32]| v.iter().all(|&a| a == 7.0);

    // SAFETY (every call below): pointers are null or point to live values of the right type;
    // buffers are valid for their lengths.
    unsafe {
        // Null operator, null running statistics, null buffer with a length.
        assert_eq!(
            bn_inference(null(), t(&x), tm(&mut y), null(), &running, null()),
            BnStatus::NullPointer
        );
        assert!(message().contains("`op`"), "{}", message());
        assert_eq!(
            bn_inference(op.0, t(&x), tm(&mut y), null(), null(), null()),
            BnStatus::NullPointer
        );
        let dangling = BnTensor {
            data: null(),
            len: 24,
        };
        assert_eq!(
            bn_inference(op.0, dangling, tm(&mut y), null(), &running, null()),
            BnStatus::NullPointer
        );
        assert!(message().contains("`x`"), "{}", message());
        // Unknown epilogue, overlapping input and output, short residual.
        let bad = BnEpilogue { kind: 7, z: t(&[]) };
        assert_eq!(
            bn_inference(op.0, t(&x), tm(&mut y), null(), &running, &bad),
            BnStatus::InvalidArgument
        );
        let yt = BnTensor {
            data: y.as_ptr(),
            len: 24,
        };
        assert_eq!(
            bn_inference(op.0, yt, tm(&mut y), null(), &running, null()),
            BnStatus::InvalidArgument
        );
        assert!(message().contains("overlap"), "{}", message());
        let short = BnEpilogue {
            kind: BN_EPILOGUE_ADD_RELU,
            z: t(&x[..23]),
        };
        assert_eq!(
            bn_inference(op.0, t(&x), tm(&mut y), null(), &running, &short),
            BnStatus::LengthMismatch
        );
        assert!(message().contains("`z`"), "{}", message());
        assert!(untouched(&y));

        // Training: unknown convention and momentum kind, zero batches tracked, short γ.
        let (mut rm, mut rv) = ([0.0f32; 3], [1.0f32; 3]);
        let mut update = BnUpdate {
            mean: tm(&mut rm),
            var: tm(&mut rv),
            convention: 9,
            momentum_kind: 0,
            momentum: 0.1,
            batches_tracked: 0,
            unbiased: 0,
        };
        assert_eq!(
            bn_training(op.0, t(&x), tm(&mut y), null(), null(), &update, null()),
            BnStatus::InvalidArgument
        );
        update.convention = BN_CONVENTION_CUSTOM;
        update.momentum_kind = 5;
        assert_eq!(
            bn_training(op.0, t(&x), tm(&mut y), null(), null(), &update, null()),
            BnStatus::InvalidArgument
        );
        update.momentum_kind = BN_MOMENTUM_CUMULATIVE;
        assert_eq!(
            bn_training(op.0, t(&x), tm(&mut y), null(), null(), &update, null()),
            BnStatus::ZeroBatchesTracked
        );
        let gamma = [1.0f32; 2];
        let affine = BnAffine {
            gamma: t(&gamma),
            beta: t(&mean),
        };
        assert_eq!(
            bn_training(op.0, t(&x), tm(&mut y), &affine, null(), null(), null()),
            BnStatus::LengthMismatch
        );
        assert!(message().contains("`gamma`"), "{}", message());
        assert!(untouched(&y) && rm == [0.0; 3] && rv == [1.0; 3]);

        // Backward: null statistics, unknown mode, unknown epilogue, dz overlapping dx.
        let dy = vec![1.0f32; 24];
        assert_eq!(
            bn_backward(
                op.0,
                t(&x),
                t(&dy),
                tm(&mut y),
                null(),
                null(),
                null(),
                null()
            ),
            BnStatus::NullPointer
        );
        let mut stats = BnBackwardStats {
            mode: 4,
            mean: t(&mean),
            second: t(&var),
        };
        assert_eq!(
            bn_backward(
                op.0,
                t(&x),
                t(&dy),
                tm(&mut y),
                null(),
                &stats,
                null(),
                null()
            ),
            BnStatus::InvalidArgument
        );
        stats.mode = BN_BACKWARD_FROZEN;
        let bad = BnBackwardEpilogue {
            kind: 3,
            y: t(&x),
            dz: tm(&mut []),
        };
        assert_eq!(
            bn_backward(
                op.0,
                t(&x),
                t(&dy),
                tm(&mut y),
                null(),
                &stats,
                null(),
                &bad
            ),
            BnStatus::InvalidArgument
        );
        let alias = BnBackwardEpilogue {
            kind: BN_EPILOGUE_ADD_RELU,
            y: t(&x),
            dz: BnTensorMut {
                data: y.as_mut_ptr(),
                len: 24,
            },
        };
        assert_eq!(
            bn_backward(
                op.0,
                t(&x),
                t(&dy),
                tm(&mut y),
                null(),
                &stats,
                null(),
                &alias
            ),
            BnStatus::InvalidArgument
        );
        assert!(untouched(&y));
        let mut buf = vec![7.0f32; 23];
        assert_eq!(
            bn_backward_in_place(op.0, t(&x), tm(&mut buf), null(), &stats, null()),
            BnStatus::LengthMismatch
        );
        assert!(message().contains("`dy_dx`"), "{}", message());
        assert!(untouched(&buf));

        // Statistics: null output, wrong length.
        assert_eq!(bn_statistics(op.0, t(&x), null()), BnStatus::NullPointer);
        let (mut count, mut m, mut m2) = ([0u64; 2], [0f64; 2], [0f64; 2]);
        let out = BnStatsOut {
            count: count.as_mut_ptr(),
            mean: m.as_mut_ptr(),
            m2: m2.as_mut_ptr(),
            len: 2,
        };
        assert_eq!(bn_statistics(op.0, t(&x), &out), BnStatus::LengthMismatch);
        assert_eq!(count, [0, 0]);

        // Folding: unknown weight layout, NaN ε, null conv.
        let mut w = vec![7.0f32; 12];
        let mut b = vec![7.0f32; 3];
        let conv = BnConvWeights {
            layout: 8,
            out_channels: 3,
            in_per_group: 4,
            kernel: 1,
        };
        assert_eq!(
            bn_fold_conv(
                &conv,
                tm(&mut w),
                null(),
                tm(&mut b),
                null(),
                &running,
                1e-5
            ),
            BnStatus::InvalidArgument
        );
        assert_eq!(
            bn_fold_conv(
                null(),
                tm(&mut w),
                null(),
                tm(&mut b),
                null(),
                &running,
                1e-5
            ),
            BnStatus::NullPointer
        );
        assert_eq!(
            bn_fold_linear(
                4,
                tm(&mut w),
                null(),
                tm(&mut b),
                null(),
                &running,
                f64::NAN
            ),
            BnStatus::InvalidEpsilon
        );
        let (mut s, mut sh) = ([7.0f32; 3], [7.0f32; 2]);
        assert_eq!(
            bn_scale_shift(null(), &running, 1e-5, tm(&mut s), tm(&mut sh)),
            BnStatus::LengthMismatch
        );
        assert!(untouched(&w) && untouched(&b) && untouched(&s) && untouched(&sh));

        // The backend name, and a null operator's.
        let name = CStr::from_ptr(bn_backend_name(op.0)).to_str().unwrap();
        assert!(["avx512", "avx2", "portable"].contains(&name));
        assert!(bn_backend_name(null()).is_null());
    }
}

/// `bn_set_residency`: a null operator and an unknown code are errors; every residency gives
/// the same bits (f32 and bf16 data, both layouts, training then backward), the streamed outputs
/// included.
#[test]
fn residency_changes_no_result() {
    // SAFETY: null operator (an error, nothing dereferenced).
    assert_eq!(
        unsafe { bn_set_residency(null_mut(), BN_RESIDENCY_MEMORY) },
        BnStatus::NullPointer
    );
    assert!(message().contains("`op`"), "{}", message());
    let (n, c, hw) = (3, 5, 37);
    let len = n * c * hw;
    let x: Vec<f32> = (0..len).map(|i| ((i * 37) % 101) as f32 / 16.0).collect();
    let dy: Vec<f32> = (0..len)
        .map(|i| ((i * 53) % 97) as f32 / 32.0 - 1.5)
        .collect();
    // Truncated to bf16 (any bf16 values serve).
    let to_bf16 = |v: &[f32]| {
        v.iter()
            .map(|&a| (a.to_bits() >> 16) as u16)
            .collect::<Vec<_>>()
    };
    for layout in [BN_LAYOUT_NCHW, BN_LAYOUT_NHWC] {
        for dtype in [BN_DTYPE_F32, BN_DTYPE_BF16] {
            let mut results = Vec::new();
            for residency in [BN_RESIDENCY_AUTO, BN_RESIDENCY_MEMORY, BN_RESIDENCY_CACHE] {
                let op = create(&desc(n, c, hw, layout, 0, dtype));
                // SAFETY: a live operator, not shared.
                unsafe {
                    assert_eq!(bn_set_residency(op.0, 9), BnStatus::InvalidArgument);
                    assert!(message().contains("unknown residency 9"), "{}", message());
                    assert_eq!(bn_set_residency(op.0, residency), BnStatus::Ok);
                }
                // The bytes of y and dx (f32 or bf16 bits), through the same calls.
                let (y, dx) = if dtype == BN_DTYPE_F32 {
                    let (mut y, mut dx) = (vec![0.0f32; len], vec![0.0f32; len]);
                    run_training_backward(&op, c, (t(&x), t(&dy)), (tm(&mut y), tm(&mut dx)));
                    (bits(&y), bits(&dx))
                } else {
                    let (xb, dyb) = (to_bf16(&x), to_bf16(&dy));
                    let (mut y, mut dx) = (vec![0u16; len], vec![0u16; len]);
                    run_training_backward(&op, c, (td(&xb), td(&dyb)), (tdm(&mut y), tdm(&mut dx)));
                    (
                        y.iter().map(|&b| u32::from(b)).collect(),
                        dx.iter().map(|&b| u32::from(b)).collect(),
                    )
                };
                results.push((y, dx));
            }
            assert!(
                results.windows(2).all(|w| w[0] == w[1]),
                "layout {layout} dtype {dtype}"
            );
        }
    }
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|a| a.to_bits()).collect()
}

/// Training (batch statistics, saved) then backward from the saved statistics, through `op` (of
/// `c` channels).
fn run_training_backward(
    op: &Op,
    c: usize,
    (x, dy): (BnTensor, BnTensor),
    (y, dx): (BnTensorMut, BnTensorMut),
) {
    let (mut mean, mut inv_std) = (vec![0.0f32; c], vec![0.0f32; c]);
    let saved = BnSavedMut {
        mean: tm(&mut mean),
        inv_std: tm(&mut inv_std),
    };
    // SAFETY: valid arguments for a live operator.
    unsafe {
        assert_eq!(
            bn_training(op.0, x, y, null(), &saved, null(), null()),
            BnStatus::Ok,
            "{}",
            message()
        );
        let stats = BnBackwardStats {
            mode: BN_BACKWARD_TRAINING,
            mean: t(&mean),
            second: t(&inv_std),
        };
        assert_eq!(
            bn_backward(op.0, x, dy, dx, null(), &stats, null(), null()),
            BnStatus::Ok,
            "{}",
            message()
        );
    }
}

#[test]
fn an_operator_with_its_own_pool_gives_the_sequential_results() {
    let x: Vec<f32> = (0..2 * 3 * 40_000)
        .map(|i| ((i * 37) % 101) as f32 / 16.0)
        .collect();
    let (mean, var) = ([1.0f32; 3], [2.0f32; 3]);
    let running = BnRunning {
        mean: t(&mean),
        var: t(&var),
    };
    let mut results = Vec::new();
    for threads in [0, 1, 3] {
        let desc = BnDesc {
            n: 2,
            c: 3,
            hw: 40_000,
            layout: BN_LAYOUT_NCHW,
            eps: 1e-5,
            threads,
            dtype: BN_DTYPE_F32,
        };
        let mut p = null_mut();
        let mut y = vec![0.0f32; x.len()];
        // SAFETY: valid arguments; the operator is destroyed once.
        unsafe {
            assert_eq!(bn_create(&desc, &mut p), BnStatus::Ok);
            let op = Op(p);
            assert_eq!(
                bn_training(op.0, t(&x), tm(&mut y), null(), null(), null(), null()),
                BnStatus::Ok
            );
            assert_eq!(
                bn_inference_in_place(op.0, tm(&mut y), null(), &running, null()),
                BnStatus::Ok
            );
        }
        results.push(y);
    }
    assert!(results.windows(2).all(|w| w[0] == w[1]));
}

#[test]
fn folding_through_the_abi_equals_the_rust_api() {
    use batchnorm::fold::{self, ConvWeights, WeightLayout};
    use batchnorm::{Affine, RunningStats};
    let (o, per) = (5usize, 6usize);
    let w0: Vec<f32> = (0..o * per)
        .map(|i| ((i * 37) % 23) as f32 / 8.0 - 1.0)
        .collect();
    let bias: Vec<f32> = (0..o).map(|i| i as f32 * 0.3 - 0.5).collect();
    let (gamma, beta) = (vec![1.5f32; o], vec![0.25f32; o]);
    let (mean, var): (Vec<f32>, Vec<f32>) =
        (0..o).map(|i| (i as f32 * 0.1, 1.0 + i as f32)).unzip();
    let affine = BnAffine {
        gamma: t(&gamma),
        beta: t(&beta),
    };
    let running = BnRunning {
        mean: t(&mean),
        var: t(&var),
    };
    let rust_affine = Some(Affine {
        gamma: &gamma,
        beta: &beta,
    });
    let rust_running = RunningStats {
        mean: &mean,
        var: &var,
    };
    for (code, layout) in [
        (BN_WEIGHTS_OIHW, WeightLayout::Oihw),
        (BN_WEIGHTS_OHWI, WeightLayout::Ohwi),
        (BN_WEIGHTS_HWIO, WeightLayout::Hwio),
    ] {
        let (mut w, mut b) = (w0.clone(), vec![0.0f32; o]);
        let conv = BnConvWeights {
            layout: code,
            out_channels: o,
            in_per_group: 2,
            kernel: 3,
        };
        // SAFETY: valid pointers and lengths.
        let status = unsafe {
            bn_fold_conv(
                &conv,
                tm(&mut w),
                &t(&bias),
                tm(&mut b),
                &affine,
                &running,
                1e-3,
            )
        };
        assert_eq!(status, BnStatus::Ok);
        let (mut w2, mut b2) = (w0.clone(), vec![0.0f32; o]);
        let cw = ConvWeights {
            layout,
            out_channels: o,
            in_per_group: 2,
            kernel: 3,
        };
        let io = (&mut w2[..], Some(&bias[..]), &mut b2[..]);
        fold::fold_conv(cw, io, rust_affine, rust_running, 1e-3).unwrap();
        assert_eq!((&w, &b), (&w2, &b2), "{layout:?}");
    }
    let (mut w, mut b) = (w0.clone(), vec![0.0f32; o]);
    // SAFETY: valid pointers and lengths; no bias.
    let status =
        unsafe { bn_fold_linear(per, tm(&mut w), null(), tm(&mut b), &affine, &running, 1e-3) };
    assert_eq!(status, BnStatus::Ok);
    let (mut w2, mut b2) = (w0.clone(), vec![0.0f32; o]);
    fold::fold_linear(
        per,
        (&mut w2, None, &mut b2),
        rust_affine,
        rust_running,
        1e-3,
    )
    .unwrap();
    assert_eq!((w, b), (w2, b2));
    let (mut s, mut sh) = (vec![0.0f32; o], vec![0.0f32; o]);
    // SAFETY: valid pointers and lengths.
    let status = unsafe { bn_scale_shift(&affine, &running, 1e-3, tm(&mut s), tm(&mut sh)) };
    assert_eq!(status, BnStatus::Ok);
    let (mut s2, mut sh2) = (vec![0.0f32; o], vec![0.0f32; o]);
    fold::scale_shift(rust_affine, rust_running, 1e-3, (&mut s2, &mut sh2)).unwrap();
    assert_eq!((s, sh), (s2, sh2));
}
