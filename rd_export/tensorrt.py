"""ONNX -> TensorRT plan (``<stem>.trt.plan`` + ``<stem>.trt.json``), TensorRT 10.x and 11.x.

One path serves both (docs/ARCHITECTURE.md): the network is created **strongly typed**
(``NetworkDefinitionCreationFlag.STRONGLY_TYPED``; deprecated-but-accepted in TensorRT 11, where
every network is strongly typed), so precision comes from the ONNX (FP16 casts, later Q/DQ for
INT8) and no ``BuilderFlag.FP16/INT8`` or INT8 calibrator is used (TensorRT 11 removed them).
Builder settings: one optimisation profile from the step descriptor, a workspace memory-pool
limit, ``builder_optimization_level``, and a timing cache file that is loaded when present and
saved (atomically) after the build. The plan is written raw (no header: trtexec, Triton and C++
loaders read it, ultralytics#22910) through a temporary file; the sidecar manifest records the
TensorRT version, the GPU's name and compute capability (a plan only runs where it was built)
and the build flags.

``tensorrt`` and ``cuda-python`` (``cuda.bindings``) are imported lazily: without them
everything else in the toolkit works and the user gets one line saying what to install.

Nothing in this module has run on TensorRT on the machines this was written on (no GPU); the
API names follow the TensorRT 10/11 Python documentation and tests/fakes/fake_tensorrt.py
pins the calls. ``pytest -m trt`` runs the real build + parity where TensorRT exists.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from rd_export.precision import plan_name
from runtime.artifacts import check_external_data
from runtime.descriptor import ShapeProfile, StepDescriptor
from runtime.errors import ArtifactError, DependencyError, RDError, UsageError
from runtime.io import atomic_path, atomic_write_bytes
from runtime.manifest import Manifest, sha256_file

__all__ = [
    "INSTALL_HINT",
    "DEFAULT_WORKSPACE",
    "DEFAULT_OPT_LEVEL",
    "ENGINE_MIN_PSNR_DB",
    "import_tensorrt",
    "import_cudart",
    "tensorrt_available",
    "tensorrt_version",
    "gpu_info",
    "build_engine",
    "EngineStep",
]

INSTALL_HINT = (
    "TensorRT engines need tensorrt and cuda-python: pip install 'raindiffusion-edge[trt]' "
    "(or copy the .onnx with its .json to the target device and run `rd-export build model.onnx` there)"
)
DEFAULT_WORKSPACE = 2 << 30  # 2 GiB
DEFAULT_OPT_LEVEL = 3  # TensorRT's default; 0-5
#: engine vs the ONNX it was built from (onnxruntime CPU), end-to-end PSNR. TF32/FP16 kernels
#: differ from CPU FP32 arithmetic; this bound is the FP16 ONNX bound, not yet measured on a GPU.
ENGINE_MIN_PSNR_DB = 40.0


# --------------------------------------------------------------------------- lazy imports
def import_tensorrt():
    """The ``tensorrt`` module, or DependencyError with the one-line install hint."""
    try:
        import tensorrt as trt
    except ImportError:
        raise DependencyError(INSTALL_HINT) from None
    return trt


def import_cudart():
    """cuda-python's runtime API: ``cuda.bindings.runtime`` (>= 12.6) or the older ``cuda.cudart``."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart  # cuda-python < 12.6
        except ImportError:
            raise DependencyError(INSTALL_HINT) from None
    return cudart


def tensorrt_available() -> bool:
    try:
        import_tensorrt()
        import_cudart()
    except DependencyError:
        return False
    return True


def tensorrt_version() -> str:
    return str(import_tensorrt().__version__)


def _check_cuda(cudart, result, what: str):
    """cuda-python calls return (err, *values); raise on err != cudaSuccess, return the values."""
    if not isinstance(result, tuple):
        result = (result,)
    err, values = result[0], result[1:]
    if err != cudart.cudaError_t.cudaSuccess:
        raise ArtifactError(f"CUDA {what} failed: {err}")
    return values[0] if len(values) == 1 else values


