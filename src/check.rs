//! Testing support for fuzzers and tests: a structured test case ([`Case`]) and a differential
//! checker ([`check`]) that runs one public operation on it and compares everything it returns and
//! writes against the f64 [`crate::reference`].
//!
//! This module is not part of the numerical API. It is shared, so that the fuzz targets in `fuzz/`
//! and the test suite (`tests/fuzz_replay.rs`) check exactly the same properties:
//!
//! - **Errors, not panics.** Invalid arguments (zero or overflowing dimensions, wrong slice
//!   lengths, invalid ε, momentum or `batches_tracked`, too few values for the unbiased variance)
//!   return one of the expected [`Error`]s, and every output buffer is left untouched.
//! - **Accuracy.** For channels whose inputs are finite, every output is within the crate's stated
//!   tolerance ([`fwd_tol`], [`stats_tol`]) of the f64 reference: statistics, `y`, the saved mean
//!   and inverse std, the running statistics, `dx`, `dγ` and `dβ`. Elements whose reference values
//!   (or the intermediates of the documented formulas) are not finite or not representable in f32
//!   are skipped and counted ([`Report`]).
//! - **Containment.** NaN or ±Inf in one channel's inputs never changes another channel's outputs:
//!   the operation is rerun with the non-finite channels replaced by ordinary values, and every
//!   other channel's outputs must be bit-identical.
//! - **Every element written.** Outputs are pre-filled with a signaling NaN ([`SENTINEL_BITS`]) that
//!   no arithmetic produces (an operation on a NaN returns a quiet one), and must not contain it
//!   afterwards. In-place variants must equal the out-of-place ones bit for bit.
//! - **Determinism.** Sequential and rayon execution give bit-identical results.
//!
//! A [`Case`] is decoded from raw bytes by a small byte-level codec: one byte per field, lengths
//! explicit, missing bytes read as zero, so every byte string is a case and short inputs are simple
//! cases. With the cargo feature `fuzzing`, `Case` implements `arbitrary::Arbitrary` by reading the
//! same bytes through `arbitrary::Unstructured` (that is what `fuzz_target!(|case: Case| ..)` does);
//! [`Case::from_bytes`] decodes identically without the dependency and [`Case::to_bytes`] is its
//! inverse, used to write the seed inputs of `fuzz/corpus/` (see `tests/fuzz_replay.rs`).

use std::collections::BTreeMap;
use std::fmt;

use crate::{
    Affine, Backend, BackwardMode, BatchNorm, BatchStats, ChannelStats, DEFAULT_EPS, Error,
    GradMode, Layout, Momentum, Parallelism, ParamGrads, RunningStats, RunningUpdate, SavedStats,
    SavedStatsMut, Shape, Variance, reference,
};

// ---------------------------------------------------------------------------------------------
// Tolerances (the same formulas as `tests/common/mod.rs`).
// ---------------------------------------------------------------------------------------------

/// f32 unit roundoff.
pub const EPS32: f64 = f32::EPSILON as f64 / 2.0;

/// Smallest positive subnormal f32, 2⁻¹⁴⁹: f32 results below the normal range are rounded to a
/// multiple of it, so every f32 value (an output, or a stored parameter such as `γ·r`) carries an
/// absolute error of up to half of it besides its relative error. It is the absolute part of every
/// bound below, multiplied by what the value multiplies.
const SUB_ULP: f64 = 1.401_298_464_324_817e-45;

/// Largest finite f32, as f64.
const F32_MAX: f64 = f32::MAX as f64;

/// Smallest normal f32, as f64: a variance below it cannot be accumulated in f32 lanes with
/// relative accuracy, so inverse standard deviations (and what depends on them) are only checked
/// when `var + ε` reaches it.
const F32_MIN_NORMAL: f64 = f32::MIN_POSITIVE as f64;

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

/// Absolute floor of the mean for `count` values: below the normal range an f32 result rounds by
/// up to half a subnormal, for at most [`LANE_STEPS`] steps per lane before the f64 fold. (The
/// crate's mean is an f64 sum and needs none of it; the floor stays as the stated bound.)
fn mean_floor(count: usize) -> f64 {
    count.min(LANE_STEPS) as f64 * SUB_ULP
}

/// Absolute floor of M2 for `count` values: each step adds one squared deviation rounded to f32,
/// which below the normal range is an absolute error of up to half a subnormal.
fn m2_floor(count: usize) -> f64 {
    4.0 * count as f64 * SUB_ULP
}

/// Bit pattern written into every output before a call: a signaling NaN. Arithmetic never returns
/// a signaling NaN (IEEE 754 quiets it), the generated data never contain this pattern, so finding
/// it afterwards means the element was not written.
pub const SENTINEL_BITS: u32 = 0x7fa5_5a5a;

fn sentinel() -> f32 {
    f32::from_bits(SENTINEL_BITS)
}

/// The backends under test: the one forced by `BATCHNORM_BACKEND`, else every one this CPU has.
pub fn backends() -> Vec<Backend> {
    match Backend::forced() {
        Some(Ok(b)) => vec![b],
        _ => Backend::available(),
    }
}

// ---------------------------------------------------------------------------------------------
// The byte-level codec.
// ---------------------------------------------------------------------------------------------

/// Reads (decoding) or writes (encoding) the fields of a case, one byte at a time, so one
/// description of the layout serves both directions.
trait Codec {
    fn byte(&mut self, b: &mut u8);
    fn decoding(&self) -> bool;
}

struct Decoder<F: FnMut() -> u8>(F);

impl<F: FnMut() -> u8> Codec for Decoder<F> {
    fn byte(&mut self, b: &mut u8) {
        *b = (self.0)();
    }
    fn decoding(&self) -> bool {
        true
    }
}

struct Encoder(Vec<u8>);

impl Codec for Encoder {
    fn byte(&mut self, b: &mut u8) {
        self.0.push(*b);
    }
    fn decoding(&self) -> bool {
        false
    }
}

fn visit_u16(v: &mut u16, c: &mut dyn Codec) {
    let mut b = v.to_le_bytes();
    b.iter_mut().for_each(|b| c.byte(b));
    *v = u16::from_le_bytes(b);
}

fn visit_u32(v: &mut u32, c: &mut dyn Codec) {
    let mut b = v.to_le_bytes();
    b.iter_mut().for_each(|b| c.byte(b));
    *v = u32::from_le_bytes(b);
}

/// A list of at most `max` items: one length byte (taken modulo `max + 1`), then the items.
fn visit_vec<T: Default>(
    v: &mut Vec<T>,
    max: u8,
    c: &mut dyn Codec,
    item: fn(&mut T, &mut dyn Codec),
) {
    debug_assert!(v.len() <= max as usize, "list longer than its codec allows");
    let mut n = v.len() as u8;
    c.byte(&mut n);
    if c.decoding() {
        v.clear();
        v.resize_with((n % (max + 1)) as usize, T::default);
    }
    v.iter_mut().for_each(|x| item(x, c));
}

/// A field-less choice: its index in `table` (decoding takes the byte modulo the table length).
fn visit_choice<T: Copy + PartialEq>(v: &mut T, table: &[T], c: &mut dyn Codec) {
    let mut b = table.iter().position(|t| t == v).unwrap_or(0) as u8;
    c.byte(&mut b);
    if c.decoding() {
        *v = table[b as usize % table.len()];
    }
}

// ---------------------------------------------------------------------------------------------
// Case description.
// ---------------------------------------------------------------------------------------------

/// A special scalar: the edge cases of f32, and a raw bit pattern.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
#[allow(missing_docs)]
pub enum Value {
    #[default]
    Zero,
    NegZero,
    One,
    NegOne,
    Half,
    Two,
    Nan,
    NegNan,
    Inf,
    NegInf,
    Max,
    NegMax,
    /// 3e38
    Big38,
    NegBig38,
    /// 1e30
    Huge30,
    NegHuge30,
    /// 1e19: its square overflows f32.
    Big19,
    MinPositive,
    /// 1e-40 (subnormal).
    Subnormal,
    /// 2⁻¹⁴⁹.
    MinSubnormal,
    NegMinSubnormal,
    /// 1e-30
    Tiny30,
    /// 1e4
    Offset1e4,
    /// 3e6
    Offset3e6,
    Epsilon,
    /// Any bit pattern (the sentinel's is replaced by a quiet NaN).
    Raw(u32),
}

const VALUES: [Value; 26] = [
    Value::Zero,
    Value::NegZero,
    Value::One,
    Value::NegOne,
    Value::Half,
    Value::Two,
    Value::Nan,
    Value::NegNan,
    Value::Inf,
    Value::NegInf,
    Value::Max,
    Value::NegMax,
    Value::Big38,
    Value::NegBig38,
    Value::Huge30,
    Value::NegHuge30,
    Value::Big19,
    Value::MinPositive,
    Value::Subnormal,
    Value::MinSubnormal,
    Value::NegMinSubnormal,
    Value::Tiny30,
    Value::Offset1e4,
    Value::Offset3e6,
    Value::Epsilon,
    Value::Raw(0),
];

impl Value {
    /// The f32 value (never the sentinel pattern).
    pub fn get(self) -> f32 {
        match self {
            Value::Zero => 0.0,
            Value::NegZero => -0.0,
            Value::One => 1.0,
            Value::NegOne => -1.0,
            Value::Half => 0.5,
            Value::Two => 2.0,
            Value::Nan => f32::NAN,
            Value::NegNan => -f32::NAN,
            Value::Inf => f32::INFINITY,
            Value::NegInf => f32::NEG_INFINITY,
            Value::Max => f32::MAX,
            Value::NegMax => f32::MIN,
            Value::Big38 => 3e38,
            Value::NegBig38 => -3e38,
            Value::Huge30 => 1e30,
            Value::NegHuge30 => -1e30,
            Value::Big19 => 1e19,
            Value::MinPositive => f32::MIN_POSITIVE,
            Value::Subnormal => 1e-40,
            Value::MinSubnormal => f32::from_bits(1),
            Value::NegMinSubnormal => -f32::from_bits(1),
            Value::Tiny30 => 1e-30,
            Value::Offset1e4 => 1e4,
            Value::Offset3e6 => 3e6,
            Value::Epsilon => f32::EPSILON,
            Value::Raw(bits) => from_bits(bits),
        }
    }

    fn visit(&mut self, c: &mut dyn Codec) {
        let mut tag = VALUES
            .iter()
            .position(|v| std::mem::discriminant(v) == std::mem::discriminant(self))
            .unwrap_or(0) as u8;
        c.byte(&mut tag);
        if c.decoding() {
            *self = VALUES[tag as usize % VALUES.len()];
        }
        if let Value::Raw(bits) = self {
            visit_u32(bits, c);
        }
    }
}

