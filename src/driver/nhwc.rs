//! NHWC driver: the tensor is N·HW rows of C interleaved channels, split into fixed blocks of
//! whole rows (about `BLOCK` elements each). Per-channel lanes run down the rows of a block; block
//! results are folded per channel in block order.

use super::{
    BLOCK, ChannelAffine, Ctx, MakeAffine, MakeDx, Src, checked_stats, checked_sums, exact_sums,
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
        Blocks::with_target(ctx, BLOCK)
    }
    /// Blocks of about `target` elements (at least [`MIN_ROWS`] rows).
    fn with_target(ctx: &Ctx, target: usize) -> Blocks {
        let c = ctx.shape.c();
        Blocks {
            c,
            rows: ctx.shape.per_channel(),
            rows_per_block: (target / c).max(MIN_ROWS),
        }
    }
    /// Rows of block `b`.
    fn rows_of(&self, b: usize) -> usize {
        self.range(b).1 / self.c
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

/// Elements per statistics block: larger than [`BLOCK`] because each block costs a few f64
/// operations per channel (its mean, M2 and the merge), which the rows must amortize. The two
/// passes only need one register group's columns of the block in cache, not the whole block.
const STATS_BLOCK: usize = 4 * BLOCK;

pub(super) fn statistics(ctx: &Ctx, x: &[f32]) -> Vec<ChannelStats> {
    let blocks = Blocks::with_target(ctx, STATS_BLOCK);
    let c = blocks.c;
    let block = |offset: usize, len: usize| {
        let data = &x[offset..offset + len];
        let mut out = vec![ChannelStats::default(); c];
        ctx.backend.dispatch(MomentsRows {
            x: data,
            c,
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
    let parts = ctx.par.map(blocks.count(), 1, |b| {
        let (offset, len) = blocks.range(b);
        block(offset, len)
    });
    // Fold in block order; every channel of a block has the block's row count, so the merge
    // weights are computed once per block.
    let mut total = vec![ChannelStats::default(); c];
    let mut done = 0u64;
    for (b, part) in parts.iter().enumerate() {
        let rows = blocks.rows_of(b) as u64;
        let weights = ChannelStats::merge_weights(done, rows);
        for (t, p) in total.iter_mut().zip(part) {
            *t = if done > 0 && t.count() == done && p.count() == rows {
                t.merge_weighted(p, weights)
            } else {
                t.merge(p)
            };
        }
        done += rows;
    }
    total
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
    // The reduction takes the statistics' larger blocks (fewer per-channel folds); dx the
    // normal ones.
    let blocks = Blocks::with_target(ctx, STATS_BLOCK);
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
    let blocks = Blocks::new(ctx);
    ctx.par.for_each(blocks.count(), 1, |b| {
        let (offset, len) = blocks.range(b);
        let xs = &x[offset..offset + len];
        // SAFETY: each block is visited once and blocks are disjoint.
        let io = unsafe { dy.io(&out, offset, len) };
        ctx.backend.dispatch(DxPeriodic { x: xs, io, params });
    });
    sums
}
