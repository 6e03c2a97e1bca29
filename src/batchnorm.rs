//! The configured operator: shape, layout, ε, threads and backend, and the operations.

use std::sync::atomic::{AtomicU32, Ordering};

use crate::driver::{self, ChannelAffine, Ctx, DxParams, GradSums, Src};
use crate::error::check_len;
use crate::params::{
    Affine, BackwardMode, GradMode, ParamGrads, RunningStats, RunningUpdate, SavedStatsMut,
};
use crate::{BatchStats, ChannelStats, Error, Layout, Parallelism, Shape, Variance};

/// Default ε (PyTorch, ONNX): `1e-5`.
pub const DEFAULT_EPS: f32 = 1e-5;

/// Batch normalization for one tensor shape and layout: the entry point of the crate.
///
/// A `BatchNorm` is cheap to build and to copy; it holds no buffers. Every operation takes flat
/// `f32` slices whose lengths are checked against the shape before anything is written.
///
/// ```
/// use batchnorm::{Affine, BatchNorm, Layout, RunningStats, Shape};
/// let shape = Shape::with_spatial(2, 3, &[4, 4])?;
/// let bn = BatchNorm::new(shape, Layout::Nchw)?.with_eps(1e-5)?;
/// let x = vec![1.5f32; shape.len()];
/// let mut y = vec![0.0f32; shape.len()];
/// let (mean, var) = ([1.0f32; 3], [0.25f32; 3]);
/// let (gamma, beta) = ([2.0f32; 3], [0.5f32; 3]);
/// bn.inference(
///     &x,
///     &mut y,
///     RunningStats { mean: &mean, var: &var },
///     Some(Affine { gamma: &gamma, beta: &beta }),
/// )?;
/// // (1.5 − 1)/sqrt(0.25 + 1e-5)·2 + 0.5 ≈ 2.5
/// assert!((y[0] - 2.5).abs() < 1e-4);
/// # Ok::<(), batchnorm::Error>(())
/// ```
#[derive(Clone, Copy, Debug)]
pub struct BatchNorm {
    ctx: Ctx,
    eps: f32,
}

impl BatchNorm {
    /// An operator for `shape` in `layout`, with ε = [`DEFAULT_EPS`], [`Parallelism::Rayon`] and
    /// the best backend of this CPU ([`crate::Backend::detect`]), or the one forced by the
    /// environment variable `BATCHNORM_BACKEND`. A forced backend is never silently replaced and
    /// never executed where it cannot run: it is an error here, where the operator is built.
    ///
    /// # Errors
    /// [`Error::UnknownBackend`] if `BATCHNORM_BACKEND` names no backend,
    /// [`Error::BackendUnavailable`] if it names one this CPU lacks ([`BatchNorm::on_backend`]
    /// builds on a chosen backend whatever the variable says).
    pub fn new(shape: Shape, layout: Layout) -> Result<BatchNorm, Error> {
        match crate::Backend::forced() {
            Some(Err(e)) => Err(e),
            Some(Ok(b)) => Ok(Self::build(shape, layout, b)),
            None => Ok(Self::build(shape, layout, crate::Backend::detect())),
        }
    }

    /// An operator for `shape` in `layout` on `backend`, whatever `BATCHNORM_BACKEND` says (for
    /// benchmarks, tests and engines that pick the instruction set themselves).
    ///
    /// # Errors
    /// [`Error::BackendUnavailable`] if this CPU cannot run `backend`.
    pub fn on_backend(
        shape: Shape,
        layout: Layout,
        backend: crate::Backend,
    ) -> Result<BatchNorm, Error> {
        Self::build(shape, layout, backend).with_backend(backend)
    }

    fn build(shape: Shape, layout: Layout, backend: crate::Backend) -> BatchNorm {
        let ctx = Ctx {
            shape,
            layout,
            par: Parallelism::Rayon,
            backend,
        };
        BatchNorm {
            ctx,
            eps: DEFAULT_EPS,
        }
    }

