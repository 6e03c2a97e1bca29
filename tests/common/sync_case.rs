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
//!
//! Other storage types (`Case<E>`): with one rank every output is the local op's bit for bit, on
//! any number of ranks the per-channel results are bit-identical on every rank; half data is the
//! f32 path on the up-converted data rounded once, bit for bit (as the local op, tests/storage.rs);
//! f64 data is within `2·tol64(M)` of the single-process f64 op (tests/f64.rs's bound for each).
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

/// Everything a training forward and its backward produce on one rank (or one process), for
/// data of type `E`.
#[derive(Clone, Debug, PartialEq)]
pub struct Outputs<E: Store = f32> {
    pub y: Vec<E>,
    pub saved_mean: Vec<E::Param>,
    pub saved_inv_std: Vec<E::Param>,
    pub running_mean: Vec<E::Param>,
    pub running_var: Vec<E::Param>,
    pub dx: Vec<E>,
    pub dgamma: Vec<E::Param>,
    pub dbeta: Vec<E::Param>,
}

impl<E: Store> Outputs<E> {
    /// Filled with NaN (outputs) and the initial running statistics (0.5, 2).
    pub fn new(len: usize, c: usize) -> Outputs<E> {
        let nan = E::param(f64::NAN);
        Outputs {
            y: vec![E::round(f64::NAN); len],
            saved_mean: vec![nan; c],
            saved_inv_std: vec![nan; c],
            running_mean: vec![E::param(0.5); c],
            running_var: vec![E::param(2.0); c],
            dx: vec![E::round(f64::NAN); len],
            dgamma: vec![nan; c],
            dbeta: vec![nan; c],
        }
    }

    /// The per-channel results, widened to f64 (exactly): bit-identical across ranks.
    pub fn channel_values(&self) -> Vec<f64> {
        [
            &self.saved_mean,
            &self.saved_inv_std,
            &self.running_mean,
            &self.running_var,
            &self.dgamma,
            &self.dbeta,
        ]
        .iter()
        .flat_map(|v| v.iter().map(|&x| x.into()))
        .collect()
    }

    /// The per-channel results as bits.
    pub fn channel_bits(&self) -> Vec<u64> {
        bits(&self.channel_values())
    }
}

pub fn update<'a, P>(
    o: (&'a mut [P], &'a mut [P]),
    conv: (Momentum, Variance),
) -> RunningUpdate<'a, P> {
    RunningUpdate {
        mean: o.0,
        var: o.1,
        momentum: conv.0,
        var_estimator: conv.1,
    }
}

/// The data of one case: the concatenated batch (of type `E`) and the parameters.
pub struct Case<E: Store = f32> {
    pub layout: Layout,
    pub c: usize,
    pub hw: usize,
    pub slices: Vec<usize>,
    pub conv: (Momentum, Variance),
    pub par: Parallelism,
    pub x: Vec<E>,
    pub dy: Vec<E>,
    pub gamma: Vec<E::Param>,
    pub beta: Vec<E::Param>,
}

