//! Folding inference batch norm into the convolution or linear layer before it: a plain
//! convolution written here (f64 accumulation), conv-then-BN against the folded convolution, for
//! every weight layout, groups (ordinary, grouped, depthwise), strides and padding; the exposed
//! scale and shift; and the errors.

mod common;

use batchnorm::fold::{self, ConvWeights, WeightLayout};
use batchnorm::{Affine, Error, RunningStats};
use common::*;

/// A 2-D convolution's geometry.
#[derive(Clone, Copy, Debug)]
struct Conv {
    n: usize,
    in_c: usize,
    out_c: usize,
    groups: usize,
    h: usize,
    w: usize,
    k: usize,
    stride: usize,
    pad: usize,
}

impl Conv {
    fn in_per_group(&self) -> usize {
        self.in_c / self.groups
    }
    fn out_hw(&self) -> (usize, usize) {
        let o = |x: usize| (x + 2 * self.pad - self.k) / self.stride + 1;
        (o(self.h), o(self.w))
    }
    /// Offset of weight (o, i, kh, kw) in `layout` (i counts inside the group).
    fn widx(&self, layout: WeightLayout, o: usize, i: usize, kh: usize, kw: usize) -> usize {
        let (ig, k) = (self.in_per_group(), self.k);
        match layout {
            WeightLayout::Oihw => ((o * ig + i) * k + kh) * k + kw,
            WeightLayout::Ohwi => ((o * k + kh) * k + kw) * ig + i,
            WeightLayout::Hwio => ((kh * k + kw) * ig + i) * self.out_c + o,
        }
    }
    /// The convolution of NCHW `x`, in f64: NCHW output.
    fn run(&self, layout: WeightLayout, x: &[f32], wt: &[f32], bias: Option<&[f32]>) -> Vec<f64> {
        let (oh, ow) = self.out_hw();
        let (ig, og) = (self.in_per_group(), self.out_c / self.groups);
        let mut out = vec![0.0; self.n * self.out_c * oh * ow];
        for n in 0..self.n {
            for o in 0..self.out_c {
                let g = o / og;
                for (y, x_out) in (0..oh).flat_map(|y| (0..ow).map(move |x| (y, x))) {
                    let mut acc = bias.map_or(0.0, |b| b[o] as f64);
                    for i in 0..ig {
                        let ci = g * ig + i;
                        for kh in 0..self.k {
                            for kw in 0..self.k {
                                let yy = (y * self.stride + kh) as isize - self.pad as isize;
                                let xx = (x_out * self.stride + kw) as isize - self.pad as isize;
                                if yy < 0
                                    || xx < 0
                                    || yy >= self.h as isize
                                    || xx >= self.w as isize
                                {
                                    continue;
                                }
                                let xi = ((n * self.in_c + ci) * self.h + yy as usize) * self.w
                                    + xx as usize;
                                acc += wt[self.widx(layout, o, i, kh, kw)] as f64 * x[xi] as f64;
                            }
                        }
                    }
                    out[((n * self.out_c + o) * oh + y) * ow + x_out] = acc;
                }
            }
        }
        out
    }
}

const LAYOUTS: [WeightLayout; 3] = [WeightLayout::Oihw, WeightLayout::Ohwi, WeightLayout::Hwio];

