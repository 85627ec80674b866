"""Latency of one frame through ``Derainer`` at camera sizes, where the time goes, and peak memory.

For an artifact (default: the shipped model) and each frame size (HxW) and step count S it times
``Derainer.derain`` on a real rainy photo resized to that size (median of ``--runs`` after one
warm-up) and splits one frame's time into its phases by timing the calls Derainer makes:

- ``convert``: uint8 -> float, padding, float -> uint8 (the frame's own arrays);
- ``prologue``: the predictor P (``frame_prologue`` on the whole frame, or per tile);
- ``steps``: the fused DDIM steps (``run_step`` / ``run``);
- ``tiles``: cutting tiles out of the canvas, blending them back, host <-> engine copies;
- ``blend``: keeping the share of the refiner's correction (``keep_correction``: the low-pass
  Gaussian of the whole frame where the manifest asks for one);
- ``other``: the rest (Python, locks, noise).

Peak memory (the high-water RSS, VmHWM) of each (size, S) is measured in a fresh child process that
derains one frame. The anchor, measured in the same run: torch eager doing the same work (the prologue on the
whole frame, then S fused steps over the same tiles, batched the same way) - the ratio says what
the deploy path buys over the training framework; ``--bf16`` adds torch under bf16 autocast (the
fastest torch path on CPUs with BF16).

    python benchmarks/frame_latency.py --sizes 720x1280,1080x1920 --steps 0,2,3 --runs 3

State the CPU (``grep -m1 flags /proc/cpuinfo``: AVX2 or AVX-512/VNNI) with every figure.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DEFAULT_CKPT, DEFAULT_ONNX, add_device_option, frame_size, real_frame, step_counts

from runtime.cpu import isa_label

PHASES = ("convert", "prologue", "steps", "tiles", "blend", "other")


class PhaseTimer:
    """Wraps the Derainer's and its backend's methods on the instance and sums their time per phase."""

    def __init__(self, derainer) -> None:
        import runtime.derainer as dmod

        self.totals = dict.fromkeys(PHASES, 0.0)
        be = derainer.backend
        self._patches = []
        for obj, name, phase in ((be, "frame_prologue", "prologue"), (be, "run_prologue", "prologue"),
                                 (be, "run_step", "steps"), (be, "run", "steps"),
                                 (be, "set_cond", "tiles"), (be, "set_x", "tiles"), (be, "get_x", "tiles"),
                                 (be, "set_rainy", "tiles"), (be, "get_cond", "tiles")):
            self._wrap(obj, name, phase)
        for name in ("to_float", "to_uint8", "pad_reflect"):
            self._wrap(dmod, name, "convert")
        self._wrap(dmod, "keep_correction", "blend")
        import runtime.tiling as tmod

        for name in ("cut", "accumulate", "blend"):
            self._wrap(tmod.TileBlender, name, "tiles", method=True)

    def _wrap(self, obj, name: str, phase: str, method: bool = False) -> None:
        original = getattr(obj, name)
        totals = self.totals

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                totals[phase] += time.perf_counter() - t0

        setattr(obj, name, timed)
        self._patches.append((obj, name, original))

    def restore(self) -> None:
        for obj, name, original in reversed(self._patches):
            setattr(obj, name, original)


def peak_rss_child(artifact: Path, size: tuple[int, int], steps: int, threads: int, overlap: int | None,
                   device: str | None = None) -> float:
    """Max RSS (MiB) of a fresh process that derains one frame of ``size`` at ``steps``."""
    code = (
        "import sys, resource; sys.path.insert(0, sys.argv[1]);"
        "from _common import real_frame; from runtime.derainer import Derainer;"
        "o = None if sys.argv[7] == 'None' else int(sys.argv[7]); dev = None if sys.argv[8] == 'None' else sys.argv[8];"
        "d = Derainer(sys.argv[2], steps=int(sys.argv[5]), threads=int(sys.argv[6]), overlap=o, device=dev);"
        "d.derain(real_frame(int(sys.argv[3]), int(sys.argv[4])));"
        # VmHWM: this process's own high-water mark; ru_maxrss would keep the parent's across fork + exec
        "hwm = [ln for ln in open('/proc/self/status') if ln.startswith('VmHWM')];"
        "print(int(hwm[0].split()[1]) / 1024 if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)"
    )
    out = subprocess.run([sys.executable, "-c", code, str(Path(__file__).resolve().parent), str(artifact),
                          str(size[0]), str(size[1]), str(steps), str(threads), str(overlap), str(device)],
                         capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def torch_anchor(checkpoint: Path, size: tuple[int, int], steps: int, tile: int, overlap: int, batch: int,
                 threads: int, *, bf16: bool = False, blend: tuple[float, float] = (1.0, 0.0)) -> float:
    """Seconds of torch eager doing one frame's work the way the runtime does it (see the docstring);
    ``bf16``: under ``torch.autocast("cpu", torch.bfloat16)`` (oneDNN's bf16 kernels, AMX where the CPU
    has it); ``blend``: the artifact's (refine strength, low-pass sigma), kept by the same numpy call
    the runtime makes. The second of two runs: the first builds oneDNN's kernels."""
    import contextlib

    import torch

    from runtime.derainer import pad_reflect, to_float
    from runtime.tiling import TileBlender, plan_tiles
    from training.checkpoint import build_estimator, build_prologue, load_checkpoint

    torch.set_num_threads(threads)
    ckpt = load_checkpoint(checkpoint)
    est, pro = build_estimator(ckpt), build_prologue(ckpt)
    m = est.size_multiple
    h, w = size
    hp, wp = -(-h // m) * m, -(-w // m) * m
    y = pad_reflect(to_float(real_frame(h, w)[None]), hp, wp)
    blender = TileBlender(plan_tiles(hp, wp, tile, overlap, multiple=m))
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    for _ in range(2):
        seconds = _torch_frame(torch, est, pro, y, blender, steps, tile, batch, autocast, blend)
    return seconds


def _torch_frame(torch, est, pro, y, blender, steps, tile, batch, autocast, blend) -> float:
    from runtime.lowpass import keep_correction
    from runtime.schedule import DDIMSchedule, initial_noise, step_inputs
    from training.multiscale import fused_step

    hp, wp = y.shape[-2:]
    k = len(blender.plan)
    with torch.inference_mode(), autocast():
        t0 = time.perf_counter()
        cond = pro(torch.from_numpy(y))[0].float().numpy() if pro is not None else y[0]
        if steps:
            s = DDIMSchedule()
            s.set_timesteps(steps)
            canvas = initial_noise((1, 3, hp, wp), 0)[0]
            conds = torch.from_numpy(blender.cut(cond, np.zeros((k, cond.shape[0], tile, tile), np.float32),
                                                 range(k)))
            for i in range(steps):
                acc = np.zeros_like(canvas)
                xs = torch.from_numpy(blender.cut(canvas, np.zeros((k, 3, tile, tile), np.float32), range(k)))
                for j in range(0, k, batch):
                    n = min(batch, k - j)
                    t, coef = step_inputs(s.coefficients(), s.timesteps, i, n)
                    out = fused_step(est, xs[j:j + n], conds[j:j + n], torch.from_numpy(t), torch.from_numpy(coef))
                    blender.accumulate(out.float().numpy(), range(j, j + n), acc)
                canvas = acc
            if pro is not None and blend != (1.0, 0.0):  # the share of the correction, as the runtime keeps it
                keep_correction(canvas, np.ascontiguousarray(cond[3:]), *blend)
        return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--onnx", type=Path, default=DEFAULT_ONNX)
    ap.add_argument("--checkpoint", type=Path, default=DEFAULT_CKPT, help="for the torch eager anchor")
    ap.add_argument("--sizes", default="720x1280", help="comma-separated HxW")
    ap.add_argument("--steps", default="0,2,3", help="comma-separated step counts")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--overlap", type=int, default=None, help="tile overlap (default: the runtime's)")
    add_device_option(ap)
    ap.add_argument("--no-torch", action="store_true", help="skip the torch eager anchor")
    ap.add_argument("--bf16", action="store_true",
                    help="also time torch eager under bf16 autocast (for CPUs with BF16: avx512_bf16 / amx_bf16)")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory child processes")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    if not a.onnx.is_file():
        print(f"frame_latency: {a.onnx} not found", file=sys.stderr)
        return 2
    from runtime.backends import default_device
    from runtime.derainer import Derainer

    sizes = [frame_size(s) for s in a.sizes.split(",")]
    steps = step_counts(a.steps, "frame_latency")
    if steps is None:
        return 2
    rows = []
    # Block 1: the runtime (onnxruntime), every (size, S)
    for size in sizes:
        frame = real_frame(*size)
        for s in steps:
            d = Derainer(a.onnx, steps=s, threads=a.threads, overlap=a.overlap, device=a.device)
            d.derain(frame)  # warm-up: binds buffers, allocates
            times = []
            for _ in range(a.runs):
                t0 = time.perf_counter()
                d.derain(frame)
                times.append(time.perf_counter() - t0)
            timer = PhaseTimer(d)
            t0 = time.perf_counter()
            d.derain(frame)
            total = time.perf_counter() - t0
            timer.restore()
            phases = dict(timer.totals)
            phases["other"] = max(0.0, total - sum(v for k, v in phases.items() if k != "other"))
            med = statistics.median(times)
            rows.append({"size": list(size), "steps": s, "median_s": round(med, 3), "min_s": round(min(times), 3),
                         "fps": round(1.0 / med, 3), "per_step_s": round(phases["steps"] / s, 3) if s else None,
                         "phases_s": {k: round(v, 3) for k, v in phases.items()},
                         "tile": d.native_tile, "overlap": d.overlap, "batch": d.batch, "backend": d.backend.name,
                         "inference_precision": getattr(d.backend, "inference_precision", "f32")})
            d.close()
            if not a.json:
                r = rows[-1]
                print(f"{size[0]}x{size[1]} S={s}: {r['median_s']:.3f} s/frame ({r['fps']:.2f} fps); phases "
                      + ", ".join(f"{k} {v:.3f}" for k, v in r["phases_s"].items()), flush=True)
    # Block 2: peak memory, one child process per (size, S)
    if not a.no_memory:
        for r in rows:
            r["peak_rss_mib"] = round(peak_rss_child(a.onnx, tuple(r["size"]), r["steps"], a.threads, a.overlap,
                                                     a.device), 1)
    # Block 3: the torch eager anchor (same work)
    if not a.no_torch and a.checkpoint.is_file():
        from runtime.manifest import Manifest

        m = Manifest.for_artifact(a.onnx)
        blend = (m.refine_strength, m.refine_lowpass)
        for r in rows:
            t = torch_anchor(a.checkpoint, tuple(r["size"]), r["steps"], r["tile"] or 64, r["overlap"], r["batch"],
                             a.threads, blend=blend)
            r["torch_eager_s"] = round(t, 3)
            r["speedup_vs_torch"] = round(t / r["median_s"], 2)
            if a.bf16:
                t = torch_anchor(a.checkpoint, tuple(r["size"]), r["steps"], r["tile"] or 64, r["overlap"],
                                 r["batch"], a.threads, bf16=True, blend=blend)
                r["torch_bf16_s"] = round(t, 3)
                r["speedup_vs_torch_bf16"] = round(t / r["median_s"], 2)
    isa = isa_label()
    report = {"artifact": str(a.onnx), "threads": a.threads, "device": a.device or default_device(), "cpu_isa": isa,
              "runs": a.runs, "rows": rows,
              "self_max_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if a.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"CPU {isa}, {a.threads} threads")
        for r in rows:
            extra = ""
            if "peak_rss_mib" in r:
                extra += f", peak RSS {r['peak_rss_mib']:.0f} MiB"
            if "torch_eager_s" in r:
                extra += f", torch eager {r['torch_eager_s']:.3f} s ({r['speedup_vs_torch']:.2f}x)"
            if "torch_bf16_s" in r:
                extra += f", torch bf16 autocast {r['torch_bf16_s']:.3f} s ({r['speedup_vs_torch_bf16']:.2f}x)"
            print(f"{r['size'][0]}x{r['size'][1]} S={r['steps']}: {r['median_s']:.3f} s{extra}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
