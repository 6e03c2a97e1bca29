//! The configured operator: shape, layout, ε, threads and backend, and the operations.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::channel::{
    self, dx_params, finish_training, normalize_params, training_grads, write_grads,
};
use crate::driver::{self, ChannelAffine, Ctx, DxParams, Fuse, Grad, GradSums, Src};
use crate::error::check_len;
use crate::par::SharedMut;
use crate::params::{
    Affine, BackwardEpilogue, BackwardMode, Epilogue, ParamGrads, RunningStats, RunningUpdate,
    SavedStatsMut,
};
use crate::scratch::{self, Scratch};
use crate::simd::Real;
use crate::{
    BatchStats, ChannelStats, Element, Error, Layout, Parallelism, Residency, Shape, Variance,
};

/// Default ε (PyTorch, ONNX): `1e-5`.
pub const DEFAULT_EPS: f64 = 1e-5;

/// Batch normalization for one tensor shape and layout: the entry point of the crate.
///
/// A `BatchNorm` is cheap to build and to copy; it holds no buffers. Every operation takes flat
/// slices whose lengths are checked against the shape before anything is written: data tensors of
/// any [`Element`] (`f32`, `f64`, [`crate::f16`], [`crate::bf16`]) with per-channel values of its
/// [`Element::Param`] (`f64` for f64 data, else `f32`).
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
///     Some(Affine { gamma: &gamma, beta: &beta }),
///     RunningStats { mean: &mean, var: &var },
/// )?;
/// // (1.5 − 1)/sqrt(0.25 + 1e-5)·2 + 0.5 ≈ 2.5
/// assert!((y[0] - 2.5).abs() < 1e-4);
/// # Ok::<(), batchnorm::Error>(())
/// ```
#[derive(Clone, Copy, Debug)]
pub struct BatchNorm {
    ctx: Ctx,
    eps: f64,
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

    /// The same operator for another shape (ε, parallelism and backend kept).
    pub(crate) fn with_shape(mut self, shape: Shape) -> BatchNorm {
        self.ctx.shape = shape;
        self
    }

    /// What the drivers need to know.
    pub(crate) fn ctx(&self) -> &Ctx {
        &self.ctx
    }

