"""Calibration data for the fused DDIM step: its inputs recorded along real FP32 DDIM trajectories.

Activations of a diffusion model depend on the timestep (docs/ARCHITECTURE.md, calibration/), so a range
calibrated on one t clips another. We therefore record the step graph's own inputs
``(x_t, cond, t, coef)`` at **every** one of the S steps of Algorithm 2, for several real rainy
images, at a few frame sizes the engine's shape profile covers, by running the FP32 ONNX with
onnxruntime (no torch)::

    x_T = s * frame_noise(1, H, W, seed + k)           # k-th image, PCG64 (docs/ARCHITECTURE.md);
                                                       # s: the manifest's noise scale, as the runtime
    for i in 0..S-1:                                   # tau_S .. tau_1
        record (x_t, cond, t = tau_i, coef_i)
        x_t = step(x_t, cond, t, coef_i)               # the FP32 fused step itself

Images are cut at native resolution (a seeded crop; rain streaks keep the pixel scale the engine
sees in deployment) and only upscaled when smaller than the crop.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from runtime.descriptor import PrologueDescriptor, StepDescriptor
from runtime.errors import InputError, UsageError
from runtime.io import iter_image_files, load_rgb
from runtime.schedule import MIN_STEPS, DDIMSchedule, ScheduleConfig, frame_noise, sample_loop, steps_error

__all__ = [
    "CalibrationWarning",
    "ImageItem",
    "StepSample",
    "Trajectory",
    "FeedReader",
    "TrajectoryDataReader",
    "select_images",
    "calibration_sizes",
    "crop_to_size",
    "calibration_crop",
    "calibration_crops",
    "to_model_input",
    "from_model_output",
    "make_session",
    "prologue_fn",
    "run_ddim",
    "record_trajectories",
    "timestep_coverage",
]


class CalibrationWarning(UserWarning):
    """Something about the calibration data is worth knowing but not fatal (a skipped file, few images)."""


@dataclass(frozen=True)
class ImageItem:
    path: Path
    rgb: np.ndarray  # HxWx3 uint8


@dataclass
class StepSample:
    """The fused step's inputs at one step of one trajectory (what the calibrator feeds)."""

    x_t: np.ndarray  # [1, 3, H, W] float32
    cond: np.ndarray  # [1, C, H, W] float32 (shared by every step of a trajectory; not copied)
    t: np.ndarray  # [1] float32, the 1-based timestep tau_i
    coef: np.ndarray  # [1, 4] float32, (a, b, c, d)
    step: int  # 0 = the noisiest step
    image: int  # index of the trajectory

    def feed(self, descriptor: StepDescriptor) -> dict[str, np.ndarray]:
        d = descriptor
        return {d.X: self.x_t, d.COND: self.cond, d.T: self.t, d.COEF: self.coef}


@dataclass
class Trajectory:
    path: Path
    size: tuple[int, int]
    seed: int
    samples: list[StepSample]
    x_0: np.ndarray  # the FP32 result, [1, 3, H, W]


