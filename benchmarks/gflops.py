"""Achieved GFLOP/s of one fused DDIM step vs this machine's measured FP32 matmul rate.

1. FLOPs of one fused step (the exported graph: multi-scale estimator + DDIM update) at
   ``--size`` x ``--size``, counted once with ``torch.utils.flop_counter.FlopCounterMode`` on the
   torch model. It counts matmul-class ops (convolutions, matmuls, attention) as 2 x MACs;
   element-wise work (GroupNorm, SiLU, softmax, resize, the update) is not counted.
2. The machine's reference rate: best of ``--gemm-runs`` FP32 GEMMs of ``--gemm`` x ``--gemm``
   in torch with ``--threads`` threads (the same threads as the variants), 2 n^3 / time; numpy's
   GEMM is printed beside it as a cross-check (its BLAS picks its own thread count).
3. Per-step time (median) of torch eager FP32 (``fused_step`` under no_grad) and of onnxruntime
   FP32 / INT8 (``Derainer(...).backend.run_step``: the runtime's bound loop), each in its own
   block. Achieved GFLOP/s = step FLOPs / step time; INT8 is reported as *effective* FLOP/s
   (the FP32 step's FLOPs over the INT8 step time), so its fraction can exceed what FP32 could.

    python benchmarks/gflops.py --size 256 [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DEFAULT_CKPT, DEFAULT_INT8, DEFAULT_ONNX, machine, median_ms, real_frame, runtime_artifacts

from runtime.cpu import cpu_flags


def step_inputs(frame: np.ndarray, multiple: int, steps: int, seed: int = 0):
    """(x_T, cond_p, t [S, 1] float32, coef [S, 1, 4] float32) as numpy, padded to the size multiple."""
    from runtime.derainer import pad_reflect, to_float
    from runtime.schedule import DDIMSchedule, ScheduleConfig, initial_noise

    h, w = frame.shape[:2]
    hp, wp = -(-h // multiple) * multiple, -(-w // multiple) * multiple
    cond_p = np.ascontiguousarray(pad_reflect(to_float(frame[None]), hp, wp))
    sched = DDIMSchedule(ScheduleConfig())
    ts = np.asarray(sched.set_timesteps(steps), dtype=np.float32)[:, None]
    return initial_noise(cond_p.shape, seed), cond_p, np.ascontiguousarray(ts), sched.coefficients()[:, None, :]


def isa() -> dict:
    """What the CPU reports (cpuinfo flags of interest) and the kernels torch dispatches to."""
    flags = sorted(f for f in cpu_flags() if f.startswith(("avx512", "amx")) or f in ("avx2", "fma", "avx_vnni"))
    out = {"cpu_flags": flags}
    try:
        import torch

        out["torch_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    except (ImportError, AttributeError):
        pass
    return out


def best_gemm_s(matmul, *, runs: int) -> float:
    matmul()  # warm-up (thread pool, BLAS buffers)
    best = float("inf")
    for _ in range(runs):
        t0 = time.perf_counter()
        matmul()
        best = min(best, time.perf_counter() - t0)
    return best


def torch_block(ckpt: Path, frame: np.ndarray, a) -> dict:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from training.checkpoint import build_estimator, load_checkpoint
    from training.multiscale import fused_step

    torch.set_num_threads(a.threads)
    est = build_estimator(load_checkpoint(ckpt), "derain")
    x_T, cond_p, t, coef = (torch.from_numpy(v) for v in step_inputs(frame, est.size_multiple, a.steps))
    i = len(t) // 2  # a mid-schedule step: every step runs the same graph
    args = (x_T, cond_p, t[i], coef[i])
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fused_step(est, *args)
    flops = int(counter.get_total_flops())

    n = a.gemm
    g = torch.Generator().manual_seed(0)
    m1, m2 = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
    gemm = 2 * n**3 / best_gemm_s(lambda: torch.mm(m1, m2), runs=a.gemm_runs) / 1e9

    with torch.no_grad():
        step = median_ms(lambda: fused_step(est, *args), runs=a.runs, warmup=a.warmup)
    return {"flops_per_step": flops, "padded_size": list(cond_p.shape[-2:]), "size_multiple": est.size_multiple,
            "torch_gemm_gflops": gemm, "torch_threads": torch.get_num_threads(), "torch_eager_fp32": step}


def numpy_block(a) -> dict:
    n = a.gemm
    rng = np.random.default_rng(0)
    m1, m2 = rng.standard_normal((n, n), dtype=np.float32), rng.standard_normal((n, n), dtype=np.float32)
    return {"numpy_gemm_gflops": 2 * n**3 / best_gemm_s(lambda: m1 @ m2, runs=a.gemm_runs) / 1e9}


def runtime_step(path: Path, frame: np.ndarray, a) -> dict:
    """Median of single ``backend.run_step`` calls over the schedule; x reset (untimed) every S steps."""
    from runtime.derainer import Derainer

    with Derainer(path, steps=a.steps, threads=a.threads, tile=a.size) as d:  # full frame, as torch
        x_T, cond_p, _, _ = step_inputs(frame, d.size_multiple, a.steps)
        be = d.backend
        be.bind(1, *cond_p.shape[-2:])
        be.set_cond(cond_p)
        state = {"i": 0}

        def step():
            i = state["i"]
            if i == 0:
                be.set_x(x_T)  # tiny next to a step; keeps the values on a real trajectory
            be.run_step(i)
            state["i"] = (i + 1) % d.steps

        return median_ms(step, runs=a.runs, warmup=a.warmup)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, default=DEFAULT_CKPT)
    ap.add_argument("--onnx", type=Path, default=DEFAULT_ONNX)
    ap.add_argument("--int8", type=Path, default=DEFAULT_INT8, help="skipped when the file is absent")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=10, help="schedule the timed steps are drawn from")
    ap.add_argument("--runs", type=int, default=10, help="timed steps per variant")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--gemm", type=int, default=2048, help="GEMM side for the reference matmul rate")
    ap.add_argument("--gemm-runs", type=int, default=5, help="GEMM repetitions (best is kept)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    for p in (a.checkpoint, a.onnx):
        if not p.is_file():
            print(f"gflops: {p} not found (train/export the default model first, or pass --checkpoint/--onnx)",
                  file=sys.stderr)
            return 2
    frame = real_frame(a.size, a.size)
    arts, int8_skipped = runtime_artifacts(a.onnx, a.int8)
    # Block 1: torch (FLOP count, torch GEMM, eager step); block 2: numpy GEMM; block 3: onnxruntime.
    res = torch_block(a.checkpoint, frame, a)
    res.update(numpy_block(a))
    steps = {"torch_eager_fp32": res.pop("torch_eager_fp32")}
    steps.update({name: runtime_step(path, frame, a) for name, path in arts.items()})
    flops = res["flops_per_step"]
    peak = res["torch_gemm_gflops"]  # same thread count as the variants
    variants = {}
    for name, st in steps.items():
        gflops = flops / (st["median_ms"] / 1e3) / 1e9
        variants[name] = {**st, "gflops": gflops, "effective": name.endswith("int8"),
                          "fraction_of_gemm": gflops / peak}
    report = {"size": a.size, "threads": a.threads, "machine": machine(), "isa": isa(), "gemm_n": a.gemm,
              "gemm_peak_gflops": peak, **res, "variants": variants,
              "int8_skipped": int8_skipped}
    if a.json:
        print(json.dumps(report, indent=2))
        return 0
    hp, wp = res["padded_size"]
    print(f"{a.size}x{a.size} (padded {hp}x{wp}), {a.threads} threads, {report['machine']['cpu']}")
    print(f"ISA: cpu flags {' '.join(report['isa']['cpu_flags']) or '?'}; torch kernels "
          f"{report['isa'].get('torch_cpu_capability', '?')}")
    print(f"fused step: {flops / 1e9:.2f} GFLOP (FlopCounterMode: conv/matmul/attention, 2 x MACs)")
    print(f"FP32 GEMM {a.gemm}^2, best of {a.gemm_runs}: torch {res['torch_gemm_gflops']:.1f} GFLOP/s "
          f"({res['torch_threads']} threads; the reference), numpy {res['numpy_gemm_gflops']:.1f} GFLOP/s "
          f"(BLAS default threads)")
    print(f"{'variant':20s} {'ms/step':>9s} {'GFLOP/s':>9s} {'of GEMM':>8s}")
    for name, v in variants.items():
        tag = " (effective: FP32 FLOPs / INT8 time)" if v["effective"] else ""
        print(f"{name:20s} {v['median_ms']:9.1f} {v['gflops']:9.1f} {100 * v['fraction_of_gemm']:7.1f}%{tag}")
    if int8_skipped:
        print(f"onnxruntime_int8: skipped ({int8_skipped})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
