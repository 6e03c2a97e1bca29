//! x86-64 backends on `core::arch`: AVX2 + FMA (`__m256`) and AVX-512F (`__m512`), selected at run time.
//!
//! A token can only be constructed by `try_new`, after the CPU was found to support the features,
//! so each intrinsic below is called on a CPU that has it.

use core::arch::x86_64::*;

use super::{MAX_LANES, Simd, Thunk, Wide64};

/// Rounding of the f32 → binary16 conversions: to nearest, ties to even (the immediate's rounding
/// field, not MXCSR's).
const ROUND_NEAREST: i32 = _MM_FROUND_TO_NEAREST_INT;

/// Token proving the CPU supports AVX2, FMA and F16C (every AVX2 CPU has F16C); with `R32`
/// ([`Avx2Vl`]), also AVX-512F and AVX-512VL, whose 32 vector registers the same 256-bit code
/// then has (`Simd::REGISTERS`), compiled in an entry point of its own.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Avx2Fma<const R32: bool = false> {
    _proof: (),
}

/// The AVX2 code with AVX-512VL's 32 registers: 256-bit vectors, 8 f32 lanes, for AVX-512 CPUs
/// whose 512-bit binary16 conversions are slow ([`super::half_width_avx512`]), where register
/// groups of 8 vectors keep 64 channels' parameters in registers.
pub(crate) type Avx2Vl = Avx2Fma<true>;

impl Avx2Vl {
    pub(crate) fn try_new() -> Option<Self> {
        (Avx2Fma::<false>::try_new().is_some()
            && is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512vl"))
        .then_some(Self { _proof: () })
    }
}

impl Avx2Fma<false> {
    pub(crate) fn try_new() -> Option<Self> {
        (is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c"))
        .then_some(Self { _proof: () })
    }
}

impl<const R32: bool> Simd for Avx2Fma<R32> {
    const LANES: usize = 8;
    const REGISTERS: usize = if R32 { 32 } else { 16 };
    const BF16_PAIRS_INTERLEAVED: bool = true;
    type T = f32;
    type V = __m256;

    /// `k` compiled for AVX2, FMA and F16C; with `R32`, also for AVX-512F and AVX-512VL (the
    /// compiler may then use ymm16–31 and EVEX encodings of the same 256-bit operations).
    #[inline]
    fn enter<K: Thunk>(self, k: K) -> K::Output {
        #[target_feature(enable = "avx2,fma,f16c")]
        fn entry<K: Thunk>(k: K) -> K::Output {
            k.call()
        }
        #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl")]
        fn entry_vl<K: Thunk>(k: K) -> K::Output {
            k.call()
        }
        if R32 {
            // SAFETY: `self` exists with `R32`, so AVX2, FMA, F16C, AVX-512F and AVX-512VL were
            // detected on this CPU (`Avx2Vl::try_new`).
            unsafe { entry_vl(k) }
        } else {
            // SAFETY: `self` exists, so AVX2, FMA and F16C were detected on this CPU.
            unsafe { entry(k) }
        }
    }

