//! Every operation runs on a thread with a 1 MiB stack, on every backend this CPU has, for every
//! storage type, layout and kernel path (narrow NHWC rows, register-group columns, strips, long
//! and short NCHW runs), in an unoptimized build too.
//!
//! The check is for the dev profile: an unoptimized build keeps the locals of every function
//! inlined into a kernel's entry point in that entry point's frame, and the kernels inline a lot.
//! Before the variants were split into entry points of their own (`Simd::enter`), an NHWC
//! normalize needed 1.6 to 1.8 MB here (AMD EPYC family 25 model 1, AVX2) and more on AVX-512,
//! over the 2 MiB of a spawned thread once the caller's own frames are added; since each walk
//! is entered on its own, 256 KiB is enough there (192 KiB is not), and the largest entry point
//! frame on AVX-512 is 0.37 MB (read off the dev build's assembly). CI runs this file in the dev profile; the optimized test profile
//! passes it with room to spare.

use batchnorm::{
    Affine, Backend, BackwardEpilogue, BackwardMode, BatchNorm, Element, Epilogue, GradMode,
    Layout, Parallelism, ParamGrads, RunningStats, RunningUpdate, SavedStats, SavedStatsMut, Shape,
    bf16, f16,
};

/// The stack every operation must fit in.
const STACK: usize = 1 << 20;

/// Test data in each storage type.
trait Data: Element {
    fn of(v: f64) -> Self;
    fn param(v: f64) -> Self::Param;
}

macro_rules! data {
    ($t:ty, $p:ty, $of:expr) => {
        impl Data for $t {
            fn of(v: f64) -> Self {
                $of(v)
            }
            fn param(v: f64) -> $p {
                v as $p
            }
        }
    };
}
data!(f32, f32, |v| v as f32);
data!(f64, f64, |v| v);
data!(f16, f32, f16::from_f64);
data!(bf16, f32, bf16::from_f64);

/// Every operation once on `bn`, with finite, non-trivial data; the outputs must be finite.
fn every_op<E: Data>(bn: &BatchNorm) {
    let (len, c) = (bn.shape().len(), bn.shape().c());
    let tensor = |k: usize| -> Vec<E> {
        (0..len)
            .map(|i| E::of(((i * 7 + k * 3) % 23) as f64 / 8.0 - 1.0))
            .collect()
    };
    let (x, z, dy) = (tensor(0), tensor(1), tensor(2));
    let gamma: Vec<E::Param> = (0..c).map(|j| E::param(1.0 + j as f64 / 64.0)).collect();
    let beta: Vec<E::Param> = (0..c).map(|j| E::param(j as f64 / 32.0)).collect();
    let affine = Some(Affine {
        gamma: &gamma,
        beta: &beta,
    });
    let (mean, var) = (vec![E::param(0.25); c], vec![E::param(2.0); c]);
    let running = RunningStats {
        mean: &mean,
        var: &var,
    };
    let mut y = vec![E::default(); len];
    let finite = |v: &[E], what: &str| {
        assert!(
            v.iter().all(|&e| Into::<f64>::into(e).is_finite()),
            "{what}: not finite, {bn:?}"
        );
    };
    for epilogue in [Epilogue::None, Epilogue::Relu, Epilogue::AddRelu(&z)] {
        bn.inference_fused(&x, &mut y, affine, running, epilogue)
            .unwrap();
        finite(&y, "inference");
    }
    let (mut rmean, mut rvar) = (mean.clone(), var.clone());
    let (mut smean, mut sinv) = (vec![E::param(0.0); c], vec![E::param(0.0); c]);
    for epilogue in [Epilogue::None, Epilogue::AddRelu(&z)] {
        let saved = SavedStatsMut {
            mean: &mut smean,
            inv_std: &mut sinv,
        };
        let update = RunningUpdate::pytorch(&mut rmean, &mut rvar);
        bn.training_fused(&x, &mut y, affine, Some(saved), Some(update), epilogue)
            .unwrap();
        finite(&y, "training");
    }
    let stats = bn.statistics(&x).unwrap();
    assert_eq!(stats.channels().len(), c);
    let (mut dgamma, mut dbeta) = (vec![E::param(0.0); c], vec![E::param(0.0); c]);
    let mut dx = vec![E::default(); len];
    let saved = SavedStats {
        mean: &smean,
        inv_std: &sinv,
    };
    for mode in [BackwardMode::Training(saved), BackwardMode::Frozen(running)] {
        let grads = ParamGrads {
            dgamma: &mut dgamma,
            dbeta: &mut dbeta,
            mode: GradMode::Overwrite,
        };
        bn.backward(&x, &dy, &mut dx, affine, mode, Some(grads))
            .unwrap();
        finite(&dx, "backward");
    }
    let mut dz = vec![E::default(); len];
    let epilogue = BackwardEpilogue::AddRelu { y: &y, dz: &mut dz };
    let mode = BackwardMode::Training(saved);
    bn.backward_fused(&x, &dy, &mut dx, affine, mode, None, epilogue)
        .unwrap();
    finite(&dx, "backward_fused");
}

/// Shapes that reach each kernel path: NHWC rows of one register group or less (3, 8, 16
/// channels), of register-group columns (64, 200), NCHW runs longer than a block (HW = 17 000)
/// and short runs (HW = 9, and the 2-D HW = 1).
fn shapes() -> Vec<(Shape, Layout)> {
    let mut v = Vec::new();
    for c in [3, 8, 16, 64, 200] {
        for layout in [Layout::Nchw, Layout::Nhwc] {
            v.push((Shape::new(2, c, 9).unwrap(), layout));
        }
    }
    v.push((Shape::new(1, 2, 17_000).unwrap(), Layout::Nchw));
    v.push((Shape::new(1, 2, 17_000).unwrap(), Layout::Nhwc));
    v.push((Shape::new(5, 40, 1).unwrap(), Layout::Nchw));
    v
}

fn on_small_stack<E: Data>() {
    let run = || {
        for (shape, layout) in shapes() {
            for backend in Backend::available() {
                let bn = BatchNorm::on_backend(shape, layout, backend)
                    .unwrap()
                    .with_parallelism(Parallelism::Sequential);
                every_op::<E>(&bn);
            }
        }
    };
    std::thread::Builder::new()
        .name(format!("{} on a {} KiB stack", E::NAME, STACK >> 10))
        .stack_size(STACK)
        .spawn(run)
        .unwrap()
        .join()
        .unwrap();
}

#[test]
fn f32_fits_a_small_stack() {
    on_small_stack::<f32>();
}

#[test]
fn f64_fits_a_small_stack() {
    on_small_stack::<f64>();
}

#[test]
fn f16_fits_a_small_stack() {
    on_small_stack::<f16>();
}

#[test]
fn bf16_fits_a_small_stack() {
    on_small_stack::<bf16>();
}
