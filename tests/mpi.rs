//! Synchronized batch norm across MPI processes (feature `mpi`): run under
//! `mpirun -np K target/.../mpi-<hash>` for any K (CI runs K = 2 and 3; run directly it is one
//! rank). Every rank runs the same cases in the same order: its slice of the batch against the f64
//! reference on the concatenated batch and against the single-process op, per-channel results
//! bit-identical on every rank (tests/common/sync_case.rs, shared with the threads test), uneven
//! and empty slices, both layouts, every convention; f64, f16 and bf16 data (half data bit for bit
//! the f32 path rounded once, f64 data within the f64 tolerance of the single-process op); then
//! the errors every rank gets when the ranks disagree.
//!
//! No test harness: a failed check panics, and the panic aborts the whole MPI job
//! (`MPI_Abort`), so no rank waits forever in a collective for a rank that failed.

mod common;
#[path = "common/sync_case.rs"]
mod sync_case;

use std::panic::{AssertUnwindSafe, catch_unwind};

use batchnorm::{
    Communicator, Error, Layout, MpiComm, Parallelism, Shape, SyncBatchNorm, bf16, f16,
};
use common::Rng;
use mpi::traits::Communicator as _;
use sync_case::{CONVENTIONS, Case};

/// Slices for `k` ranks: growing, empty on the last rank, empty on the first rank.
fn slice_patterns(k: usize) -> Vec<Vec<usize>> {
    let growing = (0..k).map(|r| r + 1).collect();
    let empty_last = (0..k)
        .map(|r| if r + 1 == k && k > 1 { 0 } else { 2 + r })
        .collect();
    let empty_first = (0..k)
        .map(|r| if r == 0 && k > 1 { 0 } else { 1 })
        .collect();
    vec![growing, empty_last, empty_first]
}

fn run<C: Communicator>(comm: &C) -> usize {
    let (rank, k) = (comm.rank(), comm.size());
    // Every rank draws the same data from the same seed.
    let mut rng = Rng::new(0x5eed);
    let mut cases = 0;
    let shapes = [(1, 1), (3, 7), (17, 65), (67, 9), (2, 16411), (300, 3)];
    for layout in [Layout::Nchw, Layout::Nhwc] {
        for shape in shapes {
            for slices in slice_patterns(k) {
                let mut case = Case::<f32>::new(&mut rng, layout, shape, &slices)
                    .with_conv(CONVENTIONS[cases % CONVENTIONS.len()]);
                case.par = [Parallelism::Rayon, Parallelism::Sequential][(cases / 4) % 2];
                case.check(comm);
                cases += 1;
            }
        }
    }
    // The other storage types.
    for layout in [Layout::Nchw, Layout::Nhwc] {
        for shape in [(3, 7), (17, 65), (2, 16411)] {
            for slices in slice_patterns(k) {
                let conv = CONVENTIONS[cases % CONVENTIONS.len()];
                Case::<f64>::new(&mut rng, layout, shape, &slices)
                    .with_conv(conv)
                    .check_f64(comm);
                Case::<f16>::new(&mut rng, layout, shape, &slices)
                    .with_conv(conv)
                    .check_half(comm);
                Case::<bf16>::new(&mut rng, layout, shape, &slices)
                    .with_conv(conv)
                    .check_half(comm);
                cases += 3;
            }
        }
    }

    // Disagreements: an error on every rank, not a hang.
    if k > 1 {
        let c = if rank == k - 1 { 4 } else { 3 };
        let bn = SyncBatchNorm::new(c, Layout::Nchw).unwrap();
        let shape = Shape::new(1, c, 2).ok();
        let x = vec![1.0f32; 2 * c];
        let mut y = vec![f32::NAN; 2 * c];
        let r = bn.training(&x, &mut y, shape, None, None, None, comm);
        let want = Error::SyncMismatch {
            what: "channels",
            rank: k - 1,
        };
        assert_eq!(r, Err(want), "rank {rank}");
        assert!(y.iter().all(|v| v.is_nan()), "rank {rank}: y written");

        // Rank 0's y is too short: its own error there, the peer's failure elsewhere.
        let bn = SyncBatchNorm::new(3, Layout::Nhwc).unwrap();
        let mut y = vec![f32::NAN; if rank == 0 { 5 } else { 6 }];
        let r = bn.training(
            &[1.0; 6],
            &mut y,
            Shape::new(1, 3, 2).ok(),
            None,
            None,
            None,
            comm,
        );
        match rank {
            0 => assert!(matches!(r, Err(Error::LengthMismatch { arg: "y", .. }))),
            _ => assert_eq!(r, Err(Error::SyncPeerFailed { rank: 0 })),
        }
    }
    // Every slice empty.
    let bn = SyncBatchNorm::new(2, Layout::Nchw).unwrap();
    let r = bn.training::<f32, _>(&[], &mut [], None, None, None, None, comm);
    assert_eq!(r, Err(Error::EmptyBatch));
    cases
}

fn main() {
    let Some(universe) = mpi::initialize() else {
        eprintln!("MPI was already initialized");
        std::process::exit(1);
    };
    let comm = MpiComm::new(universe.world());
    let (rank, size) = (comm.rank(), comm.size());
    match catch_unwind(AssertUnwindSafe(|| run(&comm))) {
        Ok(cases) => {
            println!("mpi test rank {rank} of {size}: {cases} cases and the error checks passed")
        }
        Err(_) => {
            eprintln!("mpi test rank {rank} of {size}: a check failed; aborting the job");
            comm.inner().abort(1);
        }
    }
}
