"""A RECORDING FAKE of the ``tensorrt`` Python module (builder and runtime) for CPU tests. Not TensorRT.

One fake for both sides, with the TensorRT 10/11 Python names the toolkit calls:

- builder: ``Builder``, ``NetworkDefinitionCreationFlag``, ``OnnxParser`` (reads the real ONNX
  with ``onnx.load`` for the I/O names, dtypes and dynamic dims), ``IBuilderConfig``
  (``set_memory_pool_limit``, ``builder_optimization_level``, ``set_flag`` / ``get_flag``,
  timing cache, ``add_optimization_profile``), ``IOptimizationProfile.set_shape``,
  ``build_serialized_network``;
- runtime: ``Runtime`` (``deserialize_cuda_engine``, ``engine_host_code_allowed``),
  ``ICudaEngine`` (``num_io_tensors``, ``get_tensor_name/mode/dtype/shape``,
  ``get_tensor_profile_shape``, ``create_execution_context``), ``IExecutionContext``
  (``set_input_shape``, ``get_tensor_shape``, ``set_tensor_address``, ``execute_async_v3``);
- ``ILogger`` / ``Logger``, ``nptype``, ``__version__``.

Where it matters it behaves like the real API, not like a convenience:

- enums are pybind11 *scoped* enums, as TensorRT's are: ``int(x)`` works, ``x == 0`` is False;
- ``set_input_shape`` returns False for a shape outside the plan's optimisation profile, and
  ``set_tensor_address`` for an address that is not 256-byte aligned;
- ``execute_async_v3`` checks its arguments when called (False, nothing enqueued, on failure,
  as TensorRT does) and **queues** the engine's kernel on the CUDA stream of the fake cudart
  (tests/fakes/fake_cuda.py): the kernel runs when the stream runs, with the addresses and
  shapes of the enqueue (what a captured CUDA graph keeps). An enqueue on a capturing stream
  fails unless the context has run once since its input shapes last changed (TensorRT needs one
  enqueue after a shape change before capture);
- a plan is ``PLAN_MAGIC`` + 8 bytes + JSON (I/O, profile, version, flags). It deserialises only
  on the TensorRT version that built it, unless built ``VERSION_COMPATIBLE`` (then on that
  version or newer, and only with ``trt.Runtime.engine_host_code_allowed = True``: such plans carry
  the lean runtime, host code);
- flavours: ``make_module("10.x")`` has ``BuilderFlag.FP16/INT8`` (deprecated there) and
  ``IBuilderConfig.int8_calibrator``; ``make_module("11.x")`` has neither (removed in 11).

Kernels: a plan made by :func:`step_plan` runs :func:`step_reference` (a pointwise stand-in for
the fused step); :func:`prologue_plan` runs :func:`prologue_reference` (y -> [y, b]); plans the
fake builder makes from an ONNX run nothing unless ``trt.on_execute`` is set, a callable given
an execution record (``.addresses``, ``.input_shapes``, ``.output_shapes``) when the kernel runs.

Every call lands in ``trt.calls`` as ``Call(name, args, kwargs)``; ``trt.called(name)`` filters,
``trt.count(name)`` counts. Knobs: ``parse_errors``, ``build_fails`` / ``build_errors``,
``on_execute``, ``fail_enqueue_at`` (the n-th ``execute_async_v3`` returns False).
"""

from __future__ import annotations

import enum
import hashlib
import json
import sys
import types
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["PLAN_MAGIC", "Call", "make_module", "install", "make_plan", "step_plan", "prologue_plan",
           "fake_eps", "step_reference", "reference_loop", "prologue_reference"]

PLAN_MAGIC = b"FAKEPLAN"
TIMING_CACHE_MAGIC = b"FAKE-TIMING-CACHE"
ALIGN = 256


@dataclass
class Call:
    name: str
    args: tuple
    kwargs: dict = field(default_factory=dict)


