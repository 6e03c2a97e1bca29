//! The streaming machinery shared by the elementwise kernels (normalize, dx): the input/output
//! pair ([`InOut`], [`Io`]), the lane map a kernel applies ([`VectorMap`]), and the loops that walk
//! a run or a block of rows with it: whole periods ([`stream`]), register-group columns
//! ([`stream_columns`]) and strips of wide rows ([`stream_strips`]).

use crate::element::{self, Element};
use crate::simd::{MAX_LANES, Real, Simd};

/// The lane type of a stream's storage type.
pub(crate) type Param<IO> = <<IO as InOut>::Elem as Element>::Param;

/// Where a streaming kernel reads its input and writes its output: two slices, or one in place,
/// of one storage type.
pub(crate) trait InOut {
    /// The storage type of the streamed tensors (converted to and from f32 lanes).
    type Elem: Element;
    /// Elements to process.
    fn len(&self) -> usize;
    /// Read and write pointers, each valid for `len()` elements (equal when in place). They come
    /// from one call so that, in place, both derive from the same `&mut`.
    fn ptrs(&mut self) -> (*const Self::Elem, *mut Self::Elem);
}

/// The stream of a kernel call: read one slice and write another (the shorter length counts), or
/// read and overwrite one slice in place.
pub(crate) enum Io<'a, E = f32> {
    Separate(&'a [E], &'a mut [E]),
    InPlace(&'a mut [E]),
}

/// A stream borrowed for one of several passes over the same block.
impl<T: InOut> InOut for &mut T {
    type Elem = T::Elem;
    #[inline(always)]
    fn len(&self) -> usize {
        (**self).len()
    }
    #[inline(always)]
    fn ptrs(&mut self) -> (*const T::Elem, *mut T::Elem) {
        (**self).ptrs()
    }
}

impl<E: Element> InOut for Io<'_, E> {
    type Elem = E;
    #[inline(always)]
    fn len(&self) -> usize {
        match self {
            Io::Separate(src, dst) => src.len().min(dst.len()),
            Io::InPlace(buf) => buf.len(),
        }
    }
    #[inline(always)]
    fn ptrs(&mut self) -> (*const E, *mut E) {
        match self {
            Io::Separate(src, dst) => (src.as_ptr(), dst.as_mut_ptr()),
            Io::InPlace(buf) => {
                let p = buf.as_mut_ptr();
                (p as *const E, p)
            }
        }
    }
}

/// A lane-wise map applied by [`stream`]. A trait with `#[inline(always)]` methods rather than a
/// closure: a closure may be compiled out of line, outside the target-feature entry point, where its
/// intrinsics would become calls.
///
/// `Copy`, so that each walk entered through [`Simd::enter`] works on a copy of its own (the
/// thunks below copy it): a map reached through a reference that crossed the entry point stays in memory,
/// since the walk's stores through raw pointers might alias it, and its parameter vectors are
/// then reloaded for every vector.
pub(crate) trait VectorMap<S: Simd>: Copy {
    /// Whether `apply` reads its second input (else the second load is skipped).
    const BINARY: bool = false;
    /// The output for input vectors `x` (and `x2` for two-input maps) at `phase`, the offset of the
    /// vector in the period.
    fn apply(&self, s: S, phase: usize, x: S::V, x2: S::V) -> S::V;
}

/// The three pointers of a stream: input, second input, output.
type Ptrs<E> = (*const E, *const E, *mut E);

/// The pointers of a stream over `io` beside `second` (the input again where there is none) and
/// the length they are all valid for, the shorter of the two.
#[inline(always)]
fn stream_ptrs<IO: InOut>(io: &mut IO, second: Option<&[IO::Elem]>) -> (Ptrs<IO::Elem>, usize) {
    let n = second.map_or(io.len(), |x| x.len().min(io.len()));
    let (src, dst) = io.ptrs();
    ((src, second.map_or(src, <[IO::Elem]>::as_ptr), dst), n)
}

/// One vector of [`stream`]: `dst[i..] = op(src[i..], x2[i..])`.
///
/// # Safety
/// `src`, `x2` and `dst` must be valid for `i + LANES` elements. `src` may equal `dst` (each
/// vector is read before it is written).
#[inline(always)]
unsafe fn map_vector<S: Simd<T = E::Param>, M: VectorMap<S>, E: Element>(
    s: S,
    op: &M,
    (src, x2, dst): Ptrs<E>,
    i: usize,
    phase: usize,
) {
    // SAFETY: forwarded to the caller.
    unsafe {
        let a = element::load(s, src.add(i));
        let b = if M::BINARY {
            element::load(s, x2.add(i))
        } else {
            a
        };
        element::store(s, dst.add(i), op.apply(s, phase, a, b));
    }
}

/// Vectors loaded before any of them is stored in [`map_group`].
const GROUP_LOADS: usize = 4;

/// `K` consecutive vectors of [`stream`] ([`GROUP_LOADS`] there) at each of the `R` offsets `at`,
/// all at the same `phase` (for `R > 1`, the same vectors of `R` periods): all loaded, then all
/// mapped, then stored. Loads issued ahead of the stores keep the stream from waiting on a store
/// whose address matches a later load in its low 12 bits (outputs at a small offset mod 4096
/// from the inputs). With `R > 1` a periodic map's reads of its parameter lanes at the phase have
/// no store between them, so the compiler loads each lane vector once for the `R` periods.
///
/// # Safety
/// As [`map_vector`], for `at[t] + K·LANES` elements; the `R` ranges are disjoint.
#[inline(always)]
unsafe fn map_group<
    S: Simd<T = E::Param>,
    M: VectorMap<S>,
    E: Element,
    const R: usize,
    const K: usize,
