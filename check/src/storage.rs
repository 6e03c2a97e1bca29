//! The storage dimension: data tensors of f32, f16, bf16 and f64 run through the same checks, each
//! call's outputs (data and parameter-typed alike) widened to f64 (exactly) so that one body
//! checks every storage type.

use batchnorm::{Element, bf16, f16};

use crate::{case::Storage, tolerance::*};

/// A storage type as the checker handles it: the generated f32 arguments converted to its
/// parameter type, and outputs pre-filled with a signaling NaN of the type.
pub(crate) trait Store: Element {
    /// A signaling NaN of the type: arithmetic and the conversions quiet every NaN, and the
    /// generated data (f32 values rounded with `from_param`, which quiets NaNs) never hold it.
    fn sentinel() -> Self;
    fn is_sentinel(self) -> bool;
    /// A generated (f32) parameter as this type's parameter type (exact).
    fn param(v: f32) -> Self::Param;
    /// The parameter type's sentinel, pre-filled into parameter-typed outputs.
    fn param_sentinel() -> Self::Param;
    /// A parameter-typed output widened to f64 (exact), the sentinel mapped to [`sentinel64`].
    fn param_wide(p: Self::Param) -> f64;
}

/// The f16 sentinel: exponent all ones, quiet bit clear, payload `0x15a`.
pub const F16_SENTINEL_BITS: u16 = 0x7d5a;
/// The bf16 sentinel: the high half of [`SENTINEL_BITS`] (a signaling NaN in bf16 too).
pub const BF16_SENTINEL_BITS: u16 = 0x7fa5;

/// An f32 parameter widened, its sentinel mapped to the f64 one.
fn wide32(p: f32) -> f64 {
    if p.to_bits() == SENTINEL_BITS {
        sentinel64()
    } else {
        f64::from(p)
    }
}

macro_rules! store_f32_params {
    ($t:ty, $sentinel:expr, $bits:expr) => {
        impl Store for $t {
            fn sentinel() -> $t {
                $sentinel
            }
            fn is_sentinel(self) -> bool {
                $bits(self) == $bits($sentinel)
            }
            fn param(v: f32) -> f32 {
                v
            }
            fn param_sentinel() -> f32 {
                sentinel()
            }
            fn param_wide(p: f32) -> f64 {
                wide32(p)
            }
        }
    };
}
store_f32_params!(f32, sentinel(), f32::to_bits);
store_f32_params!(f16, f16::from_bits(F16_SENTINEL_BITS), f16::to_bits);
store_f32_params!(bf16, bf16::from_bits(BF16_SENTINEL_BITS), bf16::to_bits);

impl Store for f64 {
    fn sentinel() -> f64 {
        sentinel64()
    }
    fn is_sentinel(self) -> bool {
        self.to_bits() == SENTINEL64_BITS
    }
    fn param(v: f32) -> f64 {
        f64::from(v)
    }
    fn param_sentinel() -> f64 {
        sentinel64()
    }
    fn param_wide(p: f64) -> f64 {
        p
    }
}

/// The values stored as `E` (exact for data already rounded to `E`).
pub(crate) fn narrow<E: Store>(v: &[f32]) -> Vec<E> {
    v.iter().map(|&x| E::from_param(E::param(x))).collect()
}

/// Generated parameters as `E`'s parameter type (exact).
pub(crate) fn params<E: Store>(v: &[f32]) -> Vec<E::Param> {
    v.iter().map(|&x| E::param(x)).collect()
}

/// Outputs of type `E` widened to f64 (exact), `E`'s sentinel mapped to [`sentinel64`]: every
/// check on outputs (bits, sentinels, same_bits) applies unchanged to every storage type.
pub(crate) fn widen<E: Store>(v: &[E]) -> Vec<f64> {
    v.iter()
        .map(|&x| {
            if x.is_sentinel() {
                sentinel64()
            } else {
                E::param_wide(x.to_param())
            }
        })
        .collect()
}

/// Parameter-typed outputs widened to f64 (exact), the sentinel mapped to [`sentinel64`].
pub(crate) fn widen_params<E: Store>(v: &[E::Param]) -> Vec<f64> {
    v.iter().map(|&p| E::param_wide(p)).collect()
}

/// Generated f32 values widened to f64: what an untouched buffer of them widens to.
pub(crate) fn wide(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| f64::from(x)).collect()
}

/// `v` rounded once to the storage type (identity for f32 and f64; the sentinel kept): what a
/// half-data output must be, given the f32 op's output on the up-converted data.
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

/// [`round_to`] of a widened f32 output (exact: `v` holds an f32 value or the sentinel).
pub(crate) fn round_wide(storage: Storage, v: f64) -> f64 {
    match storage {
        Storage::F16 | Storage::Bf16 if v.to_bits() != SENTINEL64_BITS => {
            f64::from(round_to(storage, v as f32))
        }
        _ => v,
    }
}

/// Runs `$body` with the type alias `$E` set to the element type of the storage.
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
            $crate::case::Storage::F32 => {
                type $E = f32;
                $body
            }
            $crate::case::Storage::F64 => {
                type $E = f64;
                $body
            }
        }
    };
}
pub(crate) use with_store;