class _ScopedEnum(enum.Enum):
    """Like a pybind11 scoped enum (TensorRT's): ``int(x)`` works; comparing with an int is False."""

    def __int__(self) -> int:
        return int(self.value)

    def __index__(self) -> int:
        return int(self.value)


class DataType(_ScopedEnum):
    FLOAT = 0
    HALF = 1
    INT8 = 2
    INT32 = 3
    BOOL = 4
    UINT8 = 5
    FP8 = 6
    BF16 = 7
    INT64 = 8


class TensorIOMode(_ScopedEnum):
    NONE = 0
    INPUT = 1
    OUTPUT = 2


class MemoryPoolType(_ScopedEnum):
    WORKSPACE = 0
    DLA_MANAGED_SRAM = 1
    DLA_LOCAL_DRAM = 2
    DLA_GLOBAL_DRAM = 3
    TACTIC_DRAM = 4
    TACTIC_SHARED_MEMORY = 5


_ONNX_TO_TRT = {1: DataType.FLOAT, 10: DataType.HALF, 3: DataType.INT8, 6: DataType.INT32, 7: DataType.INT64,
                9: DataType.BOOL, 2: DataType.UINT8, 16: DataType.BF16}
_NP = {DataType.FLOAT: np.float32, DataType.HALF: np.float16, DataType.INT8: np.int8, DataType.INT32: np.int32,
       DataType.INT64: np.int64, DataType.BOOL: np.bool_, DataType.UINT8: np.uint8}


# --------------------------------------------------------------------------- the kernels' math
def fake_eps(x_t: np.ndarray, cond: np.ndarray, t: np.ndarray) -> np.ndarray:
    """The stand-in noise estimate: nonlinear, depends on t (a wrong t row shows) and on the
    first C channels of cond (cond may carry more channels than x, as predict-and-refine's does)."""
    c = x_t.shape[1]
    t_k = (t.astype(np.float32) * np.float32(1e-3))[:, None, None, None]
    return np.tanh(np.float32(0.5) * x_t + cond[:, :c] * t_k).astype(np.float32)


def step_reference(x_t: np.ndarray, cond: np.ndarray, t: np.ndarray, coef: np.ndarray) -> np.ndarray:
    """One stand-in fused step: x_next = c * (a * x_t - b * eps) + d * eps, written as
    (c * a) * x_t + (d - c * b) * eps (the order the torch stand-in computes it in)."""
    eps = fake_eps(x_t, cond, t)
    a, b, c, d = (coef[:, i, None, None, None].astype(np.float32) for i in range(4))
    return ((c * a) * x_t + (d - c * b) * eps).astype(np.float32)


def reference_loop(x_T: np.ndarray, cond: np.ndarray, timesteps: np.ndarray, coefficients: np.ndarray) -> np.ndarray:
    x = x_T.astype(np.float32)
    n = x.shape[0]
    for t, coef in zip(timesteps, coefficients):
        x = step_reference(x, cond, np.full((n,), float(t), np.float32),
                           np.repeat(np.asarray(coef, np.float32)[None], n, axis=0))
    return x


def prologue_reference(y: np.ndarray) -> np.ndarray:
    """The stand-in prologue: cond = [y, b] with a 'prediction' b = 0.5 * tanh(y) + 0.25."""
    return np.concatenate([y, (0.5 * np.tanh(y) + 0.25).astype(np.float32)], axis=1).astype(np.float32)


# --------------------------------------------------------------------------- plans
def make_plan(io: Sequence[Mapping[str, Any]], profile: Mapping[str, Sequence[Sequence[int]]], *,
              version: str = "10.9.0", kernel: str | None = None, kernel_io: Mapping[str, str] | None = None,
              version_compatible: bool = False, flags: int = 0) -> bytes:
    """Serialized fake plan. ``io``: [{"name", "mode": "input"|"output", "dtype": "FLOAT", "dims"}],
    ``profile``: {input name: (min, opt, max)}."""
    spec = {"version": version, "flags": flags, "io": [dict(t) for t in io],
            "profiles": [{k: [list(s) for s in v] for k, v in profile.items()}],
            "version_compatible": bool(version_compatible), "kernel": kernel, "kernel_io": dict(kernel_io or {})}
    body = json.dumps(spec, sort_keys=True).encode()
    return PLAN_MAGIC + hashlib.sha256(body).digest()[:8] + body


