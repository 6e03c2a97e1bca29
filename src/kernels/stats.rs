//! Vectorized Welford statistics: per-lane running mean and M2 with a precomputed `1/k` per step,
//! lanes merged with Chan's formula (equal counts in f32 vectors, the rest in f64).
//!
//! Values are shifted by a per-channel pivot before accumulation (`d = x − pivot`), so the f32
//! lanes only see numbers of the size of the spread. Results are the statistics of `d`; the
//! driver adds the pivot back in f64.

use super::{ACCUMULATORS, KMAX, expand_periodic, period, zeroed};
use crate::ChannelStats;
use crate::simd::{Kernel, MAX_LANES, Simd};

/// `RECIP[k] = 1/k` (RECIP[0] unused): the Welford weights, computed at compile time.
const RECIP_LEN: usize = ACCUMULATORS * KMAX + ACCUMULATORS + 2;
static RECIP: [f32; RECIP_LEN] = {
    let mut t = [0.0f32; RECIP_LEN];
    let mut k = 1;
    while k < RECIP_LEN {
        t[k] = 1.0 / k as f32;
        k += 1;
    }
    t
};

/// One Welford update of every lane: `mean += (d − mean)/k`, `m2 += (d − mean_old)(d − mean_new)`.
/// `rk` holds `1/k` (or 0 in lanes that take no value, with `keep` = 0 there as well).
#[inline(always)]
fn welford_step<S: Simd>(s: S, d: S::V, rk: S::V, keep: S::V, mean: &mut S::V, m2: &mut S::V) {
    let delta = s.sub(d, *mean);
    *mean = s.mul_add(delta, rk, *mean);
    *m2 = s.mul_add(s.mul(delta, keep), s.sub(d, *mean), *m2);
}

/// Merges two lane states of equal count `k` into one of count `2k` (Chan, equal weights).
#[inline(always)]
fn merge_equal<S: Simd>(s: S, a: (S::V, S::V), b: (S::V, S::V), k: usize) -> (S::V, S::V) {
    let delta = s.sub(b.0, a.0);
    let mean = s.mul_add(delta, s.splat(0.5), a.0);
    let m2 = s.mul_add(
        s.mul(delta, delta),
        s.splat(k as f32 * 0.5),
        s.add(a.1, b.1),
    );
    (mean, m2)
}

/// Folds lanes into f64 statistics: lanes `< r` hold `count + 1` values, the others `count`.
#[inline(always)]
fn fold_lanes<S: Simd>(s: S, mean: S::V, m2: S::V, count: usize, r: usize) -> ChannelStats {
    let (mut mb, mut qb) = ([0.0; MAX_LANES], [0.0; MAX_LANES]);
    s.to_lanes(mean, &mut mb);
    s.to_lanes(m2, &mut qb);
    let group = |lanes: std::ops::Range<usize>, k: usize| {
        if k == 0 || lanes.is_empty() {
            return ChannelStats::default();
        }
        let g = lanes.len() as f64;
        let mu = mb[lanes.clone()].iter().map(|&m| m as f64).sum::<f64>() / g;
        let spread: f64 = mb[lanes.clone()]
            .iter()
            .map(|&m| (m as f64 - mu).powi(2))
            .sum();
        let q: f64 = qb[lanes.clone()].iter().map(|&q| q as f64).sum();
        ChannelStats::new((k * lanes.len()) as u64, mu, q + spread * k as f64)
    };
    group(0..r, count + 1).merge(&group(r..S::LANES, count))
}

/// Runs up to this length are reduced by [`two_pass`]; longer ones stream through Welford lanes.
///
/// Folding Welford lanes into f64 costs a few hundred instructions per run, which dominates short
/// runs (a 7×7 channel is 49 values); a short run sits in L1, so a second pass over it is nearly
/// free, and two-pass is the more accurate of the two. 512 values keep each lane at 16 steps or
/// fewer (4 accumulators of 8 lanes), like the Welford path's `KMAX`.
pub(crate) const SHORT_RUN: usize = 512;

