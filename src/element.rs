//! Storage types of the data tensors: how a value is stored, and how the kernels' lanes are
//! loaded from and stored to it.
//!
//! Half-precision data (`half::f16`, `half::bf16`) is converted inside the streaming kernels, a
//! vector at a time (F16C / AVX-512 conversions, integer shifts for bf16, scalar code on the
//! portable backend and in tails): values are widened to f32 exactly on the way in, the
//! arithmetic is the f32 path's, and each output is rounded once to the storage type (IEEE
//! round-to-nearest-even) on the way out. Parameters and statistics stay `f32`.
//!
//! `f64` data runs the same kernels in f64 lanes (the backend's f64 vectors), with `f64`
//! parameters and statistics.

use crate::simd::{MAX_LANES, Real, Simd};

pub use half::{bf16, f16};

mod sealed {
    /// How a storage type is converted (closed set: the crate's kernels know each one).
    #[derive(Clone, Copy, PartialEq, Eq, Debug)]
    pub enum Kind {
        F32,
        F64,
        F16,
        Bf16,
    }

    /// Only the crate implements [`super::Element`].
    pub trait Sealed {
        const KIND: Kind;
    }
}

use sealed::Kind;

/// A storage type of data tensors (x, y, dy, dx, and the residual z of the fused ops): `f32`,
/// `f64`, [`f16`](struct@f16) (IEEE binary16) or [`bf16`] (bfloat16), the latter two re-exported
/// from the `half` crate. Sealed: the kernels convert each type with their own instructions.
///
/// Parameters and statistics (γ, β, running and saved statistics, dγ, dβ) are of type
/// [`Element::Param`]: `f32` for f32, f16 and bf16 data, `f64` for f64 data.
///
/// ```
/// use batchnorm::{Element, f16};
/// assert_eq!(f16::from_f32(1.5).to_f32(), 1.5);
/// assert_eq!(<f16 as Element>::NAME, "f16");
/// let _: <f64 as Element>::Param = 1.0f64;
/// ```
pub trait Element:
    sealed::Sealed
    + crate::driver::Drive<P = <Self as Element>::Param>
    + Copy
    + Default
    + PartialEq
    + Into<f64>
    + std::fmt::Debug
    + Send
    + Sync
    + 'static
{
    /// The type's name (`"f32"`, `"f64"`, `"f16"`, `"bf16"`).
    const NAME: &'static str;
    /// The type of the parameters and statistics that go with this data, and of the lanes the
    /// kernels compute in: `f32`, or `f64` for f64 data.
    type Param: Param;
    /// The value widened to [`Element::Param`] (exact).
    fn to_param(self) -> Self::Param;
    /// `v` rounded to this type (round to nearest, ties to even; overflow gives ±∞, NaN stays NaN).
    fn from_param(v: Self::Param) -> Self;
}

/// A type of parameters and statistics (γ, β, running and saved statistics, dγ, dβ): `f32` or
/// `f64`, the [`Element::Param`] of the data types. It names the parameter type of a
/// [`crate::BatchNormLayer`] in generic code. Sealed: its first supertrait is private to the
/// crate, so only `f32` and `f64` implement it.
///
/// ```
/// use batchnorm::{BatchNormLayer, Layout, Param, Preset};
/// fn running_mean_sum<P: Param>(layer: &BatchNormLayer<P>) -> f64 {
///     layer.running_mean().iter().map(|&m| m.into()).sum()
/// }
/// let layer = BatchNormLayer::<f64>::new(3, Layout::Nchw, Preset::PyTorch)?;
/// assert_eq!(running_mean_sum(&layer), 0.0);
/// # Ok::<(), batchnorm::Error>(())
/// ```
pub trait Param:
    Real + Copy + Default + PartialEq + PartialOrd + Into<f64> + std::fmt::Debug + Send + Sync + 'static
{
}
impl Param for f32 {}
impl Param for f64 {}

