#!/usr/bin/env python3
"""Times PyTorch (CPU) and ONNX Runtime on the benchmark's ops and shapes, reads this crate's
criterion results for the same cases, and prints one Markdown table of times and ratios.

Not run in CI. Setup (outside the repository):

    python3 -m venv /tmp/venv
    /tmp/venv/bin/pip install torch onnx onnxruntime numpy
    cargo bench --bench batchnorm              # the crate's numbers, into target/criterion
    /tmp/venv/bin/python benches/compare.py    # options: --help

Cases: op in inference / training / backward / statistics, layout nchw (torch contiguous) and
nhwc (torch channels_last), the shapes of benches/batchnorm.rs, 1 and all threads
(torch.set_num_threads; ORT intra_op_num_threads).

- torch: F.batch_norm(training=False) / F.batch_norm(training=True, momentum=0.1), both under
  no_grad; aten.native_batch_norm_backward from the saved statistics of a training call
  (dx, dgamma, dbeta); statistics = torch.var_mean over (N, H, W), population variance.
- ONNX Runtime: a one-node BatchNormalization model (opset 15) built with onnx.helper, NCHW
  only (the standard operator has no NHWC form), inference; training_mode=1 where this ORT build
  runs it, else "n/a". Outputs are bound to preallocated buffers (io_binding), so the time is the
  operator's, not numpy conversions'. ORT has no batch-norm backward or statistics operator.

Each time is the median over --repeats samples, each sample averaging enough calls to last at
least --sample-ms. Ratios are framework time / crate time: above 1 means the crate is faster.
Only ratios measured on the same machine at about the same time mean anything.
"""

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

SHAPES = [
    (1, 64, 112, 112),
    (1, 256, 56, 56),
    (1, 1024, 7, 7),
    (8, 64, 56, 56),
    (32, 64, 56, 56),
    (32, 256, 14, 14),
    (256, 2048, 1, 1),
    (1, 3, 224, 224),
]
OPS = ["inference", "training", "backward", "statistics"]
LAYOUTS = ["nchw", "nhwc"]
EPS = 1e-5


def shape_name(shape):
    return "x".join(str(d) for d in shape)


def cpu_model():
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or "unknown CPU"


def time_call(fn, repeats, sample_s):
    """Median seconds per call of fn()."""
    fn()
    fn()
    t0 = time.perf_counter()
    fn()
    once = max(time.perf_counter() - t0, 1e-7)
    inner = max(1, int(sample_s / once))
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        samples.append((time.perf_counter() - t0) / inner)
    return statistics.median(samples)


def read_criterion(home):
    """{full_id: median ns} for every result under criterion's folder."""
    results = {}
    home = Path(home)
    if not home.is_dir():
        return results
    for bench_json in home.glob("**/new/benchmark.json"):
        try:
            bench = json.loads(bench_json.read_text())
            est = json.loads((bench_json.parent / "estimates.json").read_text())
            results[bench["full_id"]] = est["median"]["point_estimate"]
        except (OSError, ValueError, KeyError):
            continue
    return results


class Torch:
    def __init__(self):
        import torch
        import torch.nn.functional as F

        self.torch = torch
        self.F = F
        self.version = torch.__version__

    def set_threads(self, t):
        self.torch.set_num_threads(t)

    def case(self, op, layout, shape):
        """A zero-argument callable running op once, or None."""
        torch, F = self.torch, self.F
        n, c, h, w = shape
        fmt = torch.channels_last if layout == "nhwc" else torch.contiguous_format
        gen = torch.Generator().manual_seed(0)
        x = (torch.rand(shape, generator=gen) * 4 - 1).contiguous(memory_format=fmt)
        dy = (torch.rand(shape, generator=gen) * 2 - 1).contiguous(memory_format=fmt)
        gamma = torch.rand(c, generator=gen) + 0.5
        beta = torch.rand(c, generator=gen) - 0.5
        rmean = torch.rand(c, generator=gen) + 0.5
        rvar = torch.rand(c, generator=gen) + 1.0

        if op == "inference":

            def run():
                with torch.no_grad():
                    return F.batch_norm(x, rmean, rvar, gamma, beta, training=False, eps=EPS)

        elif op == "training":

            def run():
                with torch.no_grad():
                    return F.batch_norm(
                        x, rmean, rvar, gamma, beta, training=True, momentum=0.1, eps=EPS
                    )

        elif op == "backward":
            with torch.no_grad():
                _, save_mean, save_invstd = torch.ops.aten.native_batch_norm(
                    x, gamma, beta, rmean, rvar, True, 0.1, EPS
                )

            def run():
                with torch.no_grad():
                    return torch.ops.aten.native_batch_norm_backward(
                        dy, x, gamma, rmean, rvar, save_mean, save_invstd, True, EPS,
                        [True, True, True],
                    )

        elif op == "statistics":

            def run():
                with torch.no_grad():
                    return torch.var_mean(x, dim=(0, 2, 3), correction=0)

        else:
            return None
        return run


