"""Buffer reuse: the runtime's bound, ping-ponged step loop vs a naive per-step ``session.run()``.

Two measurements, each in its own block (one onnxruntime session alive and busy at a time):

1. **Per step.** The runtime loop (``Derainer(...).backend``: buffers bound once per shape,
   x_t / x_next swapped between two preallocated OrtValues, output written in place) against a
   naive loop over a plain ``onnxruntime.InferenceSession`` (same file, same session options)
   calling ``session.run(None, feeds)`` every step, which allocates a fresh output array each
   time. On CPU the times should match (docs/ARCHITECTURE.md: IOBinding vs ``run()`` equal on CPU); the
   point is that the runtime allocates nothing per step. Allocation is measured with
   tracemalloc in a separate, untimed pass: per step, the peak of traced memory during the
   step above what was traced before it (numpy arrays are traced; onnxruntime's own arena is
   not, so this counts what crosses into Python, e.g. the output array of ``run()``).
2. **Per frame.** ``Derainer.derain`` (u8 in, u8 out: pre/post-processing, noise, S steps)
   against S bare ``backend.run_step`` calls timed one by one; target: frame <= 1.03 x S steps.

    python benchmarks/buffer_reuse.py --size 256 --steps 10 [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DEFAULT_ONNX, machine, median_ms, real_frame

FRAME_TARGET = 1.03


def step_inputs(onnx: Path, frame: np.ndarray, steps: int, seed: int = 0):
    """(cond_p, x_T, t [S, 1], coef [S, 1, 4]) exactly as ``Derainer(onnx, steps=, seed=)`` feeds its backend."""
    from runtime.derainer import pad_reflect, to_float
    from runtime.manifest import Manifest
    from runtime.schedule import DDIMSchedule, ScheduleConfig, initial_noise

    manifest = Manifest.for_artifact(onnx)
    m = manifest.step_descriptor.size_multiple
    h, w = frame.shape[:2]
    hp, wp = -(-h // m) * m, -(-w // m) * m
    cond_p = np.ascontiguousarray(pad_reflect(to_float(frame[None]), hp, wp))
    x_T = initial_noise(cond_p.shape, seed)
    s = manifest.schedule
    sched = DDIMSchedule(ScheduleConfig(num_train_timesteps=int(s["num_train_timesteps"]),
                                        beta_start=float(s["beta_start"]), beta_end=float(s["beta_end"])))
    ts = sched.set_timesteps(steps)
    t = np.ascontiguousarray(np.asarray(ts, dtype=np.float32)[:, None])
    coef = np.ascontiguousarray(sched.coefficients()[:, None, :])
    return cond_p, x_T, t, coef


def time_steps(restart, step, *, steps: int, runs: int, warmup: int) -> list[list[float]]:
    """``runs`` x ``steps`` individually timed step calls (ms); ``restart()`` (untimed) before each run."""
    for _ in range(warmup):
        restart()
        for i in range(steps):
            step(i)
    out = []
    for _ in range(runs):
        restart()
        times = []
        for i in range(steps):
            t0 = time.perf_counter()
            step(i)
            times.append((time.perf_counter() - t0) * 1e3)
        out.append(times)
    return out


def traced_bytes_per_step(restart, step, *, steps: int, runs: int) -> dict:
    """tracemalloc over ``runs`` warm runs of ``steps`` steps (untimed).

    ``peak``: per step, the peak of traced memory during the step above the level before it;
    ``net``: traced growth over the whole pass, per step.
    """
    restart()
    step(0)  # warm: first-call caches are not per-step costs
    peaks = []
    tracemalloc.start()
    try:
        start = tracemalloc.get_traced_memory()[0]
        for _ in range(runs):
            restart()
            for i in range(steps):
                before = tracemalloc.get_traced_memory()[0]
                tracemalloc.reset_peak()
                step(i)
                peaks.append(tracemalloc.get_traced_memory()[1] - before)
        net = tracemalloc.get_traced_memory()[0] - start
    finally:
        tracemalloc.stop()
    return {"traced_peak_bytes_per_step_median": statistics.median(peaks),
            "traced_peak_bytes_per_step_max": max(peaks), "traced_net_bytes_per_step": net / (runs * steps)}


def outputs_per_step(restart, step, output, *, steps: int) -> dict:
    """One untimed, untraced run: bytes of fresh output arrays handed back per step and the
    distinct output data pointers. tracemalloc cannot see these for onnxruntime's ``run()``:
    its outputs are numpy arrays over onnxruntime's own arena memory (base is a PyCapsule)."""
    restart()
    fresh, pointers = 0, set()
    for i in range(steps):
        step(i)
        arr, ptr = output()
        fresh += 0 if arr is None else arr.nbytes
        pointers.add(ptr)
    return {"fresh_output_bytes_per_step": fresh / steps, "output_pointers": sorted(pointers)}


def summarise(step_ms: list[list[float]]) -> dict:
    flat = sorted(t for run in step_ms for t in run)
    per_run = sorted(sum(run) for run in step_ms)
    return {"step_median_ms": statistics.median(flat), "step_min_ms": flat[0],
            "steps_sum_median_ms": statistics.median(per_run), "timed_steps": len(flat)}


