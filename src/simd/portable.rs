//! Portable backend on `wide::f32x8`: its instructions are chosen when the crate is compiled.

use wide::{f32x8, f64x4};

use super::{Simd, Thunk, Wide64};

/// Token for the portable backend; always available.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Portable;

impl Simd for Portable {
    const LANES: usize = 8;
    const REGISTERS: usize = 16;
    type T = f32;
    type V = f32x8;

    /// Not inlined: the one instance of each portable kernel, in a frame of its own (an
    /// unoptimized build would otherwise keep the portable kernel's locals, 0.75 MB for the
    /// NHWC normalize, in [`super::Backend::dispatch`]'s frame, under every x86 entry point's).
    #[inline(never)]
    fn enter<K: Thunk>(self, k: K) -> K::Output {
        k.call()
    }

    #[inline(always)]
    fn splat(self, x: f32) -> f32x8 {
        f32x8::splat(x)
    }
    #[inline(always)]
    unsafe fn load_ptr(self, p: *const f32) -> f32x8 {
        // SAFETY: the caller guarantees 8 readable f32 at `p`; `[f32; 8]` has no alignment
        // requirement beyond f32's, and `read_unaligned` needs none.
        f32x8::new(unsafe { p.cast::<[f32; 8]>().read_unaligned() })
    }
    #[inline(always)]
    unsafe fn store_ptr(self, p: *mut f32, v: f32x8) {
        // SAFETY: the caller guarantees 8 writable f32 at `p`.
        unsafe { p.cast::<[f32; 8]>().write_unaligned(v.to_array()) }
    }
    #[inline(always)]
    unsafe fn load_f16_ptr(self, p: *const u16) -> f32x8 {
        // SAFETY: the caller guarantees 8 readable u16 at `p`.
        let bits = unsafe { p.cast::<[u16; 8]>().read_unaligned() };
        f32x8::new(bits.map(|b| half::f16::from_bits(b).to_f32()))
    }
    #[inline(always)]
    unsafe fn store_f16_ptr(self, p: *mut u16, v: f32x8) {
        let bits = v.to_array().map(|x| half::f16::from_f32(x).to_bits());
        // SAFETY: the caller guarantees 8 writable u16 at `p`.
        unsafe { p.cast::<[u16; 8]>().write_unaligned(bits) }
    }
    #[inline(always)]
    fn load_f16_partial(self, bits: &[u16]) -> f32x8 {
        let mut lanes = [0.0f32; 8];
        for (l, &b) in lanes.iter_mut().zip(bits) {
            *l = half::f16::from_bits(b).to_f32();
        }
        f32x8::new(lanes)
    }
    #[inline(always)]
    fn load_bf16_partial(self, bits: &[u16]) -> f32x8 {
        let mut lanes = [0.0f32; 8];
        for (l, &b) in lanes.iter_mut().zip(bits) {
            *l = f32::from_bits((b as u32) << 16);
        }
        f32x8::new(lanes)
    }
    #[inline(always)]
    fn store_f16_partial(self, out: &mut [u16], v: f32x8) {
        let mut bits = [0; 8];
        // SAFETY: `bits` holds 8 writable u16.
        unsafe { self.store_f16_ptr(bits.as_mut_ptr(), v) };
        let n = out.len().min(8);
        out[..n].copy_from_slice(&bits[..n]);
    }
    #[inline(always)]
    fn store_bf16_partial(self, out: &mut [u16], v: f32x8) {
        let mut bits = [0; 8];
        // SAFETY: `bits` holds 8 writable u16.
        unsafe { self.store_bf16_ptr(bits.as_mut_ptr(), v) };
        let n = out.len().min(8);
        out[..n].copy_from_slice(&bits[..n]);
    }
    #[inline(always)]
    unsafe fn load_bf16_ptr(self, p: *const u16) -> f32x8 {
        // SAFETY: the caller guarantees 8 readable u16 at `p`.
        let bits = unsafe { p.cast::<[u16; 8]>().read_unaligned() };
        f32x8::new(bits.map(|b| f32::from_bits((b as u32) << 16)))
    }
    #[inline(always)]
    unsafe fn store_bf16_ptr(self, p: *mut u16, v: f32x8) {
        let bits = v.to_array().map(|x| half::bf16::from_f32(x).to_bits());
        // SAFETY: the caller guarantees 8 writable u16 at `p`.
        unsafe { p.cast::<[u16; 8]>().write_unaligned(bits) }
    }
    #[inline(always)]
    fn add(self, a: f32x8, b: f32x8) -> f32x8 {
        a + b
    }
    #[inline(always)]
    fn sub(self, a: f32x8, b: f32x8) -> f32x8 {
        a - b
    }
    #[inline(always)]
    fn mul(self, a: f32x8, b: f32x8) -> f32x8 {
        a * b
    }
    #[inline(always)]
    fn mul_add(self, a: f32x8, b: f32x8, c: f32x8) -> f32x8 {
        a.mul_add(b, c)
    }
    #[inline(always)]
    fn relu(self, v: f32x8) -> f32x8 {
        let zero = f32x8::ZERO;
        zero.simd_gt(v).select(zero, v)
    }
    #[inline(always)]
    fn where_positive(self, v: f32x8, m: f32x8) -> f32x8 {
        let zero = f32x8::ZERO;
        m.simd_gt(zero).select(v, zero)
    }
    #[inline(always)]
    fn reduce_add(self, v: f32x8) -> f32 {
        v.reduce_add()
    }