/// An f32 from raw bits, never the sentinel.
fn from_bits(bits: u32) -> f32 {
    if bits == SENTINEL_BITS {
        f32::NAN
    } else {
        f32::from_bits(bits)
    }
}

/// How the values of one channel are drawn.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub enum Kind {
    /// Mean in [-2, 2], standard deviation in [0.5, 2].
    #[default]
    Normal,
    /// 1e4 ± 1e-2: large mean, small spread.
    Offset1e4,
    /// 3e6 ± 4.
    Offset3e6,
    /// −1e4 ± 1e-2.
    NegOffset1e4,
    /// 1e18 ± 1e16.
    Offset1e18,
    /// One value throughout.
    Constant(Value),
    /// ±1e30 scale.
    Huge30,
    /// Uniform in ±3e38: differences overflow f32.
    Huge38,
    /// Normal with standard deviation 1e37.
    Spread37,
    /// ±(3e38 − 1e37·|N|): near the largest f32, one sign per channel.
    NearMax,
    /// 1e-30 scale: squares underflow f32.
    Tiny30,
    /// 1e-40 scale: subnormal values.
    Subnormal,
    /// Small multiples of 2⁻¹⁴⁹.
    MinSubnormal,
    /// ±0.
    Zeros,
    /// Every element a random special [`Value`].
    Chaos,
    /// Mostly zero, some values of magnitude 1e-3 to 1e3.
    Sparse,
    /// Integers in [-8, 8] (ties, exact sums).
    Integers,
    /// Positive, 0.1 to about 10 (a variance).
    Positive,
    /// Random bit patterns (NaN and ±Inf included).
    Bits,
    /// Normal times 10^k, k uniform in [-30, 30]: magnitudes mixed in one channel.
    Wide,
    /// One value with a spread of a few ulps.
    UlpSpread,
}

const KINDS: [Kind; 21] = [
    Kind::Normal,
    Kind::Offset1e4,
    Kind::Offset3e6,
    Kind::NegOffset1e4,
    Kind::Offset1e18,
    Kind::Constant(Value::Zero),
    Kind::Huge30,
    Kind::Huge38,
    Kind::Spread37,
    Kind::NearMax,
    Kind::Tiny30,
    Kind::Subnormal,
    Kind::MinSubnormal,
    Kind::Zeros,
    Kind::Chaos,
    Kind::Sparse,
    Kind::Integers,
    Kind::Positive,
    Kind::Bits,
    Kind::Wide,
    Kind::UlpSpread,
];

impl Kind {
    fn visit(&mut self, c: &mut dyn Codec) {
        let mut tag = KINDS
            .iter()
            .position(|k| std::mem::discriminant(k) == std::mem::discriminant(self))
            .unwrap_or(0) as u8;
        c.byte(&mut tag);
        if c.decoding() {
            *self = KINDS[tag as usize % KINDS.len()];
        }
        if let Kind::Constant(v) = self {
            v.visit(c);
        }
    }
}

/// Values of one tensor or per-channel parameter: per-channel kinds (cycled over the channels; the
/// argument's default kind when empty), a seed, and special values written over given positions
/// (taken modulo the length).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Data {
    /// Kind of channel `c` is `kinds[c % kinds.len()]`; at most 4.
    pub kinds: Vec<Kind>,
    /// Seed of the pseudo-random values.
    pub seed: u8,
    /// `(position, value)` overrides, at most 8.
    pub specials: Vec<(u16, Value)>,
}

impl Data {
    /// Data of one kind in every channel.
    pub fn of(kind: Kind) -> Data {
        Data {
            kinds: vec![kind],
            ..Data::default()
        }
    }
    /// Adds a special value at a flat position.
    pub fn with(mut self, position: u16, value: Value) -> Data {
        self.specials.push((position, value));
        self
    }

    fn visit(&mut self, c: &mut dyn Codec) {
        visit_vec(&mut self.kinds, 4, c, Kind::visit);
        c.byte(&mut self.seed);
        visit_vec(&mut self.specials, 8, c, |(p, v), c| {
            visit_u16(p, c);
            v.visit(c);
        });
    }
}

/// ε as given to [`BatchNorm::with_eps`], invalid values included.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
#[allow(missing_docs)]
pub enum Eps {
    /// [`DEFAULT_EPS`].
    #[default]
    Default,
    Zero,
    NegZero,
    MinSubnormal,
    /// 1e-40
    Subnormal,
    /// 1e-10
    Small,
    /// 1e-3
    Milli,
    One,
    /// 1e30
    Huge,
    Max,
    /// −1e-5 (invalid).
    Negative,
    /// −2⁻¹⁴⁹ (invalid).
    NegTiny,
    Nan,
    Inf,
    NegInf,
    /// Any bit pattern.
    Raw(u32),
}

const EPSES: [Eps; 16] = [
    Eps::Default,
    Eps::Zero,
    Eps::NegZero,
    Eps::MinSubnormal,
    Eps::Subnormal,
    Eps::Small,
    Eps::Milli,
    Eps::One,
    Eps::Huge,
    Eps::Max,
    Eps::Negative,
    Eps::NegTiny,
    Eps::Nan,
    Eps::Inf,
    Eps::NegInf,
    Eps::Raw(0),
];

impl Eps {
    /// The value.
    pub fn get(self) -> f32 {
        match self {
            Eps::Default => DEFAULT_EPS,
            Eps::Zero => 0.0,
            Eps::NegZero => -0.0,
            Eps::MinSubnormal => f32::from_bits(1),
            Eps::Subnormal => 1e-40,
            Eps::Small => 1e-10,
            Eps::Milli => 1e-3,
            Eps::One => 1.0,
            Eps::Huge => 1e30,
            Eps::Max => f32::MAX,
            Eps::Negative => -1e-5,
            Eps::NegTiny => -f32::from_bits(1),
            Eps::Nan => f32::NAN,
            Eps::Inf => f32::INFINITY,
            Eps::NegInf => f32::NEG_INFINITY,
            Eps::Raw(bits) => from_bits(bits),
        }
    }

    fn visit(&mut self, c: &mut dyn Codec) {
        let mut tag = EPSES
            .iter()
            .position(|v| std::mem::discriminant(v) == std::mem::discriminant(self))
            .unwrap_or(0) as u8;
        c.byte(&mut tag);
        if c.decoding() {
            *self = EPSES[tag as usize % EPSES.len()];
        }
        if let Eps::Raw(bits) = self {
            visit_u32(bits, c);
        }
    }
}

/// A momentum value, invalid ones included.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
#[allow(missing_docs)]
pub enum Weight {
    #[default]
    Tenth,
    Zero,
    NegZero,
    Half,
    One,
    /// 0.9
    Ninety,
    /// 0.99
    NinetyNine,
    MinSubnormal,
    /// −0.1 (invalid).
    Negative,
    /// The next f32 above 1 (invalid).
    AboveOne,
    Nan,
    Inf,
    /// Any bit pattern.
    Raw(u32),
}

const WEIGHTS: [Weight; 13] = [
    Weight::Tenth,
    Weight::Zero,
    Weight::NegZero,
    Weight::Half,
    Weight::One,
    Weight::Ninety,
    Weight::NinetyNine,
    Weight::MinSubnormal,
    Weight::Negative,
    Weight::AboveOne,
    Weight::Nan,
    Weight::Inf,
    Weight::Raw(0),
];

impl Weight {
    /// The value.
    pub fn get(self) -> f32 {
        match self {
            Weight::Tenth => 0.1,
            Weight::Zero => 0.0,
            Weight::NegZero => -0.0,
            Weight::Half => 0.5,
            Weight::One => 1.0,
            Weight::Ninety => 0.9,
            Weight::NinetyNine => 0.99,
            Weight::MinSubnormal => f32::from_bits(1),
            Weight::Negative => -0.1,
            Weight::AboveOne => 1.0f32.next_up(),
            Weight::Nan => f32::NAN,
            Weight::Inf => f32::INFINITY,
            Weight::Raw(bits) => from_bits(bits),
        }
    }

    fn visit(&mut self, c: &mut dyn Codec) {
        let mut tag = WEIGHTS
            .iter()
            .position(|v| std::mem::discriminant(v) == std::mem::discriminant(self))
            .unwrap_or(0) as u8;
        c.byte(&mut tag);
        if c.decoding() {
            *self = WEIGHTS[tag as usize % WEIGHTS.len()];
        }
        if let Weight::Raw(bits) = self {
            visit_u32(bits, c);
        }
    }
}

/// The running-statistics update of a training forward pass.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub enum Update {
    /// No update.
    #[default]
    None,
    /// [`RunningUpdate::pytorch`].
    Pytorch,
    /// [`RunningUpdate::onnx`].
    Onnx,
    /// [`RunningUpdate::keras`].
    Keras,
    /// [`Momentum::NewWeight`]; `true` = unbiased running variance.
    NewWeight(Weight, bool),
    /// [`Momentum::OldWeight`]; `true` = unbiased running variance.
    OldWeight(Weight, bool),
    /// [`Momentum::CumulativeAverage`] with `batches_tracked` (0 is invalid); `true` = unbiased.
    Cumulative(u8, bool),
}

impl Update {
    /// Momentum and variance estimator, if any.
    pub fn convention(self) -> Option<(Momentum, Variance)> {
        let est = |unbiased: bool| {
            if unbiased {
                Variance::Unbiased
            } else {
                Variance::Biased
            }
        };
        Some(match self {
            Update::None => return None,
            Update::Pytorch => (Momentum::NewWeight(0.1), Variance::Unbiased),
            Update::Onnx => (Momentum::OldWeight(0.9), Variance::Biased),
            Update::Keras => (Momentum::OldWeight(0.99), Variance::Biased),
            Update::NewWeight(w, u) => (Momentum::NewWeight(w.get() as f64), est(u)),
            Update::OldWeight(w, u) => (Momentum::OldWeight(w.get() as f64), est(u)),
            Update::Cumulative(t, u) => (
                Momentum::CumulativeAverage {
                    batches_tracked: t as u64,
                },
                est(u),
            ),
        })
    }

