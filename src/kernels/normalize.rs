//! Fused normalize + affine: `y = scale·(x − shift) + bias`, one subtract and one FMA per element.
//!
//! The subtract keeps the accuracy of large-offset data (see `NUMERICS.md`): `x − shift` is exact
//! when x is within a factor of two of the shift (Sterbenz), so the rounding of the folded bias
//! `bias − scale·shift` never enters. A constant channel yields `x − shift = 0` and so `y = bias`.
//!
//! Where the shift is +0 (the per-channel math folds it into the bias when that costs no accuracy,
//! see `channel::fold_shift`), `x − shift` is `x` itself for every x, −0 and NaN included, and the
//! maps skip the subtract: one FMA per element, the same results.

use super::stream::{
    InOut, MAX_GROUP, Param, VectorMap, WIDE_GROUP, column_group, group_vectors, lane_group,
    stream, stream_alike, stream_alike_nt, stream_columns, stream_paired, stream_periodic_nt,
    stream_periods, stream_run, stream_run_nt, stream_strips, strip_width, use_columns, wide_group,
};
use super::{AffineLanes, PeriodicLanes};
use crate::simd::{Kernel, Real, Simd};

/// `y = scale·(x − shift) + bias` for one channel.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(crate) struct ChannelAffine<T = f32> {
    pub shift: T,
    pub scale: T,
    pub bias: T,
}

/// What a fused normalize does after the affine map, on the kernel's range: add a residual `z`
/// (the same range of a tensor of the output's shape), then ReLU.
/// (Public only in name, like the traits below: this module is private.)
#[derive(Debug)]
pub struct Fuse<'a, E = f32> {
    pub z: Option<&'a [E]>,
    pub relu: bool,
}

// Not derived: the derives would require `E: Copy` / `E: Default`, which a shared slice does not
// need.
impl<E> Clone for Fuse<'_, E> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<E> Copy for Fuse<'_, E> {}
impl<E> Default for Fuse<'_, E> {
    fn default() -> Self {
        Fuse {
            z: None,
            relu: false,
        }
    }
}

impl<'a, E> Fuse<'a, E> {
    /// The epilogue for elements `start..start + len` (the residual sliced alike).
    #[inline(always)]
    pub(crate) fn range(self, start: usize, len: usize) -> Fuse<'a, E> {
        Fuse {
            z: self.z.map(|z| &z[start..start + len]),
            relu: self.relu,
        }
    }
}

/// The last step of a fused map, applied to its result `y` and the second input `z`. (Public
/// only in name: a bound of [`AffineKernel`], whose kernels implement the crate's [`Kernel`].)
pub trait Finish: Copy + Default {
    /// Whether `z` is read.
    const BINARY: bool;
    fn finish<S: Simd>(self, s: S, y: S::V, z: S::V) -> S::V;
}

/// No epilogue: `y` itself.
#[derive(Clone, Copy, Default)]
struct Plain;
#[derive(Clone, Copy, Default)]
struct Relu;
#[derive(Clone, Copy, Default)]
struct AddRelu;

impl Finish for Plain {
    const BINARY: bool = false;
    #[inline(always)]
    fn finish<S: Simd>(self, _: S, y: S::V, _: S::V) -> S::V {
        y
    }
}

impl Finish for Relu {
    const BINARY: bool = false;
    #[inline(always)]
    fn finish<S: Simd>(self, s: S, y: S::V, _: S::V) -> S::V {
        s.relu(y)
    }
}

impl Finish for AddRelu {
    const BINARY: bool = true;
    #[inline(always)]
    fn finish<S: Simd>(self, s: S, y: S::V, z: S::V) -> S::V {
        s.relu(s.add(y, z))
    }
}

/// `finish(op(x), z)`: a unary map followed by an epilogue, in the same register pass.
#[derive(Clone, Copy)]
struct Then<M, F> {
    op: M,
    finish: F,
}

impl<S: Simd, M: VectorMap<S>, F: Finish> VectorMap<S> for Then<M, F> {
    const BINARY: bool = F::BINARY;
    #[inline(always)]
    fn apply(&self, s: S, phase: usize, x: S::V, z: S::V) -> S::V {
        self.finish.finish(s, self.op.apply(s, phase, x, x), z)
    }
}

/// Whether a shift is +0, so that `x − shift` is `x` for every x and a map may skip the subtract.
#[inline(always)]
fn unshifted<T: Real>(shift: T) -> bool {
    let v: f64 = shift.into();
    v.to_bits() == 0
}

/// Whether any of `params` has a shift other than +0 ([`unshifted`]).
pub(crate) fn any_shifted<T: Real>(params: &[ChannelAffine<T>]) -> bool {
    !params.iter().all(|p| unshifted(p.shift))
}

