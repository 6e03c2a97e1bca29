//! The statistics check: [`BatchNorm::statistics`], and merging the statistics of a split batch.

use batchnorm::{BatchNorm, BatchStats, ChannelStats, Error, Shape, Variance};

use super::*;
use crate::reference;

pub(crate) fn statistics(case: &Case, s: &Setup, inp: &Inputs, ctx: &mut Ctx<'_>) {
    if s.storage == Storage::F64 {
        statistics_f64(case, s, inp, ctx);
        return;
    }
    let mut exp = Expected::of("statistics");
    exp.len("x", s.len(), inp.x.len());
    let got = statistics_as(s.storage, &s.bn, &inp.x);
    if !outcome(ctx, "statistics", &got, &exp) || s.giant {
        return;
    }
    let Ok(got) = got else { return };
    let (c, m) = (s.c(), s.m());
    if got.num_channels() != c {
        ctx.fail(format!(
            "statistics: {} channels, expected {c}",
            got.num_channels()
        ));
        return;
    }
    match statistics_as(s.storage, &s.other, &inp.x) {
        Ok(again)
            if again
                .channels()
                .iter()
                .zip(got.channels())
                .all(|(a, b)| same_stats(a, b)) => {}
        other => ctx.fail(format!(
            "statistics differ between parallelism settings: {other:?}"
        )),
    }
    let want = reference::statistics(&inp.x, s.shape, s.layout);
    let bad = s.nonfinite_channels(&inp.x);
    if s.storage != Storage::F32 {
        // Half data: exactly the f32 op's statistics of the up-converted data, every channel.
        if let Ok(f32_stats) = statistics_as(Storage::F32, &s.bn, &inp.x) {
            ctx.report.exact("half statistics", c);
            for ch in 0..c {
                if !same_stats(&got.channels()[ch], &f32_stats.channels()[ch]) {
                    ctx.fail(format!(
                        "statistics channel {ch}: {:?}, the f32 op gives {:?}",
                        got.channels()[ch],
                        f32_stats.channels()[ch]
                    ));
                }
            }
        }
    }
    for ch in 0..c {
        if !bad[ch] && s.storage == Storage::F32 {
            let keys = ("statistics mean", "statistics m2");
            check_stats(ctx, keys, ch, &got.channels()[ch], &want[ch], m, 1.0, 1.0);
        }
    }
    let unbiased = got.variances(Variance::Unbiased);
    if (m < 2) != unbiased.is_err() {
        ctx.fail(format!(
            "variances(Unbiased) with {m} values per channel: {unbiased:?}"
        ));
    }
    if got.variances(Variance::Biased).is_err() {
        ctx.fail("variances(Biased) failed".into());
    }

    // Statistics of a batch split in two along N, merged, against the whole batch's exact ones.
    // Bounds: each part is within `tol` of its own exact statistics. The merged mean is the
    // count-weighted mean of the parts' means, and (n_a/n)·σ_a ≤ σ since n_a·σ_a² ≤ M2: at most
    // twice the bound of one call. The merged M2 adds the parts' M2 (error ≤ tol·M2) and
    // δ²·n_a·n_b/n, whose error 2|δ|·(n_a·n_b/n)·tol·(σ_a + σ_b) is at most 2·tol·M2 by
    // 2ab ≤ a² + b²: three times the bound of one call.
    let n = s.shape.n();
    if n >= 2 {
        let k = 1 + case.split as usize % (n - 1);
        let per = c * s.shape.hw();
        let part = |rows: usize, x: &[f32]| {
            let shape = Shape::with_spatial(rows, c, &s.spatial).ok()?;
            let bn = BatchNorm::on_backend(shape, s.layout, s.bn.backend())
                .ok()?
                .with_parallelism(s.bn.parallelism());
            statistics_as(s.storage, &bn, x).ok()
        };
        let (Some(mut merged), Some(b)) =
            (part(k, &inp.x[..k * per]), part(n - k, &inp.x[k * per..]))
        else {
            ctx.fail(format!(
                "statistics of a split batch ({k} + {}) failed",
                n - k
            ));
            return;
        };
        if let Err(e) = merged.merge(&b) {
            ctx.fail(format!("merge: {e:?}"));
            return;
        }
        for ch in 0..c {
            if !bad[ch] {
                let keys = ("statistics merged mean", "statistics merged m2");
                check_stats(
                    ctx,
                    keys,
                    ch,
                    &merged.channels()[ch],
                    &want[ch],
                    m,
                    2.0,
                    3.0,
                );
            }
        }
        // Merging statistics of another channel count fails and leaves the receiver alone;
        // merging empty statistics is the identity.
        let before = merged.clone();
        let wrong = BatchStats::from_channels(vec![ChannelStats::default(); c + 1]);
        let mut exp = Expected::default();
        exp.push(Error::ChannelMismatch {
            expected: c,
            actual: c + 1,
        });
        outcome(ctx, "merge (channel mismatch)", &merged.merge(&wrong), &exp);
        let empty = BatchStats::from_channels(vec![ChannelStats::default(); c]);
        if merged.merge(&empty).is_err()
            || !merged
                .channels()
                .iter()
                .zip(before.channels())
                .all(|(a, b)| same_stats(a, b))
        {
            ctx.fail("merging a channel mismatch or empty statistics changed the receiver".into());
        }
    }

    if bad.contains(&true) {
        let clean = inp.sanitized(s, &bad);
        if let Ok(again) = statistics_as(s.storage, &s.bn, &clean.x) {
            for ch in (0..c).filter(|&ch| !bad[ch]) {
                if !same_stats(&again.channels()[ch], &got.channels()[ch]) {
                    ctx.fail(format!(
                        "statistics: non-finite values of another channel changed channel {ch}"
                    ));
                }
            }
        }
    }
}