    fn visit(&mut self, c: &mut dyn Codec) {
        let mut tag = match self {
            Update::None => 0,
            Update::Pytorch => 1,
            Update::Onnx => 2,
            Update::Keras => 3,
            Update::NewWeight(..) => 4,
            Update::OldWeight(..) => 5,
            Update::Cumulative(..) => 6,
        };
        c.byte(&mut tag);
        if c.decoding() {
            *self = match tag % 7 {
                0 => Update::None,
                1 => Update::Pytorch,
                2 => Update::Onnx,
                3 => Update::Keras,
                4 => Update::NewWeight(Weight::default(), false),
                5 => Update::OldWeight(Weight::default(), false),
                _ => Update::Cumulative(0, false),
            };
        }
        let flag = |u: &mut bool, c: &mut dyn Codec| {
            let mut b = *u as u8;
            c.byte(&mut b);
            *u = b & 1 == 1;
        };
        match self {
            Update::NewWeight(w, u) | Update::OldWeight(w, u) => {
                w.visit(c);
                flag(u, c);
            }
            Update::Cumulative(t, u) => {
                c.byte(t);
                flag(u, c);
            }
            _ => {}
        }
    }
}

/// Where backward's saved statistics come from (training mode).
#[derive(Clone, Debug, Default, PartialEq)]
pub enum Saved {
    /// From the crate's own training forward on `x`, as a user would have them.
    #[default]
    FromForward,
    /// Given values (mean, inverse std): only no-panic, containment and write checks apply.
    Given(Data, Data),
}

/// Parameter gradients requested from backward.
#[derive(Clone, Debug, Default, PartialEq)]
pub enum Grads {
    /// Overwritten dγ and dβ.
    #[default]
    Overwrite,
    /// None requested.
    None,
    /// Accumulated into these previous values (dγ, dβ).
    Accumulate(Data, Data),
}

/// An argument whose length a case makes wrong.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
#[allow(missing_docs)]
pub enum Arg {
    #[default]
    X,
    /// The output tensor: `y`, or `dx` (and backward's in-place `dy_dx` buffer).
    Out,
    Dy,
    Gamma,
    Beta,
    RunningMean,
    RunningVar,
    SavedMean,
    SavedInvStd,
    DGamma,
    DBeta,
}

const ARGS: [Arg; 11] = [
    Arg::X,
    Arg::Out,
    Arg::Dy,
    Arg::Gamma,
    Arg::Beta,
    Arg::RunningMean,
    Arg::RunningVar,
    Arg::SavedMean,
    Arg::SavedInvStd,
    Arg::DGamma,
    Arg::DBeta,
];

/// How a wrong length differs from the right one.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
#[allow(missing_docs)]
pub enum Delta {
    #[default]
    Empty,
    MinusOne,
    PlusOne,
    Double,
}

const DELTAS: [Delta; 4] = [Delta::Empty, Delta::MinusOne, Delta::PlusOne, Delta::Double];

impl Delta {
    fn apply(self, len: usize) -> usize {
        match self {
            Delta::Empty => 0,
            Delta::MinusOne => len.saturating_sub(1),
            Delta::PlusOne => len + 1,
            Delta::Double => 2 * len,
        }
    }
}

/// Dimensions: N, C and the spatial dimensions, each from one byte (see [`dim`]), and a byte that
/// selects extreme shapes (`0xff`: overflowing, `0xfe`: valid but too large to allocate, used with
/// small slices).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Dims {
    /// N's byte.
    pub n: u8,
    /// C's byte.
    pub c: u8,
    /// The spatial dimensions' bytes, at most 3.
    pub spatial: Vec<u8>,
    /// `0xff`: overflow; `0xfe`: giant; anything else: the dimensions as given.
    pub extreme: u8,
}

/// Larger dimensions: tails around the vector widths (8, 16 lanes), the accumulation block
/// (`KMAX` steps) and primes.
const BIG_DIMS: [usize; 32] = [
    10, 11, 12, 13, 14, 15, 16, 17, 23, 24, 31, 32, 33, 47, 48, 63, 64, 65, 67, 100, 127, 128, 129,
    130, 255, 256, 257, 511, 513, 1000, 1025, 4097,
];

/// At most this many elements per tensor: larger shapes are shrunk (largest dimension halved
/// until they fit) so that one case stays cheap.
pub const MAX_ELEMS: usize = 1 << 15;

/// A dimension from its byte: 0 → 0; 1..=191 → 1..=9; 192..=255 → a larger size from a table.
pub fn dim(b: u8) -> usize {
    match b {
        0 => 0,
        1..=191 => 1 + (b as usize - 1) % 9,
        _ => BIG_DIMS[(b - 192) as usize % BIG_DIMS.len()],
    }
}

/// The smallest byte `b` with `dim(b) == d`, if any.
pub fn dim_byte(d: usize) -> Option<u8> {
    (0..=255u8).find(|&b| dim(b) == d)
}

/// What the dimensions of a case mean.
#[derive(Clone, Debug, PartialEq)]
enum Extent {
    /// Ordinary (possibly zero) dimensions, at most `MAX_ELEMS` elements.
    Normal(usize, usize, Vec<usize>),
    /// Dimensions whose product overflows.
    Overflow(usize, usize, Vec<usize>),
    /// A valid shape far too large to allocate: slices are short, every call must fail.
    Giant(usize, usize, Vec<usize>),
}

impl Dims {
    /// Dimensions from sizes (each must be a value of [`dim`]); panics otherwise.
    pub fn new(n: usize, c: usize, spatial: &[usize]) -> Dims {
        let b = |d| dim_byte(d).unwrap_or_else(|| panic!("no byte for dimension {d}"));
        Dims {
            n: b(n),
            c: b(c),
            spatial: spatial.iter().map(|&d| b(d)).collect(),
            extreme: 0,
        }
    }

    fn extent(&self) -> Extent {
        let (n, c) = (dim(self.n), dim(self.c));
        let spatial: Vec<usize> = self.spatial.iter().map(|&b| dim(b)).collect();
        match self.extreme {
            0xff if self.n.is_multiple_of(2) => Extent::Overflow((1 << 62) + n, c.max(4), spatial),
            0xff => Extent::Overflow(n, c, vec![1 << 40, 1 << 40]),
            0xfe => Extent::Giant(1 << 20, 1 + c % 8, vec![1 << 20]),
            _ => {
                let mut dims: Vec<usize> = [n, c].into_iter().chain(spatial).collect();
                while dims.iter().product::<usize>() > MAX_ELEMS {
                    let (i, _) = dims.iter().enumerate().max_by_key(|(_, d)| **d).unwrap();
                    dims[i] = dims[i].div_ceil(2);
                }
                Extent::Normal(dims[0], dims[1], dims[2..].to_vec())
            }
        }
    }

    fn visit(&mut self, c: &mut dyn Codec) {
        c.byte(&mut self.n);
        c.byte(&mut self.c);
        visit_vec(&mut self.spatial, 3, c, |b, c| c.byte(b));
        c.byte(&mut self.extreme);
    }
}

/// One structured test case: everything every operation needs, invalid arguments included. Each
/// operation uses the fields it takes.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Case {
    /// N, C, spatial.
    pub dims: Dims,
    /// NCHW (false) or NHWC (true).
    pub nhwc: bool,
    /// Sequential (true) or rayon (false) for the first run; the other one is compared with it.
    pub sequential: bool,
    /// Without γ and β (inference, training) or without γ (backward).
    pub no_affine: bool,
    /// Backward with frozen (running) statistics instead of the saved batch statistics.
    pub frozen: bool,
    /// ε.
    pub eps: Eps,
    /// The input tensor.
    pub x: Data,
    /// The gradient of the output (backward).
    pub dy: Data,
    /// γ.
    pub gamma: Data,
    /// β.
    pub beta: Data,
    /// Running mean (inference, frozen backward, training update).
    pub running_mean: Data,
    /// Running variance.
    pub running_var: Data,
    /// Training's running update.
    pub update: Update,
    /// Backward's saved statistics.
    pub saved: Saved,
    /// Backward's parameter gradients.
    pub grads: Grads,
    /// One argument given a wrong length, if any.
    pub mismatch: Option<(Arg, Delta)>,
    /// Statistics: where the batch is split for the merge check (`1 + split % (N − 1)` samples).
    pub split: u8,
    /// Index into [`backends`] (modulo its length); with bit 7 set, a backend this CPU lacks is
    /// requested first (and must be refused).
    pub backend: u8,
}

impl Case {
    fn visit(&mut self, c: &mut dyn Codec) {
        self.dims.visit(c);
        let mut flags = self.nhwc as u8
            | (self.sequential as u8) << 1
            | (self.no_affine as u8) << 2
            | (self.frozen as u8) << 3;
        c.byte(&mut flags);
        self.nhwc = flags & 1 != 0;
        self.sequential = flags & 2 != 0;
        self.no_affine = flags & 4 != 0;
        self.frozen = flags & 8 != 0;
        self.eps.visit(c);
        self.x.visit(c);
        self.dy.visit(c);
        self.gamma.visit(c);
        self.beta.visit(c);
        self.running_mean.visit(c);
        self.running_var.visit(c);
        self.update.visit(c);

        let mut tag = match self.saved {
            Saved::FromForward => 0,
            Saved::Given(..) => 3,
        };
        c.byte(&mut tag);
        if c.decoding() {
            self.saved = match tag % 4 {
                3 => Saved::Given(Data::default(), Data::default()),
                _ => Saved::FromForward,
            };
        }
        if let Saved::Given(m, r) = &mut self.saved {
            m.visit(c);
            r.visit(c);
        }

        let mut tag = match self.grads {
            Grads::Overwrite => 0,
            Grads::None => 2,
            Grads::Accumulate(..) => 3,
        };
        c.byte(&mut tag);
        if c.decoding() {
            self.grads = match tag % 4 {
                2 => Grads::None,
                3 => Grads::Accumulate(Data::default(), Data::default()),
                _ => Grads::Overwrite,
            };
        }
        if let Grads::Accumulate(g, b) = &mut self.grads {
            g.visit(c);
            b.visit(c);
        }

        // One case in eight has a wrong length (tags 224..=255), so most cases run to the end.
        let mut tag = match self.mismatch {
            None => 0,
            Some((a, _)) => 224 + ARGS.iter().position(|&x| x == a).unwrap_or(0) as u8,
        };
        c.byte(&mut tag);
        if c.decoding() {
            self.mismatch =
                (tag >= 224).then(|| (ARGS[(tag - 224) as usize % ARGS.len()], Delta::Empty));
        }
        if let Some((_, d)) = &mut self.mismatch {
            visit_choice(d, &DELTAS, c);
        }
        c.byte(&mut self.split);
        c.byte(&mut self.backend);
    }

    /// Decodes a case from bytes (missing bytes read as zero), exactly as the `Arbitrary`
    /// implementation does from an `arbitrary::Unstructured` over the same bytes.
    pub fn from_bytes(bytes: &[u8]) -> Case {
        let mut it = bytes.iter().copied();
        let mut case = Case::default();
        case.visit(&mut Decoder(|| it.next().unwrap_or(0)));
        case
    }

    /// The bytes that decode to this case.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut enc = Encoder(Vec::new());
        self.clone().visit(&mut enc);
        enc.0
    }
}