def gpu_info(device: int | None = None) -> dict:
    """{"name", "compute_capability": "8.9", "device"} of the current (or given) CUDA device."""
    cudart = import_cudart()
    if device is None:
        device = int(_check_cuda(cudart, cudart.cudaGetDevice(), "cudaGetDevice"))
    props = _check_cuda(cudart, cudart.cudaGetDeviceProperties(device), "cudaGetDeviceProperties")
    name = props.name
    if isinstance(name, (bytes, bytearray)):
        name = bytes(name).split(b"\x00", 1)[0].decode("utf-8", "replace")
    return {"name": str(name).strip(), "compute_capability": f"{int(props.major)}.{int(props.minor)}",
            "device": int(device)}


# --------------------------------------------------------------------------- build
def _capturing_logger(trt):
    """A trt.ILogger keeping warnings and errors, so build failures can quote them."""

    class _Logger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.messages: list[tuple[object, str]] = []

        def log(self, severity, msg):
            if severity in (trt.ILogger.Severity.INTERNAL_ERROR, trt.ILogger.Severity.ERROR,
                            trt.ILogger.Severity.WARNING):
                self.messages.append((severity, str(msg)))

        def errors(self) -> list[str]:
            return [m for s, m in self.messages
                    if s in (trt.ILogger.Severity.INTERNAL_ERROR, trt.ILogger.Severity.ERROR)]

    return _Logger()


def resolve_profile(descriptor: StepDescriptor, *, min_size: Sequence[int] | None = None,
                    opt_size: Sequence[int] | None = None, max_size: Sequence[int] | None = None,
                    batch: int | Sequence[int] | None = None) -> ShapeProfile:
    """The descriptor's profile with any given bounds replaced; UsageError if it does not fit."""
    p = descriptor.profile
    if batch is None:
        b = (p.min_batch, p.opt_batch, p.max_batch)
    elif isinstance(batch, int):
        b = (batch, batch, batch)
    else:
        b = tuple(int(v) for v in batch)
        if len(b) == 2:
            b = (b[0], b[0], b[1])
        if len(b) != 3:
            raise UsageError(f"batch must be N, (min, max) or (min, opt, max), got {batch!r}")
    prof = ShapeProfile(min_batch=b[0], opt_batch=b[1], max_batch=b[2],
                        min_size=tuple(min_size) if min_size else p.min_size,
                        opt_size=tuple(opt_size) if opt_size else p.opt_size,
                        max_size=tuple(max_size) if max_size else p.max_size)
    try:
        prof.validate(descriptor.size_multiple)
    except ValueError as e:
        raise UsageError(f"{e} (the model's size multiple is {descriptor.size_multiple})") from None
    return prof


def _host_bytes(blob) -> bytes:
    """IHostMemory / buffer -> bytes."""
    if isinstance(blob, (bytes, bytearray)):
        return bytes(blob)
    return bytes(memoryview(blob))


def _now() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


