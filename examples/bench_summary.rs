//! Prints the Markdown summary of the latest `cargo bench --bench batchnorm` run from criterion's
//! results: GB/s, time relative to the in-run copy baseline, speed-up over the scalar baseline.
//!
//! `cargo run --release --example bench_summary` (latest run only) or `... -- --all` (every result
//! on disk); `... -- --svg FILE` also writes the plot of time / copy. Criterion's folder is `$CRITERION_HOME`, `$CARGO_TARGET_DIR/criterion` or
//! `target/criterion`.

#[path = "../benches/support/plot.rs"]
mod plot;
#[path = "../benches/support/summary.rs"]
mod summary;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let all = args.iter().any(|a| a == "--all");
    let home = summary::criterion_home();
    print!("{}", summary::report(&home, !all));
    // `--svg FILE`: the plot of time / copy (as the bench writes after a run) into FILE.
    if let Some(i) = args.iter().position(|a| a == "--svg") {
        let Some(path) = args.get(i + 1) else {
            eprintln!("--svg needs a file name");
            std::process::exit(2);
        };
        let caption = format!(
            "batchnorm, time / copy: {}, {} threads, best backend {}",
            plot::cpu_name(),
            std::thread::available_parallelism().map_or(1, |n| n.get()),
            batchnorm::Backend::detect().name()
        );
        match plot::svg(&summary::load(&home, !all), &caption) {
            Some(svg) => match std::fs::write(path, svg) {
                Ok(()) => println!("\nplot written to {path}"),
                Err(e) => eprintln!("cannot write {path}: {e}"),
            },
            None => eprintln!("no results to plot"),
        }
    }
}
