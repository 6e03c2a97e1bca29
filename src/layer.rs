//! A stateful batch-norm layer: the parameters, running statistics, mode, batch counter, saved
//! statistics and gradients that every user of the plain operations would otherwise keep
//! themselves, on top of [`BatchNorm`].

use crate::error::check_len;
use crate::{
    Affine, Backend, BackwardMode, BatchNorm, Element, Epilogue, Error, GradMode, Layout, Momentum,
    Parallelism, Param, ParamGrads, Residency, RunningStats, RunningUpdate, SavedStats,
    SavedStatsMut, Shape, Variance,
};
use crate::{Communicator, SyncBatchNorm};

/// A batch-norm layer over `C` channels, as `torch.nn.BatchNorm1d/2d/3d` or Keras
/// `BatchNormalization` hold it: γ (ones), β (zeros), running mean (zeros) and variance (ones),
/// the update convention, ε, a training / evaluation flag, the number of batches tracked, the
/// statistics saved by the last training forward, and the accumulated gradients of γ and β.
///
/// The batch size and spatial extent may change from call to call (the shape is given to every
/// [`forward`](BatchNormLayer::forward)); the channel count and layout are fixed.
///
/// The layer owns its parameters and statistics, of type `P` ([`Param`]): the default
/// `BatchNormLayer` (`P = f32`, built by [`pytorch`](BatchNormLayer::pytorch),
/// [`keras`](BatchNormLayer::keras), [`onnx`](BatchNormLayer::onnx)) takes `f32`,
/// [`crate::f16`] and [`crate::bf16`] data; a `BatchNormLayer<f64>` (built by
/// [`BatchNormLayer::<f64>::new`](BatchNormLayer::new)) takes `f64` data. Every operation is the
/// plain [`BatchNorm`] one on the same data, bit for bit.
///
/// ```
/// use batchnorm::{BatchNormLayer, Layout, Preset, Shape};
/// let mut bn = BatchNormLayer::pytorch(3, Layout::Nchw)?;
/// let shape = Shape::with_spatial(2, 3, &[2, 2])?;
/// let x: Vec<f32> = (0..shape.len()).map(|i| i as f32).collect();
/// let mut y = vec![0.0; x.len()];
/// bn.forward(&x, &mut y, shape)?; // training mode: batch statistics, running update
/// assert_eq!(bn.batches_tracked(), 1);
/// let (dy, mut dx) = (vec![1.0; x.len()], vec![0.0; x.len()]);
/// bn.backward(&x, &dy, &mut dx)?; // dx, and dγ, dβ accumulated
/// assert_eq!(bn.dbeta(), &[8.0, 8.0, 8.0]);
/// bn.eval();
/// bn.forward(&x, &mut y, shape)?; // evaluation: running statistics
///
/// // The same layer over f64 data, with f64 parameters and statistics.
/// let mut bn = BatchNormLayer::<f64>::new(3, Layout::Nchw, Preset::PyTorch)?;
/// let x: Vec<f64> = (0..shape.len()).map(|i| i as f64).collect();
/// let mut y = vec![0.0; x.len()];
/// bn.forward(&x, &mut y, shape)?;
/// assert!((bn.running_mean()[0] - 0.75).abs() < 1e-12); // 0.1 · mean(0, 1, 2, 3, 12, ..., 15)
/// # Ok::<(), batchnorm::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct BatchNormLayer<P = f32> {
    channels: usize,
    layout: Layout,
    eps: f64,
    /// The update rule; for [`Momentum::CumulativeAverage`] the layer's own counter is used.
    momentum: Momentum,
    var_estimator: Variance,
    training: bool,
    parallelism: Parallelism,
    residency: Residency,
    /// Resolved when the layer is built (forced by `BATCHNORM_BACKEND`, or the best available).
    backend: Backend,
    gamma: Vec<P>,
    beta: Vec<P>,
    running_mean: Vec<P>,
    running_var: Vec<P>,
    batches_tracked: u64,
    saved_mean: Vec<P>,
    saved_inv_std: Vec<P>,
    dgamma: Vec<P>,
    dbeta: Vec<P>,
    /// The last successful forward, which backward differentiates.
    last: Option<Last>,
}

