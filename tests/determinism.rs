//! Results are bit-identical for 1, 2, 3 and 8 threads and for sequential execution, on both
//! layouts, for shapes that take each schedule (many channels: fused per channel; few channels:
//! two-phase over pieces; HW = 1: rows).

mod common;

use batchnorm::{
    Affine, BackwardMode, BatchNorm, GradMode, Layout, Parallelism, ParamGrads, RunningStats,
    RunningUpdate, SavedStats, SavedStatsMut, Shape,
};
use common::*;

/// Everything every op produces, as raw bits.
fn run_all(bn: &BatchNorm, x: &[f32], dy: &[f32], gamma: &[f32], beta: &[f32]) -> Vec<u64> {
    let c = bn.shape().c();
    let mut out: Vec<f32> = Vec::new();
    let stats = bn.statistics(x).unwrap();
    let mut bits: Vec<u64> = stats
        .channels()
        .iter()
        .flat_map(|s| [s.count(), s.mean().to_bits(), s.m2().to_bits()])
        .collect();
    let mut y = vec![0.0; x.len()];
    let (mut mean, mut inv_std) = (vec![0.0; c], vec![0.0; c]);
    let (mut rm, mut rv) = (vec![0.0; c], vec![1.0; c]);
    bn.training(
        x,
        &mut y,
        Some(Affine { gamma, beta }),
        Some(SavedStatsMut {
            mean: &mut mean,
            inv_std: &mut inv_std,
        }),
        Some(RunningUpdate::pytorch(&mut rm, &mut rv)),
    )
    .unwrap();
    out.extend(&y);
    out.extend(&mean);
    out.extend(&inv_std);
    out.extend(&rm);
    out.extend(&rv);
    let mut yi = vec![0.0; x.len()];
    bn.inference(
        x,
        &mut yi,
        Some(Affine { gamma, beta }),
        RunningStats {
            mean: &rm,
            var: &rv,
        },
    )
    .unwrap();
    out.extend(&yi);
    for mode in [
        BackwardMode::Training(SavedStats {
            mean: &mean,
            inv_std: &inv_std,
        }),
        BackwardMode::Frozen(RunningStats {
            mean: &rm,
            var: &rv,
        }),
    ] {
        let mut dx = vec![0.0; x.len()];
        let (mut dg, mut db) = (vec![0.0; c], vec![0.0; c]);
        let grads = ParamGrads {
            dgamma: &mut dg,
            dbeta: &mut db,
            mode: GradMode::Overwrite,
        };
        bn.backward(
            x,
            dy,
            &mut dx,
            Some(Affine { gamma, beta }),
            mode,
            Some(grads),
        )
        .unwrap();
        out.extend(&dx);
        out.extend(&dg);
        out.extend(&db);
    }
    bits.extend(out.iter().map(|v| v.to_bits() as u64));
    bits
}

#[test]
fn bit_identical_for_any_thread_count() {
    let mut rng = Rng::new(31);
    let shapes = [
        Shape::new(2, 3, 40_000).unwrap(), // few channels, runs split into pieces
        Shape::new(4, 64, 63).unwrap(),    // many channels
        Shape::new(1, 1024, 49).unwrap(),  // many short runs
        Shape::new(300, 67, 1).unwrap(),   // HW = 1
        Shape::new(16, 5, 3000).unwrap(),  // several NHWC row blocks
        // NHWC rows of whole cache lines (peeled to aligned outputs) in elementwise blocks whose
        // size depends on the thread count: 1024 rows on one thread, 648 on two, 432 on three,
        // 256 on eight.
        Shape::new(1, 64, 5184).unwrap(),
    ];
    for shape in shapes {
        for layout in [Layout::Nchw, Layout::Nhwc] {
            let (means, stds) = ordinary(&mut rng, shape.c());
            let x = tensor(&mut rng, shape, layout, &means, &stds);
            let dy = rng.normals(shape.len(), 0.0, 1.0);
            let gamma = rng.normals(shape.c(), 1.0, 0.5);
            let beta = rng.normals(shape.c(), 0.0, 1.0);
            for backend in backends() {
                let bn = BatchNorm::new(shape, layout)
                    .unwrap()
                    .with_backend(backend)
                    .unwrap();
                let seq = run_all(
                    &bn.with_parallelism(Parallelism::Sequential),
                    &x,
                    &dy,
                    &gamma,
                    &beta,
                );
                for threads in [1, 2, 3, 8] {
                    let pool = rayon::ThreadPoolBuilder::new()
                        .num_threads(threads)
                        .build()
                        .unwrap();
                    let par = pool.install(|| run_all(&bn, &x, &dy, &gamma, &beta));
                    assert!(
                        par == seq,
                        "{shape:?} {layout:?} {backend:?}: {threads} threads differ"
                    );
                }
            }
        }
    }
}
