//! Synchronized batch norm: data-parallel ranks, each holding a slice of the batch, normalize
//! with the statistics of the whole batch.
//!
//! A [`Communicator`] exchanges small per-channel `f64` buffers between the ranks; two implement
//! it: [`ThreadComm`] (ranks are threads of one process: tests, and micro-batch accumulation on
//! one machine) and, with the cargo feature `mpi`, `MpiComm` (ranks are MPI processes, through
//! the `mpi` crate). [`SyncBatchNorm`] runs the operator's own passes with one exchange between
//! them:
//!
//! - training forward: each rank reduces its slice to per-channel (count, mean, M2); the ranks
//!   gather them and every rank merges them **in rank order** with Chan's formula
//!   ([`ChannelStats::merge`]), so every rank holds bit-identical global statistics whatever the
//!   communicator's own reduction order; then each rank normalizes its slice and updates the
//!   running statistics from the global count.
//! - backward: each rank sums Σdy, Σ(x − K)·dy and Σ(x − K) per channel relative to the saved
//!   mean K (the same on every rank), the ranks sum them (a gather summed in rank order, so the
//!   totals are bit-identical on every rank), and each rank computes its dx with the global
//!   count.
//!
//! Both take data of any [`Element`] type with parameters and statistics of its
//! [`Element::Param`], as the local ops do; the exchanged sums are `f64` whatever the type.
//!
//! Before either exchange the ranks gather a small descriptor of the call (operation, channels,
//! layout, ε, the storage type, which optional arguments are present, the update rule, whether
//! the rank's own arguments passed validation, its number of values). A disagreement is an error on every rank,
//! and nothing is written: no rank waits for a message that will not come.

use crate::batchnorm::check_values;
use crate::channel::{dx_params, finish_training, normalize_params, training_grads, write_grads};
use crate::driver::{Fuse, Grad, GradSums, Src};
use crate::element::type_code;
use crate::error::check_len;
use crate::params::{Affine, GradMode, Momentum, ParamGrads, RunningUpdate, SavedStats};
use crate::params::{BackwardMode, SavedStatsMut};
use crate::scratch;
use crate::{
    Backend, BatchNorm, ChannelStats, Element, Error, Layout, Parallelism, Residency, Shape,
    Variance,
};

#[cfg(feature = "mpi")]
mod mpi;
mod threads;

#[cfg(feature = "mpi")]
pub use self::mpi::MpiComm;
pub use threads::ThreadComm;

/// Collective exchange of `f64` buffers between the ranks of a group: what synchronized batch
/// norm needs of a distributed engine.
///
/// Every rank calls the same collective in the same order with buffers of the same length (the
/// synchronized ops guarantee it: they agree on a fixed-size descriptor first). An
/// implementation returns an error rather than blocking forever where it can tell a rank is gone.
pub trait Communicator {
    /// This rank's index, `0..size()`.
    fn rank(&self) -> usize;

    /// Number of ranks in the group (at least 1).
    fn size(&self) -> usize;

    /// All-gather: every rank contributes `send`; `recv` (of length `size()·send.len()`) receives
    /// rank r's buffer at `r·send.len()`, on every rank, bits unchanged.
    ///
    /// # Errors
    /// [`Error::Communication`] if `recv` has the wrong length, the ranks' lengths differ, or a
    /// rank left the group.
    fn all_gather(&self, send: &[f64], recv: &mut [f64]) -> Result<(), Error>;

    /// All-reduce: `buf` becomes the element-wise sum of every rank's `buf`, bit-identical on
    /// every rank. The provided method gathers the buffers and adds them in rank order, so the
    /// result does not depend on the engine's reduction tree; an implementation that overrides it
    /// must keep that guarantee.
    ///
    /// # Errors
    /// As [`Communicator::all_gather`].
    fn all_reduce_sum(&self, buf: &mut [f64]) -> Result<(), Error> {
        let len = buf.len();
        let mut all = scratch::zeroed::<f64>(len * self.size());
        self.all_gather(buf, &mut all)?;
        if len == 0 {
            return Ok(());
        }
        // Rank 0's values as they are (one rank returns its own buffer bit for bit), then
        // ranks 1, 2, ... added in order.
        buf.copy_from_slice(&all[..len]);
        for part in all[len..].chunks_exact(len) {
            for (b, &p) in buf.iter_mut().zip(part) {
                *b += p;
            }
        }
        Ok(())
    }
}

