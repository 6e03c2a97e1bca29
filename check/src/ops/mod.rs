//! The differential checker: each operation run on a case and compared with the f64 reference.

use batchnorm::{Backend, BatchNorm, ChannelStats, Error, Layout, Parallelism, Residency, Shape};

use crate::precise::Moments;
use crate::storage::{
    Store, narrow, params, round_to, round_wide, wide, widen, widen_params, with_store,
};
use crate::{case::*, reference, report::*, tolerance::*};

mod backward;
mod inference;
mod statistics;
mod training;

use backward::backward;
use inference::inference;
use statistics::statistics;
use training::training;

/// A public operation, with the name of its fuzz target (and corpus directory).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    /// [`BatchNorm::statistics`], and merging the statistics of a split batch.
    Statistics,
    /// [`BatchNorm::inference`] and [`BatchNorm::inference_in_place`].
    Inference,
    /// [`BatchNorm::training`] with every running-update convention.
    Training,
    /// [`BatchNorm::backward`] and [`BatchNorm::backward_in_place`], training and frozen modes.
    Backward,
}

impl Op {
    /// Every operation.
    pub const ALL: [Op; 4] = [Op::Statistics, Op::Inference, Op::Training, Op::Backward];

    /// The fuzz target's name.
    pub fn name(self) -> &'static str {
        match self {
            Op::Statistics => "statistics",
            Op::Inference => "inference",
            Op::Training => "training",
            Op::Backward => "backward",
        }
    }

    /// The operation of a fuzz target's name.
    pub fn from_name(name: &str) -> Option<Op> {
        Op::ALL.into_iter().find(|op| op.name() == name)
    }
}

/// Runs `op` on `case` and checks every property (see the module documentation).
///
/// # Errors
/// A description of the case and of every violated property.
pub fn check(op: Op, case: &Case) -> Result<(), String> {
    check_with(op, case, &mut Report::default())
}

/// [`check`], recording the errors it measured in `report`.
///
/// # Errors
/// As [`check`].
pub fn check_with(op: Op, case: &Case, report: &mut Report) -> Result<(), String> {
    run_check(op, case, report)
}

pub(crate) fn run_check(op: Op, case: &Case, report: &mut Report) -> Result<(), String> {
    let mut ctx = Ctx {
        report,
        failures: Vec::new(),
    };
    if let Some((mut s, inp)) = prepare(case, &mut ctx) {
        // The f32 pass (for half data on the up-converted values, for f64 data on the same
        // values), then the case's storage type.
        let mut passes = vec![Storage::F32];
        if case.storage != Storage::F32 {
            passes.push(case.storage);
        }
        for storage in passes {
            s.storage = storage;
            let before = ctx.failures.len();
            match op {
                Op::Statistics => statistics(case, &s, &inp, &mut ctx),
                Op::Inference => inference(case, &s, &inp, &mut ctx),
                Op::Training => training(case, &s, &inp, &mut ctx),
                Op::Backward => backward(case, &s, &inp, &mut ctx),
            }
            if storage != Storage::F32 {
                for f in &mut ctx.failures[before..] {
                    *f = format!("[{}] {f}", storage.name());
                }
            }
        }
    }
    if ctx.failures.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "{} check failed for {case:?}\n(bytes {:02x?})\n- {}",
            op.name(),
            case.to_bytes(),
            ctx.failures.join("\n- ")
        ))
    }
}

/// The operator and shape of a case.
pub(crate) struct Setup {
    pub(crate) shape: Shape,
    pub(crate) layout: Layout,
    /// The spatial dimensions (for the split batch's shapes).
    pub(crate) spatial: Vec<usize>,
    /// The operator with the case's parallelism, and with the other one and
    /// [`batchnorm::Residency::Memory`] (outputs of their own stored past the caches, which the
    /// case's small tensors never are by default).
    pub(crate) bn: BatchNorm,
    pub(crate) other: BatchNorm,
    pub(crate) eps: f64,
    /// Every call must fail with a length error (a giant shape).
    pub(crate) giant: bool,
    /// The flat indices of each channel's elements (empty for a giant shape).
    pub(crate) indices: Vec<Vec<usize>>,
    /// The storage type of this pass's data tensors: f32, or the case's half type (whose outputs
    /// are checked against the f32 pass's, rounded once), or f64 (checked against the precise
    /// reference, [`crate::precise`]).
    pub(crate) storage: Storage,
}

