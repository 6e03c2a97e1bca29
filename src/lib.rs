//! SIMD-optimized batch normalization on the CPU, for `f32` tensors in NCHW and NHWC layouts.
//!
//! - **Inference forward** with running statistics: one subtract and one fused multiply-add per
//!   element ([`BatchNorm::inference`], [`BatchNorm::inference_in_place`]).
//! - **Training forward**: batch statistics, fused normalize + affine, saved mean / inverse std,
//!   running-statistics update in PyTorch's, ONNX's or Keras's convention ([`BatchNorm::training`]).
//! - **Backward** for batch or frozen statistics ([`BatchNorm::backward`]).
//! - **Statistics** as a mergeable result ([`BatchStats`], [`ChannelStats::merge`]).
//!
//! Inputs are flat slices plus a [`Shape`] and a [`Layout`]. Statistics are a vectorized
//! two-pass per cache block (an f64 first moment, then f32 squared deviations) merged in f64, so data with a large mean relative to
//! its spread keeps its digits (see the crate README). Work is split into fixed blocks, run on
//! rayon or sequentially ([`Parallelism`]), with results bit-identical for any thread count.
//! Kernels are compiled for several instruction sets and picked at run time ([`Backend`]).
//!
//! ```
//! use batchnorm::{Affine, BatchNorm, Layout, RunningUpdate, SavedStatsMut, Shape};
//! let shape = Shape::with_spatial(8, 16, &[5, 5])?;
//! let bn = BatchNorm::new(shape, Layout::Nhwc);
//! let x: Vec<f32> = (0..shape.len()).map(|i| (i % 7) as f32).collect();
//! let mut y = vec![0.0; shape.len()];
//! let (gamma, beta) = (vec![1.0; 16], vec![0.0; 16]);
//! let (mut mean, mut inv_std) = (vec![0.0; 16], vec![0.0; 16]);
//! let (mut running_mean, mut running_var) = (vec![0.0; 16], vec![1.0; 16]);
//! let stats = bn.training(
//!     &x,
//!     &mut y,
//!     Some(Affine { gamma: &gamma, beta: &beta }),
//!     SavedStatsMut { mean: &mut mean, inv_std: &mut inv_std },
//!     Some(RunningUpdate::pytorch(&mut running_mean, &mut running_var)),
//! )?;
//! assert_eq!(stats.channels()[0].count(), 8 * 25);
//! # Ok::<(), batchnorm::Error>(())
//! ```

#![warn(missing_docs)]

mod batchnorm;
mod driver;
mod error;
mod kernels;
mod par;
mod params;
mod shape;
mod simd;
mod stats;

pub use batchnorm::{BatchNorm, DEFAULT_EPS};
pub use error::Error;
pub use par::Parallelism;
pub use params::{
    Affine, BackwardMode, GradMode, Momentum, ParamGrads, RunningStats, RunningUpdate, SavedStats,
    SavedStatsMut,
};
pub use shape::{Layout, Shape};
pub use simd::Backend;
pub use stats::{BatchStats, ChannelStats, Variance};

/// The README's examples, compiled and run as doctests.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