/// Batch normalization synchronized over the ranks of a [`Communicator`]: each rank passes its
/// slice of the batch (its own N, possibly 0, and HW), and every rank normalizes with the
/// statistics of the concatenation of all slices, as one process would on the whole batch.
///
/// The channel count, layout and ε are fixed at construction (and must agree between ranks);
/// every call takes the local shape, `None` for a rank whose slice is empty this step. The data
/// may be of any [`Element`] type (`f32`, `f64`, [`crate::f16`], [`crate::bf16`]; the same on
/// every rank), with parameters and statistics of its [`Element::Param`], as in [`BatchNorm`]:
/// with one rank the results are the local ops' bit for bit.
///
/// ```
/// use batchnorm::{Communicator, Layout, RunningUpdate, SavedStatsMut, Shape, SyncBatchNorm, ThreadComm};
/// // Two ranks as two threads, each with 2 of the 4 samples of a 4x3x5 batch.
/// let bn = SyncBatchNorm::new(3, Layout::Nchw)?;
/// let results: Vec<_> = std::thread::scope(|s| {
///     let handles: Vec<_> = ThreadComm::group(2)
///         .into_iter()
///         .map(|comm| {
///             s.spawn(move || {
///                 let shape = Shape::new(2, 3, 5)?;
///                 let x: Vec<f32> = (0..shape.len()).map(|i| (i * (comm.rank() + 1)) as f32).collect();
///                 let mut y = vec![0.0; x.len()];
///                 let (mut mean, mut var) = (vec![0.0; 3], vec![1.0; 3]);
///                 let (mut saved_mean, mut inv_std) = (vec![0.0; 3], vec![0.0; 3]);
///                 let saved = SavedStatsMut { mean: &mut saved_mean, inv_std: &mut inv_std };
///                 let update = RunningUpdate::pytorch(&mut mean, &mut var);
///                 bn.training(&x, &mut y, Some(shape), None, Some(saved), Some(update), &comm)?;
///                 Ok::<_, batchnorm::Error>((saved_mean, mean, var))
///             })
///         })
///         .collect();
///     handles.into_iter().map(|h| h.join().unwrap()).collect()
/// });
/// // Every rank holds the same global statistics.
/// assert_eq!(results[0].as_ref().unwrap(), results[1].as_ref().unwrap());
/// # Ok::<(), batchnorm::Error>(())
/// ```
#[derive(Clone, Copy, Debug)]
pub struct SyncBatchNorm {
    /// The configuration (ε, parallelism, backend) for one sample of one position; each call
    /// takes its shape from the local one.
    template: BatchNorm,
}

/// What a synchronized call is, for the descriptor.
#[derive(Clone, Copy, PartialEq)]
enum Op {
    Training = 1,
    Backward = 2,
}

/// Number of `f64` fields of the descriptor every synchronized call gathers first.
const FIELDS: usize = 12;

/// Names of the descriptor's fields after the status and the count, for
/// [`Error::SyncMismatch`]: the common ones, then the training forward's or the backward's.
const WHAT: [&str; 5] = ["operation", "channels", "layout", "eps", "storage type"];
const WHAT_TRAINING: [&str; 5] = [
    "affine",
    "saved statistics",
    "running update",
    "momentum",
    "variance estimator",
];
const WHAT_BACKWARD: [&str; 5] = ["affine", "parameter gradients", "gradient mode", "", ""];

/// The descriptor of one rank's call: `[status, count, op, channels, layout, eps, ...]`.
/// Integers travel as exact f64 values (counts below 2⁵³).
type Descriptor = [f64; FIELDS];

/// Gathers every rank's descriptor and checks the call is the same everywhere. `local` is this
/// rank's own validation. Returns the number of values of every rank (rank order) and their sum.
fn agree<T, C: Communicator + ?Sized>(
    comm: &C,
    local: Result<T, Error>,
    desc: Descriptor,
) -> Result<(T, scratch::Scratch<f64>, u64), Error> {
    let size = comm.size();
    let mut all = scratch::zeroed::<f64>(FIELDS * size);
    comm.all_gather(&desc, &mut all)?;
    let rows = || all.chunks_exact(FIELDS);
    if let Some(rank) = rows().position(|d| d[0] != 0.0) {
        // The failed rank returns its own error; the others name it.
        return Err(local.err().unwrap_or(Error::SyncPeerFailed { rank }));
    }
    let first = &all[..FIELDS];
    for (rank, d) in rows().enumerate().skip(1) {
        if let Some(i) = (2..FIELDS).find(|&i| d[i].to_bits() != first[i].to_bits()) {
            let what = match i - 2 {
                k if k < WHAT.len() => WHAT[k],
                k if first[2] == Op::Training as u8 as f64 => WHAT_TRAINING[k - WHAT.len()],
                k => WHAT_BACKWARD[k - WHAT.len()],
            };
            return Err(Error::SyncMismatch { what, rank });
        }
    }
    let local = local?; // Ok: this rank's status was 0.
    let counts = scratch::from_fn(size, |r| all[r * FIELDS + 1]);
    let total = counts.iter().map(|&c| c as u64).sum();
    Ok((local, counts, total))
}

