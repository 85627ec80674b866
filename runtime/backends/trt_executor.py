"""The one TensorRT executor: engines run over named device buffers on one CUDA stream.

Both users of TensorRT run through it: ``rd_export``'s engine verification (one-shot calls,
:meth:`Executor.run`) and the runtime backend (runtime/backends/cuda_backend.py: buffers bound
once per frame shape, the S-step loop as one CUDA graph). Nothing here knows the fused step:

- an **engine** is anything with TensorRT's named-tensor API (:class:`Engine`): a TensorRT
  plan (:class:`TensorRTEngine`, an ``ICudaEngine`` and one ``IExecutionContext``), or a CUDA
  stand-in (tests/gpu/standin.py: a PyTorch kernel sequence) where TensorRT is not installed;
- **buffers** are device allocations with names, allocated by :meth:`Executor.allocate` and
  kept while their size is unchanged (so once per shape), each with a pinned host staging
  buffer for copies. Engines are bound to buffers by address, so an engine's output buffer can
  be another engine's input buffer: a prologue engine writing ``cond`` in place for the step;
- every copy and every enqueue goes to the executor's own non-blocking stream, in order; no
  synchronous copy and nothing on the legacy default stream (see runtime/backends/cuda_device.py);
- a **graph** is whatever a callback enqueues, captured once (:meth:`Executor.capture`) and
  replayed with one ``cudaGraphLaunch``. A failed enqueue inside the capture aborts it and
  raises (a graph with a hole would replay stale output, ultralytics#26223); CUDA refusing the
  capture raises :class:`GraphCaptureError` so the caller can run the same work step by step.

Every public method first makes the executor's device current on the calling thread.

TensorRT calls (TensorRT 10/11 Python API, named-tensor form): ``Runtime(logger)``,
``trt.Runtime.engine_host_code_allowed = True`` for version-compatible plans (they embed the lean
runtime, host code; TensorRT "Version Compatibility" / 11.x "Engine Compatibility"),
``deserialize_cuda_engine``, ``num_io_tensors`` / ``get_tensor_name`` / ``get_tensor_mode`` /
``get_tensor_dtype`` / ``get_tensor_profile_shape(name, 0)``, ``create_execution_context``;
on the context ``set_input_shape -> bool``, ``get_tensor_shape``, ``set_tensor_address -> bool``
(256-byte aligned addresses: every buffer here is a cudaMalloc base or a 256-byte multiple into
one), ``execute_async_v3(stream_handle) -> bool``. None of this has run on TensorRT yet (no
TensorRT on the machines it was written on); the fakes in tests/fakes pin the calls.
"""

from __future__ import annotations

import collections
import importlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import numpy as np

from runtime.backends.cuda_device import CudaDevice, CudaError, GraphCaptureError, PinnedBuffer
from runtime.errors import ArtifactError, DependencyError, UsageError

__all__ = ["ALIGN", "TRT_INSTALL_HINT", "EngineIO", "Engine", "TensorRTEngine", "Executor", "CudaGraph",
           "import_tensorrt", "capturing_logger", "align_up"]

TRT_INSTALL_HINT = "pip install 'raindiffusion-edge[trt]'"
#: setTensorAddress needs 256-byte aligned addresses (TensorRT NvInferRuntime.h)
ALIGN = 256


