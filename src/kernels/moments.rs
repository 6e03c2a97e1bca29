//! Statistics of one run or one block of rows: a cache-blocked two-pass with an f64 first moment.
//!
//! - Pass 1 sums `x` in f64 lanes, every f32 value widened exactly, so the mean carries no f32
//!   rounding: a lane of L values errs by at most (L − 1)·2⁻⁵³·Σ|x|, and L is at most a few hundred
//!   (a sub-run or a block of rows spread over the lanes). Even at the largest offset an f32
//!   tensor can carry (|μ|/σ = 2²⁴) that is far below one f32 rounding of σ, and for channels whose
//!   mean is tiny next to their spread the mean is as exact as a double-precision sum.
//! - Pass 2 sums `(x − S)²` in f32 lanes, `S` = μ rounded to f32 (the best pivot there is), folded
//!   into f64 every [`KMAX`] steps, and `M2 = Σ(x − S)² − n·(μ − S)²` (exact, since Σ(x − μ) = 0).
//!   The f32 lanes only see deviations from the mean, and the block is still in L1/L2 when the
//!   second pass reads it.
//!
//! Kernels return (count, mean, M2) in f64. Welford lanes were replaced because a Welford mean after
//! one large value followed by small ones errs by Σₖ u·|mean_k| ≈ H(k)·u·|big|, beyond the stated
//! bound (a fuzz finding, `tests/fuzz_regressions.rs`), and because the f64 first moment costs no
//! more than Welford's dependent updates.

use super::stream::lane_group;
use super::{
    ACCUMULATORS, KMAX, PREFETCH_ROWS, expand_periodic, period, prefetch_rows, rows_as_they_are,
    zeroed_f64,
};
use crate::ChannelStats;
use crate::element::{self, Element};
use crate::scratch;
use crate::simd::{Kernel, MAX_LANES, Real, Simd};

/// Statistics of `count` values (none: the empty statistics) from their first pass's f64 mean,
/// `sq = Σ(x − shift)²` and `dev = Σ(x − shift)` (summed in f64 lanes only, see [`Real::WIDE`]).
///
/// With f32 lanes the first pass's mean (an f64 sum of f32 values) is exact to far below one f32
/// rounding of σ. With f64 lanes it errs by up to L·2⁻⁵³·Σ|x| (L values per lane), large next to
/// σ for data far from zero (mean 3e6, σ 4: ~1e-8·σ); the mean is then corrected by the mean
/// deviation, `μ = shift + dev/n`, and `M2 = sq − dev²/n` (the corrected two-pass of Chan, Golub
/// and LeVeque), whose error scales with Σ|x − μ| instead.
#[inline(always)]
fn finish<T: Real>(count: usize, mean: f64, shift: T, (sq, dev): (f64, f64)) -> ChannelStats {
    if count == 0 {
        return ChannelStats::default();
    }
    let (r, mean) = if T::WIDE {
        // `dev` may read −0 (a sum started from its first values, see `mean_of`); harmless:
        // `shift` is never −0 (a mean from `mean_of`), so `shift + r` and `r·r` are unchanged.
        let r = dev / count as f64;
        (r, shift.into() + r)
    } else {
        (mean - shift.into(), mean)
    };
    let m2 = sq - count as f64 * r * r;
    // Rounding of `sq` can leave a tiny negative M2; NaN passes through (the driver's fallback).
    ChannelStats::new(count as u64, mean, if m2 < 0.0 { 0.0 } else { m2 })
}

/// Statistics of one contiguous run.
pub(crate) struct MomentsRun<'a, E = f32> {
    pub x: &'a [E],
}

impl<E: Element> Kernel for MomentsRun<'_, E> {
    type T = E::Param;
    type Output = ChannelStats;

    #[inline(always)]
    fn run<S: Simd<T = E::Param>>(self, s: S) -> ChannelStats {
        moments_run(s, self.x)
    }
}

/// Statistics of each of consecutive runs of `run` elements of `x` into `out[i]` (one call for
/// many short runs avoids a dispatch per run).
pub(crate) struct MomentsRuns<'a, E = f32> {
    pub x: &'a [E],
    pub run: usize,
    pub out: &'a mut [ChannelStats],
}

impl<E: Element> Kernel for MomentsRuns<'_, E> {
    type T = E::Param;
    type Output = ();

    #[inline(always)]
    fn run<S: Simd<T = E::Param>>(self, s: S) {
        let len = self.run;
        if len == 0 {
            return;
        }
        if len > SUB_RUN {
            for (slot, run) in self.out.iter_mut().zip(self.x.chunks(len)) {
                *slot = s.enter(Run(s, run));
            }
            return;
        }
        // Short runs, a group at a time: the first passes of the group's runs, then their second
        // passes, so no run's second pass waits on the reduction of its own first pass, and the
        // lane sums of each pass reduced together ([`Simd::reduce_add_w_each`], the same bits as
        // one reduction each). Each run's arithmetic is `two_pass`'s.
        let per = (SUB_RUN / len).clamp(1, GROUP_RUNS);
        // Cleared once: a last partial group leaves the previous group's lanes in its unused
        // entries, whose sums are not read.
        let (mut sums, mut devs) = ([s.splat_w(0.0); GROUP_RUNS], [s.splat_w(0.0); GROUP_RUNS]);
        for (outs, xs) in self.out.chunks_mut(per).zip(self.x.chunks(per * len)) {
            let mut counts = [0; GROUP_RUNS];
            for (j, run) in xs.chunks(len).enumerate() {
                (counts[j], sums[j]) = first_pass_lanes(s, run, len, len, 1);
            }
            let totals = s.reduce_add_w_each(&sums);
            // All the group's means first (one loop of independent quotients), so that no pass 2
            // waits on its own division: f64 NCHW 1x1024x7x7 statistics 20.7 → 18.8 µs, bf16
            // 16.3 → 15.1 µs (one thread, AMD EPYC family 25 model 17 (Zen 4)).
            let mut means = [0.0; GROUP_RUNS];
            for ((mean, &n), &total) in means.iter_mut().zip(&counts).zip(&totals) {
                *mean = mean_of(n, total);
            }
            for (j, run) in xs.chunks(len).enumerate() {
                let shift = S::T::from_f64(means[j]);
                (sums[j], devs[j]) = second_pass_lanes(s, run, len, len, 1, shift);
            }
            let squares = s.reduce_add_w_each(&sums);
            let devs = if S::T::WIDE {
                s.reduce_add_w_each(&devs)
            } else {
                [0.0; GROUP_RUNS]
            };
            for (j, slot) in outs.iter_mut().enumerate().take(xs.len().div_ceil(len)) {
                let shift = S::T::from_f64(means[j]);
                *slot = finish(counts[j], means[j], shift, (squares[j], devs[j]));
            }
        }
    }
}

