//! Backward kernels: one fused reduction reading x and dy once (Σdy, Σ(x−K)·dy, Σ(x−K)), and one
//! fused pass writing `dx = a·dy + b·(x − K) + c`.

use super::stream::{
    InOut, Param, VectorMap, column_group, group_vectors, stream, stream_alike, stream_alike_nt,
    stream_columns, stream_paired, stream_periodic_nt, stream_run, stream_run_nt, stream_strips,
    strip_width, use_columns,
};
use super::{
    ACCUMULATORS, DxLanes, KMAX, PREFETCH_ROWS, PeriodicLanes, expand_periodic, l1_sets_walked,
    period, prefetch_rows, reduce_f64, rows_as_they_are,
};
use crate::element::{self, Element};
use crate::scratch;
use crate::simd::{Kernel, MAX_LANES, Real, Simd};

/// Per-channel sums of the backward reduction, relative to a pivot K (the saved mean).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(crate) struct GradSums {
    /// Σ dy
    pub dy: f64,
    /// Σ (x − K)·dy
    pub xdy: f64,
    /// Σ (x − K)
    pub x: f64,
}

impl GradSums {
    #[inline]
    pub(crate) fn add(self, o: GradSums) -> GradSums {
        GradSums {
            dy: self.dy + o.dy,
            xdy: self.xdy + o.xdy,
            x: self.x + o.x,
        }
    }
}

/// Reduction over one contiguous run of one channel.
pub(crate) struct GradSumsRun<'a, E: Element = f32> {
    pub x: &'a [E],
    pub dy: &'a [E],
    pub pivot: E::Param,
}

impl<E: Element> Kernel for GradSumsRun<'_, E> {
    type T = E::Param;
    type Output = GradSums;

    #[inline(always)]
    fn run<S: Simd<T = E::Param>>(self, s: S) -> GradSums {
        grad_sums_run(s, self.x, self.dy, self.pivot)
    }
}

/// Sums of each of consecutive runs of `run` elements of x and dy, run `i` relative to
/// `pivots[i]`, into `out[i]` (one call for many short runs).
pub(crate) struct GradSumsRuns<'a, E: Element = f32> {
    pub x: &'a [E],
    pub dy: &'a [E],
    pub run: usize,
    pub pivots: &'a [E::Param],
    pub out: &'a mut [GradSums],
}

impl<E: Element> Kernel for GradSumsRuns<'_, E> {
    type T = E::Param;
    type Output = ();

    #[inline(always)]
    fn run<S: Simd<T = E::Param>>(self, s: S) {
        if self.run == 0 {
            return;
        }
        // The chains as in `grad_sums_run`.
        match S::REGISTERS {
            32.. => self.runs::<S, ACCUMULATORS>(s),
            16.. => self.runs::<S, 2>(s),
            _ => self.runs::<S, 1>(s),
        }
    }
}

impl<E: Element> GradSumsRuns<'_, E> {
    /// The runs with `A` chains per sum. Runs of one chunk (at most `KMAX·A·LANES` values, so
    /// each sum is one vector before its reduction) go `LANES` at a time, their vectors reduced
    /// together ([`Simd::reduce_add_each`], the same bits as one reduction each): for runs of 49
    /// values a perf profile had put about 40% of this kernel in the three lane reductions.
    #[inline(always)]
    fn runs<S: Simd<T = E::Param>, const A: usize>(self, s: S) {
        let (run, l) = (self.run, S::LANES);
        if run > KMAX * A * l {
            let runs = self.x.chunks(run).zip(self.dy.chunks(run));
            for ((slot, &pivot), (x, dy)) in self.out.iter_mut().zip(self.pivots).zip(runs) {
                *slot = grad_sums_chains::<S, E, A>(s, x, dy, pivot);
            }
            return;
        }
        let mut lanes = [[0.0f64; MAX_LANES]; 3];
        // Cleared once: a last partial group leaves the previous group's vectors in its unused
        // entries, whose sums are not read.
        let mut vectors = [[s.zero(); MAX_LANES]; 3];
        let groups = (self.out.chunks_mut(l).zip(self.pivots.chunks(l)))
            .zip(self.x.chunks(l * run).zip(self.dy.chunks(l * run)));
        for ((outs, pivots), (xs, dys)) in groups {
            let runs = pivots.iter().zip(xs.chunks(run).zip(dys.chunks(run)));
            let mut count = 0;
            for (j, (&pivot, (x, dy))) in runs.take(outs.len()).enumerate() {
                let n = x.len().min(dy.len());
                let [dys, xdys, xds] = chain_sums::<S, E, A>(s, (&x[..n], &dy[..n]), pivot);
                (vectors[0][j], vectors[1][j], vectors[2][j]) = (dys, xdys, xds);
                count = j + 1;
            }
            for (k, lanes) in lanes.iter_mut().enumerate() {
                s.to_lanes_w(s.widen(s.reduce_add_each(&vectors[k])), lanes);
            }
            for (j, slot) in outs.iter_mut().take(count).enumerate() {
                let sums = GradSums {
                    dy: lanes[0][j],
                    xdy: lanes[1][j],
                    x: lanes[2][j],
                };
                // Added to zero as `grad_sums_chains` does (a sum of −0 reads +0).
                *slot = GradSums::default().add(sums);
            }
        }
    }
}

/// Σdy, Σ(x − pivot)·dy and Σ(x − pivot) over one contiguous run.
#[inline(always)]
fn grad_sums_run<S: Simd<T = E::Param>, E: Element>(
    s: S,
    x: &[E],
    dy: &[E],
    pivot: E::Param,
) -> GradSums {
    // ACCUMULATORS chains of the three sums take 12 vectors: registers with 32 (AVX-512), spills
    // with fewer (AVX2; f64 lanes, two registers per vector), so fewer chains there. Measured,
    // backward 1x16x64x64 NCHW, one thread, AMD EPYC family 26, best of 9: f64 on AVX-512
    // 28.9 → 23.6 µs, f64 on AVX2 32.2 → 24.0 µs, f32 on AVX2 15.1 → 11.8 µs.
    match S::REGISTERS {
        32.. => grad_sums_chains::<S, E, ACCUMULATORS>(s, x, dy, pivot),
        16.. => grad_sums_chains::<S, E, 2>(s, x, dy, pivot),
        _ => grad_sums_chains::<S, E, 1>(s, x, dy, pivot),
    }
}

/// [`grad_sums_run`] with `A` independent chains per sum.
#[inline(always)]
fn grad_sums_chains<S: Simd<T = E::Param>, E: Element, const A: usize>(
    s: S,
    x: &[E],
    dy: &[E],
    pivot: E::Param,
) -> GradSums {
    let l = S::LANES;
    let w = A * l;
    let n = x.len().min(dy.len());
    let (x, dy) = (&x[..n], &dy[..n]);
    let mut total = GradSums::default();
    for (xc, dc) in x.chunks(KMAX * w).zip(dy.chunks(KMAX * w)) {
        let v = chain_sums::<S, E, A>(s, (xc, dc), pivot);
        let sums = [
            reduce_f64(s, v[0]),
            reduce_f64(s, v[1]),
            reduce_f64(s, v[2]),
        ];
        total = total.add(GradSums {
            dy: sums[0],
            xdy: sums[1],
            x: sums[2],
        });
    }
    total
}

/// `a + b` for the sums Σdy and Σ(x − K) (`one` from [`Simd::ones`]): as a multiply-add for half
/// data ([`Simd::add_fma`], the same bits), plain for f32 and f64. On AMD Zen 4 the widening of
/// half data appears to share the add pipes with the adds while the multiply-add pipes have room
/// (inferred from timings; no hardware counters here). Measured, AMD EPYC family 25 model 17, one
/// thread, `bench_case`, min of 5 alternated processes: backward 1x64x112x112 f16 NCHW 149.1 →
/// 143.5 µs, NHWC 185.4 → 178.4, bf16 NCHW 131.9 → 128.4, NHWC 153.9 → 151.8, f16 NHWC 8x64x56x56
/// 372.8 → 359.6 (min of 7); f32 data in the same form 0.91–1.02 (noisy, no clear gain), so it
/// keeps its adds. A standalone loop of the sums over two f16 tensors of 802 816 values in L3 took
/// 67–69 µs with either form, against 32 µs to read the same bytes: the pass is bound by
/// `vcvtph2ps` (1.4 TSC ticks per 16 values from L1 here), two per 16 values.
#[inline(always)]
fn sum_add<S: Simd<T = E::Param>, E: Element>(s: S, a: S::V, one: S::V, b: S::V) -> S::V {
    if size_of::<E>() == 2 {
        s.add_fma(a, one, b)
    } else {
        s.add(a, b)
    }
}

