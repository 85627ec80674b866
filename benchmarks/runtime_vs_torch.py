"""The runtime (onnxruntime FP32 / INT8) vs the PyTorch eager reference, on the same model.

Measures one derained frame (S fused DDIM steps) per variant, in blocks (never alternating
torch and onnxruntime calls: their thread pools fight over the cores), and prints each
variant's median and the speedup over torch eager FP32 measured in this same run.

    python benchmarks/runtime_vs_torch.py --size 256 --steps 10 [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DEFAULT_CKPT, DEFAULT_INT8, DEFAULT_ONNX, machine, median_ms, real_frame, runtime_artifacts


def torch_variants(ckpt: Path, frame, steps: int, runs: int, warmup: int, threads: int, bf16: bool) -> dict:
    import torch

    from training.checkpoint import build_estimator, load_checkpoint
    from training.diffusion import ddim_sample, to_tensor

    torch.set_num_threads(threads)
    est = build_estimator(load_checkpoint(ckpt), "derain")
    cond = to_tensor(frame)
    out = {"torch_eager_fp32": median_ms(lambda: ddim_sample(est, cond, steps=steps, seed=0),
                                         runs=runs, warmup=warmup)}

    def bf16_frame():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ddim_sample(est, cond, steps=steps, seed=0)

    if bf16:  # slow where the CPU has no native bf16 (AVX2-only machines emulate it)
        out["torch_eager_bf16_autocast"] = median_ms(bf16_frame, runs=runs, warmup=warmup)
    return out


def runtime_variants(artifacts: dict[str, Path], frame, steps: int, runs: int, warmup: int, threads: int) -> dict:
    from runtime.derainer import Derainer

    out = {}
    for name, path in artifacts.items():
        with Derainer(path, steps=steps, threads=threads, tile=max(frame.shape[:2])) as d:  # full frame, as torch
            out[name] = median_ms(lambda d=d: d.derain(frame), runs=runs, warmup=warmup)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, default=DEFAULT_CKPT)
    ap.add_argument("--onnx", type=Path, default=DEFAULT_ONNX)
    ap.add_argument("--int8", type=Path, default=DEFAULT_INT8, help="skipped when the file is absent")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-bf16", action="store_true", help="skip torch bf16 autocast (very slow without AVX-512 BF16)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    for p in (a.checkpoint, a.onnx):
        if not p.is_file():
            print(f"runtime_vs_torch: {p} not found (train/export the default model first)", file=sys.stderr)
            return 2
    frame = real_frame(a.size, a.size)
    arts, _ = runtime_artifacts(a.onnx, a.int8)
    # Block 1: torch; block 2: onnxruntime (never interleaved).
    res = torch_variants(a.checkpoint, frame, a.steps, a.runs, a.warmup, a.threads, not a.no_bf16)
    res.update(runtime_variants(arts, frame, a.steps, a.runs, a.warmup, a.threads))
    base = res["torch_eager_fp32"]["median_ms"]
    speedup = {k: base / v["median_ms"] for k, v in res.items()}
    report = {"size": a.size, "steps": a.steps, "threads": a.threads, "machine": machine(),
              "variants": res, "speedup_vs_torch_eager_fp32": speedup}
    if "onnxruntime_int8" in res:
        report["int8_vs_onnxruntime_fp32"] = res["onnxruntime_fp32"]["median_ms"] / res["onnxruntime_int8"]["median_ms"]
    if a.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"{a.size}x{a.size}, {a.steps} steps, {a.threads} threads, {report['machine']['cpu']}")
        print(f"{'variant':28s} {'median ms/frame':>16s} {'ms/step':>9s} {'x torch eager':>14s}")
        for k, v in res.items():
            print(f"{k:28s} {v['median_ms']:16.1f} {v['median_ms'] / a.steps:9.1f} {speedup[k]:14.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
