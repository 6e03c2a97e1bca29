//! Per-thread scratch memory, so that repeated calls allocate nothing after the first.
//!
//! An operation needs a few short-lived buffers per call: per-channel parameters, partial
//! reductions per block, the periodic lane tables of the NHWC kernels. Each is taken from a pool
//! owned by the thread that asks (the caller's thread, or the rayon worker running a task) and goes
//! back to it when the buffer is dropped. The pool keeps one block per buffer that was alive at the
//! same time, each as large as the largest request it served, so a call with the same shape as an
//! earlier one on the same thread finds every block it needs. Memory is returned to the system when
//! the thread ends.

use std::cell::RefCell;
use std::marker::PhantomData;
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, AtomicU64};

use aligned_vec::{AVec, ConstAlign};

/// Alignment of every block: a cache line, and the widest vector, so no vector load from a
/// scratch buffer splits a line.
const ALIGN: usize = 64;

/// Types a scratch buffer may hold: the all-zero bit pattern is a valid value, there is no drop
/// glue, and the alignment is at most [`ALIGN`].
///
/// # Safety
/// Implement only for types meeting all three conditions.
pub unsafe trait Zeroable: Sized + Send + Sync {}

// SAFETY: plain numbers (and atomics of them): all-zero is 0, no drop glue, alignment ≤ 8.
unsafe impl Zeroable for f32 {}
// SAFETY: as above.
unsafe impl Zeroable for f64 {}
// SAFETY: as above.
unsafe impl Zeroable for AtomicU32 {}
// SAFETY: an atomic u64 of zero bits is 0 (the same layout as u64), no drop glue.
unsafe impl Zeroable for AtomicU64 {}
// SAFETY: a zero-sized type has no bytes.
unsafe impl Zeroable for () {}

/// One heap block of `bytes` bytes (never zero), aligned to [`ALIGN`].
struct Block {
    mem: AVec<u8, ConstAlign<ALIGN>>,
    bytes: usize,
}

impl Block {
    fn new(bytes: usize) -> Block {
        Block {
            mem: AVec::from_iter(ALIGN, std::iter::repeat_n(0u8, bytes)),
            bytes,
        }
    }
}

thread_local! {
    /// The free blocks of this thread.
    static POOL: RefCell<Vec<Block>> = const { RefCell::new(Vec::new()) };
}

/// The smallest free block of at least `bytes` bytes, or a new one. When none is large enough,
/// the largest free block is freed first, so the pool never holds more blocks than there were
/// buffers alive at once.
fn block(bytes: usize) -> Block {
    let reused = POOL
        .try_with(|pool| {
            let mut pool = pool.borrow_mut();
            let fit = (0..pool.len())
                .filter(|&i| pool[i].bytes >= bytes)
                .min_by_key(|&i| pool[i].bytes);
            match fit {
                Some(i) => Some(pool.swap_remove(i)),
                None => {
                    let largest = (0..pool.len()).max_by_key(|&i| pool[i].bytes);
                    if let Some(i) = largest {
                        drop(pool.swap_remove(i));
                    }
                    None
                }
            }
        })
        .ok()
        .flatten();
    reused.unwrap_or_else(|| Block::new(bytes))
}

/// A zeroed buffer of `len` values of `T` from this thread's pool, returned to the pool of the
/// thread that drops it.
pub(crate) struct Scratch<T: Zeroable> {
    /// `None` for a buffer of zero bytes.
    block: Option<Block>,
    len: usize,
    _values: PhantomData<T>,
}

/// `len` zeroed values of `T`.
pub(crate) fn zeroed<T: Zeroable>(len: usize) -> Scratch<T> {
    let bytes = len.saturating_mul(size_of::<T>());
    let block = (bytes > 0).then(|| {
        let mut block = block(bytes);
        block.mem[..bytes].fill(0);
        block
    });
    Scratch {
        block,
        len,
        _values: PhantomData,
    }
}