    #[inline(always)]
    fn splat(self, x: f32) -> __m256 {
        // SAFETY: the token proves AVX is available.
        unsafe { _mm256_set1_ps(x) }
    }
    #[inline(always)]
    unsafe fn load_ptr(self, p: *const f32) -> __m256 {
        // SAFETY: AVX available (token); the caller guarantees 8 readable f32 at `p`.
        unsafe { _mm256_loadu_ps(p) }
    }
    #[inline(always)]
    unsafe fn store_ptr(self, p: *mut f32, v: __m256) {
        // SAFETY: AVX available (token); the caller guarantees 8 writable f32 at `p`.
        unsafe { _mm256_storeu_ps(p, v) }
    }
    #[inline(always)]
    unsafe fn store_stream_ptr(self, p: *mut f32, v: __m256) {
        // SAFETY: AVX available (token); the caller guarantees 8 writable f32 at `p`, 32-byte
        // aligned.
        unsafe { _mm256_stream_ps(p, v) }
    }
    #[inline(always)]
    fn stream_fence(self) {
        // SAFETY: SSE is part of x86-64.
        unsafe { _mm_sfence() }
    }
    #[inline(always)]
    unsafe fn load_f16_ptr(self, p: *const u16) -> __m256 {
        // SAFETY: F16C available (token); the caller guarantees 8 readable u16 (16 bytes) at `p`.
        unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p.cast())) }
    }
    #[inline(always)]
    unsafe fn store_f16_ptr(self, p: *mut u16, v: __m256) {
        // SAFETY: AVX and F16C available (token); the caller guarantees 8 writable u16 at `p`.
        unsafe { _mm_storeu_si128(p.cast(), avx2_f16(v)) }
    }
    #[inline(always)]
    unsafe fn store_f16_stream_ptr(self, p: *mut u16, v: __m256) {
        // SAFETY: AVX and F16C available (token); the caller guarantees 8 writable u16 at `p`,
        // 16-byte aligned.
        unsafe { _mm_stream_si128(p.cast(), avx2_f16(v)) }
    }
    #[inline(always)]
    unsafe fn load_bf16_ptr(self, p: *const u16) -> __m256 {
        // SAFETY: AVX2 available (token); the caller guarantees 8 readable u16 at `p`.
        unsafe { avx2_from_bf16(_mm_loadu_si128(p.cast())) }
    }
    #[inline(always)]
    unsafe fn store_bf16_ptr(self, p: *mut u16, v: __m256) {
        // SAFETY: AVX2 available (token); the caller guarantees 8 writable u16 at `p`.
        unsafe { _mm_storeu_si128(p.cast(), avx2_bf16(v)) }
    }
    #[inline(always)]
    unsafe fn store_bf16_stream_ptr(self, p: *mut u16, v: __m256) {
        // SAFETY: AVX2 available (token); the caller guarantees 8 writable u16 at `p`, 16-byte
        // aligned.
        unsafe { _mm_stream_si128(p.cast(), avx2_bf16(v)) }
    }
    #[inline(always)]
    unsafe fn store_bf16_group<const K: usize>(self, p: *mut u16, v: [__m256; K]) {
        // One unordered compare per pair finds a NaN anywhere in the group; without one (the
        // usual case) the NaN fix-up of every vector is skipped.
        // SAFETY: AVX available (token).
        let any_nan = unsafe {
            let mut nan = _mm256_setzero_ps();
            for pair in v.chunks(2) {
                let unordered = _mm256_cmp_ps::<_CMP_UNORD_Q>(pair[0], pair[pair.len() - 1]);
                nan = _mm256_or_ps(nan, unordered);
            }
            _mm256_testz_ps(nan, nan) == 0
        };
        // Pairs of vectors share one pack and one lane permutation (16 values per store).
        for (j, pair) in v.chunks_exact(2).enumerate() {
            // SAFETY: AVX2 available (token); the caller guarantees `8·K` writable u16 at `p`,
            // and pair `j` writes `16·j..16·j + 16`.
            unsafe {
                let (a, b) = if any_nan {
                    (avx2_bf16_halves(pair[0]), avx2_bf16_halves(pair[1]))
                } else {
                    (avx2_bf16_rounded(pair[0]), avx2_bf16_rounded(pair[1]))
                };
                // Per 128-bit lane: a's 4 values, then b's; then the quadwords reordered to
                // a0..a7, b0..b7.
                let packed = _mm256_packus_epi32(a, b);
                let ordered = _mm256_permute4x64_epi64::<0b11_01_10_00>(packed);
                _mm256_storeu_si256(p.add(16 * j).cast(), ordered);
            }
        }
        if K % 2 == 1 {
            // SAFETY: as above, the last vector's 8 values.
            unsafe { self.store_bf16_ptr(p.add(8 * (K - 1)), v[K - 1]) };
        }
    }
    /// Even-numbered values in the first vector, odd-numbered ones in the second: each 32-bit
    /// word of the load holds one of each, so a shift and a mask widen them, with no shuffle.
    #[inline(always)]
    unsafe fn load_bf16_pair(self, p: *const u16) -> [__m256; 2] {
        // SAFETY: AVX2 available (token); the caller guarantees 16 readable u16 at `p`.
        unsafe {
            let words = _mm256_loadu_si256(p.cast());
            let even = _mm256_slli_epi32::<16>(words);
            let odd = _mm256_and_si256(words, _mm256_set1_epi32(0xFFFF_0000_u32 as i32));
            [_mm256_castsi256_ps(even), _mm256_castsi256_ps(odd)]
        }
    }
    /// Each 32-bit word of the store takes the even value's rounded bits in its low half and
    /// the odd value's in its high half (shifts and word blends, the rounding done once on the
    /// merged words: [`avx2_bf16_rounded_words`]): no pack and no lane permutation.
    #[inline(always)]
    unsafe fn store_bf16_pair(self, p: *mut u16, [even, odd]: [__m256; 2]) {
        // SAFETY: AVX2 available (token); the caller guarantees 16 writable u16 at `p`.
        unsafe {
            let unordered = _mm256_cmp_ps::<_CMP_UNORD_Q>(even, odd);
            let words = if _mm256_testz_ps(unordered, unordered) == 0 {
                avx2_join_high_halves(avx2_bf16_high(even), avx2_bf16_high(odd))
            } else {
                avx2_bf16_rounded_words(even, odd)
            };
            _mm256_storeu_si256(p.cast(), words);
        }
    }
    #[inline(always)]
    fn load_f16_partial(self, bits: &[u16]) -> __m256 {
        // SAFETY: AVX2 and F16C available (token); `load_words` reads inside `bits` only.
        unsafe { _mm256_cvtph_ps(load_words(bits)) }
    }
    #[inline(always)]
    fn load_bf16_partial(self, bits: &[u16]) -> __m256 {
        avx2_from_bf16(load_words(bits))
    }
    #[inline(always)]
    fn store_f16_partial(self, out: &mut [u16], v: __m256) {
        // SAFETY: AVX and F16C available (token); `store_words` writes inside `out` only.
        unsafe { store_words(out, avx2_f16(v)) }
    }
    #[inline(always)]
    fn store_bf16_partial(self, out: &mut [u16], v: __m256) {
        store_words(out, avx2_bf16(v))
    }
    #[inline(always)]
    fn add(self, a: __m256, b: __m256) -> __m256 {
        // SAFETY: the token proves AVX is available.
        unsafe { _mm256_add_ps(a, b) }
    }
    #[inline(always)]
    fn sub(self, a: __m256, b: __m256) -> __m256 {
        // SAFETY: the token proves AVX is available.
        unsafe { _mm256_sub_ps(a, b) }
    }
    #[inline(always)]
    fn mul(self, a: __m256, b: __m256) -> __m256 {
        // SAFETY: the token proves AVX is available.
        unsafe { _mm256_mul_ps(a, b) }
    }
    #[inline(always)]
    fn mul_add(self, a: __m256, b: __m256, c: __m256) -> __m256 {
        // SAFETY: the token proves FMA is available.
        unsafe { _mm256_fmadd_ps(a, b, c) }
    }
    #[inline(always)]
    fn add_fma(self, a: __m256, one: __m256, b: __m256) -> __m256 {
        self.mul_add(a, one, b)
    }
    #[inline(always)]
    fn relu(self, v: __m256) -> __m256 {
        // SAFETY: the token proves AVX is available. MAXPS returns its second operand unless the
        // first is greater: 0 for v < 0, v otherwise (NaN and −0 included).
        unsafe { _mm256_max_ps(_mm256_setzero_ps(), v) }
    }
    #[inline(always)]
    fn where_positive(self, v: __m256, m: __m256) -> __m256 {
        // SAFETY: the token proves AVX is available. An ordered comparison: false for NaN.
        unsafe { _mm256_and_ps(v, _mm256_cmp_ps::<_CMP_GT_OQ>(m, _mm256_setzero_ps())) }
    }
    #[inline(always)]
    fn reduce_add(self, v: __m256) -> f32 {
        // SAFETY: the token proves AVX (and so SSE3) is available.
        unsafe {
            let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
            let odd = _mm_movehdup_ps(s);
            let s = _mm_add_ps(s, odd);
            _mm_cvtss_f32(_mm_add_ss(s, _mm_movehl_ps(odd, s)))
        }
    }
    #[inline(always)]
    fn reduce_add_each(self, v: &[__m256; MAX_LANES]) -> __m256 {
        // `reduce_add`'s tree for all 8 vectors at once: the two 128-bit halves added (pairs
        // of vectors per register), then the adjacent pairs (two horizontal adds), leaving
        // lanes [v0, v2, v4, v6, v1, v3, v5, v7]; one permutation puts lane j on vector j.
        // SAFETY: the token proves AVX and AVX2 (the permutation) are available.
        unsafe {
            let mut h = [_mm256_setzero_ps(); 4];
            for (i, h) in h.iter_mut().enumerate() {
                let (a, b) = (v[2 * i], v[2 * i + 1]);
                let lo = _mm256_permute2f128_ps::<0x20>(a, b);
                let hi = _mm256_permute2f128_ps::<0x31>(a, b);
                *h = _mm256_add_ps(lo, hi);
            }
            let q = _mm256_hadd_ps(_mm256_hadd_ps(h[0], h[1]), _mm256_hadd_ps(h[2], h[3]));
            _mm256_permutevar8x32_ps(q, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7))
        }
    }

    type W = [__m256d; 2];
    #[inline(always)]
    fn splat_w(self, x: f64) -> [__m256d; 2] {
        // SAFETY: the token proves AVX is available.
        unsafe { [_mm256_set1_pd(x); 2] }
    }
    #[inline(always)]
    fn widen(self, v: __m256) -> [__m256d; 2] {
        // SAFETY: the token proves AVX is available.
        unsafe {
            [
                _mm256_cvtps_pd(_mm256_castps256_ps128(v)),
                _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)),
            ]
        }
    }
    #[inline(always)]
    unsafe fn load_widen_ptr(self, p: *const f32) -> [__m256d; 2] {
        // SAFETY: AVX available (token); the caller guarantees 8 readable f32 at `p`.
        unsafe {
            [
                _mm256_cvtps_pd(_mm_loadu_ps(p)),
                _mm256_cvtps_pd(_mm_loadu_ps(p.add(4))),
            ]
        }
    }
    #[inline(always)]
    unsafe fn load_widen_bf16_ptr(self, p: *const u16) -> [__m256d; 2] {
        // Each 4 values interleaved with zero words (the high halves of their f32 lanes), so no
        // 256-bit f32 vector is split by a lane extract. Measured on AMD EPYC family 25 model 1
        // (Zen 3), one thread, min of 7 alternated processes, against `widen(load_bf16_ptr(p))`:
        // bf16 statistics NHWC 1x64x112x112 144.2 → 130.0 µs, NHWC 32x256x14x14 343.1 → 314.0,
        // NCHW 32x256x14x14 351.8 → 338.2, NCHW 1x64x112x112 unchanged (130.4 → 131.8); the same
        // for f16 (two 128-bit `vcvtph2ps`) made NCHW 1x64x112x112 6–7% slower, so f16 keeps the
        // default.
        // SAFETY: AVX2 available (token); the caller guarantees 8 readable u16 at `p`.
        unsafe {
            let words = _mm_loadu_si128(p.cast());
            let zero = _mm_setzero_si128();
            [
                _mm256_cvtps_pd(_mm_castsi128_ps(_mm_unpacklo_epi16(zero, words))),
                _mm256_cvtps_pd(_mm_castsi128_ps(_mm_unpackhi_epi16(zero, words))),
            ]
        }
    }
    #[inline(always)]
    unsafe fn load_w_ptr(self, p: *const f64) -> [__m256d; 2] {
        // SAFETY: AVX available (token); the caller guarantees 8 readable f64 at `p`.
        unsafe { [_mm256_loadu_pd(p), _mm256_loadu_pd(p.add(4))] }
    }
    #[inline(always)]
    unsafe fn store_w_ptr(self, p: *mut f64, v: [__m256d; 2]) {
        // SAFETY: AVX available (token); the caller guarantees 8 writable f64 at `p`.
        unsafe {
            _mm256_storeu_pd(p, v[0]);
            _mm256_storeu_pd(p.add(4), v[1]);
        }
    }
    #[inline(always)]
    fn add_w_fma(self, a: Self::W, one: Self::W, b: Self::W) -> Self::W {
        self.mul_add_w(a, one, b)
    }
    #[inline(always)]
    fn add_w(self, a: [__m256d; 2], b: [__m256d; 2]) -> [__m256d; 2] {
        // SAFETY: the token proves AVX is available.
        unsafe { [_mm256_add_pd(a[0], b[0]), _mm256_add_pd(a[1], b[1])] }
    }
    #[inline(always)]
    fn reduce_add_w(self, v: [__m256d; 2]) -> f64 {
        // SAFETY: the token proves AVX (and so SSE2) is available.
        unsafe {
            let s = _mm256_add_pd(v[0], v[1]);
            let s = _mm_add_pd(_mm256_castpd256_pd128(s), _mm256_extractf128_pd(s, 1));
            _mm_cvtsd_f64(_mm_add_sd(s, _mm_unpackhi_pd(s, s)))
        }
    }
    #[inline(always)]
    fn reduce_add_w_each(self, v: &[[__m256d; 2]; MAX_LANES]) -> [f64; MAX_LANES] {
        // `reduce_add_w`'s tree four vectors at a time: the two halves added, then the 128-bit
        // halves (pairs of vectors per register), then lane 0 + lane 1 (four vectors per
        // register, lanes [a, c, b, d]; one permutation puts them in order).
        let mut out = [0.0; MAX_LANES];
        // SAFETY: the token proves AVX and AVX2 (the permutation) are available; each store
        // writes 4 f64 inside `out` (`4i + 4 ≤ MAX_LANES`).
        unsafe {
            for (i, v) in v.chunks_exact(4).enumerate() {
                // Loops, not closures: a closure may be compiled outside the target-feature
                // entry point, where every intrinsic becomes a call.
                let mut h = [_mm256_setzero_pd(); 2];
                for (k, h) in h.iter_mut().enumerate() {
                    let a = _mm256_add_pd(v[2 * k][0], v[2 * k][1]);
                    let b = _mm256_add_pd(v[2 * k + 1][0], v[2 * k + 1][1]);
                    let lo = _mm256_permute2f128_pd::<0x20>(a, b);
                    let hi = _mm256_permute2f128_pd::<0x31>(a, b);
                    *h = _mm256_add_pd(lo, hi);
                }
                let lo = _mm256_unpacklo_pd(h[0], h[1]);
                let hi = _mm256_unpackhi_pd(h[0], h[1]);
                let sums = _mm256_permute4x64_pd::<0b11_01_10_00>(_mm256_add_pd(lo, hi));
                _mm256_storeu_pd(out.as_mut_ptr().add(4 * i), sums);
            }
        }
        out
    }

    #[inline(always)]
    fn load_partial(self, s: &[f32], fill: f32) -> __m256 {
        let mask = avx2_low_mask(s.len());
        // SAFETY: AVX available (token); the mask enables only the first min(len, 8) lanes, all
        // inside `s`, and masked-off lanes are not accessed.
        unsafe {
            let v = _mm256_maskload_ps(s.as_ptr(), mask);
            _mm256_blendv_ps(_mm256_set1_ps(fill), v, _mm256_castsi256_ps(mask))
        }
    }
    #[inline(always)]
    fn store_partial(self, s: &mut [f32], v: __m256) {
        let mask = avx2_low_mask(s.len());
        // SAFETY: AVX available (token); the mask enables only the first min(len, 8) lanes, all
        // inside `s`, and masked-off lanes are not written.
        unsafe { _mm256_maskstore_ps(s.as_mut_ptr(), mask, v) }
    }
}

