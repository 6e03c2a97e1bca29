//! Drivers: layout, block split and threads. They never touch a SIMD type; every piece of
//! arithmetic goes through a kernel dispatched on the configured [`Backend`].
//!
//! The split of the tensor into pieces (NCHW) or row blocks (NHWC) depends only on the shape, and
//! partial results are combined in a fixed order, so results are bit-identical for any thread
//! count and for sequential execution.

mod nchw;
mod nhwc;

use crate::element::{Element, bf16, f16};
pub(crate) use crate::kernels::{ChannelAffine, DxParams, Fuse, GradSums};
use crate::kernels::{Io, ReluGrad};
use crate::par::SharedMut;
use crate::scratch::{self, Scratch, Zeroable};
use crate::simd::Backend;
use crate::simd::Real;
use crate::{ChannelStats, Layout, Parallelism, Residency, Shape};

/// Elements per unit of work: an NCHW piece of a run, or the target size of an NHWC row block.
/// Large enough to amortize task and fold overheads, small enough to stay in L2 with its output.
pub(crate) const BLOCK: usize = 16 * 1024;

/// Whether a pass that reads `x` and writes a separate output of `len` elements of `E` stores
/// the output past the caches: where the pass takes its tensors to live in memory
/// ([`Ctx::in_memory`]; with [`Residency::Auto`], where the two tensors together exceed the
/// last-level cache, [`crate::simd::llc_bytes`]), since plain stores would then first read each
/// output line from memory and evict data a later pass could reuse. In place, the lines are read
/// anyway: plain stores.
///
/// Measured on AMD EPYC family 25 model 17 (Zen 4, 32 MiB L3), one thread, y = a·x + b over f32
/// in a standalone loop: 6 422 528 values (51 MB in all) 1577 µs plain, 1210 µs past the caches;
/// 1 605 632 values (13 MB, in L3) 170 µs plain, 235 µs past the caches.
pub(crate) fn streaming_output<E: Element>(ctx: &Ctx, src: Src<'_, E>, len: usize) -> bool {
    matches!(src, Src::Separate(_)) && ctx.in_memory::<E>(2 * len)
}

/// Whether `len` elements of `E` exceed the last-level cache ([`crate::simd::llc_bytes`]; false
/// where its size is unknown).
fn beyond_llc<E>(len: usize) -> bool {
    let bytes = len.saturating_mul(size_of::<E>());
    crate::simd::llc_bytes().is_some_and(|llc| bytes > llc)
}

/// What a driver needs to know about a call.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Ctx {
    pub shape: Shape,
    pub layout: Layout,
    pub par: Parallelism,
    pub backend: Backend,
    pub residency: Residency,
}

impl Ctx {
    /// Whether a pass over `len` elements of `E` (all the tensors it reads and writes) takes them
    /// to live in memory rather than in cache ([`Residency`]).
    pub(crate) fn in_memory<E>(&self, len: usize) -> bool {
        match self.residency {
            Residency::Auto => beyond_llc::<E>(len),
            Residency::Cache => false,
            Residency::Memory => true,
        }
    }

    /// The threads the operation's tasks share: one when sequential, else the rayon pool's.
    pub(crate) fn threads(&self) -> usize {
        match self.par {
            Parallelism::Sequential => 1,
            Parallelism::Rayon => rayon::current_num_threads(),
        }
    }

    /// Runs one operation (see [`Parallelism::run_op`]) with the context it should use.
    fn run_op<R: Send>(&self, op: impl FnOnce(&Ctx) -> R + Send) -> R {
        self.par
            .run_op(self.shape.len(), |par| op(&Ctx { par, ..*self }))
    }

    /// NCHW with HW = 1 is the same memory as NHWC: use the row driver, which vectorizes it.
    fn effective_layout(&self) -> Layout {
        if self.shape.hw() == 1 {
            Layout::Nhwc
        } else {
            self.layout
        }
    }
}

