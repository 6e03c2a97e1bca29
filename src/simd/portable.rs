//! Portable backend on `wide::f32x8`: its instructions are chosen when the crate is compiled.

use wide::f32x8;

use super::Simd;

/// Token for the portable backend; always available.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Portable;

impl Simd for Portable {
    const LANES: usize = 8;
    type V = f32x8;

    #[inline(always)]
    fn splat(self, x: f32) -> f32x8 {
        f32x8::splat(x)
    }
    #[inline(always)]
    fn load(self, s: &[f32]) -> f32x8 {
        match s.first_chunk::<8>() {
            Some(a) => f32x8::new(*a),
            None => self.load_partial(s, 0.0),
        }
    }
    #[inline(always)]
    fn store(self, s: &mut [f32], v: f32x8) {
        match s.first_chunk_mut::<8>() {
            Some(a) => *a = v.to_array(),
            None => self.store_partial(s, v),
        }
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
