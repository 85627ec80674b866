"""One CUDA device through cuda-python's runtime API (``cuda.bindings.runtime``), every call checked.

The only module of the runtime that calls CUDA directly. cuda-python is imported lazily (the
runtime imports without it); every call returns ``(err, *values)`` and goes through
:meth:`CudaDevice.check`, which raises :class:`CudaError` naming the call and the error.

What the calls rely on (cuda-python mirrors the CUDA runtime API one to one; the call forms
are those of cuda-python's own tests, ``cuda_bindings/tests/test_cudart.py``, and of TensorRT's
samples, ``samples/python/common_runtime.py``):

- ``cudaSetDevice`` sets the current device **of the calling host thread** only, so a call
  made from another thread must set it again: :meth:`CudaDevice.activate` is called at every
  entry point of the executor (runtime/backends/trt_executor.py), never once at start-up.
- ``cudaStreamCreateWithFlags(cudaStreamNonBlocking)``: a stream that does not synchronise
  with the legacy default stream. Work on it is therefore not ordered after anything issued
  to the default stream (a synchronous ``cudaMemcpy`` included), so every copy the runtime
  makes is a ``cudaMemcpyAsync`` on that same stream.
- Host staging memory is pinned (``cudaMallocHost`` / ``cudaFreeHost``): a copy from pinned
  memory is a true DMA that reads the host buffer when it executes ("API synchronization
  behavior", CUDA runtime API, section 2), so the executor never rewrites or frees a staging
  buffer while a copy from it may be queued.
- Stream capture: ``cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal)`` /
  ``cudaStreamEndCapture(stream) -> graph`` / ``cudaGraphInstantiate(graph, 0)`` (the
  cuda-python >= 12 form) / ``cudaGraphLaunch(exec, stream)`` / ``cudaGraphExecDestroy`` /
  ``cudaGraphDestroy``. ThreadLocal mode forbids unsafe calls (``cudaMalloc``, synchronous
  copies, synchronising the stream) on the capturing thread only.
"""

from __future__ import annotations

import ctypes
import importlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from runtime.errors import DependencyError, RDError

__all__ = ["CUDA_INSTALL_HINT", "CudaError", "GraphCaptureError", "CudaDevice", "PinnedBuffer", "import_cudart"]

CUDA_INSTALL_HINT = "pip install 'raindiffusion-edge[trt]'"


class CudaError(RDError):
    """A CUDA runtime call or an engine enqueue failed on the device (out of memory included).

    Exit code 1: the artifact is not at fault (that would be ArtifactError, 4) and the user's
    options were valid (UsageError, 2); the message names the call and the CUDA error.
    """

    exit_code = 1


class GraphCaptureError(CudaError):
    """CUDA refused to capture or instantiate a graph (the caller may run step by step)."""


def import_cudart(missing: str | None = None) -> Any:
    """cuda-python's runtime module: ``cuda.bindings.runtime`` (>= 12.6) or the older ``cuda.cudart``.

    ``missing``: the one-line DependencyError message when neither imports.
    """
    try:
        return importlib.import_module("cuda.bindings.runtime")
    except ImportError:
        pass
    try:
        return importlib.import_module("cuda.cudart")  # cuda-python 12.x before 12.6
    except ImportError:
        raise DependencyError(missing or f"cuda-python is not installed: {CUDA_INSTALL_HINT}") from None


def _error_name(err: Any) -> str:
    return str(getattr(err, "name", err))


_OOM_HINT = " (out of GPU memory: use a smaller batch or frame size, or tile=...)"


@dataclass
class PinnedBuffer:
    """Page-locked host memory (``cudaMallocHost``) viewed as bytes; ``pending``: a copy from or
    to it may still be queued on the executor's stream."""

    ptr: int
    nbytes: int
    pending: bool = False

    def view(self) -> np.ndarray:
        """The buffer as a writable uint8 array (no copy)."""
        return np.ctypeslib.as_array((ctypes.c_ubyte * self.nbytes).from_address(self.ptr))