/// 8 bfloat16 values (bits) widened to f32 (exact): the 16 bytes copied into both 128-bit lanes
/// (from memory, one `vbroadcasti128` load), then one byte shuffle moves each word into the high
/// half of its lane and zeroes the low half. Measured on AMD EPYC family 25 model 17 (Zen 4), AVX2
/// backend forced, one thread, bf16 1x64x112x112, the builds alternated (4 rounds' minima), against
/// the zero extension and shift (two operations after the load): NCHW inference 104.8–130.6 →
/// 97.0–97.8 µs, NCHW statistics 146.3–151.9 → 121.6–121.8 µs, NHWC backward 259.7–263.9 →
/// 242.2–247.4 µs (and one slow round of 305.8).
#[inline(always)]
fn avx2_from_bf16(bits: __m128i) -> __m256 {
    // SAFETY: AVX2 available (callers hold the token).
    unsafe {
        let spread = _mm256_setr_epi8(
            -1, -1, 0, 1, -1, -1, 2, 3, -1, -1, 4, 5, -1, -1, 6, 7, //
            -1, -1, 8, 9, -1, -1, 10, 11, -1, -1, 12, 13, -1, -1, 14, 15,
        );
        let both = _mm256_broadcastsi128_si256(bits);
        _mm256_castsi256_ps(_mm256_shuffle_epi8(both, spread))
    }
}

/// 8 f32 lanes rounded to binary16 by `vcvtps2ph` (to nearest even, as `_mm256_cvtps_ph` with
/// `ROUND_NEAREST`) into a register. Inline assembly, so that the compiler cannot fold the store
/// that follows into the instruction's memory form, which AMD Zen 4 runs far slower: a stream
/// of 802 816 f16 values through one FMA took 55.7 µs with the memory form and 38.9 µs with the
/// register form and a separate store (a copy of the bytes: 33.6 µs; `avx2` backend,
/// EPYC family 25 model 17). The instruction reads and writes only registers.
///
/// # Safety
/// The CPU must have F16C (the AVX2 token's, which also needs AVX).
#[target_feature(enable = "avx,f16c")]
#[inline]
unsafe fn avx2_f16(v: __m256) -> __m128i {
    let out: __m128i;
    // SAFETY: the caller guarantees F16C; no memory, stack or flags touched.
    unsafe {
        std::arch::asm!(
            "vcvtps2ph {out}, {v}, 0",
            out = lateout(xmm_reg) out,
            v = in(ymm_reg) v,
            options(pure, nomem, nostack, preserves_flags),
        );
    }
    out
}

/// 8 f32 lanes rounded to bfloat16 (to nearest, ties to even; NaN quiet), as 8 × u16.
#[inline(always)]
fn avx2_bf16(v: __m256) -> __m128i {
    // SAFETY: AVX2 available (callers hold the token).
    unsafe {
        // 8 × i32 in 0..=0xFFFF to 8 × u16: packs work per 128-bit lane, then the two lanes' low
        // quadwords are joined.
        let halves = avx2_bf16_halves(v);
        let packed = _mm256_packus_epi32(halves, halves);
        let joined = _mm256_permute4x64_epi64::<0b1000>(packed);
        _mm256_castsi256_si128(joined)
    }
}

/// 8 f32 lanes rounded to bfloat16 (to nearest, ties to even; NaN quiet), each in the low half of
/// its 32-bit lane (the high half zero), ready for an unsigned pack.
#[inline(always)]
fn avx2_bf16_halves(v: __m256) -> __m256i {
    // SAFETY: AVX2 available (callers hold the token).
    unsafe { _mm256_srli_epi32::<16>(avx2_bf16_high(v)) }
}

/// 8 f32 lanes rounded to bfloat16 (to nearest, ties to even; NaN quiet), each in the high half
/// of its 32-bit lane (the low half is left over from the rounding).
#[inline(always)]
fn avx2_bf16_high(v: __m256) -> __m256i {
    // SAFETY: AVX2 available (callers hold the token).
    unsafe {
        // A NaN keeps its high half with the quiet bit set (rounding could carry it into an
        // infinity).
        let quiet = _mm256_or_si256(_mm256_castps_si256(v), _mm256_set1_epi32(0x40_0000));
        let nan = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_UNORD_Q>(v, v));
        _mm256_blendv_epi8(avx2_bf16_rounded_high(v), quiet, nan)
    }
}

/// [`avx2_bf16_halves`] for lanes known not to be NaN.
#[inline(always)]
fn avx2_bf16_rounded(v: __m256) -> __m256i {
    // SAFETY: AVX2 available (callers hold the token).
    unsafe { _mm256_srli_epi32::<16>(avx2_bf16_rounded_high(v)) }
}

/// [`avx2_bf16_high`] for lanes known not to be NaN: round to nearest, ties to even, by adding
/// 0x7FFF plus the lowest kept bit (the carry lands in the high half).
#[inline(always)]
fn avx2_bf16_rounded_high(v: __m256) -> __m256i {
    // SAFETY: AVX2 available (callers hold the token).
    unsafe {
        let bits = _mm256_castps_si256(v);
        let lsb = _mm256_and_si256(_mm256_srli_epi32::<16>(bits), _mm256_set1_epi32(1));
        let bias = _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF));
        _mm256_add_epi32(bits, bias)
    }
}

/// The high 16 bits of each 32-bit lane of `even` in the low half of that lane and those of `odd`
/// in its high half (a shift and a word blend).
#[inline(always)]
fn avx2_join_high_halves(even: __m256i, odd: __m256i) -> __m256i {
    // SAFETY: AVX2 available (callers hold the token).
    unsafe { _mm256_blend_epi16::<0b1010_1010>(_mm256_srli_epi32::<16>(even), odd) }
}

/// [`avx2_bf16_rounded_high`] of `even` and `odd` (no NaN in either), merged into one vector of
/// 16-bit lanes, `even`'s value in the low half of each 32-bit lane and `odd`'s in the high half.
/// The rounding runs once on the merged halves, in 16-bit lanes: the kept high halves `h` and the
/// dropped low halves `l` are each gathered by a shift and a word blend, and `h` goes up by one
/// where `l + lsb(h) + 0x7FFF` carries past 16 bits, i.e. where the saturating sum
/// `l + (lsb(h) + 0x7FFE)` reaches 0xFFFF: the same carry as the 32-bit sum, in 9 operations per
/// 16 values where rounding each vector and merging them takes 10. (The carry read off the top
/// bit of `vpavgw` instead was compiled by LLVM into a widened sum, twice as slow.) Measured on
/// AMD EPYC family 25 model 1 (Zen 3), one thread, min of 7 alternated processes: bf16 inference
/// NCHW 1x64x112x112 86.4 → 84.8 µs, 8x64x56x56 172.7 → 170.7, NHWC 8x64x56x56 201.6 → 193.2,
/// backward NCHW 1x64x112x112 242.0 → 236.1. The same merge in [`Simd::store_bf16_group`] (with
/// a byte shuffle to restore the plain order) gained nothing there.
#[inline(always)]
fn avx2_bf16_rounded_words(even: __m256, odd: __m256) -> __m256i {
    // SAFETY: AVX2 available (callers hold the token).
    unsafe {
        let (e, o) = (_mm256_castps_si256(even), _mm256_castps_si256(odd));
        let high = avx2_join_high_halves(e, o);
        let low = _mm256_blend_epi16::<0b1010_1010>(e, _mm256_slli_epi32::<16>(o));
        let lsb = _mm256_and_si256(high, _mm256_set1_epi16(1));
        let sum = _mm256_adds_epu16(low, _mm256_add_epi16(lsb, _mm256_set1_epi16(0x7FFE)));
        let carry = _mm256_cmpeq_epi16(sum, _mm256_set1_epi16(-1));
        _mm256_sub_epi16(high, carry)
    }
}

