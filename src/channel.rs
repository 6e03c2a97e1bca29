//! Per-channel scalar math between the passes, in f64: the normalize coefficients (inference
//! and training), the inverse stds, the saved statistics and the running update, the dx
//! coefficients and dγ, dβ, and folding's scale and shift. Shared by the operator, the
//! synchronized operator and folding; no data tensor is touched here.

use crate::driver::{ChannelAffine, DxParams, GradSums};
use crate::params::{
    Affine, GradMode, ParamGrads, RunningStats, RunningUpdate, SavedStats, SavedStatsMut,
};
use crate::scratch::{self, Scratch};
use crate::simd::{Backend, Kernel, Real, Simd};
use crate::{ChannelStats, Variance};

/// A loop over channels, written branch-free so that it vectorizes.
trait ChannelLoop {
    /// Runs the loop.
    fn write(self);
    /// The number of channels.
    fn channels(&self) -> usize;
}

/// Runs `l` inside the backend's target-feature entry, so that it is compiled for the backend's
/// vectors (outside, it is baseline code: SSE2 scalar on x86-64); a channel or two (the
/// per-channel schedules) skip the dispatch. The arithmetic is the same either way (correctly
/// rounded square roots and quotients, no contraction), so are the bits.
fn in_vectors(backend: Backend, l: impl ChannelLoop) {
    struct Entry<L>(L);
    impl<L: ChannelLoop> Kernel for Entry<L> {
        type T = f64;
        type Output = ();
        #[inline(always)]
        fn run<S: Simd<T = f64>>(self, _: S) {
            self.0.write()
        }
    }
    if l.channels() <= 2 {
        l.write()
    } else {
        backend.dispatch(Entry(l))
    }
}

/// Normalization of every channel in inference, from the running statistics: shift by the
/// running mean, scale by `γ/√(var + ε)` (γ = 1 and β = 0 without `affine`), or the mean folded
/// into the bias where that costs no accuracy ([`fold_shift`]). The slices hold
/// every channel (checked by the caller).
pub(crate) fn inference_params<P: Real>(
    backend: Backend,
    eps: f64,
    affine: Option<&Affine<'_, P>>,
    running: &RunningStats<'_, P>,
) -> Scratch<ChannelAffine<P>> {
    let mut out = scratch::zeroed(running.mean.len());
    let k = InferenceParams {
        eps,
        affine: affine.map(|a| (a.gamma, a.beta)),
        running: (running.mean, running.var),
        out: &mut out,
        fused: backend.fused_mul_add(),
    };
    in_vectors(backend, k);
    out
}

/// The per-channel loop of [`inference_params`] ([`in_vectors`]). Measured (one thread, AMD EPYC
/// family 25 model 17 (Zen 4)), bf16 NCHW 1x1024x7x7 inference: this loop took 21% of the call
/// compiled for SSE2.
struct InferenceParams<'a, P: Real> {
    eps: f64,
    affine: Option<(&'a [P], &'a [P])>,
    /// The running mean and variance.
    running: (&'a [P], &'a [P]),
    out: &'a mut [ChannelAffine<P>],
    fused: bool,
}

impl<P: Real> ChannelLoop for InferenceParams<'_, P> {
    fn channels(&self) -> usize {
        self.out.len()
    }

    #[inline(always)]
    fn write(self) {
        let (eps, fused) = (self.eps, self.fused);
        let map = |mean: P, var: P, (gamma, beta): (f64, f64)| {
            let r = inverse_std(var.into(), eps);
            let scale = P::from_f64(gamma * r);
            let shifted = ChannelAffine {
                shift: mean,
                scale,
                bias: P::from_f64(beta),
            };
            let folded = fold_shift(shifted, mean.into(), (gamma, beta));
            select(fused, folded, shifted)
        };
        // Zipped slices, the branch on `affine` outside the loop: no bounds check or branch per
        // channel.
        let (mean, var) = self.running;
        let channels = mean.iter().zip(var).zip(self.out.iter_mut());
        match self.affine {
            Some((gamma, beta)) => {
                for (((&m, &v), out), (&g, &b)) in channels.zip(gamma.iter().zip(beta)) {
                    *out = map(m, v, (g.into(), b.into()));
                }
            }
            None => {
                for ((&m, &v), out) in channels {
                    *out = map(m, v, (1.0, 0.0));
                }
            }
        }
    }
}

