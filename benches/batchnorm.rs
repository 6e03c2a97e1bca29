//! Criterion benchmarks of the crate's operations, with in-run baselines.
//!
//! Groups `inference`, `training`, `backward` and `statistics` time each operation on both
//! layouts, a set of CNN shapes and 1 and all threads, with ids `layout/NxCxHxW/tT/impl` where
//! `impl` is `batchnorm` (the crate), `copy` (copy x into y with as many threads: the memory-bound
//! floor) or `scalar` (a plain scalar implementation in this file, single-threaded, run at t1
//! only). Group `backends` compares the SIMD backends this CPU has on in-cache shapes, single
//! thread. `Throughput::Bytes` is the op's minimal traffic: inference and training forward
//! 8 B/element (read x, write y), backward 12 (read x and dy, write dx), statistics 4; copy 8.
//!
//! `cargo bench --bench batchnorm` runs everything (about 12 minutes on 2 cores);
//! `BATCHNORM_BENCH_QUICK=1 cargo bench --bench batchnorm` runs 3 shapes with shorter times.
//! A Markdown summary is printed at the end (also `cargo run --release --example bench_summary`).

#[path = "support/plot.rs"]
mod plot;
#[path = "support/roofs.rs"]
mod roofs;
#[path = "support/summary.rs"]
mod summary;

use std::hint::black_box;
use std::marker::PhantomData;
use std::time::Duration;

use batchnorm::{
    Affine, Backend, BackwardEpilogue, BackwardMode, BatchNorm, Element, Epilogue, GradMode,
    Layout, Parallelism, ParamGrads, RunningStats, RunningUpdate, SavedStats, SavedStatsMut, Shape,
    bf16, f16,
};
use criterion::measurement::WallTime;
use criterion::{BenchmarkGroup, Criterion, SamplingMode, Throughput};
use rayon::prelude::*;
use roofs::{Buffer, CopyRoof, fill};

/// (N, C, H, W) of the main groups.
const SHAPES: [[usize; 4]; 8] = [
    [1, 64, 112, 112],
    [1, 256, 56, 56],
    [1, 1024, 7, 7],
    [8, 64, 56, 56],
    [32, 64, 56, 56],
    [32, 256, 14, 14],
    [256, 2048, 1, 1],
    [1, 3, 224, 224],
];

/// Shapes of the quick mode: large HW, small HW with many channels, HW = 1.
const QUICK_SHAPES: [[usize; 4]; 3] = [[1, 64, 112, 112], [1, 1024, 7, 7], [256, 2048, 1, 1]];

/// In-cache shapes of the `backends` group.
const BACKEND_SHAPES: [[usize; 4]; 2] = [[1, 64, 28, 28], [8, 64, 14, 14]];

const LAYOUTS: [Layout; 2] = [Layout::Nchw, Layout::Nhwc];

/// Run settings: the full suite or the quick mode (`BATCHNORM_BENCH_QUICK` set, not `0`).
struct Config {
    shapes: Vec<[usize; 4]>,
    threads: Vec<usize>,
    warm_up: Duration,
    measurement: Duration,
}

impl Config {
    fn from_env() -> Config {
        let quick = std::env::var("BATCHNORM_BENCH_QUICK").is_ok_and(|v| !v.is_empty() && v != "0");
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let mut threads = vec![1, cores];
        threads.dedup();
        if quick {
            Config {
                shapes: QUICK_SHAPES.to_vec(),
                threads,
                warm_up: Duration::from_millis(100),
                measurement: Duration::from_millis(300),
            }
        } else {
            Config {
                shapes: SHAPES.to_vec(),
                threads,
                warm_up: Duration::from_millis(300),
                measurement: Duration::from_millis(1000),
            }
        }
    }

    fn group<'a>(&self, c: &'a mut Criterion, name: &str) -> BenchmarkGroup<'a, WallTime> {
        let mut g = c.benchmark_group(name);
        g.sample_size(10)
            .warm_up_time(self.warm_up)
            .measurement_time(self.measurement)
            // Flat: every sample runs the same number of iterations, so a slow case (the scalar
            // baseline on a 25 MB tensor) takes 10 iterations, not 55 as with linear sampling.
            .sampling_mode(SamplingMode::Flat);
        g
    }
}

fn shape_name([n, c, h, w]: [usize; 4]) -> String {
    format!("{n}x{c}x{h}x{w}")
}

fn layout_name(layout: Layout) -> &'static str {
    match layout {
        Layout::Nchw => "nchw",
        Layout::Nhwc => "nhwc",
    }
}

fn make_shape([n, c, h, w]: [usize; 4]) -> Shape {
    Shape::with_spatial(n, c, &[h, w]).expect("benchmark shape")
}

/// Every buffer one shape needs, allocated once, outside the timed loops.
struct Buffers {
    // x, y and dy start `offset` bytes past page boundaries: 0 in the main rows (`Buffers::new`;
    // `examples/bench_case.rs` measures other offsets), 16 in the backward rows `batchnorm_off16`
    // (where a large `Vec` from malloc starts: groups of 16 f32 channels then straddle two cache
    // lines per row).
    x: Buffer,
    y: Buffer,
    dy: Buffer,
    gamma: Vec<f32>,
    beta: Vec<f32>,
    running_mean: Vec<f32>,
    running_var: Vec<f32>,
    saved_mean: Vec<f32>,
    saved_inv_std: Vec<f32>,
    dgamma: Vec<f32>,
    dbeta: Vec<f32>,
    scratch: Scratch,
}

