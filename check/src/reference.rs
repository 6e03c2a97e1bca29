//! Plain f64 reference implementations: scalar loops, easy to read, used by the tests, the fuzz
//! targets and the benchmarks' scalar baseline. Inputs are the same f32 slices as the fast path;
//! every intermediate is f64, statistics are two-pass. Functions are generic over the element type
//! (`f32` or `f64`), so the same code serves as the reference for the f32 kernels and, in f64, for
//! finite-difference gradient checks.

use batchnorm::{ChannelStats, Layout, Momentum, Shape, Variance};

/// The values of channel `c`, in (n, spatial) order.
pub fn channel<T: Copy>(x: &[T], shape: Shape, layout: Layout, c: usize) -> Vec<T> {
    let mut v = Vec::with_capacity(shape.per_channel());
    for n in 0..shape.n() {
        for s in 0..shape.hw() {
            v.push(x[shape.index(layout, n, c, s)]);
        }
    }
    v
}

/// Exact (two-pass, f64) per-channel statistics.
pub fn statistics<T: Copy + Into<f64>>(x: &[T], shape: Shape, layout: Layout) -> Vec<ChannelStats> {
    (0..shape.c())
        .map(|c| ChannelStats::from_values(&channel(x, shape, layout, c)))
        .collect()
}

fn param<T: Copy + Into<f64>>(p: Option<&[T]>, c: usize, default: f64) -> f64 {
    p.map_or(default, |p| p[c].into())
}

/// Applies `f(c, x)` to every element, in the tensor's own order.
fn map_elements<T: Copy + Into<f64>>(
    x: &[T],
    shape: Shape,
    layout: Layout,
    f: impl Fn(usize, f64) -> f64,
) -> Vec<f64> {
    let mut y = vec![0.0; x.len()];
    for n in 0..shape.n() {
        for c in 0..shape.c() {
            for s in 0..shape.hw() {
                let i = shape.index(layout, n, c, s);
                y[i] = f(c, x[i].into());
            }
        }
    }
    y
}

/// Inference forward: `γ·(x − mean)/sqrt(var + ε) + β`.
#[allow(clippy::too_many_arguments)]
pub fn inference(
    x: &[f32],
    shape: Shape,
    layout: Layout,
    running_mean: &[f32],
    running_var: &[f32],
    gamma: Option<&[f32]>,
    beta: Option<&[f32]>,
    eps: f64,
) -> Vec<f64> {
    map_elements(x, shape, layout, |c, v| {
        let r = 1.0 / (running_var[c] as f64 + eps).sqrt();
        param(gamma, c, 1.0) * (v - running_mean[c] as f64) * r + param(beta, c, 0.0)
    })
}

/// Result of the reference training forward.
#[derive(Clone, Debug)]
pub struct Training {
    /// Normalized output.
    pub y: Vec<f64>,
    /// Batch mean per channel.
    pub mean: Vec<f64>,
    /// Biased batch variance per channel.
    pub var: Vec<f64>,
    /// Unbiased batch variance per channel (NaN when N·HW = 1).
    pub var_unbiased: Vec<f64>,
    /// `1/sqrt(var + ε)` per channel.
    pub inv_std: Vec<f64>,
}

/// Training forward with batch statistics.
pub fn training<T: Copy + Into<f64>>(
    x: &[T],
    shape: Shape,
    layout: Layout,
    gamma: Option<&[T]>,
    beta: Option<&[T]>,
    eps: f64,
) -> Training {
    let stats = statistics(x, shape, layout);
    let m = shape.per_channel() as f64;
    let mean: Vec<f64> = stats.iter().map(|s| s.mean()).collect();
    let var: Vec<f64> = stats.iter().map(|s| s.m2() / m).collect();
    let var_unbiased = stats.iter().map(|s| s.m2() / (m - 1.0)).collect();
    let inv_std: Vec<f64> = var.iter().map(|v| 1.0 / (v + eps).sqrt()).collect();
    let y = map_elements(x, shape, layout, |c, v| {
        param(gamma, c, 1.0) * (v - mean[c]) * inv_std[c] + param(beta, c, 0.0)
    });
    Training {
        y,
        mean,
        var,
        var_unbiased,
        inv_std,
    }
}

