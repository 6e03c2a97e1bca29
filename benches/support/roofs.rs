//! Memory roofs the benchmarks compare against, and buffers at controlled offsets.
//!
//! - `copy`: the better (timed once per buffer pair, then fixed) of `copy_from_slice` (libc
//!   `memcpy`) and an explicit load/store loop on the widest vectors this CPU has. `memcpy` alone is
//!   no roof: glibc's runs at a tenth of its speed on some CPUs when `(dst − src) mod 4096` is
//!   small but not 0 (seen on AMD Zen 3), which made ratios against it meaningless.
//! - `sum`: a plain SIMD sum over the same bytes (four accumulators), the roof of a read-only pass
//!   such as the statistics.
//! - [`fill`]: the deterministic data of every benchmark.
//! - [`Buffer`]: an `f32` buffer starting `offset` bytes after a 4096-byte boundary, so the relative
//!   offset of two buffers modulo a page is known.
#![allow(dead_code)]

use std::hint::black_box;
use std::time::Instant;

/// Deterministic values in [lo, hi) (xorshift64*), the benchmarks' data.
pub fn fill(len: usize, seed: u64, lo: f32, hi: f32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            s ^= s >> 12;
            s ^= s << 25;
            s ^= s >> 27;
            let u = (s.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 40) as f32 / (1u64 << 24) as f32;
            lo + (hi - lo) * u
        })
        .collect()
}

/// A buffer of `len` f32 starting `offset` bytes (a multiple of 4) past a page boundary.
pub struct Buffer {
    storage: Vec<f32>,
    start: usize,
    len: usize,
}

impl Buffer {
    pub fn new(len: usize, offset: usize) -> Buffer {
        assert!(offset.is_multiple_of(4) && offset < 4096, "offset {offset}");
        let storage = vec![0.0f32; len + 2048];
        let addr = storage.as_ptr() as usize;
        let to_page = (4096 - addr % 4096) % 4096;
        let start = (to_page + offset) % 4096 / 4;
        Buffer {
            storage,
            start,
            len,
        }
    }
    pub fn from_slice(values: &[f32], offset: usize) -> Buffer {
        let mut b = Buffer::new(values.len(), offset);
        b.copy_from_slice(values);
        b
    }
}

impl std::ops::Deref for Buffer {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        &self.storage[self.start..self.start + self.len]
    }
}

impl std::ops::DerefMut for Buffer {
    fn deref_mut(&mut self) -> &mut [f32] {
        &mut self.storage[self.start..self.start + self.len]
    }
}

/// How a copy roof copies: chosen once per buffer pair by [`CopyRoof::choose`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CopyRoof {
    Memcpy,
    Simd,
}

impl CopyRoof {
    /// Times both copies of `src` into `dst` (best of 7 each) and keeps the faster.
    pub fn choose(src: &[f32], dst: &mut [f32]) -> CopyRoof {
        let best = |f: &mut dyn FnMut()| {
            (0..7)
                .map(|_| {
                    let t = Instant::now();
                    f();
                    t.elapsed()
                })
                .min()
                .unwrap()
        };
        let memcpy = best(&mut || dst.copy_from_slice(src));
        let simd = best(&mut || simd_copy(src, dst));
        if simd < memcpy {
            CopyRoof::Simd
        } else {
            CopyRoof::Memcpy
        }
    }

    pub fn run(self, src: &[f32], dst: &mut [f32]) {
        match self {
            CopyRoof::Memcpy => dst.copy_from_slice(src),
            CopyRoof::Simd => simd_copy(src, dst),
        }
    }
}

/// `dst = src` with explicit vector loads and stores (AVX-512, AVX or SSE2, as available).
pub fn simd_copy(src: &[f32], dst: &mut [f32]) {
    let n = src.len().min(dst.len());
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f") {
            // SAFETY: AVX-512F was detected.
            return unsafe { x86::copy_avx512(&src[..n], &mut dst[..n]) };
        }
        if is_x86_feature_detected!("avx") {
            // SAFETY: AVX was detected.
            return unsafe { x86::copy_avx(&src[..n], &mut dst[..n]) };
        }
    }
    dst[..n].copy_from_slice(&src[..n]);
}