/// A buffer of `len` values: the first `len` items of `values`, then zeros if it ends early.
/// The items are written without zeroing their slots first.
pub(crate) fn collect<T: Zeroable>(len: usize, values: impl Iterator<Item = T>) -> Scratch<T> {
    let bytes = len.saturating_mul(size_of::<T>());
    let block = (bytes > 0).then(|| {
        let mut block = block(bytes);
        let p = block.mem.as_mut_ptr().cast::<T>();
        let mut written = 0;
        for v in values.take(len) {
            // SAFETY: `written < len`: the slot lies inside the block's `len·size_of::<T>()`
            // bytes, aligned to `ALIGN ≥ align_of::<T>()`; writing needs no valid old value.
            unsafe { p.add(written).write(v) };
            written += 1;
        }
        block.mem[written * size_of::<T>()..bytes].fill(0);
        block
    });
    Scratch {
        block,
        len,
        _values: PhantomData,
    }
}

/// A buffer holding `f(0), f(1), …, f(len − 1)`.
pub(crate) fn from_fn<T: Zeroable>(len: usize, f: impl FnMut(usize) -> T) -> Scratch<T> {
    collect(len, (0..len).map(f))
}

impl<T: Zeroable> Deref for Scratch<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        match &self.block {
            // SAFETY: the block holds `len·size_of::<T>()` bytes, aligned to `ALIGN ≥ align_of::<T>()`,
            // zeroed or written as `T` since (all-zero is a valid `T`), and owned by `self`.
            Some(b) => unsafe { std::slice::from_raw_parts(b.mem.as_ptr().cast::<T>(), self.len) },
            // SAFETY: no bytes: a zero-sized `T` (any count) or `len == 0`; a dangling aligned
            // pointer is valid for such a slice.
            None => unsafe {
                std::slice::from_raw_parts(NonNull::<T>::dangling().as_ptr(), self.len)
            },
        }
    }
}

impl<T: Zeroable> DerefMut for Scratch<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        match &mut self.block {
            // SAFETY: as in `deref`, and `&mut self` makes the access exclusive.
            Some(b) => unsafe {
                std::slice::from_raw_parts_mut(b.mem.as_mut_ptr().cast::<T>(), self.len)
            },
            // SAFETY: as in `deref`.
            None => unsafe {
                std::slice::from_raw_parts_mut(NonNull::<T>::dangling().as_ptr(), self.len)
            },
        }
    }
}

impl<T: Zeroable> Drop for Scratch<T> {
    fn drop(&mut self) {
        if let Some(b) = self.block.take() {
            // During thread teardown the pool may be gone: the block is then freed.
            let _ = POOL.try_with(|pool| pool.borrow_mut().push(b));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_zeroed_aligned_and_reused() {
        let first = {
            let mut a = zeroed::<f64>(100);
            assert!(a.iter().all(|&v| v == 0.0));
            assert_eq!(a.as_ptr() as usize % ALIGN, 0);
            a.fill(7.0);
            a.as_ptr() as usize
        };
        // The same block comes back, zeroed again.
        let b = zeroed::<f32>(150);
        assert_eq!(b.as_ptr() as usize, first);
        assert!(b.iter().all(|&v| v == 0.0));
        // Two buffers alive at once get two blocks.
        let c = zeroed::<f32>(10);
        assert_ne!(c.as_ptr() as usize, first);
        assert_eq!(zeroed::<()>(1000).len(), 1000);
        assert!(zeroed::<f32>(0).is_empty());
        assert_eq!(&from_fn(4, |i| i as f32)[..], &[0.0, 1.0, 2.0, 3.0]);
    }

    #[test]
    fn collect_writes_the_items_then_zeros() {
        let dirty = {
            let mut a = zeroed::<f32>(8);
            a.fill(7.0);
            a.as_ptr() as usize
        };
        // The dirty block comes back: two items, the rest zeroed; extra items are not written.
        let short = collect(5, [1.0f32, 2.0].into_iter());
        assert_eq!(short.as_ptr() as usize, dirty);
        assert_eq!(&short[..], &[1.0, 2.0, 0.0, 0.0, 0.0]);
        drop(short);
        let long = collect(3, (0..10).map(|i| i as f32));
        assert_eq!(&long[..], &[0.0, 1.0, 2.0]);
        assert!(collect::<f64>(0, std::iter::once(1.0)).is_empty());
    }
}