/// `x − shift` where the map subtracts (`SHIFT`), `x` itself where every shift is +0.
#[inline(always)]
fn shifted<S: Simd, const SHIFT: bool>(s: S, x: S::V, shift: impl FnOnce() -> S::V) -> S::V {
    if SHIFT { s.sub(x, shift()) } else { x }
}

/// Evaluates `$body` with the constant `$shift` true when `$cond` holds, false otherwise (one
/// monomorphized loop each).
macro_rules! with_shift {
    ($cond:expr, |$shift:ident| $body:expr) => {{
        if $cond {
            const $shift: bool = true;
            $body
        } else {
            const $shift: bool = false;
            $body
        }
    }};
}

impl<'a, E> Fuse<'a, E> {
    /// `op` followed by the epilogue `F`, and the residual to stream beside the input (none
    /// unless `F` reads one). [`enter_pinned`] picks `F` from this `Fuse`.
    #[inline(always)]
    fn then<M: Copy, F: Finish>(self, op: &M) -> (Then<M, F>, Option<&'a [E]>) {
        let finish = F::default();
        (
            Then { op: *op, finish },
            if F::BINARY { self.z } else { None },
        )
    }
}

/// An affine kernel whose map comes in compile-time variants: with or without the subtract
/// (`SHIFT`), and one epilogue ([`Finish`]) each. Its [`Kernel::run`] ([`enter_pinned`]) runs
/// the variant it asks for.
pub trait AffineKernel: Sized {
    type T: Real;
    type Elem;
    /// Whether there is nothing to do.
    fn is_empty(&self) -> bool;
    /// Whether the map subtracts: a shift other than +0 in some channel it reads.
    fn shifted(&self) -> bool;
    fn fuse(&self) -> Fuse<'_, Self::Elem>;
    /// The kernel in the variant `SHIFT`, `F` (`F` as [`AffineKernel::fuse`] asks for).
    fn run_pinned<S: Simd<T = Self::T>, const SHIFT: bool, F: Finish>(self, s: S);
}

impl<K: AffineKernel> Kernel for K {
    type T = K::T;
    type Output = ();

    #[inline(always)]
    fn run<S: Simd<T = K::T>>(self, s: S) {
        if !self.is_empty() {
            enter_pinned(s, self)
        }
    }
}

// `K` pinned to one variant of its map, on token `S`: what `enter_pinned` enters.
thunk!(Pinned[K, S, const SHIFT: bool, F] for [K, S, SHIFT, F] (k: K, s: S, _finish: F)
    where [K: AffineKernel, S: Simd<T = K::T>, F: Finish]
    -> () => k.run_pinned::<S, SHIFT, F>(s));

/// Runs `k` in the variant its parameters and epilogue ask for, each variant (one monomorphized
/// loop per subtract and epilogue) in an entry point of its own ([`Simd::enter`]). Measured in
/// the dev profile (AMD EPYC family 25 model 1, AVX2): the NHWC normalize's six variants in one
/// frame took 0.9 MB of stack, 1.5 MB on AVX-512.
#[inline(always)]
fn enter_pinned<S: Simd<T = K::T>, K: AffineKernel>(s: S, k: K) {
    let fuse = k.fuse();
    with_shift!(k.shifted(), |SHIFT| match (fuse.z.is_some(), fuse.relu) {
        (false, false) => s.enter(Pinned::<_, _, SHIFT, _>(k, s, Plain)),
        (false, true) => s.enter(Pinned::<_, _, SHIFT, _>(k, s, Relu)),
        // A residual is only fused with ReLU (`relu(bn(x) + z)`).
        (true, _) => s.enter(Pinned::<_, _, SHIFT, _>(k, s, AddRelu)),
    })
}

/// `scale·(x − shift) + bias` with the same parameters in every lane.
#[derive(Clone, Copy)]
struct Splat<V, const SHIFT: bool> {
    shift: V,
    scale: V,
    bias: V,
}

impl<V: Copy, const SHIFT: bool> Splat<V, SHIFT> {
    #[inline(always)]
    fn new<S: Simd<V = V>>(s: S, p: &ChannelAffine<S::T>) -> Self {
        Splat {
            shift: s.splat(p.shift),
            scale: s.splat(p.scale),
            bias: s.splat(p.bias),
        }
    }
}

impl<S: Simd, const SHIFT: bool> VectorMap<S> for Splat<S::V, SHIFT> {
    #[inline(always)]
    fn apply(&self, s: S, _: usize, x: S::V, _: S::V) -> S::V {
        let x = shifted::<S, SHIFT>(s, x, || self.shift);
        s.mul_add(x, self.scale, self.bias)
    }
}

/// `scale[p]·(x − shift[p]) + bias[p]` with parameters per position of the period.
#[derive(Clone, Copy)]
struct Periodic<'a, T, const SHIFT: bool> {
    shift: &'a [T],
    scale: &'a [T],
    bias: &'a [T],
}