/// What a layer's backward differentiates.
#[derive(Clone, Copy, Debug)]
enum Last {
    /// A local forward (or an evaluation-mode synchronized one): the shape (`None`: an empty
    /// slice) and whether it normalized with batch statistics.
    Local(Option<Shape>, bool),
    /// A synchronized training forward on this rank's slice (`None`: empty).
    Sync(Option<Shape>),
}

/// A framework's batch-norm defaults, for [`BatchNormLayer::new`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Preset {
    /// `torch.nn.BatchNorm1d/2d/3d(channels)`: ε = 1e-5, momentum 0.1 weighing the new batch
    /// value, unbiased running variance.
    PyTorch,
    /// Keras `BatchNormalization()`: ε = 1e-3, momentum 0.99 weighing the old running value,
    /// population (biased) running variance.
    Keras,
    /// ONNX `BatchNormalization` in training mode: ε = 1e-5, momentum 0.9 weighing the old
    /// running value, population (biased) running variance.
    Onnx,
}

/// The f32 layer's presets (for f32, f16 and bf16 data).
impl BatchNormLayer {
    /// `torch.nn.BatchNorm1d/2d/3d(channels)` ([`Preset::PyTorch`]), in training mode.
    ///
    /// # Errors
    /// As [`BatchNormLayer::new`].
    pub fn pytorch(channels: usize, layout: Layout) -> Result<BatchNormLayer, Error> {
        Self::new(channels, layout, Preset::PyTorch)
    }

    /// Keras `BatchNormalization()` ([`Preset::Keras`]), in training mode.
    ///
    /// # Errors
    /// As [`BatchNormLayer::new`].
    pub fn keras(channels: usize, layout: Layout) -> Result<BatchNormLayer, Error> {
        Self::new(channels, layout, Preset::Keras)
    }

    /// ONNX `BatchNormalization` in training mode ([`Preset::Onnx`]).
    ///
    /// # Errors
    /// As [`BatchNormLayer::new`].
    pub fn onnx(channels: usize, layout: Layout) -> Result<BatchNormLayer, Error> {
        Self::new(channels, layout, Preset::Onnx)
    }
}

impl<P: Param> BatchNormLayer<P> {
    /// A layer over `channels` channels in `layout` with `preset`'s ε, momentum and running
    /// variance estimator, in training mode, with parameters and statistics of type `P`:
    /// `BatchNormLayer::<f64>::new(c, layout, Preset::PyTorch)` for f64 data
    /// (`BatchNormLayer::pytorch(c, layout)` is the f32 one).
    ///
    /// # Errors
    /// [`Error::ZeroDimension`] if `channels` is 0; the invalid `BATCHNORM_BACKEND` errors of
    /// [`BatchNorm::new`].
    pub fn new(channels: usize, layout: Layout, preset: Preset) -> Result<Self, Error> {
        let (eps, momentum, var_estimator) = match preset {
            Preset::PyTorch => (1e-5, Momentum::NewWeight(0.1), Variance::Unbiased),
            Preset::Keras => (1e-3, Momentum::OldWeight(0.99), Variance::Biased),
            Preset::Onnx => (1e-5, Momentum::OldWeight(0.9), Variance::Biased),
        };
        if channels == 0 {
            return Err(Error::ZeroDimension { dim: "C" });
        }
        let backend = match Backend::forced() {
            Some(forced) => forced?,
            None => Backend::detect(),
        };
        let c = |v: f64| vec![P::from_f64(v); channels];
        Ok(BatchNormLayer {
            channels,
            layout,
            eps,
            momentum,
            var_estimator,
            training: true,
            parallelism: Parallelism::Rayon,
            residency: Residency::Auto,
            backend,
            gamma: c(1.0),
            beta: c(0.0),
            running_mean: c(0.0),
            running_var: c(1.0),
            batches_tracked: 0,
            saved_mean: c(0.0),
            saved_inv_std: c(0.0),
            dgamma: c(0.0),
            dbeta: c(0.0),
            last: None,
        })
    }

