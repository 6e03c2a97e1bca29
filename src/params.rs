//! Named argument bundles for the operations, so per-channel slices cannot be swapped by position.
//!
//! Per-channel values are of type `P`, the data's [`crate::Element::Param`]: `f32` (the default)
//! for f32, f16 and bf16 data, `f64` for f64 data.

use crate::Error;
use crate::stats::Variance;

/// Learned per-channel scale γ and shift β (`y = γ·x̂ + β`), each of length C.
#[derive(Clone, Copy, Debug)]
pub struct Affine<'a, P = f32> {
    /// γ, one per channel.
    pub gamma: &'a [P],
    /// β, one per channel.
    pub beta: &'a [P],
}

/// Running (inference-time) statistics, each of length C.
#[derive(Clone, Copy, Debug)]
pub struct RunningStats<'a, P = f32> {
    /// Running mean per channel.
    pub mean: &'a [P],
    /// Running variance per channel.
    pub var: &'a [P],
}

/// How the running statistics follow the batch statistics. Weights are f64, as the frameworks'
/// hyperparameters are (0.99 in f32 would blend with 1 − 0.99000001).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Momentum {
    /// `running = (1 − m)·running + m·batch`: m weighs the **new** batch value (PyTorch; default 0.1).
    NewWeight(f64),
    /// `running = m·running + (1 − m)·batch`: m weighs the **old** running value (ONNX 0.9, Keras 0.99).
    OldWeight(f64),
    /// Cumulative moving average (PyTorch's `momentum=None`): `running += (batch − running)/t`,
    /// where `batches_tracked = t ≥ 1` counts the batches seen, this one included.
    CumulativeAverage {
        /// Batches seen so far, including the current one.
        batches_tracked: u64,
    },
}

impl Momentum {
    /// The weights `(old, new)` of `running = old·running + new·batch`, after validation. Both are
    /// kept, rather than `new = 1 − old`, so a tiny weight keeps its value (1 − (1 − m) ≠ m in
    /// floating point when m is tiny).
    pub(crate) fn weights(self) -> Result<(f64, f64), Error> {
        let check = |m: f64| {
            if (0.0..=1.0).contains(&m) {
                Ok(m)
            } else {
                Err(Error::InvalidMomentum { momentum: m })
            }
        };
        match self {
            Momentum::NewWeight(m) => check(m).map(|m| (1.0 - m, m)),
            Momentum::OldWeight(m) => check(m).map(|m| (m, 1.0 - m)),
            Momentum::CumulativeAverage { batches_tracked: 0 } => Err(Error::ZeroBatchesTracked),
            Momentum::CumulativeAverage { batches_tracked } => {
                let t = batches_tracked as f64;
                Ok(((t - 1.0) / t, 1.0 / t))
            }
        }
    }
}

/// Running statistics to update during a training forward pass, with the update convention.
#[derive(Debug)]
pub struct RunningUpdate<'a, P = f32> {
    /// Running mean per channel (read and overwritten).
    pub mean: &'a mut [P],
    /// Running variance per channel (read and overwritten).
    pub var: &'a mut [P],
    /// Update rule.
    pub momentum: Momentum,
    /// Which batch variance feeds the running variance.
    pub var_estimator: Variance,
}

impl<'a, P> RunningUpdate<'a, P> {
    /// PyTorch's convention: new-value weight 0.1, unbiased running variance.
    pub fn pytorch(mean: &'a mut [P], var: &'a mut [P]) -> Self {
        RunningUpdate {
            mean,
            var,
            momentum: Momentum::NewWeight(0.1),
            var_estimator: Variance::Unbiased,
        }
    }
    /// ONNX `BatchNormalization` (training mode): old-value weight 0.9, population variance.
    pub fn onnx(mean: &'a mut [P], var: &'a mut [P]) -> Self {
        RunningUpdate {
            mean,
            var,
            momentum: Momentum::OldWeight(0.9),
            var_estimator: Variance::Biased,
        }
    }
    /// Keras `BatchNormalization`: old-value weight 0.99, population variance.
    pub fn keras(mean: &'a mut [P], var: &'a mut [P]) -> Self {
        RunningUpdate {
            mean,
            var,
            momentum: Momentum::OldWeight(0.99),
            var_estimator: Variance::Biased,
        }
    }
    /// The same statistics with another update rule, for a preset with a different momentum:
    /// `RunningUpdate::pytorch(mean, var).with_momentum(Momentum::NewWeight(0.01))`.
    #[must_use]
    pub fn with_momentum(self, momentum: Momentum) -> Self {
        RunningUpdate { momentum, ..self }
    }
    /// The same statistics with another estimator for the running variance.
    #[must_use]
    pub fn with_var_estimator(self, var_estimator: Variance) -> Self {
        RunningUpdate {
            var_estimator,
            ..self
        }
    }
}

