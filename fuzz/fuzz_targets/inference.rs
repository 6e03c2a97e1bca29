//! Inference forward, out of place and in place, against the f64 reference.
//!
//! Every property is checked by `batchnorm::check`, shared with `tests/fuzz_replay.rs`.
#![no_main]

use batchnorm_check::{self as check, Case, Op};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|case: Case| {
    if let Err(failure) = check::check(Op::Inference, &case) {
        panic!("{failure}");
    }
});
