//! Folding inference batch norm into the layer before it, for engines with constant weights.
//!
//! Inference batch norm is the per-channel affine map `y = scale·x + shift` with
//! `scale = γ/sqrt(var + ε)` and `shift = β − mean·scale`. When the layer before it is a
//! convolution or a linear layer, `scale` multiplies every weight of output channel `o` and the
//! bias becomes `scale·(bias − mean) + β`, so the batch norm disappears from the graph. Every
//! quantity is computed in f64 and rounded to f32 once.

use crate::channel;
use crate::error::check_len;
use crate::scratch;
use crate::{Affine, Error, RunningStats};

/// Where the output channel sits in a weight tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum WeightLayout {
    /// `O × I/g × kH × kW` (PyTorch, ONNX): each output channel's weights are contiguous.
    Oihw,
    /// `O × kH × kW × I/g` (channels-last engines): each output channel's weights are contiguous.
    Ohwi,
    /// `kH × kW × I/g × O` (TensorFlow; depthwise `kH × kW × I × M` with O = I·M): output channels
    /// innermost.
    Hwio,
}

/// The shape of a convolution's weights: output channels, input channels per group (`I/g`: the
/// full input count for an ordinary convolution, 1 for a depthwise one) and the kernel size.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConvWeights {
    /// Memory order.
    pub layout: WeightLayout,
    /// O, the channels the batch norm normalizes.
    pub out_channels: usize,
    /// I/g, input channels per group.
    pub in_per_group: usize,
    /// kH × kW (or any product of spatial kernel sizes: 1-D and 3-D kernels fold alike).
    pub kernel: usize,
}

/// Checks ε (finite, ≥ 0) and the parameter lengths for `c` channels.
fn check_params(
    op: &'static str,
    c: usize,
    affine: Option<&Affine<'_>>,
    running: &RunningStats<'_>,
    eps: f64,
) -> Result<(), Error> {
    if !(eps.is_finite() && eps >= 0.0) {
        return Err(Error::InvalidEpsilon { eps });
    }
    check_len(op, "running_mean", c, running.mean.len())?;
    check_len(op, "running_var", c, running.var.len())?;
    if let Some(a) = affine {
        check_len(op, "gamma", c, a.gamma.len())?;
        check_len(op, "beta", c, a.beta.len())?;
    }
    Ok(())
}

/// The per-channel map inference applies, `y = scale·x + shift`: `scale = γ/sqrt(var + ε)`,
/// `shift = β − mean·scale` (without `affine`, γ = 1 and β = 0), for engines that fold on their
/// own. (The crate's own inference folds the same way only where `|scale·mean|` is small next to
/// `|γ| + |β|`; elsewhere it subtracts the mean first, `scale·(x − mean) + β`, which keeps the
/// digits of data with a large mean, where the folded form cannot.)
///
/// # Errors
/// [`Error::InvalidEpsilon`]; [`Error::LengthMismatch`] naming the argument whose length differs
/// from `scale.len()` (the channel count). Nothing is written on error.
pub fn scale_shift(
    affine: Option<Affine<'_>>,
    running: RunningStats<'_>,
    eps: f64,
    (scale, shift): (&mut [f32], &mut [f32]),
) -> Result<(), Error> {
    const OP: &str = "scale_shift";
    let c = scale.len();
    check_len(OP, "shift", c, shift.len())?;
    check_params(OP, c, affine.as_ref(), &running, eps)?;
    for ch in 0..c {
        let (a, b) = channel::folded(affine.as_ref(), &running, eps, ch);
        scale[ch] = a as f32;
        shift[ch] = b as f32;
    }
    Ok(())
}

/// The folded bias of every channel: `scale·(bias − mean) + β` (a missing bias is zero).
fn fold_bias(
    op: &'static str,
    (affine, running, eps): (Option<&Affine<'_>>, &RunningStats<'_>, f64),
    bias: Option<&[f32]>,
    bias_out: &mut [f32],
) -> Result<(), Error> {
    let c = bias_out.len();
    if let Some(b) = bias {
        check_len(op, "bias", c, b.len())?;
    }
    for ch in 0..c {
        let (scale, _) = channel::folded(affine, running, eps, ch);
        let b = bias.map_or(0.0, |b| b[ch] as f64);
        let beta = affine.map_or(0.0, |a| a.beta[ch] as f64);
        bias_out[ch] = (scale * (b - running.mean[ch] as f64) + beta) as f32;
    }
    Ok(())
}

