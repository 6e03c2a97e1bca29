//! f64 lanes: [`F64`] runs the kernels on a backend's f64 vectors ([`Simd::W`], `LANES` values in
//! two native vectors on x86), so f64 data goes through the same kernel bodies as f32 data.

use super::{Kernel, MAX_LANES, Real, Simd, Thunk};

/// The operations on a backend's f64 vectors ([`Simd::W`]) that [`F64`] needs beyond those of
/// [`Simd`] itself.
pub trait Wide64: Simd<T = f32> {
    /// Runs `k` in its lane type on this token ([`Real::on`]), in an entry point of its own
    /// ([`Simd::enter`]).
    #[inline(always)]
    fn vectorize<K: Kernel>(self, k: K) -> K::Output {
        self.enter(Vectorize(k, self))
    }
    fn sub_w(self, a: Self::W, b: Self::W) -> Self::W;
    fn mul_w(self, a: Self::W, b: Self::W) -> Self::W;
    /// `a * b + c`, fused where the backend has FMA.
    fn mul_add_w(self, a: Self::W, b: Self::W, c: Self::W) -> Self::W;
    /// As [`Simd::relu`].
    fn relu_w(self, v: Self::W) -> Self::W;
    /// As [`Simd::where_positive`].
    fn where_positive_w(self, v: Self::W, m: Self::W) -> Self::W;
    /// Loads `min(s.len(), LANES)` values into the low lanes, the others set to `fill`.
    fn load_partial_w(self, s: &[f64], fill: f64) -> Self::W;
    /// Stores the low `min(s.len(), LANES)` lanes of `v` into `s`.
    fn store_partial_w(self, s: &mut [f64], v: Self::W);
    /// Stores `LANES` f64 values past the caches where the backend can ([`Simd::store_stream_ptr`]
    /// for f64 lanes); the default stores them plainly.
    ///
    /// # Safety
    /// `p` must be valid for writing `LANES` consecutive f64 and aligned to `LANES` f64.
    #[inline(always)]
    unsafe fn store_stream_w_ptr(self, p: *mut f64, v: Self::W) {
        // SAFETY: forwarded to the caller.
        unsafe { self.store_w_ptr(p, v) }
    }
}

/// [`Wide64::vectorize`]'s call: kernel `0` on token `1`, in its lane type.
struct Vectorize<K, B>(K, B);

impl<K: Kernel, B: Wide64> Thunk for Vectorize<K, B> {
    type Output = K::Output;
    #[inline(always)]
    fn call(self) -> K::Output {
        self.0.run(K::T::on(self.1))
    }
}

/// A backend token computing in f64 lanes: `LANES` f64 values per vector (the backend's
/// [`Simd::W`]). Made only from a token, so it inherits the token's proof of the CPU features.
/// Public only in name (this module is private): [`Real::On`] names it.
#[derive(Clone, Copy, Debug)]
pub struct F64<B>(pub B);

impl<B: Wide64> F64<B> {
    /// The lanes of `v` as an array.
    #[inline(always)]
    fn lanes(self, v: B::W) -> [f64; MAX_LANES] {
        let mut a = [0.0; MAX_LANES];
        self.0.to_lanes_w(v, &mut a);
        a
    }
}

/// Half-precision data is never stored in f64 lanes (an element's lanes are its `Param` type:
/// f32 for f16 and bf16), so the half conversions below are plain scalar code, kept only to
/// complete the trait; each rounds once (from f64).
impl<B: Wide64> Simd for F64<B> {
    const LANES: usize = B::LANES;
    const REGISTERS: usize = B::REGISTERS / 2;
    type T = f64;
    type V = B::W;

    #[inline(always)]
    fn enter<K: Thunk>(self, k: K) -> K::Output {
        self.0.enter(k)
    }

