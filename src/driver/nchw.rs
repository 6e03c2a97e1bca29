//! NCHW driver: each channel is N contiguous runs of HW values, split into fixed pieces of at most
//! `BLOCK` elements. Reductions fold the pieces of a channel in (n, piece) order.
//!
//! Two schedules give bit-identical results: *fused* (one task per channel: reduce its pieces,
//! then normalize them while they are still in L2) for one sample with enough channels to keep
//! the threads busy, and *two-phase* (all pieces reduced in parallel, folded per channel, then all
//! pieces normalized in parallel, both sweeps in memory order) otherwise.
//!
//! With several samples, training and backward always reduce first and write in a separate
//! sweep in memory order ([`writes_in_memory_order`]): a channel's runs then lie C·HW apart, and
//! writing them channel after channel is slow.

use super::{
    BLOCK, ChannelAffine, Ctx, Fuse, Grad, Make, MakeAffine, MakeDx, Src, check_stats, check_sums,
    exact_sums, make_all, make_one, streaming_output,
};
use crate::ChannelStats;
use crate::element::Element;
use crate::kernels::{
    AffineRun, AffineRuns, DxParams, DxRun, DxRuns, GradSums, GradSumsRun, GradSumsRuns,
    MomentsChannel, MomentsRun, MomentsRuns, any_shifted,
};
use crate::par::SharedMut;
use crate::scratch::{self, Zeroable};

/// Applies per-channel parameters to one piece.
type Apply<'a, P> = &'a (dyn Fn(Piece, &P) + Sync);

/// One piece: channel, flat offset, length.
#[derive(Clone, Copy)]
struct Piece {
    c: usize,
    offset: usize,
    len: usize,
}

/// The fixed split of the tensor into pieces, channel by channel.
#[derive(Clone, Copy)]
struct Pieces {
    n: usize,
    c: usize,
    hw: usize,
    per_run: usize,
}

impl Pieces {
    fn new(ctx: &Ctx) -> Pieces {
        let s = ctx.shape;
        Pieces {
            n: s.n(),
            c: s.c(),
            hw: s.hw(),
            per_run: s.hw().div_ceil(BLOCK),
        }
    }
    fn per_channel(&self) -> usize {
        self.n * self.per_run
    }
    /// The `u`-th piece of the tensor in memory order (sample, channel, piece).
    fn in_memory_order(&self, u: usize) -> Piece {
        let (run, p) = (u / self.per_run, u % self.per_run);
        self.piece(run % self.c, run / self.c, p)
    }
    /// Calls `f` on every piece, in parallel, in memory order.
    fn for_each_in_memory_order(&self, ctx: &Ctx, f: impl Fn(Piece) + Sync) {
        let piece = BLOCK.min(self.hw);
        ctx.par.for_each(self.c * self.per_channel(), piece, |u| {
            f(self.in_memory_order(u))
        });
    }
    fn piece(&self, c: usize, n: usize, p: usize) -> Piece {
        let start = p * BLOCK;
        Piece {
            c,
            offset: (n * self.c + c) * self.hw + start,
            len: BLOCK.min(self.hw - start),
        }
    }
}

