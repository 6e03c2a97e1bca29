//! The crate-private SIMD lane trait, its backends and the runtime dispatch between them.
//!
//! Kernels are written once, generic over [`Simd`]. A backend value (a token, zero-sized or
//! holding the optional instructions detected) can only be obtained once the CPU is known to
//! support its instructions, so every intrinsic call inside a backend is justified by the token's
//! existence. [`Kernel`] bodies are monomorphized inside `#[target_feature]` entry points
//! ([`Backend::dispatch`]) so the whole hot loop is compiled for the selected instruction set, not
//! one vector op at a time.

mod portable;
mod wide64;
#[cfg(target_arch = "x86_64")]
mod x86;

use std::sync::OnceLock;

use crate::Error;

pub(crate) use portable::Portable;
pub(crate) use wide64::{F64, Wide64};
#[cfg(target_arch = "x86_64")]
pub(crate) use x86::{Avx2Fma, Avx2Vl, Avx512};

/// Size of the L1 data cache of the CPU running the process (of its first core), read once
/// from CPUID's cache descriptors (leaf 4 on Intel, 0x8000001D on AMD); 32 KiB where they are
/// missing or implausible, and on other architectures. The streams size their parameter strips by
/// it.
pub(crate) fn l1d_bytes() -> usize {
    static L1D: OnceLock<usize> = OnceLock::new();
    *L1D.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        if let Some(bytes) = x86::l1d_bytes().filter(|b| (16 << 10..=256 << 10).contains(b)) {
            return bytes;
        }
        32 << 10
    })
}

/// Size of the last-level cache of the CPU running the process, read once from CPUID's cache
/// descriptors as [`l1d_bytes`] reads L1 (the host's whole L3 where a virtual machine reports
/// it; between 256 KiB and 1 GiB, else `None`); `None` on other architectures. Outputs of
/// tensors larger than it are stored past the caches.
pub(crate) fn llc_bytes() -> Option<usize> {
    static LLC: OnceLock<Option<usize>> = OnceLock::new();
    *LLC.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        return x86::llc_bytes().filter(|b| (256 << 10..=1 << 30).contains(b));
        #[allow(unreachable_code)]
        None
    })
}

/// Whether the CPU running the process executes AVX-512 in 256-bit halves with a slow 512-bit
/// conversion to binary16 (AMD Zen 4, read once from CPUID; `false` on other architectures):
/// there [`Backend::for_splat_f16`] runs f16 data's one-channel elementwise passes 256 bits wide,
/// and [`Backend::dispatch_f16_rows`] its NHWC normalize over rows of up to 64 channels.
pub(crate) fn half_width_avx512() -> bool {
    static HALF: OnceLock<bool> = OnceLock::new();
    *HALF.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        return x86::half_width_avx512();
        #[allow(unreachable_code)]
        false
    })
}

/// Longest lane period of NHWC rows that [`Backend::dispatch_f16_rows`] runs on [`Avx2Vl`]: the
/// 64 values that AVX-512 holds in a register group of 4 vectors, 8 vectors there.
pub(crate) const HALF_WIDTH_PERIOD: usize = 64;

/// Largest lane count of any backend (AVX-512: 16 × f32).
pub(crate) const MAX_LANES: usize = 16;

/// The scalar type of the kernels' lanes: `f32` (f32, f16 and bf16 data) or `f64` (f64 data).
/// Public only in name (this module is private): [`crate::Element::Param`] is bounded by it.
pub trait Real:
    Copy
    + Default
    + PartialEq
    + PartialOrd
    + std::fmt::Debug
    + Send
    + Sync
    + 'static
    + crate::scratch::Zeroable
    + Into<f64>
    + std::ops::Add<Output = Self>
    + std::ops::Sub<Output = Self>
    + std::ops::Mul<Output = Self>
{
    /// Zero.
    const ZERO: Self;
    /// Whether the lanes are as wide as the f64 accumulators (f64): the statistics then correct
    /// their first pass's mean by the mean deviation of the second pass.
    const WIDE: bool;
    /// The value rounded to this type (to nearest).
    fn from_f64(x: f64) -> Self;
    /// A backend token `B` computing in lanes of this type: `B` itself for f32, [`F64`] of it
    /// for f64.
    type On<B: Wide64>: Simd<T = Self>;
    /// `b` computing in lanes of this type.
    fn on<B: Wide64>(b: B) -> Self::On<B>;
}

impl Real for f32 {
    const ZERO: f32 = 0.0;
    const WIDE: bool = false;
    #[inline(always)]
    fn from_f64(x: f64) -> f32 {
        x as f32
    }
    type On<B: Wide64> = B;
    #[inline(always)]
    fn on<B: Wide64>(b: B) -> B {
        b
    }
}

impl Real for f64 {
    const ZERO: f64 = 0.0;
    const WIDE: bool = true;
    #[inline(always)]
    fn from_f64(x: f64) -> f64 {
        x
    }
    type On<B: Wide64> = F64<B>;
    #[inline(always)]
    fn on<B: Wide64>(b: B) -> F64<B> {
        F64(b)
    }
}

