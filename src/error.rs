//! The error type of every public operation.

use std::fmt;

/// Everything the public API rejects. Each variant names the argument and, where it applies,
/// the expected and the actual value.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum Error {
    /// A dimension is zero.
    ZeroDimension {
        /// Which dimension: `"N"`, `"C"`, `"HW"` ([`crate::Shape::new`]'s spatial extent) or
        /// `"spatial[i]"` (the i-th of [`crate::Shape::with_spatial`]'s, `"spatial"` past the 8th);
        /// for folding, `"out_channels"`, `"in_per_group"`, `"kernel"` or `"inputs"`.
        dim: &'static str,
    },
    /// N·C·HW (or its size in bytes) does not fit in `usize`/`isize`.
    ShapeOverflow {
        /// Batch size.
        n: usize,
        /// Channels.
        c: usize,
        /// Spatial extent, or the spatial dimension that overflowed.
        hw: usize,
    },
    /// A slice has the wrong length for the shape.
    LengthMismatch {
        /// The operation, e.g. `"inference"`, `"training"`, `"backward_in_place"`,
        /// `"BatchNormLayer::set_affine"`.
        op: &'static str,
        /// The argument, e.g. `"x"`, `"gamma"`, `"running_var"`.
        arg: &'static str,
        /// The length the shape requires.
        expected: usize,
        /// The length given.
        actual: usize,
    },
    /// ε is negative, NaN or infinite.
    InvalidEpsilon {
        /// The value given.
        eps: f64,
    },
    /// Momentum is outside `[0, 1]` or NaN.
    InvalidMomentum {
        /// The value given.
        momentum: f64,
    },
    /// The cumulative-average running update was given `batches_tracked == 0`.
    ZeroBatchesTracked,
    /// The unbiased variance needs at least two values per channel.
    TooFewValues {
        /// Values per channel (N·HW) in the batch.
        per_channel: u64,
    },
    /// Two statistics with different channel counts were merged.
    ChannelMismatch {
        /// Channels of the receiver.
        expected: usize,
        /// Channels of the argument.
        actual: usize,
    },
    /// A backend was requested that this CPU cannot run.
    BackendUnavailable {
        /// The backend's name.
        backend: &'static str,
    },
    /// `BATCHNORM_BACKEND` names no known backend.
    UnknownBackend {
        /// The value of the variable.
        name: String,
    },
    /// [`crate::BatchNormLayer::backward`] was called before any successful forward (or after a
    /// synchronized one; [`crate::BatchNormLayer::backward_sync`] after a local training one).
    NoForward,
    /// An array view has a rank outside 2 to 5 (`(N, C)` to `(N, C, D, H, W)`; feature `ndarray`).
    UnsupportedRank {
        /// Its number of dimensions.
        rank: usize,
    },
    /// An array view's strides are neither standard nor channels-last order (feature `ndarray`).
    UnsupportedStrides {
        /// The first axis whose stride does not fit.
        axis: usize,
        /// Its stride, in elements.
        stride: isize,
    },
    /// The ranks of a synchronized operation disagree on its configuration (checked on every
    /// rank before anything is written, so every rank gets this error).
    SyncMismatch {
        /// What differs: `"operation"`, `"channels"`, `"layout"`, `"eps"`, `"storage type"`,
        /// `"affine"`, `"saved statistics"`, `"running update"`, `"momentum"`,
        /// `"variance estimator"`, `"parameter gradients"` or `"gradient mode"`.
        what: &'static str,
        /// The first rank whose value differs from rank 0's.
        rank: usize,
    },
    /// Another rank of a synchronized operation rejected its own arguments (its error names
    /// them); this rank stopped before writing anything.
    SyncPeerFailed {
        /// The first rank that failed.
        rank: usize,
    },
    /// Every rank of a synchronized training forward has an empty slice: there are no values
    /// to take statistics of.
    EmptyBatch,
    /// The communicator failed (a rank left the group, or the ranks sent buffers of different
    /// lengths).
    Communication {
        /// What went wrong.
        reason: &'static str,
    },
}

impl fmt::Display for Error {
    #[cold]
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::ZeroDimension { dim } => {
                write!(f, "dimension {dim} is zero; it must be at least 1")
            }
            Error::ShapeOverflow { n, c, hw } => {
                write!(f, "shape N={n}, C={c}, HW={hw} overflows the address space")
            }
            Error::LengthMismatch {
                op,
                arg,
                expected,
                actual,
            } => {
                write!(f, "{op}: `{arg}` has length {actual}, expected {expected}")
            }
            Error::InvalidEpsilon { eps } => {
                write!(f, "eps must be finite and >= 0, got {eps}")
            }
            Error::InvalidMomentum { momentum } => {
                write!(f, "momentum must be in [0, 1], got {momentum}")
            }
            Error::ZeroBatchesTracked => {
                write!(
                    f,
                    "cumulative running average needs batches_tracked >= 1, got 0"
                )
            }
            Error::TooFewValues { per_channel } => write!(
                f,
                "the unbiased variance needs at least 2 values per channel, got {per_channel}; \
                 use the biased variance (`Variance::Biased`) or a batch with N·HW ≥ 2"
            ),
            Error::ChannelMismatch { expected, actual } => {
                write!(f, "statistics have {actual} channels, expected {expected}")
            }
            Error::BackendUnavailable { backend } => {
                write!(f, "backend `{backend}` is not supported by this CPU")
            }
            Error::UnknownBackend { name } => write!(
                f,
                "unknown backend `{name}`; expected one of `portable`, `avx2`, `avx512`"
            ),
            Error::UnsupportedRank { rank } => write!(
                f,
                "arrays of rank {rank} are not supported; expected 2 to 5 dimensions (N, C, spatial…)"
            ),
            Error::UnsupportedStrides { axis, stride } => write!(
                f,
                "axis {axis} has stride {stride}, which fits neither standard (NCHW) nor \
                 channels-last (NHWC) memory order; copy the array into one of them"
            ),
            Error::SyncMismatch { what, rank } => write!(
                f,
                "synchronized batch norm: rank {rank} disagrees with rank 0 on the {what}; \
                 every rank must call the same operation with the same configuration"
            ),
            Error::SyncPeerFailed { rank } => write!(
                f,
                "synchronized batch norm: rank {rank} rejected its arguments (see its error); \
                 nothing was written"
            ),
            Error::EmptyBatch => write!(
                f,
                "synchronized batch norm: every rank's slice is empty, there are no values"
            ),
            Error::Communication { reason } => write!(f, "communicator failed: {reason}"),
            Error::NoForward => write!(
                f,
                "layer backward needs a successful forward first (it differentiates that call; \
                 backward_sync differentiates forward_sync)"
            ),
        }
    }
}

impl std::error::Error for Error {}

/// Checks a slice length against the shape for argument `arg` of operation `op`; cold path out
/// of line.
#[inline]
pub(crate) fn check_len(
    op: &'static str,
    arg: &'static str,
    expected: usize,
    actual: usize,
) -> Result<(), Error> {
    if expected == actual {
        Ok(())
    } else {
        Err(length_mismatch(op, arg, expected, actual))
    }
}

#[cold]
#[inline(never)]
fn length_mismatch(op: &'static str, arg: &'static str, expected: usize, actual: usize) -> Error {
    Error::LengthMismatch {
        op,
        arg,
        expected,
        actual,
    }
}