/// One channel's f64-data statistics against the exact ones ([`f64_tol`], times `k` for merged
/// partial statistics as in [`check_stats`]): the mean relative to σ + |μ| (an f64 sum of values
/// of magnitude up to |μ| + |x − μ|), M2 relative to M2, plus M·δ² for the deviations' shift by
/// the computed mean's error δ (Σ(x − μ − δ)² = M2 + M·δ² since Σ(x − μ) = 0).
fn check_stats64(
    ctx: &mut Ctx<'_>,
    keys: (&'static str, &'static str),
    ch: usize,
    (got, want): (&ChannelStats, &ChannelStats),
    m: usize,
    (k_mean, k_m2, merge_floor): (f64, f64, f64),
) {
    if got.count() != m as u64 {
        ctx.fail(format!(
            "{}: channel {ch} count {} != {m}",
            keys.0,
            got.count()
        ));
    }
    let (mu, m2) = (want.mean(), want.m2());
    let scale = (m2 / m as f64).sqrt() + mu.abs();
    if !(mu.is_finite() && m2.is_finite() && scale.is_finite()) {
        ctx.report.skip(keys.0);
        return;
    }
    let tol = f64_tol(m);
    let delta = k_mean * tol * scale;
    let at = || format!("channel {ch}");
    ctx.close(keys.0, got.mean(), mu, scale, (k_mean * tol, 0.0), at);
    let floor = m as f64 * delta * delta + merge_floor;
    ctx.close(keys.1, got.m2(), m2, m2, (k_m2 * tol, floor), at);
}

