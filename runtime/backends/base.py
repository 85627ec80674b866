"""The one small protocol every inference backend implements (docs/ARCHITECTURE.md, code convention 7).

A backend runs the exported **fused DDIM step** (``runtime.descriptor``) and nothing else::

    backend = open_backend("model.onnx")            # manifest validated first
    backend.bind(batch, height, width)              # buffers allocated once per shape
    backend.set_schedule(timesteps, coefficients)   # per-step t / coef prepared once per (S, batch)
    backend.set_cond(cond)                          # [N, C, H, W] float32 in [-1, 1]
    # or, for a predict-and-refine model (a prologue graph beside the step):
    backend.set_rainy(y); backend.run_prologue()    # cond = [y, P(y)] computed into the bound cond buffer
    backend.set_x(x_T)                              # [N, 3, H, W] float32
    backend.run()                                   # S steps in place (or run_step(i) one at a time)
    x_0 = backend.get_x(out)                        # copy out, into ``out`` when given

Two x buffers ping-pong: ``run_step(i)`` reads the current one, writes the other, then the
roles swap; no buffer is allocated per step and no tensor crosses the host/device boundary
between steps. ``set_x`` always writes buffer 0 and makes it current, so a loop started by
``set_x`` has a fixed buffer sequence (what lets TensorRT capture it as one CUDA graph).

Backends are not thread-safe; :class:`runtime.derainer.Derainer` serialises calls with a lock.
"""

from __future__ import annotations

import abc
import os
from pathlib import Path
from typing import ClassVar

import numpy as np

from runtime.descriptor import PrologueDescriptor, ShapeProfile, StepDescriptor
from runtime.errors import ArtifactError, UsageError
from runtime.manifest import Manifest

__all__ = ["Backend", "parse_device"]


def parse_device(device: str | None) -> tuple[str, int]:
    """``"cpu"`` -> ("cpu", 0); ``"cuda"`` / ``"cuda:1"`` -> ("cuda", index); else UsageError."""
    text = "cpu" if device is None else str(device).strip().lower()
    kind, _, index = text.partition(":")
    if kind not in ("cpu", "cuda") or (kind == "cpu" and index):
        raise UsageError(f"device {device!r} is not one of 'cpu', 'cuda', 'cuda:N'")
    if not index:
        return kind, 0
    if not index.isdigit():
        raise UsageError(f"device {device!r}: the CUDA device index must be a non-negative integer")
    return kind, int(index)