impl SyncBatchNorm {
    /// Synchronized batch norm over `channels` channels in `layout`, with ε = [`crate::DEFAULT_EPS`],
    /// [`Parallelism::Rayon`] and the backend [`BatchNorm::new`] chooses.
    ///
    /// # Errors
    /// [`Error::ZeroDimension`] if `channels` is 0; the `BATCHNORM_BACKEND` errors of
    /// [`BatchNorm::new`].
    pub fn new(channels: usize, layout: Layout) -> Result<SyncBatchNorm, Error> {
        let template = BatchNorm::new(Shape::new(1, channels, 1)?, layout)?;
        Ok(SyncBatchNorm { template })
    }

    /// Synchronized ops with `bn`'s channels, layout, ε, parallelism and backend.
    pub(crate) fn from_operator(bn: BatchNorm) -> SyncBatchNorm {
        SyncBatchNorm { template: bn }
    }

    /// Sets ε (see [`BatchNorm::with_eps`]); every rank must use the same.
    ///
    /// # Errors
    /// [`Error::InvalidEpsilon`] if ε is negative, NaN or infinite.
    pub fn with_eps(self, eps: f64) -> Result<SyncBatchNorm, Error> {
        Ok(SyncBatchNorm {
            template: self.template.with_eps(eps)?,
        })
    }

    /// Sets how each rank's passes use threads (see [`BatchNorm::with_parallelism`]).
    pub fn with_parallelism(self, par: Parallelism) -> SyncBatchNorm {
        SyncBatchNorm {
            template: self.template.with_parallelism(par),
        }
    }

    /// Sets where each rank's passes take their tensors to live (see
    /// [`BatchNorm::with_residency`]).
    pub fn with_residency(self, residency: Residency) -> SyncBatchNorm {
        SyncBatchNorm {
            template: self.template.with_residency(residency),
        }
    }

    /// Forces a SIMD backend (see [`BatchNorm::with_backend`]).
    ///
    /// # Errors
    /// [`Error::BackendUnavailable`] if this CPU cannot run it.
    pub fn with_backend(self, backend: Backend) -> Result<SyncBatchNorm, Error> {
        Ok(SyncBatchNorm {
            template: self.template.with_backend(backend)?,
        })
    }

    /// Channels.
    pub fn channels(&self) -> usize {
        self.template.shape().c()
    }
    /// The layout.
    pub fn layout(&self) -> Layout {
        self.template.layout()
    }
    /// ε.
    pub fn eps(&self) -> f64 {
        self.template.eps()
    }

    /// The descriptor fields common to every call, for data of type `E`.
    fn descriptor<E: Element>(&self, ok: bool, count: u64, op: Op) -> Descriptor {
        let mut d = [0.0; FIELDS];
        d[0] = if ok { 0.0 } else { 1.0 };
        d[1] = count as f64;
        d[2] = op as u8 as f64;
        d[3] = self.channels() as f64;
        d[4] = match self.layout() {
            Layout::Nchw => 0.0,
            Layout::Nhwc => 1.0,
        };
        d[5] = self.eps();
        d[6] = type_code::<E>() as f64;
        d
    }

    /// The local operator and the number of elements of the local slice, after checking the
    /// local shape's channels.
    fn local(&self, shape: Option<Shape>) -> Result<(Option<BatchNorm>, usize), Error> {
        match shape {
            None => Ok((None, 0)),
            Some(s) if s.c() != self.channels() => Err(Error::ChannelMismatch {
                expected: self.channels(),
                actual: s.c(),
            }),
            Some(s) => Ok((Some(self.template.with_shape(s)), s.len())),
        }
    }