/// The f64 pass: x widened to f64 (the f32 kinds' values), against the reference with
/// [`f64_tol`]; the other parallelism setting, the split-batch merge and containment as in f32.
fn statistics_f64(case: &Case, s: &Setup, inp: &Inputs, ctx: &mut Ctx<'_>) {
    let x: Vec<f64> = inp.x.iter().map(|&v| f64::from(v)).collect();
    let mut exp = Expected::of("statistics");
    exp.len("x", s.len(), x.len());
    let got = s.bn.statistics(&x);
    if !outcome(ctx, "statistics", &got, &exp) || s.giant {
        return;
    }
    let Ok(got) = got else { return };
    let (c, m) = (s.c(), s.m());
    if got.num_channels() != c {
        ctx.fail(format!(
            "statistics: {} channels, expected {c}",
            got.num_channels()
        ));
        return;
    }
    let same = |a: &BatchStats, b: &BatchStats| {
        a.channels()
            .iter()
            .zip(b.channels())
            .all(|(a, b)| same_stats(a, b))
    };
    if !s.other.statistics(&x).is_ok_and(|again| same(&again, &got)) {
        ctx.fail("statistics differ between parallelism settings".into());
    }
    let want = reference::statistics(&x, s.shape, s.layout);
    let bad = s.nonfinite_channels(&inp.x);
    for ch in (0..c).filter(|&ch| !bad[ch]) {
        let keys = ("f64 statistics mean", "f64 statistics m2");
        check_stats64(
            ctx,
            keys,
            ch,
            (&got.channels()[ch], &want[ch]),
            m,
            (1.0, 1.0, 0.0),
        );
    }
    let n = s.shape.n();
    if n >= 2 {
        let k = 1 + case.split as usize % (n - 1);
        let per = c * s.shape.hw();
        let part = |rows: usize, x: &[f64]| {
            let shape = Shape::with_spatial(rows, c, &s.spatial).ok()?;
            let bn = BatchNorm::on_backend(shape, s.layout, s.bn.backend())
                .ok()?
                .with_parallelism(s.bn.parallelism());
            Some((
                bn.statistics(x).ok()?,
                reference::statistics(x, shape, s.layout),
            ))
        };
        let (a, b) = (part(k, &x[..k * per]), part(n - k, &x[k * per..]));
        // The merge adds δ²·n_a·n_b/n (δ = μ_a − μ_b) to the parts' M2. The parts' mean errors
        // relative to σ_a, σ_b are covered by the 3× bound (as in f32); those relative to |μ_a|,
        // |μ_b| (the f64 mean's scale) move δ by up to tol·(|μ_a| + |μ_b|), hence the term by
        // 2·|δ|·(n_a·n_b/n)·tol·(|μ_a| + |μ_b|), per channel.
        let tol = f64_tol(m);
        let (na, nb) = ((k * s.shape.hw()) as f64, ((n - k) * s.shape.hw()) as f64);
        let merge_floor = |ch: usize| {
            let (Some((_, ra)), Some((_, rb))) = (&a, &b) else {
                return 0.0;
            };
            let (ma, mb) = (ra[ch].mean(), rb[ch].mean());
            2.0 * (ma - mb).abs() * (na * nb / (na + nb)) * tol * (ma.abs() + mb.abs())
        };
        let merged = match (&a, &b) {
            (Some((a, _)), Some((b, _))) => {
                let mut a = a.clone();
                a.merge(b).is_ok().then_some(a)
            }
            _ => None,
        };
        match merged {
            Some(merged) => {
                for ch in (0..c).filter(|&ch| !bad[ch]) {
                    let keys = ("f64 statistics merged mean", "f64 statistics merged m2");
                    let pair = (&merged.channels()[ch], &want[ch]);
                    check_stats64(ctx, keys, ch, pair, m, (2.0, 3.0, merge_floor(ch)));
                }
            }
            _ => ctx.fail(format!(
                "f64 statistics of a split batch ({k} + {}) failed",
                n - k
            )),
        }
    }
    if bad.contains(&true) {
        let clean: Vec<f64> = inp
            .sanitized(s, &bad)
            .x
            .iter()
            .map(|&v| f64::from(v))
            .collect();
        if let Ok(again) = s.bn.statistics(&clean) {
            for ch in (0..c).filter(|&ch| !bad[ch]) {
                if !same_stats(&again.channels()[ch], &got.channels()[ch]) {
                    ctx.fail(format!(
                        "statistics: non-finite values of another channel changed channel {ch}"
                    ));
                }
            }
        }
    }
}
