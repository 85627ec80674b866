"""``Derainer``: the library API, frame in, frame out (numpy uint8), no torch.

    from runtime.derainer import Derainer

    derainer = Derainer("model.onnx", steps=10, seed=0)        # or Derainer() for the shipped model
    clean = derainer.derain(rainy)                              # HxWx3 uint8 RGB -> HxWx3 uint8
    clean_bgr = derainer.derain(frame_bgr, bgr=True)            # OpenCV frames
    outs = derainer.derain_batch([f1, f2, f3])                  # batched through the engine

What one call does (Algorithm 2 with eta = 0, exactly what ``training.diffusion.ddim_sample``
does in torch): cond = u8 / 127.5 - 1; reflect-pad H, W (bottom / right) up to the model's size
multiple (and up to a TensorRT profile's minimum); x_T = ``initial_noise((1, 3, Hp, Wp), seed)``
for every frame (times the noise scale of a predict-and-refine model: zeros for the shipped one);
S fused steps in the backend; crop; ``round((x + 1) * 127.5)`` clipped to uint8.
The output has the input's shape. The same seed gives the same output, and a frame gives the
same output alone or inside a batch (the noise depends only on the seed and the padded shape).

Frames larger than the engine's profile, or any frame when ``tile`` is set, go through
overlapping tiles (:mod:`runtime.tiling`) that are blended at every step.

Thread safety: a lock serialises calls, so one ``Derainer`` shared by two threads works (the
calls run one after the other, with the same results as sequential calls). For parallelism
open one ``Derainer`` per thread (each holds its own engine and buffers).
"""

from __future__ import annotations

import importlib.resources
import os
import threading
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from runtime.backends import open_backend
from runtime.errors import ArtifactError, UsageError
from runtime.lowpass import keep_correction
from runtime.manifest import SAMPLING_SETTINGS, Manifest
from runtime.schedule import DDIMSchedule, initial_noise
from runtime.tiling import TileBlender, plan_tiles

__all__ = ["Derainer", "default_artifact", "default_overlap", "pad_reflect", "to_float", "to_uint8"]

_NOISE_CACHE_SIZE = 4

#: Frames up to this many (padded) pixels run the prologue whole, once, before their tiles' steps
#: (P is the reference's prologue on the whole frame; no tile seams, no overlap recomputed); larger
#: frames run it per tile, which bounds memory (docs/benchmarks.md measures both).
FRAME_PROLOGUE_MAX_PIXELS = 2_100_000


#: the shipped models by precision, in order of preference: the INT8 graph for x86 CPUs (u8
#: activations, 7-bit weights: no saturation without VNNI, and on OpenVINO's VNNI kernels the s8
#: graph lost 0.4-0.9 dB where this one lost nothing: docs/benchmarks.md) before the s8 Q/DQ graph
#: that TensorRT builds from
SHIPPED_MODELS = {"fp32": ("default.onnx",), "int8": ("default.int8.cpu.onnx", "default.int8.onnx")}


def _assets() -> Path:
    return Path(str(importlib.resources.files("runtime").joinpath("assets")))


def default_artifact(precision: str | None = None, device: str | None = None) -> Path:
    """The shipped model of ``precision`` ("fp32": ``runtime/assets/default.onnx``; "int8": its INT8
    graph), or, with None, of the precision the runtime picks for ``device``
    (:func:`runtime.backends.default_precision`: INT8 on OpenVINO on an AVX512_VNNI CPU without
    native BF16, FP32 elsewhere; FP32 when that INT8 graph is not installed). ArtifactError when it
    is not installed."""
    assets = _assets()
    if precision is None:
        from runtime.backends import default_precision

        precision = default_precision(device)
        if precision != "fp32" and not any((assets / n).is_file() for n in SHIPPED_MODELS[precision]):
            precision = "fp32"
    if precision not in SHIPPED_MODELS:
        raise UsageError(f"precision must be one of {', '.join(SHIPPED_MODELS)}, got {precision!r}")
    for name in SHIPPED_MODELS[precision]:
        if (assets / name).is_file():
            return assets / name
    if precision == "fp32":
        raise ArtifactError(
            "no default model is installed (runtime/assets/default.onnx is missing); pass an artifact, "
            "e.g. Derainer('model.onnx'), made with 'rd-export build checkpoint.pt'"
        )
    raise ArtifactError(f"the {precision.upper()} model (runtime/assets/{' or '.join(SHIPPED_MODELS[precision])}) "
                        f"is not shipped with this install")