impl Buffers {
    fn new(shape: Shape) -> Buffers {
        Buffers::at(shape, 0)
    }

    fn at(shape: Shape, offset: usize) -> Buffers {
        let (len, c) = (shape.len(), shape.c());
        Buffers {
            x: Buffer::from_slice(&fill(len, 1, -1.0, 3.0), offset),
            y: Buffer::new(len, offset),
            dy: Buffer::from_slice(&fill(len, 2, -1.0, 1.0), offset),
            gamma: fill(c, 3, 0.5, 1.5),
            beta: fill(c, 4, -0.5, 0.5),
            running_mean: fill(c, 5, 0.5, 1.5),
            running_var: fill(c, 6, 1.0, 2.0),
            saved_mean: vec![0.0; c],
            saved_inv_std: vec![0.0; c],
            dgamma: vec![0.0; c],
            dbeta: vec![0.0; c],
            scratch: Scratch::new(c),
        }
    }
}

/// `dst = src` on the current rayon pool with the copy roof `kind` (the better of memcpy and a
/// SIMD load/store loop for these buffers, see `support/roofs.rs`): the memory-bound floor for an op
/// that reads one tensor and writes one.
fn copy(kind: CopyRoof, src: &[f32], dst: &mut [f32]) {
    let threads = rayon::current_num_threads();
    if threads <= 1 {
        kind.run(src, dst);
    } else {
        let chunk = src.len().div_ceil(threads).max(4096);
        dst.par_chunks_mut(chunk)
            .zip(src.par_chunks(chunk))
            .for_each(|(d, s)| kind.run(s, d));
    }
}

// ---------------------------------------------------------------------------------------------
// Scalar baseline: what one writes without thinking about SIMD. Two-pass statistics per channel
// (sum, then sum of squared deviations, in f32), then a separate normalize loop. The loops walk
// memory in order, keeping per-channel accumulators in `Scratch`.

/// Per-channel scratch of the scalar baseline, preallocated.
struct Scratch {
    mean: Vec<f32>,
    var: Vec<f32>,
    scale: Vec<f32>,
    shift: Vec<f32>,
}

impl Scratch {
    fn new(c: usize) -> Scratch {
        Scratch {
            mean: vec![0.0; c],
            var: vec![0.0; c],
            scale: vec![0.0; c],
            shift: vec![0.0; c],
        }
    }
}

/// Two-pass biased mean and variance per channel into `s.mean`, `s.var`.
fn scalar_statistics(shape: Shape, layout: Layout, x: &[f32], s: &mut Scratch) {
    let (c, hw, m) = (shape.c(), shape.hw(), shape.per_channel() as f32);
    s.mean.fill(0.0);
    s.var.fill(0.0);
    match layout {
        Layout::Nchw => {
            for (i, run) in x.chunks_exact(hw).enumerate() {
                let mut sum = 0.0f32;
                for &v in run {
                    sum += v;
                }
                s.mean[i % c] += sum;
            }
            s.mean.iter_mut().for_each(|v| *v /= m);
            for (i, run) in x.chunks_exact(hw).enumerate() {
                let mean = s.mean[i % c];
                let mut sq = 0.0f32;
                for &v in run {
                    sq += (v - mean) * (v - mean);
                }
                s.var[i % c] += sq;
            }
        }
        Layout::Nhwc => {
            for px in x.chunks_exact(c) {
                for (acc, &v) in s.mean.iter_mut().zip(px) {
                    *acc += v;
                }
            }
            s.mean.iter_mut().for_each(|v| *v /= m);
            for px in x.chunks_exact(c) {
                for ((acc, &v), &mean) in s.var.iter_mut().zip(px).zip(&s.mean) {
                    *acc += (v - mean) * (v - mean);
                }
            }
        }
    }
    s.var.iter_mut().for_each(|v| *v /= m);
}

/// `y = x·scale[c] + shift[c]`.
fn scalar_apply(shape: Shape, layout: Layout, x: &[f32], y: &mut [f32], s: &Scratch) {
    let (c, hw) = (shape.c(), shape.hw());
    match layout {
        Layout::Nchw => {
            for (i, (xr, yr)) in x.chunks_exact(hw).zip(y.chunks_exact_mut(hw)).enumerate() {
                let (a, b) = (s.scale[i % c], s.shift[i % c]);
                for (o, &v) in yr.iter_mut().zip(xr) {
                    *o = v * a + b;
                }
            }
        }
        Layout::Nhwc => {
            for (xp, yp) in x.chunks_exact(c).zip(y.chunks_exact_mut(c)) {
                for (((o, &v), &a), &b) in yp.iter_mut().zip(xp).zip(&s.scale).zip(&s.shift) {
                    *o = v * a + b;
                }
            }
        }
    }
}

/// Per-channel `scale = γ/sqrt(var + ε)`, `shift = β − mean·scale` from `s.mean`, `s.var`.
fn scalar_affine(gamma: &[f32], beta: &[f32], eps: f32, s: &mut Scratch) {
    for ch in 0..gamma.len() {
        let scale = gamma[ch] / (s.var[ch] + eps).sqrt();
        s.scale[ch] = scale;
        s.shift[ch] = beta[ch] - s.mean[ch] * scale;
    }
}

