"""TensorRT backend: a ``<stem>.trt.plan`` on a CUDA GPU, through cuda-python.

What happens, in order (every step before deserialisation runs without touching TensorRT):

1. the manifest is loaded and the plan's sha256 checked against it (a mismatch raises
   :class:`EngineMismatchError`: the plan was rebuilt or altered since its manifest);
2. ``tensorrt`` is imported lazily, and its version compared with the manifest's
   ``tensorrt.version``; then ``cuda.bindings.runtime`` (cuda-python) is imported and the GPU's
   compute capability compared with ``tensorrt.compute_capability`` (a plan only runs on the
   TensorRT release and GPU family it was built for). Any mismatch raises
   :class:`EngineMismatchError` with the exact ``rd-export build ... --format trt`` command;
3. ``Runtime.deserialize_cuda_engine`` / ``create_execution_context`` (named-tensor API of
   TensorRT 10/11), on a non-default stream made with ``cudaStreamCreateWithFlags``.

Per bound shape, x[0], x[1] and cond are ``cudaMalloc``-ed once; per (steps, batch) the t and
coef tables of all S steps are uploaded once, one 256-byte aligned row per step
(``setTensorAddress`` requires 256-byte alignment). A step only re-points ``x_t`` / ``x_next``
(the ping-pong swap) and ``t`` / ``coef`` (the row of that step) and enqueues
``execute_async_v3``; its boolean result is checked every time.

CUDA graph: after one warm-up run of the S-step loop at a shape (TensorRT needs one enqueue
after shape changes before capture), the next ``run()`` captures all S enqueues into one graph
(``cudaStreamBeginCapture`` / ``cudaStreamEndCapture`` / ``cudaGraphInstantiate``) and every run
after that is one ``cudaGraphLaunch``. A failed enqueue records nothing and would replay stale
output (ultralytics#26223), so every enqueue's return value is checked during capture too and a
failure aborts the capture with an error. If the capture itself is refused by CUDA the backend
falls back to step-by-step enqueues and records why in ``graph_error``. Graphs are dropped when
the shape or the schedule changes. ``cuda_graph=False`` turns this off.

Every cuda-python call returns ``(err, *values)``; each is checked through :func:`_cuda`.
"""

from __future__ import annotations

import importlib
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from runtime.backends.base import Backend, load_manifest, parse_device
from runtime.descriptor import ShapeProfile
from runtime.errors import ArtifactError, DependencyError, EngineMismatchError, ManifestError, RDError, UsageError
from runtime.manifest import Manifest, manifest_path_for

__all__ = ["CudaError", "TensorRTBackend", "check_engine_compat", "rebuild_command"]

TRT_INSTALL_HINT = "pip install 'raindiffusion-edge[trt]'"
#: setTensorAddress needs 256-byte aligned pointers (TensorRT NvInferRuntime.h).
ALIGN = 256


class CudaError(RDError):
    """A CUDA runtime call or a TensorRT enqueue failed on the device."""


# ---------------------------------------------------------------------- lazy imports
def _import_tensorrt() -> Any:
    try:
        return importlib.import_module("tensorrt")
    except ImportError:
        raise DependencyError(f"TensorRT is not installed: {TRT_INSTALL_HINT}") from None


def _import_cudart() -> Any:
    try:
        return importlib.import_module("cuda.bindings.runtime")  # cuda-python >= 12.6
    except ImportError:
        pass
    try:
        return importlib.import_module("cuda.cudart")  # older cuda-python 12.x layout
    except ImportError:
        raise DependencyError(f"cuda-python is not installed: {TRT_INSTALL_HINT}") from None


def _cuda(cudart: Any, result: Any, what: str) -> Any:
    """Check a cuda-python ``(err, *values)`` result; return the value(s)."""
    if not isinstance(result, tuple) or not result:
        raise CudaError(f"{what}: unexpected cuda-python result {result!r}")
    err = result[0]
    if err != cudart.cudaError_t.cudaSuccess:
        name = getattr(err, "name", str(err))
        raise CudaError(f"{what} failed: {name}")
    if len(result) == 1:
        return None
    return result[1] if len(result) == 2 else result[1:]