/// `folded` where `fold` holds and it exists, else `shifted` (a select the loops vectorize).
#[inline(always)]
fn select<P: Real>(
    fold: bool,
    folded: Option<ChannelAffine<P>>,
    shifted: ChannelAffine<P>,
) -> ChannelAffine<P> {
    match folded {
        Some(f) if fold => f,
        _ => shifted,
    }
}

/// How large `|scale·μ|` may be, relative to `|γ| + |β|`, for [`fold_shift`].
const FOLD_LIMIT: f64 = 2.0;

/// `p` with its shift folded into the bias, `y = scale·x + (β − scale·μ)`: one FMA per element
/// where `p` takes a subtract and an FMA (the kernels skip the subtract of a +0 shift), when that
/// costs no accuracy. `mean` is the channel's exact mean μ, `(gamma, beta)` its affine.
///
/// Against the exact `y = α·(x − μ) + β` (α the unrounded scale, `scale` = α rounded), the folded
/// map errs by the rounding of the scale, `u·|γ·x̂|` (the same as the shifted map's), of the bias,
/// `u·|β − scale·μ|` (the product and difference are exact or f64), and of the FMA, `u·|y|`. With
/// `|scale·μ| ≤ 2·(|γ| + |β|)` that is at most `4u` of the size of the terms `|γ|·(1 + |x̂|) + |β|`,
/// inside the `8u` the forward tolerance allows for the kernel's own roundings. Data whose mean is
/// large next to its spread (`NUMERICS.md`: mean 1e4 with σ 1e-2 gives `|scale·μ|` ≈ 1e6·|γ|)
/// keeps the subtract, and so does a non-finite scale or mean (the comparison fails). Callers fold
/// only for a backend whose multiply-add rounds once ([`Backend::fused_mul_add`]): a separate
/// product `scale·x` may overflow where `y` does not (γ near the largest f32).
///
/// f64 parameters (f64 data) keep the subtract: their stated tolerance is relative to the terms
/// `α·(x − μ)` and `β` alone, which `u·|scale·μ|` may exceed when both are small.
#[inline(always)]
fn fold_shift<P: Real>(
    p: ChannelAffine<P>,
    mean: f64,
    (gamma, beta): (f64, f64),
) -> Option<ChannelAffine<P>> {
    if P::WIDE {
        return None;
    }
    let product = p.scale.into() * mean;
    let bias = P::from_f64(beta - product);
    // A bias that overflows the parameter type (β and scale·μ near its largest values) keeps the
    // subtract as well.
    let small = product.abs() <= FOLD_LIMIT * (gamma.abs() + beta.abs());
    (small & bias.into().is_finite()).then_some(ChannelAffine {
        shift: P::ZERO,
        scale: p.scale,
        bias,
    })
}