/// Reduce every piece, fold per channel (into `out`, one per channel), derive per-channel
/// parameters, then apply them to every piece. With one sample and enough channels, one task per
/// channel (the fused schedule); otherwise the two-phase schedule, whose reduction and apply
/// sweeps walk the tensor in memory order (sample, channel, piece).
fn pipeline<R, P>(
    ctx: &Ctx,
    reduce: impl Fn(Piece) -> R + Sync,
    fold: impl Fn(R, R) -> R + Sync,
    make: Make<'_, R, P>,
    apply: Option<Apply<'_, P>>,
    out: &mut [R],
) where
    R: Copy + Default + Zeroable,
    P: Zeroable + Default,
{
    let pieces = Pieces::new(ctx);
    if fused(ctx) && pieces.n == 1 {
        // Fused: one task per channel; its data is re-read from cache by `apply`.
        let elems = ctx.shape.per_channel();
        return ctx.par.fill(out, elems, |c| {
            let mut r = R::default();
            for n in 0..pieces.n {
                for p in 0..pieces.per_run {
                    r = fold(r, reduce(pieces.piece(c, n, p)));
                }
            }
            if let Some(apply) = apply {
                let params = make_one(make, c, &r);
                for n in 0..pieces.n {
                    for p in 0..pieces.per_run {
                        apply(pieces.piece(c, n, p), &params);
                    }
                }
            }
            r
        });
    }
    // Two-phase: all pieces reduced in parallel, in memory order, then each channel's results
    // folded in the same order as the fused schedule, then all pieces applied in memory order.
    let piece = BLOCK.min(ctx.shape.hw());
    let mut parts = scratch::zeroed::<R>(pieces.c * pieces.per_channel());
    ctx.par
        .fill(&mut parts, piece, |u| reduce(pieces.in_memory_order(u)));
    let parts = &parts[..];
    ctx.par.fill(out, pieces.per_channel(), |c| {
        let mut r = R::default();
        for n in 0..pieces.n {
            let run = (n * pieces.c + c) * pieces.per_run;
            for &part in &parts[run..run + pieces.per_run] {
                r = fold(r, part);
            }
        }
        r
    });
    if let Some(apply) = apply {
        let params = make_all(make, 0, out);
        pieces.for_each_in_memory_order(ctx, |p| apply(p, &params[p.c]));
    }
}

fn piece_stats<E: Element>(ctx: &Ctx, x: &[E], p: Piece) -> ChannelStats {
    let run = &x[p.offset..p.offset + p.len];
    let mut s = ctx.backend.dispatch(MomentsRun { x: run });
    check_stats(&mut s, || ChannelStats::from_values(run));
    s
}

fn merge(a: ChannelStats, b: ChannelStats) -> ChannelStats {
    a.merge(&b)
}

/// Channels of at most this many values are reduced whole, one kernel call for all their runs
/// ([`MomentsChannel`]), the second pass reading the channel from L2 (128 KiB: a quarter of the
/// smallest L2 we run on). Larger channels go by pieces. The choice depends on the shape only, so
/// results do not depend on the thread count.
const CHANNEL_FITS: usize = 32 * 1024;

fn whole_channels(ctx: &Ctx) -> bool {
    // With one sample a channel is one run: the grouped short-run kernels (one call for many
    // channels) cost less per channel than a call per channel (measured: 1x1024x7x7 training
    // 1.9× slower this way).
    ctx.shape.n() > 1 && ctx.shape.per_channel() <= CHANNEL_FITS
}

/// Statistics of channel `c` from one kernel call over its runs.
fn channel_stats<E: Element>(ctx: &Ctx, x: &[E], c: usize) -> ChannelStats {
    let (n, channels, hw) = (ctx.shape.n(), ctx.shape.c(), ctx.shape.hw());
    let runs = MomentsChannel {
        x: &x[c * hw..],
        run: hw,
        stride: channels * hw,
        count: n,
    };
    let mut s = ctx.backend.dispatch(runs);
    check_stats(&mut s, || {
        let values = scratch::from_fn(n * hw, |i| {
            x[((i / hw) * channels + c) * hw + i % hw].to_param()
        });
        ChannelStats::from_values(&values)
    });
    s
}

/// The whole-channel schedule of the statistics: one task per channel, one kernel call over its
/// runs.
fn channels_whole<E: Element>(ctx: &Ctx, x: &[E], out: &mut [ChannelStats]) {
    ctx.par
        .fill(out, ctx.shape.per_channel(), |c| channel_stats(ctx, x, c))
}

pub(super) fn statistics<E: Element>(ctx: &Ctx, x: &[E], out: &mut [ChannelStats]) {
    if whole_channels(ctx) {
        return channels_whole(ctx, x, out);
    }
    if short_runs_fused(ctx) {
        return short_runs(ctx, x, None, out);
    }
    let no_params = |_: usize, _: &[ChannelStats], _: &mut [()]| {};
    pipeline(
        ctx,
        |p| piece_stats(ctx, x, p),
        merge,
        &no_params,
        None,
        out,
    )
}

/// Where the normalize of a training or statistics schedule writes, how it gets each channel's
/// parameters, and its epilogue.
type Normalize<'a, E> = (
    &'a SharedMut<'a, E>,
    MakeAffine<'a, <E as Element>::Param>,
    Fuse<'a, E>,
);

