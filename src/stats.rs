//! Per-channel statistics as a mergeable result: count, mean and M2 (sum of squared deviations).

use crate::Error;

/// Which variance estimator to use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Variance {
    /// Population (biased) variance, `M2 / n`: what normalization uses, and what ONNX and Keras
    /// keep as running variance.
    Biased,
    /// Sample (unbiased, Bessel-corrected) variance, `M2 / (n − 1)`: what PyTorch keeps as
    /// running variance.
    Unbiased,
}

/// Statistics of one channel: count, mean and M2 = Σ(x − mean)², all in f64.
///
/// Partial statistics from several batches, threads or machines combine with
/// [`ChannelStats::merge`] (Chan et al.'s parallel formula) into those of the whole.
///
/// ```
/// use batchnorm::{ChannelStats, Variance};
/// let a = ChannelStats::from_values(&[1.0, 2.0]);
/// let b = ChannelStats::from_values(&[3.0, 4.0, 5.0]);
/// let all = a.merge(&b);
/// assert_eq!(all.count(), 5);
/// assert!((all.mean() - 3.0).abs() < 1e-12);
/// assert!((all.variance(Variance::Biased)? - 2.0).abs() < 1e-12);
/// # Ok::<(), batchnorm::Error>(())
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ChannelStats {
    count: u64,
    mean: f64,
    m2: f64,
}

impl ChannelStats {
    /// Statistics with the given count, mean and M2 (e.g. received from another machine).
    pub fn new(count: u64, mean: f64, m2: f64) -> ChannelStats {
        ChannelStats { count, mean, m2 }
    }

    /// Statistics of a slice of values, computed in f64 with two passes (a reference-quality
    /// helper for small inputs; tensors go through [`crate::BatchNorm::statistics`]).
    pub fn from_values<T: Copy + Into<f64>>(values: &[T]) -> ChannelStats {
        if values.is_empty() {
            return ChannelStats::default();
        }
        let s = Self::corrected_two_pass(values, 0.0, 1.0);
        if (s.mean.is_finite() && s.m2.is_finite()) || !values.iter().all(|&v| v.into().is_finite())
        {
            return s;
        }
        // Finite f64 values so large (|x| ≳ 1e154) that the squared deviations from the rounded
        // mean, or the sum, leave f64's range. Their variance is then 0 (a constant channel) or
        // beyond f64's range anyway: the same two passes on the deviations from the first value,
        // in units of 2⁶⁰⁰, give exactly 0 for a constant channel and ∞ otherwise.
        const SCALE: f64 = f64::from_bits((1023 - 600) << 52); // 2⁻⁶⁰⁰
        let x0 = values[0].into();
        let t = Self::corrected_two_pass(values, x0 * SCALE, SCALE);
        ChannelStats {
            count: t.count,
            mean: x0 + t.mean / SCALE,
            m2: t.m2 / SCALE / SCALE,
        }
    }

    /// The corrected two-pass (Chan, Golub & LeVeque) over `x·scale − pivot`.
    fn corrected_two_pass<T: Copy + Into<f64>>(
        values: &[T],
        pivot: f64,
        scale: f64,
    ) -> ChannelStats {
        let v = |x: T| x.into() * scale - pivot;
        let n = values.len() as f64;
        let mean = values.iter().map(|&x| v(x)).sum::<f64>() / n;
        let (dev, m2) = values.iter().fold((0.0, 0.0), |(s, q), &x| {
            let d = v(x) - mean;
            (s + d, q + d * d)
        });
        // The correction removes the rounding left in `mean`.
        ChannelStats {
            count: values.len() as u64,
            mean: mean + dev / n,
            m2: m2 - dev * dev / n,
        }
    }

    /// Number of values.
    pub fn count(&self) -> u64 {
        self.count
    }
    /// Mean (0 when the count is 0).
    pub fn mean(&self) -> f64 {
        self.mean
    }
    /// Sum of squared deviations from the mean.
    pub fn m2(&self) -> f64 {
        self.m2
    }

    /// The variance with the chosen estimator.
    ///
    /// # Errors
    /// [`Error::TooFewValues`] if the count is 0 (biased) or below 2 (unbiased).
    pub fn variance(&self, estimator: Variance) -> Result<f64, Error> {
        let min = match estimator {
            Variance::Biased => 1,
            Variance::Unbiased => 2,
        };
        if self.count < min {
            return Err(Error::TooFewValues {
                per_channel: self.count,
            });
        }
        let n = self.count as f64;
        Ok(match estimator {
            Variance::Biased => self.m2 / n,
            Variance::Unbiased => self.m2 / (n - 1.0),
        })
    }

