#!/usr/bin/env python3
"""Times this crate against PyTorch (CPU, both memory formats), ONNX Runtime and OpenVINO,
alternating case by case in one run, and prints Markdown tables of times and ratios.

Not run in CI. Setup (outside the repository):

    python3 -m venv /tmp/venv
    /tmp/venv/bin/pip install torch onnx onnxruntime openvino numpy
    cargo build --release --example bench_case
    /tmp/venv/bin/python benches/compare.py      # options: --help

The crate is timed by `examples/bench_case.rs` (one persistent process, preallocated buffers, the
outputs at byte offsets 0, 16, 64 and 2048 modulo 4096 relative to x: the worst offset counts),
beside its roofs: the better of memcpy and a SIMD load/store loop (copy x into y) and a SIMD sum
over x. For every case and round, the crate and each framework run one after the other; each
number is the median over --rounds rounds of medians over --repeats samples.

- torch: F.batch_norm(training=False) / F.batch_norm(training=True, momentum=0.1), under no_grad;
  aten.native_batch_norm_backward from the saved statistics of a training call (dx, dgamma,
  dbeta); statistics = torch.var_mean over (N, H, W). Timed in both memory formats (contiguous
  and channels_last) whatever the crate's layout; the better one is the framework's time.
- ONNX Runtime: a one-node BatchNormalization model (opset 15), NCHW, inference and
  training_mode=1 where this ORT build runs it; outputs bound to preallocated buffers.
- OpenVINO: inference only; BatchNormInference on NCHW, and for NHWC the Multiply + Add graph with
  per-channel constants broadcast over the last axis; CPU plugin, INFERENCE_NUM_THREADS = threads.

Ratios are best framework time / crate time: above 1 means the crate is faster.

--dtype bf16 (or f16) times the data tensors (x, y, dy, dx) in that type on both sides, the
parameters and statistics staying float32: the crate's `Element::Param = f32` ops, and PyTorch's
mixed path (x and dy torch.bfloat16 / torch.float16, weight, bias, running and saved statistics
float32; the CPU kernel accepts that mix and returns float32 saved statistics and dgamma / dbeta).
The crate's roofs then move the half-size tensor's bytes. ONNX Runtime and OpenVINO are timed in
f32 only (ORT's CPU BatchNormalization kernel is registered for float and double); pass --no-ort
--no-openvino with another dtype.
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


class Torch:
    def __init__(self):
        import torch
        import torch.nn.functional as F

        self.torch = torch
        self.F = F
        self.version = torch.__version__

    def set_threads(self, t):
        self.torch.set_num_threads(t)

    def case(self, op, layout, shape, dtype="f32"):
        """A zero-argument callable running op once, or None. x and dy of `dtype`, the
        parameters and statistics float32."""
        torch, F = self.torch, self.F
        n, c, h, w = shape
        fmt = torch.channels_last if layout == "nhwc" else torch.contiguous_format
        data = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}[dtype]
        gen = torch.Generator().manual_seed(0)
        x = (torch.rand(shape, generator=gen) * 4 - 1).to(data).contiguous(memory_format=fmt)
        dy = (torch.rand(shape, generator=gen) * 2 - 1).to(data).contiguous(memory_format=fmt)
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


class OpenVino:
    def __init__(self):
        import numpy as np
        import openvino as ov
        from openvino import opset13 as ops

        self.np, self.ov, self.ops = np, ov, ops
        self.core = ov.Core()
        self.version = ov.__version__
        self.threads = 1

    def set_threads(self, t):
        self.threads = t

    def case(self, op, layout, shape):
        if op != "inference":
            return None
        np, ov, ops = self.np, self.ov, self.ops
        n, c, h, w = shape
        rng = np.random.default_rng(0)
        gamma = (rng.random(c) + 0.5).astype(np.float32)
        beta = (rng.random(c) - 0.5).astype(np.float32)
        mean = (rng.random(c) + 0.5).astype(np.float32)
        var = (rng.random(c) + 1.0).astype(np.float32)
        dims = [n, c, h, w] if layout == "nchw" else [n, h, w, c]
        x = (rng.random(dims, dtype=np.float32) * 4 - 1).astype(np.float32)
        param = ops.parameter(dims, np.float32, name="x")
        if layout == "nchw":
            out = ops.batch_norm_inference(param, gamma, beta, mean, var, EPS)
        else:
            scale = (gamma / np.sqrt(var + EPS)).astype(np.float32)
            shift = (beta - mean * scale).astype(np.float32)
            out = ops.add(ops.multiply(param, scale), shift)
        model = ov.Model([out], [param], "bn")
        config = {"INFERENCE_NUM_THREADS": str(self.threads), "INFERENCE_PRECISION_HINT": "f32"}
        compiled = self.core.compile_model(model, "CPU", config)
        req = compiled.create_infer_request()
        req.set_input_tensor(ov.Tensor(x, shared_memory=True))

        def run():
            req.infer()
            return x

        run()
        return run


class Crate:
    """The crate's timings, from one persistent `examples/bench_case` process."""

    def __init__(self, binary):
        self.proc = subprocess.Popen(
            [binary], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1
        )
        self.backend = self.ask("cpu")["backend"]

    def ask(self, line):
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        reply = json.loads(self.proc.stdout.readline())
        if "error" in reply:
            raise RuntimeError(f"{line}: {reply['error']}")
        return reply

    def case(self, op, layout, shape, t, offset, repeats, sample_ms, dtype="f32"):
        line = f"{op} {layout} {shape_name(shape)} {t} {offset} {repeats} {sample_ms}"
        # The 8th field only when it is not the default, so older binaries still answer f32.
        return self.ask(line if dtype == "f32" else f"{line} {dtype}")


