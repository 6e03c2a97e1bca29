//! An SVG plot of time / copy for every result of a run: one panel per operation (bars per shape,
//! one per layout and thread count) and one for the `backends` group (bars per backend). The
//! y axis is logarithmic around 1 (the in-run copy of the same bytes): a bar going up is slower
//! than a copy, one going down faster. Written by hand, so no plotting crate is needed.
//!
//! Shared by `benches/batchnorm.rs` (written after a run) and `examples/bench_summary.rs`.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fmt::Write as _;

use crate::summary::Sample;

/// Ratios shown on the y axis: 1/4 to 16, log 2.
const Y_MIN: f64 = 0.25;
const Y_MAX: f64 = 16.0;
const PANEL_H: f64 = 170.0;
const LEFT: f64 = 60.0;
/// Room on the right for the last group's slanted label.
const RIGHT: f64 = 120.0;
const WIDTH: f64 = 960.0;
const BAR_W: f64 = 9.0;
const COLORS: [&str; 6] = [
    "#4e79a7", "#a0cbe8", "#f28e2b", "#ffbe7d", "#59a14f", "#e15759",
];

/// One panel: groups along x, each with one bar per series (`None` where there is no result).
struct Panel {
    title: String,
    series: Vec<String>,
    groups: Vec<(String, Vec<Option<f64>>)>,
}

fn y_of(ratio: f64, top: f64) -> f64 {
    let r = ratio.clamp(Y_MIN, Y_MAX);
    let span = (Y_MAX / Y_MIN).log2();
    top + PANEL_H * (Y_MAX / r).log2() / span
}

fn shape_key(shape: &str) -> Vec<usize> {
    shape.split('x').map(|d| d.parse().unwrap_or(0)).collect()
}

/// The operations' panels: time / copy at the same layout, shape and thread count.
fn op_panels(samples: &[Sample]) -> Vec<Panel> {
    let mut by_id: BTreeMap<&str, f64> = BTreeMap::new();
    for s in samples {
        by_id.insert(&s.id, s.median_ns);
    }
    let mut panels = Vec::new();
    for op in ["inference", "training", "backward", "statistics"] {
        let mut shapes: Vec<&str> = Vec::new();
        let mut series: Vec<(String, String)> = Vec::new();
        for s in samples {
            let parts: Vec<&str> = s.id.split('/').collect();
            if let [o, layout, shape, threads, "batchnorm"] = parts[..]
                && o == op
            {
                if !shapes.contains(&shape) {
                    shapes.push(shape);
                }
                let key = (layout.to_string(), threads.to_string());
                if !series.contains(&key) {
                    series.push(key);
                }
            }
        }
        if shapes.is_empty() {
            continue;
        }
        shapes.sort_by_key(|s| shape_key(s));
        series.sort();
        let groups = shapes
            .iter()
            .map(|shape| {
                let bars = series
                    .iter()
                    .map(|(layout, threads)| {
                        let id = |imp: &str| format!("{op}/{layout}/{shape}/{threads}/{imp}");
                        let t = by_id.get(id("batchnorm").as_str())?;
                        let c = by_id.get(id("copy").as_str())?;
                        Some(t / c)
                    })
                    .collect();
                (shape.to_string(), bars)
            })
            .collect();
        panels.push(Panel {
            title: format!("{op}: time / copy of the same bytes, per shape (N×C×H×W)"),
            series: series.iter().map(|(l, t)| format!("{l} {t}")).collect(),
            groups,
        });
    }
    panels
}

/// A group of the `backends` panel: (op rank, op, shape, layout), in plot order.
type GroupKey<'a> = (usize, &'a str, Vec<usize>, &'a str);

