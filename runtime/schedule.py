"""The DDIM schedule of RainDiffusion (Algorithm 2), in numpy.

This is the single source of truth for every number of the diffusion process: training,
the torch reference sampler, the exporter and every runtime backend read it.

Conventions (paper notation, 1-based timesteps):
- ``betas[t-1]`` is beta_t for t = 1..T, linear from ``beta_start`` to ``beta_end``.
- ``alpha_bar[t]`` = prod_{s<=t} (1 - beta_s) for t = 0..T, with ``alpha_bar[0] = 1``
  (the clean image), so the table has T + 1 entries.
- Training draws t uniformly from 1..T and the network sees t as a float.
- Algorithm 2 samples along tau_i = (i - 1) * T / S + 1 (i = 1..S), from tau_S down to
  tau_1, and the step after tau_1 goes to t = 0 (alpha_bar = 1). S >= ``MIN_STEPS`` = 2: with
  S = 1 the only step is at t = 1, where the update trusts x_t as all but clean, so x_T ~ N(0, I)
  comes back as the output (docs/ARCHITECTURE.md, "Steps").

With eta = 0 one step from t to t_next is affine in (x_t, eps_hat)::

    x0_hat = a * x_t - b * eps_hat          a = 1/sqrt(ab_t), b = sqrt(1-ab_t)/sqrt(ab_t)
    x_next = c * x0_hat + d * eps_hat       c = sqrt(ab_next), d = sqrt(1-ab_next)

``coef = (a, b, c, d)`` is the encoding the exported fused step takes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["DDIMSchedule", "ScheduleConfig", "MIN_STEPS", "steps_error", "sample_loop", "step_inputs"]

#: The fewest DDIM steps Algorithm 2 can sample with (see the module docstring: S = 1 returns x_T).
MIN_STEPS = 2


@dataclass(frozen=True)
class ScheduleConfig:
    """Plain-data description of the forward process (stored in checkpoints and manifests)."""

    num_train_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02

    def __post_init__(self) -> None:
        if isinstance(self.num_train_timesteps, bool) or not isinstance(self.num_train_timesteps, (int, np.integer)):
            raise ValueError(f"num_train_timesteps must be an integer, got {self.num_train_timesteps!r}")
        if self.num_train_timesteps < 1:
            raise ValueError(f"num_train_timesteps must be >= 1, got {self.num_train_timesteps}")
        if not 0.0 < self.beta_start <= self.beta_end < 1.0:
            raise ValueError(
                f"betas must satisfy 0 < beta_start <= beta_end < 1, got "
                f"{self.beta_start}..{self.beta_end}"
            )

    def to_dict(self) -> dict:
        """Plain data for checkpoints and manifests."""
        return {"num_train_timesteps": int(self.num_train_timesteps), "beta_start": float(self.beta_start),
                "beta_end": float(self.beta_end)}

    @classmethod
    def from_dict(cls, d: dict) -> ScheduleConfig:
        """The inverse of :meth:`to_dict`; other keys (a manifest's ``default_steps``) are ignored.
        Raises ValueError (a missing key, a bad number) naming the problem."""
        try:
            return cls(num_train_timesteps=int(d["num_train_timesteps"]), beta_start=float(d["beta_start"]),
                       beta_end=float(d["beta_end"]))
        except KeyError as e:
            raise ValueError(f"schedule is missing {e.args[0]!r}") from None
        except (TypeError, ValueError) as e:
            raise ValueError(f"schedule is invalid ({e})") from None


def steps_error(steps: object, T: int | None = None) -> str:
    """The one-line message for a DDIM step count outside ``MIN_STEPS..T`` (no upper bound: T None)."""
    why = (" (a single step of Algorithm 2 is at t = 1 and returns the initial noise)"
           if isinstance(steps, (int, np.integer)) and not isinstance(steps, bool) and steps == 1 else "")
    allowed = f"in {MIN_STEPS}..{T}" if T is not None else f">= {MIN_STEPS}"
    return f"steps must be an integer {allowed}, got {steps!r}{why}"


@dataclass
class DDIMSchedule:
    """Linear-beta schedule with the deterministic (eta = 0) DDIM sampler of Algorithm 2.

    Call :meth:`set_timesteps` before :meth:`step` or :meth:`coefficients`.
    """

    config: ScheduleConfig = field(default_factory=ScheduleConfig)

    def __post_init__(self) -> None:
        T = self.config.num_train_timesteps
        # float64 throughout; callers cast to float32 at the last moment.
        self.betas = np.linspace(self.config.beta_start, self.config.beta_end, T, dtype=np.float64)
        self.alpha_bar = np.concatenate([[1.0], np.cumprod(1.0 - self.betas)])
        self.timesteps: np.ndarray | None = None
        self.next_timesteps: np.ndarray | None = None

    @property
    def num_train_timesteps(self) -> int:
        return self.config.num_train_timesteps

    # ---------------------------------------------------------------- Algorithm 2 sub-sequence
    def set_timesteps(self, num_steps: int) -> np.ndarray:
        """Fill ``timesteps`` (descending tau_S..tau_1) and ``next_timesteps`` (ending in 0)."""
        T = self.num_train_timesteps
        if not isinstance(num_steps, (int, np.integer)) or not MIN_STEPS <= num_steps <= T:
            raise ValueError(steps_error(num_steps, T))
        i = np.arange(1, num_steps + 1, dtype=np.int64)
        tau = (i - 1) * T // num_steps + 1  # tau_i = (i-1)*T/S + 1
        self.timesteps = tau[::-1].copy()
        self.next_timesteps = np.concatenate([self.timesteps[1:], [0]]).astype(np.int64)
        return self.timesteps

    def _require_timesteps(self) -> None:
        if self.timesteps is None:
            raise RuntimeError("call set_timesteps(num_steps) before step() or coefficients()")

    # ---------------------------------------------------------------- coefficients
    def step_coefficients(self, t: int, t_next: int) -> np.ndarray:
        """(a, b, c, d) of the eta = 0 update from t to t_next, float64."""
        T = self.num_train_timesteps
        if not (0 < t <= T and 0 <= t_next < t):
            raise ValueError(f"need 0 <= t_next < t <= {T}, got t={t}, t_next={t_next}")
        ab_t, ab_next = self.alpha_bar[t], self.alpha_bar[t_next]
        a = 1.0 / np.sqrt(ab_t)
        b = np.sqrt(1.0 - ab_t) / np.sqrt(ab_t)
        c = np.sqrt(ab_next)
        d = np.sqrt(1.0 - ab_next)
        return np.array([a, b, c, d], dtype=np.float64)

    def coefficients(self) -> np.ndarray:
        """[S, 4] float32 table, one row per step in sampling order."""
        self._require_timesteps()
        rows = [self.step_coefficients(int(t), int(n)) for t, n in zip(self.timesteps, self.next_timesteps)]
        return np.stack(rows).astype(np.float32)

    # ---------------------------------------------------------------- the update
    def step(self, eps_hat: np.ndarray, t: int, x_t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One eta = 0 DDIM step from t to the next timestep: returns (x_next, x0_hat)."""
        self._require_timesteps()
        idx = np.nonzero(self.timesteps == t)[0]
        if idx.size == 0:
            raise ValueError(f"t={t} is not in the current timesteps {self.timesteps.tolist()}")
        t_next = int(self.next_timesteps[idx[0]])
        a, b, c, d = self.step_coefficients(int(t), t_next)
        x0_hat = a * x_t - b * eps_hat
        x_next = c * x0_hat + d * eps_hat
        return x_next.astype(x_t.dtype, copy=False), x0_hat.astype(x_t.dtype, copy=False)

    # ---------------------------------------------------------------- forward process
    def q_sample(self, x0: np.ndarray, t: int, noise: np.ndarray) -> np.ndarray:
        """x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) noise (Eq. 2), numpy form for tests."""
        ab = self.alpha_bar[t]
        return np.sqrt(ab) * x0 + np.sqrt(1.0 - ab) * noise


def step_inputs(coefficients: np.ndarray, timesteps: np.ndarray, i: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The fused step's ``t`` [n] and ``coef`` [n, 4] (float32) for step i of a batch of n."""
    return (np.full((n,), float(timesteps[i]), dtype=np.float32),
            np.repeat(np.asarray(coefficients, dtype=np.float32)[i][None], n, axis=0))


def sample_loop(step: Callable[[Any, Any, np.ndarray, np.ndarray], Any], x_T: Any, cond: Any,
                schedule: DDIMSchedule, *, on_step: Callable[[int, Any, np.ndarray, np.ndarray], None] | None = None):
    """Algorithm 2 with eta = 0 over any fused-step callable: the one DDIM loop of the toolkit.

    ``step(x_t, cond, t, coef) -> x_next`` is the exported graph's contract (torch, onnxruntime,
    a backend: ``x_t`` and ``cond`` may be numpy arrays or torch tensors, ``t`` [N] and ``coef``
    [N, 4] are always float32 numpy arrays). ``schedule`` must have its timesteps set.
    ``on_step(i, x_t, t, coef)`` sees every step's inputs before it runs (calibration records
    them). Returns x_0.
    """
    if schedule.timesteps is None:
        raise RuntimeError("call schedule.set_timesteps(num_steps) before sample_loop()")
    coefs = schedule.coefficients()
    n = x_T.shape[0]
    x_t = x_T  # 1: x_T ~ N(0, I)
    for i in range(len(schedule.timesteps)):  # 2: for i = S, ..., 1
        t_vec, coef = step_inputs(coefs, schedule.timesteps, i, n)
        if on_step is not None:
            on_step(i, x_t, t_vec, coef)
        x_t = step(x_t, cond, t_vec, coef)  # 3-4: eps_hat, x0_hat and x_{tau_{i-1}} in one fused step
    return x_t


def initial_noise(shape: tuple[int, ...], seed: int, scale: float = 1.0) -> np.ndarray:
    """x_T = scale * N(0, I) from PCG64(seed): the same numbers in every backend (docs/ARCHITECTURE.md).
    ``scale`` is a predict-and-refine manifest's ``prologue.noise_scale`` (1 = Algorithm 2's x_T);
    at 0 the result is zeros, without drawing."""
    if scale == 0.0:
        return np.zeros(shape, np.float32)
    x = np.random.Generator(np.random.PCG64(seed)).standard_normal(shape, dtype=np.float32)
    if scale != 1.0:
        x *= np.float32(scale)
    return x


def frame_noise(batch: int, height: int, width: int, seed: int, scale: float = 1.0) -> np.ndarray:
    """x_T of a batch: every frame gets ``initial_noise((1, 3, H, W), seed, scale)``, so a frame's
    output does not depend on the batch it is sampled in (the runtime, the torch reference,
    calibration and verification all draw it this way). [batch, 3, H, W] float32, C-contiguous."""
    return np.repeat(initial_noise((1, 3, height, width), seed, scale), batch, axis=0)


__all__ += ["initial_noise", "frame_noise"]
