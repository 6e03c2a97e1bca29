//! Helpers shared by the C ABI's Rust tests.
#![allow(dead_code)] // each test binary uses part of the helpers

use batchnorm_capi::{BnTensor, BnTensorMut};

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
