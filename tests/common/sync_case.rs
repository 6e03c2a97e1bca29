//! One case of synchronized batch norm checked on one rank, over any communicator: shared by
//! tests/sync.rs (threads as ranks) and tests/mpi.rs (MPI processes).
//!
//! Tolerance: the same as the local op's, `fwd_tol(M)` with M the global count, relative to the
//! size of the terms of each output (as tests/forward.rs and tests/backward.rs measure them).
//! Why it still holds: each rank's statistics and backward sums are the local op's (f32 lanes of
//! at most `LANE_STEPS` steps folded into f64); the merge of the ranks' (count, mean, M2) and the
//! sum of their backward sums are f64 operations, orders of magnitude below f32's roundoff. So the
//! per-rank split changes the last bits of the f64 statistics (another merge order than one
//! process's block order) but not the bound; against the single-process op the difference is at
//! most the sum of both errors, 2·`fwd_tol(M)`.
#![allow(dead_code, clippy::needless_range_loop)]

use batchnorm::{
    Affine, BatchNorm, Communicator, GradMode, Layout, Momentum, Parallelism, ParamGrads,
    RunningUpdate, SavedStats, SavedStatsMut, Shape, SyncBatchNorm, Variance,
};
use batchnorm_check::reference;

use super::common::*;

/// The running-update conventions: PyTorch, ONNX, Keras, cumulative average (PyTorch's
/// `momentum=None`, third batch).
pub const CONVENTIONS: [(Momentum, Variance); 4] = [
    (Momentum::NewWeight(0.1), Variance::Unbiased),
    (Momentum::OldWeight(0.9), Variance::Biased),
    (Momentum::OldWeight(0.99), Variance::Biased),
    (
        Momentum::CumulativeAverage { batches_tracked: 3 },
        Variance::Unbiased,
    ),
];

/// Everything a training forward and its backward produce on one rank (or one process).
#[derive(Clone, Debug, PartialEq)]
pub struct Outputs {
    pub y: Vec<f32>,
    pub saved_mean: Vec<f32>,
    pub saved_inv_std: Vec<f32>,
    pub running_mean: Vec<f32>,
    pub running_var: Vec<f32>,
    pub dx: Vec<f32>,
    pub dgamma: Vec<f32>,
    pub dbeta: Vec<f32>,
}

impl Outputs {
    /// Filled with NaN (outputs) and the initial running statistics (0.5, 2).
    pub fn new(len: usize, c: usize) -> Outputs {
        Outputs {
            y: vec![f32::NAN; len],
            saved_mean: vec![f32::NAN; c],
            saved_inv_std: vec![f32::NAN; c],
            running_mean: vec![0.5; c],
            running_var: vec![2.0; c],
            dx: vec![f32::NAN; len],
            dgamma: vec![f32::NAN; c],
            dbeta: vec![f32::NAN; c],
        }
    }

    /// The per-channel results as bits, for bit-identity across ranks.
    pub fn channel_bits(&self) -> Vec<u32> {
        [
            &self.saved_mean,
            &self.saved_inv_std,
            &self.running_mean,
            &self.running_var,
            &self.dgamma,
            &self.dbeta,
        ]
        .iter()
        .flat_map(|v| v.iter().map(|x| x.to_bits()))
        .collect()
    }
}

pub fn update<'a>(
    o: (&'a mut [f32], &'a mut [f32]),
    conv: (Momentum, Variance),
) -> RunningUpdate<'a> {
    RunningUpdate {
        mean: o.0,
        var: o.1,
        momentum: conv.0,
        var_estimator: conv.1,
    }
}

/// The data of one case: the concatenated batch and the parameters.
pub struct Case {
    pub layout: Layout,
    pub c: usize,
    pub hw: usize,
    pub slices: Vec<usize>,
    pub conv: (Momentum, Variance),
    pub par: Parallelism,
    pub x: Vec<f32>,
    pub dy: Vec<f32>,
    pub gamma: Vec<f32>,
    pub beta: Vec<f32>,
}

impl Case {
    pub fn new(rng: &mut Rng, layout: Layout, (c, hw): (usize, usize), slices: &[usize]) -> Case {
        let n: usize = slices.iter().sum();
        let shape = Shape::new(n, c, hw).unwrap();
        let (means, stds) = ordinary(rng, c);
        Case {
            layout,
            c,
            hw,
            slices: slices.to_vec(),
            conv: CONVENTIONS[0],
            par: Parallelism::Rayon,
            x: tensor(rng, shape, layout, &means, &stds),
            dy: rng.normals(shape.len(), 0.0, 1.0),
            gamma: rng.normals(c, 0.0, 1.0),
            beta: rng.normals(c, 0.0, 1.0),
        }
    }