    /// Synchronized training forward on this rank's slice `x` (of `shape`, `None` if empty):
    /// `y = γ·(x − μ)/sqrt(σ² + ε) + β` with the mean μ and biased variance σ² of the whole batch
    /// (every rank's slice), the saved statistics (`saved`, the global ones, for
    /// [`SyncBatchNorm::backward`]) and the running update (`update`, once, from the global
    /// statistics and count: PyTorch's unbiased rule or the other conventions as in
    /// [`BatchNorm::training`]). Every rank must call it with the same configuration; the global
    /// statistics, the saved statistics and the running statistics are bit-identical on every
    /// rank.
    ///
    /// The forward costs one extra read of `x` over the local op's fused schedule (statistics,
    /// exchange, then the normalizing pass) and two small messages: the descriptor and 2·C
    /// `f64` per rank.
    ///
    /// # Errors
    /// On this rank: [`Error::ChannelMismatch`] if `shape` has another channel count,
    /// [`Error::LengthMismatch`] for any slice, [`Error::InvalidMomentum`],
    /// [`Error::ZeroBatchesTracked`]. On every rank: [`Error::SyncPeerFailed`] when another rank
    /// failed so, [`Error::SyncMismatch`] when the ranks' configurations differ,
    /// [`Error::EmptyBatch`] when every slice is empty, [`Error::TooFewValues`] for the unbiased
    /// running variance with fewer than two values in the whole batch, and
    /// [`Error::Communication`]. Nothing is written when an error is returned.
    #[allow(clippy::too_many_arguments)] // the local op's arguments, the local shape, the group
    pub fn training<E: Element, C: Communicator + ?Sized>(
        &self,
        x: &[E],
        y: &mut [E],
        shape: Option<Shape>,
        affine: Option<Affine<'_, E::Param>>,
        saved: Option<SavedStatsMut<'_, E::Param>>,
        update: Option<RunningUpdate<'_, E::Param>>,
        comm: &C,
    ) -> Result<(), Error> {
        const OP: &str = "SyncBatchNorm::training";
        let checked = self.local(shape).and_then(|(bn, len)| {
            check_len(OP, "x", len, x.len())?;
            check_len(OP, "y", len, y.len())?;
            let weights = self.template.check_training_channels(
                OP,
                affine.as_ref(),
                saved.as_ref(),
                &update,
            )?;
            Ok((bn, weights))
        });
        let count = shape.map_or(0, |s| s.per_channel() as u64);
        let mut desc = self.descriptor::<E>(checked.is_ok(), count, Op::Training);
        desc[7] = affine.is_some() as u8 as f64;
        desc[8] = saved.is_some() as u8 as f64;
        desc[9] = update.is_some() as u8 as f64;
        if let Some(u) = &update {
            desc[10] = match u.momentum {
                Momentum::NewWeight(m) => m,
                Momentum::OldWeight(m) => -1.0 - m,
                Momentum::CumulativeAverage { batches_tracked } => -3.0 - batches_tracked as f64,
            };
            desc[11] = match u.var_estimator {
                Variance::Biased => 0.0,
                Variance::Unbiased => 1.0,
            };
        }
        let ((bn, weights), counts, total) = agree(comm, checked, desc)?;
        if total == 0 {
            return Err(Error::EmptyBatch);
        }
        check_values(update.as_ref(), total)?;

        // Local (mean, M2) per channel, gathered, merged in rank order.
        let channels = self.channels();
        let mut local = scratch::zeroed::<ChannelStats>(channels);
        if let Some(bn) = &bn {
            E::statistics(bn.ctx(), x, &mut local);
        }
        let send = scratch::from_fn(2 * channels, |i| {
            let s = &local[i / 2];
            if i % 2 == 0 { s.mean() } else { s.m2() }
        });
        let mut all = scratch::zeroed::<f64>(2 * channels * comm.size());
        comm.all_gather(&send, &mut all)?;
        let mut global = scratch::zeroed::<ChannelStats>(channels);
        for (part, &count) in all.chunks_exact(2 * channels).zip(counts.iter()) {
            for (g, ms) in global.iter_mut().zip(part.chunks_exact(2)) {
                *g = g.merge(&ChannelStats::new(count as u64, ms[0], ms[1]));
            }
        }

        // Normalize the local slice with the global statistics; then the saved statistics and
        // the running update, as the local op does.
        let eps = self.eps();
        let mut params = scratch::zeroed(channels);
        let backend = self.template.backend();
        let mut inv_std = scratch::zeroed::<f64>(channels);
        let outs = (&mut params[..], &mut inv_std[..]);
        normalize_params(backend, (0, &global), eps, affine.as_ref(), outs);
        if let Some(bn) = &bn {
            let src = (Src::Separate(x), Fuse::default());
            E::normalize(bn.ctx(), src, y, &params);
        }
        finish_training(backend, &global, &inv_std, saved, update.zip(weights));
        Ok(())
    }