/// Corrected two-pass statistics of `x − pivot` (Chan, Golub & LeVeque): the mean of the
/// deviations, then the sum of squares about it, plus the correction for the mean's rounding.
#[inline(always)]
fn two_pass<S: Simd>(s: S, x: &[f32], pivot: f32) -> ChannelStats {
    const A: usize = ACCUMULATORS;
    let (l, p) = (S::LANES, s.splat(pivot));
    let zero = s.splat(0.0);
    let n = x.len();
    // Pass 1: Σ(x − pivot). The partial vector is padded with the pivot, contributing 0.
    let mut acc = [zero; A];
    let mut blocks = x.chunks_exact(A * l);
    for b in &mut blocks {
        for (j, a) in acc.iter_mut().enumerate() {
            *a = s.add(*a, s.sub(s.load(&b[j * l..]), p));
        }
    }
    for (j, v) in blocks.remainder().chunks(l).enumerate() {
        let xv = if v.len() == l {
            s.load(v)
        } else {
            s.load_partial(v, pivot)
        };
        acc[j] = s.add(acc[j], s.sub(xv, p));
    }
    let sum = super::reduce_f64(s, s.add(s.add(acc[0], acc[1]), s.add(acc[2], acc[3])));
    let mean = (sum / n as f64) as f32;
    // Pass 2: Σ(d − mean)² and Σ(d − mean), padded lanes masked out.
    let m = s.splat(mean);
    let (mut sq, mut dev) = ([zero; A], [zero; A]);
    let mut blocks = x.chunks_exact(A * l);
    for b in &mut blocks {
        for j in 0..A {
            let e = s.sub(s.sub(s.load(&b[j * l..]), p), m);
            sq[j] = s.mul_add(e, e, sq[j]);
            dev[j] = s.add(dev[j], e);
        }
    }
    for (j, v) in blocks.remainder().chunks(l).enumerate() {
        let e = if v.len() == l {
            s.sub(s.sub(s.load(v), p), m)
        } else {
            s.mul(
                s.sub(s.sub(s.load_partial(v, pivot), p), m),
                s.mask(v.len()),
            )
        };
        sq[j] = s.mul_add(e, e, sq[j]);
        dev[j] = s.add(dev[j], e);
    }
    let sq = super::reduce_f64(s, s.add(s.add(sq[0], sq[1]), s.add(sq[2], sq[3])));
    let dev = super::reduce_f64(s, s.add(s.add(dev[0], dev[1]), s.add(dev[2], dev[3])));
    let nf = n as f64;
    ChannelStats::new(n as u64, mean as f64 + dev / nf, sq - dev * dev / nf)
}

/// Statistics of `x − pivot` over one contiguous run: [`two_pass`] up to [`SHORT_RUN`] values,
/// else Welford lanes.
pub(crate) struct MomentsRun<'a> {
    pub x: &'a [f32],
    pub pivot: f32,
}

impl Kernel for MomentsRun<'_> {
    type Output = ChannelStats;

    #[inline(always)]
    fn run<S: Simd>(self, s: S) -> ChannelStats {
        moments_run(s, self.x, self.pivot)
    }
}

/// Statistics of each of consecutive runs of `run` elements of `x − pivots[i]`, into `out[i]`
/// (one call for many short runs avoids a dispatch per run).
pub(crate) struct MomentsRuns<'a> {
    pub x: &'a [f32],
    pub run: usize,
    pub pivots: &'a [f32],
    pub out: &'a mut [ChannelStats],
}

impl Kernel for MomentsRuns<'_> {
    type Output = ();

    #[inline(always)]
    fn run<S: Simd>(self, s: S) {
        if self.run == 0 {
            return;
        }
        let runs = self.x.chunks(self.run).zip(self.pivots);
        for (slot, (run, &pivot)) in self.out.iter_mut().zip(runs) {
            *slot = moments_run(s, run, pivot);
        }
    }
}

