//! The backward check: training and frozen modes, overwritten and accumulated gradients.

use batchnorm::{
    Affine, BackwardEpilogue, BackwardMode, BatchNorm, Error, GradMode, ParamGrads, RunningStats,
    SavedStats, SavedStatsMut,
};

use super::*;
use crate::reference;

/// Outputs of one backward call, widened to f64.
pub(crate) struct BackOut {
    pub(crate) result: Result<(), Error>,
    /// dx (out of place) or the `dy_dx` buffer (in place).
    pub(crate) dx: Vec<f64>,
    pub(crate) dgamma: Vec<f64>,
    pub(crate) dbeta: Vec<f64>,
    /// dz of the fused add + ReLU backward (empty otherwise).
    pub(crate) dz: Vec<f64>,
}

impl BackOut {
    pub(crate) fn channel_bits(&self, s: &Setup, ch: usize) -> Vec<u64> {
        let f = |v: f64| if v.is_nan() { u64::MAX } else { v.to_bits() };
        let mut out: Vec<u64> = s.indices[ch].iter().map(|&i| f(self.dx[i])).collect();
        out.push(self.dgamma.get(ch).map_or(0, |&v| f(v)));
        out.push(self.dbeta.get(ch).map_or(0, |&v| f(v)));
        out
    }
    pub(crate) fn same(&self, other: &BackOut) -> bool {
        let eq = |a: &[f64], b: &[f64]| {
            a.len() == b.len() && a.iter().zip(b).all(|(&x, &y)| same_bits(x, y))
        };
        eq(&self.dx, &other.dx) && eq(&self.dgamma, &other.dgamma) && eq(&self.dbeta, &other.dbeta)
    }
}

/// The saved statistics backward gets on data stored as `E`: the crate's own training forward
/// on `x` stored as `E` (zeros when `x` has the wrong length), or the case's given values.
/// (Half data's forward gives the f32 op's statistics, as the training check verifies.)
fn saved_stats<E: Store>(s: &Setup, inp: &Inputs) -> (Vec<E::Param>, Vec<E::Param>) {
    if let Some((mean, inv_std)) = &inp.saved {
        return (params::<E>(mean), params::<E>(inv_std));
    }
    let c = s.c();
    let (mut mean, mut inv_std) = (params::<E>(&vec![0.0; c]), params::<E>(&vec![0.0; c]));
    if inp.x.len() == s.len() && !s.giant {
        let x = narrow::<E>(&inp.x);
        let mut y = x.clone();
        let saved = SavedStatsMut {
            mean: &mut mean,
            inv_std: &mut inv_std,
        };
        // Cannot fail: every length is right and there is no running update.
        let _ = s.bn.training(&x, &mut y, None, Some(saved), None);
    }
    mean.resize(inp.saved_len[0], E::param(0.0));
    inv_std.resize(inp.saved_len[1], E::param(1.0));
    (mean, inv_std)
}