    /// Sets the momentum in the preset's convention (PyTorch: the new batch's weight; Keras and
    /// ONNX: the old running value's weight); `None` is PyTorch's `momentum=None`, the cumulative
    /// average over the batches tracked.
    ///
    /// # Errors
    /// [`Error::InvalidMomentum`] if the momentum is outside `[0, 1]` or NaN.
    pub fn with_momentum(mut self, momentum: Option<f64>) -> Result<Self, Error> {
        self.momentum = match (momentum, self.momentum) {
            (None, _) => Momentum::CumulativeAverage { batches_tracked: 0 },
            (Some(m), _) if !(0.0..=1.0).contains(&m) => {
                return Err(Error::InvalidMomentum { momentum: m });
            }
            (Some(m), Momentum::OldWeight(_)) => Momentum::OldWeight(m),
            (Some(m), _) => Momentum::NewWeight(m),
        };
        Ok(self)
    }

    /// Sets ε (see [`BatchNorm::with_eps`]).
    ///
    /// # Errors
    /// [`Error::InvalidEpsilon`] if ε is negative, NaN or infinite.
    pub fn with_eps(mut self, eps: f64) -> Result<Self, Error> {
        BatchNorm::on_backend(Shape::new(1, 1, 1)?, self.layout, Backend::Portable)?
            .with_eps(eps)?;
        self.eps = eps;
        Ok(self)
    }

    /// Sets how the operations use threads (see [`BatchNorm::with_parallelism`]).
    pub fn with_parallelism(mut self, parallelism: Parallelism) -> Self {
        self.parallelism = parallelism;
        self
    }

    /// Sets where the operations take their tensors to live (see [`BatchNorm::with_residency`]).
    pub fn with_residency(mut self, residency: Residency) -> Self {
        self.residency = residency;
        self
    }

    /// Forces a SIMD backend (see [`BatchNorm::with_backend`]).
    ///
    /// # Errors
    /// [`Error::BackendUnavailable`] if this CPU cannot run it.
    pub fn with_backend(mut self, backend: Backend) -> Result<Self, Error> {
        BatchNorm::on_backend(Shape::new(1, 1, 1)?, self.layout, backend)?;
        self.backend = backend;
        Ok(self)
    }

    /// Training mode: [`forward`](BatchNormLayer::forward) normalizes with the batch statistics
    /// and updates the running ones (the default).
    pub fn train(&mut self) {
        self.training = true;
    }
    /// Evaluation mode: [`forward`](BatchNormLayer::forward) normalizes with the running
    /// statistics and changes nothing.
    pub fn eval(&mut self) {
        self.training = false;
    }
    /// Whether the layer is in training mode.
    pub fn is_training(&self) -> bool {
        self.training
    }

    /// The operator for `shape`, with the layer's ε, parallelism, residency and backend.
    fn operator(&self, shape: Shape) -> Result<BatchNorm, Error> {
        if shape.c() != self.channels {
            return Err(Error::ChannelMismatch {
                expected: self.channels,
                actual: shape.c(),
            });
        }
        let op = BatchNorm::on_backend(shape, self.layout, self.backend)?;
        Ok(op
            .with_eps(self.eps)?
            .with_parallelism(self.parallelism)
            .with_residency(self.residency))
    }