/// What a training forward does after normalizing, from the batch statistics `stats` (one per
/// channel) and the inverse std `inv_std[c]` each channel normalized with: the saved statistics,
/// and the running update with its weights `(old, new)`, in the backend's vectors ([`in_vectors`]).
pub(crate) fn finish_training<P: Real>(
    backend: Backend,
    stats: &[ChannelStats],
    inv_std: &[f64],
    saved: Option<SavedStatsMut<'_, P>>,
    update: Option<(RunningUpdate<'_, P>, (f64, f64))>,
) {
    let k = FinishTraining {
        stats,
        inv_std,
        saved,
        update,
    };
    in_vectors(backend, k);
}

/// The per-channel loops of [`finish_training`] ([`in_vectors`]). Measured (one thread, AMD EPYC
/// family 25 model 17 (Zen 4)), bf16 NHWC 1x1024x7x7 training: these loops took 7% of the call
/// compiled for SSE2.
struct FinishTraining<'a, 'b, P: Real> {
    stats: &'a [ChannelStats],
    inv_std: &'a [f64],
    saved: Option<SavedStatsMut<'b, P>>,
    update: Option<(RunningUpdate<'b, P>, (f64, f64))>,
}

impl<P: Real> ChannelLoop for FinishTraining<'_, '_, P> {
    fn channels(&self) -> usize {
        self.stats.len()
    }

    #[inline(always)]
    fn write(self) {
        let stats = self.stats;
        if let Some(saved) = self.saved {
            let channels = saved.mean.iter_mut().zip(saved.inv_std.iter_mut());
            for (((mean, r), s), &inv_std) in channels.zip(stats).zip(self.inv_std) {
                *mean = P::from_f64(s.mean());
                *r = P::from_f64(inv_std);
            }
        }
        if let Some((u, (old, new))) = self.update {
            let estimator = u.var_estimator;
            let divisor = move |count: u64| match estimator {
                Variance::Biased => count as f64,
                Variance::Unbiased => count as f64 - 1.0,
            };
            match common_reciprocal(stats, divisor) {
                Some(inv) => update_running(u, stats, (old, new), |s| s.m2() * inv),
                None => update_running(u, stats, (old, new), |s| s.m2() / divisor(s.count())),
            }
        }
    }
}

/// `1/divisor(count)` when every channel of `stats` has the same count (a batch's channels
/// always do), so that the per-channel loop multiplies: with a division for the odd channel left
/// in the loop, the compiler computed the quotient for every channel and selected (measured, AMD
/// EPYC family 25 model 17, one thread, the builds alternated: bf16 NHWC 1x1024x7x7 training
/// 21.3–21.5 → 20.7–20.9 µs).
fn common_reciprocal(stats: &[ChannelStats], divisor: impl Fn(u64) -> f64) -> Option<f64> {
    let count = stats.first()?.count();
    // A fold, not `all`: without the early exit the loop vectorizes.
    let same = stats
        .iter()
        .fold(true, |same, s| same & (s.count() == count));
    same.then(|| 1.0 / divisor(count))
}

/// The running update of every channel with weights `(old, new)` and the variance estimate
/// `var(s)` of each channel's statistics.
#[inline(always)]
fn update_running<P: Real>(
    u: RunningUpdate<'_, P>,
    stats: &[ChannelStats],
    (old, new): (f64, f64),
    var: impl Fn(&ChannelStats) -> f64,
) {
    for ((mean, v), s) in u.mean.iter_mut().zip(u.var.iter_mut()).zip(stats) {
        *mean = P::from_f64(old * (*mean).into() + new * s.mean());
        *v = P::from_f64(old * (*v).into() + new * var(s));
    }
}

/// The dx parameters in training mode of channels `first..first + sums.len()` into `out`, from
/// their backward sums (relative to the saved mean), the saved statistics, γ (`None`: 1) and the
/// number of values `m` the statistics were taken over, in the backend's vectors
/// ([`in_vectors`]). The slices hold every channel.
pub(crate) fn dx_params<P: Real>(
    backend: Backend,
    saved: &SavedStats<'_, P>,
    gamma: Option<&[P]>,
    m: f64,
    (first, sums): (usize, &[GradSums]),
    out: &mut [DxParams<P>],
) {
    let range = first..first + sums.len();
    let k = DxLoop {
        sums,
        saved: (&saved.mean[range.clone()], &saved.inv_std[range.clone()]),
        gamma: gamma.map(|g| &g[range]),
        m,
        out,
    };
    in_vectors(backend, k);
}

/// The per-channel loop of [`dx_params`] ([`in_vectors`]).
struct DxLoop<'a, P: Real> {
    sums: &'a [GradSums],
    /// The saved means and inverse stds of the channels.
    saved: (&'a [P], &'a [P]),
    gamma: Option<&'a [P]>,
    m: f64,
    out: &'a mut [DxParams<P>],
}

impl<P: Real> ChannelLoop for DxLoop<'_, P> {
    fn channels(&self) -> usize {
        self.sums.len()
    }

    #[inline(always)]
    fn write(self) {
        let (mean, inv_std) = self.saved;
        // A product rather than three quotients per channel: a division costs several products.
        let inv_m = 1.0 / self.m;
        let channels = self
            .sums
            .iter()
            .zip(mean)
            .zip(inv_std)
            .zip(self.out.iter_mut());
        match self.gamma {
            Some(gamma) => {
                for ((((g, &k), &r), out), &gamma) in channels.zip(gamma) {
                    *out = channel_dx_params(g, (k, r), gamma.into(), inv_m);
                }
            }
            None => {
                for (((g, &k), &r), out) in channels {
                    *out = channel_dx_params(g, (k, r), 1.0, inv_m);
                }
            }
        }
    }
}