#[test]
fn folded_convolution_equals_convolution_then_batch_norm() {
    let mut rng = Rng::new(51);
    let eps = 1e-5;
    let convs = [
        // Ordinary, stride 1, no padding; stride 2 with padding; grouped; depthwise; odd sizes.
        (1, 3, 8, 1, 9, 7, 3, 1, 0),
        (2, 4, 6, 1, 8, 8, 3, 2, 1),
        (1, 6, 9, 3, 7, 5, 3, 1, 1),
        (2, 5, 5, 5, 6, 6, 3, 2, 1),
        (1, 4, 8, 4, 5, 5, 1, 1, 0),
    ];
    for (n, in_c, out_c, groups, h, w, k, stride, pad) in convs {
        let conv = Conv {
            n,
            in_c,
            out_c,
            groups,
            h,
            w,
            k,
            stride,
            pad,
        };
        let x = rng.normals(n * in_c * h * w, 0.5, 1.0);
        let weights = rng.normals(out_c * conv.in_per_group() * k * k, 0.0, 0.5);
        let (gamma, beta) = (rng.normals(out_c, 1.0, 0.5), rng.normals(out_c, 0.0, 1.0));
        let mean = rng.normals(out_c, 0.3, 1.0);
        let var: Vec<f32> = rng
            .normals(out_c, 0.0, 1.0)
            .iter()
            .map(|v| v * v + 0.1)
            .collect();
        let running = RunningStats {
            mean: &mean,
            var: &var,
        };
        let affine = Some(Affine {
            gamma: &gamma,
            beta: &beta,
        });
        for layout in LAYOUTS {
            // The same filters in this layout.
            let mut wt = vec![0.0f32; weights.len()];
            for o in 0..out_c {
                for i in 0..conv.in_per_group() {
                    for kh in 0..k {
                        for kw in 0..k {
                            let src = conv.widx(WeightLayout::Oihw, o, i, kh, kw);
                            wt[conv.widx(layout, o, i, kh, kw)] = weights[src];
                        }
                    }
                }
            }
            for with_bias in [false, true] {
                let bias = rng.normals(out_c, 0.0, 1.0);
                let bias = with_bias.then_some(&bias[..]);
                // Reference: the convolution, then batch norm, in f64.
                let y = conv.run(layout, &x, &wt, bias);
                let (oh, ow) = conv.out_hw();
                let per = oh * ow;
                let bn = |i: usize, v: f64| {
                    let o = (i / per) % out_c;
                    let r = 1.0 / (var[o] as f64 + eps).sqrt();
                    gamma[o] as f64 * (v - mean[o] as f64) * r + beta[o] as f64
                };
                // Folded, then the plain convolution (f64 accumulation of f32 weights).
                let mut folded = wt.clone();
                let mut bias_out = vec![f32::NAN; out_c];
                let cw = ConvWeights {
                    layout,
                    out_channels: out_c,
                    in_per_group: conv.in_per_group(),
                    kernel: k * k,
                };
                fold::fold_conv(cw, (&mut folded, bias, &mut bias_out), affine, running, eps)
                    .unwrap();
                let got = conv.run(layout, &x, &folded, Some(&bias_out));
                // Error scale: each folded weight and the folded bias are rounded to f32 once
                // (relative u); the sums are f64. So |got − want| ≤ u·(Σ|scale·w·x| + |b'|),
                // bounded here by u·(|scale|·Σ|w·x| + |scale·(b − mean)| + |β|), with 2u allowed.
                let abs_conv = {
                    let wt_abs: Vec<f32> = wt.iter().map(|v| v.abs()).collect();
                    let x_abs: Vec<f32> = x.iter().map(|v| v.abs()).collect();
                    conv.run(layout, &x_abs, &wt_abs, None)
                };
                for i in 0..y.len() {
                    let o = (i / per) % out_c;
                    let s = (gamma[o] as f64 / (var[o] as f64 + eps).sqrt()).abs();
                    let b = bias.map_or(0.0, |b| b[o] as f64);
                    let scale =
                        s * abs_conv[i] + s * (b - mean[o] as f64).abs() + beta[o].abs() as f64;
                    let want = bn(i, y[i]);
                    assert!(
                        (got[i] - want).abs() <= 2.0 * EPS32 * scale + 1e-30,
                        "{conv:?} {layout:?} bias {with_bias}: element {i}: {} vs {want}",
                        got[i]
                    );
                }
            }
        }
    }
}