    /// `y = BN(x)` for a tensor of `shape` (its C must be the layer's). In training mode: batch
    /// statistics, the saved mean and inverse std for backward, the running statistics updated
    /// and the batch counter incremented (PyTorch counts in every convention). In evaluation
    /// mode: the running statistics. On error nothing changes.
    ///
    /// # Errors
    /// [`Error::ChannelMismatch`] if `shape.c()` is not the layer's channel count; the errors of
    /// [`BatchNorm::training`] and [`BatchNorm::inference`] (wrong lengths, too few values for the
    /// unbiased variance).
    pub fn forward<E: Element<Param = P>>(
        &mut self,
        x: &[E],
        y: &mut [E],
        shape: Shape,
    ) -> Result<(), Error> {
        let op = self.operator(shape)?;
        if !self.training {
            let affine = Some(Affine {
                gamma: &self.gamma,
                beta: &self.beta,
            });
            let running = RunningStats {
                mean: &self.running_mean,
                var: &self.running_var,
            };
            op.inference(x, y, affine, running)?;
            self.last = Some(Last::Local(Some(shape), false));
            return Ok(());
        }
        let tracked = self.batches_tracked + 1;
        let (affine, saved, update) = self.training_args(tracked);
        let stats = (Epilogue::None, None); // the batch statistics are not kept
        op.train_into("training", (x, y), affine, Some(saved), Some(update), stats)?;
        self.batches_tracked = tracked;
        self.last = Some(Last::Local(Some(shape), true));
        Ok(())
    }

    /// [`forward`](BatchNormLayer::forward) synchronized over the ranks of `comm`
    /// ([`SyncBatchNorm::training`]): this rank's slice `x` of `shape` (`None` when it is empty
    /// this step) is normalized with the statistics of every rank's slice, and the running
    /// statistics and the batch counter are updated from them, identically on every rank. Every
    /// rank's layer must be in training mode and configured alike (a disagreement is an error on
    /// every rank). In evaluation mode nothing is exchanged: this is
    /// [`forward`](BatchNormLayer::forward) (the running statistics are the same on every rank).
    ///
    /// # Errors
    /// The errors of [`SyncBatchNorm::training`]; in evaluation mode those of
    /// [`forward`](BatchNormLayer::forward), and [`Error::LengthMismatch`] for a non-empty `x` or
    /// `y` with `shape` `None`. On error nothing changes.
    pub fn forward_sync<E: Element<Param = P>, C: Communicator + ?Sized>(
        &mut self,
        x: &[E],
        y: &mut [E],
        shape: Option<Shape>,
        comm: &C,
    ) -> Result<(), Error> {
        if !self.training {
            let Some(shape) = shape else {
                check_len("BatchNormLayer::forward_sync", "x", 0, x.len())?;
                check_len("BatchNormLayer::forward_sync", "y", 0, y.len())?;
                self.last = Some(Last::Local(None, false));
                return Ok(());
            };
            return self.forward(x, y, shape);
        }
        let bn = SyncBatchNorm::from_operator(self.operator(Shape::new(1, self.channels, 1)?)?);
        let tracked = self.batches_tracked + 1;
        let (affine, saved, update) = self.training_args(tracked);
        bn.training(x, y, shape, affine, Some(saved), Some(update), comm)?;
        self.batches_tracked = tracked;
        self.last = Some(Last::Sync(shape));
        Ok(())
    }

    /// The backward of [`forward_sync`](BatchNormLayer::forward_sync)
    /// ([`SyncBatchNorm::backward`]): this rank's dx, and the dγ and dβ of the whole batch
    /// (the same on every rank) accumulated into the layer's gradients. After an evaluation-mode
    /// `forward_sync` nothing is exchanged: this is [`backward`](BatchNormLayer::backward), with
    /// this rank's own dγ and dβ.
    ///
    /// # Errors
    /// [`Error::NoForward`] if the last successful forward was not a `forward_sync` (a local
    /// training forward is differentiated by [`backward`](BatchNormLayer::backward)); the errors
    /// of [`SyncBatchNorm::backward`]. On error nothing changes.
    pub fn backward_sync<E: Element<Param = P>, C: Communicator + ?Sized>(
        &mut self,
        x: &[E],
        dy: &[E],
        dx: &mut [E],
        comm: &C,
    ) -> Result<(), Error> {
        let shape = match self.last {
            Some(Last::Sync(shape)) => shape,
            Some(Last::Local(_, false)) => return self.backward(x, dy, dx),
            _ => return Err(Error::NoForward),
        };
        let bn = SyncBatchNorm::from_operator(self.operator(Shape::new(1, self.channels, 1)?)?);
        let (affine, saved, grads, _) = self.backward_args();
        bn.backward((x, dy), dx, shape, affine, saved, Some(grads), comm)
    }