def to_float(frames: np.ndarray) -> np.ndarray:
    """uint8 [..., H, W, 3] -> float32 [..., 3, H, W] in [-1, 1]: u8 / 127.5 - 1."""
    x = frames.astype(np.float32) / np.float32(127.5) - np.float32(1.0)
    return np.ascontiguousarray(np.moveaxis(x, -1, -3))


def to_uint8(x: np.ndarray) -> np.ndarray:
    """float [..., 3, H, W] in [-1, 1] -> uint8 [..., H, W, 3]: round((x + 1) * 127.5), clipped."""
    y = np.clip(np.round((x + np.float32(1.0)) * np.float32(127.5)), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(np.moveaxis(y, -3, -1))


def pad_reflect(x: np.ndarray, height: int, width: int) -> np.ndarray:
    """Pad [..., H, W] bottom / right to (height, width) by reflection (as the torch reference does).

    Reflection needs pad < size, so it goes in rounds; a 1-pixel side is replicated instead.
    """
    h, w = x.shape[-2], x.shape[-1]
    ph, pw = height - h, width - w
    if ph < 0 or pw < 0:
        raise ValueError(f"cannot pad {h}x{w} down to {height}x{width}")
    lead = [(0, 0)] * (x.ndim - 2)
    y = x
    while ph or pw:
        sh, sw = min(ph, y.shape[-2] - 1), min(pw, y.shape[-1] - 1)
        if sh == 0 and sw == 0:  # 1-pixel side: reflection impossible, replicate the rest
            return np.pad(y, [*lead, (0, ph), (0, pw)], mode="edge")
        y = np.pad(y, [*lead, (0, sh), (0, sw)], mode="reflect")
        ph, pw = ph - sh, pw - sw
    return y


def default_overlap(tile: int) -> int:
    """Overlap used when none is given: an eighth of the tile, at most 32 px (8 px for 64-px tiles).

    Measured on the shipped model (docs/benchmarks.md, "Tile overlap"): at 2 steps on both dev sets
    overlap 8 scores within 0.03 dB and 0.001 SSIM of 16 and 32, and 0 loses 0.06 dB / 0.004 SSIM
    on jorder_h; a 720p frame in 64-px tiles is 1.30x its pixels at overlap 8, 1.76x at 16.
    """
    return min(32, tile // 8)


def _check_frame(frame: object, what: str = "frame") -> np.ndarray:
    if not isinstance(frame, np.ndarray):
        raise UsageError(f"{what} must be a numpy array (HxWx3 uint8), got {type(frame).__name__}")
    if frame.ndim == 3 and frame.shape[2] == 4:
        raise UsageError(f"{what} has 4 channels (RGBA/BGRA); pass frame[..., :3] and keep the alpha yourself")
    if frame.ndim != 3 or frame.shape[2] != 3:
        raise UsageError(f"{what} must have shape HxWx3, got {frame.shape}")
    if frame.dtype != np.uint8:
        raise UsageError(f"{what} must be uint8 (0..255), got {frame.dtype}; convert with "
                         f"np.clip(x, 0, 255).astype(np.uint8) after scaling")
    if frame.shape[0] < 1 or frame.shape[1] < 1:
        raise UsageError(f"{what} is empty: {frame.shape}")
    return frame


class Derainer:
    """Derain uint8 frames with an exported RainDiffusion artifact (see the module docstring).

    Parameters: ``artifact`` (.onnx or .plan; None = the shipped default model), ``steps`` (DDIM
    steps S; None = the manifest's default), ``seed`` (initial noise), ``tile`` (tile size in
    pixels, a multiple of the size multiple; None = tile only frames beyond the engine's
    profile), ``overlap`` (pixels shared by neighbouring tiles; None = an eighth of the tile, at
    most 32: :func:`default_overlap`), ``device`` ("cpu", "cuda",
    "cuda:N", "openvino", "auto"; None = ``$RD_DEVICE`` or else auto for .onnx (OpenVINO where it is
    installed and the CPU has native BF16 or, for an INT8 artifact, AVX512_VNNI, else onnxruntime:
    :func:`runtime.backends.onnx_device`), cuda for .plan), ``threads`` (CPU inference threads),
    ``batch`` (frames or tiles per engine call; None = the backend's choice, else the profile's max
    batch), ``cuda_graph``
    (TensorRT: replay the step loop as one CUDA graph), ``refine_strength`` (predict-and-refine
    models: the output is ``P(y) + a * (x_0 - P(y))``, the share ``a`` of the refiner's correction
    kept; None = the manifest's ``prologue.refine_strength``, 1 where it does not say; 0.5 for the
    shipped model, chosen on both dev sets: docs/quality.md), ``noise_scale`` (predict-and-refine
    models: x_T = s * N(0, I); 0 starts the loop from x_T = 0, the noise's mean, and the output no
    longer depends on ``seed``; None = the manifest's ``prologue.noise_scale``, 1 where it does not
    say; 0 for the shipped model: docs/quality.md), ``refine_lowpass`` (predict-and-refine models: a
    Gaussian sigma in pixels; > 0 keeps only the low frequencies of the correction, ``P(y) + a *
    G_sigma(x_0 - P(y))``, applied to the whole (stitched) frame: :mod:`runtime.lowpass`; None = the
    manifest's ``prologue.refine_lowpass``, 0 (off) where it does not say; 8 for the shipped model).
    """

    def __init__(self, artifact: str | os.PathLike | None = None, *, steps: int | None = None, seed: int = 0,
                 tile: int | None = None, overlap: int | None = None, device: str | None = None,
                 threads: int | None = None, batch: int | None = None, cuda_graph: bool = True,
                 refine_strength: float | None = None, noise_scale: float | None = None,
                 refine_lowpass: float | None = None) -> None:
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise UsageError(f"seed must be a non-negative integer, got {seed!r}")
        given = {"refine_strength": refine_strength, "noise_scale": noise_scale, "refine_lowpass": refine_lowpass}
        for name, value in given.items():
            if value is not None and (why := SAMPLING_SETTINGS[name][1](value)):
                raise UsageError(f"{name} {why}")
        path = default_artifact(device=device) if artifact is None else Path(artifact)
        self._backend = open_backend(path, device=device, threads=threads, cuda_graph=cuda_graph)
        try:
            self._configure(steps=steps, seed=int(seed), tile=tile, overlap=overlap, batch=batch)
            chosen = {}  # the argument, else the manifest's (Algorithm 2's where it does not say)
            for name, value in given.items():
                if value is not None and not self._backend.has_prologue and value != SAMPLING_SETTINGS[name][0]:
                    raise UsageError(f"{name} applies to predict-and-refine models; {path.name} has no predictor")
                chosen[name] = float(self.manifest.sampling_setting(name) if value is None else value)
            self._strength, self._noise_scale, self._lowpass = (
                chosen["refine_strength"], chosen["noise_scale"], chosen["refine_lowpass"])
            # predict-and-refine steps whose output is not x_0 as it is (the condition holds P(y))
            self._keeps_share = self._steps > 0 and (self._strength != 1.0 or self._lowpass > 0)
        except BaseException:
            self._backend.close()
            raise
        self._lock = threading.Lock()
        self._noise: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._blenders: dict[tuple, TileBlender] = {}

    def _configure(self, *, steps: int | None, seed: int, tile: int | None, overlap: int | None,
                   batch: int | None) -> None:
        manifest = self._backend.manifest
        self._schedule = DDIMSchedule(manifest.schedule_config)
        steps = manifest.default_steps if steps is None else steps
        if (isinstance(steps, (int, np.integer)) and not isinstance(steps, bool) and steps == 0
                and self._backend.has_prologue):
            pass  # the predictor's estimate P(y) alone: no DDIM step, no schedule
        else:
            try:  # the schedule checks S (an integer in MIN_STEPS..T; a bool is at most 1) and says why
                self._schedule.set_timesteps(steps)
            except ValueError as e:
                extra = " (or 0: the predictor's estimate alone)" if self._backend.has_prologue else ""
                raise UsageError(f"{e}{extra}") from None
            self._backend.set_schedule(self._schedule.timesteps, self._schedule.coefficients())
            self._warn_uncalibrated()
        self._steps = int(steps)
        self._seed = seed

        m = self.size_multiple
        lim = self._backend.limits
        if tile is not None:
            if isinstance(tile, bool) or not isinstance(tile, (int, np.integer)) or tile < m or tile % m:
                lo = max(m, (int(tile) // m) * m) if isinstance(tile, (int, np.integer)) else m
                raise UsageError(f"tile must be a positive multiple of the model's size multiple {m} "
                                 f"(e.g. {lo} or {lo + m}), got {tile!r}")
            if lim is not None and not min(lim.min_size) <= tile <= min(lim.max_size):
                raise UsageError(f"tile {tile} is outside the engine's profile "
                                 f"{min(lim.min_size)}..{min(lim.max_size)}")
        self._tile = None if tile is None else int(tile)
        native = self.native_tile
        if self._tile is not None and native is not None and self._tile != native:
            warnings.warn(f"tile {self._tile} differs from the model's native tile size {native} (its training "
                          f"crop); quality outside the native size is not measured", UserWarning, stacklevel=3)
        if overlap is not None and (isinstance(overlap, bool) or not isinstance(overlap, (int, np.integer))
                                    or overlap < 0):
            raise UsageError(f"overlap must be a non-negative integer, got {overlap!r}")
        if self._tile is not None and overlap is not None and overlap >= self._tile:
            raise UsageError(f"overlap {overlap} must be smaller than tile {self._tile}")
        # Without an explicit overlap: default_overlap of the tile that will be used (the given tile, the
        # native tile, or the profile's max size, at which frames beyond the profile are tiled).
        auto_tile = self._tile or native or min((lim or self._backend.descriptor.profile).max_size)
        self._overlap = default_overlap(auto_tile) if overlap is None else int(overlap)
        profile = lim if lim is not None else self._backend.descriptor.profile
        if batch is None:
            batch = self._backend.default_batch or profile.max_batch
        if isinstance(batch, bool) or not isinstance(batch, (int, np.integer)) or batch < 1:
            raise UsageError(f"batch must be a positive integer, got {batch!r}")
        if lim is not None and not lim.min_batch <= batch <= lim.max_batch:
            raise UsageError(f"batch {batch} is outside the engine's profile {lim.min_batch}..{lim.max_batch}")
        self._batch = int(batch)

    def _warn_uncalibrated(self) -> None:
        """An INT8 artifact's activation ranges hold for the timesteps it was calibrated on; warn
        (once, here) when this schedule steps at others."""
        calibrated = (self.manifest.get("calibration") or {}).get("timesteps")
        if self.manifest.precision != "int8" or not isinstance(calibrated, list):
            return
        outside = sorted(set(int(t) for t in self._schedule.timesteps) - {int(t) for t in calibrated}, reverse=True)
        if outside:
            counts = (self.manifest.get("calibration") or {}).get("calibrated_step_counts")
            hint = f"; calibrated step counts: {counts}" if counts else ""
            warnings.warn(f"{self.artifact.name} was not calibrated at timesteps {outside} of "
                          f"{len(self._schedule.timesteps)} steps: INT8 quality there is not measured{hint}",
                          UserWarning, stacklevel=4)

    # ------------------------------------------------------------------ properties
    @property
    def manifest(self) -> Manifest:
        return self._backend.manifest

    @property
    def steps(self) -> int:
        return self._steps

    @property
    def refine_strength(self) -> float:
        """The share of the refiner's correction kept (1: x_0 as Algorithm 2 returns it)."""
        return self._strength

    @property
    def noise_scale(self) -> float:
        """The scale s of the initial noise, x_T = s * N(0, I) (1: Algorithm 2's x_T; 0: x_T = 0)."""
        return self._noise_scale

    @property
    def refine_lowpass(self) -> float:
        """The low-pass sigma (pixels) of the kept correction; 0 = the whole correction at the refine strength."""
        return self._lowpass

    @property
    def seed(self) -> int:
        return self._seed

    @property
    def size_multiple(self) -> int:
        return self._backend.descriptor.size_multiple

    @property
    def backend_name(self) -> str:
        return self._backend.name

    @property
    def artifact(self) -> Path:
        return self._backend.artifact

    @property
    def tile(self) -> int | None:
        """The tile size given to the constructor (None: the native tile, or whole frames)."""
        return self._tile

    @property
    def native_tile(self) -> int | None:
        """The model's native tile size (its training crop) from the manifest; None when not recorded.
        Frames larger than it are tiled at it unless ``tile`` says otherwise."""
        native = self.manifest.get("native_tile")
        if isinstance(native, int) and not isinstance(native, bool) and native > 0:
            m = self.size_multiple
            return max(m, -(-native // m) * m)
        return None

    @property
    def overlap(self) -> int:
        return self._overlap

    @property
    def batch(self) -> int:
        return self._batch

    @property
    def backend(self):
        """The engine backend (advanced use; calls on it are not serialised by the lock)."""
        return self._backend

    # ------------------------------------------------------------------ frames
    def derain(self, frame: np.ndarray, *, bgr: bool = False) -> np.ndarray:
        """One HxWx3 uint8 frame (RGB, or BGR with ``bgr=True``) -> derained, same shape and order."""
        arr = _check_frame(frame)
        return self._derain_group(arr[None], bgr=bgr)[0]

    def derain_batch(self, frames: Sequence[np.ndarray] | np.ndarray, *, bgr: bool = False) -> list[np.ndarray]:
        """Several frames (a list, or an NxHxWx3 array); frames of one size go through the engine together.

        Returns a list of derained frames in input order; each equals ``derain(frame)``.
        """
        if isinstance(frames, np.ndarray):
            if frames.ndim != 4:
                raise UsageError(f"frames must be NxHxWx3 uint8 or a list of HxWx3 frames, got shape {frames.shape}")
            frames = list(frames)
        arrays = [_check_frame(f, f"frame {i}") for i, f in enumerate(frames)]
        out: list[np.ndarray | None] = [None] * len(arrays)
        groups: dict[tuple[int, int], list[int]] = {}
        for i, a in enumerate(arrays):
            groups.setdefault(a.shape[:2], []).append(i)
        for idx in groups.values():
            for j in range(0, len(idx), self._batch):
                chunk = idx[j:j + self._batch]
                for i, y in zip(chunk, self._derain_group(np.stack([arrays[i] for i in chunk]), bgr=bgr)):
                    out[i] = y
        return out  # type: ignore[return-value]

    def _derain_group(self, frames: np.ndarray, *, bgr: bool) -> np.ndarray:
        if bgr:
            frames = frames[..., ::-1]
        y = to_uint8(self.sample(to_float(frames)))
        return np.ascontiguousarray(y[..., ::-1]) if bgr else y

    # ------------------------------------------------------------------ arrays
    def sample(self, cond: np.ndarray) -> np.ndarray:
        """The sampler on float arrays: rainy frames [N, 3, H, W] float32 in [-1, 1] -> x_0 [N, 3, H, W] float32.

        x_0 is not clipped; ``derain`` quantises it. Any H, W (padded and cropped here). For a
        predict-and-refine model the prologue turns the (padded) frames into the step's condition
        [y, P(y)] first; with ``steps = 0`` the output is P(y).
        """
        if not isinstance(cond, np.ndarray) or cond.ndim != 4 or cond.shape[1] != 3:
            got = getattr(cond, "shape", type(cond).__name__)
            raise UsageError(f"cond must be a float32 array [N, 3, H, W], got {got}")
        cond = np.ascontiguousarray(cond, dtype=np.float32)
        n, _, h, w = cond.shape
        if n < 1 or h < 1 or w < 1:
            raise UsageError(f"cond is empty: {cond.shape}")
        hp, wp = self._padded_size(h, w)
        cond_p = pad_reflect(cond, hp, wp)
        crop = (h, w)
        with self._lock:
            noise = self._initial_noise(hp, wp)
            tile = self._tile_size(hp, wp)
            x_0 = np.empty_like(cond_p)
            # Each returns P(y) of its frames where the output keeps a share of the correction: kept of
            # the cropped frames here, once the engine's buffers of the frame are released.
            if tile is None:
                for j in range(0, n, self._batch):
                    est = self._sample_full(cond_p[j:j + self._batch], noise, x_0[j:j + self._batch])
                    if est is not None:
                        self._keep_share(x_0[j:j + self._batch], est, crop)
            else:
                for j, c in enumerate(cond_p):
                    est = self._sample_tiled(c, noise[0], tile, x_0[j])
                    if est is not None:
                        self._keep_share(x_0[j], est, crop)
        return np.ascontiguousarray(x_0[:, :, :h, :w])

    def _padded_size(self, h: int, w: int) -> tuple[int, int]:
        m = self.size_multiple
        hp, wp = -(-h // m) * m, -(-w // m) * m
        lim = self._backend.limits
        if lim is not None:  # a TensorRT profile has a minimum size too
            hp, wp = max(hp, lim.min_size[0]), max(wp, lim.min_size[1])
        return hp, wp

    def _tile_size(self, hp: int, wp: int) -> tuple[int, int] | None:
        if self._tile is not None:
            return (self._tile, self._tile)
        native = self.native_tile
        if native is not None:  # the model's own size: tile at it, whatever the engine's profile allows
            if hp > native or wp > native:
                if self._overlap >= native:
                    raise UsageError(f"overlap {self._overlap} must be smaller than the native tile {native}")
                return (native, native)
            return None
        # An engine's profile bounds what it accepts; onnxruntime accepts any shape, but frames
        # beyond the manifest's profile are tiled too, which bounds memory (the lowest-level
        # self-attention is quadratic in the pixel count) and keeps time per pixel flat.
        lim = self._backend.limits or self.manifest.step_descriptor.profile
        if hp > lim.max_size[0] or wp > lim.max_size[1]:
            if self._overlap >= min(lim.max_size):
                raise UsageError(f"overlap {self._overlap} must be smaller than the tile {min(lim.max_size)}")
            return lim.max_size
        return None

    def _initial_noise(self, hp: int, wp: int) -> np.ndarray:
        """x_T for one frame, [1, 3, Hp, Wp]; the same for every frame of that padded size (scaled by
        the noise scale; zeros at 0, without drawing)."""
        key = (hp, wp)
        noise = self._noise.get(key)
        if noise is None:
            noise = initial_noise((1, 3, hp, wp), self._seed, self._noise_scale)
            noise.flags.writeable = False
            self._noise[key] = noise
            while len(self._noise) > _NOISE_CACHE_SIZE:
                self._noise.popitem(last=False)
        else:
            self._noise.move_to_end(key)
        return noise

    def _set_condition(self, rainy: np.ndarray) -> None:
        """The bound cond buffer from rainy frames: the prologue's [y, P(y)], or y itself."""
        be = self._backend
        if be.has_prologue:
            be.set_rainy(rainy)
            be.run_prologue()
        else:
            be.set_cond(rainy)

    def _estimate(self, out: np.ndarray) -> None:
        """P(y) of the bound frames (the output at zero steps) into ``out`` [N, 3, H, W]."""
        be = self._backend
        cond = be.get_cond()
        np.copyto(out, cond[:, be.prologue_descriptor.estimate_channels])

    def _sample_full(self, cond_p: np.ndarray, noise: np.ndarray, out: np.ndarray) -> np.ndarray | None:
        """Frames that fit the engine: bind once per shape, S steps in the backend, copy out; returns
        their P(y) where the output keeps a share of the correction (``_keep_share``), else None."""
        be = self._backend
        n, _, hp, wp = cond_p.shape
        be.bind(n, hp, wp)
        self._set_condition(cond_p)
        if self._steps == 0:
            self._estimate(out)
            return None
        be.set_x(np.broadcast_to(noise, cond_p.shape))
        be.run()
        be.get_x(out)
        return be.get_cond()[:, be.prologue_descriptor.estimate_channels] if self._keeps_share else None

    def _keep_share(self, x_0: np.ndarray, estimate: np.ndarray, crop: tuple[int, int]) -> None:
        """The refine strength a (and low-pass sigma) of the correction, of the cropped frames [..., :H, :W]
        only (the padding is cropped away): x_0 <- P(y) + a * (G_sigma)(x_0 - P(y)), in place."""
        h, w = crop
        keep_correction(x_0[..., :h, :w], estimate[..., :h, :w], self._strength, self._lowpass)

    def _sample_tiled(self, cond_p: np.ndarray, noise: np.ndarray, tile: tuple[int, int],
                      out: np.ndarray) -> np.ndarray | None:
        """One frame [3, Hp, Wp] through overlapping tiles, blended into the canvas after every step,
        into ``out``. Where the output keeps a share of the correction it returns the frame's P(y):
        the whole-frame prologue's, or merged from the tiles into a buffer the loop no longer needs."""
        be = self._backend
        _, hp, wp = cond_p.shape
        key = (hp, wp, tile, self._overlap)
        blender = self._blenders.get(key)
        if blender is None:
            blender = self._blenders[key] = TileBlender(
                plan_tiles(hp, wp, tile, self._overlap, multiple=self.size_multiple))
        plan = blender.plan
        k = len(plan)
        b = min(self._batch, k)
        chunks = [list(range(j, min(j + b, k))) for j in range(0, k, b)]
        est = be.prologue_descriptor.estimate_channels if be.has_prologue else None
        whole = (be.frame_prologue(cond_p[None])[0]
                 if be.has_prologue and hp * wp <= FRAME_PROLOGUE_MAX_PIXELS else None)
        if whole is not None and self._steps == 0:  # P(y) of the whole frame is the output
            np.copyto(out, whole[est])
            return None
        shape = (b, 3, plan.tile_h, plan.tile_w)
        be.bind(b, plan.tile_h, plan.tile_w)
        tiles_in, tiles_out = np.zeros(shape, np.float32), np.zeros(shape, np.float32)
        rainy_tiles = np.zeros(shape, np.float32)
        conds = None  # each chunk's condition on the host, when the chunks take turns on the engine
        if whole is not None:  # P on the whole frame once; the tiles' conditions are cut from it
            cond_tiles = np.zeros((b, whole.shape[0], plan.tile_h, plan.tile_w), np.float32)
            conds = [blender.cut(whole, cond_tiles, chunk).copy() for chunk in chunks]
            if len(chunks) == 1:
                be.set_cond(conds[0])
        elif be.has_prologue and (len(chunks) > 1 or self._steps == 0):
            # The prologue runs once per tile; its [y, P(y)] tiles are kept for the steps.
            conds = []
            for chunk in chunks:
                self._set_condition(blender.cut(cond_p, rainy_tiles, chunk))
                conds.append(be.get_cond())
        elif len(chunks) == 1:  # every tile in one batch: the condition is computed / uploaded once
            self._set_condition(blender.cut(cond_p, rainy_tiles, chunks[0]))
        if self._steps == 0:  # the blended estimate P(y) of every tile
            self._merge_estimates(blender, chunks, conds, tiles_out, out)
            return None
        canvas = noise.copy()
        acc = np.zeros_like(canvas)
        for i in range(self._steps):
            acc.fill(0.0)
            for k, chunk in enumerate(chunks):
                if len(chunks) > 1:
                    if conds is not None:
                        be.set_cond(conds[k])
                    else:
                        be.set_cond(blender.cut(cond_p, rainy_tiles, chunk))
                be.set_x(blender.cut(canvas, tiles_in, chunk))
                be.run_step(i)
                be.get_x(tiles_out)
                blender.accumulate(tiles_out, chunk, acc)  # weights of every pixel sum to one
            canvas, acc = acc, canvas
        np.copyto(out, canvas)
        if not self._keeps_share:
            return None
        if whole is not None:
            return whole[est]
        self._merge_estimates(blender, chunks, conds, tiles_out, acc)
        return acc

    def _merge_estimates(self, blender: TileBlender, chunks: list[list[int]], conds: list[np.ndarray] | None,
                         tiles: np.ndarray, canvas: np.ndarray) -> None:
        """The tiles' P(y), blended into ``canvas`` [3, Hp, Wp] (conds: each chunk's condition; None:
        the engine's bound condition of the only chunk)."""
        est = self._backend.prologue_descriptor.estimate_channels
        canvas.fill(0.0)
        for chunk, cond in zip(chunks, conds if conds is not None else [self._backend.get_cond()]):
            np.copyto(tiles, cond[:, est])
            blender.accumulate(tiles, chunk, canvas)

    # ------------------------------------------------------------------ lifetime
    def close(self) -> None:
        with self._lock:
            self._backend.close()
            self._noise.clear()
            self._blenders.clear()

    def __enter__(self) -> Derainer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"Derainer({self.artifact.name!r}, backend={self.backend_name!r}, steps={self._steps}, "
                f"seed={self._seed}, tile={self._tile}, overlap={self._overlap}, batch={self._batch})")