#[test]
fn folded_linear_layer_and_scale_shift() {
    let mut rng = Rng::new(52);
    let (inputs, outputs, eps) = (7, 5, 1e-3);
    let x = rng.normals(inputs, 0.0, 1.0);
    let w = rng.normals(outputs * inputs, 0.0, 1.0);
    let b = rng.normals(outputs, 0.0, 1.0);
    let (gamma, beta) = (
        rng.normals(outputs, 1.0, 0.3),
        rng.normals(outputs, 0.0, 1.0),
    );
    let (mean, var) = (rng.normals(outputs, 0.0, 1.0), vec![0.7f32; outputs]);
    let running = RunningStats {
        mean: &mean,
        var: &var,
    };
    let affine = Some(Affine {
        gamma: &gamma,
        beta: &beta,
    });
    let mut folded = w.clone();
    let mut bias_out = vec![0.0f32; outputs];
    fold::fold_linear(
        inputs,
        (&mut folded, Some(&b), &mut bias_out),
        affine,
        running,
        eps,
    )
    .unwrap();
    let (mut scale, mut shift) = (vec![0.0f32; outputs], vec![0.0f32; outputs]);
    fold::scale_shift(affine, running, eps, (&mut scale, &mut shift)).unwrap();
    for o in 0..outputs {
        let dot = |w: &[f32]| -> (f64, f64) {
            let row = &w[o * inputs..(o + 1) * inputs];
            let d = row.iter().zip(&x).map(|(&a, &v)| a as f64 * v as f64).sum();
            let a = row
                .iter()
                .zip(&x)
                .map(|(&a, &v)| (a as f64 * v as f64).abs())
                .sum();
            (d, a)
        };
        let (lin, abs) = dot(&w);
        let r = 1.0 / (var[o] as f64 + eps).sqrt();
        let s = gamma[o] as f64 * r;
        let want = s * (lin + b[o] as f64 - mean[o] as f64) + beta[o] as f64;
        let got = dot(&folded).0 + bias_out[o] as f64;
        let bound =
            2.0 * EPS32 * (s.abs() * (abs + (b[o] - mean[o]).abs() as f64) + beta[o].abs() as f64);
        assert!((got - want).abs() <= bound, "row {o}: {got} vs {want}");
        // scale and shift, each rounded to f32 once.
        let shift_want = beta[o] as f64 - mean[o] as f64 * s;
        assert!(((scale[o] as f64) - s).abs() <= EPS32 * s.abs());
        assert!(((shift[o] as f64) - shift_want).abs() <= EPS32 * shift_want.abs());
    }
}

#[test]
fn folding_errors_name_the_argument_and_write_nothing() {
    let (mean, var, ones) = (vec![0.0f32; 4], vec![1.0f32; 4], vec![1.0f32; 4]);
    let running = RunningStats {
        mean: &mean,
        var: &var,
    };
    let cw = ConvWeights {
        layout: WeightLayout::Hwio,
        out_channels: 4,
        in_per_group: 2,
        kernel: 9,
    };
    let mut w = vec![2.0f32; 72];
    let mut b = vec![5.0f32; 4];
    let mut short = vec![2.0f32; 71];
    let mismatch = |arg, expected, actual| Error::LengthMismatch {
        op: "fold_conv",
        arg,
        expected,
        actual,
    };
    assert_eq!(
        fold::fold_conv(cw, (&mut short, None, &mut b), None, running, 1e-5),
        Err(mismatch("weights", 72, 71))
    );
    assert_eq!(
        fold::fold_conv(cw, (&mut w, Some(&ones[..3]), &mut b), None, running, 1e-5),
        Err(mismatch("bias", 4, 3))
    );
    let bad_gamma = Some(Affine {
        gamma: &ones[..2],
        beta: &ones,
    });
    assert_eq!(
        fold::fold_conv(cw, (&mut w, None, &mut b), bad_gamma, running, 1e-5),
        Err(mismatch("gamma", 4, 2))
    );
    assert!(matches!(
        fold::fold_conv(cw, (&mut w, None, &mut b), None, running, f64::NAN),
        Err(Error::InvalidEpsilon { .. })
    ));
    let zero = ConvWeights { kernel: 0, ..cw };
    assert_eq!(
        fold::fold_conv(zero, (&mut w, None, &mut b), None, running, 1e-5),
        Err(Error::ZeroDimension { dim: "kernel" })
    );
    assert!(
        w.iter().all(|&v| v == 2.0) && b.iter().all(|&v| v == 5.0),
        "nothing written"
    );
    assert_eq!(
        fold::fold_linear(18, (&mut w, None, &mut b[..3]), None, running, 1e-5),
        Err(Error::LengthMismatch {
            op: "fold_linear",
            arg: "weights",
            expected: 54,
            actual: 72
        })
    );
    let (mut s, mut t) = (vec![0.0f32; 4], vec![0.0f32; 3]);
    assert_eq!(
        fold::scale_shift(None, running, 1e-5, (&mut s, &mut t)),
        Err(Error::LengthMismatch {
            op: "scale_shift",
            arg: "shift",
            expected: 4,
            actual: 3
        })
    );
}
