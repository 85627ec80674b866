"""A RECORDING FAKE of the ``tensorrt`` Python module, for contract tests. Not TensorRT.

It implements the builder side that ``rd_export.tensorrt.build_engine`` uses, and a small
runtime side (engine introspection, execution context bookkeeping), with the TensorRT 10/11
Python names: ``Builder``, ``NetworkDefinitionCreationFlag``, ``OnnxParser``, ``IBuilderConfig``
(``set_memory_pool_limit(MemoryPoolType.WORKSPACE, n)``, ``builder_optimization_level``,
``create_timing_cache`` / ``set_timing_cache`` / ``get_timing_cache().serialize()``,
``add_optimization_profile``), ``create_optimization_profile`` / ``set_shape``,
``build_serialized_network``, ``Runtime.deserialize_cuda_engine``, ``ICudaEngine``
(``num_io_tensors``, ``get_tensor_name/mode/dtype/shape``), ``IExecutionContext``
(``set_input_shape``, ``set_tensor_address``, ``execute_async_v3``), ``ILogger``/``Logger``,
``__version__``.

Every call lands in ``trt.calls`` as ``Call(name, args, kwargs)``; ``trt.called(name)`` filters.
Knobs: ``parse_errors`` (list of messages: parsing fails with them), ``build_fails`` (the build
returns None after logging ``build_errors``), ``on_execute`` (a callable(context) run by
``execute_async_v3``; return False from it to make the enqueue fail).

Version flavours: ``make_module("10.x")`` has ``BuilderFlag.FP16/INT8`` and
``IBuilderConfig.int8_calibrator`` (deprecated there); ``make_module("11.x")`` has neither
(removed in TensorRT 11), so code that touches them fails loudly under the 11 flavour.

The parser reads the real ONNX file (``onnx.load``) to learn the network's I/O names, dtypes and
dynamic dims; a "plan" is ``PLAN_MAGIC`` + JSON of that I/O and the profile, so
``tests/fakes/fake_trt_runtime.py`` (same magic) can load plans this builder "built".
"""

from __future__ import annotations

import enum
import hashlib
import json
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["PLAN_MAGIC", "Call", "make_module", "install"]

PLAN_MAGIC = b"FAKEPLAN"
TIMING_CACHE_MAGIC = b"FAKE-TIMING-CACHE"


@dataclass
class Call:
    name: str
    args: tuple
    kwargs: dict = field(default_factory=dict)


class DataType(enum.IntEnum):
    FLOAT = 0
    HALF = 1
    INT8 = 2
    INT32 = 3
    BOOL = 4
    UINT8 = 5
    FP8 = 6
    BF16 = 7
    INT64 = 8


class TensorIOMode(enum.IntEnum):
    NONE = 0
    INPUT = 1
    OUTPUT = 2


class MemoryPoolType(enum.IntEnum):
    WORKSPACE = 0
    DLA_MANAGED_SRAM = 1
    DLA_LOCAL_DRAM = 2
    DLA_GLOBAL_DRAM = 3
    TACTIC_DRAM = 4
    TACTIC_SHARED_MEMORY = 5


_ONNX_TO_TRT = {1: DataType.FLOAT, 10: DataType.HALF, 3: DataType.INT8, 6: DataType.INT32, 7: DataType.INT64,
                9: DataType.BOOL, 2: DataType.UINT8, 16: DataType.BF16}


class HostMemory(bytes):
    """IHostMemory: a bytes-like buffer (memoryview works), with ``nbytes``."""

    @property
    def nbytes(self) -> int:
        return len(self)


class ITensor:
    def __init__(self, name: str, dtype: DataType, shape: tuple[int, ...], dims: tuple[str | int, ...]) -> None:
        self.name, self.dtype, self.shape, self.dims = name, dtype, shape, dims

    def __repr__(self) -> str:
        return f"ITensor({self.name}, {self.dtype.name}, {self.shape})"