impl<S: Simd, const SHIFT: bool> VectorMap<S> for Periodic<'_, S::T, SHIFT> {
    #[inline(always)]
    fn apply(&self, s: S, p: usize, x: S::V, _: S::V) -> S::V {
        debug_assert!(p + S::LANES <= self.shift.len().min(self.scale.len()).min(self.bias.len()));
        // SAFETY: the phase `p` lies inside the period and every array holds the period plus
        // MAX_LANES ≥ LANES values (built by `PeriodicLanes::new`).
        unsafe {
            let x = shifted::<S, SHIFT>(s, x, || s.load_ptr(self.shift.as_ptr().add(p)));
            let a = s.load_ptr(self.scale.as_ptr().add(p));
            s.mul_add(x, a, s.load_ptr(self.bias.as_ptr().add(p)))
        }
    }
}

/// `scale·(x − shift) + bias` with one parameter vector per vector of a register group.
#[derive(Clone, Copy)]
struct GroupAffine<V, const G: usize, const SHIFT: bool> {
    shift: [V; G],
    scale: [V; G],
    bias: [V; G],
}

impl<V: Copy, const G: usize, const SHIFT: bool> GroupAffine<V, G, SHIFT> {
    #[inline(always)]
    fn new<S: Simd<V = V>>(s: S, params: &[ChannelAffine<S::T>]) -> Self {
        GroupAffine {
            shift: group_vectors(s, params, |p| p.shift),
            scale: group_vectors(s, params, |p| p.scale),
            bias: group_vectors(s, params, |p| p.bias),
        }
    }

    /// The first `G·LANES` positions of periodic lanes (missing positions 0).
    #[inline(always)]
    fn from_lanes<S: Simd<V = V>>(s: S, [shift, scale, bias]: [&[S::T]; 3]) -> Self {
        GroupAffine {
            shift: lane_group(s, shift),
            scale: lane_group(s, scale),
            bias: lane_group(s, bias),
        }
    }
}

impl<S: Simd, const G: usize, const SHIFT: bool> VectorMap<S> for GroupAffine<S::V, G, SHIFT> {
    #[inline(always)]
    fn apply(&self, s: S, phase: usize, x: S::V, _: S::V) -> S::V {
        let g = phase / S::LANES;
        let x = shifted::<S, SHIFT>(s, x, || self.shift[g]);
        s.mul_add(x, self.scale[g], self.bias[g])
    }
}

/// `y = scale·(x − shift) + bias` on one contiguous run of one channel, then the epilogue.
pub(crate) struct AffineRun<'a, IO: InOut> {
    pub io: IO,
    pub p: ChannelAffine<Param<IO>>,
    /// On the same range as `io`.
    pub fuse: Fuse<'a, IO::Elem>,
    /// Store the output past the caches ([`stream_run_nt`]): the tensors are larger than the
    /// last-level cache.
    pub streaming: bool,
}

impl<IO: InOut> AffineKernel for AffineRun<'_, IO> {
    type T = Param<IO>;
    type Elem = IO::Elem;
    fn is_empty(&self) -> bool {
        false
    }
    fn shifted(&self) -> bool {
        !unshifted(self.p.shift)
    }
    fn fuse(&self) -> Fuse<'_, IO::Elem> {
        self.fuse
    }
    #[inline(always)]
    fn run_pinned<S: Simd<T = Param<IO>>, const SHIFT: bool, F: Finish>(self, s: S) {
        if self.streaming {
            return s.enter(RunPastCaches::<_, _, SHIFT, _>(s, self, F::default()));
        }
        let op = Splat::<S::V, SHIFT>::new(s, &self.p);
        let (op, z) = self.fuse.then::<_, F>(&op);
        stream_alike(s, self.io, z, &op)
    }
}

thunk!(RunPastCaches['a, S, IO: InOut, const SHIFT: bool, F]
for ['a, S, IO, SHIFT, F] (s: S, k: AffineRun<'a, IO>, _finish: F)
where [S: Simd<T = Param<IO>>, F: Finish]
-> () => {
    let op = Splat::<S::V, SHIFT>::new(s, &k.p);
    let (op, z) = k.fuse.then::<_, F>(&op);
    stream_alike_nt(s, k.io, z, &op);
    s.stream_fence();
});

impl<IO: InOut> AffineRuns<'_, IO> {
    /// The runs of the first `n` elements in memory order ([`Runs`]).
    #[inline(always)]
    fn runs(&self, n: usize) -> Runs {
        let c = self.params.len();
        Runs {
            c,
            run: self.run,
            n,
            ch: self.first % c,
            start: 0,
        }
    }

    /// Elements the kernel covers: the stream's, or its residual's if shorter.
    #[inline(always)]
    fn covered(&self) -> usize {
        self.fuse
            .z
            .map_or(self.io.len(), |z| z.len().min(self.io.len()))
    }
}

