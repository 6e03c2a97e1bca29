//! The training-forward check, with every running-update convention.

use batchnorm::{
    Affine, BatchNorm, BatchStats, Epilogue, Error, Momentum, RunningUpdate, SavedStatsMut,
    Variance,
};

use super::*;
use crate::reference;

/// Outputs of one training forward call, widened to f64.
pub(crate) struct TrainOut {
    pub(crate) result: Result<BatchStats, Error>,
    pub(crate) y: Vec<f64>,
    pub(crate) mean: Vec<f64>,
    pub(crate) inv_std: Vec<f64>,
    pub(crate) running_mean: Vec<f64>,
    pub(crate) running_var: Vec<f64>,
}

/// One training call on data stored as `storage`; with `save == false` no saved statistics are
/// asked for (they stay sentinels).
pub(crate) fn run_training(
    storage: Storage,
    bn: &BatchNorm,
    inp: &Inputs,
    affine: bool,
    update: Update,
    save: bool,
) -> TrainOut {
    run_training_with(storage, bn, inp, (affine, update, save), Fused::None)
}

/// [`run_training`] through [`BatchNorm::training_fused`] with the epilogue `fused` (its residual
/// is the `dy` tensor); the outputs widened to f64.
pub(crate) fn run_training_with(
    storage: Storage,
    bn: &BatchNorm,
    inp: &Inputs,
    args: (bool, Update, bool),
    fused: Fused,
) -> TrainOut {
    with_store!(storage, E => run_as::<E>(bn, inp, args, fused))
}

fn run_as<E: Store>(
    bn: &BatchNorm,
    inp: &Inputs,
    (affine, update, save): (bool, Update, bool),
    fused: Fused,
) -> TrainOut {
    let x = narrow::<E>(&inp.x);
    let z = narrow::<E>(&inp.dy);
    let epilogue = match fused {
        Fused::None => Epilogue::None,
        Fused::Relu => Epilogue::Relu,
        Fused::AddRelu => Epilogue::AddRelu(&z[..]),
    };
    let mut y = vec![E::sentinel(); inp.out_len];
    let mut mean = vec![E::param_sentinel(); inp.saved_len[0]];
    let mut inv_std = vec![E::param_sentinel(); inp.saved_len[1]];
    let mut running_mean = params::<E>(&inp.running_mean);
    let mut running_var = params::<E>(&inp.running_var);
    let (gamma, beta) = (params::<E>(&inp.gamma), params::<E>(&inp.beta));
    let result = bn.training_fused(
        &x,
        &mut y,
        affine.then_some(Affine {
            gamma: &gamma,
            beta: &beta,
        }),
        save.then_some(SavedStatsMut {
            mean: &mut mean,
            inv_std: &mut inv_std,
        }),
        update
            .convention()
            .map(|(momentum, var_estimator)| RunningUpdate {
                mean: &mut running_mean,
                var: &mut running_var,
                momentum,
                var_estimator,
            }),
        epilogue,
    );
    TrainOut {
        result,
        y: widen(&y),
        mean: widen_params::<E>(&mean),
        inv_std: widen_params::<E>(&inv_std),
        running_mean: widen_params::<E>(&running_mean),
        running_var: widen_params::<E>(&running_var),
    }
}

impl TrainOut {
    /// Whether nothing was written: y and the saved statistics all sentinels, the running
    /// statistics as given.
    fn untouched(&self, inp: &Inputs) -> bool {
        untouched(&self.y)
            && untouched(&self.mean)
            && untouched(&self.inv_std)
            && bits(&self.running_mean) == bits(&wide(&inp.running_mean))
            && bits(&self.running_var) == bits(&wide(&inp.running_var))
    }