def runtime_block(onnx: Path, frame: np.ndarray, steps: int, runs: int, warmup: int, threads: int) -> dict:
    """The Derainer / backend loop: per-step times, bytes per step, and whole frames."""
    from runtime.derainer import Derainer

    cond_p, x_T, _, _ = step_inputs(onnx, frame, steps)
    with Derainer(onnx, steps=steps, seed=0, threads=threads, tile=max(frame.shape[:2])) as d:  # full frame
        be = d.backend
        d.derain(frame)  # binds the shape and the schedule once

        def restart():
            be.bind(*cond_p.shape[:1], *cond_p.shape[2:])  # no-op: already bound
            be.set_cond(cond_p)
            be.set_x(x_T)

        res = summarise(time_steps(restart, be.run_step, steps=steps, runs=runs, warmup=warmup))
        res.update(traced_bytes_per_step(restart, be.run_step, steps=steps, runs=runs))
        if hasattr(be, "output_pointer") and hasattr(be, "buffer_pointers"):
            bound = be.buffer_pointers()
            res.update(outputs_per_step(restart, be.run_step, lambda: (None, be.output_pointer()), steps=steps))
            res["outputs_in_bound_buffers"] = set(res["output_pointers"]) <= set(bound[:2])
            res["bound_buffers_unchanged"] = be.buffer_pointers() == bound
        res["frame"] = median_ms(lambda: d.derain(frame), runs=runs, warmup=warmup)
    return res


def naive_block(onnx: Path, frame: np.ndarray, steps: int, runs: int, warmup: int, threads: int) -> dict:
    """A plain InferenceSession, ``run()`` per step: a fresh output array every step."""
    import onnxruntime as ort

    cond_p, x_T, t, coef = step_inputs(onnx, frame, steps)
    options = ort.SessionOptions()  # as the runtime's backend sets them
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(onnx), options, providers=["CPUExecutionProvider"])
    state = {"x": x_T}

    def restart():
        state["x"] = x_T

    def step(i: int):
        state["x"] = sess.run(None, {"x_t": state["x"], "cond": cond_p, "t": t[i], "coef": coef[i]})[0]

    res = summarise(time_steps(restart, step, steps=steps, runs=runs, warmup=warmup))
    res.update(traced_bytes_per_step(restart, step, steps=steps, runs=runs))
    res.update(outputs_per_step(restart, step, lambda: (state["x"], state["x"].ctypes.data), steps=steps))
    res["output_bytes"] = int(x_T.nbytes)
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--onnx", type=Path, default=DEFAULT_ONNX)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--runs", type=int, default=5, help="timed runs of S steps (and timed frames) per variant")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    if not a.onnx.is_file():
        print(f"buffer_reuse: {a.onnx} not found (export the default model first, or pass --onnx)", file=sys.stderr)
        return 2
    frame = real_frame(a.size, a.size)
    # Block 1: the runtime (steps, bytes, frames); block 2: the naive session (never interleaved).
    rt = runtime_block(a.onnx, frame, a.steps, a.runs, a.warmup, a.threads)
    nv = naive_block(a.onnx, frame, a.steps, a.runs, a.warmup, a.threads)
    frame_ratio = rt["frame"]["median_ms"] / rt["steps_sum_median_ms"]
    report = {
        "size": a.size, "steps": a.steps, "threads": a.threads, "artifact": str(a.onnx), "machine": machine(),
        "runtime_loop": rt, "naive_run": nv,
        "naive_over_runtime_step": nv["step_median_ms"] / rt["step_median_ms"],
        "frame_over_bare_steps": frame_ratio, "frame_target": FRAME_TARGET,
        "frame_within_target": frame_ratio <= FRAME_TARGET,
    }
    if a.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"{a.size}x{a.size}, {a.steps} steps, {a.threads} threads, {report['machine']['cpu']}")
    print(f"{'per step':24s} {'median ms':>10s} {'min ms':>8s} {'traced peak B':>14s} {'traced net B':>13s} "
          f"{'fresh output B':>15s}")
    for name, r in (("runtime loop (bound)", rt), ("naive session.run()", nv)):
        print(f"{name:24s} {r['step_median_ms']:10.2f} {r['step_min_ms']:8.2f} "
              f"{r['traced_peak_bytes_per_step_median']:14,.0f} {r['traced_net_bytes_per_step']:13,.0f} "
              f"{r.get('fresh_output_bytes_per_step', float('nan')):15,.0f}")
    print(f"naive / runtime per step: {report['naive_over_runtime_step']:.3f}x")
    if "outputs_in_bound_buffers" in rt:
        print(f"runtime: x_next written into the 2 bound buffers every step: {rt['outputs_in_bound_buffers']}, "
              f"bound buffers unchanged: {rt['bound_buffers_unchanged']}; naive: a fresh "
              f"{nv['output_bytes']:,} B output array every step over {len(nv['output_pointers'])} distinct "
              f"arena addresses")
    print(f"frame (Derainer.derain) {rt['frame']['median_ms']:.1f} ms vs {a.steps} bare run_step "
          f"{rt['steps_sum_median_ms']:.1f} ms: {frame_ratio:.3f}x (target <= {FRAME_TARGET}: "
          f"{'met' if report['frame_within_target'] else 'NOT met'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
