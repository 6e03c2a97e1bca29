//! Drivers: layout, block split and threads. They never touch a SIMD type; every piece of
//! arithmetic goes through a kernel dispatched on the configured [`Backend`].
//!
//! The split of the tensor into pieces (NCHW) or row blocks (NHWC) depends only on the shape, and
//! partial results are combined in a fixed order, so results are bit-identical for any thread
//! count and for sequential execution.

mod nchw;
mod nhwc;

pub(crate) use crate::kernels::{ChannelAffine, DxParams, Fuse, GradSums};
use crate::kernels::{Io, ReluGrad};
use crate::par::SharedMut;
use crate::simd::Backend;
use crate::{ChannelStats, Layout, Parallelism, Shape};

/// Elements per unit of work: an NCHW piece of a run, or the target size of an NHWC row block.
/// Large enough to amortize task and fold overheads, small enough to stay in L2 with its output.
pub(crate) const BLOCK: usize = 16 * 1024;

/// What a driver needs to know about a call.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Ctx {
    pub shape: Shape,
    pub layout: Layout,
    pub par: Parallelism,
    pub backend: Backend,
}

impl Ctx {
    /// NCHW with HW = 1 is the same memory as NHWC: use the row driver, which vectorizes it.
    fn effective_layout(&self) -> Layout {
        if self.shape.hw() == 1 {
            Layout::Nhwc
        } else {
            self.layout
        }
    }
}

/// Per-channel normalization parameters from the channel's statistics.
pub(crate) type MakeAffine<'a> = &'a (dyn Fn(usize, &ChannelStats) -> ChannelAffine + Sync);
/// Per-channel dx parameters from the channel's backward sums.
pub(crate) type MakeDx<'a> = &'a (dyn Fn(usize, &GradSums) -> DxParams + Sync);

/// Where a streaming op reads from: a separate slice, or the output buffer itself (in place).
#[derive(Clone, Copy)]
pub(crate) enum Src<'a> {
    Separate(&'a [f32]),
    InPlace,
}

