"""Latency / throughput / memory benchmark behind ``rd-run bench``.

Times whole ``derain`` (or ``derain_batch``) calls on a seeded random frame after ``warmup``
untimed calls. ``frame_*`` is the latency of one frame (a batch call divided by the batch size);
``step_*`` is that divided by the number of DDIM steps (so it includes the per-frame pre/post
work spread over the steps, a slight over-estimate of one engine step; None at 0 steps, the
predictor alone). ``fps`` is frames per
second at the median. ``peak_rss_mib`` is the process's peak resident memory so far (model
loading included), from ``getrusage``.
"""

from __future__ import annotations

import platform
import re
import sys
import time
from typing import Any, Protocol

import numpy as np

from runtime.errors import UsageError

__all__ = ["parse_size", "peak_rss_mib", "run_bench"]


class _Derainer(Protocol):
    def derain(self, frame: np.ndarray) -> np.ndarray: ...

    def derain_batch(self, frames: list[np.ndarray]) -> list[np.ndarray]: ...


def parse_size(text: str) -> tuple[int, int]:
    """'640x480' (WIDTHxHEIGHT) or '512' (square) -> (width, height)."""
    m = re.fullmatch(r"\s*(\d+)\s*(?:[xX*]\s*(\d+))?\s*", text)
    if not m:
        raise UsageError(f"--size {text!r}: expected WIDTHxHEIGHT such as 512x512")
    w = int(m.group(1))
    h = int(m.group(2)) if m.group(2) else w
    if not (1 <= w <= 16384 and 1 <= h <= 16384):
        raise UsageError(f"--size {text!r}: width and height must be within 1..16384")
    return w, h


def peak_rss_mib() -> float | None:
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def _stats(prefix: str, ms: np.ndarray) -> dict[str, float]:
    return {f"{prefix}_min_ms": float(ms.min()), f"{prefix}_median_ms": float(np.median(ms)),
            f"{prefix}_mean_ms": float(ms.mean()), f"{prefix}_p95_ms": float(np.percentile(ms, 95)),
            f"{prefix}_max_ms": float(ms.max())}


def run_bench(derainer: _Derainer, *, width: int = 512, height: int = 512, batch: int = 1, warmup: int = 2,
              runs: int = 10, seed: int = 0, steps: int | None = None) -> dict[str, Any]:
    """Benchmark ``derainer``; returns a flat dict (JSON-ready). ``steps`` defaults to ``derainer.steps``."""
    if runs < 1 or warmup < 0 or batch < 1:
        raise UsageError(f"runs {runs} must be >= 1, warmup {warmup} >= 0, batch {batch} >= 1")
    steps = int(getattr(derainer, "steps", 1) if steps is None else steps)
    rng = np.random.default_rng(seed)
    frames = [rng.integers(0, 256, (height, width, 3), dtype=np.uint8) for _ in range(batch)]

    def call() -> None:
        if batch == 1:
            derainer.derain(frames[0])
        else:
            derainer.derain_batch(frames)

    for _ in range(warmup):
        call()
    call_ms = np.empty(runs)
    for i in range(runs):
        t0 = time.perf_counter()
        call()
        call_ms[i] = (time.perf_counter() - t0) * 1000
    frame_ms = call_ms / batch
    out: dict[str, Any] = {"width": width, "height": height, "size": f"{width}x{height}", "batch": batch,
                           "steps": steps, "warmup": warmup, "runs": runs}
    out.update(_stats("frame", frame_ms))
    if steps > 0:
        out.update(_stats("step", frame_ms / steps))
    else:  # 0 steps (the predictor alone): no step to time
        out.update({f"step_{k}_ms": None for k in ("min", "median", "mean", "p95", "max")})
    out.update(_stats("call", call_ms))
    out["fps"] = 1000.0 / out["frame_median_ms"] if out["frame_median_ms"] > 0 else None
    out["peak_rss_mib"] = peak_rss_mib()
    out["python"] = platform.python_version()
    out["machine"] = platform.machine()
    return out