class Backend(abc.ABC):
    """Runs the fused DDIM step of one artifact on one device. See the module docstring."""

    #: short engine name: "onnxruntime", "openvino" or "tensorrt"
    name: ClassVar[str] = "backend"
    #: frames or tiles per engine call when the caller does not say (None: the profile's max batch)
    default_batch: ClassVar[int | None] = None

    def __init__(self, artifact: str | os.PathLike, manifest: Manifest) -> None:
        self.artifact = Path(artifact)
        self.manifest = manifest
        self.descriptor: StepDescriptor = manifest.step_descriptor
        #: the prologue's contract for a predict-and-refine model, else None
        self.prologue_descriptor: PrologueDescriptor | None = (
            self.descriptor.prologue() if manifest.prologue is not None else None)
        self._shape: tuple[int, int, int] | None = None  # (batch, height, width)
        self._timesteps: np.ndarray | None = None  # [S] int64, descending
        self._coefficients: np.ndarray | None = None  # [S, 4] float32
        self._tables_key: tuple[int, int] | None = None  # (S, batch) the step tables were built for
        self._cur = 0  # which x buffer holds the current sample
        self._closed = False

    # ------------------------------------------------------------------ shape limits
    @property
    def limits(self) -> ShapeProfile | None:
        """Shapes the engine accepts, or None when any shape runs (onnxruntime)."""
        return None

    @property
    def shape(self) -> tuple[int, int, int] | None:
        """(batch, height, width) currently bound, or None."""
        return self._shape

    @property
    def num_steps(self) -> int:
        return 0 if self._timesteps is None else int(self._timesteps.shape[0])

    def check_shape(self, batch: int, height: int, width: int) -> None:
        """UsageError naming the bad value and the valid range (docs/ARCHITECTURE.md, code convention 11)."""
        for name, v in (("batch", batch), ("height", height), ("width", width)):
            if not isinstance(v, (int, np.integer)) or v < 1:
                raise UsageError(f"{name} must be a positive integer, got {v!r}")
        try:
            self.descriptor.check_frame_size(int(height), int(width))
        except ValueError as e:
            raise UsageError(str(e)) from None
        lim = self.limits
        if lim is None:
            return
        if not lim.min_batch <= batch <= lim.max_batch:
            raise UsageError(f"batch {batch} is outside the engine's profile {lim.min_batch}..{lim.max_batch}")
        for axis, name, v in ((0, "height", height), (1, "width", width)):
            lo, hi = lim.min_size[axis], lim.max_size[axis]
            if not lo <= v <= hi:
                raise UsageError(
                    f"{name} {v} is outside the engine's profile {lo}..{hi}; rebuild the engine with a larger "
                    f"profile or use tiling (tile=...)"
                )

    # ------------------------------------------------------------------ the protocol
    def bind(self, batch: int, height: int, width: int) -> None:
        """Allocate buffers for this shape; a no-op when the shape is already bound."""
        self._check_open()
        shape = (int(batch), int(height), int(width))
        if shape == self._shape:
            return
        self.check_shape(*shape)
        self._release_buffers()
        self._shape = None
        self._tables_key = None
        self._allocate(*shape)
        self._shape = shape
        self._cur = 0
        if self._timesteps is not None:
            self._prepare_tables()

    def set_schedule(self, timesteps: np.ndarray, coefficients: np.ndarray) -> None:
        """Per-step t ([S], descending) and coef ([S, 4]) of ``DDIMSchedule``; tables cached per (S, batch)."""
        self._check_open()
        ts = np.asarray(timesteps)
        coef = np.asarray(coefficients, dtype=np.float32)
        if ts.ndim != 1 or ts.shape[0] < 1 or coef.shape != (ts.shape[0], 4):
            raise UsageError(f"schedule needs timesteps [S] and coefficients [S, 4], got {ts.shape} and {coef.shape}")
        if (self._timesteps is not None and np.array_equal(ts, self._timesteps)
                and np.array_equal(coef, self._coefficients)):
            return
        self._timesteps = ts.astype(np.int64, copy=True)
        self._coefficients = np.ascontiguousarray(coef).copy()
        self._tables_key = None
        if self._shape is not None:
            self._prepare_tables()

    @property
    def has_prologue(self) -> bool:
        return self.prologue_descriptor is not None

    def set_cond(self, cond: np.ndarray) -> None:
        """Copy the condition ([N, C, H, W] float32) into the bound cond buffer."""
        self._write_cond(self._checked(cond, "cond", self._cond_shape()))

    def set_rainy(self, rainy: np.ndarray) -> None:
        """Copy the rainy frames ([N, 3, H, W] float32) into the prologue's input buffer."""
        self._require_prologue()
        self._write_rainy(self._checked(rainy, "rainy"))

    def run_prologue(self) -> None:
        """The prologue graph: the rainy buffer -> the bound cond buffer ([y, P(y)]), in place."""
        self._require_prologue()
        self._prologue()

    def frame_prologue(self, rainy: np.ndarray) -> np.ndarray | None:
        """The prologue on whole frames [N, 3, H, W] of any size, outside the bound shape (the
        bound buffers are not touched): cond [N, C, H, W], or None where the engine cannot (a
        TensorRT profile bounds the prologue engine to the step's tile sizes). The runtime uses it
        for frames that are tiled for the steps, so P sees the whole frame, once."""
        self._require_prologue_model()
        return None

    def get_cond(self, out: np.ndarray | None = None) -> np.ndarray:
        """The bound condition, copied into ``out`` ([N, C, H, W] float32) or a new array."""
        self._check_bound()
        if out is None:
            out = np.empty(self._cond_shape(), dtype=np.float32)
        else:
            self._checked(out, "out", self._cond_shape(), writable=True)
        self._read_cond(out)
        return out

    def set_x(self, x: np.ndarray) -> None:
        """Copy the sample into x buffer 0 and make it current."""
        arr = self._checked(x, "x")
        self._cur = 0
        self._write_x(arr)

    def run_step(self, i: int) -> None:
        """Step i of the schedule (0 = the noisiest), in place: the x buffers swap roles."""
        self._require_ready()
        if not 0 <= i < self.num_steps:
            raise UsageError(f"step index {i} is outside 0..{self.num_steps - 1}")
        self._step(int(i))
        self._cur ^= 1

    def run(self) -> None:
        """All S steps of the schedule."""
        self._require_ready()
        for i in range(self.num_steps):
            self._step(i)
            self._cur ^= 1

    def get_x(self, out: np.ndarray | None = None) -> np.ndarray:
        """The current sample, copied into ``out`` ([N, 3, H, W] float32) or a new array."""
        self._check_bound()
        if out is None:
            out = np.empty(self._full_shape(), dtype=np.float32)
        else:
            self._checked(out, "out", writable=True)
        self._read_x(out)
        return out

    def close(self) -> None:
        """Free buffers and engine resources; the backend cannot be used afterwards."""
        if self._closed:
            return
        self._release_buffers()
        self._shape = None
        self._release_engine()
        self._closed = True

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.artifact.name} shape={self._shape} steps={self.num_steps}>"

    # ------------------------------------------------------------------ helpers for subclasses
    def _full_shape(self) -> tuple[int, int, int, int]:
        """Shape of the x buffers (and of the prologue's rainy input)."""
        assert self._shape is not None
        n, h, w = self._shape
        return (n, self.descriptor.channels, h, w)

    def _cond_shape(self) -> tuple[int, int, int, int]:
        assert self._shape is not None
        n, h, w = self._shape
        return (n, self.descriptor.cond_channels, h, w)

    def _step_tables(self) -> tuple[np.ndarray, np.ndarray]:
        """t [S, N] and coef [S, N, 4] float32, C-contiguous: row i is step i's input."""
        assert self._timesteps is not None and self._coefficients is not None and self._shape is not None
        n = self._shape[0]
        s = self._timesteps.shape[0]
        t_table = np.repeat(self._timesteps.astype(np.float32)[:, None], n, axis=1)
        coef_table = np.repeat(self._coefficients[:, None, :], n, axis=1)
        return np.ascontiguousarray(t_table.reshape(s, n)), np.ascontiguousarray(coef_table.reshape(s, n, 4))

    def _prepare_tables(self) -> None:
        key = (self.num_steps, self._shape[0])
        if key == self._tables_key:
            return
        self._upload_tables(*self._step_tables())
        self._tables_key = key

    def _checked(self, arr: np.ndarray, name: str, want: tuple[int, ...] | None = None, *,
                 writable: bool = False) -> np.ndarray:
        self._check_bound()
        want = want or self._full_shape()
        if not isinstance(arr, np.ndarray) or arr.dtype != np.float32 or arr.shape != want:
            got = f"{arr.dtype} {arr.shape}" if isinstance(arr, np.ndarray) else type(arr).__name__
            raise UsageError(f"{name} must be a float32 array of shape {want} (the bound shape), got {got}")
        if writable and not (arr.flags.c_contiguous and arr.flags.writeable):
            raise UsageError(f"{name} must be a writable C-contiguous array")
        return arr

    @staticmethod
    def _check_frame(rainy: np.ndarray) -> None:
        """frame_prologue's input: float32 [N, 3, H, W] of any size."""
        if not isinstance(rainy, np.ndarray) or rainy.dtype != np.float32 or rainy.ndim != 4 or rainy.shape[1] != 3:
            got = f"{rainy.dtype} {rainy.shape}" if isinstance(rainy, np.ndarray) else type(rainy).__name__
            raise UsageError(f"rainy must be a float32 array [N, 3, H, W], got {got}")

    def _check_open(self) -> None:
        if self._closed:
            raise UsageError(f"{type(self).__name__} for {self.artifact.name} is closed")

    def _check_bound(self) -> None:
        self._check_open()
        if self._shape is None:
            raise UsageError("call bind(batch, height, width) first")

    def _require_prologue(self) -> None:
        self._check_bound()
        self._require_prologue_model()

    def _require_prologue_model(self) -> None:
        self._check_open()
        if self.prologue_descriptor is None:
            raise UsageError(f"{self.artifact.name} has no prologue: its condition is the rainy image (set_cond)")

    def _require_ready(self) -> None:
        self._check_bound()
        if self._timesteps is None:
            raise UsageError("call set_schedule(timesteps, coefficients) first")

    # ------------------------------------------------------------------ engine-specific parts
    @abc.abstractmethod
    def _allocate(self, batch: int, height: int, width: int) -> None:
        """Allocate x[0], x[1] and cond for this shape and tell the engine the input shapes."""

    @abc.abstractmethod
    def _release_buffers(self) -> None:
        """Free what ``_allocate`` and ``_upload_tables`` made (idempotent)."""

    @abc.abstractmethod
    def _upload_tables(self, t_table: np.ndarray, coef_table: np.ndarray) -> None:
        """Make the per-step t [S, N] and coef [S, N, 4] inputs available to the engine."""

    @abc.abstractmethod
    def _write_cond(self, cond: np.ndarray) -> None: ...

    @abc.abstractmethod
    def _write_x(self, x: np.ndarray) -> None:
        """Copy into x buffer ``self._cur`` (always 0 here)."""

    @abc.abstractmethod
    def _read_x(self, out: np.ndarray) -> None:
        """Copy x buffer ``self._cur`` into ``out``."""

    @abc.abstractmethod
    def _step(self, i: int) -> None:
        """Run step i reading x[self._cur], writing x[1 - self._cur] (the caller swaps)."""

    # A backend that runs predict-and-refine artifacts overrides these three; the base refuses.
    def _write_rainy(self, rainy: np.ndarray) -> None:
        """Copy into the prologue's input buffer (allocated by ``_allocate`` with a prologue)."""
        raise ArtifactError(f"the {self.name} backend cannot run the prologue graph of {self.artifact.name}")

    def _prologue(self) -> None:
        """Run the prologue graph from the rainy buffer into the cond buffer."""
        raise ArtifactError(f"the {self.name} backend cannot run the prologue graph of {self.artifact.name}")

    def _read_cond(self, out: np.ndarray) -> None:
        """Copy the cond buffer into ``out``."""
        raise ArtifactError(f"the {self.name} backend cannot read back the condition of {self.artifact.name}")

    def _release_engine(self) -> None:  # noqa: B027 - optional hook
        """Free the session / engine / stream (called once by close())."""