/// Σdy, Σ(x − pivot)·dy and Σ(x − pivot) over one chunk of at most `KMAX·A·LANES` values of x
/// and dy (the same length), each as one vector: `A` chains, combined as a pairwise tree.
#[inline(always)]
fn chain_sums<S: Simd<T = E::Param>, E: Element, const A: usize>(
    s: S,
    (xc, dc): (&[E], &[E]),
    pivot: E::Param,
) -> [S::V; 3] {
    let l = S::LANES;
    let w = A * l;
    let p = s.splat(pivot);
    let (zero, one) = (s.zero(), s.ones());
    let mut acc = [[zero; 3]; A];
    // The first vectors are the accumulators' first values, not added to zero (for a run of a
    // few vectors those adds were a fifth of this loop): the sums differ from added-to-zero
    // ones at most in the sign of a zero, which the callers' `GradSums::default().add` clears.
    let mut i = 0;
    if w <= xc.len() {
        for (j, a) in acc.iter_mut().enumerate() {
            let (xd, g) = (
                s.sub(element::load_slice(s, &xc[j * l..]), p),
                element::load_slice(s, &dc[j * l..]),
            );
            *a = [g, s.mul(xd, g), xd];
        }
        i = w;
    }
    // Whole blocks of `w` values: exact chunks, so that every vector's bounds check folds away.
    let whole = (xc.len() - i) / w * w;
    for (xb, db) in xc[i..i + whole]
        .chunks_exact(w)
        .zip(dc[i..i + whole].chunks_exact(w))
    {
        for (j, a) in acc.iter_mut().enumerate() {
            let xd = s.sub(element::load_slice(s, &xb[j * l..]), p);
            let g = element::load_slice(s, &db[j * l..]);
            a[0] = sum_add::<S, E>(s, a[0], one, g);
            a[1] = s.mul_add(xd, g, a[1]);
            a[2] = sum_add::<S, E>(s, a[2], one, xd);
        }
    }
    i += whole;
    // Tail: whole vectors then a partial one (x padded with the pivot, dy with 0), one per
    // accumulator so no lane takes more than one extra step.
    let tail = |j: usize| {
        let end = (j + l).min(xc.len());
        (&xc[j..end], &dc[j..end])
    };
    if i == 0 {
        for (a, j) in acc.iter_mut().zip((i..xc.len()).step_by(l)) {
            let (x, dy) = tail(j);
            let xd = s.sub(element::load_padded(s, x, pivot), p);
            let g = element::load_padded(s, dy, S::T::ZERO);
            *a = [g, s.mul(xd, g), xd];
        }
    } else {
        for (a, j) in acc.iter_mut().zip((i..xc.len()).step_by(l)) {
            let (x, dy) = tail(j);
            let xd = s.sub(element::load_padded(s, x, pivot), p);
            let g = element::load_padded(s, dy, S::T::ZERO);
            a[0] = s.add(a[0], g);
            a[1] = s.mul_add(xd, g, a[1]);
            a[2] = s.add(a[2], xd);
        }
    }
    // Accumulators combined as a pairwise tree (the lanes are then reduced by the caller).
    let mut out = [zero; 3];
    for (k, out) in out.iter_mut().enumerate() {
        let mut v = acc.map(|a| a[k]);
        let mut width = A;
        while width > 1 {
            for i in 0..width / 2 {
                v[i] = s.add(v[2 * i], v[2 * i + 1]);
            }
            width /= 2;
        }
        *out = v[0];
    }
    out
}

/// Reduction of channels `first..first + out.len()` over whole rows of `pivots.len()`
/// interleaved channels (a strip of the row); adds into `out`. Narrow rows (the periodic path)
/// are reduced whole: `first` must then be 0. Entries past the row are ignored.
pub(crate) struct GradSumsRows<'a, E: Element = f32> {
    pub x: &'a [E],
    pub dy: &'a [E],
    pub pivots: &'a [E::Param],
    pub first: usize,
    pub out: &'a mut [GradSums],
    /// The data come from memory (x and dy exceed the last-level cache): walk every register
    /// group of the strip together, in chunks of rows, each group asking for its lines
    /// [`PREFETCH_ROWS`] rows ahead ([`grad_sums_chunked`]).
    pub from_memory: bool,
}

/// Vectors of channels per register group in [`grad_sums_strided`] (3 sums each).
const SUM_GROUP: usize = 2;

/// One register group's sums over the rows walked so far (channels `first..first + width`,
/// `width ≤ G·LANES`, of rows of `c` values), in f64 lanes; the rows since the last fold (at most
/// [`KMAX`]) are summed in f32 lanes ([`Partial`]) kept by the caller. Lanes past `width` see
/// x = pivot = dy = 0.
struct GroupSums<S: Simd, const G: usize> {
    first: usize,
    width: usize,
    /// Whole rows of `c` values in both x and dy.
    rows: usize,
    piv: [S::V; G],
    tot: [[S::W; 3]; G],
}

/// A register group's f32 sums (Σdy, Σ(x − K)·dy, Σ(x − K) per vector) since the last fold.
type Partial<S, const G: usize> = [[<S as Simd>::V; 3]; G];

impl<S: Simd, const G: usize> Clone for GroupSums<S, G> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<S: Simd, const G: usize> Copy for GroupSums<S, G> {}

impl<S: Simd, const G: usize> GroupSums<S, G> {
    /// The group of channels `first..first + width` of `rows` rows; `pivots[0]` belongs to
    /// channel `first`.
    #[inline(always)]
    fn new(s: S, (rows, first, width): (usize, usize, usize), pivots: &[S::T]) -> Self {
        let width = width.min(G * S::LANES).min(pivots.len());
        GroupSums {
            first,
            width,
            rows,
            piv: load_pivots(s, pivots, width),
            tot: [[s.splat_w(0.0); 3]; G],
        }
    }

    /// A group of no channels and no rows (a slot not in use).
    #[inline(always)]
    fn empty(s: S) -> Self {
        GroupSums {
            first: 0,
            width: 0,
            rows: 0,
            piv: [s.zero(); G],
            tot: [[s.splat_w(0.0); 3]; G],
        }
    }

    /// [`add_rows`] for this group: rows `rows` (those past the group's rows are skipped) of
    /// `x` and `dy`, which must hold the group's rows of `c` values.
    #[inline(always)]
    fn add_rows<E: Element<Param = S::T>, const FULL: bool>(
        &self,
        s: S,
        (x, dy): (&[E], &[E]),
        c: usize,
        rows: std::ops::Range<usize>,
        acc: &mut Partial<S, G>,
    ) {
        debug_assert!(self.rows <= x.len().min(dy.len()) / c);
        let rows = rows.start..rows.end.min(self.rows);
        let cols = (c, self.first, self.width);
        add_rows::<S, E, G, FULL>(s, (x, dy), cols, rows, &self.piv, acc);
    }

    /// [`fold_partial`] for this group.
    #[inline(always)]
    fn fold(&mut self, s: S, acc: &Partial<S, G>) {
        fold_partial(s, &mut self.tot, acc);
    }

    /// [`write_sums`] for this group: adds its sums into `out[..width]`.
    #[inline(always)]
    fn write(&self, s: S, out: &mut [GradSums]) {
        write_sums(s, &self.tot, self.width, out);
    }
}

/// Adds rows `rows` of channels `first..first + width` (`width ≤ G·LANES`) of rows of `c` values
/// into a register group's f32 sums `acc` (Σdy, Σ(x − K)·dy, Σ(x − K) per vector; at most
/// [`KMAX`] rows between folds), `piv` the group's pivots. `FULL`: the group is `G` whole vectors
/// (`width = G·LANES`), so the loop carries no per-vector checks. Lanes past `width` see
/// x = pivot = dy = 0.
#[inline(always)]
fn add_rows<S: Simd<T = E::Param>, E: Element, const G: usize, const FULL: bool>(
    s: S,
    (x, dy): (&[E], &[E]),
    (c, first, width): (usize, usize, usize),
    rows: std::ops::Range<usize>,
    piv: &[S::V; G],
    acc: &mut Partial<S, G>,
) {
    let l = S::LANES;
    if FULL && width != G * l {
        return;
    }
    let (full, rem) = (width / l, width % l);
    debug_assert!(first + width <= c && rows.end * c <= x.len().min(dy.len()));
    let one = s.ones();
    for r in rows {
        let start = r * c + first;
        for g in 0..G {
            let (xv, gv) = if FULL || g < full {
                debug_assert!(start + (g + 1) * l <= x.len().min(dy.len()));
                // SAFETY: `start + (g + 1)·LANES ≤ start + width ≤ row end ≤ rows.end·c`, and
                // callers pass slices of at least `rows.end·c` elements.
                unsafe {
                    let o = start + g * l;
                    (
                        element::load(s, x.as_ptr().add(o)),
                        element::load(s, dy.as_ptr().add(o)),
                    )
                }
            } else if g == full && rem > 0 {
                let r = start + g * l..start + width;
                (
                    element::load_partial(s, &x[r.clone()], S::T::ZERO),
                    element::load_partial(s, &dy[r], S::T::ZERO),
                )
            } else {
                continue;
            };
            // Lanes past `width` see x = pivot = dy = 0 and are never read.
            let xd = s.sub(xv, piv[g]);
            let a = &mut acc[g];
            a[0] = sum_add::<S, E>(s, a[0], one, gv);
            a[1] = s.mul_add(xd, gv, a[1]);
            a[2] = sum_add::<S, E>(s, a[2], one, xd);
        }
    }
}

