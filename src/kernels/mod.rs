//! Arithmetic on one contiguous run or one block of rows, generic over the SIMD backend.
//!
//! Kernels know nothing about N, C, H, W: a *run* is a contiguous slice of one channel (NCHW), a
//! *periodic block* is whole rows of `c` interleaved channels (NHWC). Drivers (`crate::driver`)
//! own the layout, the block split and the threads. Every kernel handles any length, including
//! ragged tails (masked or partial vectors), and never indexes out of bounds.

/// Declares `$thunk`, the call `$body` with the arguments `$arg` ([`crate::simd::Thunk`]), for
/// [`crate::simd::Simd::enter`]: the walks a kernel may take each run in an entry point of their
/// own, so that an unoptimized build keeps one walk's locals on the stack at a time, not those of
/// every walk the kernel may take (in the dev profile, AVX-512: the NHWC normalize's walks together
/// 0.8 MB, a run's statistics 0.57 MB for f64 data).
macro_rules! thunk {
    ($thunk:ident[$($g:tt)*] for [$($u:tt)*] ($($arg:ident: $ty:ty),*) where [$($w:tt)*]
        -> $out:ty => $body:expr) => {
        struct $thunk<$($g)*>($($ty),*);

        impl<$($g)*> crate::simd::Thunk for $thunk<$($u)*>
        where
            $($w)*
        {
            type Output = $out;
            #[inline(always)]
            fn call(self) -> Self::Output {
                let $thunk($($arg),*) = self;
                $body
            }
        }
    };
}

mod backward;
mod moments;
mod normalize;
mod stream;

pub(crate) use backward::{
    DxParams, DxRowPart, DxRows, DxRun, DxRuns, GradSums, GradSumsRows, GradSumsRun, GradSumsRuns,
    ReluGrad,
};
pub(crate) use moments::{MomentsChannel, MomentsRows, MomentsRun, MomentsRuns};
pub(crate) use normalize::{
    AffineRowPart, AffineRows, AffineRun, AffineRuns, ChannelAffine, Fuse, any_shifted,
};
pub(crate) use stream::{Io, elements_to_boundary};

/// The periodic lanes of [`AffineRows`]'s parameters (shift, scale, bias).
pub(crate) type AffineLanes<T = f32> = PeriodicLanes<3, T>;
/// The periodic lanes of [`DxRows`]'s parameters (shift, r, a, b, c).
pub(crate) type DxLanes<T = f32> = PeriodicLanes<5, T>;

use crate::element::{self, Element};
use crate::scratch::{self, Scratch};
use crate::simd::{Kernel, MAX_LANES, Real, Simd};

/// Vector steps taken in lockstep before the f32 lane state is folded into f64. Bounds the f32
/// accumulation length, and so its rounding error, independently of the tensor size: a recursive
/// f32 sum of k terms errs by up to k·u of the sum of magnitudes in the worst case (one large term
/// followed by many small ones in the same lane, found by fuzzing), not only the √k·u of a random
/// walk. With 16 steps the worst case stays inside the tolerance the tests state; the f64 fold
/// that follows costs a few instructions per lane every 16 steps.
pub(crate) const KMAX: usize = 16;

/// L1 sets in which the rows of a column walk start, for rows `row_bytes` apart: the L1 data
/// caches of x86 CPUs index their 64 sets of 64-byte lines by address bits 6–11, so rows 4 KiB
/// apart all start in one set, 2 KiB apart in two, and rows whose distance is not a multiple of
/// 64 bytes in all of them. A walk down more rows than its set's ways keeps lines in flight that
/// evict each other before use.
pub(crate) fn l1_sets_walked(row_bytes: usize) -> usize {
    const SET_SPAN: usize = 4096;
    let (mut a, mut b) = (row_bytes, SET_SPAN);
    while b != 0 {
        (a, b) = (b, a % b);
    }
    SET_SPAN / a
}

/// Rows per chunk, and rows ahead that each group asks for its lines, where an NHWC reduction
/// reads its data from memory (`GradSumsRows::from_memory`, `MomentsRows::from_memory`). The
/// hardware prefetchers do not follow a register group's walk down rows (a few lines of each
/// row, C values apart), and a walk of one group at a time over a tile then the next fetches
/// each group's lines separately, so the strided walk ran at about half the rate of a
/// sequential read. Measured (one thread, AMD EPYC family 25 model 17, Zen 4, AVX-512, 1 MiB L2
/// per core; the backward's sums, a standalone loop of this reduction over x and dy of 12.8 M f32
/// values each, 64 channels per group, best of 5): 128 channels 5647 µs one group at a time
/// over tiles of 64 Ki values, 5172 in chunks of 8 rows, 4077 in chunks of 8 rows asking 8 rows
/// ahead; 256 channels 8808, 8282 and 4522; a sequential read of the same bytes 4300–4600.
pub(crate) const PREFETCH_ROWS: usize = 8;

