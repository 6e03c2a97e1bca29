//! `double` data through the C ABI (`BN_DTYPE_F64`): parameters and statistics are `double` too.
//! Inference, training (saved statistics, PyTorch running update) and backward (dx, dγ, dβ) are
//! bit-identical to the Rust API's f64 operations on the same data, on both layouts, with C and
//! HW not multiples of the SIMD width; outputs start as different garbage on the two sides. A
//! parameter buffer counted in floats instead of doubles is a length error naming it.

mod common;

use std::ptr::null;

use batchnorm::{
    Affine, BackwardMode, BatchNorm, GradMode, Layout, Parallelism, ParamGrads, RunningStats,
    RunningUpdate, SavedStats, SavedStatsMut, Shape,
};
use batchnorm_capi::*;
use common::{create, desc, td, tdm};

fn fill(n: usize, seed: usize, offset: f64) -> Vec<f64> {
    (0..n)
        .map(|i| offset + (((37 * i + 11 * seed) % 101) as f64 / 16.0 - 3.0) * 1.1)
        .collect()
}

fn bits(v: &[f64]) -> Vec<u64> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn f64_operations_match_the_rust_api() {
    for (n, c, hw) in [(3, 5, 7), (2, 19, 37)] {
        for (layout, code) in [
            (Layout::Nchw, BN_LAYOUT_NCHW),
            (Layout::Nhwc, BN_LAYOUT_NHWC),
        ] {
            let case = format!("{layout:?} {n}x{c}x{hw}");
            let op = create(&desc(n, c, hw, code, 0, BN_DTYPE_F64));
            let shape = Shape::new(n, c, hw).unwrap();
            let bn = BatchNorm::new(shape, layout)
                .unwrap()
                .with_parallelism(Parallelism::Sequential);
            let len = shape.len();
            let (x, dy) = (fill(len, 1, 3e6), fill(len, 3, 0.0));
            let (gamma, beta) = (fill(c, 4, 1.0), fill(c, 5, 0.0));
            let (rmean, rvar) = (fill(c, 6, 3e6), fill(c, 7, 10.0));
            let affine = BnAffine {
                gamma: td(&gamma),
                beta: td(&beta),
            };
            let aff = Some(Affine {
                gamma: &gamma,
                beta: &beta,
            });
            let (mut ya, mut yr) = (vec![f64::NAN; len], vec![-7.5; len]);
            // SAFETY (every ABI call below): the operator is live; every pointer is null or
            // points to a live value; every buffer is valid for its length and type, and no
            // written buffer overlaps another.
            unsafe {
                let running = BnRunning {
                    mean: td(&rmean),
                    var: td(&rvar),
                };
                let s = bn_inference(op.0, td(&x), tdm(&mut ya), &affine, &running, null());
                assert_eq!(s, BnStatus::Ok, "{case}");
                let run = RunningStats {
                    mean: &rmean,
                    var: &rvar,
                };
                bn.inference(&x, &mut yr, aff, run).unwrap();
                assert_eq!(bits(&ya), bits(&yr), "{case}: inference");

                let (mut ma, mut ia) = (vec![f64::NAN; c], vec![f64::NAN; c]);
                let (mut mr, mut ir) = (vec![9.0; c], vec![9.0; c]);
                let (mut rma, mut rva, mut rmr, mut rvr) =
                    (rmean.clone(), rvar.clone(), rmean.clone(), rvar.clone());
                let saved = BnSavedMut {
                    mean: tdm(&mut ma),
                    inv_std: tdm(&mut ia),
                };
                let update = BnUpdate {
                    mean: tdm(&mut rma),
                    var: tdm(&mut rva),
                    convention: BN_CONVENTION_PYTORCH,
                    momentum_kind: 0,
                    momentum: 0.0,
                    batches_tracked: 0,
                    unbiased: 0,
                };
                let s = bn_training(op.0, td(&x), tdm(&mut ya), &affine, &saved, &update, null());
                assert_eq!(s, BnStatus::Ok, "{case}");
                let saved_r = SavedStatsMut {
                    mean: &mut mr,
                    inv_std: &mut ir,
                };
                let update_r = RunningUpdate::pytorch(&mut rmr, &mut rvr);
                bn.training(&x, &mut yr, aff, Some(saved_r), Some(update_r))
                    .unwrap();
                assert_eq!(bits(&ya), bits(&yr), "{case}: training y");
                assert_eq!(bits(&ma), bits(&mr), "{case}: saved mean");
                assert_eq!(bits(&ia), bits(&ir), "{case}: saved inv_std");
                assert_eq!(bits(&rma), bits(&rmr), "{case}: running mean");
                assert_eq!(bits(&rva), bits(&rvr), "{case}: running var");

                let stats = BnBackwardStats {
                    mode: BN_BACKWARD_TRAINING,
                    mean: td(&ma),
                    second: td(&ia),
                };
                let (mut dga, mut dba) = (vec![f64::NAN; c], vec![f64::NAN; c]);
                let (mut dgr, mut dbr) = (vec![1.0; c], vec![1.0; c]);
                let grads = BnGrads {
                    dgamma: tdm(&mut dga),
                    dbeta: tdm(&mut dba),
                    accumulate: 0,
                };
                ya.fill(f64::NAN);
                yr.fill(-7.5);
                let s = bn_backward(
                    op.0,
                    td(&x),
                    td(&dy),
                    tdm(&mut ya),
                    &affine,
                    &stats,
                    &grads,
                    null(),
                );
                assert_eq!(s, BnStatus::Ok, "{case}");
                let mode = BackwardMode::Training(SavedStats {
                    mean: &mr,
                    inv_std: &ir,
                });
                let g = ParamGrads {
                    dgamma: &mut dgr,
                    dbeta: &mut dbr,
                    mode: GradMode::Overwrite,
                };
                bn.backward(&x, &dy, &mut yr, aff, mode, Some(g)).unwrap();
                assert_eq!(bits(&ya), bits(&yr), "{case}: dx");
                assert_eq!(bits(&dga), bits(&dgr), "{case}: dgamma");
                assert_eq!(bits(&dba), bits(&dbr), "{case}: dbeta");
            }
        }
    }
}

#[test]
fn f64_parameter_lengths_are_checked() {
    let op = create(&desc(2, 3, 4, BN_LAYOUT_NCHW, 0, BN_DTYPE_F64));
    let (x, mut y) = (vec![1.0f64; 24], vec![7.0f64; 24]);
    let (mean, var) = (vec![0.0f64; 2], vec![1.0f64; 3]);
    let running = BnRunning {
        mean: td(&mean),
        var: td(&var),
    };
    // SAFETY: live operator; buffers valid for their lengths; `y` overlaps nothing.
    let s = unsafe { bn_inference(op.0, td(&x), tdm(&mut y), null(), &running, null()) };
    assert_eq!(s, BnStatus::LengthMismatch);
    assert!(y.iter().all(|&v| v == 7.0), "nothing written");
    // SAFETY: the library returns a NUL-terminated string valid until the next call.
    let msg = unsafe { std::ffi::CStr::from_ptr(bn_last_error_message()) }.to_string_lossy();
    assert!(msg.contains("running_mean"), "{msg}");
}