# ---------------------------------------------------------------------------------------- images
def select_images(folder: str | os.PathLike, *, calib_images: int, eval_images: int = 0,
                  seed: int = 0) -> tuple[list[ImageItem], list[ImageItem]]:
    """Pick ``calib_images`` readable images for calibration and up to ``eval_images`` others.

    Files are visited in a seeded random order; an unreadable file is skipped with a
    :class:`CalibrationWarning` naming it. A missing or empty folder, or one with no readable
    image, raises :class:`InputError` naming the folder. With too few images for both roles the
    held-out set shrinks first (never below one image while two or more are readable).
    """
    folder = Path(folder)
    if calib_images < 1:
        raise UsageError(f"calib_images must be >= 1, got {calib_images}")
    if eval_images < 0:
        raise UsageError(f"eval_images must be >= 0, got {eval_images}")
    if not folder.exists():
        raise InputError(f"calibration folder {folder} does not exist")
    if not folder.is_dir():
        raise InputError(f"calibration folder {folder} is not a directory")
    files = iter_image_files(folder)
    if not files:
        raise InputError(
            f"calibration folder {folder} holds no image files (looked for "
            f".png/.jpg/.jpeg/.bmp/.tif/.tiff/.webp/.ppm/.pgm); point --calib at real rainy photos"
        )
    order = np.random.Generator(np.random.PCG64(seed)).permutation(len(files))
    want = calib_images + eval_images
    items: list[ImageItem] = []
    for idx in order:
        if len(items) == want:
            break
        path = files[int(idx)]
        try:
            items.append(ImageItem(path, load_rgb(path)))
        except InputError as e:  # ImageError included: corrupt, truncated, unreadable
            warnings.warn(f"skipping unreadable calibration image: {e}", CalibrationWarning, stacklevel=2)
    if not items:
        raise InputError(f"calibration folder {folder}: none of its {len(files)} image files could be read")
    if len(items) >= want:
        return items[:calib_images], items[calib_images:want]
    n_eval = min(eval_images, max(len(items) - calib_images, 1 if len(items) >= 2 and eval_images else 0))
    n_calib = len(items) - n_eval
    warnings.warn(
        f"calibration folder {folder}: only {len(items)} readable images; calibrating on {n_calib} "
        f"(asked for {calib_images}) and holding out {n_eval} (asked for {eval_images})",
        CalibrationWarning, stacklevel=2,
    )
    return items[:n_calib], items[n_calib:]


def calibration_sizes(descriptor: StepDescriptor,
                      sizes: Sequence[int | tuple[int, int]] | None = None) -> list[tuple[int, int]]:
    """Frame sizes (H, W) to calibrate at; each a multiple of the size multiple inside the profile.

    Default: the profile's opt size and half of it (when the profile allows it), so both the
    size engines are tuned for and a smaller one are covered.
    """
    prof, m = descriptor.profile, descriptor.size_multiple
    if sizes is None:
        oh, ow = prof.opt_size
        sizes = [(oh, ow)]
        half = (oh // 2 // m * m, ow // 2 // m * m)
        if half[0] >= prof.min_size[0] and half[1] >= prof.min_size[1] and min(half) > 0:
            sizes.append(half)
    out: list[tuple[int, int]] = []
    for s in sizes:
        h, w = (int(s), int(s)) if isinstance(s, (int, np.integer)) else (int(s[0]), int(s[1]))
        if h % m or w % m:
            raise UsageError(f"calibration size {h}x{w} is not a multiple of the model's size multiple {m}")
        if not prof.fits(prof.min_batch, h, w):
            raise UsageError(
                f"calibration size {h}x{w} is outside the shape profile "
                f"{prof.min_size[0]}x{prof.min_size[1]}..{prof.max_size[0]}x{prof.max_size[1]}"
            )
        if (h, w) not in out:
            out.append((h, w))
    if not out:
        raise UsageError("calibration needs at least one frame size")
    return out


def crop_to_size(rgb: np.ndarray, size: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """A seeded HxW crop at native resolution; images smaller than the crop are upscaled first."""
    from PIL import Image

    h, w = size
    ih, iw = rgb.shape[:2]
    if ih < h or iw < w:
        scale = max(h / ih, w / iw)
        nh, nw = max(h, math.ceil(ih * scale)), max(w, math.ceil(iw * scale))
        rgb = np.asarray(Image.fromarray(rgb).resize((nw, nh), Image.Resampling.BICUBIC))
        ih, iw = nh, nw
    top = int(rng.integers(0, ih - h + 1))
    left = int(rng.integers(0, iw - w + 1))
    return np.ascontiguousarray(rgb[top:top + h, left:left + w])


def calibration_crop(item: ImageItem, size: tuple[int, int], seed: int) -> np.ndarray:
    """The model input of one calibration image: its crop seeded by ``seed``, [1, 3, H, W] float32."""
    return to_model_input(crop_to_size(item.rgb, size, np.random.Generator(np.random.PCG64(seed))))


def calibration_crops(images: Sequence[ImageItem], sizes: Sequence[tuple[int, int]],
                      seed: int = 0) -> list[np.ndarray]:
    """The crops :func:`record_trajectories` samples (image k at ``sizes[k % len(sizes)]``, seed + k)."""
    return [calibration_crop(item, tuple(sizes[k % len(sizes)]), seed + k) for k, item in enumerate(images)]


def to_model_input(rgb: np.ndarray) -> np.ndarray:
    """HxWx3 uint8 -> [1, 3, H, W] float32 in [-1, 1] (CONTRACTS.md pixel convention)."""
    x = rgb.astype(np.float32) / 127.5 - 1.0
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None])