/// Runs per group of [`MomentsRuns`] (at most [`SUB_RUN`] values in all): as many as
/// [`Simd::reduce_add_w_each`] reduces at once.
const GROUP_RUNS: usize = MAX_LANES;

thunk!(Run['a, S, E] for ['a, S, E] (s: S, x: &'a [E])
    where [S: Simd<T = E::Param>, E: Element]
    -> ChannelStats => moments_run(s, x));

/// Values per sub-run of [`moments_run`]: 16 KiB, so the second pass reads from L1. A multiple of
/// every backend's `KMAX · ACCUMULATORS · LANES`.
const SUB_RUN: usize = 4096;

/// Statistics of one contiguous run: [`two_pass`] per sub-run of [`SUB_RUN`] values, merged in
/// order (Chan, f64).
#[inline(always)]
fn moments_run<S: Simd<T = E::Param>, E: Element>(s: S, x: &[E]) -> ChannelStats {
    if x.len() <= SUB_RUN {
        return two_pass(s, x);
    }
    // A loop, not a fold with a closure: a closure may be compiled out of line, outside the
    // target-feature entry point, where every intrinsic becomes a call (measured: 40× slower).
    // Whole sub-runs of half data overlap: the second pass of one runs in the same loop as the
    // first pass of the next ([`overlapped_passes`]).
    let mut total = ChannelStats::default();
    let mut pending = None;
    for sub in x.chunks(SUB_RUN) {
        let whole = overlap::<S, E>() && sub.len() == SUB_RUN;
        match pending.take() {
            Some((cur, mean)) if whole => {
                let (stats, next) = overlapped_passes(s, cur, mean, sub);
                total = total.merge(&stats);
                pending = Some((sub, next));
            }
            Some((cur, mean)) => {
                total = total.merge(&second_pass(s, cur, SUB_RUN, SUB_RUN, 1, mean));
                total = total.merge(&two_pass(s, sub));
            }
            None if whole => pending = Some((sub, first_pass(s, sub, SUB_RUN, SUB_RUN, 1))),
            None => total = total.merge(&two_pass(s, sub)),
        }
    }
    if let Some((cur, mean)) = pending {
        total = total.merge(&second_pass(s, cur, SUB_RUN, SUB_RUN, 1, mean));
    }
    total
}

/// Whether [`moments_run`] overlaps the passes of consecutive sub-runs: for half data, and for
/// f32 data on 512-bit vectors, whose first pass converts every value to f64 and so is bound by
/// arithmetic, and whose two sub-runs take at most 32 KiB of L1. Measured (one thread, AMD EPYC
/// family 26, 48 KiB L1, NCHW 1x64x112x112 statistics, min of 5 alternated): bf16 65.8 → 60.3 µs,
/// f32 56.8 → 58.4 µs (within the noise), f64 90.6 → 110.7 µs (two sub-runs of 64 KiB push the
/// second pass out of L1). With the first pass's adds on the multiply-add units
/// ([`Simd::add_w_fma`]), f32 gained on AMD EPYC family 25 model 17 (Zen 4, 32 KiB L1; min of 5
/// alternated processes): 1x64x112x112 79.1 → 72.4 µs, 1x16x256x256 102.0 → 91.6, 16x64x112x112
/// (from memory) 2837 → 2607, training 1x32x224x224 331.6 → 298.9; 2x64x112x112 178.9 → 178.3
/// and two threads 42.0 → 41.3 (bound by the L3 there). The `avx2` code on the same CPU reads
/// f32 at the speed of a copy without it (its 256-bit conversions cost less) and lost 2–3%
/// with it (1x64x112x112 67.5 → 69.5 µs), so f32 overlaps on 512-bit vectors only.
#[inline(always)]
fn overlap<S: Simd, E>() -> bool {
    size_of::<E>() == 2 || (size_of::<E>() == 4 && S::LANES >= 16)
}

/// Pass 2 of the whole sub-run `cur` (from its pass 1's count and mean) in one loop with pass 1
/// of the whole sub-run `next`: the same sums in the same order as [`second_pass`] and
/// [`first_pass`], but the f64 widening and adds of one and the f32 squares of the other keep
/// different execution ports busy at once. Measured in a standalone loop (AMD EPYC family 26,
/// f32): 0.85 → 0.69 ns per vector from L1, 1.04 → 0.89 from L2.
#[inline(always)]
fn overlapped_passes<S: Simd<T = E::Param>, E: Element>(
    s: S,
    cur: &[E],
    (n, mean): (usize, f64),
    next: &[E],
) -> (ChannelStats, (usize, f64)) {
    const A: usize = ACCUMULATORS;
    let l = S::LANES;
    let w = A * l;
    let shift = S::T::from_f64(mean);
    let sh = s.splat(shift);
    let zero = s.zero();
    let (mut tot, mut dtot) = (s.splat_w(0.0), s.splat_w(0.0));
    let mut acc = [s.splat_w(0.0); A];
    let one = s.ones_w();
    for (c, d) in cur.chunks_exact(KMAX * w).zip(next.chunks_exact(KMAX * w)) {
        let (mut sq, mut dv) = ([zero; A], [zero; A]);
        for (b, v) in c.chunks_exact(w).zip(d.chunks_exact(w)) {
            prefetch_ahead(v);
            for j in 0..A {
                let e = s.sub(element::load_slice(s, &b[j * l..]), sh);
                sq[j] = s.mul_add(e, e, sq[j]);
                if S::T::WIDE {
                    dv[j] = s.add(dv[j], e);
                }
                acc[j] = s.add_w_fma(acc[j], one, element::load_widen(s, &v[j * l..], S::T::ZERO));
            }
        }
        fold_lanes(s, &mut sq, &mut tot);
        if S::T::WIDE {
            fold_lanes(s, &mut dv, &mut dtot);
        }
    }
    let stats = finish(n, mean, shift, (s.reduce_add_w(tot), s.reduce_add_w(dtot)));
    let n = next.len();
    (stats, (n, mean_of(n, s.reduce_add_w(lane_sums(s, &acc)))))
}

/// The two passes over one contiguous run: [`strided_two_pass`] with a single run, in an entry
/// point of its own (one call per sub-run of [`moments_run`], which takes it at three places).
#[inline(always)]
fn two_pass<S: Simd<T = E::Param>, E: Element>(s: S, x: &[E]) -> ChannelStats {
    s.enter(TwoPass(s, x))
}

thunk!(TwoPass['a, S, E] for ['a, S, E] (s: S, x: &'a [E])
    where [S: Simd<T = E::Param>, E: Element]
    -> ChannelStats => strided_two_pass(s, x, x.len(), x.len(), 1));

/// Statistics of one whole channel stored as `count` runs of `run` values, run `i` starting at
/// `i·stride` in `x` (NCHW: one run per sample). Both passes sweep all the runs, so no run is
/// merged on its own: the f64 sums and f32 squares carry over from run to run (the f32 lanes are
/// folded into f64 whenever they would exceed [`KMAX`] steps), and the channel (at most a few
/// hundred KiB, see the driver) is still in L2 for the second pass. Runs out of bounds are
/// skipped, never read.
pub(crate) struct MomentsChannel<'a, E = f32> {
    pub x: &'a [E],
    pub run: usize,
    pub stride: usize,
    pub count: usize,
}

impl<E: Element> Kernel for MomentsChannel<'_, E> {
    type T = E::Param;
    type Output = ChannelStats;

    #[inline(always)]
    fn run<S: Simd<T = E::Param>>(self, s: S) -> ChannelStats {
        strided_two_pass(s, self.x, self.run, self.stride, self.count)
    }
}