/// Sums over the rows for channels `first..first + width` (`width ≤ G·LANES`) of a block of rows of
/// `c` channels, accumulators in registers. Adds into `out[..width]`. `FULL`: the group is `G`
/// whole vectors (`width = G·LANES`), so the loop carries no per-vector checks. (Its state in
/// locals, not in a [`GroupSums`]: measured 3–4% faster, AMD EPYC family 25, NHWC 1x1040x7x7.)
#[inline(always)]
fn grad_sums_strided<S: Simd<T = E::Param>, E: Element, const G: usize, const FULL: bool>(
    s: S,
    (x, dy): (&[E], &[E]),
    c: usize,
    first: usize,
    pivots: &[E::Param],
    out: &mut [GradSums],
) {
    let l = S::LANES;
    let width = (c - first).min(G * l).min(pivots.len()).min(out.len());
    if FULL && width != G * l {
        return;
    }
    let rows = x.len().min(dy.len()) / c;
    let zero = s.zero();
    let piv = load_pivots::<S, G>(s, pivots, width);
    // f32 sums over KMAX rows, then added into f64 vectors (one widening per sum and vector).
    let mut tot = [[s.splat_w(0.0); 3]; G];
    let mut first_row = 0;
    while first_row < rows {
        let steps = KMAX.min(rows - first_row);
        let mut acc = [[zero; 3]; G];
        let band = first_row..first_row + steps;
        add_rows::<S, E, G, FULL>(s, (x, dy), (c, first, width), band, &piv, &mut acc);
        fold_partial(s, &mut tot, &acc);
        first_row += steps;
    }
    write_sums(s, &tot, width, out);
}

/// The first `width` pivots (`width ≤ G·LANES`) as a register group's vectors, lanes past
/// `width` 0.
#[inline(always)]
fn load_pivots<S: Simd, const G: usize>(s: S, pivots: &[S::T], width: usize) -> [S::V; G] {
    let l = S::LANES;
    let mut piv = [s.zero(); G];
    for (g, p) in piv.iter_mut().enumerate().take(width.div_ceil(l)) {
        *p = s.load_partial(&pivots[g * l..width], S::T::ZERO);
    }
    piv
}

/// Adds a group's f32 sums `acc` into its f64 sums `tot` (one widening per sum and vector).
#[inline(always)]
fn fold_partial<S: Simd, const G: usize>(s: S, tot: &mut [[S::W; 3]; G], acc: &Partial<S, G>) {
    for (t, a) in tot.iter_mut().zip(acc) {
        for k in 0..3 {
            t[k] = s.add_w(t[k], s.widen(a[k]));
        }
    }
}

/// Adds a group's f64 sums `tot` into `out[..width]` (the group's channels).
#[inline(always)]
fn write_sums<S: Simd, const G: usize>(
    s: S,
    tot: &[[S::W; 3]; G],
    width: usize,
    out: &mut [GradSums],
) {
    let l = S::LANES;
    let (mut dys, mut xdys, mut xs) = ([0.0; MAX_LANES], [0.0; MAX_LANES], [0.0; MAX_LANES]);
    for (g, t) in tot.iter().enumerate().take(width.div_ceil(l)) {
        s.to_lanes_w(t[0], &mut dys);
        s.to_lanes_w(t[1], &mut xdys);
        s.to_lanes_w(t[2], &mut xs);
        let n = l.min(width - g * l);
        let sums = dys.iter().zip(&xdys).zip(&xs);
        for (slot, ((&dy, &xdy), &x)) in out[g * l..g * l + n].iter_mut().zip(sums) {
            *slot = slot.add(GradSums { dy, xdy, x });
        }
    }
}

/// Register groups walked together in [`grad_sums_chunked`] (their sums kept in memory between
/// chunks of rows): a strip of 256 f32 channels on any backend.
const CHUNKED_GROUPS: usize = 16;

/// Rows a register group of `G` vectors of `E` may walk down rows of `c` values before its lines
/// meet again in the same L1 set ([`KMAX`]: no chunks; see [`l1_sets_walked`]: rows 4 KiB apart
/// start in one set of 8 or 12 ways). Where the group's row is one cache line of f32 (AVX2 and
/// portable groups), a walk of x
/// and dy down 16 rows 4 KiB apart keeps 32 lines in flight in one set, which evict each other
/// before use; four rows per set (8 lines of x and dy) fit. Measured, AMD EPYC family 25, AVX2
/// backend, NHWC f32 backward, one thread, buffers 16 bytes past a page boundary (as malloc
/// places a large `Vec`; each group then straddles two lines per row, and page-aligned buffers
/// lose little): 1x1024x7x7 44.0 → 27.7 µs (26.6 at 1040 channels), 1x2048x7x7 93.3 → 58.4,
/// 1x512x14x14 50.1 → 42.7 (44.8 at 528). Wider groups (AVX-512: four
/// lines per row) and half or f64 data showed no such loss there and measured 2–20% slower in
/// chunks, so they walk whole columns, except half data on rows a multiple of 4 KiB apart (2048
/// channels), whose 16-row walks keep 32 half-used lines in one set: on AMD EPYC family 25 model 1
/// (Zen 3), AVX2, one thread, NHWC backward, the builds alternated, bf16 256x2048x1x1 386.8 →
/// 294.4 µs, f16 376.8 → 248.4, bf16 1x2048x7x7 85.5 → 67.9, f16 82.3 → 62.2 (chunked at 2 KiB
/// too, bf16 1x1024x7x7 went 29.3 → 31.3, so not there).
///
/// Half data on rows of 128 to 512 bytes (64 to 256 channels) walk in chunks of 8 rows: there
/// two register groups share each line of a row, and a tile of such rows outgrows L1, so a
/// group's walk down the whole tile reads from L2 the lines its neighbour had read. Same host
/// and method, min of 7 alternated processes, NHWC backward: bf16 1x64x112x112 332.6 → 315.3
/// µs, 8x64x56x56 664.1 → 623.6, 4x128x56x56 696.1 → 589.3, 1x256x56x56 344.0 → 317.2,
/// 32x256x14x14 715.0 → 638.5; f16 8x64x56x56 626.0 → 586.3, 1x256x56x56 311.7 → 281.8
/// (chunks of 4 rows gained less: 3–7%). Not on narrower rows: 8x32x56x56 (64-byte rows) went
/// 268.6 → 350.6 µs; 1 KiB rows gained nothing (1x512x14x14 45.9 → 46.0 µs).
///
/// f32 data on rows of 256 bytes to 1 KiB (64 to 256 channels) walk in chunks of 8 rows too: the
/// x and dy of a tile of such rows (64 Ki values) take 512 KiB, Zen 3's whole L2, so a group's
/// walk down the whole tile has evicted, by its end, lines its neighbours' walks still read. Same
/// host, min of 9 alternated processes, NHWC f32 backward: 1x64x112x112 430.4 → 380.9 µs,
/// 8x64x56x56 1027.6 → 897.9, 1x128x56x56 209.3 → 184.7, 1x192x28x28 70.4 → 63.9, 1x256x56x56
/// 446.0 → 364.3, 32x256x14x14 1098.8 → 966.9 (chunks of 4 rows: 0–4% slower than 8). Not on
/// 128-byte rows: 1x32x112x112 went 172.7 → 194.5 µs.
///
/// f64 data whose register group's row is two lines (AVX2: 16 channels) walk in chunks of 8 rows
/// on rows of 512 bytes to 2 KiB (64 to 256 channels), for the same reason. Same host and method
/// (min of 9): NHWC f64 backward 1x64x112x112 916.9 → 789.4 µs, 8x64x56x56 3100 → 2835,
/// 1x256x56x56 1149 → 1029, 32x256x14x14 4902 → 3918, 1x128x56x56 349.6 → 355.3 (and 404.6 →
/// 378.5 in a run of 7). Not on 256-byte rows (1x32x112x112 343.2 → 384.1 µs) nor on rows of 4
/// and 8 KiB (1x512x14x14 133.9 → 137.8, 2x1024x7x7 140.7 → 143.6).
#[inline(always)]
fn conflict_free_rows<S: Simd, E: Element, const G: usize>(c: usize) -> usize {
    let size = std::mem::size_of::<E>();
    let sets = l1_sets_walked(c * size);
    let f32_line = size == 4 && G * S::LANES * size == 64;
    let half_line = size == 2 && G * S::LANES * size == 32;
    let f64_lines = size == 8 && G * S::LANES * size == 128;
    // The three measured rules above (half rows of 128–512 bytes, f32 of 256 bytes–1 KiB, f64 of
    // 512 bytes–2 KiB) are one: 64 to 256 channels, groups of at most two lines per row.
    if (half_line || f32_line || f64_lines) && (64..=256).contains(&c) {
        return 8;
    }
    // Otherwise half data is chunked only where every row starts in one set.
    if !(f32_line || half_line && sets == 1) {
        return KMAX;
    }
    (4 * sets).min(KMAX)
}

