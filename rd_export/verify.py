"""Verification of exported step graphs: per-step error and end-to-end PSNR.

An artifact counts as done only after it computes what its reference computes:

- FP32 ONNX vs the torch EMA estimator (``training.diffusion.ddim_sample``, the reference
  sampler): the fused step's max |error| at high, middle and low t on the torch trajectory's own
  inputs (plus one batch-2 non-square shape, proving the dynamic axes), and the PSNR of the
  derained image when the same DDIM loop (same cond, seed, initial noise) is driven by the ONNX
  step instead of torch.
- FP16 (and later INT8) ONNX vs the verified FP32 ONNX, both through onnxruntime.

PSNR here is on the float image in [-1, 1] (clipped, peak-to-peak 2), not on uint8: it
resolves differences far below one grey level. Identical outputs report ``PSNR_CAP``.

numpy + onnxruntime at module level; torch only inside :func:`compare_to_torch`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from runtime.descriptor import PrologueDescriptor, StepDescriptor
from runtime.errors import VerificationError
from runtime.schedule import DDIMSchedule, ScheduleConfig, frame_noise, initial_noise, sample_loop

__all__ = [
    "PSNR_CAP",
    "StepFn",
    "OnnxStep",
    "OnnxPrologue",
    "psnr",
    "verification_cond",
    "sample",
    "step_points",
    "compare_to_torch",
    "compare_onnx",
    "check_report",
]

#: PSNR reported for bit-identical outputs (keeps the manifest finite JSON).
PSNR_CAP = 200.0
StepFn = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray], np.ndarray]


class OnnxStep:
    """The fused step as a numpy function through an onnxruntime session (CPU by default)."""

    def __init__(self, path: str | os.PathLike, *, device: str = "cpu", threads: int | None = None) -> None:
        from runtime.backends.onnxruntime import make_session

        self.session = make_session(path, device=device, threads=threads, quiet=True)
        self.path = Path(path)

    def __call__(self, x_t: np.ndarray, cond: np.ndarray, t: np.ndarray, coef: np.ndarray) -> np.ndarray:
        d = StepDescriptor
        feeds = {d.X: x_t, d.COND: cond, d.T: t, d.COEF: coef}
        return self.session.run([d.OUT], {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in feeds.items()})[0]


class OnnxPrologue:
    """The prologue graph (rainy y -> cond = [y, P(y)]) as a numpy function through onnxruntime."""

    def __init__(self, path: str | os.PathLike, *, threads: int | None = None) -> None:
        from runtime.backends.onnxruntime import make_session

        self.session = make_session(path, threads=threads, quiet=True)
        self.path = Path(path)

    def __call__(self, rainy: np.ndarray) -> np.ndarray:
        d = PrologueDescriptor
        return self.session.run([d.OUT], {d.RAINY: np.ascontiguousarray(rainy, dtype=np.float32)})[0]


def psnr(a: np.ndarray, b: np.ndarray, *, data_range: float = 2.0) -> float:
    """PSNR (dB) of two images in [-1, 1] after clipping; ``PSNR_CAP`` when identical."""
    a = np.clip(np.asarray(a, dtype=np.float64), -1.0, 1.0)
    b = np.clip(np.asarray(b, dtype=np.float64), -1.0, 1.0)
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        return float("nan")
    mse = float(np.mean((a - b) ** 2))
    if mse == 0.0:
        return PSNR_CAP
    return min(PSNR_CAP, 10.0 * math.log10(data_range**2 / mse))


def verification_cond(batch: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """A deterministic synthetic rainy image [N, 3, H, W] in [-1, 1].

    Smooth colour gradients (a scene) plus thin bright slanted streaks (rain) plus a little
    noise: structured enough that a wrong resize/pooling/attention shows, and independent of
    any data folder (the package must verify without shared data).
    """
    rng = np.random.Generator(np.random.PCG64(seed + 7919))
    yy, xx = np.meshgrid(np.linspace(0, 1, height), np.linspace(0, 1, width), indexing="ij")
    out = np.empty((batch, 3, height, width), dtype=np.float32)
    for n in range(batch):
        phase = rng.uniform(0, 2 * np.pi, size=3)
        scene = np.stack([0.5 + 0.35 * np.sin(2 * np.pi * (xx * (1 + c) + yy * (2 - c)) + phase[c])
                          for c in range(3)])
        streaks = ((np.floor((xx * width + 0.35 * yy * height) / 3).astype(int) * 7919 + n) % 11 == 0)
        img = np.clip(scene + 0.35 * streaks[None] + 0.02 * rng.standard_normal((3, height, width)), 0, 1)
        out[n] = (img * 2.0 - 1.0).astype(np.float32)
    return out


def sample(step: StepFn, cond: np.ndarray, *, steps: int, seed: int,
           schedule_config: ScheduleConfig | None = None, record: bool = False):
    """Algorithm 2 (eta = 0) driven by ``step``: x_T = ``frame_noise`` (the runtime's draw), S steps.

    ``cond`` is the step's condition, already a multiple of the model's size multiple (the torch
    reference pads; here padding would be the runtime's job). The loop is
    :func:`runtime.schedule.sample_loop`. Returns x_0, or (x_0, trajectory) with the per-step
    inputs when ``record``.
    """
    sched = DDIMSchedule(schedule_config or ScheduleConfig())
    sched.set_timesteps(steps)
    n, _, h, w = cond.shape
    trajectory: list[dict] = []

    def on_step(i: int, x_t: np.ndarray, t: np.ndarray, coef: np.ndarray) -> None:
        trajectory.append({"x_t": x_t, "cond": cond, "t": t, "coef": coef})

    x_0 = sample_loop(step, frame_noise(n, h, w, seed), cond, sched, on_step=on_step if record else None)
    return (x_0, trajectory) if record else x_0


def step_points(steps: int) -> dict[str, int]:
    """Trajectory indices checked per step: high t (first step), middle, low t (last step)."""
    return {"high": 0, "middle": steps // 2, "low": steps - 1}


def _finite(x: np.ndarray) -> bool:
    return bool(np.isfinite(x).all())


def _per_step(candidate: StepFn, reference: StepFn | None, trajectory: list[dict],
              ref_outputs: dict[int, np.ndarray] | None = None) -> tuple[list[dict], bool]:
    rows, finite = [], True
    for label, i in step_points(len(trajectory)).items():
        inp = trajectory[i]
        got = candidate(inp["x_t"], inp["cond"], inp["t"], inp["coef"])
        want = ref_outputs[i] if ref_outputs is not None else reference(inp["x_t"], inp["cond"], inp["t"], inp["coef"])
        finite &= _finite(got)
        err = _max_abs(got, want)
        rows.append({"at": label, "t": int(inp["t"][0]), "max_abs": err})
    return rows, finite


def _max_abs(a: np.ndarray, b: np.ndarray) -> float:
    """Unclipped max |a - b| of the final x_0 (PSNR clips to the image range; this does not)."""
    if not (_finite(a) and _finite(b)):
        return float("inf")
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max())


def _summary(rows: list[dict]) -> float:
    return max(r["max_abs"] for r in rows)


def compare_to_torch(onnx_path: str | os.PathLike, estimator, *, steps: int = 10, seed: int = 0,
                     size: tuple[int, int] = (64, 64), batch: int = 1,
                     schedule_config: ScheduleConfig | None = None,
                     extra_shapes: Sequence[tuple[int, int, int]] = (),
                     cond: np.ndarray | None = None, candidate: StepFn | None = None,
                     prologue=None, prologue_candidate: Callable[[np.ndarray], np.ndarray] | None = None) -> dict:
    """Verify an ONNX step (or any ``candidate`` step) against the torch estimator.

    Reference: ``training.diffusion.ddim_sample(estimator, cond, steps=S, seed=seed,
    return_trajectory=True)``. Per-step errors use the reference trajectory's own inputs at
    high/middle/low t; ``extra_shapes`` ((batch, H, W), e.g. batch 2 non-square) get one
    middle-t step each on fresh noise. End to end: the same loop driven by the candidate.

    Predict-and-refine: ``prologue`` is the torch prologue (y -> [y, P(y)]) and ``cond`` (or the
    synthetic verification image) is the rainy y; the reference condition is the torch
    prologue's. ``prologue_candidate`` (the exported prologue as a numpy function) is checked
    against it at every shape (``prologue_max_abs``), and the end-to-end loop then runs on the
    candidate's own condition: both exported graphs against both torch modules.
    """
    import torch

    from training.diffusion import ddim_sample
    from training.multiscale import fused_step

    step = candidate or OnnxStep(onnx_path)
    if cond is None:
        cond = verification_cond(batch, size[0], size[1], seed)
    cond = np.ascontiguousarray(cond, dtype=np.float32)
    estimator = estimator.eval()
    pro_rows: list[dict] = []

    def make_cond(rainy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(reference condition, candidate condition) of a rainy batch."""
        if prologue is None:
            return rainy, rainy
        with torch.no_grad():
            ref = prologue.eval()(torch.from_numpy(rainy)).numpy()
        if prologue_candidate is None:
            return ref, ref
        got = prologue_candidate(rainy)
        pro_rows.append({"shape": list(rainy.shape), "max_abs": _max_abs(got, ref)})
        return ref, got

    rainy = cond
    cond, cand_cond = make_cond(rainy)

    def torch_step(x_t, c, t, coef):
        with torch.no_grad():
            out = fused_step(estimator, torch.from_numpy(x_t), torch.from_numpy(c), torch.from_numpy(t),
                             torch.from_numpy(coef))
        return out.numpy()

    ref_x0, traj = ddim_sample(estimator, torch.from_numpy(rainy), steps=steps, seed=seed,
                               schedule_config=schedule_config, return_trajectory=True,
                               prologue=None if prologue is None else prologue.eval())
    ref_x0 = ref_x0.numpy()
    # Reference outputs of the checked steps: the next trajectory entry's x_t (x_0 for the last).
    ref_out = {i: (traj[i + 1]["x_t"] if i + 1 < len(traj) else ref_x0) for i in step_points(steps).values()}
    rows, finite = _per_step(step, None, traj, ref_out)

    shape_rows = []
    mid_t_idx = step_points(steps)["middle"]
    for k, (b, h, w) in enumerate(extra_shapes):
        c, _ = make_cond(verification_cond(b, h, w, seed + 1 + k))
        inp = {"x_t": initial_noise((b, 3, h, w), seed + 1 + k), "cond": c,
               "t": np.repeat(traj[mid_t_idx]["t"][:1], b), "coef": np.repeat(traj[mid_t_idx]["coef"][:1], b, axis=0)}
        got = step(inp["x_t"], inp["cond"], inp["t"], inp["coef"])
        want = torch_step(inp["x_t"], inp["cond"], inp["t"], inp["coef"])
        finite &= _finite(got)
        shape_rows.append({"shape": [b, 3, h, w], "t": int(inp["t"][0]),
                           "max_abs": _max_abs(got, want)})

    x0 = sample(step, cand_cond, steps=steps, seed=seed, schedule_config=schedule_config)
    finite &= _finite(x0)
    report = {
        "reference": "torch",
        "steps": steps,
        "seed": seed,
        "shape": list(cond.shape),
        "per_step": rows,
        "shapes": shape_rows,
        "per_step_max_abs": max([_summary(rows)] + [r["max_abs"] for r in shape_rows]),
        "psnr_db": psnr(x0, ref_x0),
        "x0_max_abs": _max_abs(x0, ref_x0),
        "finite": finite,
    }
    if pro_rows:
        report["prologue"] = pro_rows
        report["prologue_max_abs"] = max(r["max_abs"] for r in pro_rows)
    return report


def compare_onnx(candidate: str | os.PathLike | StepFn, reference: str | os.PathLike | StepFn, *,
                 steps: int = 10, seed: int = 0, size: tuple[int, int] = (64, 64), batch: int = 1,
                 schedule_config: ScheduleConfig | None = None, cond: np.ndarray | None = None,
                 check_every_step: bool = True, reference_prologue=None, candidate_prologue=None) -> dict:
    """Verify a derived artifact (FP16, INT8) against the FP32 ONNX, both via onnxruntime.

    Per-step errors at high/middle/low t on the reference trajectory's inputs; end-to-end PSNR
    of the two loops; ``finite`` is False if any step of the candidate's own loop produced NaN or
    Inf (checked at every step when ``check_every_step``).

    Predict-and-refine: ``cond`` (or the synthetic image) is the rainy y and each side computes its
    condition with its own prologue (paths or numpy functions; the candidate falls back to the
    reference's): the end-to-end PSNR covers both graphs, ``prologue_psnr_db`` the estimates P(y).
    """
    cand = candidate if callable(candidate) else OnnxStep(candidate)
    ref = reference if callable(reference) else OnnxStep(reference)
    if cond is None:
        cond = verification_cond(batch, size[0], size[1], seed)
    cond = np.ascontiguousarray(cond, dtype=np.float32)
    cand_cond = cond
    pro_psnr = None
    if reference_prologue is not None:
        ref_pro = reference_prologue if callable(reference_prologue) else OnnxPrologue(reference_prologue)
        cand_pro = ref_pro if candidate_prologue is None else (
            candidate_prologue if callable(candidate_prologue) else OnnxPrologue(candidate_prologue))
        rainy = cond
        cond = ref_pro(rainy)
        cand_cond = cond if cand_pro is ref_pro else cand_pro(rainy)
        pro_psnr = psnr(cand_cond[:, 3:], cond[:, 3:])
    ref_x0, traj = sample(ref, cond, steps=steps, seed=seed, schedule_config=schedule_config, record=True)
    ref_out = {i: (traj[i + 1]["x_t"] if i + 1 < len(traj) else ref_x0) for i in step_points(steps).values()}
    rows, finite = _per_step(cand, None, traj, ref_out)

    nonfinite_steps: list[int] = []

    def watched(x_t, c, t, coef):
        out = cand(x_t, c, t, coef)
        if check_every_step and not _finite(out):
            nonfinite_steps.append(int(t[0]))
        return out

    x0 = sample(watched, cand_cond, steps=steps, seed=seed, schedule_config=schedule_config)
    finite = finite and not nonfinite_steps and _finite(x0) and _finite(cand_cond)
    extra = {} if pro_psnr is None else {"prologue_psnr_db": pro_psnr}
    return {
        **extra,
        "reference": "fp32",
        "steps": steps,
        "seed": seed,
        "shape": list(cond.shape),
        "per_step": rows,
        "per_step_max_abs": _summary(rows),
        "psnr_db": psnr(x0, ref_x0),
        "x0_max_abs": _max_abs(x0, ref_x0),
        "finite": finite,
        "nonfinite_at_t": nonfinite_steps,
    }


def check_report(report: dict, *, min_psnr_db: float, max_step_abs: float | None, what: str) -> dict:
    """Attach thresholds + ``passed``; raise VerificationError naming the failing number."""
    report = dict(report)
    report["thresholds"] = {"psnr_db": min_psnr_db, "per_step_max_abs": max_step_abs}
    problems = []
    if not report.get("finite", True):
        at = report.get("nonfinite_at_t")
        problems.append("NaN/Inf in the output" + (f" at t={at}" if at else ""))
    p = report["psnr_db"]
    if not (p >= min_psnr_db):  # also catches NaN
        problems.append(f"end-to-end PSNR {p:.2f} dB < {min_psnr_db:g} dB vs {report['reference']}")
    if max_step_abs is not None and not (report["per_step_max_abs"] <= max_step_abs):
        problems.append(f"per-step max abs error {report['per_step_max_abs']:.3g} > {max_step_abs:g}")
    if max_step_abs is not None and "prologue_max_abs" in report and not (report["prologue_max_abs"] <= max_step_abs):
        problems.append(f"prologue max abs error {report['prologue_max_abs']:.3g} > {max_step_abs:g}")
    report["passed"] = not problems
    if problems:
        raise VerificationError(f"{what} failed verification: " + "; ".join(problems))
    return report
