//! NHWC driver: the tensor is N·HW rows of C interleaved channels.
//!
//! Streaming passes (normalize, dx) split it into blocks of whole rows (about `BLOCK` elements
//! each). Reductions (statistics, backward sums) split it into tiles: a block of rows times a
//! strip of at most [`STRIP`] channels, so that wide rows give tall tiles (each channel's
//! finishing work amortized over many rows) and several strips (parallel work even when the
//! tensor has few rows). Tile results are folded per channel in row-block order.

use super::{
    BLOCK, ChannelAffine, Ctx, Fuse, Grad, MakeAffine, MakeDx, Src, check_stats, check_sums,
    exact_sums, make_all, streaming_output,
};
use crate::ChannelStats;
use crate::element::Element;
use crate::kernels::{
    AffineLanes, AffineRowPart, AffineRows, DxLanes, DxParams, DxRowPart, DxRows, GradSums,
    GradSumsRows, MomentsRows, any_shifted, elements_to_boundary, paired_lanes,
};
use crate::par::SharedMut;
use crate::scratch;

/// Fewest rows per block of an elementwise pass: fewer rows would spend more on the block's
/// per-channel parameter lanes than on the rows.
const MIN_STREAM_ROWS: usize = 8;

/// Fewest rows per reduction tile: each tile costs a few f64 operations and one merge per
/// channel, which this many rows amortize.
const MIN_ROWS: usize = 64;

/// Most channels per reduction strip: a multiple of every backend's register group (4 vectors of
/// 16 lanes), so strips never split a group.
const STRIP: usize = 256;

/// Elements per reduction tile: larger than [`BLOCK`] because each tile costs a few f64
/// operations per channel (its mean, M2 and the merge), which the rows must amortize. The two
/// passes only need one register group's columns of the tile in cache, not the whole tile.
const STATS_BLOCK: usize = 4 * BLOCK;

/// Fewest blocks per thread of an elementwise pass ([`Blocks::elementwise`]), so that its rows
/// still spread evenly over many threads.
const BLOCKS_PER_THREAD: usize = 4;

/// The split of an elementwise pass's rows into blocks, one task each.
#[derive(Clone, Copy)]
struct Blocks {
    c: usize,
    rows: usize,
    rows_per_block: usize,
}