/// The runs of an [`AffineRuns`] call: `(channel, start, len)` for each, the channel counted up
/// and wrapped at `c` (no division per run: runs may be a few dozen elements).
struct Runs {
    c: usize,
    run: usize,
    n: usize,
    ch: usize,
    start: usize,
}

impl Iterator for Runs {
    type Item = (usize, usize, usize);
    #[inline(always)]
    fn next(&mut self) -> Option<Self::Item> {
        if self.start >= self.n || self.run == 0 {
            return None;
        }
        let item = (self.ch, self.start, self.run.min(self.n - self.start));
        self.start += item.2;
        self.ch = if self.ch + 1 == self.c {
            0
        } else {
            self.ch + 1
        };
        Some(item)
    }
}

thunk!(RunsPastCaches['a, S, IO: InOut, const SHIFT: bool, F]
for ['a, S, IO, SHIFT, F] (s: S, k: AffineRuns<'a, IO>, _finish: F)
where [S: Simd<T = Param<IO>>, F: Finish]
-> () => {
    let mut k = k;
    let n = k.covered();
    let (src, dst) = k.io.ptrs();
    for (ch, start, len) in k.runs(n) {
        let op = Splat::<S::V, SHIFT>::new(s, &k.params[ch]);
        let (op, z) = k.fuse.then::<_, F>(&op);
        let x2 = z.map_or(src, <[IO::Elem]>::as_ptr);
        // SAFETY: `start + len <= n`, the length `ptrs` (and the residual) are valid for.
        unsafe {
            let p = (src.add(start), x2.add(start), dst.add(start));
            stream_run_nt(s, p, len, &op);
        }
    }
    s.stream_fence();
});

/// `y = scale[c]·(x − shift[c]) + bias[c]` over consecutive runs of `run` elements, one channel per
/// run, channels cycling through `0..shift.len()` starting at `first` (NCHW memory order), then
/// the epilogue. Short runs in one call avoid a dispatch per run.
pub(crate) struct AffineRuns<'a, IO: InOut> {
    pub io: IO,
    pub run: usize,
    pub first: usize,
    pub params: &'a [ChannelAffine<Param<IO>>],
    /// Whether any channel's shift is other than +0 ([`any_shifted`]; false: the map skips the
    /// subtract; true: every run subtracts, exactly `x` where its shift is +0).
    pub shifted: bool,
    /// On the same range as `io` (its residual at least `io.len()` long).
    pub fuse: Fuse<'a, IO::Elem>,
    /// Store the output past the caches ([`stream_run_nt`]): the tensors are larger than the
    /// last-level cache.
    pub streaming: bool,
}

impl<IO: InOut> AffineKernel for AffineRuns<'_, IO> {
    type T = Param<IO>;
    type Elem = IO::Elem;
    fn is_empty(&self) -> bool {
        self.params.is_empty() || self.run == 0
    }
    fn shifted(&self) -> bool {
        self.shifted
    }
    fn fuse(&self) -> Fuse<'_, IO::Elem> {
        self.fuse
    }
    #[inline(always)]
    fn run_pinned<S: Simd<T = Param<IO>>, const SHIFT: bool, F: Finish>(mut self, s: S) {
        if self.streaming {
            return s.enter(RunsPastCaches::<_, _, SHIFT, _>(s, self, F::default()));
        }
        let n = self.covered();
        let (src, dst) = self.io.ptrs();
        for (ch, start, len) in self.runs(n) {
            let op = Splat::<S::V, SHIFT>::new(s, &self.params[ch]);
            let (op, z) = self.fuse.then::<_, F>(&op);
            let x2 = z.map_or(src, <[IO::Elem]>::as_ptr);
            // SAFETY: `start + len <= n`, the length `ptrs` (and the residual) are valid for.
            unsafe {
                let p = (src.add(start), x2.add(start), dst.add(start));
                stream_run(s, p, len, &op);
            }
        }
    }
}

/// `y = scale[c]·(x − shift[c]) + bias[c]` over whole rows of `params.len()` interleaved
/// channels, then the epilogue; `lanes` are the parameters' periodic lanes
/// ([`AffineLanes::affine`]).
pub(crate) struct AffineRows<'a, IO: InOut> {
    pub io: IO,
    pub params: &'a [ChannelAffine<Param<IO>>],
    pub lanes: &'a AffineLanes<Param<IO>>,
    /// `lanes` in the order of interleaved bfloat16 pairs ([`super::paired_lanes`]), where the
    /// data and backend want them.
    pub paired: Option<&'a AffineLanes<Param<IO>>>,
    /// Whether any channel's shift is other than +0 ([`any_shifted`]; false: the maps skip the
    /// subtract).
    pub shifted: bool,
    /// On the same range as `io`.
    pub fuse: Fuse<'a, IO::Elem>,
    /// Store the output past the caches (the tensors are larger than the last-level cache) where
    /// the rows' parameter lanes fit their share of L1 ([`stream_periodic_nt`]); wider rows keep
    /// the strips' plain stores.
    pub streaming: bool,
}

