//! The backward check: training and frozen modes, overwritten and accumulated gradients.

use batchnorm::{
    Affine, BackwardEpilogue, BackwardMode, BatchNorm, Error, GradMode, ParamGrads, RunningStats,
    SavedStats, SavedStatsMut,
};

use super::*;
use crate::reference;

/// Outputs of one backward call.
pub(crate) struct BackOut {
    pub(crate) result: Result<(), Error>,
    /// dx (out of place) or the `dy_dx` buffer (in place).
    pub(crate) dx: Vec<f32>,
    pub(crate) dgamma: Vec<f32>,
    pub(crate) dbeta: Vec<f32>,
    /// dz of the fused add + ReLU backward (empty otherwise).
    pub(crate) dz: Vec<f32>,
}

impl BackOut {
    pub(crate) fn channel_bits(&self, s: &Setup, ch: usize) -> Vec<u32> {
        let f = |v: f32| if v.is_nan() { u32::MAX } else { v.to_bits() };
        let mut out: Vec<u32> = s.indices[ch].iter().map(|&i| f(self.dx[i])).collect();
        out.push(self.dgamma.get(ch).map_or(0, |&v| f(v)));
        out.push(self.dbeta.get(ch).map_or(0, |&v| f(v)));
        out
    }
    pub(crate) fn same(&self, other: &BackOut) -> bool {
        let eq = |a: &[f32], b: &[f32]| {
            a.len() == b.len() && a.iter().zip(b).all(|(&x, &y)| same_bits(x, y))
        };
        eq(&self.dx, &other.dx) && eq(&self.dgamma, &other.dgamma) && eq(&self.dbeta, &other.dbeta)
    }
}

/// The saved statistics backward gets: the crate's own training forward on `x` (zeros when `x`
/// has the wrong length), or the case's given values.
pub(crate) fn saved_stats(s: &Setup, inp: &Inputs) -> (Vec<f32>, Vec<f32>) {
    if let Some(given) = &inp.saved {
        return given.clone();
    }
    let c = s.c();
    let (mut mean, mut inv_std) = (vec![0.0; c], vec![0.0; c]);
    if inp.x.len() == s.len() && !s.giant {
        let mut y = vec![0.0; inp.x.len()];
        let saved = SavedStatsMut {
            mean: &mut mean,
            inv_std: &mut inv_std,
        };
        // Cannot fail: every length is right and there is no running update.
        let _ = s.bn.training(&inp.x, &mut y, None, Some(saved), None);
    }
    mean.resize(inp.saved_len[0], 0.0);
    inv_std.resize(inp.saved_len[1], 1.0);
    (mean, inv_std)
}

/// One backward call on data stored as the pass's storage type (`s.storage`); dx and dz widened to
/// f32.
pub(crate) fn run_backward(
    bn: &BatchNorm,
    s: &Setup,
    inp: &Inputs,
    case: &Case,
    call: Call,
) -> BackOut {
    run_backward_as(s.storage, bn, s, inp, case, call)
}

/// [`run_backward`] with the storage type given.
pub(crate) fn run_backward_as(
    storage: Storage,
    bn: &BatchNorm,
    s: &Setup,
    inp: &Inputs,
    case: &Case,
    call: Call,
) -> BackOut {
    with_store!(storage, E => run_as::<E>(bn, s, inp, case, call))
}