/// Both passes over `count` runs of `run` values, run `i` at `i·stride` in `x` (runs out of
/// bounds are skipped), [`ACCUMULATORS`] independent chains each. The f64 sums and the f32
/// squares carry over from run to run; the f32 lanes are folded into one f64 vector before any
/// lane would take more than [`KMAX`] steps, so a lane's result carries at most `KMAX` + 2
/// roundings whatever the run lengths.
#[inline(always)]
fn strided_two_pass<S: Simd<T = E::Param>, E: Element>(
    s: S,
    x: &[E],
    run: usize,
    stride: usize,
    count: usize,
) -> ChannelStats {
    let first = first_pass(s, x, run, stride, count);
    second_pass(s, x, run, stride, count, first)
}

/// The runs of [`strided_two_pass`] (a function of plain slicing, no SIMD, so it is harmless if
/// compiled out of line).
#[inline(always)]
fn runs<E>(x: &[E], run: usize, stride: usize, count: usize) -> impl Iterator<Item = &[E]> {
    (0..count).map_while(move |i| x.get(i * stride..i * stride + run))
}

/// Pass 1 of [`strided_two_pass`]: the number of values and their mean, Σx in f64 lanes.
#[inline(always)]
fn first_pass<S: Simd<T = E::Param>, E: Element>(
    s: S,
    x: &[E],
    run: usize,
    stride: usize,
    count: usize,
) -> (usize, f64) {
    let (n, sums) = first_pass_lanes(s, x, run, stride, count);
    (n, mean_of(n, s.reduce_add_w(sums)))
}

/// The mean of `n` values from their sum (0 for no values). The sum's zero is made +0: a sum
/// of accumulators that started from their first values, not from +0, reads −0 where all its
/// values are −0, and is otherwise bit for bit the sum from +0 (an IEEE sum is −0 only when
/// both terms are, so the two trees differ at most in the signs of zeros).
#[inline(always)]
fn mean_of(n: usize, sum: f64) -> f64 {
    if n == 0 { 0.0 } else { (sum + 0.0) / n as f64 }
}