def from_model_output(x: np.ndarray) -> np.ndarray:
    """[1, 3, H, W] float32 in [-1, 1] -> HxWx3 uint8: round((x + 1) * 127.5), clipped."""
    y = np.clip(np.round((x[0].transpose(1, 2, 0) + 1.0) * 127.5), 0, 255)
    return y.astype(np.uint8)


# ---------------------------------------------------------------------------------------- DDIM loop
def make_session(model: str | os.PathLike | bytes, *, threads: int | None = None, reference: bool = False):
    """A CPU onnxruntime session from the runtime's one factory
    (``runtime.backends.onnxruntime.make_session``), optimisation level ALL like the backend.

    ``reference=True`` turns graph optimisations off: QuantizeLinear / DequantizeLinear then run
    as written around FP32 kernels, i.e. the exact Q/DQ semantics a Q/DQ graph defines (what
    TensorRT executes), free of any CPU kernel's integer arithmetic. ``model`` may be a path or
    a serialised in-memory graph.
    """
    from runtime.backends.onnxruntime import make_session as runtime_session

    return runtime_session(model, threads=threads, optimization="disabled" if reference else "all", quiet=True)


def prologue_fn(session) -> Callable[[np.ndarray], np.ndarray]:
    """rainy [N, 3, H, W] -> cond [N, 6, H, W] through an open prologue session."""
    d = PrologueDescriptor

    def run(rainy: np.ndarray) -> np.ndarray:
        return session.run([d.OUT], {d.RAINY: np.ascontiguousarray(rainy, dtype=np.float32)})[0]

    return run


def run_ddim(session, cond: np.ndarray, *, schedule: DDIMSchedule, steps: int, seed: int,
             descriptor: StepDescriptor, record: list[StepSample] | None = None,
             image: int = 0, noise_scale: float = 1.0) -> np.ndarray:
    """Algorithm 2 with the fused step on onnxruntime (``runtime.schedule.sample_loop``); appends
    each step's inputs to ``record``. ``cond`` is the step's condition (the prologue's, for a
    predict-and-refine model); x_T is the runtime's ``frame_noise`` times ``noise_scale`` (the
    manifest's ``prologue.noise_scale``, as the runtime draws it)."""
    d = descriptor
    schedule.set_timesteps(steps)
    n, _, h, w = cond.shape

    def step(x_t: np.ndarray, c: np.ndarray, t: np.ndarray, coef: np.ndarray) -> np.ndarray:
        # 3-4: eps_hat = eps_theta(x_t, cond, t); x_next = c (a x_t - b eps_hat) + d eps_hat
        return session.run([d.OUT], {d.X: x_t, d.COND: c, d.T: t, d.COEF: coef})[0]

    def on_step(i: int, x_t: np.ndarray, t: np.ndarray, coef: np.ndarray) -> None:
        record.append(StepSample(x_t=x_t, cond=cond, t=t, coef=coef, step=i, image=image))

    return sample_loop(step, frame_noise(n, h, w, seed, noise_scale), cond, schedule,
                       on_step=on_step if record is not None else None)


