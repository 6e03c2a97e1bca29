//! The inference check: [`BatchNorm::inference`] and its in-place variant.

use batchnorm::fold::{self, ConvWeights, WeightLayout};
use batchnorm::{Affine, BatchNorm, Epilogue, Error, RunningStats};

use super::*;
use crate::reference;

/// The errors inference call `op` (with an output tensor if `out`) must report.
fn expected(op: &'static str, out: bool, s: &Setup, inp: &Inputs, affine: bool) -> Expected {
    let (c, len) = (s.c(), s.len());
    let mut e = Expected::of(op);
    e.len("x", len, inp.x.len());
    if out {
        e.len("y", len, inp.out_len);
    }
    e.len("running_mean", c, inp.running_mean.len());
    e.len("running_var", c, inp.running_var.len());
    if affine {
        e.len("gamma", c, inp.gamma.len());
        e.len("beta", c, inp.beta.len());
    }
    e
}

/// The fused epilogue of `case` (its residual is the `dy` tensor) and the residual.
pub(crate) fn epilogue<'a>(
    case: &Case,
    inp: &'a Inputs,
) -> Option<(Epilogue<'a>, Option<&'a [f32]>)> {
    match case.fused {
        Fused::None => None,
        Fused::Relu => Some((Epilogue::Relu, None)),
        Fused::AddRelu => Some((Epilogue::AddRelu(&inp.dy), Some(&inp.dy[..]))),
    }
}

/// What a fused op must equal bit for bit: the plain op's widened output `y`, plus `z`, through
/// the kernels' ReLU (`0 > v ? 0 : v`, so NaN and −0 pass through). The sum is rounded as the
/// op's lanes round it: to f64 for f64 data, else to f32 (`y` and `z` hold f32 values).
pub(crate) fn compose(storage: Storage, y: &[f64], z: Option<&[f32]>) -> Vec<f64> {
    let relu = |v: f64| if 0.0 > v { 0.0 } else { v };
    let add = |y: f64, z: f32| match storage {
        Storage::F64 => y + f64::from(z),
        _ => f64::from(y as f32 + z),
    };
    match z {
        Some(z) => y.iter().zip(z).map(|(&y, &z)| relu(add(y, z))).collect(),
        None => y.iter().map(|&y| relu(y)).collect(),
    }
}

/// What [`run_inference`] returns: the result and `y`, then the in-place call's result and
/// buffer, widened to f64.
pub(crate) type InferenceOut = (Result<(), Error>, Vec<f64>, Result<(), Error>, Vec<f64>);

/// One inference call and its in-place variant, with the epilogue `fused` (its residual is the
/// `dy` tensor), on data stored as `storage`; the outputs widened to f64 (`y`, and the in-place
/// buffer).
pub(crate) fn run_inference(
    storage: Storage,
    bn: &BatchNorm,
    inp: &Inputs,
    affine: bool,
    fused: Fused,
) -> InferenceOut {
    with_store!(storage, E => run_as::<E>(bn, inp, affine, fused))
}

fn run_as<E: Store>(bn: &BatchNorm, inp: &Inputs, affine: bool, fused: Fused) -> InferenceOut {
    let x = narrow::<E>(&inp.x);
    let z = narrow::<E>(&inp.dy);
    let (mean, var) = (
        params::<E>(&inp.running_mean),
        params::<E>(&inp.running_var),
    );
    let (gamma, beta) = (params::<E>(&inp.gamma), params::<E>(&inp.beta));
    let running = RunningStats {
        mean: &mean,
        var: &var,
    };
    let aff = affine.then_some(Affine {
        gamma: &gamma,
        beta: &beta,
    });
    let mut y = vec![E::sentinel(); inp.out_len];
    let mut buf = x.clone();
    let epi = match fused {
        Fused::None => None,
        Fused::Relu => Some(Epilogue::Relu),
        Fused::AddRelu => Some(Epilogue::AddRelu(&z[..])),
    };
    let (r, r_in) = match epi {
        None => (
            bn.inference(&x, &mut y, aff, running),
            bn.inference_in_place(&mut buf, aff, running),
        ),
        Some(epi) => (
            bn.inference_fused(&x, &mut y, aff, running, epi),
            bn.inference_fused_in_place(&mut buf, aff, running, epi),
        ),
    };
    (r, widen(&y), r_in, widen(&buf))
}