    /// Sets ε, added to the variance inside the square root. ε = 0 is allowed: a channel with
    /// zero variance then normalizes as 0/0 and yields NaN in that channel only (as PyTorch does).
    ///
    /// # Errors
    /// [`Error::InvalidEpsilon`] if ε is negative, NaN or infinite.
    pub fn with_eps(mut self, eps: f32) -> Result<BatchNorm, Error> {
        if !(eps.is_finite() && eps >= 0.0) {
            return Err(Error::InvalidEpsilon { eps });
        }
        self.eps = eps;
        Ok(self)
    }

    /// Sets how the operations use threads. Results do not depend on it.
    pub fn with_parallelism(mut self, par: Parallelism) -> BatchNorm {
        self.ctx.par = par;
        self
    }

    /// Forces a SIMD backend (for benchmarks and tests).
    ///
    /// # Errors
    /// [`Error::BackendUnavailable`] if this CPU cannot run it.
    pub fn with_backend(mut self, backend: crate::Backend) -> Result<BatchNorm, Error> {
        if !backend.is_available() {
            return Err(Error::BackendUnavailable {
                backend: backend.name(),
            });
        }
        self.ctx.backend = backend;
        Ok(self)
    }

    /// The shape.
    pub fn shape(&self) -> Shape {
        self.ctx.shape
    }
    /// The layout.
    pub fn layout(&self) -> Layout {
        self.ctx.layout
    }
    /// ε.
    pub fn eps(&self) -> f32 {
        self.eps
    }
    /// The parallelism setting.
    pub fn parallelism(&self) -> Parallelism {
        self.ctx.par
    }
    /// The SIMD backend the operations run on (the forced one, the chosen one, or the best this
    /// CPU has).
    pub fn backend(&self) -> crate::Backend {
        self.ctx.backend
    }

    fn check_tensor(&self, op: &'static str, arg: &'static str, t: &[f32]) -> Result<(), Error> {
        check_len(op, arg, self.ctx.shape.len(), t.len())
    }
    fn check_channels(&self, op: &'static str, arg: &'static str, t: &[f32]) -> Result<(), Error> {
        check_len(op, arg, self.ctx.shape.c(), t.len())
    }
    fn check_affine(&self, op: &'static str, affine: Option<&Affine<'_>>) -> Result<(), Error> {
        if let Some(a) = affine {
            self.check_channels(op, "gamma", a.gamma)?;
            self.check_channels(op, "beta", a.beta)?;
        }
        Ok(())
    }

    /// Per-channel statistics (count, mean, M2) of `x`, mergeable with those of other batches.
    ///
    /// # Errors
    /// [`Error::LengthMismatch`] if `x.len() != N·C·HW`.
    pub fn statistics(&self, x: &[f32]) -> Result<BatchStats, Error> {
        self.check_tensor("statistics", "x", x)?;
        Ok(BatchStats::from_channels(driver::statistics(&self.ctx, x)))
    }

    fn inference_params(
        &self,
        op: &'static str,
        running: &RunningStats<'_>,
        affine: Option<&Affine<'_>>,
    ) -> Result<Vec<ChannelAffine>, Error> {
        self.check_channels(op, "running_mean", running.mean)?;
        self.check_channels(op, "running_var", running.var)?;
        self.check_affine(op, affine)?;
        let eps = self.eps as f64;
        Ok((0..self.ctx.shape.c())
            .map(|c| {
                let (gamma, beta) = gamma_beta(affine, c);
                let scale = gamma / (running.var[c] as f64 + eps).sqrt();
                ChannelAffine {
                    shift: running.mean[c],
                    scale: scale as f32,
                    bias: beta as f32,
                }
            })
            .collect())
    }

    /// Inference forward: `y = γ·(x − running_mean)/sqrt(running_var + ε) + β`, one subtract and
    /// one fused multiply-add per element. Without `affine`, γ = 1 and β = 0. A negative running
    /// variance (below −ε) gives NaN in its channel.
    ///
    /// # Errors
    /// [`Error::LengthMismatch`] naming `x`, `y`, `running_mean`, `running_var`, `gamma` or `beta`.
    pub fn inference(
        &self,
        x: &[f32],
        y: &mut [f32],
        running: RunningStats<'_>,
        affine: Option<Affine<'_>>,
    ) -> Result<(), Error> {
        const OP: &str = "inference";
        self.check_tensor(OP, "x", x)?;
        self.check_tensor(OP, "y", y)?;
        let params = self.inference_params(OP, &running, affine.as_ref())?;
        driver::normalize(&self.ctx, Src::Separate(x), y, &params);
        Ok(())
    }

