//! The training-forward check, with every running-update convention.

use batchnorm::{
    Affine, BatchNorm, BatchStats, Epilogue, Error, Momentum, RunningUpdate, SavedStatsMut,
    Variance,
};

use super::*;
use crate::reference;

/// Outputs of one training forward call.
pub(crate) struct TrainOut {
    pub(crate) result: Result<BatchStats, Error>,
    pub(crate) y: Vec<f32>,
    pub(crate) mean: Vec<f32>,
    pub(crate) inv_std: Vec<f32>,
    pub(crate) running_mean: Vec<f32>,
    pub(crate) running_var: Vec<f32>,
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
/// is the `dy` tensor); `y` widened to f32.
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
    let mut mean = vec![sentinel(); inp.saved_len[0]];
    let mut inv_std = vec![sentinel(); inp.saved_len[1]];
    let (mut running_mean, mut running_var) = (inp.running_mean.clone(), inp.running_var.clone());
    let result = bn.training_fused(
        &x,
        &mut y,
        affine.then_some(Affine {
            gamma: &inp.gamma,
            beta: &inp.beta,
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
        mean,
        inv_std,
        running_mean,
        running_var,
    }
}

impl TrainOut {
    /// The outputs of channel `ch` as bits, for comparisons between runs (the saved statistics
    /// only `with_saved`).
    pub(crate) fn channel_bits(&self, s: &Setup, ch: usize, with_saved: bool) -> Vec<u64> {
        let f = |v: f32| {
            if v.is_nan() {
                u64::MAX
            } else {
                v.to_bits() as u64
            }
        };
        let g = |v: f64| if v.is_nan() { u64::MAX } else { v.to_bits() };
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
        let untouched = [&out.y, &out.mean, &out.inv_std]
            .iter()
            .all(|v| v.iter().all(|x| x.to_bits() == SENTINEL_BITS))
            && bits(&out.running_mean) == bits(&inp.running_mean)
            && bits(&out.running_var) == bits(&inp.running_var);
        if out.result.is_err() && !untouched {
            ctx.fail("training_fused wrote an output before returning an error".into());
        }
        return;
    }
    let Some(plain) = plain else { return };
    let want = rounded(s, &super::inference::compose(&plain.y, z));
    if s.storage != Storage::F32 {
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
        Storage::F32 => None,
        _ => Some(run_training(
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
        if out.result.is_err() {
            let untouched = [&out.y, &out.mean, &out.inv_std]
                .iter()
                .all(|v| v.iter().all(|x| x.to_bits() == SENTINEL_BITS))
                && bits(&out.running_mean) == bits(&inp.running_mean)
                && bits(&out.running_var) == bits(&inp.running_var);
            if !untouched {
                ctx.fail("training wrote an output before returning an error".into());
            }
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
    // The other parallelism setting, without saved statistics: the same bits otherwise.
    let again = run_training(s.storage, &s.other, inp, affine, case.update, false);
    if (0..c).any(|ch| out.channel_bits(s, ch, false) != again.channel_bits(s, ch, false)) {
        ctx.fail("training differs between parallelism settings (or with saved = None)".into());
    }
    if [&again.mean, &again.inv_std]
        .iter()
        .any(|v| v.iter().any(|x| x.to_bits() != SENTINEL_BITS))
    {
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
            out.mean[ch] as f64,
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
            out.inv_std[ch] as f64,
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
                out.y[i] as f64,
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
                    out.running_mean[ch] as f64,
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
                    out.running_var[ch] as f64,
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
