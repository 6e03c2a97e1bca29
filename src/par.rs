//! Explicit execution settings: threads (sequential, or rayon's current pool) and where the
//! tensors are taken to live (cache or memory). Work is always split the same way, whatever the
//! thread count or residency, so results are bit-identical.

use std::marker::PhantomData;

use rayon::prelude::*;

/// How an operation uses threads.
///
/// The split of work into blocks never depends on this choice or on the number of threads, so
/// results are bit-identical for every setting.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Parallelism {
    /// Run on the calling thread only (for engines that own their threads).
    Sequential,
    /// Run on the current rayon pool: the global pool, or the caller's pool when called inside
    /// `ThreadPool::install` or from one of its tasks. Called from a thread outside any pool, an
    /// operation of fewer than 256 Ki elements runs on the calling thread (handing work to the
    /// pool and waiting for it costs more than it saves there), a larger one moves to the pool
    /// once for all of its passes.
    #[default]
    Rayon,
}

/// Where an operation takes its tensors to live, which decides how it moves them: outputs that
/// would only pass through the caches on their way to memory are stored past them (their lines
/// are then not read from memory first, nor do they evict other data), and the NHWC reductions
/// (the statistics' first pass, the backward's sums) ask for rows ahead of their walk.
///
/// Results are bit-identical for every setting: only the kind and order of memory accesses change.
///
/// ```
/// use batchnorm::{BatchNorm, Layout, Residency, Shape};
/// // An engine whose next layer reads this output at once keeps it in cache.
/// let shape = Shape::new(32, 64, 3136)?;
/// let bn = BatchNorm::new(shape, Layout::Nchw)?.with_residency(Residency::Cache);
/// # Ok::<(), batchnorm::Error>(())
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Residency {
    /// Decided per call: in memory when the tensors a pass reads and writes exceed the last-level
    /// cache the CPU reports (its whole size: on a virtual machine that shares it with other
    /// guests, the part that stays ours can be smaller).
    #[default]
    Auto,
    /// In cache: outputs are stored through the caches and reductions walk without asking ahead,
    /// whatever the size (for an engine whose next layer reads the output at once).
    Cache,
    /// In memory: outputs written to a buffer of their own (not in place) are stored past the
    /// caches on the `avx512` and `avx2` backends (the `portable` backend stores plainly), and the
    /// NHWC reductions ask for rows ahead, whatever the size.
    Memory,
}

impl Parallelism {
    /// Calls `f(i)` for every `i in 0..n` (units of about `unit_elems` elements each), each
    /// parallel task taking enough units for [`GRAIN`] elements.
    pub(crate) fn for_each(self, n: usize, unit_elems: usize, f: impl Fn(usize) + Send + Sync) {
        let min_len = tasks_of(unit_elems);
        match self {
            Parallelism::Rayon if n >= 2 * min_len && rayon::current_num_threads() > 1 => {
                (0..n).into_par_iter().with_min_len(min_len).for_each(f)
            }
            _ => (0..n).for_each(f),
        }
    }

    /// `out[i] = f(i)` for every index of `out` (units and tasks as in
    /// [`Parallelism::for_each`]), in place, so the results need no allocation.
    pub(crate) fn fill<T: Send>(
        self,
        out: &mut [T],
        unit_elems: usize,
        f: impl Fn(usize) -> T + Send + Sync,
    ) {
        self.for_chunks(out, 1, unit_elems, |i, o| o[0] = f(i));
    }

    /// Calls `f(i, chunk)` for the `i`-th chunk of `chunk` elements of `out` (the last may be
    /// shorter), each chunk a unit of about `unit_elems` elements of work.
    pub(crate) fn for_chunks<T: Send>(
        self,
        out: &mut [T],
        chunk: usize,
        unit_elems: usize,
        f: impl Fn(usize, &mut [T]) + Send + Sync,
    ) {
        let chunk = chunk.max(1);
        let (n, min_len) = (out.len().div_ceil(chunk), tasks_of(unit_elems));
        match self {
            Parallelism::Rayon if n >= 2 * min_len && rayon::current_num_threads() > 1 => out
                .par_chunks_mut(chunk)
                .enumerate()
                .with_min_len(min_len)
                .for_each(|(i, c)| f(i, c)),
            _ => out.chunks_mut(chunk).enumerate().for_each(|(i, c)| f(i, c)),
        }
    }