/// The dx parameters of one channel with saved mean `shift` and inverse std `r`.
#[inline(always)]
fn channel_dx_params<P: Real>(
    g: &GradSums,
    (shift, r): (P, P),
    gamma: f64,
    inv_m: f64,
) -> DxParams<P> {
    let (dgamma, dbeta, lo) = training_grads(g, r.into(), inv_m);
    // dx = a·dy + b·x̂ + c, x̂ = (x − K)·r; the true x − μ is (x − K) − lo.
    let a = gamma * r.into();
    let b = -a * dgamma * inv_m;
    let c0 = -a * dbeta * inv_m - b * lo * r.into();
    DxParams {
        shift,
        r,
        a: P::from_f64(a),
        b: P::from_f64(b),
        c: P::from_f64(c0),
    }
}

/// Writes every channel's (dγ, dβ), in channel order from `grads`, into `g`, overwriting or
/// accumulating (the mode chosen once, not per channel).
pub(crate) fn write_grads<P: Real>(
    g: &mut ParamGrads<'_, P>,
    grads: impl Iterator<Item = (f64, f64)>,
) {
    let mode = g.mode;
    let channels = g.dgamma.iter_mut().zip(g.dbeta.iter_mut()).zip(grads);
    match mode {
        GradMode::Overwrite => {
            for ((dg, db), (dgamma, dbeta)) in channels {
                *dg = P::from_f64(dgamma);
                *db = P::from_f64(dbeta);
            }
        }
        GradMode::Accumulate => {
            for ((dg, db), (dgamma, dbeta)) in channels {
                *dg = P::from_f64((*dg).into() + dgamma);
                *db = P::from_f64((*db).into() + dbeta);
            }
        }
    }
}

/// Normalization of channels `first..first + stats.len()` from their batch statistics into `out`
/// (see [`channel_params`]), and their inverse stds into `inv_std`, in the backend's vectors
/// ([`in_vectors`]).
pub(crate) fn normalize_params<P: Real>(
    backend: Backend,
    (first, stats): (usize, &[ChannelStats]),
    eps: f64,
    affine: Option<&Affine<'_, P>>,
    (out, inv_std): (&mut [ChannelAffine<P>], &mut [f64]),
) {
    let k = ChannelParams {
        stats,
        eps,
        affine: affine.map(|a| (&a.gamma[first..], &a.beta[first..])),
        out,
        inv_std,
        fused: backend.fused_mul_add(),
    };
    in_vectors(backend, k);
}

/// The per-channel loops of [`normalize_params`] ([`in_vectors`]): the square roots, quotients and
/// folding tests of many channels at once. Measured (one thread, AMD EPYC family 25 model 17
/// (Zen 4)), bf16 NHWC 1x1024x7x7 training: these loops took 15% of the call compiled for SSE2.
struct ChannelParams<'a, P: Real> {
    stats: &'a [ChannelStats],
    eps: f64,
    /// γ and β from the group's first channel.
    affine: Option<(&'a [P], &'a [P])>,
    out: &'a mut [ChannelAffine<P>],
    inv_std: &'a mut [f64],
    fused: bool,
}