/// Pass 1's count and f64 lane sums: [`first_pass`] before the reduction of its lanes.
#[inline(always)]
fn first_pass_lanes<S: Simd<T = E::Param>, E: Element>(
    s: S,
    x: &[E],
    run: usize,
    stride: usize,
    count: usize,
) -> (usize, S::W) {
    let l = S::LANES;
    let w = ACCUMULATORS * l;
    let mut acc = [s.splat_w(0.0); ACCUMULATORS];
    // The f64 adds on the multiply-add units ([`Simd::add_w_fma`], the same bits), here, in
    // `overlapped_passes` and in `column_sums`. Measured (one thread, AMD EPYC family 25 model 17
    // (Zen 4, 1 MiB L2 per core), statistics of 1x64x112x112, min of 3 alternated processes):
    // NCHW f32 84.0 → 80.2 µs, f16 112.2 → 95.1, bf16 104.3 → 98.6; NHWC f32 87.4 → 82.5, f16
    // 117.6 → 96.9, bf16 113.8 → 103.8; on the `avx2` code (forced, same CPU) NCHW f32
    // 89.3 → 69.0, f16 124.3 → 107.1; f64 data unchanged (NCHW 126.9 → 126.8).
    let one = s.ones_w();
    let mut n = 0usize;
    for r in runs(x, run, stride, count) {
        // The first vectors of the channel are the accumulators' first values, not added to
        // zero (for a 49-value run on AVX-512, 8 of this pass's 22 vector conversions and adds):
        // the sums differ from added-to-zero ones at most in the sign of a zero, which `mean_of`
        // clears.
        let fresh = n == 0;
        n += r.len();
        let mut blocks = r.chunks_exact(w);
        if fresh && let Some(b) = blocks.next() {
            for (j, a) in acc.iter_mut().enumerate() {
                *a = element::load_widen(s, &b[j * l..], S::T::ZERO);
            }
        }
        for b in &mut blocks {
            for (j, a) in acc.iter_mut().enumerate() {
                *a = s.add_w_fma(*a, one, element::load_widen(s, &b[j * l..], S::T::ZERO));
            }
        }
        // The tail's vectors into accumulators 0, 1, ...: constant indices (the loop unrolls),
        // so the lanes stay in registers.
        let rest = blocks.remainder();
        let tail = |j: usize| rest.get(j * l..).filter(|v| !v.is_empty());
        if fresh && r.len() < w {
            for (j, a) in acc.iter_mut().enumerate() {
                if let Some(v) = tail(j) {
                    *a = element::load_widen(s, v, S::T::ZERO);
                }
            }
        } else {
            for (j, a) in acc.iter_mut().enumerate() {
                if let Some(v) = tail(j) {
                    *a = s.add_w_fma(*a, one, element::load_widen(s, v, S::T::ZERO));
                }
            }
        }
    }
    (n, lane_sums(s, &acc))
}

/// The accumulators of pass 1 added into one vector of f64 lane sums (a pairwise tree).
#[inline(always)]
fn lane_sums<S: Simd>(s: S, acc: &[S::W; ACCUMULATORS]) -> S::W {
    s.add_w(s.add_w(acc[0], acc[1]), s.add_w(acc[2], acc[3]))
}

/// Asks for the cache lines of `block` one sub-run ([`SUB_RUN`] values) further on to be brought
/// into L2, from the second pass, which reads L1 only: memory would otherwise idle while it runs,
/// and the next first pass would wait for it. Measured (one thread, AMD EPYC family 26,
/// 32x64x112x112 NCHW, the two builds alternated): statistics 5.3–5.9 → 2.9–4.0 ms on bf16 data
/// and 5.0–5.5 → 4.6–5.5 ms on f32 data, training on bf16 7.8–9.2 → 5.7–6.7 ms; on in-cache
/// f32 tensors (1x64x112x112) up to 4% slower (the extra instructions).
#[inline(always)]
fn prefetch_ahead<E>(block: &[E]) {
    let ahead = block.as_ptr().wrapping_add(SUB_RUN).cast::<u8>();
    for line in (0..std::mem::size_of_val(block)).step_by(64) {
        crate::simd::prefetch_l2(ahead.wrapping_add(line));
    }
}

/// Pass 2 of [`strided_two_pass`], from pass 1's count and mean.
#[inline(always)]
fn second_pass<S: Simd<T = E::Param>, E: Element>(
    s: S,
    x: &[E],
    run: usize,
    stride: usize,
    count: usize,
    (n, mean): (usize, f64),
) -> ChannelStats {
    let shift = S::T::from_f64(mean);
    let (sq, dev) = second_pass_lanes(s, x, run, stride, count, shift);
    finish(n, mean, shift, (s.reduce_add_w(sq), s.reduce_add_w(dev)))
}

/// Pass 2's f64 lane sums of `(x − shift)²` and (with f64 lanes, else 0) of `x − shift`:
/// [`second_pass`] before the reduction of its lanes.
#[inline(always)]
fn second_pass_lanes<S: Simd<T = E::Param>, E: Element>(
    s: S,
    x: &[E],
    run: usize,
    stride: usize,
    count: usize,
    shift: S::T,
) -> (S::W, S::W) {
    const A: usize = ACCUMULATORS;
    let l = S::LANES;
    let w = A * l;
    // Pass 2: Σ(x − S)² in f32 lanes, folded into one f64 vector before any lane would take
    // more than KMAX steps.
    // With f64 lanes, Σ(x − S) too (see `finish`).
    let (sh, zero) = (s.splat(shift), s.zero());
    let (mut sq, mut dv) = ([zero; A], [zero; A]);
    let (mut pending, mut folded) = (0, false);
    let (mut tot, mut dtot) = (s.splat_w(0.0), s.splat_w(0.0));
    for r in runs(x, run, stride, count) {
        for chunk in r.chunks(KMAX * w) {
            // Steps of the busiest lane: the whole blocks, plus one tail vector.
            let steps = chunk.len() / w + usize::from(!chunk.len().is_multiple_of(w));
            if pending + steps > KMAX {
                fold_lanes(s, &mut sq, &mut tot);
                if S::T::WIDE {
                    fold_lanes(s, &mut dv, &mut dtot);
                }
                (pending, folded) = (0, true);
            }
            pending += steps;
            let mut blocks = chunk.chunks_exact(w);
            for b in &mut blocks {
                prefetch_ahead(b);
                for j in 0..A {
                    let e = s.sub(element::load_slice(s, &b[j * l..]), sh);
                    sq[j] = s.mul_add(e, e, sq[j]);
                    if S::T::WIDE {
                        dv[j] = s.add(dv[j], e);
                    }
                }
            }
            let rest = blocks.remainder();
            for j in 0..A {
                if let Some(v) = rest.get(j * l..).filter(|v| !v.is_empty()) {
                    let e = s.sub(element::load_padded(s, v, shift), sh);
                    sq[j] = s.mul_add(e, e, sq[j]);
                    if S::T::WIDE {
                        dv[j] = s.add(dv[j], e);
                    }
                }
            }
        }
    }
    if folded {
        fold_lanes(s, &mut sq, &mut tot);
        if S::T::WIDE {
            fold_lanes(s, &mut dv, &mut dtot);
        }
    } else {
        tot = first_fold(s, &mut sq);
        if S::T::WIDE {
            dtot = first_fold(s, &mut dv);
        }
    }
    (tot, dtot)
}

