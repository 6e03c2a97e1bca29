//! Reference arithmetic more precise than f64, for checking f64 data: double-double numbers
//! ([`Dd`], an unevaluated sum `hi + lo` of two f64 with `|lo| ≤ ulp(hi)/2`, about 106 bits),
//! compensated sums, and the statistics of a channel from them ([`Moments`]).
//!
//! Error-free transformations (Knuth's TwoSum, the FMA product) and the usual double-double
//! algorithms (Dekker; Hida, Li and Bailey's QD library): each operation errs by a few units of
//! 2⁻¹⁰⁶ relative to its operands, so every reference value below is within about one f64
//! rounding (u = 2⁻⁵³) of the exact result once rounded to f64: negligible against the
//! tolerances it checks (at least 8u, see [`f64_tol`](crate::f64_tol)).

use std::ops::{Add, Div, Mul, Neg, Sub};

/// `a + b` as an unevaluated sum `(s, e)`, exactly (Knuth's TwoSum).
pub fn two_sum(a: f64, b: f64) -> (f64, f64) {
    let s = a + b;
    let bb = s - a;
    (s, (a - (s - bb)) + (b - bb))
}

/// `a·b` as an unevaluated sum `(p, e)`, exactly (unless it underflows), with one FMA.
pub fn two_prod(a: f64, b: f64) -> (f64, f64) {
    let p = a * b;
    (p, a.mul_add(b, -p))
}

/// A double-double number `hi + lo`.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Dd {
    /// The value rounded to f64.
    pub hi: f64,
    /// The rest.
    pub lo: f64,
}

impl Dd {
    /// Zero.
    pub const ZERO: Dd = Dd { hi: 0.0, lo: 0.0 };

    /// `x` exactly.
    pub fn new(x: f64) -> Dd {
        Dd { hi: x, lo: 0.0 }
    }

    /// `hi + lo` renormalized (`|lo| ≤ ulp(hi)/2`).
    fn norm(hi: f64, lo: f64) -> Dd {
        let (hi, lo) = two_sum(hi, lo);
        // A non-finite hi (overflow, NaN input) makes lo NaN: keep hi's value.
        Dd {
            hi,
            lo: if hi.is_finite() { lo } else { 0.0 },
        }
    }

    /// The value rounded to f64.
    pub fn value(self) -> f64 {
        self.hi + self.lo
    }

    /// |self|.
    pub fn abs(self) -> Dd {
        if self.hi < 0.0 { -self } else { self }
    }

    /// The square root (one Newton step from the f64 root; NaN below zero, 0 at 0).
    pub fn sqrt(self) -> Dd {
        if self.hi <= 0.0 || !self.hi.is_finite() {
            return Dd::new(self.hi.sqrt());
        }
        let q = self.hi.sqrt();
        let (p, e) = two_prod(q, q);
        let r = ((self.hi - p) - e + self.lo) / (2.0 * q);
        Dd::norm(q, r)
    }
}

impl From<f64> for Dd {
    fn from(x: f64) -> Dd {
        Dd::new(x)
    }
}

impl Neg for Dd {
    type Output = Dd;
    fn neg(self) -> Dd {
        Dd {
            hi: -self.hi,
            lo: -self.lo,
        }
    }
}

impl Add for Dd {
    type Output = Dd;
    /// The accurate double-double sum (both parts added with TwoSum).
    fn add(self, o: Dd) -> Dd {
        let (s, e) = two_sum(self.hi, o.hi);
        let (t, f) = two_sum(self.lo, o.lo);
        let (s, e) = two_sum(s, e + t);
        Dd::norm(s, e + f)
    }
}

impl Sub for Dd {
    type Output = Dd;
    fn sub(self, o: Dd) -> Dd {
        self + -o
    }
}

impl Mul for Dd {
    type Output = Dd;
    fn mul(self, o: Dd) -> Dd {
        let (p, e) = two_prod(self.hi, o.hi);
        Dd::norm(p, e + (self.hi * o.lo + self.lo * o.hi))
    }
}

