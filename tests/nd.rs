//! The `ndarray` feature: views in standard and channels-last order pass without copying and give
//! the same results as the flat API; other strides are an error naming the axis and stride.
#![cfg(feature = "ndarray")]

use batchnorm::{BatchNorm, Error, Layout, RunningStats, Shape, nd};
use ndarray::{Array, ArrayD, IxDyn, ShapeBuilder};

#[test]
fn standard_and_channels_last_views_are_read_in_place() {
    for dims in [
        vec![3, 5],
        vec![2, 3, 7],
        vec![2, 3, 4, 5],
        vec![2, 3, 2, 3, 4],
    ] {
        let len: usize = dims.iter().product();
        let values: Vec<f32> = (0..len).map(|i| (i % 17) as f32 - 8.0).collect();
        // Standard order.
        let a = ArrayD::from_shape_vec(IxDyn(&dims), values.clone()).unwrap();
        let (s, shape, layout) = nd::flat(&a.view()).unwrap();
        assert_eq!(layout, Layout::Nchw, "{dims:?}");
        assert_eq!(s.as_ptr(), a.as_ptr(), "no copy");
        assert_eq!(
            shape,
            Shape::with_spatial(dims[0], dims[1], &dims[2..]).unwrap()
        );
        // Channels-last: the same logical array with C innermost in memory.
        let mut perm: Vec<usize> = vec![0];
        perm.extend(2..dims.len());
        perm.push(1);
        let mem_dims: Vec<usize> = perm.iter().map(|&a| dims[a]).collect();
        let mem = ArrayD::from_shape_vec(IxDyn(&mem_dims), values.clone()).unwrap();
        let mut inverse = vec![0; perm.len()];
        for (i, &p) in perm.iter().enumerate() {
            inverse[p] = i;
        }
        let logical = mem.view().permuted_axes(IxDyn(&inverse));
        assert_eq!(logical.shape(), &dims[..]);
        let (s, shape2, layout2) = nd::flat(&logical).unwrap();
        let want = if dims.len() == 2 {
            Layout::Nchw
        } else {
            Layout::Nhwc
        };
        assert_eq!((layout2, shape2), (want, shape), "{dims:?}");
        assert_eq!(s, &values[..], "memory order, no copy");

        // The same inference through the views and through the flat slices.
        let c = dims[1];
        let (mean, var) = (vec![0.5f32; c], vec![2.0f32; c]);
        let running = RunningStats {
            mean: &mean,
            var: &var,
        };
        let mut out = Array::<f32, _>::zeros(IxDyn(&mem_dims));
        let (ys, _, _) = nd::flat_mut(out.view_mut()).unwrap();
        BatchNorm::new(shape2, layout2)
            .unwrap()
            .inference(s, ys, None, running)
            .unwrap();
        let mut flat = vec![0.0f32; len];
        BatchNorm::new(shape, want)
            .unwrap()
            .inference(&values, &mut flat, None, running)
            .unwrap();
        assert_eq!(out.as_slice().unwrap(), &flat[..]);
    }
}

#[test]
fn other_strides_and_ranks_are_errors() {
    // Every other element of the last axis.
    let a = Array::<f32, _>::zeros((2, 3, 4, 10));
    let v = a.slice(ndarray::s![.., .., .., ..;2]);
    assert_eq!(
        nd::flat(&v).unwrap_err(),
        Error::UnsupportedStrides { axis: 3, stride: 2 }
    );
    // H and W swapped (neither order).
    let b = Array::<f32, _>::zeros((2, 3, 4, 5));
    let t = b.view().permuted_axes([0, 1, 3, 2]);
    assert!(matches!(
        nd::flat(&t).unwrap_err(),
        Error::UnsupportedStrides { axis: 3 | 2, .. }
    ));
    // Fortran order of a 2-D array: C is the slowest axis.
    let f = Array::<f32, _>::zeros((4, 3).f());
    assert_eq!(
        nd::flat(&f.view()).unwrap_err(),
        Error::UnsupportedStrides { axis: 1, stride: 4 }
    );
    let one = Array::<f32, _>::zeros(5);
    assert_eq!(
        nd::flat(&one.view()).unwrap_err(),
        Error::UnsupportedRank { rank: 1 }
    );
    let six = ArrayD::<f32>::zeros(IxDyn(&[1, 2, 1, 1, 1, 1]));
    assert_eq!(
        nd::flat(&six.view()).unwrap_err(),
        Error::UnsupportedRank { rank: 6 }
    );
    let empty = Array::<f32, _>::zeros((0, 3, 2));
    assert_eq!(
        nd::flat(&empty.view()).unwrap_err(),
        Error::ZeroDimension { dim: "N" }
    );
    let msg = Error::UnsupportedStrides { axis: 3, stride: 2 }.to_string();
    assert!(msg.contains("axis 3") && msg.contains("stride 2"), "{msg}");
}
