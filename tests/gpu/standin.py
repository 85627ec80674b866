"""A CUDA stand-in for a TensorRT engine: the fused step (and a prologue) as PyTorch kernels.

Not TensorRT and not a fake of it: real CUDA kernels where a GPU is lent but TensorRT is not
installed. It implements the executor's :class:`runtime.backends.trt_executor.Engine` protocol
(TensorRT's named-tensor API), so :class:`runtime.backends.cuda_backend.CudaStepBackend` and
the executor run it exactly as they run a plan: the executor allocates the buffers (cudaMalloc),
binds their addresses, enqueues on its own non-blocking stream, captures the S-step loop as a
CUDA graph. The stand-in only launches its kernels on the stream it is given.

Two memories:

- :class:`TorchCuda`: the buffers are viewed in place as torch CUDA tensors (through
  ``__cuda_array_interface__``, version 2: no stream handshake) and the kernels are launched on
  the executor's stream with ``torch.cuda.ExternalStream(handle)`` (a wrapper around an
  externally created stream; PyTorch docs). Workspace tensors are allocated when input shapes
  are set, never while enqueueing, and every op writes into a preallocated tensor (``out=`` or
  in place), so an enqueue inside a stream capture makes no allocation and no synchronising
  call: what a raw ``cudaStreamBeginCapture`` (ThreadLocal mode) requires.
- :class:`FakeCuda`: on a CPU, the buffers are the fake cudart's memory (tests/fakes/fake_cuda.py)
  viewed as torch CPU tensors (``torch.frombuffer``) and the kernels are queued on the fake's
  stream: the same torch code, and the executor's stream / capture / graph logic, run on CPU.

The math is tests/fakes/fake_tensorrt.py's :func:`step_reference` / :func:`prologue_reference`:
eps = tanh(0.5 x_t + cond[:, :C] t / 1000); x_next = (c a) x_t + (d - c b) eps.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from runtime.backends.trt_executor import ALIGN, EngineIO

__all__ = ["StandInStep", "StandInPrologue", "TorchCuda", "FakeCuda", "counting_device_class"]


class _Array:
    """A raw device pointer as a CUDA array (``__cuda_array_interface__`` v2) for ``torch.as_tensor``."""

    def __init__(self, ptr: int, shape: tuple[int, ...]) -> None:
        self.__cuda_array_interface__ = {"shape": tuple(shape), "typestr": "<f4", "data": (int(ptr), False),
                                         "version": 2, "strides": None}


class TorchCuda:
    """Buffers as torch CUDA tensors in place; kernels launched on the executor's stream."""

    def __init__(self, device_index: int = 0) -> None:
        import torch

        self.torch = torch
        self.device = torch.device("cuda", device_index)
        self._views: dict[tuple[int, tuple[int, ...]], Any] = {}
        self._streams: dict[int, Any] = {}

    def view(self, ptr: int, shape: tuple[int, ...]):
        key = (int(ptr), tuple(shape))
        t = self._views.get(key)
        if t is None:  # created outside capture (warm-up binds every address first)
            t = self._views[key] = self.torch.as_tensor(_Array(ptr, shape), device=self.device)
        return t

    def empty(self, shape: tuple[int, ...]):
        return self.torch.empty(shape, dtype=self.torch.float32, device=self.device)

    def launch(self, stream_handle: int, kernels: Callable[[], None], touches: Sequence[int]) -> bool:
        torch = self.torch
        stream = self._streams.get(stream_handle)
        if stream is None:
            stream = self._streams[stream_handle] = torch.cuda.ExternalStream(stream_handle, device=self.device)
        try:
            with torch.cuda.device(self.device), torch.cuda.stream(stream):
                kernels()
        except RuntimeError:  # a launch failure: like TensorRT, report it through the boolean
            return False
        return True