/// The fused inference ops, against the plain op's output `plain` (when it succeeded; the f32
/// op's for half data): the plain output through the epilogue, rounded to the pass's storage
/// type.
fn fused(case: &Case, s: &Setup, inp: &Inputs, ctx: &mut Ctx<'_>, plain: Option<&[f64]>) {
    let Some((_, z)) = epilogue(case, inp) else {
        return;
    };
    let affine = !case.no_affine;
    let (r, y, r_in, buf) = run_inference(s.storage, &s.bn, inp, affine, case.fused);
    let mut exp = expected("inference_fused", true, s, inp, affine);
    let mut exp_in = expected("inference_fused_in_place", false, s, inp, affine);
    if let Some(z) = z {
        exp.len("z", s.len(), z.len());
        exp_in.len("z", s.len(), z.len());
    }
    let ok = outcome(ctx, "inference_fused", &r, &exp);
    if r.is_err() && !untouched(&y) {
        ctx.fail("inference_fused wrote y before returning an error".into());
    }
    let ok_in = outcome(ctx, "inference_fused_in_place", &r_in, &exp_in);
    if r_in.is_err() && bits(&buf) != bits(&wide(&inp.x)) {
        ctx.fail("inference_fused_in_place changed x before returning an error".into());
    }
    let (true, Some(plain)) = (ok, plain) else {
        return;
    };
    let want = rounded(s, &compose(s.storage, plain, z));
    if matches!(s.storage, Storage::F16 | Storage::Bf16) {
        ctx.report.exact("half inference fused y", want.len());
    }
    if let Some(i) = (0..want.len()).find(|&i| !same_bits(y[i], want[i])) {
        ctx.fail(format!(
            "inference_fused {:?}: y[{i}] = {:e}, the plain op then the epilogue give {:e}",
            case.fused, y[i], want[i]
        ));
    }
    if ok_in && !y.iter().zip(&buf).all(|(&a, &b)| same_bits(a, b)) {
        ctx.fail("inference_fused_in_place differs from inference_fused".into());
    }
}

fn all_sentinel(v: &[f32]) -> bool {
    v.iter().all(|x| x.to_bits() == SENTINEL_BITS)
}

/// Folding with the case's parameters and ε: `scale_shift`, and the batch norm folded into a
/// linear layer (OIHW rows) and a 1×1 convolution in HWIO order whose weights are `x` (C output
/// channels of N·HW inputs) and whose bias is β. Every folded value is one f64 expression rounded
/// once, so the check computes the same expression and compares bits.
fn folding(case: &Case, s: &Setup, inp: &Inputs, ctx: &mut Ctx<'_>) {
    let (c, eps) = (s.c(), case.eps.get());
    let affine = (!case.no_affine).then_some(Affine {
        gamma: &inp.gamma,
        beta: &inp.beta,
    });
    let running = RunningStats {
        mean: &inp.running_mean,
        var: &inp.running_var,
    };
    let params = |op: &'static str| {
        let mut e = Expected::of(op);
        if !(eps.is_finite() && eps >= 0.0) {
            e.push(Error::InvalidEpsilon { eps });
        }
        e.len("running_mean", c, inp.running_mean.len());
        e.len("running_var", c, inp.running_var.len());
        if affine.is_some() {
            e.len("gamma", c, inp.gamma.len());
            e.len("beta", c, inp.beta.len());
        }
        e
    };
    // The library's expressions, in its order.
    let scale = |ch: usize| {
        let g = affine.map_or(1.0, |a| a.gamma[ch] as f64);
        g / (inp.running_var[ch] as f64 + eps).sqrt()
    };
    let beta = |ch: usize| affine.map_or(0.0, |a| a.beta[ch] as f64);

    let (mut sc, mut sh) = (vec![sentinel(); c], vec![sentinel(); c]);
    let r = fold::scale_shift(affine, running, eps, (&mut sc, &mut sh));
    if outcome(ctx, "scale_shift", &r, &params("scale_shift")) {
        for ch in 0..c {
            let a = scale(ch);
            let b = beta(ch) - inp.running_mean[ch] as f64 * a;
            if !same_bits(sc[ch], a as f32) || !same_bits(sh[ch], b as f32) {
                ctx.fail(format!("scale_shift channel {ch}: {} {}", sc[ch], sh[ch]));
            }
        }
    } else if r.is_err() && !(all_sentinel(&sc) && all_sentinel(&sh)) {
        ctx.fail("scale_shift wrote before returning an error".into());
    }

    let inputs = s.len() / c.max(1);
    let bias = &inp.beta;
    for layout in [WeightLayout::Oihw, WeightLayout::Hwio] {
        let op = if layout == WeightLayout::Oihw {
            "fold_linear"
        } else {
            "fold_conv"
        };
        let mut exp = params(op);
        exp.len("weights", c * inputs, inp.x.len());
        exp.len("bias", c, bias.len());
        let mut w = inp.x.clone();
        let mut b = vec![sentinel(); c];
        let r = if layout == WeightLayout::Oihw {
            fold::fold_linear(inputs, (&mut w, Some(bias), &mut b), affine, running, eps)
        } else {
            let conv = ConvWeights {
                layout,
                out_channels: c,
                in_per_group: inputs,
                kernel: 1,
            };
            fold::fold_conv(conv, (&mut w, Some(bias), &mut b), affine, running, eps)
        };
        if !outcome(ctx, op, &r, &exp) {
            if r.is_err() && (bits(&w) != bits(&inp.x) || !all_sentinel(&b)) {
                ctx.fail(format!("{op} wrote before returning an error"));
            }
            continue;
        }
        for (i, (&got, &orig)) in w.iter().zip(&inp.x).enumerate() {
            let ch = if layout == WeightLayout::Oihw {
                i / inputs
            } else {
                i % c
            };
            if !same_bits(got, (orig as f64 * scale(ch)) as f32) {
                ctx.fail(format!("{op}: weight {i} (channel {ch}) = {got:e}"));
                break;
            }
        }
        for ch in 0..c {
            let want = scale(ch) * (bias[ch] as f64 - inp.running_mean[ch] as f64) + beta(ch);
            if !same_bits(b[ch], want as f32) {
                ctx.fail(format!("{op}: bias of channel {ch} = {:e}", b[ch]));
            }
        }
    }
}

