"""Graph simplification (onnxslim), kept only where it measurably helps.

**Off by default**: onnxslim halves the node count, but onnxruntime (and TensorRT's builder)
fold the same constants at load time, so the smaller graph buys no speed and costs tens of
seconds per export (:func:`measure_simplification` measures it; the numbers are in
docs/export.md). ``--simplify`` stays available for tools that read the raw graph.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import onnx

__all__ = ["SIMPLIFY_DEFAULT", "simplify_model", "measure_simplification"]

SIMPLIFY_DEFAULT = False


def simplify_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """onnxslim with its default passes (dynamic axes are preserved: shapes stay symbolic)."""
    from runtime.errors import DependencyError

    try:
        import onnxslim
    except ImportError:
        raise DependencyError("graph simplification needs onnxslim: pip install onnxslim") from None
    return onnxslim.slim(model)


def _latency_ms(path: str, feeds: dict, optimization: str, repeats: int, threads: int) -> float:
    from runtime.backends.onnxruntime import make_session

    sess = make_session(path, optimization=optimization, threads=threads)
    sess.run(None, feeds)  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        sess.run(None, feeds)
        times.append(time.perf_counter() - t0)
    return 1000.0 * float(np.median(times))


def measure_simplification(onnx_path: str | os.PathLike, *, size: tuple[int, int] = (256, 256),
                           repeats: int = 5, threads: int = 1, workdir: str | os.PathLike | None = None) -> dict:
    """Node counts, simplification time, onnxruntime latency (BASIC/ALL) and max |diff| before/after."""
    import tempfile

    from rd_export.graph import load_model
    from rd_export.verify import OnnxStep

    onnx_path = Path(onnx_path)
    model = load_model(onnx_path)  # checks external-data paths first
    t0 = time.perf_counter()
    slim = simplify_model(model)
    slim_s = time.perf_counter() - t0
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        slim_path = str(Path(tmp) / "slim.onnx")
        onnx.save(slim, slim_path)
        rng = np.random.default_rng(0)
        h, w = size
        feeds = {"x_t": rng.standard_normal((1, 3, h, w), dtype=np.float32),
                 "cond": rng.standard_normal((1, 3, h, w), dtype=np.float32),
                 "t": np.array([500.0], np.float32), "coef": np.array([[1.5, 1.2, 0.9, 0.3]], np.float32)}
        a = OnnxStep(onnx_path)(*feeds.values())
        b = OnnxStep(slim_path)(*feeds.values())
        result = {"nodes_before": len(model.graph.node), "nodes_after": len(slim.graph.node),
                  "simplify_seconds": round(slim_s, 2), "max_abs_diff": float(np.abs(a - b).max()),
                  "size": list(size), "threads": threads, "latency_ms": {}}
        for level in ("basic", "all"):
            result["latency_ms"][level] = {
                "before": round(_latency_ms(str(onnx_path), feeds, level, repeats, threads), 2),
                "after": round(_latency_ms(slim_path, feeds, level, repeats, threads), 2)}
    return result
