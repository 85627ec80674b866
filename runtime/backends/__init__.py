"""Inference backends for the fused DDIM step, by artifact suffix (docs/ARCHITECTURE.md, code convention 7).

``.onnx`` -> :class:`~runtime.backends.onnxruntime.OnnxRuntimeBackend` (CPU, or CUDA with
onnxruntime-gpu); ``.plan`` -> :class:`~runtime.backends.tensorrt.TensorRTBackend` (CUDA GPU).
Engine libraries are imported only when a backend is opened, so importing this package needs
numpy alone.
"""

from __future__ import annotations

import os
from pathlib import Path

from runtime.backends.base import Backend, parse_device
from runtime.errors import UsageError
from runtime.manifest import load_manifest

__all__ = ["Backend", "BACKEND_SUFFIXES", "open_backend", "load_manifest", "parse_device"]

#: artifact suffix -> backend name
BACKEND_SUFFIXES = {".onnx": "onnxruntime", ".plan": "tensorrt"}


def open_backend(artifact: str | os.PathLike, *, device: str | None = None, threads: int | None = None,
                 cuda_graph: bool = True) -> Backend:
    """Open ``artifact`` with the backend its suffix names; its manifest is validated first.

    ``device``: "cpu" (default for .onnx), "cuda" / "cuda:N" (default for .plan). ``threads``:
    onnxruntime intra-op threads on CPU (None: onnxruntime's default). ``cuda_graph``: TensorRT
    replays the S-step loop as one CUDA graph once a shape has run.
    """
    path = Path(artifact)
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        from runtime.backends.onnxruntime import OnnxRuntimeBackend

        return OnnxRuntimeBackend(path, device=device or "cpu", threads=threads)
    if suffix == ".plan":
        from runtime.backends.tensorrt import TensorRTBackend

        return TensorRTBackend(path, device=device or "cuda", cuda_graph=cuda_graph)
    raise UsageError(f"{path.name}: unknown artifact type {suffix or '(no suffix)'!r}; expected .onnx (onnxruntime) "
                     f"or .plan (TensorRT)")
