"""The fused DDIM step on a CUDA GPU: the backend protocol (runtime/backends/base.py) over one
:class:`~runtime.backends.trt_executor.Executor` and one step engine.

The engine is a TensorRT plan in production (:class:`~runtime.backends.tensorrt.TensorRTBackend`
opens it after the manifest and version checks) or a CUDA stand-in where TensorRT is missing
(tests/gpu/standin.py); this module does not care which. Per bound frame shape:

- buffers ``x_t[0]``, ``x_t[1]`` (the ping-pong pair) and ``cond`` are allocated once, sized from
  the descriptor's tensor specs (names and channel counts come from runtime.descriptor, never
  from here), and the engine's input shapes are set once; ``cond`` is bound once;
- per (steps, batch) the t and coef tables of all S steps are uploaded once, one 256-byte
  aligned row per step, into buffers named after those tensors, with ``cudaMemcpyAsync`` on the
  executor's own stream (so no step can run before its table landed);
- a step re-points ``x_t`` / ``x_next`` (swap) and ``t`` / ``coef`` (the row of step i) and
  enqueues once; every enqueue's result is checked;
- a predict-and-refine artifact has a second engine, the prologue: its ``rainy`` input gets its
  own buffer and its output is bound to the step's ``cond`` buffer, so ``run_prologue()`` is one
  enqueue on the same stream that writes the condition in place (no copy between the graphs).

CUDA graph: after one warm-up run of the S-step loop at a shape, the next ``run()`` captures all
S enqueues as one graph and every ``run()`` after that is one ``cudaGraphLaunch``. A failed
enqueue during capture raises (nothing is kept); a capture CUDA refuses leaves the backend
stepping and says why in ``graph_error``. Shape or schedule changes drop the graph.
``cuda_graph=False`` turns graphs off.

The executor makes the backend's device current on the calling thread at every call, so one
instance may be used from several threads in turn (``Derainer`` serialises them).
"""

from __future__ import annotations

import math
import os

import numpy as np

from runtime.backends.base import Backend
from runtime.backends.cuda_device import CudaDevice, GraphCaptureError
from runtime.backends.trt_executor import CudaGraph, Engine, Executor, align_up
from runtime.descriptor import ShapeProfile, StepDescriptor
from runtime.errors import ArtifactError, UsageError
from runtime.manifest import Manifest

__all__ = ["CudaStepBackend", "spec_shapes"]


def spec_shapes(descriptor, batch: int, height: int, width: int) -> dict[str, tuple[int, ...]]:
    """Every tensor of the descriptor at a frame shape: symbolic axes resolved, fixed ones kept."""
    sym = {"batch": int(batch), "height": int(height), "width": int(width)}
    out = {}
    for spec in (*descriptor.inputs, *descriptor.outputs):
        try:
            out[spec.name] = tuple(sym[d] if isinstance(d, str) else int(d) for d in spec.shape)
        except KeyError as e:
            raise ArtifactError(f"tensor {spec.name!r} has an axis {e.args[0]!r} the runtime cannot size") from None
    return out


