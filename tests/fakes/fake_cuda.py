"""A FAKE of cuda-python's ``cuda.bindings.runtime`` (cudart) for CPU tests. Not CUDA.

It keeps "device memory" in host bytearrays behind fake pointers (256-byte aligned, bounds
checked on every access), records every call in ``calls``, and implements stream capture:
between ``cudaStreamBeginCapture`` and ``cudaStreamEndCapture`` work enqueued on the capturing
stream (through :meth:`FakeCudart.enqueue`, used by the fake TensorRT context) is recorded
instead of run, and ``cudaGraphLaunch`` replays it. Every function returns cuda-python's
``(err, *values)`` tuple.

Use :func:`install` (with pytest's ``monkeypatch``) to put it in ``sys.modules`` as
``cuda.bindings.runtime``.
"""

# ruff: noqa: N815 - the fake mirrors cuda-python's mixedCase names
from __future__ import annotations

import ctypes
import enum
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

__all__ = ["FakeCudart", "install"]


class cudaError_t(enum.IntEnum):  # noqa: N801
    cudaSuccess = 0
    cudaErrorInvalidValue = 1
    cudaErrorMemoryAllocation = 2
    cudaErrorInvalidDevicePointer = 17
    cudaErrorStreamCaptureUnsupported = 900
    cudaErrorStreamCaptureInvalidated = 901


class cudaMemcpyKind(enum.IntEnum):  # noqa: N801
    cudaMemcpyHostToHost = 0
    cudaMemcpyHostToDevice = 1
    cudaMemcpyDeviceToHost = 2
    cudaMemcpyDeviceToDevice = 3


class cudaStreamCaptureMode(enum.IntEnum):  # noqa: N801
    cudaStreamCaptureModeGlobal = 0
    cudaStreamCaptureModeThreadLocal = 1
    cudaStreamCaptureModeRelaxed = 2


class cudaDeviceAttr(enum.IntEnum):  # noqa: N801
    cudaDevAttrComputeCapabilityMajor = 75
    cudaDevAttrComputeCapabilityMinor = 76


class cudaStream_t:  # noqa: N801
    def __init__(self, handle: int) -> None:
        self._handle = handle

    def __int__(self) -> int:
        return self._handle

    def __repr__(self) -> str:
        return f"<fake cudaStream_t {self._handle:#x}>"


@dataclass
class FakeGraph:
    ops: list[Callable[[], None]] = field(default_factory=list)
    destroyed: bool = False


@dataclass
class FakeProps:
    name: bytes = b"Fake GPU"
    major: int = 8
    minor: int = 6


OK = (cudaError_t.cudaSuccess,)