    /// [`BatchNorm::inference`] overwriting its input.
    ///
    /// # Errors
    /// As [`BatchNorm::inference`] (the tensor is named `x`).
    pub fn inference_in_place(
        &self,
        x: &mut [f32],
        running: RunningStats<'_>,
        affine: Option<Affine<'_>>,
    ) -> Result<(), Error> {
        const OP: &str = "inference_in_place";
        self.check_tensor(OP, "x", x)?;
        let params = self.inference_params(OP, &running, affine.as_ref())?;
        driver::normalize(&self.ctx, Src::InPlace, x, &params);
        Ok(())
    }

    /// Training forward: batch mean and biased variance per channel, then
    /// `y = γ·(x − mean)/sqrt(var + ε) + β` in a fused pass; saves the mean and inverse std for
    /// backward and, if asked, updates the running statistics. Returns the batch statistics.
    ///
    /// The statistics are a two-pass per cache block (an f64 sum of the values, then f32 squared
    /// deviations from the block mean) merged in f64, and the normalization subtracts the f32-rounded mean and corrects the rounding residual in the bias,
    /// so data with a large mean relative to its spread keeps full accuracy, and a constant channel
    /// gives exactly `y = β` (with ε > 0).
    ///
    /// # Errors
    /// [`Error::LengthMismatch`] for any slice; [`Error::InvalidMomentum`] or
    /// [`Error::ZeroBatchesTracked`] for the update rule; [`Error::TooFewValues`] if the running
    /// variance is unbiased and there is only one value per channel (N·HW = 1). Nothing is written
    /// when an error is returned.
    pub fn training(
        &self,
        x: &[f32],
        y: &mut [f32],
        affine: Option<Affine<'_>>,
        saved: SavedStatsMut<'_>,
        update: Option<RunningUpdate<'_>>,
    ) -> Result<BatchStats, Error> {
        const OP: &str = "training";
        self.check_tensor(OP, "x", x)?;
        self.check_tensor(OP, "y", y)?;
        self.check_affine(OP, affine.as_ref())?;
        self.check_channels(OP, "saved_mean", saved.mean)?;
        self.check_channels(OP, "saved_inv_std", saved.inv_std)?;
        let mut update = update;
        let weight = match &update {
            Some(u) => {
                self.check_channels(OP, "running_mean", u.mean)?;
                self.check_channels(OP, "running_var", u.var)?;
                let per_channel = self.ctx.shape.per_channel() as u64;
                if u.var_estimator == Variance::Unbiased && per_channel < 2 {
                    return Err(Error::TooFewValues { per_channel });
                }
                Some(u.momentum.weights()?)
            }
            None => None,
        };

        let eps = self.eps as f64;
        // The inverse std of each channel as `make` computes it (the driver calls `make` once per
        // channel, possibly from several threads), so it is not computed a second time.
        let inv_std: Vec<AtomicU32> = (0..self.ctx.shape.c()).map(|_| AtomicU32::new(0)).collect();
        let make = |c: usize, s: &ChannelStats| {
            let (p, r) = normalize_params(s, eps, gamma_beta(affine.as_ref(), c));
            inv_std[c].store((r as f32).to_bits(), Ordering::Relaxed);
            p
        };
        let stats = driver::training(&self.ctx, x, y, &make);

        for (c, s) in stats.iter().enumerate() {
            saved.mean[c] = s.mean() as f32;
            saved.inv_std[c] = f32::from_bits(inv_std[c].load(Ordering::Relaxed));
        }
        if let (Some(u), Some((old, new))) = (update.as_mut(), weight) {
            for (c, s) in stats.iter().enumerate() {
                let var = match u.var_estimator {
                    Variance::Biased => s.m2() / s.count() as f64,
                    Variance::Unbiased => s.m2() / (s.count() as f64 - 1.0),
                };
                u.mean[c] = (old * u.mean[c] as f64 + new * s.mean()) as f32;
                u.var[c] = (old * u.var[c] as f64 + new * var) as f32;
            }
        }
        Ok(BatchStats::from_channels(stats))
    }

