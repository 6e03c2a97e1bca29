//! Shared test helpers: deterministic data, backends under test, tolerances, error metrics.
#![allow(dead_code, unused_imports)]

use batchnorm::{
    Backend, BatchNorm, BatchNormLayer, Element, Layout, Parallelism, Param, SavedStatsMut, Shape,
    bf16, f16,
};

pub use batchnorm_check::{EPS32, fwd_tol, stats_tol};

/// Backends under test: the one forced by `BATCHNORM_BACKEND` (the test fails if this CPU
/// cannot run it), else every backend this CPU has.
pub fn backends() -> Vec<Backend> {
    match std::env::var("BATCHNORM_BACKEND") {
        Ok(name) => {
            let b = Backend::from_name(&name).unwrap_or_else(|| panic!("unknown backend {name}"));
            assert!(
                b.is_available(),
                "BATCHNORM_BACKEND={name} but this CPU cannot run it"
            );
            vec![b]
        }
        Err(_) => Backend::available(),
    }
}

/// Operators for `shape`/`layout` on every backend under test, sequential and on rayon.
pub fn operators(shape: Shape, layout: Layout, eps: f64) -> Vec<BatchNorm> {
    let mut ops = Vec::new();
    for b in backends() {
        for par in [Parallelism::Sequential, Parallelism::Rayon] {
            let bn = BatchNorm::new(shape, layout)
                .unwrap()
                .with_eps(eps)
                .unwrap();
            ops.push(bn.with_backend(b).unwrap().with_parallelism(par));
        }
    }
    ops
}

/// The checker's random generator (SplitMix64), shared so tests and fuzz replays draw alike.
pub use batchnorm_check::Rng;

/// A storage type under test, built from f64 values: data of type `Self`, parameters of type
/// `Self::Param`, each rounded to nearest.
pub trait Store: Element {
    /// `x` rounded to this type.
    fn round(x: f64) -> Self;
    /// `x` rounded to the parameter type.
    fn param(x: f64) -> Self::Param;
}

impl Store for f32 {
    fn round(x: f64) -> f32 {
        x as f32
    }
    fn param(x: f64) -> f32 {
        x as f32
    }
}

impl Store for f64 {
    fn round(x: f64) -> f64 {
        x
    }
    fn param(x: f64) -> f64 {
        x
    }
}

impl Store for f16 {
    fn round(x: f64) -> f16 {
        f16::from_f64(x)
    }
    fn param(x: f64) -> f32 {
        x as f32
    }
}

impl Store for bf16 {
    fn round(x: f64) -> bf16 {
        bf16::from_f64(x)
    }
    fn param(x: f64) -> f32 {
        x as f32
    }
}

/// `len` values `mean + std·N(0,1)` of type `E` (for f32, [`Rng::normals`]).
pub fn normals_of<E: Store>(rng: &mut Rng, len: usize, mean: f64, std: f64) -> Vec<E> {
    (0..len)
        .map(|_| E::round(mean + std * rng.normal()))
        .collect()
}

/// `len` parameters `mean + std·N(0,1)` of `E`'s parameter type.
pub fn params_of<E: Store>(rng: &mut Rng, len: usize, mean: f64, std: f64) -> Vec<E::Param> {
    (0..len)
        .map(|_| E::param(mean + std * rng.normal()))
        .collect()
}

/// The values as bits (widened to f64 first, exactly), to compare outputs of any type bit for
/// bit.
pub fn bits<T: Copy + Into<f64>>(v: &[T]) -> Vec<u64> {
    v.iter().map(|&x| x.into().to_bits()).collect()
}

/// The layer's per-channel state, bit for bit `want`: the saved mean and inverse std, the running
/// mean and variance, dγ and dβ, in that order.
pub fn assert_layer_state<P: Param>(layer: &BatchNormLayer<P>, want: [&[P]; 6], ctx: &str) {
    let got = [
        layer.saved_mean(),
        layer.saved_inv_std(),
        layer.running_mean(),
        layer.running_var(),
        layer.dgamma(),
        layer.dbeta(),
    ];
    let names = [
        "saved mean",
        "inv std",
        "running mean",
        "running var",
        "dgamma",
        "dbeta",
    ];
    for ((got, want), name) in got.iter().zip(want).zip(names) {
        assert_eq!(bits(got), bits(want), "{ctx}: {name}");
    }
}

/// A tensor whose channel `c` is `means[c] + stds[c]·N(0,1)`, in `layout`.
pub fn tensor(
    rng: &mut Rng,
    shape: Shape,
    layout: Layout,
    means: &[f64],
    stds: &[f64],
) -> Vec<f32> {
    tensor_of(rng, shape, layout, means, stds)
}

/// [`tensor`] of type `E`.
pub fn tensor_of<E: Store>(
    rng: &mut Rng,
    shape: Shape,
    layout: Layout,
    means: &[f64],
    stds: &[f64],
) -> Vec<E> {
    let mut x = vec![E::default(); shape.len()];
    for n in 0..shape.n() {
        for c in 0..shape.c() {
            for s in 0..shape.hw() {
                x[shape.index(layout, n, c, s)] = E::round(means[c] + stds[c] * rng.normal());
            }
        }
    }
    x
}

