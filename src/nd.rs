//! `ndarray` views as the operations' flat slices (cargo feature `ndarray`), without copying.
//!
//! An array of 2 to 5 dimensions is read as `(N, C, spatial…)`. Its memory may be in standard
//! (row-major) order, which is [`Layout::Nchw`], or channels-last (`N, spatial…, C` in memory,
//! what `torch.channels_last` and NHWC engines use), which is [`Layout::Nhwc`]; a 2-D `(N, C)`
//! array is both. Any other strides are an error naming the first axis whose stride does not fit.
//!
//! ```
//! use batchnorm::{nd, BatchNorm, RunningStats};
//! use ndarray::Array4;
//! let x = Array4::<f32>::from_elem((2, 3, 4, 4), 1.0); // N, C, H, W in standard order
//! let mut y = Array4::<f32>::zeros((2, 3, 4, 4));
//! let (xs, shape, layout) = nd::flat(&x.view())?;
//! let (ys, _, _) = nd::flat_mut(y.view_mut())?;
//! let (mean, var) = ([1.0f32; 3], [1.0f32; 3]);
//! let running = RunningStats { mean: &mean, var: &var };
//! BatchNorm::new(shape, layout)?.inference(xs, ys, None, running)?;
//! assert!(y.iter().all(|&v| v == 0.0));
//! # Ok::<(), batchnorm::Error>(())
//! ```

use ndarray::{ArrayView, ArrayViewMut, Dimension};

use crate::{Error, Layout, Shape};

/// The shape and layout of an array's memory: `(N, C, spatial…)` dimensions and strides in
/// elements.
///
/// # Errors
/// [`Error::UnsupportedRank`] outside 2 to 5 dimensions; [`Error::UnsupportedStrides`] naming
/// the first axis whose stride fits neither standard nor channels-last order (negative strides
/// included); the errors of [`Shape::with_spatial`] (a zero dimension, an overflow).
pub fn layout_of(dims: &[usize], strides: &[isize]) -> Result<(Shape, Layout), Error> {
    let rank = dims.len();
    if !(2..=5).contains(&rank) || strides.len() != rank {
        return Err(Error::UnsupportedRank { rank });
    }
    let shape = Shape::with_spatial(dims[0], dims[1], &dims[2..])?;
    // Memory order of the axes, innermost last.
    let standard: Vec<usize> = (0..rank).collect();
    let channels_last: Vec<usize> = [0].into_iter().chain(2..rank).chain([1]).collect();
    let first_misfit = |order: &[usize]| -> Option<usize> {
        let mut expected: isize = 1;
        for &axis in order.iter().rev() {
            // An axis of length 1 is never stepped along: any stride fits.
            if dims[axis] != 1 && strides[axis] != expected {
                return Some(axis);
            }
            expected = expected.saturating_mul(dims[axis] as isize);
        }
        None
    };
    match (first_misfit(&standard), first_misfit(&channels_last)) {
        (None, _) => Ok((shape, Layout::Nchw)),
        (_, None) => Ok((shape, Layout::Nhwc)),
        // Name the misfit of the order the channel axis points to.
        (Some(a), Some(b)) => {
            let axis = if strides[1] == 1 { b } else { a };
            Err(Error::UnsupportedStrides {
                axis,
                stride: strides[axis],
            })
        }
    }
}

/// The elements of `a` as a flat slice in memory order, with the shape and layout to pass to
/// [`crate::BatchNorm`].
///
/// # Errors
/// As [`layout_of`].
pub fn flat<'a, D: Dimension>(
    a: &ArrayView<'a, f32, D>,
) -> Result<(&'a [f32], Shape, Layout), Error> {
    let (shape, layout) = layout_of(a.shape(), a.strides())?;
    // `layout_of` accepted the strides, so the view is contiguous in memory order and ndarray
    // returns the slice; should the two checks ever disagree, the error names the outer axis
    // rather than panicking.
    let slice = a.to_slice_memory_order().ok_or(Error::UnsupportedStrides {
        axis: 0,
        stride: a.strides()[0],
    })?;
    Ok((slice, shape, layout))
}

/// [`flat`] for an output view.
///
/// # Errors
/// As [`layout_of`].
pub fn flat_mut<'a, D: Dimension>(
    a: ArrayViewMut<'a, f32, D>,
) -> Result<(&'a mut [f32], Shape, Layout), Error> {
    let (shape, layout) = layout_of(a.shape(), a.strides())?;
    let stride = a.strides()[0];
    let slice = a
        .into_slice_memory_order()
        .ok_or(Error::UnsupportedStrides { axis: 0, stride })?;
    Ok((slice, shape, layout))
}