    pub fn shape(&self) -> Shape {
        Shape::new(self.slices.iter().sum(), self.c, self.hw).unwrap()
    }

    /// Element range of rank r's slice in the concatenated tensors (concatenation along N is
    /// concatenation of the flat buffers, in both layouts).
    pub fn range(&self, r: usize) -> std::ops::Range<usize> {
        let per = self.c * self.hw;
        let first: usize = self.slices[..r].iter().sum();
        first * per..(first + self.slices[r]) * per
    }

    /// Forward then backward on rank `comm.rank()`'s slice.
    pub fn run_rank<C: Communicator>(&self, comm: &C) -> Outputs {
        let range = self.range(comm.rank());
        let (x, dy) = (&self.x[range.clone()], &self.dy[range]);
        let shape = Shape::new(self.slices[comm.rank()], self.c, self.hw).ok();
        let bn = SyncBatchNorm::new(self.c, self.layout)
            .unwrap()
            .with_parallelism(self.par);
        let mut o = Outputs::new(x.len(), self.c);
        let affine = Some(Affine {
            gamma: &self.gamma,
            beta: &self.beta,
        });
        let saved = SavedStatsMut {
            mean: &mut o.saved_mean,
            inv_std: &mut o.saved_inv_std,
        };
        let up = update((&mut o.running_mean, &mut o.running_var), self.conv);
        bn.training(x, &mut o.y, shape, affine, Some(saved), Some(up), comm)
            .unwrap();
        let saved = SavedStats {
            mean: &o.saved_mean,
            inv_std: &o.saved_inv_std,
        };
        let grads = ParamGrads {
            dgamma: &mut o.dgamma,
            dbeta: &mut o.dbeta,
            mode: GradMode::Overwrite,
        };
        bn.backward((x, dy), &mut o.dx, shape, affine, saved, Some(grads), comm)
            .unwrap();
        o
    }

    /// The local op on the whole concatenated batch, in one process.
    pub fn run_single(&self) -> Outputs {
        let bn = BatchNorm::new(self.shape(), self.layout)
            .unwrap()
            .with_parallelism(self.par);
        let mut o = Outputs::new(self.x.len(), self.c);
        let affine = Some(Affine {
            gamma: &self.gamma,
            beta: &self.beta,
        });
        let saved = SavedStatsMut {
            mean: &mut o.saved_mean,
            inv_std: &mut o.saved_inv_std,
        };
        let up = update((&mut o.running_mean, &mut o.running_var), self.conv);
        bn.training(&self.x, &mut o.y, affine, Some(saved), Some(up))
            .unwrap();
        let mode = batchnorm::BackwardMode::Training(SavedStats {
            mean: &o.saved_mean,
            inv_std: &o.saved_inv_std,
        });
        let grads = ParamGrads {
            dgamma: &mut o.dgamma,
            dbeta: &mut o.dbeta,
            mode: GradMode::Overwrite,
        };
        bn.backward(&self.x, &self.dy, &mut o.dx, affine, mode, Some(grads))
            .unwrap();
        o
    }