def align_up(nbytes: int, alignment: int = ALIGN) -> int:
    return -(-int(nbytes) // alignment) * alignment


def import_tensorrt(missing: str | None = None) -> Any:
    """The ``tensorrt`` module, or DependencyError with ``missing`` (one line) when absent."""
    try:
        return importlib.import_module("tensorrt")
    except ImportError:
        raise DependencyError(missing or f"TensorRT is not installed: {TRT_INSTALL_HINT}") from None


def capturing_logger(trt: Any, keep: int = 64) -> Any:
    """A ``trt.ILogger`` keeping the last ``keep`` warnings and errors, so failures can quote them."""

    class _Logger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.messages: collections.deque[tuple[Any, str]] = collections.deque(maxlen=keep)

        def log(self, severity, msg) -> None:
            if severity in (trt.ILogger.Severity.INTERNAL_ERROR, trt.ILogger.Severity.ERROR,
                            trt.ILogger.Severity.WARNING):
                self.messages.append((severity, str(msg)))

        def errors(self) -> list[str]:
            return [m for s, m in self.messages
                    if s in (trt.ILogger.Severity.INTERNAL_ERROR, trt.ILogger.Severity.ERROR)]

    return _Logger()


class EngineIO(NamedTuple):
    name: str
    is_input: bool
    dtype: np.dtype | None  # None: a TensorRT type numpy cannot hold


class Engine(Protocol):
    """What the executor needs of an engine: TensorRT's named-tensor execution API."""

    name: str

    def io(self) -> Sequence[EngineIO]: ...

    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool: ...

    def get_tensor_shape(self, name: str) -> tuple[int, ...]: ...

    def set_tensor_address(self, name: str, ptr: int) -> bool: ...

    def execute_async_v3(self, stream_handle: int) -> bool: ...

    def profile(self, name: str) -> tuple[tuple[int, ...], ...] | None:
        """(min, opt, max) shape of an input, for messages; None when unknown."""
        ...

    def errors(self) -> list[str]:
        """Recent error messages of the engine (TensorRT's log), for messages."""
        ...

    def close(self) -> None: ...


class TensorRTEngine:
    """A serialized plan deserialised with one execution context, in the :class:`Engine` protocol.

    ``allow_host_code``: the plan was built version-compatible (it carries the lean runtime, so
    TensorRT needs ``engine_host_code_allowed`` to load it; only for plans you trust, TensorRT's
    docs say: the runtime checks the plan's sha256 against its manifest first).
    Raises ArtifactError (with TensorRT's log) when the plan cannot be deserialised.
    """

    def __init__(self, plan: bytes, *, trt: Any = None, name: str = "plan", allow_host_code: bool = False) -> None:
        self.trt = trt = trt if trt is not None else import_tensorrt()
        self.name = name
        self.logger = capturing_logger(trt)
        self.runtime = trt.Runtime(self.logger)
        if self.runtime is None:
            raise ArtifactError(f"{name}: TensorRT could not create a runtime")
        if allow_host_code:
            self.runtime.engine_host_code_allowed = True
        self.engine = self.runtime.deserialize_cuda_engine(bytes(plan))
        if self.engine is None:
            log = " | ".join(self.logger.errors()[-3:])
            raise ArtifactError(f"{name}: TensorRT {trt.__version__} could not deserialise the plan"
                                + (f" ({log})" if log else ""))
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise CudaError(f"{name}: TensorRT could not create an execution context (out of GPU memory?)")
        self._io = []
        for i in range(self.engine.num_io_tensors):
            n = self.engine.get_tensor_name(i)
            try:
                dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(n)))
            except (TypeError, KeyError):
                dtype = None
            self._io.append(EngineIO(n, self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT, dtype))

    def io(self) -> list[EngineIO]:
        return list(self._io)

    def dtype_name(self, name: str) -> str:
        return str(getattr(self.engine.get_tensor_dtype(name), "name", self.engine.get_tensor_dtype(name)))

    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
        return bool(self.context.set_input_shape(name, tuple(int(s) for s in shape)))

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(s) for s in self.context.get_tensor_shape(name))

    def set_tensor_address(self, name: str, ptr: int) -> bool:
        return bool(self.context.set_tensor_address(name, int(ptr)))

    def execute_async_v3(self, stream_handle: int) -> bool:
        return bool(self.context.execute_async_v3(int(stream_handle)))

    def profile(self, name: str) -> tuple[tuple[int, ...], ...] | None:
        try:
            return tuple(tuple(int(v) for v in s) for s in self.engine.get_tensor_profile_shape(name, 0))
        except Exception:  # only decorates a message
            return None

    def errors(self) -> list[str]:
        return self.logger.errors()

    def close(self) -> None:
        # the context before the engine before the runtime (TensorRT's object lifetimes)
        self.context = None
        self.engine = None
        self.runtime = None


@dataclass
class _Buffer:
    ptr: int
    nbytes: int
    staging: PinnedBuffer | None = None


@dataclass
class CudaGraph:
    """A captured, instantiated CUDA graph (owned by the executor that captured it)."""

    graph: Any
    exec: Any


def _shape_text(shape: Sequence[int]) -> str:
    return "x".join(str(int(s)) for s in shape)