    /// `dx` from `dy` for the last forward (its shape and mode: batch statistics after a
    /// training forward, the running statistics after an evaluation one), with dγ and dβ
    /// **accumulated** into the layer's gradients, as frameworks accumulate `.grad`
    /// ([`zero_grad`](BatchNormLayer::zero_grad) clears them). `x` must be the input of that
    /// forward.
    ///
    /// # Errors
    /// [`Error::NoForward`] before any successful forward, or after a synchronized training
    /// forward (differentiated by [`backward_sync`](BatchNormLayer::backward_sync)); the errors
    /// of [`BatchNorm::backward`] (wrong lengths). On error nothing changes.
    pub fn backward<E: Element<Param = P>>(
        &mut self,
        x: &[E],
        dy: &[E],
        dx: &mut [E],
    ) -> Result<(), Error> {
        let (shape, batch_stats) = match self.last {
            Some(Last::Local(Some(shape), batch_stats)) => (shape, batch_stats),
            Some(Last::Local(None, _)) => {
                // An empty slice in evaluation mode: nothing to differentiate.
                const OP: &str = "BatchNormLayer::backward";
                check_len(OP, "x", 0, x.len())?;
                check_len(OP, "dy", 0, dy.len())?;
                return check_len(OP, "dx", 0, dx.len());
            }
            _ => return Err(Error::NoForward),
        };
        let op = self.operator(shape)?;
        let (affine, saved, grads, running) = self.backward_args();
        let mode = if batch_stats {
            BackwardMode::Training(saved)
        } else {
            BackwardMode::Frozen(running)
        };
        op.backward(x, dy, dx, affine, mode, Some(grads))
    }

    /// The layer's arguments of a training forward, the `tracked`-th batch: γ and β, where the
    /// statistics are saved, and the running update.
    fn training_args(
        &mut self,
        tracked: u64,
    ) -> (
        Option<Affine<'_, P>>,
        SavedStatsMut<'_, P>,
        RunningUpdate<'_, P>,
    ) {
        let affine = Affine {
            gamma: &self.gamma,
            beta: &self.beta,
        };
        let saved = SavedStatsMut {
            mean: &mut self.saved_mean,
            inv_std: &mut self.saved_inv_std,
        };
        let update = RunningUpdate {
            mean: &mut self.running_mean,
            var: &mut self.running_var,
            momentum: momentum_at(self.momentum, tracked),
            var_estimator: self.var_estimator,
        };
        (Some(affine), saved, update)
    }

    /// The layer's arguments of a backward: γ and β, the saved and the running statistics, and
    /// the gradients to accumulate into.
    fn backward_args(
        &mut self,
    ) -> (
        Option<Affine<'_, P>>,
        SavedStats<'_, P>,
        ParamGrads<'_, P>,
        RunningStats<'_, P>,
    ) {
        let affine = Affine {
            gamma: &self.gamma,
            beta: &self.beta,
        };
        let saved = SavedStats {
            mean: &self.saved_mean,
            inv_std: &self.saved_inv_std,
        };
        let running = RunningStats {
            mean: &self.running_mean,
            var: &self.running_var,
        };
        let grads = ParamGrads {
            dgamma: &mut self.dgamma,
            dbeta: &mut self.dbeta,
            mode: GradMode::Accumulate,
        };
        (Some(affine), saved, grads, running)
    }

    /// Sets dγ and dβ to zero.
    pub fn zero_grad(&mut self) {
        self.dgamma.fill(P::ZERO);
        self.dbeta.fill(P::ZERO);
    }