/// One backward call on data stored as the pass's storage type (`s.storage`); the outputs
/// widened to f64.
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
    let (saved_mean, saved_inv_std) = saved_stats::<E>(s, inp);
    let (running_mean, running_var) = (
        params::<E>(&inp.running_mean),
        params::<E>(&inp.running_var),
    );
    let (gamma, beta) = (params::<E>(&inp.gamma), params::<E>(&inp.beta));
    let mode = if case.frozen {
        BackwardMode::Frozen(RunningStats {
            mean: &running_mean,
            var: &running_var,
        })
    } else {
        BackwardMode::Training(SavedStats {
            mean: &saved_mean,
            inv_std: &saved_inv_std,
        })
    };
    let affine = (!case.no_affine).then_some(Affine {
        gamma: &gamma,
        beta: &beta,
    });
    let (mut dgamma, mut dbeta, mode_g) = match &inp.prev {
        Some((g, b)) => (params::<E>(g), params::<E>(b), Some(GradMode::Accumulate)),
        None if case.grads == Grads::None => (Vec::new(), Vec::new(), None),
        None => (
            vec![E::param_sentinel(); inp.grads_len[0]],
            vec![E::param_sentinel(); inp.grads_len[1]],
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
        dgamma: widen_params::<E>(&dgamma),
        dbeta: widen_params::<E>(&dbeta),
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
    if out.result.is_err() && !(untouched(&out.dx) && untouched(&out.dz)) {
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
    if case.fused == Fused::AddRelu && bits(&out.dz) != bits(&wide(&through.dy)) {
        ctx.fail("backward_fused: dz is not the gradient through ReLU".into());
    }
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
            bits(&o.dx) == bits(&wide(&inp.dy))
        } else {
            untouched(&o.dx)
        };
        let grads_ok = match &inp.prev {
            Some((g, b)) => bits(&o.dgamma) == bits(&wide(g)) && bits(&o.dbeta) == bits(&wide(b)),
            None => untouched(&o.dgamma) && untouched(&o.dbeta),
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
        ctx.fail("backward differs between parallelism and residency settings".into());
    }

    let gamma = affine.then_some(&inp.gamma[..]);
    let mut bad = s.nonfinite_channels(&inp.x);
    for (ch, (b, dy_bad)) in bad
        .iter_mut()
        .zip(s.nonfinite_channels(&inp.dy))
        .enumerate()
    {
        *b |= dy_bad || !gamma.map_or(1.0, |g| g[ch]).is_finite();
        if case.frozen {
            *b |= !inp.running_mean[ch].is_finite() || !inp.running_var[ch].is_finite();
        } else if let Some((mean, inv_std)) = &inp.saved {
            *b |= !mean[ch].is_finite() || !inv_std[ch].is_finite();
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

    if s.storage == Storage::F64 {
        backward64(case, s, inp, ctx, &out, gamma, &bad);
        return;
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
                    out.dx[i],
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
                |ctx: &mut Ctx<'_>, key, k: usize, got: f64, want: f64, scale: f64, floor: f64| {
                    let p = prev(k, ch);
                    let total = p + want;
                    if !(finite_in(scale) && finite_in(total)) {
                        ctx.report.skip(key);
                        return;
                    }
                    let floor = floor + 1.01 * EPS32 * (p.abs() + want.abs());
                    ctx.close(key, got, total, scale, (tol, floor), || {
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
                let err = (out.dx[i] - want.dx[i]).abs();
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
                    out.dx[i],
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
                    let err = (got - total).abs();
                    let key = "training dgamma [narrow scale]";
                    let relative = floor <= 0.01 * tol * s_xdy;
                    ctx.report
                        .note(key, err, s_xdy, relative, tol * s_xdy + floor);
                }
                ctx.close(key, got, total, scale, (tol, floor), || {
                    format!("channel {ch}")
                });
            }
        }
    }
}

/// f64 data: dx, dγ and dβ against the precise reference (double-double statistics, inverse std,
/// sums and dx), for the channels whose inputs are finite; given saved statistics are checked
/// for the structural properties only, as for f32.
///
/// Bounds, with tol = [`f64_tol`] of the channel's M values and u = 2⁻⁵³:
/// - frozen: dx = γ·r·dy within `f64_tol(1)` of `|γ·r·dy|` (`+ ε`, the root, `1/·`, `γ·`, the
///   FMA: 4½u); dβ = Σdy within `tol·Σ|dy|` (a recursive sum, (M − 1)·u); dγ = r·Σ(x − μ)·dy
///   within `tol·Σ|x̂·dy|` (`x − μ`, the product, the sum and r: (M + 5)·u);
/// - training (saved statistics from the crate's forward, relative to which the sums are taken
///   and whose mean's error the op corrects with `Σ(x − K)/M`, so the mean enters only as
///   `tol·(σ + δ)`, δ the mean's bound): the f32 check's scales (`Σ(1 + |x̂|)·|dy|` for dγ,
///   `|γ|·r·(|dy| + mean|dy| + (1 + |x̂|)·mean((1 + |x̂|)·|dy|))` for dx) with `tol + 4u + t`
///   (t the variance's share in r, [`Exact64::r_share`]; ½·tol of r and the sums' (M + 7½)·u
///   exceed tol by at most 3½u), plus the second-order products of the mean's correction with
///   δ (`2·tol·r·δ·Σ|dy|` in dγ, and through dγ and x̂ in dx);
/// - accumulated gradients: one more rounding, `u·(|previous| + |gradient|)`.
fn backward64(
    case: &Case,
    s: &Setup,
    inp: &Inputs,
    ctx: &mut Ctx<'_>,
    out: &BackOut,
    gamma: Option<&[f32]>,
    bad: &[bool],
) {
    use crate::precise::{Dd, sum_dd};
    if !case.frozen && inp.saved.is_some() {
        return;
    }
    let u = EPS64;
    let mf = s.m() as f64;
    let m = Dd::new(mf);
    let exact = Exact64::channels(s, &inp.x, s.shape);
    let wide = |v: f32| Dd::new(f64::from(v));
    for ch in (0..s.c()).filter(|&ch| !bad[ch]) {
        let idx = &s.indices[ch];
        let e = &exact[ch];
        let tol = e.tol;
        let g = gamma.map_or(1.0, |g| f64::from(g[ch]));
        // The inverse std, the centre and the extra relative error share of r.
        let (r_dd, centre, t, delta) = if case.frozen {
            let var = wide(inp.running_var[ch]);
            let centre = wide(inp.running_mean[ch]);
            let r = Dd::new(1.0) / (var + Dd::new(s.eps)).sqrt();
            (r, centre, Some(0.0), 0.0)
        } else {
            let r = Dd::new(1.0) / (e.moments.m2 / m + Dd::new(s.eps)).sqrt();
            let t = e.r_share(s.eps);
            (r, e.moments.mean, t, e.delta)
        };
        let r = r_dd.value();
        let Some(t) = t.filter(|_| r.is_finite() && r > 0.0) else {
            ctx.report.skip("f64 backward (inverse std not determined)");
            continue;
        };
        let a_dd = Dd::new(g) * r_dd;
        let a = a_dd.value().abs();
        let dy = |i: usize| f64::from(inp.dy[i]);
        let xhat = |i: usize| (wide(inp.x[i]) - centre) * r_dd;
        let dbeta = sum_dd(idx.iter().map(|&i| Dd::new(dy(i))));
        let dgamma = sum_dd(idx.iter().map(|&i| xhat(i) * Dd::new(dy(i))));
        let s_dy: f64 = idx.iter().map(|&i| dy(i).abs()).sum();
        let s_xdy: f64 = idx.iter().map(|&i| (xhat(i).value() * dy(i)).abs()).sum();
        let s_wdy = s_dy + s_xdy;
        // Second order: the mean's correction (tol·(σ + δ)) times δ, through r.
        let second = 2.0 * tol * r * delta;
        let (dx_key, dg_key, db_key) = if case.frozen {
            ("f64 frozen dx", "f64 frozen dgamma", "f64 frozen dbeta")
        } else {
            (
                "f64 training dx",
                "f64 training dgamma",
                "f64 training dbeta",
            )
        };
        for &i in idx {
            let (want, scale, tol_dx, floor) = if case.frozen {
                let want = (a_dd * Dd::new(dy(i))).value();
                (want, want.abs(), f64_tol(1), 0.0)
            } else {
                let xh = xhat(i);
                let inner = Dd::new(dy(i)) - dbeta / m - xh * dgamma / m;
                let xh = xh.value().abs();
                let scale = a * (dy(i).abs() + s_dy / mf + (1.0 + xh) * s_wdy / mf);
                let floor = a * second * ((1.0 + xh) * s_dy + s_xdy) / mf;
                ((a_dd * inner).value(), scale, tol + 4.0 * u + t, floor)
            };
            if !(want.is_finite() && scale.is_finite() && floor.is_finite()) {
                ctx.report.skip(dx_key);
                continue;
            }
            ctx.close(dx_key, out.dx[i], want, scale, (tol_dx, floor), || {
                format!(
                    "element {i} (channel {ch}, x = {:e}, dy = {:e})",
                    inp.x[i], inp.dy[i]
                )
            });
        }
        if case.grads == Grads::None {
            continue;
        }
        let (tol_dg, floor_dg) = if case.frozen {
            (tol, 0.0)
        } else {
            (tol + 4.0 * u + t, second * s_dy)
        };
        let scale_dg = if case.frozen { s_xdy } else { s_wdy };
        for (k, key, want, scale, (tol, floor)) in [
            (0, dg_key, dgamma, scale_dg, (tol_dg, floor_dg)),
            (1, db_key, dbeta, s_dy, (tol, 0.0)),
        ] {
            let prev = inp.prev.as_ref().map_or(0.0, |p| [&p.0, &p.1][k][ch]);
            let total = (wide(prev) + want).value();
            let got = [&out.dgamma, &out.dbeta][k][ch];
            let floor = floor + 1.01 * u * (f64::from(prev).abs() + want.value().abs());
            if !(total.is_finite() && scale.is_finite()) {
                ctx.report.skip(key);
                continue;
            }
            ctx.close(key, got, total, scale, (tol, floor), || {
                format!("channel {ch}")
            });
        }
    }
}