    /// The outputs of channel `ch` as bits, for comparisons between runs (the saved statistics
    /// only `with_saved`).
    pub(crate) fn channel_bits(&self, s: &Setup, ch: usize, with_saved: bool) -> Vec<u64> {
        let f = |v: f64| if v.is_nan() { u64::MAX } else { v.to_bits() };
        let g = f;
        let mut out: Vec<u64> = s.indices[ch].iter().map(|&i| f(self.y[i])).collect();
        let saved = [&self.mean, &self.inv_std];
        let running = [&self.running_mean, &self.running_var];
        for v in running
            .iter()
            .chain(if with_saved { &saved[..] } else { &[] })
        {
            out.push(v.get(ch).map_or(0, |&v| f(v)));
        }
        if let Ok(stats) = &self.result {
            let st = stats.channels()[ch];
            out.extend([st.count(), g(st.mean()), g(st.m2())]);
        }
        out
    }
}

/// The errors training call `op` must report, and the weights `(old, new)` of the running
/// update's convention.
fn expected(op: &'static str, case: &Case, s: &Setup, inp: &Inputs) -> (Expected, f64, f64) {
    let affine = !case.no_affine;
    let (c, m, len) = (s.c(), s.m(), s.len());
    let update = case.update.convention();
    let mut exp = Expected::of(op);
    exp.len("x", len, inp.x.len());
    exp.len("y", len, inp.out_len);
    if affine {
        exp.len("gamma", c, inp.gamma.len());
        exp.len("beta", c, inp.beta.len());
    }
    exp.len("saved_mean", c, inp.saved_len[0]);
    exp.len("saved_inv_std", c, inp.saved_len[1]);
    // Weights of the old running value and of the batch value, as the convention states them.
    let (mut w_old, mut w_new) = (0.0, 0.0);
    if let Some((momentum, estimator)) = update {
        exp.len("running_mean", c, inp.running_mean.len());
        exp.len("running_var", c, inp.running_var.len());
        if estimator == Variance::Unbiased && m < 2 {
            exp.push(Error::TooFewValues {
                per_channel: m as u64,
            });
        }
        match momentum {
            Momentum::NewWeight(w) | Momentum::OldWeight(w) if !(0.0..=1.0).contains(&w) => {
                exp.push(Error::InvalidMomentum { momentum: w })
            }
            Momentum::NewWeight(w) => (w_old, w_new) = (1.0 - w, w),
            Momentum::OldWeight(w) => (w_old, w_new) = (w, 1.0 - w),
            Momentum::CumulativeAverage { batches_tracked: 0 } => {
                exp.push(Error::ZeroBatchesTracked)
            }
            Momentum::CumulativeAverage { batches_tracked } => {
                (w_old, w_new) = (
                    1.0 - 1.0 / batches_tracked as f64,
                    1.0 / batches_tracked as f64,
                )
            }
        }
    }
    (exp, w_old, w_new)
}

/// The fused training op against the plain op's outputs `plain` (when it succeeded): the
/// output through the epilogue bit for bit, every other output the same bits.
fn fused(case: &Case, s: &Setup, inp: &Inputs, ctx: &mut Ctx<'_>, plain: Option<&TrainOut>) {
    let Some((_, z)) = super::inference::epilogue(case, inp) else {
        return;
    };
    let (mut exp, _, _) = expected("training_fused", case, s, inp);
    if let Some(z) = z {
        exp.len("z", s.len(), z.len());
    }
    let args = (!case.no_affine, case.update, true);
    let out = run_training_with(s.storage, &s.bn, inp, args, case.fused);
    if !outcome(ctx, "training_fused", &out.result, &exp) {
        if out.result.is_err() && !out.untouched(inp) {
            ctx.fail("training_fused wrote an output before returning an error".into());
        }
        return;
    }
    let Some(plain) = plain else { return };
    let want = rounded(s, &super::inference::compose(s.storage, &plain.y, z));
    if matches!(s.storage, Storage::F16 | Storage::Bf16) {
        ctx.report.exact("half training fused y", want.len());
    }
    if let Some(i) = (0..want.len()).find(|&i| !same_bits(out.y[i], want[i])) {
        ctx.fail(format!(
            "training_fused {:?}: y[{i}] = {:e}, the plain op then the epilogue give {:e}",
            case.fused, out.y[i], want[i]
        ));
    }
    if (0..s.c()).any(|ch| {
        out.channel_bits(s, ch, true)[s.indices[ch].len()..]
            != plain.channel_bits(s, ch, true)[s.indices[ch].len()..]
    }) {
        ctx.fail("training_fused: statistics differ from the plain op's".into());
    }
}

