//! Tolerances: the bounds every checked output must meet, and the backends under test.

use batchnorm::Backend;

/// f32 unit roundoff.
pub const EPS32: f64 = f32::EPSILON as f64 / 2.0;

/// Smallest positive subnormal f32, 2⁻¹⁴⁹: f32 results below the normal range are rounded to a
/// multiple of it, so every f32 value (an output, or a stored parameter such as `γ·r`) carries an
/// absolute error of up to half of it besides its relative error. It is the absolute part of every
/// bound below, multiplied by what the value multiplies.
pub(crate) const SUB_ULP: f64 = 1.401_298_464_324_817e-45;

/// Largest finite f32, as f64.
pub(crate) const F32_MAX: f64 = f32::MAX as f64;

/// Smallest normal f32, as f64: a variance below it cannot be accumulated in f32 lanes with
/// relative accuracy, so inverse standard deviations (and what depends on them) are only checked
/// when `var + ε` reaches it.
pub(crate) const F32_MIN_NORMAL: f64 = f32::MIN_POSITIVE as f64;

/// Most sequential f32 roundings one SIMD lane's result takes before it is folded into f64:
/// `KMAX` (16) lockstep steps, one tail vector per accumulator, the 2-level tree over the
/// `ACCUMULATORS` (4) and the horizontal tree over at most 16 lanes (4 levels): 23 for sums (the
/// backward reduction and the short-run two-pass, whose runs of at most `SHORT_RUN` (512) values
/// give at most 16 steps per lane), and the same for the statistics' sums of squared deviations.
/// The statistics' first moment is summed in f64 lanes and adds nothing measurable.
pub const LANE_STEPS: usize = 23;

/// Tolerance on forward outputs and saved statistics, as a multiple of f32's unit roundoff,
/// relative to the size of the terms of `y = γ·x̂ + β`.
///
/// Why this size: the kernel's own rounding is a handful of roundings per element (x − K, the
/// f32 scale and bias, one FMA, the f32 saved statistics: ≤ 8u), plus the error of the f32 lane
/// accumulation. A recursive f32 sum (or Welford update) of k steps errs by up to (k − 1)·u of the
/// magnitudes in the worst case (Higham, "Accuracy and Stability", §4.2; reached by one large term
/// followed by many small ones in a lane, which fuzzing found), and a lane takes at most
/// `min(M, LANE_STEPS)` steps before the f64 fold; everything beyond is merged in f64 and adds
/// nothing measurable. So the bound is worst-case, not statistical, and depends on the reduction
/// length M only up to `LANE_STEPS`.
pub fn fwd_tol(per_channel: usize) -> f64 {
    (8.0 + per_channel.min(LANE_STEPS) as f64) * EPS32
}

/// Tolerance on statistics: mean error relative to the standard deviation (or the mean's
/// magnitude times u, whichever is larger: the f32 input itself carries that much), variance
/// error relative to the variance. Same reasoning as [`fwd_tol`].
pub fn stats_tol(per_channel: usize) -> f64 {
    fwd_tol(per_channel)
}

/// f64 unit roundoff, 2⁻⁵³.
pub const EPS64: f64 = f64::EPSILON / 2.0;

/// Tolerance on f64-data results, as a multiple of f64's unit roundoff, relative to the same term
/// sizes as the f32 checks: `(8 + 2·M)·u64`.
///
/// Why this size: f64 data run in f64 lanes with f64 parameters and statistics; a handful of
/// roundings per element (≤ 8u, as in [`fwd_tol`]) plus a recursive f64 sum (or Welford update)
/// of up to M terms, which errs by at most (M − 1)·u of the magnitudes (Higham §4.2), doubled for
/// the sums of products and of squared deviations whose terms are rounded themselves. No lane
/// bound is assumed (the f64 kernels' blocking is not part of the contract), so the bound is the
/// worst case of one recursive sum over the whole channel. Besides, every `x − μ` carries the
/// batch mean's own error, which the checks add per use (the mean's scale includes |μ|: the
/// f64 mean is a sum of the values, whose rounding is relative to their magnitudes).
pub fn f64_tol(per_channel: usize) -> f64 {
    (8.0 + 2.0 * per_channel as f64) * EPS64
}

/// Absolute floor of the mean for `count` values: below the normal range an f32 result rounds by
/// up to half a subnormal, for at most [`LANE_STEPS`] steps per lane before the f64 fold. (The
/// crate's mean is an f64 sum and needs none of it; the floor stays as the stated bound.)
pub(crate) fn mean_floor(count: usize) -> f64 {
    count.min(LANE_STEPS) as f64 * SUB_ULP
}

/// Absolute floor of M2 for `count` values: each step adds one squared deviation rounded to f32,
/// which below the normal range is an absolute error of up to half a subnormal.
pub(crate) fn m2_floor(count: usize) -> f64 {
    4.0 * count as f64 * SUB_ULP
}

/// Bit pattern written into every output before a call: a signaling NaN. Arithmetic never returns
/// a signaling NaN (IEEE 754 quiets it), the generated data never contain this pattern, so finding
/// it afterwards means the element was not written.
pub const SENTINEL_BITS: u32 = 0x7fa5_5a5a;

pub(crate) fn sentinel() -> f32 {
    f32::from_bits(SENTINEL_BITS)
}

/// The f64 sentinel: a signaling NaN (exponent all ones, quiet bit clear), pre-filled into f64
/// outputs; every storage type's sentinel widens to it, so unwritten outputs are found alike.
pub const SENTINEL64_BITS: u64 = 0x7ff5_a55a_5a5a_5a5a;

pub(crate) fn sentinel64() -> f64 {
    f64::from_bits(SENTINEL64_BITS)
}

/// The backends under test: the one forced by `BATCHNORM_BACKEND`, else every one this CPU has.
pub fn backends() -> Vec<Backend> {
    match Backend::forced() {
        Some(Ok(b)) => vec![b],
        _ => Backend::available(),
    }
}