/// Per-channel parameters `P` from per-channel results `R` (statistics, backward sums):
/// `make(first, values, out)` fills `out[j]` for channel `first + j` from `values[j]`. A whole
/// group of channels per call (not one call per channel), so the maker's loop is compiled inline:
/// a call per channel returning the parameters through memory cost ~6 ns per channel (AMD EPYC
/// family 26), more than the arithmetic, and dominated tensors of many short channels.
pub(crate) type Make<'a, R, P> = &'a (dyn Fn(usize, &[R], &mut [P]) + Sync);
/// Per-channel normalization parameters from the channels' statistics.
pub(crate) type MakeAffine<'a, T = f32> = Make<'a, ChannelStats, ChannelAffine<T>>;
/// Per-channel dx parameters from the channels' backward sums.
pub(crate) type MakeDx<'a, T = f32> = Make<'a, GradSums, DxParams<T>>;

/// The parameters of channels `first..first + values.len()` from `make` ([`MakeAffine`],
/// [`MakeDx`]).
pub(crate) fn make_all<R, P: Zeroable>(
    make: Make<'_, R, P>,
    first: usize,
    values: &[R],
) -> Scratch<P> {
    let mut params = scratch::zeroed(values.len());
    make(first, values, &mut params);
    params
}

/// The parameters of channel `c` alone from `make`.
pub(crate) fn make_one<R, P: Default>(make: Make<'_, R, P>, c: usize, value: &R) -> P {
    let mut p = [P::default()];
    make(c, std::slice::from_ref(value), &mut p);
    let [p] = p;
    p
}

/// Where a streaming op reads from: a separate slice, the output buffer itself (in place), or
/// another buffer that the same call writes in disjoint ranges (a staged gradient).
pub(crate) enum Src<'a, E = f32> {
    Separate(&'a [E]),
    InPlace,
    Shared(&'a SharedMut<'a, E>),
}

// Not derived: the derives would require `E: Copy`.
impl<E> Clone for Src<'_, E> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<E> Copy for Src<'_, E> {}