    /// Backward of operation `op` (its name in length errors) with dy from `dy`.
    fn backward_impl(
        &self,
        (op, dy): (&'static str, Src<'_>),
        x: &[f32],
        dx: &mut [f32],
        mode: BackwardMode<'_>,
        gamma: Option<&[f32]>,
        grads: Option<ParamGrads<'_>>,
    ) -> Result<(), Error> {
        self.check_tensor(op, "x", x)?;
        self.check_tensor(
            op,
            if matches!(dy, Src::InPlace) {
                "dy_dx"
            } else {
                "dx"
            },
            dx,
        )?;
        if let Src::Separate(dy) = dy {
            self.check_tensor(op, "dy", dy)?;
        }
        if let Some(g) = gamma {
            self.check_channels(op, "gamma", g)?;
        }
        if let Some(g) = &grads {
            self.check_channels(op, "dgamma", g.dgamma)?;
            self.check_channels(op, "dbeta", g.dbeta)?;
        }
        let gamma_of = |c: usize| gamma.map_or(1.0, |g| g[c] as f64);
        let m = self.ctx.shape.per_channel() as f64;

        // Per channel: (dγ, dβ) from the reduction sums.
        let sums: Vec<GradSums>;
        let param_grads: Vec<(f64, f64)> = match mode {
            BackwardMode::Training(saved) => {
                self.check_channels(op, "saved_mean", saved.mean)?;
                self.check_channels(op, "saved_inv_std", saved.inv_std)?;
                let make = |c: usize, g: &GradSums| {
                    let (r, gamma) = (saved.inv_std[c] as f64, gamma_of(c));
                    let (dgamma, dbeta, lo) = training_grads(g, r, m);
                    // dx = a·dy + b·x̂ + c, x̂ = (x − K)·r; the true x − μ is (x − K) − lo.
                    let a = gamma * r;
                    let b = -a * dgamma / m;
                    let c0 = -a * dbeta / m - b * lo * r;
                    let (shift, r) = (saved.mean[c], saved.inv_std[c]);
                    DxParams {
                        shift,
                        r,
                        a: a as f32,
                        b: b as f32,
                        c: c0 as f32,
                    }
                };
                sums = driver::backward(&self.ctx, x, dy, dx, saved.mean, Some(&make));
                (0..sums.len())
                    .map(|c| {
                        let (dg, db, _) = training_grads(&sums[c], saved.inv_std[c] as f64, m);
                        (dg, db)
                    })
                    .collect()
            }
            BackwardMode::Frozen(running) => {
                self.check_channels(op, "running_mean", running.mean)?;
                self.check_channels(op, "running_var", running.var)?;
                let eps = self.eps as f64;
                let inv_std: Vec<f64> = running
                    .var
                    .iter()
                    .map(|&v| 1.0 / (v as f64 + eps).sqrt())
                    .collect();
                let grads_out = if grads.is_some() {
                    // Reduction first: in place, dy is overwritten by dx afterwards.
                    sums = driver::backward(&self.ctx, x, dy, dx, running.mean, None);
                    sums.iter()
                        .zip(&inv_std)
                        .map(|(g, r)| (r * g.xdy, g.dy))
                        .collect()
                } else {
                    Vec::new()
                };
                let params: Vec<ChannelAffine> = inv_std
                    .iter()
                    .enumerate()
                    .map(|(c, r)| ChannelAffine {
                        shift: 0.0,
                        scale: (gamma_of(c) * r) as f32,
                        bias: 0.0,
                    })
                    .collect();
                driver::normalize(&self.ctx, dy, dx, &params);
                grads_out
            }
        };
        if let Some(g) = grads {
            for (c, &(dgamma, dbeta)) in param_grads.iter().enumerate() {
                match g.mode {
                    GradMode::Overwrite => {
                        g.dgamma[c] = dgamma as f32;
                        g.dbeta[c] = dbeta as f32;
                    }
                    GradMode::Accumulate => {
                        g.dgamma[c] = (g.dgamma[c] as f64 + dgamma) as f32;
                        g.dbeta[c] = (g.dbeta[c] as f64 + dbeta) as f32;
                    }
                }
            }
        }
        Ok(())
    }