# ---------------------------------------------------------------------- compatibility checks
def rebuild_command(artifact: str | os.PathLike, manifest: Manifest | None = None) -> str:
    """The command that rebuilds this plan on this machine: ``rd-export build <stem>.onnx --format trt``."""
    plan = Path(artifact)
    name = plan.name
    stem = name[: -len(".trt.plan")] if name.endswith(".trt.plan") else plan.stem
    onnx_name = f"{stem}.onnx"
    source = manifest.get("source") if manifest is not None else None
    if isinstance(source, dict) and isinstance(source.get("onnx"), str) and source["onnx"]:
        onnx_name = Path(source["onnx"]).name
    return f"rd-export build {plan.with_name(onnx_name)} --format trt"


def _version_tuple(version: str) -> tuple[int, ...]:
    nums = re.findall(r"\d+", str(version).split("+")[0])
    return tuple(int(n) for n in nums[:3])


def _parse_cc(value: Any) -> tuple[int, int] | None:
    """'8.6', [8, 6], (8, 6), 'sm_86', 86 -> (8, 6)."""
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return int(value[0]), int(value[1])
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if isinstance(value, str):
        text = value.strip().lower().removeprefix("sm_").removeprefix("sm")
        if "." in text:
            major, _, minor = text.partition(".")
            if major.isdigit() and minor.isdigit():
                return int(major), int(minor)
        elif text.isdigit() and len(text) >= 2:
            return int(text[:-1]), int(text[-1])
    return None


def _flags(info: dict) -> set[str]:
    flags = info.get("build_flags") or []
    if isinstance(flags, dict):
        flags = [k for k, v in flags.items() if v]
    elif isinstance(flags, str):
        flags = re.split(r"[,\s]+", flags)
    return {str(f).strip().lower().replace("-", "_") for f in flags if str(f).strip()}


def check_engine_compat(manifest: Manifest, *, artifact: str | os.PathLike, trt_version: str | None = None,
                        compute_capability: tuple[int, int] | None = None, gpu_name: str | None = None) -> None:
    """Refuse a plan built for another TensorRT release or GPU; the message says how to rebuild.

    Rules: the installed TensorRT must be the release the plan was built with (major.minor.patch)
    unless the plan was built ``version_compatible`` (then: same major, not older); the GPU's
    compute capability must equal the build GPU's unless the plan was built with hardware
    compatibility (``ampere_plus`` / ``hardware_compatible``: any GPU of compute capability >= 8.0).
    Pass None for a value not checked yet.
    """
    info = manifest.get("tensorrt")
    where = manifest_path_for(artifact)
    cmd = rebuild_command(artifact, manifest)
    if not isinstance(info, dict):
        raise ManifestError(f"{where}: a TensorRT plan's manifest needs a 'tensorrt' section; rebuild: {cmd}")
    flags = _flags(info)
    if trt_version is not None:
        built = info.get("version")
        if not isinstance(built, str) or not _version_tuple(built):
            raise ManifestError(f"{where}: field 'tensorrt.version' is missing or invalid; rebuild: {cmd}")
        have, want = _version_tuple(trt_version), _version_tuple(built)
        if "version_compatible" in flags:
            ok = have[:1] == want[:1] and have >= want
        else:
            ok = have == want
        if not ok:
            raise EngineMismatchError(
                f"{Path(artifact).name} was built with TensorRT {built} but TensorRT {trt_version} is installed; "
                f"a plan only runs on the TensorRT release that built it. Rebuild it here: {cmd}"
            )
    if compute_capability is not None:
        raw = info.get("compute_capability")
        built_cc = _parse_cc(raw)
        if built_cc is None:
            raise ManifestError(f"{where}: field 'tensorrt.compute_capability' is missing or invalid ({raw!r}); "
                                f"rebuild: {cmd}")
        have_cc = (int(compute_capability[0]), int(compute_capability[1]))
        if flags & {"ampere_plus", "hardware_compatible", "hardware_compatibility"}:
            ok = have_cc >= (8, 0)
        else:
            ok = have_cc == built_cc
        if not ok:
            built_gpu = info.get("gpu_name") or "another GPU"
            this_gpu = f"this GPU ({gpu_name})" if gpu_name else "this GPU"
            raise EngineMismatchError(
                f"{Path(artifact).name} was built for {built_gpu} (compute capability {built_cc[0]}.{built_cc[1]}) "
                f"but {this_gpu} has compute capability {have_cc[0]}.{have_cc[1]}; a plan only runs on the GPU "
                f"family that built it. Rebuild it here: {cmd}"
            )