/// Adds lane sums into the f64 total and clears them (a function, not a closure: a closure may
/// be compiled outside the target-feature entry point).
#[inline(always)]
fn fold_lanes<S: Simd>(s: S, sq: &mut [S::V; ACCUMULATORS], tot: &mut S::W) {
    *tot = s.add_w(*tot, first_fold(s, sq));
}

/// [`fold_lanes`] into a total that holds nothing yet: the lane sums become the total, not
/// added to zero (for a run of a few vectors, the adds saved are a tenth of its pass 2). The
/// total differs from one added to +0 at most in the sign of a zero (see [`mean_of`]).
#[inline(always)]
fn first_fold<S: Simd>(s: S, sq: &mut [S::V; ACCUMULATORS]) -> S::W {
    let v = s.add(s.add(sq[0], sq[1]), s.add(sq[2], sq[3]));
    *sq = [s.zero(); ACCUMULATORS];
    s.widen(v)
}

/// Statistics of channels `first..first + out.len()` over a block of whole rows of `c`
/// interleaved channels, written to `out` (a strip of the row; extra rows, entries past `c` or a
/// strip past the row are ignored, never indexed out of bounds).
///
/// With at least [`GROUP`] vectors of channels per row, groups of `GROUP` vectors walk down the
/// rows with their sums in registers ([`moments_strided`]); narrower rows use lanes that follow
/// the channel pattern of the flat data, walked the same way over rows of one period
/// ([`moments_periodic`], whole rows only: `first` must be 0).
pub(crate) struct MomentsRows<'a, E = f32> {
    pub x: &'a [E],
    pub c: usize,
    pub first: usize,
    pub out: &'a mut [ChannelStats],
    /// The rows come from memory (x exceeds the last-level cache): where a register group does
    /// not span the row, pass 1 walks every group of the strip together, in chunks of rows, each
    /// asking for its lines rows ahead ([`strip_sums_ahead`]).
    pub from_memory: bool,
}

/// Vectors of channels per register group in [`moments_strided`].
pub(crate) const GROUP: usize = 4;

/// How [`group_vector`] reads a vector: as lanes ([`Lanes`], f32 or f64 lanes as the backend's
/// `V`) or widened straight to f64 lanes ([`Widened`]: half data then needs no f32 vector to
/// split).
trait GroupLoad<S: Simd<T = E::Param>, E: Element> {
    type Out;
    /// `LANES` values at `p`.
    ///
    /// # Safety
    /// `p` must be valid for reading `LANES` consecutive `E`.
    unsafe fn whole(s: S, p: *const E) -> Self::Out;
    /// The values of `x` (fewer than `LANES`), lanes past it read as 0.
    fn partial(s: S, x: &[E]) -> Self::Out;
}

struct Lanes;
struct Widened;

impl<S: Simd<T = E::Param>, E: Element> GroupLoad<S, E> for Lanes {
    type Out = S::V;
    #[inline(always)]
    unsafe fn whole(s: S, p: *const E) -> S::V {
        // SAFETY: forwarded to the caller.
        unsafe { element::load(s, p) }
    }
    #[inline(always)]
    fn partial(s: S, x: &[E]) -> S::V {
        element::load_partial(s, x, S::T::ZERO)
    }
}

impl<S: Simd<T = E::Param>, E: Element> GroupLoad<S, E> for Widened {
    type Out = S::W;
    #[inline(always)]
    unsafe fn whole(s: S, p: *const E) -> S::W {
        // SAFETY: forwarded to the caller.
        unsafe { element::load_widen_ptr(s, p) }
    }
    #[inline(always)]
    fn partial(s: S, x: &[E]) -> S::W {
        s.widen(element::load_partial(s, x, S::T::ZERO))
    }
}

/// Vector `g` of a group starting at `start` in a row, read by `L`: whole (`g < full`), the
/// partial last one (`g == full`, lanes past `width` read as 0), or none. `FULL` promises that
/// every vector of the group is whole (`full` = the group's size), so the checks fold away.
#[inline(always)]
fn group_vector<S: Simd<T = E::Param>, E: Element, L: GroupLoad<S, E>, const FULL: bool>(
    s: S,
    x: &[E],
    start: usize,
    g: usize,
    (full, width): (usize, usize),
) -> Option<L::Out> {
    let l = S::LANES;
    if FULL || g < full {
        debug_assert!(start + (g + 1) * l <= x.len());
        // SAFETY: callers pass `start + width ≤ x.len()` and `(g + 1)·LANES ≤ width` here.
        Some(unsafe { L::whole(s, x.as_ptr().add(start + g * l)) })
    } else if g * l < width {
        Some(L::partial(s, &x[start + g * l..start + width]))
    } else {
        None
    }
}

