//! x86-64 backends on `core::arch`: AVX2 + FMA (`__m256`) and AVX-512F (`__m512`), selected at run time.
//!
//! A token can only be constructed by `try_new`, after the CPU was found to support the features,
//! so each intrinsic below is called on a CPU that has it.

use core::arch::x86_64::*;

use super::{Kernel, Simd};

/// Token proving the CPU supports AVX2 and FMA.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Avx2Fma {
    _proof: (),
}

impl Avx2Fma {
    pub(crate) fn try_new() -> Option<Self> {
        (is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"))
            .then_some(Self { _proof: () })
    }

    /// Runs `k` with the whole kernel body compiled for AVX2 + FMA.
    #[inline]
    pub(crate) fn vectorize<K: Kernel>(self, k: K) -> K::Output {
        #[target_feature(enable = "avx2,fma")]
        fn entry<K: Kernel>(t: Avx2Fma, k: K) -> K::Output {
            k.run(t)
        }
        // SAFETY: `self` exists, so AVX2 and FMA were detected on this CPU.
        unsafe { entry(self, k) }
    }
}

impl Simd for Avx2Fma {
    const LANES: usize = 8;
    type V = __m256;

    #[inline(always)]
    fn splat(self, x: f32) -> __m256 {
        // SAFETY: the token proves AVX is available.
        unsafe { _mm256_set1_ps(x) }
    }
    #[inline(always)]
    fn load(self, s: &[f32]) -> __m256 {
        if s.len() >= 8 {
            // SAFETY: AVX available (token); `s` holds at least 8 readable f32 (checked above).
            unsafe { _mm256_loadu_ps(s.as_ptr()) }
        } else {
            self.load_partial(s, 0.0)
        }
    }
    #[inline(always)]
    fn store(self, s: &mut [f32], v: __m256) {
        if s.len() >= 8 {
            // SAFETY: AVX available (token); `s` holds at least 8 writable f32 (checked above).
            unsafe { _mm256_storeu_ps(s.as_mut_ptr(), v) }
        } else {
            self.store_partial(s, v)
        }
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
}

/// Token proving the CPU supports AVX-512F.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Avx512 {
    _proof: (),
}

impl Avx512 {
    pub(crate) fn try_new() -> Option<Self> {
        is_x86_feature_detected!("avx512f").then_some(Self { _proof: () })
    }

    /// Runs `k` with the whole kernel body compiled for AVX-512F.
    #[inline]
    pub(crate) fn vectorize<K: Kernel>(self, k: K) -> K::Output {
        #[target_feature(enable = "avx512f")]
        fn entry<K: Kernel>(t: Avx512, k: K) -> K::Output {
            k.run(t)
        }
        // SAFETY: `self` exists, so AVX-512F was detected on this CPU.
        unsafe { entry(self, k) }
    }
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
    type V = __m512;

    #[inline(always)]
    fn splat(self, x: f32) -> __m512 {
        // SAFETY: the token proves AVX-512F is available.
        unsafe { _mm512_set1_ps(x) }
    }
    #[inline(always)]
    fn load(self, s: &[f32]) -> __m512 {
        if s.len() >= 16 {
            // SAFETY: AVX-512F available (token); `s` holds at least 16 readable f32 (checked above).
            unsafe { _mm512_loadu_ps(s.as_ptr()) }
        } else {
            self.load_partial(s, 0.0)
        }
    }
    #[inline(always)]
    fn store(self, s: &mut [f32], v: __m512) {
        if s.len() >= 16 {
            // SAFETY: AVX-512F available (token); `s` holds at least 16 writable f32 (checked above).
            unsafe { _mm512_storeu_ps(s.as_mut_ptr(), v) }
        } else {
            self.store_partial(s, v)
        }
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