/// Asks for the lines of channels `first..first + width` of rows `rows` of `x` (rows of `c`
/// values) to be brought into L2: the NHWC reductions' walks from memory, a few lines of every
/// row, which the hardware prefetchers do not follow. Addresses past the slice are only
/// prefetched, never read.
#[inline(always)]
pub(crate) fn prefetch_rows<E>(
    x: &[E],
    (c, first, width): (usize, usize, usize),
    rows: std::ops::Range<usize>,
) {
    for r in rows {
        let p = x.as_ptr().wrapping_add(r * c + first).cast::<u8>();
        for line in (0..width * size_of::<E>()).step_by(64) {
            crate::simd::prefetch_l2(p.wrapping_add(line));
        }
    }
}

/// Independent accumulators per contiguous run, for instruction-level parallelism.
pub(crate) const ACCUMULATORS: usize = 4;

/// Period (in elements) of a periodic block of `c` channels on `lanes`-wide vectors: a multiple of
/// both `c` and `lanes`, at least `ACCUMULATORS` vectors long so the lane state updates are
/// independent chains.
pub(crate) fn period(c: usize, lanes: usize) -> usize {
    let base = lcm(c, lanes);
    let min = ACCUMULATORS * lanes;
    base * min.div_ceil(base).max(1)
}

/// Whether narrow rows of `c` channels (fewer than a register group) are reduced as they are, one
/// partial register group per row, rather than as rows of one lane [`period`]. Rows as they are
/// waste the lanes past `c` in their last vector; period rows use every lane but pay per position
/// of the period (the sums' merge into channels, and a zeroed buffer), measured at about
/// [`PERIOD_COST`] values' work each. So channel counts that fill their vectors (16, 32, 48 on
/// AVX-512) and tensors of few rows go as they are.
pub(crate) fn rows_as_they_are(c: usize, lanes: usize, rows: usize) -> bool {
    let waste = c.div_ceil(lanes) * lanes - c;
    rows.saturating_mul(waste) <= PERIOD_COST * period(c, lanes)
}

/// Work per position of a lane period in the narrow-row reductions, in values (see
/// [`rows_as_they_are`]).
const PERIOD_COST: usize = 16;

fn lcm(a: usize, b: usize) -> usize {
    let (mut x, mut y) = (a, b);
    while y != 0 {
        (x, y) = (y, x % y);
    }
    a / x * b
}

/// Scratch lanes for periodic parameters and state, from the thread's scratch pool: aligned to a
/// cache line (and to the widest vector), so no vector load from them splits a line.
pub(crate) type Lanes<T = f32> = Scratch<T>;

/// Extends a periodic pattern: `lanes[q] = lanes[q − c]` for `q ≥ c`, so position q holds
/// channel `q mod c` once the first `c` values are set.
fn repeat_period<T: Copy>(lanes: &mut [T], c: usize) {
    if c == 0 || c >= lanes.len() {
        return;
    }
    // Copies of the whole first period: a loop of single values, each reading the value stored
    // `c` positions back, does not vectorize.
    let (first, rest) = lanes.split_at_mut(c);
    for chunk in rest.chunks_mut(c) {
        chunk.copy_from_slice(&first[..chunk.len()]);
    }
}

/// Expands per-channel values to one value per position of a period (`pos mod c`).
pub(crate) fn expand_periodic<T: Real>(per_channel: &[T], period: usize) -> Lanes<T> {
    let mut lanes = zeroed(period);
    let c = per_channel.len().min(period);
    lanes[..c].copy_from_slice(&per_channel[..c]);
    if c > 0 {
        repeat_period(&mut lanes, c);
    }
    lanes
}

/// Fields of per-channel parameters expanded to one value per position of a period
/// ([`expand_periodic`]): built once per call and shared by every block of rows, so a block of
/// a few wide rows does not pay for the expansion. The period, a multiple of the channel count
/// and of [`MAX_LANES`] (so of every backend's lane count), serves every backend. Each field holds
/// `period + MAX_LANES` values.
pub(crate) struct PeriodicLanes<const F: usize, T: Real = f32> {
    period: usize,
    fields: [Lanes<T>; F],
}

impl<const F: usize, T: Real> PeriodicLanes<F, T> {
    /// The number of values after which the lanes repeat ([`period`] at [`MAX_LANES`]).
    pub(crate) fn period(&self) -> usize {
        self.period
    }

