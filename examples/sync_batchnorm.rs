//! Synchronized batch norm across MPI processes: each rank trains a `BatchNormLayer` on its own
//! slice of every batch (uneven slices, and an empty one on the last rank at step 3), and checks
//! that its forward outputs, running statistics and gradients match one process training on the
//! concatenated batches.
//!
//! ```text
//! cargo build --release --features mpi --example sync_batchnorm
//! mpirun -np 2 target/release/examples/sync_batchnorm     # as root: --allow-run-as-root
//! ```

use batchnorm::{BatchNormLayer, Communicator, Error, Layout, MpiComm, Shape};
use mpi::traits::Communicator as _;

const CHANNELS: usize = 16;
const HW: usize = 8 * 8;
const STEPS: usize = 4;
const LEARNING_RATE: f32 = 0.05;
/// What "match" means here: every difference within this fraction of the largest magnitude of
/// the quantity (or of 1). f32 results of different reduction orders differ by a few units of
/// f32 roundoff (6e-8) times the reduction's length; the tests check the stated bound exactly.
const MATCH: f64 = 1e-5;

/// Samples of rank `r` of `size` at `step`: uneven, and none on the last rank at step 3.
fn samples(r: usize, size: usize, step: usize) -> usize {
    if step == 2 && r + 1 == size && size > 1 {
        0
    } else {
        2 + (r + step) % 3
    }
}

/// The same pseudo-random values on every rank (SplitMix64 mapped to [-1, 1), scaled).
fn data(seed: u64, len: usize, offset: f32, scale: f32) -> Vec<f32> {
    let mut s = seed;
    (0..len)
        .map(|_| {
            s = s.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = s;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            let u = ((z ^ (z >> 31)) >> 40) as f32 / (1u64 << 24) as f32;
            offset + scale * (2.0 * u - 1.0)
        })
        .collect()
}

/// Largest difference relative to the larger of 1 and the largest magnitude of `want`.
fn rel_diff(got: &[f32], want: &[f32]) -> f64 {
    let scale = want.iter().fold(1.0f64, |m, &w| m.max((w as f64).abs()));
    let diff = got
        .iter()
        .zip(want)
        .fold(0.0f64, |m, (&g, &w)| m.max((g as f64 - w as f64).abs()));
    diff / scale
}

/// One SGD step on γ and β, then the gradients cleared.
fn sgd(layer: &mut BatchNormLayer) {
    let (dg, db) = (layer.dgamma().to_vec(), layer.dbeta().to_vec());
    for (g, d) in layer.gamma_mut().iter_mut().zip(&dg) {
        *g -= LEARNING_RATE * d;
    }
    for (b, d) in layer.beta_mut().iter_mut().zip(&db) {
        *b -= LEARNING_RATE * d;
    }
    layer.zero_grad();
}

fn main() -> Result<(), Error> {
    let Some(universe) = mpi::initialize() else {
        eprintln!("MPI was already initialized");
        std::process::exit(1);
    };
    let comm = MpiComm::new(universe.world());
    let (rank, size) = (comm.rank(), comm.size());
    let per_sample = CHANNELS * HW;

    let mut synced = BatchNormLayer::pytorch(CHANNELS, Layout::Nchw)?;
    let mut single = BatchNormLayer::pytorch(CHANNELS, Layout::Nchw)?;
    let mut worst = [0.0f64; 5];
    for step in 0..STEPS {
        // The whole batch (every rank builds it from the same seed) and this rank's slice.
        let counts: Vec<usize> = (0..size).map(|r| samples(r, size, step)).collect();
        let total: usize = counts.iter().sum();
        let first: usize = counts[..rank].iter().sum();
        let x = data(step as u64, total * per_sample, 3.0, 2.0);
        let dy = data(1000 + step as u64, total * per_sample, 0.0, 1.0);
        let range = first * per_sample..(first + counts[rank]) * per_sample;

        // One process on the concatenated batch.
        let whole = Shape::with_spatial(total, CHANNELS, &[8, 8])?;
        let (mut y1, mut dx1) = (vec![0.0; x.len()], vec![0.0; x.len()]);
        single.forward(&x, &mut y1, whole)?;
        single.backward(&x, &dy, &mut dx1)?;

        // This rank on its slice (`None`: no samples this step).
        let local = Shape::with_spatial(counts[rank], CHANNELS, &[8, 8]).ok();
        let (xs, dys) = (&x[range.clone()], &dy[range.clone()]);
        let (mut y, mut dx) = (vec![0.0; xs.len()], vec![0.0; xs.len()]);
        synced.forward_sync(xs, &mut y, local, &comm)?;
        synced.backward_sync(xs, dys, &mut dx, &comm)?;

        let diffs = [
            rel_diff(&y, &y1[range.clone()]),
            rel_diff(&dx, &dx1[range]),
            rel_diff(synced.running_mean(), single.running_mean())
                .max(rel_diff(synced.running_var(), single.running_var())),
            rel_diff(synced.dgamma(), single.dgamma()),
            rel_diff(synced.dbeta(), single.dbeta()),
        ];
        for (w, d) in worst.iter_mut().zip(diffs) {
            *w = w.max(d);
        }
        println!(
            "rank {rank}/{size} step {step}: {} of {total} samples; differences from one process: \
             y {:.1e}, dx {:.1e}, running stats {:.1e}, dgamma {:.1e}, dbeta {:.1e}",
            counts[rank], diffs[0], diffs[1], diffs[2], diffs[3], diffs[4]
        );
        sgd(&mut synced);
        sgd(&mut single);
    }
    let ok = worst.iter().all(|&w| w <= MATCH);
    println!(
        "rank {rank}/{size}: forward outputs, running statistics and gradients {} one process on \
         the concatenated batches (worst difference {:.1e}, threshold {MATCH:.0e})",
        if ok { "match" } else { "DO NOT match" },
        worst.iter().fold(0.0f64, |a, &b| a.max(b))
    );
    if !ok {
        comm.inner().abort(1);
    }
    Ok(())
}