pub(crate) fn inference(case: &Case, s: &Setup, inp: &Inputs, ctx: &mut Ctx<'_>) {
    if !s.giant && s.storage == Storage::F32 {
        folding(case, s, inp, ctx);
    }
    let affine = !case.no_affine;
    let len = s.len();
    let expected = |out: bool| {
        let op = if out {
            "inference"
        } else {
            "inference_in_place"
        };
        expected(op, out, s, inp, affine)
    };
    let run = |bn: &BatchNorm, inp: &Inputs| run_inference(s.storage, bn, inp, affine, Fused::None);
    let (r, y, r_in, buf) = run(&s.bn, inp);
    let ok = outcome(ctx, "inference", &r, &expected(true));
    if r.is_err() && !untouched(&y) {
        ctx.fail("inference wrote y before returning an error".into());
    }
    let ok_in = outcome(ctx, "inference_in_place", &r_in, &expected(false));
    if r_in.is_err() && bits(&buf) != bits(&wide(&inp.x)) {
        ctx.fail("inference_in_place changed x before returning an error".into());
    }
    // The f32 op's output (the reference of half data's outputs, rounded).
    let y32 = match s.storage {
        Storage::F16 | Storage::Bf16 => {
            run_inference(Storage::F32, &s.bn, inp, affine, Fused::None).1
        }
        Storage::F32 | Storage::F64 => y.clone(),
    };
    let plain = (ok && !s.giant).then_some(&y32[..]);
    fused(case, s, inp, ctx, plain);
    if !ok || s.giant {
        return;
    }
    if let Some(i) = has_sentinel(&y) {
        ctx.fail(format!("inference did not write y[{i}]"));
    }
    if ok_in && !y.iter().zip(&buf).all(|(&a, &b)| same_bits(a, b)) {
        ctx.fail("inference_in_place differs from inference".into());
    }
    let (_, y2, _, _) = run(&s.other, inp);
    if !y.iter().zip(&y2).all(|(&a, &b)| same_bits(a, b)) {
        ctx.fail("inference differs between parallelism and residency settings".into());
    }

    let gamma = affine.then_some(&inp.gamma[..]);
    let beta = affine.then_some(&inp.beta[..]);
    let mut bad = s.nonfinite_channels(&inp.x);
    for (ch, b) in bad.iter_mut().enumerate() {
        let params = [
            inp.running_mean[ch],
            inp.running_var[ch],
            gamma.map_or(1.0, |g| g[ch]),
            beta.map_or(0.0, |b| b[ch]),
        ];
        *b |= params.iter().any(|v| !v.is_finite());
    }
    if bad.contains(&true) {
        let clean = inp.sanitized(s, &bad);
        let (_, y3, _, _) = run(&s.bn, &clean);
        for i in (0..len).filter(|&i| !bad[s.channel_of(i)]) {
            if !same_bits(y[i], y3[i]) {
                ctx.fail(format!(
                    "inference: non-finite values of another channel changed y[{i}] (channel {})",
                    s.channel_of(i)
                ));
                break;
            }
        }
    }

    if matches!(s.storage, Storage::F16 | Storage::Bf16) {
        // Half data: the f32 op's output on the up-converted data, rounded once.
        ctx.report.exact("half inference y", len);
        if let Some(i) = first_difference(&y, &rounded(s, &y32)) {
            ctx.fail(format!(
                "inference y[{i}] = {:e}, the f32 op rounded once gives {:e}",
                y[i],
                round_wide(s.storage, y32[i])
            ));
        }
        return;
    }
    if s.storage == Storage::F64 {
        inference64(s, inp, ctx, &y, (gamma, beta), &bad);
        return;
    }
    let want = reference::inference(
        &inp.x,
        s.shape,
        s.layout,
        &inp.running_mean,
        &inp.running_var,
        gamma,
        beta,
        s.eps,
    );
    let tol = fwd_tol(1);
    for i in 0..len {
        let ch = s.channel_of(i);
        if bad[ch] {
            continue;
        }
        let (g, b) = (
            gamma.map_or(1.0, |g| g[ch] as f64),
            beta.map_or(0.0, |b| b[ch] as f64),
        );
        let r = 1.0 / (inp.running_var[ch] as f64 + s.eps).sqrt();
        let d = inp.x[i] as f64 - inp.running_mean[ch] as f64;
        let (alpha, xhat) = (g * r, d * r);
        let scale = g.abs() * (1.0 + xhat.abs()) + b.abs();
        let representable = r.is_finite()
            && [d, alpha, alpha * d, scale, want[i]]
                .iter()
                .all(|&v| finite_in(v));
        if !representable {
            ctx.report.skip("inference y");
            continue;
        }
        // α = γ·r and the output are f32: half a subnormal each below the normal range, α's
        // multiplied by |x − mean|.
        let floor = SUB_ULP * (2.0 + d.abs());
        ctx.close("inference y", y[i], want[i], scale, (tol, floor), || {
            format!("element {i} (channel {ch}, x = {:e})", inp.x[i])
        });
    }
}