    /// Runs this rank's forward and backward, and checks: the per-channel results are
    /// bit-identical on every rank (gathered through `comm`), this rank's slice of y and dx and
    /// the per-channel results are within `fwd_tol(M)` of the f64 reference on the concatenated
    /// batch and within twice that of the single-process op, and with one rank everything equals
    /// the local op bit for bit. Returns the worst errors (y, dx) relative to their scales.
    pub fn check<C: Communicator>(&self, comm: &C) -> (f64, f64) {
        let r = comm.rank();
        let ctx = format!(
            "rank {r}: {:?} C={} HW={} slices {:?} {:?} {:?}",
            self.layout, self.c, self.hw, self.slices, self.conv, self.par
        );
        let got = self.run_rank(comm);
        let bits: Vec<f64> = got.channel_bits().iter().map(|&b| b as f64).collect();
        let mut all = vec![0.0; bits.len() * comm.size()];
        comm.all_gather(&bits, &mut all).unwrap();
        for (other, row) in all.chunks_exact(bits.len()).enumerate() {
            assert_eq!(row, &bits[..], "rank {other} differs from {ctx}");
        }
        let single = self.run_single();
        let range = self.range(r);
        if self.slices.len() == 1 {
            assert_eq!(got, single, "one rank differs from the local op: {ctx}");
        }

        let (shape, layout, c) = (self.shape(), self.layout, self.c);
        let m = shape.per_channel();
        let tol = fwd_tol(m);
        let (x, dy, gamma, beta) = (&self.x, &self.dy, &self.gamma, &self.beta);
        let want = reference::training(x, shape, layout, Some(gamma), Some(beta), 1e-5);
        let grads = reference::backward_training(x, dy, shape, layout, Some(gamma), 1e-5);
        let xhat = |i: usize| {
            let ch = channel_of(shape, layout, i);
            (x[i] as f64 - want.mean[ch]) * want.inv_std[ch]
        };
        // Scales (of the whole batch's element i): the terms of y = γ·x̂ + β; the terms of dx
        // with absolute values; Σ|x̂·dy| for dγ, Σ|dy| for dβ (as tests/forward.rs and
        // tests/backward.rs measure the local op).
        let y_scale = |i: usize| {
            let ch = channel_of(shape, layout, i);
            (gamma[ch] as f64).abs() * (1.0 + xhat(i).abs()) + (beta[ch] as f64).abs()
        };
        let (mut sum_dy, mut sum_xdy) = (vec![0.0; c], vec![0.0; c]);
        for i in 0..x.len() {
            let ch = channel_of(shape, layout, i);
            sum_dy[ch] += (dy[i] as f64).abs();
            sum_xdy[ch] += (xhat(i) * dy[i] as f64).abs();
        }
        let dx_scale = |i: usize| {
            let ch = channel_of(shape, layout, i);
            let mf = m as f64;
            (gamma[ch] as f64).abs()
                * want.inv_std[ch]
                * ((dy[i] as f64).abs() + sum_dy[ch] / mf + xhat(i).abs() * sum_xdy[ch] / mf)
        };
        let first = range.start;
        let ey = max_rel_err(&got.y, &want.y[range.clone()], |i| y_scale(first + i));
        assert!(ey <= tol, "y: {ctx}: {ey:e} > {tol:e}");
        let edx = max_rel_err(&got.dx, &grads.dx[range.clone()], |i| dx_scale(first + i));
        assert!(edx <= tol, "dx: {ctx}: {edx:e} > {tol:e}");
        let eg = max_rel_err(&got.dgamma, &grads.dgamma, |ch| {
            sum_xdy[ch] + f64::MIN_POSITIVE
        });
        let eb = max_rel_err(&got.dbeta, &grads.dbeta, |ch| {
            sum_dy[ch] + f64::MIN_POSITIVE
        });
        assert!(eg <= tol && eb <= tol, "dgamma {eg:e} dbeta {eb:e}: {ctx}");
        let (rm, rv) = reference::running_update(
            &vec![0.5; c],
            &vec![2.0; c],
            &want,
            self.conv.0,
            self.conv.1,
        );
        for ch in 0..c {
            let std = want.var[ch].sqrt();
            let em =
                (got.saved_mean[ch] as f64 - want.mean[ch]).abs() / (std + want.mean[ch].abs());
            assert!(em <= tol, "saved mean ch {ch}: {em:e}: {ctx}");
            let ei = (got.saved_inv_std[ch] as f64 / want.inv_std[ch] - 1.0).abs();
            assert!(ei <= tol, "saved inv_std ch {ch}: {ei:e}: {ctx}");
            let erm = (got.running_mean[ch] as f64 - rm[ch]).abs() / (rm[ch].abs() + std);
            assert!(erm <= tol, "running mean ch {ch}: {erm:e}: {ctx}");
            let erv = (got.running_var[ch] as f64 / rv[ch] - 1.0).abs();
            assert!(erv <= tol, "running var ch {ch}: {erv:e}: {ctx}");
        }

        // Against the single-process op: each is within `tol` of the reference.
        let e = max_rel_err(&got.y, &to_f64(&single.y[range.clone()]), |i| {
            y_scale(first + i)
        });
        assert!(e <= 2.0 * tol, "y vs single process: {ctx}: {e:e}");
        let e = max_rel_err(&got.dx, &to_f64(&single.dx[range]), |i| dx_scale(first + i));
        assert!(e <= 2.0 * tol, "dx vs single process: {ctx}: {e:e}");
        for ch in 0..c {
            let d = (got.running_var[ch] as f64 / single.running_var[ch] as f64 - 1.0).abs();
            assert!(
                d <= 2.0 * tol,
                "running var vs single process: {ctx}: {d:e}"
            );
        }
        (ey, edx)
    }
}

fn to_f64(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&a| a as f64).collect()
}