/// Affine map and epilogue of one piece, reading from `src`, writing into `out`.
fn affine_piece<E: Element>(
    ctx: &Ctx,
    (src, fuse): (Src<'_, E>, Fuse<'_, E>),
    out: &SharedMut<'_, E>,
    piece: Piece,
    p: &ChannelAffine<E::Param>,
    streaming: bool,
) {
    // SAFETY: every piece is applied exactly once and pieces are disjoint, so no other live slice
    // overlaps this one.
    let io = unsafe { src.io(out, piece.offset, piece.len) };
    let fuse = fuse.range(piece.offset, piece.len);
    ctx.backend.for_splat_f16::<E>().dispatch(AffineRun {
        io,
        p: *p,
        fuse,
        streaming,
    });
}

pub(super) fn normalize<E: Element>(
    ctx: &Ctx,
    (src, fuse): (Src<'_, E>, Fuse<'_, E>),
    dst: &mut [E],
    params: &[ChannelAffine<E::Param>],
) {
    let hw = ctx.shape.hw();
    let streaming = streaming_output(ctx, src, dst.len());
    let out = SharedMut::new(dst);
    if hw > BLOCK {
        let pieces = Pieces::new(ctx);
        return pieces.for_each_in_memory_order(ctx, |p| {
            affine_piece(ctx, (src, fuse), &out, p, &params[p.c], streaming)
        });
    }
    // Short runs: tasks of whole consecutive runs (about BLOCK elements), one kernel call each.
    let runs = ctx.shape.n() * ctx.shape.c();
    let per_task = (BLOCK / hw).max(1);
    let shifted = any_shifted(params);
    ctx.par
        .for_each(runs.div_ceil(per_task), per_task * hw, |t| {
            let first = t * per_task;
            let (start, len) = (first * hw, per_task.min(runs - first) * hw);
            // SAFETY: tasks cover disjoint ranges of runs.
            let io = unsafe { src.io(&out, start, len) };
            let first = first % params.len();
            ctx.backend.for_splat_f16::<E>().dispatch(AffineRuns {
                io,
                run: hw,
                first,
                params,
                shifted,
                fuse: fuse.range(start, len),
                streaming,
            });
        });
}

