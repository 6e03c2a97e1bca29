//! The storage dimension: data tensors of f16 and bf16 run through the same checks as f32, each
//! call's outputs widened back to f32 (exactly) so that one body checks every storage type.

use batchnorm::{Element, bf16, f16};

use crate::{case::Storage, tolerance::*};

/// A half-precision (or f32) storage type as the checker handles it: parameters are f32, and
/// outputs are pre-filled with a signaling NaN of the type.
pub(crate) trait Store: Element<Param = f32> {
    /// A signaling NaN of the type: arithmetic and the conversions quiet every NaN, and the
    /// generated data (f32 values rounded with `from_param`, which quiets NaNs) never hold it.
    fn sentinel() -> Self;
    fn is_sentinel(self) -> bool;
}

/// The f16 sentinel: exponent all ones, quiet bit clear, payload `0x15a`.
pub const F16_SENTINEL_BITS: u16 = 0x7d5a;
/// The bf16 sentinel: the high half of [`SENTINEL_BITS`] (a signaling NaN in bf16 too).
pub const BF16_SENTINEL_BITS: u16 = 0x7fa5;

impl Store for f32 {
    fn sentinel() -> f32 {
        f32::from_bits(SENTINEL_BITS)
    }
    fn is_sentinel(self) -> bool {
        self.to_bits() == SENTINEL_BITS
    }
}

impl Store for f16 {
    fn sentinel() -> f16 {
        f16::from_bits(F16_SENTINEL_BITS)
    }
    fn is_sentinel(self) -> bool {
        self.to_bits() == F16_SENTINEL_BITS
    }
}

impl Store for bf16 {
    fn sentinel() -> bf16 {
        bf16::from_bits(BF16_SENTINEL_BITS)
    }
    fn is_sentinel(self) -> bool {
        self.to_bits() == BF16_SENTINEL_BITS
    }
}

/// The values stored as `E` (exact for data already rounded to `E`).
pub(crate) fn narrow<E: Store>(v: &[f32]) -> Vec<E> {
    v.iter().map(|&x| E::from_param(x)).collect()
}

/// Outputs of type `E` widened to f32 (exact), `E`'s sentinel mapped to the f32 sentinel: every
/// check on f32 outputs (bits, sentinels, same_bits) applies unchanged.
pub(crate) fn widen<E: Store>(v: &[E]) -> Vec<f32> {
    v.iter()
        .map(|&x| {
            if x.is_sentinel() {
                sentinel()
            } else {
                x.to_param()
            }
        })
        .collect()
}

/// `v` rounded once to the storage type and widened back (the sentinel kept): what a half-data
/// output must be, given the f32 op's output on the up-converted data.
pub(crate) fn round_to(storage: Storage, v: f32) -> f32 {
    if v.to_bits() == SENTINEL_BITS {
        return v;
    }
    match storage {
        Storage::F16 => f16::from_f32(v).to_f32(),
        Storage::Bf16 => bf16::from_f32(v).to_f32(),
        Storage::F32 | Storage::F64 => v,
    }
}

/// Runs `$body` with the type alias `$E` set to the element type of a half or f32 storage.
macro_rules! with_store {
    ($storage:expr, $E:ident => $body:expr) => {
        match $storage {
            $crate::case::Storage::F16 => {
                type $E = ::batchnorm::f16;
                $body
            }
            $crate::case::Storage::Bf16 => {
                type $E = ::batchnorm::bf16;
                $body
            }
            $crate::case::Storage::F32 | $crate::case::Storage::F64 => {
                type $E = f32;
                $body
            }
        }
    };
}
pub(crate) use with_store;