OFFSETS = [0, 16, 64, 2048]


def machine_header(crate):
    """CPU model, ISA, caches, commit and rustc, for the top of every table."""
    info = {}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            k, _, v = line.partition(":")
            info[k.strip()] = v.strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    flags = info.get("Flags", "").split()
    isa = "AVX-512F" if "avx512f" in flags else ("AVX2+FMA" if "avx2" in flags else "SSE2")

    def run(cmd):
        try:
            return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return "?"

    return (
        f"{info.get('Model name', cpu_model())} (family {info.get('CPU family', '?')} model "
        f"{info.get('Model', '?')}, {info.get('CPU(s)', '?')} CPUs, {isa}; "
        f"L1d {info.get('L1d cache', '?')}, L2 {info.get('L2 cache', '?')}, "
        f"L3 {info.get('L3 cache', '?')}); crate backend {crate.backend}; "
        f"commit {run(['git', 'rev-parse', '--short', 'HEAD'])}; {run(['rustc', '--version'])}"
    )


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
    target = Path(os.environ.get("CARGO_TARGET_DIR", repo / "target"))
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--binary", default=str(target / "release" / "examples" / "bench_case"))
    ap.add_argument("--ops", nargs="+", default=OPS, choices=OPS)
    ap.add_argument("--layouts", nargs="+", default=LAYOUTS, choices=LAYOUTS)
    ap.add_argument(
        "--shapes", nargs="+", default=[shape_name(s) for s in SHAPES], help="NxCxHxW"
    )
    ap.add_argument(
        "--threads", nargs="+", type=int, default=sorted({1, os.cpu_count() or 1})
    )
    ap.add_argument("--offsets", nargs="+", type=int, default=OFFSETS, help="bytes mod 4096")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds (median)")
    ap.add_argument("--repeats", type=int, default=5, help="samples per measurement (median)")
    ap.add_argument("--sample-ms", type=float, default=10.0, help="minimum length of a sample")
    ap.add_argument(
        "--dtype",
        default="f32",
        choices=["f32", "bf16", "f16"],
        help="data tensors' type (parameters and statistics stay float32)",
    )
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--no-ort", action="store_true")
    ap.add_argument("--no-openvino", action="store_true")
    args = ap.parse_args()
    shapes = [tuple(int(d) for d in s.split("x")) for s in args.shapes]
    if args.dtype != "f32" and not (args.no_ort and args.no_openvino):
        ap.error(f"--dtype {args.dtype}: ONNX Runtime and OpenVINO are timed in f32 only; "
                 "pass --no-ort --no-openvino")

    crate = Crate(args.binary)
    frameworks = {}
    notes = []
    for flag, name, cls in [
        (args.no_torch, "torch", Torch),
        (args.no_ort, "ort", Ort),
        (args.no_openvino, "openvino", OpenVino),
    ]:
        if not flag:
            try:
                frameworks[name] = cls()
            except ImportError as e:
                notes.append(f"{name} not available: {e}")

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
                    fns = {}
                    for name, fw in frameworks.items():
                        if name == "torch":
                            for fmt in LAYOUTS:
                                fns[f"torch-{fmt}"] = fw.case(op, fmt, shape, args.dtype)
                        else:
                            fns[name] = fw.case(op, layout, shape)
                    fns = {k: v for k, v in fns.items() if v is not None}
                    samples = {k: [] for k in ["crate", "copy", "sum", *fns]}
                    offsets_seen = {}
                    for _ in range(args.rounds):
                        worst = None
                        for off in args.offsets:
                            r = crate.case(
                                op, layout, shape, t, off, args.repeats, args.sample_ms, args.dtype
                            )
                            offsets_seen.setdefault(off, []).append(r["crate"])
                            if worst is None or r["crate"] > worst["crate"]:
                                worst = r
                        for k in ("crate", "copy", "sum"):
                            samples[k].append(worst[k])
                        for name, fn in fns.items():
                            samples[name].append(
                                1e9 * time_call(fn, args.repeats, args.sample_ms / 1e3)
                            )
                    row = {"op": op, "layout": layout, "shape": shape_name(shape), "t": t}
                    for k, v in samples.items():
                        row[k] = statistics.median(v) if v else None
                    per_off = {o: statistics.median(v) for o, v in offsets_seen.items()}
                    row["offset_spread"] = max(per_off.values()) / min(per_off.values())
                    rows.append(row)

    ort = frameworks.get("ort")
    if ort is not None and ort.training_note:
        notes.append(f"ONNX Runtime training_mode=1 not run: {ort.training_note}")
    versions = ", ".join(f"{k} {v.version}" for k, v in frameworks.items())
    print(
        f"\n{datetime.datetime.now().isoformat(timespec='minutes')}; {machine_header(crate)}; "
        f"Python {platform.python_version()}, {versions or 'no frameworks'}; "
        f"data {args.dtype} (parameters and statistics float32); "
        f"load average before/after {load_before[0]:.2f}/{os.getloadavg()[0]:.2f}\n"
    )
    print(
        "Times in µs (median of rounds; crate = worst output offset). best fw = the fastest "
        "framework time (torch in either memory format, ORT, OpenVINO); best fw/crate > 1: the "
        "crate is faster. copy = the better of memcpy and a SIMD copy of x into y; sum = a SIMD sum "
        "of x (both over the data's bytes). offsets = slowest / fastest output offset.\n"
    )
    names = ["torch-nchw", "torch-nhwc", "ort", "openvino"]
    print(
        "| op | layout | shape | t | crate | crate/copy | crate/sum | offsets | "
        + " | ".join(names)
        + " | best fw/crate |"
    )
    print("|---|---|---|---:|---:|---:|---:|---:|" + "---:|" * len(names) + "---:|")
    for r in rows:
        fw = [r.get(n) for n in names]
        best = min((v for v in fw if v is not None), default=None)
        print(
            f"| {r['op']} | {r['layout']} | {r['shape']} | {r['t']} | {fmt_us(r['crate'])} "
            f"| {fmt_ratio(r['crate'], r['copy'])} | {fmt_ratio(r['crate'], r['sum'])} "
            f"| {r['offset_spread']:.2f} | "
            + " | ".join(fmt_us(v) for v in fw)
            + f" | {fmt_ratio(best, r['crate'])} |"
        )
    for note in notes:
        print(f"\nNote: {note}")


if __name__ == "__main__":
    main()
