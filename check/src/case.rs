//! The structured test case ([`Case`]) and its byte-level codec (fuzzer bytes ↔ case).

use batchnorm::{DEFAULT_EPS, Momentum, Variance};

use crate::tolerance::*;
/// Reads (decoding) or writes (encoding) the fields of a case, one byte at a time, so one
/// description of the layout serves both directions.
pub(crate) trait Codec {
    fn byte(&mut self, b: &mut u8);
    fn decoding(&self) -> bool;
}

pub(crate) struct Decoder<F: FnMut() -> u8>(F);

impl<F: FnMut() -> u8> Codec for Decoder<F> {
    fn byte(&mut self, b: &mut u8) {
        *b = (self.0)();
    }
    fn decoding(&self) -> bool {
        true
    }
}

pub(crate) struct Encoder(Vec<u8>);

impl Codec for Encoder {
    fn byte(&mut self, b: &mut u8) {
        self.0.push(*b);
    }
    fn decoding(&self) -> bool {
        false
    }
}

pub(crate) fn visit_u16(v: &mut u16, c: &mut dyn Codec) {
    let mut b = v.to_le_bytes();
    b.iter_mut().for_each(|b| c.byte(b));
    *v = u16::from_le_bytes(b);
}

pub(crate) fn visit_u32(v: &mut u32, c: &mut dyn Codec) {
    let mut b = v.to_le_bytes();
    b.iter_mut().for_each(|b| c.byte(b));
    *v = u32::from_le_bytes(b);
}

/// A list of at most `max` items: one length byte (taken modulo `max + 1`), then the items.
pub(crate) fn visit_vec<T: Default>(
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
pub(crate) fn visit_choice<T: Copy + PartialEq>(v: &mut T, table: &[T], c: &mut dyn Codec) {
    let mut b = table.iter().position(|t| t == v).unwrap_or(0) as u8;
    c.byte(&mut b);
    if c.decoding() {
        *v = table[b as usize % table.len()];
    }
}

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

pub(crate) const VALUES: [Value; 26] = [
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

    pub(crate) fn visit(&mut self, c: &mut dyn Codec) {
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
pub(crate) fn from_bits(bits: u32) -> f32 {
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

pub(crate) const KINDS: [Kind; 21] = [
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
    pub(crate) fn visit(&mut self, c: &mut dyn Codec) {
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

    pub(crate) fn visit(&mut self, c: &mut dyn Codec) {
        visit_vec(&mut self.kinds, 4, c, Kind::visit);
        c.byte(&mut self.seed);
        visit_vec(&mut self.specials, 8, c, |(p, v), c| {
            visit_u16(p, c);
            v.visit(c);
        });
    }
}

/// ε as given to [`BatchNorm::with_eps`](batchnorm::BatchNorm::with_eps), invalid values included.
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

pub(crate) const EPSES: [Eps; 16] = [
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
    pub fn get(self) -> f64 {
        let v: f32 = match self {
            Eps::Default => return DEFAULT_EPS,
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
        };
        f64::from(v)
    }

    pub(crate) fn visit(&mut self, c: &mut dyn Codec) {
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

pub(crate) const WEIGHTS: [Weight; 13] = [
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

    pub(crate) fn visit(&mut self, c: &mut dyn Codec) {
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
    /// [`RunningUpdate::pytorch`](batchnorm::RunningUpdate::pytorch).
    Pytorch,
    /// [`RunningUpdate::onnx`](batchnorm::RunningUpdate::onnx).
    Onnx,
    /// [`RunningUpdate::keras`](batchnorm::RunningUpdate::keras).
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

    pub(crate) fn visit(&mut self, c: &mut dyn Codec) {
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

/// The epilogue of the fused forward ops ([`batchnorm::Epilogue`]).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub enum Fused {
    /// No fused run.
    #[default]
    None,
    /// `relu(bn(x))`.
    Relu,
    /// `relu(bn(x) + z)`.
    AddRelu,
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

/// Every argument a case can give a wrong length, in codec order.
pub const ARGS: [Arg; 11] = [
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

pub(crate) const DELTAS: [Delta; 4] =
    [Delta::Empty, Delta::MinusOne, Delta::PlusOne, Delta::Double];

impl Delta {
    pub(crate) fn apply(self, len: usize) -> usize {
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
pub(crate) const BIG_DIMS: [usize; 32] = [
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
pub(crate) enum Extent {
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

    pub(crate) fn extent(&self) -> Extent {
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

    pub(crate) fn visit(&mut self, c: &mut dyn Codec) {
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
    /// The epilogue of the fused forward ops, checked against the plain op (the residual z of
    /// `AddRelu` is the `dy` tensor).
    pub fused: Fused,
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
    /// The storage type of the data tensors (x, y, dy, dx, z).
    pub storage: Storage,
}

/// The storage type of a case's data tensors ([`batchnorm::Element`]); parameters and statistics
/// are `f32`, or `f64` for f64 data.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[allow(missing_docs)]
pub enum Storage {
    #[default]
    F32,
    F16,
    Bf16,
    F64,
}

/// Every storage type, in codec order.
pub const STORAGES: [Storage; 4] = [Storage::F32, Storage::F16, Storage::Bf16, Storage::F64];

/// The byte after [`Case::backend`] that announces a storage byte. The storage type was added
/// after the committed corpus was fuzzed, and about half of its files have unused bytes after the
/// backend; no file had this value there (checked when the field was added), so every one of them
/// still decodes with storage f32, exactly as before. Any other value, or the end of the input,
/// means f32.
pub const STORAGE_MARK: u8 = 0xb7;

impl Storage {
    /// The element type's name (`Element::NAME`).
    pub fn name(self) -> &'static str {
        match self {
            Storage::F32 => "f32",
            Storage::F16 => "f16",
            Storage::Bf16 => "bf16",
            Storage::F64 => "f64",
        }
    }

    /// The marker byte, then the type's index in [`STORAGES`]. f32 is encoded as nothing (the end
    /// of the input), so the bytes of an f32 case are those it had before this field existed.
    pub(crate) fn visit(&mut self, c: &mut dyn Codec) {
        if !c.decoding() && *self == Storage::F32 {
            return;
        }
        let mut mark = STORAGE_MARK;
        c.byte(&mut mark);
        if c.decoding() {
            *self = Storage::F32;
        }
        if mark == STORAGE_MARK {
            let mut tag = STORAGES.iter().position(|s| s == self).unwrap_or(0) as u8;
            c.byte(&mut tag);
            if c.decoding() {
                *self = STORAGES[tag as usize % STORAGES.len()];
            }
        }
    }
}

impl Case {
    pub(crate) fn visit(&mut self, c: &mut dyn Codec) {
        self.dims.visit(c);
        let fused = match self.fused {
            Fused::None => 0,
            Fused::Relu => 1,
            Fused::AddRelu => 2,
        };
        let mut flags = self.nhwc as u8
            | (self.sequential as u8) << 1
            | (self.no_affine as u8) << 2
            | (self.frozen as u8) << 3
            | fused << 4;
        c.byte(&mut flags);
        self.nhwc = flags & 1 != 0;
        self.sequential = flags & 2 != 0;
        self.no_affine = flags & 4 != 0;
        self.frozen = flags & 8 != 0;
        self.fused = match (flags >> 4) % 4 {
            0 | 3 => Fused::None,
            1 => Fused::Relu,
            _ => Fused::AddRelu,
        };
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
        self.storage.visit(c);
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