    /// Runs one operation over `elems` elements, `op` getting the parallelism its passes should
    /// use. Each parallel pass started from a thread outside the rayon pool hands its work to the
    /// pool and waits for it: a wake-up round trip, measured at 10–20 µs on a 2-vCPU VM (AMD EPYC
    /// family 26), where passes started from a worker cost about 1 µs. So from outside the pool an
    /// operation of at least [`OUTSIDE_POOL`] elements moves to a worker once (`rayon::scope`)
    /// and runs all its passes there; a smaller one runs sequentially on the caller's thread.
    /// Measured (1x64x112x112 NCHW f32 training, one call from the main thread, two workers):
    /// 110 µs sequential, 80 µs with a hand-off per pass, 57 µs from a worker. Results do not
    /// depend on the choice (the split of the work is fixed).
    pub(crate) fn run_op<R: Send>(
        self,
        elems: usize,
        op: impl FnOnce(Parallelism) -> R + Send,
    ) -> R {
        match self {
            Parallelism::Rayon if rayon::current_thread_index().is_none() => {
                if elems >= OUTSIDE_POOL && rayon::current_num_threads() > 1 {
                    rayon::scope(|_| op(Parallelism::Rayon))
                } else {
                    op(Parallelism::Sequential)
                }
            }
            _ => op(self),
        }
    }
}

/// Fewest elements of an operation called from outside the rayon pool for it to run there (see
/// [`Parallelism::run_op`]): enough work to pay one hand-off. Measured: f32 inference of 200 Ki
/// elements takes 15 µs on one thread and 6 µs on two workers, about the cost of the hand-off.
pub(crate) const OUTSIDE_POOL: usize = 8 * GRAIN;

/// Fewest elements per parallel task (PyTorch's `GRAIN_SIZE` is the same 32 Ki). Handing a task to
/// another thread costs a few microseconds; measured (2-vCPU AMD EPYC Zen 4 VM, rayon `join` of
/// two halves of an in-cache streaming loop): no gain at 2 × 16 Ki elements, 1.4–1.5× at
/// 2 × 128 Ki, 1.7–1.9× at 2 × 2 Mi. Tensors below two grains run on the calling thread.
pub(crate) const GRAIN: usize = 32 * 1024;

/// Units of `unit_elems` elements per task so that a task holds at least [`GRAIN`] elements.
fn tasks_of(unit_elems: usize) -> usize {
    GRAIN.div_ceil(unit_elems.max(1))
}

/// A mutable slice shared by parallel tasks that each write a disjoint part of it.
pub(crate) struct SharedMut<'a, T = f32> {
    ptr: *mut T,
    len: usize,
    _borrow: PhantomData<&'a mut [T]>,
}

// SAFETY: `SharedMut` only hands out sub-slices through the unsafe `slice`, whose callers
// guarantee that concurrently used ranges are disjoint; `T` is Send + Sync.
unsafe impl<T: Send + Sync> Send for SharedMut<'_, T> {}
// SAFETY: as above.
unsafe impl<T: Send + Sync> Sync for SharedMut<'_, T> {}

impl<'a, T> SharedMut<'a, T> {
    pub(crate) fn new(s: &'a mut [T]) -> Self {
        SharedMut {
            ptr: s.as_mut_ptr(),
            len: s.len(),
            _borrow: PhantomData,
        }
    }

    /// The buffer's first element's address and its length (for alignment decisions; never
    /// dereferenced through this).
    pub(crate) fn span(&self) -> (*const T, usize) {
        (self.ptr, self.len)
    }

    /// The sub-slice `start..start + len` (clamped to the buffer, so never out of bounds).
    ///
    /// # Safety
    /// While the returned slice lives, no other slice returned by this method may overlap it.
    #[allow(clippy::mut_from_ref)]
    pub(crate) unsafe fn slice(&self, start: usize, len: usize) -> &'a mut [T] {
        let start = start.min(self.len);
        let len = len.min(self.len - start);
        // SAFETY: `start..start + len` lies inside the original `&'a mut [f32]` (clamped above);
        // the caller guarantees no overlapping slice is alive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(start), len) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operations_from_outside_the_pool_move_to_it_once_or_run_here() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        let here = || std::thread::current().id();
        // Inside a pool (the caller is a worker): the operation runs here, as asked.
        pool.install(|| {
            let caller = here();
            let (par, thread) = Parallelism::Rayon.run_op(10, |p| (p, here()));
            assert_eq!((par, thread), (Parallelism::Rayon, caller));
        });
        // From outside (this test's thread): small operations run here, sequentially; large ones
        // on a worker of the global pool, with rayon (when the pool has two threads or more).
        assert!(rayon::current_thread_index().is_none());
        let (par, thread) = Parallelism::Rayon.run_op(OUTSIDE_POOL - 1, |p| (p, here()));
        assert_eq!((par, thread), (Parallelism::Sequential, here()));
        let (par, worker) =
            Parallelism::Rayon.run_op(OUTSIDE_POOL, |p| (p, rayon::current_thread_index()));
        if rayon::current_num_threads() > 1 {
            assert_eq!(par, Parallelism::Rayon);
            assert!(worker.is_some(), "ran on the caller's thread");
        } else {
            assert_eq!((par, worker), (Parallelism::Sequential, None));
        }
        // Sequential stays sequential, here.
        let (par, thread) = Parallelism::Sequential.run_op(usize::MAX, |p| (p, here()));
        assert_eq!((par, thread), (Parallelism::Sequential, here()));
    }
}