# ---------------------------------------------------------------------- the backend
class TensorRTBackend(Backend):
    """The fused step as a TensorRT engine, with device buffers, address ping-pong and a CUDA graph."""

    name = "tensorrt"

    def __init__(self, artifact: str | os.PathLike, *, device: str = "cuda", cuda_graph: bool = True,
                 manifest: Manifest | None = None) -> None:
        kind, index = parse_device(device)
        if kind != "cuda":
            raise UsageError(f"a TensorRT plan runs on a CUDA GPU; use device='cuda' (got {device!r})")
        # 1. manifest + sha256, before anything of TensorRT is imported or called
        manifest = manifest if manifest is not None else load_manifest(artifact, "trt")
        super().__init__(artifact, manifest)
        self.device = f"cuda:{index}"
        self.use_cuda_graph = bool(cuda_graph)
        self.graph_error: str | None = None
        self._stream = None
        self._x: list[int] = []
        self._cond = 0
        self._t_table = 0
        self._coef_table = 0
        self._t_stride = self._coef_stride = 0
        self._graph = None
        self._graph_exec = None
        self._warm = False
        self._context = self._engine = self._runtime = None
        check_engine_compat(manifest, artifact=artifact)  # the 'tensorrt' section exists

        # 2. versions: installed TensorRT and this GPU's compute capability vs the manifest
        trt = _import_tensorrt()
        check_engine_compat(manifest, artifact=artifact, trt_version=str(getattr(trt, "__version__", "")))
        cudart = _import_cudart()
        self._trt, self._cudart = trt, cudart
        _cuda(cudart, cudart.cudaSetDevice(index), f"cudaSetDevice({index})")
        major = _cuda(cudart, cudart.cudaDeviceGetAttribute(
            cudart.cudaDeviceAttr.cudaDevAttrComputeCapabilityMajor, index), "cudaDeviceGetAttribute")
        minor = _cuda(cudart, cudart.cudaDeviceGetAttribute(
            cudart.cudaDeviceAttr.cudaDevAttrComputeCapabilityMinor, index), "cudaDeviceGetAttribute")
        check_engine_compat(manifest, artifact=artifact, compute_capability=(int(major), int(minor)),
                            gpu_name=self._gpu_name(index))

        # 3. deserialise
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        if self._runtime is None:
            raise ArtifactError("TensorRT could not create a runtime")
        engine = self._runtime.deserialize_cuda_engine(self.artifact.read_bytes())
        if engine is None:
            raise EngineMismatchError(
                f"{self.artifact.name}: TensorRT {trt.__version__} could not deserialise the plan (see TensorRT's "
                f"log above); rebuild it here: {rebuild_command(artifact, manifest)}"
            )
        self._engine = engine
        self._check_io()
        context = engine.create_execution_context()
        if context is None:
            raise ArtifactError(f"{self.artifact.name}: TensorRT could not create an execution context "
                                f"(out of GPU memory?)")
        self._context = context
        self._stream = _cuda(cudart, cudart.cudaStreamCreateWithFlags(cudart.cudaStreamNonBlocking),
                             "cudaStreamCreateWithFlags")
        self._stream_handle = int(self._stream)

    # ------------------------------------------------------------------ setup helpers
    def _gpu_name(self, index: int) -> str | None:
        try:
            props = _cuda(self._cudart, self._cudart.cudaGetDeviceProperties(index), "cudaGetDeviceProperties")
            name = props.name
            return (name.split(b"\0")[0].decode() if isinstance(name, bytes) else str(name)) or None
        except Exception:  # the name only decorates an error message
            return None

    def _check_io(self) -> None:
        trt, engine, d = self._trt, self._engine, self.descriptor
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        want = {**{n: trt.TensorIOMode.INPUT for n in d.input_names},
                **{n: trt.TensorIOMode.OUTPUT for n in d.output_names}}
        if sorted(names) != sorted(want):
            raise ArtifactError(f"{self.artifact.name}: engine tensors {names} do not match the fused step's "
                                f"{sorted(want)}")
        for n in names:
            if engine.get_tensor_mode(n) != want[n]:
                raise ArtifactError(f"{self.artifact.name}: engine tensor {n!r} has the wrong direction")
            if engine.get_tensor_dtype(n) != trt.DataType.FLOAT:
                raise ArtifactError(f"{self.artifact.name}: engine tensor {n!r} is {engine.get_tensor_dtype(n)}, "
                                    f"the fused step's I/O is float32")

    @property
    def limits(self) -> ShapeProfile:
        return self.descriptor.profile

    # ------------------------------------------------------------------ memory
    def _malloc(self, nbytes: int) -> int:
        return int(_cuda(self._cudart, self._cudart.cudaMalloc(int(nbytes)), f"cudaMalloc({nbytes})"))

    def _free(self, ptr: int) -> None:
        if ptr:
            _cuda(self._cudart, self._cudart.cudaFree(ptr), "cudaFree")

    def _nbytes(self) -> int:
        n, c, h, w = self._full_shape()
        return n * c * h * w * 4

    def _allocate(self, batch: int, height: int, width: int) -> None:
        c = self.descriptor.channels
        nbytes = batch * c * height * width * 4
        self._x = [self._malloc(nbytes), self._malloc(nbytes)]
        self._cond = self._malloc(nbytes)
        d, ctx = self.descriptor, self._context
        shapes = {d.X: (batch, c, height, width), d.COND: (batch, c, height, width), d.T: (batch,),
                  d.COEF: (batch, 4)}
        for name, shape in shapes.items():
            if not ctx.set_input_shape(name, shape):
                raise UsageError(f"TensorRT refused input shape {shape} for {name!r}; the engine's profile is "
                                 f"{self.descriptor.profile}")
        if not ctx.set_tensor_address(d.COND, self._cond):  # cond never moves while the shape is bound
            raise CudaError(f"set_tensor_address({d.COND!r}) failed")
        self._warm = False

    def _release_buffers(self) -> None:
        self._drop_graph()
        for ptr in (*self._x, self._cond, self._t_table, self._coef_table):
            self._free(ptr)
        self._x, self._cond, self._t_table, self._coef_table = [], 0, 0, 0

    def _upload_tables(self, t_table: np.ndarray, coef_table: np.ndarray) -> None:
        self._drop_graph()
        self._warm = False
        self._free(self._t_table)
        self._free(self._coef_table)
        self._t_table = self._coef_table = 0
        s, n = t_table.shape
        self._t_stride = -(-n * 4 // ALIGN) * ALIGN
        self._coef_stride = -(-n * 16 // ALIGN) * ALIGN
        t_host = np.zeros((s, self._t_stride // 4), dtype=np.float32)
        t_host[:, :n] = t_table
        coef_host = np.zeros((s, self._coef_stride // 4), dtype=np.float32)
        coef_host[:, : n * 4] = coef_table.reshape(s, n * 4)
        self._t_table = self._malloc(t_host.nbytes)
        self._coef_table = self._malloc(coef_host.nbytes)
        h2d = self._cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        for ptr, host in ((self._t_table, t_host), (self._coef_table, coef_host)):
            _cuda(self._cudart, self._cudart.cudaMemcpy(ptr, host.ctypes.data, host.nbytes, h2d), "cudaMemcpy")

    # ------------------------------------------------------------------ data movement
    def _h2d(self, dst: int, src: np.ndarray) -> None:
        cudart = self._cudart
        _cuda(cudart, cudart.cudaMemcpyAsync(dst, src.ctypes.data, src.nbytes,
                                             cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, self._stream),
              "cudaMemcpyAsync(host to device)")

    def _write_cond(self, cond: np.ndarray) -> None:
        self._h2d(self._cond, np.ascontiguousarray(cond))

    def _write_x(self, x: np.ndarray) -> None:
        self._h2d(self._x[self._cur], np.ascontiguousarray(x))

    def _read_x(self, out: np.ndarray) -> None:
        cudart = self._cudart
        _cuda(cudart, cudart.cudaMemcpyAsync(out.ctypes.data, self._x[self._cur], out.nbytes,
                                             cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost, self._stream),
              "cudaMemcpyAsync(device to host)")
        _cuda(cudart, cudart.cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")

    # ------------------------------------------------------------------ steps
    def _enqueue(self, i: int, src: int) -> None:
        """Enqueue step i reading x[src], writing x[1 - src]; every TensorRT return value checked."""
        d, ctx = self.descriptor, self._context
        addresses = ((d.X, self._x[src]), (d.OUT, self._x[src ^ 1]),
                     (d.T, self._t_table + i * self._t_stride), (d.COEF, self._coef_table + i * self._coef_stride))
        for name, ptr in addresses:
            if not ctx.set_tensor_address(name, ptr):
                raise CudaError(f"set_tensor_address({name!r}) failed at step {i}")
        if not ctx.execute_async_v3(self._stream_handle):
            raise CudaError(f"TensorRT enqueue (execute_async_v3) failed at step {i}; see TensorRT's log")

    def _step(self, i: int) -> None:
        self._enqueue(i, self._cur)

    def run(self) -> None:
        """All S steps: step by step the first time at a shape, then as one replayed CUDA graph."""
        self._require_ready()
        s = self.num_steps
        if self.use_cuda_graph and self.graph_error is None and self._cur == 0:
            if self._graph_exec is None and self._warm:
                self._capture()
            if self._graph_exec is not None:
                _cuda(self._cudart, self._cudart.cudaGraphLaunch(self._graph_exec, self._stream), "cudaGraphLaunch")
                self._cur = s % 2
                return
        start = self._cur
        for i in range(s):
            self._enqueue(i, self._cur)
            self._cur ^= 1
        if start == 0:
            self._warm = True  # one full loop ran at this shape: capture may follow

    def _capture(self) -> None:
        cudart = self._cudart
        _cuda(cudart, cudart.cudaStreamBeginCapture(
            self._stream, cudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal), "cudaStreamBeginCapture")
        try:
            src = 0
            for i in range(self.num_steps):
                self._enqueue(i, src)  # raises on a failed enqueue: never keep a graph with a hole
                src ^= 1
        except BaseException:
            result = cudart.cudaStreamEndCapture(self._stream)  # leave capture mode, discard what was recorded
            if isinstance(result, tuple) and len(result) > 1 and result[0] == cudart.cudaError_t.cudaSuccess:
                cudart.cudaGraphDestroy(result[1])
            raise
        try:
            self._graph = _cuda(cudart, cudart.cudaStreamEndCapture(self._stream), "cudaStreamEndCapture")
            self._graph_exec = _cuda(cudart, cudart.cudaGraphInstantiate(self._graph, 0), "cudaGraphInstantiate")
        except CudaError as e:  # capture unsupported here: keep running step by step
            self._drop_graph()
            self.graph_error = str(e)

    def _drop_graph(self) -> None:
        cudart = getattr(self, "_cudart", None)
        if cudart is None:
            return
        if self._graph_exec is not None:
            _cuda(cudart, cudart.cudaGraphExecDestroy(self._graph_exec), "cudaGraphExecDestroy")
        if self._graph is not None:
            _cuda(cudart, cudart.cudaGraphDestroy(self._graph), "cudaGraphDestroy")
        self._graph = self._graph_exec = None

    @property
    def graph_captured(self) -> bool:
        return self._graph_exec is not None

    def buffer_pointers(self) -> tuple[int, int, int]:
        """Device pointers of (x[0], x[1], cond): constant while the shape stays bound."""
        self._check_bound()
        return (self._x[0], self._x[1], self._cond)

    def _release_engine(self) -> None:
        if self._stream is not None:
            _cuda(self._cudart, self._cudart.cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")
            _cuda(self._cudart, self._cudart.cudaStreamDestroy(self._stream), "cudaStreamDestroy")
            self._stream = None
        self._context = self._engine = self._runtime = None

    def __del__(self) -> None:
        try:
            if not self._closed and getattr(self, "_cudart", None) is not None:
                self.close()
        except Exception:  # interpreter shutdown: CUDA may already be gone
            pass
