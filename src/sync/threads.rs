//! The in-process communicator: ranks are threads of one process sharing a group.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use super::Communicator;
use crate::Error;

/// One rank of a group of threads exchanging buffers in memory: the [`Communicator`] for tests
/// without MPI and for accumulating micro-batches on one machine (each micro-batch a rank on its
/// own thread).
///
/// [`ThreadComm::group`] makes the handles of a group, one per rank; move each to its own thread.
/// A collective returns when every rank has called it. If a handle is dropped (its thread ended
/// or panicked) while others wait in a collective, they get [`Error::Communication`] instead of
/// waiting forever.
///
/// ```
/// use batchnorm::{Communicator, ThreadComm};
/// let sums: Vec<Vec<f64>> = std::thread::scope(|s| {
///     let handles: Vec<_> = ThreadComm::group(3)
///         .into_iter()
///         .map(|comm| {
///             s.spawn(move || {
///                 let mut buf = vec![comm.rank() as f64, 1.0];
///                 comm.all_reduce_sum(&mut buf).unwrap();
///                 buf
///             })
///         })
///         .collect();
///     handles.into_iter().map(|h| h.join().unwrap()).collect()
/// });
/// assert!(sums.iter().all(|b| b == &[3.0, 3.0]));
/// ```
#[derive(Debug)]
pub struct ThreadComm {
    rank: usize,
    group: Arc<Group>,
}

#[derive(Debug)]
struct Group {
    size: usize,
    state: Mutex<State>,
    changed: Condvar,
}

/// The exchange in progress: ranks deposit their buffers (`Filling`), and once all have, each
/// copies out every buffer (`Draining`); the last to copy opens the next round.
#[derive(Debug)]
struct State {
    slots: Vec<Vec<f64>>,
    deposited: usize,
    copied: usize,
    draining: bool,
    /// A handle was dropped: a round that still needs it can never complete.
    left: bool,
}

impl ThreadComm {
    /// The handles of a new group of `size` ranks, rank r at index r (`size` 0 is taken as 1).
    /// Run each rank on its own thread (`std::thread`, not a rayon task: a rank blocks in a
    /// collective until every rank has joined it).
    pub fn group(size: usize) -> Vec<ThreadComm> {
        let size = size.max(1);
        let group = Arc::new(Group {
            size,
            state: Mutex::new(State {
                slots: vec![Vec::new(); size],
                deposited: 0,
                copied: 0,
                draining: false,
                left: false,
            }),
            changed: Condvar::new(),
        });
        (0..size)
            .map(|rank| ThreadComm {
                rank,
                group: Arc::clone(&group),
            })
            .collect()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // No code holding the lock panics; a poisoned lock still holds a consistent state.
        self.group.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn wait<'a>(&self, guard: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
        self.group
            .changed
            .wait(guard)
            .unwrap_or_else(|e| e.into_inner())
    }
}

const LEFT: Error = Error::Communication {
    reason: "a rank of the thread group was dropped during a collective",
};

impl Communicator for ThreadComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.group.size
    }

    fn all_gather(&self, send: &[f64], recv: &mut [f64]) -> Result<(), Error> {
        let size = self.group.size;
        let mut state = self.lock();
        // Wait for the previous round to be copied out by everyone.
        while state.draining {
            if state.left {
                return Err(LEFT);
            }
            state = self.wait(state);
        }
        let slot = &mut state.slots[self.rank];
        slot.clear();
        slot.extend_from_slice(send);
        state.deposited += 1;
        if state.deposited == size {
            state.draining = true;
            self.group.changed.notify_all();
        }
        while !state.draining {
            if state.left {
                // Withdraw, so the round stays consistent for no one.
                state.deposited -= 1;
                return Err(LEFT);
            }
            state = self.wait(state);
        }
        // Every rank sees the same slots, so every rank takes the same branch here.
        let len = send.len();
        let result = if recv.len() != len * size {
            Err(Error::Communication {
                reason: "all_gather: recv must hold size·send.len() values",
            })
        } else if state.slots.iter().any(|s| s.len() != len) {
            Err(Error::Communication {
                reason: "all_gather: the ranks sent buffers of different lengths",
            })
        } else {
            for (out, slot) in recv.chunks_exact_mut(len.max(1)).zip(&state.slots) {
                out.copy_from_slice(slot);
            }
            Ok(())
        };
        state.copied += 1;
        if state.copied == size {
            state.deposited = 0;
            state.copied = 0;
            state.draining = false;
            self.group.changed.notify_all();
        }
        result
    }
}

impl Drop for ThreadComm {
    fn drop(&mut self) {
        let mut state = self.lock();
        state.left = true;
        self.group.changed.notify_all();
    }
}
