//! Helpers shared by the C ABI's Rust tests.
#![allow(dead_code)] // each test binary uses part of the helpers

use std::ffi::CStr;
use std::ptr::null_mut;

use batchnorm_capi::{
    BnDesc, BnOp, BnStatus, BnTensor, BnTensorMut, bn_create, bn_destroy, bn_last_error_message,
};

/// The library's message for this thread's last error.
pub fn message() -> String {
    // SAFETY: the library returns a NUL-terminated string valid until the next call.
    unsafe { CStr::from_ptr(bn_last_error_message()) }
        .to_string_lossy()
        .into_owned()
}

/// An operator, destroyed when dropped.
pub struct Op(pub *mut BnOp);

impl Drop for Op {
    fn drop(&mut self) {
        // SAFETY: from `bn_create`, destroyed once.
        unsafe { bn_destroy(self.0) }
    }
}

/// The operator `desc` describes (creation must succeed).
pub fn create(desc: &BnDesc) -> Op {
    let mut p = null_mut();
    // SAFETY: valid descriptor and output slot.
    let status = unsafe { bn_create(desc, &mut p) };
    assert_eq!(status, BnStatus::Ok, "{}", message());
    Op(p)
}

/// A descriptor with ε = 1e-5.
pub fn desc(n: usize, c: usize, hw: usize, layout: u32, threads: usize, dtype: u32) -> BnDesc {
    BnDesc {
        n,
        c,
        hw,
        layout,
        eps: 1e-5,
        threads,
        dtype,
    }
}

/// A read-only ABI tensor over `v`.
pub fn t(v: &[f32]) -> BnTensor {
    BnTensor {
        data: v.as_ptr(),
        len: v.len(),
    }
}

/// A writable ABI tensor over `v`.
pub fn tm(v: &mut [f32]) -> BnTensorMut {
    BnTensorMut {
        data: v.as_mut_ptr(),
        len: v.len(),
    }
}

/// A read-only ABI tensor over data of any element type (`f16` and `bf16` bits go through
/// `BnTensor`'s `float` pointer, as a C caller's cast does).
#[allow(dead_code)] // not every test binary uses it
pub fn td<E>(v: &[E]) -> BnTensor {
    BnTensor {
        data: v.as_ptr().cast(),
        len: v.len(),
    }
}

/// A writable ABI tensor over data of any element type.
#[allow(dead_code)] // not every test binary uses it
pub fn tdm<E>(v: &mut [E]) -> BnTensorMut {
    BnTensorMut {
        data: v.as_mut_ptr().cast(),
        len: v.len(),
    }
}
