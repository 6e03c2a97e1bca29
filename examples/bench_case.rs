//! Times one case of the crate against its memory roofs, case by case, so that a driver
//! (`benches/compare.py`) can alternate the crate with other frameworks in one run.
//!
//! Reads lines `OP LAYOUT NxCxHxW THREADS OFFSET REPEATS SAMPLE_MS [DTYPE [RESIDENCY [XOFFSET]]]`
//! on standard input (OP one of `inference`, `inference_relu`, `inference_add_relu` (the
//! residual: dy's tensor), `training`, `backward`, `statistics`; LAYOUT `nchw`
//! or `nhwc`; OFFSET the byte offset modulo 4096 of the output tensors relative to x, dy at twice
//! that; DTYPE the data tensors' element type, `f32` (the default when the field is absent),
//! `bf16` or `f16`, the parameters and statistics being f32 in every case; RESIDENCY the
//! operator's [`batchnorm::Residency`], `auto` (the default), `cache` or `memory`; XOFFSET the
//! byte offset of x from a page boundary, 0 by default, the other tensors keeping their offsets
//! relative to x: 16 is where glibc's `malloc` starts a large allocation, such as a `Vec`'s) and
//! answers each with one
//! JSON line
//! `{"crate": ns, "copy": ns, "sum": ns, "copy_kind": "memcpy" | "simd", "dtype": "..."}`:
//! medians over REPEATS samples of at least SAMPLE_MS each, the crate's call, the copy roof (the
//! better of memcpy and a SIMD load/store loop, copying x's bytes into y's: half the f32 bytes for
//! bf16 and f16 data) and a SIMD sum over the same bytes of x (read as f32 words). A line `cpu`
//! answers with the backend the crate runs.
//!
//! `cargo run --release --example bench_case` (then type a line, e.g.
//! `training nhwc 8x64x56x56 1 0 5 20`, or `training nhwc 8x64x56x56 1 0 5 20 bf16`).

#[path = "../benches/support/roofs.rs"]
mod roofs;

use std::collections::HashMap;
use std::hint::black_box;
use std::io::{BufRead, Write};
use std::marker::PhantomData;
use std::time::Instant;

use batchnorm::{
    Affine, BackwardMode, BatchNorm, Element, Epilogue, GradMode, Layout, Parallelism, ParamGrads,
    Residency, RunningStats, RunningUpdate, SavedStats, SavedStatsMut, Shape, bf16, f16,
};
use roofs::{Buffer, CopyRoof, fill};