class CudaDevice:
    """CUDA device ``index`` through cuda-python; see the module docstring."""

    def __init__(self, index: int = 0, *, cudart: Any = None, missing: str | None = None) -> None:
        self.cudart = cudart if cudart is not None else import_cudart(missing)
        self.index = int(index)

    # ------------------------------------------------------------------ checking
    def check(self, result: Any, what: str) -> Any:
        """Check a cuda-python ``(err, *values)`` result; return the value (or values)."""
        cudart = self.cudart
        if not isinstance(result, tuple) or not result:
            raise CudaError(f"{what}: unexpected cuda-python result {result!r}")
        err = result[0]
        if err != cudart.cudaError_t.cudaSuccess:
            name = _error_name(err)
            hint = _OOM_HINT if name == "cudaErrorMemoryAllocation" else ""
            raise CudaError(f"CUDA {what} failed on cuda:{self.index}: {name}{hint}")
        if len(result) == 1:
            return None
        return result[1] if len(result) == 2 else result[1:]

    # ------------------------------------------------------------------ device
    def activate(self) -> None:
        """Make this device current on the calling thread (cudaSetDevice is per host thread)."""
        self.check(self.cudart.cudaSetDevice(self.index), f"cudaSetDevice({self.index})")

    def compute_capability(self) -> tuple[int, int]:
        attr = self.cudart.cudaDeviceAttr
        major = self.check(self.cudart.cudaDeviceGetAttribute(attr.cudaDevAttrComputeCapabilityMajor, self.index),
                           "cudaDeviceGetAttribute(compute capability major)")
        minor = self.check(self.cudart.cudaDeviceGetAttribute(attr.cudaDevAttrComputeCapabilityMinor, self.index),
                           "cudaDeviceGetAttribute(compute capability minor)")
        return int(major), int(minor)

    def name(self) -> str:
        """The GPU's name (cudaGetDeviceProperties(...).name, bytes in cuda-python)."""
        props = self.check(self.cudart.cudaGetDeviceProperties(self.index), "cudaGetDeviceProperties")
        name = props.name
        if isinstance(name, (bytes, bytearray)):
            name = bytes(name).split(b"\x00", 1)[0].decode("utf-8", "replace")
        return str(name).strip()

    # ------------------------------------------------------------------ memory
    def malloc(self, nbytes: int) -> int:
        return int(self.check(self.cudart.cudaMalloc(int(nbytes)), f"cudaMalloc({int(nbytes)} bytes)"))

    def free(self, ptr: int) -> None:
        if ptr:
            self.check(self.cudart.cudaFree(ptr), "cudaFree")

    def malloc_host(self, nbytes: int) -> PinnedBuffer:
        ptr = self.check(self.cudart.cudaMallocHost(int(nbytes)), f"cudaMallocHost({int(nbytes)} bytes)")
        return PinnedBuffer(int(ptr), int(nbytes))

    def free_host(self, buf: PinnedBuffer | None) -> None:
        if buf is not None and buf.ptr:
            self.check(self.cudart.cudaFreeHost(buf.ptr), "cudaFreeHost")
            buf.ptr = 0

    def copy_h2d(self, dst: int, src: int, nbytes: int, stream: Any) -> None:
        kind = self.cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        self.check(self.cudart.cudaMemcpyAsync(dst, src, int(nbytes), kind, stream), "cudaMemcpyAsync(host to device)")

    def copy_d2h(self, dst: int, src: int, nbytes: int, stream: Any) -> None:
        kind = self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self.check(self.cudart.cudaMemcpyAsync(dst, src, int(nbytes), kind, stream), "cudaMemcpyAsync(device to host)")

    # ------------------------------------------------------------------ streams
    def create_stream(self) -> Any:
        """A non-blocking stream on this device (the caller has activated it)."""
        return self.check(self.cudart.cudaStreamCreateWithFlags(self.cudart.cudaStreamNonBlocking),
                          "cudaStreamCreateWithFlags(cudaStreamNonBlocking)")

    def synchronize(self, stream: Any) -> None:
        self.check(self.cudart.cudaStreamSynchronize(stream), "cudaStreamSynchronize")

    def destroy_stream(self, stream: Any) -> None:
        self.check(self.cudart.cudaStreamDestroy(stream), "cudaStreamDestroy")

    # ------------------------------------------------------------------ graphs
    def begin_capture(self, stream: Any) -> None:
        mode = self.cudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
        try:
            self.check(self.cudart.cudaStreamBeginCapture(stream, mode), "cudaStreamBeginCapture")
        except CudaError as e:
            raise GraphCaptureError(str(e)) from None

    def end_capture(self, stream: Any) -> Any:
        try:
            return self.check(self.cudart.cudaStreamEndCapture(stream), "cudaStreamEndCapture")
        except CudaError as e:
            raise GraphCaptureError(str(e)) from None

    def abort_capture(self, stream: Any) -> None:
        """Leave capture mode after a failure, discarding what was recorded (errors ignored)."""
        result = self.cudart.cudaStreamEndCapture(stream)
        if isinstance(result, tuple) and len(result) > 1 and result[0] == self.cudart.cudaError_t.cudaSuccess:
            self.cudart.cudaGraphDestroy(result[1])

    def instantiate(self, graph: Any) -> Any:
        try:
            return self.check(self.cudart.cudaGraphInstantiate(graph, 0), "cudaGraphInstantiate")
        except CudaError as e:
            raise GraphCaptureError(str(e)) from None

    def launch(self, graph_exec: Any, stream: Any) -> None:
        self.check(self.cudart.cudaGraphLaunch(graph_exec, stream), "cudaGraphLaunch")

    def destroy_graph(self, graph: Any, graph_exec: Any) -> None:
        if graph_exec is not None:
            self.check(self.cudart.cudaGraphExecDestroy(graph_exec), "cudaGraphExecDestroy")
        if graph is not None:
            self.check(self.cudart.cudaGraphDestroy(graph), "cudaGraphDestroy")
