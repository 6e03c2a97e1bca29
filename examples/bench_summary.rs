//! Prints the Markdown summary of the latest `cargo bench --bench batchnorm` run from criterion's
//! results: GB/s, time relative to the in-run copy baseline, speed-up over the scalar baseline.
//!
//! `cargo run --release --example bench_summary` (latest run only) or `... -- --all` (every result
//! on disk). Criterion's folder is `$CRITERION_HOME`, `$CARGO_TARGET_DIR/criterion` or
//! `target/criterion`.

#[path = "../benches/support/summary.rs"]
mod summary;

fn main() {
    let all = std::env::args().skip(1).any(|a| a == "--all");
    print!("{}", summary::report(&summary::criterion_home(), !all));
}