fn run_as<E: Store>(bn: &BatchNorm, s: &Setup, inp: &Inputs, case: &Case, call: Call) -> BackOut {
    let (x, dy) = (narrow::<E>(&inp.x), narrow::<E>(&inp.dy));
    let (saved_mean, saved_inv_std) = saved_stats(s, inp);
    let mode = if case.frozen {
        BackwardMode::Frozen(RunningStats {
            mean: &inp.running_mean,
            var: &inp.running_var,
        })
    } else {
        BackwardMode::Training(SavedStats {
            mean: &saved_mean,
            inv_std: &saved_inv_std,
        })
    };
    let affine = (!case.no_affine).then_some(Affine {
        gamma: &inp.gamma,
        beta: &inp.beta,
    });
    let (mut dgamma, mut dbeta, mode_g) = match &inp.prev {
        Some((g, b)) => (g.clone(), b.clone(), Some(GradMode::Accumulate)),
        None if case.grads == Grads::None => (Vec::new(), Vec::new(), None),
        None => (
            vec![sentinel(); inp.grads_len[0]],
            vec![sentinel(); inp.grads_len[1]],
            Some(GradMode::Overwrite),
        ),
    };
    let grads = mode_g.map(|mode| ParamGrads {
        dgamma: &mut dgamma,
        dbeta: &mut dbeta,
        mode,
    });
    let mut dz: Vec<E> = Vec::new();
    let (result, dx) = match call {
        Call::InPlace => {
            let mut buf = dy.clone();
            (bn.backward_in_place(&x, &mut buf, affine, mode, grads), buf)
        }
        Call::Plain => {
            let mut dx = vec![E::sentinel(); inp.out_len];
            (bn.backward(&x, &dy, &mut dx, affine, mode, grads), dx)
        }
        Call::Fused => {
            // The ReLU mask comes from `x` (any tensor serves: the op only reads its sign).
            let mut dx = vec![E::sentinel(); inp.out_len];
            dz = vec![E::sentinel(); inp.out_len];
            let epi = match case.fused {
                Fused::AddRelu => BackwardEpilogue::AddRelu { y: &x, dz: &mut dz },
                _ => BackwardEpilogue::Relu { y: &x },
            };
            (
                bn.backward_fused(&x, &dy, &mut dx, affine, mode, grads, epi),
                dx,
            )
        }
    };
    BackOut {
        result,
        dx: widen(&dx),
        dgamma,
        dbeta,
        dz: widen(&dz),
    }
}

/// Which backward entry point [`run_backward`] calls.
#[derive(Clone, Copy, PartialEq)]
pub(crate) enum Call {
    Plain,
    InPlace,
    /// [`BatchNorm::backward_fused`] with the case's epilogue.
    Fused,
}

/// The fused backward against the plain backward of the gradient through ReLU (its mask from
/// `x`), bit for bit, and dz equal to that gradient.
fn fused(case: &Case, s: &Setup, inp: &Inputs, ctx: &mut Ctx<'_>, mut exp: Expected) {
    if case.fused == Fused::None {
        return;
    }
    let len = s.len();
    exp.len("y", len, inp.x.len());
    if case.fused == Fused::AddRelu {
        exp.len("dz", len, inp.out_len);
    }
    let out = run_backward(&s.bn, s, inp, case, Call::Fused);
    let ok = outcome(ctx, "backward_fused", &out.result, &exp);
    if out.result.is_err() && (has_written(&out.dx) || has_written(&out.dz)) {
        ctx.fail("backward_fused wrote an output before returning an error".into());
    }
    if !ok || s.giant {
        return;
    }
    let mut through = inp.clone();
    through.dy = inp
        .dy
        .iter()
        .zip(&inp.x)
        .map(|(&g, &y)| if y > 0.0 { g } else { 0.0 })
        .collect();
    let plain = run_backward(&s.bn, s, &through, case, Call::Plain);
    if !out.same(&plain) {
        ctx.fail(format!(
            "backward_fused {:?} differs from backward of the gradient through ReLU",
            case.fused
        ));
    }
    if case.fused == Fused::AddRelu && bits(&out.dz) != bits(&through.dy) {
        ctx.fail("backward_fused: dz is not the gradient through ReLU".into());
    }
}

/// Whether any element of `v` is not the sentinel.
fn has_written(v: &[f32]) -> bool {
    v.iter().any(|x| x.to_bits() != SENTINEL_BITS)
}