/// Where a training forward pass stores what backward needs, each of length C.
#[derive(Debug)]
pub struct SavedStatsMut<'a, P = f32> {
    /// Batch mean per channel (rounded to `P`).
    pub mean: &'a mut [P],
    /// `1/sqrt(var + ε)` per channel, with the biased batch variance.
    pub inv_std: &'a mut [P],
}

/// The saved batch statistics of a training forward pass, as input to backward.
#[derive(Clone, Copy, Debug)]
pub struct SavedStats<'a, P = f32> {
    /// Batch mean per channel, as saved by [`crate::BatchNorm::training`].
    pub mean: &'a [P],
    /// Inverse standard deviation per channel, as saved.
    pub inv_std: &'a [P],
}

/// Which statistics the forward pass normalized with, and so which gradient backward computes.
#[derive(Clone, Copy, Debug)]
pub enum BackwardMode<'a, P = f32> {
    /// Batch statistics (training mode): gradients flow through the mean and variance.
    Training(SavedStats<'a, P>),
    /// Fixed running statistics (frozen batch norm): `dx = γ·dy/sqrt(var + ε)`.
    Frozen(RunningStats<'a, P>),
}

/// Whether parameter gradients overwrite or accumulate into the caller's buffers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum GradMode {
    /// `dgamma = …` (the buffers' previous contents are ignored).
    #[default]
    Overwrite,
    /// `dgamma += …`, as frameworks accumulate gradients across calls.
    Accumulate,
}

/// Outputs for the gradients of γ and β, each of length C.
#[derive(Debug)]
pub struct ParamGrads<'a, P = f32> {
    /// dL/dγ per channel.
    pub dgamma: &'a mut [P],
    /// dL/dβ per channel.
    pub dbeta: &'a mut [P],
    /// Overwrite or accumulate.
    pub mode: GradMode,
}

/// What a fused forward pass applies after the batch norm, in the same pass over memory (the
/// activation, and the residual, that engines fuse with BN). `E` is the data's storage type.
#[derive(Debug, Default)]
pub enum Epilogue<'a, E = f32> {
    /// `y = bn(x)`.
    #[default]
    None,
    /// `y = relu(bn(x))`.
    Relu,
    /// `y = relu(bn(x) + z)`, `z` a tensor of the same shape, layout and storage type (ResNet's
    /// residual).
    AddRelu(&'a [E]),
}

// Not derived: the derives would require `E: Copy`, which the residual's shared slice does not
// need.
impl<E> Clone for Epilogue<'_, E> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<E> Copy for Epilogue<'_, E> {}

/// The epilogue a fused forward pass applied, for its backward
/// ([`crate::BatchNorm::backward_fused`]): the gradient flows through ReLU where the forward's
/// output `y` is positive (as PyTorch's ReLU backward, from the saved output; no mask is stored).
#[derive(Debug)]
pub enum BackwardEpilogue<'a, E = f32> {
    /// The forward was `y = relu(bn(x))`.
    Relu {
        /// The forward's output.
        y: &'a [E],
    },
    /// The forward was `y = relu(bn(x) + z)`; `dz` receives the residual's gradient.
    AddRelu {
        /// The forward's output.
        y: &'a [E],
        /// dL/dz (overwritten), of the tensor's shape.
        dz: &'a mut [E],
    },
}