/// As [`grad_sums_strided`] for up to [`CHUNKED_GROUPS`] register groups side by side (channels
/// `first..first + out.len()`), walking down the rows in chunks of `chunk` rows (a divisor of
/// [`KMAX`]), all the groups of a chunk before the next: each group adds the same rows in the same
/// order and folds at the same rows as in [`grad_sums_strided`], so the sums are bit-identical.
#[inline(always)]
fn grad_sums_chunked<S: Simd<T = E::Param>, E: Element, const G: usize>(
    s: S,
    xs: (&[E], &[E]),
    (c, first, chunk): (usize, usize, usize),
    pivots: &[E::Param],
    out: &mut [GradSums],
    prefetch: bool,
) {
    debug_assert!(KMAX.is_multiple_of(chunk));
    let w = G * S::LANES;
    let width = (c - first)
        .min(out.len())
        .min(pivots.len())
        .min(CHUNKED_GROUPS * w);
    let groups = width.div_ceil(w);
    // Loops, not closures, here and below: a closure may be compiled outside the target-feature
    // entry point.
    let rows = xs.0.len().min(xs.1.len()) / c;
    let mut sums = [GroupSums::<S, G>::empty(s); CHUNKED_GROUPS];
    for (g, group) in sums.iter_mut().enumerate().take(groups) {
        let o = g * w;
        *group = GroupSums::new(s, (rows, first + o, width - o), &pivots[o..]);
    }
    let (whole, sums) = (width / w, &mut sums[..groups]);
    // The groups' f32 sums since the last fold. Zeroed once here, then group by group as each is
    // folded: zeroing the whole array every band (on AVX2 a 3 KiB `rep stosb` every 16 rows) made
    // the sums of an L2-sized f32 NHWC 1x64x16x32 backward take 6.3–7.1 µs instead of 5.2–5.3
    // (AMD EPYC family 25 model 1, Zen 3, one thread).
    let mut acc = [[[s.zero(); 3]; G]; CHUNKED_GROUPS];
    for band in (0..rows).step_by(KMAX) {
        for rows in (band..(band + KMAX).min(rows)).step_by(chunk) {
            for (g, (group, acc)) in sums.iter().zip(&mut acc).enumerate() {
                if prefetch {
                    let ahead = rows + PREFETCH_ROWS;
                    let cols = (c, group.first, group.width);
                    let rows = ahead..(ahead + chunk).min(group.rows);
                    prefetch_rows(xs.0, cols, rows.clone());
                    prefetch_rows(xs.1, cols, rows);
                }
                if g < whole {
                    group.add_rows::<E, true>(s, xs, c, rows..rows + chunk, acc);
                } else {
                    group.add_rows::<E, false>(s, xs, c, rows..rows + chunk, acc);
                }
            }
        }
        for (group, acc) in sums.iter_mut().zip(&mut acc) {
            group.fold(s, acc);
            *acc = [[s.zero(); 3]; G];
        }
    }
    for (g, group) in sums.iter().enumerate() {
        group.write(s, &mut out[g * w..]);
    }
}

impl<E: Element> Kernel for GradSumsRows<'_, E> {
    type T = E::Param;
    type Output = ();

    #[inline(always)]
    fn run<S: Simd<T = E::Param>>(self, s: S) {
        let c = self.pivots.len();
        if c == 0 {
            return;
        }
        let l = S::LANES;
        if c >= sum_group::<S>() * l {
            let end = (self.first + self.out.len()).min(c);
            if let Some(pivots) = self.pivots.get(self.first..) {
                let xs = (self.x, self.dy);
                column_groups(
                    s,
                    xs,
                    (c, self.from_memory),
                    self.first..end,
                    pivots,
                    self.out,
                );
            }
            return;
        }
        if self.first != 0 {
            return;
        }
        // Narrow rows: lane `q` always holds channel `q mod c` (the period is a multiple of both
        // `c` and the lane count), so whole periods are rows of `per` values, reduced by the
        // same register groups; each position's sums are then added to its channel's. The rows
        // after the last whole period are one narrow group, and a partial row (none from the
        // drivers) is summed in scalar f64. Measured against lane sums kept in memory (one
        // thread, AMD EPYC family 26, with `rows_as_they_are`): NHWC 1x32x112x112 backward
        // 162.6 → 87.6 µs (f32), 106.9 → 64.8 µs (bf16).
        let n = self.x.len().min(self.dy.len());
        if rows_as_they_are(c, l, n / c) {
            // One group spans the row: its walk is sequential.
            column_groups(
                s,
                (self.x, self.dy),
                (c, false),
                0..c,
                self.pivots,
                self.out,
            );
            return;
        }
        let per = period(c, l);
        let piv = expand_periodic(self.pivots, per);
        let (body, rows) = (n / per * per, n / c * c);
        let mut parts = scratch::zeroed::<GradSums>(per);
        let xs = (&self.x[..body], &self.dy[..body]);
        column_groups(s, xs, (per, false), 0..per, &piv, &mut parts);
        let xs = (&self.x[body..rows], &self.dy[body..rows]);
        column_groups(s, xs, (c, false), 0..c, self.pivots, &mut parts);
        for (q, (&x, &g)) in self.x[rows..n].iter().zip(&self.dy[rows..n]).enumerate() {
            let (d, g): (f64, f64) = ((x.to_param() - piv[q]).into(), g.into());
            let p = &mut parts[q];
            *p = p.add(GradSums {
                dy: g,
                xdy: d * g,
                x: d,
            });
        }
        for (q, part) in parts.iter().enumerate() {
            if let Some(slot) = self.out.get_mut(q % c) {
                *slot = slot.add(*part);
            }
        }
    }
}

/// Vectors of channels per register group of [`grad_sums_strided`] on this backend: 16 vector
/// registers (AVX2, or f64 on AVX-512) hold 2 groups' sums and pivots; 32 (AVX-512) hold 4.
#[inline(always)]
fn sum_group<S: Simd>() -> usize {
    if S::REGISTERS >= 32 {
        2 * SUM_GROUP
    } else {
        SUM_GROUP
    }
}

/// [`grad_sums_strided`] for the channels `cols` of rows of `c` values, a register group at a
/// time, or [`grad_sums_chunked`] where whole columns would meet in the L1 cache's sets;
/// `pivots[0]` and `out[0]` belong to channel `cols.start`.
///
/// Each group width runs in an entry point of its own ([`Simd::enter`]): in the dev profile
/// (AMD EPYC family 25 model 1) the NHWC sums' four call sites with both widths inlined took a
/// frame of 0.8 MB for f64 data on AVX2 (1.2 MB on AVX-512).
#[inline(always)]
fn column_groups<S: Simd<T = E::Param>, E: Element>(
    s: S,
    xs: (&[E], &[E]),
    (c, from_memory): (usize, bool),
    cols: std::ops::Range<usize>,
    pivots: &[E::Param],
    out: &mut [GradSums],
) {
    let c = (c, from_memory);
    if sum_group::<S>() > SUM_GROUP {
        s.enter(GroupsOf::<_, _, { 2 * SUM_GROUP }>(
            s, xs, c, cols, pivots, out,
        ));
    } else {
        s.enter(GroupsOf::<_, _, SUM_GROUP>(s, xs, c, cols, pivots, out));
    }
}

thunk!(GroupsOf['a, S, E: Element, const G: usize] for ['a, S, E, G]
    (s: S, xs: (&'a [E], &'a [E]), c: (usize, bool), cols: std::ops::Range<usize>,
        pivots: &'a [E::Param], out: &'a mut [GradSums])
    where [S: Simd<T = E::Param>]
    -> () => groups_of::<S, E, G>(s, xs, c, cols, pivots, out));

/// [`column_groups`] with `G` vectors per register group.
#[inline(always)]
fn groups_of<S: Simd<T = E::Param>, E: Element, const G: usize>(
    s: S,
    xs: (&[E], &[E]),
    (c, from_memory): (usize, bool),
    cols: std::ops::Range<usize>,
    pivots: &[E::Param],
    out: &mut [GradSums],
) {
    let w = G * S::LANES;
    // One group's walk over whole rows is sequential already (and asking ahead measured 6–10%
    // slower there: NHWC 32x64x56x56, AVX-512).
    let from_memory = from_memory && cols.len() > w;
    let chunk = if from_memory {
        PREFETCH_ROWS
    } else {
        conflict_free_rows::<S, E, G>(c)
    };
    let step = if chunk < KMAX { CHUNKED_GROUPS * w } else { w };
    for first in cols.clone().step_by(step) {
        let o = first - cols.start;
        let (Some(p), Some(out)) = (pivots.get(o..), out.get_mut(o..)) else {
            return;
        };
        if chunk < KMAX {
            grad_sums_chunked::<S, E, G>(s, xs, (c, first, chunk), p, out, from_memory);
        } else if (c - first).min(p.len()).min(out.len()) >= w {
            grad_sums_strided::<S, E, G, true>(s, xs, c, first, p, out);
        } else {
            grad_sums_strided::<S, E, G, false>(s, xs, c, first, p, out);
        }
    }
}

/// Parameters of `dx = a·dy + b·x̂ + c` with `x̂ = (x − shift)·r`.
///
/// Normalizing x first keeps every coefficient representable: folding r into b (b·r·(x − K))
/// overflows f32 for a tiny variance with ε = 0 although every term of dx is ordinary (found by
/// fuzzing). The extra multiply is free in a memory-bound loop.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(crate) struct DxParams<T = f32> {
    pub shift: T,
    pub r: T,
    pub a: T,
    pub b: T,
    pub c: T,
}

