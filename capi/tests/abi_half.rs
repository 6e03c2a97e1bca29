//! Half-precision data through the C ABI. An operator created with `BN_DTYPE_F16` or
//! `BN_DTYPE_BF16` gives, in every operation that takes data, outputs bit-identical to the Rust
//! API's generic operation on the same data: inference (plain, fused add + ReLU, in place),
//! training (saved statistics, PyTorch running update, fused add + ReLU), backward (batch and
//! frozen statistics, fused add + ReLU, in place) and statistics, on both layouts, shapes with C
//! and HW not multiples of the SIMD width, sequential and with a pool. Outputs start as different
//! garbage on the two sides, so an element either side skips is a mismatch. Then the data type's
//! own checks: unknown codes, a zero-initialised descriptor (f32), lengths in elements, overlap
//! and alignment at the half element size, and a case computed by hand.

mod common;

use std::ptr::{null, null_mut};

use batchnorm::{
    Affine, BackwardEpilogue, BackwardMode, BatchNorm, Element, Epilogue, GradMode, Layout,
    Parallelism, ParamGrads, RunningStats, RunningUpdate, SavedStats, SavedStatsMut, Shape, bf16,
    f16,
};
use batchnorm_capi::*;
use common::{create, desc, message, t, td, tdm, tm};

/// A half storage type with its ABI code and its bits (the comparisons are bit for bit).
trait Half: Element<Param = f32> {
    const CODE: u32;
    fn bits(self) -> u16;
}

impl Half for f16 {
    const CODE: u32 = BN_DTYPE_F16;
    fn bits(self) -> u16 {
        self.to_bits()
    }
}

impl Half for bf16 {
    const CODE: u32 = BN_DTYPE_BF16;
    fn bits(self) -> u16 {
        self.to_bits()
    }
}

fn bits<E: Half>(v: &[E]) -> Vec<u16> {
    v.iter().map(|e| e.bits()).collect()
}

fn f32_bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|e| e.to_bits()).collect()
}

/// `(((37·i + 11·seed) mod 101)/16 − 3)·1.1`: most values are not exact in half precision, so
/// the conversion rounds, and so do the outputs.
fn fill(n: usize, seed: usize) -> Vec<f32> {
    (0..n)
        .map(|i| ((((37 * i + 11 * seed) % 101) as f64 / 16.0 - 3.0) * 1.1) as f32)
        .collect()
}

fn data<E: Element<Param = f32>>(n: usize, seed: usize) -> Vec<E> {
    fill(n, seed).into_iter().map(E::from_param).collect()
}

/// Garbage of the ABI side's outputs (the Rust side's is `RUST_GARBAGE`).
const ABI_GARBAGE: f32 = f32::NAN;
const RUST_GARBAGE: f32 = -7.5;

fn garbage<E: Element<Param = f32>>(n: usize, v: f32) -> Vec<E> {
    vec![E::from_param(v); n]
}