class FakeCuda:
    """The fake cudart's memory as torch CPU tensors; kernels queued on the fake's streams."""

    def __init__(self, cudart) -> None:
        import torch

        self.torch = torch
        self.cudart = cudart

    def view(self, ptr: int, shape: tuple[int, ...]):
        n = int(np.prod(shape))
        buf, off = self.cudart.region(int(ptr), n * 4)
        return self.torch.frombuffer(buf, dtype=self.torch.float32, count=n, offset=off).view(shape)

    def empty(self, shape: tuple[int, ...]):
        return self.torch.empty(shape, dtype=self.torch.float32)

    def launch(self, stream_handle: int, kernels: Callable[[], None], touches: Sequence[int]) -> bool:
        err = self.cudart.launch(stream_handle, kernels, touches=touches)
        return err == self.cudart.cudaError_t.cudaSuccess


class _StandIn:
    """Engine protocol bookkeeping shared by the stand-ins: shapes, profile, addresses."""

    def __init__(self, memory, *, inputs: dict[str, tuple], outputs: dict[str, tuple],
                 profile: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]], name: str) -> None:
        self.memory = memory
        self.name = name
        self._dims = {**inputs, **outputs}
        self._inputs = list(inputs)
        self._outputs = list(outputs)
        self._profile = profile
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.addresses: dict[str, int] = {}
        self.enqueues = 0
        self.executed: list[dict[str, int]] = []  # addresses of every enqueue, in order
        self._errors: list[str] = []

    def io(self) -> list[EngineIO]:
        f32 = np.dtype(np.float32)
        return [EngineIO(n, True, f32) for n in self._inputs] + [EngineIO(n, False, f32) for n in self._outputs]

    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
        shape = tuple(int(s) for s in shape)
        lo, _, hi = self._profile[name]
        if name not in self._inputs or len(shape) != len(lo) or not all(a <= s <= b for s, a, b in zip(shape, lo, hi)):
            return False
        if self.shapes.get(name) != shape:
            self.shapes[name] = shape
            self._on_shapes()
        return True

    def _on_shapes(self) -> None:
        pass

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        if name in self.shapes:
            return self.shapes[name]
        sym = {}
        for n, shape in self.shapes.items():
            for d, s in zip(self._dims[n], shape):
                if isinstance(d, str):
                    sym[d] = s
        return tuple(sym.get(d, -1) if isinstance(d, str) else d for d in self._dims[name])

    def set_tensor_address(self, name: str, ptr: int) -> bool:
        if name not in self._dims or int(ptr) % ALIGN:
            return False
        self.addresses[name] = int(ptr)
        if name in self.shapes or all(n in self.shapes for n in self._inputs):
            self.memory.view(int(ptr), self.get_tensor_shape(name))  # views exist before any capture
        return True

    def execute_async_v3(self, stream_handle: int) -> bool:
        self.enqueues += 1
        if set(self.addresses) != set(self._dims) or set(self.shapes) != set(self._inputs):
            self._errors.append("stand-in: not every input shape / address is set")
            return False
        addr = dict(self.addresses)
        views = {n: self.memory.view(addr[n], self.get_tensor_shape(n)) for n in self._dims}

        def kernels() -> None:
            self._kernels(views)

        ok = self.memory.launch(int(stream_handle), kernels, list(addr.values()))
        if ok:
            self.executed.append(addr)
        else:
            self._errors.append("stand-in: kernel launch failed")
        return ok

    def _kernels(self, v: dict) -> None:
        raise NotImplementedError

    def profile(self, name: str):
        return self._profile.get(name)

    def errors(self) -> list[str]:
        return list(self._errors)

    def close(self) -> None:
        pass