/// The first `min(bits.len(), 8)` values of `bits` in the low 16-bit lanes, the others 0: one
/// vector load for 8 values, else at most three scalar loads (2, 4 and 8 bytes, the last piece
/// first, each shifted up before the next), never past the slice and never through a buffer.
#[inline(always)]
fn load_words(bits: &[u16]) -> __m128i {
    let n = bits.len().min(8);
    let p = bits.as_ptr();
    // SAFETY: SSE2 is part of x86-64. Each load reads values `at..at + k` with `at + k ≤ n`,
    // all inside `bits`.
    unsafe {
        if n == 8 {
            return _mm_loadu_si128(p.cast());
        }
        let mut v = _mm_setzero_si128();
        let mut at = n;
        if n & 1 != 0 {
            at -= 1;
            v = _mm_loadu_si16(p.add(at).cast());
        }
        if n & 2 != 0 {
            at -= 2;
            v = _mm_or_si128(_mm_slli_si128::<4>(v), _mm_loadu_si32(p.add(at).cast()));
        }
        if n & 4 != 0 {
            at -= 4;
            v = _mm_or_si128(_mm_slli_si128::<8>(v), _mm_loadu_si64(p.add(at).cast()));
        }
        v
    }
}

/// Writes the low `min(out.len(), 8)` 16-bit lanes of `v` to `out`: one vector store for 8
/// values, else at most three scalar stores (8, 4 and 2 bytes), never past the slice.
#[inline(always)]
fn store_words(out: &mut [u16], v: __m128i) {
    let n = out.len().min(8);
    let p = out.as_mut_ptr();
    // SAFETY: SSE2 is part of x86-64. Each store writes values `at..at + k` with `at + k ≤ n`,
    // all inside `out`.
    unsafe {
        if n == 8 {
            return _mm_storeu_si128(p.cast(), v);
        }
        let (mut v, mut at) = (v, 0);
        if n & 4 != 0 {
            _mm_storeu_si64(p.add(at).cast(), v);
            v = _mm_srli_si128::<8>(v);
            at += 4;
        }
        if n & 2 != 0 {
            _mm_storeu_si32(p.add(at).cast(), v);
            v = _mm_srli_si128::<4>(v);
            at += 2;
        }
        if n & 1 != 0 {
            _mm_storeu_si16(p.add(at).cast(), v);
        }
    }
}

/// Integer mask with the low `n` of 8 lanes set (all ones), for masked loads and stores.
#[inline(always)]
fn avx2_low_mask(n: usize) -> __m256i {
    const WINDOW: [i32; 16] = [-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0];
    let start = 8 - n.min(8);
    // SAFETY: AVX available (callers hold the token); `start + 8 <= 16`, so the 8 lanes read lie
    // inside `WINDOW`.
    unsafe { _mm256_loadu_si256(WINDOW[start..].as_ptr().cast()) }
}

/// The L1 data cache's size from CPUID's deterministic cache parameters (leaf 4 on Intel,
/// 0x8000001D on AMD and Hygon, same layout): ways × partitions × line size × sets of the first
/// level-1 data (or unified) cache listed. `None` where the leaf is missing.
pub(super) fn l1d_bytes() -> Option<usize> {
    data_caches().find_map(|(level, bytes)| (level == 1).then_some(bytes))
}

/// Size of the last-level data or unified cache (the highest level CPUID describes), as
/// [`l1d_bytes`] reads it.
pub(super) fn llc_bytes() -> Option<usize> {
    data_caches()
        .max_by_key(|&(level, _)| level)
        .map(|(_, bytes)| bytes)
}

/// Whether this is an AMD CPU of family 19h with AVX-512F: Zen 4, which runs 512-bit operations
/// as two 256-bit halves and converts a 512-bit vector to binary16 (`vcvtps2ph ymm, zmm`) at
/// less than the rate of two 256-bit conversions. Measured on AMD EPYC family 25 model 17, one
/// thread, a stream of 802 816 f16 values through one FMA (best of 9, 2026-12-06): 47.1 µs with
/// 512-bit vectors, 38.4 µs with 256-bit ones (register form), 59.7 µs with a 512-bit FMA split
/// into two 256-bit conversions; a copy of the bytes 32.9 µs. (Zen 3, also family 19h, has no
/// AVX-512; Zen 5 is family 1Ah, with a full-width datapath.)
pub(super) fn half_width_avx512() -> bool {
    #[allow(unused_unsafe)] // `__cpuid` is an unsafe fn before Rust 1.94 (our MSRV is older).
    // SAFETY: CPUID exists on every x86-64 CPU; leaf 1 is always implemented.
    let signature = unsafe { __cpuid(1) };
    let (base, extended) = ((signature.eax >> 8) & 0xF, (signature.eax >> 20) & 0xFF);
    let family = if base == 0xF { base + extended } else { base };
    // Hygon's CPUs, which `amd_or_hygon` also names, are family 18h.
    amd_or_hygon() && family == 0x19 && is_x86_feature_detected!("avx512f")
}

/// Whether CPUID's vendor is AMD or Hygon ("AuthenticAMD" and "HygonGenuine" start with "Auth"
/// and "Hygo" in EBX of leaf 0), whose cache leaf is 0x8000001D.
fn amd_or_hygon() -> bool {
    #[allow(unused_unsafe)] // `__cpuid` is an unsafe fn before Rust 1.94 (our MSRV is older).
    // SAFETY: CPUID exists on every x86-64 CPU; leaf 0 is always implemented.
    let vendor = unsafe { __cpuid(0) };
    matches!(vendor.ebx, 0x6874_7541 | 0x6F67_7948)
}

/// The data and unified caches CPUID describes (leaf 4 on Intel, 0x8000001D on AMD), as
/// `(level, bytes)`.
fn data_caches() -> impl Iterator<Item = (u32, usize)> {
    #[allow(unused_unsafe)] // `__cpuid` is an unsafe fn before Rust 1.94 (our MSRV is older).
    // SAFETY: CPUID exists on every x86-64 CPU; leaves above the reported maximum are not read.
    let cpuid = |leaf: u32, sub: u32| unsafe { __cpuid_count(leaf, sub) };
    let leaf = if amd_or_hygon() { 0x8000_001D } else { 4 };
    let subleaves = if cpuid(leaf & 0x8000_0000, 0).eax < leaf {
        0
    } else {
        16
    };
    (0..subleaves)
        .map(move |sub| cpuid(leaf, sub))
        .take_while(|r| r.eax & 0x1F != 0)
        .filter_map(|r| {
            let (kind, level) = (r.eax & 0x1F, (r.eax >> 5) & 0x7);
            (kind == 1 || kind == 3).then(|| {
                let ways = (r.ebx >> 22) as usize + 1;
                let partitions = ((r.ebx >> 12) & 0x3FF) as usize + 1;
                let line = (r.ebx & 0xFFF) as usize + 1;
                (level, ways * partitions * line * (r.ecx as usize + 1))
            })
        })
}

/// Token proving the CPU supports AVX-512F, AVX-512BW and AVX-512VL (BW and VL for the masked
/// 16-bit loads and stores of half-precision tails), and whether it has AVX512-BF16 and
/// AVX-512DQ.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Avx512 {
    /// AVX512-BF16 and AVX-512DQ detected: bfloat16 groups are stored with `vcvtne2ps2bf16`,
    /// their inputs checked for subnormals with `vfpclassps` (every CPU with the first has the
    /// second: Cooper Lake, Sapphire Rapids and later, AMD Zen 4 and later).
    bf16: bool,
}

