//! The statistics check: [`BatchNorm::statistics`], and merging the statistics of a split batch.

use batchnorm::{BatchNorm, BatchStats, ChannelStats, Error, Shape, Variance};

use super::*;
use crate::reference;

pub(crate) fn statistics(case: &Case, s: &Setup, inp: &Inputs, ctx: &mut Ctx<'_>) {
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