    /// Backward pass: `dx` from `dy`, and optionally dγ and dβ.
    ///
    /// - [`BackwardMode::Training`] (batch statistics), with M = N·HW:
    ///   `dβ = Σdy`, `dγ = Σ(x − μ)·r·dy`, `dx = γ·r·(dy − dβ/M − (x − μ)·r·dγ/M)`, where r is the
    ///   saved inverse std. The saved mean is the f32-rounded batch mean; its rounding residual is
    ///   recomputed from `x` in the same pass that reads `x` and `dy`, so `x − μ` keeps full
    ///   accuracy on data with a large mean.
    /// - [`BackwardMode::Frozen`] (running statistics): `dx = γ·r·dy` with
    ///   `r = 1/sqrt(running_var + ε)`; `dγ = Σ(x − running_mean)·r·dy`, `dβ = Σdy`.
    ///
    /// Without `gamma`, γ = 1. `grads` receives dγ and dβ (overwritten or accumulated).
    ///
    /// # Errors
    /// [`Error::LengthMismatch`] naming the slice. Nothing is written when an error is returned.
    pub fn backward(
        &self,
        x: &[f32],
        dy: &[f32],
        dx: &mut [f32],
        mode: BackwardMode<'_>,
        gamma: Option<&[f32]>,
        grads: Option<ParamGrads<'_>>,
    ) -> Result<(), Error> {
        self.backward_impl(("backward", Src::Separate(dy)), x, dx, mode, gamma, grads)
    }

    /// [`BatchNorm::backward`] writing dx over dy (`dy_dx` holds dy on entry, dx on return).
    ///
    /// # Errors
    /// As [`BatchNorm::backward`] (the gradient buffer is named `dy_dx`).
    pub fn backward_in_place(
        &self,
        x: &[f32],
        dy_dx: &mut [f32],
        mode: BackwardMode<'_>,
        gamma: Option<&[f32]>,
        grads: Option<ParamGrads<'_>>,
    ) -> Result<(), Error> {
        let op = ("backward_in_place", Src::InPlace);
        self.backward_impl(op, x, dy_dx, mode, gamma, grads)
    }
}

fn gamma_beta(affine: Option<&Affine<'_>>, c: usize) -> (f64, f64) {
    affine.map_or((1.0, 0.0), |a| (a.gamma[c] as f64, a.beta[c] as f64))
}

/// Normalization of one channel from its batch statistics, in f64: subtract the f32-rounded mean
/// `K`, scale by `α = γ·r`, and fold the residual `μ − K` into the bias. Returns the parameters and
/// the inverse std r.
fn normalize_params(s: &ChannelStats, eps: f64, (gamma, beta): (f64, f64)) -> (ChannelAffine, f64) {
    let var = s.m2() / s.count() as f64;
    let var = if var < 0.0 { 0.0 } else { var };
    let inv_std = 1.0 / (var + eps).sqrt();
    let shift = s.mean() as f32;
    let residual = s.mean() - shift as f64;
    let scale = gamma * inv_std;
    let bias = beta - scale * residual;
    (
        ChannelAffine {
            shift,
            scale: scale as f32,
            bias: bias as f32,
        },
        inv_std,
    )
}

/// dγ, dβ and the mean residual `mean(x) − K` from the reduction sums (relative to pivot K).
fn training_grads(g: &GradSums, inv_std: f64, m: f64) -> (f64, f64, f64) {
    let residual = g.x / m;
    let centered_xdy = g.xdy - residual * g.dy;
    (inv_std * centered_xdy, g.dy, residual)
}