    /// Expands field `k` of `params` (as returned by `fields`) into `fields[k]`.
    pub(crate) fn new<P>(params: &[P], fields: impl Fn(&P) -> [T; F]) -> Self {
        let c = params.len();
        let period = period(c.max(1), MAX_LANES);
        // One vector past the period, continuing the pattern: a vector load at any phase inside
        // the period stays in bounds (a strip's row segment may start at any phase and end in a
        // partial vector, see `stream_strips`).
        let len = period + MAX_LANES;
        let mut lanes: [Lanes<T>; F] = std::array::from_fn(|_| zeroed(len));
        if c > 0 {
            // One field at a time over zipped slices: no bounds check per value.
            for (k, lane) in lanes.iter_mut().enumerate() {
                for (v, p) in lane.iter_mut().zip(params) {
                    *v = fields(p)[k];
                }
                repeat_period(lane, c);
            }
        }
        PeriodicLanes {
            period,
            fields: lanes,
        }
    }

    /// The same lanes for a backend whose bfloat16 pairs interleave
    /// ([`Simd::BF16_PAIRS_INTERLEAVED`], `lanes` per vector): in each block of `2·lanes`
    /// positions, position `h·lanes + j` takes the parameter of position `2·j + h`, so that a
    /// pair loaded at a block's start meets its own channels' parameters. `None` if the period
    /// is not whole blocks.
    pub(crate) fn interleaved(&self, lanes: usize) -> Option<Self> {
        let block = 2 * lanes;
        if lanes == 0 || !self.period.is_multiple_of(block) {
            return None;
        }
        let fields = std::array::from_fn(|k| {
            let plain = &self.fields[k];
            let mut out = zeroed(plain.len());
            for (o, p) in out.chunks_exact_mut(block).zip(plain.chunks_exact(block)) {
                let (even, odd) = o.split_at_mut(lanes);
                for ((e, o), p) in even.iter_mut().zip(odd).zip(p.chunks_exact(2)) {
                    (*e, *o) = (p[0], p[1]);
                }
            }
            out
        });
        Some(PeriodicLanes {
            period: self.period,
            fields,
        })
    }
}

/// The lane count of the backend's bfloat16 pairs where they interleave
/// ([`Simd::BF16_PAIRS_INTERLEAVED`]), else `None`: whether periodic maps on bfloat16 data want
/// [`PeriodicLanes::interleaved`] lanes.
pub(crate) struct InterleavedBf16Pairs;

impl Kernel for InterleavedBf16Pairs {
    type T = f32;
    type Output = Option<usize>;

    #[inline(always)]
    fn run<S: Simd<T = f32>>(self, _: S) -> Option<usize> {
        S::BF16_PAIRS_INTERLEAVED.then_some(S::LANES)
    }
}

/// Fewest periods per parameter field for which a periodic stream of bfloat16 data builds
/// [`paired_lanes`], so that the copy (one per call) pays. Built on every call, on AMD EPYC family
/// 25 model 1 (Zen 3), one thread, NHWC bf16 inference of 1x1024x7x7 (49 periods of 1024
/// channels) went 11.0 → 15.5 µs, while 1x1024x14x14 (196 periods) went 33.3 → 30.1 µs.
const PAIRED_PERIODS_PER_FIELD: usize = 32;

/// The interleaved copy of `lanes` for a stream of `len` values of `E` on `backend`, where its
/// bfloat16 pairs interleave, the rows go whole (no strips for `read` fields) and the stream is
/// long enough to repay the copy.
pub(crate) fn paired_lanes<E: Element, const F: usize, T: Real>(
    backend: crate::simd::Backend,
    lanes: &PeriodicLanes<F, T>,
    len: usize,
    read: usize,
) -> Option<PeriodicLanes<F, T>> {
    let period = lanes.period;
    if !element::is_bf16::<E>()
        || stream::strip_width::<T, E>(period, read).is_some()
        || len < PAIRED_PERIODS_PER_FIELD * F * period
    {
        return None;
    }
    lanes.interleaved(backend.dispatch(InterleavedBf16Pairs)?)
}

/// `len` zeroed lanes.
pub(crate) fn zeroed<T: Real>(len: usize) -> Lanes<T> {
    scratch::zeroed(len)
}

/// f64 scratch lanes, aligned like [`Lanes`].
pub(crate) type Lanes64 = Scratch<f64>;

/// `len` zeroed f64 lanes.
pub(crate) fn zeroed_f64(len: usize) -> Lanes64 {
    scratch::zeroed(len)
}

/// Sum of the lanes of `v`, widened to f64 for the f64 merges that follow.
#[inline(always)]
pub(crate) fn reduce_f64<S: Simd>(s: S, v: S::V) -> f64 {
    s.reduce_add(v).into()
}