impl Setup {
    pub(crate) fn c(&self) -> usize {
        self.shape.c()
    }
    pub(crate) fn m(&self) -> usize {
        self.shape.per_channel()
    }
    pub(crate) fn len(&self) -> usize {
        self.shape.len()
    }
    pub(crate) fn channel_of(&self, i: usize) -> usize {
        match self.layout {
            Layout::Nchw => (i / self.shape.hw()) % self.shape.c(),
            Layout::Nhwc => i % self.shape.c(),
        }
    }
    /// Per channel: whether any of the tensor's elements is not finite.
    pub(crate) fn nonfinite_channels(&self, t: &[f32]) -> Vec<bool> {
        let mut bad = vec![false; self.c()];
        for (i, v) in t.iter().enumerate() {
            if !v.is_finite() {
                bad[self.channel_of(i)] = true;
            }
        }
        bad
    }
}

/// Generated arguments (lengths possibly wrong, as the case asks).
#[derive(Clone)]
pub(crate) struct Inputs {
    pub(crate) x: Vec<f32>,
    pub(crate) dy: Vec<f32>,
    /// Length of the output tensor (`y`, `dx`).
    pub(crate) out_len: usize,
    pub(crate) gamma: Vec<f32>,
    pub(crate) beta: Vec<f32>,
    pub(crate) running_mean: Vec<f32>,
    pub(crate) running_var: Vec<f32>,
    /// Lengths of the saved mean and inverse std.
    pub(crate) saved_len: [usize; 2],
    /// Given saved statistics (backward, training mode).
    pub(crate) saved: Option<(Vec<f32>, Vec<f32>)>,
    /// Lengths of dγ and dβ.
    pub(crate) grads_len: [usize; 2],
    /// Previous dγ and dβ to accumulate into.
    pub(crate) prev: Option<(Vec<f32>, Vec<f32>)>,
}

impl Inputs {
    /// A copy with the channels marked `bad` replaced by ordinary values (x, dy = 0; γ = 1,
    /// β = 0, running mean 0, variance 1, saved mean 0, inverse std 1, previous gradients 0).
    pub(crate) fn sanitized(&self, s: &Setup, bad: &[bool]) -> Inputs {
        let mut v = self.clone();
        for t in [&mut v.x, &mut v.dy] {
            for (i, e) in t.iter_mut().enumerate() {
                if bad[s.channel_of(i)] {
                    *e = 0.0;
                }
            }
        }
        let set = |p: &mut Vec<f32>, value: f32| {
            for (c, e) in p.iter_mut().enumerate() {
                if bad.get(c) == Some(&true) {
                    *e = value;
                }
            }
        };
        set(&mut v.gamma, 1.0);
        set(&mut v.beta, 0.0);
        set(&mut v.running_mean, 0.0);
        set(&mut v.running_var, 1.0);
        if let Some((m, r)) = &mut v.saved {
            set(m, 0.0);
            set(r, 1.0);
        }
        if let Some((g, b)) = &mut v.prev {
            set(g, 0.0);
            set(b, 0.0);
        }
        v
    }
}