    /// The statistics of the union of both sets of values (Chan's parallel formula, in f64).
    #[inline]
    #[must_use]
    pub fn merge(&self, other: &ChannelStats) -> ChannelStats {
        if other.count == 0 {
            return *self;
        }
        if self.count == 0 {
            return *other;
        }
        self.merge_weighted(other, ChannelStats::merge_weights(self.count, other.count))
    }

    /// [`ChannelStats::merge`] of `other` holding `nb` values into `self` holding `na`, with the
    /// weights `nb/n` and `na·nb/n` (n = na + nb) precomputed by the caller
    /// ([`ChannelStats::merge_weights`]): merging many channels with the same counts divides once,
    /// not once per channel.
    #[inline]
    pub(crate) fn merge_weighted(
        &self,
        other: &ChannelStats,
        (wb, wab): (f64, f64),
    ) -> ChannelStats {
        let delta = other.mean - self.mean;
        ChannelStats {
            count: self.count + other.count,
            mean: self.mean + delta * wb,
            // `δ·w·δ`, not `δ²·w`: merging into an empty total (w = 0, as the drivers' first
            // block does) must add 0, also when δ² overflows (f64 data near 1e300).
            m2: self.m2 + other.m2 + delta * wab * delta,
        }
    }

    /// The weights of [`ChannelStats::merge_weighted`] for counts `na` and `nb`.
    #[inline]
    pub(crate) fn merge_weights(na: u64, nb: u64) -> (f64, f64) {
        let (na, nb) = (na as f64, nb as f64);
        let n = na + nb;
        (nb / n, na * nb / n)
    }
}

/// Per-channel statistics of a tensor: one [`ChannelStats`] per channel.
///
/// ```
/// use batchnorm::{BatchNorm, Layout, Shape, Variance};
/// let bn = BatchNorm::new(Shape::new(4, 2, 3)?, Layout::Nchw)?;
/// let x: Vec<f32> = (0..24).map(|i| i as f32).collect();
/// // Statistics of two half-batches, merged, equal those of the whole batch.
/// let half = BatchNorm::new(Shape::new(2, 2, 3)?, Layout::Nchw)?;
/// let mut merged = half.statistics(&x[..12])?;
/// merged.merge(&half.statistics(&x[12..])?)?;
/// let whole = bn.statistics(&x)?;
/// for (a, b) in merged.channels().iter().zip(whole.channels()) {
///     assert_eq!(a.count(), b.count());
///     assert!((a.mean() - b.mean()).abs() < 1e-9);
///     assert!((a.variance(Variance::Unbiased)? - b.variance(Variance::Unbiased)?).abs() < 1e-6);
/// }
/// # Ok::<(), batchnorm::Error>(())
/// ```
#[derive(Clone, Debug, Default, PartialEq)]
pub struct BatchStats {
    channels: Vec<ChannelStats>,
}

impl BatchStats {
    /// Statistics from per-channel values.
    pub fn from_channels(channels: Vec<ChannelStats>) -> BatchStats {
        BatchStats { channels }
    }
    /// The per-channel statistics.
    pub fn channels(&self) -> &[ChannelStats] {
        &self.channels
    }
    /// Number of channels.
    pub fn num_channels(&self) -> usize {
        self.channels.len()
    }
    /// Per-channel means.
    pub fn means(&self) -> Vec<f64> {
        self.channels.iter().map(ChannelStats::mean).collect()
    }
    /// Per-channel variances with the chosen estimator.
    ///
    /// # Errors
    /// [`Error::TooFewValues`] if a channel has too few values for the estimator.
    pub fn variances(&self, estimator: Variance) -> Result<Vec<f64>, Error> {
        self.channels
            .iter()
            .map(|s| s.variance(estimator))
            .collect()
    }
    /// Merges `other` into `self`, channel by channel.
    ///
    /// # Errors
    /// [`Error::ChannelMismatch`] if the channel counts differ.
    pub fn merge(&mut self, other: &BatchStats) -> Result<(), Error> {
        if self.channels.len() != other.channels.len() {
            return Err(Error::ChannelMismatch {
                expected: self.channels.len(),
                actual: other.channels.len(),
            });
        }
        for (a, b) in self.channels.iter_mut().zip(&other.channels) {
            *a = a.merge(b);
        }
        Ok(())
    }
}

// SAFETY: plain f32/f64/u64 fields: all-zero is a valid value, no drop glue, alignment ≤ 8.
unsafe impl crate::scratch::Zeroable for ChannelStats {}