impl<P: Real> ChannelLoop for ChannelParams<'_, P> {
    fn channels(&self) -> usize {
        self.stats.len()
    }

    #[inline(always)]
    fn write(self) {
        let (stats, eps, fused) = (self.stats, self.eps, self.fused);
        // The biased variance; 1 / count once (every channel of a batch has the same count): a
        // product per channel instead of a quotient.
        let clamp = |var: f64| if var < 0.0 { 0.0 } else { var };
        let inv_std = &mut *self.inv_std;
        match common_reciprocal(stats, |count| count as f64) {
            Some(inv) => {
                for (r, s) in inv_std.iter_mut().zip(stats) {
                    *r = inverse_std(clamp(s.m2() * inv), eps);
                }
            }
            None => {
                for (r, s) in inv_std.iter_mut().zip(stats) {
                    *r = inverse_std(clamp(s.m2() / s.count() as f64), eps);
                }
            }
        }
        let channels = stats.iter().zip(inv_std.iter()).zip(self.out.iter_mut());
        match self.affine {
            Some((gamma, beta)) => {
                for (((s, &r), out), (&g, &b)) in channels.zip(gamma.iter().zip(beta)) {
                    *out = channel_params(s, r, (g.into(), b.into()), fused);
                }
            }
            None => {
                for ((s, &r), out) in channels {
                    *out = channel_params(s, r, (1.0, 0.0), fused);
                }
            }
        }
    }
}

/// `1/√(v + ε)` of every variance `v` of `var`, in the backend's vectors.
pub(crate) fn inv_stds(
    backend: Backend,
    eps: f64,
    var: impl ExactSizeIterator<Item = f64>,
) -> Scratch<f64> {
    let mut inv_std = scratch::collect(var.len(), var);
    in_vectors(backend, InvStds(&mut inv_std, eps));
    inv_std
}

/// `1/√(var + ε)`: the correctly rounded sum, square root and quotient, the same in every loop
/// that computes an inverse std, scalar or vectorized.
#[inline(always)]
fn inverse_std(var: f64, eps: f64) -> f64 {
    1.0 / (var + eps).sqrt()
}

/// `v ← 1/√(v + ε)` for every variance ([`in_vectors`]). Measured, 2048 channels, AMD EPYC
/// family 26: the scalar loop took about 3 ns per channel.
struct InvStds<'a>(&'a mut [f64], f64);

impl ChannelLoop for InvStds<'_> {
    fn channels(&self) -> usize {
        self.0.len()
    }

    #[inline(always)]
    fn write(self) {
        let eps = self.1;
        for v in self.0.iter_mut() {
            *v = inverse_std(*v, eps);
        }
    }
}

/// Normalization of one channel from its batch statistics and inverse std r, in f64: subtract
/// the f32-rounded mean `K`, scale by `α = γ·r`, and fold the residual `μ − K` into the bias; or,
/// for a channel that is not constant, the whole mean folded into the bias where that costs no
/// accuracy ([`fold_shift`]; only with `fused`, a multiply-add that rounds once). A constant
/// channel keeps `x − K = 0`, so that its y is β exactly.
#[inline(always)]
fn channel_params<P: Real>(
    s: &ChannelStats,
    inv_std: f64,
    (gamma, beta): (f64, f64),
    fused: bool,
) -> ChannelAffine<P> {
    let shift = P::from_f64(s.mean());
    let residual = s.mean() - shift.into();
    let scale = gamma * inv_std;
    let bias = beta - scale * residual;
    let shifted = ChannelAffine {
        shift,
        scale: P::from_f64(scale),
        bias: P::from_f64(bias),
    };
    let folded = fold_shift(shifted, s.mean(), (gamma, beta));
    select(fused & (s.m2() > 0.0), folded, shifted)
}

/// dγ, dβ and the mean residual `mean(x) − K` from the reduction sums (relative to pivot K), with
/// `inv_m` = 1 / the number of values.
#[inline(always)]
pub(crate) fn training_grads(g: &GradSums, inv_std: f64, inv_m: f64) -> (f64, f64, f64) {
    let residual = g.x * inv_m;
    let centered_xdy = g.xdy - residual * g.dy;
    (inv_std * centered_xdy, g.dy, residual)
}

