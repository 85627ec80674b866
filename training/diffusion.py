"""The forward process, the noise-prediction loss and the reference DDIM sampler (torch).

Every number comes from :mod:`runtime.schedule` (the single source of truth): training's
``alpha_bar`` buffer is that table, and the sampler's per-step coefficients are
``DDIMSchedule.coefficients()``, applied through :func:`training.multiscale.fused_step`, the same
graph the exporter writes. The initial noise is ``runtime.schedule.initial_noise`` (numpy
PCG64), so every backend can be compared with this sampler number to number.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from runtime.schedule import DDIMSchedule, ScheduleConfig, frame_noise, sample_loop
from training.multiscale import cond_base, fused_step

__all__ = ["alpha_bar_tensor", "q_sample", "noise_loss", "noise_draw", "noise_errors", "ddim_sample",
           "pad_to_multiple", "to_tensor", "to_uint8"]


def alpha_bar_tensor(schedule_config: ScheduleConfig | None = None) -> torch.Tensor:
    """runtime's alpha_bar table (T + 1 entries, alpha_bar[0] = 1) as a float64 tensor."""
    return torch.from_numpy(DDIMSchedule(schedule_config or ScheduleConfig()).alpha_bar.copy())


def q_sample(x_0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps (Eq. 2); t is [N] integer in 1..T."""
    ab = alpha_bar.to(x_0.device)[t.long()]  # float64 gather, cast at the last moment
    sqrt_ab = ab.sqrt().to(x_0.dtype)[:, None, None, None]
    sqrt_1m_ab = (1.0 - ab).sqrt().to(x_0.dtype)[:, None, None, None]
    return sqrt_ab * x_0 + sqrt_1m_ab * eps


def noise_draw(x_0: torch.Tensor, alpha_bar: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The random half of :func:`noise_loss`: t ~ U{1..T} per sample, then eps ~ N(0, I) (in that
    order, from torch's global RNG; its state is saved in the checkpoint, so resume is exact)."""
    T = alpha_bar.shape[0] - 1
    t = torch.randint(1, T + 1, (x_0.shape[0],)).to(x_0.device)
    eps = torch.randn(x_0.shape).to(device=x_0.device, dtype=x_0.dtype)
    return t, eps


def noise_errors(estimator: nn.Module, x_0: torch.Tensor, cond: torch.Tensor, t: torch.Tensor, eps: torch.Tensor,
                 alpha_bar: torch.Tensor) -> torch.Tensor:
    """Per-sample mean squared error of the estimator on one draw (t, eps): shape [N], float32.

    eps-prediction is scored on eps; the v kinds of estimator (``EstimatorConfig.prediction``) on
    their own output, || v - v_hat ||^2 (see training.multiscale). No randomness: the samples of a
    batch are independent, so the errors of a concatenation are the concatenation of the errors.
    """
    x_t = q_sample(x_0, t, eps, alpha_bar)
    tf = t.to(x_0.dtype)
    if not hasattr(estimator, "predict"):  # any plain eps network
        out, target = estimator(x_t, cond, tf), eps
    else:
        out, target = estimator.predict(x_t, cond, tf), estimator.target(x_0, eps, cond, tf)
    return (out.float() - target.float()).square().flatten(1).mean(1)


def noise_loss(estimator: nn.Module, x_0: torch.Tensor, cond: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """|| eps - eps_hat(x_t, cond, t) ||^2 with t ~ U{1..T} per sample, eps ~ N(0, I).

    For the v kinds of estimator (``EstimatorConfig.prediction``) the same draw is scored on the
    estimator's own output: || v - v_hat ||^2 (see training.multiscale).
    Draws from torch's global RNG (its state is saved in the checkpoint, so resume is exact).
    """
    t, eps = noise_draw(x_0, alpha_bar)
    return noise_errors(estimator, x_0, cond, t, eps, alpha_bar).mean()


def pad_to_multiple(x: torch.Tensor, multiple: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Reflect-pad H and W (bottom / right) up to a multiple; returns (padded, (H, W)).

    Reflect padding needs pad < size; tiny images are padded in rounds (reflect then
    replicate for the remainder) so any H, W >= 1 works.
    """
    h, w = int(x.shape[-2]), int(x.shape[-1])
    ph, pw = (-h) % multiple, (-w) % multiple
    y = x
    while ph or pw:
        sh, sw = min(ph, y.shape[-2] - 1), min(pw, y.shape[-1] - 1)
        if sh == 0 and sw == 0:  # 1-pixel side: reflect impossible
            y = F.pad(y, (0, pw, 0, ph), mode="replicate")
            break
        y = F.pad(y, (0, sw, 0, sh), mode="reflect")
        ph, pw = ph - sh, pw - sw
    return y, (h, w)


@torch.no_grad()
def ddim_sample(estimator: nn.Module, cond: torch.Tensor, *, steps: int, seed: int,
                schedule_config: ScheduleConfig | None = None, return_trajectory: bool = False,
                prologue: nn.Module | None = None, noise_scale: float = 1.0):
    """Algorithm 2 with eta = 0: x_T ~ N(0, I), then S fused DDIM steps conditioned on ``cond``.

    ``cond`` is [N, 3, H, W] in [-1, 1], any H, W: it is reflect-padded (bottom/right) to the
    estimator's size multiple, and x_0 is cropped back to H x W. With a ``prologue``
    (predict-and-refine: :class:`training.multiscale.Prologue`) ``cond`` is the rainy image y and
    the estimator's condition is ``prologue(padded y)`` = [y, P(y)], as the runtime computes it;
    ``steps = 0`` then returns P(y) without any DDIM step. The initial noise is
    ``runtime.schedule.frame_noise(N, Hp, Wp, seed)`` at the **padded** shape: the same draw for
    every frame, so a frame's output does not depend on its batch (as in the runtime), times
    ``noise_scale`` (the runtime's manifest ``prologue.noise_scale``: 0 starts from x_T = 0). Runs
    in float32; the loop is :func:`runtime.schedule.sample_loop`, the same one every backend's
    reference uses.

    Returns x_0 (float32 tensor [N, 3, H, W], not clipped). With ``return_trajectory=True``
    returns ``(x_0, trajectory)`` where trajectory is a list of per-step dicts with the fused
    step's inputs ``x_t``, ``t`` ([N] float32), ``coef`` ([N, 4] float32) and ``cond`` (padded,
    the estimator's condition), all as float32 numpy arrays - what calibration and export parity
    tests feed an artifact.
    """
    if steps == 0 and prologue is None:
        raise ValueError("steps = 0 needs a predict-and-refine model (its prologue's estimate is the output)")
    multiple = int(getattr(estimator, "size_multiple", 1))
    device = next(estimator.parameters()).device
    cond = cond.to(device=device, dtype=torch.float32)
    cond_p, (h, w) = pad_to_multiple(cond, multiple)
    if prologue is not None:
        cond_p = prologue(cond_p)
    n, _, hp, wp = cond_p.shape
    trajectory = []
    if steps == 0:
        x_t = cond_base(cond_p)
    else:
        sched = DDIMSchedule(schedule_config or ScheduleConfig())
        sched.set_timesteps(steps)
        cond_np = cond_p.cpu().numpy() if return_trajectory else None

        def step(x_t: torch.Tensor, c: torch.Tensor, t: np.ndarray, coef: np.ndarray) -> torch.Tensor:
            return fused_step(estimator, x_t, c, torch.from_numpy(t).to(device), torch.from_numpy(coef).to(device))

        def record(i: int, x_t: torch.Tensor, t: np.ndarray, coef: np.ndarray) -> None:
            trajectory.append({"x_t": x_t.cpu().numpy().copy(), "cond": cond_np, "t": t, "coef": coef})

        x_T = torch.from_numpy(frame_noise(n, hp, wp, seed, noise_scale)).to(device)
        x_t = sample_loop(step, x_T, cond_p, sched, on_step=record if return_trajectory else None)
    x_0 = x_t[..., :h, :w].contiguous()
    return (x_0, trajectory) if return_trajectory else x_0


def to_tensor(img: np.ndarray) -> torch.Tensor:
    """uint8 HxWx3 -> float32 [1, 3, H, W] in [-1, 1] (x = u8 / 127.5 - 1)."""
    arr = np.asarray(img)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"to_tensor expects HxWx3 uint8, got {arr.dtype} {arr.shape}")
    x = torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1))).float() / 127.5 - 1.0
    return x[None]


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """float [1, 3, H, W] or [3, H, W] in [-1, 1] -> uint8 HxWx3: round((x + 1) * 127.5), clipped."""
    if x.ndim == 4:
        if x.shape[0] != 1:
            raise ValueError(f"to_uint8 takes one image, got a batch of {x.shape[0]}")
        x = x[0]
    arr = x.detach().float().cpu().numpy().transpose(1, 2, 0)
    return np.clip(np.round((arr + 1.0) * 127.5), 0, 255).astype(np.uint8)

