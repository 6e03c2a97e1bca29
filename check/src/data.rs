//! Deterministic data generation: the one random generator ([`Rng`]) and the values of each [`Kind`].

use batchnorm::Layout;

use crate::{case::*, tolerance::*};
/// SplitMix64: the one deterministic random generator of the checker and the tests.
pub struct Rng(u64);

impl Rng {
    /// A generator started from `seed`.
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }
    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// Standard normal (Box–Muller).
    pub fn normal(&mut self) -> f64 {
        let u = self.uniform().max(1e-300);
        let v = self.uniform();
        (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
    }
    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
    /// `len` values `mean + std·N(0,1)`, rounded to f32.
    pub fn normals(&mut self, len: usize, mean: f64, std: f64) -> Vec<f32> {
        (0..len)
            .map(|_| (mean + std * self.normal()) as f32)
            .collect()
    }
}

/// Per-channel parameters drawn once per channel: a centre in [-1, 1] and a spread in [0.5, 2].
#[derive(Clone, Copy)]
pub(crate) struct ChannelDraw {
    pub(crate) centre: f64,
    pub(crate) spread: f64,
}

pub(crate) fn draw_value(kind: Kind, ch: ChannelDraw, rng: &mut Rng) -> f32 {
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
    pub(crate) fn tensor(
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
    pub(crate) fn channels(&self, c: usize, len: usize, default: Kind, salt: u64) -> Vec<f32> {
        self.tensor((1, c, 1), Layout::Nchw, len, default, salt)
    }
}