impl Avx512 {
    pub(crate) fn try_new() -> Option<Self> {
        (is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vl"))
        .then(|| Self {
            bf16: is_x86_feature_detected!("avx512bf16") && is_x86_feature_detected!("avx512dq"),
        })
    }

    /// The same token with the bfloat16 instruction left unused even where the CPU has it:
    /// for tests of the integer conversion on such CPUs.
    #[cfg(test)]
    pub(crate) fn without_bf16_instructions(self) -> Self {
        Self { bf16: false }
    }
}

/// 16 bfloat16 values (bits) widened to f32 (exact): each word moved to the high half of its
/// lane, the low half zeroed, in one word permutation whose even indices read word 16, in the
/// zeroed upper half of the source. (The zero-masking form of the same permutation, which LLVM
/// compiled to a permutation and a `vpandq`, one more 512-bit operation per vector, measured on
/// AMD EPYC family 25 model 17 (Zen 4), one thread, bf16 1x64x112x112 inference: NCHW 48.7–56.2
/// → 42.7–43.6 µs, NHWC 50.1–51.8 → 44.2–44.6 µs with the single permutation, the builds
/// alternated, best of 7 rounds, three times each.)
#[inline(always)]
fn avx512_from_bf16(bits: __m256i) -> __m512 {
    // SAFETY: AVX-512F/BW available (callers hold the token).
    unsafe {
        const SPREAD: [i16; 32] = [
            16, 0, 16, 1, 16, 2, 16, 3, 16, 4, 16, 5, 16, 6, 16, 7, //
            16, 8, 16, 9, 16, 10, 16, 11, 16, 12, 16, 13, 16, 14, 16, 15,
        ];
        let index = _mm512_loadu_si512(SPREAD.as_ptr().cast());
        _mm512_castsi512_ps(_mm512_permutexvar_epi16(
            index,
            _mm512_zextsi256_si512(bits),
        ))
    }
}

/// 16 f32 lanes rounded to bfloat16 (to nearest, ties to even; NaN quiet), as 16 × u16.
#[inline(always)]
fn avx512_bf16(v: __m512) -> __m256i {
    // SAFETY: AVX-512F/BW available (callers hold the token).
    unsafe {
        // One word permutation gathers the high halves (a single-source permutation reads the
        // indices modulo 32, so the low 16 results are the odd words of `v`).
        let index = _mm512_loadu_si512(ODD_WORDS.as_ptr().cast());
        _mm512_castsi512_si256(_mm512_permutexvar_epi16(index, avx512_bf16_high(v)))
    }
}

/// 16 f32 lanes rounded to bfloat16 (to nearest, ties to even; NaN quiet), each in the high half
/// of its 32-bit lane (the low half is garbage).
#[inline(always)]
fn avx512_bf16_high(v: __m512) -> __m512i {
    // SAFETY: AVX-512F available (callers hold the token).
    unsafe {
        // A NaN lane takes its own bits with the quiet bit set instead (rounding could carry it
        // into an infinity).
        let bits = _mm512_castps_si512(v);
        let nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(v, v);
        let quiet = _mm512_set1_epi32(0x0040_0000);
        _mm512_mask_or_epi32(avx512_bf16_rounded_high(v), nan, bits, quiet)
    }
}

/// [`avx512_bf16_high`] for lanes known not to be NaN: as on AVX2, round to nearest even in the
/// integer bits (add 0x7FFF plus the lowest kept bit), the result in the high halves.
#[inline(always)]
fn avx512_bf16_rounded_high(v: __m512) -> __m512i {
    // SAFETY: AVX-512F available (callers hold the token).
    unsafe {
        let bits = _mm512_castps_si512(v);
        let lsb = _mm512_and_si512(_mm512_srli_epi32::<16>(bits), _mm512_set1_epi32(1));
        let bias = _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF));
        _mm512_add_epi32(bits, bias)
    }
}

/// Two vectors' bfloat16 values (each in the high halves of its 32-bit lanes) gathered into one
/// vector of 32 words, `low`'s first, by one two-source word permutation.
#[inline(always)]
fn avx512_join_high_words(low: __m512i, high: __m512i) -> __m512i {
    // SAFETY: AVX-512BW available (callers hold the token).
    unsafe {
        let index = _mm512_loadu_si512(ODD_WORDS.as_ptr().cast());
        _mm512_permutex2var_epi16(low, index, high)
    }
}

/// The odd 16-bit words of two 512-bit vectors (indices 32 and up name the second): the high
/// halves of their 32-bit lanes, where the bfloat16 conversions leave their results.
const ODD_WORDS: [i16; 32] = [
    1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31, //
    33, 35, 37, 39, 41, 43, 45, 47, 49, 51, 53, 55, 57, 59, 61, 63,
];

/// 32 f32 lanes (`low`, then `high`) rounded to bfloat16 by `vcvtne2ps2bf16`: to nearest even, a
/// NaN quieted as in [`avx512_bf16`] (its upper 16 bits with the quiet bit set), so equal to it on
/// every lane except subnormal ones, which the instruction reads as ±0 (callers check for
/// those). Inline assembly, because the intrinsic needs `avx512bf16` enabled on the whole kernel
/// entry, which CPUs without it must never run; this function only needs AVX-512F registers.
///
/// # Safety
/// The CPU must have AVX512-BF16 (the token's `bf16`).
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn avx512_bf16_pair(low: __m512, high: __m512) -> __m512i {
    let out: __m512i;
    // SAFETY: the caller guarantees AVX512-BF16; the instruction reads and writes only these
    // registers (no memory, no stack, no flags).
    unsafe {
        std::arch::asm!(
            "vcvtne2ps2bf16 {out}, {high}, {low}",
            out = lateout(zmm_reg) out,
            high = in(zmm_reg) high,
            low = in(zmm_reg) low,
            options(pure, nomem, nostack, preserves_flags),
        );
    }
    out
}

/// Whether any lane of the vectors is subnormal: one `vfpclassps` per vector (class 0x20,
/// denormal), the masks ORed. Inline assembly, as [`avx512_bf16_pair`]: the intrinsic needs
/// `avx512dq` on the whole kernel entry. A third of the 512-bit operations of the integer test
/// it replaced (`|bits| − 1` below `0x7FFFFF`: an and, a subtract and an unsigned minimum per
/// vector), which matters where the check runs on every group: where many outputs are zero, as
/// ReLU's on centred data (their zero words send each group here).
///
/// # Safety
/// The CPU must have AVX-512DQ (the token's `bf16`).
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn avx512_any_subnormal_dq<const K: usize>(v: &[__m512; K]) -> bool {
    let mut any = 0u16;
    for &v in v {
        let k: u16;
        // SAFETY: the caller guarantees AVX-512DQ; the instruction reads and writes only these
        // registers (no memory, no stack, no flags).
        unsafe {
            std::arch::asm!(
                "vfpclassps {k}, {v}, 0x20",
                k = lateout(kreg) k,
                v = in(zmm_reg) v,
                options(pure, nomem, nostack, preserves_flags),
            );
        }
        any |= k;
    }
    any != 0
}

/// The first `min(bits.len(), 16)` values of `bits` in the low 16-bit lanes, the others 0 (one
/// masked load).
#[inline(always)]
fn load_words_masked(bits: &[u16]) -> __m256i {
    // SAFETY: AVX-512BW/VL available (callers hold the token); the mask enables only the first
    // min(len, 16) lanes, all inside `bits`, and masked-off lanes are not accessed.
    unsafe { _mm256_maskz_loadu_epi16(low_mask(bits.len()), bits.as_ptr().cast()) }
}

/// Writes the low `min(out.len(), 16)` 16-bit lanes of `v` to `out` (one masked store).
#[inline(always)]
fn store_words_masked(out: &mut [u16], v: __m256i) {
    // SAFETY: AVX-512BW/VL available (callers hold the token); the mask enables only the first
    // min(len, 16) lanes, all inside `out`, and masked-off lanes are not written.
    unsafe { _mm256_mask_storeu_epi16(out.as_mut_ptr().cast(), low_mask(out.len()), v) }
}

/// Mask with the low `n` of 16 lanes set.
#[inline(always)]
fn low_mask(n: usize) -> __mmask16 {
    if n >= 16 {
        0xffff
    } else {
        ((1u32 << n) - 1) as __mmask16
    }
}

impl Simd for Avx512 {
    const LANES: usize = 16;
    const BF16_PAIR_STORES: bool = true;
    const REGISTERS: usize = 32;
    type T = f32;
    type V = __m512;

    /// `k` compiled for AVX-512F, BW and VL.
    #[inline]
    fn enter<K: Thunk>(self, k: K) -> K::Output {
        #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
        fn entry<K: Thunk>(k: K) -> K::Output {
            k.call()
        }
        // SAFETY: `self` exists, so AVX-512F, BW and VL were detected on this CPU.
        unsafe { entry(k) }
    }

