"""onnxruntime backend: the fused DDIM step on CPU (default) or CUDA (onnxruntime-gpu).

Buffers are bound through IOBinding. Per shape we allocate x[0], x[1] and cond once and wrap
each in an OrtValue (on CPU ``OrtValue.ortvalue_from_numpy`` wraps the numpy memory without a
copy, so writing the numpy array updates the bound input; on CUDA the OrtValues live on the
device, ``ortvalue_from_shape_and_type``, and are filled with ``update_inplace``). The per-step
t and coef inputs are S small OrtValues made once per (steps, batch). A step rebinds
x_t / x_next / t / coef to those preallocated OrtValues and calls ``run_with_iobinding``:
measured on the 2-core CI CPU, the four rebinds cost ~3 us and allocate nothing
(tracemalloc flat and RSS unchanged over 200 steps); the output is written straight into the
preallocated x buffer (its data pointer is checked in the tests).

Session options: graph optimisation level ORT_ENABLE_ALL (measured 1.28x torch eager on the 2-core
AVX2 CI CPU, docs/benchmarks.md; ~1.45x on an AVX-512 CPU, where BASIC gave ~1.15x:
docs/ARCHITECTURE.md), intra-op threads settable.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

import numpy as np

from runtime.artifacts import check_external_data
from runtime.backends.base import Backend, load_manifest, parse_device
from runtime.errors import ArtifactError, UsageError
from runtime.extras import cuda_provider_error, missing
from runtime.manifest import Manifest

__all__ = ["OnnxRuntimeBackend"]


def _import_onnxruntime() -> Any:
    try:
        return importlib.import_module("onnxruntime")
    except ImportError:
        raise missing("onnxruntime") from None


class OnnxRuntimeBackend(Backend):
    """The fused step on onnxruntime with IOBinding and preallocated, ping-ponged buffers."""

    name = "onnxruntime"

    def __init__(self, artifact: str | os.PathLike, *, device: str = "cpu", threads: int | None = None,
                 manifest: Manifest | None = None) -> None:
        kind, index = parse_device(device)
        if threads is not None and (not isinstance(threads, int) or threads < 1):
            raise UsageError(f"threads must be a positive integer, got {threads!r}")
        manifest = manifest if manifest is not None else load_manifest(artifact, "onnx")
        super().__init__(artifact, manifest)
        check_external_data(self.artifact)  # before onnxruntime opens any external-data file
        ort = _import_onnxruntime()
        self._ort = ort
        self.device = "cpu" if kind == "cpu" else f"cuda:{index}"
        self._ort_device = ("cpu", 0) if kind == "cpu" else ("cuda", index)

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads is not None:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        if kind == "cuda":
            available = list(ort.get_available_providers())
            if "CUDAExecutionProvider" not in available:
                raise cuda_provider_error(available)  # CPU build, or both builds installed: says which
            providers: list = [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]
        else:
            providers = ["CPUExecutionProvider"]
        try:
            self._session = ort.InferenceSession(str(self.artifact), options, providers=providers)
        except Exception as e:  # onnxruntime raises its own pybind exception types
            raise ArtifactError(f"{self.artifact}: onnxruntime cannot load it ({type(e).__name__}: {e})") from None
        self._check_io()
        self._io = self._session.io_binding()
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

    def _check_io(self) -> None:
        got_in = [i.name for i in self._session.get_inputs()]
        got_out = [o.name for o in self._session.get_outputs()]
        want_in, want_out = self.descriptor.input_names, self.descriptor.output_names
        if sorted(got_in) != sorted(want_in) or got_out != want_out:
            raise ArtifactError(
                f"{self.artifact}: graph inputs {got_in} / outputs {got_out} do not match the fused step's "
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
        self._cond, self._cond_ov = self._new_value(shape)
        self._io.clear_binding_inputs()
        self._io.clear_binding_outputs()
        self._io.bind_ortvalue_input(self.descriptor.COND, self._cond_ov)  # bound once per shape

    def _full_shape_for(self, batch: int, height: int, width: int) -> tuple[int, int, int, int]:
        return (batch, self.descriptor.channels, height, width)

    def _release_buffers(self) -> None:
        if getattr(self, "_io", None) is not None:
            self._io.clear_binding_inputs()
            self._io.clear_binding_outputs()
        self._x, self._x_ov = [], []
        self._cond = self._cond_ov = None
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
        # Ping-pong: rebind to preallocated OrtValues (no allocation, ~3 us for the four binds).
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
        self._io = None
        self._session = None