/// f64 data: y against `α·(x − mean) + β` in double-double, `α = γ/sqrt(var + ε)`, within
/// `f64_tol(1) = 10u` of the terms `|α·(x − mean)| + |β|`. The op rounds `x − mean` (u of
/// |x − mean|), `var + ε`, the root, `γ/·` (2½u of α) and the FMA (u of the terms): 4½u of the
/// terms, inside the handful of roundings that [`f64_tol`]'s 8u states; the reference errs by
/// about u/2 (rounded once). Every value of f32 data keeps these intermediates in f64's normal
/// range, so no absolute floor is needed.
fn inference64(
    s: &Setup,
    inp: &Inputs,
    ctx: &mut Ctx<'_>,
    y: &[f64],
    (gamma, beta): (Option<&[f32]>, Option<&[f32]>),
    bad: &[bool],
) {
    use crate::precise::Dd;
    let tol = f64_tol(1);
    for ch in (0..s.c()).filter(|&ch| !bad[ch]) {
        let g = gamma.map_or(1.0, |g| f64::from(g[ch]));
        let b = beta.map_or(0.0, |b| f64::from(b[ch]));
        let (mean, var) = (inp.running_mean[ch], inp.running_var[ch]);
        let alpha = Dd::new(g) / (Dd::new(f64::from(var)) + Dd::new(s.eps)).sqrt();
        for &i in &s.indices[ch] {
            let d = Dd::new(f64::from(inp.x[i])) - Dd::new(f64::from(mean));
            let want = (alpha * d + Dd::new(b)).value();
            let scale = (alpha * d).value().abs() + b.abs();
            if !(want.is_finite() && scale.is_finite()) {
                // A negative var + ε (NaN), or ε = 0 with a zero variance.
                ctx.report.skip("f64 inference y");
                continue;
            }
            ctx.close("f64 inference y", y[i], want, scale, (tol, 0.0), || {
                format!("element {i} (channel {ch}, x = {:e})", inp.x[i])
            });
        }
    }
}