    #[inline(always)]
    fn splat(self, x: f32) -> __m512 {
        // SAFETY: the token proves AVX-512F is available.
        unsafe { _mm512_set1_ps(x) }
    }
    #[inline(always)]
    unsafe fn load_ptr(self, p: *const f32) -> __m512 {
        // SAFETY: AVX-512F available (token); the caller guarantees 16 readable f32 at `p`.
        unsafe { _mm512_loadu_ps(p) }
    }
    #[inline(always)]
    unsafe fn store_ptr(self, p: *mut f32, v: __m512) {
        // SAFETY: AVX-512F available (token); the caller guarantees 16 writable f32 at `p`.
        unsafe { _mm512_storeu_ps(p, v) }
    }
    #[inline(always)]
    unsafe fn store_stream_ptr(self, p: *mut f32, v: __m512) {
        // SAFETY: AVX-512F available (token); the caller guarantees 16 writable f32 at `p`,
        // 64-byte aligned.
        unsafe { _mm512_stream_ps(p, v) }
    }
    #[inline(always)]
    fn stream_fence(self) {
        // SAFETY: SSE is part of x86-64.
        unsafe { _mm_sfence() }
    }
    #[inline(always)]
    unsafe fn load_f16_ptr(self, p: *const u16) -> __m512 {
        // SAFETY: AVX-512F available (token); the caller guarantees 16 readable u16 at `p`.
        unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(p.cast())) }
    }
    #[inline(always)]
    unsafe fn store_f16_ptr(self, p: *mut u16, v: __m512) {
        // SAFETY: AVX-512F available (token); the caller guarantees 16 writable u16 at `p`.
        unsafe { _mm256_storeu_si256(p.cast(), _mm512_cvtps_ph::<ROUND_NEAREST>(v)) }
    }
    #[inline(always)]
    unsafe fn store_f16_stream_ptr(self, p: *mut u16, v: __m512) {
        // SAFETY: AVX-512F available (token); the caller guarantees 16 writable u16 at `p`,
        // 32-byte aligned.
        unsafe { _mm256_stream_si256(p.cast(), _mm512_cvtps_ph::<ROUND_NEAREST>(v)) }
    }
    #[inline(always)]
    unsafe fn load_bf16_ptr(self, p: *const u16) -> __m512 {
        // SAFETY: AVX-512F/BW available (token); the caller guarantees 16 readable u16 at `p`.
        unsafe { avx512_from_bf16(_mm256_loadu_si256(p.cast())) }
    }
    #[inline(always)]
    unsafe fn store_bf16_ptr(self, p: *mut u16, v: __m512) {
        // SAFETY: AVX-512F available (token); the caller guarantees 16 writable u16 at `p`.
        unsafe { _mm256_storeu_si256(p.cast(), avx512_bf16(v)) }
    }
    #[inline(always)]
    unsafe fn store_bf16_stream_ptr(self, p: *mut u16, v: __m512) {
        // SAFETY: AVX-512F/BW available (token); the caller guarantees 16 writable u16 at `p`,
        // 32-byte aligned.
        unsafe { _mm256_stream_si256(p.cast(), avx512_bf16(v)) }
    }
    #[inline(always)]
    unsafe fn store_bf16_group<const K: usize>(self, p: *mut u16, v: [__m512; K]) {
        // With AVX512-BF16: pairs of vectors converted and stored by the instruction, then,
        // only if some result is ±0 (rare outside constant data) and some input subnormal (which
        // the instruction flushed), the group stored again by the integer conversion. The
        // inputs are in registers, so rewriting an in-place output is safe. Checking the inputs
        // of every group instead costs more than the instruction saves (measured, AMD Zen 5
        // class); checking the outputs' words is nearly free. Even with one `vfpclassps` per
        // vector, checking every group's inputs cost plain bf16 inference 11% (1x64x112x112,
        // one thread, AMD EPYC family 25 model 17 (Zen 4): NCHW 39.2 → 43.5 µs, NHWC 41.8 →
        // 46.7) for 10% on ReLU's (60.4 → 54.0), whose zeros send every group to the check.
        let mut rewrite = !self.bf16;
        if self.bf16 {
            // SAFETY: AVX-512F/BW, AVX512-BF16 and AVX-512DQ available (token and `bf16`); the
            // caller guarantees `16·K` writable u16 at `p`; pair `j` writes `32·j..32·j + 32`, the
            // last vector of an odd group `16·(K − 1)..16·K`.
            unsafe {
                let mut zeros = 0;
                for (j, pair) in v.chunks_exact(2).enumerate() {
                    let words = avx512_bf16_pair(pair[0], pair[1]);
                    zeros |= _mm512_testn_epi16_mask(words, _mm512_set1_epi16(0x7FFF));
                    _mm512_storeu_si512(p.add(32 * j).cast(), words);
                }
                if K % 2 == 1 {
                    self.store_bf16_ptr(p.add(16 * (K - 1)), v[K - 1]);
                }
                rewrite = zeros != 0 && avx512_any_subnormal_dq(&v);
            }
        }
        if rewrite {
            // The integer conversion, a pair at a time (one permutation and one store per 32
            // values), with the NaN fix-up only in groups that hold a NaN (one unordered compare
            // per pair finds them), as on AVX2.
            // SAFETY: AVX-512F/BW available (token); as above, pair `j` writes
            // `32·j..32·j + 32` and the last vector of an odd group `16·(K − 1)..16·K`.
            unsafe {
                let mut nan = 0;
                for pair in v.chunks(2) {
                    nan |= _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(pair[0], pair[pair.len() - 1]);
                }
                for (j, pair) in v.chunks_exact(2).enumerate() {
                    let (a, b) = if nan != 0 {
                        (avx512_bf16_high(pair[0]), avx512_bf16_high(pair[1]))
                    } else {
                        (
                            avx512_bf16_rounded_high(pair[0]),
                            avx512_bf16_rounded_high(pair[1]),
                        )
                    };
                    _mm512_storeu_si512(p.add(32 * j).cast(), avx512_join_high_words(a, b));
                }
                if K % 2 == 1 {
                    self.store_bf16_ptr(p.add(16 * (K - 1)), v[K - 1]);
                }
            }
        }
    }
    #[inline(always)]
    fn load_f16_partial(self, bits: &[u16]) -> __m512 {
        // SAFETY: AVX-512F/BW/VL available (token); `load_words_masked` reads inside `bits` only.
        unsafe { _mm512_cvtph_ps(load_words_masked(bits)) }
    }
    #[inline(always)]
    fn load_bf16_partial(self, bits: &[u16]) -> __m512 {
        avx512_from_bf16(load_words_masked(bits))
    }
    #[inline(always)]
    fn store_f16_partial(self, out: &mut [u16], v: __m512) {
        // SAFETY: AVX-512F/BW/VL available (token); `store_words_masked` writes inside `out` only.
        unsafe { store_words_masked(out, _mm512_cvtps_ph::<ROUND_NEAREST>(v)) }
    }
    #[inline(always)]
    fn store_bf16_partial(self, out: &mut [u16], v: __m512) {
        store_words_masked(out, avx512_bf16(v))
    }
    #[inline(always)]
    fn add(self, a: __m512, b: __m512) -> __m512 {
        // SAFETY: the token proves AVX-512F is available.
        unsafe { _mm512_add_ps(a, b) }
    }
    #[inline(always)]
    fn sub(self, a: __m512, b: __m512) -> __m512 {
        // SAFETY: the token proves AVX-512F is available.
        unsafe { _mm512_sub_ps(a, b) }
    }
    #[inline(always)]
    fn mul(self, a: __m512, b: __m512) -> __m512 {
        // SAFETY: the token proves AVX-512F is available.
        unsafe { _mm512_mul_ps(a, b) }
    }
    #[inline(always)]
    fn mul_add(self, a: __m512, b: __m512, c: __m512) -> __m512 {
        // SAFETY: the token proves AVX-512F is available.
        unsafe { _mm512_fmadd_ps(a, b, c) }
    }
    #[inline(always)]
    fn add_fma(self, a: __m512, one: __m512, b: __m512) -> __m512 {
        self.mul_add(a, one, b)
    }
    #[inline(always)]
    fn relu(self, v: __m512) -> __m512 {
        // SAFETY: the token proves AVX-512F is available. As for AVX2: 0 for v < 0, else v.
        unsafe { _mm512_max_ps(_mm512_setzero_ps(), v) }
    }
    #[inline(always)]
    fn where_positive(self, v: __m512, m: __m512) -> __m512 {
        // SAFETY: the token proves AVX-512F is available. An ordered comparison: false for NaN.
        unsafe {
            let keep = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(m, _mm512_setzero_ps());
            _mm512_maskz_mov_ps(keep, v)
        }
    }
    #[inline(always)]
    fn reduce_add(self, v: __m512) -> f32 {
        // SAFETY: the token proves AVX-512F is available.
        unsafe { _mm512_reduce_add_ps(v) }
    }
    #[inline(always)]
    fn reduce_add_each(self, v: &[__m512; MAX_LANES]) -> __m512 {
        // `_mm512_reduce_add_ps`'s tree for all 16 vectors at once: the 256-bit halves added,
        // then the 128-bit halves, then lanes 0 + 2 and 1 + 3, then 0 + 1 (`sums` below), each
        // step on two registers' worth of vectors per instruction.
        // SAFETY: the token proves AVX-512F is available.
        unsafe {
            // Step 1, vectors 2i and 2i + 1: [a.lo + a.hi, b.lo + b.hi] (256-bit halves).
            let mut h = [_mm512_setzero_ps(); 8];
            for (i, h) in h.iter_mut().enumerate() {
                let (a, b) = (v[2 * i], v[2 * i + 1]);
                let lo = _mm512_shuffle_f32x4::<0b01_00_01_00>(a, b);
                let hi = _mm512_shuffle_f32x4::<0b11_10_11_10>(a, b);
                *h = _mm512_add_ps(lo, hi);
            }
            // Step 2, 128-bit blocks: h[2i] = [a, b, c, d] (blocks of vectors 4i, 4i + 1) and
            // h[2i + 1] likewise for 4i + 2, 4i + 3: [a + b, c + d, ...] for the four vectors.
            let mut q = [_mm512_setzero_ps(); 4];
            for (i, q) in q.iter_mut().enumerate() {
                let (a, b) = (h[2 * i], h[2 * i + 1]);
                let even = _mm512_shuffle_f32x4::<0b10_00_10_00>(a, b);
                let odd = _mm512_shuffle_f32x4::<0b11_01_11_01>(a, b);
                *q = _mm512_add_ps(even, odd);
            }
            // Steps 3 and 4 inside each 128-bit block (block k of q[i] holds vector 4i + k):
            // lanes 0 + 2 and 1 + 3, then their sum.
            let mut r = [_mm512_setzero_ps(); 2];
            for (i, r) in r.iter_mut().enumerate() {
                let (a, b) = (q[2 * i], q[2 * i + 1]);
                let x = _mm512_shuffle_ps::<0b01_00_01_00>(a, b);
                let y = _mm512_shuffle_ps::<0b11_10_11_10>(a, b);
                *r = _mm512_add_ps(x, y);
            }
            let (r0, r1) = (r[0], r[1]);
            let x = _mm512_shuffle_ps::<0b10_00_10_00>(r0, r1);
            let y = _mm512_shuffle_ps::<0b11_01_11_01>(r0, r1);
            let sums = _mm512_add_ps(x, y);
            // Block k of `sums` holds vectors k, 4 + k, 8 + k, 12 + k.
            let order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
            _mm512_permutexvar_ps(order, sums)
        }
    }

    type W = [__m512d; 2];
    #[inline(always)]
    fn splat_w(self, x: f64) -> [__m512d; 2] {
        // SAFETY: the token proves AVX-512F is available.
        unsafe { [_mm512_set1_pd(x); 2] }
    }
    #[inline(always)]
    fn widen(self, v: __m512) -> [__m512d; 2] {
        // SAFETY: the token proves AVX-512F is available (the 256-bit extract is AVX-512F's
        // `vextractf64x4`, not AVX-512DQ's `vextractf32x8`).
        unsafe {
            let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));
            [
                _mm512_cvtps_pd(_mm512_castps512_ps256(v)),
                _mm512_cvtps_pd(hi),
            ]
        }
    }
    #[inline(always)]
    unsafe fn load_widen_ptr(self, p: *const f32) -> [__m512d; 2] {
        // SAFETY: AVX-512F available (token); the caller guarantees 16 readable f32 at `p`.
        unsafe {
            [
                _mm512_cvtps_pd(_mm256_loadu_ps(p)),
                _mm512_cvtps_pd(_mm256_loadu_ps(p.add(8))),
            ]
        }
    }
    #[inline(always)]
    unsafe fn load_widen_f16_ptr(self, p: *const u16) -> [__m512d; 2] {
        // Each 8 values converted to f32 then f64 in 256-bit registers: measured on AMD Zen 4
        // (first pass alone, from L1), 7.8 → 5.7 cycles per 16 values against a 512-bit
        // conversion split by `widen`.
        // SAFETY: AVX-512F (so F16C) available (token); the caller guarantees 16 readable u16
        // at `p`.
        unsafe {
            [
                _mm512_cvtps_pd(_mm256_cvtph_ps(_mm_loadu_si128(p.cast()))),
                _mm512_cvtps_pd(_mm256_cvtph_ps(_mm_loadu_si128(p.add(8).cast()))),
            ]
        }
    }
    #[inline(always)]
    unsafe fn load_widen_bf16_ptr(self, p: *const u16) -> [__m512d; 2] {
        // SAFETY: AVX-512F (so AVX2) available (token); the caller guarantees 16 readable u16
        // at `p`.
        unsafe {
            [
                _mm512_cvtps_pd(avx2_from_bf16(_mm_loadu_si128(p.cast()))),
                _mm512_cvtps_pd(avx2_from_bf16(_mm_loadu_si128(p.add(8).cast()))),
            ]
        }
    }
    #[inline(always)]
    unsafe fn load_w_ptr(self, p: *const f64) -> [__m512d; 2] {
        // SAFETY: AVX-512F available (token); the caller guarantees 16 readable f64 at `p`.
        unsafe { [_mm512_loadu_pd(p), _mm512_loadu_pd(p.add(8))] }
    }
    #[inline(always)]
    unsafe fn store_w_ptr(self, p: *mut f64, v: [__m512d; 2]) {
        // SAFETY: AVX-512F available (token); the caller guarantees 16 writable f64 at `p`.
        unsafe {
            _mm512_storeu_pd(p, v[0]);
            _mm512_storeu_pd(p.add(8), v[1]);
        }
    }
    #[inline(always)]
    fn add_w_fma(self, a: Self::W, one: Self::W, b: Self::W) -> Self::W {
        self.mul_add_w(a, one, b)
    }
    #[inline(always)]
    fn add_w(self, a: [__m512d; 2], b: [__m512d; 2]) -> [__m512d; 2] {
        // SAFETY: the token proves AVX-512F is available.
        unsafe { [_mm512_add_pd(a[0], b[0]), _mm512_add_pd(a[1], b[1])] }
    }
    #[inline(always)]
    fn reduce_add_w(self, v: [__m512d; 2]) -> f64 {
        // The tree spelled out (not `_mm512_reduce_add_pd`, whose order is the library's) so that
        // `reduce_add_w_each` can repeat it: the 256-bit halves added, then the 128-bit halves,
        // then lane 0 + lane 1.
        // SAFETY: the token proves AVX-512F is available.
        unsafe {
            let s = _mm512_add_pd(v[0], v[1]);
            let s = _mm256_add_pd(_mm512_castpd512_pd256(s), _mm512_extractf64x4_pd::<1>(s));
            let s = _mm_add_pd(_mm256_castpd256_pd128(s), _mm256_extractf128_pd::<1>(s));
            _mm_cvtsd_f64(_mm_add_sd(s, _mm_unpackhi_pd(s, s)))
        }
    }
    #[inline(always)]
    fn reduce_add_w_each(self, v: &[[__m512d; 2]; MAX_LANES]) -> [f64; MAX_LANES] {
        // `reduce_add_w`'s tree eight vectors at a time, each step on two registers' worth of
        // vectors per instruction (as `reduce_add_each`).
        let mut out = [0.0; MAX_LANES];
        // SAFETY: the token proves AVX-512F is available; each store writes 8 f64 inside `out`
        // (`8i + 8 ≤ MAX_LANES`).
        unsafe {
            for (i, v) in v.chunks_exact(8).enumerate() {
                // Loops, not closures (see the AVX2 backend). Vectors 2k and 2k + 1, each the
                // sum of its two registers: [a.lo + a.hi, b.lo + b.hi] (256-bit halves).
                let mut h = [_mm512_setzero_pd(); 4];
                for (k, h) in h.iter_mut().enumerate() {
                    let a = _mm512_add_pd(v[2 * k][0], v[2 * k][1]);
                    let b = _mm512_add_pd(v[2 * k + 1][0], v[2 * k + 1][1]);
                    let lo = _mm512_shuffle_f64x2::<0b01_00_01_00>(a, b);
                    let hi = _mm512_shuffle_f64x2::<0b11_10_11_10>(a, b);
                    *h = _mm512_add_pd(lo, hi);
                }
                // 128-bit blocks of vectors 4k .. 4k + 3: block j holds vector 4k + j's pair.
                let mut q = [_mm512_setzero_pd(); 2];
                for (k, q) in q.iter_mut().enumerate() {
                    let (a, b) = (h[2 * k], h[2 * k + 1]);
                    let even = _mm512_shuffle_f64x2::<0b10_00_10_00>(a, b);
                    let odd = _mm512_shuffle_f64x2::<0b11_01_11_01>(a, b);
                    *q = _mm512_add_pd(even, odd);
                }
                // Lane 0 + lane 1 of each block: block k holds vectors k and 4 + k.
                let lo = _mm512_unpacklo_pd(q[0], q[1]);
                let hi = _mm512_unpackhi_pd(q[0], q[1]);
                let order = _mm512_setr_epi64(0, 2, 4, 6, 1, 3, 5, 7);
                let sums = _mm512_permutexvar_pd(order, _mm512_add_pd(lo, hi));
                _mm512_storeu_pd(out.as_mut_ptr().add(8 * i), sums);
            }
        }
        out
    }

    #[inline(always)]
    fn load_partial(self, s: &[f32], fill: f32) -> __m512 {
        let k = low_mask(s.len());
        // SAFETY: AVX-512F available (token); the mask enables only the first min(len, 16) lanes,
        // all inside `s`, and masked-off lanes are not accessed.
        unsafe { _mm512_mask_loadu_ps(_mm512_set1_ps(fill), k, s.as_ptr()) }
    }
    #[inline(always)]
    fn store_partial(self, s: &mut [f32], v: __m512) {
        let k = low_mask(s.len());
        // SAFETY: AVX-512F available (token); the mask enables only the first min(len, 16) lanes,
        // all inside `s`, and masked-off lanes are not written.
        unsafe { _mm512_mask_storeu_ps(s.as_mut_ptr(), k, v) }
    }
}