impl<'a> Src<'a> {
    /// The kernel stream for elements `start..start + len`: read from this source, write `out`.
    ///
    /// # Safety
    /// No other live slice of `out` may overlap the range.
    unsafe fn io(self, out: &SharedMut<'a>, start: usize, len: usize) -> Io<'a> {
        // SAFETY: forwarded to the caller.
        let dst = unsafe { out.slice(start, len) };
        match self {
            Src::Separate(x) => Io::Separate(&x[start..start + len], dst),
            Src::InPlace => Io::InPlace(dst),
        }
    }

    /// The input elements `start..start + len`.
    ///
    /// # Safety
    /// For `InPlace`, no mutable slice of `out` overlapping the range may be alive.
    unsafe fn view(self, out: &SharedMut<'a>, start: usize, len: usize) -> &'a [f32] {
        match self {
            Src::Separate(x) => &x[start..start + len],
            // SAFETY: forwarded to the caller.
            Src::InPlace => unsafe { out.slice(start, len) },
        }
    }
}

/// Checks the statistics of one run or block channel: a non-finite result (squares that
/// overflowed the f32 lanes, or NaN/Inf data) is recomputed from the values in f64 by `exact`.
#[inline(always)]
fn checked_stats(s: ChannelStats, exact: impl FnOnce() -> ChannelStats) -> ChannelStats {
    if s.mean().is_finite() && s.m2().is_finite() {
        s
    } else {
        exact()
    }
}

/// Checks the f32-lane backward sums of one run or block channel: non-finite sums (products that
/// overflowed f32, or NaN/Inf data) are recomputed from the values in f64 by `exact`.
#[inline(always)]
fn checked_sums(g: GradSums, exact: impl FnOnce() -> GradSums) -> GradSums {
    if g.dy.is_finite() && g.xdy.is_finite() && g.x.is_finite() {
        g
    } else {
        exact()
    }
}

/// Backward sums of paired values `(x, dy)` relative to `pivot`, in f64.
fn exact_sums(pairs: impl Iterator<Item = (f32, f32)>, pivot: f32) -> GradSums {
    pairs.fold(GradSums::default(), |s, (x, g)| {
        let (d, g) = (x as f64 - pivot as f64, g as f64);
        GradSums {
            dy: s.dy + g,
            xdy: s.xdy + d * g,
            x: s.x + d,
        }
    })
}

/// Per-channel statistics of `x` into `out` (one per channel).
pub(crate) fn statistics(ctx: &Ctx, x: &[f32], out: &mut [ChannelStats]) {
    match ctx.effective_layout() {
        Layout::Nchw => nchw::statistics(ctx, x, out),
        Layout::Nhwc => nhwc::statistics(ctx, x, out),
    }
}

/// Applies one affine map per channel (inference, or the frozen-statistics dx), then the
/// epilogue `fuse` (its residual a whole tensor).
pub(crate) fn normalize(
    ctx: &Ctx,
    (src, fuse): (Src<'_>, Fuse<'_>),
    dst: &mut [f32],
    params: &[ChannelAffine],
) {
    match ctx.effective_layout() {
        Layout::Nchw => nchw::normalize(ctx, (src, fuse), dst, params),
        Layout::Nhwc => nhwc::normalize(ctx, (src, fuse), dst, params),
    }
}

/// Training forward: statistics (into `stats`, one per channel), then `make(c, stats)` per
/// channel, then normalize and the epilogue `fuse`.
pub(crate) fn training(
    ctx: &Ctx,
    (x, fuse): (&[f32], Fuse<'_>),
    y: &mut [f32],
    make: MakeAffine<'_>,
    stats: &mut [ChannelStats],
) {
    match ctx.effective_layout() {
        Layout::Nchw => nchw::training(ctx, (x, fuse), y, make, stats),
        Layout::Nhwc => nhwc::training(ctx, (x, fuse), y, make, stats),
    }
}

/// Backward: per-channel sums of dy, (x − pivot)·dy and (x − pivot), then `make(c, sums)`, then
/// `dx = a·dy + b·(x − shift) + c`. With `make = None` only the sums are computed. The sums go
/// to `sums` (one per channel).
pub(crate) fn backward(
    ctx: &Ctx,
    x: &[f32],
    dy: Src<'_>,
    dx: &mut [f32],
    pivots: &[f32],
    make: Option<MakeDx<'_>>,
    sums: &mut [GradSums],
) {
    match ctx.effective_layout() {
        Layout::Nchw => nchw::backward(ctx, x, dy, dx, pivots, make, sums),
        Layout::Nhwc => nhwc::backward(ctx, x, dy, dx, pivots, make, sums),
    }
}

/// The dx pass of [`backward`] alone, with per-channel parameters computed beforehand (the
/// synchronized backward, whose parameters need the sums of every rank).
pub(crate) fn dx(ctx: &Ctx, x: &[f32], dy: Src<'_>, dx: &mut [f32], params: &[DxParams]) {
    match ctx.effective_layout() {
        Layout::Nchw => nchw::dx(ctx, x, dy, dx, params),
        Layout::Nhwc => nhwc::dx(ctx, x, dy, dx, params),
    }
}

/// ReLU's backward through its output, elementwise (any layout): `out = dy` where `y > 0`,
/// else 0. `dy`, `y` and `out` have the same length.
pub(crate) fn relu_grad(ctx: &Ctx, dy: &[f32], y: &[f32], out: &mut [f32]) {
    let n = out.len().min(dy.len()).min(y.len());
    let shared = SharedMut::new(out);
    ctx.par.for_each(n.div_ceil(BLOCK), BLOCK, |b| {
        let (start, len) = (b * BLOCK, BLOCK.min(n - b * BLOCK));
        // SAFETY: each block is visited once and blocks are disjoint.
        let io = unsafe { Src::Separate(dy).io(&shared, start, len) };
        let y = &y[start..start + len];
        ctx.backend.dispatch(ReluGrad { io, y });
    });
}
