"""GPU: PyTorch eager FP32 vs torch.compile vs TensorRT FP16, each with CUDA graphs off and on.

Needs a CUDA GPU (``torch.cuda.is_available()``); without one it prints one line saying it
skipped and why, and exits 0. Variants, each measured in its own block (never interleaved):

- ``torch_eager_fp32``            eager ``fused_step``, one launch sequence per step
- ``torch_eager_fp32_cudagraph``  the same S-step loop captured once with ``torch.cuda.CUDAGraph``
- ``torch_compile``               ``torch.compile(mode="default")`` (no CUDA graphs)
- ``torch_compile_cudagraph``     ``torch.compile(mode="reduce-overhead")`` (CUDA graph trees); the
                                  step output is cloned before it is fed back (one small D2D copy per
                                  step: graph outputs are overwritten by the next replay)
- ``tensorrt_fp16``               ``Derainer(plan, cuda_graph=False)``: one enqueue per step
- ``tensorrt_fp16_cudagraph``     ``Derainer(plan, cuda_graph=True)``: the S-step loop as one graph

TensorRT runs only when ``tensorrt`` and cuda-python import: with ``--plan`` (a ``*.trt.plan``
built for this GPU), else a FP16 plan is built here from ``--onnx`` (``make_fp16`` then
``build_engine`` with a profile around ``--size``, unverified) into a temporary folder.

Per variant: ``step_ms`` (one step, inputs on the device, synchronised; for graph variants the
S-step loop / S), ``loop_ms`` (S steps on device inputs), ``frame_ms`` (u8 frame in, u8 frame out:
host pre/post, H2D, S steps, D2H).

    python benchmarks/gpu.py --size 512 --steps 10 [--plan model.fp16.trt.plan] [--variants a,b] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DEFAULT_CKPT, DEFAULT_ONNX, machine, real_frame

VARIANTS = ("torch_eager_fp32", "torch_eager_fp32_cudagraph", "torch_compile", "torch_compile_cudagraph",
            "tensorrt_fp16", "tensorrt_fp16_cudagraph")


def skip_reason() -> str | None:
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.cuda.is_available():
        return f"no CUDA GPU (torch {torch.__version__}: torch.cuda.is_available() is False)"
    return None


def timed(fn, *, runs: int, warmup: int, pre=None) -> dict:
    """Median / min wall ms of ``fn()`` (which must synchronise); ``pre()`` runs untimed before each call."""
    for _ in range(warmup):
        if pre is not None:
            pre()
        fn()
    times = []
    for _ in range(runs):
        if pre is not None:
            pre()
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return {"median_ms": statistics.median(times), "min_ms": min(times), "runs": runs}


class TorchCase:
    """The fused step of the checkpoint on the GPU with every input prepared once."""

    def __init__(self, ckpt: Path, frame: np.ndarray, steps: int, device: str = "cuda") -> None:
        import torch

        from runtime.schedule import DDIMSchedule, initial_noise
        from training.checkpoint import build_estimator, load_checkpoint, model_configs
        from training.diffusion import pad_to_multiple, to_tensor

        self.torch = torch
        self.dev = torch.device(device)
        ck = load_checkpoint(ckpt)
        self.est = build_estimator(ck, "derain").to(self.dev)
        sched = DDIMSchedule(model_configs(ck).schedule)
        ts = sched.set_timesteps(steps)
        coefs = sched.coefficients()
        self.steps = steps
        self.frame = frame
        self.h, self.w = frame.shape[:2]
        self.cond_p, _ = pad_to_multiple(to_tensor(frame).to(self.dev), self.est.size_multiple)
        self.pad = pad_to_multiple
        self.to_tensor = to_tensor
        # x_T as the runtime makes it (PCG64 on the host), kept on the device like Derainer's cache.
        self.noise = torch.from_numpy(initial_noise(tuple(self.cond_p.shape), 0)).to(self.dev)
        self.t = [torch.full((1,), float(t), device=self.dev) for t in ts]  # one contiguous tensor per step
        self.coef = [torch.from_numpy(np.ascontiguousarray(coefs[i][None])).to(self.dev) for i in range(steps)]

    def sync(self) -> None:
        if self.dev.type == "cuda":
            self.torch.cuda.synchronize()

    def loop(self, step, x, cond):
        for i in range(self.steps):
            x = step(x, cond, self.t[i], self.coef[i])
        return x

    def frame_in(self):
        """u8 host frame -> padded cond on the device (what a frame's pre-processing costs)."""
        return self.pad(self.to_tensor(self.frame).to(self.dev, non_blocking=False), self.est.size_multiple)[0]

    def frame_out(self, x) -> np.ndarray:
        from training.diffusion import to_uint8

        return to_uint8(x[..., :self.h, :self.w])  # D2H, synchronises


def torch_plain(case: TorchCase, step, a) -> dict:
    """step / loop / frame of a step function called once per step (eager or compiled)."""
    torch = case.torch
    mid = case.steps // 2
    out = {}
    with torch.no_grad():
        t0 = time.perf_counter()
        step(case.noise, case.cond_p, case.t[mid], case.coef[mid])  # first call: compiles if compiled
        case.sync()
        out["first_call_s"] = time.perf_counter() - t0

        def one():
            step(case.noise, case.cond_p, case.t[mid], case.coef[mid])
            case.sync()

        def loop():
            case.loop(step, case.noise, case.cond_p)
            case.sync()

        def frame():
            case.frame_out(case.loop(step, case.noise, case.frame_in()))

        out["step_ms"] = timed(one, runs=a.runs * case.steps, warmup=a.warmup)
        out["loop_ms"] = timed(loop, runs=a.runs, warmup=a.warmup)
        out["frame_ms"] = timed(frame, runs=a.runs, warmup=a.warmup)
    return out


def torch_eager_graph(case: TorchCase, a) -> dict:
    """The eager S-step loop captured once as a CUDA graph on static buffers."""
    from training.multiscale import fused_step

    torch = case.torch
    est = case.est

    def step(x, cond, t, coef):
        return fused_step(est, x, cond, t, coef)

    with torch.no_grad():
        static_x, static_cond = case.noise.clone(), case.cond_p.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up before capture (cuDNN algorithm choice, allocator)
            for _ in range(2):
                case.loop(step, static_x, static_cond)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        t0 = time.perf_counter()
        with torch.cuda.graph(graph):
            static_out = case.loop(step, static_x, static_cond)
        case.sync()
        capture_s = time.perf_counter() - t0

        def reset():
            static_x.copy_(case.noise)

        def loop():
            graph.replay()
            case.sync()

        def frame():
            static_cond.copy_(case.frame_in())
            static_x.copy_(case.noise)
            graph.replay()
            case.frame_out(static_out)

        loop_ms = timed(loop, runs=a.runs, warmup=a.warmup, pre=reset)
    return {"capture_s": capture_s, "loop_ms": loop_ms,
            "step_ms": {"median_ms": loop_ms["median_ms"] / case.steps, "derived": "loop / S"},
            "frame_ms": timed(frame, runs=a.runs, warmup=a.warmup)}


def torch_compiled(case: TorchCase, a, *, cudagraph: bool) -> dict:
    from training.multiscale import fused_step

    torch = case.torch
    est = case.est
    compiled = torch.compile(lambda x, cond, t, coef: fused_step(est, x, cond, t, coef),
                             mode="reduce-overhead" if cudagraph else "default", dynamic=False)
    if not cudagraph:
        return torch_plain(case, compiled, a)

    def step(x, cond, t, coef):
        torch.compiler.cudagraph_mark_step_begin()
        return compiled(x, cond, t, coef).clone()  # graph outputs are overwritten by the next replay

    res = torch_plain(case, step, a)
    res["step_ms"]["note"] = "one replay of the per-step graph (+ clone)"
    return res


def torch_block(ckpt: Path, frame: np.ndarray, a, emit=None) -> dict:
    from training.multiscale import fused_step

    if not any(v.startswith("torch") for v in a.variants):
        return {}  # no torch variant asked for: do not load the checkpoint onto the GPU
    case = TorchCase(ckpt, frame, a.steps, device=a.device)
    est = case.est
    variants = {
        "torch_eager_fp32": lambda: torch_plain(case, lambda x, c, t, k: fused_step(est, x, c, t, k), a),
        "torch_eager_fp32_cudagraph": lambda: torch_eager_graph(case, a),
        "torch_compile": lambda: torch_compiled(case, a, cudagraph=False),
        "torch_compile_cudagraph": lambda: torch_compiled(case, a, cudagraph=True),
    }
    out = {}
    for name, run in variants.items():  # one block per variant
        if name not in a.variants:
            continue
        try:
            out[name] = run()
        except Exception as e:  # one failing variant must not hide the others
            out[name] = {"error": f"{type(e).__name__}: {e}"}
        if emit is not None:
            emit(name, out[name])
    return out


def tensorrt_plan(a, tmp: Path) -> tuple[Path | None, str | None]:
    """(plan, None) or (None, why TensorRT is skipped)."""
    try:
        import tensorrt  # noqa: F401
        from cuda.bindings import runtime  # noqa: F401
    except ImportError as e:
        return None, f"tensorrt / cuda-python not importable ({e}); pip install 'raindiffusion-edge[trt]'"
    if a.plan is not None:
        return (a.plan, None) if a.plan.is_file() else (None, f"{a.plan} not found")
    if not a.onnx.is_file():
        return None, f"no --plan and {a.onnx} not found to build one from"
    from rd_export.fp16 import make_fp16
    from rd_export.tensorrt import build_engine

    fp16 = make_fp16(a.onnx, tmp / "model.fp16.onnx")
    m = max(64, a.size)
    plan = build_engine(fp16, out=tmp / "model.fp16.trt.plan", min_size=(64, 64), opt_size=(a.size, a.size),
                        max_size=(m, m), batch=1, verify=False)
    return plan, None


def tensorrt_variant(plan: Path, frame: np.ndarray, a, *, graph: bool) -> dict:
    import torch

    from runtime.derainer import Derainer, pad_reflect, to_float
    from runtime.schedule import initial_noise

    with Derainer(plan, steps=a.steps, cuda_graph=graph) as d:
        d.derain(frame)  # bind + warm (with graphs on, the next full run captures the loop)
        be = d.backend
        n, hp, wp = be.shape
        x_T = initial_noise((n, 3, hp, wp), d.seed, d.noise_scale)  # what Derainer feeds for this shape
        be.set_cond(pad_reflect(to_float(frame[None]), hp, wp))

        def reset():
            be.set_x(x_T)

        def loop():
            be.run()
            torch.cuda.synchronize()  # device-wide: waits for the backend's stream too

        res = {"loop_ms": timed(loop, runs=a.runs, warmup=a.warmup + 1, pre=reset)}
        if graph:
            res["step_ms"] = {"median_ms": res["loop_ms"]["median_ms"] / a.steps, "derived": "loop / S"}
            res["graph_captured"] = bool(getattr(be, "graph_captured", False))
            res["graph_error"] = getattr(be, "graph_error", None)
        else:
            mid = a.steps // 2

            def one():
                be.run_step(mid)
                torch.cuda.synchronize()

            res["step_ms"] = timed(one, runs=a.runs * a.steps, warmup=a.warmup, pre=reset)
        res["frame_ms"] = timed(lambda: d.derain(frame), runs=a.runs, warmup=a.warmup)
    return res


def tensorrt_block(plan: Path, frame: np.ndarray, a, emit=None) -> dict:
    out = {}
    for name, graph in (("tensorrt_fp16", False), ("tensorrt_fp16_cudagraph", True)):
        if name not in a.variants:
            continue
        try:
            out[name] = tensorrt_variant(plan, frame, a, graph=graph)
        except Exception as e:  # one failing variant must not hide the others
            out[name] = {"error": f"{type(e).__name__}: {e}"}
        if emit is not None:
            emit(name, out[name])
    return out


def print_row(name: str, v: dict) -> None:
    """One table row, printed (and flushed) as soon as its variant is measured."""
    if "error" in v:
        print(f"{name:28s} failed: {v['error']}", flush=True)
        return
    f = v["frame_ms"]["median_ms"]
    print(f"{name:28s} {v['step_ms']['median_ms']:9.3f} {v['loop_ms']['median_ms']:11.2f} {f:9.2f} "
          f"{1e3 / f:9.1f}", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, default=DEFAULT_CKPT)
    ap.add_argument("--onnx", type=Path, default=DEFAULT_ONNX, help="FP32 ONNX a FP16 plan is built from")
    ap.add_argument("--plan", type=Path, default=None, help="a TensorRT plan built for this GPU")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--variants", default=",".join(VARIANTS),
                    help="comma-separated subset of: " + ", ".join(VARIANTS) + " (default: all)")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                    help="cpu runs the torch eager variant off-GPU (a smoke test, not a GPU number)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    a.variants = [v.strip() for v in a.variants.split(",") if v.strip()]
    unknown = [v for v in a.variants if v not in VARIANTS]
    if unknown or not a.variants:
        print(f"gpu: unknown --variants {', '.join(unknown) or '(none given)'}; choose from {', '.join(VARIANTS)}",
              file=sys.stderr)
        return 2
    if a.device == "cpu" and set(a.variants) != {"torch_eager_fp32"}:
        print("gpu: --device cpu runs only --variants torch_eager_fp32 (the others need CUDA)", file=sys.stderr)
        return 2
    why = skip_reason() if a.device == "cuda" else None
    if why is not None:
        print(json.dumps({"skipped": True, "reason": why}) if a.json else f"gpu: skipped: {why}")
        return 0
    if not a.checkpoint.is_file():
        print(f"gpu: {a.checkpoint} not found (train the default model first, or pass --checkpoint)",
              file=sys.stderr)
        return 2
    import torch

    frame = real_frame(a.size, a.size)
    gpu = torch.cuda.get_device_name(0) if a.device == "cuda" else "cpu (smoke test)"
    report = {"size": a.size, "steps": a.steps, "machine": machine(), "gpu": gpu,
              "torch": torch.__version__}
    # Block 1: torch (each variant a block); block 2: TensorRT. Text rows stream as each variant
    # finishes, so a run cut short (a lease's time limit) still reports what it measured.
    emit = None
    if not a.json:
        print(f"{a.size}x{a.size}, {a.steps} steps, {report['gpu']}, torch {report['torch']}")
        print(f"{'variant':28s} {'ms/step':>9s} {'ms/S steps':>11s} {'ms/frame':>9s} {'frames/s':>9s}", flush=True)
        emit = print_row
    variants = torch_block(a.checkpoint, frame, a, emit)
    why_trt = None
    if any(v.startswith("tensorrt") for v in a.variants):
        with tempfile.TemporaryDirectory(prefix="rd_gpu_bench_") as tmp:
            try:
                plan, why_trt = tensorrt_plan(a, Path(tmp))
            except Exception as e:
                plan, why_trt = None, f"building a FP16 plan failed: {type(e).__name__}: {e}"
            if plan is not None:
                variants.update(tensorrt_block(plan, frame, a, emit))
    report["variants"] = variants
    report["tensorrt_skipped"] = why_trt
    if a.json:
        print(json.dumps(report, indent=2))
    elif why_trt:
        print(f"tensorrt: skipped: {why_trt}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