impl<T: Real> AffineLanes<T> {
    /// The periodic lanes of `params`.
    pub(crate) fn affine(params: &[ChannelAffine<T>]) -> AffineLanes<T> {
        PeriodicLanes::new(params, |p| [p.shift, p.scale, p.bias])
    }
}

impl<IO: InOut> AffineKernel for AffineRows<'_, IO> {
    type T = Param<IO>;
    type Elem = IO::Elem;
    fn is_empty(&self) -> bool {
        self.params.is_empty()
    }
    fn shifted(&self) -> bool {
        self.shifted
    }
    fn fuse(&self) -> Fuse<'_, IO::Elem> {
        self.fuse
    }
    /// The rows, with (`SHIFT`) or without the subtract, then the epilogue `F`.
    #[inline(always)]
    fn run_pinned<S: Simd<T = Param<IO>>, const SHIFT: bool, F: Finish>(self, s: S) {
        let c = self.params.len();
        const G: usize = MAX_GROUP;
        let [shift, scale, bias] = &self.lanes.fields;
        let period = self.lanes.period;
        // Stored past the caches: rows whose parameter lanes fit their share of L1, by the lanes
        // (wider rows keep the strips). In memory-bound passes the lanes' loads from L1 cost
        // nothing measurable: NHWC 32x64x56x56 inference, whose plain pass keeps the parameters
        // in registers, took 1451–1491 µs this way against 1786–2108 µs with a register-group
        // walk stored past the caches (one thread, Zen 4, two runs of 5 and 7 alternated rounds
        // on a noisy host; 32 and 48 channels within 0.79–1.11 either way).
        // The lanes the map reads: without the subtract, scale and bias only (see below).
        let read = if SHIFT { 3 } else { 2 };
        if self.streaming && strip_width::<S::T, IO::Elem>(period, read).is_none() {
            return s.enter(PeriodsPastCaches::<_, _, SHIFT, _>(s, self, F::default()));
        }
        if wide_group::<S>(period, 3) {
            // The same on 256-bit vectors with 32 registers (`Avx2Vl`): groups of 8 vectors.
            const W: usize = WIDE_GROUP;
            let op = GroupAffine::<S::V, W, SHIFT>::from_lanes(s, [shift, scale, bias]);
            let (op, z) = self.fuse.then::<_, F>(&op);
            stream_periods::<S, _, W>(s, self.io, z, period, &op);
            return;
        }
        if period <= G * S::LANES && column_group::<S>(3) >= G {
            // Narrow rows whose period fits a register group (C = 16 or 32 on AVX-512, 8 or 16 on
            // AVX2): the period's parameters in registers, whole groups per row of one period.
            let op = GroupAffine::<S::V, G, SHIFT>::from_lanes(s, [shift, scale, bias]);
            let (op, z) = self.fuse.then::<_, F>(&op);
            stream_periods::<S, _, G>(s, self.io, z, period, &op);
            return;
        }
        if use_columns::<S>(c, G) && column_group::<S>(3) >= G {
            let mut io = self.io;
            for first in (0..c).step_by(G * S::LANES) {
                let op = GroupAffine::<S::V, G, SHIFT>::new(s, &self.params[first..]);
                let (op, z) = self.fuse.then::<_, F>(&op);
                stream_columns::<S, _, G>(s, &mut io, z, (c, first, G * S::LANES), &op);
            }
            return;
        }
        let op = Periodic::<_, SHIFT> { shift, scale, bias };
        // The strips hold the lanes the map reads: without the subtract, scale and bias only.
        // Measured (one thread, AMD EPYC family 25 model 17, NHWC inference, counting 3 lanes →
        // 2): f32 1x1024x14x14 28.7 → 24.6 µs, 256x2048x1x1 79.6 → 73.6; bf16 1x1024x14x14
        // 18.5 → 16.2, 256x2048x1x1 49.9 → 48.0; 64x8192x1x1 unchanged.
        let (op, z) = self.fuse.then::<_, F>(&op);
        if let (None, Some(paired)) = (strip_width::<S::T, IO::Elem>(period, read), self.paired) {
            let [shift, scale, bias] = &paired.fields;
            let paired = Periodic::<_, SHIFT> { shift, scale, bias };
            let (paired, _) = self.fuse.then::<_, F>(&paired);
            stream_paired(s, self.io, z, period, (&op, &paired));
            return;
        }
        match strip_width::<S::T, IO::Elem>(period, read) {
            Some(strip) => stream_strips(s, self.io, z, (c, period, strip), &op),
            None => stream(s, self.io, z, period, &op),
        }
    }
}
/// `y = scale·(x − shift) + bias` over part of one row of interleaved channels, from the channel
/// of `lanes`' first lane on (the head and tail of NHWC rows peeled to aligned outputs, see the
/// NHWC driver's `normalize`), then the epilogue: the periodic lanes' plain walk, which takes
/// any length.
pub(crate) struct AffineRowPart<'a, IO: InOut> {
    pub io: IO,
    pub lanes: &'a AffineLanes<Param<IO>>,
    /// As [`AffineRows::shifted`].
    pub shifted: bool,
    /// On the same range as `io`.
    pub fuse: Fuse<'a, IO::Elem>,
}

