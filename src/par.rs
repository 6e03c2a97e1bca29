//! Explicit parallelism: sequential, or rayon's current pool. Work is always split the same way,
//! whatever the thread count, so results are bit-identical.

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
    /// `ThreadPool::install` or from one of its tasks.
    #[default]
    Rayon,
}

impl Parallelism {
    /// Calls `f(i)` for every `i in 0..n` (units of about `unit_elems` elements each), each
    /// parallel task taking enough units for [`GRAIN`] elements.
    pub(crate) fn for_each(self, n: usize, unit_elems: usize, f: impl Fn(usize) + Send + Sync) {
        let min_len = tasks_of(unit_elems);
        match self {
            Parallelism::Rayon if n > min_len && rayon::current_num_threads() > 1 => {
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
            Parallelism::Rayon if n > min_len && rayon::current_num_threads() > 1 => out
                .par_chunks_mut(chunk)
                .enumerate()
                .with_min_len(min_len)
                .for_each(|(i, c)| f(i, c)),
            _ => out.chunks_mut(chunk).enumerate().for_each(|(i, c)| f(i, c)),
        }
    }
}

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