class CudaStepBackend(Backend):
    """The fused step of ``manifest`` run by ``engine`` on ``device`` (see the module docstring)."""

    name = "cuda"

    def __init__(self, artifact: str | os.PathLike, manifest: Manifest, *, device: CudaDevice, engine: Engine,
                 cuda_graph: bool = True, limits: ShapeProfile | None = None,
                 descriptor: StepDescriptor | None = None, prologue_engine: Engine | None = None) -> None:
        super().__init__(artifact, manifest)
        if descriptor is not None:
            self.descriptor = descriptor
        if (prologue_engine is None) != (self.prologue_descriptor is None):
            raise ArtifactError(f"{self.artifact.name}: " + ("its manifest names a prologue graph but no prologue "
                                                             "engine was given" if prologue_engine is None else
                                                             "a prologue engine was given for a y-only step"))
        self._engine = engine
        self._pro_engine = prologue_engine
        self._exec: Executor | None = None
        self._limits = limits
        self.device = f"cuda:{device.index}"
        self.use_cuda_graph = bool(cuda_graph)
        self.graph_error: str | None = None
        self._graph: CudaGraph | None = None
        self._warm = False
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._strides: dict[str, int] = {}
        d = self.descriptor
        self._xbuf = (f"{d.X}[0]", f"{d.X}[1]")
        self._check_io(engine, d, "fused step")
        if prologue_engine is not None:
            self._check_io(prologue_engine, self.prologue_descriptor, "prologue")
        self._exec = Executor(device)

    # ------------------------------------------------------------------ setup
    def _check_io(self, engine: Engine, d, what: str) -> None:
        got = {t.name: t for t in engine.io()}
        want = {**{s.name: (True, s) for s in d.inputs}, **{s.name: (False, s) for s in d.outputs}}
        if sorted(got) != sorted(want):
            raise ArtifactError(f"{self.artifact.name}: engine tensors {sorted(got)} do not match the {what}'s "
                                f"{sorted(want)}")
        for name, (is_input, spec) in want.items():
            if got[name].is_input != is_input:
                raise ArtifactError(f"{self.artifact.name}: engine tensor {name!r} has the wrong direction")
            if got[name].dtype != np.dtype(spec.dtype):
                have = getattr(engine, "dtype_name", lambda n: str(got[n].dtype))(name)
                raise ArtifactError(f"{self.artifact.name}: engine tensor {name!r} is {have}, the {what}'s I/O "
                                    f"is {spec.dtype}")

    @property
    def limits(self) -> ShapeProfile | None:
        return self._limits

    @property
    def executor(self) -> Executor:
        """The executor (advanced use: more engines on the same buffers and stream)."""
        self._check_open()
        return self._exec

    def _nbytes(self, name: str) -> int:
        spec = next(s for s in (*self.descriptor.inputs, *self.descriptor.outputs) if s.name == name)
        return math.prod(self._shapes[name]) * np.dtype(spec.dtype).itemsize

    # ------------------------------------------------------------------ buffers
    def _allocate(self, batch: int, height: int, width: int) -> None:
        d, ex, engine = self.descriptor, self._exec, self._engine
        self._shapes = spec_shapes(d, batch, height, width)
        if self._shapes[d.X] != self._shapes[d.OUT]:
            raise ArtifactError(f"{self.artifact.name}: {d.OUT} {self._shapes[d.OUT]} and {d.X} {self._shapes[d.X]} "
                                f"differ, so the step cannot run in place")
        nx = self._nbytes(d.X)
        ex.allocate({self._xbuf[0]: nx, self._xbuf[1]: nx, d.COND: self._nbytes(d.COND)})
        ex.set_shapes(engine, {n: self._shapes[n] for n in d.input_names})
        out = ex.output_shape(engine, d.OUT)
        if out != self._shapes[d.OUT]:
            raise ArtifactError(f"{self.artifact.name}: the engine's {d.OUT} is {out}, expected {self._shapes[d.OUT]}")
        ex.bind(engine, {d.COND: ex.pointer(d.COND)})  # cond never moves while the shape is bound
        if self._pro_engine is not None:  # the prologue writes the step's cond buffer in place
            pd = self.prologue_descriptor
            shapes = spec_shapes(pd, batch, height, width)
            ex.allocate({pd.RAINY: math.prod(shapes[pd.RAINY]) * np.dtype(pd.inputs[0].dtype).itemsize})
            ex.set_shapes(self._pro_engine, {pd.RAINY: shapes[pd.RAINY]})
            out = ex.output_shape(self._pro_engine, pd.OUT)
            if out != self._shapes[d.COND]:
                raise ArtifactError(f"{self.artifact.name}: the prologue's {pd.OUT} is {out}, the step's "
                                    f"{d.COND} {self._shapes[d.COND]}")
            ex.bind(self._pro_engine, {pd.RAINY: ex.pointer(pd.RAINY), pd.OUT: ex.pointer(d.COND)})
        self._warm = False

    def _release_buffers(self) -> None:
        self._drop_graph()
        if self._exec is not None:
            self._exec.free()
        self._strides.clear()

    def _upload_tables(self, t_table: np.ndarray, coef_table: np.ndarray) -> None:
        """Rows of every step, 256-byte aligned (setTensorAddress's rule), into the t / coef buffers."""
        self._drop_graph()
        self._warm = False
        d, ex = self.descriptor, self._exec
        s = t_table.shape[0]
        for name, rows in ((d.T, t_table.reshape(s, -1)), (d.COEF, coef_table.reshape(s, -1))):
            rows = np.ascontiguousarray(rows, dtype=np.float32)
            stride = align_up(rows[0].nbytes)
            host = np.zeros((s, stride // 4), dtype=np.float32)
            host[:, : rows.shape[1]] = rows
            ex.allocate({name: host.nbytes})
            ex.upload(name, host)  # cudaMemcpyAsync on the stream the steps run on: ordered before them
            self._strides[name] = stride

    # ------------------------------------------------------------------ data movement
    def set_cond(self, cond: np.ndarray) -> None:
        """Copy the condition (the descriptor's cond shape at the bound frame shape) into its buffer."""
        self._check_bound()
        want = self._shapes[self.descriptor.COND]
        if not isinstance(cond, np.ndarray) or cond.dtype != np.float32 or cond.shape != want:
            got = f"{cond.dtype} {cond.shape}" if isinstance(cond, np.ndarray) else type(cond).__name__
            raise UsageError(f"cond must be a float32 array of shape {want} (the bound shape), got {got}")
        self._write_cond(cond)

    def _write_cond(self, cond: np.ndarray) -> None:
        self._exec.upload(self.descriptor.COND, cond)

    def _write_rainy(self, rainy: np.ndarray) -> None:
        self._exec.upload(self.prologue_descriptor.RAINY, rainy)

    def _prologue(self) -> None:
        # on the executor's stream: ordered after the rainy upload and before the steps
        self._exec.enqueue(self._pro_engine, " (prologue)")

    def _read_cond(self, out: np.ndarray) -> None:
        self._exec.download(self.descriptor.COND, out)

    def _write_x(self, x: np.ndarray) -> None:
        self._exec.upload(self._xbuf[self._cur], x)

    def _read_x(self, out: np.ndarray) -> None:
        self._exec.download(self._xbuf[self._cur], out)

    # ------------------------------------------------------------------ steps
    def _enqueue(self, i: int, src: int) -> None:
        """Step i reading x[src], writing x[1 - src], at the t / coef rows of step i."""
        d, ex = self.descriptor, self._exec
        ex.bind(self._engine, {d.X: ex.pointer(self._xbuf[src]), d.OUT: ex.pointer(self._xbuf[src ^ 1]),
                               d.T: ex.pointer(d.T, i * self._strides[d.T]),
                               d.COEF: ex.pointer(d.COEF, i * self._strides[d.COEF])})
        ex.enqueue(self._engine, f" at step {i}")

    def _step(self, i: int) -> None:
        self._enqueue(i, self._cur)

    def run(self) -> None:
        """All S steps: step by step the first time at a shape, then as one replayed CUDA graph."""
        self._require_ready()
        s = self.num_steps
        if self.use_cuda_graph and self.graph_error is None and self._cur == 0:
            if self._graph is None and self._warm:
                self._capture()
            if self._graph is not None:
                self._exec.launch(self._graph)
                self._cur = s % 2
                return
        start = self._cur
        for i in range(s):
            self._enqueue(i, self._cur)
            self._cur ^= 1
        if start == 0:
            self._warm = True  # one full loop ran at this shape: capture may follow

    def _capture(self) -> None:
        def record() -> None:
            src = 0
            for i in range(self.num_steps):
                self._enqueue(i, src)  # raises on a failed enqueue: never keep a graph with a hole
                src ^= 1

        try:
            self._graph = self._exec.capture(record)
        except GraphCaptureError as e:  # capture unsupported here: keep running step by step
            self.graph_error = str(e)

    def _drop_graph(self) -> None:
        if self._graph is not None and self._exec is not None:
            self._exec.destroy(self._graph)
        self._graph = None

    @property
    def graph_captured(self) -> bool:
        return self._graph is not None

    def buffer_pointers(self) -> tuple[int, int, int]:
        """Device pointers of (x[0], x[1], cond): constant while the shape stays bound."""
        self._check_bound()
        ex = self._exec
        return (ex.pointer(self._xbuf[0]), ex.pointer(self._xbuf[1]), ex.pointer(self.descriptor.COND))

    # ------------------------------------------------------------------ lifetime
    def _release_engine(self) -> None:
        if self._exec is not None:
            self._exec.close()
            self._exec = None
        for name in ("_engine", "_pro_engine"):
            if getattr(self, name, None) is not None:
                getattr(self, name).close()
                setattr(self, name, None)

    def __del__(self) -> None:
        try:
            if not getattr(self, "_closed", True) and getattr(self, "_exec", None) is not None:
                self.close()
        except Exception:  # interpreter shutdown: CUDA may already be gone
            pass