impl sealed::Sealed for f32 {
    const KIND: Kind = Kind::F32;
}
impl Element for f32 {
    const NAME: &'static str = "f32";
    type Param = f32;
    #[inline(always)]
    fn to_param(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_param(v: f32) -> f32 {
        v
    }
}

impl sealed::Sealed for f64 {
    const KIND: Kind = Kind::F64;
}
impl Element for f64 {
    const NAME: &'static str = "f64";
    type Param = f64;
    #[inline(always)]
    fn to_param(self) -> f64 {
        self
    }
    #[inline(always)]
    fn from_param(v: f64) -> f64 {
        v
    }
}

impl sealed::Sealed for f16 {
    const KIND: Kind = Kind::F16;
}
impl Element for f16 {
    const NAME: &'static str = "f16";
    type Param = f32;
    #[inline(always)]
    fn to_param(self) -> f32 {
        f16::to_f32(self)
    }
    #[inline(always)]
    fn from_param(v: f32) -> f16 {
        f16::from_f32(v)
    }
}

impl sealed::Sealed for bf16 {
    const KIND: Kind = Kind::Bf16;
}
impl Element for bf16 {
    const NAME: &'static str = "bf16";
    type Param = f32;
    #[inline(always)]
    fn to_param(self) -> f32 {
        bf16::to_f32(self)
    }
    #[inline(always)]
    fn from_param(v: f32) -> bf16 {
        bf16::from_f32(v)
    }
}

/// A number naming `E` (distinct per storage type), for the synchronized ops' descriptor.
pub(crate) fn type_code<E: Element>() -> u8 {
    E::KIND as u8
}

/// Whether `E` is stored as its lane type (f32, f64): no conversion on load or store.
#[inline(always)]
fn is_lane_type<E: Element>() -> bool {
    matches!(E::KIND, Kind::F32 | Kind::F64)
}

/// `x` as a slice of its lane type.
///
/// # Safety
/// `E` must be stored as its lane type ([`is_lane_type`]).
#[inline(always)]
unsafe fn as_lanes<E: Element>(x: &[E]) -> &[E::Param] {
    // SAFETY: the caller guarantees `E` is `E::Param` (f32 or f64 `KIND`).
    unsafe { std::slice::from_raw_parts(x.as_ptr().cast(), x.len()) }
}

/// `LANES` values of type `E` at `p`, as lanes of its parameter type.
///
/// # Safety
/// `p` must be valid for reading `LANES` consecutive `E`.
#[inline(always)]
pub(crate) unsafe fn load<S: Simd<T = E::Param>, E: Element>(s: S, p: *const E) -> S::V {
    // SAFETY: forwarded to the caller; `KIND` names `E`'s layout (the lane type, or 16 bits).
    unsafe {
        match E::KIND {
            Kind::F32 | Kind::F64 => s.load_ptr(p.cast()),
            Kind::F16 => s.load_f16_ptr(p.cast()),
            Kind::Bf16 => s.load_bf16_ptr(p.cast()),
        }
    }
}

/// Stores the lanes of `v` at `p`, each rounded to `E`.
///
/// # Safety
/// `p` must be valid for writing `LANES` consecutive `E`.
#[inline(always)]
pub(crate) unsafe fn store<S: Simd<T = E::Param>, E: Element>(s: S, p: *mut E, v: S::V) {
    // SAFETY: forwarded to the caller; `KIND` names `E`'s layout (the lane type, or 16 bits).
    unsafe {
        match E::KIND {
            Kind::F32 | Kind::F64 => s.store_ptr(p.cast(), v),
            Kind::F16 => s.store_f16_ptr(p.cast(), v),
            Kind::Bf16 => s.store_bf16_ptr(p.cast(), v),
        }
    }
}

/// Stores the lanes of `v` at `p` as [`store`] does, past the caches where the backend can
/// ([`Simd::store_stream_ptr`], [`Simd::store_f16_stream_ptr`], [`Simd::store_bf16_stream_ptr`]).
///
/// # Safety
/// As [`store`]; `p` must also be aligned to `LANES` values.
#[inline(always)]
pub(crate) unsafe fn store_stream<S: Simd<T = E::Param>, E: Element>(s: S, p: *mut E, v: S::V) {
    // SAFETY: forwarded to the caller; `KIND` names `E`'s layout.
    unsafe {
        match E::KIND {
            Kind::F32 | Kind::F64 => s.store_stream_ptr(p.cast(), v),
            Kind::F16 => s.store_f16_stream_ptr(p.cast(), v),
            Kind::Bf16 => s.store_bf16_stream_ptr(p.cast(), v),
        }
    }
}

/// Whether `E` is IEEE binary16 (whose conversions some CPUs run faster 256 bits wide:
/// [`crate::simd::Backend::for_splat_f16`]). A `const fn`, so that a `const` block of it leaves the
/// other types' instantiations out of the f16-only code paths.
#[inline(always)]
pub(crate) const fn is_f16<E: Element>() -> bool {
    matches!(E::KIND, Kind::F16)
}

/// Whether `E` is bfloat16 (whose pairs may load in another order, [`load_pair`]).
#[inline(always)]
pub(crate) fn is_bf16<E: Element>() -> bool {
    E::KIND == Kind::Bf16
}

/// Whether [`load_pair`] of `E` on `S` loads in another order than two [`load`]s: bfloat16 on a
/// backend whose pairs interleave ([`Simd::BF16_PAIRS_INTERLEAVED`]).
#[inline(always)]
pub(crate) fn pairs_reordered<S: Simd, E: Element>() -> bool {
    S::BF16_PAIRS_INTERLEAVED && is_bf16::<E>()
}

/// `2·LANES` values of type `E` at `p` as two vectors, in [`Simd::load_bf16_pair`]'s order for
/// bfloat16 and in order otherwise: for maps that treat every lane alike, whose results
/// [`store_pair`] puts back in place.
///
/// # Safety
/// `p` must be valid for reading `2·LANES` consecutive `E`.
#[inline(always)]
pub(crate) unsafe fn load_pair<S: Simd<T = E::Param>, E: Element>(s: S, p: *const E) -> [S::V; 2] {
    // SAFETY: forwarded to the caller; `KIND` names `E`'s layout.
    unsafe {
        if let Kind::Bf16 = E::KIND {
            return s.load_bf16_pair(p.cast());
        }
        [load(s, p), load(s, p.add(S::LANES))]
    }
}

/// Stores two vectors in [`load_pair`]'s order at `p`, `2·LANES` consecutive values, each
/// rounded to `E` as [`store`] rounds it.
///
/// # Safety
/// `p` must be valid for writing `2·LANES` consecutive `E`.
#[inline(always)]
pub(crate) unsafe fn store_pair<S: Simd<T = E::Param>, E: Element>(s: S, p: *mut E, v: [S::V; 2]) {
    // SAFETY: forwarded to the caller; `KIND` names `E`'s layout.
    unsafe {
        if let Kind::Bf16 = E::KIND {
            return s.store_bf16_pair(p.cast(), v);
        }
        store_group(s, p, v)
    }
}

/// Stores `K` vectors at `p`, `K·LANES` consecutive values, each rounded to `E` as [`store`]
/// rounds it (bfloat16 through [`Simd::store_bf16_group`], which may check the group once).
///
/// # Safety
/// `p` must be valid for writing `K·LANES` consecutive `E`.
#[inline(always)]
pub(crate) unsafe fn store_group<S: Simd<T = E::Param>, E: Element, const K: usize>(
    s: S,
    p: *mut E,
    v: [S::V; K],
) {
    // SAFETY: forwarded to the caller; `KIND` names `E`'s layout.
    unsafe {
        if let Kind::Bf16 = E::KIND {
            return s.store_bf16_group(p.cast(), v);
        }
        for (k, v) in v.into_iter().enumerate() {
            store(s, p.add(k * S::LANES), v);
        }
    }
}

/// The first `min(x.len(), LANES)` values of `x` in the low lanes, the others `fill`. Half
/// values go through the vector conversion (on a padded copy), so a tail converts exactly as a
/// whole vector does.
#[inline(always)]
pub(crate) fn load_partial<S: Simd<T = E::Param>, E: Element>(
    s: S,
    x: &[E],
    fill: E::Param,
) -> S::V {
    let n = x.len().min(S::LANES);
    if is_lane_type::<E>() {
        // SAFETY: `E` is its lane type (checked above).
        return s.load_partial(unsafe { as_lanes(x) }, fill);
    }
    // SAFETY: `E` is a 16-bit type (`KIND`), so the slice is a slice of u16.
    let bits = unsafe { std::slice::from_raw_parts(x.as_ptr().cast::<u16>(), n) };
    let v = match E::KIND {
        Kind::F16 => s.load_f16_partial(bits),
        _ => s.load_bf16_partial(bits),
    };
    if fill == E::Param::ZERO {
        // The padding converted from zero bits is +0.0 (the streams' fill): no blend needed.
        return v;
    }
    let mut lanes = [E::Param::ZERO; MAX_LANES];
    // SAFETY: the array holds MAX_LANES ≥ LANES values.
    unsafe { s.store_ptr(lanes.as_mut_ptr(), v) };
    s.load_partial(&lanes[..n], fill)
}

/// The low `min(out.len(), LANES)` lanes of `v`, rounded to `E`, into `out` (half values through
/// the vector conversion, so a tail rounds exactly as a whole vector does).
#[inline(always)]
pub(crate) fn store_partial<S: Simd<T = E::Param>, E: Element>(s: S, out: &mut [E], v: S::V) {
    if is_lane_type::<E>() {
        // SAFETY: `E` is its lane type (checked above), so the slice is a slice of it.
        let out = unsafe {
            std::slice::from_raw_parts_mut(out.as_mut_ptr().cast::<E::Param>(), out.len())
        };
        return s.store_partial(out, v);
    }
    // SAFETY: `E` is a 16-bit type (`KIND`), so the slice is a slice of u16.
    let out = unsafe { std::slice::from_raw_parts_mut(out.as_mut_ptr().cast::<u16>(), out.len()) };
    match E::KIND {
        Kind::F16 => s.store_f16_partial(out, v),
        _ => s.store_bf16_partial(out, v),
    }
}

/// The first `LANES` values of `x` as lanes; a shorter slice is padded with `fill`.
#[inline(always)]
pub(crate) fn load_padded<S: Simd<T = E::Param>, E: Element>(
    s: S,
    x: &[E],
    fill: E::Param,
) -> S::V {
    if x.len() >= S::LANES {
        // SAFETY: `x` holds at least LANES readable values (checked above).
        unsafe { load(s, x.as_ptr()) }
    } else {
        load_partial(s, x, fill)
    }
}

/// The first `LANES` values of `x` as lanes; a shorter slice is padded with 0 (as
/// [`Simd::load`]).
#[inline(always)]
pub(crate) fn load_slice<S: Simd<T = E::Param>, E: Element>(s: S, x: &[E]) -> S::V {
    load_padded(s, x, E::Param::ZERO)
}

/// `LANES` values of type `E` at `p`, widened to f64 lanes (exact).
///
/// # Safety
/// `p` must be valid for reading `LANES` consecutive `E`.
#[inline(always)]
pub(crate) unsafe fn load_widen_ptr<S: Simd<T = E::Param>, E: Element>(s: S, p: *const E) -> S::W {
    // SAFETY: forwarded to the caller; `KIND` names `E`'s layout (the lane type, or 16 bits).
    unsafe {
        match E::KIND {
            Kind::F32 | Kind::F64 => s.load_widen_ptr(p.cast()),
            Kind::F16 => s.load_widen_f16_ptr(p.cast()),
            Kind::Bf16 => s.load_widen_bf16_ptr(p.cast()),
        }
    }
}

/// The first `LANES` values of `x` widened to f64 lanes (exact); a shorter slice is padded with
/// `fill` (never read out of bounds).
#[inline(always)]
pub(crate) fn load_widen<S: Simd<T = E::Param>, E: Element>(s: S, x: &[E], fill: E::Param) -> S::W {
    if x.len() >= S::LANES {
        // SAFETY: `x` holds at least LANES readable values (checked above).
        unsafe { load_widen_ptr(s, x.as_ptr()) }
    } else {
        s.widen(load_partial(s, x, fill))
    }
}