/// The `backends` panel: each backend (and the scalar baseline) over the copy of its shape.
fn backends_panel(samples: &[Sample]) -> Option<Panel> {
    let mut copies: BTreeMap<&str, f64> = BTreeMap::new();
    // (op rank, op, shape, layout) -> backend -> median ns
    let mut runs: BTreeMap<GroupKey<'_>, BTreeMap<&str, f64>> = BTreeMap::new();
    let op_rank = |op: &str| {
        ["statistics", "inference", "training", "backward"]
            .iter()
            .position(|o| *o == op)
            .unwrap_or(9)
    };
    for s in samples {
        match s.id.split('/').collect::<Vec<_>>()[..] {
            ["backends", "copy", shape] => {
                copies.insert(shape, s.median_ns);
            }
            ["backends", op, layout, shape, imp] => {
                let key = (op_rank(op), op, shape_key(shape), layout);
                runs.entry(key).or_default().insert(imp, s.median_ns);
            }
            _ => {}
        }
    }
    if runs.is_empty() {
        return None;
    }
    let order = ["scalar", "portable", "avx2", "avx512"];
    let series: Vec<&str> = order
        .iter()
        .copied()
        .filter(|b| runs.values().any(|m| m.contains_key(b)))
        .collect();
    let groups = runs
        .iter()
        .map(|((_, op, shape, layout), times)| {
            let shape: Vec<String> = shape.iter().map(usize::to_string).collect();
            let shape = shape.join("x");
            let copy = copies.get(shape.as_str()).copied();
            let bars = series.iter().map(|b| Some(times.get(b)? / copy?)).collect();
            (format!("{op} {layout} {shape}"), bars)
        })
        .collect();
    Some(Panel {
        title: "backends (one thread, in-cache shapes): time / copy of the same bytes".into(),
        series: series.iter().map(|s| s.to_string()).collect(),
        groups,
    })
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// The CPU's model name (from `/proc/cpuinfo` on Linux), for captions.
pub fn cpu_name() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|text| {
            let line = text.lines().find(|l| l.starts_with("model name"))?;
            Some(line.split_once(':')?.1.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

/// The whole plot; `caption` names the machine and the run. `None` without results.
pub fn svg(samples: &[Sample], caption: &str) -> Option<String> {
    let mut panels = op_panels(samples);
    panels.extend(backends_panel(samples));
    if panels.is_empty() {
        return None;
    }
    // Groups spread over the width, at least wide enough for their bars.
    let group_w = |p: &Panel| {
        let fit = (WIDTH - LEFT - RIGHT) / p.groups.len().max(1) as f64;
        fit.max(p.series.len() as f64 * BAR_W + 14.0)
    };
    let width = panels
        .iter()
        .map(|p| LEFT + RIGHT + p.groups.len() as f64 * group_w(p))
        .fold(WIDTH, f64::max);
    let panel_total = PANEL_H + 130.0;
    let height = 40.0 + panels.len() as f64 * panel_total;
    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0}" height="{height:.0}" font-family="sans-serif" font-size="10">"#
    );
    let _ = writeln!(
        out,
        r#"<rect width="100%" height="100%" fill="white"/><text x="10" y="20" font-size="13">{}</text>"#,
        escape(caption)
    );
    for (k, p) in panels.iter().enumerate() {
        let top = 40.0 + k as f64 * panel_total + 36.0;
        let _ = writeln!(
            out,
            r#"<text x="{LEFT}" y="{:.0}" font-size="12">{}</text>"#,
            top - 22.0,
            escape(&p.title)
        );
        // Grid: powers of two; the copy line (1) solid.
        let mut r = Y_MIN;
        while r <= Y_MAX {
            let y = y_of(r, top);
            let style = if r == 1.0 {
                r##"stroke="#000" stroke-width="1""##
            } else {
                r##"stroke="#ddd""##
            };
            let label = if r < 1.0 {
                format!("1/{}", (1.0 / r) as u32)
            } else {
                format!("{r}")
            };
            let _ = writeln!(
                out,
                r#"<line x1="{LEFT}" x2="{:.0}" y1="{y:.1}" y2="{y:.1}" {style}/><text x="{:.0}" y="{:.1}" text-anchor="end">{label}</text>"#,
                width - 10.0,
                LEFT - 4.0,
                y + 3.0
            );
            r *= 2.0;
        }
        let one = y_of(1.0, top);
        for (g, (name, bars)) in p.groups.iter().enumerate() {
            let x0 = LEFT + 10.0 + g as f64 * group_w(p);
            for (b, ratio) in bars.iter().enumerate() {
                let Some(ratio) = *ratio else { continue };
                let y = y_of(ratio, top);
                let (y1, h) = if y < one {
                    (y, one - y)
                } else {
                    (one, y - one)
                };
                let x = x0 + b as f64 * BAR_W;
                let _ = writeln!(
                    out,
                    r#"<rect x="{x:.1}" y="{y1:.1}" width="{:.1}" height="{:.1}" fill="{}"><title>{} {}: {ratio:.2}</title></rect>"#,
                    BAR_W - 1.0,
                    h.max(0.5),
                    COLORS[b % COLORS.len()],
                    escape(name),
                    escape(&p.series[b]),
                );
            }
            let xm = x0 + p.series.len() as f64 * BAR_W / 2.0;
            let yl = top + PANEL_H + 12.0;
            let _ = writeln!(
                out,
                r#"<text x="{xm:.1}" y="{yl:.1}" transform="rotate(30 {xm:.1} {yl:.1})">{}</text>"#,
                escape(name)
            );
        }
        // Legend, under the title.
        for (b, s) in p.series.iter().enumerate() {
            let x = LEFT + b as f64 * 90.0;
            let _ = writeln!(
                out,
                r#"<rect x="{x:.0}" y="{:.0}" width="10" height="10" fill="{}"/><text x="{:.0}" y="{:.0}">{}</text>"#,
                top - 16.0,
                COLORS[b % COLORS.len()],
                x + 13.0,
                top - 7.0,
                escape(s)
            );
        }
    }
    out.push_str("</svg>\n");
    Some(out)
}