pub(crate) fn training(case: &Case, s: &Setup, inp: &Inputs, ctx: &mut Ctx<'_>) {
    let affine = !case.no_affine;
    let (c, m) = (s.c(), s.m());
    let update = case.update.convention();
    let (exp, w_old, w_new) = expected("training", case, s, inp);
    let out = run_training(s.storage, &s.bn, inp, affine, case.update, true);
    // The f32 op's outputs (those of half data must equal them, y rounded once).
    let out32 = match s.storage {
        Storage::F32 | Storage::F64 => None,
        Storage::F16 | Storage::Bf16 => Some(run_training(
            Storage::F32,
            &s.bn,
            inp,
            affine,
            case.update,
            true,
        )),
    };
    let plain = out32.as_ref().unwrap_or(&out);
    let plain_ok = plain.result.is_ok() && !s.giant;
    fused(case, s, inp, ctx, plain_ok.then_some(plain));
    if !outcome(ctx, "training", &out.result, &exp) {
        if out.result.is_err() && !out.untouched(inp) {
            ctx.fail("training wrote an output before returning an error".into());
        }
        return;
    }
    if s.giant {
        return;
    }
    let Ok(stats) = &out.result else { return };
    for (name, v) in [
        ("y", &out.y),
        ("saved_mean", &out.mean),
        ("saved_inv_std", &out.inv_std),
    ] {
        if let Some(i) = has_sentinel(v) {
            ctx.fail(format!("training did not write {name}[{i}]"));
        }
    }
    // The other parallelism setting and residency Memory, without saved statistics: the same
    // bits otherwise.
    let again = run_training(s.storage, &s.other, inp, affine, case.update, false);
    if (0..c).any(|ch| out.channel_bits(s, ch, false) != again.channel_bits(s, ch, false)) {
        ctx.fail(
            "training differs between parallelism and residency settings (or with saved = None)"
                .into(),
        );
    }
    if !(untouched(&again.mean) && untouched(&again.inv_std)) {
        ctx.fail("training wrote saved statistics that were not asked for".into());
    }

    let gamma = affine.then_some(&inp.gamma[..]);
    let beta = affine.then_some(&inp.beta[..]);
    let mut bad = s.nonfinite_channels(&inp.x);
    for (ch, b) in bad.iter_mut().enumerate() {
        *b |= !gamma.map_or(1.0, |g| g[ch]).is_finite() || !beta.map_or(0.0, |b| b[ch]).is_finite();
        if update.is_some() {
            *b |= !inp.running_mean[ch].is_finite() || !inp.running_var[ch].is_finite();
        }
    }
    if bad.contains(&true) {
        let clean = inp.sanitized(s, &bad);
        let again = run_training(s.storage, &s.bn, &clean, affine, case.update, true);
        for ch in (0..c).filter(|&ch| !bad[ch]) {
            if out.channel_bits(s, ch, true) != again.channel_bits(s, ch, true) {
                ctx.fail(format!(
                    "training: non-finite values of another channel changed channel {ch}"
                ));
            }
        }
    }

    if let Some(out32) = &out32 {
        // Half data: y is the f32 op's output rounded once; the statistics, saved and running
        // statistics are the f32 op's, bit for bit.
        let y32 = rounded(s, &out32.y);
        ctx.report.exact("half training y", y32.len());
        ctx.report.exact("half training statistics", c);
        if let Some(i) = first_difference(&out.y, &y32) {
            ctx.fail(format!(
                "training y[{i}] = {:e}, the f32 op rounded once gives {:e}",
                out.y[i], y32[i]
            ));
        }
        let n =
            |o: &TrainOut, ch: usize| o.channel_bits(s, ch, true)[s.indices[ch].len()..].to_vec();
        if let Some(ch) = (0..c).find(|&ch| n(&out, ch) != n(out32, ch)) {
            ctx.fail(format!(
                "training channel {ch}: statistics differ from the f32 op's"
            ));
        }
        return;
    }
    if s.storage == Storage::F64 {
        let weights = (w_old, w_new);
        training64(
            s,
            inp,
            ctx,
            (&out, stats),
            (gamma, beta),
            &bad,
            update,
            weights,
        );
        return;
    }
    let want = reference::training(&inp.x, s.shape, s.layout, gamma, beta, s.eps);
    let x_bad = s.nonfinite_channels(&inp.x);
    let tol = fwd_tol(m);
    let eps = s.eps;
    let exact = reference::statistics(&inp.x, s.shape, s.layout);
    for ch in 0..c {
        if x_bad[ch] {
            continue;
        }
        let keys = ("training stats mean", "training stats m2");
        check_stats(
            ctx,
            keys,
            ch,
            &stats.channels()[ch],
            &exact[ch],
            m,
            1.0,
            1.0,
        );
        if bad[ch] {
            continue;
        }
        let (mu, var, r) = (want.mean[ch], want.var[ch], want.inv_std[ch]);
        let sigma = var.sqrt();
        // Saved mean: the statistics' mean (bound of `check_stats`), rounded to f32.
        let scale = sigma + EPS32 * mu.abs();
        let floor = mean_floor(m) + 1.01 * EPS32 * mu.abs() + SUB_ULP;
        ctx.close(
            "training saved mean",
            out.mean[ch],
            mu,
            scale,
            (tol, floor),
            || format!("channel {ch}"),
        );
        if (var + eps).is_nan() || var + eps < F32_MIN_NORMAL {
            // var + ε below f32's normal range: not representable with relative accuracy.
            ctx.report.skip("training saved inv_std");
            continue;
        }
        // Relative error of r from the absolute floor of the variance.
        let r_floor = m2_floor(m) / m as f64 / (var + eps);
        ctx.close(
            "training saved inv_std",
            out.inv_std[ch],
            r,
            r,
            (tol, r * r_floor + SUB_ULP),
            || format!("channel {ch}"),
        );
        let (g, b) = (
            gamma.map_or(1.0, |g| g[ch] as f64),
            beta.map_or(0.0, |b| b[ch] as f64),
        );
        for &i in &s.indices[ch] {
            let d = inp.x[i] as f64 - mu;
            let (alpha, xhat) = (g * r, d * r);
            let scale = g.abs() * (1.0 + xhat.abs()) + b.abs();
            let representable = [d, alpha, alpha * d, scale, want.y[i]]
                .iter()
                .all(|&v| finite_in(v));
            if !representable {
                ctx.report.skip("training y");
                continue;
            }
            // f32 α, bias and output below the normal range (α's multiplied by |x − μ|), and
            // the variance's absolute floor through r.
            let floor = SUB_ULP * (2.0 + d.abs()) + (alpha * d).abs() * r_floor;
            ctx.close(
                "training y",
                out.y[i],
                want.y[i],
                scale,
                (tol, floor),
                || format!("element {i} (channel {ch}, x = {:e})", inp.x[i]),
            );
        }
    }

    if let Some((momentum, estimator)) = update {
        let (want_mean, want_var) = reference::running_update(
            &inp.running_mean,
            &inp.running_var,
            &want,
            momentum,
            estimator,
        );
        let w = w_new;
        for ch in (0..c).filter(|&ch| !bad[ch]) {
            let (mu, sigma) = (want.mean[ch], want.var[ch].sqrt());
            let (old_m, old_v) = (inp.running_mean[ch] as f64, inp.running_var[ch] as f64);
            // Bounds: the batch statistics' error (times w), the f64 blend (negligible) and
            // the rounding of the result to f32, relative to the size of the blended terms.
            let terms = w_old * old_m.abs() + w * (mu.abs() + sigma);
            if finite_in(want_mean[ch]) && finite_in(terms) {
                // The reference's blend rounds in f64 (`old + (new − old)/t` cancels when t = 1).
                let floor = w * mean_floor(m) + SUB_ULP + f64::EPSILON * (old_m.abs() + mu.abs());
                ctx.close(
                    "training running mean",
                    out.running_mean[ch],
                    want_mean[ch],
                    terms,
                    (tol, floor),
                    || format!("channel {ch} ({momentum:?}, old {old_m:e})"),
                );
            } else {
                ctx.report.skip("training running mean");
            }
            let (var_b, var_floor) = match estimator {
                Variance::Biased => (want.var[ch], m2_floor(m) / m as f64),
                Variance::Unbiased => (want.var_unbiased[ch], m2_floor(m) / (m as f64 - 1.0)),
            };
            let terms = w_old * old_v.abs() + w * var_b;
            if finite_in(want_var[ch]) && finite_in(terms) {
                let floor = w * var_floor + SUB_ULP + f64::EPSILON * (old_v.abs() + var_b);
                ctx.close(
                    "training running var",
                    out.running_var[ch],
                    want_var[ch],
                    terms,
                    (tol, floor),
                    || format!("channel {ch} ({momentum:?} {estimator:?}, old {old_v:e})"),
                );
            } else {
                ctx.report.skip("training running var");
            }
        }
    }
}