/// Folds inference batch norm into the convolution before it: every weight of output channel
/// `o` is multiplied by `scale[o]` in place, and `bias_out[o] = scale[o]·(bias[o] − mean[o]) + β[o]`
/// (`bias = None` for a convolution without bias). Grouped and depthwise convolutions fold the
/// same way: only the position of O matters.
///
/// # Errors
/// [`Error::InvalidEpsilon`]; [`Error::LengthMismatch`] naming `weights` (not
/// `O·(I/g)·kernel` long), `bias`, `bias_out`, `running_mean`, `running_var`, `gamma` or `beta`
/// (not O long); [`Error::ZeroDimension`] for a zero dimension of `conv` (`"out_channels"`,
/// `"in_per_group"`, `"kernel"`); [`Error::ShapeOverflow`] (with n = O, c = I/g, hw = kernel) if
/// the weight count overflows. Nothing is written on error.
pub fn fold_conv(
    conv: ConvWeights,
    (weights, bias, bias_out): (&mut [f32], Option<&[f32]>, &mut [f32]),
    affine: Option<Affine<'_>>,
    running: RunningStats<'_>,
    eps: f64,
) -> Result<(), Error> {
    const OP: &str = "fold_conv";
    let o = conv.out_channels;
    for (dim, v) in [
        ("out_channels", o),
        ("in_per_group", conv.in_per_group),
        ("kernel", conv.kernel),
    ] {
        if v == 0 {
            return Err(Error::ZeroDimension { dim });
        }
    }
    let overflow = Error::ShapeOverflow {
        n: o,
        c: conv.in_per_group,
        hw: conv.kernel,
    };
    let per_out = conv
        .in_per_group
        .checked_mul(conv.kernel)
        .ok_or(overflow.clone())?;
    let total = o.checked_mul(per_out).ok_or(overflow)?;
    check_len(OP, "weights", total, weights.len())?;
    check_len(OP, "bias_out", o, bias_out.len())?;
    check_params(OP, o, affine.as_ref(), &running, eps)?;
    let params = (affine.as_ref(), &running, eps);
    fold_bias(OP, params, bias, bias_out)?;
    // Each channel's scale once (HWIO visits every channel for every kernel position).
    let scales = scratch::from_fn(o, |ch| {
        channel::folded(affine.as_ref(), &running, eps, ch).0
    });
    match conv.layout {
        WeightLayout::Oihw | WeightLayout::Ohwi => {
            for (w, &s) in weights.chunks_exact_mut(per_out).zip(scales.iter()) {
                w.iter_mut().for_each(|v| *v = (*v as f64 * s) as f32);
            }
        }
        WeightLayout::Hwio => {
            for w in weights.chunks_exact_mut(o) {
                for (v, &s) in w.iter_mut().zip(scales.iter()) {
                    *v = (*v as f64 * s) as f32;
                }
            }
        }
    }
    Ok(())
}

/// Folds inference batch norm into the linear layer before it (`out × in` weights, row-major as
/// PyTorch's `nn.Linear.weight`): row `o` is multiplied by `scale[o]`, and
/// `bias_out[o] = scale[o]·(bias[o] − mean[o]) + β[o]` (`bias = None` without bias).
///
/// # Errors
/// As [`fold_conv`] (`weights` must be `out·in` long, `out = bias_out.len()`; a zero dimension
/// is `"out_channels"` or `"inputs"`).
pub fn fold_linear(
    inputs: usize,
    (weights, bias, bias_out): (&mut [f32], Option<&[f32]>, &mut [f32]),
    affine: Option<Affine<'_>>,
    running: RunningStats<'_>,
    eps: f64,
) -> Result<(), Error> {
    let conv = ConvWeights {
        layout: WeightLayout::Oihw,
        out_channels: bias_out.len(),
        in_per_group: inputs,
        kernel: 1,
    };
    fold_conv(conv, (weights, bias, bias_out), affine, running, eps).map_err(|e| match e {
        Error::LengthMismatch {
            arg,
            expected,
            actual,
            ..
        } => Error::LengthMismatch {
            op: "fold_linear",
            arg,
            expected,
            actual,
        },
        Error::ZeroDimension {
            dim: "in_per_group",
        } => Error::ZeroDimension { dim: "inputs" },
        e => e,
    })
}