    #[inline(always)]
    fn splat(self, x: f64) -> B::W {
        self.0.splat_w(x)
    }
    #[inline(always)]
    unsafe fn load_ptr(self, p: *const f64) -> B::W {
        // SAFETY: forwarded to the caller (LANES readable f64).
        unsafe { self.0.load_w_ptr(p) }
    }
    #[inline(always)]
    unsafe fn store_ptr(self, p: *mut f64, v: B::W) {
        // SAFETY: forwarded to the caller (LANES writable f64).
        unsafe { self.0.store_w_ptr(p, v) }
    }
    #[inline(always)]
    unsafe fn store_stream_ptr(self, p: *mut f64, v: B::W) {
        // SAFETY: forwarded to the caller (LANES writable f64, aligned to LANES f64).
        unsafe { self.0.store_stream_w_ptr(p, v) }
    }
    #[inline(always)]
    fn stream_fence(self) {
        self.0.stream_fence()
    }
    #[inline(always)]
    unsafe fn load_f16_ptr(self, p: *const u16) -> B::W {
        let mut a = [0.0; MAX_LANES];
        for (i, lane) in a.iter_mut().enumerate().take(B::LANES) {
            // SAFETY: the caller guarantees LANES readable u16 at `p`.
            *lane = half::f16::from_bits(unsafe { p.add(i).read_unaligned() }).to_f64();
        }
        self.load(&a[..B::LANES])
    }
    #[inline(always)]
    unsafe fn store_f16_ptr(self, p: *mut u16, v: B::W) {
        // SAFETY: the caller guarantees LANES writable u16 at `p`.
        self.store_f16_partial(unsafe { std::slice::from_raw_parts_mut(p, B::LANES) }, v)
    }
    #[inline(always)]
    unsafe fn load_bf16_ptr(self, p: *const u16) -> B::W {
        let mut a = [0.0; MAX_LANES];
        for (i, lane) in a.iter_mut().enumerate().take(B::LANES) {
            // SAFETY: the caller guarantees LANES readable u16 at `p`.
            *lane = half::bf16::from_bits(unsafe { p.add(i).read_unaligned() }).to_f64();
        }
        self.load(&a[..B::LANES])
    }
    #[inline(always)]
    unsafe fn store_bf16_ptr(self, p: *mut u16, v: B::W) {
        // SAFETY: the caller guarantees LANES writable u16 at `p`.
        self.store_bf16_partial(unsafe { std::slice::from_raw_parts_mut(p, B::LANES) }, v)
    }
    #[inline(always)]
    fn load_f16_partial(self, bits: &[u16]) -> B::W {
        let mut a = [0.0; MAX_LANES];
        for (lane, &b) in a.iter_mut().zip(bits.iter().take(B::LANES)) {
            *lane = half::f16::from_bits(b).to_f64();
        }
        self.load(&a[..B::LANES])
    }
    #[inline(always)]
    fn load_bf16_partial(self, bits: &[u16]) -> B::W {
        let mut a = [0.0; MAX_LANES];
        for (lane, &b) in a.iter_mut().zip(bits.iter().take(B::LANES)) {
            *lane = half::bf16::from_bits(b).to_f64();
        }
        self.load(&a[..B::LANES])
    }
    #[inline(always)]
    fn store_f16_partial(self, out: &mut [u16], v: B::W) {
        let bits = self.lanes(v).map(|x| half::f16::from_f64(x).to_bits());
        let n = out.len().min(B::LANES);
        out[..n].copy_from_slice(&bits[..n]);
    }
    #[inline(always)]
    fn store_bf16_partial(self, out: &mut [u16], v: B::W) {
        let bits = self.lanes(v).map(|x| half::bf16::from_f64(x).to_bits());
        let n = out.len().min(B::LANES);
        out[..n].copy_from_slice(&bits[..n]);
    }
    #[inline(always)]
    fn load_partial(self, s: &[f64], fill: f64) -> B::W {
        self.0.load_partial_w(s, fill)
    }
    #[inline(always)]
    fn store_partial(self, s: &mut [f64], v: B::W) {
        self.0.store_partial_w(s, v)
    }
    #[inline(always)]
    fn add(self, a: B::W, b: B::W) -> B::W {
        self.0.add_w(a, b)
    }
    #[inline(always)]
    fn sub(self, a: B::W, b: B::W) -> B::W {
        self.0.sub_w(a, b)
    }
    #[inline(always)]
    fn mul(self, a: B::W, b: B::W) -> B::W {
        self.0.mul_w(a, b)
    }
    #[inline(always)]
    fn mul_add(self, a: B::W, b: B::W, c: B::W) -> B::W {
        self.0.mul_add_w(a, b, c)
    }
    #[inline(always)]
    fn add_fma(self, a: B::W, one: B::W, b: B::W) -> B::W {
        self.0.add_w_fma(a, one, b)
    }
    #[inline(always)]
    fn relu(self, v: B::W) -> B::W {
        self.0.relu_w(v)
    }
    #[inline(always)]
    fn where_positive(self, v: B::W, m: B::W) -> B::W {
        self.0.where_positive_w(v, m)
    }
    #[inline(always)]
    fn reduce_add(self, v: B::W) -> f64 {
        self.0.reduce_add_w(v)
    }

    type W = B::W;
    #[inline(always)]
    fn splat_w(self, x: f64) -> B::W {
        self.0.splat_w(x)
    }
    #[inline(always)]
    fn widen(self, v: B::W) -> B::W {
        v
    }
    #[inline(always)]
    unsafe fn load_widen_ptr(self, p: *const f64) -> B::W {
        // SAFETY: forwarded to the caller (LANES readable f64).
        unsafe { self.0.load_w_ptr(p) }
    }
    #[inline(always)]
    unsafe fn load_w_ptr(self, p: *const f64) -> B::W {
        // SAFETY: forwarded to the caller (LANES readable f64).
        unsafe { self.0.load_w_ptr(p) }
    }
    #[inline(always)]
    unsafe fn store_w_ptr(self, p: *mut f64, v: B::W) {
        // SAFETY: forwarded to the caller (LANES writable f64).
        unsafe { self.0.store_w_ptr(p, v) }
    }
    #[inline(always)]
    fn add_w(self, a: B::W, b: B::W) -> B::W {
        self.0.add_w(a, b)
    }
    #[inline(always)]
    fn add_w_fma(self, a: B::W, one: B::W, b: B::W) -> B::W {
        self.0.add_w_fma(a, one, b)
    }
    #[inline(always)]
    fn reduce_add_w(self, v: B::W) -> f64 {
        self.0.reduce_add_w(v)
    }
    #[inline(always)]
    fn reduce_add_w_each(self, v: &[B::W; MAX_LANES]) -> [f64; MAX_LANES] {
        self.0.reduce_add_w_each(v)
    }
}