def record_trajectories(model: str | os.PathLike, images: Sequence[ImageItem], *,
                        descriptor: StepDescriptor, schedule_config: ScheduleConfig, steps: int | Sequence[int],
                        sizes: Sequence[tuple[int, int]], seed: int = 0,
                        threads: int | None = None,
                        prologue: Callable[[np.ndarray], np.ndarray] | None = None,
                        noise_scale: float = 1.0) -> list[Trajectory]:
    """Run the FP32 step graph along a full DDIM trajectory per image, recording every step.

    Image k is cut to ``sizes[k % len(sizes)]`` with a crop seeded by ``seed + k`` and sampled
    from x_T = ``noise_scale * frame_noise(.., seed + k)``. ``steps`` is one step count or several: each image
    is then sampled once per count, so every timestep of every count users run is calibrated.
    ``prologue`` (predict-and-refine) turns a rainy crop into the step's condition.
    """
    counts = [int(steps)] if isinstance(steps, (int, np.integer)) else [int(s) for s in steps]
    for s in counts:
        if s < MIN_STEPS:
            raise UsageError(steps_error(s))
    session = make_session(model, threads=threads)
    schedule = DDIMSchedule(schedule_config)
    out = []
    for k, item in enumerate(images):
        size = tuple(sizes[k % len(sizes)])
        rainy = calibration_crop(item, size, seed + k)
        cond = prologue(rainy) if prologue is not None else rainy
        for s in counts:
            record: list[StepSample] = []
            x_0 = run_ddim(session, cond, schedule=schedule, steps=s, seed=seed + k,
                           descriptor=descriptor, record=record, image=k, noise_scale=noise_scale)
            out.append(Trajectory(path=item.path, size=size, seed=seed + k, samples=record, x_0=x_0))
    return out


def timestep_coverage(trajectories: Sequence[Trajectory]) -> dict[int, int]:
    """How many recorded samples each timestep has: {tau: count}."""
    counts: dict[int, int] = {}
    for traj in trajectories:
        for s in traj.samples:
            tau = round(float(s.t[0]))
            counts[tau] = counts.get(tau, 0) + 1
    return dict(sorted(counts.items(), reverse=True))


# ---------------------------------------------------------------------------------------- reader
class FeedReader:
    """onnxruntime ``CalibrationDataReader`` over a list of input feeds (rewindable, sliceable).

    Duck-types ``onnxruntime.quantization.CalibrationDataReader`` (its ``__subclasshook__``
    accepts any object with ``get_next``), so importing this module does not import onnxruntime.
    Used directly for the predict-and-refine prologue (feeds of rainy crops).
    """

    def __init__(self, feeds: Sequence[dict[str, np.ndarray]]) -> None:
        if not feeds:
            raise UsageError("no calibration samples were recorded")
        self.feeds = list(feeds)
        self._start, self._end = 0, len(self.feeds)
        self._it: Iterator[dict[str, np.ndarray]] = iter(())
        self.rewind()

    def _shape(self, i: int) -> tuple[int, ...]:
        return next(iter(self.feeds[i].values())).shape

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = iter(self.feeds[self._start:self._end])

    def set_range(self, start_index: int, end_index: int) -> None:
        self._start, self._end = int(start_index), min(int(end_index), len(self.feeds))
        self.rewind()

    def __len__(self) -> int:
        return len(self.feeds)

    def chunks(self, size: int) -> list[tuple[int, int]]:
        """(start, end) ranges of at most ``size`` consecutive feeds of one frame shape each.

        onnxruntime's histogram calibrators stack a chunk's tensors, so a chunk must not mix shapes.
        """
        out: list[tuple[int, int]] = []
        start = 0
        for i in range(1, len(self.feeds) + 1):
            if i == len(self.feeds) or i - start == size or self._shape(i) != self._shape(start):
                out.append((start, i))
                start = i
        return out

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        feed = self.get_next()
        if feed is None:
            raise StopIteration
        return feed


class TrajectoryDataReader(FeedReader):
    """A :class:`FeedReader` over recorded step samples (the fused step's calibration data)."""

    def __init__(self, samples: Sequence[StepSample], descriptor: StepDescriptor) -> None:
        if not samples:
            raise UsageError("no calibration samples were recorded")
        self.samples = list(samples)
        self.descriptor = descriptor
        super().__init__([s.feed(descriptor) for s in self.samples])

    @classmethod
    def from_trajectories(cls, trajectories: Sequence[Trajectory], descriptor: StepDescriptor
                          ) -> TrajectoryDataReader:
        return cls([s for traj in trajectories for s in traj.samples], descriptor)