/// Pass 1 down rows `rows` of one column group: channels `first..first + width`
/// (`width ≤ G·LANES`) of rows of `c` values. Adds `Σx` per lane into `acc`, in f64 lanes (lanes
/// past `width` see x = 0). `FULL` as in [`group_vector`].
#[inline(always)]
fn column_sums<S: Simd<T = E::Param>, E: Element, const G: usize, const FULL: bool>(
    s: S,
    x: &[E],
    (c, first, width): (usize, usize, usize),
    rows: std::ops::Range<usize>,
    acc: &mut [S::W; G],
) {
    let shape = (width / S::LANES, width);
    let one = s.ones_w();
    for r in rows {
        let start = r * c + first;
        for (g, a) in acc.iter_mut().enumerate() {
            if let Some(v) = group_vector::<S, E, Widened, FULL>(s, x, start, g, shape) {
                *a = s.add_w_fma(*a, one, v);
            }
        }
    }
}

/// Column groups of [`strip_sums_ahead`]: a strip of 256 channels on any backend (16 groups of
/// 4 vectors of 4 f64 lanes at the narrowest).
const AHEAD_GROUPS: usize = 16;

// An entry point of its own: inlined into `MomentsRows`, this walk slowed the plain one (NHWC
// 1x1024x14x14 f32 statistics 24.3 → 25.4 µs, min of 10 alternated; AMD EPYC family 25 model 17
// (Zen 4, AVX-512, 1 MiB L2 per core), one thread).
thunk!(StripAhead['a, S, E] for ['a, S, E] (s: S, x: &'a [E], cols: (usize, usize, usize))
    where [S: Simd<T = E::Param>, E: Element]
    -> [[S::W; GROUP]; AHEAD_GROUPS] => strip_sums_ahead::<S, E, GROUP>(s, x, cols));

/// Pass 1 of every column group of channels `first..end` (at most [`AHEAD_GROUPS`] groups of
/// `G` vectors) of rows of `c` values that come from memory: the groups walk the rows together,
/// [`PREFETCH_ROWS`] at a time, each asking for its lines that many rows ahead. The same sums in
/// the same order as [`column_sums`] group by group. Returns group `g`'s sums in entry `g`.
///
/// One group at a time, each walk down the rows reads a few lines of every row, C values apart,
/// which the hardware prefetchers do not follow (as in the backward's sums, see
/// [`PREFETCH_ROWS`]). Measured (one thread, AMD EPYC family 25 model 17 (Zen 4, AVX-512, 1 MiB
/// L2 per core), NHWC
/// statistics, `bench_case` with `Residency::Cache` and `Memory` alternated, min of 3):
/// 64x256x28x28 f32 (51 MB) 5.50 → 3.10 ms (a sequential sum of the same bytes: 2.3–2.9 ms),
/// bf16 3.33 → 2.10 ms, 64x128x28x28 f32 1.58 → 1.24 ms; from the caches, this walk cost
/// 3–14% more (8x256x28x28, 1x256x56x56, 4x1024x14x14 f32; 1x128x56x56 bf16), hence only where
/// the rows come from memory.
#[inline(always)]
fn strip_sums_ahead<S: Simd<T = E::Param>, E: Element, const G: usize>(
    s: S,
    x: &[E],
    (c, first, end): (usize, usize, usize),
) -> [[S::W; G]; AHEAD_GROUPS] {
    let w = G * S::LANES;
    let groups = (end - first).div_ceil(w).min(AHEAD_GROUPS);
    let rows = x.len() / c;
    let mut acc = [[s.splat_w(0.0); G]; AHEAD_GROUPS];
    for chunk in (0..rows).step_by(PREFETCH_ROWS) {
        let chunk = chunk..(chunk + PREFETCH_ROWS).min(rows);
        for (g, acc) in acc.iter_mut().enumerate().take(groups) {
            let at = first + g * w;
            let width = w.min(end - at);
            prefetch_rows(
                x,
                (c, at, width),
                chunk.start + PREFETCH_ROWS..chunk.end + PREFETCH_ROWS,
            );
            if width == w {
                column_sums::<S, E, G, true>(s, x, (c, at, width), chunk.clone(), acc);
            } else {
                column_sums::<S, E, G, false>(s, x, (c, at, width), chunk.clone(), acc);
            }
        }
    }
    acc
}

/// Pass 2 down the rows of one column group (as [`column_sums`]): `Σ(x − S)²` per lane, `S` the
/// lane's entry of `shift`, in f32 lanes folded into f64 every [`KMAX`] rows; with f64 lanes,
/// `Σ(x − S)` too (see [`finish`]).
#[inline(always)]
fn column_squares<S: Simd<T = E::Param>, E: Element, const G: usize, const FULL: bool>(
    s: S,
    x: &[E],
    (c, first, width): (usize, usize, usize),
    shift: &[S::V; G],
) -> ([S::W; G], [S::W; G]) {
    let rows = x.len() / c;
    let shape = (width / S::LANES, width);
    let zero = s.zero();
    let (mut tot, mut dtot) = ([s.splat_w(0.0); G], [s.splat_w(0.0); G]);
    let mut first_row = 0;
    while first_row < rows {
        let steps = KMAX.min(rows - first_row);
        let (mut sq, mut dv) = ([zero; G], [zero; G]);
        for r in first_row..first_row + steps {
            let start = r * c + first;
            for g in 0..G {
                if let Some(v) = group_vector::<S, E, Lanes, FULL>(s, x, start, g, shape) {
                    let e = s.sub(v, shift[g]);
                    sq[g] = s.mul_add(e, e, sq[g]);
                    if S::T::WIDE {
                        dv[g] = s.add(dv[g], e);
                    }
                }
            }
        }
        for g in 0..width.div_ceil(S::LANES) {
            tot[g] = s.add_w(tot[g], s.widen(sq[g]));
            if S::T::WIDE {
                dtot[g] = s.add_w(dtot[g], s.widen(dv[g]));
            }
        }
        first_row += steps;
    }
    (tot, dtot)
}

/// Both passes for channels `first..first + width` (`width ≤ G·LANES`) of a block of rows of `c`
/// channels ([`column_sums`], then [`column_squares`]). Writes `out[..width]`. `FULL`: the group
/// is `G` whole vectors (`width = G·LANES`), the common case, whose loops then carry no
/// per-vector checks (measured, AMD EPYC family 26: NHWC 1x256x56x56 statistics 93 → 83 µs,
/// f32, one thread).
#[inline(always)]
fn moments_strided<S: Simd<T = E::Param>, E: Element, const G: usize, const FULL: bool>(
    s: S,
    x: &[E],
    c: usize,
    first: usize,
    out: &mut [ChannelStats],
    sums: Option<[S::W; G]>,
) {
    const { assert!(G <= GROUP) };
    let l = S::LANES;
    let width = (c - first).min(G * l).min(out.len());
    let rows = x.len() / c;
    if width == 0 || rows == 0 || (FULL && width != G * l) {
        return;
    }
    let cols = (c, first, width);
    let acc = match sums {
        Some(sums) => sums,
        None => {
            let mut acc = [s.splat_w(0.0); G];
            column_sums::<S, E, G, FULL>(s, x, cols, 0..rows, &mut acc);
            acc
        }
    };
    let mut mean = [0.0f64; GROUP * MAX_LANES];
    let mut shift = [S::T::ZERO; GROUP * MAX_LANES];
    let mut lanes = [0.0f64; MAX_LANES];
    for (g, &a) in acc.iter().enumerate().take(width.div_ceil(l)) {
        s.to_lanes_w(a, &mut lanes);
        for (lane, &sum) in lanes.iter().enumerate().take(l.min(width - g * l)) {
            let i = g * l + lane;
            // A division, not a product with 1/rows: the mean of a constant channel is then
            // exactly its value (its f64 sum is exact), and its M2 exactly 0.
            mean[i] = sum / rows as f64;
            shift[i] = S::T::from_f64(mean[i]);
        }
    }
    let sh = lane_group::<S, G>(s, &shift[..width]);
    let (tot, dtot) = column_squares::<S, E, G, FULL>(s, x, cols, &sh);
    let mut devs = [0.0f64; MAX_LANES];
    for g in 0..width.div_ceil(l) {
        s.to_lanes_w(tot[g], &mut lanes);
        s.to_lanes_w(dtot[g], &mut devs);
        for lane in 0..l.min(width - g * l) {
            let i = g * l + lane;
            out[i] = finish(rows, mean[i], shift[i], (lanes[lane], devs[lane]));
        }
    }
}

impl<E: Element> Kernel for MomentsRows<'_, E> {
    type T = E::Param;
    type Output = ();

    #[inline(always)]
    fn run<S: Simd<T = E::Param>>(self, s: S) {
        let c = self.c;
        if c == 0 {
            return;
        }
        let end = (self.first + self.out.len()).min(c);
        let w = GROUP * S::LANES;
        if c >= w {
            // Where the rows come from memory and a group does not span the row, the groups' pass
            // 1 walks the rows together, asking ahead ([`strip_sums_ahead`]).
            let ahead = self.from_memory && c > w;
            let mut strip = None;
            for (k, first) in (self.first..end).step_by(w).enumerate() {
                let g = k % AHEAD_GROUPS;
                if ahead && g == 0 {
                    let last = (first + AHEAD_GROUPS * w).min(end);
                    strip = Some(s.enter(StripAhead(s, self.x, (c, first, last))));
                }
                let sums = strip.as_ref().map(|strip| strip[g]);
                let o = first - self.first;
                let out = &mut self.out[o..];
                if c - first >= w && out.len() >= w {
                    moments_strided::<S, E, GROUP, true>(s, self.x, c, first, out, sums);
                } else {
                    moments_strided::<S, E, GROUP, false>(s, self.x, c, first, out, sums);
                }
            }
            return;
        }
        if self.first == 0 {
            moments_periodic(s, self.x, c, self.out);
        }
    }
}