>(
    s: S,
    op: &M,
    (src, x2, dst): Ptrs<E>,
    at: [usize; R],
    phase: usize,
) {
    let l = S::LANES;
    let zero = s.zero();
    let (mut a, mut b) = ([[zero; K]; R], [[zero; K]; R]);
    for (t, &i) in at.iter().enumerate() {
        for k in 0..K {
            // SAFETY: forwarded to the caller; every vector is read before any is written.
            unsafe {
                a[t][k] = element::load(s, src.add(i + k * l));
                b[t][k] = if M::BINARY {
                    element::load(s, x2.add(i + k * l))
                } else {
                    a[t][k]
                };
            }
        }
    }
    let mut y = [[zero; K]; R];
    for k in 0..K {
        for t in 0..R {
            y[t][k] = op.apply(s, phase + k * l, a[t][k], b[t][k]);
        }
    }
    for (t, &i) in at.iter().enumerate() {
        // SAFETY: forwarded to the caller.
        unsafe { element::store_group(s, dst.add(i), y[t]) };
    }
}

/// Applies `op` to every vector of `io` (paired with the same vector of `second`, if given):
/// whole periods with the phase known, then whole vectors, then one partial vector.
/// `period` is a multiple of the lane count.
#[inline(always)]
pub(crate) fn stream<S: Simd<T = Param<IO>>, IO: InOut>(
    s: S,
    io: IO,
    second: Option<&[IO::Elem]>,
    period: usize,
    op: &impl VectorMap<S>,
) {
    s.enter(From(s, io, second, 0, period, op));
}

thunk!(From['a, S, IO: InOut, M] for ['a, S, IO, M]
    (s: S, io: IO, second: Option<&'a [IO::Elem]>, start: usize, period: usize, op: &'a M)
    where [S: Simd<T = Param<IO>>, M: VectorMap<S>]
    -> () => stream_from(s, io, second, start, period, &{ *op }));

/// [`stream`] for a map that ignores its phase and treats every lane alike (one channel's splat
/// parameters, or none): its groups go as pairs in [`element::load_pair`]'s order
/// ([`stream_alike_raw`]).
#[inline(always)]
pub(crate) fn stream_alike<S: Simd<T = Param<IO>>, IO: InOut>(
    s: S,
    mut io: IO,
    second: Option<&[IO::Elem]>,
    op: &impl VectorMap<S>,
) {
    let (ptrs, n) = stream_ptrs(&mut io, second);
    // SAFETY: the pointers are valid for `n` elements (`stream_ptrs`); `peel_head` stays inside
    // them.
    unsafe {
        let (ptrs, n) = peel_head(s, ptrs, n, op);
        stream_alike_raw(s, ptrs, n, op)
    }
}

/// Runs of at least this many vectors start with [`peel_head`].
const PEEL_VECTORS: usize = 4 * GROUP_LOADS;

/// The elements of a long run before its output is aligned to a vector, through one partial
/// vector, so that the rest of the run stores whole aligned vectors; returns the rest of the
/// run. A vector store that straddles two cache lines costs about two. Runs shorter than
/// [`PEEL_VECTORS`] vectors, or whose output is aligned already, are returned whole. The map
/// must ignore its phase (every lane alike): the head goes at phase 0. Same bits either way.
///
/// Measured (one thread, AMD EPYC family 25 model 17 (Zen 4), x and y 16 bytes past a page, where
/// glibc's `malloc` starts a large `Vec`, min of 5 alternated processes): NCHW 1x64x112x112
/// inference f32 75.9 → 72.8 µs, bf16 43.4 → 41.6, training f32 168.3 → 158.8; page-aligned
/// tensors unchanged (f32 inference 70.7 / 70.9 µs, bf16 38.5 / 38.0).
///
/// # Safety
/// As [`stream_raw`].
#[inline(always)]
unsafe fn peel_head<S: Simd<T = E::Param>, M: VectorMap<S>, E: Element>(
    s: S,
    (src, x2, dst): Ptrs<E>,
    n: usize,
    op: &M,
) -> (Ptrs<E>, usize) {
    let head = if n < PEEL_VECTORS * S::LANES {
        0
    } else {
        stream_head::<S, E>(dst, n)
    };
    if head == 0 {
        return ((src, x2, dst), n);
    }
    // SAFETY: `head < LANES <= n`: one partial vector inside the caller's range, then the rest.
    unsafe {
        stream_raw(s, (src, x2, dst), head, GROUP_LOADS * S::LANES, op);
        ((src.add(head), x2.add(head), dst.add(head)), n - head)
    }
}

/// [`stream_alike`] with the output stored past the caches ([`stream_run_nt`]). The caller calls
/// [`Simd::stream_fence`] after its last such walk.
#[inline(always)]
pub(crate) fn stream_alike_nt<S: Simd<T = Param<IO>>, IO: InOut>(
    s: S,
    mut io: IO,
    second: Option<&[IO::Elem]>,
    op: &impl VectorMap<S>,
) {
    let (ptrs, n) = stream_ptrs(&mut io, second);
    // SAFETY: the pointers are valid for `n` elements (`stream_ptrs`).
    unsafe { stream_run_nt(s, ptrs, n, op) }
}

/// [`stream`] of a periodic map on bfloat16 data whose pairs interleave: each whole period goes
/// as pairs through `paired`, the same map on [`PeriodicLanes::interleaved`] lanes, the rest
/// (less than a period) through `plain` as [`stream`] does. `period` must be a multiple of
/// `2·LANES`.
///
/// [`PeriodicLanes::interleaved`]: super::PeriodicLanes::interleaved
#[inline(always)]
pub(crate) fn stream_paired<S: Simd<T = Param<IO>>, IO: InOut, M: VectorMap<S>>(
    s: S,
    io: IO,
    second: Option<&[IO::Elem]>,
    period: usize,
    ops: (&M, &M),
) {
    s.enter(Paired(s, io, second, period, ops));
}