/// Every data operation through the ABI against the Rust API, for one type, shape, layout and
/// thread count.
fn abi_matches_rust<E: Half>((n, c, hw): (usize, usize, usize), layout: Layout, threads: usize) {
    let code = match layout {
        Layout::Nchw => BN_LAYOUT_NCHW,
        _ => BN_LAYOUT_NHWC,
    };
    let case = format!("{} {layout:?} {n}x{c}x{hw} threads {threads}", E::NAME);
    let op = create(&desc(n, c, hw, code, threads, E::CODE));
    let shape = Shape::new(n, c, hw).unwrap();
    let bn = BatchNorm::new(shape, layout)
        .unwrap()
        .with_parallelism(Parallelism::Sequential);
    let len = shape.len();
    let (x, z, dy) = (data::<E>(len, 1), data::<E>(len, 2), data::<E>(len, 3));
    let (gamma, beta) = (fill(c, 4), fill(c, 5));
    let rmean: Vec<f32> = (0..c).map(|i| 0.25 * i as f32 - 0.3).collect();
    let rvar: Vec<f32> = (0..c).map(|i| 1.0 + 0.35 * i as f32).collect();
    let affine = BnAffine {
        gamma: t(&gamma),
        beta: t(&beta),
    };
    let running = BnRunning {
        mean: t(&rmean),
        var: t(&rvar),
    };
    let aff = Some(Affine {
        gamma: &gamma,
        beta: &beta,
    });
    let run = RunningStats {
        mean: &rmean,
        var: &rvar,
    };
    let add_relu = BnEpilogue {
        kind: BN_EPILOGUE_ADD_RELU,
        z: td(&z),
    };
    let relu = BnEpilogue {
        kind: BN_EPILOGUE_RELU,
        z: td::<E>(&[]),
    };
    let (mut ya, mut yr) = (garbage::<E>(len, ABI_GARBAGE), garbage(len, RUST_GARBAGE));

    // SAFETY (every ABI call below): the operator is live; every pointer is null or points to a
    // live value; every buffer is valid for its length and type, and no written buffer overlaps
    // another.
    unsafe {
        // Inference: plain, fused add + ReLU, in place with ReLU.
        let s = bn_inference(op.0, td(&x), tdm(&mut ya), &affine, &running, null());
        assert_eq!(s, BnStatus::Ok, "{case}: {}", message());
        bn.inference(&x, &mut yr, aff, run).unwrap();
        assert_eq!(bits(&ya), bits(&yr), "{case}: inference");

        ya.fill(E::from_param(ABI_GARBAGE));
        yr.fill(E::from_param(RUST_GARBAGE));
        let s = bn_inference(op.0, td(&x), tdm(&mut ya), &affine, &running, &add_relu);
        assert_eq!(s, BnStatus::Ok, "{case}: {}", message());
        bn.inference_fused(&x, &mut yr, aff, run, Epilogue::AddRelu(&z))
            .unwrap();
        assert_eq!(bits(&ya), bits(&yr), "{case}: inference add relu");

        let (mut xa, mut xr) = (x.clone(), x.clone());
        let s = bn_inference_in_place(op.0, tdm(&mut xa), &affine, &running, &relu);
        assert_eq!(s, BnStatus::Ok, "{case}: {}", message());
        bn.inference_fused_in_place(&mut xr, aff, run, Epilogue::Relu)
            .unwrap();
        assert_eq!(bits(&xa), bits(&xr), "{case}: inference in place");

        // Training with the saved statistics and PyTorch's running update, then fused.
        let nan = vec![f32::NAN; c];
        let (mut ma, mut ia, mut rma, mut rva) =
            (nan.clone(), nan.clone(), rmean.clone(), rvar.clone());
        let (mut mr, mut ir, mut rmr, mut rvr) =
            (vec![9.0; c], vec![9.0; c], rmean.clone(), rvar.clone());
        ya.fill(E::from_param(ABI_GARBAGE));
        yr.fill(E::from_param(RUST_GARBAGE));
        let saved = BnSavedMut {
            mean: tm(&mut ma),
            inv_std: tm(&mut ia),
        };
        let update = BnUpdate {
            mean: tm(&mut rma),
            var: tm(&mut rva),
            convention: BN_CONVENTION_PYTORCH,
            momentum_kind: 0,
            momentum: 0.0,
            batches_tracked: 0,
            unbiased: 0,
        };
        let s = bn_training(op.0, td(&x), tdm(&mut ya), &affine, &saved, &update, null());
        assert_eq!(s, BnStatus::Ok, "{case}: {}", message());
        let saved_r = SavedStatsMut {
            mean: &mut mr,
            inv_std: &mut ir,
        };
        let update_r = RunningUpdate::pytorch(&mut rmr, &mut rvr);
        bn.training(&x, &mut yr, aff, Some(saved_r), Some(update_r))
            .unwrap();
        assert_eq!(bits(&ya), bits(&yr), "{case}: training y");
        assert_eq!(f32_bits(&ma), f32_bits(&mr), "{case}: saved mean");
        assert_eq!(f32_bits(&ia), f32_bits(&ir), "{case}: saved inv std");
        assert_eq!(f32_bits(&rma), f32_bits(&rmr), "{case}: running mean");
        assert_eq!(f32_bits(&rva), f32_bits(&rvr), "{case}: running var");

        let (mut yfa, mut yfr) = (garbage::<E>(len, ABI_GARBAGE), garbage(len, RUST_GARBAGE));
        let s = bn_training(
            op.0,
            td(&x),
            tdm(&mut yfa),
            &affine,
            null(),
            null(),
            &add_relu,
        );
        assert_eq!(s, BnStatus::Ok, "{case}: {}", message());
        bn.training_fused(&x, &mut yfr, aff, None, None, Epilogue::AddRelu(&z))
            .unwrap();
        assert_eq!(bits(&yfa), bits(&yfr), "{case}: training add relu");

        // Backward with the saved statistics (dγ, dβ overwritten), with frozen statistics, fused
        // with add + ReLU (the mask from the fused forward's output), and in place.
        let stats = BnBackwardStats {
            mode: BN_BACKWARD_TRAINING,
            mean: t(&ma),
            second: t(&ia),
        };
        let mode = BackwardMode::Training(SavedStats {
            mean: &mr,
            inv_std: &ir,
        });
        let (mut dxa, mut dxr) = (garbage::<E>(len, ABI_GARBAGE), garbage(len, RUST_GARBAGE));
        let (mut dga, mut dba) = (nan.clone(), nan.clone());
        let (mut dgr, mut dbr) = (vec![9.0; c], vec![9.0; c]);
        let grads = BnGrads {
            dgamma: tm(&mut dga),
            dbeta: tm(&mut dba),
            accumulate: 0,
        };
        let s = bn_backward(
            op.0,
            td(&x),
            td(&dy),
            tdm(&mut dxa),
            &affine,
            &stats,
            &grads,
            null(),
        );
        assert_eq!(s, BnStatus::Ok, "{case}: {}", message());
        let grads_r = ParamGrads {
            dgamma: &mut dgr,
            dbeta: &mut dbr,
            mode: GradMode::Overwrite,
        };
        bn.backward(&x, &dy, &mut dxr, aff, mode, Some(grads_r))
            .unwrap();
        assert_eq!(bits(&dxa), bits(&dxr), "{case}: backward dx");
        assert_eq!(f32_bits(&dga), f32_bits(&dgr), "{case}: dgamma");
        assert_eq!(f32_bits(&dba), f32_bits(&dbr), "{case}: dbeta");

        let frozen = BnBackwardStats {
            mode: BN_BACKWARD_FROZEN,
            mean: t(&rmean),
            second: t(&rvar),
        };
        dxa.fill(E::from_param(ABI_GARBAGE));
        dxr.fill(E::from_param(RUST_GARBAGE));
        let s = bn_backward(
            op.0,
            td(&x),
            td(&dy),
            tdm(&mut dxa),
            &affine,
            &frozen,
            null(),
            null(),
        );
        assert_eq!(s, BnStatus::Ok, "{case}: {}", message());
        bn.backward(&x, &dy, &mut dxr, aff, BackwardMode::Frozen(run), None)
            .unwrap();
        assert_eq!(bits(&dxa), bits(&dxr), "{case}: frozen backward dx");

        dxa.fill(E::from_param(ABI_GARBAGE));
        dxr.fill(E::from_param(RUST_GARBAGE));
        let (mut dza, mut dzr) = (garbage::<E>(len, ABI_GARBAGE), garbage(len, RUST_GARBAGE));
        let bepi = BnBackwardEpilogue {
            kind: BN_EPILOGUE_ADD_RELU,
            y: td(&yfa),
            dz: tdm(&mut dza),
        };
        let s = bn_backward(
            op.0,
            td(&x),
            td(&dy),
            tdm(&mut dxa),
            &affine,
            &stats,
            null(),
            &bepi,
        );
        assert_eq!(s, BnStatus::Ok, "{case}: {}", message());
        let fused = BackwardEpilogue::AddRelu {
            y: &yfr,
            dz: &mut dzr,
        };
        bn.backward_fused(&x, &dy, &mut dxr, aff, mode, None, fused)
            .unwrap();
        assert_eq!(bits(&dxa), bits(&dxr), "{case}: backward add relu dx");
        assert_eq!(bits(&dza), bits(&dzr), "{case}: backward add relu dz");

        let (mut ba, mut br) = (dy.clone(), dy.clone());
        let s = bn_backward_in_place(op.0, td(&x), tdm(&mut ba), &affine, &stats, null());
        assert_eq!(s, BnStatus::Ok, "{case}: {}", message());
        bn.backward_in_place(&x, &mut br, aff, mode, None).unwrap();
        assert_eq!(bits(&ba), bits(&br), "{case}: backward in place");

        // Statistics.
        let (mut count, mut mean, mut m2) = (vec![0u64; c], vec![f64::NAN; c], vec![f64::NAN; c]);
        let out = BnStatsOut {
            count: count.as_mut_ptr(),
            mean: mean.as_mut_ptr(),
            m2: m2.as_mut_ptr(),
            len: c,
        };
        let s = bn_statistics(op.0, td(&x), &out);
        assert_eq!(s, BnStatus::Ok, "{case}: {}", message());
        let want = bn.statistics(&x).unwrap();
        for (i, w) in want.channels().iter().enumerate() {
            assert_eq!(count[i], w.count(), "{case}: count {i}");
            assert_eq!(mean[i].to_bits(), w.mean().to_bits(), "{case}: mean {i}");
            assert_eq!(m2[i].to_bits(), w.m2().to_bits(), "{case}: m2 {i}");
        }
    }
}

