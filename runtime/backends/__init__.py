"""Inference backends for the fused DDIM step, by artifact suffix (docs/ARCHITECTURE.md, code convention 7).

``.onnx`` -> :class:`~runtime.backends.onnxruntime.OnnxRuntimeBackend` (CPU, or CUDA with
onnxruntime-gpu), or :class:`~runtime.backends.openvino.OpenVINOBackend` (x86 CPU, BF16 where the
CPU has it) with ``device="openvino"``, and by default where OpenVINO is installed and the CPU has
native BF16 (``device="auto"``, the default; ``$RD_DEVICE`` changes it); ``.plan`` ->
:class:`~runtime.backends.tensorrt.TensorRTBackend`
(CUDA GPU).
Engine libraries are imported only when a backend is opened, so importing this package needs
numpy alone.
"""

from __future__ import annotations

import os
from pathlib import Path

from runtime.backends.base import Backend, parse_device
from runtime.errors import UsageError
from runtime.manifest import load_manifest

__all__ = ["Backend", "BACKEND_SUFFIXES", "AUTO", "DEVICE_ENV", "OPENVINO", "default_device", "onnx_device",
           "open_backend", "load_manifest", "parse_device"]

#: artifact suffix -> backend name
BACKEND_SUFFIXES = {".onnx": "onnxruntime", ".plan": "tensorrt"}
#: the device name that picks the OpenVINO backend for an .onnx artifact
OPENVINO = "openvino"
#: the device name that picks the fastest CPU engine measured for this CPU (see open_backend)
AUTO = "auto"
#: the environment variable that sets the device of an .onnx artifact when none is given
#: (e.g. RD_DEVICE=cpu pins onnxruntime for a fleet, a test suite or a benchmark)
DEVICE_ENV = "RD_DEVICE"


def _openvino_bf16() -> bool:
    """Whether OpenVINO is installed and reports native BF16 on this CPU (where it is the fastest
    CPU engine measured: docs/benchmarks.md); a broken install counts as absent."""
    from runtime.backends.openvino import probe

    return probe().get("native_bf16", False)


def default_device() -> str:
    """The device of an .onnx artifact when the caller names none: ``$RD_DEVICE`` if set, else "auto".

    "auto" is OpenVINO in BF16 where OpenVINO is installed and the CPU computes BF16 natively (2.4x
    onnxruntime's FP32 at 720p, 0.01 dB from it on both dev sets: docs/benchmarks.md,
    docs/quality.md), else onnxruntime. A value that is not a device is a one-line UsageError.
    """
    value = os.environ.get(DEVICE_ENV, "").strip().lower()
    if not value:
        return AUTO
    if value not in (AUTO, OPENVINO):
        try:
            parse_device(value)
        except UsageError:
            raise UsageError(f"{DEVICE_ENV}={value!r} is not a device: one of cpu, cuda, cuda:N, openvino, auto "
                             f"(unset it for auto)") from None
    return value


def onnx_device(device: str | None = None, *, openvino_bf16: bool | None = None) -> str:
    """The device an .onnx artifact runs on: ``device``, else :func:`default_device`, with "auto"
    resolved to "openvino" or "cpu". ``openvino_bf16``: what OpenVINO's probe found, for a caller
    that has probed already (None: probe now). Any other value is returned as given (the backend
    checks it)."""
    if device is None:
        device = default_device()
    if str(device).strip().lower() != AUTO:
        return device
    return OPENVINO if (_openvino_bf16() if openvino_bf16 is None else openvino_bf16) else "cpu"


def open_backend(artifact: str | os.PathLike, *, device: str | None = None, threads: int | None = None,
                 cuda_graph: bool = True) -> Backend:
    """Open ``artifact`` with the backend its suffix names; its manifest is validated first.

    ``device``: "cpu" (onnxruntime's CPU), "cuda" / "cuda:N" (default for .plan), "openvino" (an
    .onnx on the CPU through OpenVINO), or "auto" (an .onnx on OpenVINO where it is installed and
    the CPU has native BF16, else on onnxruntime's CPU; a .plan on CUDA). None: for an .onnx
    :func:`default_device` (``$RD_DEVICE``, else auto), for a .plan CUDA. ``threads``: CPU inference
    threads (None: the engine's default). ``cuda_graph``: TensorRT replays the S-step loop as one CUDA
    graph once a shape has run.
    """
    path = Path(artifact)
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        device = onnx_device(device)
    elif device is not None and str(device).strip().lower() == AUTO:
        device = None
    if device is not None and str(device).strip().lower() == OPENVINO:
        if suffix != ".onnx":
            raise UsageError(f"{path.name}: device 'openvino' runs .onnx artifacts; a TensorRT plan runs on 'cuda'")
        from runtime.backends.openvino import OpenVINOBackend

        return OpenVINOBackend(path, threads=threads)
    if suffix == ".onnx":
        from runtime.backends.onnxruntime import OnnxRuntimeBackend

        return OnnxRuntimeBackend(path, device=device or "cpu", threads=threads)
    if suffix == ".plan":
        from runtime.backends.tensorrt import TensorRTBackend

        return TensorRTBackend(path, device=device or "cuda", cuda_graph=cuda_graph)
    raise UsageError(f"{path.name}: unknown artifact type {suffix or '(no suffix)'!r}; expected .onnx (onnxruntime) "
                     f"or .plan (TensorRT)")