/// Statistics of `x − pivot` over one contiguous run: [`two_pass`] up to [`SHORT_RUN`] values,
/// else Welford lanes.
#[inline(always)]
fn moments_run<S: Simd>(s: S, x: &[f32], pivot: f32) -> ChannelStats {
    if x.len() <= SHORT_RUN {
        return if x.is_empty() {
            ChannelStats::default()
        } else {
            two_pass(s, x, pivot)
        };
    }
    const A: usize = ACCUMULATORS;
    let l = S::LANES;
    let w = A * l;
    let p = s.splat(pivot);
    let (zero, one) = (s.splat(0.0), s.splat(1.0));
    let mut total = ChannelStats::default();
    for chunk in x.chunks(KMAX * w) {
        let steps = chunk.len() / w;
        let mut acc = [(zero, zero); A];
        for (k, step) in chunk.chunks_exact(w).enumerate() {
            let rk = s.splat(RECIP[k + 1]);
            for (j, (mean, m2)) in acc.iter_mut().enumerate() {
                let d = s.sub(s.load(&step[j * l..]), p);
                welford_step(s, d, rk, one, mean, m2);
            }
        }
        // All lanes of all accumulators hold `steps` values: merge them pairwise.
        let lo = merge_equal(s, acc[0], acc[1], steps);
        let hi = merge_equal(s, acc[2], acc[3], steps);
        let (mut mean, mut m2) = merge_equal(s, lo, hi, 2 * steps);
        let mut count = A * steps;
        // Leftover whole vectors, then a masked partial one.
        let tail = &chunk[steps * w..];
        let mut vectors = tail.chunks_exact(l);
        for v in &mut vectors {
            count += 1;
            let d = s.sub(s.load(v), p);
            welford_step(s, d, s.splat(RECIP[count]), one, &mut mean, &mut m2);
        }
        let rest = vectors.remainder();
        if !rest.is_empty() {
            let keep = s.mask(rest.len());
            let d = s.sub(s.load_partial(rest, pivot), p);
            let rk = s.mul(s.splat(RECIP[count + 1]), keep);
            welford_step(s, d, rk, keep, &mut mean, &mut m2);
        }
        total = total.merge(&fold_lanes(s, mean, m2, count, rest.len()));
    }
    total
}

/// Statistics of `x − pivot[c]` per channel over a block of whole rows of `pivots.len()`
/// interleaved channels. Each channel's result is merged into `out[c]` (which must have one entry
/// per channel; extra rows or entries are ignored, never indexed out of bounds).
///
/// With at least [`GROUP`] vectors of channels per row, groups of `GROUP` vectors walk down the rows
/// with their Welford state in registers ([`moments_strided`]); narrower rows use lanes that
/// follow the channel pattern of the flat data, with state in memory ([`moments_periodic`]).
pub(crate) struct MomentsRows<'a> {
    pub x: &'a [f32],
    pub pivots: &'a [f32],
    pub out: &'a mut [ChannelStats],
}

/// Vectors of channels per register group in [`moments_strided`].
pub(crate) const GROUP: usize = 4;

/// Welford statistics of channels `first..first + width` (`width ≤ G·LANES`) of a block of rows of
/// `c` channels, one row per step, state in registers. Merges into `out[..width]`.
#[inline(always)]
fn moments_strided<S: Simd, const G: usize>(
    s: S,
    x: &[f32],
    c: usize,
    first: usize,
    pivots: &[f32],
    out: &mut [ChannelStats],
) {
    let l = S::LANES;
    let width = (c - first).min(G * l).min(pivots.len()).min(out.len());
    let (full, rem) = (width / l, width % l);
    let rows = x.len() / c;
    let (zero, one) = (s.splat(0.0), s.splat(1.0));
    let mut piv = [zero; G];
    for (g, p) in piv.iter_mut().enumerate().take(width.div_ceil(l)) {
        *p = s.load_partial(&pivots[g * l..width], 0.0);
    }
    let mut first_row = 0;
    while first_row < rows {
        let steps = KMAX.min(rows - first_row);
        let (mut mean, mut m2) = ([zero; G], [zero; G]);
        for k in 0..steps {
            let start = (first_row + k) * c + first;
            let rk = s.splat(RECIP[k + 1]);
            for g in 0..G {
                let v = if g < full {
                    debug_assert!(start + (g + 1) * l <= x.len());
                    // SAFETY: `start + (g + 1)·LANES ≤ start + width ≤ row end ≤ rows·c ≤ x.len()`.
                    unsafe { s.load_ptr(x.as_ptr().add(start + g * l)) }
                } else if g == full && rem > 0 {
                    s.load_partial(&x[start + g * l..start + width], 0.0)
                } else {
                    continue;
                };
                // Lanes past `width` load 0 with pivot 0: they accumulate zeros and are never read.
                welford_step(s, s.sub(v, piv[g]), rk, one, &mut mean[g], &mut m2[g]);
            }
        }
        let (mut mb, mut qb) = ([0.0; MAX_LANES], [0.0; MAX_LANES]);
        // Every channel of the group holds `first_row` values so far (if `out` started empty):
        // one division for the whole group.
        let weights = ChannelStats::merge_weights(first_row as u64, steps as u64);
        for g in 0..width.div_ceil(l) {
            s.to_lanes(mean[g], &mut mb);
            s.to_lanes(m2[g], &mut qb);
            let lanes = l.min(width - g * l);
            for (lane, slot) in out[g * l..g * l + lanes].iter_mut().enumerate() {
                let part = ChannelStats::new(steps as u64, mb[lane] as f64, qb[lane] as f64);
                *slot = if slot.count() == first_row as u64 {
                    slot.merge_weighted(&part, weights)
                } else {
                    slot.merge(&part)
                };
            }
        }
        first_row += steps;
    }
}