/// Shape, operator and arguments of a case; checks the constructors' errors on the way. `None`
/// when the shape itself is invalid (nothing further can be called).
pub(crate) fn prepare(case: &Case, ctx: &mut Ctx<'_>) -> Option<(Setup, Inputs)> {
    let extent = case.dims.extent();
    let (n, c, spatial, giant) = match extent {
        Extent::Normal(n, c, s) | Extent::Overflow(n, c, s) => (n, c, s, false),
        Extent::Giant(n, c, s) => (n, c, s, true),
    };
    let mut exp = Expected::default();
    if n == 0 || c == 0 || spatial.contains(&0) {
        exp.0.push(Expect::AnyZeroDimension);
    }
    let fits = spatial
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .and_then(|hw| n.checked_mul(c)?.checked_mul(hw))
        .and_then(|len| len.checked_mul(size_of::<f32>()))
        .is_some_and(|bytes| bytes <= isize::MAX as usize);
    if !fits {
        exp.0.push(Expect::AnyShapeOverflow);
    }
    let shape = Shape::with_spatial(n, c, &spatial);
    if !outcome(ctx, "Shape::with_spatial", &shape, &exp) {
        return None;
    }
    let shape = shape.ok()?;
    let hw: usize = spatial.iter().product();
    if Shape::new(n, c, hw) != Ok(shape) {
        ctx.fail(format!(
            "Shape::new({n}, {c}, {hw}) differs from with_spatial"
        ));
    }
    let layout = if case.nhwc {
        Layout::Nhwc
    } else {
        Layout::Nchw
    };

    let list = backends();
    let backend = list[case.backend as usize % list.len()];
    let mut bn = match BatchNorm::new(shape, layout) {
        Ok(bn) => bn,
        Err(e) => {
            ctx.fail(format!("BatchNorm::new({shape:?}, {layout:?}): {e:?}"));
            return None;
        }
    };
    if case.backend & 0x80 != 0
        && let Some(missing) = Backend::ALL.into_iter().find(|b| !b.is_available())
    {
        let mut exp = Expected::default();
        exp.push(Error::BackendUnavailable {
            backend: missing.name(),
        });
        outcome(ctx, "with_backend", &bn.with_backend(missing), &exp);
    }
    match bn.with_backend(backend) {
        Ok(b) => bn = b,
        Err(e) => ctx.fail(format!("with_backend({backend:?}): {e:?}")),
    }
    let eps_value = case.eps.get();
    let mut exp = Expected::default();
    if !(eps_value.is_finite() && eps_value >= 0.0) {
        exp.push(Error::InvalidEpsilon { eps: eps_value });
    }
    let with_eps = bn.with_eps(eps_value);
    if outcome(ctx, "with_eps", &with_eps, &exp) {
        bn = with_eps.ok()?;
    }
    let (par, other) = if case.sequential {
        (Parallelism::Sequential, Parallelism::Rayon)
    } else {
        (Parallelism::Rayon, Parallelism::Sequential)
    };
    let s = Setup {
        shape,
        layout,
        spatial,
        bn: bn.with_parallelism(par),
        other: bn.with_parallelism(other).with_residency(Residency::Memory),
        eps: bn.eps(),
        giant,
        indices: Vec::new(),
        storage: Storage::F32,
    };
    let mut s = s;
    if !giant {
        s.indices = vec![Vec::with_capacity(shape.per_channel()); c];
        for i in 0..shape.len() {
            let ch = s.channel_of(i);
            s.indices[ch].push(i);
        }
    }

    // Arguments: a giant shape gets short tensors (every call must reject them).
    let len_of = |arg: Arg, exact: usize| match case.mismatch {
        Some((a, d)) if a == arg => d.apply(exact),
        _ => exact,
    };
    let (dims, tensor_len) = if giant {
        ((1, 1, 16), 16)
    } else {
        ((shape.n(), c, shape.hw()), shape.len())
    };
    let layout_gen = if giant { Layout::Nchw } else { layout };
    let tensor = |d: &Data, arg, default, salt| {
        d.tensor(dims, layout_gen, len_of(arg, tensor_len), default, salt)
    };
    let channels = |d: &Data, arg, default, salt| d.channels(c, len_of(arg, c), default, salt);
    let inp = Inputs {
        x: tensor(&case.x, Arg::X, Kind::Normal, 1),
        dy: tensor(&case.dy, Arg::Dy, Kind::Normal, 2),
        out_len: len_of(Arg::Out, tensor_len),
        gamma: channels(&case.gamma, Arg::Gamma, Kind::Normal, 3),
        beta: channels(&case.beta, Arg::Beta, Kind::Normal, 4),
        running_mean: channels(&case.running_mean, Arg::RunningMean, Kind::Normal, 5),
        running_var: channels(&case.running_var, Arg::RunningVar, Kind::Positive, 6),
        saved_len: [len_of(Arg::SavedMean, c), len_of(Arg::SavedInvStd, c)],
        saved: match &case.saved {
            Saved::FromForward => None,
            Saved::Given(m, r) => Some((
                channels(m, Arg::SavedMean, Kind::Normal, 7),
                channels(r, Arg::SavedInvStd, Kind::Positive, 8),
            )),
        },
        grads_len: [len_of(Arg::DGamma, c), len_of(Arg::DBeta, c)],
        prev: match &case.grads {
            Grads::Accumulate(g, b) => Some((
                channels(g, Arg::DGamma, Kind::Normal, 9),
                channels(b, Arg::DBeta, Kind::Normal, 10),
            )),
            _ => None,
        },
    };
    // Half data: x and dy (also the residual z) hold values of the storage type, so the f32
    // pass runs on exactly the up-converted data.
    let mut inp = inp;
    if matches!(case.storage, Storage::F16 | Storage::Bf16) {
        for t in [&mut inp.x, &mut inp.dy] {
            for v in t.iter_mut() {
                *v = round_to(case.storage, *v);
            }
        }
    }
    Some((s, inp))
}