/// [`DxParams`] splat across the lanes.
#[derive(Clone, Copy)]
struct SplatDx<V> {
    shift: V,
    r: V,
    a: V,
    b: V,
    c: V,
}

impl<V: Copy> SplatDx<V> {
    #[inline(always)]
    fn new<S: Simd<V = V>>(s: S, p: &DxParams<S::T>) -> Self {
        let (shift, r) = (s.splat(p.shift), s.splat(p.r));
        SplatDx {
            shift,
            r,
            a: s.splat(p.a),
            b: s.splat(p.b),
            c: s.splat(p.c),
        }
    }
}

impl<S: Simd> VectorMap<S> for SplatDx<S::V> {
    const BINARY: bool = true;
    #[inline(always)]
    fn apply(&self, s: S, _: usize, g: S::V, x: S::V) -> S::V {
        let xhat = s.mul(s.sub(x, self.shift), self.r);
        s.mul_add(self.b, xhat, s.mul_add(self.a, g, self.c))
    }
}

/// [`DxParams`] per position of the period.
#[derive(Clone, Copy)]
struct PeriodicDx<'a, T> {
    shift: &'a [T],
    r: &'a [T],
    a: &'a [T],
    b: &'a [T],
    c: &'a [T],
}

impl<S: Simd> VectorMap<S> for PeriodicDx<'_, S::T> {
    const BINARY: bool = true;
    #[inline(always)]
    fn apply(&self, s: S, p: usize, g: S::V, x: S::V) -> S::V {
        let fields = [self.shift, self.r, self.a, self.b, self.c];
        debug_assert!(fields.iter().all(|f| p + S::LANES <= f.len()));
        // SAFETY: the phase `p` lies inside the period and every array holds the period plus
        // MAX_LANES ≥ LANES values (built by `PeriodicLanes::new`).
        unsafe {
            let at = |f: &[S::T]| f.as_ptr().add(p);
            let xhat = s.mul(s.sub(x, s.load_ptr(at(self.shift))), s.load_ptr(at(self.r)));
            let ag = s.mul_add(s.load_ptr(at(self.a)), g, s.load_ptr(at(self.c)));
            s.mul_add(s.load_ptr(at(self.b)), xhat, ag)
        }
    }
}

/// `dx = a·dy + b·(x − shift) + c` on one contiguous run (`io` carries dy → dx).
pub(crate) struct DxRun<'a, IO: InOut> {
    pub x: &'a [IO::Elem],
    pub io: IO,
    pub p: DxParams<Param<IO>>,
    /// Store dx past the caches ([`stream_alike_nt`]): the tensors are larger than the
    /// last-level cache.
    pub streaming: bool,
}

impl<IO: InOut> Kernel for DxRun<'_, IO> {
    type T = Param<IO>;
    type Output = ();

    #[inline(always)]
    fn run<S: Simd<T = Param<IO>>>(self, s: S) {
        if self.streaming {
            return s.enter(DxPastCaches(s, self));
        }
        let op = SplatDx::new(s, &self.p);
        stream_alike(s, self.io, Some(self.x), &op);
    }
}

thunk!(DxPastCaches['a, S, IO: InOut] for ['a, S, IO] (s: S, k: DxRun<'a, IO>)
where [S: Simd<T = Param<IO>>]
-> () => {
    let op = SplatDx::new(s, &k.p);
    stream_alike_nt(s, k.io, Some(k.x), &op);
    s.stream_fence();
});

/// `dx = a·dy + b·(x − shift) + c` over consecutive runs of `run` elements, run `i` with
/// `params[i]` (one call for many short runs; `io` carries dy → dx).
pub(crate) struct DxRuns<'a, IO: InOut> {
    pub x: &'a [IO::Elem],
    pub io: IO,
    pub run: usize,
    pub params: &'a [DxParams<Param<IO>>],
    /// Store dx past the caches, as [`DxRun`]'s `streaming`.
    pub streaming: bool,
}

impl<IO: InOut> Kernel for DxRuns<'_, IO> {
    type T = Param<IO>;
    type Output = ();

    #[inline(always)]
    fn run<S: Simd<T = Param<IO>>>(self, s: S) {
        if self.run == 0 {
            return;
        }
        if self.streaming {
            return s.enter(DxRunsPastCaches(s, self));
        }
        self.runs(s, false);
    }
}

thunk!(DxRunsPastCaches['a, S, IO: InOut] for ['a, S, IO] (s: S, k: DxRuns<'a, IO>)
where [S: Simd<T = Param<IO>>]
-> () => {
    k.runs(s, true);
    s.stream_fence();
});

impl<IO: InOut> DxRuns<'_, IO> {
    /// The runs, their dx stored past the caches where `nt` ([`stream_run_nt`]).
    #[inline(always)]
    fn runs<S: Simd<T = Param<IO>>>(mut self, s: S, nt: bool) {
        let n = self
            .io
            .len()
            .min(self.x.len())
            .min(self.run * self.params.len());
        let (src, dst) = self.io.ptrs();
        for (i, p) in self.params.iter().enumerate() {
            let start = i * self.run;
            if start >= n {
                break;
            }
            let len = self.run.min(n - start);
            let op = SplatDx::new(s, p);
            // SAFETY: `start + len <= n`, within `io` (its pointers are valid for `io.len()`) and
            // within `x`.
            unsafe {
                let ptrs = (src.add(start), self.x.as_ptr().add(start), dst.add(start));
                if nt {
                    stream_run_nt(s, ptrs, len, &op);
                } else {
                    stream_run(s, ptrs, len, &op);
                }
            }
        }
    }
}

/// `dx = a[c]·dy + b[c]·(x − shift[c]) + c[c]` over whole rows of `params.len()` channels;
/// `lanes` are the parameters' periodic lanes ([`DxLanes::dx`]).
pub(crate) struct DxRows<'a, IO: InOut> {
    pub x: &'a [IO::Elem],
    pub io: IO,
    pub params: &'a [DxParams<Param<IO>>],
    pub lanes: &'a DxLanes<Param<IO>>,
    /// `lanes` in the order of interleaved bfloat16 pairs ([`super::paired_lanes`]), where the
    /// data and backend want them.
    pub paired: Option<&'a DxLanes<Param<IO>>>,
    /// Store dx past the caches (the tensors are larger than the last-level cache) where the
    /// rows' parameter lanes fit their share of L1 ([`stream_periodic_nt`]), as
    /// [`super::AffineRows`] does; wider rows keep the strips' plain stores.
    pub streaming: bool,
}

impl<T: Real> DxLanes<T> {
    /// The periodic lanes of `params`.
    pub(crate) fn dx(params: &[DxParams<T>]) -> DxLanes<T> {
        PeriodicLanes::new(params, |p| [p.shift, p.r, p.a, p.b, p.c])
    }
}

impl<IO: InOut> DxRows<'_, IO> {
    /// With at least `G` vectors of channels per row (`G` = what keeps the 5 parameters of a
    /// register group in registers), walks each group of channels down the rows; returns whether
    /// it did (else the periodic lanes are used).
    #[inline(always)]
    fn columns<S: Simd<T = Param<IO>>, const G: usize>(&mut self, s: S) -> bool {
        let c = self.params.len();
        if !use_columns::<S>(c, G) || column_group::<S>(5) < G {
            return false;
        }
        for first in (0..c).step_by(G * S::LANES) {
            let p = &self.params[first..];
            let op = GroupDx::<S::V, G> {
                shift: group_vectors(s, p, |p| p.shift),
                r: group_vectors(s, p, |p| p.r),
                a: group_vectors(s, p, |p| p.a),
                b: group_vectors(s, p, |p| p.b),
                c: group_vectors(s, p, |p| p.c),
            };
            let cols = (c, first, G * S::LANES);
            stream_columns::<S, _, G>(s, &mut self.io, Some(self.x), cols, &op);
        }
        true
    }
}

/// [`DxParams`] with one parameter vector per vector of a register group.
#[derive(Clone, Copy)]
struct GroupDx<V, const G: usize> {
    shift: [V; G],
    r: [V; G],
    a: [V; G],
    b: [V; G],
    c: [V; G],
}

impl<S: Simd, const G: usize> VectorMap<S> for GroupDx<S::V, G> {
    const BINARY: bool = true;
    #[inline(always)]
    fn apply(&self, s: S, phase: usize, g: S::V, x: S::V) -> S::V {
        let k = phase / S::LANES;
        let xhat = s.mul(s.sub(x, self.shift[k]), self.r[k]);
        s.mul_add(self.b[k], xhat, s.mul_add(self.a[k], g, self.c[k]))
    }
}