/// f64 data: every output of the training forward against the precise reference (double-double
/// statistics, inverse std, output and running blend), for the channels whose inputs are finite.
///
/// Bounds, with tol = [`f64_tol`] of the channel's M values, δ = tol·(σ + |μ|) the mean's bound
/// and t the variance's share in the inverse std ([`Exact64::r_share`]):
/// - the returned statistics and the saved mean: as [`check_stats64`] (the same values);
/// - saved inverse std: `tol·r + t·r` (½·tol from the variance and 4½ roundings, within tol);
/// - y: `tol·(|α|·(σ + |x − μ|) + |β|) + |α|·(tol·|μ| + t·(|x − μ| + δ) + 2·tol·δ)`: the mean's
///   error δ times |α| (its σ part inside the first term, its |μ| part the second), r's error
///   (½·tol, and t) times |α|·|x − μ|, the roundings of `M2/M`, `+ ε`, the root, `1/·`, `γ·r`,
///   `x − μ` and the FMA (6½u of the terms: within tol with ½·tol for M ≥ 3; for M ≤ 2 the
///   variance is within a few u), and the second-order products of these errors with δ (ρ·δ,
///   u·δ: at most 2·tol·δ·|α|);
/// - running mean and variance: the batch value's bound times its weight, and the blend's own
///   roundings (the weight, two products and the sum, 4u of the blended terms), against the
///   blend with the convention's exact weights.
#[allow(clippy::too_many_arguments)]
fn training64(
    s: &Setup,
    inp: &Inputs,
    ctx: &mut Ctx<'_>,
    (out, stats): (&TrainOut, &BatchStats),
    (gamma, beta): (Option<&[f32]>, Option<&[f32]>),
    bad: &[bool],
    update: Option<(Momentum, Variance)>,
    (w_old, w_new): (f64, f64),
) {
    use crate::precise::Dd;
    let exact = Exact64::channels(s, &inp.x, s.shape);
    let x_bad = s.nonfinite_channels(&inp.x);
    let u = EPS64;
    for ch in (0..s.c()).filter(|&ch| !x_bad[ch]) {
        let e = &exact[ch];
        let at = || format!("channel {ch}");
        let keys = ("f64 training stats mean", "f64 training stats m2", None);
        check_stats64(ctx, keys, ch, (&stats.channels()[ch], e), (1.0, 1.0, 0.0));
        if bad[ch] {
            continue;
        }
        let (tol, mu, sigma, delta) = (e.tol, e.mean, e.sigma, e.delta);
        let scale = sigma + mu.abs();
        if scale.is_finite() {
            ctx.close(
                "f64 training saved mean",
                out.mean[ch],
                mu,
                scale,
                (tol, 0.0),
                at,
            );
            let key = "f64 training saved mean [documented bound]";
            ctx.close(key, out.mean[ch], mu, sigma, (tol, 2.0 * u * mu.abs()), at);
        }
        let m = Dd::new(e.moments.count as f64);
        let r_dd = Dd::new(1.0) / (e.moments.m2 / m + Dd::new(s.eps)).sqrt();
        let r = r_dd.value();
        let Some(t) = e.r_share(s.eps).filter(|_| r.is_finite() && r > 0.0) else {
            ctx.report.skip("f64 training saved inv_std");
            ctx.report.skip("f64 training y");
            continue;
        };
        ctx.close(
            "f64 training saved inv_std",
            out.inv_std[ch],
            r,
            r,
            (tol, r * t),
            at,
        );
        let g = gamma.map_or(1.0, |g| f64::from(g[ch]));
        let b = beta.map_or(0.0, |b| f64::from(b[ch]));
        let alpha_dd = Dd::new(g) * r_dd;
        let alpha = alpha_dd.value().abs();
        for &i in &s.indices[ch] {
            let d_dd = e.moments.dev_dd(f64::from(inp.x[i]));
            let want = (alpha_dd * d_dd + Dd::new(b)).value();
            let d = d_dd.value().abs();
            let terms = alpha * (sigma + d) + b.abs();
            let share = t * (d + delta) + 2.0 * tol * delta;
            let floor = alpha * (tol * mu.abs() + share);
            if !(want.is_finite() && terms.is_finite() && floor.is_finite()) {
                ctx.report.skip("f64 training y");
                continue;
            }
            ctx.close(
                "f64 training y",
                out.y[i],
                want,
                terms,
                (tol, floor),
                || format!("element {i} (channel {ch}, x = {:e})", inp.x[i]),
            );
            // The README's bound (and tests/f64.rs's): tol of the terms plus 2u·|μ| in x − μ.
            let key = "f64 training y [documented bound]";
            let floor = alpha * (2.0 * u * mu.abs() + share);
            let at = || format!("element {i} (channel {ch}, x = {:e})", inp.x[i]);
            ctx.close(key, out.y[i], want, terms, (tol, floor), at);
        }
    }

    let Some((momentum, estimator)) = update else {
        return;
    };
    // The convention's weights (old, new), exactly.
    let one = Dd::new(1.0);
    let (wo, wn) = match momentum {
        Momentum::NewWeight(w) => (one - Dd::new(w), Dd::new(w)),
        Momentum::OldWeight(w) => (Dd::new(w), one - Dd::new(w)),
        Momentum::CumulativeAverage { batches_tracked } => {
            let w = one / Dd::new(batches_tracked as f64);
            (one - w, w)
        }
    };
    for ch in (0..s.c()).filter(|&ch| !bad[ch]) {
        let e = &exact[ch];
        let (old_m, old_v) = (inp.running_mean[ch], inp.running_var[ch]);
        let (old_m, old_v) = (f64::from(old_m), f64::from(old_v));
        let tol = e.tol + 4.0 * EPS64;
        let blend = |old: f64, new: Dd| (wo * Dd::new(old) + wn * new).value();
        let want = blend(old_m, e.moments.mean);
        let terms = w_old * old_m.abs() + w_new * (e.sigma + e.mean.abs());
        if want.is_finite() && terms.is_finite() {
            let got = out.running_mean[ch];
            ctx.close(
                "f64 training running mean",
                got,
                want,
                terms,
                (tol, 0.0),
                || format!("channel {ch} ({momentum:?}, old {old_m:e})"),
            );
        } else {
            ctx.report.skip("f64 training running mean");
        }
        // The variance of the estimator: M2/M or M2/(M − 1), with M2's bound
        // `tol·M2 + M·δ²` (check_stats64) divided alike.
        let denom = match estimator {
            Variance::Biased => e.moments.count as f64,
            Variance::Unbiased => e.moments.count as f64 - 1.0,
        };
        let var_b = e.moments.m2 / Dd::new(denom);
        let want = blend(old_v, var_b);
        let terms = w_old * old_v.abs() + w_new * var_b.value();
        let floor = w_new * e.moments.count as f64 * e.delta * e.delta / denom;
        if want.is_finite() && terms.is_finite() && floor.is_finite() {
            let got = out.running_var[ch];
            ctx.close(
                "f64 training running var",
                got,
                want,
                terms,
                (tol, floor),
                || format!("channel {ch} ({momentum:?} {estimator:?}, old {old_v:e})"),
            );
        } else {
            ctx.report.skip("f64 training running var");
        }
    }
}
