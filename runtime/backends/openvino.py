"""OpenVINO backend: the same ONNX artifact on x86 CPUs, in BF16 where the CPU computes BF16 natively.

``--device openvino`` (``Derainer(..., device="openvino")``) compiles the artifact's graphs with
OpenVINO's CPU plugin. On a CPU with native BF16 (AMX-BF16 or AVX512_BF16, as OpenVINO reports in
``OPTIMIZATION_CAPABILITIES``) it asks for BF16 inference precision, which on such a CPU runs the
predictor on a whole 720p frame ~2x faster than onnxruntime's FP32 (docs/benchmarks.md); elsewhere
it runs FP32 (``precision="f32"`` forces that anywhere). BF16 keeps 7 mantissa bits: its cost
on both dev sets is measured in docs/quality.md and is under the 0.2 dB INT8 gate.

Buffers follow the backend protocol (runtime/backends/base.py): x[0], x[1] and cond are numpy
arrays allocated once per shape and wrapped as ``openvino.Tensor(..., shared_memory=True)``, so
OpenVINO reads and writes them in place; a step sets x_t / x_next / t / coef to those tensors
(no allocation) and infers. The prologue's request writes the step's cond buffer itself. The step
is compiled for each bound shape with static dimensions (the runtime binds one tile shape per
frame size; static kernels ran the 64-px tiles 1.6x faster than the dynamic model), the last
few kept; the prologue likewise per frame shape it runs on, from half a megapixel up (static: 720p
in BF16 16% faster and with 40% less memory than the dynamic model, the INT8 CPU graph 1.7x
faster), compiled when that shape first runs; smaller inputs share one dynamic-shape compile.

Compiled models are cached on disk between processes (OpenVINO's ``CACHE_DIR``): a compile of the
step costs ~0.9 s and of the prologue ~0.2 s, which a one-photo ``rd-run derain`` paid on every run;
loaded from the cache they cost ~0.45 / 0.06 s (docs/benchmarks.md). The folder is
``$RD_OPENVINO_CACHE``, else ``$XDG_CACHE_HOME/raindiffusion-edge/openvino`` (``~/.cache/...``),
created private to the user (0700); ``RD_OPENVINO_CACHE=off`` (or ``0``, or empty) turns caching
off, and a folder that cannot be created turns it off too. OpenVINO keys each cached model by the
model, the compile options, its own version and the device, and recompiles (and rewrites) a
truncated or altered entry: a stale cache costs one compile, never a wrong output.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from runtime.artifacts import check_external_data
from runtime.backends.base import Backend
from runtime.errors import ArtifactError, UsageError
from runtime.extras import missing
from runtime.manifest import Manifest, load_manifest

__all__ = ["OpenVINOBackend", "cache_dir", "native_bf16", "probe", "PRECISIONS"]

#: ``precision`` values: "auto" = BF16 where the CPU has it natively, else FP32
PRECISIONS = ("auto", "bf16", "f32")
#: compiled step models kept, one per bound shape (b, h, w), and as many prologue models, one per
#: frame shape. Static shapes measured 1.75 ms per 64-px tile at batch 32 in BF16 against 2.78 for
#: the dynamic model (a compile costs ~0.9 s); the prologue on a 720p frame static vs dynamic:
#: BF16 0.22 vs 0.26 s and 385 vs 632 MiB peak, the INT8 CPU graph on AVX512_VNNI kernels 0.33 vs
#: 0.56 s and 399 vs 963 MiB (docs/benchmarks.md).
STATIC_SHAPES = 4
#: prologue inputs of at least this many pixels (batch x height x width) are compiled static per
#: shape; smaller ones share one dynamic-shape compile. A static compile costs 0.24-0.29 s per
#: size (BF16, 2 threads), which a folder of small photos of many sizes would pay per photo, while
#: the memory and time it saves grow with the frame (720p: 632 -> 385 MiB, 0.26 -> 0.22 s; 480x640:
#: 0.078 -> 0.065 s).
STATIC_PROLOGUE_MIN_PIXELS = 500_000


#: the environment variable naming the compile cache's folder ("off", "0" or "" turn it off)
CACHE_ENV = "RD_OPENVINO_CACHE"


def cache_dir(create: bool = True) -> Path | None:
    """The folder OpenVINO caches compiled models in (the module docstring), or None when caching
    is off; ``create`` makes it (mode 0700) and returns None when it cannot be made or written."""
    value = os.environ.get(CACHE_ENV)
    if value is not None and value.strip().lower() in ("", "0", "off", "no", "false"):
        return None
    if value is not None:
        path = Path(value).expanduser()
    else:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        path = Path(base) / "raindiffusion-edge" / "openvino"
    if create:
        try:
            path.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError:
            return None
        if not os.access(path, os.W_OK | os.X_OK):
            return None
    return path


def _import_openvino() -> Any:
    try:
        return importlib.import_module("openvino")
    except ImportError:
        raise missing("openvino") from None


def native_bf16(core: Any) -> bool:
    """Whether OpenVINO's CPU plugin reports native BF16 on this CPU."""
    return "BF16" in list(core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"))


def probe() -> dict[str, Any]:
    """What this machine offers the backend, without opening a model: ``{"available": False}``
    when OpenVINO is not installed, ``{"available": False, "error": ...}`` when it does not load,
    else ``{"available": True, "native_bf16": bool, "cache_dir": str | None}`` (``rd-run info`` and
    ``--device auto``; the cache folder is not created here)."""
    if importlib.util.find_spec("openvino") is None:
        return {"available": False}
    try:
        cache = cache_dir(create=False)
        return {"available": True, "native_bf16": native_bf16(_import_openvino().Core()),
                "cache_dir": str(cache) if cache is not None else None}
    except Exception as e:  # a broken install: reported, and auto falls back to onnxruntime
        return {"available": False, "error": f"{type(e).__name__}: {e}"}


class OpenVINOBackend(Backend):
    """The fused step (and prologue) compiled by OpenVINO for the CPU, on shared numpy buffers."""

    name = "openvino"
    #: measured on the shipped model's 64-px tiles (BF16, 2 threads): 3.5 ms per tile at batch 8,
    #: 2.7 at 16, 2.6 at 32 (onnxruntime: flat); batches do not change the output
    default_batch = 32

    def __init__(self, artifact: str | os.PathLike, *, threads: int | None = None, precision: str = "auto",
                 manifest: Manifest | None = None) -> None:
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            raise UsageError(f"threads must be a positive integer, got {threads!r}")
        if precision not in PRECISIONS:
            raise UsageError(f"OpenVINO precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        manifest = manifest if manifest is not None else load_manifest(artifact, "onnx")
        super().__init__(artifact, manifest)
        prologue_path = manifest.prologue_path(self.artifact)  # hash-checked, before OpenVINO reads anything
        check_external_data(self.artifact)
        if prologue_path is not None:
            check_external_data(prologue_path)
        ov = self._ov = _import_openvino()
        core = ov.Core()
        bf16 = native_bf16(core)
        if precision == "bf16" and not bf16:
            raise UsageError("this CPU has no native BF16 (AMX-BF16 / AVX512_BF16): use precision 'f32' or 'auto'")
        self.device = "openvino"
        self.inference_precision = "bf16" if (precision == "bf16" or (precision == "auto" and bf16)) else "f32"
        config = {"INFERENCE_PRECISION_HINT": self.inference_precision, "PERFORMANCE_HINT": "LATENCY"}
        if threads is not None:
            config["INFERENCE_NUM_THREADS"] = threads
        self.cache_dir = cache_dir()
        if self.cache_dir is not None:
            config["CACHE_DIR"] = str(self.cache_dir)
        self._core, self._config = core, config
        # The step and the prologue are compiled per shape, static (STATIC_SHAPES of each kept; the
        # prologue from STATIC_PROLOGUE_MIN_PIXELS up, below it one dynamic compile).
        self._step_source = self._read(self.artifact)
        self._check_ports(self._step_source, self.artifact, self.descriptor, "fused step")
        self._static: OrderedDict[tuple[int, int, int], Any] = OrderedDict()
        self._pro_static: OrderedDict[tuple[int, int, int], Any] = OrderedDict()
        self._request = None
        self._pro_source = self._pro_request = self._pro_dynamic = None
        self._prologue_path = prologue_path
        if prologue_path is not None:
            self._pro_source = self._read(prologue_path)
            self._check_ports(self._pro_source, prologue_path, self.prologue_descriptor, "prologue")
        self._x: list[np.ndarray] = []
        self._x_t: list[Any] = []
        self._cond = self._cond_t = None
        self._rainy = self._rainy_t = None
        self._t_t: list[Any] = []
        self._coef_t: list[Any] = []
        self._tables: tuple[np.ndarray, np.ndarray] | None = None
        self._frame: tuple | None = None  # frame_prologue's (shape, in, out, request)

    @staticmethod
    def _failure(path: os.PathLike, doing: str, e: Exception) -> ArtifactError:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return ArtifactError(f"{path}: OpenVINO cannot {doing} it ({type(e).__name__}: {first})")

    def _read(self, path: os.PathLike) -> Any:
        try:
            return self._core.read_model(str(path))
        except Exception as e:  # OpenVINO raises RuntimeError subclasses of its own
            raise self._failure(path, "read", e) from None

    def _compile_model(self, model: Any, path: os.PathLike) -> Any:
        try:
            return self._core.compile_model(model, "CPU", self._config)
        except Exception as e:
            raise self._failure(path, "compile", e) from None

    @staticmethod
    def _check_ports(model: Any, path: os.PathLike, descriptor: Any, what: str) -> None:
        got_in = sorted(n for port in model.inputs for n in port.get_names())
        got_out = [n for port in model.outputs for n in sorted(port.get_names())]
        if sorted(descriptor.input_names) != got_in or got_out != list(descriptor.output_names):
            raise ArtifactError(f"{path}: graph inputs {got_in} / outputs {got_out} do not match the {what}'s "
                                f"{descriptor.input_names} / {descriptor.output_names}")

    def _static_compile(self, cache: OrderedDict, key: tuple[int, int, int], source: Any, path: os.PathLike,
                        shapes: dict) -> Any:
        """``source`` compiled with the static input ``shapes``, from ``cache`` under ``key`` (the
        last STATIC_SHAPES kept) or compiled now."""
        if key in cache:
            cache.move_to_end(key)
            return cache[key]
        model = source.clone()
        model.reshape(shapes)
        cache[key] = compiled = self._compile_model(model, path)
        while len(cache) > STATIC_SHAPES:
            cache.popitem(last=False)
        return compiled

    def _step_for(self, batch: int, height: int, width: int) -> Any:
        """The step compiled for this shape (kept for the last STATIC_SHAPES shapes)."""
        d = self.descriptor
        return self._static_compile(self._static, (batch, height, width), self._step_source, self.artifact, {
            d.X: [batch, d.channels, height, width], d.COND: [batch, d.cond_channels, height, width],
            d.T: [batch], d.COEF: [batch, 4]})

    def _prologue_for(self, batch: int, height: int, width: int) -> Any:
        """The prologue compiled for frames of this shape (kept for the last STATIC_SHAPES shapes),
        or below STATIC_PROLOGUE_MIN_PIXELS the one dynamic-shape compile."""
        if batch * height * width < STATIC_PROLOGUE_MIN_PIXELS:
            if self._pro_dynamic is None:
                self._pro_dynamic = self._compile_model(self._pro_source, self._prologue_path)
            return self._pro_dynamic
        pd = self.prologue_descriptor
        return self._static_compile(self._pro_static, (batch, height, width), self._pro_source, self._prologue_path,
                                    {pd.RAINY: [batch, pd.channels, height, width]})

    def _tensor(self, arr: np.ndarray) -> Any:
        return self._ov.Tensor(arr, shared_memory=True)

    # ------------------------------------------------------------------ buffers
    def _allocate(self, batch: int, height: int, width: int) -> None:
        shape = (batch, self.descriptor.channels, height, width)
        self._request = self._step_for(batch, height, width).create_infer_request()
        self._x = [np.zeros(shape, np.float32) for _ in range(2)]
        self._x_t = [self._tensor(a) for a in self._x]
        self._cond = np.zeros((batch, self.descriptor.cond_channels, height, width), np.float32)
        self._cond_t = self._tensor(self._cond)
        self._request.set_tensor(self.descriptor.COND, self._cond_t)  # bound once per shape
        self._pro_request = None  # compiled for this shape when the prologue first runs on it
        if self._pro_source is not None:
            self._rainy = np.zeros(shape, np.float32)
            self._rainy_t = self._tensor(self._rainy)

    def _release_buffers(self) -> None:
        self._x, self._x_t = [], []
        self._cond = self._cond_t = None
        self._rainy = self._rainy_t = None
        self._pro_request = None
        self._t_t, self._coef_t = [], []
        self._tables = None

    def _upload_tables(self, t_table: np.ndarray, coef_table: np.ndarray) -> None:
        self._tables = (t_table, coef_table)  # row views of C-contiguous tables: each tensor shares its row
        self._t_t = [self._tensor(t_table[i]) for i in range(t_table.shape[0])]
        self._coef_t = [self._tensor(coef_table[i]) for i in range(coef_table.shape[0])]

    # ------------------------------------------------------------------ data movement
    def _write_cond(self, cond: np.ndarray) -> None:
        np.copyto(self._cond, cond)

    def _write_rainy(self, rainy: np.ndarray) -> None:
        np.copyto(self._rainy, rainy)

    def _prologue(self) -> None:
        if self._pro_request is None:  # the prologue writes the step's cond buffer itself
            pd = self.prologue_descriptor
            self._pro_request = self._prologue_for(*self._cond.shape[:1], *self._cond.shape[2:]).create_infer_request()
            self._pro_request.set_tensor(pd.RAINY, self._rainy_t)
            self._pro_request.set_tensor(pd.OUT, self._cond_t)
        self._pro_request.infer()

    def _read_cond(self, out: np.ndarray) -> None:
        np.copyto(out, self._cond)

    def frame_prologue(self, rainy: np.ndarray) -> np.ndarray:
        """The prologue on whole frames (see Backend.frame_prologue): its own request and buffers,
        allocated once per frame shape and reused while that shape repeats."""
        self._require_prologue_model()
        pd = self.prologue_descriptor
        self._check_frame(rainy)
        n, _, h, w = rainy.shape
        if self._frame is None or self._frame[0] != rainy.shape:
            inp = np.zeros(rainy.shape, np.float32)
            out = np.zeros((n, pd.cond_channels, h, w), np.float32)
            request = self._prologue_for(n, h, w).create_infer_request()
            request.set_tensor(pd.RAINY, self._tensor(inp))
            request.set_tensor(pd.OUT, self._tensor(out))
            self._frame = (rainy.shape, inp, out, request)
        _, inp, out, request = self._frame
        np.copyto(inp, rainy)
        request.infer()
        return out.copy()

    def _write_x(self, x: np.ndarray) -> None:
        np.copyto(self._x[self._cur], x)

    def _read_x(self, out: np.ndarray) -> None:
        np.copyto(out, self._x[self._cur])

    def _step(self, i: int) -> None:
        d, r = self.descriptor, self._request
        r.set_tensor(d.X, self._x_t[self._cur])
        r.set_tensor(d.OUT, self._x_t[self._cur ^ 1])
        r.set_tensor(d.T, self._t_t[i])
        r.set_tensor(d.COEF, self._coef_t[i])
        r.infer()

    # ------------------------------------------------------------------ introspection for tests
    def buffer_pointers(self) -> tuple[int, int, int]:
        """Data pointers of (x[0], x[1], cond): constant while the shape stays bound."""
        self._check_bound()
        return (self._x[0].ctypes.data, self._x[1].ctypes.data, self._cond.ctypes.data)

    def output_pointer(self) -> int:
        """Data pointer of the tensor OpenVINO last wrote x_next into."""
        return int(self._request.get_tensor(self.descriptor.OUT).data.ctypes.data)

    def _release_engine(self) -> None:
        self._frame = None
        self._request = self._pro_request = None
        self._static.clear()
        self._pro_static.clear()
        self._step_source = self._pro_source = self._pro_dynamic = None

    @property
    def compiled_shapes(self) -> list[tuple[int, int, int]]:
        """The (batch, height, width) the step is compiled for, oldest first."""
        return list(self._static)

    @property
    def compiled_prologue_shapes(self) -> list[tuple[int, int, int]]:
        """The (batch, height, width) the prologue is compiled for, oldest first."""
        return list(self._pro_static)