class Executor:
    """Engines over named device buffers on one non-blocking stream of one device (module docstring)."""

    def __init__(self, device: CudaDevice) -> None:
        self.device = device
        self._buffers: dict[str, _Buffer] = {}
        self._graphs: list[CudaGraph] = []
        self._capturing = False
        self.mallocs = 0  # device allocations made, for tests and benchmarks
        device.activate()
        self.stream = device.create_stream()
        self.stream_handle = int(self.stream)

    # ------------------------------------------------------------------ device
    def activate(self) -> None:
        if not self._capturing:  # nothing but enqueues while a stream captures
            self.device.activate()

    # ------------------------------------------------------------------ buffers
    def allocate(self, sizes: Mapping[str, int]) -> dict[str, int]:
        """Device buffers ``name -> nbytes``: an existing buffer of that size is kept (allocated
        once per shape), one of another size is freed and allocated again. Returns the pointers."""
        self.activate()
        changed = [n for n, b in sizes.items() if n in self._buffers and self._buffers[n].nbytes != int(b)]
        if changed:
            self.synchronize()  # nothing queued may still use memory about to be freed
            self.free(changed)
        for name, nbytes in sizes.items():
            if name not in self._buffers:
                self._buffers[name] = _Buffer(self.device.malloc(max(int(nbytes), 1)), int(nbytes))
                self.mallocs += 1
        return {n: self._buffers[n].ptr for n in sizes}

    def free(self, names: Sequence[str] | None = None) -> None:
        """Free the named buffers (all when None), their staging too; waits for queued work first."""
        self.activate()
        names = list(self._buffers) if names is None else [n for n in names if n in self._buffers]
        if not names:
            return
        self.synchronize()
        for n in names:
            buf = self._buffers.pop(n)
            self.device.free_host(buf.staging)
            self.device.free(buf.ptr)

    def pointer(self, name: str, offset: int = 0) -> int:
        return self._buffer(name).ptr + int(offset)

    def nbytes(self, name: str) -> int:
        return self._buffer(name).nbytes

    @property
    def buffers(self) -> dict[str, int]:
        """name -> device pointer of every buffer."""
        return {n: b.ptr for n, b in self._buffers.items()}

    def _buffer(self, name: str) -> _Buffer:
        try:
            return self._buffers[name]
        except KeyError:
            raise UsageError(f"no device buffer {name!r} is allocated (bind a shape first)") from None

    def _staging(self, buf: _Buffer) -> PinnedBuffer:
        if buf.staging is None:
            buf.staging = self.device.malloc_host(max(buf.nbytes, 1))
        elif buf.staging.pending:
            self.synchronize()  # a queued copy may still read or write this pinned buffer
        return buf.staging

    # ------------------------------------------------------------------ copies
    def upload(self, name: str, array: np.ndarray) -> None:
        """Copy ``array`` into device buffer ``name`` (from its start) on the executor's stream,
        through the buffer's pinned staging (so the caller's array is free to change at once)."""
        self.activate()
        buf = self._buffer(name)
        data = np.ascontiguousarray(array)
        if data.nbytes > buf.nbytes:
            raise UsageError(f"{data.nbytes} bytes do not fit device buffer {name!r} of {buf.nbytes} bytes")
        staging = self._staging(buf)
        staging.view()[: data.nbytes] = data.reshape(-1).view(np.uint8)
        self.device.copy_h2d(buf.ptr, staging.ptr, data.nbytes, self.stream)
        staging.pending = True

    def download(self, name: str, out: np.ndarray) -> np.ndarray:
        """Copy device buffer ``name`` into ``out`` (C-contiguous) after the work queued before it."""
        self.activate()
        buf = self._buffer(name)
        if not out.flags.c_contiguous or out.nbytes > buf.nbytes:
            raise UsageError(f"out must be C-contiguous and at most {buf.nbytes} bytes for {name!r}")
        staging = self._staging(buf)
        self.device.copy_d2h(staging.ptr, buf.ptr, out.nbytes, self.stream)
        staging.pending = True
        self.synchronize()
        out.reshape(-1).view(np.uint8)[:] = staging.view()[: out.nbytes]
        return out

    def synchronize(self) -> None:
        self.activate()
        self.device.synchronize(self.stream)
        for b in self._buffers.values():
            if b.staging is not None:
                b.staging.pending = False

    # ------------------------------------------------------------------ engines
    def set_shapes(self, engine: Engine, shapes: Mapping[str, Sequence[int]]) -> None:
        """Input shapes of ``engine``; UsageError naming the shape and the engine's profile."""
        self.activate()
        for name, shape in shapes.items():
            shape = tuple(int(s) for s in shape)
            if not engine.set_input_shape(name, shape):
                prof = engine.profile(name)
                where = (f"; the engine's profile is {_shape_text(prof[0])}..{_shape_text(prof[2])}" if prof
                         else "")
                raise UsageError(f"{engine.name}: the engine refused input shape {_shape_text(shape)} for "
                                 f"{name!r} (outside its optimisation profile?){where}")

    def output_shape(self, engine: Engine, name: str) -> tuple[int, ...]:
        shape = engine.get_tensor_shape(name)
        if any(s < 0 for s in shape):
            raise UsageError(f"{engine.name}: output {name!r} has unresolved shape {shape}; set every input shape")
        return shape

    def bind(self, engine: Engine, addresses: Mapping[str, int]) -> None:
        """Point the engine's named tensors at device addresses (256-byte aligned)."""
        self.activate()
        for name, ptr in addresses.items():
            if not engine.set_tensor_address(name, int(ptr)):
                raise CudaError(f"{engine.name}: set_tensor_address({name!r}, {int(ptr):#x}) failed (not 256-byte "
                                f"aligned, or no such tensor)")

    def enqueue(self, engine: Engine, what: str = "") -> None:
        """Enqueue one run of ``engine`` on the stream; its boolean result is checked every time."""
        self.activate()
        if not engine.execute_async_v3(self.stream_handle):
            log = " | ".join(engine.errors()[-3:])
            raise CudaError(f"{engine.name}: enqueue (execute_async_v3) failed{what}"
                            + (f": {log}" if log else "; see TensorRT's log"))

    # ------------------------------------------------------------------ graphs
    def capture(self, record: Callable[[], None]) -> CudaGraph:
        """Capture what ``record()`` enqueues on the stream as one graph, instantiated.

        Run ``record()`` once outside capture first at these shapes (TensorRT needs one enqueue
        after a shape change before capture). An exception from ``record`` (a failed enqueue)
        ends the capture, discards it and propagates; a capture or instantiation CUDA refuses
        raises GraphCaptureError.
        """
        self.activate()
        self.device.begin_capture(self.stream)
        self._capturing = True
        try:
            record()
        except BaseException:
            self._capturing = False
            self.device.abort_capture(self.stream)
            raise
        self._capturing = False
        graph = self.device.end_capture(self.stream)
        try:
            graph_exec = self.device.instantiate(graph)
        except GraphCaptureError:
            self.device.destroy_graph(graph, None)
            raise
        g = CudaGraph(graph, graph_exec)
        self._graphs.append(g)
        return g

    def launch(self, graph: CudaGraph) -> None:
        self.activate()
        self.device.launch(graph.exec, self.stream)

    def destroy(self, graph: CudaGraph | None) -> None:
        if graph is None or graph not in self._graphs:
            return
        self.activate()
        self.synchronize()  # a launch may still be running
        self._graphs.remove(graph)
        self.device.destroy_graph(graph.graph, graph.exec)

    # ------------------------------------------------------------------ one-shot runs
    def run(self, engine: Engine, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One run of ``engine`` on host arrays: buffers named after the tensors (reused while
        the shapes stay), inputs in, one enqueue, every output copied out."""
        self.activate()
        io = {t.name: t for t in engine.io()}
        missing = sorted(n for n, t in io.items() if t.is_input and n not in feeds)
        unknown = sorted(set(feeds) - set(io))
        if missing or unknown:
            raise UsageError(f"{engine.name}: feeds need inputs {sorted(n for n, t in io.items() if t.is_input)}"
                             f" (missing {missing}, unknown {unknown})")
        arrays = {n: np.ascontiguousarray(a, dtype=io[n].dtype) for n, a in feeds.items()}
        self.set_shapes(engine, {n: a.shape for n, a in arrays.items()})
        outputs = {n: self.output_shape(engine, n) for n, t in io.items() if not t.is_input}
        sizes = {n: a.nbytes for n, a in arrays.items()}
        sizes.update({n: math.prod(s) * io[n].dtype.itemsize for n, s in outputs.items()})
        self.allocate(sizes)
        for n, a in arrays.items():
            self.upload(n, a)
        self.bind(engine, {n: self.pointer(n) for n in io})
        self.enqueue(engine)
        return {n: self.download(n, np.empty(s, dtype=io[n].dtype)) for n, s in outputs.items()}

    # ------------------------------------------------------------------ lifetime
    def close(self) -> None:
        """Wait for queued work, destroy graphs, free buffers and the stream (idempotent)."""
        if self.stream is None:
            return
        self.device.activate()
        self.device.synchronize(self.stream)
        for g in list(self._graphs):
            self.device.destroy_graph(g.graph, g.exec)
        self._graphs.clear()
        self.free()
        self.device.destroy_stream(self.stream)
        self.stream = None