impl Div for Dd {
    type Output = Dd;
    /// Long division: three f64 quotient digits.
    fn div(self, o: Dd) -> Dd {
        let q1 = self.hi / o.hi;
        if !q1.is_finite() || q1 == 0.0 {
            return Dd::new(q1);
        }
        let r = self - o * Dd::new(q1);
        let q2 = r.hi / o.hi;
        let r = r - o * Dd::new(q2);
        let q3 = r.hi / o.hi;
        Dd::norm(q1, q2) + Dd::new(q3)
    }
}

/// The sum of `v` in double-double (a compensated sum), rounded to f64.
pub fn sum(v: impl IntoIterator<Item = f64>) -> f64 {
    sum_dd(v.into_iter().map(Dd::new)).value()
}

/// The sum of `v` in double-double.
pub fn sum_dd(v: impl IntoIterator<Item = Dd>) -> Dd {
    v.into_iter().fold(Dd::ZERO, |s, x| s + x)
}

/// The statistics of one channel's values: the mean and `M2 = Σ(x − μ)²` in double-double, the
/// deviations taken from the double-double mean.
#[derive(Clone, Copy, Debug)]
pub struct Moments {
    /// The number of values.
    pub count: usize,
    /// The mean.
    pub mean: Dd,
    /// The sum of squared deviations from the mean.
    pub m2: Dd,
}

impl Moments {
    /// The statistics of `v` (NaN mean and M2 when `v` is empty).
    pub fn new(v: &[f64]) -> Moments {
        let n = Dd::new(v.len() as f64);
        let mean = sum_dd(v.iter().map(|&x| Dd::new(x))) / n;
        let m2 = sum_dd(v.iter().map(|&x| {
            let d = Dd::new(x) - mean;
            d * d
        }));
        Moments {
            count: v.len(),
            mean,
            m2,
        }
    }

    /// `x − μ` in double-double.
    pub fn dev_dd(&self, x: f64) -> Dd {
        Dd::new(x) - self.mean
    }

    /// `x − μ`, rounded once to f64.
    pub fn dev(&self, x: f64) -> f64 {
        self.dev_dd(x).value()
    }

    /// The mean, rounded once to f64.
    pub fn mean(&self) -> f64 {
        self.mean.value()
    }

    /// M2, rounded once to f64.
    pub fn m2(&self) -> f64 {
        self.m2.value()
    }

    /// The biased variance `M2/M`, rounded once to f64.
    pub fn var(&self) -> f64 {
        (self.m2 / Dd::new(self.count as f64)).value()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn double_double_keeps_the_digits_f64_loses() {
        // 1 + 2⁻⁸⁰ − 1 = 2⁻⁸⁰, lost in f64.
        let tiny = 2f64.powi(-80);
        assert_eq!((Dd::new(1.0) + Dd::new(tiny) - Dd::new(1.0)).value(), tiny);
        // (1/3)·3 = 1 to 2⁻¹⁰⁴.
        let third = Dd::new(1.0) / Dd::new(3.0);
        let back = third * Dd::new(3.0) - Dd::new(1.0);
        assert!(back.value().abs() < 2f64.powi(-104), "{back:?}");
        // sqrt(2)² = 2 to 2⁻¹⁰³.
        let r = Dd::new(2.0).sqrt();
        assert!((r * r - Dd::new(2.0)).value().abs() < 2f64.powi(-103));
        assert_eq!(Dd::new(0.0).sqrt().value(), 0.0);
        assert!(Dd::new(-1.0).sqrt().value().is_nan());
    }

    #[test]
    fn moments_of_offset_data_are_exact_where_f64_is_not() {
        // b + {0, 1, 2, 3} with b = 2⁵³ − 4 (spacing 1): the sum 4b + 6 is not an f64 (spacing
        // 8 there), nor is the mean b + 1.5; M2 = 5.
        let b = 2f64.powi(53) - 4.0;
        let v = [b, b + 1.0, b + 2.0, b + 3.0];
        let m = Moments::new(&v);
        assert_eq!((m.mean.hi - b) + m.mean.lo, 1.5);
        assert_eq!(m.dev(b), -1.5);
        assert_eq!(m.m2(), 5.0);
        assert_eq!(m.var(), 1.25);
        assert_eq!(sum([1e16, 1.0, -1e16]), 1.0);
    }
}
