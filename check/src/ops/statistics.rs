//! The statistics check: [`BatchNorm::statistics`], and merging the statistics of a split batch.
//! One path for every storage type; only the accuracy check differs: f32 (and half) data against
//! the f64 reference ([`check_stats`]), f64 data against the precise one ([`check_stats64`]);
//! half data also bit for bit against the f32 op on the up-converted values.

use batchnorm::{BatchNorm, BatchStats, ChannelStats, Error, Shape, Variance};

use super::*;

/// The accuracy of `got`, statistics of the case's data (or merged from its split), per finite
/// channel. `k` multiplies the bounds (1 for one call; more for merged partial statistics, see
/// `statistics`); `merge_floor` is the f64 merge's own floor per channel.
fn accuracy(
    ctx: &mut Ctx<'_>,
    s: &Setup,
    (x, bad): (&[f32], &[bool]),
    got: &BatchStats,
    merged: bool,
    merge_floor: &dyn Fn(usize) -> f64,
) {
    let (k_mean, k_m2) = if merged { (2.0, 3.0) } else { (1.0, 1.0) };
    let channels = (0..s.c()).filter(|&ch| !bad[ch]);
    match s.storage {
        // Half data's statistics are the f32 op's (checked bit for bit), so within its bounds.
        Storage::F32 | Storage::F16 | Storage::Bf16 => {
            let want = reference::statistics(x, s.shape, s.layout);
            let keys = if merged {
                ("statistics merged mean", "statistics merged m2")
            } else {
                ("statistics mean", "statistics m2")
            };
            for ch in channels {
                let got = &got.channels()[ch];
                check_stats(ctx, keys, ch, got, &want[ch], s.m(), k_mean, k_m2);
            }
        }
        Storage::F64 => {
            let want = Exact64::channels(s, x, s.shape);
            let keys = if merged {
                (
                    "f64 statistics merged mean",
                    "f64 statistics merged m2",
                    None,
                )
            } else {
                let narrow = "f64 statistics mean [documented bound]";
                ("f64 statistics mean", "f64 statistics m2", Some(narrow))
            };
            for ch in channels {
                let pair = (&got.channels()[ch], &want[ch]);
                check_stats64(ctx, keys, ch, pair, (k_mean, k_m2, merge_floor(ch)));
            }
        }
    }
}

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
    let same = |a: &BatchStats, b: &BatchStats| {
        a.channels()
            .iter()
            .zip(b.channels())
            .all(|(a, b)| same_stats(a, b))
    };
    match statistics_as(s.storage, &s.other, &inp.x) {
        Ok(again) if same(&again, &got) => {}
        other => ctx.fail(format!(
            "statistics differ between parallelism and residency settings: {other:?}"
        )),
    }
    let bad = s.nonfinite_channels(&inp.x);
    if matches!(s.storage, Storage::F16 | Storage::Bf16) {
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
    accuracy(ctx, s, (&inp.x, &bad), &got, false, &|_| 0.0);
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
        let shape_of = |rows: usize| Shape::with_spatial(rows, c, &s.spatial).ok();
        let part = |rows: usize, x: &[f32]| {
            let bn = BatchNorm::on_backend(shape_of(rows)?, s.layout, s.bn.backend())
                .ok()?
                .with_parallelism(s.bn.parallelism());
            statistics_as(s.storage, &bn, x).ok()
        };
        let (xa, xb) = inp.x.split_at(k * per);
        let (Some(mut merged), Some(b)) = (part(k, xa), part(n - k, xb)) else {
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
        // f64 data: the parts' mean errors relative to σ_a, σ_b are covered by the 3× bound
        // (as in f32); those relative to |μ_a|, |μ_b| (the f64 mean's scale) move δ = μ_a − μ_b
        // by up to tol·(|μ_a| + |μ_b|), hence the term δ²·n_a·n_b/n by
        // 2·|δ|·(n_a·n_b/n)·tol·(|μ_a| + |μ_b|), per channel.
        let parts = match (s.storage, shape_of(k), shape_of(n - k)) {
            (Storage::F64, Some(sa), Some(sb)) => {
                Some((Exact64::channels(s, xa, sa), Exact64::channels(s, xb, sb)))
            }
            _ => None,
        };
        let (na, nb) = ((k * s.shape.hw()) as f64, ((n - k) * s.shape.hw()) as f64);
        let merge_floor = |ch: usize| {
            let Some((a, b)) = &parts else { return 0.0 };
            let (ma, mb) = (a[ch].mean, b[ch].mean);
            let tol = f64_tol(m);
            2.0 * (ma - mb).abs() * (na * nb / (na + nb)) * tol * (ma.abs() + mb.abs())
        };
        accuracy(ctx, s, (&inp.x, &bad), &merged, true, &merge_floor);
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
        if merged.merge(&empty).is_err() || !same(&merged, &before) {
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
