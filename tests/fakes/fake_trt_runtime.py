"""A FAKE of TensorRT's runtime side (``tensorrt`` module) for CPU tests. Not TensorRT.

Only what ``runtime.backends.tensorrt`` calls: ``Logger``, ``Runtime.deserialize_cuda_engine``,
the engine's named-tensor queries, ``create_execution_context``, ``set_input_shape``,
``set_tensor_address`` (False unless 256-byte aligned, as TensorRT requires) and
``execute_async_v3``. A "plan" is any bytes starting with :data:`PLAN_MAGIC`.

``execute_async_v3`` runs a stand-in for the fused step on the fake device memory of
:class:`fake_cuda.FakeCudart`, with the addresses and shapes as they are at enqueue time (what a
captured CUDA graph keeps)::

    eps_hat = 0.5 * x_t + cond * t / 1000          (depends on t, so a wrong t row shows)
    x_next  = c * (a * x_t - b * eps_hat) + d * eps_hat

:func:`reference_loop` computes the same loop in numpy. Every call is recorded in
``FakeTensorRT.calls``; ``fail_enqueue_at`` makes the n-th ``execute_async_v3`` return False.
The builder side is faked elsewhere (tests/fakes/fake_tensorrt.py).
"""

from __future__ import annotations

import enum
import sys
import types

import numpy as np

__all__ = ["PLAN_MAGIC", "FakeTensorRT", "fake_eps", "reference_loop", "install"]

PLAN_MAGIC = b"FAKEPLAN"
INPUTS = ("x_t", "cond", "t", "coef")
OUTPUTS = ("x_next",)


def fake_eps(x_t: np.ndarray, cond: np.ndarray, t: np.ndarray) -> np.ndarray:
    return (0.5 * x_t + cond * (t[:, None, None, None] / 1000.0)).astype(np.float32)


def reference_loop(x_T: np.ndarray, cond: np.ndarray, timesteps: np.ndarray, coefficients: np.ndarray) -> np.ndarray:
    x = x_T.astype(np.float32)
    n = x.shape[0]
    for t, (a, b, c, d) in zip(timesteps, coefficients):
        eps = fake_eps(x, cond, np.full((n,), float(t), np.float32))
        x = (c * (a * x - b * eps) + d * eps).astype(np.float32)
    return x


class TensorIOMode(enum.Enum):
    NONE = 0
    INPUT = 1
    OUTPUT = 2


class DataType(enum.Enum):
    FLOAT = 0
    HALF = 1


class Logger:
    INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = range(5)

    def __init__(self, severity: int = 2) -> None:
        self.severity = severity


class FakeContext:
    def __init__(self, trt: FakeTensorRT) -> None:
        self.trt = trt
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.addresses: dict[str, int] = {}

    def set_input_shape(self, name: str, shape) -> bool:
        self.trt._log("set_input_shape", name, tuple(shape))
        if name not in INPUTS:
            return False
        self.shapes[name] = tuple(int(s) for s in shape)
        return True

    def set_tensor_address(self, name: str, ptr: int) -> bool:
        self.trt._log("set_tensor_address", name, int(ptr))
        if name not in INPUTS + OUTPUTS or int(ptr) % 256:
            return False
        self.addresses[name] = int(ptr)
        return True

    def execute_async_v3(self, stream_handle: int) -> bool:
        trt = self.trt
        trt._log("execute_async_v3", int(stream_handle))
        trt.enqueues += 1
        if trt.fail_enqueue_at is not None and trt.enqueues == trt.fail_enqueue_at:
            return False  # like TensorRT: nothing enqueued, no exception
        if set(self.shapes) != set(INPUTS) or set(self.addresses) != set(INPUTS + OUTPUTS):
            return False
        addr, shapes, cuda = dict(self.addresses), dict(self.shapes), trt.cudart

        def op() -> None:  # what the kernels do, with the arguments of this enqueue
            x = cuda.read(addr["x_t"], shapes["x_t"])
            cond = cuda.read(addr["cond"], shapes["cond"])
            t = cuda.read(addr["t"], shapes["t"])
            coef = cuda.read(addr["coef"], shapes["coef"])
            eps = fake_eps(x, cond, t)
            a, b, c, d = (coef[:, i, None, None, None] for i in range(4))
            cuda.write(addr["x_next"], (c * (a * x - b * eps) + d * eps).astype(np.float32))
            trt.executed.append((addr["x_t"], addr["x_next"], addr["t"], addr["coef"]))

        cuda.enqueue(int(stream_handle), op)
        return True


class FakeEngine:
    def __init__(self, trt: FakeTensorRT) -> None:
        self.trt = trt
        self._names = INPUTS + OUTPUTS
        self.num_io_tensors = len(self._names)

    def get_tensor_name(self, i: int) -> str:
        return self._names[i]

    def get_tensor_mode(self, name: str) -> TensorIOMode:
        return TensorIOMode.INPUT if name in INPUTS else TensorIOMode.OUTPUT

    def get_tensor_dtype(self, name: str) -> DataType:
        return self.trt.io_dtype

    def create_execution_context(self) -> FakeContext:
        self.trt._log("create_execution_context")
        ctx = FakeContext(self.trt)
        self.trt.contexts.append(ctx)
        return ctx


class FakeRuntime:
    def __init__(self, trt: FakeTensorRT, logger: Logger) -> None:
        self.trt = trt
        trt._log("Runtime", logger)

    def deserialize_cuda_engine(self, data: bytes) -> FakeEngine | None:
        self.trt._log("deserialize_cuda_engine", len(data))
        return FakeEngine(self.trt) if bytes(data).startswith(PLAN_MAGIC) else None


class FakeTensorRT(types.ModuleType):
    """The fake ``tensorrt`` module; needs the FakeCudart whose memory its kernels use."""

    TensorIOMode = TensorIOMode
    DataType = DataType
    Logger = Logger

    def __init__(self, cudart, version: str = "10.9.0") -> None:
        super().__init__("tensorrt", "FAKE TensorRT runtime for CPU tests")
        self.__version__ = version
        self.cudart = cudart
        self.calls: list[tuple[str, tuple]] = []
        self.contexts: list[FakeContext] = []
        self.executed: list[tuple[int, int, int, int]] = []  # (x_t, x_next, t, coef) per executed step
        self.enqueues = 0
        self.fail_enqueue_at: int | None = None
        self.io_dtype = DataType.FLOAT

    def _log(self, name: str, *args) -> None:
        self.calls.append((name, args))

    def count(self, name: str) -> int:
        return sum(1 for n, _ in self.calls if n == name)

    def Runtime(self, logger: Logger) -> FakeRuntime:
        return FakeRuntime(self, logger)


def install(monkeypatch, cudart, version: str = "10.9.0") -> FakeTensorRT:
    """Put a FakeTensorRT in sys.modules as ``tensorrt`` (undone by monkeypatch)."""
    trt = FakeTensorRT(cudart, version)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    return trt