#[test]
fn half_data_through_the_abi_is_bit_identical_to_the_rust_api() {
    for shape in [(3, 5, 7), (2, 19, 37)] {
        for layout in [Layout::Nchw, Layout::Nhwc] {
            for threads in [0, 2] {
                abi_matches_rust::<f16>(shape, layout, threads);
                abi_matches_rust::<bf16>(shape, layout, threads);
            }
        }
    }
}

#[test]
fn unknown_data_type_codes_are_invalid_arguments() {
    // 3 is BN_DTYPE_F64 (`tests/abi_f64.rs`).
    for code in [4, 5, 99, u32::MAX] {
        let mut p = null_mut();
        let d = desc(2, 3, 4, BN_LAYOUT_NCHW, 0, code);
        // SAFETY: valid descriptor and output slot.
        let status = unsafe { bn_create(&d, &mut p) };
        assert_eq!(status, BnStatus::InvalidArgument, "code {code}");
        assert!(p.is_null(), "code {code}");
        let msg = message();
        assert!(
            msg.contains("`dtype`") && msg.contains(&code.to_string()),
            "{msg}"
        );
    }
}

#[test]
fn a_zero_initialised_descriptor_gets_f32_data() {
    // SAFETY: every member of `BnDesc` is an integer or a float, for which all-zero is valid.
    let mut d: BnDesc = unsafe { std::mem::zeroed() };
    (d.n, d.c, d.hw) = (2, 3, 4);
    assert_eq!(d.dtype, BN_DTYPE_F32);
    let op = create(&d);
    let x = fill(24, 1);
    let (mean, var) = ([0.5f32; 3], [2.0f32; 3]);
    let running = BnRunning {
        mean: t(&mean),
        var: t(&var),
    };
    let mut y = vec![f32::NAN; 24];
    // SAFETY: live operator; valid buffers of f32.
    let status = unsafe { bn_inference(op.0, t(&x), tm(&mut y), null(), &running, null()) };
    assert_eq!(status, BnStatus::Ok, "{}", message());
    let bn = BatchNorm::new(Shape::new(2, 3, 4).unwrap(), Layout::Nchw)
        .unwrap()
        .with_eps(0.0)
        .unwrap();
    let mut want = vec![0.0f32; 24];
    let run = RunningStats {
        mean: &mean,
        var: &var,
    };
    bn.inference(&x, &mut want, None, run).unwrap();
    assert_eq!(f32_bits(&y), f32_bits(&want));
}