def _spec_io(specs, mode: str, dtype: str) -> list[dict]:
    return [{"name": s.name, "mode": mode, "dtype": dtype, "dims": list(s.shape)} for s in specs]


def step_plan(descriptor, *, version: str = "10.9.0", dtype: str = "FLOAT", version_compatible: bool = False) -> bytes:
    """A fake plan of the fused step described by ``descriptor`` (runtime.descriptor.StepDescriptor
    or anything with ``inputs`` / ``outputs`` TensorSpecs, the names X/COND/T/COEF/OUT and a
    ``profile``); its kernel is :func:`step_reference`."""
    io = _spec_io(descriptor.inputs, "input", dtype) + _spec_io(descriptor.outputs, "output", dtype)
    p = descriptor.profile
    points = [(p.min_batch, p.min_size), (p.opt_batch, p.opt_size), (p.max_batch, p.max_size)]
    profile = {}
    for s in descriptor.inputs:
        profile[s.name] = [_resolve(s.shape, b, hw) for b, hw in points]
    d = descriptor
    return make_plan(io, profile, version=version, kernel="step", version_compatible=version_compatible,
                     kernel_io={"x": d.X, "cond": d.COND, "t": d.T, "coef": d.COEF, "out": d.OUT})


def prologue_plan(inp: str, out: str, *, channels: int, profile_points: Sequence[tuple[int, tuple[int, int]]],
                  version: str = "10.9.0") -> bytes:
    """A fake prologue plan: ``inp`` [N, C, H, W] -> ``out`` [N, 2C, H, W] (:func:`prologue_reference`)."""
    io = [{"name": inp, "mode": "input", "dtype": "FLOAT", "dims": ["batch", channels, "height", "width"]},
          {"name": out, "mode": "output", "dtype": "FLOAT", "dims": ["batch", 2 * channels, "height", "width"]}]
    profile = {inp: [_resolve(("batch", channels, "height", "width"), b, hw) for b, hw in profile_points]}
    return make_plan(io, profile, version=version, kernel="prologue", kernel_io={"y": inp, "cond": out})


def _resolve(dims, batch: int, hw) -> list[int]:
    sym = {"batch": batch, "height": hw[0], "width": hw[1]}
    return [sym[d] if isinstance(d, str) else int(d) for d in dims]


def _version_tuple(v: str) -> tuple[int, ...]:
    return tuple(int(p) for p in str(v).split(".")[:3] if p.isdigit())


