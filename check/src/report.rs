//! Results: failures, and the report of measured errors and skipped elements.

use batchnorm::{ChannelStats, Error};
use std::fmt;

use crate::tolerance::*;
/// Worst errors seen per checked quantity, in units of f32 roundoff (of f64 roundoff for the
/// quantities of f64 data, whose keys start with "f64") relative to the quantity's scale, with the number of elements checked and skipped (reference not finite or not
/// representable in f32). Accumulates over many cases.
#[derive(Clone, Debug, Default)]
pub struct Report {
    /// One entry per quantity, in the order first seen (sorted by name where shown).
    entries: Vec<(&'static str, Entry)>,
    /// The index of the entry used last: the checks note a quantity's elements one after
    /// another, so most lookups end here, on a pointer comparison (a map keyed by the names took
    /// 12% of the corpus replay's time in its string comparisons).
    last: usize,
}

#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Entry {
    pub(crate) worst: f64,
    pub(crate) bound_used: f64,
    pub(crate) checked: u64,
    pub(crate) skipped: u64,
}

impl Report {
    pub(crate) fn note(
        &mut self,
        key: &'static str,
        err: f64,
        scale: f64,
        relative: bool,
        bound: f64,
    ) {
        let e = self.entry(key);
        e.checked += 1;
        // In units of u relative to the scale where the floors are negligible (elsewhere the
        // floors, not the relative error, decide).
        if relative || err == 0.0 {
            let u = if err == 0.0 {
                0.0
            } else {
                err / scale / unit(key)
            };
            e.worst = e.worst.max(u);
        }
        let frac = if err == 0.0 { 0.0 } else { err / bound };
        if frac > e.bound_used || frac.is_nan() {
            e.bound_used = frac;
        }
    }
    /// The entry of `key`, made if it is new.
    fn entry(&mut self, key: &'static str) -> &mut Entry {
        let hit = self
            .entries
            .get(self.last)
            .is_some_and(|&(k, _)| std::ptr::eq(k, key) || k == key);
        if !hit {
            self.last = match self.entries.iter().position(|&(k, _)| k == key) {
                Some(i) => i,
                None => {
                    self.entries.push((key, Entry::default()));
                    self.entries.len() - 1
                }
            };
        }
        &mut self.entries[self.last].1
    }
    fn get(&self, key: &str) -> Option<&Entry> {
        self.entries
            .iter()
            .find(|&&(k, _)| k == key)
            .map(|(_, e)| e)
    }
    /// The entries sorted by name.
    fn sorted(&self) -> Vec<&(&'static str, Entry)> {
        let mut v: Vec<_> = self.entries.iter().collect();
        v.sort_unstable_by_key(|&&(k, _)| k);
        v
    }
    /// Counts `n` elements of `key` compared exactly (bit for bit), not against a tolerance.
    pub(crate) fn exact(&mut self, key: &'static str, n: usize) {
        self.entry(key).checked += n as u64;
    }
    pub(crate) fn skip(&mut self, key: &'static str) {
        self.entry(key).skipped += 1;
    }
    /// How many elements of `key` were checked against the reference.
    pub fn checked(&self, key: &str) -> u64 {
        self.get(key).map_or(0, |e| e.checked)
    }
    /// The worst error of `key`, in units of roundoff relative to its scale (f64's for keys
    /// starting with "f64", f32's otherwise).
    pub fn worst(&self, key: &str) -> f64 {
        self.get(key).map_or(0.0, |e| e.worst)
    }
    /// The largest fraction of its bound an error of `key` reached (above 1: a failure).
    pub fn bound_used(&self, key: &str) -> f64 {
        self.get(key).map_or(0.0, |e| e.bound_used)
    }
    /// Every quantity's name, sorted.
    pub fn keys(&self) -> Vec<&'static str> {
        self.sorted().into_iter().map(|&(k, _)| k).collect()
    }
    /// Adds another report's counts and worst errors.
    pub fn merge(&mut self, other: &Report) {
        for &(k, o) in &other.entries {
            let e = self.entry(k);
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
        for (k, e) in self.sorted() {
            writeln!(
                f,
                "{k:<28} {:>10.2} {:>11.3} {:>10} {:>9}",
                e.worst, e.bound_used, e.checked, e.skipped
            )?;
        }
        Ok(())
    }
}