impl<IO: InOut> Kernel for DxRows<'_, IO> {
    type T = Param<IO>;
    type Output = ();

    #[inline(always)]
    fn run<S: Simd<T = Param<IO>>>(mut self, s: S) {
        let c = self.params.len();
        if c == 0 {
            return;
        }
        if self.streaming && strip_width::<S::T, IO::Elem>(self.lanes.period, 5).is_none() {
            return s.enter(DxPeriodsPastCaches(s, self));
        }
        if S::REGISTERS >= 32 {
            if self.columns::<S, 4>(s) {
                return;
            }
        } else if self.columns::<S, 2>(s) {
            return;
        }
        let [shift, r, a, b, c] = &self.lanes.fields;
        let op = PeriodicDx { shift, r, a, b, c };
        let period = self.lanes.period;
        match strip_width::<S::T, IO::Elem>(period, 5) {
            Some(strip) => {
                let cols = (self.params.len(), period, strip);
                stream_strips(s, self.io, Some(self.x), cols, &op)
            }
            None => match self.paired {
                Some(paired) => {
                    let [shift, r, a, b, c] = &paired.fields;
                    let paired = PeriodicDx { shift, r, a, b, c };
                    stream_paired(s, self.io, Some(self.x), period, (&op, &paired))
                }
                None => stream(s, self.io, Some(self.x), period, &op),
            },
        }
    }
}

/// `dx = a·dy + b·(x − shift) + c` over part of one row of interleaved channels, from the
/// channel of `lanes`' first lane on (the head and tail of NHWC rows peeled to aligned outputs,
/// see the NHWC driver's `dx_blocks`): the periodic lanes' plain walk, which takes any length.
/// The same arithmetic as [`DxRows`]'s maps, so the same bits.
pub(crate) struct DxRowPart<'a, IO: InOut> {
    pub x: &'a [IO::Elem],
    pub io: IO,
    pub lanes: &'a DxLanes<Param<IO>>,
}

impl<IO: InOut> Kernel for DxRowPart<'_, IO> {
    type T = Param<IO>;
    type Output = ();

    #[inline(always)]
    fn run<S: Simd<T = Param<IO>>>(self, s: S) {
        if self.io.len() == 0 || self.lanes.period == 0 {
            return;
        }
        let [shift, r, a, b, c] = &self.lanes.fields;
        let op = PeriodicDx { shift, r, a, b, c };
        stream(s, self.io, Some(self.x), self.lanes.period, &op)
    }
}

thunk!(DxPeriodsPastCaches['a, S, IO: InOut] for ['a, S, IO] (s: S, k: DxRows<'a, IO>)
where [S: Simd<T = Param<IO>>]
-> () => {
    let mut k = k;
    let [shift, r, a, b, c] = &k.lanes.fields;
    let op = PeriodicDx { shift, r, a, b, c };
    let n = k.io.len().min(k.x.len());
    let (src, dst) = k.io.ptrs();
    // SAFETY: the pointers are valid for `n` elements (`io` and x); the lanes hold the period
    // plus `MAX_LANES` values (`PeriodicLanes::new`).
    unsafe { stream_periodic_nt(s, (src, k.x.as_ptr(), dst), n, k.lanes.period, &op) };
    s.stream_fence();
});

// SAFETY: plain f32/f64/u64 fields: all-zero is a valid value, no drop glue, alignment ≤ 8.
unsafe impl crate::scratch::Zeroable for GradSums {}

// SAFETY: plain f32/f64 fields: all-zero is a valid value, no drop glue, alignment ≤ 8.
unsafe impl<T: Real> crate::scratch::Zeroable for DxParams<T> {}

/// ReLU's backward through its saved output: `out = dy` where `y > 0`, else 0, with `dy` the
/// stream's input and `y` the second input (the same range).
pub(crate) struct ReluGrad<'a, IO: InOut> {
    pub io: IO,
    pub y: &'a [IO::Elem],
}

#[derive(Clone, Copy)]
struct WherePositive;

impl<S: Simd> VectorMap<S> for WherePositive {
    const BINARY: bool = true;
    #[inline(always)]
    fn apply(&self, s: S, _: usize, dy: S::V, y: S::V) -> S::V {
        s.where_positive(dy, y)
    }
}

