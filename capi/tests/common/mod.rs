//! Helpers shared by the C ABI's Rust tests.

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