impl<'a, E> Src<'a, E> {
    /// The kernel stream for elements `start..start + len`: read from this source, write `out`.
    ///
    /// # Safety
    /// No other live slice of `out` may overlap the range.
    unsafe fn io(self, out: &SharedMut<'a, E>, start: usize, len: usize) -> Io<'a, E> {
        // SAFETY: forwarded to the caller.
        let dst = unsafe { out.slice(start, len) };
        match self {
            Src::Separate(x) => Io::Separate(&x[start..start + len], dst),
            Src::InPlace => Io::InPlace(dst),
            // SAFETY: forwarded to the caller (no mutable slice of `src` overlaps the range).
            Src::Shared(src) => Io::Separate(unsafe { src.slice(start, len) }, dst),
        }
    }

    /// The input elements `start..start + len`.
    ///
    /// # Safety
    /// For `InPlace` (`Shared`), no mutable slice of `out` (the shared buffer) overlapping the
    /// range may be alive.
    unsafe fn view(self, out: &SharedMut<'a, E>, start: usize, len: usize) -> &'a [E] {
        match self {
            Src::Separate(x) => &x[start..start + len],
            // SAFETY: forwarded to the caller.
            Src::InPlace => unsafe { out.slice(start, len) },
            // SAFETY: forwarded to the caller.
            Src::Shared(src) => unsafe { src.slice(start, len) },
        }
    }
}

/// The gradient backward reduces and maps: dy as given, or ReLU's backward `g = dy` where the
/// forward's output `y > 0` (else 0), staged into a buffer (the output `dx` for `into = None`)
/// range by range, right before the reduction first reads that range, so g is written while dy
/// and y are in cache and costs no pass of its own.
pub(crate) enum Grad<'a, E = f32> {
    Dy(Src<'a, E>),
    Relu {
        dy: &'a [E],
        y: &'a [E],
        into: Option<&'a SharedMut<'a, E>>,
    },
}

// Not derived: the derives would require `E: Copy`.
impl<E> Clone for Grad<'_, E> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<E> Copy for Grad<'_, E> {}

impl<'a, E: Element> Grad<'a, E> {
    /// Where g is read from (once staged).
    pub(crate) fn src(self) -> Src<'a, E> {
        match self {
            Grad::Dy(src) => src,
            Grad::Relu { into: None, .. } => Src::InPlace,
            Grad::Relu { into: Some(b), .. } => Src::Shared(b),
        }
    }

    /// Writes g for elements `start..start + len` (nothing for `Dy`), `out` being the output
    /// buffer.
    ///
    /// # Safety
    /// No other slice of the staging buffer overlapping the range may be alive.
    unsafe fn stage(self, ctx: &Ctx, out: &SharedMut<'_, E>, start: usize, len: usize) {
        if let Grad::Relu { dy, y, into } = self {
            let (dy, y) = (&dy[start..start + len], &y[start..start + len]);
            // SAFETY: forwarded to the caller.
            let dst = unsafe {
                match into {
                    Some(buffer) => buffer.slice(start, len),
                    None => out.slice(start, len),
                }
            };
            ctx.backend.dispatch(ReluGrad {
                io: Io::Separate(dy, dst),
                y,
            });
        }
    }

    fn staged(self) -> bool {
        matches!(self, Grad::Relu { .. })
    }
}

/// Checks the statistics of one run or block channel in place: a non-finite result (squares
/// that overflowed the f32 lanes, or NaN/Inf data) is recomputed from the values in f64 by
/// `exact`. The fields are read one by one and the struct is written only when it is replaced: a
/// kernel has just stored it field by field, and a copy of the whole struct (a 16-byte load
/// across two 8-byte stores) waits for the stores to retire instead of taking their values
/// (measured, AMD EPYC family 25 model 17, one thread, the builds alternated: bf16 NHWC
/// 1x1024x7x7 statistics 10.2–10.7 → 9.5 µs without the copy).
#[inline(always)]
fn check_stats(s: &mut ChannelStats, exact: impl FnOnce() -> ChannelStats) {
    if !(s.mean().is_finite() && s.m2().is_finite()) {
        *s = exact();
    }
}

/// Checks the f32-lane backward sums of one run or block channel in place (as [`check_stats`]):
/// non-finite sums (products that overflowed f32, or NaN/Inf data) are recomputed from the values
/// in f64 by `exact`.
#[inline(always)]
fn check_sums(g: &mut GradSums, exact: impl FnOnce() -> GradSums) {
    if !(g.dy.is_finite() && g.xdy.is_finite() && g.x.is_finite()) {
        *g = exact();
    }
}

/// Backward sums of paired values `(x, dy)` relative to `pivot`, in f64.
fn exact_sums<E: Element>(pairs: impl Iterator<Item = (E, E)>, pivot: E::Param) -> GradSums {
    pairs.fold(GradSums::default(), |s, (x, g)| {
        let (d, g) = (x.into() - pivot.into(), g.into());
        GradSums {
            dy: s.dy + g,
            xdy: s.xdy + d * g,
            x: s.x + d,
        }
    })
}

/// The drivers of one storage type, dispatched on the layout.
///
/// Each storage type implements them here by non-generic functions, so the kernels behind them
/// (every backend, both layouts) are compiled once, into this crate. Called as generic
/// functions, they would be compiled again into every crate that calls the API: each test binary,
/// the C library, an engine. Generic code calls them as `E::statistics(..)` and so on.
///
/// A bound of [`Element`], so it is reachable from outside, but it lives in a private module:
/// other crates can neither name it, call its functions nor implement it (the crate-private types
/// of its signatures are what `private_interfaces` would warn about).
#[allow(private_interfaces)]
pub trait Drive: Sized {
    /// Per-channel statistics of `x` into `out` (one per channel).
    fn statistics(ctx: &Ctx, x: &[Self], out: &mut [ChannelStats]);