def build_engine(onnx_path: str | os.PathLike, descriptor: StepDescriptor | None = None, *,
                 out: str | os.PathLike | None = None, min_size: Sequence[int] | None = None,
                 opt_size: Sequence[int] | None = None, max_size: Sequence[int] | None = None,
                 batch: int | Sequence[int] | None = None, workspace: int = DEFAULT_WORKSPACE,
                 timing_cache: str | os.PathLike | None = None, opt_level: int = DEFAULT_OPT_LEVEL,
                 verify: bool = True, steps: int | None = None, seed: int = 0,
                 progress: Callable[[str], None] | None = None) -> Path:
    """Build ``<stem>.trt.plan`` (+ ``<stem>.trt.json``) from an ONNX artifact and its manifest.

    ``descriptor`` defaults to the ONNX manifest's; the size/batch arguments override its
    profile. With ``verify`` the engine is run on this GPU against the ONNX through onnxruntime
    (end-to-end PSNR >= ENGINE_MIN_PSNR_DB, no NaN) before anything is written as done.
    Raises DependencyError (no tensorrt / cuda-python), ArtifactError (parser or build failure,
    with TensorRT's messages), UsageError (bad profile), VerificationError.
    """
    from rd_export.export import load_onnx_manifest

    progress = progress or (lambda s: None)
    onnx_path = Path(onnx_path)
    src = load_onnx_manifest(onnx_path)  # hash-checked before the GPU is touched
    check_external_data(onnx_path)  # TensorRT's parser would open external-data files as named
    descriptor = descriptor or src.step_descriptor
    profile = resolve_profile(descriptor, min_size=min_size, opt_size=opt_size, max_size=max_size, batch=batch)
    descriptor = StepDescriptor(size_multiple=descriptor.size_multiple, channels=descriptor.channels,
                                profile=profile, opset=descriptor.opset)
    if not 0 <= int(opt_level) <= 5:
        raise UsageError(f"builder optimisation level {opt_level} is outside 0..5")
    if int(workspace) <= 0:
        raise UsageError(f"workspace must be a positive number of bytes, got {workspace}")

    trt = import_tensorrt()
    gpu = gpu_info()
    dest = Path(out) if out is not None else onnx_path.with_name(plan_name(onnx_path))
    if dest.suffix != ".plan":
        raise UsageError(f"{dest}: engine files are named <stem>.trt.plan")

    progress(f"parsing {onnx_path.name} (TensorRT {trt.__version__}, {gpu['name']} sm_{gpu['compute_capability']})")
    logger = _capturing_logger(trt)
    builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)] or logger.errors()
        raise ArtifactError(f"{onnx_path}: TensorRT's ONNX parser failed: {' | '.join(errors) or 'no message'}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace))
    config.builder_optimization_level = int(opt_level)
    trt_profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in profile.shapes(descriptor.channels).items():
        trt_profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(trt_profile)

    cache_path = Path(timing_cache) if timing_cache is not None else None
    cache_blob = cache_path.read_bytes() if cache_path is not None and cache_path.is_file() else b""
    cache = config.create_timing_cache(cache_blob)
    config.set_timing_cache(cache, ignore_mismatch=False)

    progress(f"building engine (profile batch {profile.min_batch}..{profile.max_batch}, "
             f"{profile.min_size[0]}x{profile.min_size[1]}..{profile.max_size[0]}x{profile.max_size[1]}, "
             f"opt level {opt_level})")
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        errors = logger.errors()
        raise ArtifactError(f"{onnx_path}: TensorRT could not build an engine"
                            + (f": {' | '.join(errors[-3:])}" if errors else ""))
    plan_bytes = _host_bytes(plan)
    if cache_path is not None:
        atomic_write_bytes(cache_path, _host_bytes(config.get_timing_cache().serialize()))

    build_flags = {
        "strongly_typed": True,
        "workspace_bytes": int(workspace),
        "builder_optimization_level": int(opt_level),
        "timing_cache": cache_path.name if cache_path is not None else None,
        "timing_cache_loaded": bool(cache_blob),
        "profile": profile.to_dict(),
    }
    with atomic_path(dest) as tmp:
        with open(tmp, "wb") as f:  # raw plan, no header
            f.write(plan_bytes)
            f.flush()
            os.fsync(f.fileno())
        extra = {k: v for k, v in src.extra.items() if k not in ("verification", "created", "tensorrt", "source")}
        extra["source"] = dict(src.get("source", {}), onnx=onnx_path.name, onnx_sha256=src.sha256)
        extra["tensorrt"] = {"version": str(trt.__version__), "gpu_name": gpu["name"],
                             "compute_capability": gpu["compute_capability"], "build_flags": build_flags}
        if verify:
            progress(f"verifying {dest.name} against {onnx_path.name} on {gpu['name']}")
            extra["verification"] = verify_engine(plan_bytes, onnx_path, descriptor, steps=steps or src.default_steps,
                                                  seed=seed, schedule=src.schedule)
        extra["created"] = _now()
        manifest = Manifest(artifact=dest.name, format="trt", precision=src.precision, model=src.model,
                            sha256=sha256_file(tmp), descriptor=descriptor.to_dict(), schedule=src.schedule,
                            model_config=src.model_config, toolkit_version=src.toolkit_version, extra=extra)
    return manifest.publish(dest)


# --------------------------------------------------------------------------- run (verification)
class EngineStep:
    """The fused step on a TensorRT plan, as a numpy function (cuda-python buffers, one stream).

    Minimal by design (verification only; the runtime's TensorRT backend is the product): device
    buffers are reallocated when the input shape changes, every enqueue's return value is checked.
    """

    def __init__(self, plan: bytes) -> None:
        trt = import_tensorrt()
        self.trt, self.cudart = trt, import_cudart()
        self.logger = _capturing_logger(trt)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(plan)
        if self.engine is None:
            raise ArtifactError("TensorRT could not deserialize the plan: " + " | ".join(self.logger.errors()))
        self.context = self.engine.create_execution_context()
        self.stream = _check_cuda(self.cudart, self.cudart.cudaStreamCreate(), "cudaStreamCreate")
        self.names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self._buffers: dict[str, tuple[int, int]] = {}

    def _buffer(self, name: str, nbytes: int) -> int:
        ptr, size = self._buffers.get(name, (0, 0))
        if size < nbytes:
            if ptr:
                _check_cuda(self.cudart, self.cudart.cudaFree(ptr), "cudaFree")
            ptr = int(_check_cuda(self.cudart, self.cudart.cudaMalloc(nbytes), "cudaMalloc"))
            self._buffers[name] = (ptr, nbytes)
        return ptr

    def __call__(self, x_t: np.ndarray, cond: np.ndarray, t: np.ndarray, coef: np.ndarray) -> np.ndarray:
        cudart = self.cudart
        d = StepDescriptor
        feeds = {d.X: x_t, d.COND: cond, d.T: t, d.COEF: coef}
        h2d, d2h = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        for name, arr in feeds.items():
            arr = np.ascontiguousarray(arr, dtype=np.float32)
            feeds[name] = arr
            if not self.context.set_input_shape(name, tuple(arr.shape)):
                raise ArtifactError(f"engine rejected input shape {name}{tuple(arr.shape)} (outside its profile?)")
            ptr = self._buffer(name, arr.nbytes)
            _check_cuda(cudart, cudart.cudaMemcpyAsync(ptr, arr.ctypes.data, arr.nbytes, h2d, self.stream),
                        "cudaMemcpyAsync H2D")
            self.context.set_tensor_address(name, ptr)
        out = np.empty(tuple(self.context.get_tensor_shape(d.OUT)), dtype=np.float32)
        out_ptr = self._buffer(d.OUT, out.nbytes)
        self.context.set_tensor_address(d.OUT, out_ptr)
        if not self.context.execute_async_v3(int(self.stream)):
            raise ArtifactError("TensorRT enqueue failed: " + " | ".join(self.logger.errors()[-3:]))
        _check_cuda(cudart, cudart.cudaMemcpyAsync(out.ctypes.data, out_ptr, out.nbytes, d2h, self.stream),
                    "cudaMemcpyAsync D2H")
        _check_cuda(cudart, cudart.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")
        return out

    def close(self) -> None:
        for ptr, _ in self._buffers.values():
            self.cudart.cudaFree(ptr)
        self._buffers.clear()
        if self.stream is not None:
            self.cudart.cudaStreamDestroy(self.stream)
            self.stream = None


def verify_engine(plan: bytes, onnx_path: str | os.PathLike, descriptor: StepDescriptor, *, steps: int = 10,
                  seed: int = 0, schedule: dict | None = None) -> dict:
    """Engine vs its ONNX (onnxruntime CPU) at the profile's min batch and size: PSNR + NaN check."""
    from rd_export.verify import check_report, compare_onnx
    from runtime.schedule import ScheduleConfig

    sc = None
    if schedule:
        sc = ScheduleConfig(num_train_timesteps=int(schedule["num_train_timesteps"]),
                            beta_start=float(schedule["beta_start"]), beta_end=float(schedule["beta_end"]))
    step = EngineStep(plan)
    try:
        h, w = descriptor.profile.min_size
        report = compare_onnx(step, onnx_path, steps=steps, seed=seed, size=(int(h), int(w)),
                              batch=descriptor.profile.min_batch, schedule_config=sc)
    except RDError:
        raise
    finally:
        step.close()
    report["reference"] = "onnx"
    return check_report(report, min_psnr_db=ENGINE_MIN_PSNR_DB, max_step_abs=None, what="TensorRT engine")
