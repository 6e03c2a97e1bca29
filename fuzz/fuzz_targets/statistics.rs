//! Statistics of a batch, and of the batch split in two along N and merged, against the exact f64
//! statistics (plus merge errors: channel mismatch, empty statistics).
//!
//! Every property is checked by `batchnorm::check`, shared with `tests/fuzz_replay.rs`.
#![no_main]

use batchnorm_check::{self as check, Case, Op};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|case: Case| {
    if let Err(failure) = check::check(Op::Statistics, &case) {
        panic!("{failure}");
    }
});
