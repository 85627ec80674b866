"""onnxruntime backend: the fused DDIM step on CPU (default) or CUDA (onnxruntime-gpu).

Buffers are bound through IOBinding. Per shape we allocate x[0], x[1] and cond once and wrap
each in an OrtValue (on CPU ``OrtValue.ortvalue_from_numpy`` wraps the numpy memory without a
copy, so writing the numpy array updates the bound input; on CUDA the OrtValues live on the
device, ``ortvalue_from_shape_and_type``, and are filled with ``update_inplace``). The per-step
t and coef inputs are S small OrtValues made once per (steps, batch). A step rebinds
x_t / x_next / t / coef to those preallocated OrtValues and calls ``run_with_iobinding``: the
rebinds allocate nothing (the tests hold tracemalloc to it), and the output is written straight
into the preallocated x buffer (its data pointer is checked in the tests).

Session options (:func:`make_session`): graph optimisation level ORT_ENABLE_ALL, the fastest level
measured (docs/ARCHITECTURE.md "Speed", docs/benchmarks.md), intra-op threads settable.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

import numpy as np

from runtime.artifacts import check_external_data
from runtime.backends.base import Backend, parse_device
from runtime.errors import ArtifactError, UsageError
from runtime.extras import cuda_provider_error, missing
from runtime.manifest import Manifest, load_manifest

__all__ = ["OnnxRuntimeBackend", "make_session", "providers_for"]


def _import_onnxruntime() -> Any:
    try:
        return importlib.import_module("onnxruntime")
    except ImportError:
        raise missing("onnxruntime") from None


def providers_for(device: str = "cpu") -> list:
    """onnxruntime execution providers for ``device`` ("cpu", "cuda", "cuda:N"); DependencyError
    when CUDA is asked for and onnxruntime-gpu's provider is not available."""
    kind, index = parse_device(device)
    if kind == "cpu":
        return ["CPUExecutionProvider"]
    ort = _import_onnxruntime()
    available = list(ort.get_available_providers())
    if "CUDAExecutionProvider" not in available:
        raise cuda_provider_error(available)  # CPU build, or both builds installed: says which
    return [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]


def make_session(path: str | os.PathLike | bytes, *, device: str = "cpu", threads: int | None = None,
                 optimization: str = "all", quiet: bool = False, mem_pattern: bool = True) -> Any:
    """The one way the toolkit opens an onnxruntime session (runtime, verification, calibration,
    the exporter's measurements and the tests).

    ``path``: an ONNX file, or a serialised model (``ModelProto.SerializeToString()``) for graphs
    built in memory. ``optimization``: "all" (ORT_ENABLE_ALL, the runtime's) or "basic" /
    "disabled" (what quantisation tools want to see: the graph as written). ``threads``: intra-op
    threads (and one inter-op thread), None = onnxruntime's default. ``quiet`` logs errors only.
    ``mem_pattern=False`` turns off onnxruntime's memory pattern (what the prologue's session does:
    on whole frames the pattern's block, allocated from the second run on beside the arena the
    first run filled, raised the steady peak by ~0.37 GB at 720p).
    External-data paths of a file are checked before onnxruntime opens it; a model onnxruntime
    cannot load is an ArtifactError.
    """
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise UsageError(f"threads must be a positive integer, got {threads!r}")
    levels = {"all": "ORT_ENABLE_ALL", "basic": "ORT_ENABLE_BASIC", "disabled": "ORT_DISABLE_ALL"}
    if optimization not in levels:
        raise UsageError(f"optimization must be one of {', '.join(levels)}, got {optimization!r}")
    in_memory = isinstance(path, (bytes, bytearray))
    if not in_memory:
        check_external_data(path)  # before onnxruntime is even imported
    ort = _import_onnxruntime()
    options = ort.SessionOptions()
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, levels[optimization])
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    if quiet:
        options.log_severity_level = 3
    if not mem_pattern:
        options.enable_mem_pattern = False
    providers = providers_for(device)
    try:
        return ort.InferenceSession(bytes(path) if in_memory else str(path), options, providers=providers)
    except Exception as e:  # onnxruntime raises its own pybind exception types
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        what = "an in-memory model" if in_memory else str(path)
        raise ArtifactError(f"{what}: onnxruntime cannot load it ({type(e).__name__}: {first})") from None