impl<const R32: bool> Wide64 for Avx2Fma<R32> {
    #[inline(always)]
    fn sub_w(self, a: [__m256d; 2], b: [__m256d; 2]) -> [__m256d; 2] {
        // SAFETY: the token proves AVX is available.
        unsafe { [_mm256_sub_pd(a[0], b[0]), _mm256_sub_pd(a[1], b[1])] }
    }
    #[inline(always)]
    fn mul_w(self, a: [__m256d; 2], b: [__m256d; 2]) -> [__m256d; 2] {
        // SAFETY: the token proves AVX is available.
        unsafe { [_mm256_mul_pd(a[0], b[0]), _mm256_mul_pd(a[1], b[1])] }
    }
    #[inline(always)]
    fn mul_add_w(self, a: [__m256d; 2], b: [__m256d; 2], c: [__m256d; 2]) -> [__m256d; 2] {
        // SAFETY: the token proves FMA is available.
        unsafe {
            [
                _mm256_fmadd_pd(a[0], b[0], c[0]),
                _mm256_fmadd_pd(a[1], b[1], c[1]),
            ]
        }
    }
    #[inline(always)]
    fn relu_w(self, v: [__m256d; 2]) -> [__m256d; 2] {
        // SAFETY: the token proves AVX is available. MAXPD as MAXPS in `relu`.
        unsafe { v.map(|v| _mm256_max_pd(_mm256_setzero_pd(), v)) }
    }
    #[inline(always)]
    fn where_positive_w(self, v: [__m256d; 2], m: [__m256d; 2]) -> [__m256d; 2] {
        // SAFETY: the token proves AVX is available. An ordered comparison: false for NaN.
        unsafe {
            let z = _mm256_setzero_pd();
            [
                _mm256_and_pd(v[0], _mm256_cmp_pd::<_CMP_GT_OQ>(m[0], z)),
                _mm256_and_pd(v[1], _mm256_cmp_pd::<_CMP_GT_OQ>(m[1], z)),
            ]
        }
    }
    #[inline(always)]
    fn load_partial_w(self, s: &[f64], fill: f64) -> [__m256d; 2] {
        let n = s.len().min(8);
        let (lo, hi) = (avx2_low_mask_pd(n), avx2_low_mask_pd(n.saturating_sub(4)));
        // SAFETY: AVX available (token); the masks enable only the first min(len, 8) lanes, all
        // inside `s` (the high half's lanes start at 4 and are enabled only when `n > 4`), and
        // masked-off lanes are not accessed.
        unsafe {
            let f = _mm256_set1_pd(fill);
            let a = _mm256_maskload_pd(s.as_ptr(), lo);
            let b = _mm256_maskload_pd(s.as_ptr().wrapping_add(4), hi);
            [
                _mm256_blendv_pd(f, a, _mm256_castsi256_pd(lo)),
                _mm256_blendv_pd(f, b, _mm256_castsi256_pd(hi)),
            ]
        }
    }
    #[inline(always)]
    unsafe fn store_stream_w_ptr(self, p: *mut f64, v: [__m256d; 2]) {
        // SAFETY: AVX available (token); the caller guarantees 8 writable f64 at `p`, 64-byte
        // aligned (so both halves are 32-byte aligned).
        unsafe {
            _mm256_stream_pd(p, v[0]);
            _mm256_stream_pd(p.add(4), v[1]);
        }
    }
    #[inline(always)]
    fn store_partial_w(self, s: &mut [f64], v: [__m256d; 2]) {
        let n = s.len().min(8);
        let (lo, hi) = (avx2_low_mask_pd(n), avx2_low_mask_pd(n.saturating_sub(4)));
        // SAFETY: as in `load_partial_w`: only lanes inside `s` are enabled and written.
        unsafe {
            _mm256_maskstore_pd(s.as_mut_ptr(), lo, v[0]);
            _mm256_maskstore_pd(s.as_mut_ptr().wrapping_add(4), hi, v[1]);
        }
    }
}