/// Per-channel means and stds of ordinary data: means in [-2, 2], stds in [0.5, 2].
pub fn ordinary(rng: &mut Rng, c: usize) -> (Vec<f64>, Vec<f64>) {
    let means = (0..c).map(|_| 4.0 * rng.uniform() - 2.0).collect();
    let stds = (0..c).map(|_| 0.5 + 1.5 * rng.uniform()).collect();
    (means, stds)
}

/// Saved mean and inverse std from the crate's own training forward, as a user would have them.
pub fn forward_saved(bn: &BatchNorm, x: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let c = bn.shape().c();
    let (mut mean, mut inv_std) = (vec![0.0; c], vec![0.0; c]);
    let mut y = vec![0.0; x.len()];
    let saved = SavedStatsMut {
        mean: &mut mean,
        inv_std: &mut inv_std,
    };
    bn.training(x, &mut y, None, Some(saved), None).unwrap();
    (mean, inv_std)
}

/// Channel of flat index `i`.
pub fn channel_of(shape: Shape, layout: Layout, i: usize) -> usize {
    match layout {
        Layout::Nchw => (i / shape.hw()) % shape.c(),
        Layout::Nhwc => i % shape.c(),
    }
}

/// The same logical tensor converted between layouts.
pub fn relayout(x: &[f32], shape: Shape, from: Layout, to: Layout) -> Vec<f32> {
    let mut y = vec![0.0; x.len()];
    for n in 0..shape.n() {
        for c in 0..shape.c() {
            for s in 0..shape.hw() {
                y[shape.index(to, n, c, s)] = x[shape.index(from, n, c, s)];
            }
        }
    }
    y
}

/// The sweep of shapes the issue asks for.
pub const SWEEP_C: &[usize] = &[
    1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 31, 64, 67,
];
pub const SWEEP_HW: &[usize] = &[1, 2, 3, 7, 8, 9, 63, 64, 65, 1000];
pub const SWEEP_N: &[usize] = &[1, 2, 5];

/// Wide rows `(n, c, hw)`, beyond the sweep's channel counts: NHWC reductions split rows of more
/// than 256 channels into strips (a partial last strip here) and more than 256 rows into row
/// blocks (300 and 325 rows); streaming passes take parameter lanes strip by strip once a
/// period's lanes outgrow L1 (c = 250 has a period of 2000 values, c = 1030 of 8240). Besides,
/// rows of three whole vectors (c = 48 on AVX-512, 24 on AVX2), which the column streams store
/// as a group of 3; and rows of 2 and 4 KiB in f32 (c = 512, 1024), which the NHWC backward sums
/// of the AVX2 and portable backends walk in chunks of rows, all the groups of a strip per chunk
/// (a partial chunk and a partial band of 16 rows here: 21 and 18 rows); and rows of 4 KiB in
/// half data (c = 2048), walked in chunks there too, as are half data's rows of 128 to 512 bytes
/// (chunks of 8 rows: the sweep's c = 64 and 67, and c = 250 here).
pub const WIDE: &[(usize, usize, usize)] = &[
    (2, 24, 9),
    (3, 48, 5),
    (1, 250, 3),
    (2, 257, 5),
    (300, 300, 1),
    (1, 521, 7),
    (5, 600, 65),
    (2, 1030, 3),
    (1, 2049, 2),
    (3, 512, 7),
    (2, 1024, 9),
    (1, 2048, 18),
];

/// Long channels `(n, c, hw)` of several samples: more values per channel than the NCHW driver
/// keeps whole in L2, so it reduces piece by piece and writes in memory order, with runs longer
/// than one piece (16384 values; fewer and more samples than channels) and runs of one piece.
pub const LONG: &[(usize, usize, usize)] = &[(2, 3, 16411), (3, 2, 16390), (3, 2, 11001)];

/// Every shape of the sweep: `SWEEP_N × SWEEP_C × SWEEP_HW`, then [`WIDE`] and [`LONG`].
pub fn sweep_shapes() -> Vec<Shape> {
    let mut v = Vec::new();
    for &n in SWEEP_N {
        for &c in SWEEP_C {
            for &hw in SWEEP_HW {
                v.push(Shape::new(n, c, hw).unwrap());
            }
        }
    }
    v.extend(
        WIDE.iter()
            .chain(LONG)
            .map(|&(n, c, hw)| Shape::new(n, c, hw).unwrap()),
    );
    v
}

/// Largest `|got − want| / scale` over all elements; NaN anywhere counts as infinite.
pub fn max_rel_err(got: &[f32], want: &[f64], scale: impl Fn(usize) -> f64) -> f64 {
    assert_eq!(got.len(), want.len());
    let mut worst: f64 = 0.0;
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let e = (g as f64 - w).abs() / scale(i);
        if e.is_nan() {
            return f64::INFINITY;
        }
        worst = worst.max(e);
    }
    worst
}

/// Records the worst error seen for a label and prints it at the end of a test (for the notes).
#[derive(Default)]
pub struct Worst(pub Vec<(String, f64)>);

impl Worst {
    pub fn note(&mut self, label: &str, e: f64) {
        match self.0.iter_mut().find(|(l, _)| l == label) {
            Some((_, w)) => *w = w.max(e),
            None => self.0.push((label.to_string(), e)),
        }
    }
}

impl Drop for Worst {
    fn drop(&mut self) {
        for (l, e) in &self.0 {
            println!(
                "worst error {l}: {e:.3e} (in units of f32 roundoff: {:.1})",
                e / EPS32
            );
        }
    }
}