def make_module(version: str = "10.9.0.34") -> types.ModuleType:
    """A fresh fake ``tensorrt`` module with its own call log and knobs."""
    major = int(version.split(".")[0])
    trt = types.ModuleType("tensorrt", "RECORDING FAKE of the tensorrt module (tests/fakes/fake_tensorrt.py)")
    trt.__version__ = version
    trt.calls = []
    trt.parse_errors = []
    trt.build_fails = False
    trt.build_errors = ["[fake] no implementation obeys the requested constraints"]
    trt.on_execute = None
    trt.last_plan = None
    trt.PLAN_MAGIC = PLAN_MAGIC

    def record(name: str, *args, **kwargs) -> None:
        trt.calls.append(Call(name, args, kwargs))

    trt.called = lambda name: [c for c in trt.calls if c.name == name]
    trt.DataType, trt.TensorIOMode, trt.MemoryPoolType = DataType, TensorIOMode, MemoryPoolType
    trt.float32, trt.float16, trt.int8, trt.int32, trt.int64, trt.bool = (
        DataType.FLOAT, DataType.HALF, DataType.INT8, DataType.INT32, DataType.INT64, DataType.BOOL)

    def nptype(dtype: DataType):
        import numpy as np

        return {DataType.FLOAT: np.float32, DataType.HALF: np.float16, DataType.INT8: np.int8,
                DataType.INT32: np.int32, DataType.INT64: np.int64, DataType.BOOL: np.bool_,
                DataType.UINT8: np.uint8}[dtype]

    trt.nptype = nptype

    if major >= 11:
        class NetworkDefinitionCreationFlag(enum.IntEnum):  # EXPLICIT_BATCH is gone in 11
            STRONGLY_TYPED = 0  # deprecated in 11 (always on) but still accepted
            PREFER_AOT_PYTHON_PLUGINS = 1
            PREFER_JIT_PYTHON_PLUGINS = 2

        class BuilderFlag(enum.IntEnum):  # no FP16 / INT8: removed in TensorRT 11
            DEBUG = 2
            GPU_FALLBACK = 3
            REFIT = 4
            DISABLE_TIMING_CACHE = 5
            TF32 = 6
    else:
        class NetworkDefinitionCreationFlag(enum.IntEnum):
            EXPLICIT_BATCH = 0  # deprecated, ignored in 10
            STRONGLY_TYPED = 1
            PREFER_AOT_PYTHON_PLUGINS = 2
            PREFER_JIT_PYTHON_PLUGINS = 3

        class BuilderFlag(enum.IntEnum):
            FP16 = 0
            INT8 = 1
            DEBUG = 2
            GPU_FALLBACK = 3
            REFIT = 4
            DISABLE_TIMING_CACHE = 5
            TF32 = 6

    trt.NetworkDefinitionCreationFlag, trt.BuilderFlag = NetworkDefinitionCreationFlag, BuilderFlag

    # ------------------------------------------------------------------ logging
    class ILogger:
        class Severity(enum.IntEnum):
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

        def parse(self, model: bytes, path: str | None = None) -> bool:
            record("parse", len(model), path)
            if trt.parse_errors:
                self._errors = [ParserError(m, i) for i, m in enumerate(trt.parse_errors)]
                return False
            import onnx

            return self._load(onnx.load_from_string(bytes(model)))

    def _tensor(v) -> ITensor:
        tt = v.type.tensor_type
        dims = tuple(d.dim_param if d.HasField("dim_param") else int(d.dim_value) for d in tt.shape.dim)
        shape = tuple(d if isinstance(d, int) else -1 for d in dims)
        return ITensor(v.name, _ONNX_TO_TRT.get(tt.elem_type, DataType.FLOAT), shape, dims)

    trt.INetworkDefinition, trt.OnnxParser = INetworkDefinition, OnnxParser

    # ------------------------------------------------------------------ builder config
    class ITimingCache:
        def __init__(self, blob: bytes) -> None:
            self.loaded = bytes(blob)
            self.builds = 0

        def serialize(self) -> HostMemory:
            record("ITimingCache.serialize")
            body = self.loaded or TIMING_CACHE_MAGIC
            return HostMemory(body + b"+build" * self.builds)

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

        # memory pools
        def set_memory_pool_limit(self, pool: MemoryPoolType, pool_size: int) -> None:
            record("IBuilderConfig.set_memory_pool_limit", pool, pool_size)
            self.pool_limits[pool] = int(pool_size)

        def get_memory_pool_limit(self, pool: MemoryPoolType) -> int:
            return self.pool_limits.get(pool, 0)

        # optimisation level (a property, as in TensorRT's Python API)
        @property
        def builder_optimization_level(self) -> int:
            return self._opt_level

        @builder_optimization_level.setter
        def builder_optimization_level(self, level: int) -> None:
            record("IBuilderConfig.builder_optimization_level", level)
            self._opt_level = int(level)

        # flags
        @property
        def flags(self) -> int:
            return self._flags

        @flags.setter
        def flags(self, value: int) -> None:
            record("IBuilderConfig.flags", value)
            self._flags = int(value)

        def set_flag(self, flag) -> None:
            record("IBuilderConfig.set_flag", flag)
            self._flags |= 1 << int(flag)

        def clear_flag(self, flag) -> None:
            record("IBuilderConfig.clear_flag", flag)
            self._flags &= ~(1 << int(flag))

        def get_flag(self, flag) -> bool:
            return bool(self._flags & (1 << int(flag)))

        # timing cache
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

        # profiles
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
            spec = {
                "version": version,
                "flags": network.flags,
                "io": [{"name": t.name, "mode": "input", "dtype": t.dtype.name, "dims": list(t.dims)}
                       for t in network.inputs]
                + [{"name": t.name, "mode": "output", "dtype": t.dtype.name, "dims": list(t.dims)}
                   for t in network.outputs],
                "profiles": [{k: [list(s) for s in v] for k, v in p.shapes.items()} for p in config.profiles],
            }
            body = json.dumps(spec, sort_keys=True).encode()
            plan = HostMemory(PLAN_MAGIC + hashlib.sha256(body).digest()[:8] + body)
            trt.last_plan = bytes(plan)
            return plan

    trt.IBuilderConfig, trt.IOptimizationProfile, trt.ITimingCache, trt.Builder = (
        IBuilderConfig, IOptimizationProfile, ITimingCache, Builder)

    # ------------------------------------------------------------------ runtime side
    class IExecutionContext:
        def __init__(self, engine: ICudaEngine) -> None:
            self.engine = engine
            self.input_shapes: dict[str, tuple[int, ...]] = {}
            self.addresses: dict[str, int] = {}

        def set_input_shape(self, name: str, shape) -> bool:
            record("IExecutionContext.set_input_shape", name, tuple(shape))
            io = self.engine._io.get(name)
            if io is None or io["mode"] != "input" or len(shape) != len(io["dims"]):
                return False
            prof = self.engine._profiles[0].get(name) if self.engine._profiles else None
            if prof is not None and not all(lo <= s <= hi for s, lo, hi in zip(shape, prof[0], prof[2])):
                return False
            self.input_shapes[name] = tuple(int(s) for s in shape)
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
            if name not in self.engine._io:
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
            if not self.all_binding_shapes_specified or set(self.addresses) != set(self.engine._io):
                return False
            if trt.on_execute is not None:
                return trt.on_execute(self) is not False
            return True

    class ICudaEngine:
        def __init__(self, spec: dict) -> None:
            self._spec = spec
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
            return IExecutionContext(self)

        def serialize(self) -> HostMemory:
            return HostMemory(trt.last_plan or b"")

    class Runtime:
        def __init__(self, logger) -> None:
            record("Runtime", logger)
            self.logger = logger

        def deserialize_cuda_engine(self, serialized_engine) -> ICudaEngine | None:
            data = bytes(serialized_engine)
            record("Runtime.deserialize_cuda_engine", len(data))
            if not data.startswith(PLAN_MAGIC):
                self.logger.log(ILogger.Severity.ERROR, "[fake] invalid plan: magic tag does not match")
                return None
            return ICudaEngine(json.loads(data[len(PLAN_MAGIC) + 8:]))

    trt.IExecutionContext, trt.ICudaEngine, trt.Runtime = IExecutionContext, ICudaEngine, Runtime
    return trt


def install(monkeypatch, version: str = "10.9.0.34", *, on_execute: Callable | None = None) -> types.ModuleType:
    """Put a fresh fake ``tensorrt`` in ``sys.modules`` (undone by monkeypatch); returns it."""
    trt = make_module(version)
    trt.on_execute = on_execute
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    return trt
