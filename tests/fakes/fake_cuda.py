"""A FAKE of cuda-python's ``cuda.bindings.runtime`` (cudart) for CPU tests. Not CUDA.

"Device memory" lives in host bytearrays behind fake pointers (256-byte aligned, bounds checked
on every access); every call is recorded in ``calls``; every function returns cuda-python's
``(err, *values)`` tuple. What it models, because the runtime's correctness depends on it:

**Streams and their ordering.** Work is not run when it is issued: it is queued on its stream
and runs when something waits for that stream (``cudaStreamSynchronize``,
``cudaDeviceSynchronize``, a synchronous copy). The legacy default stream (handle 0 or
``cudaStreamLegacy``) and streams created *blocking* (``cudaStreamCreate``, flag 0) share one
queue, since the legacy stream implicitly synchronises with every blocking stream; a
``cudaStreamNonBlocking`` stream has its own queue and is **not** ordered after legacy-stream
work (CUDA runtime API, "Stream synchronization behavior"). So a queued kernel reads device
memory as it is when its stream runs, not when it was issued.

**Copies, as "API synchronization behavior" documents them** (CUDA runtime API reference,
section 2): a synchronous ``cudaMemcpy`` from pageable host memory copies the host bytes to
staging at the call but the DMA to the device "may not have completed" when it returns: here
it is queued on the legacy stream. ``cudaMemcpyAsync`` from pageable memory is staged at the
call; from pinned memory (``cudaMallocHost``) it reads the host buffer when it executes, so
rewriting a pinned buffer before the copy ran corrupts it, and freeing it is caught. A copy to
pageable host memory returns once complete (the stream is drained first); one to pinned memory
completes when its stream is synchronised.

**The current device is per host thread** (``cudaSetDevice``); allocations and streams belong
to the device current on the calling thread. A kernel (:meth:`launch`, used by the fake
TensorRT and the stand-in engines) fails on a stream of another device, and reading memory of
another device raises.

**Stream capture** (``cudaStreamBeginCapture`` / ``EndCapture``, ``cudaGraphLaunch``): work
issued to a capturing stream is recorded instead of queued; a launch queues the recorded work.
In ``ThreadLocal``/``Global`` mode a capturing thread may not ``cudaMalloc``, ``cudaMemcpy``
(synchronous) or synchronise the capturing stream: the call fails and invalidates the capture.

Knobs: ``compute_capability``, ``device_count``, ``capture_fails`` (EndCapture reports an
unsupported capture), ``malloc_fails`` (cudaMalloc reports out of memory).

Use :func:`install` (with pytest's ``monkeypatch``) to put it in ``sys.modules`` as
``cuda.bindings.runtime``.
"""

# ruff: noqa: N815 - the fake mirrors cuda-python's mixedCase names
from __future__ import annotations

import ctypes
import enum
import sys
import threading
import types
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np

__all__ = ["FakeCudart", "install"]


class cudaError_t(enum.IntEnum):  # noqa: N801 - cuda-python's cudaError_t is an int-valued enum
    cudaSuccess = 0
    cudaErrorInvalidValue = 1
    cudaErrorMemoryAllocation = 2
    cudaErrorInvalidDevice = 101
    cudaErrorInvalidDevicePointer = 17
    cudaErrorInvalidResourceHandle = 400
    cudaErrorIllegalAddress = 700
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
        self._handle = int(handle)

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


@dataclass
class _Stream:
    handle: int
    flags: int
    device: int
    queue: list[Callable[[], None]] = field(default_factory=list)


OK = (cudaError_t.cudaSuccess,)
LEGACY = 0  # the NULL stream is the legacy default stream (no per-thread default stream here)