impl Kernel for MomentsRows<'_> {
    type Output = ();

    #[inline(always)]
    fn run<S: Simd>(self, s: S) {
        let c = self.pivots.len();
        if c == 0 {
            return;
        }
        if c >= GROUP * S::LANES {
            for first in (0..c).step_by(GROUP * S::LANES) {
                let o = first.min(self.out.len());
                moments_strided::<S, GROUP>(
                    s,
                    self.x,
                    c,
                    first,
                    &self.pivots[first..],
                    &mut self.out[o..],
                );
            }
            return;
        }
        moments_periodic(s, self.x, self.pivots, self.out);
    }
}

/// [`MomentsRows`] for narrow rows: lane `q` of the flat data always holds channel `q mod c`
/// (the period is a multiple of both `c` and the lane count), state in memory.
#[inline(always)]
fn moments_periodic<S: Simd>(s: S, x: &[f32], pivots: &[f32], out: &mut [ChannelStats]) {
    {
        let c = pivots.len();
        let l = S::LANES;
        let per = period(c, l);
        let piv = expand_periodic(pivots, per);
        let (mut mean, mut m2) = (zeroed(per), zeroed(per));
        let one = s.splat(1.0);
        for chunk in x.chunks(KMAX * per) {
            mean.fill(0.0);
            m2.fill(0.0);
            let steps = chunk.len() / per;
            for (k, step) in chunk.chunks_exact(per).enumerate() {
                let rk = s.splat(RECIP[k + 1]);
                for o in (0..per).step_by(l) {
                    let d = s.sub(s.load(&step[o..]), s.load(&piv[o..]));
                    let (mut mv, mut qv) = (s.load(&mean[o..]), s.load(&m2[o..]));
                    welford_step(s, d, rk, one, &mut mv, &mut qv);
                    s.store(&mut mean[o..], mv);
                    s.store(&mut m2[o..], qv);
                }
            }
            let rest = &chunk[steps * per..];
            let rk1 = RECIP[steps + 1];
            for o in (0..rest.len()).step_by(l) {
                let keep = s.mask(rest.len() - o);
                let d = s.mul(s.sub(s.load(&rest[o..]), s.load(&piv[o..])), keep);
                let (mut mv, mut qv) = (s.load(&mean[o..]), s.load(&m2[o..]));
                welford_step(s, d, s.mul(s.splat(rk1), keep), keep, &mut mv, &mut qv);
                s.store(&mut mean[o..], mv);
                s.store(&mut m2[o..], qv);
            }
            for (q, (&mv, &qv)) in mean.iter().zip(m2.iter()).enumerate() {
                let count = steps + usize::from(q < rest.len());
                if let (true, Some(slot)) = (count > 0, out.get_mut(q % c)) {
                    *slot = slot.merge(&ChannelStats::new(count as u64, mv as f64, qv as f64));
                }
            }
        }
    }
}
