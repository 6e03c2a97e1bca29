//! Prints the SIMD backends this CPU can run, best first, one per line (used by `.ci/run`).

fn main() {
    for b in batchnorm::Backend::available() {
        println!("{}", b.name());
    }
}