/// [`MomentsRows`] for narrow rows: lane `q` of the flat data always holds channel `q mod c`
/// (the period is a multiple of both `c` and the lane count), so the data are rows of one
/// period, whose column groups walk down them with their sums in registers ([`column_sums`],
/// [`column_squares`]); each position's sums are merged into its channel's between the passes.
/// The last partial period (fewer than `period` values, whole rows) is summed in scalar f64.
/// Writes `out[..c]`. Rows that [`rows_as_they_are`] picks are walked as one narrow group instead.
#[inline(always)]
fn moments_periodic<S: Simd<T = E::Param>, E: Element>(
    s: S,
    x: &[E],
    c: usize,
    out: &mut [ChannelStats],
) {
    let rows = x.len() / c;
    if rows == 0 {
        return;
    }
    if rows_as_they_are(c, S::LANES, rows) {
        moments_strided::<S, E, GROUP, false>(s, x, c, 0, out, None);
        return;
    }
    let x = &x[..rows * c];
    let per = period(c, S::LANES);
    let (body, rest) = x.split_at(x.len() / per * per);
    // Pass 1: Σx per channel in f64.
    let mut mean = zeroed_f64(c);
    periodic_sums::<S, E>(s, body, per, None, (&mut mean, &mut []));
    for (q, &v) in rest.iter().enumerate() {
        mean[q % c] += v.into();
    }
    for m in mean.iter_mut() {
        *m /= rows as f64; // exact for a constant channel, as in `moments_strided`
    }
    // Pass 2: Σ(x − S)² per channel (and with f64 lanes Σ(x − S), see `finish`).
    let shifts = scratch::from_fn(c, |ch| S::T::from_f64(mean[ch]));
    let sh = expand_periodic(&shifts, per);
    let (mut sums, mut devs) = (zeroed_f64(c), zeroed_f64(c));
    periodic_sums::<S, E>(s, body, per, Some(&sh), (&mut sums, &mut devs));
    for (q, &v) in rest.iter().enumerate() {
        let e: f64 = (v.to_param() - sh[q]).into();
        sums[q % c] += e * e;
        devs[q % c] += e;
    }
    for (ch, slot) in out.iter_mut().enumerate().take(c) {
        *slot = finish(rows, mean[ch], shifts[ch], (sums[ch], devs[ch]));
    }
}