impl<IO: InOut> Kernel for ReluGrad<'_, IO> {
    type T = Param<IO>;
    type Output = ();

    #[inline(always)]
    fn run<S: Simd<T = Param<IO>>>(self, s: S) {
        stream_alike(s, self.io, Some(self.y), &WherePositive);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::normalize::tests::{GUARD, guarded, values};
    use crate::kernels::stream::Io;
    use crate::simd::Backend;
    use std::ops::Range;

    /// The streamed buffer equals the plain one bit for bit, every NaN counted as one value, and
    /// keeps its guard values outside `range` (bit for bit), and the plain walk wrote every value
    /// of `range` (a check of the check). NaNs: where an input NaN meets the default NaN of
    /// ∞ − ∞ in one FMA, which of the two comes out depends on the operand order of the
    /// instruction form the compiler picked for that walk (seen on the portable backend: +NaN
    /// against −NaN, the walk taken depending on the buffer's alignment).
    fn assert_same_writes(plain: &[f32], streamed: &[f32], range: Range<usize>, at: &str) {
        let bits = |v: &[f32]| {
            let value = |x: &f32| if x.is_nan() { 1 } else { x.to_bits() };
            v[range.clone()].iter().map(value).collect::<Vec<_>>()
        };
        assert_eq!(bits(plain), bits(streamed), "{at}");
        let (before, after) = (&streamed[..range.start], &streamed[range.end..]);
        assert!(
            before.iter().chain(after).all(|v| v.to_bits() == GUARD),
            "{at}: wrote outside its range"
        );
        assert!(plain[range].iter().all(|v| v.to_bits() != GUARD), "{at}");
    }

    /// f64 dx stored past the caches is exactly the plain stores' dx, on every backend: one run
    /// ([`DxRun`]), runs of three channels ([`DxRuns`]) and NHWC rows of 7 and 24 channels
    /// ([`DxRows`]), every output start within 128 bytes; nothing written outside the range.
    #[test]
    fn streaming_f64_dx_matches_plain_dx() {
        const GUARD64: u64 = 0x7FF8_0000_DEAD_BEEF;
        let p = DxParams {
            shift: 1.5f64,
            r: 0.75,
            a: -2.0,
            b: 0.5,
            c: 3.0,
        };
        let params = [p, DxParams { r: -3.0, ..p }, DxParams { shift: -7.0, ..p }];
        for backend in Backend::available() {
            for n in [0usize, 1, 17, 64, 65, 257, 1031] {
                let dy: Vec<f64> = values(n + 32).iter().map(|&v| f64::from(v) / 3.0).collect();
                let x: Vec<f64> = dy.iter().rev().map(|v| v * 0.5 + 1.0).collect();
                for off in 0..16 {
                    for kind in 0..4 {
                        let c = [1, 3, 7, 24][kind];
                        let n = n / c * c;
                        let row: Vec<DxParams<f64>> = (0..c).map(|k| params[k % 3]).collect();
                        let lanes = DxLanes::dx(&row);
                        let run = |streaming: bool| {
                            let mut out = vec![f64::from_bits(GUARD64); n + 32];
                            let (x, dst) = (&x[off..off + n], &mut out[off..off + n]);
                            let io = Io::Separate(&dy[off..off + n], dst);
                            match kind {
                                0 => backend.dispatch(DxRun {
                                    x,
                                    io,
                                    p,
                                    streaming,
                                }),
                                1 => backend.dispatch(DxRuns {
                                    x,
                                    io,
                                    run: n / 3,
                                    params: &params,
                                    streaming,
                                }),
                                _ => backend.dispatch(DxRows {
                                    x,
                                    io,
                                    params: &row,
                                    lanes: &lanes,
                                    paired: None,
                                    streaming,
                                }),
                            }
                            // NaNs as one value (see `assert_same_writes`); the guard,
                            // a NaN too, keeps its bits.
                            let bits = |v: &f64| match v.to_bits() {
                                GUARD64 => GUARD64,
                                _ if v.is_nan() => 1,
                                b => b,
                            };
                            out.iter().map(bits).collect::<Vec<_>>()
                        };
                        let (plain, streamed) = (run(false), run(true));
                        let at = format!("{backend:?} n {n} offset {off} kind {kind}");
                        assert_streamed_bits(&plain, &streamed, off..off + n, GUARD64, &at);
                    }
                }
            }
        }
    }

    /// Half data stored past the caches (the conversion into a register, then a streaming store
    /// of its 16 or 32 bytes) writes exactly what the plain stores write, for f16 and bf16, on
    /// every backend: the affine map and dx on one run, on runs of 7 channels and on NHWC rows
    /// of 7 and 24 channels; every output start within 32 bytes; nothing written outside the
    /// range.
    #[test]
    fn streaming_half_matches_plain_half() {
        streaming_half(crate::f16::from_bits, crate::f16::to_bits);
        streaming_half(crate::bf16::from_bits, crate::bf16::to_bits);
    }

    /// The one-channel passes over half data (NCHW normalize and dx: [`AffineRun`],
    /// [`AffineRuns`], [`DxRun`], [`DxRuns`]) write the same bits on every backend whose
    /// multiply-add is fused, which [`Backend::for_splat_f16`] relies on to run f16 data's on
    /// `avx2` under the `avx512` backend: f16 and bf16, lengths around the vector widths and
    /// primes, every output start within 32 bytes, with ReLU and a residual, NaN, ±∞, ±0 and
    /// subnormal values (NaNs compared as one value, as in [`streaming_half_matches_plain_half`]).
    ///
    /// [`AffineRun`]: crate::kernels::AffineRun
    /// [`AffineRuns`]: crate::kernels::AffineRuns
    #[test]
    fn half_splat_passes_are_the_same_bits_on_every_fused_backend() {
        splat_half(crate::f16::from_bits, crate::f16::to_bits);
        splat_half(crate::bf16::from_bits, crate::bf16::to_bits);
    }

    /// NHWC rows of half data ([`AffineRows`]) write the same bits on every backend whose
    /// multiply-add is fused and on the AVX2 code with AVX-512VL's registers, where the CPU has
    /// it ([`crate::simd::Avx2Vl`], on which [`Backend::dispatch_f16_rows`] runs f16 rows of a
    /// 64-value lane period: register groups of 8 vectors): f16 and bf16, channel counts whose
    /// period is 64 (1, 8, 16, 32, 64) and others (3, 24, 33, 48, 65, 96), row
    /// counts 0 to 5 and 17, every output start within 32 bytes, with and without the subtract,
    /// with ReLU and a residual, NaN, ±∞, ±0 and subnormal values; nothing written outside the
    /// range.
    ///
    /// [`AffineRows`]: crate::kernels::AffineRows
    #[test]
    fn half_rows_are_the_same_bits_on_every_fused_backend() {
        rows_half(crate::f16::from_bits, crate::f16::to_bits);
        rows_half(crate::bf16::from_bits, crate::bf16::to_bits);
    }

    /// [`half_rows_are_the_same_bits_on_every_fused_backend`] for the storage type whose bits
    /// convert by `from` and `to`.
    fn rows_half<E: Element<Param = f32>>(from: fn(u16) -> E, to: fn(E) -> u16) {
        use crate::kernels::{AffineLanes, AffineRows, ChannelAffine, Fuse};
        let fused: Vec<Backend> = Backend::available()
            .into_iter()
            .filter(|b| b.fused_mul_add())
            .collect();
        let Some((&first, rest)) = fused.split_first() else {
            return;
        };
        type Run<'a, E> = &'a dyn Fn(AffineRows<'_, Io<'_, E>>) -> bool;
        for c in [1usize, 3, 8, 16, 24, 32, 33, 48, 64, 65, 96] {
            // Kind 0: every shift +0 and the subtract left out (`shifted: false`, as the drivers
            // set it); the other kinds: shifts of both signs and zero.
            let params = |shifts: [f32; 4]| -> Vec<ChannelAffine> {
                (0..c)
                    .map(|k| ChannelAffine {
                        shift: shifts[k % 4],
                        scale: 1.25 - k as f32 * 0.0625,
                        bias: 0.125 * k as f32 - 1.0,
                    })
                    .collect()
            };
            let (unshifted, shifted) = (params([0.0; 4]), params([-0.5, 0.0, 2.0, 0.25]));
            let lanes = [&unshifted, &shifted].map(|p| AffineLanes::affine(p));
            for rows in [0usize, 1, 2, 3, 5, 17] {
                let n = rows * c;
                let dy: Vec<E> = values(n + 32).iter().map(|&v| E::from_param(v)).collect();
                let x: Vec<E> = dy.iter().rev().copied().collect();
                for off in 0..16 {
                    for kind in 0..4 {
                        let at = format!("{} c {c} rows {rows} offset {off} kind {kind}", E::NAME);
                        let s = usize::from(kind != 0);
                        let run = |on: Run<'_, E>| {
                            let mut out = vec![from(0x7E5A); n + 32];
                            let (x, dst) = (&x[off..off + n], &mut out[off..off + n]);
                            let ran = on(AffineRows {
                                io: Io::Separate(&dy[off..off + n], dst),
                                params: [&unshifted, &shifted][s],
                                lanes: &lanes[s],
                                paired: None,
                                shifted: kind != 0,
                                fuse: Fuse {
                                    z: (kind == 3).then_some(x),
                                    relu: kind >= 2,
                                },
                                streaming: false,
                            });
                            ran.then(|| half_bits(&out, to))
                        };
                        let want = run(&|k| {
                            first.dispatch(k);
                            true
                        })
                        .unwrap_or_default();
                        assert_half_guards(&want, off..off + n, &format!("{first:?} {at}"));
                        for &backend in rest {
                            let got = run(&|k| {
                                backend.dispatch(k);
                                true
                            });
                            assert_eq!(got, Some(want.clone()), "{backend:?} / {first:?}: {at}");
                        }
                        if let Some(got) = run(&|k| crate::simd::on_avx2_vl(k).is_some()) {
                            assert_eq!(got, want, "Avx2Vl against {first:?}: {at}");
                        }
                    }
                }
            }
        }
    }

    /// Every bit pattern of `bits` outside `range` is the guard 0x7E5A (nothing was written
    /// there).
    fn assert_half_guards(bits: &[u16], range: Range<usize>, at: &str) {
        let (before, after) = (&bits[..range.start], &bits[range.end..]);
        assert!(
            before.iter().chain(after).all(|&b| b == 0x7E5A),
            "{at}: wrote outside its range"
        );
    }

    /// The bits of half values (by `to`), NaNs as one value (see `assert_same_writes`); the
    /// guard 0x7E5A, a NaN too, keeps its bits.
    fn half_bits<E: Element<Param = f32>>(out: &[E], to: fn(E) -> u16) -> Vec<u16> {
        let bits = |v: &E| match to(*v) {
            0x7E5A => 0x7E5A,
            _ if v.to_param().is_nan() => 1,
            b => b,
        };
        out.iter().map(bits).collect()
    }

    /// [`half_splat_passes_are_the_same_bits_on_every_fused_backend`] for the storage type whose
    /// bits convert by `from` and `to`.
    fn splat_half<E: Element<Param = f32>>(from: fn(u16) -> E, to: fn(E) -> u16) {
        use crate::kernels::{AffineRun, AffineRuns, ChannelAffine, Fuse};
        let dxp = [1.5f32, -0.25, 0.0].map(|shift| DxParams {
            shift,
            r: 0.75,
            a: -2.0,
            b: 0.5,
            c: 3.0,
        });
        let ap = [-0.5f32, 0.0, 2.0].map(|shift| ChannelAffine {
            shift,
            scale: 1.25,
            bias: 0.125,
        });
        let fused: Vec<Backend> = Backend::available()
            .into_iter()
            .filter(|b| b.fused_mul_add())
            .collect();
        for n in [0usize, 1, 7, 8, 17, 64, 65, 257, 1031] {
            let dy: Vec<E> = values(n + 32).iter().map(|&v| E::from_param(v)).collect();
            let x: Vec<E> = dy.iter().rev().copied().collect();
            for off in 0..16 {
                for kind in 0..6 {
                    let run = |backend: Backend| {
                        let mut out = vec![from(0x7E5A); n + 32];
                        let (x, dst) = (&x[off..off + n], &mut out[off..off + n]);
                        let io = Io::Separate(&dy[off..off + n], dst);
                        let fuse = Fuse {
                            z: (kind == 5).then_some(x),
                            relu: kind >= 4,
                        };
                        let streaming = false;
                        let per = n.div_ceil(3).max(1);
                        match kind {
                            0 => backend.dispatch(DxRun {
                                x,
                                io,
                                p: dxp[0],
                                streaming,
                            }),
                            1 => backend.dispatch(DxRuns {
                                x,
                                io,
                                run: per,
                                params: &dxp,
                                streaming,
                            }),
                            2 => backend.dispatch(AffineRun {
                                io,
                                p: ap[0],
                                fuse,
                                streaming,
                            }),
                            _ => backend.dispatch(AffineRuns {
                                io,
                                run: per,
                                first: 0,
                                params: &ap,
                                shifted: true,
                                fuse,
                                streaming,
                            }),
                        }
                        half_bits(&out, to)
                    };
                    let Some((&first, rest)) = fused.split_first() else {
                        return;
                    };
                    let want = run(first);
                    let at = format!("{first:?} n {n} offset {off} kind {kind}");
                    assert_half_guards(&want, off..off + n, &at);
                    for &backend in rest {
                        assert_eq!(
                            run(backend),
                            want,
                            "{} {backend:?} against {first:?}: n {n} offset {off} kind {kind}",
                            E::NAME
                        );
                    }
                }
            }
        }
    }

    /// [`streaming_half_matches_plain_half`] for the storage type whose bits convert by `from`
    /// and `to`.
    fn streaming_half<E: Element<Param = f32>>(from: fn(u16) -> E, to: fn(E) -> u16) {
        use crate::kernels::{AffineLanes, AffineRows, AffineRun, AffineRuns, ChannelAffine, Fuse};
        let guard = from(0x7E5A);
        let dxp = DxParams {
            shift: 1.5,
            r: 0.75,
            a: -2.0,
            b: 0.5,
            c: 3.0,
        };
        let ap = ChannelAffine {
            shift: -0.5,
            scale: 1.25,
            bias: 0.125,
        };
        for backend in Backend::available() {
            for n in [0usize, 1, 17, 64, 65, 257, 1031] {
                let dy: Vec<E> = values(n + 32).iter().map(|&v| E::from_param(v)).collect();
                let x: Vec<E> = dy.iter().rev().copied().collect();
                for off in 0..16 {
                    for kind in 0..8 {
                        let c = [1, 7, 24][kind % 3];
                        let n = n / c * c;
                        let dxs = vec![dxp; c];
                        let affines = vec![ap; c];
                        let (dx_lanes, affine_lanes) =
                            (DxLanes::dx(&dxs), AffineLanes::affine(&affines));
                        let run = |streaming: bool| {
                            let mut out = vec![guard; n + 32];
                            let (x, dst) = (&x[off..off + n], &mut out[off..off + n]);
                            let io = Io::Separate(&dy[off..off + n], dst);
                            let fuse = Fuse::default();
                            match kind {
                                0 => backend.dispatch(DxRun {
                                    x,
                                    io,
                                    p: dxp,
                                    streaming,
                                }),
                                1 | 2 => backend.dispatch(DxRows {
                                    x,
                                    io,
                                    params: &dxs,
                                    lanes: &dx_lanes,
                                    paired: None,
                                    streaming,
                                }),
                                3 => backend.dispatch(AffineRun {
                                    io,
                                    p: ap,
                                    fuse,
                                    streaming,
                                }),
                                6 => backend.dispatch(DxRuns {
                                    x,
                                    io,
                                    run: n.div_ceil(7).max(1),
                                    params: &[dxp; 7],
                                    streaming,
                                }),
                                7 => backend.dispatch(AffineRuns {
                                    io,
                                    run: n.div_ceil(7).max(1),
                                    first: 0,
                                    params: &[ap; 7],
                                    shifted: true,
                                    fuse,
                                    streaming,
                                }),
                                _ => backend.dispatch(AffineRows {
                                    io,
                                    params: &affines,
                                    lanes: &affine_lanes,
                                    paired: None,
                                    shifted: true,
                                    fuse,
                                    streaming,
                                }),
                            }
                            half_bits(&out, to)
                        };
                        let (plain, streamed) = (run(false), run(true));
                        let at = format!("{backend:?} n {n} offset {off} kind {kind}");
                        assert_streamed_bits(&plain, &streamed, off..off + n, 0x7E5A, &at);
                    }
                }
            }
        }
    }

    /// The NHWC reduction that asks for its lines ahead (`from_memory`: every group of the strip
    /// in chunks of rows) gives the sums of the plain walk bit for bit, on every backend: strips
    /// of several groups, whole and partial, from channel 0 and from a later one, row counts
    /// around the chunk and [`KMAX`], with NaN, ±∞, ±0 and subnormal values (a NaN sum must be
    /// NaN in both, of either sign).
    #[test]
    fn prefetching_sums_match_plain_sums() {
        for backend in Backend::available() {
            for c in [24usize, 96, 128, 200, 256, 257] {
                let pivots: Vec<f32> = (0..c).map(|k| k as f32 * 0.5 - 3.0).collect();
                for rows in [0usize, 1, 7, 8, 9, 16, 17, 40] {
                    let x = values(rows * c);
                    let dy: Vec<f32> = values(rows * c + 5).into_iter().skip(5).collect();
                    // Narrow rows (24 channels) are reduced whole, from channel 0 only.
                    let firsts = if c < 64 {
                        vec![0]
                    } else {
                        vec![0, c / 3, c - 1]
                    };
                    for first in firsts {
                        let run = |from_memory: bool| {
                            let mut out = vec![GradSums::default(); c - first];
                            backend.dispatch(GradSumsRows {
                                x: &x,
                                dy: &dy,
                                pivots: &pivots,
                                first,
                                out: &mut out,
                                from_memory,
                            });
                            // Every NaN as one value: the two walks' NaN sums may differ in
                            // sign (the order of a NaN's operands), not in being NaN.
                            let bits = |v: f64| if v.is_nan() { 1 } else { v.to_bits() };
                            out.iter()
                                .map(|s| [s.dy, s.xdy, s.x].map(bits))
                                .collect::<Vec<_>>()
                        };
                        let (plain, ahead) = (run(false), run(true));
                        assert_eq!(plain, ahead, "{backend:?} c {c} rows {rows} first {first}");
                        if rows > 0 {
                            assert!(plain.iter().any(|s| s != &[0; 3]));
                        }
                    }
                }
            }
        }
    }

    /// The bits of a streamed buffer equal the plain one's (NaNs already mapped to one value by
    /// the caller), the guard `guard` stands outside `range` in the streamed buffer, and the
    /// plain walk wrote every value of `range`.
    fn assert_streamed_bits<B: PartialEq + Copy + std::fmt::Debug>(
        plain: &[B],
        streamed: &[B],
        range: Range<usize>,
        guard: B,
        at: &str,
    ) {
        assert_eq!(plain, streamed, "{at}");
        let outside = streamed[..range.start].iter().chain(&streamed[range.end..]);
        assert!(outside.into_iter().all(|&b| b == guard), "{at}");
        assert!(plain[range].iter().all(|&b| b != guard), "{at}");
    }

    /// NHWC rows of dx stored past the caches ([`DxRows`] with `streaming`, by the periodic
    /// lanes) are exactly what the plain rows write (a register group down the columns, or the
    /// lanes), on every backend: 7, 8, 16, 24, 32, 48, 64 and 80 channels, every output start
    /// within a line (every phase offset of the lanes), whole and partial last periods, dy
    /// separate and in place; nothing written outside the range.
    #[test]
    fn streaming_dx_rows_match_plain_rows() {
        for backend in Backend::available() {
            for c in [7usize, 8, 16, 24, 32, 48, 64, 80] {
                let params: Vec<DxParams> = (0..c)
                    .map(|k| DxParams {
                        shift: k as f32 * 0.25 - 1.0,
                        r: 1.0 + k as f32 * 0.125,
                        a: 0.5 - k as f32,
                        b: 0.75 * k as f32 - 3.0,
                        c: k as f32 * 0.01,
                    })
                    .collect();
                let lanes = DxLanes::dx(&params);
                for rows in [0usize, 1, 2, 5, 9] {
                    let n = rows * c;
                    let dy = values(n + 32);
                    let x: Vec<f32> = values(n + 32).into_iter().rev().collect();
                    for off in 0..16 {
                        let x = &x[off..off + n];
                        let run = |streaming: bool, in_place: bool| {
                            guarded(&dy, off, n, in_place, |io| {
                                backend.dispatch(DxRows {
                                    x,
                                    io,
                                    params: &params,
                                    lanes: &lanes,
                                    paired: None,
                                    streaming,
                                })
                            })
                        };
                        for in_place in [false, true] {
                            let (plain, streamed) = (run(false, in_place), run(true, in_place));
                            let at = format!(
                                "{backend:?} c {c} rows {rows} offset {off} in place {in_place}"
                            );
                            assert_same_writes(&plain, &streamed, off..off + n, &at);
                        }
                    }
                }
            }
        }
    }

    /// dx stored past the caches (`streaming`) is exactly the plain stores' dx, bit for bit, and
    /// nothing outside the range is written: every backend, every start of the output within a
    /// 64-byte line, lengths around the group size and primes, dy separate and in place (dx over
    /// dy), one run ([`DxRun`]) and consecutive runs of three channels ([`DxRuns`]).
    #[test]
    fn streaming_dx_matches_plain_dx() {
        let params = [
            DxParams {
                shift: 1.5,
                r: 0.75,
                a: -2.0,
                b: 0.5,
                c: 3.0,
            },
            DxParams {
                shift: 0.0,
                r: -3.0,
                a: 0.5,
                b: 1e-3,
                c: 0.0,
            },
            DxParams {
                shift: -7.0,
                r: 1e3,
                a: 1e-3,
                b: -1.0,
                c: -0.25,
            },
        ];
        let lengths = [0, 1, 15, 16, 17, 63, 64, 65, 97, 191, 257, 1031];
        for backend in Backend::available() {
            for &n in &lengths {
                let dy = values(n + 32);
                let x: Vec<f32> = values(n + 32).into_iter().rev().collect();
                for off in 0..16 {
                    let x = &x[off..off + n];
                    let run = |streaming: bool, in_place: bool| {
                        guarded(&dy, off, n, in_place, |io| {
                            if n % 2 == 0 {
                                backend.dispatch(DxRun {
                                    x,
                                    io,
                                    p: params[0],
                                    streaming,
                                });
                            } else {
                                backend.dispatch(DxRuns {
                                    x,
                                    io,
                                    run: n.div_ceil(3).max(1),
                                    params: &params,
                                    streaming,
                                });
                            }
                        })
                    };
                    for in_place in [false, true] {
                        let (plain, streamed) = (run(false, in_place), run(true, in_place));
                        let at = format!("{backend:?} n {n} offset {off} in place {in_place}");
                        assert_same_writes(&plain, &streamed, off..off + n, &at);
                    }
                }
            }
        }
    }
}