/// The running statistics after one update with batch mean, biased and unbiased variance.
pub fn running_update(
    running_mean: &[f32],
    running_var: &[f32],
    batch: &Training,
    momentum: Momentum,
    estimator: Variance,
) -> (Vec<f64>, Vec<f64>) {
    // Written out per convention, as the frameworks document them.
    let blend = |old: f64, new: f64| match momentum {
        Momentum::NewWeight(m) => (1.0 - m) * old + m * new,
        Momentum::OldWeight(m) => m * old + (1.0 - m) * new,
        Momentum::CumulativeAverage { batches_tracked } => {
            old + (new - old) / batches_tracked as f64
        }
    };
    let var = match estimator {
        Variance::Biased => &batch.var,
        Variance::Unbiased => &batch.var_unbiased,
    };
    let mean = (0..running_mean.len())
        .map(|c| blend(running_mean[c] as f64, batch.mean[c]))
        .collect();
    let var = (0..running_var.len())
        .map(|c| blend(running_var[c] as f64, var[c]))
        .collect();
    (mean, var)
}

/// Gradients from the reference backward.
#[derive(Clone, Debug)]
pub struct Grads {
    /// dL/dx.
    pub dx: Vec<f64>,
    /// dL/dγ per channel.
    pub dgamma: Vec<f64>,
    /// dL/dβ per channel.
    pub dbeta: Vec<f64>,
}

/// Training-mode backward, with the batch statistics of `x` computed in f64.
pub fn backward_training<T: Copy + Into<f64>>(
    x: &[T],
    dy: &[T],
    shape: Shape,
    layout: Layout,
    gamma: Option<&[T]>,
    eps: f64,
) -> Grads {
    let t = training(x, shape, layout, None, None, eps);
    let m = shape.per_channel() as f64;
    let (mut dgamma, mut dbeta) = (vec![0.0; shape.c()], vec![0.0; shape.c()]);
    for c in 0..shape.c() {
        let xs = channel(x, shape, layout, c);
        let gs = channel(dy, shape, layout, c);
        for (&xv, &g) in xs.iter().zip(&gs) {
            dbeta[c] += g.into();
            dgamma[c] += (xv.into() - t.mean[c]) * t.inv_std[c] * g.into();
        }
    }
    let mut dx = vec![0.0; x.len()];
    for n in 0..shape.n() {
        for c in 0..shape.c() {
            for s in 0..shape.hw() {
                let i = shape.index(layout, n, c, s);
                let xhat = (x[i].into() - t.mean[c]) * t.inv_std[c];
                dx[i] = param(gamma, c, 1.0)
                    * t.inv_std[c]
                    * (dy[i].into() - dbeta[c] / m - xhat * dgamma[c] / m);
            }
        }
    }
    Grads { dx, dgamma, dbeta }
}

/// Frozen-statistics backward.
#[allow(clippy::too_many_arguments)]
pub fn backward_frozen(
    x: &[f32],
    dy: &[f32],
    shape: Shape,
    layout: Layout,
    running_mean: &[f32],
    running_var: &[f32],
    gamma: Option<&[f32]>,
    eps: f64,
) -> Grads {
    let inv_std: Vec<f64> = running_var
        .iter()
        .map(|&v| 1.0 / (v as f64 + eps).sqrt())
        .collect();
    let (mut dgamma, mut dbeta) = (vec![0.0; shape.c()], vec![0.0; shape.c()]);
    for c in 0..shape.c() {
        let xs = channel(x, shape, layout, c);
        let gs = channel(dy, shape, layout, c);
        for (&xv, &g) in xs.iter().zip(&gs) {
            dbeta[c] += g as f64;
            dgamma[c] += (xv as f64 - running_mean[c] as f64) * inv_std[c] * g as f64;
        }
    }
    let dx = map_elements(dy, shape, layout, |c, g| {
        param(gamma, c, 1.0) * inv_std[c] * g
    });
    Grads { dx, dgamma, dbeta }
}