/// `(scale, shift)` of channel `c` for folding: `scale = γ/√(var + ε)`, `shift = β − mean·scale`
/// (γ = 1 and β = 0 without `affine`), in f64.
pub(crate) fn folded(
    affine: Option<&Affine<'_>>,
    running: &RunningStats<'_>,
    eps: f64,
    c: usize,
) -> (f64, f64) {
    let (gamma, beta) = affine.map_or((1.0, 0.0), |a| (a.gamma[c] as f64, a.beta[c] as f64));
    let scale = gamma / (running.var[c] as f64 + eps).sqrt();
    (scale, beta - running.mean[c] as f64 * scale)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(scale: f32, mean: f32) -> ChannelAffine<f32> {
        ChannelAffine {
            shift: mean,
            scale,
            bias: 0.25,
        }
    }

    #[test]
    fn fold_shift_folds_small_means_only() {
        // |scale·μ| = 1.5 ≤ 2·(|γ| + |β|) = 2.5: folded, bias β − scale·μ, shift +0.
        let p = fold_shift(params(1.5, 1.0), 1.0, (1.0, 0.25)).expect("a small mean folds");
        assert_eq!(p.shift.to_bits(), 0);
        assert_eq!((p.scale, p.bias), (1.5, 0.25 - 1.5));
        // At the limit still folded, just past it not: 2·(0.5 + 0.25) = 1.5.
        assert!(fold_shift(params(1.5, 1.0), 1.0, (0.5, 0.25)).is_some());
        assert!(fold_shift(params(1.5, 1.0), 1.0 + 1e-9, (0.5, 0.25)).is_none());
        // Offset data (NUMERICS.md: mean 1e4, σ 1e-2, so scale ≈ 100·γ) keeps the subtract.
        assert!(fold_shift(params(100.0, 1e4), 1e4, (1.0, 0.25)).is_none());
        // A non-finite scale or mean never folds.
        assert!(fold_shift(params(f32::NAN, 1.0), 1.0, (1.0, 0.25)).is_none());
        assert!(fold_shift(params(1.0, f32::INFINITY), f64::INFINITY, (1.0, 0.25)).is_none());
    }

    #[test]
    fn fold_shift_keeps_biases_in_range_and_f64_shifted() {
        // β and scale·μ near f32's largest value: the folded bias would overflow.
        let (beta, scale, mean) = (3.0e38, 1.0f32, -3.0e38f32);
        let p = ChannelAffine {
            shift: mean,
            scale,
            bias: beta as f32,
        };
        assert!(fold_shift(p, mean as f64, (3.0e38, beta)).is_none());
        // f64 parameters never fold (their tolerance is relative to α·(x − μ) and β alone).
        let p = ChannelAffine {
            shift: 1.0f64,
            scale: 1.0,
            bias: 0.0,
        };
        assert!(fold_shift(p, 1.0, (1.0, 0.0)).is_none());
    }

    #[test]
    fn channel_params_fold_neither_constant_channels_nor_without_fused_fma() {
        let stats = |m2| ChannelStats::new(4, 0.5, m2);
        let folded: ChannelAffine<f32> = channel_params(&stats(1.0), 1.0, (1.0, 0.0), true);
        assert_eq!(folded.shift.to_bits(), 0);
        assert_eq!(folded.bias, -0.5);
        // A constant channel keeps x − K = 0 (so y = β exactly).
        let constant: ChannelAffine<f32> = channel_params(&stats(0.0), 1.0, (1.0, 0.0), true);
        assert_eq!((constant.shift, constant.bias), (0.5, 0.0));
        // A multiply-add that rounds twice keeps the subtract.
        let unfused: ChannelAffine<f32> = channel_params(&stats(1.0), 1.0, (1.0, 0.0), false);
        assert_eq!((unfused.shift, unfused.bias), (0.5, 0.0));
    }
}