class OnnxRuntimeBackend(Backend):
    """The fused step on onnxruntime with IOBinding and preallocated, ping-ponged buffers."""

    name = "onnxruntime"

    def __init__(self, artifact: str | os.PathLike, *, device: str = "cpu", threads: int | None = None,
                 manifest: Manifest | None = None) -> None:
        kind, index = parse_device(device)
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            raise UsageError(f"threads must be a positive integer, got {threads!r}")
        manifest = manifest if manifest is not None else load_manifest(artifact, "onnx")
        super().__init__(artifact, manifest)
        prologue_path = manifest.prologue_path(self.artifact)  # hash-checked, before any session opens
        self.device = "cpu" if kind == "cpu" else f"cuda:{index}"
        self._ort_device = ("cpu", 0) if kind == "cpu" else ("cuda", index)
        self._session = make_session(self.artifact, device=self.device, threads=threads)
        self._ort = _import_onnxruntime()
        self._check_io(self._session, self.artifact, self.descriptor, "fused step")
        self._io = self._session.io_binding()
        self._pro_session = self._pio = None
        if prologue_path is not None:
            self._pro_session = make_session(prologue_path, device=self.device, threads=threads, mem_pattern=False)
            self._check_io(self._pro_session, prologue_path, self.prologue_descriptor, "prologue")
            self._pio = self._pro_session.io_binding()
        self._rainy: Any = None
        self._rainy_ov: Any = None
        self._frame: tuple | None = None  # frame_prologue's buffers: (shape, in, in OrtValue, out, out OrtValue, io)
        self._x: list[Any] = []  # numpy arrays (CPU) backing the x OrtValues
        self._x_ov: list[Any] = []
        self._cond: Any = None
        self._cond_ov: Any = None
        self._t_ov: list[Any] = []
        self._coef_ov: list[Any] = []
        self._tables: tuple[np.ndarray, np.ndarray] | None = None  # keeps the CPU tables alive

    @property
    def providers(self) -> list[str]:
        return list(self._session.get_providers())

    @staticmethod
    def _check_io(session: Any, path: os.PathLike, descriptor: Any, what: str) -> None:
        got_in = [i.name for i in session.get_inputs()]
        got_out = [o.name for o in session.get_outputs()]
        want_in, want_out = descriptor.input_names, descriptor.output_names
        if sorted(got_in) != sorted(want_in) or got_out != want_out:
            raise ArtifactError(
                f"{path}: graph inputs {got_in} / outputs {got_out} do not match the {what}'s "
                f"{want_in} / {want_out}"
            )

    # ------------------------------------------------------------------ buffers
    def _new_value(self, shape: tuple[int, ...]) -> tuple[np.ndarray | None, Any]:
        ort = self._ort
        if self._ort_device[0] == "cpu":
            arr = np.zeros(shape, dtype=np.float32)
            return arr, ort.OrtValue.ortvalue_from_numpy(arr)
        dev, idx = self._ort_device
        return None, ort.OrtValue.ortvalue_from_shape_and_type(list(shape), np.float32, dev, idx)

    def _allocate(self, batch: int, height: int, width: int) -> None:
        shape = self._full_shape_for(batch, height, width)
        self._x, self._x_ov = [], []
        for _ in range(2):
            arr, ov = self._new_value(shape)
            self._x.append(arr)
            self._x_ov.append(ov)
        self._cond, self._cond_ov = self._new_value((batch, self.descriptor.cond_channels, height, width))
        self._io.clear_binding_inputs()
        self._io.clear_binding_outputs()
        self._io.bind_ortvalue_input(self.descriptor.COND, self._cond_ov)  # bound once per shape
        if self._pio is not None:  # the prologue writes the step's cond buffer itself: no copy between them
            pd = self.prologue_descriptor
            self._rainy, self._rainy_ov = self._new_value(shape)
            self._pio.clear_binding_inputs()
            self._pio.clear_binding_outputs()
            self._pio.bind_ortvalue_input(pd.RAINY, self._rainy_ov)
            self._pio.bind_ortvalue_output(pd.OUT, self._cond_ov)

    def _full_shape_for(self, batch: int, height: int, width: int) -> tuple[int, int, int, int]:
        return (batch, self.descriptor.channels, height, width)

    def _release_buffers(self) -> None:
        if getattr(self, "_io", None) is not None:
            self._io.clear_binding_inputs()
            self._io.clear_binding_outputs()
        if getattr(self, "_pio", None) is not None:
            self._pio.clear_binding_inputs()
            self._pio.clear_binding_outputs()
        self._x, self._x_ov = [], []
        self._cond = self._cond_ov = None
        self._rainy = self._rainy_ov = None
        self._t_ov, self._coef_ov = [], []
        self._tables = None

    def _upload_tables(self, t_table: np.ndarray, coef_table: np.ndarray) -> None:
        ort = self._ort
        if self._ort_device[0] == "cpu":
            # Row views of C-contiguous tables are contiguous: each OrtValue wraps its row, no copy.
            self._tables = (t_table, coef_table)
            self._t_ov = [ort.OrtValue.ortvalue_from_numpy(t_table[i]) for i in range(t_table.shape[0])]
            self._coef_ov = [ort.OrtValue.ortvalue_from_numpy(coef_table[i]) for i in range(coef_table.shape[0])]
        else:
            dev, idx = self._ort_device
            self._t_ov = [ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(row), dev, idx) for row in t_table]
            self._coef_ov = [ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(row), dev, idx)
                             for row in coef_table]

    # ------------------------------------------------------------------ data movement
    def _write_cond(self, cond: np.ndarray) -> None:
        if self._cond is not None:
            np.copyto(self._cond, cond)
        else:
            self._cond_ov.update_inplace(cond)

    def _write_rainy(self, rainy: np.ndarray) -> None:
        if self._rainy is not None:
            np.copyto(self._rainy, rainy)
        else:
            self._rainy_ov.update_inplace(rainy)

    def _prologue(self) -> None:
        self._pro_session.run_with_iobinding(self._pio)

    def _read_cond(self, out: np.ndarray) -> None:
        if self._cond is not None:
            np.copyto(out, self._cond)
        else:
            np.copyto(out, self._cond_ov.numpy())

    def frame_prologue(self, rainy: np.ndarray) -> np.ndarray:
        """The prologue on whole frames (see Backend.frame_prologue): its own input / output
        buffers, allocated once per frame shape and reused while that shape repeats."""
        self._require_prologue_model()
        pd = self.prologue_descriptor
        self._check_frame(rainy)
        n, _, h, w = rainy.shape
        if self._frame is None or self._frame[0] != rainy.shape:
            inp, inp_ov = self._new_value(rainy.shape)
            out, out_ov = self._new_value((n, pd.cond_channels, h, w))
            io = self._pro_session.io_binding()
            io.bind_ortvalue_input(pd.RAINY, inp_ov)
            io.bind_ortvalue_output(pd.OUT, out_ov)
            self._frame = (rainy.shape, inp, inp_ov, out, out_ov, io)
        _, inp, inp_ov, out, out_ov, io = self._frame
        if inp is not None:
            np.copyto(inp, rainy)
        else:
            inp_ov.update_inplace(np.ascontiguousarray(rainy))
        self._pro_session.run_with_iobinding(io)
        return (out if out is not None else out_ov.numpy()).copy()

    def _write_x(self, x: np.ndarray) -> None:
        if self._x[self._cur] is not None:
            np.copyto(self._x[self._cur], x)
        else:
            self._x_ov[self._cur].update_inplace(x)

    def _read_x(self, out: np.ndarray) -> None:
        src = self._x[self._cur]
        if src is not None:
            np.copyto(out, src)
        else:  # device -> host (one copy per frame, never per step)
            np.copyto(out, self._x_ov[self._cur].numpy())

    def _step(self, i: int) -> None:
        d, io = self.descriptor, self._io
        # Ping-pong: rebind to preallocated OrtValues (no allocation).
        io.bind_ortvalue_input(d.X, self._x_ov[self._cur])
        io.bind_ortvalue_output(d.OUT, self._x_ov[self._cur ^ 1])
        io.bind_ortvalue_input(d.T, self._t_ov[i])
        io.bind_ortvalue_input(d.COEF, self._coef_ov[i])
        self._session.run_with_iobinding(io)

    # ------------------------------------------------------------------ introspection for tests
    def buffer_pointers(self) -> tuple[int, int, int]:
        """Data pointers of (x[0], x[1], cond): constant while the shape stays bound."""
        self._check_bound()
        return (self._x_ov[0].data_ptr(), self._x_ov[1].data_ptr(), self._cond_ov.data_ptr())

    def output_pointer(self) -> int:
        """Data pointer of the OrtValue onnxruntime last wrote x_next into."""
        return self._io.get_outputs()[0].data_ptr()

    def _release_engine(self) -> None:
        self._frame = None
        self._io = self._pio = None
        self._session = self._pro_session = None