    /// Channels.
    pub fn channels(&self) -> usize {
        self.channels
    }
    /// Layout of the tensors.
    pub fn layout(&self) -> Layout {
        self.layout
    }
    /// ε.
    pub fn eps(&self) -> f64 {
        self.eps
    }
    /// The SIMD backend the layer's operations run on.
    pub fn backend(&self) -> Backend {
        self.backend
    }
    /// How the layer's operations use threads.
    pub fn parallelism(&self) -> Parallelism {
        self.parallelism
    }
    /// Where the layer's operations take their tensors to live.
    pub fn residency(&self) -> Residency {
        self.residency
    }
    /// The running-update rule ([`Momentum::CumulativeAverage`] counts with
    /// [`batches_tracked`](BatchNormLayer::batches_tracked)).
    pub fn momentum(&self) -> Momentum {
        self.momentum
    }
    /// Which batch variance feeds the running variance.
    pub fn var_estimator(&self) -> Variance {
        self.var_estimator
    }
    /// Training forwards that succeeded (PyTorch's `num_batches_tracked`).
    pub fn batches_tracked(&self) -> u64 {
        self.batches_tracked
    }
    /// γ.
    pub fn gamma(&self) -> &[P] {
        &self.gamma
    }
    /// β.
    pub fn beta(&self) -> &[P] {
        &self.beta
    }
    /// γ, to load or update (an optimizer step).
    pub fn gamma_mut(&mut self) -> &mut [P] {
        &mut self.gamma
    }
    /// β, to load or update.
    pub fn beta_mut(&mut self) -> &mut [P] {
        &mut self.beta
    }
    /// The running mean.
    pub fn running_mean(&self) -> &[P] {
        &self.running_mean
    }
    /// The running variance.
    pub fn running_var(&self) -> &[P] {
        &self.running_var
    }
    /// The running mean, to load a checkpoint.
    pub fn running_mean_mut(&mut self) -> &mut [P] {
        &mut self.running_mean
    }
    /// The running variance, to load a checkpoint.
    pub fn running_var_mut(&mut self) -> &mut [P] {
        &mut self.running_var
    }
    /// Sets the batch counter (to load a checkpoint).
    pub fn set_batches_tracked(&mut self, batches: u64) {
        self.batches_tracked = batches;
    }
    /// The batch mean saved by the last training forward.
    pub fn saved_mean(&self) -> &[P] {
        &self.saved_mean
    }
    /// The inverse standard deviation `1/sqrt(var + ε)` saved by the last training forward.
    pub fn saved_inv_std(&self) -> &[P] {
        &self.saved_inv_std
    }
    /// dγ accumulated since the last [`zero_grad`](BatchNormLayer::zero_grad).
    pub fn dgamma(&self) -> &[P] {
        &self.dgamma
    }
    /// dβ accumulated since the last [`zero_grad`](BatchNormLayer::zero_grad).
    pub fn dbeta(&self) -> &[P] {
        &self.dbeta
    }

    /// Sets γ and β from slices of length C.
    ///
    /// # Errors
    /// [`Error::LengthMismatch`] naming `gamma` or `beta`; nothing changes then.
    pub fn set_affine(&mut self, gamma: &[P], beta: &[P]) -> Result<(), Error> {
        const OP: &str = "BatchNormLayer::set_affine";
        check_len(OP, "gamma", self.channels, gamma.len())?;
        check_len(OP, "beta", self.channels, beta.len())?;
        self.gamma.copy_from_slice(gamma);
        self.beta.copy_from_slice(beta);
        Ok(())
    }
}

/// The update rule of the `tracked`-th training batch: the cumulative average counts it.
fn momentum_at(momentum: Momentum, tracked: u64) -> Momentum {
    match momentum {
        Momentum::CumulativeAverage { .. } => Momentum::CumulativeAverage {
            batches_tracked: tracked,
        },
        m => m,
    }
}