    /// Applies one affine map per channel (inference, or the frozen-statistics dx), then the
    /// epilogue `fuse` (its residual a whole tensor).
    fn normalize(
        ctx: &Ctx,
        src: (Src<'_, Self>, Fuse<'_, Self>),
        dst: &mut [Self],
        params: &[ChannelAffine<Self::P>],
    );

    /// Training forward: statistics (into `stats`, one per channel), then the channels'
    /// parameters from `make`, then normalize and the epilogue `fuse`.
    fn training(
        ctx: &Ctx,
        x: (&[Self], Fuse<'_, Self>),
        y: &mut [Self],
        make: MakeAffine<'_, Self::P>,
        stats: &mut [ChannelStats],
    );

    /// Backward: per-channel sums of g, (x − pivot)·g and (x − pivot), then the channels' dx
    /// parameters from `make`, then `dx = a·g + b·(x − shift) + c`, with g the gradient `grad`
    /// (staged into its buffer by the reduction, so also with `make = None`, which computes only
    /// the sums). The sums go to `sums` (one per channel).
    fn backward(
        ctx: &Ctx,
        x: &[Self],
        dy: Grad<'_, Self>,
        dx: &mut [Self],
        pivots: &[Self::P],
        make: Option<MakeDx<'_, Self::P>>,
        sums: &mut [GradSums],
    );

    /// The dx pass of [`Drive::backward`] alone, with per-channel parameters computed beforehand
    /// (the synchronized backward, whose parameters need the sums of every rank).
    fn dx(ctx: &Ctx, x: &[Self], dy: Src<'_, Self>, dx: &mut [Self], params: &[DxParams<Self::P>]);

    /// The parameter type ([`Element::Param`]).
    type P: Real;
}

/// [`Drive`] for each storage type: the same bodies, compiled once per type.
macro_rules! drive {
    ($($t:ty),*) => {$(
        #[allow(private_interfaces)] // as on the trait
        impl Drive for $t {
            type P = <$t as Element>::Param;

            #[inline(never)]
            fn statistics(ctx: &Ctx, x: &[$t], out: &mut [ChannelStats]) {
                ctx.run_op(|ctx| match ctx.effective_layout() {
                    Layout::Nchw => nchw::statistics(ctx, x, out),
                    Layout::Nhwc => nhwc::statistics(ctx, x, out),
                })
            }

            #[inline(never)]
            fn normalize(
                ctx: &Ctx,
                src: (Src<'_, $t>, Fuse<'_, $t>),
                dst: &mut [$t],
                params: &[ChannelAffine<Self::P>],
            ) {
                ctx.run_op(|ctx| match ctx.effective_layout() {
                    Layout::Nchw => nchw::normalize(ctx, src, dst, params),
                    Layout::Nhwc => nhwc::normalize(ctx, src, dst, params),
                })
            }

            #[inline(never)]
            fn training(
                ctx: &Ctx,
                x: (&[$t], Fuse<'_, $t>),
                y: &mut [$t],
                make: MakeAffine<'_, Self::P>,
                stats: &mut [ChannelStats],
            ) {
                ctx.run_op(|ctx| match ctx.effective_layout() {
                    Layout::Nchw => nchw::training(ctx, x, y, make, stats),
                    Layout::Nhwc => nhwc::training(ctx, x, y, make, stats),
                })
            }

            #[inline(never)]
            fn backward(
                ctx: &Ctx,
                x: &[$t],
                dy: Grad<'_, $t>,
                dx: &mut [$t],
                pivots: &[Self::P],
                make: Option<MakeDx<'_, Self::P>>,
                sums: &mut [GradSums],
            ) {
                ctx.run_op(|ctx| match ctx.effective_layout() {
                    Layout::Nchw => nchw::backward(ctx, x, dy, dx, pivots, make, sums),
                    Layout::Nhwc => nhwc::backward(ctx, x, dy, dx, pivots, make, sums),
                })
            }

            #[inline(never)]
            fn dx(
                ctx: &Ctx,
                x: &[$t],
                dy: Src<'_, $t>,
                dx: &mut [$t],
                params: &[DxParams<Self::P>],
            ) {
                ctx.run_op(|ctx| match ctx.effective_layout() {
                    Layout::Nchw => nchw::dx(ctx, x, dy, dx, params),
                    Layout::Nhwc => nhwc::dx(ctx, x, dy, dx, params),
                })
            }
        }
    )*};
}
drive!(f32, f64, f16, bf16);

/// Stages the gradient `grad` over the whole tensor (nothing for `Grad::Dy`), `out` being the
/// output buffer, for a backward that maps it without reducing it first.
pub(crate) fn stage<E: Element>(ctx: &Ctx, grad: Grad<'_, E>, out: &mut [E]) {
    ctx.run_op(|ctx| stage_blocks(ctx, grad, out))
}

/// [`stage`] block by block.
fn stage_blocks<E: Element>(ctx: &Ctx, grad: Grad<'_, E>, out: &mut [E]) {
    let n = out.len();
    let out = SharedMut::new(out);
    ctx.par.for_each(n.div_ceil(BLOCK), BLOCK, |b| {
        let (start, len) = (b * BLOCK, BLOCK.min(n - b * BLOCK));
        // SAFETY: each block is visited once and blocks are disjoint.
        unsafe { grad.stage(ctx, &out, start, len) };
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{BatchNorm, Epilogue, RunningStats};

    /// The context of an operator for `shape` in `layout` on this CPU's best backend, with the
    /// default residency ([`Residency::Auto`]).
    fn auto(shape: Shape, layout: Layout) -> Ctx {
        *BatchNorm::on_backend(shape, layout, Backend::detect())
            .unwrap()
            .ctx()
    }

    /// [`Residency::Cache`] and [`Residency::Memory`] decide where a pass takes its tensors to
    /// live whatever their size; [`Residency::Auto`] compares the size with the last-level cache
    /// (in memory only where that size is known). Outputs in place are never streamed.
    #[test]
    fn residency_decides_in_memory() {
        let shape = Shape::new(2, 3, 5).unwrap();
        let x = vec![0.0f32; shape.len()];
        let huge = usize::MAX / 16;
        let auto = auto(shape, Layout::Nchw);
        assert!(!auto.in_memory::<f32>(shape.len()));
        assert_eq!(
            auto.in_memory::<f32>(huge),
            crate::simd::llc_bytes().is_some()
        );
        assert!(!streaming_output(&auto, Src::Separate(&x), shape.len()));
        let cache = Ctx {
            residency: Residency::Cache,
            ..auto
        };
        assert!(!cache.in_memory::<f32>(huge));
        assert!(!streaming_output(&cache, Src::Separate(&x), huge));
        let memory = Ctx {
            residency: Residency::Memory,
            ..auto
        };
        assert!(memory.in_memory::<f64>(1));
        assert!(streaming_output(&memory, Src::Separate(&x), shape.len()));
        assert!(!streaming_output(&memory, Src::<f32>::InPlace, shape.len()));
    }

    /// Inference of a tensor larger than the last-level cache, whose output is stored past the
    /// caches, equals the same inference in place (plain stores) bit for bit, on every backend,
    /// NCHW with long runs (pieces) and short ones (runs), NHWC rows whose plain walks differ (a
    /// register group per period or row, periodic lanes; stored past the caches by the lanes),
    /// with and without a fused residual.
    /// Skipped where the cache size is unknown (not x86-64) or over 128 MiB (the tensors would
    /// take over 1 GiB).
    #[test]
    fn inference_past_the_caches_matches_in_place() {
        let Some(llc) = crate::simd::llc_bytes().filter(|&b| b <= 128 << 20) else {
            return;
        };
        let len = llc / 4 + 4096;
        let cases = [
            (Layout::Nchw, 3, len.div_ceil(3 * 2) + 17),
            (Layout::Nchw, 64, 3137),
            // NHWC rows whose plain walk is a register group (a period of 64, rows as they are
            // of 48 on AVX-512) or periodic lanes (256).
            (Layout::Nhwc, 64, 3137),
            (Layout::Nhwc, 48, 3137),
            (Layout::Nhwc, 256, 785),
        ];
        for (layout, c, hw) in cases {
            let n = len.div_ceil(c * hw);
            let shape = Shape::new(n, c, hw).unwrap();
            let x: Vec<f32> = (0..shape.len())
                .map(|i| ((i * 7919) % 1000) as f32 * 0.01 - 5.0)
                .collect();
            let ctx = auto(shape, layout);
            assert!(streaming_output(&ctx, Src::Separate(&x), shape.len()));
            assert!(!streaming_output(&ctx, Src::<f32>::InPlace, shape.len()));
            let mean: Vec<f32> = (0..c).map(|k| k as f32 * 0.1).collect();
            let var: Vec<f32> = (0..c).map(|k| 1.0 + k as f32).collect();
            let running = RunningStats {
                mean: &mean,
                var: &var,
            };
            let z: Vec<f32> = x.iter().map(|v| -v * 0.5).collect();
            for backend in crate::Backend::available() {
                let bn = BatchNorm::on_backend(shape, layout, backend).unwrap();
                for residual in [false, true] {
                    let epilogue = if residual {
                        Epilogue::AddRelu(&z)
                    } else {
                        Epilogue::None
                    };
                    let mut y = vec![0.0f32; shape.len()];
                    bn.inference_fused(&x, &mut y, None, running, epilogue)
                        .unwrap();
                    let mut in_place = x.clone();
                    bn.inference_fused_in_place(&mut in_place, None, running, epilogue)
                        .unwrap();
                    assert!(
                        y.iter()
                            .zip(&in_place)
                            .all(|(a, b)| a.to_bits() == b.to_bits()),
                        "{backend:?} {layout:?} C {c} HW {hw} residual {residual}"
                    );
                }
            }
        }
    }

    /// f64 inference of a tensor larger than the last-level cache (stored past the caches)
    /// equals the same inference in place bit for bit, on every backend, NCHW (pieces) and NHWC
    /// rows of 24 channels (the lanes). Skipped as [`inference_past_the_caches_matches_in_place`].
    #[test]
    fn f64_inference_past_the_caches_matches_in_place() {
        let Some(llc) = crate::simd::llc_bytes().filter(|&b| b <= 128 << 20) else {
            return;
        };
        let len = llc / 8 + 4096;
        for (layout, c, hw) in [(Layout::Nchw, 3, 3137), (Layout::Nhwc, 24, 785)] {
            let shape = Shape::new(len.div_ceil(c * hw), c, hw).unwrap();
            let x: Vec<f64> = (0..shape.len())
                .map(|i| ((i * 7919) % 1000) as f64 * 0.01 - 5.0)
                .collect();
            assert!(streaming_output(
                &auto(shape, layout),
                Src::Separate(&x),
                shape.len()
            ));
            let mean: Vec<f64> = (0..c).map(|k| k as f64 * 0.1).collect();
            let var: Vec<f64> = (0..c).map(|k| 1.0 + k as f64).collect();
            let running = RunningStats {
                mean: &mean,
                var: &var,
            };
            for backend in crate::Backend::available() {
                let bn = BatchNorm::on_backend(shape, layout, backend).unwrap();
                let mut y = vec![0.0f64; shape.len()];
                bn.inference(&x, &mut y, None, running).unwrap();
                let mut in_place = x.clone();
                bn.inference_in_place(&mut in_place, None, running).unwrap();
                assert!(
                    (y.iter().zip(&in_place)).all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{backend:?} {layout:?} C {c} HW {hw}"
                );
            }
        }
    }

    /// Backward of a tensor larger than the last-level cache, whose dx is stored past the
    /// caches, equals the same backward in place (dx over dy, plain stores) bit for bit, dγ and
    /// dβ too, on every backend, in training and frozen mode: NCHW with one sample (the fused
    /// schedule, pieces), several samples with long runs (pieces) and short ones (runs); NHWC
    /// rows of 64, 48 and 256 channels.
    /// Skipped as [`inference_past_the_caches_matches_in_place`].
    #[test]
    fn backward_past_the_caches_matches_in_place() {
        use crate::{BackwardMode, ParamGrads, SavedStats};
        let Some(llc) = crate::simd::llc_bytes().filter(|&b| b <= 128 << 20) else {
            return;
        };
        let len = llc / 4 + 4096;
        let nchw = [
            (1, 2, len.div_ceil(2)),
            (2, 3, len.div_ceil(3 * 2) + 17),
            (len.div_ceil(64 * 3137), 64, 3137),
        ];
        // NHWC rows whose plain dx walks a register group down the columns (64 channels on
        // AVX-512) or the periodic lanes (48, 256); all stored past the caches by the lanes.
        let nhwc = [64, 48, 256].map(|c| (len.div_ceil(c * 785), c, 785));
        let cases = (nchw.map(|case| (Layout::Nchw, case)).into_iter())
            .chain(nhwc.map(|case| (Layout::Nhwc, case)));
        for (layout, (n, c, hw)) in cases {
            let shape = Shape::new(n, c, hw).unwrap();
            let x: Vec<f32> = (0..shape.len())
                .map(|i| ((i * 7919) % 1000) as f32 * 0.01 - 5.0)
                .collect();
            let dy: Vec<f32> = (0..shape.len())
                .map(|i| ((i * 104_729) % 997) as f32 * 0.002 - 1.0)
                .collect();
            assert!(streaming_output(
                &auto(shape, layout),
                Src::Separate(&dy),
                shape.len()
            ));
            let mean: Vec<f32> = (0..c).map(|k| k as f32 * 0.1 - 0.3).collect();
            let inv: Vec<f32> = (0..c).map(|k| 0.5 + k as f32).collect();
            let gamma: Vec<f32> = (0..c).map(|k| 1.0 - 0.25 * k as f32).collect();
            let beta = vec![0.0f32; c];
            let affine = Some(crate::Affine {
                gamma: &gamma,
                beta: &beta,
            });
            for backend in crate::Backend::available() {
                let bn = BatchNorm::on_backend(shape, layout, backend).unwrap();
                for frozen in [false, true] {
                    let mode = if frozen {
                        BackwardMode::Frozen(RunningStats {
                            mean: &mean,
                            var: &inv,
                        })
                    } else {
                        BackwardMode::Training(SavedStats {
                            mean: &mean,
                            inv_std: &inv,
                        })
                    };
                    let (mut dg, mut db) = (vec![0.0f32; c], vec![0.0f32; c]);
                    let mut dx = vec![0.0f32; shape.len()];
                    let grads = ParamGrads {
                        dgamma: &mut dg,
                        dbeta: &mut db,
                        mode: crate::GradMode::Overwrite,
                    };
                    bn.backward(&x, &dy, &mut dx, affine, mode, Some(grads))
                        .unwrap();
                    let (mut dg2, mut db2) = (vec![0.0f32; c], vec![0.0f32; c]);
                    let mut in_place = dy.clone();
                    let grads = ParamGrads {
                        dgamma: &mut dg2,
                        dbeta: &mut db2,
                        mode: crate::GradMode::Overwrite,
                    };
                    bn.backward_in_place(&x, &mut in_place, affine, mode, Some(grads))
                        .unwrap();
                    let bits = |v: &[f32]| v.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                    let at = format!("{backend:?} {layout:?} N {n} C {c} HW {hw} frozen {frozen}");
                    assert!(bits(&dx) == bits(&in_place), "{at}");
                    assert_eq!((bits(&dg), bits(&db)), (bits(&dg2), bits(&db2)), "{at}");
                    assert!(dx.iter().any(|v| *v != 0.0), "{at}: dx all zero");
                }
            }
        }
    }
}
