//! Repeated calls allocate nothing after the first: every operation's scratch memory comes from a
//! per-thread pool (the crate's `scratch` module). Counted with a counting global allocator, on the
//! calling thread, for sequential execution on every backend, both layouts and shapes that take
//! every schedule of the drivers. The only allocation left is the result that `training` and
//! `statistics` return (their `BatchStats`; `training_into` and `statistics_into` write it into
//! the caller's slice and allocate nothing); the layer, which keeps no such result, allocates
//! nothing.

mod common;
#[path = "common/counting.rs"]
mod counting;

use batchnorm::{
    Affine, BackwardMode, BatchNorm, BatchNormLayer, ChannelStats, Epilogue, GradMode, Layout,
    Parallelism, ParamGrads, RunningStats, RunningUpdate, SavedStats, SavedStatsMut, Shape,
};
use common::*;
use counting::allocations;

/// Shapes for every driver schedule: NCHW whole channels (N > 1, short channels), short runs with
/// one sample, long runs split into pieces, HW = 1 (the row driver); NHWC narrow rows (periodic
/// kernels), wide rows (several strips), tall tensors (many row blocks).
const SHAPES: [(usize, usize, usize); 7] = [
    (4, 6, 49),
    (1, 64, 49),
    (2, 3, 40_000),
    (33, 10, 1),
    (8, 5, 9),
    (3, 300, 17),
    (2, 20, 3_000),
];

/// Every operation once with every output asked for; the number of allocations of each call.
fn run_all(bn: &BatchNorm, x: &[f32], dy: &[f32]) -> Vec<(&'static str, u64)> {
    let c = bn.shape().c();
    let (gamma, beta) = (vec![1.5f32; c], vec![0.25f32; c]);
    let affine = Some(Affine {
        gamma: &gamma,
        beta: &beta,
    });
    let (mut mean, mut inv_std) = (vec![0.0f32; c], vec![0.0f32; c]);
    let (mut rmean, mut rvar) = (vec![0.0f32; c], vec![1.0f32; c]);
    let (mut dgamma, mut dbeta) = (vec![0.0f32; c], vec![0.0f32; c]);
    let (mut y, mut dx, mut buf) = (vec![0.0f32; x.len()], vec![0.0f32; x.len()], x.to_vec());
    let mut counts = Vec::with_capacity(8);
    let mut count = |name, n| counts.push((name, n));

    count(
        "training",
        allocations(|| {
            let saved = SavedStatsMut {
                mean: &mut mean,
                inv_std: &mut inv_std,
            };
            let update = RunningUpdate::pytorch(&mut rmean, &mut rvar);
            let stats = bn.training(x, &mut y, affine, Some(saved), Some(update));
            drop(stats.unwrap());
        }),
    );
    count(
        "statistics",
        allocations(|| drop(bn.statistics(x).unwrap())),
    );
    let mut stats = vec![ChannelStats::default(); c];
    count(
        "training_into",
        allocations(|| {
            let update = RunningUpdate::pytorch(&mut rmean, &mut rvar);
            let (epilogue, out) = (Epilogue::None, Some(&mut stats[..]));
            bn.training_into(x, &mut y, affine, None, Some(update), epilogue, out)
                .unwrap()
        }),
    );
    count(
        "statistics_into",
        allocations(|| bn.statistics_into(x, &mut stats).unwrap()),
    );
    let running = RunningStats {
        mean: &rmean,
        var: &rvar,
    };
    count(
        "inference",
        allocations(|| bn.inference(x, &mut y, affine, running).unwrap()),
    );
    count(
        "inference_in_place",
        allocations(|| bn.inference_in_place(&mut buf, affine, running).unwrap()),
    );
    let saved = BackwardMode::Training(SavedStats {
        mean: &mean,
        inv_std: &inv_std,
    });
    for (name, mode) in [
        ("backward training", saved),
        ("backward frozen", BackwardMode::Frozen(running)),
    ] {
        count(
            name,
            allocations(|| {
                let grads = ParamGrads {
                    dgamma: &mut dgamma,
                    dbeta: &mut dbeta,
                    mode: GradMode::Overwrite,
                };
                bn.backward(x, dy, &mut dx, affine, mode, Some(grads))
                    .unwrap()
            }),
        );
    }
    buf.copy_from_slice(dy);
    count(
        "backward_in_place",
        allocations(|| {
            bn.backward_in_place(x, &mut buf, affine, saved, None)
                .unwrap()
        }),
    );
    counts
}

#[test]
fn repeated_operations_allocate_only_their_results() {
    let mut rng = Rng::new(41);
    for (n, c, hw) in SHAPES {
        let shape = Shape::new(n, c, hw).unwrap();
        let x = rng.normals(shape.len(), 3.0, 2.0);
        let dy = rng.normals(shape.len(), 0.0, 1.0);
        for layout in [Layout::Nchw, Layout::Nhwc] {
            for bn in operators(shape, layout, 1e-5) {
                if bn.parallelism() != Parallelism::Sequential {
                    continue;
                }
                run_all(&bn, &x, &dy); // the first call fills this thread's pool
                for (op, count) in run_all(&bn, &x, &dy) {
                    // `training` and `statistics` allocate their returned `BatchStats` only.
                    let result = usize::from(matches!(op, "training" | "statistics")) as u64;
                    assert_eq!(
                        count,
                        result,
                        "{op} {n}x{c}x{hw} {layout:?} {:?}: {count} allocations",
                        bn.backend()
                    );
                }
            }
        }
    }
}

#[test]
fn the_layer_allocates_nothing_after_the_first_step() {
    let mut rng = Rng::new(42);
    for (n, c, hw) in SHAPES {
        let shape = Shape::new(n, c, hw).unwrap();
        let x = rng.normals(shape.len(), -1.0, 0.5);
        let dy = rng.normals(shape.len(), 0.0, 1.0);
        let (mut y, mut dx) = (vec![0.0f32; x.len()], vec![0.0f32; x.len()]);
        for layout in [Layout::Nchw, Layout::Nhwc] {
            for backend in backends() {
                let mut layer = BatchNormLayer::pytorch(c, layout)
                    .unwrap()
                    .with_backend(backend)
                    .unwrap()
                    .with_parallelism(Parallelism::Sequential);
                let mut step = |layer: &mut BatchNormLayer| {
                    layer.train();
                    layer.forward(&x, &mut y, shape).unwrap();
                    layer.backward(&x, &dy, &mut dx).unwrap();
                    layer.eval();
                    layer.forward(&x, &mut y, shape).unwrap();
                    layer.backward(&x, &dy, &mut dx).unwrap();
                };
                step(&mut layer);
                let count = allocations(|| step(&mut layer));
                assert_eq!(count, 0, "{n}x{c}x{hw} {layout:?} {backend:?}");
            }
        }
    }
}