/// The roundoff that errors of `key` are reported in: f64's for f64 data, f32's otherwise.
pub(crate) fn unit(key: &str) -> f64 {
    if key.starts_with("f64") { EPS64 } else { EPS32 }
}

/// What one check run collects.
pub(crate) struct Ctx<'r> {
    pub(crate) report: &'r mut Report,
    pub(crate) failures: Vec<String>,
}

impl Ctx<'_> {
    pub(crate) fn fail(&mut self, msg: String) {
        if self.failures.len() < 12 {
            self.failures.push(msg);
        }
    }

    /// `|got − want| ≤ tol·scale + floor`, where `scale` is the size of the terms the result is
    /// computed from and `floor` the absolute errors of f32 values below the normal range (and
    /// of roundings not relative to `scale`). NaN or ±Inf where the reference is finite fails.
    pub(crate) fn close(
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
                err / scale / unit(key)
            ));
        }
    }
}

/// A float whose bits the checks compare: f32 (the folded parameters) or f64 (every widened
/// output).
pub(crate) trait Bits: Copy {
    fn bits(self) -> u64;
    fn nan(self) -> bool;
}

impl Bits for f32 {
    fn bits(self) -> u64 {
        self.to_bits().into()
    }
    fn nan(self) -> bool {
        self.is_nan()
    }
}

impl Bits for f64 {
    fn bits(self) -> u64 {
        self.to_bits()
    }
    fn nan(self) -> bool {
        self.is_nan()
    }
}

/// Bit equality with any NaN equal to any NaN (payloads may differ between code paths that are
/// allowed to differ, e.g. an input NaN propagated through different operand orders).
pub(crate) fn same_bits<T: Bits>(a: T, b: T) -> bool {
    a.bits() == b.bits() || (a.nan() && b.nan())
}

pub(crate) fn same_stats(a: &ChannelStats, b: &ChannelStats) -> bool {
    a.count() == b.count() && same_bits(a.mean(), b.mean()) && same_bits(a.m2(), b.m2())
}

/// The first element of a widened output that is the sentinel (was not written).
pub(crate) fn has_sentinel(v: &[f64]) -> Option<usize> {
    v.iter().position(|x| x.to_bits() == SENTINEL64_BITS)
}

/// Whether every element of a widened output is the sentinel (nothing was written).
pub(crate) fn untouched(v: &[f64]) -> bool {
    v.iter().all(|x| x.to_bits() == SENTINEL64_BITS)
}

pub(crate) fn bits<T: Bits>(v: &[T]) -> Vec<u64> {
    v.iter().map(|x| x.bits()).collect()
}

pub(crate) fn finite_in(v: f64) -> bool {
    v.abs() <= F32_MAX
}

/// An expected error.
#[derive(Debug)]
pub(crate) enum Expect {
    Exactly(Error),
    AnyZeroDimension,
    AnyShapeOverflow,
}

impl Expect {
    pub(crate) fn matches(&self, e: &Error) -> bool {
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

/// Error expectations of one call of operation `.1` (the name its length errors carry).
#[derive(Default)]
pub(crate) struct Expected(pub(crate) Vec<Expect>, pub(crate) &'static str);

impl Expected {
    /// No expectations yet, for a call of `op`.
    pub(crate) fn of(op: &'static str) -> Expected {
        Expected(Vec::new(), op)
    }
    pub(crate) fn len(&mut self, arg: &'static str, expected: usize, actual: usize) {
        if expected != actual {
            self.0.push(Expect::Exactly(Error::LengthMismatch {
                op: self.1,
                arg,
                expected,
                actual,
            }));
        }
    }
    pub(crate) fn push(&mut self, e: Error) {
        self.0.push(Expect::Exactly(e));
    }
}

/// Checks the outcome of a call against the expected errors. Returns true when the call
/// succeeded as it should (and its results are to be checked).
pub(crate) fn outcome<T>(
    ctx: &mut Ctx<'_>,
    call: &str,
    got: &Result<T, Error>,
    exp: &Expected,
) -> bool {
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