class FakeCudart(types.ModuleType):
    """The fake cudart module; see the module docstring for what it models."""

    cudaError_t = cudaError_t
    cudaMemcpyKind = cudaMemcpyKind
    cudaStreamCaptureMode = cudaStreamCaptureMode
    cudaDeviceAttr = cudaDeviceAttr
    cudaStream_t = cudaStream_t
    cudaStreamDefault = 0
    cudaStreamNonBlocking = 1
    cudaStreamLegacy = 1  # the handle value of cudaStreamLegacy, as in CUDA's headers
    cudaStreamPerThread = 2

    def __init__(self, compute_capability: tuple[int, int] = (8, 6), device_count: int = 2) -> None:
        super().__init__("cuda.bindings.runtime", "FAKE cuda-python runtime for CPU tests")
        self.compute_capability = compute_capability
        self.device_count = device_count
        self.calls: list[tuple[str, tuple]] = []
        self.memory: dict[int, bytearray] = {}
        self.memory_device: dict[int, int] = {}
        self.pinned: dict[int, ctypes.Array] = {}
        self.freed: list[int] = []
        self._next_ptr = 0x7F0000000000
        self._next_stream = 0x1000
        self._streams: dict[int, _Stream] = {LEGACY: _Stream(LEGACY, 0, -1)}
        self._legacy_queue = self._streams[LEGACY].queue
        self.capturing: dict[int, list[Callable[[], None]]] = {}
        self._capture_thread: dict[int, int] = {}
        self._capture_mode: dict[int, cudaStreamCaptureMode] = {}
        self._invalidated: set[int] = set()
        self.capture_fails = False  # make cudaStreamEndCapture report an unsupported capture
        self.malloc_fails = False  # make cudaMalloc report out of memory
        self.graphs: list[FakeGraph] = []
        self.launches = 0
        self.kernels_run = 0
        self._tls = threading.local()
        self._lock = threading.RLock()

    # ---------------------------------------------------------------- bookkeeping
    def _log(self, name: str, *args) -> None:
        self.calls.append((name, args))

    def count(self, name: str) -> int:
        return sum(1 for n, _ in self.calls if n == name)

    def calls_of(self, name: str) -> list[tuple]:
        return [a for n, a in self.calls if n == name]

    @property
    def device(self) -> int:
        """The current device of the calling thread (0 until cudaSetDevice is called on it)."""
        return getattr(self._tls, "device", 0)

    def _region(self, ptr: int, nbytes: int) -> tuple[bytearray, int, int]:
        for base, buf in self.memory.items():
            if base <= ptr and ptr + nbytes <= base + len(buf):
                return buf, ptr - base, self.memory_device[base]
        raise AssertionError(f"fake cuda: access of {nbytes} bytes at {ptr:#x} is outside every allocation")

    def _pinned_region(self, ptr: int, nbytes: int) -> bool:
        for base, buf in self.pinned.items():
            if base <= ptr and ptr + nbytes <= base + ctypes.sizeof(buf):
                return True
        return False

    def device_of(self, ptr: int) -> int:
        return self._region(ptr, 1)[2]

    def region(self, ptr: int, nbytes: int) -> tuple[bytearray, int]:
        """(bytearray, offset) of device memory (for stand-in kernels that view it in place)."""
        buf, off, _ = self._region(ptr, nbytes)
        return buf, off

    def read(self, ptr: int, shape: tuple[int, ...], dtype=np.float32) -> np.ndarray:
        """Device memory as it is now (test helper; a kernel's view when it runs)."""
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        buf, off, _ = self._region(ptr, nbytes)
        return np.frombuffer(bytes(buf[off:off + nbytes]), dtype=dtype).reshape(shape).copy()

    def write(self, ptr: int, data: np.ndarray) -> None:
        raw = np.ascontiguousarray(data).tobytes()
        buf, off, _ = self._region(ptr, len(raw))
        buf[off:off + len(raw)] = raw

    def _stream(self, stream) -> _Stream:
        handle = int(stream)
        if handle == self.cudaStreamLegacy:
            handle = LEGACY
        s = self._streams.get(handle)
        if s is None:
            raise AssertionError(f"fake cuda: stream {handle:#x} does not exist (destroyed?)")
        return s

    def _queue_of(self, s: _Stream) -> list[Callable[[], None]]:
        # legacy + blocking streams are mutually ordered: one queue (see the module docstring)
        return self._legacy_queue if s.handle == LEGACY or s.flags == 0 else s.queue

    def _submit(self, stream, op: Callable[[], None]) -> None:
        handle = int(stream)
        if handle in self.capturing:
            self.capturing[handle].append(op)
        else:
            self._queue_of(self._stream(stream)).append(op)

    def _drain(self, queue: list[Callable[[], None]]) -> None:
        while queue:
            queue.pop(0)()

    def _thread_capturing(self) -> int | None:
        """A stream this thread is capturing in a mode that forbids unsafe calls, or None."""
        me = threading.get_ident()
        for handle, tid in self._capture_thread.items():
            mode = self._capture_mode[handle]
            if mode == cudaStreamCaptureMode.cudaStreamCaptureModeGlobal or (
                    mode == cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal and tid == me):
                return handle
        return None

    def _refuse_during_capture(self) -> tuple | None:
        handle = self._thread_capturing()
        if handle is None:
            return None
        self._invalidated.add(handle)
        return (cudaError_t.cudaErrorStreamCaptureUnsupported,)

    def launch(self, stream, op: Callable[[], None], *, touches: Iterable[int] = ()) -> cudaError_t:
        """Issue a kernel (``op``) to ``stream``: what TensorRT's enqueue or a torch op does.

        Fails like CUDA when the stream belongs to a device other than the calling thread's
        current one; the kernel itself checks, when it runs, that it only touches memory of its
        stream's device.
        """
        s = self._stream(stream)
        device = self.device
        if s.handle != LEGACY and s.device != device:
            return cudaError_t.cudaErrorInvalidResourceHandle
        pointers = [int(p) for p in touches]

        def kernel() -> None:
            for p in pointers:
                if self.device_of(p) != (device if s.handle == LEGACY else s.device):
                    raise AssertionError(f"fake cuda: a kernel on device {s.device} read memory {p:#x} of device "
                                         f"{self.device_of(p)} (allocated while another device was current)")
            self.kernels_run += 1
            op()

        self._submit(stream, kernel)
        return cudaError_t.cudaSuccess

    # ---------------------------------------------------------------- device
    def cudaSetDevice(self, device: int):
        self._log("cudaSetDevice", device)
        if not 0 <= int(device) < self.device_count:
            return (cudaError_t.cudaErrorInvalidDevice,)
        self._tls.device = int(device)
        return OK

    def cudaGetDevice(self):
        return (cudaError_t.cudaSuccess, self.device)

    def cudaGetDeviceCount(self):
        return (cudaError_t.cudaSuccess, self.device_count)

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

    def cudaDeviceSynchronize(self):
        self._log("cudaDeviceSynchronize")
        with self._lock:
            for s in list(self._streams.values()):
                self._drain(self._queue_of(s))
        return OK

    # ---------------------------------------------------------------- memory
    def cudaMalloc(self, nbytes: int):
        self._log("cudaMalloc", nbytes)
        refused = self._refuse_during_capture()
        if refused:
            return (refused[0], 0)
        if self.malloc_fails:
            return (cudaError_t.cudaErrorMemoryAllocation, 0)
        with self._lock:
            ptr = self._next_ptr
            self.memory[ptr] = bytearray(int(nbytes))
            self.memory_device[ptr] = self.device
            self._next_ptr += -(-max(int(nbytes), 1) // 512) * 512 + 512
        return (cudaError_t.cudaSuccess, ptr)

    def cudaFree(self, ptr: int):
        self._log("cudaFree", ptr)
        if ptr not in self.memory:
            return (cudaError_t.cudaErrorInvalidDevicePointer,)
        del self.memory[ptr]
        del self.memory_device[ptr]
        self.freed.append(ptr)
        return OK

    def cudaMallocHost(self, nbytes: int):
        self._log("cudaMallocHost", nbytes)
        buf = (ctypes.c_ubyte * max(int(nbytes), 1))()
        ptr = ctypes.addressof(buf)
        self.pinned[ptr] = buf
        return (cudaError_t.cudaSuccess, ptr)

    def cudaFreeHost(self, ptr: int):
        self._log("cudaFreeHost", ptr)
        if self.pinned.pop(int(ptr), None) is None:
            return (cudaError_t.cudaErrorInvalidValue,)
        return OK

    def _pinned_read(self, src: int, nbytes: int) -> bytes:
        if not self._pinned_region(src, nbytes):
            raise AssertionError(f"fake cuda: a queued copy read pinned memory {src:#x} after cudaFreeHost")
        return ctypes.string_at(src, nbytes)

    def _pinned_write(self, dst: int, data: bytes) -> None:
        if not self._pinned_region(dst, len(data)):
            raise AssertionError(f"fake cuda: a queued copy wrote pinned memory {dst:#x} after cudaFreeHost")
        ctypes.memmove(dst, data, len(data))

    def _device_write(self, dst: int, data: bytes) -> Callable[[], None]:
        def op() -> None:
            buf, off, _ = self._region(dst, len(data))
            buf[off:off + len(data)] = data
        return op

    def cudaMemcpy(self, dst, src, nbytes: int, kind):
        """Synchronous copy on the legacy default stream (see the module docstring)."""
        self._log("cudaMemcpy", int(dst), int(src), int(nbytes), kind)
        refused = self._refuse_during_capture()
        if refused:
            return refused
        dst, src, nbytes = int(dst), int(src), int(nbytes)
        self._drain(self._legacy_queue)  # "a stream sync is performed before the copy is initiated"
        if kind == cudaMemcpyKind.cudaMemcpyHostToDevice:
            staged = ctypes.string_at(src, nbytes)  # copied to staging memory before the call returns ...
            self._legacy_queue.append(self._device_write(dst, staged))  # ... the DMA may not have landed
        elif kind == cudaMemcpyKind.cudaMemcpyDeviceToHost:
            buf, off, _ = self._region(src, nbytes)
            ctypes.memmove(dst, bytes(buf[off:off + nbytes]), nbytes)  # returns once complete
        else:
            raise AssertionError(f"fake cuda: copy kind {kind} not used by the runtime")
        return OK

    def cudaMemcpyAsync(self, dst, src, nbytes: int, kind, stream):
        self._log("cudaMemcpyAsync", int(dst), int(src), int(nbytes), kind, int(stream))
        dst, src, nbytes = int(dst), int(src), int(nbytes)
        if int(stream) in self.capturing:
            raise AssertionError("fake cuda: the runtime copies host memory while capturing a graph")
        s = self._stream(stream)
        if kind == cudaMemcpyKind.cudaMemcpyHostToDevice:
            if self._pinned_region(src, nbytes):
                def op() -> None:  # DMA from pinned memory: reads the host buffer when it runs
                    self._device_write(dst, self._pinned_read(src, nbytes))()
                self._submit(stream, op)
            else:  # pageable: staged at the call
                self._submit(stream, self._device_write(dst, ctypes.string_at(src, nbytes)))
        elif kind == cudaMemcpyKind.cudaMemcpyDeviceToHost:
            def read() -> bytes:
                buf, off, _ = self._region(src, nbytes)
                return bytes(buf[off:off + nbytes])
            if self._pinned_region(dst, nbytes):
                self._submit(stream, lambda: self._pinned_write(dst, read()))
            else:  # to pageable memory: synchronous with respect to the host
                self._drain(self._queue_of(s))
                ctypes.memmove(dst, read(), nbytes)
        elif kind == cudaMemcpyKind.cudaMemcpyDeviceToDevice:
            def d2d() -> None:
                buf, off, _ = self._region(src, nbytes)
                self._device_write(dst, bytes(buf[off:off + nbytes]))()
            self._submit(stream, d2d)
        else:
            raise AssertionError(f"fake cuda: copy kind {kind} not used by the runtime")
        return OK

    # ---------------------------------------------------------------- streams and graphs
    def cudaStreamCreateWithFlags(self, flags: int):
        self._log("cudaStreamCreateWithFlags", flags)
        with self._lock:
            self._next_stream += 0x10
            handle = self._next_stream
            self._streams[handle] = _Stream(handle, int(flags), self.device)
        return (cudaError_t.cudaSuccess, cudaStream_t(handle))

    def cudaStreamCreate(self):
        return self.cudaStreamCreateWithFlags(self.cudaStreamDefault)

    def stream_device(self, stream) -> int:
        return self._stream(stream).device

    def stream_flags(self, stream) -> int:
        return self._stream(stream).flags

    def pending(self, stream=None) -> int:
        """Work queued and not yet run (on ``stream``'s queue, or everywhere)."""
        if stream is not None:
            return len(self._queue_of(self._stream(stream)))
        return sum(len(s.queue) for s in self._streams.values())

    def cudaStreamSynchronize(self, stream):
        self._log("cudaStreamSynchronize", int(stream))
        if int(stream) in self.capturing:  # forbidden on a capturing stream
            self._invalidated.add(int(stream))
            return (cudaError_t.cudaErrorStreamCaptureUnsupported,)
        self._drain(self._queue_of(self._stream(stream)))
        return OK

    def cudaStreamDestroy(self, stream):
        self._log("cudaStreamDestroy", int(stream))
        s = self._stream(stream)
        self._drain(self._queue_of(s))  # work still queued completes; then the stream is gone
        del self._streams[s.handle]
        return OK

    def cudaStreamBeginCapture(self, stream, mode):
        self._log("cudaStreamBeginCapture", int(stream), mode)
        handle = int(stream)
        if handle in (LEGACY, self.cudaStreamLegacy) or handle in self.capturing:
            return (cudaError_t.cudaErrorInvalidValue,)
        self._stream(stream)
        self.capturing[handle] = []
        self._capture_thread[handle] = threading.get_ident()
        self._capture_mode[handle] = cudaStreamCaptureMode(int(mode))
        return OK

    def cudaStreamEndCapture(self, stream):
        self._log("cudaStreamEndCapture", int(stream))
        handle = int(stream)
        ops = self.capturing.pop(handle, None)
        self._capture_thread.pop(handle, None)
        self._capture_mode.pop(handle, None)
        if ops is None:
            return (cudaError_t.cudaErrorInvalidValue, None)
        if handle in self._invalidated:
            self._invalidated.discard(handle)
            return (cudaError_t.cudaErrorStreamCaptureInvalidated, None)
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
            self._submit(stream, op)
        return OK

    def cudaGraphGetNodes(self, graph, numNodes: int = 0):
        return (cudaError_t.cudaSuccess, list(graph.ops), len(graph.ops))

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