# --------------------------------------------------------------------------- the module
def make_module(version: str = "10.9.0.34", cudart=None) -> types.ModuleType:
    """A fresh fake ``tensorrt`` module with its own call log and knobs (``cudart``: the fake
    cuda-python whose streams and memory its kernels use; default: the one in sys.modules)."""
    major = int(version.split(".")[0])
    trt = types.ModuleType("tensorrt", "RECORDING FAKE of the tensorrt module (tests/fakes/fake_tensorrt.py)")
    trt.__version__ = version
    trt.calls = []
    trt.parse_errors = []
    trt.build_fails = False
    trt.build_errors = ["[fake] no implementation obeys the requested constraints"]
    trt.on_execute = None
    trt.fail_enqueue_at = None
    trt.enqueues = 0
    trt.executed = []  # execution records of the kernels that ran, in order
    trt.contexts = []
    trt.last_plan = None
    trt.PLAN_MAGIC = PLAN_MAGIC
    trt._cudart = cudart

    def record(name: str, *args, **kwargs) -> None:
        trt.calls.append(Call(name, args, kwargs))

    trt.called = lambda name: [c for c in trt.calls if c.name == name]
    trt.count = lambda name: sum(1 for c in trt.calls if c.name == name)
    trt.DataType, trt.TensorIOMode, trt.MemoryPoolType = DataType, TensorIOMode, MemoryPoolType
    trt.float32, trt.float16, trt.int8, trt.int32, trt.int64, trt.bool = (
        DataType.FLOAT, DataType.HALF, DataType.INT8, DataType.INT32, DataType.INT64, DataType.BOOL)

    def nptype(dtype: DataType):
        return _NP[dtype]

    trt.nptype = nptype

    def cuda():
        return trt._cudart or sys.modules["cuda.bindings.runtime"]

    if major >= 11:
        class NetworkDefinitionCreationFlag(_ScopedEnum):  # EXPLICIT_BATCH is gone in 11
            STRONGLY_TYPED = 0  # deprecated in 11 (always on) but still accepted
            PREFER_AOT_PYTHON_PLUGINS = 1
            PREFER_JIT_PYTHON_PLUGINS = 2

        class BuilderFlag(_ScopedEnum):  # no FP16 / INT8: removed in TensorRT 11
            DEBUG = 2
            GPU_FALLBACK = 3
            REFIT = 4
            DISABLE_TIMING_CACHE = 5
            TF32 = 6
            VERSION_COMPATIBLE = 13
            EXCLUDE_LEAN_RUNTIME = 14
    else:
        class NetworkDefinitionCreationFlag(_ScopedEnum):
            EXPLICIT_BATCH = 0  # deprecated, ignored in 10
            STRONGLY_TYPED = 1
            PREFER_AOT_PYTHON_PLUGINS = 2
            PREFER_JIT_PYTHON_PLUGINS = 3

        class BuilderFlag(_ScopedEnum):
            FP16 = 0
            INT8 = 1
            DEBUG = 2
            GPU_FALLBACK = 3
            REFIT = 4
            DISABLE_TIMING_CACHE = 5
            TF32 = 6
            VERSION_COMPATIBLE = 13
            EXCLUDE_LEAN_RUNTIME = 14

    trt.NetworkDefinitionCreationFlag, trt.BuilderFlag = NetworkDefinitionCreationFlag, BuilderFlag

    # ------------------------------------------------------------------ logging
    class ILogger:
        class Severity(_ScopedEnum):
            INTERNAL_ERROR = 0
            ERROR = 1
            WARNING = 2
            INFO = 3
            VERBOSE = 4

        def __init__(self) -> None:
            pass

        def log(self, severity, msg) -> None:  # overridden by subclasses
            pass

    class Logger(ILogger):
        INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = (ILogger.Severity.INTERNAL_ERROR, ILogger.Severity.ERROR,
                                                         ILogger.Severity.WARNING, ILogger.Severity.INFO,
                                                         ILogger.Severity.VERBOSE)

        def __init__(self, min_severity=ILogger.Severity.WARNING) -> None:
            super().__init__()
            self.min_severity = min_severity
            self.messages: list[tuple[Any, str]] = []

        def log(self, severity, msg) -> None:
            self.messages.append((severity, msg))

    trt.ILogger, trt.Logger = ILogger, Logger

    # ------------------------------------------------------------------ network + parser
    class ITensor:
        def __init__(self, name: str, dtype: DataType, shape: tuple[int, ...], dims: tuple) -> None:
            self.name, self.dtype, self.shape, self.dims = name, dtype, shape, dims

    class INetworkDefinition:
        def __init__(self, flags: int) -> None:
            self.flags = flags
            self.inputs: list[ITensor] = []
            self.outputs: list[ITensor] = []

        @property
        def num_inputs(self) -> int:
            return len(self.inputs)

        @property
        def num_outputs(self) -> int:
            return len(self.outputs)

        def get_input(self, i: int) -> ITensor:
            return self.inputs[i]

        def get_output(self, i: int) -> ITensor:
            return self.outputs[i]

    class ParserError:
        def __init__(self, msg: str, node: int = -1) -> None:
            self._msg, self._node = msg, node

        def desc(self) -> str:
            return self._msg

        def code(self) -> int:
            return 8  # UNSUPPORTED_NODE

        def node(self) -> int:
            return self._node

        def __str__(self) -> str:
            return f"In node {self._node} with name: fake and operator: fake (parse): UNSUPPORTED_NODE: {self._msg}"

    def _tensor(v) -> ITensor:
        tt = v.type.tensor_type
        dims = tuple(d.dim_param if d.HasField("dim_param") else int(d.dim_value) for d in tt.shape.dim)
        shape = tuple(d if isinstance(d, int) else -1 for d in dims)
        return ITensor(v.name, _ONNX_TO_TRT.get(tt.elem_type, DataType.FLOAT), shape, dims)

    class OnnxParser:
        def __init__(self, network: INetworkDefinition, logger) -> None:
            record("OnnxParser", network, logger)
            self.network, self.logger = network, logger
            self._errors: list[ParserError] = []

        @property
        def num_errors(self) -> int:
            return len(self._errors)

        def get_error(self, i: int) -> ParserError:
            return self._errors[i]

        def clear_errors(self) -> None:
            self._errors.clear()

        def _load(self, model) -> bool:
            for v in model.graph.input:
                self.network.inputs.append(_tensor(v))
            for v in model.graph.output:
                self.network.outputs.append(_tensor(v))
            return True

        def parse_from_file(self, path: str) -> bool:
            record("parse_from_file", path)
            if trt.parse_errors:
                self._errors = [ParserError(m, i) for i, m in enumerate(trt.parse_errors)]
                return False
            import onnx

            try:
                model = onnx.load(str(path))
            except Exception as e:
                self._errors = [ParserError(f"failed to load ONNX: {e}")]
                return False
            return self._load(model)

    trt.INetworkDefinition, trt.OnnxParser = INetworkDefinition, OnnxParser

    # ------------------------------------------------------------------ builder config
    class HostMemory(bytes):
        """IHostMemory: a bytes-like buffer (memoryview works), with ``nbytes``."""

        @property
        def nbytes(self) -> int:
            return len(self)

    class ITimingCache:
        def __init__(self, blob: bytes) -> None:
            self.loaded = bytes(blob)
            self.builds = 0

        def serialize(self) -> HostMemory:
            record("ITimingCache.serialize")
            return HostMemory((self.loaded or TIMING_CACHE_MAGIC) + b"+build" * self.builds)

    class IOptimizationProfile:
        def __init__(self) -> None:
            self.shapes: dict[str, tuple[tuple[int, ...], ...]] = {}

        def set_shape(self, input: str, min, opt, max) -> None:
            record("IOptimizationProfile.set_shape", input, tuple(min), tuple(opt), tuple(max))
            self.shapes[input] = (tuple(min), tuple(opt), tuple(max))

        def get_shape(self, input: str):
            return [list(s) for s in self.shapes[input]]

    class IBuilderConfig:
        def __init__(self) -> None:
            self.pool_limits: dict[MemoryPoolType, int] = {}
            self._opt_level = 3
            self.timing_cache: ITimingCache | None = None
            self.profiles: list[IOptimizationProfile] = []
            self._flags = 1 << int(BuilderFlag.TF32)
            if major < 11:
                self.int8_calibrator = None

        def set_memory_pool_limit(self, pool: MemoryPoolType, pool_size: int) -> None:
            record("IBuilderConfig.set_memory_pool_limit", pool, pool_size)
            self.pool_limits[pool] = int(pool_size)

        def get_memory_pool_limit(self, pool: MemoryPoolType) -> int:
            return self.pool_limits.get(pool, 0)

        @property
        def builder_optimization_level(self) -> int:
            return self._opt_level

        @builder_optimization_level.setter
        def builder_optimization_level(self, level: int) -> None:
            record("IBuilderConfig.builder_optimization_level", level)
            self._opt_level = int(level)

        @property
        def flags(self) -> int:
            return self._flags

        @flags.setter
        def flags(self, value: int) -> None:
            record("IBuilderConfig.flags", value)
            self._flags = int(value)

        def set_flag(self, flag) -> None:
            if not isinstance(flag, BuilderFlag):
                raise TypeError(f"set_flag(): incompatible function arguments: {flag!r} is not a BuilderFlag")
            record("IBuilderConfig.set_flag", flag)
            self._flags |= 1 << int(flag)

        def clear_flag(self, flag) -> None:
            record("IBuilderConfig.clear_flag", flag)
            self._flags &= ~(1 << int(flag))

        def get_flag(self, flag) -> bool:
            return bool(self._flags & (1 << int(flag)))

        def create_timing_cache(self, serialized_timing_cache: bytes) -> ITimingCache:
            record("IBuilderConfig.create_timing_cache", bytes(serialized_timing_cache))
            return ITimingCache(serialized_timing_cache)

        def set_timing_cache(self, cache: ITimingCache, ignore_mismatch: bool) -> bool:
            record("IBuilderConfig.set_timing_cache", cache, ignore_mismatch=ignore_mismatch)
            self.timing_cache = cache
            return True

        def get_timing_cache(self) -> ITimingCache | None:
            record("IBuilderConfig.get_timing_cache")
            return self.timing_cache

        def add_optimization_profile(self, profile: IOptimizationProfile) -> int:
            record("IBuilderConfig.add_optimization_profile", profile)
            self.profiles.append(profile)
            return len(self.profiles) - 1

        @property
        def num_optimization_profiles(self) -> int:
            return len(self.profiles)

    class Builder:
        def __init__(self, logger) -> None:
            record("Builder", logger)
            self.logger = logger
            if major < 11:
                self.platform_has_fast_fp16 = True
                self.platform_has_fast_int8 = True

        def create_network(self, flags: int = 0) -> INetworkDefinition:
            record("Builder.create_network", flags)
            return INetworkDefinition(flags)

        def create_builder_config(self) -> IBuilderConfig:
            record("Builder.create_builder_config")
            return IBuilderConfig()

        def create_optimization_profile(self) -> IOptimizationProfile:
            record("Builder.create_optimization_profile")
            return IOptimizationProfile()

        def build_serialized_network(self, network: INetworkDefinition, config: IBuilderConfig):
            record("Builder.build_serialized_network", network, config)
            if config.timing_cache is not None:
                config.timing_cache.builds += 1
            if trt.build_fails:
                for m in trt.build_errors:
                    self.logger.log(ILogger.Severity.ERROR, m)
                return None
            dynamic = [t for t in network.inputs if -1 in t.shape]
            missing = [t.name for t in dynamic if not any(t.name in p.shapes for p in config.profiles)]
            if missing:
                self.logger.log(ILogger.Severity.ERROR, f"[fake] no optimization profile for {missing}")
                return None
            io = ([{"name": t.name, "mode": "input", "dtype": t.dtype.name, "dims": list(t.dims)}
                   for t in network.inputs]
                  + [{"name": t.name, "mode": "output", "dtype": t.dtype.name, "dims": list(t.dims)}
                     for t in network.outputs])
            profile = {k: [list(s) for s in v] for k, v in config.profiles[0].shapes.items()} if config.profiles else {}
            plan = HostMemory(make_plan(io, profile, version=version, flags=network.flags,
                                        version_compatible=config.get_flag(BuilderFlag.VERSION_COMPATIBLE)))
            trt.last_plan = bytes(plan)
            return plan

    trt.IBuilderConfig, trt.IOptimizationProfile, trt.ITimingCache, trt.Builder = (
        IBuilderConfig, IOptimizationProfile, ITimingCache, Builder)

    # ------------------------------------------------------------------ runtime side
    def run_kernel(spec: dict, ex: types.SimpleNamespace) -> None:
        c = cuda()
        kio = spec.get("kernel_io") or {}

        def get(role: str) -> np.ndarray:
            name = kio[role]
            return c.read(ex.addresses[name], ex.input_shapes[name])

        if trt.on_execute is not None:
            trt.on_execute(ex)
        elif spec.get("kernel") == "step":
            c.write(ex.addresses[kio["out"]], step_reference(get("x"), get("cond"), get("t"), get("coef")))
        elif spec.get("kernel") == "prologue":
            c.write(ex.addresses[kio["cond"]], prologue_reference(get("y")))
        trt.executed.append(ex)

    class IExecutionContext:
        def __init__(self, engine: ICudaEngine) -> None:
            self.engine = engine
            self.input_shapes: dict[str, tuple[int, ...]] = {}
            self.addresses: dict[str, int] = {}
            self._shape_version = 0
            self._ran_version = -1  # shape version of the last enqueue outside a capture

        def set_input_shape(self, name: str, shape) -> bool:
            shape = tuple(int(s) for s in shape)
            record("IExecutionContext.set_input_shape", name, shape)
            io = self.engine._io.get(name)
            if io is None or io["mode"] != "input" or len(shape) != len(io["dims"]):
                return False
            if any(isinstance(d, int) and d != s for d, s in zip(io["dims"], shape)):
                return False
            prof = self.engine._profiles[0].get(name) if self.engine._profiles else None
            if prof is not None and not all(lo <= s <= hi for s, lo, hi in zip(shape, prof[0], prof[2])):
                return False  # outside the optimisation profile: TensorRT refuses the shape
            if self.input_shapes.get(name) != shape:
                self._shape_version += 1
            self.input_shapes[name] = shape
            return True

        def get_tensor_shape(self, name: str) -> tuple[int, ...]:
            if name in self.input_shapes:
                return self.input_shapes[name]
            sym: dict[str, int] = {}
            for n, shape in self.input_shapes.items():
                for d, s in zip(self.engine._io[n]["dims"], shape):
                    if isinstance(d, str):
                        sym[d] = s
            return tuple(d if isinstance(d, int) else sym.get(d, -1) for d in self.engine._io[name]["dims"])

        def set_tensor_address(self, name: str, memory: int) -> bool:
            record("IExecutionContext.set_tensor_address", name, int(memory))
            if name not in self.engine._io or int(memory) % ALIGN:
                return False
            self.addresses[name] = int(memory)
            return True

        def get_tensor_address(self, name: str) -> int:
            return self.addresses.get(name, 0)

        @property
        def all_binding_shapes_specified(self) -> bool:
            return all(n in self.input_shapes for n, io in self.engine._io.items() if io["mode"] == "input")

        def execute_async_v3(self, stream_handle: int) -> bool:
            record("IExecutionContext.execute_async_v3", int(stream_handle))
            trt.enqueues += 1
            log = self.engine._logger
            if trt.fail_enqueue_at is not None and trt.enqueues == trt.fail_enqueue_at:
                log.log(ILogger.Severity.ERROR, "[fake] enqueue failed (injected)")
                return False  # like TensorRT: nothing enqueued, no exception
            if not self.all_binding_shapes_specified or set(self.addresses) != set(self.engine._io):
                log.log(ILogger.Severity.ERROR, "[fake] not every input shape / tensor address is set")
                return False
            c = cuda()
            capturing = int(stream_handle) in c.capturing
            if capturing and self._ran_version != self._shape_version:
                log.log(ILogger.Severity.ERROR, "[fake] enqueue once after the input shapes change, then capture")
                return False
            ex = types.SimpleNamespace(addresses=dict(self.addresses), input_shapes=dict(self.input_shapes),
                                       output_shapes={n: self.get_tensor_shape(n) for n, io in self.engine._io.items()
                                                      if io["mode"] == "output"})
            err = c.launch(stream_handle, lambda: run_kernel(self.engine._spec, ex), touches=ex.addresses.values())
            if err != c.cudaError_t.cudaSuccess:
                log.log(ILogger.Severity.ERROR, f"[fake] kernel launch failed: {err.name}")
                return False
            if not capturing:
                self._ran_version = self._shape_version
            return True

    class ICudaEngine:
        def __init__(self, spec: dict, logger) -> None:
            self._spec = spec
            self._logger = logger
            self._io = {t["name"]: t for t in spec["io"]}
            self._names = [t["name"] for t in spec["io"]]
            self._profiles = [{k: [tuple(s) for s in v] for k, v in p.items()} for p in spec["profiles"]]

        @property
        def num_io_tensors(self) -> int:
            return len(self._names)

        @property
        def num_optimization_profiles(self) -> int:
            return len(self._profiles)

        def get_tensor_name(self, index: int) -> str:
            return self._names[index]

        def get_tensor_mode(self, name: str) -> TensorIOMode:
            io = self._io.get(name)
            if io is None:
                return TensorIOMode.NONE
            return TensorIOMode.INPUT if io["mode"] == "input" else TensorIOMode.OUTPUT

        def get_tensor_dtype(self, name: str) -> DataType:
            return DataType[self._io[name]["dtype"]]

        def get_tensor_shape(self, name: str) -> tuple[int, ...]:
            return tuple(d if isinstance(d, int) else -1 for d in self._io[name]["dims"])

        def get_tensor_profile_shape(self, name: str, profile_index: int):
            return [list(s) for s in self._profiles[profile_index][name]]

        def create_execution_context(self) -> IExecutionContext:
            record("ICudaEngine.create_execution_context")
            ctx = IExecutionContext(self)
            trt.contexts.append(ctx)
            return ctx

        def serialize(self) -> HostMemory:
            return HostMemory(trt.last_plan or b"")

    class Runtime:
        def __init__(self, logger) -> None:
            record("Runtime", logger)
            self.logger = logger
            self._host_code_allowed = False

        @property
        def engine_host_code_allowed(self) -> bool:
            return self._host_code_allowed

        @engine_host_code_allowed.setter
        def engine_host_code_allowed(self, value: bool) -> None:
            record("Runtime.engine_host_code_allowed", bool(value))
            self._host_code_allowed = bool(value)

        def deserialize_cuda_engine(self, serialized_engine) -> ICudaEngine | None:
            data = bytes(serialized_engine)
            record("Runtime.deserialize_cuda_engine", len(data))
            if not data.startswith(PLAN_MAGIC):
                self.logger.log(ILogger.Severity.ERROR, "[fake] invalid plan: magic tag does not match")
                return None
            spec = json.loads(data[len(PLAN_MAGIC) + 8:])
            built, here = _version_tuple(spec["version"]), _version_tuple(version)
            if spec.get("version_compatible"):
                if here < built:
                    self.logger.log(ILogger.Severity.ERROR, "[fake] plan built by a newer TensorRT")
                    return None
                if not self._host_code_allowed:
                    self.logger.log(ILogger.Severity.ERROR, "[fake] the plan contains host code (lean runtime); "
                                                            "set engine_host_code_allowed to deserialize it")
                    return None
            elif built != here:
                self.logger.log(ILogger.Severity.ERROR, f"[fake] plan built with TensorRT {spec['version']}")
                return None
            return ICudaEngine(spec, self.logger)

    trt.IExecutionContext, trt.ICudaEngine, trt.Runtime = IExecutionContext, ICudaEngine, Runtime
    return trt


def install(monkeypatch, version: str = "10.9.0.34", *, cudart=None, on_execute: Callable | None = None):
    """Put a fresh fake ``tensorrt`` in ``sys.modules`` (undone by monkeypatch); returns it."""
    trt = make_module(version, cudart)
    trt.on_execute = on_execute
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    return trt
