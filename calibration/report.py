"""What INT8 costs and buys: quality against FP32 on held-out images, and CPU latency.

Quality is end to end: the full S-step DDIM trajectory of the INT8 graph from the same x_T as
the FP32 one (``initial_noise(shape, seed)``), on images **not** used for calibration, compared
as images (clipped to [-1, 1]; PSNR with peak 2, and Y-channel PSNR of the uint8 frames, the
metric deraining papers use). A per-step view (each step fed the FP32 trajectory's inputs)
shows where along t the error comes from.

Latency runs the whole S-step loop per frame, FP32 in one block then INT8 in one block (not
interleaved, so neither warms the other's caches), with the runtime's session settings.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from calibration.collect import StepSample, from_model_output, make_session, run_ddim
from runtime.descriptor import StepDescriptor
from runtime.metrics import psnr_y
from runtime.schedule import DDIMSchedule, ScheduleConfig, initial_noise

__all__ = ["psnr_float", "ImageQuality", "QualityReport", "compare_quality", "step_psnr", "measure_latency",
           "compare_latency", "format_report"]


def psnr_float(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR (dB) of two [-1, 1] images after clipping, peak 2 (the range's width)."""
    a = np.clip(a.astype(np.float64), -1.0, 1.0)
    b = np.clip(b.astype(np.float64), -1.0, 1.0)
    mse = float(np.mean((a - b) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(4.0 / mse)


@dataclass
class ImageQuality:
    name: str
    size: tuple[int, int]
    psnr_db: float  # INT8 vs FP32, peak 2 on clipped [-1, 1]
    psnr_y_db: float  # INT8 vs FP32 on the uint8 frames' Y channel


@dataclass
class QualityReport:
    images: list[ImageQuality] = field(default_factory=list)
    held_out: bool = True

    @property
    def mean_psnr_db(self) -> float:
        return _finite_mean([q.psnr_db for q in self.images])

    @property
    def min_psnr_db(self) -> float:
        return min(q.psnr_db for q in self.images)

    @property
    def mean_psnr_y_db(self) -> float:
        return _finite_mean([q.psnr_y_db for q in self.images])

    def to_dict(self) -> dict:
        return {
            "held_out": self.held_out,
            "images": len(self.images),
            "psnr_db_mean": _round(self.mean_psnr_db),
            "psnr_db_min": _round(self.min_psnr_db),
            "psnr_y_db_mean": _round(self.mean_psnr_y_db),
            "per_image": [dict(asdict(q), size=list(q.size), psnr_db=_round(q.psnr_db), psnr_y_db=_round(q.psnr_y_db))
                          for q in self.images],
        }


def _finite_mean(values: Sequence[float]) -> float:
    """Mean PSNR where identical images (inf) count as 99 dB, so one exact image does not make it inf."""
    return float(np.mean([min(v, 99.0) for v in values]))


def _round(v: float) -> float | None:
    return None if not math.isfinite(v) else round(float(v), 3)


def compare_quality(fp32_model, int8_model, conds: Sequence[tuple[str, np.ndarray]], *,
                    descriptor: StepDescriptor, schedule_config: ScheduleConfig, steps: int, seed: int = 0,
                    threads: int | None = None, held_out: bool = True,
                    prologues: tuple[Callable, Callable] | None = None, noise_scale: float = 1.0) -> QualityReport:
    """End-to-end INT8 vs FP32 on ``conds`` ((name, [1, 3, H, W] float32) pairs); image k uses seed + k
    (x_T scaled by ``noise_scale``, the manifest's, as the runtime draws it).

    ``prologues`` (predict-and-refine): (FP32 prologue, INT8 prologue) as numpy functions; ``conds``
    are then the rainy crops and each side conditions its steps on its own prologue's output.
    """
    s32 = fp32_model if hasattr(fp32_model, "run") else make_session(fp32_model, threads=threads)
    s8 = int8_model if hasattr(int8_model, "run") else make_session(int8_model, threads=threads)
    schedule = DDIMSchedule(schedule_config)
    report = QualityReport(held_out=held_out)
    for k, (name, cond) in enumerate(conds):
        c32, c8 = (cond, cond) if prologues is None else (prologues[0](cond), prologues[1](cond))
        a = run_ddim(s32, c32, schedule=schedule, steps=steps, seed=seed + k, descriptor=descriptor,
                     noise_scale=noise_scale)
        b = run_ddim(s8, c8, schedule=schedule, steps=steps, seed=seed + k, descriptor=descriptor,
                     noise_scale=noise_scale)
        report.images.append(ImageQuality(name=name, size=(int(cond.shape[2]), int(cond.shape[3])),
                                          psnr_db=psnr_float(a, b),
                                          psnr_y_db=psnr_y(from_model_output(a), from_model_output(b))))
    return report


def step_psnr(fp32_model, int8_model, samples: Sequence[StepSample], *, descriptor: StepDescriptor,
              threads: int | None = None) -> dict[int, float]:
    """Per timestep: PSNR (peak 2, unclipped) of the INT8 step's x_next vs FP32's on the same inputs."""
    s32 = fp32_model if hasattr(fp32_model, "run") else make_session(fp32_model, threads=threads)
    s8 = int8_model if hasattr(int8_model, "run") else make_session(int8_model, threads=threads)
    sq_err: dict[int, list[float]] = {}
    for s in samples:
        feed = s.feed(descriptor)
        (a,) = s32.run([descriptor.OUT], feed)
        (b,) = s8.run([descriptor.OUT], feed)
        sq_err.setdefault(round(float(s.t[0])), []).append(float(np.mean((a.astype(np.float64) - b) ** 2)))
    return {tau: (math.inf if np.mean(v) == 0 else 10.0 * math.log10(4.0 / float(np.mean(v))))
            for tau, v in sorted(sq_err.items(), reverse=True)}


def measure_latency(model, *, size: tuple[int, int], steps: int, descriptor: StepDescriptor,
                    schedule_config: ScheduleConfig | None = None, repeats: int = 5, warmup: int = 1,
                    threads: int | None = None, seed: int = 0) -> dict:
    """Seconds per frame (the whole S-step loop) of one model (a path or an open session)."""
    session = model if hasattr(model, "run") else make_session(model, threads=threads)
    schedule = DDIMSchedule(schedule_config or ScheduleConfig())
    cond = np.clip(initial_noise((1, descriptor.cond_channels, *size), seed + 1) * 0.5, -1, 1)
    for _ in range(warmup):
        run_ddim(session, cond, schedule=schedule, steps=steps, seed=seed, descriptor=descriptor)
    times, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        run_ddim(session, cond, schedule=schedule, steps=steps, seed=seed, descriptor=descriptor)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    # cpu_s (process CPU time) is what to compare on a shared machine: other processes stealing
    # the cores inflate wall time but not it (with threads=1 it is the compute itself)
    return {"median_s": statistics.median(times), "min_s": min(times), "cpu_s": statistics.median(cpu),
            "repeats": repeats}


def compare_latency(models: dict, *, size: tuple[int, int], steps: int,
                    descriptor: StepDescriptor, schedule_config: ScheduleConfig | None = None, repeats: int = 5,
                    warmup: int = 1, threads: int | None = None) -> dict:
    """Latency of several models (paths or sessions) in one run, one block each, in order (FP32 first).

    ``speedup`` of each model is the first model's median over its own (> 1 = faster);
    ``cpu_speedup`` the same for process CPU time.
    """
    out: dict = {"size": list(size), "steps": steps, "threads": threads or os.cpu_count(), "models": {}}
    base = None
    for name, path in models.items():
        r = measure_latency(path, size=size, steps=steps, descriptor=descriptor, schedule_config=schedule_config,
                            repeats=repeats, warmup=warmup, threads=threads)
        base = (r["median_s"], r["cpu_s"]) if base is None else base
        r["speedup"] = base[0] / r["median_s"]
        r["cpu_speedup"] = base[1] / r["cpu_s"] if r["cpu_s"] > 0 else None
        out["models"][name] = {k: (round(v, 5) if isinstance(v, float) else v) for k, v in r.items()}
    return out


def format_report(calibration: dict) -> str:
    """A few human lines from the manifest's ``calibration`` dict."""
    lines = []
    q = calibration.get("quality", {})
    if q:
        lines.append(
            f"INT8 vs FP32 end to end on {q.get('images')} {'held-out' if q.get('held_out') else 'calibration'} "
            f"images: PSNR {q.get('psnr_db_mean')} dB mean, {q.get('psnr_db_min')} dB min "
            f"(Y channel {q.get('psnr_y_db_mean')} dB)"
        )
    lat = calibration.get("latency")
    if lat:
        parts = [f"{name} {m['median_s'] * 1000:.1f} ms ({m['speedup']:.2f}x)" for name, m in lat["models"].items()]
        lines.append(f"CPU latency per frame at {lat['size'][0]}x{lat['size'][1]}, {lat['steps']} steps, "
                     f"{lat['threads']} threads: " + ", ".join(parts))
    if calibration.get("fp32_nodes"):
        lines.append(f"kept FP32: {len(calibration['fp32_nodes'])} quantizable nodes")
    return "\n".join(lines)