    type W = [f64x4; 2];
    #[inline(always)]
    fn splat_w(self, x: f64) -> [f64x4; 2] {
        [f64x4::splat(x); 2]
    }
    #[inline(always)]
    fn widen(self, v: f32x8) -> [f64x4; 2] {
        let a = v.to_array().map(f64::from);
        [
            f64x4::new([a[0], a[1], a[2], a[3]]),
            f64x4::new([a[4], a[5], a[6], a[7]]),
        ]
    }
    #[inline(always)]
    unsafe fn load_widen_ptr(self, p: *const f32) -> [f64x4; 2] {
        // SAFETY: forwarded to the caller (8 readable f32 at `p`).
        self.widen(unsafe { self.load_ptr(p) })
    }
    #[inline(always)]
    unsafe fn load_w_ptr(self, p: *const f64) -> [f64x4; 2] {
        // SAFETY: the caller guarantees 8 readable f64 at `p`; `read_unaligned` needs no alignment.
        unsafe {
            [
                f64x4::new(p.cast::<[f64; 4]>().read_unaligned()),
                f64x4::new(p.add(4).cast::<[f64; 4]>().read_unaligned()),
            ]
        }
    }
    #[inline(always)]
    unsafe fn store_w_ptr(self, p: *mut f64, v: [f64x4; 2]) {
        // SAFETY: the caller guarantees 8 writable f64 at `p`.
        unsafe {
            p.cast::<[f64; 4]>().write_unaligned(v[0].to_array());
            p.add(4).cast::<[f64; 4]>().write_unaligned(v[1].to_array());
        }
    }
    #[inline(always)]
    fn add_w(self, a: [f64x4; 2], b: [f64x4; 2]) -> [f64x4; 2] {
        [a[0] + b[0], a[1] + b[1]]
    }
    #[inline(always)]
    fn reduce_add_w(self, v: [f64x4; 2]) -> f64 {
        (v[0] + v[1]).reduce_add()
    }

    #[inline(always)]
    fn load_partial(self, s: &[f32], fill: f32) -> f32x8 {
        let mut buf = [fill; 8];
        let n = s.len().min(8);
        buf[..n].copy_from_slice(&s[..n]);
        f32x8::new(buf)
    }
    #[inline(always)]
    fn store_partial(self, s: &mut [f32], v: f32x8) {
        let buf = v.to_array();
        let n = s.len().min(8);
        s[..n].copy_from_slice(&buf[..n]);
    }
}

impl Wide64 for Portable {
    #[inline(always)]
    fn sub_w(self, a: [f64x4; 2], b: [f64x4; 2]) -> [f64x4; 2] {
        [a[0] - b[0], a[1] - b[1]]
    }
    #[inline(always)]
    fn mul_w(self, a: [f64x4; 2], b: [f64x4; 2]) -> [f64x4; 2] {
        [a[0] * b[0], a[1] * b[1]]
    }
    #[inline(always)]
    fn mul_add_w(self, a: [f64x4; 2], b: [f64x4; 2], c: [f64x4; 2]) -> [f64x4; 2] {
        [a[0].mul_add(b[0], c[0]), a[1].mul_add(b[1], c[1])]
    }
    #[inline(always)]
    fn relu_w(self, v: [f64x4; 2]) -> [f64x4; 2] {
        let zero = f64x4::ZERO;
        v.map(|v| zero.simd_gt(v).select(zero, v))
    }
    #[inline(always)]
    fn where_positive_w(self, v: [f64x4; 2], m: [f64x4; 2]) -> [f64x4; 2] {
        let zero = f64x4::ZERO;
        [
            m[0].simd_gt(zero).select(v[0], zero),
            m[1].simd_gt(zero).select(v[1], zero),
        ]
    }
    #[inline(always)]
    fn load_partial_w(self, s: &[f64], fill: f64) -> [f64x4; 2] {
        let mut buf = [fill; 8];
        let n = s.len().min(8);
        buf[..n].copy_from_slice(&s[..n]);
        // SAFETY: `buf` holds 8 readable f64.
        unsafe { self.load_w_ptr(buf.as_ptr()) }
    }
    #[inline(always)]
    fn store_partial_w(self, s: &mut [f64], v: [f64x4; 2]) {
        let mut buf = [0.0; 8];
        // SAFETY: `buf` holds 8 writable f64.
        unsafe { self.store_w_ptr(buf.as_mut_ptr(), v) };
        let n = s.len().min(8);
        s[..n].copy_from_slice(&buf[..n]);
    }
}
