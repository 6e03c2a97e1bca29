//! The C ABI allocates nothing per call after the first, on a sequential operator: inference
//! (plain and fused), training (which computes batch statistics the ABI does not return),
//! backward (plain and fused) and statistics. Counted on the calling thread with a counting
//! global allocator, both layouts, a shape with C and HW not multiples of the SIMD width.

mod common;
#[path = "../../tests/common/counting.rs"]
mod counting;

use std::ptr::{null, null_mut};

use batchnorm_capi::*;
use common::{t, tm};

/// Allocations of the calling thread during `f`, which must return `BN_OK`.
fn allocations(what: &str, f: impl FnOnce() -> BnStatus) -> u64 {
    let mut status = BnStatus::Ok;
    let n = counting::allocations(|| status = f());
    assert_eq!(status, BnStatus::Ok, "{what}");
    n
}

#[test]
fn calls_after_the_first_allocate_nothing() {
    let (n, c, hw) = (3, 19, 13);
    let len = n * c * hw;
    for layout in [BN_LAYOUT_NCHW, BN_LAYOUT_NHWC] {
        let desc = BnDesc {
            n,
            c,
            hw,
            layout,
            eps: 1e-5,
            threads: 0,
            dtype: BN_DTYPE_F32,
        };
        let mut op = null_mut();
        // SAFETY: valid descriptor and output slot.
        assert_eq!(unsafe { bn_create(&desc, &mut op) }, BnStatus::Ok);
        let x: Vec<f32> = (0..len)
            .map(|i| ((i * 37) % 101) as f32 * 0.03 - 1.2)
            .collect();
        let dy: Vec<f32> = (0..len)
            .map(|i| ((i * 53) % 97) as f32 * 0.02 - 0.9)
            .collect();
        let (gamma, beta) = (vec![1.3f32; c], vec![-0.2f32; c]);
        let affine = BnAffine {
            gamma: t(&gamma),
            beta: t(&beta),
        };
        let (mut rm, mut rv) = (vec![0.0f32; c], vec![1.0f32; c]);
        let (mut sm, mut si) = (vec![0.0f32; c], vec![0.0f32; c]);
        let (mut y, mut dx) = (vec![0.0f32; len], vec![0.0f32; len]);
        let mut dz = vec![0.0f32; len];
        let (mut dgamma, mut dbeta) = (vec![0.0f32; c], vec![0.0f32; c]);
        let (mut count, mut mean, mut m2) = (vec![0u64; c], vec![0.0f64; c], vec![0.0f64; c]);

        // Every call is made twice; the second must not allocate.
        for round in 0..2 {
            let count_this = |what: &str, f: &mut dyn FnMut() -> BnStatus| {
                let a = allocations(what, f);
                if round == 1 {
                    assert_eq!(a, 0, "{what}, layout {layout}: {a} allocations");
                }
            };
            // SAFETY (every call below): pointers point to live values of the right type and
            // buffers are valid for their lengths; outputs overlap no input.
            unsafe {
                count_this("training", &mut || {
                    let saved = BnSavedMut {
                        mean: tm(&mut sm),
                        inv_std: tm(&mut si),
                    };
                    let update = BnUpdate {
                        mean: tm(&mut rm),
                        var: tm(&mut rv),
                        convention: BN_CONVENTION_PYTORCH,
                        momentum_kind: 0,
                        momentum: 0.0,
                        batches_tracked: 0,
                        unbiased: 0,
                    };
                    let relu = BnEpilogue {
                        kind: BN_EPILOGUE_RELU,
                        z: t(&[]),
                    };
                    bn_training(op, t(&x), tm(&mut y), &affine, &saved, &update, &relu)
                });
                let running = BnRunning {
                    mean: t(&rm),
                    var: t(&rv),
                };
                count_this("inference", &mut || {
                    bn_inference(op, t(&x), tm(&mut y), &affine, &running, null())
                });
                count_this("inference add+relu", &mut || {
                    let add = BnEpilogue {
                        kind: BN_EPILOGUE_ADD_RELU,
                        z: t(&dy),
                    };
                    bn_inference(op, t(&x), tm(&mut y), &affine, &running, &add)
                });
                let stats = BnBackwardStats {
                    mode: BN_BACKWARD_TRAINING,
                    mean: t(&sm),
                    second: t(&si),
                };
                count_this("backward", &mut || {
                    let grads = BnGrads {
                        dgamma: tm(&mut dgamma),
                        dbeta: tm(&mut dbeta),
                        accumulate: 0,
                    };
                    bn_backward(
                        op,
                        t(&x),
                        t(&dy),
                        tm(&mut dx),
                        &affine,
                        &stats,
                        &grads,
                        null(),
                    )
                });
                count_this("backward add+relu", &mut || {
                    let epi = BnBackwardEpilogue {
                        kind: BN_EPILOGUE_ADD_RELU,
                        y: t(&y),
                        dz: tm(&mut dz),
                    };
                    bn_backward(
                        op,
                        t(&x),
                        t(&dy),
                        tm(&mut dx),
                        &affine,
                        &stats,
                        null(),
                        &epi,
                    )
                });
                count_this("statistics", &mut || {
                    let out = BnStatsOut {
                        count: count.as_mut_ptr(),
                        mean: mean.as_mut_ptr(),
                        m2: m2.as_mut_ptr(),
                        len: c,
                    };
                    bn_statistics(op, t(&x), &out)
                });
            }
        }
        // The numbers are those of the Rust API (checked bit for bit in abi_errors.rs and
        // c_api.rs); here only that they were written.
        assert!(count.iter().all(|&k| k == (n * hw) as u64));
        assert!(dx.iter().any(|&v| v != 0.0) && dz.iter().any(|&v| v != 0.0));
        // SAFETY: from `bn_create`, destroyed once.
        unsafe { bn_destroy(op) };
    }
}
