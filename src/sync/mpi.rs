//! The MPI communicator (feature `mpi`): ranks are the processes of an MPI communicator, through
//! the `mpi` crate (rsmpi).

use mpi::traits::CommunicatorCollectives;

use super::Communicator;
use crate::Error;

/// A [`Communicator`] over an MPI communicator (for example `universe.world()`), for
/// [`crate::SyncBatchNorm`] across processes and machines.
///
/// The all-gather is `MPI_Allgather` of `MPI_DOUBLE`; the all-reduce is the trait's provided
/// one (gather, then a sum in rank order), not `MPI_Allreduce`, whose reduction order MPI leaves
/// to the implementation: so the sums are bit-identical on every rank. MPI's default error
/// handler aborts the job on a communication failure.
///
/// ```no_run
/// use batchnorm::{Communicator, MpiComm};
/// let universe = mpi::initialize().expect("MPI initialized once");
/// let comm = MpiComm::new(universe.world());
/// let mut buf = [comm.rank() as f64];
/// comm.all_reduce_sum(&mut buf)?;
/// # Ok::<(), batchnorm::Error>(())
/// ```
#[derive(Debug)]
pub struct MpiComm<M> {
    comm: M,
}

impl<M: mpi::traits::Communicator> MpiComm<M> {
    /// Wraps an MPI communicator.
    pub fn new(comm: M) -> MpiComm<M> {
        MpiComm { comm }
    }

    /// The MPI communicator.
    pub fn inner(&self) -> &M {
        &self.comm
    }
}

impl<M: mpi::traits::Communicator> Communicator for MpiComm<M> {
    fn rank(&self) -> usize {
        // MPI ranks are in 0..size, never negative.
        usize::try_from(self.comm.rank()).unwrap_or(0)
    }

    fn size(&self) -> usize {
        usize::try_from(self.comm.size()).unwrap_or(1)
    }

    fn all_gather(&self, send: &[f64], recv: &mut [f64]) -> Result<(), Error> {
        if recv.len() != send.len() * self.size() {
            return Err(Error::Communication {
                reason: "all_gather: recv must hold size·send.len() values",
            });
        }
        self.comm.all_gather_into(send, recv);
        Ok(())
    }
}
