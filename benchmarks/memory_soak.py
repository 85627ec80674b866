"""Memory soak (issue 7): RSS of one long-lived Derainer over a stream of frames.

Runs ``--frames`` frames (default 500) of ``--size`` x ``--size`` pixels through ONE
``Derainer`` (``--steps`` DDIM steps each), samples the process's resident set size (VmRSS from
/proc/self/status; psutil elsewhere) every ``--every`` frames, and prints the curve and the
growth of RSS after warm-up: ``(RSS at the last frame - RSS after --warmup-frames) / RSS after
--warmup-frames``, in %. Target: within 5% (``--limit``); the exit status is 1 when it is
exceeded. ``slope_kib_per_frame`` (a least-squares fit over the post-warm-up samples) is printed
too: a leak of a few KiB per frame can hide inside a large RSS.

The frames are a real rainy photo shifted by one column per frame (a moving "video"), so every
frame differs but costs nothing to make. This process never imports torch: the RSS is the
runtime's own (numpy + onnxruntime).

    python benchmarks/memory_soak.py --frames 500 --size 128 --steps 2 [--csv rss.csv] [--json]
"""

from __future__ import annotations

import argparse
import csv
import gc
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DEFAULT_ONNX, machine, real_frame


def rss_bytes() -> int:
    """Current resident set size of this process in bytes."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    try:
        import psutil
    except ImportError:
        raise RuntimeError("no /proc/self/status and no psutil: cannot read the current RSS "
                           "(pip install psutil)") from None
    return int(psutil.Process().memory_info().rss)


def soak(derainer, frame: np.ndarray, *, frames: int, every: int, warmup_frames: int) -> dict:
    """Run ``frames`` shifted copies of ``frame`` through ``derainer``; RSS samples and growth.

    Samples are taken after frame 0 and every ``every`` frames and after the last one; the
    baseline is the sample at ``warmup_frames`` (a multiple of ``every`` is best).
    """
    if frames < 2 or every < 1 or not 0 < warmup_frames < frames:
        raise ValueError(f"need frames >= 2, every >= 1 and 0 < warmup_frames < frames; got "
                         f"frames={frames}, every={every}, warmup_frames={warmup_frames}")
    samples: list[tuple[int, float, int]] = []  # (frames done, seconds since start, rss bytes)
    marks = set(range(every, frames + 1, every)) | {1, warmup_frames, frames}
    t0 = time.perf_counter()
    for i in range(frames):
        derainer.derain(np.roll(frame, i, axis=1))
        if i + 1 in marks:
            gc.collect()  # count only what is really still referenced
            samples.append((i + 1, time.perf_counter() - t0, rss_bytes()))
    base = next(r for n, _, r in samples if n == warmup_frames)
    last = samples[-1][2]
    post = [(n, r) for n, _, r in samples if n >= warmup_frames]
    slope = 0.0
    if len(post) >= 2:
        n_arr = np.array([n for n, _ in post], dtype=np.float64)
        r_arr = np.array([r for _, r in post], dtype=np.float64)
        slope = float(np.polyfit(n_arr, r_arr, 1)[0]) / 1024
    return {
        "frames": frames, "every": every, "warmup_frames": warmup_frames,
        "samples": [{"frame": n, "seconds": round(s, 3), "rss_mib": r / 2**20} for n, s, r in samples],
        "rss_first_mib": samples[0][2] / 2**20, "rss_after_warmup_mib": base / 2**20, "rss_last_mib": last / 2**20,
        "rss_max_after_warmup_mib": max(r for _, r in post) / 2**20,
        "growth_after_warmup_pct": 100.0 * (last - base) / base,
        "slope_kib_per_frame": slope,
        "seconds": samples[-1][1],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--onnx", type=Path, default=DEFAULT_ONNX, help="artifact (.onnx or .plan)")
    ap.add_argument("--frames", type=int, default=500)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--every", type=int, default=25, help="sample RSS every N frames")
    ap.add_argument("--warmup-frames", type=int, default=50, help="baseline = RSS after this many frames")
    ap.add_argument("--limit", type=float, default=5.0, help="allowed growth after warm-up, %%")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--csv", type=Path, default=None, help="write frame,seconds,rss_mib here")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    if not a.onnx.is_file():
        print(f"memory_soak: {a.onnx} not found (export the default model first, or pass --onnx)", file=sys.stderr)
        return 2
    from runtime.derainer import Derainer

    frame = real_frame(a.size, a.size)
    rss_before = rss_bytes()
    with Derainer(a.onnx, steps=a.steps, threads=a.threads) as d:
        res = soak(d, frame, frames=a.frames, every=a.every, warmup_frames=a.warmup_frames)
    res.update(artifact=str(a.onnx), size=a.size, steps=a.steps, threads=a.threads, limit_pct=a.limit,
               rss_before_derainer_mib=rss_before / 2**20, machine=machine(),
               passed=res["growth_after_warmup_pct"] <= a.limit)
    if a.csv is not None:
        with a.csv.open("w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["frame", "seconds", "rss_mib"])
            for s in res["samples"]:
                w.writerow([s["frame"], s["seconds"], f"{s['rss_mib']:.3f}"])
    if a.json:
        print(json.dumps(res, indent=2))
    else:
        print(f"{a.frames} frames of {a.size}x{a.size}, {a.steps} steps, {a.threads} threads, "
              f"{res['machine']['cpu']}; RSS before the Derainer {res['rss_before_derainer_mib']:.1f} MiB")
        print(f"{'frame':>7s} {'seconds':>9s} {'RSS MiB':>9s}")
        for s in res["samples"]:
            mark = "  <- baseline (after warm-up)" if s["frame"] == a.warmup_frames else ""
            print(f"{s['frame']:7d} {s['seconds']:9.1f} {s['rss_mib']:9.1f}{mark}")
        verdict = "PASS" if res["passed"] else "FAIL"
        print(f"growth after warm-up: {res['growth_after_warmup_pct']:+.2f}% "
              f"({res['rss_after_warmup_mib']:.1f} -> {res['rss_last_mib']:.1f} MiB; target <= {a.limit:g}%) "
              f"{verdict}; slope {res['slope_kib_per_frame']:+.2f} KiB/frame")
    return 0 if res["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
