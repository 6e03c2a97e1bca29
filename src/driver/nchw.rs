//! NCHW driver: each channel is N contiguous runs of HW values, split into fixed pieces of at most
//! `BLOCK` elements. Reductions fold the pieces of a channel in (n, piece) order.
//!
//! Two schedules give bit-identical results: *fused* (one task per channel: reduce its pieces,
//! then normalize them while they are still in L2) when there are enough channels to keep the
//! threads busy, and *two-phase* (all pieces reduced in parallel, folded per channel, then all
//! pieces normalized in parallel) when there are few channels.

use super::{
    BLOCK, ChannelAffine, Ctx, Fuse, Grad, Make, MakeAffine, MakeDx, Src, check_stats, check_sums,
    exact_sums, make_all, make_one,
};
use crate::ChannelStats;
use crate::element::Element;
use crate::kernels::{
    AffineRun, AffineRuns, AffineRunsOf, DxParams, DxRun, DxRuns, GradSums, GradSumsRun,
    GradSumsRuns, MomentsChannel, MomentsRun, MomentsRuns,
};
use crate::par::{Parallelism, SharedMut};
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
    /// The `i`-th piece of channel `c`, in fold order (n-major).
    fn get(&self, c: usize, i: usize) -> Piece {
        let (n, p) = (i / self.per_run, i % self.per_run);
        self.piece(c, n, p)
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

/// A [`pipeline`] maker handing out parameters computed beforehand.
fn given<P: Copy + Sync>(params: &[P]) -> impl Fn(usize, &[()], &mut [P]) + Sync {
    |first, _, out| out.copy_from_slice(&params[first..first + out.len()])
}

/// Reduce every piece, fold per channel (into `out`, one per channel), derive per-channel
/// parameters, then apply them to every piece.
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
    if fused(ctx) {
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
    // Two-phase: parallel over all pieces, then fold in the same order as the fused schedule.
    let per = pieces.per_channel();
    let piece = BLOCK.min(ctx.shape.hw());
    let mut parts = scratch::zeroed::<R>(pieces.c * per);
    ctx.par
        .fill(&mut parts, piece, |u| reduce(pieces.get(u / per, u % per)));
    for (c, folded) in out.iter_mut().enumerate() {
        let channel = &parts[c * per..(c + 1) * per];
        *folded = channel.iter().fold(R::default(), |acc, &p| fold(acc, p));
    }
    if let Some(apply) = apply {
        let params = make_all(make, 0, out);
        ctx.par.for_each(pieces.c * per, piece, |u| {
            let c = u / per;
            apply(pieces.get(c, u % per), &params[c]);
        });
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
/// ([`MomentsChannel`]), and normalized while they are in L2 (128 KiB: a quarter of the smallest
/// L2 we run on, so x and y of a channel stay there). Larger channels go by pieces. The choice
/// depends on the shape only, so results do not depend on the thread count.
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

/// The whole-channel schedule: one task per channel (or group of small channels): its
/// statistics (into `out`), then, with `normalize`, its runs normalized from L2.
fn channels_whole<E: Element>(
    ctx: &Ctx,
    x: &[E],
    normalize: Option<Normalize<'_, E>>,
    out: &mut [ChannelStats],
) {
    let (n, c, hw) = (ctx.shape.n(), ctx.shape.c(), ctx.shape.hw());
    ctx.par.fill(out, ctx.shape.per_channel(), |ch| {
        let stats = channel_stats(ctx, x, ch);
        if let Some((out, make, fuse)) = normalize {
            let p = make_one(make, ch, &stats);
            let run_at = |sample: usize| {
                let start = (sample * c + ch) * hw;
                // SAFETY: each run belongs to one channel and each channel to one task; the
                // kernel drops each run's stream before it asks for the next.
                let io = unsafe { Src::Separate(x).io(out, start, hw) };
                (io, fuse.range(start, hw))
            };
            let count = n;
            ctx.backend.dispatch(AffineRunsOf { count, run_at, p });
        }
        stats
    })
}

pub(super) fn statistics<E: Element>(ctx: &Ctx, x: &[E], out: &mut [ChannelStats]) {
    if whole_channels(ctx) {
        return channels_whole(ctx, x, None, out);
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
) {
    // SAFETY: every piece is applied exactly once and pieces are disjoint, so no other live slice
    // overlaps this one.
    let io = unsafe { src.io(out, piece.offset, piece.len) };
    let fuse = fuse.range(piece.offset, piece.len);
    ctx.backend.dispatch(AffineRun { io, p: *p, fuse });
}

pub(super) fn normalize<E: Element>(
    ctx: &Ctx,
    (src, fuse): (Src<'_, E>, Fuse<'_, E>),
    dst: &mut [E],
    params: &[ChannelAffine<E::Param>],
) {
    let hw = ctx.shape.hw();
    let out = SharedMut::new(dst);
    if hw > BLOCK {
        let apply =
            |p: Piece, a: &ChannelAffine<E::Param>| affine_piece(ctx, (src, fuse), &out, p, a);
        let mut units = scratch::zeroed::<()>(ctx.shape.c());
        pipeline(
            ctx,
            |_| (),
            |_, _| (),
            &given(params),
            Some(&apply),
            &mut units,
        );
        return;
    }
    // Short runs: tasks of whole consecutive runs (about BLOCK elements), one kernel call each.
    let runs = ctx.shape.n() * ctx.shape.c();
    let per_task = (BLOCK / hw).max(1);
    ctx.par
        .for_each(runs.div_ceil(per_task), per_task * hw, |t| {
            let first = t * per_task;
            let (start, len) = (first * hw, per_task.min(runs - first) * hw);
            // SAFETY: tasks cover disjoint ranges of runs.
            let io = unsafe { src.io(&out, start, len) };
            let first = first % params.len();
            ctx.backend.dispatch(AffineRuns {
                io,
                run: hw,
                first,
                params,
                fuse: fuse.range(start, len),
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
    let out = SharedMut::new(y);
    if whole_channels(ctx) {
        return channels_whole(ctx, x, Some((&out, make, fuse)), stats);
    }
    if short_runs_fused(ctx) {
        return short_runs(ctx, x, Some((&out, make, fuse)), stats);
    }
    let src = (Src::Separate(x), fuse);
    let apply = |p: Piece, a: &ChannelAffine<E::Param>| affine_piece(ctx, src, &out, p, a);
    pipeline(
        ctx,
        |p| piece_stats(ctx, x, p),
        merge,
        make,
        Some(&apply),
        stats,
    )
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
/// is one task: reduced, then normalized while its data is in cache. Otherwise the pieces are
/// reduced in parallel first. Both schedules fold in the same order.
fn fused(ctx: &Ctx) -> bool {
    let threads = match ctx.par {
        Parallelism::Sequential => 1,
        Parallelism::Rayon => rayon::current_num_threads(),
    };
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
/// fold as the per-piece schedules, so results are identical), and normalizes the group.
/// Without `normalize`, only the statistics are computed. The statistics go to `out`.
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
        for sample in 0..n {
            let (start, len) = ((sample * c + first) * hw, k * hw);
            // SAFETY: groups are disjoint ranges of channels, so these ranges are disjoint.
            let io = unsafe { Src::Separate(x).io(out, start, len) };
            ctx.backend.dispatch(AffineRuns {
                io,
                run: hw,
                first: 0,
                params: &params,
                fuse: fuse.range(start, len),
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
    let apply = |p: Piece, dp: &DxParams<E::Param>| {
        // SAFETY: every piece is applied exactly once and pieces are disjoint.
        let io = unsafe { dy.io(&out, p.offset, p.len) };
        let x = &x[p.offset..p.offset + p.len];
        ctx.backend.dispatch(DxRun { x, io, p: *dp })
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
/// by sample (one kernel call per sample), folded in sample order, then dx.
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
            ctx.backend.dispatch(DxRuns {
                x: xs,
                io,
                run: hw,
                params: &params,
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
    let out = SharedMut::new(dx);
    if hw > BLOCK {
        let apply = |p: Piece, dp: &DxParams<E::Param>| {
            // SAFETY: every piece is applied exactly once and pieces are disjoint.
            let io = unsafe { dy.io(&out, p.offset, p.len) };
            let x = &x[p.offset..p.offset + p.len];
            ctx.backend.dispatch(DxRun { x, io, p: *dp })
        };
        let mut units = scratch::zeroed::<()>(c);
        pipeline(
            ctx,
            |_| (),
            |_, _| (),
            &given(params),
            Some(&apply),
            &mut units,
        );
        return;
    }
    let group = (BLOCK / hw).clamp(1, c);
    let groups = c.div_ceil(group);
    ctx.par.for_each(n * groups, group * hw, |t| {
        let (sample, first) = (t / groups, (t % groups) * group);
        let k = group.min(c - first);
        let (offset, len) = ((sample * c + first) * hw, k * hw);
        // SAFETY: tasks cover disjoint ranges (one sample, disjoint groups of channels).
        let io = unsafe { dy.io(&out, offset, len) };
        ctx.backend.dispatch(DxRuns {
            x: &x[offset..offset + len],
            io,
            run: hw,
            params: &params[first..first + k],
        });
    });
}