class Ort:
    def __init__(self):
        import numpy as np
        import onnx
        import onnxruntime as ort
        from onnx import TensorProto, helper, numpy_helper

        self.np, self.onnx, self.ort = np, onnx, ort
        self.helper, self.TensorProto, self.numpy_helper = helper, TensorProto, numpy_helper
        self.version = ort.__version__
        self.threads = 1
        self.training_note = None

    def set_threads(self, t):
        self.threads = t

    def model(self, shape, training):
        np, helper, T, nh = self.np, self.helper, self.TensorProto, self.numpy_helper
        c = shape[1]
        rng = np.random.default_rng(0)
        inits = [
            nh.from_array((rng.random(c) + 0.5).astype(np.float32), "scale"),
            nh.from_array((rng.random(c) - 0.5).astype(np.float32), "B"),
            nh.from_array((rng.random(c) + 0.5).astype(np.float32), "mean"),
            nh.from_array((rng.random(c) + 1.0).astype(np.float32), "var"),
        ]
        outputs = [helper.make_tensor_value_info("Y", T.FLOAT, list(shape))]
        node_outputs = ["Y"]
        if training:
            node_outputs += ["running_mean", "running_var"]
            outputs += [
                helper.make_tensor_value_info("running_mean", T.FLOAT, [c]),
                helper.make_tensor_value_info("running_var", T.FLOAT, [c]),
            ]
        node = helper.make_node(
            "BatchNormalization",
            ["X", "scale", "B", "mean", "var"],
            node_outputs,
            epsilon=EPS,
            momentum=0.9,
            training_mode=1 if training else 0,
        )
        graph = helper.make_graph(
            [node],
            "bn",
            [helper.make_tensor_value_info("X", T.FLOAT, list(shape))],
            outputs,
            initializer=inits,
        )
        m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])
        m.ir_version = min(m.ir_version, 10)
        return m.SerializeToString()

    def case(self, op, layout, shape):
        if layout != "nchw" or op not in ("inference", "training"):
            return None
        np, ort = self.np, self.ort
        training = op == "training"
        so = ort.SessionOptions()
        so.intra_op_num_threads = self.threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        try:
            sess = ort.InferenceSession(
                self.model(shape, training), so, providers=["CPUExecutionProvider"]
            )
        except Exception as e:  # noqa: BLE001 - any ORT failure means "not supported here"
            if training:
                self.training_note = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
            return None
        rng = np.random.default_rng(1)
        x = (rng.random(shape, dtype=np.float32) * 4 - 1).astype(np.float32)
        y = np.empty(shape, dtype=np.float32)
        c = shape[1]
        rm, rv = np.empty(c, np.float32), np.empty(c, np.float32)
        io = sess.io_binding()
        io.bind_cpu_input("X", x)

        def bind(name, buf):
            io.bind_output(name, "cpu", 0, np.float32, list(buf.shape), buf.ctypes.data)

        bind("Y", y)
        if training:
            bind("running_mean", rm)
            bind("running_var", rv)

        # The binding holds raw pointers into these arrays: the closure keeps them alive.
        buffers = (x, y, rm, rv)

        def run():
            sess.run_with_iobinding(io)
            return buffers

        try:
            run()
        except Exception as e:  # noqa: BLE001
            if training:
                self.training_note = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
            return None
        return run