class FakeCudart(types.ModuleType):
    """The fake cudart module. ``compute_capability`` / ``fail`` are settable by tests."""

    cudaError_t = cudaError_t
    cudaMemcpyKind = cudaMemcpyKind
    cudaStreamCaptureMode = cudaStreamCaptureMode
    cudaDeviceAttr = cudaDeviceAttr
    cudaStream_t = cudaStream_t
    cudaStreamDefault = 0
    cudaStreamNonBlocking = 1

    def __init__(self, compute_capability: tuple[int, int] = (8, 6)) -> None:
        super().__init__("cuda.bindings.runtime", "FAKE cuda-python runtime for CPU tests")
        self.compute_capability = compute_capability
        self.calls: list[tuple[str, tuple]] = []
        self.memory: dict[int, bytearray] = {}
        self.freed: list[int] = []
        self._next_ptr = 0x7F0000000000
        self._next_stream = 0x1000
        self.capturing: dict[int, list[Callable[[], None]]] = {}
        self.capture_fails = False  # make cudaStreamEndCapture report an unsupported capture
        self.graphs: list[FakeGraph] = []
        self.launches = 0
        self.device = 0

    # ---------------------------------------------------------------- bookkeeping
    def _log(self, name: str, *args) -> None:
        self.calls.append((name, args))

    def count(self, name: str) -> int:
        return sum(1 for n, _ in self.calls if n == name)

    def _region(self, ptr: int, nbytes: int) -> tuple[bytearray, int]:
        for base, buf in self.memory.items():
            if base <= ptr and ptr + nbytes <= base + len(buf):
                return buf, ptr - base
        raise AssertionError(f"fake cuda: access of {nbytes} bytes at {ptr:#x} is outside every allocation")

    def read(self, ptr: int, shape: tuple[int, ...], dtype=np.float32) -> np.ndarray:
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        buf, off = self._region(ptr, nbytes)
        return np.frombuffer(bytes(buf[off:off + nbytes]), dtype=dtype).reshape(shape).copy()

    def write(self, ptr: int, data: np.ndarray) -> None:
        raw = np.ascontiguousarray(data).tobytes()
        buf, off = self._region(ptr, len(raw))
        buf[off:off + len(raw)] = raw

    def enqueue(self, stream_handle: int, op: Callable[[], None]) -> None:
        """Run ``op`` now, or record it when the stream is capturing (how kernels behave)."""
        if stream_handle in self.capturing:
            self.capturing[stream_handle].append(op)
        else:
            op()

    # ---------------------------------------------------------------- device
    def cudaSetDevice(self, device: int):
        self._log("cudaSetDevice", device)
        self.device = device
        return OK

    def cudaGetDevice(self):
        return (cudaError_t.cudaSuccess, self.device)

    def cudaDeviceGetAttribute(self, attr, device: int):
        self._log("cudaDeviceGetAttribute", attr, device)
        if attr == cudaDeviceAttr.cudaDevAttrComputeCapabilityMajor:
            return (cudaError_t.cudaSuccess, self.compute_capability[0])
        if attr == cudaDeviceAttr.cudaDevAttrComputeCapabilityMinor:
            return (cudaError_t.cudaSuccess, self.compute_capability[1])
        return (cudaError_t.cudaErrorInvalidValue, 0)

    def cudaGetDeviceProperties(self, device: int):
        self._log("cudaGetDeviceProperties", device)
        return (cudaError_t.cudaSuccess, FakeProps(major=self.compute_capability[0],
                                                   minor=self.compute_capability[1]))

    def cudaGetErrorName(self, err):
        return (cudaError_t.cudaSuccess, str(err).encode())

    # ---------------------------------------------------------------- memory
    def cudaMalloc(self, nbytes: int):
        self._log("cudaMalloc", nbytes)
        if self.capturing:  # cudaMalloc is not allowed while a stream captures
            return (cudaError_t.cudaErrorStreamCaptureUnsupported, 0)
        ptr = self._next_ptr
        self.memory[ptr] = bytearray(int(nbytes))
        self._next_ptr += -(-max(int(nbytes), 1) // 512) * 512 + 512
        return (cudaError_t.cudaSuccess, ptr)

    def cudaFree(self, ptr: int):
        self._log("cudaFree", ptr)
        if ptr not in self.memory:
            return (cudaError_t.cudaErrorInvalidDevicePointer,)
        del self.memory[ptr]
        self.freed.append(ptr)
        return OK

    def _copy(self, dst: int, src: int, nbytes: int, kind) -> None:
        if kind == cudaMemcpyKind.cudaMemcpyHostToDevice:
            buf, off = self._region(dst, nbytes)
            buf[off:off + nbytes] = ctypes.string_at(src, nbytes)
        elif kind == cudaMemcpyKind.cudaMemcpyDeviceToHost:
            buf, off = self._region(src, nbytes)
            ctypes.memmove(dst, bytes(buf[off:off + nbytes]), nbytes)
        else:
            raise AssertionError(f"fake cuda: copy kind {kind} not used by the runtime")

    def cudaMemcpy(self, dst: int, src: int, nbytes: int, kind):
        self._log("cudaMemcpy", dst, src, nbytes, kind)
        self._copy(int(dst), int(src), int(nbytes), kind)
        return OK

    def cudaMemcpyAsync(self, dst: int, src: int, nbytes: int, kind, stream):
        self._log("cudaMemcpyAsync", dst, src, nbytes, kind, int(stream))
        if int(stream) in self.capturing:
            raise AssertionError("fake cuda: the runtime copies host memory while capturing a graph")
        self._copy(int(dst), int(src), int(nbytes), kind)
        return OK

    # ---------------------------------------------------------------- streams and graphs
    def cudaStreamCreateWithFlags(self, flags: int):
        self._log("cudaStreamCreateWithFlags", flags)
        self._next_stream += 0x10
        return (cudaError_t.cudaSuccess, cudaStream_t(self._next_stream))

    def cudaStreamCreate(self):
        return self.cudaStreamCreateWithFlags(0)

    def cudaStreamSynchronize(self, stream):
        self._log("cudaStreamSynchronize", int(stream))
        return OK

    def cudaStreamDestroy(self, stream):
        self._log("cudaStreamDestroy", int(stream))
        return OK

    def cudaStreamBeginCapture(self, stream, mode):
        self._log("cudaStreamBeginCapture", int(stream), mode)
        if int(stream) in self.capturing:
            return (cudaError_t.cudaErrorInvalidValue,)
        self.capturing[int(stream)] = []
        return OK

    def cudaStreamEndCapture(self, stream):
        self._log("cudaStreamEndCapture", int(stream))
        ops = self.capturing.pop(int(stream), None)
        if ops is None:
            return (cudaError_t.cudaErrorInvalidValue, None)
        if self.capture_fails:
            return (cudaError_t.cudaErrorStreamCaptureUnsupported, None)
        graph = FakeGraph(ops=ops)
        self.graphs.append(graph)
        return (cudaError_t.cudaSuccess, graph)

    def cudaGraphInstantiate(self, graph, flags: int = 0):
        self._log("cudaGraphInstantiate", graph, flags)
        return (cudaError_t.cudaSuccess, ("exec", graph))

    def cudaGraphLaunch(self, graph_exec, stream):
        self._log("cudaGraphLaunch", int(stream))
        _, graph = graph_exec
        if graph.destroyed:
            return (cudaError_t.cudaErrorInvalidValue,)
        self.launches += 1
        for op in graph.ops:
            op()
        return OK

    def cudaGraphExecDestroy(self, graph_exec):
        self._log("cudaGraphExecDestroy")
        return OK

    def cudaGraphDestroy(self, graph):
        self._log("cudaGraphDestroy")
        graph.destroyed = True
        return OK


def install(monkeypatch, cudart: FakeCudart | None = None) -> FakeCudart:
    """Put a FakeCudart in sys.modules as ``cuda.bindings.runtime`` (undone by monkeypatch)."""
    cudart = cudart or FakeCudart()
    cuda_pkg = types.ModuleType("cuda")
    cuda_pkg.__path__ = []  # a package
    bindings = types.ModuleType("cuda.bindings")
    bindings.__path__ = []
    bindings.runtime = cudart
    cuda_pkg.bindings = bindings
    monkeypatch.setitem(sys.modules, "cuda", cuda_pkg)
    monkeypatch.setitem(sys.modules, "cuda.bindings", bindings)
    monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", cudart)
    return cudart
