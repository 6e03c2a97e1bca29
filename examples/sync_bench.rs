//! The overhead of synchronized batch norm over the local op on the same per-rank slice:
//! training forward + backward, timed with fixed iteration counts (criterion's adaptive counts
//! would differ between ranks and deadlock the collectives), local and synchronized alternating,
//! each repeat's time that of the slowest rank, the median of the repeats; and the messages of
//! a synchronized step alone.
//!
//! ```text
//! cargo build --release --features mpi --example sync_bench
//! mpirun -np 2 target/release/examples/sync_bench [nchw|nhwc] [sequential] [repeats]
//! ```

use std::time::Instant;

use batchnorm::{
    Affine, BackwardMode, BatchNorm, Communicator, Error, GradMode, Layout, MpiComm, Parallelism,
    ParamGrads, RunningUpdate, SavedStats, SavedStatsMut, Shape, SyncBatchNorm,
};

/// Buffers of one rank: input, gradient, outputs, per-channel state.
struct Buffers {
    x: Vec<f32>,
    dy: Vec<f32>,
    y: Vec<f32>,
    dx: Vec<f32>,
    gamma: Vec<f32>,
    beta: Vec<f32>,
    mean: Vec<f32>,
    var: Vec<f32>,
    saved_mean: Vec<f32>,
    inv_std: Vec<f32>,
    dgamma: Vec<f32>,
    dbeta: Vec<f32>,
}

/// The op under test: the local one, or the synchronized one on this rank's slice.
enum Op<'a> {
    Local(&'a BatchNorm),
    Sync(&'a SyncBatchNorm, Shape, &'a dyn Communicator),
}

/// One training forward (PyTorch's running update) and its backward.
fn step(op: &Op<'_>, b: &mut Buffers) -> Result<(), Error> {
    let affine = Some(Affine {
        gamma: &b.gamma,
        beta: &b.beta,
    });
    let saved = SavedStatsMut {
        mean: &mut b.saved_mean,
        inv_std: &mut b.inv_std,
    };
    let update = RunningUpdate::pytorch(&mut b.mean, &mut b.var);
    let (x, y) = (&b.x[..], &mut b.y[..]);
    match op {
        Op::Local(bn) => {
            let kept = (Default::default(), None);
            bn.training_into(x, y, affine, Some(saved), Some(update), kept.0, kept.1)?
        }
        Op::Sync(bn, shape, comm) => {
            bn.training(x, y, Some(*shape), affine, Some(saved), Some(update), *comm)?
        }
    }
    let saved = SavedStats {
        mean: &b.saved_mean,
        inv_std: &b.inv_std,
    };
    let grads = Some(ParamGrads {
        dgamma: &mut b.dgamma,
        dbeta: &mut b.dbeta,
        mode: GradMode::Overwrite,
    });
    match op {
        Op::Local(bn) => {
            let mode = BackwardMode::Training(saved);
            bn.backward(x, &b.dy, &mut b.dx, affine, mode, grads)
        }
        Op::Sync(bn, shape, comm) => {
            let local = Some(*shape);
            bn.backward((x, &b.dy), &mut b.dx, local, affine, saved, grads, *comm)
        }
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> Result<(), Error> {
    let Some(universe) = mpi::initialize() else {
        eprintln!("MPI was already initialized");
        std::process::exit(1);
    };
    let comm = MpiComm::new(universe.world());
    let (rank, size) = (comm.rank(), comm.size());
    let args: Vec<String> = std::env::args().skip(1).collect();
    let layout = if args.iter().any(|a| a == "nhwc") {
        Layout::Nhwc
    } else {
        Layout::Nchw
    };
    let par = if args.iter().any(|a| a == "sequential") {
        Parallelism::Sequential
    } else {
        Parallelism::Rayon
    };
    let repeats: usize = args.iter().find_map(|a| a.parse().ok()).unwrap_or(21);

    let shape = Shape::with_spatial(8, 64, &[56, 56])?;
    let bn = BatchNorm::new(shape, layout)?.with_parallelism(par);
    let sync = SyncBatchNorm::new(64, layout)?
        .with_parallelism(par)
        .with_backend(bn.backend())?;
    let len = shape.len();
    let wave = |k: usize| (0..len).map(move |i| ((i * k) % 1013) as f32 / 1013.0 - 0.5);
    let c = shape.c();
    let mut b = Buffers {
        x: wave(7 + rank).map(|v| 3.0 + v).collect(),
        dy: wave(11).collect(),
        y: vec![0.0; len],
        dx: vec![0.0; len],
        gamma: vec![1.0; c],
        beta: vec![0.0; c],
        mean: vec![0.0; c],
        var: vec![1.0; c],
        saved_mean: vec![0.0; c],
        inv_std: vec![0.0; c],
        dgamma: vec![0.0; c],
        dbeta: vec![0.0; c],
    };
    let (local_op, sync_op) = (Op::Local(&bn), Op::Sync(&sync, shape, &comm));
    // Every timed step starts together: a gather of one value is a barrier.
    let barrier = || {
        let mut all = vec![0.0; size];
        comm.all_gather(&[0.0], &mut all)
    };
    for _ in 0..3 {
        step(&local_op, &mut b)?;
        step(&sync_op, &mut b)?;
    }
    // The messages of one synchronized step alone (the descriptor, the forward's 2·C and the
    // backward's 3·C values per rank), to separate communication from waiting for a slower rank.
    let exchange = || -> Result<(), Error> {
        for n in [11, 2 * c, 11, 3 * c] {
            let mut all = vec![0.0; n * size];
            comm.all_gather(&vec![1.0; n], &mut all)?;
        }
        Ok(())
    };
    // Alternating, in the order local, sync, sync, local, ... so neither always runs on the
    // caches the other left; the exchange alone after each pair.
    let (mut local, mut synced, mut messages) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..2 * repeats {
        barrier()?;
        let t = Instant::now();
        if (i + i / 2) % 2 == 0 {
            step(&local_op, &mut b)?;
            local.push(t.elapsed().as_secs_f64());
        } else {
            step(&sync_op, &mut b)?;
            synced.push(t.elapsed().as_secs_f64());
        }
        if i % 2 == 1 {
            barrier()?;
            let t = Instant::now();
            exchange()?;
            messages.push(t.elapsed().as_secs_f64());
        }
    }
    // A data-parallel step takes as long as its slowest rank: per repeat, the slowest rank's
    // time, then the median over the repeats.
    let group = |mine: &[f64]| -> Result<f64, Error> {
        let mut all = vec![0.0; mine.len() * size];
        comm.all_gather(mine, &mut all)?;
        let mut slowest: Vec<f64> = (0..mine.len())
            .map(|i| {
                (0..size)
                    .map(|r| all[r * mine.len() + i])
                    .fold(0.0, f64::max)
            })
            .collect();
        Ok(median(&mut slowest))
    };
    let (l, s, m) = (group(&local)?, group(&synced)?, group(&messages)?);
    if rank == 0 {
        println!(
            "np={size} {layout:?} 8x64x56x56 per rank, {par:?}, backend {}, median of {repeats} \
             (slowest rank per repeat): local training+backward {:.2} ms, synchronized {:.2} ms, \
             overhead {:+.1}%; the messages alone {:.1} us",
            bn.backend().name(),
            l * 1e3,
            s * 1e3,
            (s / l - 1.0) * 100.0,
            m * 1e6,
        );
    }
    Ok(())
}