/// Median seconds per call of `f` over `repeats` samples of at least `sample_s` each.
fn time(repeats: usize, sample_s: f64, mut f: impl FnMut()) -> f64 {
    f();
    let t = Instant::now();
    f();
    let once = t.elapsed().as_secs_f64().max(1e-8);
    let inner = ((sample_s / once) as usize).max(1);
    let mut samples: Vec<f64> = (0..repeats.max(1))
        .map(|_| {
            let t = Instant::now();
            for _ in 0..inner {
                f();
            }
            t.elapsed().as_secs_f64() / inner as f64
        })
        .collect();
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

/// A data tensor of `len` values of `E` (f32, bf16 or f16) in the f32 words of a [`Buffer`], so
/// that it starts at the buffer's page offset and the roofs move exactly its bytes.
struct Tensor<E> {
    words: Buffer,
    len: usize,
    _element: PhantomData<E>,
}

impl<E: Element<Param = f32>> Tensor<E> {
    fn new(len: usize, offset: usize) -> Self {
        assert!(std::mem::size_of::<E>() <= 4 && std::mem::align_of::<E>() <= 4);
        Tensor {
            words: Buffer::new((len * std::mem::size_of::<E>()).div_ceil(4), offset),
            len,
            _element: PhantomData,
        }
    }
    fn from_f32(values: &[f32], offset: usize) -> Self {
        let mut t = Tensor::new(values.len(), offset);
        for (o, &v) in t.as_mut().iter_mut().zip(values) {
            *o = E::from_param(v);
        }
        t
    }
    fn as_ref(&self) -> &[E] {
        // SAFETY: `E: Element<Param = f32>` is f32, bf16 or f16: plain values of at most 4 bytes
        // for which any bits are a value, aligned to at most 4 (checked in `new`); the buffer holds
        // at least `len * size_of::<E>()` bytes, 4-byte aligned.
        unsafe { std::slice::from_raw_parts(self.words.as_ptr().cast::<E>(), self.len) }
    }
    fn as_mut(&mut self) -> &mut [E] {
        // SAFETY: as in `as_ref`, through the unique borrow of the buffer.
        unsafe { std::slice::from_raw_parts_mut(self.words.as_mut_ptr().cast::<E>(), self.len) }
    }
}

#[derive(Clone, Copy)]
enum Dtype {
    F32,
    Bf16,
    F16,
}

struct Case {
    op: String,
    layout: Layout,
    dims: [usize; 4],
    threads: usize,
    offset: usize,
    /// x's byte offset from a page boundary.
    x_offset: usize,
    repeats: usize,
    sample_s: f64,
    dtype: Dtype,
    residency: Residency,
}

fn parse(line: &str) -> Result<Case, String> {
    let f: Vec<&str> = line.split_whitespace().collect();
    if !(7..=10).contains(&f.len()) {
        return Err(format!("expected 7 to 10 fields, got {}", f.len()));
    }
    let dtype = match f.get(7).copied().unwrap_or("f32") {
        "f32" => Dtype::F32,
        "bf16" => Dtype::Bf16,
        "f16" => Dtype::F16,
        other => return Err(format!("dtype {other}")),
    };
    let residency = match f.get(8).copied().unwrap_or("auto") {
        "auto" => Residency::Auto,
        "cache" => Residency::Cache,
        "memory" => Residency::Memory,
        other => return Err(format!("residency {other}")),
    };
    let layout = match f[1] {
        "nchw" => Layout::Nchw,
        "nhwc" => Layout::Nhwc,
        other => return Err(format!("layout {other}")),
    };
    let dims: Vec<usize> = f[2].split('x').filter_map(|d| d.parse().ok()).collect();
    let dims: [usize; 4] = dims.try_into().map_err(|_| format!("shape {}", f[2]))?;
    let num = |s: &str| s.parse::<usize>().map_err(|e| format!("{s}: {e}"));
    Ok(Case {
        op: f[0].to_string(),
        layout,
        dims,
        threads: num(f[3])?,
        offset: num(f[4])? % 4096 / 4 * 4,
        x_offset: f.get(9).map_or(Ok(0), |v| num(v))? % 4096 / 4 * 4,
        repeats: num(f[5])?,
        sample_s: f[6].parse::<f64>().map_err(|e| e.to_string())? / 1e3,
        dtype,
        residency,
    })
}

fn run(case: &Case, pool: &rayon::ThreadPool) -> Result<String, String> {
    match case.dtype {
        Dtype::F32 => run_typed::<f32>(case, pool),
        Dtype::Bf16 => run_typed::<bf16>(case, pool),
        Dtype::F16 => run_typed::<f16>(case, pool),
    }
}

/// One case on data of type `E` (parameters and statistics f32).
fn run_typed<E: Element<Param = f32>>(
    case: &Case,
    pool: &rayon::ThreadPool,
) -> Result<String, String> {
    let [n, c, h, w] = case.dims;
    let shape = Shape::with_spatial(n, c, &[h, w]).map_err(|e| e.to_string())?;
    let bn = BatchNorm::new(shape, case.layout)
        .unwrap()
        .with_parallelism(Parallelism::Rayon)
        .with_residency(case.residency);
    let len = shape.len();
    let at = |offset: usize| (case.x_offset + offset) % 4096;
    let xt = Tensor::<E>::from_f32(&fill(len, 1, -1.0, 3.0), at(0));
    let dyt = Tensor::<E>::from_f32(&fill(len, 2, -1.0, 1.0), at(2 * case.offset));
    let mut y = Tensor::<E>::new(len, at(case.offset));
    let (x, dy) = (xt.as_ref(), dyt.as_ref());
    let (gamma, beta) = (fill(c, 3, 0.5, 1.5), fill(c, 4, -0.5, 0.5));
    let (mut rmean, mut rvar) = (fill(c, 5, 0.5, 1.5), fill(c, 6, 1.0, 2.0));
    let (mut smean, mut sinv) = (vec![0.0f32; c], vec![0.0f32; c]);
    let (mut dgamma, mut dbeta) = (vec![0.0f32; c], vec![0.0f32; c]);
    let affine = || Affine {
        gamma: &gamma,
        beta: &beta,
    };
    let (reps, sample) = (case.repeats, case.sample_s);
    let crate_s = pool.install(|| -> Result<f64, String> {
        Ok(match case.op.as_str() {
            "inference" | "inference_relu" | "inference_add_relu" => {
                let running = RunningStats {
                    mean: &rmean,
                    var: &rvar,
                };
                let epilogue = match case.op.as_str() {
                    "inference" => Epilogue::None,
                    "inference_relu" => Epilogue::Relu,
                    _ => Epilogue::AddRelu(dy),
                };
                time(reps, sample, || {
                    bn.inference_fused(x, y.as_mut(), Some(affine()), running, epilogue)
                        .unwrap()
                })
            }
            "training" | "backward" => {
                let mut train = |y: &mut [E]| {
                    let saved = SavedStatsMut {
                        mean: &mut smean,
                        inv_std: &mut sinv,
                    };
                    let update = RunningUpdate::pytorch(&mut rmean, &mut rvar);
                    black_box(
                        bn.training(x, y, Some(affine()), Some(saved), Some(update))
                            .unwrap(),
                    );
                };
                if case.op == "training" {
                    time(reps, sample, || train(y.as_mut()))
                } else {
                    train(y.as_mut());
                    time(reps, sample, || {
                        let saved = SavedStats {
                            mean: &smean,
                            inv_std: &sinv,
                        };
                        let grads = ParamGrads {
                            dgamma: &mut dgamma,
                            dbeta: &mut dbeta,
                            mode: GradMode::Overwrite,
                        };
                        let mode = BackwardMode::Training(saved);
                        bn.backward(
                            x,
                            dy,
                            y.as_mut(),
                            Some(Affine {
                                gamma: &gamma,
                                beta: &beta,
                            }),
                            mode,
                            Some(grads),
                        )
                        .unwrap()
                    })
                }
            }
            "statistics" => time(reps, sample, || {
                black_box(bn.statistics(x).unwrap());
            }),
            other => return Err(format!("op {other}")),
        })
    })?;
    // Roofs over the data's bytes (as f32 words), single-threaded at t1, else split over the pool
    // like the crate's work.
    let (xw, yw) = (&xt.words, &mut y.words);
    let words = xw.len();
    let kind = CopyRoof::choose(xw, yw);
    let copy_s = pool.install(|| {
        time(reps, sample, || {
            use rayon::prelude::*;
            let chunk = words.div_ceil(case.threads).max(4096);
            yw.par_chunks_mut(chunk)
                .zip(xw.par_chunks(chunk))
                .for_each(|(d, s)| kind.run(s, d));
        })
    });
    let sum_s = pool.install(|| {
        time(reps, sample, || {
            use rayon::prelude::*;
            let chunk = words.div_ceil(case.threads).max(4096);
            black_box(xw.par_chunks(chunk).map(roofs::simd_sum).sum::<f32>());
        })
    });
    let kind = match kind {
        CopyRoof::Memcpy => "memcpy",
        CopyRoof::Simd => "simd",
    };
    Ok(format!(
        "{{\"crate\": {:.1}, \"copy\": {:.1}, \"sum\": {:.1}, \"copy_kind\": \"{kind}\", \
         \"dtype\": \"{}\"}}",
        crate_s * 1e9,
        copy_s * 1e9,
        sum_s * 1e9,
        E::NAME
    ))
}

fn main() {
    let mut pools: HashMap<usize, rayon::ThreadPool> = HashMap::new();
    let stdin = std::io::stdin();
    let mut out = std::io::stdout().lock();
    for line in stdin.lock().lines() {
        let Ok(line) = line else { break };
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let reply = if line == "cpu" {
            let bn = BatchNorm::new(Shape::new(1, 1, 1).unwrap(), Layout::Nchw).unwrap();
            format!("{{\"backend\": \"{}\"}}", bn.backend().name())
        } else {
            match parse(line) {
                Ok(case) => {
                    let pool = pools.entry(case.threads).or_insert_with(|| {
                        rayon::ThreadPoolBuilder::new()
                            .num_threads(case.threads.max(1))
                            .build()
                            .expect("thread pool")
                    });
                    run(&case, pool).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
                }
                Err(e) => format!("{{\"error\": \"{e}\"}}"),
            }
        };
        let _ = writeln!(out, "{reply}");
        let _ = out.flush();
    }
}