#[cfg(feature = "fuzzing")]
impl<'a> arbitrary::Arbitrary<'a> for Case {
    fn arbitrary(u: &mut arbitrary::Unstructured<'a>) -> arbitrary::Result<Self> {
        let mut case = Case::default();
        // `u8::arbitrary` reads one byte, or 0 once the data are exhausted: never an error.
        case.visit(&mut Decoder(|| {
            <u8 as arbitrary::Arbitrary>::arbitrary(u).unwrap_or(0)
        }));
        Ok(case)
    }
}

// ---------------------------------------------------------------------------------------------
// Data generation.
// ---------------------------------------------------------------------------------------------

/// SplitMix64.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed)
    }
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// Standard normal (Box–Muller).
    fn normal(&mut self) -> f64 {
        let u = self.uniform().max(1e-300);
        let v = self.uniform();
        (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

/// Per-channel parameters drawn once per channel: a centre in [-1, 1] and a spread in [0.5, 2].
#[derive(Clone, Copy)]
struct ChannelDraw {
    centre: f64,
    spread: f64,
}

fn draw_value(kind: Kind, ch: ChannelDraw, rng: &mut Rng) -> f32 {
    let n = |rng: &mut Rng| rng.normal();
    let v: f64 = match kind {
        Kind::Normal => 2.0 * ch.centre + ch.spread * n(rng),
        Kind::Offset1e4 => 1e4 * (1.0 + 0.1 * ch.centre) + 1e-2 * n(rng),
        Kind::Offset3e6 => 3e6 * (1.0 + 0.1 * ch.centre) + 4.0 * n(rng),
        Kind::NegOffset1e4 => -1e4 * (1.0 + 0.1 * ch.centre) + 1e-2 * n(rng),
        Kind::Offset1e18 => 1e18 * (1.0 + 0.1 * ch.centre) + 1e16 * n(rng),
        Kind::Constant(v) => return v.get(),
        Kind::Huge30 => 1e30 * (ch.centre + ch.spread * n(rng)),
        Kind::Huge38 => 3e38 * (2.0 * rng.uniform() - 1.0),
        Kind::Spread37 => 1e37 * n(rng).clamp(-30.0, 30.0),
        Kind::NearMax => ch.centre.signum() * (3e38 - 1e37 * n(rng).abs().min(29.0)),
        Kind::Tiny30 => 1e-30 * (ch.centre + ch.spread * n(rng)),
        Kind::Subnormal => 1e-40 * (ch.centre + ch.spread * n(rng)),
        Kind::MinSubnormal => (rng.below(9) as f64 - 4.0) * SUB_ULP,
        Kind::Zeros => {
            return if rng.below(2) == 0 { 0.0 } else { -0.0 };
        }
        Kind::Chaos => {
            let v = VALUES[rng.below(VALUES.len())];
            return match v {
                Value::Raw(_) => from_bits(rng.next_u64() as u32),
                v => v.get(),
            };
        }
        Kind::Sparse => {
            if rng.below(10) != 0 {
                0.0
            } else {
                n(rng) * 10f64.powi(rng.below(7) as i32 - 3)
            }
        }
        Kind::Integers => rng.below(17) as f64 - 8.0,
        Kind::Positive => 0.1 + ch.centre.abs() + ch.spread * n(rng).abs(),
        Kind::Bits => return from_bits(rng.next_u64() as u32),
        Kind::Wide => n(rng) * 10f64.powi(rng.below(61) as i32 - 30),
        Kind::UlpSpread => {
            let k = rng.below(7) as f64 - 3.0;
            (1.0 + 0.5 * ch.centre) as f32 as f64 * (1.0 + k * f32::EPSILON as f64)
        }
    };
    v as f32
}

impl Data {
    /// The values of a tensor of `n × c × hw` in `layout` (`len` elements, truncated or padded
    /// with generated values when a case asks for a wrong length), then the specials.
    #[allow(clippy::too_many_arguments)]
    fn tensor(
        &self,
        (n, c, hw): (usize, usize, usize),
        layout: Layout,
        len: usize,
        default: Kind,
        salt: u64,
    ) -> Vec<f32> {
        let seed = (self.seed as u64) << 8 | salt;
        let mut crng = Rng::new(seed ^ 0x5eed_c4a7);
        let draws: Vec<ChannelDraw> = (0..c.max(1))
            .map(|_| ChannelDraw {
                centre: 2.0 * crng.uniform() - 1.0,
                spread: 0.5 + 1.5 * crng.uniform(),
            })
            .collect();
        let kind_of = |ch: usize| {
            if self.kinds.is_empty() {
                default
            } else {
                self.kinds[ch % self.kinds.len()]
            }
        };
        let mut rng = Rng::new(seed);
        let exact = n * c * hw;
        let mut v = vec![0.0f32; exact.max(len)];
        for i in 0..n {
            for (ch, &draw) in draws.iter().enumerate().take(c) {
                for s in 0..hw {
                    let at = match layout {
                        Layout::Nchw => (i * c + ch) * hw + s,
                        Layout::Nhwc => (i * hw + s) * c + ch,
                    };
                    v[at] = draw_value(kind_of(ch), draw, &mut rng);
                }
            }
        }
        for x in v.iter_mut().skip(exact) {
            *x = draw_value(kind_of(0), draws[0], &mut rng);
        }
        v.truncate(len);
        if !v.is_empty() {
            for &(p, val) in &self.specials {
                let i = p as usize % v.len();
                v[i] = val.get();
            }
        }
        v
    }

    /// Per-channel values (`len` of them; `c` unless the case makes the length wrong).
    fn channels(&self, c: usize, len: usize, default: Kind, salt: u64) -> Vec<f32> {
        self.tensor((1, c, 1), Layout::Nchw, len, default, salt)
    }
}

// ---------------------------------------------------------------------------------------------
// Results: failures and the error report.
// ---------------------------------------------------------------------------------------------

/// Worst errors seen per checked quantity, in units of f32 roundoff relative to the quantity's
/// scale, with the number of elements checked and skipped (reference not finite or not
/// representable in f32). Accumulates over many cases.
#[derive(Clone, Debug, Default)]
pub struct Report {
    entries: BTreeMap<&'static str, Entry>,
}

#[derive(Clone, Copy, Debug, Default)]
struct Entry {
    worst: f64,
    bound_used: f64,
    checked: u64,
    skipped: u64,
}

impl Report {
    fn note(&mut self, key: &'static str, err: f64, scale: f64, relative: bool, bound: f64) {
        let e = self.entries.entry(key).or_default();
        e.checked += 1;
        // In units of u relative to the scale where the floors are negligible (elsewhere the
        // floors, not the relative error, decide).
        if relative || err == 0.0 {
            let u = if err == 0.0 { 0.0 } else { err / scale / EPS32 };
            e.worst = e.worst.max(u);
        }
        let frac = if err == 0.0 { 0.0 } else { err / bound };
        if frac > e.bound_used || frac.is_nan() {
            e.bound_used = frac;
        }
    }
    fn skip(&mut self, key: &'static str) {
        self.entries.entry(key).or_default().skipped += 1;
    }
    /// How many elements of `key` were checked against the reference.
    pub fn checked(&self, key: &str) -> u64 {
        self.entries.get(key).map_or(0, |e| e.checked)
    }
    /// The worst error of `key`, in units of f32 roundoff relative to its scale.
    pub fn worst(&self, key: &str) -> f64 {
        self.entries.get(key).map_or(0.0, |e| e.worst)
    }
    /// The largest fraction of its bound an error of `key` reached (above 1: a failure).
    pub fn bound_used(&self, key: &str) -> f64 {
        self.entries.get(key).map_or(0.0, |e| e.bound_used)
    }
    /// Every quantity's name.
    pub fn keys(&self) -> Vec<&'static str> {
        self.entries.keys().copied().collect()
    }
    /// Adds another report's counts and worst errors.
    pub fn merge(&mut self, other: &Report) {
        for (k, o) in &other.entries {
            let e = self.entries.entry(k).or_default();
            e.checked += o.checked;
            e.skipped += o.skipped;
            e.worst = e.worst.max(o.worst);
            e.bound_used = e.bound_used.max(o.bound_used);
        }
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{:<28} {:>10} {:>11} {:>10} {:>9}",
            "quantity", "worst (u)", "bound used", "checked", "skipped"
        )?;
        for (k, e) in &self.entries {
            writeln!(
                f,
                "{k:<28} {:>10.2} {:>11.3} {:>10} {:>9}",
                e.worst, e.bound_used, e.checked, e.skipped
            )?;
        }
        Ok(())
    }
}

/// What one check run collects.
struct Ctx<'r> {
    report: &'r mut Report,
    failures: Vec<String>,
}

impl Ctx<'_> {
    fn fail(&mut self, msg: String) {
        if self.failures.len() < 12 {
            self.failures.push(msg);
        }
    }

    /// `|got − want| ≤ tol·scale + floor`, where `scale` is the size of the terms the result is
    /// computed from and `floor` the absolute errors of f32 values below the normal range (and
    /// of roundings not relative to `scale`). NaN or ±Inf where the reference is finite fails.
    fn close(
        &mut self,
        key: &'static str,
        got: f64,
        want: f64,
        scale: f64,
        (tol, floor): (f64, f64),
        at: impl FnOnce() -> String,
    ) {
        let err = (got - want).abs();
        let bound = tol * scale + floor;
        self.report
            .note(key, err, scale, floor <= 0.01 * tol * scale, bound);
        if err.is_nan() || err > bound {
            self.fail(format!(
                "{key} {}: got {got:e}, want {want:e}, error {err:e} = {:.1}u of scale {scale:e} \
                 (bound {tol:e}·scale + {floor:e})",
                at(),
                err / scale / EPS32
            ));
        }
    }
}

/// Bit equality with any NaN equal to any NaN (payloads may differ between code paths that are
/// allowed to differ, e.g. an input NaN propagated through different operand orders).
fn same_bits(a: f32, b: f32) -> bool {
    a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan())
}

fn same_stats(a: &ChannelStats, b: &ChannelStats) -> bool {
    let eq = |x: f64, y: f64| x.to_bits() == y.to_bits() || (x.is_nan() && y.is_nan());
    a.count() == b.count() && eq(a.mean(), b.mean()) && eq(a.m2(), b.m2())
}