impl<IO: InOut> AffineKernel for AffineRowPart<'_, IO> {
    type T = Param<IO>;
    type Elem = IO::Elem;
    fn is_empty(&self) -> bool {
        self.io.len() == 0 || self.lanes.period == 0
    }
    fn shifted(&self) -> bool {
        self.shifted
    }
    fn fuse(&self) -> Fuse<'_, IO::Elem> {
        self.fuse
    }
    #[inline(always)]
    fn run_pinned<S: Simd<T = Param<IO>>, const SHIFT: bool, F: Finish>(self, s: S) {
        let [shift, scale, bias] = &self.lanes.fields;
        let op = Periodic::<_, SHIFT> { shift, scale, bias };
        let (op, z) = self.fuse.then::<_, F>(&op);
        stream(s, self.io, z, self.lanes.period, &op);
    }
}

thunk!(PeriodsPastCaches['a, S, IO: InOut, const SHIFT: bool, F]
for ['a, S, IO, SHIFT, F] (s: S, k: AffineRows<'a, IO>, _finish: F)
where [S: Simd<T = Param<IO>>, F: Finish]
-> () => {
    let mut k = k;
    let [shift, scale, bias] = &k.lanes.fields;
    let op = Periodic::<_, SHIFT> { shift, scale, bias };
    let (op, z) = k.fuse.then::<_, F>(&op);
    let (src, dst) = k.io.ptrs();
    // The elements `io` and the residual both hold.
    let n = z.map_or(k.io.len(), |z| z.len().min(k.io.len()));
    let x2 = z.map_or(src, <[IO::Elem]>::as_ptr);
    // SAFETY: the pointers are valid for `n` elements (`io` and the residual); the lanes hold
    // the period plus `MAX_LANES` values (`PeriodicLanes::new`).
    unsafe { stream_periodic_nt(s, (src, x2, dst), n, k.lanes.period, &op) };
    s.stream_fence();
});

// SAFETY: plain f32/f64 fields: all-zero is a valid value, no drop glue, alignment ≤ 8.
unsafe impl<T: Real> crate::scratch::Zeroable for ChannelAffine<T> {}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::kernels::stream::Io;
    use crate::simd::Backend;

    /// Values with every kind of f32 bit pattern the map meets: ordinary ones of both signs,
    /// ±0, subnormals, NaN and ±Inf.
    pub(in crate::kernels) fn values(n: usize) -> Vec<f32> {
        (0..n)
            .map(|i| match i % 23 {
                0 => f32::NAN,
                1 => f32::INFINITY,
                2 => -0.0,
                3 => f32::from_bits(0x0000_0031),
                4 => f32::NEG_INFINITY,
                _ => (i as f32 * 0.37 - 40.0) * if i % 2 == 0 { 1.0 } else { -1.5 },
            })
            .collect()
    }

    /// Bits of the guard values around a kernel's output range: a quiet NaN no kernel writes.
    pub(in crate::kernels) const GUARD: u32 = 0x7FC0_1234;

    /// Runs `kernel` on elements `off..off + n` of a buffer of `n + 32` guard values, reading `x`
    /// at the same positions (copied into the buffer first for `in_place`); the whole buffer.
    pub(in crate::kernels) fn guarded(
        x: &[f32],
        off: usize,
        n: usize,
        in_place: bool,
        kernel: impl FnOnce(Io<'_, f32>),
    ) -> Vec<f32> {
        let mut out = vec![f32::from_bits(GUARD); n + 32];
        let range = off..off + n;
        if in_place {
            out[range.clone()].copy_from_slice(&x[range.clone()]);
        }
        let dst = &mut out[range.clone()];
        kernel(if in_place {
            Io::InPlace(dst)
        } else {
            Io::Separate(&x[range], dst)
        });
        out
    }

    /// Asserts that a [`guarded`] buffer kept its guard values outside `off..off + n`.
    fn assert_guards_kept(out: &[f32], off: usize, n: usize, what: &str) {
        assert!(
            out[..off]
                .iter()
                .chain(&out[off + n..])
                .all(|v| v.to_bits() == GUARD),
            "{what} n {n} offset {off}: wrote outside its range"
        );
    }

    /// NHWC rows stored past the caches ([`AffineRows`] with `streaming`) write exactly what the
    /// plain rows write (whose walks differ: a register group per period or row, or periodic
    /// lanes), on every backend: 7, 8, 16, 24, 32, 48, 64 and 80 channels; every output start
    /// within a line (so every phase offset of the lanes), whole and partial last rows and
    /// periods, in place, with and without the subtract, ReLU and a residual; nothing written
    /// outside the range.
    #[test]
    fn streaming_rows_match_plain_rows() {
        for backend in Backend::available() {
            for c in [7usize, 8, 16, 24, 32, 48, 64, 80] {
                let params: Vec<ChannelAffine> = (0..c)
                    .map(|k| ChannelAffine {
                        shift: k as f32 * 0.25 - 1.0,
                        scale: 1.0 + k as f32 * 0.125,
                        bias: 0.5 - k as f32,
                    })
                    .collect();
                let unshifted: Vec<ChannelAffine> = params
                    .iter()
                    .map(|p| ChannelAffine { shift: 0.0, ..*p })
                    .collect();
                for rows in [0usize, 1, 2, 5, 9] {
                    let n = rows * c;
                    for off in 0..16 {
                        let x = values(n + 32);
                        let z = values(n + 32).into_iter().rev().collect::<Vec<_>>();
                        for (shifted, params) in [(true, &params), (false, &unshifted)] {
                            let lanes = AffineLanes::affine(params);
                            for (relu, residual) in [(false, false), (true, false), (true, true)] {
                                let run = |streaming: bool, in_place: bool| {
                                    guarded(&x, off, n, in_place, |io| {
                                        backend.dispatch(AffineRows {
                                            io,
                                            params,
                                            lanes: &lanes,
                                            paired: None,
                                            shifted,
                                            fuse: Fuse {
                                                z: residual.then_some(&z[off..off + n]),
                                                relu,
                                            },
                                            streaming,
                                        })
                                    })
                                };
                                for in_place in [false, true] {
                                    let bits = |v: &[f32]| {
                                        v.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
                                    };
                                    let (plain, streamed) =
                                        (run(false, in_place), run(true, in_place));
                                    assert_eq!(
                                        bits(&plain),
                                        bits(&streamed),
                                        "{backend:?} c {c} rows {rows} offset {off} shifted \
                                         {shifted} relu {relu} residual {residual} in place \
                                         {in_place}"
                                    );
                                    assert!(
                                        streamed[..off]
                                            .iter()
                                            .chain(&streamed[off + n..])
                                            .all(|v| v.to_bits() == GUARD),
                                        "{backend:?} c {c} rows {rows} offset {off}: wrote \
                                         outside its range"
                                    );
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    /// f64 data stored past the caches (two native vectors per lane vector, aligned to the whole
    /// lane vector: 128 bytes on AVX-512) write exactly what the plain stores write, on every
    /// backend: one run ([`AffineRun`]) and NHWC rows of 7 and 24 channels ([`AffineRows`]),
    /// every output start within 128 bytes, lengths around the group size; nothing written
    /// outside the range.
    #[test]
    fn streaming_f64_matches_plain_f64() {
        const GUARD64: u64 = 0x7FF8_0000_DEAD_BEEF;
        let p = ChannelAffine {
            shift: 1.5f64,
            scale: -0.75,
            bias: 2.0,
        };
        for backend in Backend::available() {
            for n in [0usize, 1, 17, 63, 64, 65, 255, 257, 1031] {
                let x: Vec<f64> = values(n + 32).iter().map(|&v| f64::from(v) / 3.0).collect();
                for off in 0..16 {
                    for c in [0usize, 7, 24] {
                        let n = n.checked_div(c).map_or(n, |rows| rows * c);
                        let params = vec![p; c.max(1)];
                        let lanes = AffineLanes::affine(&params);
                        let run = |streaming: bool| {
                            let mut out = vec![f64::from_bits(GUARD64); n + 32];
                            let io = Io::Separate(&x[off..off + n], &mut out[off..off + n]);
                            let fuse = Fuse::default();
                            if c == 0 {
                                backend.dispatch(AffineRun {
                                    io,
                                    p,
                                    fuse,
                                    streaming,
                                });
                            } else {
                                backend.dispatch(AffineRows {
                                    io,
                                    params: &params,
                                    lanes: &lanes,
                                    paired: None,
                                    shifted: true,
                                    fuse,
                                    streaming,
                                });
                            }
                            out.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
                        };
                        let (plain, streamed) = (run(false), run(true));
                        let at = format!("{backend:?} n {n} offset {off} c {c}");
                        assert_eq!(plain, streamed, "{at}");
                        let outside = streamed[..off].iter().chain(&streamed[off + n..]);
                        assert!(outside.into_iter().all(|&b| b == GUARD64), "{at}");
                        assert!(plain[off..off + n].iter().all(|&b| b != GUARD64), "{at}");
                    }
                }
            }
        }
    }

    /// The plain walks of one channel's runs peel a long run's head up to its first aligned output
    /// vector (`peel_head`): from every start of the output within a 64-byte line, on every
    /// backend, separate and in place, one run and consecutive runs, lengths around the peel's
    /// threshold (16 vectors of every backend) and primes, each output is its element's own map
    /// `scale·(x − shift) + bias`, rounded as the backend rounds it, and nothing outside the
    /// range is written.
    #[test]
    fn plain_runs_from_every_start_are_the_elementwise_map() {
        let params = [
            ChannelAffine {
                shift: 1.5f32,
                scale: 0.75,
                bias: -2.0,
            },
            ChannelAffine {
                shift: -7.0,
                scale: 1e-3,
                bias: 1e3,
            },
        ];
        for backend in Backend::available() {
            let map = |x: f32, p: &ChannelAffine<f32>| {
                if backend.fused_mul_add() {
                    (x - p.shift).mul_add(p.scale, p.bias)
                } else {
                    (x - p.shift) * p.scale + p.bias
                }
            };
            for n in [1usize, 17, 127, 128, 129, 255, 256, 257, 521, 1031] {
                let x = values(n + 32);
                for off in 0..16 {
                    for in_place in [false, true] {
                        // One run (channel 0), and two runs of about n/2 (channels 0 and 1).
                        for runs in [1, 2] {
                            let run = n.div_ceil(runs);
                            let out = guarded(&x, off, n, in_place, |io| {
                                let fuse = Fuse::default();
                                if runs == 1 {
                                    backend.dispatch(AffineRun {
                                        io,
                                        p: params[0],
                                        fuse,
                                        streaming: false,
                                    });
                                } else {
                                    backend.dispatch(AffineRuns {
                                        io,
                                        run,
                                        first: 0,
                                        params: &params,
                                        shifted: true,
                                        fuse,
                                        streaming: false,
                                    });
                                }
                            });
                            for (i, (&got, &x)) in
                                out[off..off + n].iter().zip(&x[off..]).enumerate()
                            {
                                let want = map(x, &params[i / run]);
                                assert!(
                                    got.to_bits() == want.to_bits()
                                        || (got.is_nan() && want.is_nan()),
                                    "{backend:?} n {n} offset {off} in place {in_place} runs {runs} \
                                     element {i}: {got} against {want}"
                                );
                            }
                            assert_guards_kept(&out, off, n, &format!("{backend:?}"));
                        }
                    }
                }
            }
        }
    }

    /// The kernels that store past the caches (`streaming`) write exactly what the plain ones
    /// write, bit for bit, and nothing outside their range: on every backend, every start of the
    /// output within a 64-byte line (the peeled head), lengths around the group size and primes,
    /// separate and in place, each epilogue, one run and consecutive runs of three channels.
    #[test]
    fn streaming_stores_match_plain_stores() {
        let params = [
            ChannelAffine {
                shift: 1.5,
                scale: 0.75,
                bias: -2.0,
            },
            ChannelAffine {
                shift: 0.0,
                scale: -3.0,
                bias: 0.5,
            },
            ChannelAffine {
                shift: -7.0,
                scale: 1e-3,
                bias: 1e3,
            },
        ];
        let lengths = [0, 1, 15, 16, 17, 63, 64, 65, 97, 191, 257, 1031];
        for backend in Backend::available() {
            for &n in &lengths {
                // 16 guard values on either side; `off` moves the output's start within a line.
                for off in 0..16 {
                    let x = values(n + 32);
                    let z = values(n + 32).into_iter().rev().collect::<Vec<_>>();
                    for relu in [false, true] {
                        for residual in [false, true] {
                            let run = |streaming: bool, in_place: bool| {
                                guarded(&x, off, n, in_place, |io| {
                                    let fz = Fuse {
                                        z: residual.then_some(&z[off..off + n]),
                                        relu: relu || residual,
                                    };
                                    if n % 2 == 0 {
                                        backend.dispatch(AffineRun {
                                            io,
                                            p: params[0],
                                            fuse: fz,
                                            streaming,
                                        });
                                    } else {
                                        backend.dispatch(AffineRuns {
                                            io,
                                            run: n.div_ceil(3).max(1),
                                            first: 1,
                                            params: &params,
                                            shifted: true,
                                            fuse: fz,
                                            streaming,
                                        });
                                    }
                                })
                            };
                            for in_place in [false, true] {
                                let plain = run(false, in_place);
                                let streamed = run(true, in_place);
                                let bits =
                                    |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                                assert_eq!(
                                    bits(&plain),
                                    bits(&streamed),
                                    "{backend:?} n {n} offset {off} relu {relu} residual \
                                     {residual} in place {in_place}"
                                );
                                assert_guards_kept(&streamed, off, n, &format!("{backend:?}"));
                            }
                        }
                    }
                }
            }
        }
    }
}