/// A SIMD instruction set as seen by the kernels: a vector of `LANES` values of the lane type
/// [`Simd::T`] (f32 on the backends' own tokens, f64 on [`F64`]) and the handful of operations
/// batch normalization needs.
///
/// Implementations must be `#[inline(always)]` so that they inline into the target-feature entry
/// point that runs the kernel.
pub trait Simd: Copy + Send + Sync + 'static {
    /// Number of lanes in [`Simd::V`].
    const LANES: usize;
    /// How many [`Simd::V`] the register file holds (32 on AVX-512, 16 on AVX2; half as many
    /// f64 vectors, each two native registers): what register-blocked kernels size their groups
    /// by.
    const REGISTERS: usize;
    /// The lane type.
    type T: Real;
    /// The vector type.
    type V: Copy;

    /// Runs `k` in an entry point of its own, compiled for this token's instruction set (its
    /// `#[target_feature]` function; the portable backend's is a plain one), never inlined into
    /// an unoptimized caller. [`Wide64::vectorize`] runs kernels this way, and a kernel that picks
    /// one of several compile-time variants or paths at run time enters the one it picked, so
    /// that an unoptimized build, which keeps every inlined local in the frame of the function it
    /// was inlined into, holds one variant's locals on the stack instead of all of them.
    /// Optimized builds lose at most a call per entry.
    fn enter<K: Thunk>(self, k: K) -> K::Output;

    fn splat(self, x: Self::T) -> Self::V;
    /// Loads `LANES` values from `p`.
    ///
    /// # Safety
    /// `p` must be valid for reading `LANES` consecutive values.
    unsafe fn load_ptr(self, p: *const Self::T) -> Self::V;
    /// Stores `LANES` values to `p`.
    ///
    /// # Safety
    /// `p` must be valid for writing `LANES` consecutive values.
    unsafe fn store_ptr(self, p: *mut Self::T, v: Self::V);
    /// Stores `LANES` values to `p` past the caches where the backend can (a non-temporal
    /// store: the line is not read before it is written, nor kept), for outputs too large to stay
    /// in the last-level cache. Such stores are weakly ordered: the writer calls
    /// [`Simd::stream_fence`] after its last one. The default is [`Simd::store_ptr`].
    ///
    /// # Safety
    /// `p` must be valid for writing `LANES` consecutive values and aligned to `LANES` values.
    #[inline(always)]
    unsafe fn store_stream_ptr(self, p: *mut Self::T, v: Self::V) {
        // SAFETY: forwarded to the caller.
        unsafe { self.store_ptr(p, v) }
    }
    /// Orders the [`Simd::store_stream_ptr`] stores before any later store (`sfence` on x86),
    /// so that another thread that sees a later store sees them too. The default does nothing.
    #[inline(always)]
    fn stream_fence(self) {}
    /// Loads `LANES` IEEE binary16 values (their bits) from `p`, widened to f32 (exact).
    ///
    /// # Safety
    /// `p` must be valid for reading `LANES` consecutive `u16`.
    unsafe fn load_f16_ptr(self, p: *const u16) -> Self::V;
    /// Stores the lanes of `v` rounded to binary16 (to nearest, ties to even) at `p`.
    ///
    /// # Safety
    /// `p` must be valid for writing `LANES` consecutive `u16`.
    unsafe fn store_f16_ptr(self, p: *mut u16, v: Self::V);
    /// [`Simd::store_f16_ptr`] past the caches where the backend can (as
    /// [`Simd::store_stream_ptr`]); the default stores through the caches.
    ///
    /// # Safety
    /// `p` must be valid for writing `LANES` consecutive `u16` and aligned to `LANES` of them.
    #[inline(always)]
    unsafe fn store_f16_stream_ptr(self, p: *mut u16, v: Self::V) {
        // SAFETY: forwarded to the caller.
        unsafe { self.store_f16_ptr(p, v) }
    }
    /// [`Simd::store_bf16_ptr`] past the caches where the backend can (as
    /// [`Simd::store_stream_ptr`]); the default stores through the caches.
    ///
    /// # Safety
    /// `p` must be valid for writing `LANES` consecutive `u16` and aligned to `LANES` of them.
    #[inline(always)]
    unsafe fn store_bf16_stream_ptr(self, p: *mut u16, v: Self::V) {
        // SAFETY: forwarded to the caller.
        unsafe { self.store_bf16_ptr(p, v) }
    }
    /// Loads `LANES` bfloat16 values (their bits) from `p`, widened to f32 (exact).
    ///
    /// # Safety
    /// `p` must be valid for reading `LANES` consecutive `u16`.
    unsafe fn load_bf16_ptr(self, p: *const u16) -> Self::V;
    /// Stores the lanes of `v` rounded to bfloat16 (to nearest, ties to even; NaN stays a quiet
    /// NaN) at `p`.
    ///
    /// # Safety
    /// `p` must be valid for writing `LANES` consecutive `u16`.
    unsafe fn store_bf16_ptr(self, p: *mut u16, v: Self::V);
    /// Stores `K` vectors rounded to bfloat16 at `p`, `K·LANES` consecutive values, exactly as
    /// `K` calls of [`Simd::store_bf16_ptr`] would: the streams' groups of whole vectors. A
    /// backend whose conversion instruction cannot take every input checks the group once and
    /// converts it in integers otherwise (`Avx512` with AVX512-BF16).
    ///
    /// # Safety
    /// `p` must be valid for writing `K·LANES` consecutive `u16`.
    #[inline(always)]
    unsafe fn store_bf16_group<const K: usize>(self, p: *mut u16, v: [Self::V; K]) {
        for (k, v) in v.into_iter().enumerate() {
            // SAFETY: `k·LANES + LANES ≤ K·LANES` values from `p`, valid per the caller.
            unsafe { self.store_bf16_ptr(p.add(k * Self::LANES), v) }
        }
    }
    /// Whether [`Simd::store_bf16_group`] stores a pair of vectors for less than two lone
    /// [`Simd::store_bf16_ptr`]s (`Avx512`: one `vcvtne2ps2bf16` with AVX512-BF16, else one word
    /// permutation per pair), so that runs end on a pair rather than a lone vector
    /// ([`crate::kernels`]' `stream_run`).
    const BF16_PAIR_STORES: bool = false;
    /// Whether [`Simd::load_bf16_pair`] interleaves: lane `j` of vector `h` (0 or 1) holds value
    /// `2·j + h` of the pair. Otherwise the pair is in the plain order (value `h·LANES + j`).
    /// Periodic maps read their parameter lanes permuted the same way for such pairs
    /// ([`crate::kernels`]' paired lanes).
    const BF16_PAIRS_INTERLEAVED: bool = false;
    /// Loads `2·LANES` bfloat16 values (their bits) from `p`, widened to f32 (exact), as two
    /// vectors whose lanes hold them in an order of the backend's choosing, which
    /// [`Simd::store_bf16_pair`] undoes: for maps that treat every lane alike (one channel's
    /// splat parameters), where the order changes nothing. The default is the plain order, two
    /// [`Simd::load_bf16_ptr`].
    ///
    /// # Safety
    /// `p` must be valid for reading `2·LANES` consecutive `u16`.
    #[inline(always)]
    unsafe fn load_bf16_pair(self, p: *const u16) -> [Self::V; 2] {
        // SAFETY: both vectors lie inside the `2·LANES` values the caller guarantees.
        unsafe {
            [
                self.load_bf16_ptr(p),
                self.load_bf16_ptr(p.add(Self::LANES)),
            ]
        }
    }
    /// Stores two vectors in the order of [`Simd::load_bf16_pair`] as `2·LANES` bfloat16 values
    /// at `p`, each rounded as [`Simd::store_bf16_ptr`] rounds it: lane `j` of `v` lands where
    /// lane `j` of the loaded pair came from. The default is the plain order, as
    /// [`Simd::store_bf16_group`].
    ///
    /// # Safety
    /// `p` must be valid for writing `2·LANES` consecutive `u16`.
    #[inline(always)]
    unsafe fn store_bf16_pair(self, p: *mut u16, v: [Self::V; 2]) {
        // SAFETY: forwarded to the caller.
        unsafe { self.store_bf16_group(p, v) }
    }
    /// The first `min(bits.len(), LANES)` binary16 values (bits) widened to f32 in the low lanes,
    /// the others 0. Loaded in registers (masked or piecewise loads), never through a buffer
    /// written one value at a time: a vector load of such a buffer waits for the stores (no
    /// store-to-load forwarding across several stores), about 20 ns per tail.
    fn load_f16_partial(self, bits: &[u16]) -> Self::V;
    /// As [`Simd::load_f16_partial`] for bfloat16.
    fn load_bf16_partial(self, bits: &[u16]) -> Self::V;
    /// The low `min(out.len(), LANES)` lanes of `v` rounded to binary16 as
    /// [`Simd::store_f16_ptr`] does, as bits into `out` (for tails: the same conversion as a
    /// whole vector, then only the lanes inside `out` written).
    fn store_f16_partial(self, out: &mut [u16], v: Self::V);
    /// As [`Simd::store_f16_partial`] for bfloat16.
    fn store_bf16_partial(self, out: &mut [u16], v: Self::V);
    /// Loads `min(s.len(), LANES)` elements into the low lanes, the others set to `fill`.
    fn load_partial(self, s: &[Self::T], fill: Self::T) -> Self::V;
    /// Stores the low `min(s.len(), LANES)` lanes of `v` into `s`.
    fn store_partial(self, s: &mut [Self::T], v: Self::V);
    fn add(self, a: Self::V, b: Self::V) -> Self::V;
    fn sub(self, a: Self::V, b: Self::V) -> Self::V;
    fn mul(self, a: Self::V, b: Self::V) -> Self::V;
    /// `a * b + c`, fused where the backend has FMA.
    fn mul_add(self, a: Self::V, b: Self::V, c: Self::V) -> Self::V;
    /// Lane ones that the optimizer cannot see through, for [`Simd::add_fma`] (made once,
    /// outside the loop that adds).
    #[inline(always)]
    fn ones(self) -> Self::V {
        self.splat(Self::T::from_f64(std::hint::black_box(1.0)))
    }
    /// `a + b`, the same bits as [`Simd::add`], as the multiply-add `a·1 + b` where the backend
    /// fuses them: [`Simd::add_w_fma`] for the lanes of the data, so that a loop whose adds and
    /// conversions crowd the add pipes can move adds to the multiply-add pipes.
    #[inline(always)]
    fn add_fma(self, a: Self::V, one: Self::V, b: Self::V) -> Self::V {
        let _ = one;
        self.add(a, b)
    }
    /// ReLU with x86's `max(0, v)` semantics on every backend: `if 0 > v { 0 } else { v }`, so a
    /// NaN stays NaN (as in PyTorch) and −0 stays −0.
    fn relu(self, v: Self::V) -> Self::V;
    /// `v` where `m > 0`, else 0 (also where `m` is NaN): ReLU's backward through its output.
    fn where_positive(self, v: Self::V, m: Self::V) -> Self::V;
    /// Sum of the lanes (a tree of additions in the lane type).
    fn reduce_add(self, v: Self::V) -> Self::T;
    /// Lane `j` = [`Simd::reduce_add`]`(v[j])` bit for bit, for `j < LANES` (`v[LANES..]` unused):
    /// the sums of many vectors at once, by a transposed tree on the x86 backends (a few
    /// instructions per vector instead of a reduction each).
    #[inline(always)]
    fn reduce_add_each(self, v: &[Self::V; MAX_LANES]) -> Self::V {
        let mut lanes = [Self::T::ZERO; MAX_LANES];
        for (lane, &v) in lanes.iter_mut().zip(v).take(Self::LANES) {
            *lane = self.reduce_add(v);
        }
        // SAFETY: `lanes` holds MAX_LANES ≥ LANES readable values.
        unsafe { self.load_ptr(lanes.as_ptr()) }
    }

    /// `LANES` f64 values: one [`Simd::V`] widened exactly (two native vectors on x86). The
    /// statistics accumulate their first moment in these, so the mean carries no f32 rounding.
    type W: Copy;
    fn splat_w(self, x: f64) -> Self::W;
    /// The lanes of `v` as f64 (exact).
    fn widen(self, v: Self::V) -> Self::W;
    /// Loads `LANES` values from `p`, widened to f64 (exact).
    ///
    /// # Safety
    /// `p` must be valid for reading `LANES` consecutive values.
    unsafe fn load_widen_ptr(self, p: *const Self::T) -> Self::W;
    /// Loads `LANES` binary16 values (bits) from `p`, widened to f64 (exact), as
    /// `widen(load_f16_ptr(p))`. A backend may convert each half of the vector straight to f64
    /// instead (the statistics' first pass: no f32 vector to split).
    ///
    /// # Safety
    /// `p` must be valid for reading `LANES` consecutive `u16`.
    #[inline(always)]
    unsafe fn load_widen_f16_ptr(self, p: *const u16) -> Self::W {
        // SAFETY: forwarded to the caller.
        self.widen(unsafe { self.load_f16_ptr(p) })
    }
    /// As [`Simd::load_widen_f16_ptr`] for bfloat16.
    ///
    /// # Safety
    /// `p` must be valid for reading `LANES` consecutive `u16`.
    #[inline(always)]
    unsafe fn load_widen_bf16_ptr(self, p: *const u16) -> Self::W {
        // SAFETY: forwarded to the caller.
        self.widen(unsafe { self.load_bf16_ptr(p) })
    }
    /// Loads `LANES` f64 values from `p`.
    ///
    /// # Safety
    /// `p` must be valid for reading `LANES` consecutive `f64`.
    unsafe fn load_w_ptr(self, p: *const f64) -> Self::W;
    /// Stores `LANES` f64 values to `p`.
    ///
    /// # Safety
    /// `p` must be valid for writing `LANES` consecutive `f64`.
    unsafe fn store_w_ptr(self, p: *mut f64, v: Self::W);
    fn add_w(self, a: Self::W, b: Self::W) -> Self::W;
    /// f64 ones that the optimizer cannot see through, for [`Simd::add_w_fma`] (made once,
    /// outside the loop that adds).
    #[inline(always)]
    fn ones_w(self) -> Self::W {
        self.splat_w(std::hint::black_box(1.0))
    }
    /// `a + b`, the same bits as [`Simd::add_w`] (`one` from [`Simd::ones_w`]; `a·1` is exact,
    /// so one rounding of `a·1 + b` is the sum's), computed as a multiply-add where the backend
    /// fuses them: on AMD Zen 4 the conversions to f64 and the adds appear to share the add
    /// pipes while the multiply-add pipes idle (inferred from the timings below; no hardware
    /// counters here), and this moves the adds to the latter. The opaque ones keep the
    /// compiler from turning the product back into an add. Measured (one thread, AMD EPYC family
    /// 25 model 17 (Zen 4), a standalone loop widening 4096 f32 values from L1 into f64 sums):
    /// 512-bit conversions 4.0 → 3.8 cycles per 16 values, 256-bit ones 4.0 → 2.5; for the
    /// statistics, see `kernels::moments::first_pass_lanes`. Not measured on Intel cores, whose
    /// 512-bit adds and multiply-adds issue to the same ports.
    #[inline(always)]
    fn add_w_fma(self, a: Self::W, one: Self::W, b: Self::W) -> Self::W {
        let _ = one;
        self.add_w(a, b)
    }
    /// Sum of the f64 lanes.
    fn reduce_add_w(self, v: Self::W) -> f64;
    /// `out[j]` = [`Simd::reduce_add_w`]`(v[j])` bit for bit, for every `j`: the sums of many
    /// f64 vectors at once, by transposed trees on the x86 backends (a few instructions per
    /// vector instead of a reduction each, and no chain of them per vector).
    #[inline(always)]
    fn reduce_add_w_each(self, v: &[Self::W; MAX_LANES]) -> [f64; MAX_LANES] {
        let mut out = [0.0; MAX_LANES];
        for (out, &v) in out.iter_mut().zip(v) {
            *out = self.reduce_add_w(v);
        }
        out
    }

    /// Writes the f64 lanes of `v` to `out[..LANES]`.
    #[inline(always)]
    fn to_lanes_w(self, v: Self::W, out: &mut [f64; MAX_LANES]) {
        // SAFETY: `out` holds MAX_LANES >= LANES writable f64.
        unsafe { self.store_w_ptr(out.as_mut_ptr(), v) }
    }

    /// Loads the first `LANES` elements of `s`; a shorter slice is read as with
    /// [`Simd::load_partial`] with fill 0 (never out of bounds, never a panic).
    #[inline(always)]
    fn load(self, s: &[Self::T]) -> Self::V {
        if s.len() >= Self::LANES {
            // SAFETY: `s` holds at least LANES readable values (checked above).
            unsafe { self.load_ptr(s.as_ptr()) }
        } else {
            self.load_partial(s, Self::T::ZERO)
        }
    }

    /// Stores into the first `LANES` elements of `s`; a shorter slice receives a prefix.
    #[inline(always)]
    fn store(self, s: &mut [Self::T], v: Self::V) {
        if s.len() >= Self::LANES {
            // SAFETY: `s` holds at least LANES writable values (checked above).
            unsafe { self.store_ptr(s.as_mut_ptr(), v) }
        } else {
            self.store_partial(s, v)
        }
    }

    /// Zero in every lane.
    #[inline(always)]
    fn zero(self) -> Self::V {
        self.splat(Self::T::ZERO)
    }

    /// Mask vector: 1.0 in lanes `< valid`, 0.0 elsewhere.
    #[inline(always)]
    fn mask(self, valid: usize) -> Self::V {
        let ones = [Self::T::from_f64(1.0); MAX_LANES];
        self.load_partial(&ones[..valid.min(Self::LANES)], Self::T::ZERO)
    }
}