    /// Synchronized backward of [`SyncBatchNorm::training`] on this rank's slice (of `shape`,
    /// `None` if empty): with M the global count and the sums taken over every rank's slice,
    /// `dβ = Σdy`, `dγ = Σ(x − μ)·r·dy`, `dx = γ·r·(dy − dβ/M − (x − μ)·r·dγ/M)`, r the saved
    /// inverse std. One exchange of 3·C `f64` per rank (Σdy, Σ(x − K)·dy, Σ(x − K) relative to
    /// the saved mean K), summed in rank order so every rank holds the same totals.
    ///
    /// `saved` must be what [`SyncBatchNorm::training`] saved (the global statistics, the same
    /// on every rank). `grads` receives the **global** dγ and dβ, the same on every rank: the
    /// gradients of the whole batch, as one process would compute them (PyTorch's
    /// `SyncBatchNorm` leaves them per rank for its data-parallel wrapper to all-reduce; do not
    /// all-reduce these again).
    ///
    /// # Errors
    /// As [`SyncBatchNorm::training`] ([`Error::LengthMismatch`] naming the slice on this rank;
    /// [`Error::SyncPeerFailed`], [`Error::SyncMismatch`], [`Error::EmptyBatch`],
    /// [`Error::Communication`] on every rank). Nothing is written when an error is returned.
    #[allow(clippy::too_many_arguments)] // the local op's arguments, the local shape, the group
    pub fn backward<E: Element, C: Communicator + ?Sized>(
        &self,
        (x, dy): (&[E], &[E]),
        dx: &mut [E],
        shape: Option<Shape>,
        affine: Option<Affine<'_, E::Param>>,
        saved: SavedStats<'_, E::Param>,
        grads: Option<ParamGrads<'_, E::Param>>,
        comm: &C,
    ) -> Result<(), Error> {
        const OP: &str = "SyncBatchNorm::backward";
        let checked = self.local(shape).and_then(|(bn, len)| {
            check_len(OP, "x", len, x.len())?;
            check_len(OP, "dy", len, dy.len())?;
            check_len(OP, "dx", len, dx.len())?;
            self.template.check_affine(OP, affine.as_ref())?;
            let mode = BackwardMode::Training(saved);
            self.template
                .check_grads_and_mode(OP, grads.as_ref(), &mode)?;
            Ok(bn)
        });
        let count = shape.map_or(0, |s| s.per_channel() as u64);
        let mut desc = self.descriptor::<E>(checked.is_ok(), count, Op::Backward);
        desc[7] = affine.is_some() as u8 as f64;
        desc[8] = grads.is_some() as u8 as f64;
        desc[9] = match grads.as_ref().map(|g| g.mode) {
            None => 0.0,
            Some(GradMode::Overwrite) => 1.0,
            Some(GradMode::Accumulate) => 2.0,
        };
        let (bn, _, total) = agree(comm, checked, desc)?;
        if total == 0 {
            return Err(Error::EmptyBatch);
        }

        let channels = self.channels();
        let mut sums = scratch::zeroed::<GradSums>(channels);
        if let Some(bn) = &bn {
            let dy = Grad::Dy(Src::Separate(dy));
            E::backward(bn.ctx(), x, dy, dx, saved.mean, None, &mut sums);
        }
        let mut buf = scratch::from_fn(3 * channels, |i| {
            let g = &sums[i / 3];
            [g.dy, g.xdy, g.x][i % 3]
        });
        comm.all_reduce_sum(&mut buf)?;
        for (g, b) in sums.iter_mut().zip(buf.chunks_exact(3)) {
            *g = GradSums {
                dy: b[0],
                xdy: b[1],
                x: b[2],
            };
        }

        let m = total as f64;
        if let Some(bn) = &bn {
            let mut params = scratch::zeroed(channels);
            let backend = self.template.backend();
            dx_params(
                backend,
                &saved,
                affine.map(|a| a.gamma),
                m,
                (0, &sums),
                &mut params,
            );
            E::dx(bn.ctx(), x, Src::Separate(dy), dx, &params);
        }
        if let Some(mut g) = grads {
            let inv_m = 1.0 / m;
            let grads = sums.iter().zip(saved.inv_std).map(|(s, &r)| {
                let (dgamma, dbeta, _) = training_grads(s, r.into(), inv_m);
                (dgamma, dbeta)
            });
            write_grads(&mut g, grads);
        }
        Ok(())
    }
}