impl<E: Store> Case<E> {
    pub fn new(
        rng: &mut Rng,
        layout: Layout,
        (c, hw): (usize, usize),
        slices: &[usize],
    ) -> Case<E> {
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
            x: tensor_of(rng, shape, layout, &means, &stds),
            dy: normals_of::<E>(rng, shape.len(), 0.0, 1.0),
            gamma: params_of::<E>(rng, c, 0.0, 1.0),
            beta: params_of::<E>(rng, c, 0.0, 1.0),
        }
    }

    /// The unbiased running variance needs two values per channel: another convention if not.
    pub fn with_conv(mut self, conv: (Momentum, Variance)) -> Case<E> {
        self.conv = conv;
        if conv.1 == Variance::Unbiased && self.shape().per_channel() < 2 {
            self.conv = CONVENTIONS[1];
        }
        self
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
    pub fn run_rank<C: Communicator>(&self, comm: &C) -> Outputs<E> {
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
    pub fn run_single(&self) -> Outputs<E> {
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

    fn context(&self, rank: usize) -> String {
        format!(
            "rank {rank}: {} {:?} C={} HW={} slices {:?} {:?} {:?}",
            E::NAME,
            self.layout,
            self.c,
            self.hw,
            self.slices,
            self.conv,
            self.par
        )
    }

    /// Runs this rank's forward and backward, and checks that the per-channel results are
    /// bit-identical on every rank (gathered through `comm`) and, with one rank, that everything
    /// equals the local op bit for bit. Returns this rank's outputs and the single-process op's.
    pub fn run_and_agree<C: Communicator>(&self, comm: &C) -> (Outputs<E>, Outputs<E>) {
        let ctx = self.context(comm.rank());
        let got = self.run_rank(comm);
        let values = got.channel_values();
        let mut all = vec![0.0; values.len() * comm.size()];
        comm.all_gather(&values, &mut all).unwrap();
        for (other, row) in all.chunks_exact(values.len()).enumerate() {
            assert_eq!(bits(row), bits(&values), "rank {other} differs from {ctx}");
        }
        let single = self.run_single();
        if self.slices.len() == 1 {
            let (a, b) = (&got, &single);
            assert_eq!(
                bits(&a.y),
                bits(&b.y),
                "one rank: y differs from the local op: {ctx}"
            );
            assert_eq!(bits(&a.dx), bits(&b.dx), "one rank: dx differs: {ctx}");
            assert_eq!(
                a.channel_bits(),
                b.channel_bits(),
                "one rank: statistics differ: {ctx}"
            );
        }
        (got, single)
    }
}

impl<E: Store<Param = f32>> Case<E> {
    /// Half data: [`Case::run_and_agree`], and every output of this rank (y, dx, the per-channel
    /// results) is that of the same ranks on the up-converted f32 data, rounded once to `E`, bit
    /// for bit.
    pub fn check_half<C: Communicator>(&self, comm: &C) {
        let ctx = self.context(comm.rank());
        let (got, _) = self.run_and_agree(comm);
        let widen = |v: &[E]| v.iter().map(|x| x.to_param()).collect::<Vec<f32>>();
        let wide = Case::<f32> {
            layout: self.layout,
            c: self.c,
            hw: self.hw,
            slices: self.slices.clone(),
            conv: self.conv,
            par: self.par,
            x: widen(&self.x),
            dy: widen(&self.dy),
            gamma: self.gamma.clone(),
            beta: self.beta.clone(),
        };
        let want = wide.run_rank(comm);
        let round = |v: &[f32]| v.iter().map(|&x| E::from_param(x)).collect::<Vec<E>>();
        assert_eq!(bits(&got.y), bits(&round(&want.y)), "y: {ctx}");
        assert_eq!(bits(&got.dx), bits(&round(&want.dx)), "dx: {ctx}");
        assert_eq!(got.channel_bits(), want.channel_bits(), "statistics: {ctx}");
    }
}

/// tests/f64.rs's tolerance for f64 data with M values per channel, relative to the size of the
/// terms (u = 2⁻⁵³).
pub fn tol64(m: usize) -> f64 {
    (8.0 + 2.0 * m as f64) * f64::EPSILON / 2.0
}

impl Case<f64> {
    /// f64 data: [`Case::run_and_agree`], and this rank's outputs within `2·tol64(M)` of the
    /// single-process f64 op on the concatenated batch (each is within `tol64(M)` of the truth),
    /// relative to the size of the terms: `|γ|·(1 + |x̂| + |μ|·r) + |β|` for y (the last term:
    /// half an ulp of the f64 mean in every `x − μ`), the terms of dx, Σ|x̂·dy| and Σ|dy| for dγ
    /// and dβ, `|μ| + σ` for the means, the value itself for the inverse std and variance.
    pub fn check_f64<C: Communicator>(&self, comm: &C) {
        let ctx = self.context(comm.rank());
        let (got, single) = self.run_and_agree(comm);
        let (shape, layout, c) = (self.shape(), self.layout, self.c);
        let m = shape.per_channel();
        let tol = 2.0 * tol64(m);
        let (mu, r) = (&single.saved_mean, &single.saved_inv_std);
        let ch = |i: usize| channel_of(shape, layout, i);
        let xhat = |i: usize| (self.x[i] - mu[ch(i)]) * r[ch(i)];
        let (mut sum_dy, mut sum_xdy) = (vec![0.0; c], vec![0.0; c]);
        for i in 0..self.x.len() {
            sum_dy[ch(i)] += self.dy[i].abs();
            sum_xdy[ch(i)] += (xhat(i) * self.dy[i]).abs();
        }
        let range = self.range(comm.rank());
        let mf = m as f64;
        for (k, i) in range.enumerate() {
            let (g, b, mur) = (
                self.gamma[ch(i)].abs(),
                self.beta[ch(i)].abs(),
                mu[ch(i)].abs() * r[ch(i)],
            );
            let y_scale = g * (1.0 + xhat(i).abs() + mur) + b;
            let e = (got.y[k] - single.y[i]).abs();
            assert!(
                e <= tol * y_scale,
                "y[{i}]: {e:e} > {tol:e}·{y_scale:e}: {ctx}"
            );
            let dx_scale = g
                * r[ch(i)]
                * (self.dy[i].abs()
                    + sum_dy[ch(i)] / mf
                    + (xhat(i).abs() + mur) * sum_xdy[ch(i)] / mf);
            let e = (got.dx[k] - single.dx[i]).abs();
            assert!(
                e <= tol * dx_scale,
                "dx[{i}]: {e:e} > {tol:e}·{dx_scale:e}: {ctx}"
            );
        }
        for k in 0..c {
            let sigma = 1.0 / r[k];
            let close = |what: &str, a: f64, b: f64, scale: f64| {
                let e = (a - b).abs();
                assert!(
                    e <= tol * scale,
                    "{what} ch {k}: {e:e} > {tol:e}·{scale:e}: {ctx}"
                );
            };
            close("saved mean", got.saved_mean[k], mu[k], mu[k].abs() + sigma);
            close("inv std", got.saved_inv_std[k], r[k], r[k]);
            let rm = single.running_mean[k];
            close("running mean", got.running_mean[k], rm, rm.abs() + sigma);
            close(
                "running var",
                got.running_var[k],
                single.running_var[k],
                single.running_var[k],
            );
            close(
                "dgamma",
                got.dgamma[k],
                single.dgamma[k],
                sum_xdy[k] + f64::MIN_POSITIVE,
            );
            close(
                "dbeta",
                got.dbeta[k],
                single.dbeta[k],
                sum_dy[k] + f64::MIN_POSITIVE,
            );
        }
    }
}

impl Case {
    /// Runs this rank's forward and backward, and checks: the per-channel results are
    /// bit-identical on every rank (gathered through `comm`), this rank's slice of y and dx and
    /// the per-channel results are within `fwd_tol(M)` of the f64 reference on the concatenated
    /// batch and within twice that of the single-process op, and with one rank everything equals
    /// the local op bit for bit. Returns the worst errors (y, dx) relative to their scales.
    pub fn check<C: Communicator>(&self, comm: &C) -> (f64, f64) {
        let r = comm.rank();
        let ctx = self.context(r);
        let (got, single) = self.run_and_agree(comm);
        let range = self.range(r);

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