#[test]
fn lengths_are_counted_in_elements_and_nothing_is_written_on_error() {
    let op = create(&desc(2, 3, 4, BN_LAYOUT_NHWC, 0, BN_DTYPE_F16));
    let x = data::<f16>(24, 1);
    let (mean, var) = ([0.0f32; 3], [1.0f32; 3]);
    let running = BnRunning {
        mean: t(&mean),
        var: t(&var),
    };
    let sentinel = f16::from_f32(7.0);
    let mut y = vec![sentinel; 24];
    let short = BnTensor {
        data: x.as_ptr().cast(),
        len: 23,
    };
    // SAFETY: live operator; every buffer is valid for its length of f16.
    unsafe {
        let s = bn_inference(op.0, short, tdm(&mut y), null(), &running, null());
        assert_eq!(s, BnStatus::LengthMismatch);
        assert!(
            message().contains("`x`") && message().contains("23"),
            "{}",
            message()
        );
        // 12: the number of floats in the 48 bytes of 24 half values. Lengths count elements.
        let s = bn_inference(op.0, td(&x), tdm(&mut y[..12]), null(), &running, null());
        assert_eq!(s, BnStatus::LengthMismatch);
        assert!(
            message().contains("`y`") && message().contains("12"),
            "{}",
            message()
        );
    }
    assert!(y.iter().all(|&v| v == sentinel));
    // Statistics of half data: a wrong length too.
    let (mut count, mut m, mut m2) = ([0u64; 3], [0.0f64; 3], [0.0f64; 3]);
    let out = BnStatsOut {
        count: count.as_mut_ptr(),
        mean: m.as_mut_ptr(),
        m2: m2.as_mut_ptr(),
        len: 3,
    };
    // SAFETY: as above.
    let s = unsafe { bn_statistics(op.0, short, &out) };
    assert_eq!(s, BnStatus::LengthMismatch);
    assert_eq!(count, [0; 3]);
}