class StandInStep(_StandIn):
    """The fused step over ``descriptor``'s tensors (names, channel counts from its specs)."""

    def __init__(self, memory, descriptor, *, name: str = "stand-in step") -> None:
        d = descriptor
        inputs = {s.name: tuple(s.shape) for s in d.inputs}
        outputs = {s.name: tuple(s.shape) for s in d.outputs}
        p = d.profile
        points = [(p.min_batch, p.min_size), (p.opt_batch, p.opt_size), (p.max_batch, p.max_size)]
        profile = {n: tuple(tuple(b if x == "batch" else hw[0] if x == "height" else hw[1] if x == "width" else x
                                  for x in dims) for b, hw in points) for n, dims in inputs.items()}
        super().__init__(memory, inputs=inputs, outputs=outputs, profile=profile, name=name)
        self.d = d
        self._ws: dict[str, Any] = {}

    def _on_shapes(self) -> None:
        # workspace once per (x, t) shape, outside any capture: enqueues never allocate
        xs, ts = self.shapes.get(self.d.X), self.shapes.get(self.d.T)
        if xs is None or ts is None or self._ws.get("key") == (xs, ts):
            return
        e, n = self.memory.empty, ts[0]
        self._ws = {"key": (xs, ts), "t": e((n,)), "ca": e((n,)), "cb": e((n,)), "k": e((n,)), "eps": e(xs)}

    def _kernels(self, v: dict) -> None:
        torch, d, ws = self.memory.torch, self.d, self._ws
        x, cond, t, coef, out = v[d.X], v[d.COND], v[d.T], v[d.COEF], v[d.OUT]
        c = x.shape[1]
        eps, n4 = ws["eps"], (x.shape[0], 1, 1, 1)
        torch.mul(t, 1e-3, out=ws["t"])
        torch.mul(cond[:, :c], ws["t"].view(n4), out=eps)       # cond * t / 1000
        eps.add_(x, alpha=0.5)                                    # + 0.5 x_t
        torch.tanh(eps, out=eps)                                  # eps_hat
        torch.mul(coef[:, 2], coef[:, 0], out=ws["ca"])           # c a
        torch.mul(coef[:, 2], coef[:, 1], out=ws["cb"])           # c b
        torch.sub(coef[:, 3], ws["cb"], out=ws["k"])              # d - c b
        torch.mul(x, ws["ca"].view(n4), out=out)                  # (c a) x_t
        out.addcmul_(eps, ws["k"].view(n4))                       # + (d - c b) eps_hat


class StandInPrologue(_StandIn):
    """y [N, C, H, W] -> cond [N, 2C, H, W] = [y, 0.5 tanh(y) + 0.25] (a predictor stand-in)."""

    def __init__(self, memory, inp: str, out: str, *, channels: int,
                 profile: tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]], name: str = "stand-in prologue"):
        super().__init__(memory, inputs={inp: ("batch", channels, "height", "width")},
                         outputs={out: ("batch", 2 * channels, "height", "width")}, profile={inp: profile}, name=name)
        self.inp, self.out, self.c = inp, out, channels

    def _kernels(self, v: dict) -> None:
        torch = self.memory.torch
        y, cond = v[self.inp], v[self.out]
        cond[:, : self.c].copy_(y)
        b = cond[:, self.c:]
        torch.tanh(y, out=b)
        b.mul_(0.5).add_(0.25)


def counting_device_class(cudart):
    """A CudaDevice subclass over ``cudart`` that counts what the executor allocates and records
    each copy's stream."""
    from runtime.backends.cuda_device import CudaDevice

    class CountingDevice(CudaDevice):
        """A CudaDevice that counts what the executor allocates and records each copy's stream."""

        def __init__(self, index: int = 0) -> None:
            super().__init__(index, cudart=cudart)
            self.mallocs = self.frees = self.host_mallocs = self.host_frees = 0
            self.copy_streams: list[int] = []

        def malloc(self, nbytes):
            self.mallocs += 1
            return super().malloc(nbytes)

        def free(self, ptr):
            if ptr:
                self.frees += 1
            super().free(ptr)

        def malloc_host(self, nbytes):
            self.host_mallocs += 1
            return super().malloc_host(nbytes)

        def free_host(self, buf):
            if buf is not None and buf.ptr:
                self.host_frees += 1
            super().free_host(buf)

        def copy_h2d(self, dst, src, nbytes, stream):
            self.copy_streams.append(int(stream))
            super().copy_h2d(dst, src, nbytes, stream)

        def copy_d2h(self, dst, src, nbytes, stream):
            self.copy_streams.append(int(stream))
            super().copy_d2h(dst, src, nbytes, stream)

    return CountingDevice