/// [`BatchNorm::statistics`] on `x` stored as the pass's storage type.
pub(crate) fn statistics_as(
    storage: Storage,
    bn: &BatchNorm,
    x: &[f32],
) -> Result<batchnorm::BatchStats, Error> {
    with_store!(storage, E => bn.statistics(&narrow::<E>(x)))
}

/// The f32 op's widened outputs `v` rounded once to the pass's storage type (identity for f32).
pub(crate) fn rounded(s: &Setup, v: &[f64]) -> Vec<f64> {
    v.iter().map(|&x| round_wide(s.storage, x)).collect()
}

/// Whether two outputs are the same bits (any NaN equal to any NaN); the first differing index.
pub(crate) fn first_difference(a: &[f64], b: &[f64]) -> Option<usize> {
    if a.len() != b.len() {
        return Some(a.len().min(b.len()));
    }
    (0..a.len()).find(|&i| !same_bits(a[i], b[i]))
}

/// Checks one channel's statistics against the exact ones. `k_mean` and `k_m2` multiply the
/// bounds (1 for one call; more for merged partial statistics, see `statistics`).
#[allow(clippy::too_many_arguments)]
pub(crate) fn check_stats(
    ctx: &mut Ctx<'_>,
    keys: (&'static str, &'static str),
    ch: usize,
    got: &ChannelStats,
    want: &ChannelStats,
    m: usize,
    k_mean: f64,
    k_m2: f64,
) {
    if got.count() != m as u64 {
        ctx.fail(format!(
            "{}: channel {ch} count {} != {m}",
            keys.0,
            got.count()
        ));
    }
    if !(want.mean().is_finite() && want.m2().is_finite()) {
        ctx.report.skip(keys.0);
        return;
    }
    let tol = stats_tol(m);
    let (mu, m2) = (want.mean(), want.m2());
    let sigma = (m2 / m as f64).sqrt();
    let scale = sigma + EPS32 * mu.abs();
    ctx.close(
        keys.0,
        got.mean(),
        mu,
        scale,
        (k_mean * tol, k_mean * mean_floor(m)),
        || format!("channel {ch}"),
    );
    ctx.close(
        keys.1,
        got.m2(),
        m2,
        m2,
        (k_m2 * tol, k_m2 * m2_floor(m)),
        || format!("channel {ch}"),
    );
}

/// One channel of f64 data: its statistics in double-double ([`Moments`]), rounded, and the
/// bound `delta` on the error of the mean the crate computes, as [`check_stats64`] checks it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Exact64 {
    pub(crate) moments: Moments,
    pub(crate) mean: f64,
    pub(crate) m2: f64,
    /// The biased variance M2/M.
    pub(crate) var: f64,
    pub(crate) sigma: f64,
    /// [`f64_tol`] of the channel's M values.
    pub(crate) tol: f64,
    /// `tol·(σ + |μ|)`: the computed mean's error bound (see [`check_stats64`]).
    pub(crate) delta: f64,
}

impl Exact64 {
    /// Per channel of `x` (of `shape`, in the pass's layout), its values widened to f64.
    pub(crate) fn channels(s: &Setup, x: &[f32], shape: Shape) -> Vec<Exact64> {
        (0..shape.c())
            .map(|ch| {
                let v = wide(&reference::channel(x, shape, s.layout, ch));
                let moments = Moments::new(&v);
                let (mean, m2, var) = (moments.mean(), moments.m2(), moments.var());
                let sigma = var.sqrt();
                let tol = f64_tol(v.len());
                Exact64 {
                    moments,
                    mean,
                    m2,
                    var,
                    sigma,
                    tol,
                    delta: tol * (sigma + mean.abs()),
                }
            })
            .collect()
    }