    fn build(shape: Shape, layout: Layout, backend: crate::Backend) -> BatchNorm {
        let ctx = Ctx {
            shape,
            layout,
            par: Parallelism::Rayon,
            backend,
            residency: Residency::Auto,
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
    pub fn with_eps(mut self, eps: f64) -> Result<BatchNorm, Error> {
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

    /// Sets where the operations take their tensors to live, which decides whether outputs are
    /// stored past the caches ([`Residency`]; [`Residency::Auto`] by default). Results do not
    /// depend on it.
    pub fn with_residency(mut self, residency: Residency) -> BatchNorm {
        self.ctx.residency = residency;
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
    pub fn eps(&self) -> f64 {
        self.eps
    }
    /// The parallelism setting.
    pub fn parallelism(&self) -> Parallelism {
        self.ctx.par
    }
    /// The SIMD backend the operations run on (the forced one, the chosen one, or the best this
    /// CPU has). One exception, with the same results: on AMD Zen 4 the `avx512` backend runs the
    /// NCHW normalize and dx passes of f16 data 256 bits wide, on the `avx2` code (see
    /// [`crate::Backend::Avx512`]).
    pub fn backend(&self) -> crate::Backend {
        self.ctx.backend
    }

    fn check_tensor<E>(&self, op: &'static str, arg: &'static str, t: &[E]) -> Result<(), Error> {
        check_len(op, arg, self.ctx.shape.len(), t.len())
    }
    fn check_channels<P>(&self, op: &'static str, arg: &'static str, t: &[P]) -> Result<(), Error> {
        check_len(op, arg, self.ctx.shape.c(), t.len())
    }
    pub(crate) fn check_affine<P>(
        &self,
        op: &'static str,
        affine: Option<&Affine<'_, P>>,
    ) -> Result<(), Error> {
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
    pub fn statistics<E: Element>(&self, x: &[E]) -> Result<BatchStats, Error> {
        let mut stats = vec![ChannelStats::default(); self.ctx.shape.c()];
        self.stats_into("statistics", x, &mut stats)?;
        Ok(BatchStats::from_channels(stats))
    }

    /// [`BatchNorm::statistics`] written into `stats` (one per channel) instead of returned: the
    /// call allocates nothing (for engines, and for callers that merge partial statistics).
    ///
    /// # Errors
    /// [`Error::LengthMismatch`] naming `x` or `stats`; nothing is written then.
    pub fn statistics_into<E: Element>(
        &self,
        x: &[E],
        stats: &mut [ChannelStats],
    ) -> Result<(), Error> {
        self.stats_into("statistics_into", x, stats)
    }

    fn stats_into<E: Element>(
        &self,
        op: &'static str,
        x: &[E],
        stats: &mut [ChannelStats],
    ) -> Result<(), Error> {
        self.check_tensor(op, "x", x)?;
        check_len(op, "stats", self.ctx.shape.c(), stats.len())?;
        E::statistics(&self.ctx, x, stats);
        Ok(())
    }

    fn inference_params<P: Real>(
        &self,
        op: &'static str,
        affine: Option<&Affine<'_, P>>,
        running: &RunningStats<'_, P>,
    ) -> Result<Scratch<ChannelAffine<P>>, Error> {
        self.check_channels(op, "running_mean", running.mean)?;
        self.check_channels(op, "running_var", running.var)?;
        self.check_affine(op, affine)?;
        Ok(channel::inference_params(
            self.ctx.backend,
            self.eps,
            affine,
            running,
        ))
    }

    /// `1/√(var + ε)` of every channel of the running variance `var`.
    fn inv_stds<P: Real>(&self, var: &[P]) -> Scratch<f64> {
        let var = var.iter().map(|&v| v.into());
        channel::inv_stds(self.ctx.backend, self.eps, var)
    }

    /// Inference forward: `y = γ·(x − running_mean)/sqrt(running_var + ε) + β`, one fused
    /// multiply-add per element (`y = α·x + (β − α·mean)`) in channels whose `|α·mean|` is at most
    /// twice `|γ| + |β|`, where folding the mean into the bias costs no accuracy (f32 parameters,
    /// a backend whose multiply-add rounds once); a subtract and a fused multiply-add
    /// (`α·(x − mean) + β`) in the others (and for `f64` data), so data with a large mean next to
    /// its spread keeps its digits. Without `affine`, γ = 1 and β = 0. A negative running variance
    /// (below −ε) gives NaN in its channel.
    ///
    /// The data may be stored as `f32`, [`crate::f16`] or [`crate::bf16`] ([`Element`]): half
    /// values are widened to f32 inside the kernel, the arithmetic is the f32 path's, and each
    /// output is rounded once to the storage type (to nearest even; in f16, results beyond ±65504
    /// become ±∞). The parameters and statistics stay `f32`. `f64` data runs in f64 lanes with
    /// `f64` parameters and statistics.
    ///
    /// ```
    /// use batchnorm::{BatchNorm, Layout, RunningStats, Shape, bf16};
    /// let shape = Shape::new(2, 3, 5)?; // N = 2, C = 3, HW = 5
    /// let bn = BatchNorm::new(shape, Layout::Nhwc)?;
    /// let x = vec![bf16::from_f32(3.0); shape.len()];
    /// let mut y = vec![bf16::ZERO; shape.len()];
    /// let running = RunningStats { mean: &[1.0; 3], var: &[4.0; 3] };
    /// bn.inference(&x, &mut y, None, running)?;
    /// assert_eq!(y[0], bf16::from_f32(1.0)); // (3 − 1)/√(4 + ε), rounded to bf16
    /// # Ok::<(), batchnorm::Error>(())
    /// ```
    ///
    /// # Errors
    /// [`Error::LengthMismatch`] naming `x`, `y`, `running_mean`, `running_var`, `gamma` or `beta`.
    pub fn inference<E: Element>(
        &self,
        x: &[E],
        y: &mut [E],
        affine: Option<Affine<'_, E::Param>>,
        running: RunningStats<'_, E::Param>,
    ) -> Result<(), Error> {
        self.inference_fused(x, y, affine, running, Epilogue::None)
    }

    /// [`BatchNorm::inference`] followed by `epilogue` in the same pass: `y = relu(bn(x))` or
    /// `y = relu(bn(x) + z)`. The epilogue costs no extra pass over memory (the residual is one
    /// more tensor read). ReLU keeps NaN (`relu(NaN) = NaN`, as PyTorch) and maps −0 to −0.
    ///
    /// # Errors
    /// As [`BatchNorm::inference`], and [`Error::LengthMismatch`] naming `z` for a residual of
    /// the wrong length.
    pub fn inference_fused<E: Element>(
        &self,
        x: &[E],
        y: &mut [E],
        affine: Option<Affine<'_, E::Param>>,
        running: RunningStats<'_, E::Param>,
        epilogue: Epilogue<'_, E>,
    ) -> Result<(), Error> {
        let op = match epilogue {
            Epilogue::None => "inference",
            _ => "inference_fused",
        };
        self.check_tensor(op, "x", x)?;
        self.check_tensor(op, "y", y)?;
        let fuse = self.fuse(op, epilogue)?;
        let params = self.inference_params(op, affine.as_ref(), &running)?;
        E::normalize(&self.ctx, (Src::Separate(x), fuse), y, &params);
        Ok(())
    }

    /// [`BatchNorm::inference`] overwriting its input.
    ///
    /// # Errors
    /// As [`BatchNorm::inference`] (the tensor is named `x`).
    pub fn inference_in_place<E: Element>(
        &self,
        x: &mut [E],
        affine: Option<Affine<'_, E::Param>>,
        running: RunningStats<'_, E::Param>,
    ) -> Result<(), Error> {
        self.inference_fused_in_place(x, affine, running, Epilogue::None)
    }

    /// [`BatchNorm::inference_fused`] overwriting its input.
    ///
    /// # Errors
    /// As [`BatchNorm::inference_fused`] (the tensor is named `x`).
    pub fn inference_fused_in_place<E: Element>(
        &self,
        x: &mut [E],
        affine: Option<Affine<'_, E::Param>>,
        running: RunningStats<'_, E::Param>,
        epilogue: Epilogue<'_, E>,
    ) -> Result<(), Error> {
        let op = match epilogue {
            Epilogue::None => "inference_in_place",
            _ => "inference_fused_in_place",
        };
        self.check_tensor(op, "x", x)?;
        let fuse = self.fuse(op, epilogue)?;
        let params = self.inference_params(op, affine.as_ref(), &running)?;
        E::normalize(&self.ctx, (Src::InPlace, fuse), x, &params);
        Ok(())
    }

    /// The kernels' epilogue for `epilogue`, after checking the residual's length.
    fn fuse<'a, E>(
        &self,
        op: &'static str,
        epilogue: Epilogue<'a, E>,
    ) -> Result<Fuse<'a, E>, Error> {
        Ok(match epilogue {
            Epilogue::None => Fuse::default(),
            Epilogue::Relu => Fuse {
                z: None,
                relu: true,
            },
            Epilogue::AddRelu(z) => {
                self.check_tensor(op, "z", z)?;
                Fuse {
                    z: Some(z),
                    relu: true,
                }
            }
        })
    }

    /// Training forward: batch mean and biased variance per channel, then
    /// `y = γ·(x − mean)/sqrt(var + ε) + β` in a fused pass; if asked, saves the mean and inverse
    /// std for backward (`saved`) and updates the running statistics (`update`). Returns the batch
    /// statistics (the one allocation of the call: its result).
    ///
    /// The statistics are a two-pass per cache block (an f64 sum of the values, then f32 squared
    /// deviations from the block mean) merged in f64, and the normalization subtracts the
    /// f32-rounded mean and corrects the rounding residual in the bias, so data with a large mean
    /// relative to its spread keeps full accuracy, and a constant channel gives exactly `y = β`
    /// (with ε > 0). Channels that are not constant and whose mean is small next to their spread
    /// fold the mean into the bias instead, on the same conditions as in inference: one fused
    /// multiply-add per element.
    ///
    /// # Errors
    /// [`Error::LengthMismatch`] for any slice; [`Error::InvalidMomentum`] or
    /// [`Error::ZeroBatchesTracked`] for the update rule; [`Error::TooFewValues`] if the running
    /// variance is unbiased and there is only one value per channel (N·HW = 1). Nothing is written
    /// when an error is returned.
    pub fn training<E: Element>(
        &self,
        x: &[E],
        y: &mut [E],
        affine: Option<Affine<'_, E::Param>>,
        saved: Option<SavedStatsMut<'_, E::Param>>,
        update: Option<RunningUpdate<'_, E::Param>>,
    ) -> Result<BatchStats, Error> {
        self.training_fused(x, y, affine, saved, update, Epilogue::None)
    }

    /// [`BatchNorm::training`] followed by `epilogue` in the normalizing pass: `y = relu(bn(x))`
    /// or `y = relu(bn(x) + z)`, with the batch statistics of x (the saved statistics and the
    /// running update are those of the plain op).
    ///
    /// # Errors
    /// As [`BatchNorm::training`], and [`Error::LengthMismatch`] naming `z` for a residual of the
    /// wrong length.
    pub fn training_fused<E: Element>(
        &self,
        x: &[E],
        y: &mut [E],
        affine: Option<Affine<'_, E::Param>>,
        saved: Option<SavedStatsMut<'_, E::Param>>,
        update: Option<RunningUpdate<'_, E::Param>>,
        epilogue: Epilogue<'_, E>,
    ) -> Result<BatchStats, Error> {
        let mut stats = vec![ChannelStats::default(); self.ctx.shape.c()];
        let op = match epilogue {
            Epilogue::None => "training",
            _ => "training_fused",
        };
        let out = Some(&mut stats[..]);
        self.train_into(op, (x, y), affine, saved, update, (epilogue, out))?;
        Ok(BatchStats::from_channels(stats))
    }

    /// [`BatchNorm::training_fused`] with the batch statistics written into `stats` (one per
    /// channel) instead of returned, or not kept (`None`): the call allocates nothing
    /// (`Epilogue::None` for the plain op).
    ///
    /// # Errors
    /// As [`BatchNorm::training_fused`], and [`Error::LengthMismatch`] naming `stats`.
    #[allow(clippy::too_many_arguments)] // training_fused's arguments and the statistics out
    pub fn training_into<E: Element>(
        &self,
        x: &[E],
        y: &mut [E],
        affine: Option<Affine<'_, E::Param>>,
        saved: Option<SavedStatsMut<'_, E::Param>>,
        update: Option<RunningUpdate<'_, E::Param>>,
        epilogue: Epilogue<'_, E>,
        stats: Option<&mut [ChannelStats]>,
    ) -> Result<(), Error> {
        let op = "training_into";
        self.train_into(op, (x, y), affine, saved, update, (epilogue, stats))
    }

    /// The body of the training forwards, errors named after `op`. Statistics not kept go to a
    /// scratch buffer.
    pub(crate) fn train_into<E: Element>(
        &self,
        op: &'static str,
        (x, y): (&[E], &mut [E]),
        affine: Option<Affine<'_, E::Param>>,
        saved: Option<SavedStatsMut<'_, E::Param>>,
        update: Option<RunningUpdate<'_, E::Param>>,
        (epilogue, stats): (Epilogue<'_, E>, Option<&mut [ChannelStats]>),
    ) -> Result<(), Error> {
        self.check_tensor(op, "x", x)?;
        self.check_tensor(op, "y", y)?;
        if let Some(s) = &stats {
            check_len(op, "stats", self.ctx.shape.c(), s.len())?;
        }
        let fuse = self.fuse(op, epilogue)?;
        let weights = self.check_training_channels(op, affine.as_ref(), saved.as_ref(), &update)?;
        check_values(update.as_ref(), self.ctx.shape.per_channel() as u64)?;

        let (eps, backend) = (self.eps, self.ctx.backend);
        // The inverse std of each channel as `make` computes it (the driver calls `make` once per
        // channel or group of channels, possibly from several threads), so it is not computed a
        // second time.
        let mut inv_std = scratch::zeroed::<AtomicU64>(self.ctx.shape.c());
        let make = |first: usize, stats: &[ChannelStats], out: &mut [ChannelAffine<E::Param>]| {
            // The per-channel schedules make one channel at a time: its inverse std on the
            // stack, not in a scratch buffer.
            let (mut one, mut many) = ([0.0], None);
            let r = match stats.len() {
                1 => &mut one[..],
                k => &mut many.insert(scratch::zeroed(k))[..],
            };
            normalize_params(
                backend,
                (first, stats),
                eps,
                affine.as_ref(),
                (out, &mut *r),
            );
            for (kept, &r) in inv_std[first..].iter().zip(r.iter()) {
                kept.store(r.to_bits(), Ordering::Relaxed);
            }
        };
        let mut not_kept;
        let stats = match stats {
            Some(s) => s,
            None => {
                not_kept = scratch::zeroed::<ChannelStats>(self.ctx.shape.c());
                &mut not_kept[..]
            }
        };
        E::training(&self.ctx, (x, fuse), y, &make, stats);
        // Every writer has finished: plain reads, in a loop that vectorizes.
        let c = inv_std.len();
        let inv_std = scratch::collect(c, inv_std.iter_mut().map(|r| f64::from_bits(*r.get_mut())));
        finish_training(backend, stats, &inv_std, saved, update.zip(weights));
        Ok(())
    }

    /// The per-channel arguments of a training forward (everything but the tensors and the
    /// number of values): their lengths, and the update rule's weights `(old, new)`.
    pub(crate) fn check_training_channels<P>(
        &self,
        op: &'static str,
        affine: Option<&Affine<'_, P>>,
        saved: Option<&SavedStatsMut<'_, P>>,
        update: &Option<RunningUpdate<'_, P>>,
    ) -> Result<Option<(f64, f64)>, Error> {
        self.check_affine(op, affine)?;
        if let Some(saved) = saved {
            self.check_channels(op, "saved_mean", saved.mean)?;
            self.check_channels(op, "saved_inv_std", saved.inv_std)?;
        }
        match update {
            Some(u) => {
                self.check_channels(op, "running_mean", u.mean)?;
                self.check_channels(op, "running_var", u.var)?;
                Ok(Some(u.momentum.weights()?))
            }
            None => Ok(None),
        }
    }

    /// The lengths of backward's parameter gradients and statistics.
    pub(crate) fn check_grads_and_mode<P>(
        &self,
        op: &'static str,
        grads: Option<&ParamGrads<'_, P>>,
        mode: &BackwardMode<'_, P>,
    ) -> Result<(), Error> {
        if let Some(g) = grads {
            self.check_channels(op, "dgamma", g.dgamma)?;
            self.check_channels(op, "dbeta", g.dbeta)?;
        }
        match mode {
            BackwardMode::Training(saved) => {
                self.check_channels(op, "saved_mean", saved.mean)?;
                self.check_channels(op, "saved_inv_std", saved.inv_std)
            }
            BackwardMode::Frozen(running) => {
                self.check_channels(op, "running_mean", running.mean)?;
                self.check_channels(op, "running_var", running.var)
            }
        }
    }

    /// Backward of operation `op` (its name in length errors) of the gradient `grad` (whose
    /// slices the caller checked, but for a separate dy).
    fn backward_impl<E: Element>(
        &self,
        (op, grad): (&'static str, Grad<'_, E>),
        x: &[E],
        dx: &mut [E],
        affine: Option<Affine<'_, E::Param>>,
        mode: BackwardMode<'_, E::Param>,
        grads: Option<ParamGrads<'_, E::Param>>,
    ) -> Result<(), Error> {
        self.check_tensor(op, "x", x)?;
        let in_place = matches!(grad, Grad::Dy(Src::InPlace));
        self.check_tensor(op, if in_place { "dy_dx" } else { "dx" }, dx)?;
        if let Grad::Dy(Src::Separate(dy)) = grad {
            self.check_tensor(op, "dy", dy)?;
        }
        self.check_affine(op, affine.as_ref())?;
        let gamma = affine.map(|a| a.gamma);
        self.check_grads_and_mode(op, grads.as_ref(), &mode)?;
        let gamma_of = |c: usize| gamma.map_or(1.0, |g| g[c].into());
        let m = self.ctx.shape.per_channel() as f64;

        // Per channel: (dγ, dβ) from the reduction sums.
        let channels = self.ctx.shape.c();
        let frozen_inv_std = match mode {
            BackwardMode::Frozen(running) => self.inv_stds(running.var),
            BackwardMode::Training(_) => scratch::zeroed(0),
        };
        let mut sums = scratch::zeroed::<GradSums>(channels);
        match mode {
            BackwardMode::Training(saved) => {
                let make = |first: usize, sums: &[GradSums], out: &mut [DxParams<E::Param>]| {
                    dx_params(self.ctx.backend, &saved, gamma, m, (first, sums), out)
                };
                let make = Some(&make as _);
                E::backward(&self.ctx, x, grad, dx, saved.mean, make, &mut sums);
            }
            BackwardMode::Frozen(running) => {
                if grads.is_some() {
                    // Reduction first (it stages a staged gradient): in place, dy is overwritten
                    // by dx afterwards.
                    E::backward(&self.ctx, x, grad, dx, running.mean, None, &mut sums);
                } else {
                    driver::stage(&self.ctx, grad, dx);
                }
                let params = scratch::from_fn(channels, |c| ChannelAffine {
                    shift: E::Param::ZERO,
                    scale: E::Param::from_f64(gamma_of(c) * frozen_inv_std[c]),
                    bias: E::Param::ZERO,
                });
                E::normalize(&self.ctx, (grad.src(), Fuse::default()), dx, &params);
            }
        }
        if let Some(mut g) = grads {
            let inv_m = 1.0 / m;
            match mode {
                BackwardMode::Training(saved) => {
                    let grads = sums.iter().zip(saved.inv_std).map(|(s, &r)| {
                        let (dgamma, dbeta, _) = training_grads(s, r.into(), inv_m);
                        (dgamma, dbeta)
                    });
                    write_grads(&mut g, grads);
                }
                BackwardMode::Frozen(_) => {
                    let grads = sums.iter().zip(frozen_inv_std.iter());
                    write_grads(&mut g, grads.map(|(s, &r)| (r * s.xdy, s.dy)));
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
    /// `affine` is the forward pass's: γ scales dx (β does not enter dx, but its length is checked
    /// as in the forward ops); without it, γ = 1. `grads` receives dγ and dβ (overwritten or
    /// accumulated).
    ///
    /// # Errors
    /// [`Error::LengthMismatch`] naming the slice. Nothing is written when an error is returned.
    pub fn backward<E: Element>(
        &self,
        x: &[E],
        dy: &[E],
        dx: &mut [E],
        affine: Option<Affine<'_, E::Param>>,
        mode: BackwardMode<'_, E::Param>,
        grads: Option<ParamGrads<'_, E::Param>>,
    ) -> Result<(), Error> {
        let grad = Grad::Dy(Src::Separate(dy));
        self.backward_impl(("backward", grad), x, dx, affine, mode, grads)
    }

    /// Backward of a fused forward pass ([`BatchNorm::inference_fused`],
    /// [`BatchNorm::training_fused`]): the gradient through ReLU, `g = dy` where the forward's
    /// output `y > 0` and 0 elsewhere (`y` NaN included), then [`BatchNorm::backward`] of `g`; for
    /// `relu(bn(x) + z)` also `dz = g`. No mask is stored: `g` is staged in the output (`dx`, or
    /// `dz`) block by block inside the reduction pass, right before the block is reduced, so it
    /// costs no pass of its own. The result is bit for bit `backward` of that `g`.
    ///
    /// # Errors
    /// As [`BatchNorm::backward`], and [`Error::LengthMismatch`] naming `y` or `dz`. Everything
    /// is checked before anything is written.
    #[allow(clippy::too_many_arguments)] // the plain backward's arguments and the epilogue
    pub fn backward_fused<E: Element>(
        &self,
        x: &[E],
        dy: &[E],
        dx: &mut [E],
        affine: Option<Affine<'_, E::Param>>,
        mode: BackwardMode<'_, E::Param>,
        grads: Option<ParamGrads<'_, E::Param>>,
        epilogue: BackwardEpilogue<'_, E>,
    ) -> Result<(), Error> {
        const OP: &str = "backward_fused";
        self.check_tensor(OP, "x", x)?;
        self.check_tensor(OP, "dx", dx)?;
        self.check_tensor(OP, "dy", dy)?;
        self.check_affine(OP, affine.as_ref())?;
        self.check_grads_and_mode(OP, grads.as_ref(), &mode)?;
        match epilogue {
            BackwardEpilogue::Relu { y } => {
                self.check_tensor(OP, "y", y)?;
                let grad = Grad::Relu { dy, y, into: None };
                self.backward_impl((OP, grad), x, dx, affine, mode, grads)
            }
            BackwardEpilogue::AddRelu { y, dz } => {
                self.check_tensor(OP, "y", y)?;
                self.check_tensor(OP, "dz", dz)?;
                let dz = SharedMut::new(dz);
                let grad = Grad::Relu {
                    dy,
                    y,
                    into: Some(&dz),
                };
                self.backward_impl((OP, grad), x, dx, affine, mode, grads)
            }
        }
    }

    /// [`BatchNorm::backward`] writing dx over dy (`dy_dx` holds dy on entry, dx on return).
    ///
    /// # Errors
    /// As [`BatchNorm::backward`] (the gradient buffer is named `dy_dx`).
    pub fn backward_in_place<E: Element>(
        &self,
        x: &[E],
        dy_dx: &mut [E],
        affine: Option<Affine<'_, E::Param>>,
        mode: BackwardMode<'_, E::Param>,
        grads: Option<ParamGrads<'_, E::Param>>,
    ) -> Result<(), Error> {
        let op = ("backward_in_place", Grad::Dy(Src::InPlace));
        self.backward_impl(op, x, dy_dx, affine, mode, grads)
    }
}

/// The TooFewValues check of a running update: the unbiased variance needs `count ≥ 2` values
/// per channel (N·HW locally, the global count when synchronized).
pub(crate) fn check_values<P>(
    update: Option<&RunningUpdate<'_, P>>,
    count: u64,
) -> Result<(), Error> {
    match update {
        Some(u) if u.var_estimator == Variance::Unbiased && count < 2 => {
            Err(Error::TooFewValues { per_channel: count })
        }
        _ => Ok(()),
    }
}
