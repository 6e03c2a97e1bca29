#![doc = include_str!("../README.md")]
#![warn(missing_docs)]

mod batchnorm;
mod channel;
mod driver;
mod element;
mod error;
pub mod fold;
mod kernels;
mod layer;
#[cfg(feature = "ndarray")]
pub mod nd;
mod par;
mod params;
mod scratch;
mod shape;
mod simd;
mod stats;
mod sync;

pub use batchnorm::{BatchNorm, DEFAULT_EPS};
pub use element::{Element, Param, bf16, f16};
pub use error::Error;
pub use layer::{BatchNormLayer, Preset};
pub use par::{Parallelism, Residency};
pub use params::{
    Affine, BackwardEpilogue, BackwardMode, Epilogue, GradMode, Momentum, ParamGrads, RunningStats,
    RunningUpdate, SavedStats, SavedStatsMut,
};
pub use shape::{Layout, Shape};
pub use simd::Backend;
pub use stats::{BatchStats, ChannelStats, Variance};
#[cfg(feature = "mpi")]
pub use sync::MpiComm;
pub use sync::{Communicator, SyncBatchNorm, ThreadComm};