/// One pass of [`moments_periodic`] over whole periods (`body`, rows of `per` values, a multiple
/// of the lane count), a column group of [`GROUP`] vectors at a time, each position's sums added
/// to its channel's (`position mod c`, `c = into.0.len()`). Without `shift`, pass 1: `Σx` into
/// `into.0`. With `shift` (one per position), pass 2: `Σ(x − S)²` into `into.0` and, with f64
/// lanes, `Σ(x − S)` into `into.1`.
#[inline(always)]
fn periodic_sums<S: Simd<T = E::Param>, E: Element>(
    s: S,
    body: &[E],
    per: usize,
    shift: Option<&[S::T]>,
    into: (&mut [f64], &mut [f64]),
) {
    let (l, c) = (S::LANES, into.0.len());
    if per == 0 || c == 0 || body.len() < per {
        return;
    }
    let mut lanes = [[0.0f64; MAX_LANES]; 2];
    for first in (0..per).step_by(GROUP * l) {
        let width = (per - first).min(GROUP * l);
        let cols = (per, first, width);
        let full = width == GROUP * l;
        let rows = 0..body.len() / per;
        let mut acc = [s.splat_w(0.0); GROUP];
        let sums = match shift {
            None if full => {
                column_sums::<S, E, GROUP, true>(s, body, cols, rows, &mut acc);
                (acc, None)
            }
            None => {
                column_sums::<S, E, GROUP, false>(s, body, cols, rows, &mut acc);
                (acc, None)
            }
            Some(shift) => {
                let sh = lane_group::<S, GROUP>(s, shift.get(first..first + width).unwrap_or(&[]));
                let (sq, dev) = if full {
                    column_squares::<S, E, GROUP, true>(s, body, cols, &sh)
                } else {
                    column_squares::<S, E, GROUP, false>(s, body, cols, &sh)
                };
                (sq, Some(dev))
            }
        };
        for g in 0..width.div_ceil(l) {
            s.to_lanes_w(sums.0[g], &mut lanes[0]);
            if let Some(dev) = sums.1 {
                s.to_lanes_w(dev[g], &mut lanes[1]);
            }
            let [sums_at, devs_at] = &lanes;
            for (lane, (&sum, &dev)) in sums_at.iter().zip(devs_at).enumerate().take(l) {
                let ch = (first + g * l + lane) % c;
                into.0[ch] += sum;
                if S::T::WIDE
                    && sums.1.is_some()
                    && let Some(d) = into.1.get_mut(ch)
                {
                    *d += dev;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::normalize::tests::values;
    use crate::simd::Backend;

    /// Statistics of `rows` rows of `c` channels from `first` on (`MomentsRows`), walked plainly
    /// or asking ahead, as bits (every NaN as one value: the walks may differ in a NaN's sign).
    fn moments_bits<E: Element>(
        backend: Backend,
        x: &[E],
        (c, first): (usize, usize),
        from_memory: bool,
    ) -> Vec<[u64; 3]> {
        let mut out = vec![ChannelStats::default(); c - first];
        backend.dispatch(MomentsRows {
            x,
            c,
            first,
            out: &mut out,
            from_memory,
        });
        let bits = |v: f64| if v.is_nan() { 1 } else { v.to_bits() };
        out.iter()
            .map(|s| [s.count(), bits(s.mean()), bits(s.m2())])
            .collect()
    }

    /// Pass 1 asking ahead (`from_memory`: the strip's groups walk the rows together in chunks)
    /// gives the statistics of the plain walk bit for bit, on every backend, for f32, f64 and bf16
    /// data: one and several groups, a partial last group, more groups than one walk takes
    /// (1100 channels), from channel 0 and from later ones, row counts around the chunk, on data
    /// with NaN, ±∞, ±0 and subnormals and on finite data (whose statistics must be finite).
    #[test]
    fn moments_asking_ahead_match_plain_moments() {
        fn check<E: Element>(backend: Backend, from_f32: impl Fn(f32) -> E) {
            for c in [24usize, 64, 96, 200, 256, 257, 1100] {
                for rows in [0usize, 1, 7, 8, 9, 17, 40] {
                    let special: Vec<E> = values(rows * c).into_iter().map(&from_f32).collect();
                    let finite: Vec<E> = (0..rows * c)
                        .map(|i| from_f32(((i * 7919) % 1000) as f32 * 0.01 + 1e3))
                        .collect();
                    let firsts = if c < 64 {
                        vec![0]
                    } else {
                        vec![0, c / 3, c - 1]
                    };
                    for first in firsts {
                        let at = format!("{backend:?} c {c} rows {rows} first {first}");
                        for x in [&special, &finite] {
                            let plain = moments_bits(backend, x, (c, first), false);
                            let ahead = moments_bits(backend, x, (c, first), true);
                            assert_eq!(plain, ahead, "{at}");
                        }
                        let plain = moments_bits(backend, &finite, (c, first), false);
                        assert!(
                            plain.iter().all(|s| s[0] == rows as u64
                                && (rows == 0 || f64::from_bits(s[1]) >= 1e3)),
                            "{at}"
                        );
                    }
                }
            }
        }
        for backend in Backend::available() {
            check::<f32>(backend, |v| v);
            check::<f64>(backend, f64::from);
            check::<half::bf16>(backend, half::bf16::from_f32);
        }
    }
}
