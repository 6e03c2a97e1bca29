//! Testing support for fuzzers and tests: a structured test case ([`Case`]) and a differential
//! checker ([`check`]) that runs one public operation on it and compares everything it returns and
//! writes against the f64 [`reference`](mod@reference).
//!
//! This crate is not part of the numerical API (`batchnorm` is). It is shared, so that the fuzz
//! targets in `fuzz/` and the test suite (`tests/fuzz_replay.rs`) check exactly the same
//! properties:
//!
//! - **Errors, not panics.** Invalid arguments (zero or overflowing dimensions, wrong slice
//!   lengths, invalid ε, momentum or `batches_tracked`, too few values for the unbiased variance)
//!   return one of the expected [`Error`](batchnorm::Error)s, and every output buffer is left untouched.
//! - **Accuracy.** For channels whose inputs are finite, every output is within the crate's stated
//!   tolerance ([`fwd_tol`], [`stats_tol`]) of the f64 reference: statistics, `y`, the saved mean
//!   and inverse std, the running statistics, `dx`, `dγ` and `dβ`. Elements whose reference values
//!   (or the intermediates of the documented formulas) are not finite or not representable in f32
//!   are skipped and counted ([`Report`]).
//! - **Containment.** NaN or ±Inf in one channel's inputs never changes another channel's outputs:
//!   the operation is rerun with the non-finite channels replaced by ordinary values, and every
//!   other channel's outputs must be bit-identical.
//! - **Every element written.** Outputs are pre-filled with a signaling NaN ([`SENTINEL_BITS`];
//!   [`SENTINEL64_BITS`] for f64 outputs, and the half types' own) that no arithmetic produces (an operation on a NaN returns a quiet one), and must not contain it
//!   afterwards. In-place variants must equal the out-of-place ones bit for bit.
//! - **Determinism.** Sequential and rayon execution give bit-identical results, and so do outputs
//!   stored past the caches (`Residency::Memory`) and through them.
//! - **Storage type.** For f16 and bf16 cases ([`Storage`]) the checks run on f32 tensors holding
//!   the up-converted data, then on the half tensors, whose outputs must be the f32 op's rounded
//!   once to the type (bit for bit) and whose parameter and statistics outputs must be the f32
//!   op's. f64 cases run the f32 pass on the same values, then every call on f64 tensors with
//!   f64 parameters, against the precise (double-double) reference ([`precise`]) within
//!   [`f64_tol`] of the terms plus the batch mean's share, with the same structural checks.
//!   Outputs of every storage type are widened to f64 (exactly) for the checks.
//!
//! A [`Case`] is decoded from raw bytes by a small byte-level codec: one byte per field, lengths
//! explicit, missing bytes read as zero, so every byte string is a case and short inputs are simple
//! cases. `Case` implements `arbitrary::Arbitrary` by reading the same bytes through
//! `arbitrary::Unstructured` (that is what `fuzz_target!(|case: Case| ..)` does);
//! [`Case::from_bytes`] decodes identically and [`Case::to_bytes`] is its
//! inverse, used to write the seed inputs of `fuzz/corpus/` (see `tests/fuzz_replay.rs`).
//!
//! Modules: [`tolerance`] (the stated bounds), [`case`] (the case and its codec), [`data`] (the
//! random generator and the data kinds), [`report`] (failures and measured errors), [`ops`] (the
//! checker, one submodule per operation), [`reference`](mod@reference) (the plain f64
//! implementations) and [`precise`] (double-double arithmetic: the reference of f64 data).

pub mod case;
pub mod data;
pub mod ops;
pub mod precise;
pub mod reference;
pub mod report;
mod storage;
pub mod tolerance;

pub use case::*;
pub use data::Rng;
pub use ops::{Op, check, check_with, describe};
pub use report::Report;
pub use storage::{BF16_SENTINEL_BITS, F16_SENTINEL_BITS};
pub use tolerance::*;

/// The `arbitrary` crate that [`Case`] implements `Arbitrary` for (fuzz targets and replays use it).
pub use arbitrary;
