//! The C ABI from C: `tests/c/test_batchnorm.c` compiled with the system `cc`
//! (`-std=c99 -Wall -Wextra -Werror`), linked once against the static and once against the
//! shared library, and run on values the Rust API computes here on the same data; the header
//! also compiles as C++; and the checked-in header is what cbindgen generates now.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use batchnorm::{
    Affine, BackwardEpilogue, BackwardMode, BatchNorm, Epilogue, GradMode, Layout, Parallelism,
    ParamGrads, RunningStats, RunningUpdate, SavedStats, SavedStatsMut, Shape,
};

const SHAPES: [(usize, usize, usize); 3] = [(3, 5, 7), (2, 17, 1), (1, 3, 33)];

/// The C program's data: `((37·i + 11·seed) mod 101)/16 − 3`, exact in f32.
fn fill(n: usize, seed: usize) -> Vec<f32> {
    (0..n)
        .map(|i| (((37 * i + 11 * seed) % 101) as f64 / 16.0 - 3.0) as f32)
        .collect()
}

fn section(out: &mut String, name: &str, v: &[f32]) {
    let _ = writeln!(out, "{name}");
    for x in v {
        // `{:e}` of an f32 is its shortest round-trip form; C's strtof reads it back exactly.
        let _ = writeln!(out, "{x:e}");
    }
}

/// What the C program must get, from the Rust API on the same data.
fn expected_values() -> String {
    let mut out = String::new();
    for (n, c, hw) in SHAPES {
        for layout in [Layout::Nchw, Layout::Nhwc] {
            let shape = Shape::new(n, c, hw).unwrap();
            let bn = BatchNorm::new(shape, layout)
                .unwrap()
                .with_parallelism(Parallelism::Sequential);
            let len = shape.len();
            let (x, z, dy) = (fill(len, 1), fill(len, 2), fill(len, 3));
            let (gamma, beta) = (fill(c, 4), fill(c, 5));
            let rmean: Vec<f32> = (0..c).map(|i| 0.25 * i as f32).collect();
            let rvar: Vec<f32> = (0..c).map(|i| 1.0 + 0.5 * i as f32).collect();
            let affine = Some(Affine {
                gamma: &gamma,
                beta: &beta,
            });
            let running = RunningStats {
                mean: &rmean,
                var: &rvar,
            };
            let lay = if layout == Layout::Nchw {
                "nchw"
            } else {
                "nhwc"
            };
            let key = |what: &str| format!("{lay} {n}x{c}x{hw} {what}");
            let mut y = vec![0.0f32; len];
            bn.inference(&x, &mut y, affine, running).unwrap();
            section(&mut out, &key("inference"), &y);
            bn.inference_fused(&x, &mut y, affine, running, Epilogue::AddRelu(&z))
                .unwrap();
            section(&mut out, &key("inference_add_relu"), &y);
            let (mut m, mut r) = (vec![0.0f32; c], vec![0.0f32; c]);
            let (mut rm, mut rv) = (rmean.clone(), rvar.clone());
            let saved = SavedStatsMut {
                mean: &mut m,
                inv_std: &mut r,
            };
            let update = RunningUpdate::pytorch(&mut rm, &mut rv);
            bn.training(&x, &mut y, affine, Some(saved), Some(update))
                .unwrap();
            section(&mut out, &key("training"), &y);
            section(&mut out, &key("running_var"), &rv);
            let mut dx = vec![0.0f32; len];
            let (mut dg, mut db) = (vec![0.0f32; c], vec![0.0f32; c]);
            let mode = BackwardMode::Training(SavedStats {
                mean: &m,
                inv_std: &r,
            });
            let grads = ParamGrads {
                dgamma: &mut dg,
                dbeta: &mut db,
                mode: GradMode::Overwrite,
            };
            bn.backward(&x, &dy, &mut dx, affine, mode, Some(grads))
                .unwrap();
            section(&mut out, &key("dx"), &dx);
            section(&mut out, &key("dgamma"), &dg);
            let mut dz = vec![0.0f32; len];
            let fused = BackwardEpilogue::AddRelu { y: &z, dz: &mut dz };
            bn.backward_fused(&x, &dy, &mut dx, affine, mode, None, fused)
                .unwrap();
            section(&mut out, &key("dx_add_relu"), &dx);
        }
    }
    out
}

/// Where cargo put this crate's static and shared libraries for the tests:
/// `target/<profile>/deps` (beside this test's executable), or `target/<profile>`.
fn lib_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let deps = exe.parent().unwrap();
    [deps, deps.parent().unwrap()]
        .into_iter()
        .find(|d| d.join("libbatchnorm_capi.a").exists())
        .expect("libbatchnorm_capi.a next to the test executable")
        .to_path_buf()
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn c_program_gets_the_rust_apis_numbers_and_errors() {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let libs = lib_dir();
    let work = std::env::temp_dir().join(format!("batchnorm-capi-{}", std::process::id()));
    std::fs::create_dir_all(&work).unwrap();
    let expected = work.join("expected.txt");
    std::fs::write(&expected, expected_values()).unwrap();
    let source = manifest.join("tests/c/test_batchnorm.c");
    let include = manifest.join("include");
    let flags = ["-std=c99", "-Wall", "-Wextra", "-Werror", "-O1"];
    // Static library: its native dependencies (threads, dl, math) on the command line.
    let static_exe = work.join("test_static");
    run(Command::new("cc")
        .args(flags)
        .arg("-I")
        .arg(&include)
        .arg(&source)
        .arg(libs.join("libbatchnorm_capi.a"))
        .args(["-lpthread", "-ldl", "-lm", "-o"])
        .arg(&static_exe));
    run(Command::new(&static_exe).arg(&expected));
    // Shared library.
    let shared_exe = work.join("test_shared");
    run(Command::new("cc")
        .args(flags)
        .arg("-I")
        .arg(&include)
        .arg(&source)
        .arg("-L")
        .arg(&libs)
        .arg(format!("-Wl,-rpath,{}", libs.display()))
        .args(["-lbatchnorm_capi", "-lm", "-o"])
        .arg(&shared_exe));
    run(Command::new(&shared_exe).arg(&expected));
    let _ = std::fs::remove_dir_all(&work);
}

#[test]
fn header_compiles_as_cpp() {
    let header = Path::new(env!("CARGO_MANIFEST_DIR")).join("include/batchnorm.h");
    run(Command::new("c++")
        .args([
            "-x",
            "c++",
            "-std=c++11",
            "-Wall",
            "-Wextra",
            "-Werror",
            "-fsyntax-only",
        ])
        .arg(&header));
}

#[test]
fn checked_in_header_is_what_cbindgen_generates() {
    let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let config = cbindgen::Config::from_file(crate_dir.join("cbindgen.toml")).unwrap();
    let mut generated = Vec::new();
    cbindgen::Builder::new()
        .with_crate(crate_dir)
        .with_config(config)
        .generate()
        .expect("cbindgen")
        .write(&mut generated);
    let path = crate_dir.join("include/batchnorm.h");
    if std::env::var_os("BATCHNORM_WRITE_HEADER").is_some() {
        std::fs::write(&path, &generated).unwrap();
    }
    let checked_in = std::fs::read(&path).unwrap_or_default();
    assert!(
        checked_in == generated,
        "capi/include/batchnorm.h is not what cbindgen generates from capi/src/lib.rs: rerun \
         with BATCHNORM_WRITE_HEADER=1"
    );
}
