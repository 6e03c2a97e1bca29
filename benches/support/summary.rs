//! Reads the results criterion wrote for the `batchnorm` benchmarks and prints them as Markdown
//! tables: bandwidth, time relative to the in-run copy baseline, speed-up over the scalar baseline.
//!
//! Shared by `benches/batchnorm.rs` (printed after a run) and `examples/bench_summary.rs`.
//! Criterion stores one folder per benchmark with `new/benchmark.json` (its id and throughput) and
//! `new/estimates.json` (the estimates, in ns); both are read with a tiny hand parser so no JSON
//! crate is needed. By default only results written since the last start of the bench binary are
//! shown (it leaves a marker file), so the ratios come from one run.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// Name of the marker file the bench binary writes into the criterion folder when it starts.
pub const RUN_MARKER: &str = "batchnorm-run-start";

/// Where criterion keeps its results: `$CRITERION_HOME`, `$CARGO_TARGET_DIR/criterion`, or
/// `target/criterion` under the package root.
pub fn criterion_home() -> PathBuf {
    if let Some(home) = std::env::var_os("CRITERION_HOME") {
        return PathBuf::from(home);
    }
    if let Some(target) = std::env::var_os("CARGO_TARGET_DIR") {
        return PathBuf::from(target).join("criterion");
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("target/criterion")
}

/// Records that a run starts now: results older than this are left out of the summary.
pub fn mark_run_start() -> std::io::Result<()> {
    let home = criterion_home();
    fs::create_dir_all(&home)?;
    fs::write(home.join(RUN_MARKER), b"batchnorm bench run start\n")
}

/// One benchmark result.
#[derive(Clone, Debug)]
pub struct Sample {
    /// Criterion's full id, e.g. `inference/nchw/1x64x112x112/t1/batchnorm`.
    pub id: String,
    /// Median time per iteration, ns.
    pub median_ns: f64,
    /// Bytes per iteration declared with `Throughput::Bytes`, if any.
    pub bytes: Option<u64>,
}

/// The value of `"key":"..."` in a JSON text (no escapes expected in our ids).
fn json_string(text: &str, key: &str) -> Option<String> {
    let pat = format!("\"{key}\":\"");
    let start = text.find(&pat)? + pat.len();
    let end = text[start..].find('"')?;
    Some(text[start..start + end].to_string())
}

/// The number after the first `"key":` at or after byte `from`.
fn json_number(text: &str, key: &str, from: usize) -> Option<f64> {
    let pat = format!("\"{key}\":");
    let start = text[from..].find(&pat)? + from + pat.len();
    let rest = text[start..].trim_start();
    let end = rest
        .find(|ch: char| !(ch.is_ascii_digit() || "+-.eE".contains(ch)))
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

/// Parses one criterion result folder (`.../new`).
fn read_sample(new_dir: &Path) -> Option<Sample> {
    let bench = fs::read_to_string(new_dir.join("benchmark.json")).ok()?;
    let est = fs::read_to_string(new_dir.join("estimates.json")).ok()?;
    let id = json_string(&bench, "full_id")?;
    let median_at = est.find("\"median\"")?;
    let median_ns = json_number(&est, "point_estimate", median_at)?;
    let bytes = bench
        .find("\"Bytes\"")
        .and_then(|at| json_number(&bench, "Bytes", at))
        .map(|b| b as u64);
    Some(Sample {
        id,
        median_ns,
        bytes,
    })
}

fn modified(path: &Path) -> Option<SystemTime> {
    fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// Every `new/` result folder under `dir`, newer than `since` if given.
fn collect(dir: &Path, since: Option<SystemTime>, out: &mut Vec<Sample>) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if !path.is_dir() {
            continue;
        }
        if path.file_name().is_some_and(|n| n == "new") {
            let fresh = match since {
                Some(t) => modified(&path.join("estimates.json")).is_some_and(|m| m >= t),
                None => true,
            };
            if fresh && let Some(s) = read_sample(&path) {
                out.push(s);
            }
        } else {
            collect(&path, since, out);
        }
    }
}

/// All results under `home`; with `latest_run_only`, only those written since the run marker.
pub fn load(home: &Path, latest_run_only: bool) -> Vec<Sample> {
    let since = if latest_run_only {
        modified(&home.join(RUN_MARKER))
    } else {
        None
    };
    let mut out = Vec::new();
    collect(home, since, &mut out);
    out
}

/// Sort key for a shape `NxCxHxW`: numerically, in the order the benches define.
fn shape_key(shape: &str) -> Vec<usize> {
    shape.split('x').map(|d| d.parse().unwrap_or(0)).collect()
}

fn op_rank(op: &str) -> usize {
    ["inference", "training", "backward", "statistics"]
        .iter()
        .position(|o| *o == op)
        .unwrap_or(9)
}

fn gbps(bytes: Option<u64>, ns: f64) -> String {
    match bytes {
        Some(b) if ns > 0.0 => format!("{:.1}", b as f64 / ns),
        _ => "–".to_string(),
    }
}

fn time(ns: f64) -> String {
    if ns >= 1e6 {
        format!("{:.2} ms", ns / 1e6)
    } else {
        format!("{:.1} µs", ns / 1e3)
    }
}

fn ratio(r: Option<f64>) -> String {
    r.map_or("–".to_string(), |r| format!("{r:.2}"))
}

/// Markdown table of the main groups: one row per (op, layout, shape, threads) of the crate.
pub fn main_table(samples: &[Sample]) -> String {
    // (op, layout, shape, threads, impl) -> sample
    let mut by_key: BTreeMap<(String, String, String, String, String), &Sample> = BTreeMap::new();
    for s in samples {
        let parts: Vec<&str> = s.id.split('/').collect();
        if let [op, layout, shape, threads, imp] = parts[..]
            && op != "backends"
        {
            let key = (op, layout, shape, threads, imp).map_owned();
            by_key.insert(key, s);
        }
    }
    let mut rows: Vec<_> = by_key
        .iter()
        .filter(|(k, _)| k.4 == "batchnorm")
        .map(|(k, s)| (k.clone(), *s))
        .collect();
    rows.sort_by_key(|(k, _)| {
        (
            op_rank(&k.0),
            k.1.clone(),
            shape_key(&k.2),
            k.3.trim_start_matches('t').parse::<usize>().unwrap_or(0),
        )
    });
    let mut out = String::new();
    out.push_str(
        "| op | layout | shape | threads | median | GB/s | copy GB/s | time / copy | speed-up vs scalar |\n",
    );
    out.push_str("|---|---|---|---:|---:|---:|---:|---:|---:|\n");
    for ((op, layout, shape, threads, _), s) in rows {
        let get = |threads: &str, imp: &str| {
            by_key
                .get(&(
                    op.clone(),
                    layout.clone(),
                    shape.clone(),
                    threads.to_string(),
                    imp.to_string(),
                ))
                .copied()
        };
        let copy = get(&threads, "copy");
        let scalar = get("t1", "scalar");
        let _ = writeln!(
            out,
            "| {op} | {layout} | {shape} | {} | {} | {} | {} | {} | {} |",
            threads.trim_start_matches('t'),
            time(s.median_ns),
            gbps(s.bytes, s.median_ns),
            copy.map_or("–".to_string(), |c| gbps(c.bytes, c.median_ns)),
            ratio(copy.map(|c| s.median_ns / c.median_ns)),
            ratio(scalar.map(|c| c.median_ns / s.median_ns)),
        );
    }
    out
}

/// Markdown table of the `backends` group: each backend's time, and its speed-up over the
/// portable backend and over the scalar baseline.
pub fn backends_table(samples: &[Sample]) -> String {
    // (op, layout, shape, impl) -> sample, from ids "backends/op/layout/shape/impl"
    let mut by_key: BTreeMap<(String, String, String, String), &Sample> = BTreeMap::new();
    let mut copies: BTreeMap<String, &Sample> = BTreeMap::new();
    for s in samples {
        let parts: Vec<&str> = s.id.split('/').collect();
        match parts[..] {
            ["backends", "copy", shape] => {
                copies.insert(shape.to_string(), s);
            }
            ["backends", op, layout, shape, imp] => {
                by_key.insert((op, layout, shape, imp).map_owned(), s);
            }
            _ => {}
        }
    }
    if by_key.is_empty() {
        return String::new();
    }
    let mut keys: Vec<_> = by_key.keys().cloned().collect();
    keys.sort_by_key(|k| {
        let imp_rank = ["scalar", "portable", "avx2", "avx512"]
            .iter()
            .position(|i| *i == k.3)
            .unwrap_or(9);
        (op_rank(&k.0), k.1.clone(), shape_key(&k.2), imp_rank)
    });
    let mut out = String::new();
    out.push_str("| op | layout | shape | backend | median | GB/s | time / copy | speed-up vs portable | speed-up vs scalar |\n");
    out.push_str("|---|---|---|---|---:|---:|---:|---:|---:|\n");
    for (op, layout, shape, imp) in keys {
        let s = by_key[&(op.clone(), layout.clone(), shape.clone(), imp.clone())];
        let other = |imp: &str| {
            by_key
                .get(&(op.clone(), layout.clone(), shape.clone(), imp.to_string()))
                .copied()
        };
        let copy = copies.get(&shape).copied();
        let _ = writeln!(
            out,
            "| {op} | {layout} | {shape} | {imp} | {} | {} | {} | {} | {} |",
            time(s.median_ns),
            gbps(s.bytes, s.median_ns),
            ratio(copy.map(|c| s.median_ns / c.median_ns)),
            ratio(other("portable").map(|p| p.median_ns / s.median_ns)),
            ratio(other("scalar").map(|p| p.median_ns / s.median_ns)),
        );
    }
    out
}

/// A column of a ratio table: a header and either the time of one `impl` or the ratio of two.
enum Column {
    Time(&'static str, &'static str),
    Ratio(&'static str, &'static str, &'static str),
}

/// Markdown table of one group's results as ratios to its in-run baselines: a row per (layout,
/// shape, threads) that has an `anchor` result, `columns` from the ids `group/layout/shape/tT/impl`.
fn ratio_table(samples: &[Sample], group: &str, anchor: &str, columns: &[Column]) -> String {
    let mut by_id: BTreeMap<&str, f64> = BTreeMap::new();
    let mut rows: Vec<(String, String, String)> = Vec::new();
    for s in samples {
        by_id.insert(&s.id, s.median_ns);
        if let [g, layout, shape, threads, imp] = s.id.split('/').collect::<Vec<_>>()[..]
            && g == group
            && imp == anchor
        {
            rows.push((layout.into(), shape.into(), threads.into()));
        }
    }
    if rows.is_empty() {
        return String::new();
    }
    rows.sort_by_key(|(l, s, t)| (l.clone(), shape_key(s), t.clone()));
    let mut out = String::from("| layout | shape | threads |");
    for col in columns {
        let (Column::Time(h, _) | Column::Ratio(h, _, _)) = col;
        let _ = write!(out, " {h} |");
    }
    out.push_str("\n|---|---|---:|");
    out.push_str(&"---:|".repeat(columns.len()));
    out.push('\n');
    for (layout, shape, threads) in rows {
        let get = |imp: &str| {
            by_id
                .get(format!("{group}/{layout}/{shape}/{threads}/{imp}").as_str())
                .copied()
        };
        let _ = write!(
            out,
            "| {layout} | {shape} | {} |",
            threads.trim_start_matches('t')
        );
        for col in columns {
            let cell = match *col {
                Column::Time(_, imp) => get(imp).map_or("–".into(), time),
                Column::Ratio(_, a, b) => ratio(get(a).zip(get(b)).map(|(a, b)| a / b)),
            };
            let _ = write!(out, " {cell} |");
        }
        out.push('\n');
    }
    out
}

/// Markdown table of the `fused` group: each fused op over its in-run baselines (the plain op;
/// for add + ReLU also the pass that reads two tensors and writes one; for the ReLU backward also
/// the unfused composition, ReLU's backward pass then the plain backward).
pub fn fused_table(samples: &[Sample]) -> String {
    use Column::{Ratio, Time};
    let columns = [
        Time("inference", "inference"),
        Ratio("relu / plain", "inference_relu", "inference"),
        Ratio("add+relu / plain", "inference_add_relu", "inference"),
        Ratio("add+relu / add pass", "inference_add_relu", "add"),
        Time("training", "training"),
        Ratio("relu / plain", "training_relu", "training"),
        Ratio("add+relu / plain", "training_add_relu", "training"),
        Time("backward", "backward"),
        Ratio("relu / plain", "backward_relu", "backward"),
        Ratio("relu / unfused", "backward_relu", "backward_unfused_relu"),
        Ratio("add+relu / plain", "backward_add_relu", "backward"),
    ];
    ratio_table(samples, "fused", "add", &columns)
}

/// Markdown table of the `storage` group: each op on half-precision data over a copy of the same
/// (half-size) bytes, and on f32 data over the f32 copy.
pub fn storage_table(samples: &[Sample]) -> String {
    use Column::{Ratio, Time};
    let columns = [
        Ratio("inference f16 / half copy", "inference_f16", "copy_half"),
        Ratio("bf16 / half copy", "inference_bf16", "copy_half"),
        Ratio("f32 / copy", "inference_f32", "copy"),
        Ratio("f64 / f64 copy", "inference_f64", "copy_f64"),
        Ratio("training f16 / half copy", "training_f16", "copy_half"),
        Ratio("bf16 / half copy", "training_bf16", "copy_half"),
        Ratio("f32 / copy", "training_f32", "copy"),
        Ratio("f64 / f64 copy", "training_f64", "copy_f64"),
        Ratio("backward f16 / half copy", "backward_f16", "copy_half"),
        Ratio("bf16 / half copy", "backward_bf16", "copy_half"),
        Ratio("f32 / copy", "backward_f32", "copy"),
        Ratio("f64 / f64 copy", "backward_f64", "copy_f64"),
        Time("copy", "copy"),
        Time("half copy", "copy_half"),
        Time("f64 copy", "copy_f64"),
    ];
    ratio_table(samples, "storage", "copy_half", &columns)
}

/// Both tables, with a header saying where the results came from.
pub fn report(home: &Path, latest_run_only: bool) -> String {
    let samples = load(home, latest_run_only);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "batchnorm benchmark summary: {} results from {}{}\n",
        samples.len(),
        home.display(),
        if latest_run_only {
            " (latest run only)"
        } else {
            ""
        }
    );
    if samples.is_empty() {
        out.push_str("no results: run `cargo bench --bench batchnorm` first\n");
        return out;
    }
    out.push_str(
        "GB/s = the op's minimal traffic / median time (inference and training 8 B/element, \
         backward 12, statistics 4; copy 8). time / copy: median over the in-run copy of x into y \
         on as many threads. speed-up vs scalar: single-threaded scalar baseline / this.\n\n",
    );
    out.push_str(&main_table(&samples));
    let fused = fused_table(&samples);
    if !fused.is_empty() {
        out.push_str("\nFused epilogues (time ratios to the in-run baselines):\n\n");
        out.push_str(&fused);
    }
    let storage = storage_table(&samples);
    if !storage.is_empty() {
        out.push_str(
            "\nStorage types (time ratios to the in-run copies of each type's bytes):\n\n",
        );
        out.push_str(&storage);
    }
    let backends = backends_table(&samples);
    if !backends.is_empty() {
        out.push_str("\nBackends (single thread, in-cache shapes):\n\n");
        out.push_str(&backends);
    }
    out
}

/// `(&str, …)` tuple to an owned `(String, …)` tuple.
trait MapOwned {
    type Owned;
    fn map_owned(self) -> Self::Owned;
}

impl MapOwned for (&str, &str, &str, &str) {
    type Owned = (String, String, String, String);
    fn map_owned(self) -> Self::Owned {
        (self.0.into(), self.1.into(), self.2.into(), self.3.into())
    }
}

impl MapOwned for (&str, &str, &str, &str, &str) {
    type Owned = (String, String, String, String, String);
    fn map_owned(self) -> Self::Owned {
        (
            self.0.into(),
            self.1.into(),
            self.2.into(),
            self.3.into(),
            self.4.into(),
        )
    }
}
