//! Tensor shape and memory layout.

use crate::Error;

/// Memory order of a 4-D (or N-D) activation tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Layout {
    /// Channels-first: `x[((n·C + c)·HW + s)]`. Each channel is one contiguous run per sample.
    Nchw,
    /// Channels-last: `x[((n·HW + s)·C + c)]`. Each pixel is a contiguous row of C values.
    Nhwc,
}

/// The logical shape of a batch-norm input: batch `n`, channels `c`, and the spatial extent
/// `hw` (the product of all spatial dimensions; 1 for a 2-D `(N, C)` input).
///
/// A `Shape` is always valid: every dimension is at least 1 and `n·c·hw` elements of `f32`
/// fit in memory.
///
/// ```
/// use batchnorm::Shape;
/// let s = Shape::new(8, 64, 56 * 56)?;
/// assert_eq!(s.len(), 8 * 64 * 3136);
/// let s2 = Shape::with_spatial(8, 64, &[56, 56])?;
/// assert_eq!(s, s2);
/// # Ok::<(), batchnorm::Error>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Shape {
    n: usize,
    c: usize,
    hw: usize,
}

impl Shape {
    /// A shape with batch `n`, `c` channels and spatial extent `hw`.
    ///
    /// # Errors
    /// [`Error::ZeroDimension`] if any is zero; [`Error::ShapeOverflow`] if the tensor's size in
    /// bytes overflows `isize`.
    pub fn new(n: usize, c: usize, hw: usize) -> Result<Shape, Error> {
        for (dim, v) in [("N", n), ("C", c), ("HW", hw)] {
            if v == 0 {
                return Err(Error::ZeroDimension { dim });
            }
        }
        let fits = n
            .checked_mul(c)
            .and_then(|nc| nc.checked_mul(hw))
            .and_then(|len| len.checked_mul(size_of::<f32>()))
            .is_some_and(|bytes| bytes <= isize::MAX as usize);
        if !fits {
            return Err(Error::ShapeOverflow { n, c, hw });
        }
        Ok(Shape { n, c, hw })
    }

    /// A shape from any number of spatial dimensions (none for a 2-D `(N, C)` input).
    ///
    /// # Errors
    /// As [`Shape::new`]; a zero spatial dimension is [`Error::ZeroDimension`].
    pub fn with_spatial(n: usize, c: usize, spatial: &[usize]) -> Result<Shape, Error> {
        const NAMES: [&str; 8] = [
            "spatial[0]",
            "spatial[1]",
            "spatial[2]",
            "spatial[3]",
            "spatial[4]",
            "spatial[5]",
            "spatial[6]",
            "spatial[7]",
        ];
        let mut hw: usize = 1;
        for (i, &d) in spatial.iter().enumerate() {
            if d == 0 {
                let dim = NAMES.get(i).copied().unwrap_or("spatial");
                return Err(Error::ZeroDimension { dim });
            }
            hw = hw
                .checked_mul(d)
                .ok_or(Error::ShapeOverflow { n, c, hw: d })?;
        }
        Shape::new(n, c, hw)
    }

    /// Batch size N.
    pub fn n(&self) -> usize {
        self.n
    }
    /// Channels C.
    pub fn c(&self) -> usize {
        self.c
    }
    /// Spatial extent HW (product of the spatial dimensions).
    pub fn hw(&self) -> usize {
        self.hw
    }
    /// Values per channel, N·HW: the reduction length of the statistics.
    pub fn per_channel(&self) -> usize {
        self.n * self.hw
    }
    /// Number of elements, N·C·HW.
    pub fn len(&self) -> usize {
        self.n * self.c * self.hw
    }
    /// Always false: a `Shape` has no zero dimension. Present for API symmetry with `len`.
    pub fn is_empty(&self) -> bool {
        false
    }
    /// Flat index of element `(n, c, s)` in `layout`.
    pub fn index(&self, layout: Layout, n: usize, c: usize, s: usize) -> usize {
        match layout {
            Layout::Nchw => (n * self.c + c) * self.hw + s,
            Layout::Nhwc => (n * self.hw + s) * self.c + c,
        }
    }
}
