//! NHWC driver: the tensor is N·HW rows of C interleaved channels, split into fixed blocks of
//! whole rows (about `BLOCK` elements each). Per-channel lanes run down the rows of a block; block
//! results are folded per channel in block order.

use super::{
    BLOCK, ChannelAffine, Ctx, MakeAffine, MakeDx, Src, checked_stats, checked_sums, exact_sums,
    pivot,
};
use crate::ChannelStats;
use crate::kernels::{AffinePeriodic, DxParams, DxPeriodic, GradSums, GradSumsRows, MomentsRows};
use crate::par::SharedMut;

/// Fewest rows per block: each block costs one f64 merge per lane and channel, which this many
/// rows amortize.
const MIN_ROWS: usize = 64;

/// The fixed split of the rows into blocks.
#[derive(Clone, Copy)]
struct Blocks {
    c: usize,
    rows: usize,
    rows_per_block: usize,
}

impl Blocks {
    fn new(ctx: &Ctx) -> Blocks {
        let c = ctx.shape.c();
        Blocks {
            c,
            rows: ctx.shape.per_channel(),
            rows_per_block: (BLOCK / c).max(MIN_ROWS),
        }
    }
    fn count(&self) -> usize {
        self.rows.div_ceil(self.rows_per_block)
    }
    /// Element range (offset, len) of block `b`.
    fn range(&self, b: usize) -> (usize, usize) {
        let first = b * self.rows_per_block;
        let rows = self.rows_per_block.min(self.rows - first);
        (first * self.c, rows * self.c)
    }
}

/// Reduces every block to one value per channel and folds them per channel in block order.
fn reduce<R: Copy + Default + Send>(
    ctx: &Ctx,
    blocks: &Blocks,
    block: impl Fn(usize, usize) -> Vec<R> + Send + Sync,
    fold: impl Fn(R, R) -> R,
) -> Vec<R> {
    let parts = ctx.par.map(blocks.count(), 1, |b| {
        let (offset, len) = blocks.range(b);
        block(offset, len)
    });
    let mut total = vec![R::default(); blocks.c];
    for part in &parts {
        for (t, &p) in total.iter_mut().zip(part) {
            *t = fold(*t, p);
        }
    }
    total
}

pub(super) fn statistics(ctx: &Ctx, x: &[f32]) -> Vec<ChannelStats> {
    let blocks = Blocks::new(ctx);
    let c = blocks.c;
    let piv: Vec<f32> = x[..c].iter().map(|&v| pivot(v)).collect();
    let block = |offset: usize, len: usize| {
        let data = &x[offset..offset + len];
        let mut out = vec![ChannelStats::default(); c];
        ctx.backend.dispatch(MomentsRows {
            x: data,
            pivots: &piv,
            out: &mut out,
        });
        for (ch, s) in out.iter_mut().enumerate() {
            *s = checked_stats(*s, || {
                let values: Vec<f32> = data.iter().skip(ch).step_by(c).copied().collect();
                ChannelStats::from_values(&values)
            });
        }
        out
    };
    reduce(ctx, &blocks, block, |a, b| a.merge(&b))
}

pub(super) fn normalize(ctx: &Ctx, src: Src<'_>, dst: &mut [f32], params: &[ChannelAffine]) {
    let blocks = Blocks::new(ctx);
    let out = SharedMut::new(dst);
    ctx.par.for_each(blocks.count(), 1, |b| {
        let (offset, len) = blocks.range(b);
        // SAFETY: each block is visited once and blocks are disjoint.
        let io = unsafe { src.io(&out, offset, len) };
        ctx.backend.dispatch(AffinePeriodic { io, params });
    });
}

pub(super) fn training(
    ctx: &Ctx,
    x: &[f32],
    y: &mut [f32],
    make: MakeAffine<'_>,
) -> Vec<ChannelStats> {
    let stats = statistics(ctx, x);
    let params: Vec<ChannelAffine> = stats.iter().enumerate().map(|(c, s)| make(c, s)).collect();
    normalize(ctx, Src::Separate(x), y, &params);
    stats
}

pub(super) fn backward(
    ctx: &Ctx,
    x: &[f32],
    dy: Src<'_>,
    dx: &mut [f32],
    pivots: &[f32],
    make: Option<MakeDx<'_>>,
) -> Vec<GradSums> {
    let blocks = Blocks::new(ctx);
    let out = SharedMut::new(dx);
    let block = |offset: usize, len: usize| {
        // SAFETY: this phase only reads; dx is written after every block was reduced.
        let g = unsafe { dy.view(&out, offset, len) };
        let mut sums = vec![GradSums::default(); blocks.c];
        let xs = &x[offset..offset + len];
        ctx.backend.dispatch(GradSumsRows {
            x: xs,
            dy: g,
            pivots,
            out: &mut sums,
        });
        let c = blocks.c;
        for (ch, s) in sums.iter_mut().enumerate() {
            *s = checked_sums(*s, || {
                let pairs = xs.iter().zip(g).skip(ch).step_by(c);
                exact_sums(pairs.map(|(&a, &b)| (a, b)), pivots[ch])
            });
        }
        sums
    };
    let sums = reduce(ctx, &blocks, block, GradSums::add);
    let Some(make) = make else { return sums };
    let params: Vec<DxParams> = sums.iter().enumerate().map(|(c, g)| make(c, g)).collect();
    let params = &params[..];
    ctx.par.for_each(blocks.count(), 1, |b| {
        let (offset, len) = blocks.range(b);
        let xs = &x[offset..offset + len];
        // SAFETY: each block is visited once and blocks are disjoint.
        let io = unsafe { dy.io(&out, offset, len) };
        ctx.backend.dispatch(DxPeriodic { x: xs, io, params });
    });
    sums
}