def fmt_us(ns):
    if ns is None:
        return "–"
    return f"{ns / 1e3:.1f}" if ns < 1e7 else f"{ns / 1e3:.0f}"


def fmt_ratio(a, b):
    if a is None or b is None:
        return "–"
    return f"{a / b:.2f}"


def main():
    repo = Path(__file__).resolve().parent.parent
    default_home = os.environ.get("CRITERION_HOME") or str(
        Path(os.environ.get("CARGO_TARGET_DIR", repo / "target")) / "criterion"
    )
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--criterion", default=default_home, help="criterion's results folder")
    ap.add_argument("--ops", nargs="+", default=OPS, choices=OPS)
    ap.add_argument("--layouts", nargs="+", default=LAYOUTS, choices=LAYOUTS)
    ap.add_argument(
        "--shapes", nargs="+", default=[shape_name(s) for s in SHAPES], help="NxCxHxW"
    )
    ap.add_argument(
        "--threads", nargs="+", type=int, default=sorted({1, os.cpu_count() or 1})
    )
    ap.add_argument("--repeats", type=int, default=11, help="samples per case (median)")
    ap.add_argument("--sample-ms", type=float, default=20.0, help="minimum length of a sample")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--no-ort", action="store_true")
    args = ap.parse_args()
    shapes = [tuple(int(d) for d in s.split("x")) for s in args.shapes]

    frameworks = {}
    notes = []
    if not args.no_torch:
        try:
            frameworks["torch"] = Torch()
        except ImportError as e:
            notes.append(f"torch not available: {e}")
    if not args.no_ort:
        try:
            frameworks["ort"] = Ort()
        except ImportError as e:
            notes.append(f"onnxruntime/onnx not available: {e}")
    crate = read_criterion(args.criterion)
    if not crate:
        notes.append(f"no criterion results under {args.criterion}: run cargo bench first")

    load_before = os.getloadavg()
    rows = []
    total = len(args.ops) * len(args.layouts) * len(shapes) * len(args.threads)
    done = 0
    for t in args.threads:
        for fw in frameworks.values():
            fw.set_threads(t)
        for op in args.ops:
            for layout in args.layouts:
                for shape in shapes:
                    done += 1
                    cid = f"{op}/{layout}/{shape_name(shape)}/t{t}"
                    print(f"[{done}/{total}] {cid}", file=sys.stderr, flush=True)
                    row = {"op": op, "layout": layout, "shape": shape_name(shape), "t": t}
                    row["crate"] = crate.get(f"{cid}/batchnorm")
                    row["copy"] = crate.get(f"{cid}/copy")
                    for name, fw in frameworks.items():
                        fn = fw.case(op, layout, shape)
                        row[name] = (
                            None
                            if fn is None
                            else 1e9 * time_call(fn, args.repeats, args.sample_ms / 1e3)
                        )
                    rows.append(row)

    ort = frameworks.get("ort")
    if ort is not None and ort.training_note:
        notes.append(f"ONNX Runtime training_mode=1 not run: {ort.training_note}")
    versions = ", ".join(f"{k} {v.version}" for k, v in frameworks.items())
    print(
        f"\n{datetime.date.today().isoformat()}, {cpu_model()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}, {versions or 'no frameworks'}; "
        f"crate results from {args.criterion}; load average before/after "
        f"{load_before[0]:.2f}/{os.getloadavg()[0]:.2f}\n"
    )
    print(
        "Times in µs (median). Ratios = framework time / crate time (> 1: the crate is faster). "
        "crate/copy = crate time / in-run copy baseline.\n"
    )
    print(
        "| op | layout | shape | threads | crate | crate/copy | torch | ort | torch/crate | ort/crate |"
    )
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['op']} | {r['layout']} | {r['shape']} | {r['t']} | {fmt_us(r['crate'])} "
            f"| {fmt_ratio(r['crate'], r['copy'])} | {fmt_us(r.get('torch'))} "
            f"| {fmt_us(r.get('ort'))} | {fmt_ratio(r.get('torch'), r['crate'])} "
            f"| {fmt_ratio(r.get('ort'), r['crate'])} |"
        )
    for note in notes:
        print(f"\nNote: {note}")


if __name__ == "__main__":
    main()
