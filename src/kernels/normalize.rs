//! Fused normalize + affine: `y = scale·(x − shift) + bias`, one subtract and one FMA per element.
//!
//! The subtract keeps the accuracy of large-offset data (see `NUMERICS.md`): `x − shift` is exact
//! when x is within a factor of two of the shift (Sterbenz), so the rounding of the folded bias
//! `bias − scale·shift` never enters. A constant channel yields `x − shift = 0` and so `y = bias`.

use super::expand_periodic;
use crate::simd::{Kernel, Simd};

/// Where a streaming kernel reads its input and writes its output: two slices, or one in place.
pub(crate) trait InOut {
    fn len(&self) -> usize;
    fn src(&self) -> &[f32];
    fn dst(&mut self) -> &mut [f32];
}

/// Read `src`, write `dst` (the shorter length counts).
pub(crate) struct OutOfPlace<'a> {
    pub src: &'a [f32],
    pub dst: &'a mut [f32],
}

impl InOut for OutOfPlace<'_> {
    #[inline(always)]
    fn len(&self) -> usize {
        self.src.len().min(self.dst.len())
    }
    #[inline(always)]
    fn src(&self) -> &[f32] {
        self.src
    }
    #[inline(always)]
    fn dst(&mut self) -> &mut [f32] {
        self.dst
    }
}

/// Read and overwrite the same slice.
pub(crate) struct InPlace<'a>(pub &'a mut [f32]);

impl InOut for InPlace<'_> {
    #[inline(always)]
    fn len(&self) -> usize {
        self.0.len()
    }
    #[inline(always)]
    fn src(&self) -> &[f32] {
        self.0
    }
    #[inline(always)]
    fn dst(&mut self) -> &mut [f32] {
        self.0
    }
}

/// A lane-wise map applied by [`stream`]. A trait with `#[inline(always)]` methods rather than a
/// closure: a closure may be compiled out of line, outside the target-feature entry point, where its
/// intrinsics would become calls.
pub(crate) trait VectorMap<S: Simd> {
    /// The output vector for input `x` at `phase` (offset modulo the period).
    fn apply(&self, s: S, phase: usize, x: S::V) -> S::V;
}

/// Applies `op` to every vector of the stream (whole vectors, then one partial vector), passing
/// each vector's offset modulo `period` (a multiple of the lane count).
#[inline(always)]
pub(crate) fn stream<S: Simd, IO: InOut>(s: S, mut io: IO, period: usize, op: &impl VectorMap<S>) {
    let (n, l) = (io.len(), S::LANES);
    let (mut i, mut phase) = (0, 0);
    while i + l <= n {
        let v = s.load(&io.src()[i..]);
        s.store(&mut io.dst()[i..], op.apply(s, phase, v));
        i += l;
        phase += l;
        if phase >= period {
            phase = 0;
        }
    }
    if i < n {
        let v = s.load_partial(&io.src()[i..n], 0.0);
        s.store_partial(&mut io.dst()[i..n], op.apply(s, phase, v));
    }
}

/// `scale·(x − shift) + bias` with the same parameters in every lane.
struct Splat<V> {
    shift: V,
    scale: V,
    bias: V,
}

impl<S: Simd> VectorMap<S> for Splat<S::V> {
    #[inline(always)]
    fn apply(&self, s: S, _: usize, x: S::V) -> S::V {
        s.mul_add(s.sub(x, self.shift), self.scale, self.bias)
    }
}

/// `scale[p]·(x − shift[p]) + bias[p]` with parameters per position of the period.
struct Periodic {
    shift: Vec<f32>,
    scale: Vec<f32>,
    bias: Vec<f32>,
}

impl<S: Simd> VectorMap<S> for Periodic {
    #[inline(always)]
    fn apply(&self, s: S, p: usize, x: S::V) -> S::V {
        let k = s.load(&self.shift[p..]);
        s.mul_add(
            s.sub(x, k),
            s.load(&self.scale[p..]),
            s.load(&self.bias[p..]),
        )
    }
}

/// `y = scale·(x − shift) + bias` on one contiguous run of one channel.
pub(crate) struct AffineRun<IO> {
    pub io: IO,
    pub shift: f32,
    pub scale: f32,
    pub bias: f32,
}

impl<IO: InOut> Kernel for AffineRun<IO> {
    type Output = ();

    #[inline(always)]
    fn run<S: Simd>(self, s: S) {
        let op = Splat {
            shift: s.splat(self.shift),
            scale: s.splat(self.scale),
            bias: s.splat(self.bias),
        };
        stream(s, self.io, S::LANES, &op);
    }
}

/// `y = scale[c]·(x − shift[c]) + bias[c]` over whole rows of `shift.len()` interleaved channels.
pub(crate) struct AffinePeriodic<'a, IO> {
    pub io: IO,
    pub shift: &'a [f32],
    pub scale: &'a [f32],
    pub bias: &'a [f32],
}

impl<IO: InOut> Kernel for AffinePeriodic<'_, IO> {
    type Output = ();

    #[inline(always)]
    fn run<S: Simd>(self, s: S) {
        let c = self.shift.len().min(self.scale.len()).min(self.bias.len());
        if c == 0 {
            return;
        }
        let per = super::period(c, S::LANES);
        let op = Periodic {
            shift: expand_periodic(&self.shift[..c], per),
            scale: expand_periodic(&self.scale[..c], per),
            bias: expand_periodic(&self.bias[..c], per),
        };
        stream(s, self.io, per, &op);
    }
}
