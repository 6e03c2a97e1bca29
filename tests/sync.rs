//! Synchronized batch norm over the in-process communicator (threads as ranks): every rank's
//! results against the f64 reference on the concatenated batch, against the single-process op on
//! that batch, bit-identical across ranks, bit-identical to the local op with one rank; uneven
//! and empty slices, both layouts, every running-update convention; and the errors every rank
//! gets, with nothing written, when the ranks disagree. The other storage types (f64, f16, bf16)
//! for the operations and for the layer: one rank bit for bit the local op, half data bit for bit
//! the f32 path rounded once, f64 data within the f64 tolerance of the single-process op.
//!
//! The tolerance and its reasoning: tests/common/sync_case.rs.
#![allow(clippy::needless_range_loop)]

mod common;
#[path = "common/sync_case.rs"]
mod sync_case;

use batchnorm::{
    Affine, BatchNormLayer, Communicator, Error, GradMode, Layout, Momentum, Parallelism,
    ParamGrads, Preset, RunningUpdate, SavedStats, SavedStatsMut, Shape, SyncBatchNorm, ThreadComm,
    Variance, bf16, f16,
};
use common::*;
use sync_case::*;

const LAYOUTS: [Layout; 2] = [Layout::Nchw, Layout::Nhwc];

/// Runs `f` on every rank of a new group of `k` threads; results in rank order.
fn on_ranks<T: Send>(k: usize, f: impl Fn(&ThreadComm) -> T + Sync) -> Vec<T> {
    std::thread::scope(|s| {
        let f = &f;
        let handles: Vec<_> = ThreadComm::group(k)
            .into_iter()
            .map(|comm| s.spawn(move || f(&comm)))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// Ranks' slices: uneven, empty ones (first, middle, last), one rank, four ranks.
const SLICES: &[&[usize]] = &[
    &[3, 1, 0],
    &[2, 2],
    &[1],
    &[0, 2, 1],
    &[1, 0, 3],
    &[1, 1, 1, 1],
    &[5],
];

/// (C, HW): 1, primes, not multiples of 16, a run of more than one NCHW piece (16411 > 16384),
/// wide NHWC rows (more than one 256-channel strip).
const SHAPES: &[(usize, usize)] = &[
    (1, 1),
    (3, 7),
    (17, 65),
    (67, 9),
    (5, 1000),
    (2, 16411),
    (300, 3),
];

#[test]
fn ranks_match_the_single_process_op_on_the_concatenated_batch() {
    let mut worst = Worst::default();
    let mut rng = Rng::new(131);
    let mut k = 0;
    for layout in LAYOUTS {
        for &shape in SHAPES {
            for &slices in SLICES {
                // Every convention and both parallelism settings across the cases.
                let mut case = Case::<f32>::new(&mut rng, layout, shape, slices)
                    .with_conv(CONVENTIONS[k % CONVENTIONS.len()]);
                case.par = [Parallelism::Rayon, Parallelism::Sequential][(k / 4) % 2];
                k += 1;
                let errors = on_ranks(case.slices.len(), |comm| case.check(comm));
                let ey = errors.iter().map(|e| e.0).fold(0.0, f64::max);
                let edx = errors.iter().map(|e| e.1).fold(0.0, f64::max);
                worst.note(&format!("sync y {layout:?}"), ey);
                worst.note(&format!("sync dx {layout:?}"), edx);
            }
        }
    }
}

#[test]
fn every_convention_on_both_layouts() {
    let mut rng = Rng::new(132);
    for layout in LAYOUTS {
        for conv in CONVENTIONS {
            let mut case = Case::<f32>::new(&mut rng, layout, (13, 11), &[2, 0, 3]);
            case.conv = conv;
            on_ranks(case.slices.len(), |comm| case.check(comm));
        }
    }
}

/// A rank that fails or disagrees: every rank's result, and every rank's outputs untouched.
fn training_results(
    k: usize,
    f: impl Fn(usize) -> (SyncBatchNorm, Option<Shape>, usize, (Momentum, Variance)) + Sync,
) -> Vec<Result<(), Error>> {
    on_ranks(k, |comm| {
        let (bn, shape, len, conv) = f(comm.rank());
        let c = bn.channels();
        let x = vec![1.0f32; len];
        let mut o = Outputs::<f32>::new(len, c);
        let saved = SavedStatsMut {
            mean: &mut o.saved_mean,
            inv_std: &mut o.saved_inv_std,
        };
        let up = update((&mut o.running_mean, &mut o.running_var), conv);
        let r = bn.training(&x, &mut o.y, shape, None, Some(saved), Some(up), comm);
        if r.is_err() {
            let untouched = Outputs::<f32>::new(len, c);
            assert!(o.y.iter().all(|v| v.is_nan()), "y written on error");
            assert_eq!(
                o.channel_bits(),
                untouched.channel_bits(),
                "written on error"
            );
        }
        r
    })
}

fn sync(c: usize, layout: Layout) -> SyncBatchNorm {
    SyncBatchNorm::new(c, layout).unwrap()
}

#[test]
fn disagreeing_ranks_all_get_the_error_and_nothing_is_written() {
    let pytorch = CONVENTIONS[0];
    let shape = |c| Shape::new(2, c, 3).ok();
    // Channels: rank 1 has 4.
    let r = training_results(3, |r| {
        let c = if r == 1 { 4 } else { 3 };
        (sync(c, Layout::Nchw), shape(c), 6 * c, pytorch)
    });
    let want = Error::SyncMismatch {
        what: "channels",
        rank: 1,
    };
    assert_eq!(r, vec![Err(want.clone()), Err(want.clone()), Err(want)]);
    // Layout, ε, momentum, estimator, on the last of three ranks.
    type Config<'a> = dyn Fn(usize) -> (SyncBatchNorm, (Momentum, Variance)) + Sync + 'a;
    let cases: [(&str, &Config); 4] = [
        ("layout", &|r| {
            let l = if r == 2 { Layout::Nhwc } else { Layout::Nchw };
            (sync(3, l), pytorch)
        }),
        ("eps", &|r| {
            let eps = if r == 2 { 1e-3 } else { 1e-5 };
            (sync(3, Layout::Nchw).with_eps(eps).unwrap(), pytorch)
        }),
        ("momentum", &|r| {
            let conv = if r == 2 { CONVENTIONS[3] } else { pytorch };
            (sync(3, Layout::Nchw), conv)
        }),
        ("variance estimator", &|r| {
            let est = if r == 2 {
                Variance::Biased
            } else {
                Variance::Unbiased
            };
            (sync(3, Layout::Nchw), (pytorch.0, est))
        }),
    ];
    for (what, f) in cases {
        let r = training_results(3, |r| {
            let (bn, conv) = f(r);
            (bn, shape(3), 18, conv)
        });
        let want = Err(Error::SyncMismatch { what, rank: 2 });
        assert_eq!(r, vec![want.clone(), want.clone(), want], "{what}");
    }
}

#[test]
fn a_rank_with_bad_arguments_fails_everywhere() {
    // Rank 0's x is one element short: it gets its own error, the others name it.
    let r = training_results(3, |r| {
        let len = if r == 0 { 17 } else { 18 };
        (
            sync(3, Layout::Nhwc),
            Shape::new(2, 3, 3).ok(),
            len,
            CONVENTIONS[0],
        )
    });
    assert!(matches!(
        r[0],
        Err(Error::LengthMismatch {
            arg: "x",
            expected: 18,
            actual: 17,
            ..
        })
    ));
    assert_eq!(r[1], Err(Error::SyncPeerFailed { rank: 0 }));
    assert_eq!(r[2], Err(Error::SyncPeerFailed { rank: 0 }));
    // A shape with another channel count than the operator's.
    let r = training_results(2, |r| {
        let c = if r == 1 { 4 } else { 3 };
        (
            sync(3, Layout::Nchw),
            Shape::new(1, c, 2).ok(),
            2 * c,
            CONVENTIONS[1],
        )
    });
    assert_eq!(r[0], Err(Error::SyncPeerFailed { rank: 1 }));
    assert_eq!(
        r[1],
        Err(Error::ChannelMismatch {
            expected: 3,
            actual: 4
        })
    );
}

#[test]
fn empty_and_too_small_global_batches() {
    // Every slice empty.
    let r = training_results(2, |_| (sync(2, Layout::Nchw), None, 0, CONVENTIONS[1]));
    assert_eq!(r, vec![Err(Error::EmptyBatch), Err(Error::EmptyBatch)]);
    // One value per channel in the whole batch: the unbiased running variance is rejected on
    // every rank, the biased one is fine.
    let one = |r: usize| {
        if r == 0 {
            Shape::new(1, 2, 1).ok()
        } else {
            None
        }
    };
    let len = |r: usize| if r == 0 { 2 } else { 0 };
    let r = training_results(2, |r| {
        (sync(2, Layout::Nhwc), one(r), len(r), CONVENTIONS[0])
    });
    let want = Err(Error::TooFewValues { per_channel: 1 });
    assert_eq!(r, vec![want.clone(), want]);
    let r = training_results(2, |r| {
        (sync(2, Layout::Nhwc), one(r), len(r), CONVENTIONS[1])
    });
    assert_eq!(r, vec![Ok(()), Ok(())]);
}

#[test]
fn ranks_calling_different_operations_get_an_error() {
    let results = on_ranks(2, |comm| {
        let bn = sync(2, Layout::Nchw);
        let shape = Shape::new(1, 2, 2).ok();
        let x = [1.0f32, 2.0, 3.0, 5.0];
        let mut out = [f32::NAN; 4];
        if comm.rank() == 0 {
            bn.training(&x, &mut out, shape, None, None, None, comm)
        } else {
            let saved = SavedStats {
                mean: &[2.0, 3.0],
                inv_std: &[1.0, 1.0],
            };
            bn.backward((&x, &x), &mut out, shape, None, saved, None, comm)
        }
        .map(|()| out)
    });
    let want = Err(Error::SyncMismatch {
        what: "operation",
        rank: 1,
    });
    assert_eq!(results, vec![want.clone(), want]);
}

#[test]
fn a_dropped_rank_is_an_error_not_a_hang() {
    let mut group = ThreadComm::group(2);
    drop(group.pop());
    let comm = &group[0];
    let mut recv = [0.0; 2];
    assert!(matches!(
        comm.all_gather(&[1.0], &mut recv),
        Err(Error::Communication { .. })
    ));
}

#[test]
fn thread_collectives_are_reusable_and_exact() {
    // Many rounds of different lengths; the sum is in rank order on every rank.
    let results = on_ranks(3, |comm| {
        let mut out = Vec::new();
        for round in 0..50 {
            let len = round % 5;
            let send: Vec<f64> = (0..len)
                .map(|i| (comm.rank() * 10 + i + round) as f64)
                .collect();
            let mut recv = vec![f64::NAN; 3 * len];
            comm.all_gather(&send, &mut recv).unwrap();
            let mut sum = vec![0.1 * comm.rank() as f64 + 1e16; len];
            comm.all_reduce_sum(&mut sum).unwrap();
            out.push((recv, sum));
        }
        out
    });
    for round in 0..50 {
        let len = round % 5;
        let (recv, sum) = &results[0][round];
        for r in 0..3 {
            for i in 0..len {
                assert_eq!(recv[r * len + i], (r * 10 + i + round) as f64);
            }
        }
        let want = (1e16 + 0.0) + (0.1 + 1e16) + (0.2 + 1e16);
        assert!(sum.iter().all(|&s| s == want), "rank-order sum");
        for other in &results[1..] {
            assert_eq!(&other[round], &results[0][round]);
        }
    }
}

#[test]
fn synchronized_layers_train_like_one_layer_on_the_whole_batch() {
    use batchnorm::BatchNormLayer;
    let mut rng = Rng::new(133);
    let (c, hw) = (5, 6);
    let slices = [2usize, 1, 0];
    let n: usize = slices.iter().sum();
    let whole = Shape::new(n, c, hw).unwrap();
    for layout in LAYOUTS {
        // PyTorch's layer with momentum=None: the cumulative average counts the batches.
        let make = || {
            let mut l = BatchNormLayer::pytorch(c, layout).unwrap();
            l = l.with_momentum(None).unwrap();
            l.set_affine(&rng_free_gamma(c), &vec![0.25; c]).unwrap();
            l
        };
        let steps: Vec<(Vec<f32>, Vec<f32>)> = (0..3)
            .map(|_| {
                let (means, stds) = ordinary(&mut rng, c);
                let x = tensor(&mut rng, whole, layout, &means, &stds);
                (x, rng.normals(whole.len(), 0.0, 1.0))
            })
            .collect();
        // One layer on the whole batch.
        let mut single = make();
        let mut single_out = Vec::new();
        for (x, dy) in &steps {
            let (mut y, mut dx) = (vec![0.0; x.len()], vec![0.0; x.len()]);
            single.forward(x, &mut y, whole).unwrap();
            single.backward(x, dy, &mut dx).unwrap();
            single_out.push((y, dx));
        }
        // Three ranks, each a layer with its slice.
        let per = c * hw;
        let ranks = on_ranks(slices.len(), |comm| {
            let r = comm.rank();
            let first: usize = slices[..r].iter().sum();
            let range = first * per..(first + slices[r]) * per;
            let shape = Shape::new(slices[r], c, hw).ok();
            let mut layer = make();
            let mut outs = Vec::new();
            for (x, dy) in &steps {
                let (x, dy) = (&x[range.clone()], &dy[range.clone()]);
                let (mut y, mut dx) = (vec![f32::NAN; x.len()], vec![f32::NAN; x.len()]);
                layer.forward_sync(x, &mut y, shape, comm).unwrap();
                // The local backward does not differentiate a synchronized forward.
                let mut scratch = dx.clone();
                assert_eq!(layer.backward(x, dy, &mut scratch), Err(Error::NoForward));
                layer.backward_sync(x, dy, &mut dx, comm).unwrap();
                outs.push((y, dx));
            }
            (layer, outs)
        });
        let tol = fwd_tol(whole.per_channel());
        for (r, (layer, outs)) in ranks.iter().enumerate() {
            let l0 = &ranks[0].0;
            // Bit-identical state on every rank.
            assert_eq!(layer.running_mean(), l0.running_mean(), "rank {r}");
            assert_eq!(layer.running_var(), l0.running_var(), "rank {r}");
            assert_eq!(layer.dgamma(), l0.dgamma(), "rank {r}");
            assert_eq!(layer.dbeta(), l0.dbeta(), "rank {r}");
            assert_eq!(layer.batches_tracked(), 3);
            // Close to the single layer (each within the stated tolerance of the truth; the
            // gradients accumulate over 3 steps).
            let close = |a: &[f32], b: &[f32], k: f64| {
                a.iter().zip(b).all(|(&a, &b)| {
                    (a as f64 - b as f64).abs() <= k * tol * (1.0 + (b as f64).abs())
                })
            };
            assert!(close(layer.running_mean(), single.running_mean(), 2.0));
            assert!(close(layer.running_var(), single.running_var(), 2.0));
            assert!(close(
                layer.dbeta(),
                single.dbeta(),
                6.0 * n as f64 * hw as f64
            ));
            assert!(close(
                layer.dgamma(),
                single.dgamma(),
                6.0 * n as f64 * hw as f64
            ));
            let first: usize = slices[..r].iter().sum();
            for ((y, dx), (sy, sdx)) in outs.iter().zip(&single_out) {
                let range = first * per..first * per + y.len();
                assert!(close(y, &sy[range.clone()], 4.0), "y rank {r}");
                assert!(close(dx, &sdx[range], 8.0), "dx rank {r}");
            }
        }
    }
}

/// γ away from zero, so the layer test's relative comparisons are meaningful.
fn rng_free_gamma(c: usize) -> Vec<f32> {
    (0..c).map(|i| 0.5 + 0.25 * i as f32).collect()
}

#[test]
fn backward_ranks_that_disagree_on_the_gradients_get_an_error() {
    use batchnorm::{GradMode, ParamGrads};
    let results = on_ranks(2, |comm| {
        let bn = sync(2, Layout::Nhwc);
        let shape = Shape::new(1, 2, 2).ok();
        let x = [1.0f32, 2.0, 3.0, 5.0];
        let mut dx = [f32::NAN; 4];
        let (mut dgamma, mut dbeta) = ([f32::NAN; 2], [f32::NAN; 2]);
        let grads = (comm.rank() == 0).then_some(ParamGrads {
            dgamma: &mut dgamma,
            dbeta: &mut dbeta,
            mode: GradMode::Overwrite,
        });
        let saved = SavedStats {
            mean: &[2.0, 3.0],
            inv_std: &[1.0, 1.0],
        };
        let r = bn.backward((&x, &x), &mut dx, shape, None, saved, grads, comm);
        assert!(dx.iter().chain(&dgamma).chain(&dbeta).all(|v| v.is_nan()));
        r
    });
    let want = Err(Error::SyncMismatch {
        what: "parameter gradients",
        rank: 1,
    });
    assert_eq!(results, vec![want.clone(), want]);
}

/// Shapes and slices of the storage-type cases: one to three ranks (an empty slice among them),
/// C = 1 and primes, HW = 1, odd, and a run of more than one NCHW piece.
const STORAGE_CASES: &[((usize, usize), &[usize])] = &[
    ((1, 1), &[3]),
    ((3, 7), &[2, 1]),
    ((17, 65), &[1, 0, 2]),
    ((67, 9), &[2]),
    ((5, 1000), &[1, 2, 1]),
    ((2, 16411), &[1, 1]),
    ((300, 3), &[0, 2, 1]),
];

/// Every storage-type case, both layouts, both parallelism settings, the conventions in turn:
/// `check` on every rank.
fn storage_cases<E: Store>(seed: u64, check: impl Fn(&Case<E>, &ThreadComm) + Sync) {
    let mut rng = Rng::new(seed);
    let mut k = 0;
    for layout in LAYOUTS {
        for &(shape, slices) in STORAGE_CASES {
            for par in [Parallelism::Sequential, Parallelism::Rayon] {
                let mut case = Case::<E>::new(&mut rng, layout, shape, slices)
                    .with_conv(CONVENTIONS[k % CONVENTIONS.len()]);
                case.par = par;
                k += 1;
                on_ranks(slices.len(), |comm| check(&case, comm));
            }
        }
    }
}

#[test]
fn f64_ranks_agree_and_match_the_single_process_op() {
    storage_cases::<f64>(134, |case, comm| case.check_f64(comm));
}

#[test]
fn half_ranks_are_the_f32_path_rounded_once() {
    storage_cases::<f16>(135, |case, comm| case.check_half(comm));
    storage_cases::<bf16>(136, |case, comm| case.check_half(comm));
}

#[test]
fn ranks_with_different_storage_types_get_an_error() {
    let results = on_ranks(2, |comm| {
        let bn = sync(2, Layout::Nchw);
        let shape = Shape::new(1, 2, 2).ok();
        if comm.rank() == 0 {
            let mut y = [f32::NAN; 4];
            let r = bn.training(
                &[1.0f32, 2.0, 3.0, 5.0],
                &mut y,
                shape,
                None,
                None,
                None,
                comm,
            );
            assert!(y.iter().all(|v| v.is_nan()), "y written on error");
            r
        } else {
            let mut y = [f16::NAN; 4];
            let x = [1.0, 2.0, 3.0, 5.0].map(f16::from_f32);
            let r = bn.training(&x, &mut y, shape, None, None, None, comm);
            assert!(y.iter().all(|v| v.is_nan()), "y written on error");
            r
        }
    });
    let want = Err(Error::SyncMismatch {
        what: "storage type",
        rank: 1,
    });
    assert_eq!(results, vec![want.clone(), want]);
}

/// The synchronized layers of every rank, two training steps and an evaluation step on data of
/// type `E`, against the synchronized ops (and in evaluation the local layer) called with the
/// layer's arguments on the same rank: y, dx and the layer's state, bit for bit.
fn layers_are_the_sync_ops<E: Store>(seed: u64) {
    let mut rng = Rng::new(seed);
    for layout in LAYOUTS {
        for &((c, hw), slices) in STORAGE_CASES {
            let n: usize = slices.iter().sum();
            let whole = Shape::new(n, c, hw).unwrap();
            let steps: Vec<(Vec<E>, Vec<E>)> = (0..3)
                .map(|_| {
                    let (means, stds) = ordinary(&mut rng, c);
                    let x = tensor_of(&mut rng, whole, layout, &means, &stds);
                    (x, normals_of::<E>(&mut rng, whole.len(), 0.0, 1.0))
                })
                .collect();
            let gamma = params_of::<E>(&mut rng, c, 0.5, 1.0);
            let beta = params_of::<E>(&mut rng, c, 0.0, 1.0);
            let par = [Parallelism::Sequential, Parallelism::Rayon][slices.len() % 2];
            on_ranks(slices.len(), |comm| {
                let r = comm.rank();
                let ctx = format!("{} {layout:?} C={c} HW={hw} {slices:?} rank {r}", E::NAME);
                let per = c * hw;
                let first: usize = slices[..r].iter().sum();
                let range = first * per..(first + slices[r]) * per;
                let shape = Shape::new(slices[r], c, hw).ok();
                // Keras: old-value weight, biased variance (a single value per channel is fine).
                let mut layer = BatchNormLayer::<E::Param>::new(c, layout, Preset::Keras)
                    .unwrap()
                    .with_parallelism(par);
                layer.set_affine(&gamma, &beta).unwrap();
                let bn = SyncBatchNorm::new(c, layout)
                    .unwrap()
                    .with_eps(layer.eps())
                    .unwrap()
                    .with_parallelism(par);
                let affine = Some(Affine {
                    gamma: &gamma,
                    beta: &beta,
                });
                let nan = E::round(f64::NAN);
                for (t, (x, dy)) in steps.iter().enumerate() {
                    let (x, dy) = (&x[range.clone()], &dy[range.clone()]);
                    let (mut rm, mut rv) =
                        (layer.running_mean().to_vec(), layer.running_var().to_vec());
                    let (mut sm, mut si) =
                        (vec![E::param(f64::NAN); c], vec![E::param(f64::NAN); c]);
                    let (mut dg, mut db) = (layer.dgamma().to_vec(), layer.dbeta().to_vec());
                    let (mut y, mut y_op) = (vec![nan; x.len()], vec![nan; x.len()]);
                    let (mut dx, mut dx_op) = (vec![nan; x.len()], vec![nan; x.len()]);
                    if t == 2 {
                        // Evaluation: no exchange, the local layer's forward and backward.
                        layer.eval();
                        let mut local = layer.clone();
                        layer.forward_sync(x, &mut y, shape, comm).unwrap();
                        layer.backward_sync(x, dy, &mut dx, comm).unwrap();
                        if let Some(shape) = shape {
                            local.forward(x, &mut y_op, shape).unwrap();
                            local.backward(x, dy, &mut dx_op).unwrap();
                        }
                        assert_eq!(bits(&y), bits(&y_op), "{ctx}: eval y");
                        assert_eq!(bits(&dx), bits(&dx_op), "{ctx}: eval dx");
                        assert_eq!(bits(layer.dgamma()), bits(local.dgamma()), "{ctx}");
                        assert_eq!(bits(layer.dbeta()), bits(local.dbeta()), "{ctx}");
                        continue;
                    }
                    let update = RunningUpdate::keras(&mut rm, &mut rv);
                    let saved = SavedStatsMut {
                        mean: &mut sm,
                        inv_std: &mut si,
                    };
                    bn.training(x, &mut y_op, shape, affine, Some(saved), Some(update), comm)
                        .unwrap();
                    layer.forward_sync(x, &mut y, shape, comm).unwrap();
                    let saved = SavedStats {
                        mean: &sm,
                        inv_std: &si,
                    };
                    let grads = ParamGrads {
                        dgamma: &mut dg,
                        dbeta: &mut db,
                        mode: GradMode::Accumulate,
                    };
                    bn.backward((x, dy), &mut dx_op, shape, affine, saved, Some(grads), comm)
                        .unwrap();
                    layer.backward_sync(x, dy, &mut dx, comm).unwrap();
                    assert_eq!(bits(&y), bits(&y_op), "{ctx} step {t}: y");
                    assert_eq!(bits(&dx), bits(&dx_op), "{ctx} step {t}: dx");
                    assert_layer_state(&layer, [&sm, &si, &rm, &rv, &dg, &db], &ctx);
                    assert_eq!(layer.batches_tracked(), t as u64 + 1, "{ctx}");
                }
            });
        }
    }
}

#[test]
fn synchronized_layers_are_the_sync_ops_for_every_storage_type() {
    layers_are_the_sync_ops::<f32>(137);
    layers_are_the_sync_ops::<f64>(138);
    layers_are_the_sync_ops::<f16>(139);
    layers_are_the_sync_ops::<bf16>(140);
}