/// Integer mask with the low `n` of 4 f64 lanes set (all ones), for masked loads and stores.
#[inline(always)]
fn avx2_low_mask_pd(n: usize) -> __m256i {
    const WINDOW: [i64; 8] = [-1, -1, -1, -1, 0, 0, 0, 0];
    let start = 4 - n.min(4);
    // SAFETY: AVX available (callers hold the token); `start + 4 <= 8`, so the 4 lanes read lie
    // inside `WINDOW`.
    unsafe { _mm256_loadu_si256(WINDOW[start..].as_ptr().cast()) }
}

impl Wide64 for Avx512 {
    #[inline(always)]
    fn sub_w(self, a: [__m512d; 2], b: [__m512d; 2]) -> [__m512d; 2] {
        // SAFETY: the token proves AVX-512F is available.
        unsafe { [_mm512_sub_pd(a[0], b[0]), _mm512_sub_pd(a[1], b[1])] }
    }
    #[inline(always)]
    fn mul_w(self, a: [__m512d; 2], b: [__m512d; 2]) -> [__m512d; 2] {
        // SAFETY: the token proves AVX-512F is available.
        unsafe { [_mm512_mul_pd(a[0], b[0]), _mm512_mul_pd(a[1], b[1])] }
    }
    #[inline(always)]
    fn mul_add_w(self, a: [__m512d; 2], b: [__m512d; 2], c: [__m512d; 2]) -> [__m512d; 2] {
        // SAFETY: the token proves AVX-512F is available.
        unsafe {
            [
                _mm512_fmadd_pd(a[0], b[0], c[0]),
                _mm512_fmadd_pd(a[1], b[1], c[1]),
            ]
        }
    }
    #[inline(always)]
    fn relu_w(self, v: [__m512d; 2]) -> [__m512d; 2] {
        // SAFETY: the token proves AVX-512F is available. As `relu`: 0 for v < 0, else v.
        unsafe { v.map(|v| _mm512_max_pd(_mm512_setzero_pd(), v)) }
    }
    #[inline(always)]
    fn where_positive_w(self, v: [__m512d; 2], m: [__m512d; 2]) -> [__m512d; 2] {
        // SAFETY: the token proves AVX-512F is available. An ordered comparison: false for NaN.
        unsafe {
            let z = _mm512_setzero_pd();
            [
                _mm512_maskz_mov_pd(_mm512_cmp_pd_mask::<_CMP_GT_OQ>(m[0], z), v[0]),
                _mm512_maskz_mov_pd(_mm512_cmp_pd_mask::<_CMP_GT_OQ>(m[1], z), v[1]),
            ]
        }
    }
    #[inline(always)]
    fn load_partial_w(self, s: &[f64], fill: f64) -> [__m512d; 2] {
        let n = s.len().min(16);
        let (lo, hi) = (low_mask8(n), low_mask8(n.saturating_sub(8)));
        // SAFETY: AVX-512F available (token); the masks enable only the first min(len, 16) lanes,
        // all inside `s`, and masked-off lanes are not accessed.
        unsafe {
            let f = _mm512_set1_pd(fill);
            [
                _mm512_mask_loadu_pd(f, lo, s.as_ptr()),
                _mm512_mask_loadu_pd(f, hi, s.as_ptr().wrapping_add(8)),
            ]
        }
    }
    #[inline(always)]
    unsafe fn store_stream_w_ptr(self, p: *mut f64, v: [__m512d; 2]) {
        // SAFETY: AVX-512F available (token); the caller guarantees 16 writable f64 at `p`,
        // 128-byte aligned (so both halves are 64-byte aligned).
        unsafe {
            _mm512_stream_pd(p, v[0]);
            _mm512_stream_pd(p.add(8), v[1]);
        }
    }
    #[inline(always)]
    fn store_partial_w(self, s: &mut [f64], v: [__m512d; 2]) {
        let n = s.len().min(16);
        let (lo, hi) = (low_mask8(n), low_mask8(n.saturating_sub(8)));
        // SAFETY: as in `load_partial_w`: only lanes inside `s` are enabled and written.
        unsafe {
            _mm512_mask_storeu_pd(s.as_mut_ptr(), lo, v[0]);
            _mm512_mask_storeu_pd(s.as_mut_ptr().wrapping_add(8), hi, v[1]);
        }
    }
}

/// Mask with the low `n` of 8 lanes set.
#[inline(always)]
fn low_mask8(n: usize) -> __mmask8 {
    if n >= 8 {
        0xff
    } else {
        ((1u32 << n) - 1) as __mmask8
    }
}