/// Hints that the cache line holding `p` be brought into L2 (`prefetcht1` on x86-64, nothing
/// elsewhere). Any address may be passed: a prefetch never faults and changes no memory.
#[inline(always)]
pub(crate) fn prefetch_l2(p: *const u8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: SSE is part of x86-64; a prefetch is a hint that neither faults nor accesses
    // memory architecturally, whatever the address.
    unsafe {
        core::arch::x86_64::_mm_prefetch::<{ core::arch::x86_64::_MM_HINT_T1 }>(p.cast())
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// A kernel invocation that can run on any backend: the crate's stand-in for a closure generic
/// over the SIMD type. `run` must be `#[inline(always)]`.
pub trait Kernel {
    /// The lane type the kernel computes in (its storage type's [`crate::Element::Param`]).
    type T: Real;
    type Output;
    fn run<S: Simd<T = Self::T>>(self, s: S) -> Self::Output;
}

/// A call with its arguments, run by [`Simd::enter`]. `call` must be `#[inline(always)]` and
/// call only `#[inline(always)]` code (never a closure, which is compiled apart, without the entry
/// point's instruction set), so that all of it is compiled into the entry point.
pub trait Thunk {
    type Output;
    fn call(self) -> Self::Output;
}

/// The SIMD instruction set the kernels run on.
///
/// [`Backend::detect`] picks the best one this CPU supports, once per process; set the environment
/// variable `BATCHNORM_BACKEND` to `portable`, `avx2` or `avx512` to force one (read once; a backend
/// the CPU lacks is reported by [`Backend::forced`] and ignored by `detect`, never executed).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Backend {
    /// `wide::f32x8`, compiled for whatever target features the crate was built with
    /// (SSE2 pairs in a default x86-64 build; AVX with `-C target-cpu=...`; NEON on aarch64).
    Portable,
    /// 256-bit AVX2 with fused multiply-add (x86-64, runtime-detected).
    Avx2Fma,
    /// 512-bit AVX-512 (x86-64, runtime-detected): AVX-512F, with AVX-512BW and AVX-512VL for
    /// masked 16-bit loads and stores (the tails of f16 / bf16 data). Every AVX-512 CPU since
    /// Skylake-SP has all three; one without BW/VL (Xeon Phi) gets [`Backend::Avx2Fma`].
    ///
    /// On AMD Zen 4, which converts 512-bit vectors to binary16 more slowly than two 256-bit
    /// halves, the NCHW normalize and dx passes of f16 data run on the [`Backend::Avx2Fma`] code,
    /// and the NHWC normalize of f16 rows of up to 64 channels on the same code with AVX-512VL's
    /// 32 registers (the same bits: each lane takes the same operations; AMD EPYC family 25
    /// model 17, 1 MiB L2 per core, one thread, f16 1x64x112x112 inference NCHW 47.9 → 40.7 µs,
    /// NHWC 50.6 → 41.8 µs, backward NCHW 167.9 → 149.1 µs).
    Avx512,
}

impl Backend {
    /// Whether the backend's multiply-add rounds once: the x86 backends always; the portable one
    /// only when the crate was built with FMA (`wide` rounds the product, then the sum, otherwise).
    pub(crate) fn fused_mul_add(self) -> bool {
        match self {
            Backend::Portable => cfg!(target_feature = "fma"),
            Backend::Avx2Fma | Backend::Avx512 => true,
        }
    }

    /// The backend of the elementwise passes over one channel's values (NCHW normalize and dx,
    /// whose lanes all take the same parameters) for data of type `E`: this one, except for f16
    /// data on AVX-512 CPUs that convert 512-bit vectors to binary16 slowly
    /// ([`half_width_avx512`]: AMD Zen 4), where [`Backend::Avx2Fma`] runs them, 256 bits wide.
    /// The results are the same bits: each lane takes the same IEEE operations (one fused
    /// multiply-add, the same rounding to f16) on either backend, from parameters computed on
    /// this one. Measured on AMD EPYC family 25 model 17 (Zen 4, 1 MiB L2 per core), one
    /// thread, f16 NCHW, the whole operation forced to `avx2` against `avx512` (min of 3
    /// alternated processes): inference 1x64x112x112 48.1 → 41.4 µs, 8x64x56x56 95.3 → 80.9;
    /// backward 1x64x112x112 168.6 → 151.0, 8x64x56x56 350.2 → 313.7; statistics on `avx2`
    /// 11–14% slower, so they stay.
    pub(crate) fn for_splat_f16<E: crate::Element>(self) -> Backend {
        if self == Backend::Avx512
            && crate::element::is_f16::<E>()
            && half_width_avx512()
            && Backend::Avx2Fma.is_available()
        {
            Backend::Avx2Fma
        } else {
            self
        }
    }

    /// Runs `k`, the NHWC normalize pass over rows of data of type `E` whose parameter lanes
    /// repeat every `period` values: on [`Avx2Vl`] (the `avx2` code with AVX-512VL's 32
    /// registers) where [`Backend::for_splat_f16`] moves f16 data to 256-bit vectors and the
    /// period is at most [`HALF_WIDTH_PERIOD`] values, whose parameters 8 such vectors hold in
    /// registers; else on this backend. The same bits either way (each lane takes the same
    /// operations). Measured on AMD EPYC family 25 model 17 (Zen 4, 1 MiB L2 per core), one
    /// thread, f16 NHWC inference, min of 5 alternated processes: 1x64x112x112 50.6 → 41.8 µs,
    /// 8x64x56x56 100.0 → 83.8, 32x32x28x28 50.0 → 42.2, 16x16x28x28 12.5 → 10.4; every period
    /// forced onto [`Avx2Vl`] lost on wider rows (1x256x56x56 51.7 → 64.6, 256x2048x1x1 39.5
    /// → 45.1; 8x24x56x56, period 96, 40.0 → 39.2), so they stay. The dx pass stays too: its 5
    /// parameters per vector fill 32 registers at 4 vectors, and two such column walks per
    /// 64-channel row were slower (f16 backward 1x64x112x112 187.8 → 211.7 µs).
    pub(crate) fn dispatch_f16_rows<E: crate::Element, K: Kernel>(
        self,
        period: usize,
        k: K,
    ) -> K::Output {
        #[cfg(target_arch = "x86_64")]
        // `const`: f32, f64 and bf16 rows are never compiled for `Avx2Vl`.
        if const { crate::element::is_f16::<E>() }
            && period <= HALF_WIDTH_PERIOD
            && self.for_splat_f16::<E>() != self
            && let Some(t) = Avx2Vl::try_new()
        {
            return t.vectorize(k);
        }
        self.dispatch(k)
    }

    /// Every backend, best first.
    pub const ALL: [Backend; 3] = [Backend::Avx512, Backend::Avx2Fma, Backend::Portable];

    /// Whether this CPU can run the backend.
    pub fn is_available(self) -> bool {
        match self {
            Backend::Portable => true,
            #[cfg(target_arch = "x86_64")]
            Backend::Avx2Fma => Avx2Fma::<false>::try_new().is_some(),
            #[cfg(target_arch = "x86_64")]
            Backend::Avx512 => Avx512::try_new().is_some(),
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// The backends this CPU can run, best first.
    pub fn available() -> Vec<Backend> {
        Self::ALL.into_iter().filter(|b| b.is_available()).collect()
    }

    /// Short lowercase name, as accepted by `BATCHNORM_BACKEND`.
    pub fn name(self) -> &'static str {
        match self {
            Backend::Portable => "portable",
            Backend::Avx2Fma => "avx2",
            Backend::Avx512 => "avx512",
        }
    }

    /// Parses a name as accepted by `BATCHNORM_BACKEND`.
    pub fn from_name(name: &str) -> Option<Backend> {
        Self::ALL.into_iter().find(|b| b.name() == name.trim())
    }

    /// The backend forced by the `BATCHNORM_BACKEND` environment variable (read once):
    /// `None` when unset, `Some(Err(..))` when it names an unknown or unavailable backend.
    pub fn forced() -> Option<Result<Backend, Error>> {
        static FORCED: OnceLock<Option<Result<Backend, Error>>> = OnceLock::new();
        FORCED
            .get_or_init(|| {
                let value = std::env::var("BATCHNORM_BACKEND").ok()?;
                Some(match Backend::from_name(&value) {
                    Some(b) if b.is_available() => Ok(b),
                    Some(b) => Err(Error::BackendUnavailable { backend: b.name() }),
                    None => Err(Error::UnknownBackend { name: value }),
                })
            })
            .clone()
    }

    /// The backend used by default: the one forced by `BATCHNORM_BACKEND` if valid, else the best
    /// available. Detected once per process. (An invalid forced backend makes
    /// [`crate::BatchNorm::new`] return its error; see [`Backend::forced`].)
    pub fn detect() -> Backend {
        static DETECTED: OnceLock<Backend> = OnceLock::new();
        *DETECTED.get_or_init(|| match Backend::forced() {
            Some(Ok(b)) => b,
            _ => Self::available()[0],
        })
    }

    /// Runs `k` on this backend. Callers only hold a `Backend` that passed
    /// [`Backend::is_available`] (checked when a [`crate::BatchNorm`] is configured), and the
    /// token constructors re-check.
    ///
    /// Not `#[inline]`: an inline function is compiled once in every codegen unit that calls it,
    /// and this one holds the portable kernel; with the hint, 1.8 of the library's 9.3 MB of
    /// code were such copies (test profile, x86_64).
    pub(crate) fn dispatch<K: Kernel>(self, k: K) -> K::Output {
        match self {
            #[cfg(target_arch = "x86_64")]
            Backend::Avx2Fma => {
                if let Some(t) = Avx2Fma::<false>::try_new() {
                    return t.vectorize(k);
                }
            }
            #[cfg(target_arch = "x86_64")]
            Backend::Avx512 => {
                if let Some(t) = Avx512::try_new() {
                    return t.vectorize(k);
                }
            }
            _ => {}
        }
        // One call site of the portable kernel, so that it is compiled once (three inlined sites
        // tripled the library's code: 6.5 of its 10 MB of text).
        Portable.vectorize(k)
    }
}

/// Runs `k` on [`Avx2Vl`] where the CPU has it (for tests comparing it with the backends).
#[cfg(test)]
pub(crate) fn on_avx2_vl<K: Kernel>(k: K) -> Option<K::Output> {
    #[cfg(target_arch = "x86_64")]
    return Avx2Vl::try_new().map(|t| t.vectorize(k));
    #[allow(unreachable_code)]
    {
        let _ = k;
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bits of `count` distinct half values (f16 and bf16 alike: small normal numbers, each
    /// exactly representable in both, with the sign alternating).
    fn bits(count: usize) -> Vec<u16> {
        (0..count)
            .map(|i| (0x3C00 + 0x40 * i as u16) | if i % 2 == 1 { 0x8000 } else { 0 })
            .collect()
    }

    /// The half tails of one backend, every length from 0 to LANES: the loads fill exactly the
    /// first `n` lanes (the others 0) and the stores write exactly the first `n` values, on
    /// buffers with guard values after them.
    fn half_tails<S: Simd<T = f32>>(s: S) {
        for n in 0..=S::LANES {
            let all = bits(S::LANES + 1);
            let src = &all[..n];
            for bf in [false, true] {
                let widen = |b: u16| {
                    if bf {
                        half::bf16::from_bits(b).to_f32()
                    } else {
                        half::f16::from_bits(b).to_f32()
                    }
                };
                let v = if bf {
                    s.load_bf16_partial(src)
                } else {
                    s.load_f16_partial(src)
                };
                let mut lanes = [f32::NAN; MAX_LANES];
                s.store_partial(&mut lanes, v);
                for (i, &lane) in lanes.iter().enumerate().take(S::LANES) {
                    let want = if i < n { widen(src[i]) } else { 0.0 };
                    assert_eq!(lane.to_bits(), want.to_bits(), "n {n} lane {i} bf16 {bf}");
                }
                // Store a whole vector of known values into the first n of n + 1 slots.
                let full = if bf {
                    s.load_bf16_partial(&all[..S::LANES])
                } else {
                    s.load_f16_partial(&all[..S::LANES])
                };
                let mut out = vec![0xFFFFu16; n + 1];
                if bf {
                    s.store_bf16_partial(&mut out[..n], full);
                } else {
                    s.store_f16_partial(&mut out[..n], full);
                }
                assert_eq!(&out[..n], &all[..n], "n {n} bf16 {bf}");
                assert_eq!(out[n], 0xFFFF, "n {n} bf16 {bf}: wrote past the slice");
            }
        }
    }

    /// Runs [`half_tails`] and [`bf16_groups`] inside a backend's target-feature entry point.
    struct HalfConversions;

    impl Kernel for HalfConversions {
        type T = f32;
        type Output = ();
        #[inline(always)]
        fn run<S: Simd<T = f32>>(self, s: S) {
            half_tails(s);
            bf16_groups(s);
        }
    }

    /// Only f16 data on the `avx512` backend of a CPU with slow 512-bit binary16 conversions
    /// moves its one-channel passes to `avx2`; every other type and backend keeps its own.
    #[test]
    fn splat_passes_move_only_f16_on_half_width_avx512() {
        for backend in Backend::ALL {
            assert_eq!(backend.for_splat_f16::<f32>(), backend);
            assert_eq!(backend.for_splat_f16::<f64>(), backend);
            assert_eq!(backend.for_splat_f16::<crate::bf16>(), backend);
            let moved = backend == Backend::Avx512 && half_width_avx512();
            let want = if moved { Backend::Avx2Fma } else { backend };
            assert_eq!(backend.for_splat_f16::<crate::f16>(), want, "{backend:?}");
        }
    }

    /// The lane count and register count of the code a kernel runs on.
    struct Shape;

    impl Kernel for Shape {
        type T = f32;
        type Output = (usize, usize);
        #[inline(always)]
        fn run<S: Simd<T = f32>>(self, _: S) -> (usize, usize) {
            (S::LANES, S::REGISTERS)
        }
    }

    /// Only f16 rows of at most a 64-value lane period on the `avx512` backend of a CPU with slow
    /// 512-bit binary16 conversions run on [`Avx2Vl`] (8 lanes, 32 registers); wider periods,
    /// other types and other backends run on their backend.
    #[test]
    fn rows_move_only_f16_of_short_periods_on_half_width_avx512() {
        for backend in Backend::available() {
            let own = backend.dispatch(Shape);
            let moved = backend == Backend::Avx512 && half_width_avx512();
            let want = if moved { (8, 32) } else { own };
            assert_eq!(backend.dispatch_f16_rows::<crate::f16, _>(64, Shape), want);
            assert_eq!(backend.dispatch_f16_rows::<crate::f16, _>(96, Shape), own);
            assert_eq!(backend.dispatch_f16_rows::<crate::bf16, _>(64, Shape), own);
            assert_eq!(backend.dispatch_f16_rows::<f32, _>(64, Shape), own);
        }
    }

    /// Half tails ([`half_tails`]) and bfloat16 groups ([`bf16_groups`]) on every backend, on
    /// AVX-512's integer conversion also where the CPU has `vcvtne2ps2bf16`, and on the AVX2 code
    /// with AVX-512VL's registers ([`Avx2Vl`]).
    #[test]
    fn half_conversions_on_every_backend() {
        for backend in Backend::available() {
            backend.dispatch(HalfConversions);
        }
        #[cfg(target_arch = "x86_64")]
        if let Some(t) = Avx512::try_new() {
            t.without_bf16_instructions().vectorize(HalfConversions);
        }
        let _ = on_avx2_vl(HalfConversions);
    }

    /// [`Simd::reduce_add_each`] against [`Simd::reduce_add`] of each vector, bit for bit, on
    /// values whose sum depends on the order of the additions (magnitudes from 1e-3 to 1e8 of
    /// both signs), and [`Simd::reduce_add_w_each`] against [`Simd::reduce_add_w`] likewise.
    struct ReduceEach<T>(std::marker::PhantomData<T>);

    /// A value of either sign, `10^(k mod decades − low)·(1 + f)` for a fraction `f` of `bits`
    /// bits, from the xorshift state `seed` (advanced).
    fn spread(seed: &mut u64, decades: u64, low: i32, bits: u32) -> f64 {
        *seed ^= *seed << 13;
        *seed ^= *seed >> 7;
        *seed ^= *seed << 17;
        let scale = 10f64.powi((*seed % decades) as i32 - low);
        let sign = if *seed & 0x100 == 0 { 1.0 } else { -1.0 };
        sign * scale * (1.0 + (*seed >> (64 - bits)) as f64 / (1u64 << bits) as f64)
    }

    impl<T: Real> Kernel for ReduceEach<T> {
        type T = T;
        type Output = ();
        #[inline(always)]
        fn run<S: Simd<T = T>>(self, s: S) {
            let mut seed = 0x2545_F491_4F6C_DD1Du64;
            for round in 0..50 {
                let mut v = [s.zero(); MAX_LANES];
                for (j, v) in v.iter_mut().enumerate() {
                    let mut lanes = [T::ZERO; MAX_LANES];
                    for lane in lanes.iter_mut() {
                        *lane = T::from_f64(spread(&mut seed, 12, 3, 24) + j as f64);
                    }
                    // SAFETY: `lanes` holds MAX_LANES ≥ LANES values.
                    *v = unsafe { s.load_ptr(lanes.as_ptr()) };
                }
                let mut got = [T::ZERO; MAX_LANES];
                // SAFETY: `got` holds MAX_LANES ≥ LANES writable values.
                unsafe { s.store_ptr(got.as_mut_ptr(), s.reduce_add_each(&v)) };
                for (j, &got) in got.iter().enumerate().take(S::LANES) {
                    let want: f64 = s.reduce_add(v[j]).into();
                    let got: f64 = got.into();
                    assert_eq!(got.to_bits(), want.to_bits(), "round {round} vector {j}");
                }
                // The f64 sums, of f64 vectors of values spread over 10 decades (so the order
                // of the additions shows in the bits).
                let mut w = [s.splat_w(0.0); MAX_LANES];
                for (j, w) in w.iter_mut().enumerate() {
                    let mut lanes = [0.0f64; MAX_LANES];
                    for lane in lanes.iter_mut() {
                        *lane = spread(&mut seed, 10, 5, 53);
                    }
                    lanes[0] += j as f64;
                    // SAFETY: `lanes` holds MAX_LANES ≥ LANES f64.
                    *w = unsafe { s.load_w_ptr(lanes.as_ptr()) };
                }
                let got = s.reduce_add_w_each(&w);
                for (j, (&got, &w)) in got.iter().zip(&w).enumerate() {
                    let want = s.reduce_add_w(w);
                    assert_eq!(
                        got.to_bits(),
                        want.to_bits(),
                        "round {round} f64 vector {j}"
                    );
                }
            }
        }
    }

    #[test]
    fn reduce_add_each_and_w_each_match_one_reduction_each_on_every_backend() {
        for backend in Backend::available() {
            backend.dispatch(ReduceEach::<f32>(std::marker::PhantomData));
            backend.dispatch(ReduceEach::<f64>(std::marker::PhantomData));
        }
    }

    /// [`Simd::add_w_fma`] gives [`Simd::add_w`]'s bits, and [`Simd::add_fma`] [`Simd::add`]'s
    /// (every NaN as one value: an FMA may pick another operand's NaN), on every backend, on its
    /// f32 token and its f64 one ([`F64`], whose lanes are the same f64 vectors): values spread
    /// over many decades (so operands in the wrong places, `a·b + 1`, show: checked by making the
    /// x86 backends do that), ±0, subnormals, the largest finite values (whose sums overflow) and
    /// ±∞.
    struct AddFma<T>(std::marker::PhantomData<T>);

    impl<T: Real> Kernel for AddFma<T> {
        type T = T;
        type Output = ();
        #[inline(always)]
        fn run<S: Simd<T = T>>(self, s: S) {
            let special = [
                0.0,
                -0.0,
                f64::from_bits(1),
                -f64::from_bits(3),
                f32::from_bits(1) as f64,
                f64::MAX,
                f32::MAX as f64,
                -(f32::MAX as f64),
                f64::INFINITY,
                f64::NEG_INFINITY,
                f64::NAN,
                1.0,
                -1.0,
            ];
            let mut seed = 0x9E37_79B9_7F4A_7C15u64;
            let one = s.ones_w();
            let bits = |v: f64| if v.is_nan() { 1 } else { v.to_bits() };
            for round in 0..200 {
                let mut lanes = [[0.0f64; MAX_LANES]; 2];
                for (k, lanes) in lanes.iter_mut().enumerate() {
                    for (i, lane) in lanes.iter_mut().enumerate() {
                        *lane = if (round + i + k) % 3 == 0 {
                            special[(round * 7 + i * 3 + k) % special.len()]
                        } else {
                            spread(&mut seed, 40, 20, 53)
                        };
                    }
                }
                // SAFETY: each array holds MAX_LANES ≥ LANES f64.
                let (a, b) = unsafe {
                    (
                        s.load_w_ptr(lanes[0].as_ptr()),
                        s.load_w_ptr(lanes[1].as_ptr()),
                    )
                };
                let (mut got, mut want) = ([0.0; MAX_LANES], [0.0; MAX_LANES]);
                s.to_lanes_w(s.add_w_fma(a, one, b), &mut got);
                s.to_lanes_w(s.add_w(a, b), &mut want);
                for lane in 0..S::LANES {
                    assert_eq!(
                        bits(got[lane]),
                        bits(want[lane]),
                        "round {round} lane {lane}: {} + {}",
                        lanes[0][lane],
                        lanes[1][lane]
                    );
                }
                // The same in the lanes of `T` ([`Simd::add_fma`]), the values rounded to `T`.
                let [a, b] = lanes.map(|v| v.map(T::from_f64));
                let (a, b) = (s.load_partial(&a, T::ZERO), s.load_partial(&b, T::ZERO));
                let (mut got, mut want) = ([T::ZERO; MAX_LANES], [T::ZERO; MAX_LANES]);
                s.store_partial(&mut got, s.add_fma(a, s.ones(), b));
                s.store_partial(&mut want, s.add(a, b));
                for lane in 0..S::LANES {
                    let (g, w): (f64, f64) = (got[lane].into(), want[lane].into());
                    assert_eq!(
                        bits(g),
                        bits(w),
                        "round {round} lane {lane} in {}",
                        std::any::type_name::<T>()
                    );
                }
            }
        }
    }

    #[test]
    fn fma_adds_match_adds_on_every_backend() {
        for backend in Backend::available() {
            backend.dispatch(AddFma::<f32>(std::marker::PhantomData));
            backend.dispatch(AddFma::<f64>(std::marker::PhantomData));
        }
    }

    /// The detected L1 data cache agrees with what Linux reports for the first core, where it
    /// reports one (Linux reads the same CPUID descriptors, also in a VM).
    #[test]
    fn l1d_size_matches_linux_sysfs() {
        let bytes = l1d_bytes();
        assert!((16 << 10..=256 << 10).contains(&bytes), "{bytes}");
        let read = |i: usize, f: &str| {
            std::fs::read_to_string(format!("/sys/devices/system/cpu/cpu0/cache/index{i}/{f}"))
                .map(|s| s.trim().to_string())
        };
        for i in 0..8 {
            let (Ok(level), Ok(kind), Ok(size)) =
                (read(i, "level"), read(i, "type"), read(i, "size"))
            else {
                continue;
            };
            if level == "1" && kind == "Data" {
                let kib: usize = size.trim_end_matches('K').parse().expect("size in KiB");
                assert_eq!(bytes, kib << 10);
            }
        }
    }

    /// f32 bit patterns for the bfloat16 conversion: zeros, subnormals, the normal range's ends,
    /// infinities, NaNs whose payload sits only in the low 16 bits or fills the fraction, ties
    /// (even and odd) and their neighbours, then pseudo-random bits (about one lane in 256 is
    /// subnormal, so about a fifth of the 64-value groups hold one).
    fn bf16_cases() -> Vec<u32> {
        let mut v = vec![
            0x0000_0000,
            0x8000_0000,
            0x0000_0001,
            0x8000_8000,
            0x007F_FFFF,
            0x0000_8000,
            0x0080_0000,
            0x8080_0000,
            0x7F7F_FFFF,
            0xFF7F_FFFF,
            0x7F7F_8000,
            0x7F80_0000,
            0xFF80_0000,
            0x7F80_0001,
            0x7FFF_FFFF,
            0xFFFF_FFFF,
            0x7FC0_0000,
            0x7F80_8000,
            0x3F80_8000,
            0x3F81_8000,
            0x3F80_7FFF,
            0x3F80_8001,
            0xBF81_8000,
            0x3F7F_FFFF,
        ];
        let mut state = 0x2545_F491_4F6C_DD1Du64;
        while v.len() < 64 * 64 {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1);
            v.push((state >> 32) as u32);
        }
        v
    }

    /// The bfloat16 conversion of one backend: groups of 4 vectors (64 values, as the streams
    /// store them), single vectors and pairs in the backend's pair order all equal the scalar
    /// conversion (`half`: to nearest even, a NaN's upper half with the quiet bit set), bit for
    /// bit, on every case.
    fn bf16_groups<S: Simd<T = f32>>(s: S) {
        let cases = bf16_cases();
        let lanes = S::LANES;
        for group in cases.chunks_exact(4 * lanes) {
            let v: [S::V; 4] = std::array::from_fn(|k| {
                let values: Vec<f32> = group[k * lanes..][..lanes]
                    .iter()
                    .map(|&b| f32::from_bits(b))
                    .collect();
                s.load_partial(&values, 0.0)
            });
            let (mut grouped, mut single) = (vec![0u16; 4 * lanes], vec![0u16; 4 * lanes]);
            // SAFETY: both buffers hold 4·LANES values.
            unsafe {
                s.store_bf16_group(grouped.as_mut_ptr(), v);
                for (k, &v) in v.iter().enumerate() {
                    s.store_bf16_ptr(single.as_mut_ptr().add(k * lanes), v);
                }
            }
            for (i, &b) in group.iter().enumerate() {
                let want = half::bf16::from_f32(f32::from_bits(b)).to_bits();
                assert_eq!(grouped[i], want, "group: {b:#010x}");
                assert_eq!(single[i], want, "single: {b:#010x}");
            }
        }
        // The pair order, read off a load of the values 0..2·LANES (exact in bfloat16): lane `j`
        // of vector `h` came from value `order[h·LANES + j]`; it must be a permutation.
        let index: Vec<u16> = (0..2 * lanes)
            .map(|i| half::bf16::from_f32(i as f32).to_bits())
            .collect();
        // SAFETY: `index` holds 2·LANES values.
        let pair = unsafe { s.load_bf16_pair(index.as_ptr()) };
        let mut order = vec![0.0f32; 2 * lanes];
        for (h, &v) in pair.iter().enumerate() {
            s.store_partial(&mut order[h * lanes..][..lanes], v);
        }
        let order: Vec<usize> = order.iter().map(|&i| i as usize).collect();
        let declared: Vec<usize> = (0..2 * lanes)
            .map(|i| {
                let (h, j) = (i / lanes, i % lanes);
                if S::BF16_PAIRS_INTERLEAVED {
                    2 * j + h
                } else {
                    i
                }
            })
            .collect();
        assert_eq!(order, declared, "pair order against BF16_PAIRS_INTERLEAVED");
        let mut sorted = order.clone();
        sorted.sort_unstable();
        assert!(
            sorted.iter().copied().eq(0..2 * lanes),
            "pair order {order:?}"
        );
        // Stored from that order, every case lands in its place, rounded as one value is.
        for group in cases.chunks_exact(2 * lanes) {
            let v: [S::V; 2] = std::array::from_fn(|h| {
                let values: Vec<f32> = order[h * lanes..][..lanes]
                    .iter()
                    .map(|&i| f32::from_bits(group[i]))
                    .collect();
                s.load_partial(&values, 0.0)
            });
            let mut out = vec![0u16; 2 * lanes];
            // SAFETY: `out` holds 2·LANES values.
            unsafe { s.store_bf16_pair(out.as_mut_ptr(), v) };
            for (i, &b) in group.iter().enumerate() {
                let want = half::bf16::from_f32(f32::from_bits(b)).to_bits();
                assert_eq!(out[i], want, "pair: {b:#010x}");
            }
        }
        // Every low half (the bits rounded away) under high halves at the rounding's edges (both
        // parities of the last kept bit, ±0, the largest subnormal and finite values, 1), and no
        // NaN, so that the pair and group stores take their fast paths throughout.
        let highs = [
            0x0000, 0x8000, 0x007F, 0x3F80, 0x3F81, 0x7F7F, 0xFF7E, 0xFF7F,
        ];
        let values: Vec<f32> = highs
            .iter()
            .flat_map(|&h| (0..=0xFFFFu32).map(move |l| f32::from_bits(h << 16 | l)))
            .collect();
        for chunk in values.chunks_exact(2 * lanes) {
            let v: [S::V; 2] = std::array::from_fn(|h| {
                let in_pair_order: Vec<f32> = order[h * lanes..][..lanes]
                    .iter()
                    .map(|&i| chunk[i])
                    .collect();
                s.load_partial(&in_pair_order, 0.0)
            });
            let plain: [S::V; 2] =
                std::array::from_fn(|h| s.load_partial(&chunk[h * lanes..], 0.0));
            let (mut paired, mut grouped) = (vec![0u16; 2 * lanes], vec![0u16; 2 * lanes]);
            // SAFETY: both buffers hold 2·LANES values.
            unsafe {
                s.store_bf16_pair(paired.as_mut_ptr(), v);
                s.store_bf16_group(grouped.as_mut_ptr(), plain);
            }
            for (i, &x) in chunk.iter().enumerate() {
                let want = half::bf16::from_f32(x).to_bits();
                assert_eq!(paired[i], want, "pair: {:#010x}", x.to_bits());
                assert_eq!(grouped[i], want, "group: {:#010x}", x.to_bits());
            }
        }
    }
}