thunk!(Paired['a, S, IO: InOut, M] for ['a, S, IO, M]
    (s: S, io: IO, second: Option<&'a [IO::Elem]>, period: usize, ops: (&'a M, &'a M))
    where [S: Simd<T = Param<IO>>, M: VectorMap<S>]
    -> () => paired(s, io, second, period, (&{ *ops.0 }, &{ *ops.1 })));

/// [`stream_paired`]'s walk.
#[inline(always)]
fn paired<S: Simd<T = Param<IO>>, IO: InOut, M: VectorMap<S>>(
    s: S,
    mut io: IO,
    second: Option<&[IO::Elem]>,
    period: usize,
    (plain, paired): (&M, &M),
) {
    debug_assert!(period > 0 && period.is_multiple_of(2 * S::LANES));
    let ((src, x2, dst), n) = stream_ptrs(&mut io, second);
    let mut i = 0;
    while i + period <= n {
        // SAFETY: `i + period <= n`, inside the pointers' range; the period is whole pairs.
        unsafe { map_pair_run(s, paired, (src.add(i), x2.add(i), dst.add(i)), period) };
        i += period;
    }
    // SAFETY: `i <= n`: the rest of the range, starting at phase 0.
    unsafe { stream_raw(s, (src.add(i), x2.add(i), dst.add(i)), n - i, period, plain) };
}

/// [`stream`] of the elements from `start` on, `op`'s phase counted from `start`.
#[inline(always)]
fn stream_from<S: Simd<T = Param<IO>>, IO: InOut>(
    s: S,
    mut io: IO,
    second: Option<&[IO::Elem]>,
    start: usize,
    period: usize,
    op: &impl VectorMap<S>,
) {
    let ((src, x2, dst), n) = stream_ptrs(&mut io, second);
    if start >= n {
        return;
    }
    // SAFETY: the pointers are valid for `n` elements (`stream_ptrs`), so from `start < n` on
    // for `n − start`; `stream_raw` stays inside that range.
    unsafe {
        let at = (src.add(start), x2.add(start), dst.add(start));
        stream_raw(s, at, n - start, period, op)
    };
}

/// [`stream`] on raw pointers.
///
/// # Safety
/// `src`, `x2` and `dst` must be valid for `n` elements; `src` may equal `dst`, and `x2` may equal
/// `src`; no other reference to the output range may be alive.
#[inline(always)]
pub(crate) unsafe fn stream_raw<S: Simd<T = E::Param>, M: VectorMap<S>, E: Element>(
    s: S,
    (src, x2, dst): Ptrs<E>,
    n: usize,
    period: usize,
    op: &M,
) {
    let l = S::LANES;
    debug_assert!(period > 0 && period.is_multiple_of(l));
    let mut i = 0;
    let g = GROUP_LOADS * l;
    // Periods of at most 512 bytes (NHWC rows of up to 128 f32 channels) go two at a time, each
    // vector of the first beside the same vector of the second, so each parameter lane vector is
    // loaded once for two data vectors (callgrind: 15% fewer instructions on f32 NHWC inference of
    // 64 channels, 10% on 256). Measured on AMD EPYC family 25 model 1 (Zen 3, AVX2), one thread,
    // min of 7 alternated processes: NHWC 1x64x112x112 inference 102.9 → 93.9 µs (f32; 0.91–0.94
    // in three runs), 88.1 → 76.6 (f16), 272.6 → 254.8 (f64), backward 0.96–1.00; on periods of
    // 1 KiB (256 f32 channels) backward was 8–9% slower, so those keep one period at a time.
    let pairs = period * size_of::<E>() <= 512;
    while pairs && i + 2 * period <= n {
        let mut o = 0;
        while o + g <= period {
            // SAFETY: `i + period + o + GROUP_LOADS·LANES <= i + 2·period <= n`; the two ranges
            // are a period apart.
            let at = [i + o, i + period + o];
            unsafe { map_group::<S, M, E, 2, GROUP_LOADS>(s, op, (src, x2, dst), at, o) };
            o += g;
        }
        while o < period {
            // SAFETY: `i + period + o + LANES <= i + 2·period <= n`.
            unsafe {
                map_vector(s, op, (src, x2, dst), i + o, o);
                map_vector(s, op, (src, x2, dst), i + period + o, o);
            }
            o += l;
        }
        i += 2 * period;
    }
    while i + period <= n {
        let mut o = 0;
        while o + g <= period {
            // SAFETY: `i + o + GROUP_LOADS·LANES <= i + period <= n`.
            unsafe { map_group::<S, M, E, 1, GROUP_LOADS>(s, op, (src, x2, dst), [i + o], o) };
            o += g;
        }
        while o < period {
            // SAFETY: `i + o + LANES <= i + period <= n`.
            unsafe { map_vector(s, op, (src, x2, dst), i + o, o) };
            o += l;
        }
        i += period;
    }
    let mut o = 0;
    while i + o + g <= n {
        // SAFETY: `i + o + GROUP_LOADS·LANES <= n` (loop condition).
        unsafe { map_group::<S, M, E, 1, GROUP_LOADS>(s, op, (src, x2, dst), [i + o], o) };
        o += g;
    }
    if i + o + 2 * l <= n {
        // A pair left over (short runs: 49 values are 3 vectors and one value): stored as a group,
        // so half data converts the pair together (one bfloat16 instruction on AVX512-BF16).
        // Measured, bf16 1x1024x7x7 NCHW inference, one thread, AMD EPYC family 26: 9.0 → 8.0 µs.
        // SAFETY: `i + o + 2·LANES <= n` (condition).
        unsafe { map_group::<S, M, E, 1, 2>(s, op, (src, x2, dst), [i + o], o) };
        o += 2 * l;
    }
    while i + o + l <= n {
        // SAFETY: `i + o + LANES <= n` (loop condition).
        unsafe { map_vector(s, op, (src, x2, dst), i + o, o) };
        o += l;
    }
    let rest = n - (i + o);
    if rest > 0 {
        // SAFETY: `i + o + rest == n`: the ranges lie inside the buffers. The input slices are
        // dropped before the output slice is made, so in place no `&` and `&mut` overlap in time.
        let (a, b) = unsafe {
            let a = element::load_partial(
                s,
                std::slice::from_raw_parts(src.add(i + o), rest),
                E::Param::ZERO,
            );
            let b = if M::BINARY {
                element::load_partial(
                    s,
                    std::slice::from_raw_parts(x2.add(i + o), rest),
                    E::Param::ZERO,
                )
            } else {
                a
            };
            (a, b)
        };
        let v = op.apply(s, o, a, b);
        // SAFETY: as above; no other slice of the buffer is alive.
        element::store_partial(
            s,
            unsafe { std::slice::from_raw_parts_mut(dst.add(i + o), rest) },
            v,
        );
    }
}

/// [`stream_raw`] of one run of `n` elements with a map that ignores its phase and treats every
/// lane alike (one channel's splat parameters; its pairs may be in [`element::load_pair`]'s
/// order), after its [`peel_head`], whose last partial vector, if any, is instead the whole
/// vector ending at `n` (overlapping the one before it; after an odd count of whole vectors, the
/// pair of vectors ending at `n`): loaded before anything after the head is stored, so an
/// in-place run reads its inputs, and the overlap is written twice with the same values.
///
/// # Safety
/// As [`stream_raw`].
#[inline(always)]
pub(crate) unsafe fn stream_run<S: Simd<T = E::Param>, M: VectorMap<S>, E: Element>(
    s: S,
    (src, x2, dst): Ptrs<E>,
    n: usize,
    op: &M,
) {
    // SAFETY: forwarded to the caller.
    let ((src, x2, dst), n) = unsafe { peel_head(s, (src, x2, dst), n, op) };
    let l = S::LANES;
    let whole = n / l * l;
    if n < l || whole == n {
        // SAFETY: forwarded to the caller.
        return unsafe { stream_alike_raw(s, (src, x2, dst), n, op) };
    }
    if S::BF16_PAIR_STORES && element::is_bf16::<E>() && (whole / l) % 2 == 1 && whole >= 2 * l {
        // bfloat16 after an odd count of whole vectors: the last whole one and the partial rest
        // go as the pair of vectors ending at `n`, so every vector is stored in a pair
        // ([`Simd::BF16_PAIR_STORES`]): 49 values, two pairs. Measured (one thread, AMD EPYC
        // family 25 model 17 (Zen 4), AVX512-BF16, min of 7 alternated processes, NCHW):
        // inference 1x1024x7x7 6.9 → 5.8 µs, 8x512x7x7 22.0 → 17.7, with ReLU 8.0 → 7.2;
        // training 26.4 → 25.1, backward 23.8 → 22.2. f16 and f32 keep the lone last vector (f16
        // 1x1024x7x7 5.6 → 5.9 this way), and so does AVX2, which rounds bfloat16 vector by
        // vector (the `avx2` code on the same CPU, inference 1x1024x7x7 8.3 → 8.6 µs).
        // SAFETY: forwarded to the caller; `n > whole ≥ 2·LANES` and `whole − LANES ≤ n`.
        return unsafe { stream_run_end::<S, M, E, 2>(s, (src, x2, dst), (n, whole - l), op) };
    }
    // SAFETY: forwarded to the caller; `n > whole ≥ LANES`.
    unsafe { stream_run_end::<S, M, E, 1>(s, (src, x2, dst), (n, whole), op) };
}

/// The end of [`stream_run`]: the `K` vectors ending at `n` loaded first (so that an in-place
/// run reads its inputs), then the first `walk` elements walked, then those `K` vectors mapped
/// and stored as a group over the end (where they overlap the walk, the same values twice).
///
/// # Safety
/// As [`stream_raw`] for `n` elements; `K·LANES ≤ n`, `walk ≤ n` and `walk ≥ n − K·LANES`.
#[inline(always)]
unsafe fn stream_run_end<S: Simd<T = E::Param>, M: VectorMap<S>, E: Element, const K: usize>(
    s: S,
    (src, x2, dst): Ptrs<E>,
    (n, walk): (usize, usize),
    op: &M,
) {
    let end = n - K * S::LANES;
    let (mut a, mut b) = ([s.zero(); K], [s.zero(); K]);
    for k in 0..K {
        // SAFETY: `end + (k + 1)·LANES ≤ n`: the vector lies inside the run.
        unsafe {
            a[k] = element::load(s, src.add(end + k * S::LANES));
            b[k] = if M::BINARY {
                element::load(s, x2.add(end + k * S::LANES))
            } else {
                a[k]
            };
        }
    }
    // SAFETY: forwarded to the caller (`walk ≤ n`).
    unsafe { stream_alike_raw(s, (src, x2, dst), walk, op) };
    let mut y = [s.zero(); K];
    for k in 0..K {
        y[k] = op.apply(s, 0, a[k], b[k]);
    }
    // SAFETY: as the loads above.
    unsafe { element::store_group(s, dst.add(end), y) };
}

/// [`stream_run`] with the output stored past the caches ([`element::store_stream`]): for
/// outputs too large to stay in the last-level cache, whose plain stores would first read every
/// output line from memory. The elements before the first output vector aligned to its size,
/// and the rest after the last whole group of [`GROUP_LOADS`] vectors, go through
/// [`stream_raw`]. The
/// caller calls [`Simd::stream_fence`] after its last such walk, and runs this walk in an entry
/// point of its own (the kernels' plain walks inlined beside it would double an unoptimized
/// build's frame).
///
/// # Safety
/// As [`stream_raw`].
#[inline(always)]
pub(crate) unsafe fn stream_run_nt<S: Simd<T = E::Param>, M: VectorMap<S>, E: Element>(
    s: S,
    (src, x2, dst): Ptrs<E>,
    n: usize,
    op: &M,
) {
    let l = S::LANES;
    let g = GROUP_LOADS * l;
    let head = stream_head::<S, E>(dst, n);
    let end = head + (n - head) / g * g;
    // SAFETY: `head <= n`: inside the caller's range.
    unsafe { stream_raw(s, (src, x2, dst), head, g, op) };
    let mut i = head;
    while i < end {
        // SAFETY: `i + GROUP_LOADS·LANES <= end <= n`; `dst + i` is aligned to a vector, since
        // `dst + head` is and `i − head` is whole vectors. (`op` ignores its phase.)
        unsafe { map_group_nt::<S, M, E, GROUP_LOADS>(s, op, (src, x2, dst), i, 0) };
        i += g;
    }
    // SAFETY: `end <= n`: the rest of the caller's range.
    unsafe { stream_raw(s, (src.add(end), x2.add(end), dst.add(end)), n - end, g, op) };
}

/// Elements of a walk of `n` elements before its output `dst` is aligned to a vector (of
/// `LANES` values of `E`, as [`element::store_stream`] needs).
#[inline(always)]
fn stream_head<S: Simd, E: Element>(dst: *const E, n: usize) -> usize {
    elements_to_boundary(dst, S::LANES * size_of::<E>()).min(n)
}

/// Elements of type `E` from `p` to the next multiple of `bytes` (a power of two at least the
/// element size; 0 if `p` is one).
#[inline(always)]
pub(crate) fn elements_to_boundary<E>(p: *const E, bytes: usize) -> usize {
    let size = size_of::<E>();
    // `p` is aligned to `size` (a slice's pointer), so the distance is whole elements.
    (bytes - p as usize % bytes) % bytes / size
}

/// [`map_group`] of `K` vectors at `i` (phases `phase`, `phase + LANES`, ...) with the output
/// stored past the caches ([`element::store_stream`]).
///
/// # Safety
/// As [`map_vector`], for `i + K·LANES` elements; `dst + i` aligned to a vector.
#[inline(always)]
unsafe fn map_group_nt<S: Simd<T = E::Param>, M: VectorMap<S>, E: Element, const K: usize>(
    s: S,
    op: &M,
    (src, x2, dst): Ptrs<E>,
    i: usize,
    phase: usize,
) {
    let l = S::LANES;
    // SAFETY: forwarded to the caller; every vector is read before any is written.
    unsafe {
        let a: [S::V; K] = std::array::from_fn(|k| element::load(s, src.add(i + k * l)));
        let b: [S::V; K] = if M::BINARY {
            std::array::from_fn(|k| element::load(s, x2.add(i + k * l)))
        } else {
            a
        };
        for k in 0..K {
            let y = op.apply(s, phase + k * l, a[k], b[k]);
            element::store_stream(s, dst.add(i + k * l), y);
        }
    }
}

/// [`stream_raw`] of a periodic map with the output stored past the caches: the elements
/// before the first vector-aligned output plainly, then whole periods from there with the
/// phases offset by that head (a periodic map's lanes hold the period plus
/// [`MAX_LANES`] values continuing the pattern, so loads at the offset
/// phases stay in bounds), groups of [`GROUP_LOADS`] vectors and single vectors stored past the
/// caches, the last partial period plainly. The NHWC counterpart of [`stream_run_nt`] for rows
/// wider than a register group, with the same caller duties.
///
/// # Safety
/// As [`stream_raw`]; `op`'s lanes readable at phases up to `period + LANES` past the head.
#[inline(always)]
pub(crate) unsafe fn stream_periodic_nt<S: Simd<T = E::Param>, M: VectorMap<S>, E: Element>(
    s: S,
    (src, x2, dst): Ptrs<E>,
    n: usize,
    period: usize,
    op: &M,
) {
    let l = S::LANES;
    let g = GROUP_LOADS * l;
    let head = stream_head::<S, E>(dst, n);
    // SAFETY: `head <= n`: inside the caller's range.
    unsafe { stream_raw(s, (src, x2, dst), head, period, op) };
    let seg = Offset {
        op: *op,
        phase0: head,
    };
    let periods = (n - head) / period;
    for r in 0..periods {
        let i = head + r * period;
        let mut o = 0;
        // SAFETY: `i + period <= n`; `dst + i + o` is aligned to a vector (`dst + head` is, and
        // the period and `o` are whole vectors).
        unsafe {
            while o + g <= period {
                map_group_nt::<S, _, E, GROUP_LOADS>(s, &seg, (src, x2, dst), i + o, o);
                o += g;
            }
            while o < period {
                map_group_nt::<S, _, E, 1>(s, &seg, (src, x2, dst), i + o, o);
                o += l;
            }
        }
    }
    let end = head + periods * period;
    // SAFETY: `end <= n`: the rest of the caller's range, starting at phase `head`.
    unsafe {
        stream_raw(
            s,
            (src.add(end), x2.add(end), dst.add(end)),
            n - end,
            period,
            &seg,
        )
    };
}

/// [`stream_raw`] for a map that treats every lane alike (see [`stream_run`]): groups of
/// [`GROUP_LOADS`] vectors go as pairs in [`element::load_pair`]'s order (for bfloat16 on AVX2,
/// even and odd values, widened and narrowed with no shuffle), the rest as [`stream_raw`] does.
///
/// Measured on AMD EPYC family 25 model 1 (Zen 3), AVX2, one thread, bf16 NCHW 1x64x112x112,
/// the builds alternated: see the CHANGELOG.
///
/// # Safety
/// As [`stream_raw`].
#[inline(always)]
unsafe fn stream_alike_raw<S: Simd<T = E::Param>, M: VectorMap<S>, E: Element>(
    s: S,
    (src, x2, dst): Ptrs<E>,
    n: usize,
    op: &M,
) {
    let pairs = n / (2 * S::LANES) * (2 * S::LANES);
    // SAFETY: `pairs <= n`, inside the caller's range, and whole pairs.
    unsafe { map_pair_run(s, op, (src, x2, dst), pairs) };
    // SAFETY: `pairs <= n`: the rest of the caller's range (less than a pair).
    let rest = unsafe { (src.add(pairs), x2.add(pairs), dst.add(pairs)) };
    // SAFETY: forwarded to the caller.
    unsafe { stream_raw(s, rest, n - pairs, GROUP_LOADS * S::LANES, op) };
}

/// `n` elements (whole pairs of vectors) through [`map_pairs`], in groups of [`GROUP_LOADS`]
/// vectors and a last pair, the phases counted from 0.
///
/// # Safety
/// As [`stream_raw`]; `n` must be a multiple of `2·LANES`.
#[inline(always)]
unsafe fn map_pair_run<S: Simd<T = E::Param>, M: VectorMap<S>, E: Element>(
    s: S,
    op: &M,
    ptrs: Ptrs<E>,
    n: usize,
) {
    let (w, g) = (2 * S::LANES, GROUP_LOADS * S::LANES);
    debug_assert!(n.is_multiple_of(w));
    // Pairs in the plain order are the vectors of a group: stored as one group, half data is
    // converted and checked once per group (AVX512-BF16: one output check per four vectors, not
    // per pair). Zen 4, bf16 NCHW 1x64x112x112: inference 40.8 → 38.7 µs, backward 133.6 → 130.9.
    let reordered = element::pairs_reordered::<S, E>();
    let mut i = 0;
    while i + g <= n {
        // SAFETY: `i + GROUP_LOADS·LANES <= n` (loop condition).
        unsafe {
            if reordered {
                map_pairs::<S, M, E, { GROUP_LOADS / 2 }>(s, op, ptrs, i, i);
            } else {
                map_group::<S, M, E, 1, GROUP_LOADS>(s, op, ptrs, [i], i);
            }
        }
        i += g;
    }
    if i + w <= n {
        // SAFETY: `i + 2·LANES <= n` (condition).
        unsafe {
            if reordered {
                map_pairs::<S, M, E, 1>(s, op, ptrs, i, i);
            } else {
                map_group::<S, M, E, 1, 2>(s, op, ptrs, [i], i);
            }
        }
    }
}

/// `K` pairs of vectors in [`element::load_pair`]'s order, all loaded, then all stored (as
/// [`map_group`]); vector `h` of pair `k` goes to `op` at phase `phase + (2·k + h)·LANES`, so a
/// periodic map must read its lanes in the same order ([`PeriodicLanes::interleaved`] for
/// bfloat16).
///
/// [`PeriodicLanes::interleaved`]: super::PeriodicLanes::interleaved
///
/// # Safety
/// As [`map_vector`], for `i + 2·K·LANES` elements.
#[inline(always)]
unsafe fn map_pairs<S: Simd<T = E::Param>, M: VectorMap<S>, E: Element, const K: usize>(
    s: S,
    op: &M,
    (src, x2, dst): Ptrs<E>,
    i: usize,
    phase: usize,
) {
    let l = S::LANES;
    let w = 2 * S::LANES;
    let zero = [s.zero(); 2];
    let (mut a, mut b) = ([zero; K], [zero; K]);
    for k in 0..K {
        // SAFETY: forwarded to the caller; every pair is read before any is written.
        unsafe {
            a[k] = element::load_pair(s, src.add(i + k * w));
            b[k] = if M::BINARY {
                element::load_pair(s, x2.add(i + k * w))
            } else {
                a[k]
            };
        }
    }
    let mut y = [zero; K];
    for k in 0..K {
        let at = phase + k * w;
        y[k] = [
            op.apply(s, at, a[k][0], b[k][0]),
            op.apply(s, at + l, a[k][1], b[k][1]),
        ];
    }
    for (k, y) in y.into_iter().enumerate() {
        // SAFETY: forwarded to the caller.
        unsafe { element::store_pair(s, dst.add(i + k * w), y) };
    }
}

/// `op` with its phases offset by `phase0`: a segment of a period streamed on its own.
#[derive(Clone, Copy)]
struct Offset<M> {
    op: M,
    phase0: usize,
}

impl<S: Simd, M: VectorMap<S>> VectorMap<S> for Offset<M> {
    const BINARY: bool = M::BINARY;
    #[inline(always)]
    fn apply(&self, s: S, phase: usize, x: S::V, x2: S::V) -> S::V {
        self.op.apply(s, self.phase0 + phase, x, x2)
    }
}

/// The strip width of a periodic map that reads `fields` parameter lanes of `period` values of `T`
/// over rows of `E`, or `None` to stream whole rows: lanes over a quarter of the L1 data cache
/// ([`crate::simd::l1d_bytes`]), half of it for 2-byte data, go through [`stream_strips`], in
/// strips whose lanes take at most that share (whole register groups of 64 channels).
///
/// Measured on AMD Zen 4 (EPYC family 25 model 17, 32 KiB L1), one thread, NHWC inference and
/// backward with rows of 1024 to 8192 channels, the lanes' share of L1 set to 1/8, 1/4 and 1/2:
/// - f32 and f64 data are fastest at 1/4: f32 inference 1x2048x7x7 16.4 µs against 17.7 at 1/2,
///   64x8192x1x1 83.8 against 89.7; f64 inference 256x2048x1x1 155 µs against 166 at 1/2 and 171
///   at 1/8 (backward 1–4% faster at 1/2, within the noise of the reduction it shares a call with);
/// - bf16 and f16 data, half the bytes per row, at 1/2: bf16 inference 256x2048x1x1 43.0 µs
///   against 48.0 at 1/4, 8x2048x7x7 63.3 against 71.3; f16 alike.
///
/// An AMD Zen 5 class EPYC (48 KiB L1) had strips of 256 channels 1.2–1.4× slower than whole rows
/// of 1024 channels (12 KiB of lanes) and strips of 1024 as fast as whole rows.
#[inline(always)]
pub(crate) fn strip_width<T, E>(period: usize, fields: usize) -> Option<usize> {
    let share = if size_of::<E>() == 2 { 2 } else { 4 };
    let budget = crate::simd::l1d_bytes() / share;
    let per_channel = fields * size_of::<T>();
    (period * per_channel > budget).then(|| (budget / per_channel / 64 * 64).max(64))
}

/// [`stream`] of whole rows of `c` elements (a periodic `op` of period `period`, a multiple of
/// `c`), strip by strip: channels `k..k + strip` of every row, then the next strip, so only one
/// strip's parameter lanes are in use at a time ([`strip_width`]). Each row segment starts at phase
/// `(row start + k) mod period` and lies inside the period (the period is a multiple of `c`).
#[inline(always)]
pub(crate) fn stream_strips<S: Simd<T = Param<IO>>, IO: InOut, M: VectorMap<S>>(
    s: S,
    io: IO,
    second: Option<&[IO::Elem]>,
    cols: (usize, usize, usize),
    op: &M,
) {
    s.enter(Strips(s, io, second, cols, op));
}

thunk!(Strips['a, S, IO: InOut, M] for ['a, S, IO, M]
    (s: S, io: IO, second: Option<&'a [IO::Elem]>, cols: (usize, usize, usize), op: &'a M)
    where [S: Simd<T = Param<IO>>, M: VectorMap<S>]
    -> () => strips(s, io, second, cols, &{ *op }));

/// [`stream_strips`]' walk.
#[inline(always)]
fn strips<S: Simd<T = Param<IO>>, IO: InOut, M: VectorMap<S>>(
    s: S,
    mut io: IO,
    second: Option<&[IO::Elem]>,
    (c, period, strip): (usize, usize, usize),
    op: &M,
) {
    let l = S::LANES;
    let ((src, x2, dst), n) = stream_ptrs(&mut io, second);
    if c == 0 || strip == 0 {
        return;
    }
    let rows = n / c;
    for k in (0..c).step_by(strip) {
        let w = strip.min(c - k);
        // Larger than the segment: `stream_raw` then takes whole vectors and one partial one,
        // with phases from 0.
        let span = (w / l + 1) * l;
        for r in 0..rows {
            let e = r * c + k;
            let seg = Offset {
                op: *op,
                phase0: e % period,
            };
            // SAFETY: `e + w ≤ rows·c ≤ n`, and the pointers are valid for `n` elements (as in
            // `stream`); `stream_raw` stays inside `e..e + w`.
            unsafe { stream_raw(s, (src.add(e), x2.add(e), dst.add(e)), w, span, &seg) };
        }
    }
}

/// Channel vectors per register group of the NHWC column streams ([`stream_columns`]): as many as
/// keep a map's parameters in registers ([`Simd::REGISTERS`]: 16 vectors on AVX2, 32 on AVX-512,
/// half as many in f64 lanes).
#[inline(always)]
pub(crate) fn column_group<S: Simd>(params_per_vector: usize) -> usize {
    ((S::REGISTERS - 4) / params_per_vector).clamp(1, MAX_GROUP)
}

/// Largest register group of [`stream_columns`].
pub(crate) const MAX_GROUP: usize = 4;

/// Register group of narrow rows on 256-bit vectors with 32 registers ([`wide_group`]).
pub(crate) const WIDE_GROUP: usize = 8;

/// Whether `S` holds a lane period of `period` values in one register group of [`WIDE_GROUP`]
/// vectors (with `params_per_vector` parameters each, and 4 registers left) where
/// [`MAX_GROUP`] vectors hold less: 256-bit vectors with 32 registers
/// ([`crate::simd::Avx2Vl`]), up to the 64 values that AVX-512's group of [`MAX_GROUP`] holds.
/// False for every other backend, on which the groups stay as measured there.
#[inline(always)]
pub(crate) fn wide_group<S: Simd>(period: usize, params_per_vector: usize) -> bool {
    WIDE_GROUP * S::LANES <= MAX_GROUP * MAX_LANES
        && WIDE_GROUP * params_per_vector + 4 <= S::REGISTERS
        && MAX_GROUP * S::LANES < period
        && period <= WIDE_GROUP * S::LANES
}

/// Whether rows of `c` channels go through [`stream_columns`] with groups of `g` vectors: when a
/// row is whole vectors and fits one register group, each row is streamed in memory order with
/// the parameters in registers. Measured (AMD Zen 4, AVX-512 and AVX2): 1.25× faster than the
/// periodic lanes there (NHWC 64 channels, AVX-512); with several groups per row the walk down
/// the columns strides through memory and the periodic lanes, which stream in order, win (up to
/// 1.6× at 256 channels on AVX2, 1.6× at 2048 on AVX-512).
#[inline(always)]
pub(crate) fn use_columns<S: Simd>(c: usize, g: usize) -> bool {
    c.is_multiple_of(S::LANES) && c <= g * S::LANES
}

/// [`stream`] over the columns `first..first + width` (`width ≤ G·LANES`) of every row of `c`
/// elements of `io`, with `op`'s phase = the vector's offset inside the group: the group's
/// parameters stay in registers while the rows go by. The last vector of a group may be partial.
#[inline(always)]
pub(crate) fn stream_columns<S: Simd<T = Param<IO>>, IO: InOut, const G: usize>(
    s: S,
    io: IO,
    second: Option<&[IO::Elem]>,
    cols: (usize, usize, usize),
    op: &impl VectorMap<S>,
) {
    s.enter(Columns::<_, _, _, G>(s, io, second, cols, op));
}

thunk!(Columns['a, S, IO: InOut, M, const G: usize] for ['a, S, IO, M, G]
    (s: S, io: IO, second: Option<&'a [IO::Elem]>, cols: (usize, usize, usize), op: &'a M)
    where [S: Simd<T = Param<IO>>, M: VectorMap<S>]
    -> () => columns::<S, IO, M, G>(s, io, second, cols, &{ *op }));

/// [`stream_columns`]' walk: [`column_rows`] for the group's number of whole vectors, chosen
/// once, not per row: a `match` inside the row loop compiled to an indirect jump per row
/// (measured, AMD EPYC family 25 model 17 (Zen 4), one thread, min of 5 alternated processes:
/// bf16 NHWC 1x64x112x112 inference 43.8 → 41.7 µs, f16 51.6 → 50.2, f32 within noise).
#[inline(always)]
fn columns<S: Simd<T = Param<IO>>, IO: InOut, M: VectorMap<S>, const G: usize>(
    s: S,
    mut io: IO,
    second: Option<&[IO::Elem]>,
    (c, first, width): (usize, usize, usize),
    op: &M,
) {
    let l = S::LANES;
    let (ptrs, n) = stream_ptrs(&mut io, second);
    if c == 0 || first >= c {
        return;
    }
    let width = width.min(G * l).min(c - first);
    let cols = (n / c, c, first, width - width / l * l);
    match width / l {
        8 if G >= 8 => column_rows::<S, IO::Elem, M, 8>(s, op, ptrs, cols),
        7 if G >= 7 => column_rows::<S, IO::Elem, M, 7>(s, op, ptrs, cols),
        6 if G >= 6 => column_rows::<S, IO::Elem, M, 6>(s, op, ptrs, cols),
        5 if G >= 5 => column_rows::<S, IO::Elem, M, 5>(s, op, ptrs, cols),
        4 => column_rows::<S, IO::Elem, M, 4>(s, op, ptrs, cols),
        3 => column_rows::<S, IO::Elem, M, 3>(s, op, ptrs, cols),
        2 => column_rows::<S, IO::Elem, M, 2>(s, op, ptrs, cols),
        1 => column_rows::<S, IO::Elem, M, 1>(s, op, ptrs, cols),
        _ => column_rows::<S, IO::Elem, M, 0>(s, op, ptrs, cols),
    }
}

/// The rows of [`columns`]: in each of `rows` rows of `c` elements, `F` whole vectors from
/// column `first` as one group (stored together: half data converts them in pairs), then `rem`
/// (< LANES) more elements as one partial vector.
#[inline(always)]
fn column_rows<S: Simd<T = E::Param>, E: Element, M: VectorMap<S>, const F: usize>(
    s: S,
    op: &M,
    (src, x2, dst): Ptrs<E>,
    (rows, c, first, rem): (usize, usize, usize, usize),
) {
    let l = S::LANES;
    for r in 0..rows {
        let base = r * c + first;
        // SAFETY: `base + F·LANES + rem ≤ r·c + first + width ≤ (r + 1)·c ≤ n`, the length the
        // pointers are valid for (`stream_ptrs`).
        unsafe {
            let ptrs = (src, x2, dst);
            match F {
                0 => {}
                1 => map_vector(s, op, ptrs, base, 0),
                _ => map_group::<S, _, _, 1, F>(s, op, ptrs, [base], 0),
            }
        }
        if rem > 0 {
            let i = base + F * l;
            // SAFETY: `i + rem ≤ (r + 1)·c ≤ n`; the input slices are dropped before the
            // output slice is made (in place they alias).
            let (a, b) = unsafe {
                let a = element::load_partial(
                    s,
                    std::slice::from_raw_parts(src.add(i), rem),
                    S::T::ZERO,
                );
                let b = if op_binary(op) {
                    element::load_partial(s, std::slice::from_raw_parts(x2.add(i), rem), S::T::ZERO)
                } else {
                    a
                };
                (a, b)
            };
            let v = op.apply(s, F * l, a, b);
            // SAFETY: as above.
            element::store_partial(
                s,
                unsafe { std::slice::from_raw_parts_mut(dst.add(i), rem) },
                v,
            );
        }
    }
}

/// [`stream`] of narrow rows whose lane period fits one register group (`period ≤ G·LANES`, a
/// multiple of the lane count): whole periods as rows of `period` elements through
/// [`stream_columns`], so `op` (phase = offset in the period) can hold its parameters in
/// registers, then the last partial period as [`stream`] does.
#[inline(always)]
pub(crate) fn stream_periods<S: Simd<T = Param<IO>>, IO: InOut, const G: usize>(
    s: S,
    mut io: IO,
    second: Option<&[IO::Elem]>,
    period: usize,
    op: &impl VectorMap<S>,
) {
    let n = second.map_or(io.len(), |x| x.len().min(io.len()));
    if period == 0 || period > G * S::LANES {
        return;
    }
    stream_columns::<S, _, G>(s, &mut io, second, (period, 0, period), op);
    s.enter(From(s, io, second, n / period * period, period, op));
}

/// [`VectorMap::BINARY`] of a map value's type.
#[inline(always)]
fn op_binary<S: Simd, M: VectorMap<S>>(_: &M) -> bool {
    M::BINARY
}

/// The first `G·LANES` of `values` as `G` vectors (lanes past its end are 0).
#[inline(always)]
pub(crate) fn lane_group<S: Simd, const G: usize>(s: S, values: &[S::T]) -> [S::V; G] {
    let l = S::LANES;
    let mut v = [s.zero(); G];
    for (g, v) in v.iter_mut().enumerate() {
        if g * l < values.len() {
            *v = s.load_partial(&values[g * l..values.len().min((g + 1) * l)], S::T::ZERO);
        }
    }
    v
}

/// Field `f` of the first `G·LANES` channel parameters as `G` vectors (missing channels 0).
#[inline(always)]
pub(crate) fn group_vectors<S: Simd, P, const G: usize>(
    s: S,
    params: &[P],
    f: impl Fn(&P) -> S::T,
) -> [S::V; G] {
    let mut v = [s.zero(); G];
    for (g, v) in v.iter_mut().enumerate() {
        let mut lanes = [S::T::ZERO; MAX_LANES];
        for (lane, p) in lanes.iter_mut().zip(params.iter().skip(g * S::LANES)) {
            *lane = f(p);
        }
        *v = s.load(&lanes[..S::LANES]);
    }
    v
}