impl Blocks {
    /// Blocks of a pass that maps each element once and keeps nothing for later (the normalize,
    /// the backward's dx): up to four times [`BLOCK`] elements, so that the per-block work (a
    /// task, a kernel entry, its setup) is spread over more rows, but no fewer than
    /// [`BLOCKS_PER_THREAD`] per thread of the operation, down to [`BLOCK`] (one thread: blocks
    /// of 4·BLOCK from tensors of 16·BLOCK on; sixteen threads: of [`BLOCK`] up to 64·BLOCK, of
    /// 4·BLOCK from 256·BLOCK on). The block size changes no bits: each element takes the same
    /// map.
    ///
    /// Measured against blocks of [`BLOCK`] (AMD EPYC family 25 model 17 (Zen 4, 1 MiB L2),
    /// `bench_case`, min of 5–7 alternated processes), one thread unless said: NHWC inference
    /// 1x64x112x112 bf16 42.2 → 38.9 µs, f16 42.1 → 38.9, f32 75.0 → 70.1; bf16 8x64x56x56
    /// 83.6 → 77.1, 1x256x56x56 42.9 → 40.8, two threads 1x64x112x112 24.1 → 22.4; backward
    /// (the dx pass) 1x64x112x112 f32 200.2 → 190.5, f16 178.7 → 172.4, bf16 152.0 → 145.6,
    /// bf16 8x64x56x56 306.2 → 292.6, two threads bf16 83.4 → 78.0, f32 103.2 → 99.1. Tensors
    /// near the size of the L3 (16x64x56x56 f32) moved 0.91–1.11 either way from run to run.
    fn elementwise(ctx: &Ctx) -> Blocks {
        let c = ctx.shape.c();
        let rows = ctx.shape.per_channel();
        let fewest = (BLOCK / c).max(MIN_STREAM_ROWS);
        let most = (4 * BLOCK / c).max(MIN_STREAM_ROWS);
        let even = rows.div_ceil(BLOCKS_PER_THREAD * ctx.threads());
        Blocks {
            c,
            rows,
            rows_per_block: even.clamp(fewest, most),
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
    /// [`Blocks::range`] of a walk peeled by `head` elements ([`aligning_head`]): every block
    /// starts `head` later, and the last one ends a row early (its rest is the tail of
    /// [`Blocks::row_parts`]).
    fn peeled_range(&self, b: usize, head: usize) -> (usize, usize) {
        let (offset, len) = self.range(b);
        if head == 0 {
            return (offset, len);
        }
        let total = self.rows * self.c;
        (offset + head, len.min(total - self.c - offset))
    }
    /// The parts of a walk peeled by `head > 0` elements that the blocks leave: the first row's
    /// channels `0..head` (with `plain`, lanes of those channels) and the last row's channels
    /// `head..` (with `rotated`, the lanes of the rotated channels), as (offset, len, lanes).
    fn row_parts<L>(&self, head: usize, plain: L, rotated: L) -> [(usize, usize, L); 2] {
        let total = self.rows * self.c;
        [
            (0, head, plain),
            (total - self.c + head, self.c - head, rotated),
        ]
    }
}

/// The fixed split of a reduction into tiles: row blocks × channel strips, a function of the
/// shape only (so results do not depend on the thread count).
#[derive(Clone, Copy)]
struct Tiles {
    c: usize,
    rows: usize,
    rows_per_block: usize,
    strip: usize,
}

/// One tile: its rows (as an element range of whole rows) and its channels.
#[derive(Clone, Copy)]
struct Tile {
    offset: usize,
    len: usize,
    rows: usize,
    first: usize,
    width: usize,
}

impl Tiles {
    fn new(ctx: &Ctx) -> Tiles {
        let c = ctx.shape.c();
        let strip = c.min(STRIP);
        Tiles {
            c,
            rows: ctx.shape.per_channel(),
            rows_per_block: (STATS_BLOCK / strip).max(MIN_ROWS),
            strip,
        }
    }
    fn blocks(&self) -> usize {
        self.rows.div_ceil(self.rows_per_block)
    }
    /// Elements of a whole tile (the largest).
    fn unit(&self) -> usize {
        self.rows_per_block.min(self.rows) * self.strip
    }
    fn strips(&self) -> usize {
        self.c.div_ceil(self.strip)
    }
    fn count(&self) -> usize {
        self.blocks() * self.strips()
    }
    /// Tile `t`, row-block major.
    fn tile(&self, t: usize) -> Tile {
        let (b, k) = (t / self.strips(), t % self.strips());
        let first_row = b * self.rows_per_block;
        let rows = self.rows_per_block.min(self.rows - first_row);
        let first = k * self.strip;
        Tile {
            offset: first_row * self.c,
            len: rows * self.c,
            rows,
            first,
            width: self.strip.min(self.c - first),
        }
    }
}

/// Per-channel statistics into `total` (one per channel).
pub(super) fn statistics<E: Element>(ctx: &Ctx, x: &[E], total: &mut [ChannelStats]) {
    let tiles = Tiles::new(ctx);
    let c = tiles.c;
    // Tile t's statistics in `parts[t·strip..][..width]`.
    let mut parts = scratch::zeroed::<ChannelStats>(tiles.count() * tiles.strip);
    let from_memory = ctx.in_memory::<E>(x.len());
    ctx.par
        .for_chunks(&mut parts, tiles.strip, tiles.unit(), |t, out| {
            let tile = tiles.tile(t);
            let data = &x[tile.offset..tile.offset + tile.len];
            let out = &mut out[..tile.width];
            ctx.backend.dispatch(MomentsRows {
                x: data,
                c,
                first: tile.first,
                out,
                from_memory,
            });
            for (i, s) in out.iter_mut().enumerate() {
                check_stats(s, || {
                    let ch = tile.first + i;
                    let values = scratch::from_fn(tile.rows, |r| data[r * c + ch].to_param());
                    ChannelStats::from_values(&values)
                });
            }
        });
    // Fold in row-block order; every channel of a row block has its row count, so the merge
    // weights are computed once per row block.
    let mut done = 0u64;
    for (b, block) in parts.chunks(tiles.strips() * tiles.strip).enumerate() {
        let rows = tiles.tile(b * tiles.strips()).rows as u64;
        let weights = ChannelStats::merge_weights(done, rows);
        for (k, part) in block.chunks(tiles.strip).enumerate() {
            let tile = tiles.tile(b * tiles.strips() + k);
            let (first, part) = (tile.first, &part[..tile.width]);
            for (t, p) in total[first..].iter_mut().zip(part) {
                *t = if done == 0 {
                    *p
                } else if t.count() == done && p.count() == rows {
                    t.merge_weighted(p, weights)
                } else {
                    t.merge(p)
                };
            }
        }
        done += rows;
    }
}

pub(super) fn normalize<E: Element>(
    ctx: &Ctx,
    (src, fuse): (Src<'_, E>, Fuse<'_, E>),
    dst: &mut [E],
    params: &[ChannelAffine<E::Param>],
) {
    let blocks = Blocks::elementwise(ctx);
    let streaming = streaming_output(ctx, src, dst.len());
    let head = if streaming {
        0
    } else {
        aligning_head(dst, blocks.c)
    };
    let total = blocks.rows * blocks.c;
    // With a head, the rows walked are those of the channels rotated by it, from `head` on.
    let rotated = (head > 0).then(|| rotate_left(params, head));
    let (plain, params) = (params, rotated.as_deref().unwrap_or(params));
    let lanes = &AffineLanes::affine(params);
    let shifted = any_shifted(params);
    // The maps read 3 lanes with the subtract, 2 without (as `AffineRows` counts them).
    let read = if shifted { 3 } else { 2 };
    let paired = paired_lanes::<E, 3, _>(ctx.backend, lanes, total, read);
    let out = SharedMut::new(dst);
    ctx.par
        .for_each(blocks.count(), blocks.rows_per_block * blocks.c, |b| {
            let (offset, len) = blocks.peeled_range(b, head);
            // SAFETY: each block is visited once and blocks are disjoint.
            let io = unsafe { src.io(&out, offset, len) };
            let fuse = fuse.range(offset, len);
            let rows = AffineRows {
                io,
                params,
                lanes,
                paired: paired.as_ref(),
                shifted,
                fuse,
                streaming,
            };
            // f16 rows of at most 64 lanes' period run 256 bits wide on Zen 4 (same bits).
            ctx.backend.dispatch_f16_rows::<E, _>(lanes.period(), rows);
        });
    if head == 0 {
        return;
    }
    // The head (channels 0..head of the first row: the lanes of those channels alone) and the
    // tail (channels head.. of the last row, the rotated channels from 0).
    let plain_lanes = &AffineLanes::affine(&plain[..head]);
    for (offset, len, lanes) in blocks.row_parts(head, plain_lanes, lanes) {
        // SAFETY: the blocks above are done; head and tail are disjoint from them and each other.
        let io = unsafe { src.io(&out, offset, len) };
        ctx.backend.dispatch(AffineRowPart {
            io,
            lanes,
            shifted,
            fuse: fuse.range(offset, len),
        });
    }
}

/// Elements before the first output vector aligned to a cache line (and so to every backend's
/// vector), when rows of `c` channels are whole lines, so that every row starts as misaligned as
/// the first: the normalize then walks the rows of the channels rotated by that many, every row
/// aligned, with the first row's head and the last row's tail on their own. 0 for an aligned or
/// small output (under one streaming block), or rows that are not whole lines. The backward's
/// dx pass ([`dx_blocks`]) peels the same way. A `Vec` from glibc's `malloc` large enough for
/// its own mapping starts 16 bytes past a page. Measured (one thread, AMD EPYC family 25 model
/// 17 (Zen 4), x and y 16 bytes past a page, min of 5 alternated processes): NHWC inference
/// 1x64x112x112 f32 78.4 → 74.9 µs, bf16 45.5 → 42.5, 1x256x56x56 f32 88.8 → 74.7, 1x256x14x14
/// f32 5.5 → 4.7; training 8x64x56x56 bf16 309.6 → 302.0; aligned tensors unchanged (f32
/// 1x64x112x112 74.4 / 74.3 µs, bf16 41.6 / 41.8), bf16 1x1024x7x7 (49 rows) 6.9 / 7.0 µs at 16
/// bytes past a page.
fn aligning_head<E>(dst: &[E], c: usize) -> usize {
    aligning_head_at(dst.as_ptr(), dst.len(), c)
}

/// [`aligning_head`] of the `len` elements at `ptr`.
fn aligning_head_at<E>(ptr: *const E, len: usize, c: usize) -> usize {
    const LINE: usize = 64;
    let size = size_of::<E>();
    if len < BLOCK || !(c * size).is_multiple_of(LINE) {
        return 0;
    }
    // Fewer than a line's elements: less than `c`.
    elements_to_boundary(ptr, LINE)
}

pub(super) fn training<E: Element>(
    ctx: &Ctx,
    (x, fuse): (&[E], Fuse<'_, E>),
    y: &mut [E],
    make: MakeAffine<'_, E::Param>,
    stats: &mut [ChannelStats],
) {
    statistics(ctx, x, stats);
    let params = make_all(make, 0, stats);
    normalize(ctx, (Src::Separate(x), fuse), y, &params);
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
    // The reduction takes the statistics' tiles (fewer per-channel folds); dx the streaming
    // blocks.
    let tiles = Tiles::new(ctx);
    let c = tiles.c;
    let from_memory = ctx.in_memory::<E>(2 * x.len());
    let out = SharedMut::new(dx);
    let dy = grad.src();
    let reduce = |t: usize, part: &mut [GradSums]| {
        let tile = tiles.tile(t);
        let (offset, len) = (tile.offset, tile.len);
        // SAFETY: the task of this tile stages its g (its columns of its rows; no other slice
        // of them alive: a staged reduction gives all strips of a row block to one task), then
        // only reads; dx is written after every tile was reduced.
        let g = unsafe {
            if tile.width == c {
                grad.stage(ctx, &out, offset, len);
            } else {
                for row in (offset..offset + len).step_by(c) {
                    grad.stage(ctx, &out, row + tile.first, tile.width);
                }
            }
            dy.view(&out, offset, len)
        };
        let part = &mut part[..tile.width];
        let xs = &x[offset..offset + len];
        ctx.backend.dispatch(GradSumsRows {
            x: xs,
            dy: g,
            pivots,
            first: tile.first,
            out: part,
            from_memory,
        });
        for (i, s) in part.iter_mut().enumerate() {
            check_sums(s, || {
                let ch = tile.first + i;
                let pairs = xs.iter().zip(g).skip(ch).step_by(c);
                exact_sums(pairs.map(|(&a, &b)| (a, b)), pivots[ch])
            });
        }
    };
    // Tile t's sums in `parts[t·strip..][..width]`.
    let mut parts = scratch::zeroed::<GradSums>(tiles.count() * tiles.strip);
    if grad.staged() {
        // One task per row block: the view of a tile spans its whole rows, which the staging of
        // the block's other strips writes.
        let (strips, strip) = (tiles.strips(), tiles.strip);
        let unit = tiles.unit() * strips;
        ctx.par
            .for_chunks(&mut parts, strips * strip, unit, |b, block| {
                for (k, part) in block.chunks_mut(strip).enumerate() {
                    reduce(b * strips + k, part);
                }
            });
    } else {
        ctx.par
            .for_chunks(&mut parts, tiles.strip, tiles.unit(), reduce);
    }
    sums.fill(GradSums::default());
    for (t, part) in parts.chunks(tiles.strip).enumerate() {
        let tile = tiles.tile(t);
        let part = &part[..tile.width];
        for (total, &p) in sums[tile.first..].iter_mut().zip(part) {
            *total = total.add(p);
        }
    }
    let Some(make) = make else { return };
    let params = make_all(make, 0, sums);
    dx_blocks(ctx, x, dy, &out, &params);
}

/// `dx = a·dy + b·(x − shift) + c` with the given per-channel parameters, block by block.
pub(super) fn dx<E: Element>(
    ctx: &Ctx,
    x: &[E],
    dy: Src<'_, E>,
    dx: &mut [E],
    params: &[DxParams<E::Param>],
) {
    dx_blocks(ctx, x, dy, &SharedMut::new(dx), params);
}

/// The dx pass of [`backward`] and [`dx`], block by block; rows aligned to dx's cache lines as
/// in [`normalize`] ([`aligning_head`]). Measured (one thread, AMD EPYC family 25 model 17
/// (Zen 4), x, dy and dx 16 bytes past a page, min of 5 alternated processes): backward f32
/// 1x256x56x56 274.8 → 253.1 µs, 1x256x14x14 16.3 → 15.3, 1x64x112x112 213.4 → 208.7 (196 when
/// aligned), bf16 157.4 → 155.0; 8x64x56x56 within the noise (0.97–1.03 over three runs).
fn dx_blocks<E: Element>(
    ctx: &Ctx,
    x: &[E],
    dy: Src<'_, E>,
    out: &SharedMut<'_, E>,
    params: &[DxParams<E::Param>],
) {
    let blocks = Blocks::elementwise(ctx);
    let streaming = streaming_output(ctx, dy, x.len());
    // As in `normalize`: with a head, the rows walked are those of the channels rotated by it.
    let head = if streaming {
        0
    } else {
        let (ptr, len) = out.span();
        aligning_head_at(ptr, len, blocks.c)
    };
    let rotated = (head > 0).then(|| rotate_left(params, head));
    let (plain, params) = (params, rotated.as_deref().unwrap_or(params));
    let lanes = &DxLanes::dx(params);
    let paired = paired_lanes::<E, 5, _>(ctx.backend, lanes, x.len(), 5);
    ctx.par
        .for_each(blocks.count(), blocks.rows_per_block * blocks.c, |b| {
            let (offset, len) = blocks.peeled_range(b, head);
            if len == 0 {
                return;
            }
            let xs = &x[offset..offset + len];
            // SAFETY: each block is visited once and blocks are disjoint.
            let io = unsafe { dy.io(out, offset, len) };
            ctx.backend.dispatch(DxRows {
                x: xs,
                io,
                params,
                lanes,
                paired: paired.as_ref(),
                streaming,
            });
        });
    if head == 0 {
        return;
    }
    // The head (channels 0..head of the first row) and the tail (channels head.. of the last
    // row, the rotated channels from 0).
    let plain_lanes = &DxLanes::dx(&plain[..head]);
    for (offset, len, lanes) in blocks.row_parts(head, plain_lanes, lanes) {
        // SAFETY: the blocks above are done; head and tail are disjoint from them and each other.
        let io = unsafe { dy.io(out, offset, len) };
        let x = &x[offset..offset + len];
        ctx.backend.dispatch(DxRowPart { x, io, lanes });
    }
}

/// `params` rotated left by `head` channels: entry `i` is channel `(i + head) mod C`'s.
fn rotate_left<T: scratch::Zeroable + Copy>(params: &[T], head: usize) -> scratch::Scratch<T> {
    let mut r = scratch::zeroed::<T>(params.len());
    let (front, back) = params.split_at(head);
    r[..back.len()].copy_from_slice(back);
    r[back.len()..].copy_from_slice(front);
    r
}