    /// The relative error bound of an inverse std `1/sqrt(var + ε)` computed from the crate's
    /// variance, beyond `tol`: the variance's error is `tol·var` (covered: `½·tol` relative in
    /// the root, with the 4½ roundings of `M2/M`, `+ ε`, the root and the division inside tol's
    /// 8u) plus `δ²` (the M·δ² share of M2, see [`check_stats64`]), which moves the root by
    /// `t = δ²/(var + ε)` relative at most while `t ≤ ½` (`1/sqrt(1 − t) − 1 ≤ t` there: twice
    /// the first order, covering the second). `None` where `t > ½`: the statistics' bounds do
    /// not determine the inverse std (a constant channel with a tiny ε), skipped and counted.
    pub(crate) fn r_share(&self, eps: f64) -> Option<f64> {
        let t = self.delta * self.delta / (self.var + eps);
        (t <= 0.5).then_some(t)
    }
}

/// One channel's f64-data statistics against the exact ones ([`f64_tol`], times `k` for merged
/// partial statistics as in [`check_stats`]): the mean relative to σ + |μ| (an f64 sum of values
/// of magnitude up to |μ| + |x − μ|, merged over blocks), M2 relative to M2, plus M·δ² for the
/// deviations' shift by the computed mean's error δ (Σ(x − μ − δ)² = M2 + M·δ² since
/// Σ(x − μ) = 0) and `merge_floor` (the split merge's share, see `statistics`).
///
/// With `keys.2`, the mean is also held to the narrower bound `k·tol·σ + 2u·|μ|` that
/// `tests/f64.rs` enforces (the corrected two-pass's mean errs by the deviation sum's rounding,
/// tol·σ, plus the final `shift + dev/n`, within 2u·|μ|): a mean whose error grows with |μ| beyond
/// two roundings of it fails here even when it passes the wider bound.
pub(crate) fn check_stats64(
    ctx: &mut Ctx<'_>,
    keys: (&'static str, &'static str, Option<&'static str>),
    ch: usize,
    (got, want): (&ChannelStats, &Exact64),
    (k_mean, k_m2, merge_floor): (f64, f64, f64),
) {
    let m = want.moments.count;
    if got.count() != m as u64 {
        ctx.fail(format!(
            "{}: channel {ch} count {} != {m}",
            keys.0,
            got.count()
        ));
    }
    let (mu, m2, tol) = (want.mean, want.m2, want.tol);
    let scale = want.sigma + mu.abs();
    if !(mu.is_finite() && m2.is_finite() && scale.is_finite()) {
        ctx.report.skip(keys.0);
        return;
    }
    let delta = k_mean * tol * scale;
    let at = || format!("channel {ch}");
    ctx.close(keys.0, got.mean(), mu, scale, (k_mean * tol, 0.0), at);
    if let Some(key) = keys.2 {
        let floor = 2.0 * EPS64 * mu.abs();
        ctx.close(key, got.mean(), mu, want.sigma, (k_mean * tol, floor), at);
    }
    let floor = m as f64 * delta * delta + merge_floor;
    ctx.close(keys.1, got.m2(), m2, m2, (k_m2 * tol, floor), at);
}

/// The arguments a case generates (shape, layout, ε and every slice), for reports and debugging.
/// `None` when the shape is invalid.
pub fn describe(case: &Case) -> Option<String> {
    let mut report = Report::default();
    let mut ctx = Ctx {
        report: &mut report,
        failures: Vec::new(),
    };
    let (s, inp) = prepare(case, &mut ctx)?;
    let mut out = format!(
        "shape {:?} {:?}, eps {:e}, backend {:?}, {:?}, storage {}\n",
        s.shape,
        s.layout,
        s.eps,
        s.bn.backend(),
        s.bn.parallelism(),
        case.storage.name()
    );
    let mut line = |name: &str, v: &[f32]| out.push_str(&format!("{name} = {v:?}\n"));
    line("x", &inp.x);
    line("dy", &inp.dy);
    line("gamma", &inp.gamma);
    line("beta", &inp.beta);
    line("running_mean", &inp.running_mean);
    line("running_var", &inp.running_var);
    if let Some((m, r)) = &inp.saved {
        line("saved_mean", m);
        line("saved_inv_std", r);
    }
    if let Some((g, b)) = &inp.prev {
        line("prev_dgamma", g);
        line("prev_dbeta", b);
    }
    Some(out)
}