/// Σ x with four vector accumulators (AVX-512, AVX or `wide`), the roof of a read-only pass.
pub fn simd_sum(x: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f") {
            // SAFETY: AVX-512F was detected.
            return unsafe { x86::sum_avx512(x) };
        }
        if is_x86_feature_detected!("avx") {
            // SAFETY: AVX was detected.
            return unsafe { x86::sum_avx(x) };
        }
    }
    let mut acc = [wide::f32x8::ZERO; 4];
    let mut chunks = x.chunks_exact(32);
    for c in &mut chunks {
        for (j, a) in acc.iter_mut().enumerate() {
            *a += wide::f32x8::new(c[8 * j..8 * j + 8].try_into().unwrap());
        }
    }
    let tail: f32 = chunks.remainder().iter().sum();
    black_box((acc[0] + acc[1] + acc[2] + acc[3]).reduce_add() + tail)
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use core::arch::x86_64::*;

    /// # Safety
    /// AVX-512F must be available; `src` and `dst` have the same length.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn copy_avx512(src: &[f32], dst: &mut [f32]) {
        let n = src.len();
        let (s, d) = (src.as_ptr(), dst.as_mut_ptr());
        let mut i = 0;
        while i + 64 <= n {
            // SAFETY: `i + 64 <= n`, the length of both slices.
            unsafe {
                let v = [0, 16, 32, 48].map(|o| _mm512_loadu_ps(s.add(i + o)));
                for (o, v) in [0, 16, 32, 48].into_iter().zip(v) {
                    _mm512_storeu_ps(d.add(i + o), v);
                }
            }
            i += 64;
        }
        dst[i..].copy_from_slice(&src[i..]);
    }

    /// # Safety
    /// AVX must be available; `src` and `dst` have the same length.
    #[target_feature(enable = "avx")]
    pub unsafe fn copy_avx(src: &[f32], dst: &mut [f32]) {
        let n = src.len();
        let (s, d) = (src.as_ptr(), dst.as_mut_ptr());
        let mut i = 0;
        while i + 32 <= n {
            // SAFETY: `i + 32 <= n`, the length of both slices.
            unsafe {
                let v = [0, 8, 16, 24].map(|o| _mm256_loadu_ps(s.add(i + o)));
                for (o, v) in [0, 8, 16, 24].into_iter().zip(v) {
                    _mm256_storeu_ps(d.add(i + o), v);
                }
            }
            i += 32;
        }
        dst[i..].copy_from_slice(&src[i..]);
    }

    /// # Safety
    /// AVX-512F must be available.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn sum_avx512(x: &[f32]) -> f32 {
        let p = x.as_ptr();
        let mut acc = [_mm512_setzero_ps(); 4];
        let mut i = 0;
        while i + 64 <= x.len() {
            for (j, a) in acc.iter_mut().enumerate() {
                // SAFETY: `i + 64 <= x.len()`.
                *a = _mm512_add_ps(*a, unsafe { _mm512_loadu_ps(p.add(i + 16 * j)) });
            }
            i += 64;
        }
        let v = _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]));
        _mm512_reduce_add_ps(v) + x[i..].iter().sum::<f32>()
    }

    /// # Safety
    /// AVX must be available.
    #[target_feature(enable = "avx")]
    pub unsafe fn sum_avx(x: &[f32]) -> f32 {
        let p = x.as_ptr();
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut i = 0;
        while i + 32 <= x.len() {
            for (j, a) in acc.iter_mut().enumerate() {
                // SAFETY: `i + 32 <= x.len()`.
                *a = _mm256_add_ps(*a, unsafe { _mm256_loadu_ps(p.add(i + 8 * j)) });
            }
            i += 32;
        }
        let v = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
        let mut lanes = [0.0f32; 8];
        // SAFETY: `lanes` holds 8 writable f32.
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), v) };
        lanes.iter().sum::<f32>() + x[i..].iter().sum::<f32>()
    }
}