fn scalar_inference(shape: Shape, layout: Layout, b: &mut Buffers) {
    b.scratch.mean.copy_from_slice(&b.running_mean);
    b.scratch.var.copy_from_slice(&b.running_var);
    scalar_affine(&b.gamma, &b.beta, 1e-5, &mut b.scratch);
    scalar_apply(shape, layout, &b.x, &mut b.y, &b.scratch);
}

fn scalar_training(shape: Shape, layout: Layout, b: &mut Buffers) {
    scalar_statistics(shape, layout, &b.x, &mut b.scratch);
    scalar_affine(&b.gamma, &b.beta, 1e-5, &mut b.scratch);
    scalar_apply(shape, layout, &b.x, &mut b.y, &b.scratch);
    let m = shape.per_channel() as f32;
    for ch in 0..shape.c() {
        let (mean, var) = (b.scratch.mean[ch], b.scratch.var[ch]);
        b.saved_mean[ch] = mean;
        b.saved_inv_std[ch] = 1.0 / (var + 1e-5).sqrt();
        b.running_mean[ch] = 0.9 * b.running_mean[ch] + 0.1 * mean;
        b.running_var[ch] = 0.9 * b.running_var[ch] + 0.1 * var * m / (m - 1.0);
    }
}

/// Textbook training-mode backward, two passes: `dβ = Σdy`, `dγ = Σdy·x̂`, then
/// `dx = γ·r/M·(M·dy − dβ − x̂·dγ)` with `x̂ = (x − μ)·r`.
fn scalar_backward(shape: Shape, layout: Layout, b: &mut Buffers) {
    let (c, hw, m) = (shape.c(), shape.hw(), shape.per_channel() as f32);
    let (mean, inv_std) = (&b.saved_mean, &b.saved_inv_std);
    let (x, dy, dx) = (&b.x, &b.dy, &mut b.y);
    b.dbeta.fill(0.0);
    b.dgamma.fill(0.0);
    match layout {
        Layout::Nchw => {
            for (i, (xr, dyr)) in x.chunks_exact(hw).zip(dy.chunks_exact(hw)).enumerate() {
                let ch = i % c;
                let (mu, r) = (mean[ch], inv_std[ch]);
                let (mut sdy, mut sdyx) = (0.0f32, 0.0f32);
                for (&v, &g) in xr.iter().zip(dyr) {
                    sdy += g;
                    sdyx += g * (v - mu) * r;
                }
                b.dbeta[ch] += sdy;
                b.dgamma[ch] += sdyx;
            }
            for (i, ((xr, dyr), dxr)) in x
                .chunks_exact(hw)
                .zip(dy.chunks_exact(hw))
                .zip(dx.chunks_exact_mut(hw))
                .enumerate()
            {
                let ch = i % c;
                let (mu, r) = (mean[ch], inv_std[ch]);
                let k = b.gamma[ch] * r / m;
                let (db, dg) = (b.dbeta[ch], b.dgamma[ch]);
                for ((o, &v), &g) in dxr.iter_mut().zip(xr).zip(dyr) {
                    *o = k * (m * g - db - (v - mu) * r * dg);
                }
            }
        }
        Layout::Nhwc => {
            for (xp, dyp) in x.chunks_exact(c).zip(dy.chunks_exact(c)) {
                for ch in 0..c {
                    b.dbeta[ch] += dyp[ch];
                    b.dgamma[ch] += dyp[ch] * (xp[ch] - mean[ch]) * inv_std[ch];
                }
            }
            for ((xp, dyp), dxp) in x
                .chunks_exact(c)
                .zip(dy.chunks_exact(c))
                .zip(dx.chunks_exact_mut(c))
            {
                for ch in 0..c {
                    let r = inv_std[ch];
                    let k = b.gamma[ch] * r / m;
                    dxp[ch] =
                        k * (m * dyp[ch] - b.dbeta[ch] - (xp[ch] - mean[ch]) * r * b.dgamma[ch]);
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The crate's operations, called as a user would.

#[derive(Clone, Copy, Debug, PartialEq)]
enum Op {
    Inference,
    Training,
    Backward,
    Statistics,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::Inference => "inference",
            Op::Training => "training",
            Op::Backward => "backward",
            Op::Statistics => "statistics",
        }
    }

    /// Minimal memory traffic, bytes per element.
    fn bytes_per_element(self) -> u64 {
        match self {
            Op::Inference | Op::Training => 8,
            Op::Backward => 12,
            Op::Statistics => 4,
        }
    }

    /// One call of the crate's operation.
    fn run(self, bn: &BatchNorm, b: &mut Buffers) {
        let affine = Affine {
            gamma: &b.gamma,
            beta: &b.beta,
        };
        match self {
            Op::Inference => {
                let running = RunningStats {
                    mean: &b.running_mean,
                    var: &b.running_var,
                };
                bn.inference(&b.x, &mut b.y, Some(affine), running)
                    .expect("inference");
            }
            Op::Training => {
                let saved = SavedStatsMut {
                    mean: &mut b.saved_mean,
                    inv_std: &mut b.saved_inv_std,
                };
                let update = RunningUpdate::pytorch(&mut b.running_mean, &mut b.running_var);
                black_box(
                    bn.training(&b.x, &mut b.y, Some(affine), Some(saved), Some(update))
                        .expect("training"),
                );
            }
            Op::Backward => {
                let saved = SavedStats {
                    mean: &b.saved_mean,
                    inv_std: &b.saved_inv_std,
                };
                let grads = ParamGrads {
                    dgamma: &mut b.dgamma,
                    dbeta: &mut b.dbeta,
                    mode: GradMode::Overwrite,
                };
                bn.backward(
                    &b.x,
                    &b.dy,
                    &mut b.y,
                    Some(Affine {
                        gamma: &b.gamma,
                        beta: &b.beta,
                    }),
                    BackwardMode::Training(saved),
                    Some(grads),
                )
                .expect("backward");
            }
            Op::Statistics => {
                black_box(bn.statistics(&b.x).expect("statistics"));
            }
        }
    }

    fn run_scalar(self, shape: Shape, layout: Layout, b: &mut Buffers) {
        match self {
            Op::Inference => scalar_inference(shape, layout, b),
            Op::Training => scalar_training(shape, layout, b),
            Op::Backward => scalar_backward(shape, layout, b),
            Op::Statistics => {
                scalar_statistics(shape, layout, &b.x, &mut b.scratch);
                black_box(&b.scratch.var);
            }
        }
    }

    /// The copy baseline: x into y, or dy into dx (here `y`) for backward.
    fn run_copy(self, kind: CopyRoof, b: &mut Buffers) {
        let src = if self == Op::Backward { &b.dy } else { &b.x };
        copy(kind, src, &mut b.y);
    }
}

/// Checks once, before timing, that the scalar baseline computes what the crate computes (loose
/// tolerance: the baseline sums in f32), so a ratio never compares against a wrong baseline.
fn check_scalar(op: Op, shape: Shape, layout: Layout, bn: &BatchNorm, b: &mut Buffers) {
    let close = |got: f32, want: f32, scale: f32| (got - want).abs() <= 1e-3 * (1.0 + scale);
    prepare(op, bn, b);
    if op == Op::Statistics {
        let stats = bn.statistics(&b.x).expect("statistics");
        op.run_scalar(shape, layout, b);
        for (ch, s) in stats.channels().iter().enumerate() {
            let var = (s.m2() / s.count() as f64) as f32;
            assert!(
                close(b.scratch.mean[ch], s.mean() as f32, s.mean().abs() as f32)
                    && close(b.scratch.var[ch], var, var),
                "scalar statistics differ from the crate's: {shape:?} {layout:?} channel {ch}"
            );
        }
    } else {
        op.run(bn, b);
        let want = b.y.to_vec();
        let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        op.run_scalar(shape, layout, b);
        let bad =
            b.y.iter()
                .zip(&want)
                .position(|(&g, &w)| !close(g, w, scale));
        assert!(
            bad.is_none(),
            "scalar {} differs from the crate's: {shape:?} {layout:?} at {bad:?}",
            op.name()
        );
    }
}

/// Saved statistics from a real training call, as backward's input.
fn prepare(op: Op, bn: &BatchNorm, b: &mut Buffers) {
    if op == Op::Backward {
        Op::Training.run(bn, b);
    }
}

fn bench_op(c: &mut Criterion, cfg: &Config, pools: &[rayon::ThreadPool], op: Op) {
    let mut group = cfg.group(c, op.name());
    for &dims in &cfg.shapes {
        let shape = make_shape(dims);
        let mut b = Buffers::new(shape);
        let elements = shape.len() as u64;
        for layout in LAYOUTS {
            let bn = BatchNorm::new(shape, layout)
                .unwrap()
                .with_parallelism(Parallelism::Rayon);
            check_scalar(op, shape, layout, &bn, &mut b);
            prepare(op, &bn, &mut b);
            let kind = CopyRoof::choose(&b.x, &mut b.y);
            for (&t, pool) in cfg.threads.iter().zip(pools) {
                let base = format!("{}/{}/t{t}", layout_name(layout), shape_name(dims));
                group.throughput(Throughput::Bytes(op.bytes_per_element() * elements));
                group.bench_function(format!("{base}/batchnorm"), |bench| {
                    pool.install(|| bench.iter(|| op.run(&bn, &mut b)))
                });
                group.throughput(Throughput::Bytes(8 * elements));
                group.bench_function(format!("{base}/copy"), |bench| {
                    pool.install(|| bench.iter(|| op.run_copy(kind, &mut b)))
                });
                if t == 1 && op == Op::Backward {
                    let mut u = Buffers::at(shape, 16);
                    prepare(op, &bn, &mut u);
                    group.throughput(Throughput::Bytes(op.bytes_per_element() * elements));
                    group.bench_function(format!("{base}/batchnorm_off16"), |bench| {
                        bench.iter(|| op.run(&bn, &mut u))
                    });
                }
                if t == 1 {
                    group.throughput(Throughput::Bytes(op.bytes_per_element() * elements));
                    group.bench_function(format!("{base}/scalar"), |bench| {
                        bench.iter(|| op.run_scalar(shape, layout, &mut b))
                    });
                    // The scalar training baseline rewrites the saved statistics: restore them.
                    prepare(op, &bn, &mut b);
                }
            }
        }
    }
    group.finish();
}

/// The fused epilogues of a forward op (`None` for the plain op), as bench ids.
const EPILOGUES: [(&str, Fused); 3] = [
    ("", Fused::None),
    ("_relu", Fused::Relu),
    ("_add_relu", Fused::AddRelu),
];

#[derive(Clone, Copy, PartialEq)]
enum Fused {
    None,
    Relu,
    AddRelu,
}

/// Inference or training with an epilogue; the residual z is the `dy` buffer.
fn run_fused(training: bool, fused: Fused, bn: &BatchNorm, b: &mut Buffers) {
    let affine = Some(Affine {
        gamma: &b.gamma,
        beta: &b.beta,
    });
    let epilogue = match fused {
        Fused::None => Epilogue::None,
        Fused::Relu => Epilogue::Relu,
        Fused::AddRelu => Epilogue::AddRelu(&b.dy),
    };
    if training {
        let saved = SavedStatsMut {
            mean: &mut b.saved_mean,
            inv_std: &mut b.saved_inv_std,
        };
        let update = RunningUpdate::pytorch(&mut b.running_mean, &mut b.running_var);
        let r = bn.training_fused(&b.x, &mut b.y, affine, Some(saved), Some(update), epilogue);
        black_box(r.expect("training_fused"));
    } else {
        let running = RunningStats {
            mean: &b.running_mean,
            var: &b.running_var,
        };
        bn.inference_fused(&b.x, &mut b.y, affine, running, epilogue)
            .expect("inference_fused");
    }
}

/// `out = f(a, b)` elementwise on the current rayon pool (one chunk per thread): a plain pass
/// that reads two tensors and writes one.
fn binary_pass(a: &[f32], b: &[f32], out: &mut [f32], f: impl Fn(f32, f32) -> f32 + Sync) {
    let map = |a: &[f32], b: &[f32], out: &mut [f32]| {
        for ((o, &a), &b) in out.iter_mut().zip(a).zip(b) {
            *o = f(a, b);
        }
    };
    let threads = rayon::current_num_threads();
    if threads <= 1 {
        map(a, b, out);
    } else {
        let chunk = a.len().div_ceil(threads).max(4096);
        out.par_chunks_mut(chunk)
            .zip(a.par_chunks(chunk).zip(b.par_chunks(chunk)))
            .for_each(|(out, (a, b))| map(a, b, out));
    }
}

/// `y = x + z`: the floor of a pass that reads two tensors and writes one (the add + ReLU
/// epilogue's traffic).
fn add_pass(x: &[f32], z: &[f32], y: &mut [f32]) {
    binary_pass(x, z, y, |x, z| x + z);
}

/// `g = dy` where `y > 0`, else 0: ReLU's backward as its own pass.
fn relu_backward_pass(dy: &[f32], y: &[f32], g: &mut [f32]) {
    binary_pass(dy, y, g, |d, v| if v > 0.0 { d } else { 0.0 });
}

/// Backward of a fused forward (`None`: the plain backward), its ReLU mask from `x`, dz into `dz`;
/// with `unfused`, ReLU's backward as its own pass into `dz`, then the plain backward of it (the
/// composition the fused backward replaces).
fn run_fused_backward(
    fused: Fused,
    unfused: bool,
    bn: &BatchNorm,
    b: &mut Buffers,
    dz: &mut [f32],
) {
    let saved = SavedStats {
        mean: &b.saved_mean,
        inv_std: &b.saved_inv_std,
    };
    let affine = Some(Affine {
        gamma: &b.gamma,
        beta: &b.beta,
    });
    let grads = ParamGrads {
        dgamma: &mut b.dgamma,
        dbeta: &mut b.dbeta,
        mode: GradMode::Overwrite,
    };
    let mode = BackwardMode::Training(saved);
    let (x, dy, dx) = (&b.x[..], &b.dy[..], &mut b.y[..]);
    let r = match fused {
        Fused::Relu if unfused => {
            relu_backward_pass(dy, x, dz);
            bn.backward(x, dz, dx, affine, mode, Some(grads))
        }
        Fused::None => bn.backward(x, dy, dx, affine, mode, Some(grads)),
        Fused::Relu => {
            let epi = BackwardEpilogue::Relu { y: x };
            bn.backward_fused(x, dy, dx, affine, mode, Some(grads), epi)
        }
        Fused::AddRelu => {
            let epi = BackwardEpilogue::AddRelu { y: x, dz };
            bn.backward_fused(x, dy, dx, affine, mode, Some(grads), epi)
        }
    };
    r.expect("backward_fused");
}

/// Fused ops against their in-run baselines: the plain op (`inference`, `training`, `backward`)
/// and, for add + ReLU, the pass that reads two tensors and writes one (`add`).
fn bench_fused(c: &mut Criterion, cfg: &Config, pools: &[rayon::ThreadPool]) {
    let mut group = cfg.group(c, "fused");
    for &dims in &cfg.shapes {
        let shape = make_shape(dims);
        let mut b = Buffers::new(shape);
        let mut dz = vec![0.0f32; shape.len()];
        let elements = shape.len() as u64;
        for layout in LAYOUTS {
            let bn = BatchNorm::new(shape, layout)
                .unwrap()
                .with_parallelism(Parallelism::Rayon);
            for (&t, pool) in cfg.threads.iter().zip(pools) {
                let base = format!("{}/{}/t{t}", layout_name(layout), shape_name(dims));
                group.throughput(Throughput::Bytes(12 * elements));
                group.bench_function(format!("{base}/add"), |bench| {
                    pool.install(|| bench.iter(|| add_pass(&b.x, &b.dy, &mut b.y)))
                });
                for training in [false, true] {
                    let op = if training { "training" } else { "inference" };
                    for (suffix, fused) in EPILOGUES {
                        let bytes = if fused == Fused::AddRelu { 12 } else { 8 };
                        group.throughput(Throughput::Bytes(bytes * elements));
                        group.bench_function(format!("{base}/{op}{suffix}"), |bench| {
                            pool.install(|| bench.iter(|| run_fused(training, fused, &bn, &mut b)))
                        });
                    }
                }
                // Backward: x, dy in, dx out, and the mask source (16 B/element), dz for add.
                prepare(Op::Backward, &bn, &mut b);
                for (suffix, fused) in EPILOGUES {
                    let bytes = match fused {
                        Fused::None => 12,
                        Fused::Relu => 16,
                        Fused::AddRelu => 20,
                    };
                    group.throughput(Throughput::Bytes(bytes * elements));
                    group.bench_function(format!("{base}/backward{suffix}"), |bench| {
                        pool.install(|| {
                            bench.iter(|| run_fused_backward(fused, false, &bn, &mut b, &mut dz))
                        })
                    });
                }
                group.throughput(Throughput::Bytes(16 * elements));
                group.bench_function(format!("{base}/backward_unfused_relu"), |bench| {
                    let (b, dz) = (&mut b, &mut dz);
                    pool.install(|| {
                        bench.iter(|| run_fused_backward(Fused::Relu, true, &bn, b, dz))
                    })
                });
            }
        }
    }
    group.finish();
}

/// A data tensor of `len` values of `E` (f16, bf16 or f64) in a page-aligned [`Buffer`], as every
/// tensor of the group, so that the copy roof moves the same bytes (as f32 words) from the same
/// alignment. (A `Vec<f64>` starts 16 bytes past a page: every 64-byte vector of the f64 rows
/// straddled two cache lines where its copy baseline's did not.)
struct Stored<E> {
    words: Buffer,
    len: usize,
    _element: PhantomData<E>,
}

impl<E: Element> Stored<E>
where
    E::Param: From<f32>,
{
    fn new(values: &[f32]) -> Self {
        let mut t = Stored {
            words: Buffer::new((values.len() * size_of::<E>()).div_ceil(4), 0),
            len: values.len(),
            _element: PhantomData,
        };
        for (o, &v) in t.as_mut().iter_mut().zip(values) {
            *o = E::from_param(v.into());
        }
        t
    }
    fn as_ref(&self) -> &[E] {
        // SAFETY: `E` is a plain value type (f16, bf16, f32 or f64: any bits are a value); the
        // buffer holds at least `len·size_of::<E>()` bytes from a page boundary (offset 0), which
        // satisfies E's alignment (at most 8).
        unsafe { std::slice::from_raw_parts(self.words.as_ptr().cast::<E>(), self.len) }
    }
    fn as_mut(&mut self) -> &mut [E] {
        // SAFETY: as in `as_ref`, through the unique borrow of the buffer.
        unsafe { std::slice::from_raw_parts_mut(self.words.as_mut_ptr().cast::<E>(), self.len) }
    }
}

/// The per-channel arguments of the `storage` group's ops, of the data's parameter type.
struct StorageParams<P> {
    gamma: Vec<P>,
    beta: Vec<P>,
    running_mean: Vec<P>,
    running_var: Vec<P>,
    saved_mean: Vec<P>,
    saved_inv_std: Vec<P>,
    dgamma: Vec<P>,
    dbeta: Vec<P>,
}

impl<P: Copy + From<f32>> StorageParams<P> {
    fn new(c: usize) -> Self {
        let v = |x: f32| vec![P::from(x); c];
        StorageParams {
            gamma: v(1.5),
            beta: v(0.1),
            running_mean: v(0.5),
            running_var: v(2.0),
            saved_mean: v(0.0),
            saved_inv_std: v(1.0),
            dgamma: v(0.0),
            dbeta: v(0.0),
        }
    }
}

/// One op of the `storage` group on data of type `E`: inference, training (saved statistics
/// kept) or backward (training mode, from the saved statistics in `p`), `y` the output.
fn run_storage<E: Element>(
    op: Op,
    bn: &BatchNorm,
    (x, dy, y): (&[E], &[E], &mut [E]),
    p: &mut StorageParams<E::Param>,
) {
    let affine = Some(Affine {
        gamma: &p.gamma,
        beta: &p.beta,
    });
    match op {
        Op::Training => {
            let saved = SavedStatsMut {
                mean: &mut p.saved_mean,
                inv_std: &mut p.saved_inv_std,
            };
            black_box(
                bn.training(x, y, affine, Some(saved), None)
                    .expect("training"),
            );
        }
        Op::Backward => {
            let saved = SavedStats {
                mean: &p.saved_mean,
                inv_std: &p.saved_inv_std,
            };
            let grads = ParamGrads {
                dgamma: &mut p.dgamma,
                dbeta: &mut p.dbeta,
                mode: GradMode::Overwrite,
            };
            let mode = BackwardMode::Training(saved);
            bn.backward(x, dy, y, affine, mode, Some(grads))
                .expect("backward");
        }
        _ => {
            let running = RunningStats {
                mean: &p.running_mean,
                var: &p.running_var,
            };
            bn.inference(x, y, affine, running).expect("inference");
        }
    }
}

/// Inference, training and backward on f16 / bf16 data (converted inside the kernels) and on f64
/// data (f64 lanes and parameters) next to f32, each against a copy of its own bytes: `copy_half`
/// moves the half tensor's bytes (as f32 pairs), `copy` the f32 tensor's, `copy_f64` the f64
/// tensor's.
fn bench_storage(c: &mut Criterion, cfg: &Config, pools: &[rayon::ThreadPool]) {
    let mut group = cfg.group(c, "storage");
    for &dims in &cfg.shapes {
        let shape = make_shape(dims);
        let mut b = Buffers::new(shape);
        let values = fill(shape.len(), 1, -1.0, 3.0);
        let grads = fill(shape.len(), 2, -1.0, 1.0);
        let (x16, mut y16) = (Stored::<f16>::new(&values), Stored::<f16>::new(&values));
        let (xb, mut yb) = (Stored::<bf16>::new(&values), Stored::<bf16>::new(&values));
        let (dy16, dyb) = (Stored::<f16>::new(&grads), Stored::<bf16>::new(&grads));
        // The f32 tensors of the same values, page-aligned as the half ones.
        let (x32, dy32) = (
            Buffer::from_slice(&values, 0),
            Buffer::from_slice(&grads, 0),
        );
        let mut y32 = Buffer::new(values.len(), 0);
        // The f64 tensors (page-aligned as the others), and two f32 buffers of their byte size for
        // the copy.
        let (x64, dy64, mut y64) = (
            Stored::<f64>::new(&values),
            Stored::<f64>::new(&grads),
            Stored::<f64>::new(&values),
        );
        let (c64x, mut c64y) = (
            Buffer::new(2 * values.len(), 0),
            Buffer::new(2 * values.len(), 0),
        );
        let elements = shape.len() as u64;
        let kind = CopyRoof::choose(&b.x, &mut b.y);
        let half_kind = CopyRoof::choose(&x16.words, &mut y16.words);
        let kind64 = CopyRoof::choose(&c64x, &mut c64y);
        let (mut p32, mut p64) = (
            StorageParams::<f32>::new(shape.c()),
            StorageParams::<f64>::new(shape.c()),
        );
        for layout in LAYOUTS {
            let bn = BatchNorm::new(shape, layout)
                .unwrap()
                .with_parallelism(Parallelism::Rayon);
            // Saved statistics for the backward rows.
            run_storage(
                Op::Training,
                &bn,
                (&x32[..], &dy32[..], &mut y32[..]),
                &mut p32,
            );
            run_storage(
                Op::Training,
                &bn,
                (x64.as_ref(), dy64.as_ref(), y64.as_mut()),
                &mut p64,
            );
            for (&t, pool) in cfg.threads.iter().zip(pools) {
                let base = format!("{}/{}/t{t}", layout_name(layout), shape_name(dims));
                let (bn, b, p32, p64) = (&bn, &mut b, &mut p32, &mut p64);
                group.throughput(Throughput::Bytes(8 * elements));
                group.bench_function(format!("{base}/copy"), |bench| {
                    pool.install(|| bench.iter(|| copy(kind, &b.x, &mut b.y)))
                });
                group.throughput(Throughput::Bytes(4 * elements));
                group.bench_function(format!("{base}/copy_half"), |bench| {
                    let (x, y) = (&x16.words, &mut y16.words);
                    pool.install(|| bench.iter(|| copy(half_kind, x, y)))
                });
                group.throughput(Throughput::Bytes(16 * elements));
                group.bench_function(format!("{base}/copy_f64"), |bench| {
                    let (x, y) = (&c64x, &mut c64y);
                    pool.install(|| bench.iter(|| copy(kind64, x, y)))
                });
                for op in [Op::Inference, Op::Training, Op::Backward] {
                    let name = op.name();
                    let bytes = op.bytes_per_element();
                    group.throughput(Throughput::Bytes(bytes * elements));
                    group.bench_function(format!("{base}/{name}_f32"), |bench| {
                        let io = (&x32[..], &dy32[..], &mut y32[..]);
                        pool.install(|| {
                            bench.iter(|| run_storage(op, bn, (io.0, io.1, &mut *io.2), p32))
                        })
                    });
                    group.throughput(Throughput::Bytes(bytes / 2 * elements));
                    group.bench_function(format!("{base}/{name}_f16"), |bench| {
                        let io = (x16.as_ref(), dy16.as_ref(), y16.as_mut());
                        pool.install(|| {
                            bench.iter(|| run_storage(op, bn, (io.0, io.1, &mut *io.2), p32))
                        })
                    });
                    group.bench_function(format!("{base}/{name}_bf16"), |bench| {
                        let io = (xb.as_ref(), dyb.as_ref(), yb.as_mut());
                        pool.install(|| {
                            bench.iter(|| run_storage(op, bn, (io.0, io.1, &mut *io.2), p32))
                        })
                    });
                    group.throughput(Throughput::Bytes(2 * bytes * elements));
                    group.bench_function(format!("{base}/{name}_f64"), |bench| {
                        let io = (x64.as_ref(), dy64.as_ref(), y64.as_mut());
                        pool.install(|| {
                            bench.iter(|| run_storage(op, bn, (io.0, io.1, &mut *io.2), p64))
                        })
                    });
                }
            }
        }
    }
    group.finish();
}

/// Folding batch norm into constant weights (a one-time transform per model load), against a copy
/// of the same weights: a ResNet 3×3 convolution (OIHW and HWIO) and a 4096 × 1024 linear layer.
fn bench_fold(c: &mut Criterion, cfg: &Config) {
    use batchnorm::fold::{self, ConvWeights, WeightLayout};
    let mut group = cfg.group(c, "fold");
    let cases = [
        ("conv_oihw/256x256x3x3", WeightLayout::Oihw, 256, 256 * 9),
        ("conv_hwio/256x256x3x3", WeightLayout::Hwio, 256, 256 * 9),
        ("linear/4096x1024", WeightLayout::Oihw, 4096, 1024),
    ];
    for (name, layout, out, per_out) in cases {
        let w0 = fill(out * per_out, 7, -0.1, 0.1);
        let mut w = w0.clone();
        let (gamma, beta) = (fill(out, 8, 0.5, 1.5), fill(out, 9, -0.5, 0.5));
        let (mean, var) = (fill(out, 10, -0.2, 0.2), fill(out, 11, 0.5, 2.0));
        let bias = fill(out, 12, -0.1, 0.1);
        let mut bias_out = vec![0.0f32; out];
        let affine = Some(Affine {
            gamma: &gamma,
            beta: &beta,
        });
        let running = RunningStats {
            mean: &mean,
            var: &var,
        };
        let conv = ConvWeights {
            layout,
            out_channels: out,
            in_per_group: per_out,
            kernel: 1,
        };
        group.throughput(Throughput::Bytes(8 * w0.len() as u64));
        group.bench_function(format!("{name}/fold"), |bench| {
            bench.iter(|| {
                // Restoring the weights is part of the loop: the fold scales them in place.
                w.copy_from_slice(&w0);
                let io = (&mut w[..], Some(&bias[..]), &mut bias_out[..]);
                fold::fold_conv(conv, io, affine, running, 1e-5).expect("fold");
            })
        });
        group.bench_function(format!("{name}/copy"), |bench| {
            bench.iter(|| {
                w.copy_from_slice(&w0);
                black_box(&mut w);
            })
        });
    }
    group.finish();
}

/// Every available backend on in-cache shapes, single thread, with copy and scalar references.
fn bench_backends(c: &mut Criterion, cfg: &Config) {
    let mut group = cfg.group(c, "backends");
    for dims in BACKEND_SHAPES {
        let shape = make_shape(dims);
        let mut b = Buffers::new(shape);
        let elements = shape.len() as u64;
        group.throughput(Throughput::Bytes(8 * elements));
        let kind = CopyRoof::choose(&b.x, &mut b.y);
        group.bench_function(format!("copy/{}", shape_name(dims)), |bench| {
            bench.iter(|| kind.run(&b.x, &mut b.y))
        });
        for op in [Op::Statistics, Op::Inference, Op::Training] {
            group.throughput(Throughput::Bytes(op.bytes_per_element() * elements));
            for layout in LAYOUTS {
                let base = format!("{}/{}/{}", op.name(), layout_name(layout), shape_name(dims));
                group.bench_function(format!("{base}/scalar"), |bench| {
                    bench.iter(|| op.run_scalar(shape, layout, &mut b))
                });
                for backend in Backend::available() {
                    let bn = BatchNorm::new(shape, layout)
                        .unwrap()
                        .with_parallelism(Parallelism::Sequential)
                        .with_backend(backend)
                        .expect("available backend");
                    group.bench_function(format!("{base}/{}", backend.name()), |bench| {
                        bench.iter(|| op.run(&bn, &mut b))
                    });
                }
            }
        }
    }
    group.finish();
}

fn main() {
    let cfg = Config::from_env();
    // `cargo bench` passes `--bench`; `cargo test --benches` does not and `--test` or `--list`
    // measure nothing: only a measuring run leaves a marker and prints the summary.
    let args: Vec<String> = std::env::args().collect();
    let has = |flag: &str| args.iter().any(|a| a == flag);
    let measuring = has("--bench") && !has("--test") && !has("--list");
    if measuring && let Err(e) = summary::mark_run_start() {
        eprintln!("cannot write the run marker: {e}");
    }
    let pools: Vec<rayon::ThreadPool> = cfg
        .threads
        .iter()
        .map(|&t| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(t)
                .build()
                .expect("thread pool")
        })
        .collect();
    // Plots on: criterion's HTML reports (target/criterion/report/index.html).
    let mut c = Criterion::default()
        .nresamples(10_000)
        .configure_from_args();
    for op in [Op::Inference, Op::Training, Op::Backward, Op::Statistics] {
        bench_op(&mut c, &cfg, &pools, op);
    }
    bench_fused(&mut c, &cfg, &pools);
    bench_storage(&mut c, &cfg, &pools);
    bench_fold(&mut c, &cfg);
    bench_backends(&mut c, &cfg);
    c.final_summary();
    if measuring {
        let home = summary::criterion_home();
        println!("\n{}", summary::report(&home, true));
        let caption = format!(
            "batchnorm, time / copy: {}, {} threads, best backend {}",
            plot::cpu_name(),
            std::thread::available_parallelism().map_or(1, |n| n.get()),
            Backend::detect().name()
        );
        if let Some(svg) = plot::svg(&summary::load(&home, true), &caption) {
            let path = home.join("batchnorm-ratios.svg");
            match std::fs::write(&path, svg) {
                Ok(()) => println!("plot of time / copy: {}", path.display()),
                Err(e) => eprintln!("cannot write {}: {e}", path.display()),
            }
        }
    }
}