#[test]
fn overlap_and_alignment_are_checked_at_the_half_element_size() {
    let op = create(&desc(2, 3, 4, BN_LAYOUT_NCHW, 0, BN_DTYPE_BF16));
    let (mean, var) = ([0.0f32; 3], [1.0f32; 3]);
    let running = BnRunning {
        mean: t(&mean),
        var: t(&var),
    };
    let mut buf = data::<bf16>(49, 1);
    let x = buf[..24].to_vec();
    let base = buf.as_mut_ptr();
    // SAFETY (every call below): live operator; each tensor lies inside `buf` (49 bf16), which
    // outlives the calls; the calls that succeed write only `y`, which does not overlap `x`.
    unsafe {
        // x = buf[0..24], y = buf[24..48]: adjacent, no byte in common (with 4-byte elements x
        // would reach into y).
        let (xt, yt) = (
            BnTensor {
                data: base.cast(),
                len: 24,
            },
            BnTensorMut {
                data: base.add(24).cast(),
                len: 24,
            },
        );
        let s = bn_inference(op.0, xt, yt, null(), &running, null());
        assert_eq!(s, BnStatus::Ok, "{}", message());
        let mut want = vec![bf16::ZERO; 24];
        let bn = BatchNorm::new(Shape::new(2, 3, 4).unwrap(), Layout::Nchw).unwrap();
        let run = RunningStats {
            mean: &mean,
            var: &var,
        };
        bn.inference(&x, &mut want, None, run).unwrap();
        assert_eq!(bits(&buf[24..48]), bits(&want));
        // y = buf[23..47]: one element (two bytes) in common with x.
        let yt = BnTensorMut {
            data: base.add(23).cast(),
            len: 24,
        };
        let before = bits(&buf);
        let s = bn_inference(op.0, xt, yt, null(), &running, null());
        assert_eq!(s, BnStatus::InvalidArgument);
        assert!(message().contains("overlap"), "{}", message());
        // x one byte past an element boundary: not aligned for bf16.
        let odd = BnTensor {
            data: base.cast::<u8>().add(1).cast(),
            len: 24,
        };
        let mut y = vec![bf16::from_f32(7.0); 24];
        let s = bn_inference(op.0, odd, tdm(&mut y), null(), &running, null());
        assert_eq!(s, BnStatus::InvalidArgument);
        assert!(
            message().contains("`x`") && message().contains("aligned"),
            "{}",
            message()
        );
        assert_eq!(bits(&buf), before);
        assert!(y.iter().all(|&v| v == bf16::from_f32(7.0)));
    }
}

/// The C test program's f16 case (`tests/c/test_batchnorm.c`), computed by hand: N = 1, C = 2,
/// HW = 2, NCHW, ε = 0. Channel 0: mean 0.5, var 0.25, γ = 1, β = 0.25, so y = 2x − 0.75:
/// 1.0 (0x3C00) → 1.25 (0x3D00), −1.5 (0xBE00) → −3.75 (0xC380). Channel 1: mean 0, var 1,
/// γ = 3, β = 0, so y = 3x: 1 + 2⁻¹⁰ (0x3C01) → 3 + 3·2⁻¹⁰, halfway between the f16 neighbours
/// 3 + 2·2⁻¹⁰ (0x4201) and 3 + 4·2⁻¹⁰ (0x4202), rounded to the even one, 0x4202; 0.5 (0x3800) →
/// 1.5 (0x3E00).
#[test]
fn the_hand_computed_f16_case() {
    let mut d = desc(1, 2, 2, BN_LAYOUT_NCHW, 0, BN_DTYPE_F16);
    d.eps = 0.0;
    let op = create(&d);
    let x: Vec<f16> = [0x3C00, 0xBE00, 0x3C01, 0x3800]
        .map(f16::from_bits)
        .to_vec();
    let (gamma, beta) = ([1.0f32, 3.0], [0.25f32, 0.0]);
    let (mean, var) = ([0.5f32, 0.0], [0.25f32, 1.0]);
    let affine = BnAffine {
        gamma: t(&gamma),
        beta: t(&beta),
    };
    let running = BnRunning {
        mean: t(&mean),
        var: t(&var),
    };
    let mut y = vec![f16::NAN; 4];
    // SAFETY: live operator; valid buffers.
    let s = unsafe { bn_inference(op.0, td(&x), tdm(&mut y), &affine, &running, null()) };
    assert_eq!(s, BnStatus::Ok, "{}", message());
    assert_eq!(bits(&y), [0x3D00, 0xC380, 0x4202, 0x3E00]);
}
