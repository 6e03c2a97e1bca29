//! Backward in training mode (saved statistics from the crate's own training forward, or given
//! ones) and with frozen statistics, out of place and in place (dx over dy), with overwritten or
//! accumulated dγ and dβ, against the f64 reference.
//!
//! Every property is checked by `batchnorm::check`, shared with `tests/fuzz_replay.rs`.
#![no_main]

use batchnorm_check::{self as check, Case, Op};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|case: Case| {
    if let Err(failure) = check::check(Op::Backward, &case) {
        panic!("{failure}");
    }
});