fn has_sentinel(v: &[f32]) -> Option<usize> {
    v.iter().position(|x| x.to_bits() == SENTINEL_BITS)
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn finite_in(v: f64) -> bool {
    v.abs() <= F32_MAX
}

/// An expected error.
#[derive(Debug)]
enum Expect {
    Exactly(Error),
    AnyZeroDimension,
    AnyShapeOverflow,
}

impl Expect {
    fn matches(&self, e: &Error) -> bool {
        match (self, e) {
            (Expect::AnyZeroDimension, Error::ZeroDimension { .. }) => true,
            (Expect::AnyShapeOverflow, Error::ShapeOverflow { .. }) => true,
            (
                Expect::Exactly(Error::InvalidEpsilon { eps: a }),
                Error::InvalidEpsilon { eps: b },
            ) => a.to_bits() == b.to_bits(),
            (
                Expect::Exactly(Error::InvalidMomentum { momentum: a }),
                Error::InvalidMomentum { momentum: b },
            ) => a.to_bits() == b.to_bits(),
            (Expect::Exactly(a), b) => a == b,
            _ => false,
        }
    }
}

/// Length expectations of one call.
#[derive(Default)]
struct Expected(Vec<Expect>);

impl Expected {
    fn len(&mut self, arg: &'static str, expected: usize, actual: usize) {
        if expected != actual {
            self.0.push(Expect::Exactly(Error::LengthMismatch {
                arg,
                expected,
                actual,
            }));
        }
    }
    fn push(&mut self, e: Error) {
        self.0.push(Expect::Exactly(e));
    }
}

/// Checks the outcome of a call against the expected errors. Returns true when the call
/// succeeded as it should (and its results are to be checked).
fn outcome<T>(ctx: &mut Ctx<'_>, call: &str, got: &Result<T, Error>, exp: &Expected) -> bool {
    match (got, exp.0.is_empty()) {
        (Ok(_), true) => true,
        (Err(e), true) => {
            ctx.fail(format!("{call}: unexpected error {e:?}"));
            false
        }
        (Ok(_), false) => {
            ctx.fail(format!(
                "{call}: accepted invalid arguments, expected one of {:?}",
                exp.0
            ));
            false
        }
        (Err(e), false) => {
            if !exp.0.iter().any(|x| x.matches(e)) {
                ctx.fail(format!("{call}: error {e:?}, expected one of {:?}", exp.0));
            }
            false
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The checker.
// ---------------------------------------------------------------------------------------------

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

fn run_check(op: Op, case: &Case, report: &mut Report) -> Result<(), String> {
    let mut ctx = Ctx {
        report,
        failures: Vec::new(),
    };
    if let Some((s, inp)) = prepare(case, &mut ctx) {
        match op {
            Op::Statistics => statistics(case, &s, &inp, &mut ctx),
            Op::Inference => inference(case, &s, &inp, &mut ctx),
            Op::Training => training(case, &s, &inp, &mut ctx),
            Op::Backward => backward(case, &s, &inp, &mut ctx),
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
struct Setup {
    shape: Shape,
    layout: Layout,
    /// The spatial dimensions (for the split batch's shapes).
    spatial: Vec<usize>,
    /// The operator with the case's parallelism, and with the other one.
    bn: BatchNorm,
    other: BatchNorm,
    eps: f32,
    /// Every call must fail with a length error (a giant shape).
    giant: bool,
    /// The flat indices of each channel's elements (empty for a giant shape).
    indices: Vec<Vec<usize>>,
}

impl Setup {
    fn c(&self) -> usize {
        self.shape.c()
    }
    fn m(&self) -> usize {
        self.shape.per_channel()
    }
    fn len(&self) -> usize {
        self.shape.len()
    }
    fn channel_of(&self, i: usize) -> usize {
        match self.layout {
            Layout::Nchw => (i / self.shape.hw()) % self.shape.c(),
            Layout::Nhwc => i % self.shape.c(),
        }
    }
    /// Per channel: whether any of the tensor's elements is not finite.
    fn nonfinite_channels(&self, t: &[f32]) -> Vec<bool> {
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
struct Inputs {
    x: Vec<f32>,
    dy: Vec<f32>,
    /// Length of the output tensor (`y`, `dx`).
    out_len: usize,
    gamma: Vec<f32>,
    beta: Vec<f32>,
    running_mean: Vec<f32>,
    running_var: Vec<f32>,
    /// Lengths of the saved mean and inverse std.
    saved_len: [usize; 2],
    /// Given saved statistics (backward, training mode).
    saved: Option<(Vec<f32>, Vec<f32>)>,
    /// Lengths of dγ and dβ.
    grads_len: [usize; 2],
    /// Previous dγ and dβ to accumulate into.
    prev: Option<(Vec<f32>, Vec<f32>)>,
}

impl Inputs {
    /// A copy with the channels marked `bad` replaced by ordinary values (x, dy = 0; γ = 1,
    /// β = 0, running mean 0, variance 1, saved mean 0, inverse std 1, previous gradients 0).
    fn sanitized(&self, s: &Setup, bad: &[bool]) -> Inputs {
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
fn prepare(case: &Case, ctx: &mut Ctx<'_>) -> Option<(Setup, Inputs)> {
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
    let mut bn = BatchNorm::new(shape, layout);
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
        other: bn.with_parallelism(other),
        eps: bn.eps(),
        giant,
        indices: Vec::new(),
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
    Some((s, inp))
}

/// Checks one channel's statistics against the exact ones. `k_mean` and `k_m2` multiply the
/// bounds (1 for one call; more for merged partial statistics, see `statistics`).
#[allow(clippy::too_many_arguments)]
fn check_stats(
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

fn statistics(case: &Case, s: &Setup, inp: &Inputs, ctx: &mut Ctx<'_>) {
    let mut exp = Expected::default();
    exp.len("x", s.len(), inp.x.len());
    let got = s.bn.statistics(&inp.x);
    if !outcome(ctx, "statistics", &got, &exp) || s.giant {
        return;
    }
    let Ok(got) = got else { return };
    let (c, m) = (s.c(), s.m());
    if got.num_channels() != c {
        ctx.fail(format!(
            "statistics: {} channels, expected {c}",
            got.num_channels()
        ));
        return;
    }
    match s.other.statistics(&inp.x) {
        Ok(again)
            if again
                .channels()
                .iter()
                .zip(got.channels())
                .all(|(a, b)| same_stats(a, b)) => {}
        other => ctx.fail(format!(
            "statistics differ between parallelism settings: {other:?}"
        )),
    }
    let want = reference::statistics(&inp.x, s.shape, s.layout);
    let bad = s.nonfinite_channels(&inp.x);
    for ch in 0..c {
        if !bad[ch] {
            let keys = ("statistics mean", "statistics m2");
            check_stats(ctx, keys, ch, &got.channels()[ch], &want[ch], m, 1.0, 1.0);
        }
    }
    let unbiased = got.variances(Variance::Unbiased);
    if (m < 2) != unbiased.is_err() {
        ctx.fail(format!(
            "variances(Unbiased) with {m} values per channel: {unbiased:?}"
        ));
    }
    if got.variances(Variance::Biased).is_err() {
        ctx.fail("variances(Biased) failed".into());
    }

    // Statistics of a batch split in two along N, merged, against the whole batch's exact ones.
    // Bounds: each part is within `tol` of its own exact statistics. The merged mean is the
    // count-weighted mean of the parts' means, and (n_a/n)·σ_a ≤ σ since n_a·σ_a² ≤ M2: at most
    // twice the bound of one call. The merged M2 adds the parts' M2 (error ≤ tol·M2) and
    // δ²·n_a·n_b/n, whose error 2|δ|·(n_a·n_b/n)·tol·(σ_a + σ_b) is at most 2·tol·M2 by
    // 2ab ≤ a² + b²: three times the bound of one call.
    let n = s.shape.n();
    if n >= 2 {
        let k = 1 + case.split as usize % (n - 1);
        let per = c * s.shape.hw();
        let part = |rows: usize, x: &[f32]| {
            let shape = Shape::with_spatial(rows, c, &s.spatial).ok()?;
            let bn = BatchNorm::new(shape, s.layout)
                .with_backend(s.bn.backend())
                .ok()?
                .with_parallelism(s.bn.parallelism());
            bn.statistics(x).ok()
        };
        let (Some(mut merged), Some(b)) =
            (part(k, &inp.x[..k * per]), part(n - k, &inp.x[k * per..]))
        else {
            ctx.fail(format!(
                "statistics of a split batch ({k} + {}) failed",
                n - k
            ));
            return;
        };
        if let Err(e) = merged.merge(&b) {
            ctx.fail(format!("merge: {e:?}"));
            return;
        }
        for ch in 0..c {
            if !bad[ch] {
                let keys = ("statistics merged mean", "statistics merged m2");
                check_stats(
                    ctx,
                    keys,
                    ch,
                    &merged.channels()[ch],
                    &want[ch],
                    m,
                    2.0,
                    3.0,
                );
            }
        }
        // Merging statistics of another channel count fails and leaves the receiver alone;
        // merging empty statistics is the identity.
        let before = merged.clone();
        let wrong = BatchStats::from_channels(vec![ChannelStats::default(); c + 1]);
        let mut exp = Expected::default();
        exp.push(Error::ChannelMismatch {
            expected: c,
            actual: c + 1,
        });
        outcome(ctx, "merge (channel mismatch)", &merged.merge(&wrong), &exp);
        let empty = BatchStats::from_channels(vec![ChannelStats::default(); c]);
        if merged.merge(&empty).is_err()
            || !merged
                .channels()
                .iter()
                .zip(before.channels())
                .all(|(a, b)| same_stats(a, b))
        {
            ctx.fail("merging a channel mismatch or empty statistics changed the receiver".into());
        }
    }

    if bad.contains(&true) {
        let clean = inp.sanitized(s, &bad);
        if let Ok(again) = s.bn.statistics(&clean.x) {
            for ch in (0..c).filter(|&ch| !bad[ch]) {
                if !same_stats(&again.channels()[ch], &got.channels()[ch]) {
                    ctx.fail(format!(
                        "statistics: non-finite values of another channel changed channel {ch}"
                    ));
                }
            }
        }
    }
}

fn inference(case: &Case, s: &Setup, inp: &Inputs, ctx: &mut Ctx<'_>) {
    let affine = !case.no_affine;
    let (c, len) = (s.c(), s.len());
    let expected = |out: bool| {
        let mut e = Expected::default();
        e.len("x", len, inp.x.len());
        if out {
            e.len("y", len, inp.out_len);
        }
        e.len("running_mean", c, inp.running_mean.len());
        e.len("running_var", c, inp.running_var.len());
        if affine {
            e.len("gamma", c, inp.gamma.len());
            e.len("beta", c, inp.beta.len());
        }
        e
    };
    let run = |bn: &BatchNorm, inp: &Inputs| {
        let mut y = vec![sentinel(); inp.out_len];
        let running = RunningStats {
            mean: &inp.running_mean,
            var: &inp.running_var,
        };
        let aff = affine.then_some(Affine {
            gamma: &inp.gamma,
            beta: &inp.beta,
        });
        let r = bn.inference(&inp.x, &mut y, running, aff);
        let mut buf = inp.x.clone();
        let r_in = bn.inference_in_place(&mut buf, running, aff);
        (r, y, r_in, buf)
    };
    let (r, y, r_in, buf) = run(&s.bn, inp);
    let ok = outcome(ctx, "inference", &r, &expected(true));
    if r.is_err() && y.iter().any(|v| v.to_bits() != SENTINEL_BITS) {
        ctx.fail("inference wrote y before returning an error".into());
    }
    let ok_in = outcome(ctx, "inference_in_place", &r_in, &expected(false));
    if r_in.is_err() && bits(&buf) != bits(&inp.x) {
        ctx.fail("inference_in_place changed x before returning an error".into());
    }
    if !ok || s.giant {
        return;
    }
    if let Some(i) = has_sentinel(&y) {
        ctx.fail(format!("inference did not write y[{i}]"));
    }
    if ok_in && !y.iter().zip(&buf).all(|(&a, &b)| same_bits(a, b)) {
        ctx.fail("inference_in_place differs from inference".into());
    }
    let (_, y2, _, _) = run(&s.other, inp);
    if !y.iter().zip(&y2).all(|(&a, &b)| same_bits(a, b)) {
        ctx.fail("inference differs between parallelism settings".into());
    }

    let gamma = affine.then_some(&inp.gamma[..]);
    let beta = affine.then_some(&inp.beta[..]);
    let want = reference::inference(
        &inp.x,
        s.shape,
        s.layout,
        &inp.running_mean,
        &inp.running_var,
        gamma,
        beta,
        s.eps,
    );
    let mut bad = s.nonfinite_channels(&inp.x);
    for (ch, b) in bad.iter_mut().enumerate() {
        let params = [
            inp.running_mean[ch],
            inp.running_var[ch],
            gamma.map_or(1.0, |g| g[ch]),
            beta.map_or(0.0, |b| b[ch]),
        ];
        *b |= params.iter().any(|v| !v.is_finite());
    }
    let tol = fwd_tol(1);
    for i in 0..len {
        let ch = s.channel_of(i);
        if bad[ch] {
            continue;
        }
        let (g, b) = (
            gamma.map_or(1.0, |g| g[ch] as f64),
            beta.map_or(0.0, |b| b[ch] as f64),
        );
        let r = 1.0 / (inp.running_var[ch] as f64 + s.eps as f64).sqrt();
        let d = inp.x[i] as f64 - inp.running_mean[ch] as f64;
        let (alpha, xhat) = (g * r, d * r);
        let scale = g.abs() * (1.0 + xhat.abs()) + b.abs();
        let representable = r.is_finite()
            && [d, alpha, alpha * d, scale, want[i]]
                .iter()
                .all(|&v| finite_in(v));
        if !representable {
            ctx.report.skip("inference y");
            continue;
        }
        // α = γ·r and the output are f32: half a subnormal each below the normal range, α's
        // multiplied by |x − mean|.
        let floor = SUB_ULP * (2.0 + d.abs());
        ctx.close(
            "inference y",
            y[i] as f64,
            want[i],
            scale,
            (tol, floor),
            || format!("element {i} (channel {ch}, x = {:e})", inp.x[i]),
        );
    }

    if bad.contains(&true) {
        let clean = inp.sanitized(s, &bad);
        let (_, y3, _, _) = run(&s.bn, &clean);
        for i in (0..len).filter(|&i| !bad[s.channel_of(i)]) {
            if !same_bits(y[i], y3[i]) {
                ctx.fail(format!(
                    "inference: non-finite values of another channel changed y[{i}] (channel {})",
                    s.channel_of(i)
                ));
                break;
            }
        }
    }
}

/// Outputs of one training forward call.
struct TrainOut {
    result: Result<BatchStats, Error>,
    y: Vec<f32>,
    mean: Vec<f32>,
    inv_std: Vec<f32>,
    running_mean: Vec<f32>,
    running_var: Vec<f32>,
}

fn run_training(bn: &BatchNorm, inp: &Inputs, affine: bool, update: Update) -> TrainOut {
    let mut y = vec![sentinel(); inp.out_len];
    let mut mean = vec![sentinel(); inp.saved_len[0]];
    let mut inv_std = vec![sentinel(); inp.saved_len[1]];
    let (mut running_mean, mut running_var) = (inp.running_mean.clone(), inp.running_var.clone());
    let result = bn.training(
        &inp.x,
        &mut y,
        affine.then_some(Affine {
            gamma: &inp.gamma,
            beta: &inp.beta,
        }),
        SavedStatsMut {
            mean: &mut mean,
            inv_std: &mut inv_std,
        },
        update
            .convention()
            .map(|(momentum, var_estimator)| RunningUpdate {
                mean: &mut running_mean,
                var: &mut running_var,
                momentum,
                var_estimator,
            }),
    );
    TrainOut {
        result,
        y,
        mean,
        inv_std,
        running_mean,
        running_var,
    }
}

impl TrainOut {
    /// The outputs of channel `ch` as bits, for comparisons between runs.
    fn channel_bits(&self, s: &Setup, ch: usize) -> Vec<u64> {
        let f = |v: f32| {
            if v.is_nan() {
                u64::MAX
            } else {
                v.to_bits() as u64
            }
        };
        let g = |v: f64| if v.is_nan() { u64::MAX } else { v.to_bits() };
        let mut out: Vec<u64> = s.indices[ch].iter().map(|&i| f(self.y[i])).collect();
        for v in [
            &self.mean,
            &self.inv_std,
            &self.running_mean,
            &self.running_var,
        ] {
            out.push(v.get(ch).map_or(0, |&v| f(v)));
        }
        if let Ok(stats) = &self.result {
            let st = stats.channels()[ch];
            out.extend([st.count(), g(st.mean()), g(st.m2())]);
        }
        out
    }
}

fn training(case: &Case, s: &Setup, inp: &Inputs, ctx: &mut Ctx<'_>) {
    let affine = !case.no_affine;
    let (c, m, len) = (s.c(), s.m(), s.len());
    let update = case.update.convention();
    let mut exp = Expected::default();
    exp.len("x", len, inp.x.len());
    exp.len("y", len, inp.out_len);
    if affine {
        exp.len("gamma", c, inp.gamma.len());
        exp.len("beta", c, inp.beta.len());
    }
    exp.len("saved_mean", c, inp.saved_len[0]);
    exp.len("saved_inv_std", c, inp.saved_len[1]);
    // Weights of the old running value and of the batch value, as the convention states them.
    let (mut w_old, mut w_new) = (0.0, 0.0);
    if let Some((momentum, estimator)) = update {
        exp.len("running_mean", c, inp.running_mean.len());
        exp.len("running_var", c, inp.running_var.len());
        if estimator == Variance::Unbiased && m < 2 {
            exp.push(Error::TooFewValues {
                per_channel: m as u64,
            });
        }
        match momentum {
            Momentum::NewWeight(w) | Momentum::OldWeight(w) if !(0.0..=1.0).contains(&w) => {
                exp.push(Error::InvalidMomentum { momentum: w })
            }
            Momentum::NewWeight(w) => (w_old, w_new) = (1.0 - w, w),
            Momentum::OldWeight(w) => (w_old, w_new) = (w, 1.0 - w),
            Momentum::CumulativeAverage { batches_tracked: 0 } => {
                exp.push(Error::ZeroBatchesTracked)
            }
            Momentum::CumulativeAverage { batches_tracked } => {
                (w_old, w_new) = (
                    1.0 - 1.0 / batches_tracked as f64,
                    1.0 / batches_tracked as f64,
                )
            }
        }
    }
    let out = run_training(&s.bn, inp, affine, case.update);
    if !outcome(ctx, "training", &out.result, &exp) {
        if out.result.is_err() {
            let untouched = [&out.y, &out.mean, &out.inv_std]
                .iter()
                .all(|v| v.iter().all(|x| x.to_bits() == SENTINEL_BITS))
                && bits(&out.running_mean) == bits(&inp.running_mean)
                && bits(&out.running_var) == bits(&inp.running_var);
            if !untouched {
                ctx.fail("training wrote an output before returning an error".into());
            }
        }
        return;
    }
    if s.giant {
        return;
    }
    let Ok(stats) = &out.result else { return };
    for (name, v) in [
        ("y", &out.y),
        ("saved_mean", &out.mean),
        ("saved_inv_std", &out.inv_std),
    ] {
        if let Some(i) = has_sentinel(v) {
            ctx.fail(format!("training did not write {name}[{i}]"));
        }
    }
    let again = run_training(&s.other, inp, affine, case.update);
    if (0..c).any(|ch| out.channel_bits(s, ch) != again.channel_bits(s, ch)) {
        ctx.fail("training differs between parallelism settings".into());
    }

    let gamma = affine.then_some(&inp.gamma[..]);
    let beta = affine.then_some(&inp.beta[..]);
    let want = reference::training(&inp.x, s.shape, s.layout, gamma, beta, s.eps);
    let mut bad = s.nonfinite_channels(&inp.x);
    for (ch, b) in bad.iter_mut().enumerate() {
        *b |= !gamma.map_or(1.0, |g| g[ch]).is_finite() || !beta.map_or(0.0, |b| b[ch]).is_finite();
        if update.is_some() {
            *b |= !inp.running_mean[ch].is_finite() || !inp.running_var[ch].is_finite();
        }
    }
    let x_bad = s.nonfinite_channels(&inp.x);
    let tol = fwd_tol(m);
    let eps = s.eps as f64;
    let exact = reference::statistics(&inp.x, s.shape, s.layout);
    for ch in 0..c {
        if x_bad[ch] {
            continue;
        }
        let keys = ("training stats mean", "training stats m2");
        check_stats(
            ctx,
            keys,
            ch,
            &stats.channels()[ch],
            &exact[ch],
            m,
            1.0,
            1.0,
        );
        if bad[ch] {
            continue;
        }
        let (mu, var, r) = (want.mean[ch], want.var[ch], want.inv_std[ch]);
        let sigma = var.sqrt();
        // Saved mean: the statistics' mean (bound of `check_stats`), rounded to f32.
        let scale = sigma + EPS32 * mu.abs();
        let floor = mean_floor(m) + 1.01 * EPS32 * mu.abs() + SUB_ULP;
        ctx.close(
            "training saved mean",
            out.mean[ch] as f64,
            mu,
            scale,
            (tol, floor),
            || format!("channel {ch}"),
        );
        if (var + eps).is_nan() || var + eps < F32_MIN_NORMAL {
            // var + ε below f32's normal range: not representable with relative accuracy.
            ctx.report.skip("training saved inv_std");
            continue;
        }
        // Relative error of r from the absolute floor of the variance.
        let r_floor = m2_floor(m) / m as f64 / (var + eps);
        ctx.close(
            "training saved inv_std",
            out.inv_std[ch] as f64,
            r,
            r,
            (tol, r * r_floor + SUB_ULP),
            || format!("channel {ch}"),
        );
        let (g, b) = (
            gamma.map_or(1.0, |g| g[ch] as f64),
            beta.map_or(0.0, |b| b[ch] as f64),
        );
        for &i in &s.indices[ch] {
            let d = inp.x[i] as f64 - mu;
            let (alpha, xhat) = (g * r, d * r);
            let scale = g.abs() * (1.0 + xhat.abs()) + b.abs();
            let representable = [d, alpha, alpha * d, scale, want.y[i]]
                .iter()
                .all(|&v| finite_in(v));
            if !representable {
                ctx.report.skip("training y");
                continue;
            }
            // f32 α, bias and output below the normal range (α's multiplied by |x − μ|), and
            // the variance's absolute floor through r.
            let floor = SUB_ULP * (2.0 + d.abs()) + (alpha * d).abs() * r_floor;
            ctx.close(
                "training y",
                out.y[i] as f64,
                want.y[i],
                scale,
                (tol, floor),
                || format!("element {i} (channel {ch}, x = {:e})", inp.x[i]),
            );
        }
    }

    if let Some((momentum, estimator)) = update {
        let (want_mean, want_var) = reference::running_update(
            &inp.running_mean,
            &inp.running_var,
            &want,
            momentum,
            estimator,
        );
        let w = w_new;
        for ch in (0..c).filter(|&ch| !bad[ch]) {
            let (mu, sigma) = (want.mean[ch], want.var[ch].sqrt());
            let (old_m, old_v) = (inp.running_mean[ch] as f64, inp.running_var[ch] as f64);
            // Bounds: the batch statistics' error (times w), the f64 blend (negligible) and
            // the rounding of the result to f32, relative to the size of the blended terms.
            let terms = w_old * old_m.abs() + w * (mu.abs() + sigma);
            if finite_in(want_mean[ch]) && finite_in(terms) {
                // The reference's blend rounds in f64 (`old + (new − old)/t` cancels when t = 1).
                let floor = w * mean_floor(m) + SUB_ULP + f64::EPSILON * (old_m.abs() + mu.abs());
                ctx.close(
                    "training running mean",
                    out.running_mean[ch] as f64,
                    want_mean[ch],
                    terms,
                    (tol, floor),
                    || format!("channel {ch} ({momentum:?}, old {old_m:e})"),
                );
            } else {
                ctx.report.skip("training running mean");
            }
            let (var_b, var_floor) = match estimator {
                Variance::Biased => (want.var[ch], m2_floor(m) / m as f64),
                Variance::Unbiased => (want.var_unbiased[ch], m2_floor(m) / (m as f64 - 1.0)),
            };
            let terms = w_old * old_v.abs() + w * var_b;
            if finite_in(want_var[ch]) && finite_in(terms) {
                let floor = w * var_floor + SUB_ULP + f64::EPSILON * (old_v.abs() + var_b);
                ctx.close(
                    "training running var",
                    out.running_var[ch] as f64,
                    want_var[ch],
                    terms,
                    (tol, floor),
                    || format!("channel {ch} ({momentum:?} {estimator:?}, old {old_v:e})"),
                );
            } else {
                ctx.report.skip("training running var");
            }
        }
    }

    if bad.contains(&true) {
        let clean = inp.sanitized(s, &bad);
        let again = run_training(&s.bn, &clean, affine, case.update);
        for ch in (0..c).filter(|&ch| !bad[ch]) {
            if out.channel_bits(s, ch) != again.channel_bits(s, ch) {
                ctx.fail(format!(
                    "training: non-finite values of another channel changed channel {ch}"
                ));
            }
        }
    }
}

/// Outputs of one backward call.
struct BackOut {
    result: Result<(), Error>,
    /// dx (out of place) or the `dy_dx` buffer (in place).
    dx: Vec<f32>,
    dgamma: Vec<f32>,
    dbeta: Vec<f32>,
}

impl BackOut {
    fn channel_bits(&self, s: &Setup, ch: usize) -> Vec<u32> {
        let f = |v: f32| if v.is_nan() { u32::MAX } else { v.to_bits() };
        let mut out: Vec<u32> = s.indices[ch].iter().map(|&i| f(self.dx[i])).collect();
        out.push(self.dgamma.get(ch).map_or(0, |&v| f(v)));
        out.push(self.dbeta.get(ch).map_or(0, |&v| f(v)));
        out
    }
    fn same(&self, other: &BackOut) -> bool {
        let eq = |a: &[f32], b: &[f32]| {
            a.len() == b.len() && a.iter().zip(b).all(|(&x, &y)| same_bits(x, y))
        };
        eq(&self.dx, &other.dx) && eq(&self.dgamma, &other.dgamma) && eq(&self.dbeta, &other.dbeta)
    }
}

/// The saved statistics backward gets: the crate's own training forward on `x` (zeros when `x`
/// has the wrong length), or the case's given values.
fn saved_stats(s: &Setup, inp: &Inputs) -> (Vec<f32>, Vec<f32>) {
    if let Some(given) = &inp.saved {
        return given.clone();
    }
    let c = s.c();
    let (mut mean, mut inv_std) = (vec![0.0; c], vec![0.0; c]);
    if inp.x.len() == s.len() && !s.giant {
        let mut y = vec![0.0; inp.x.len()];
        let saved = SavedStatsMut {
            mean: &mut mean,
            inv_std: &mut inv_std,
        };
        // Cannot fail: every length is right and there is no running update.
        let _ = s.bn.training(&inp.x, &mut y, None, saved, None);
    }
    mean.resize(inp.saved_len[0], 0.0);
    inv_std.resize(inp.saved_len[1], 1.0);
    (mean, inv_std)
}

fn run_backward(bn: &BatchNorm, s: &Setup, inp: &Inputs, case: &Case, in_place: bool) -> BackOut {
    let (saved_mean, saved_inv_std) = saved_stats(s, inp);
    let mode = if case.frozen {
        BackwardMode::Frozen(RunningStats {
            mean: &inp.running_mean,
            var: &inp.running_var,
        })
    } else {
        BackwardMode::Training(SavedStats {
            mean: &saved_mean,
            inv_std: &saved_inv_std,
        })
    };
    let gamma = (!case.no_affine).then_some(&inp.gamma[..]);
    let (mut dgamma, mut dbeta, mode_g) = match &inp.prev {
        Some((g, b)) => (g.clone(), b.clone(), Some(GradMode::Accumulate)),
        None if case.grads == Grads::None => (Vec::new(), Vec::new(), None),
        None => (
            vec![sentinel(); inp.grads_len[0]],
            vec![sentinel(); inp.grads_len[1]],
            Some(GradMode::Overwrite),
        ),
    };
    let grads = mode_g.map(|mode| ParamGrads {
        dgamma: &mut dgamma,
        dbeta: &mut dbeta,
        mode,
    });
    let (result, dx) = if in_place {
        let mut buf = inp.dy.clone();
        (
            bn.backward_in_place(&inp.x, &mut buf, mode, gamma, grads),
            buf,
        )
    } else {
        let mut dx = vec![sentinel(); inp.out_len];
        (
            bn.backward(&inp.x, &inp.dy, &mut dx, mode, gamma, grads),
            dx,
        )
    };
    BackOut {
        result,
        dx,
        dgamma,
        dbeta,
    }
}

fn backward(case: &Case, s: &Setup, inp: &Inputs, ctx: &mut Ctx<'_>) {
    let (c, m, len) = (s.c(), s.m(), s.len());
    let affine = !case.no_affine;
    let expected = |in_place: bool| {
        let mut e = Expected::default();
        e.len("x", len, inp.x.len());
        if in_place {
            e.len("dy_dx", len, inp.dy.len());
        } else {
            e.len("dx", len, inp.out_len);
            e.len("dy", len, inp.dy.len());
        }
        if affine {
            e.len("gamma", c, inp.gamma.len());
        }
        if case.grads != Grads::None {
            e.len("dgamma", c, inp.grads_len[0]);
            e.len("dbeta", c, inp.grads_len[1]);
        }
        if case.frozen {
            e.len("running_mean", c, inp.running_mean.len());
            e.len("running_var", c, inp.running_var.len());
        } else {
            e.len("saved_mean", c, inp.saved_len[0]);
            e.len("saved_inv_std", c, inp.saved_len[1]);
        }
        e
    };
    let out = run_backward(&s.bn, s, inp, case, false);
    let inp_out = run_backward(&s.bn, s, inp, case, true);
    let untouched = |o: &BackOut, in_place: bool| {
        let dx_ok = if in_place {
            bits(&o.dx) == bits(&inp.dy)
        } else {
            o.dx.iter().all(|v| v.to_bits() == SENTINEL_BITS)
        };
        let grads_ok = match &inp.prev {
            Some((g, b)) => bits(&o.dgamma) == bits(g) && bits(&o.dbeta) == bits(b),
            None => o
                .dgamma
                .iter()
                .chain(&o.dbeta)
                .all(|v| v.to_bits() == SENTINEL_BITS),
        };
        dx_ok && grads_ok
    };
    let ok = outcome(ctx, "backward", &out.result, &expected(false));
    if out.result.is_err() && !untouched(&out, false) {
        ctx.fail("backward wrote an output before returning an error".into());
    }
    let ok_in = outcome(ctx, "backward_in_place", &inp_out.result, &expected(true));
    if inp_out.result.is_err() && !untouched(&inp_out, true) {
        ctx.fail("backward_in_place wrote an output before returning an error".into());
    }
    if !ok || s.giant {
        return;
    }
    if let Some(i) = has_sentinel(&out.dx) {
        ctx.fail(format!("backward did not write dx[{i}]"));
    }
    if let Some(i) = has_sentinel(&out.dgamma) {
        ctx.fail(format!("backward did not write dgamma[{i}]"));
    }
    if let Some(i) = has_sentinel(&out.dbeta) {
        ctx.fail(format!("backward did not write dbeta[{i}]"));
    }
    if ok_in && !out.same(&inp_out) {
        ctx.fail("backward_in_place differs from backward".into());
    }
    if !out.same(&run_backward(&s.other, s, inp, case, false)) {
        ctx.fail("backward differs between parallelism settings".into());
    }

    let gamma = affine.then_some(&inp.gamma[..]);
    let (saved_mean, saved_inv_std) = saved_stats(s, inp);
    let mut bad = s.nonfinite_channels(&inp.x);
    for (ch, (b, dy_bad)) in bad
        .iter_mut()
        .zip(s.nonfinite_channels(&inp.dy))
        .enumerate()
    {
        *b |= dy_bad || !gamma.map_or(1.0, |g| g[ch]).is_finite();
        if case.frozen {
            *b |= !inp.running_mean[ch].is_finite() || !inp.running_var[ch].is_finite();
        } else if inp.saved.is_some() {
            *b |= !saved_mean[ch].is_finite() || !saved_inv_std[ch].is_finite();
        }
        if let Some((g, bb)) = &inp.prev {
            *b |= !g[ch].is_finite() || !bb[ch].is_finite();
        }
    }

    let tol = fwd_tol(m);
    let mf = m as f64;
    // Accumulated gradients: the reference plus the previous value, rounded once more to f32.
    let prev = |k: usize, ch: usize| {
        inp.prev
            .as_ref()
            .map_or(0.0, |p| [&p.0, &p.1][k][ch] as f64)
    };
    if case.frozen {
        let want = reference::backward_frozen(
            &inp.x,
            &inp.dy,
            s.shape,
            s.layout,
            &inp.running_mean,
            &inp.running_var,
            gamma,
            s.eps,
        );
        for ch in (0..c).filter(|&ch| !bad[ch]) {
            let r = 1.0 / (inp.running_var[ch] as f64 + s.eps as f64).sqrt();
            if !r.is_finite() {
                ctx.report.skip("frozen dx");
                continue;
            }
            let g = gamma.map_or(1.0, |g| g[ch] as f64);
            let alpha = g * r;
            let (mut s_dy, mut s_xdy, mut centred_ok) = (0.0, 0.0, true);
            for &i in &s.indices[ch] {
                let (dy, d) = (
                    inp.dy[i] as f64,
                    inp.x[i] as f64 - inp.running_mean[ch] as f64,
                );
                s_dy += dy.abs();
                s_xdy += (d * r * dy).abs();
                centred_ok &= finite_in(d);
                let scale = (alpha * dy).abs();
                if !(finite_in(alpha) && finite_in(scale) && finite_in(want.dx[i])) {
                    ctx.report.skip("frozen dx");
                    continue;
                }
                // f32 α (times |dy|) and output below the normal range.
                let floor = SUB_ULP * (1.0 + dy.abs());
                ctx.close(
                    "frozen dx",
                    out.dx[i] as f64,
                    want.dx[i],
                    scale,
                    (fwd_tol(1), floor),
                    || format!("element {i} (channel {ch}, dy = {dy:e})"),
                );
            }
            if case.grads == Grads::None {
                continue;
            }
            // Sums of f32 products: below the normal range half a subnormal per step.
            let check_grad =
                |ctx: &mut Ctx<'_>, key, k: usize, got: f32, want: f64, scale: f64, floor: f64| {
                    let p = prev(k, ch);
                    let total = p + want;
                    if !(finite_in(scale) && finite_in(total)) {
                        ctx.report.skip(key);
                        return;
                    }
                    let floor = floor + 1.01 * EPS32 * (p.abs() + want.abs());
                    ctx.close(key, got as f64, total, scale, (tol, floor), || {
                        format!("channel {ch}")
                    });
                };
            let db_floor = SUB_ULP * (1.0 + mf);
            check_grad(
                ctx,
                "frozen dbeta",
                1,
                out.dbeta[ch],
                want.dbeta[ch],
                s_dy,
                db_floor,
            );
            if centred_ok {
                let dg_floor = SUB_ULP * (1.0 + r * mf);
                check_grad(
                    ctx,
                    "frozen dgamma",
                    0,
                    out.dgamma[ch],
                    want.dgamma[ch],
                    s_xdy,
                    dg_floor,
                );
            } else {
                ctx.report.skip("frozen dgamma");
            }
        }
    } else if inp.saved.is_none() {
        let t = reference::training(&inp.x, s.shape, s.layout, None, None, s.eps);
        let want = reference::backward_training(&inp.x, &inp.dy, s.shape, s.layout, gamma, s.eps);
        for ch in (0..c).filter(|&ch| !bad[ch]) {
            let (mu, var, r) = (t.mean[ch], t.var[ch], t.inv_std[ch]);
            let idx = &s.indices[ch];
            let centred_ok = idx.iter().all(|&i| finite_in(inp.x[i] as f64 - mu));
            let var_eps = var + s.eps as f64;
            if var_eps.is_nan() || var_eps < F32_MIN_NORMAL || !centred_ok {
                ctx.report.skip("training dx");
                continue;
            }
            let g = gamma.map_or(1.0, |g| g[ch] as f64);
            let (mut s_dy, mut s_xdy) = (0.0, 0.0);
            for &i in idx {
                let (d, dy) = (inp.x[i] as f64 - mu, inp.dy[i] as f64);
                s_dy += dy.abs();
                s_xdy += (d * r * dy).abs();
            }
            // The sums of the documented formulas (dβ = Σdy, dγ = Σ(x − μ)·r·dy) are checked only
            // when the sums of their terms' magnitudes are finite in f32 (else some summation
            // order overflows).
            if !(finite_in(s_dy) && finite_in(s_xdy)) {
                ctx.report.skip("training dx");
                continue;
            }
            // The crate computes dx = a·dy + b·x̂ + c with f32 coefficients a = γ·r,
            // b = −a·dγ/M and c ≈ −a·dβ/M (documented limit: where one of them is beyond f32's
            // range, dx is not computed to the tolerance; its overflowing sums fall back to f64).
            let a = g.abs() * r;
            let b = a * want.dgamma[ch].abs() / mf;
            if !(finite_in(a) && finite_in(b) && finite_in(a * s_dy / mf)) {
                ctx.report
                    .skip("training dx (f32 coefficients out of range)");
                continue;
            }
            // Scales. The batch mean is only known to the statistics' tolerance, tol·σ
            // (`stats_tol`); dγ = Σ(x − μ)·r·dy moves by r·δ·Σdy with it, at most tol·Σ|dy| as
            // r·σ ≤ 1, and dx moves through x̂·dγ/M and through the (x − μ) it multiplies by
            // r·dγ/M. That is why the forward scale is |γ|·(1 + |x̂|), not |γ|·|x̂|; the same
            // "1 +" gives Σ(1 + |x̂|)·|dy| for dγ and
            // |γ|·r·(|dy| + mean|dy| + (1 + |x̂|)·mean((1 + |x̂|)·|dy|)) for dx. The narrower
            // scales without it (Σ|x̂·dy|, and |γ|·r·(|dy| + mean|dy| + |x̂|·mean|x̂·dy|)) are
            // recorded for information under "[narrow scale]" keys; they are exceeded when dy
            // is concentrated where x̂ ≈ 0 while Σdy ≠ 0.
            let s_wdy = s_dy + s_xdy;
            for &i in idx {
                let (dy, d) = (inp.dy[i] as f64, inp.x[i] as f64 - mu);
                let xhat = d * r;
                let scale = g.abs() * r * (dy.abs() + s_dy / mf + (1.0 + xhat.abs()) * s_wdy / mf);
                let narrow = g.abs() * r * (dy.abs() + s_dy / mf + xhat.abs() * s_xdy / mf);
                if !(finite_in(g * r) && finite_in(scale) && finite_in(want.dx[i])) {
                    ctx.report.skip("training dx");
                    continue;
                }
                // f32 a, b, c of `dx = a·dy + b·x̂ + c` and the output, below the normal range
                // (a's rounding multiplied by |dy|, b's by |x̂|); and the absolute floors of dβ
                // and dγ (see below) through the formula: |γ|·r·(floor(dβ) + |x̂|·floor(dγ))/M.
                let floor = SUB_ULP * (2.0 + dy.abs() + xhat.abs())
                    + g.abs() * r * SUB_ULP * (1.0 + xhat.abs() * r * (1.0 + s_dy / mf));
                let err = (out.dx[i] as f64 - want.dx[i]).abs();
                let key = "training dx [narrow scale]";
                ctx.report.note(
                    key,
                    err,
                    narrow,
                    floor <= 0.01 * tol * narrow,
                    tol * narrow + floor,
                );
                ctx.close(
                    "training dx",
                    out.dx[i] as f64,
                    want.dx[i],
                    scale,
                    (tol, floor),
                    || {
                        format!(
                            "element {i} (channel {ch}, x = {:e}, dy = {dy:e})",
                            inp.x[i]
                        )
                    },
                );
            }
            if case.grads == Grads::None {
                continue;
            }
            // Absolute floors: below the normal range the f32 lane sums round by half a
            // subnormal per step: M steps for dβ = Σdy, and dγ = r·(Σ(x − K)·dy − lo·Σdy) with
            // lo = Σ(x − K)/M gives r·(M + Σ|dy|) (|lo| is tiny).
            for (key, k, got, want, scale, floor) in [
                (
                    "training dbeta",
                    1,
                    out.dbeta[ch],
                    want.dbeta[ch],
                    s_dy,
                    SUB_ULP * (1.0 + mf),
                ),
                (
                    "training dgamma",
                    0,
                    out.dgamma[ch],
                    want.dgamma[ch],
                    s_wdy,
                    SUB_ULP * (1.0 + r * (mf + s_dy)),
                ),
            ] {
                let p = prev(k, ch);
                let total = p + want;
                if !(finite_in(scale) && finite_in(total)) {
                    ctx.report.skip(key);
                    continue;
                }
                let floor = floor + 1.01 * EPS32 * (p.abs() + want.abs());
                if k == 0 {
                    let err = (got as f64 - total).abs();
                    let key = "training dgamma [narrow scale]";
                    let relative = floor <= 0.01 * tol * s_xdy;
                    ctx.report
                        .note(key, err, s_xdy, relative, tol * s_xdy + floor);
                }
                ctx.close(key, got as f64, total, scale, (tol, floor), || {
                    format!("channel {ch}")
                });
            }
        }
    }

    if bad.contains(&true) {
        let clean = inp.sanitized(s, &bad);
        let again = run_backward(&s.bn, s, &clean, case, false);
        for ch in (0..c).filter(|&ch| !bad[ch]) {
            if out.channel_bits(s, ch) != again.channel_bits(s, ch) {
                ctx.fail(format!(
                    "backward: non-finite values of another channel changed channel {ch}"
                ));
            }
        }
    }
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
        "shape {:?} {:?}, eps {:e}, backend {:?}, {:?}\n",
        s.shape,
        s.layout,
        s.eps,
        s.bn.backend(),
        s.bn.parallelism()
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
