"""Inference backends for the fused DDIM step, by artifact suffix (docs/ARCHITECTURE.md, code convention 7).

``.onnx`` -> :class:`~runtime.backends.onnxruntime.OnnxRuntimeBackend` (CPU, or CUDA with
onnxruntime-gpu), or :class:`~runtime.backends.openvino.OpenVINOBackend` (x86 CPU, BF16 where the
CPU has it) with ``device="openvino"``, and by default where OpenVINO is installed and the CPU has
native BF16, or, for an INT8 artifact, AVX512_VNNI (``device="auto"``, the default; ``$RD_DEVICE`` changes
it); ``.plan`` ->
:class:`~runtime.backends.tensorrt.TensorRTBackend`
(CUDA GPU).
Engine libraries are imported only when a backend is opened, so importing this package needs
numpy alone.
"""

from __future__ import annotations

import os
from pathlib import Path

from runtime import cpu
from runtime.backends.base import Backend, parse_device
from runtime.errors import UsageError
from runtime.manifest import load_manifest

__all__ = ["Backend", "BACKEND_SUFFIXES", "AUTO", "DEVICE_ENV", "OPENVINO", "default_device", "default_precision",
           "onnx_device", "open_backend", "load_manifest", "parse_device"]

#: artifact suffix -> backend name
BACKEND_SUFFIXES = {".onnx": "onnxruntime", ".plan": "tensorrt"}
#: the device name that picks the OpenVINO backend for an .onnx artifact
OPENVINO = "openvino"
#: the device name that picks the fastest CPU engine measured for this CPU (see open_backend)
AUTO = "auto"
#: the environment variable that sets the device of an .onnx artifact when none is given
#: (e.g. RD_DEVICE=cpu pins onnxruntime for a fleet, a test suite or a benchmark)
DEVICE_ENV = "RD_DEVICE"


def _openvino_probe() -> dict:
    """OpenVINO's probe: ``{"available": bool, "native_bf16": bool}`` (a broken install: not available)."""
    from runtime.backends.openvino import probe

    return probe()


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


def onnx_device(device: str | None = None, *, precision: str = "fp32", openvino_probe: dict | None = None) -> str:
    """The device an .onnx artifact of ``precision`` (its manifest's: "fp32", "fp16", "int8") runs
    on: ``device``, else :func:`default_device`, with "auto" resolved to "openvino" or "cpu".

    auto = OpenVINO where it is installed and the CPU has native BF16 (any precision), or for an
    INT8 artifact where the CPU has AVX512_VNNI (OpenVINO's INT8 kernels; onnxruntime's INT8 was slower
    than its FP32 on every CPU measured), else onnxruntime: docs/benchmarks.md. ``openvino_probe``:
    OpenVINO's probe for a caller that has run it already (None: probe now). Any other value is
    returned as given (the backend checks it)."""
    if device is None:
        device = default_device()
    if str(device).strip().lower() != AUTO:
        return device
    ov = _openvino_probe() if openvino_probe is None else openvino_probe
    if not ov.get("available"):
        return "cpu"
    if ov.get("native_bf16") or (precision == "int8" and cpu.has_avx512_vnni()):
        return OPENVINO
    return "cpu"


def default_precision(device: str | None = None, *, openvino_probe: dict | None = None) -> str:
    """The precision of the shipped model where the caller names none (``rd-run`` without
    ``--precision``, ``Derainer()``): "int8" where the model would run on OpenVINO on a CPU with
    AVX512_VNNI and without native BF16 (``device`` auto or "openvino"), where OpenVINO's INT8 measured
    1.56x the fastest FP32 engine at 720p and 2 steps within the INT8 quality gate; else "fp32" (OpenVINO in BF16 on
    CPUs that have it, onnxruntime elsewhere, CUDA). docs/benchmarks.md has the measurements."""
    if (default_device() if device is None else str(device).strip().lower()) not in (AUTO, OPENVINO):
        return "fp32"
    ov = _openvino_probe() if openvino_probe is None else openvino_probe
    if not ov.get("available") or ov.get("native_bf16") or not cpu.has_avx512_vnni():
        return "fp32"  # elsewhere (AVX2, AVX-VNNI, other architectures) INT8 was not measured to pay
    return "int8"


def open_backend(artifact: str | os.PathLike, *, device: str | None = None, threads: int | None = None,
                 cuda_graph: bool = True) -> Backend:
    """Open ``artifact`` with the backend its suffix names; its manifest is validated first.

    ``device``: "cpu" (onnxruntime's CPU), "cuda" / "cuda:N" (default for .plan), "openvino" (an
    .onnx on the CPU through OpenVINO), or "auto" (an .onnx on OpenVINO where it is installed and
    the CPU has native BF16 or, for an INT8 artifact, AVX512_VNNI: :func:`onnx_device`; else on onnxruntime's
    CPU; a .plan on CUDA). None: for an .onnx
    :func:`default_device` (``$RD_DEVICE``, else auto), for a .plan CUDA. ``threads``: CPU inference
    threads (None: the engine's default). ``cuda_graph``: TensorRT replays the S-step loop as one CUDA
    graph once a shape has run.
    """
    path = Path(artifact)
    suffix = path.suffix.lower()
    manifest = None
    if suffix == ".onnx":
        if device is None or str(device).strip().lower() == AUTO:  # auto depends on the artifact's precision
            manifest = load_manifest(path, "onnx")
        device = onnx_device(device, precision=getattr(manifest, "precision", "fp32"))
    elif device is not None and str(device).strip().lower() == AUTO:
        device = None
    if device is not None and str(device).strip().lower() == OPENVINO:
        if suffix != ".onnx":
            raise UsageError(f"{path.name}: device 'openvino' runs .onnx artifacts; a TensorRT plan runs on 'cuda'")
        from runtime.backends.openvino import OpenVINOBackend

        return OpenVINOBackend(path, threads=threads, manifest=manifest)
    if suffix == ".onnx":
        from runtime.backends.onnxruntime import OnnxRuntimeBackend

        return OnnxRuntimeBackend(path, device=device or "cpu", threads=threads, manifest=manifest)
    if suffix == ".plan":
        from runtime.backends.tensorrt import TensorRTBackend

        return TensorRTBackend(path, device=device or "cuda", cuda_graph=cuda_graph)
    raise UsageError(f"{path.name}: unknown artifact type {suffix or '(no suffix)'!r}; expected .onnx (onnxruntime) "
                     f"or .plan (TensorRT)")