pub(crate) fn backward(case: &Case, s: &Setup, inp: &Inputs, ctx: &mut Ctx<'_>) {
    let (c, m, len) = (s.c(), s.m(), s.len());
    let affine = !case.no_affine;
    let expected = |in_place: bool, op: &'static str| {
        let mut e = Expected::of(op);
        e.len("x", len, inp.x.len());
        if in_place {
            e.len("dy_dx", len, inp.dy.len());
        } else {
            e.len("dx", len, inp.out_len);
            e.len("dy", len, inp.dy.len());
        }
        if affine {
            e.len("gamma", c, inp.gamma.len());
            e.len("beta", c, inp.beta.len());
        }
        if case.grads != Grads::None {
            e.len("dgamma", c, inp.grads_len[0]);
            e.len("dbeta", c, inp.grads_len[1]);
        }
        if case.frozen {
            e.len("running_mean", c, inp.running_mean.len());
            e.len("running_var", c, inp.running_var.len());
        } else {
            e.len("saved_mean", c, inp.saved_len[0]);
            e.len("saved_inv_std", c, inp.saved_len[1]);
        }
        e
    };
    fused(case, s, inp, ctx, expected(false, "backward_fused"));
    let out = run_backward(&s.bn, s, inp, case, Call::Plain);
    let inp_out = run_backward(&s.bn, s, inp, case, Call::InPlace);
    let untouched = |o: &BackOut, in_place: bool| {
        let dx_ok = if in_place {
            bits(&o.dx) == bits(&inp.dy)
        } else {
            o.dx.iter().all(|v| v.to_bits() == SENTINEL_BITS)
        };
        let grads_ok = match &inp.prev {
            Some((g, b)) => bits(&o.dgamma) == bits(g) && bits(&o.dbeta) == bits(b),
            None => o
                .dgamma
                .iter()
                .chain(&o.dbeta)
                .all(|v| v.to_bits() == SENTINEL_BITS),
        };
        dx_ok && grads_ok
    };
    let ok = outcome(ctx, "backward", &out.result, &expected(false, "backward"));
    if out.result.is_err() && !untouched(&out, false) {
        ctx.fail("backward wrote an output before returning an error".into());
    }
    let ok_in = outcome(
        ctx,
        "backward_in_place",
        &inp_out.result,
        &expected(true, "backward_in_place"),
    );
    if inp_out.result.is_err() && !untouched(&inp_out, true) {
        ctx.fail("backward_in_place wrote an output before returning an error".into());
    }
    if !ok || s.giant {
        return;
    }
    if let Some(i) = has_sentinel(&out.dx) {
        ctx.fail(format!("backward did not write dx[{i}]"));
    }
    if let Some(i) = has_sentinel(&out.dgamma) {
        ctx.fail(format!("backward did not write dgamma[{i}]"));
    }
    if let Some(i) = has_sentinel(&out.dbeta) {
        ctx.fail(format!("backward did not write dbeta[{i}]"));
    }
    if ok_in && !out.same(&inp_out) {
        ctx.fail("backward_in_place differs from backward".into());
    }
    if !out.same(&run_backward(&s.other, s, inp, case, Call::Plain)) {
        ctx.fail("backward differs between parallelism settings".into());
    }

    let gamma = affine.then_some(&inp.gamma[..]);
    let (saved_mean, saved_inv_std) = saved_stats(s, inp);
    let mut bad = s.nonfinite_channels(&inp.x);
    for (ch, (b, dy_bad)) in bad
        .iter_mut()
        .zip(s.nonfinite_channels(&inp.dy))
        .enumerate()
    {
        *b |= dy_bad || !gamma.map_or(1.0, |g| g[ch]).is_finite();
        if case.frozen {
            *b |= !inp.running_mean[ch].is_finite() || !inp.running_var[ch].is_finite();
        } else if inp.saved.is_some() {
            *b |= !saved_mean[ch].is_finite() || !saved_inv_std[ch].is_finite();
        }
        if let Some((g, bb)) = &inp.prev {
            *b |= !g[ch].is_finite() || !bb[ch].is_finite();
        }
    }

    if bad.contains(&true) {
        let clean = inp.sanitized(s, &bad);
        let again = run_backward(&s.bn, s, &clean, case, Call::Plain);
        for ch in (0..c).filter(|&ch| !bad[ch]) {
            if out.channel_bits(s, ch) != again.channel_bits(s, ch) {
                ctx.fail(format!(
                    "backward: non-finite values of another channel changed channel {ch}"
                ));
            }
        }
    }

    if s.storage != Storage::F32 {
        // Half data: dx is the f32 op's rounded once, dγ and dβ are the f32 op's, bit for bit.
        let mut want = run_backward_as(Storage::F32, &s.bn, s, inp, case, Call::Plain);
        want.dx = rounded(s, &want.dx);
        ctx.report.exact("half backward dx", want.dx.len());
        ctx.report
            .exact("half backward dgamma, dbeta", want.dgamma.len());
        if let Some(i) = first_difference(&out.dx, &want.dx) {
            ctx.fail(format!(
                "backward dx[{i}] = {:e}, the f32 op rounded once gives {:e}",
                out.dx[i], want.dx[i]
            ));
        }
        let grads = |o: &BackOut| [o.dgamma.clone(), o.dbeta.clone()].concat();
        if first_difference(&grads(&out), &grads(&want)).is_some() {
            ctx.fail("backward: dgamma or dbeta differ from the f32 op's".into());
        }
        return;
    }
    let tol = fwd_tol(m);
    let mf = m as f64;
    // Accumulated gradients: the reference plus the previous value, rounded once more to f32.
    let prev = |k: usize, ch: usize| {
        inp.prev
            .as_ref()
            .map_or(0.0, |p| [&p.0, &p.1][k][ch] as f64)
    };
    if case.frozen {
        let want = reference::backward_frozen(
            &inp.x,
            &inp.dy,
            s.shape,
            s.layout,
            &inp.running_mean,
            &inp.running_var,
            gamma,
            s.eps,
        );
        for ch in (0..c).filter(|&ch| !bad[ch]) {
            let r = 1.0 / (inp.running_var[ch] as f64 + s.eps).sqrt();
            if !r.is_finite() {
                ctx.report.skip("frozen dx");
                continue;
            }
            let g = gamma.map_or(1.0, |g| g[ch] as f64);
            let alpha = g * r;
            let (mut s_dy, mut s_xdy, mut centred_ok) = (0.0, 0.0, true);
            for &i in &s.indices[ch] {
                let (dy, d) = (
                    inp.dy[i] as f64,
                    inp.x[i] as f64 - inp.running_mean[ch] as f64,
                );
                s_dy += dy.abs();
                s_xdy += (d * r * dy).abs();
                centred_ok &= finite_in(d);
                let scale = (alpha * dy).abs();
                if !(finite_in(alpha) && finite_in(scale) && finite_in(want.dx[i])) {
                    ctx.report.skip("frozen dx");
                    continue;
                }
                // f32 α (times |dy|) and output below the normal range.
                let floor = SUB_ULP * (1.0 + dy.abs());
                ctx.close(
                    "frozen dx",
                    out.dx[i] as f64,
                    want.dx[i],
                    scale,
                    (fwd_tol(1), floor),
                    || format!("element {i} (channel {ch}, dy = {dy:e})"),
                );
            }
            if case.grads == Grads::None {
                continue;
            }
            // Sums of f32 products: below the normal range half a subnormal per step.
            let check_grad =
                |ctx: &mut Ctx<'_>, key, k: usize, got: f32, want: f64, scale: f64, floor: f64| {
                    let p = prev(k, ch);
                    let total = p + want;
                    if !(finite_in(scale) && finite_in(total)) {
                        ctx.report.skip(key);
                        return;
                    }
                    let floor = floor + 1.01 * EPS32 * (p.abs() + want.abs());
                    ctx.close(key, got as f64, total, scale, (tol, floor), || {
                        format!("channel {ch}")
                    });
                };
            let db_floor = SUB_ULP * (1.0 + mf);
            check_grad(
                ctx,
                "frozen dbeta",
                1,
                out.dbeta[ch],
                want.dbeta[ch],
                s_dy,
                db_floor,
            );
            if centred_ok {
                let dg_floor = SUB_ULP * (1.0 + r * mf);
                check_grad(
                    ctx,
                    "frozen dgamma",
                    0,
                    out.dgamma[ch],
                    want.dgamma[ch],
                    s_xdy,
                    dg_floor,
                );
            } else {
                ctx.report.skip("frozen dgamma");
            }
        }
    } else if inp.saved.is_none() {
        let t = reference::training(&inp.x, s.shape, s.layout, None, None, s.eps);
        let want = reference::backward_training(&inp.x, &inp.dy, s.shape, s.layout, gamma, s.eps);
        for ch in (0..c).filter(|&ch| !bad[ch]) {
            let (mu, var, r) = (t.mean[ch], t.var[ch], t.inv_std[ch]);
            let idx = &s.indices[ch];
            let centred_ok = idx.iter().all(|&i| finite_in(inp.x[i] as f64 - mu));
            let var_eps = var + s.eps;
            if var_eps.is_nan() || var_eps < F32_MIN_NORMAL || !centred_ok {
                ctx.report.skip("training dx");
                continue;
            }
            let g = gamma.map_or(1.0, |g| g[ch] as f64);
            let (mut s_dy, mut s_xdy) = (0.0, 0.0);
            for &i in idx {
                let (d, dy) = (inp.x[i] as f64 - mu, inp.dy[i] as f64);
                s_dy += dy.abs();
                s_xdy += (d * r * dy).abs();
            }
            // The sums of the documented formulas (dβ = Σdy, dγ = Σ(x − μ)·r·dy) are checked only
            // when the sums of their terms' magnitudes are finite in f32 (else some summation
            // order overflows).
            if !(finite_in(s_dy) && finite_in(s_xdy)) {
                ctx.report.skip("training dx");
                continue;
            }
            // The crate computes dx = a·dy + b·x̂ + c with f32 coefficients a = γ·r,
            // b = −a·dγ/M and c ≈ −a·dβ/M (documented limit: where one of them is beyond f32's
            // range, dx is not computed to the tolerance; its overflowing sums fall back to f64).
            let a = g.abs() * r;
            let b = a * want.dgamma[ch].abs() / mf;
            if !(finite_in(a) && finite_in(b) && finite_in(a * s_dy / mf)) {
                ctx.report
                    .skip("training dx (f32 coefficients out of range)");
                continue;
            }
            // Scales. The batch mean is only known to the statistics' tolerance, tol·σ
            // (`stats_tol`); dγ = Σ(x − μ)·r·dy moves by r·δ·Σdy with it, at most tol·Σ|dy| as
            // r·σ ≤ 1, and dx moves through x̂·dγ/M and through the (x − μ) it multiplies by
            // r·dγ/M. That is why the forward scale is |γ|·(1 + |x̂|), not |γ|·|x̂|; the same
            // "1 +" gives Σ(1 + |x̂|)·|dy| for dγ and
            // |γ|·r·(|dy| + mean|dy| + (1 + |x̂|)·mean((1 + |x̂|)·|dy|)) for dx. The narrower
            // scales without it (Σ|x̂·dy|, and |γ|·r·(|dy| + mean|dy| + |x̂|·mean|x̂·dy|)) are
            // recorded for information under "[narrow scale]" keys; they are exceeded when dy
            // is concentrated where x̂ ≈ 0 while Σdy ≠ 0.
            let s_wdy = s_dy + s_xdy;
            for &i in idx {
                let (dy, d) = (inp.dy[i] as f64, inp.x[i] as f64 - mu);
                let xhat = d * r;
                let scale = g.abs() * r * (dy.abs() + s_dy / mf + (1.0 + xhat.abs()) * s_wdy / mf);
                let narrow = g.abs() * r * (dy.abs() + s_dy / mf + xhat.abs() * s_xdy / mf);
                if !(finite_in(g * r) && finite_in(scale) && finite_in(want.dx[i])) {
                    ctx.report.skip("training dx");
                    continue;
                }
                // f32 a, b, c of `dx = a·dy + b·x̂ + c` and the output, below the normal range
                // (a's rounding multiplied by |dy|, b's by |x̂|); and the absolute floors of dβ
                // and dγ (see below) through the formula: |γ|·r·(floor(dβ) + |x̂|·floor(dγ))/M.
                let floor = SUB_ULP * (2.0 + dy.abs() + xhat.abs())
                    + g.abs() * r * SUB_ULP * (1.0 + xhat.abs() * r * (1.0 + s_dy / mf));
                let err = (out.dx[i] as f64 - want.dx[i]).abs();
                let key = "training dx [narrow scale]";
                ctx.report.note(
                    key,
                    err,
                    narrow,
                    floor <= 0.01 * tol * narrow,
                    tol * narrow + floor,
                );
                ctx.close(
                    "training dx",
                    out.dx[i] as f64,
                    want.dx[i],
                    scale,
                    (tol, floor),
                    || {
                        format!(
                            "element {i} (channel {ch}, x = {:e}, dy = {dy:e})",
                            inp.x[i]
                        )
                    },
                );
            }
            if case.grads == Grads::None {
                continue;
            }
            // Absolute floors: below the normal range the f32 lane sums round by half a
            // subnormal per step: M steps for dβ = Σdy, and dγ = r·(Σ(x − K)·dy − lo·Σdy) with
            // lo = Σ(x − K)/M gives r·(M + Σ|dy|) (|lo| is tiny).
            for (key, k, got, want, scale, floor) in [
                (
                    "training dbeta",
                    1,
                    out.dbeta[ch],
                    want.dbeta[ch],
                    s_dy,
                    SUB_ULP * (1.0 + mf),
                ),
                (
                    "training dgamma",
                    0,
                    out.dgamma[ch],
                    want.dgamma[ch],
                    s_wdy,
                    SUB_ULP * (1.0 + r * (mf + s_dy)),
                ),
            ] {
                let p = prev(k, ch);
                let total = p + want;
                if !(finite_in(scale) && finite_in(total)) {
                    ctx.report.skip(key);
                    continue;
                }
                let floor = floor + 1.01 * EPS32 * (p.abs() + want.abs());
                if k == 0 {
                    let err = (got as f64 - total).abs();
                    let key = "training dgamma [narrow scale]";
                    let relative = floor <= 0.01 * tol * s_xdy;
                    ctx.report
                        .note(key, err, s_xdy, relative, tol * s_xdy + floor);
                }
                ctx.close(key, got as f64, total, scale, (tol, floor), || {
                    format!("channel {ch}")
                });
            }
        }
    }
}