pub(super) fn training<E: Element>(
    ctx: &Ctx,
    (x, fuse): (&[E], Fuse<'_, E>),
    y: &mut [E],
    make: MakeAffine<'_, E::Param>,
    stats: &mut [ChannelStats],
) {
    if writes_in_memory_order(ctx) {
        statistics(ctx, x, stats);
        let params = make_all(make, 0, stats);
        return normalize(ctx, (Src::Separate(x), fuse), y, &params);
    }
    // One sample: each channel is one contiguous run, so the per-channel schedules write in
    // memory order too, and normalize a channel while it is in cache.
    let out = SharedMut::new(y);
    if short_runs_fused(ctx) {
        return short_runs(ctx, x, Some((&out, make, fuse)), stats);
    }
    let src = (Src::Separate(x), fuse);
    let apply = |p: Piece, a: &ChannelAffine<E::Param>| affine_piece(ctx, src, &out, p, a, false);
    pipeline(
        ctx,
        |p| piece_stats(ctx, x, p),
        merge,
        make,
        Some(&apply),
        stats,
    )
}

/// Whether training and backward reduce first (the statistics or sums alone) and then write their
/// output in a separate sweep in memory order, re-reading x (and dy) from L3 or memory rather
/// than from L2. With several samples a channel's runs lie C·HW apart, and the fused schedules,
/// which write each channel's runs before the next channel's, lose more on those writes than the
/// re-read costs. Measured (one thread, AMD EPYC family 25 model 17 (Zen 4), the two builds
/// alternated, best of 7 per process): bf16 NCHW 32x64x56x56 inference took 0.51–0.53 ms in
/// memory order and 1.07–1.35 ms channel by channel; with this schedule, on that tensor, bf16
/// training went from 1.92 to 1.37 ms and backward from 3.37 to 1.88 ms (NHWC, same data: 1.5–1.6
/// and 2.0 ms), f32 training 4.0 → 3.2 ms and backward 6.0 → 5.1 ms; f32 32x256x14x14 backward
/// 0.82 → 0.65 ms. The results are the same bits: only the order of the writes changes.
fn writes_in_memory_order(ctx: &Ctx) -> bool {
    ctx.shape.n() > 1
}

/// Whether [`short_runs`] applies: runs of at most 512 elements and enough channels for the
/// threads (the condition of the fused schedule in [`pipeline`]).
fn short_runs_fused(ctx: &Ctx) -> bool {
    // Measured: from a few thousand values per run the per-run calls of the fused schedule cost
    // nothing, and its per-channel tasks keep the re-read in L2 better than groups of samples.
    const SHORT: usize = 512;
    ctx.shape.hw() <= SHORT && fused(ctx)
}

/// Whether channels alone give the threads enough tasks, so each channel (or group of channels)
/// is one task: reduced, then (with one sample) normalized while its data is in cache. Otherwise
/// the pieces are reduced in parallel first. Both schedules fold in the same order.
fn fused(ctx: &Ctx) -> bool {
    let threads = ctx.threads();
    threads == 1 || ctx.shape.c() >= 4 * threads
}

/// Channels per task of the short-run schedules: at most about 2·BLOCK elements, at least one
/// channel, the groups as even as the channel count allows (1024 channels of 49 values: two
/// groups of 512, not 668 and 356).
fn channel_group(ctx: &Ctx) -> usize {
    let c = ctx.shape.c();
    let most = (2 * BLOCK / ctx.shape.per_channel()).clamp(1, c);
    c.div_ceil(c.div_ceil(most))
}

/// The per-channel results of a group of channels, reduced sample by sample and folded in sample
/// order into `total`. `reduce(sample, out)` writes that sample's result for each channel of the
/// group into `out` and returns its check, `check(j, result)` for channel `j` (in place: the exact
/// fallback of a non-finite result, see `check_stats`). Sample 0 writes straight into `total`
/// (merging into an empty total is a copy); later samples go through one scratch row and `merge`.
/// One loop per sample checks and folds.
fn fold_samples<T: Zeroable + Copy, C: Fn(usize, &mut T)>(
    n: usize,
    total: &mut [T],
    mut reduce: impl FnMut(usize, &mut [T]) -> C,
    merge: impl Fn(&T, T) -> T,
) {
    let mut row = scratch::zeroed::<T>(if n > 1 { total.len() } else { 0 });
    for sample in 0..n {
        if sample == 0 {
            let check = reduce(0, total);
            for (j, t) in total.iter_mut().enumerate() {
                check(j, t);
            }
        } else {
            let check = reduce(sample, &mut row);
            for (j, (t, r)) in total.iter_mut().zip(row.iter_mut()).enumerate() {
                check(j, r);
                *t = merge(t, *r);
            }
        }
    }
}

/// The work of a short-run task per element, in elements of a streaming pass (the unit of
/// [`crate::par::GRAIN`]): both passes of the reduction and the normalizing (or dx) pass, and a
/// per-channel share that dominates short runs. Measured (one thread, AMD EPYC family 26):
/// bf16 1x1024x7x7 NCHW backward 0.6 ns per element, inference of the same tensor 0.07 ns.
const SHORT_RUN_COST: usize = 4;

/// The fused schedule for short runs, with one kernel call per sample and
/// group of channels (not per run): each task takes a group of channels small enough to stay in
/// L2, reduces their runs sample by sample, folds each channel's runs in sample order (the same
/// fold as the per-piece schedules, so results are identical), and normalizes the group (used
/// with one sample; see [`writes_in_memory_order`]). Without `normalize`, only the statistics are
/// computed. The statistics go to `out`.
fn short_runs<E: Element>(
    ctx: &Ctx,
    x: &[E],
    normalize: Option<Normalize<'_, E>>,
    out: &mut [ChannelStats],
) {
    let (n, c, hw) = (ctx.shape.n(), ctx.shape.c(), ctx.shape.hw());
    let group = channel_group(ctx);
    let elems = group * ctx.shape.per_channel() * SHORT_RUN_COST;
    ctx.par.for_chunks(out, group, elems, |g, stats| {
        let first = g * group;
        let k = stats.len();
        let reduce = |sample: usize, out: &mut [ChannelStats]| {
            let offset = (sample * c + first) * hw;
            let seg = &x[offset..offset + k * hw];
            ctx.backend.dispatch(MomentsRuns {
                x: seg,
                run: hw,
                out,
            });
            move |j: usize, d: &mut ChannelStats| {
                check_stats(d, || ChannelStats::from_values(&seg[j * hw..(j + 1) * hw]))
            }
        };
        fold_samples(n, stats, reduce, |a, b| a.merge(&b));
        let Some((out, make, fuse)) = normalize else {
            return;
        };
        let params = make_all(make, first, stats);
        let shifted = any_shifted(&params);
        for sample in 0..n {
            let (start, len) = ((sample * c + first) * hw, k * hw);
            // SAFETY: groups are disjoint ranges of channels, so these ranges are disjoint.
            let io = unsafe { Src::Separate(x).io(out, start, len) };
            ctx.backend.for_splat_f16::<E>().dispatch(AffineRuns {
                io,
                run: hw,
                first: 0,
                params: &params,
                shifted,
                fuse: fuse.range(start, len),
                streaming: false,
            });
        }
    });
}

pub(super) fn backward<E: Element>(
    ctx: &Ctx,
    x: &[E],
    grad: Grad<'_, E>,
    dx: &mut [E],
    pivots: &[E::Param],
    make: Option<MakeDx<'_, E::Param>>,
    sums: &mut [GradSums],
) {
    if let Some(make) = make.filter(|_| writes_in_memory_order(ctx)) {
        backward(ctx, x, grad, dx, pivots, None, sums);
        let params = make_all(make, 0, sums);
        return self::dx(ctx, x, grad.src(), dx, &params);
    }
    let out = SharedMut::new(dx);
    if short_runs_fused(ctx) {
        return backward_short_runs(ctx, (x, grad), &out, pivots, make, sums);
    }
    let dy = grad.src();
    let reduce = |p: Piece| {
        // SAFETY: each piece is reduced once, by one task, which stages its g first (no other
        // slice of it is alive then) and then only reads it; in the fused schedule this channel's
        // pieces are written after all of its reads, in the two-phase schedule after all reads
        // of every channel.
        let g = unsafe {
            grad.stage(ctx, &out, p.offset, p.len);
            dy.view(&out, p.offset, p.len)
        };
        let (run, pivot) = (&x[p.offset..p.offset + p.len], pivots[p.c]);
        let mut sums = ctx.backend.dispatch(GradSumsRun {
            x: run,
            dy: g,
            pivot,
        });
        check_sums(&mut sums, || {
            exact_sums(run.iter().copied().zip(g.iter().copied()), pivot)
        });
        sums
    };
    let dx_streaming = streaming_output(ctx, dy, ctx.shape.len());
    let apply = |p: Piece, dp: &DxParams<E::Param>| {
        // SAFETY: every piece is applied exactly once and pieces are disjoint.
        let io = unsafe { dy.io(&out, p.offset, p.len) };
        let x = &x[p.offset..p.offset + p.len];
        ctx.backend.for_splat_f16::<E>().dispatch(DxRun {
            x,
            io,
            p: *dp,
            streaming: dx_streaming,
        })
    };
    let apply: Option<Apply<'_, DxParams<E::Param>>> = make.map(|_| &apply as _);
    // Without `make` there is no `apply`, and the pipeline makes no parameters.
    let none = |_: usize, _: &[GradSums], _: &mut [DxParams<E::Param>]| {};
    pipeline(
        ctx,
        reduce,
        GradSums::add,
        make.unwrap_or(&none),
        apply,
        sums,
    )
}

/// The backward counterpart of [`short_runs`]: per group of channels, the sums of its runs sample
/// by sample (one kernel call per sample), folded in sample order, then (with `make`, one sample)
/// dx.
fn backward_short_runs<E: Element>(
    ctx: &Ctx,
    (x, grad): (&[E], Grad<'_, E>),
    out: &SharedMut<'_, E>,
    pivots: &[E::Param],
    make: Option<MakeDx<'_, E::Param>>,
    sums: &mut [GradSums],
) {
    let dy = grad.src();
    let (n, c, hw) = (ctx.shape.n(), ctx.shape.c(), ctx.shape.hw());
    let streaming = streaming_output(ctx, dy, ctx.shape.len());
    let group = channel_group(ctx);
    let elems = group * ctx.shape.per_channel() * SHORT_RUN_COST;
    ctx.par.for_chunks(sums, group, elems, |g, sums| {
        let first = g * group;
        let k = sums.len();
        let len = k * hw;
        let p = &pivots[first..first + k];
        let reduce = |sample: usize, sums: &mut [GradSums]| {
            let offset = (sample * c + first) * hw;
            // SAFETY: only this task touches this group's ranges: it stages g (no other slice of
            // the range alive), reads it, and writes dx below, after all of its reads.
            let gs = unsafe {
                grad.stage(ctx, out, offset, len);
                dy.view(out, offset, len)
            };
            let xs = &x[offset..offset + len];
            ctx.backend.dispatch(GradSumsRuns {
                x: xs,
                dy: gs,
                run: hw,
                pivots: p,
                out: sums,
            });
            move |j: usize, r: &mut GradSums| {
                check_sums(r, || {
                    let pairs = xs[j * hw..(j + 1) * hw]
                        .iter()
                        .zip(&gs[j * hw..(j + 1) * hw]);
                    exact_sums(pairs.map(|(&a, &b)| (a, b)), p[j])
                })
            }
        };
        // The kernel's sums start from +0, so sample 0's are what adding them to an empty total
        // gives (a gradient of −0 sums to +0, as in the other schedules: tested).
        fold_samples(n, sums, reduce, |a: &GradSums, b| a.add(b));
        let Some(make) = make else { return };
        let params = make_all(make, first, sums);
        for sample in 0..n {
            let offset = (sample * c + first) * hw;
            let xs = &x[offset..offset + len];
            // SAFETY: groups are disjoint ranges of channels, so these ranges are disjoint.
            let io = unsafe { dy.io(out, offset, len) };
            ctx.backend.for_splat_f16::<E>().dispatch(DxRuns {
                x: xs,
                io,
                run: hw,
                params: &params,
                streaming,
            });
        }
    });
}

/// `dx = a·dy + b·(x − shift) + c` with the given per-channel parameters (the second pass of
/// [`backward`] alone): long runs piece by piece, short runs in tasks of one sample and a group
/// of consecutive channels (one kernel call each).
pub(super) fn dx<E: Element>(
    ctx: &Ctx,
    x: &[E],
    dy: Src<'_, E>,
    dx: &mut [E],
    params: &[DxParams<E::Param>],
) {
    let (n, c, hw) = (ctx.shape.n(), ctx.shape.c(), ctx.shape.hw());
    let streaming = streaming_output(ctx, dy, dx.len());
    let out = SharedMut::new(dx);
    if hw > BLOCK {
        let pieces = Pieces::new(ctx);
        return pieces.for_each_in_memory_order(ctx, |p| {
            // SAFETY: every piece is applied exactly once and pieces are disjoint.
            let io = unsafe { dy.io(&out, p.offset, p.len) };
            let x = &x[p.offset..p.offset + p.len];
            ctx.backend.for_splat_f16::<E>().dispatch(DxRun {
                x,
                io,
                p: params[p.c],
                streaming,
            })
        });
    }
    let group = (BLOCK / hw).clamp(1, c);
    let groups = c.div_ceil(group);
    ctx.par.for_each(n * groups, group * hw, |t| {
        let (sample, first) = (t / groups, (t % groups) * group);
        let k = group.min(c - first);
        let (offset, len) = ((sample * c + first) * hw, k * hw);
        // SAFETY: tasks cover disjoint ranges (one sample, disjoint groups of channels).
        let io = unsafe { dy.io(&out, offset, len) };
        ctx.backend.for_splat_f16::<E>().dispatch(DxRuns {
            x: &x[offset..offset + len],
            io,
            run: hw,
            params: &params[first..first + k],
            streaming,
        });
    });
}
