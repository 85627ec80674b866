"""The multi-scale noise estimator of RainDiffusion (Eqs. 13-15) and the fused DDIM step.

(x_t, cond) are average-pooled to every scale r in ``scales`` (1, 1/2, 1/4 by default);
**one shared** U-Net predicts a noise map at each scale; the maps are bilinearly upsampled
to full size (explicit sizes, ``align_corners=False``, no antialias: export-safe); a small
attention head looks at the condition and the upsampled maps and outputs one logit per
scale per pixel; softmax over scales gives the weights, and eps_hat is the weighted sum.

What the fused maps predict is ``EstimatorConfig.prediction`` (issue 8):

- ``eps`` (the paper): the maps are eps_hat itself.
- ``v`` (documented deviation, Salimans & Ho 2022): the maps predict
  v = sqrt(ab_t) eps - sqrt(1 - ab_t) x_0, and ``ToEps`` turns them into
  eps_hat = sqrt(ab_t) v_hat + sqrt(1 - ab_t) x_t.
- ``v_residual`` (documented deviation): as ``v``, for the residual x_0 - base, i.e.
  v_hat = maps - sqrt(1 - ab_t) base. At high t, where the sample is nearly pure noise, the
  estimator's x_0 estimate starts from the condition instead of from nothing.
- ``x0_residual`` (predict-and-refine, docs/ARCHITECTURE.md): the maps are x0_hat - base itself,
  and eps_hat = (x_t - sqrt(ab_t) x0_hat) / sqrt(1 - ab_t). The U-Net's output convolution starts
  at zero, so an untrained refiner returns x0_hat = base at every step, and the S-step DDIM loop
  returns base exactly: refinement starts from the predictor's estimate and can only add what
  it learned.

``base`` is the last three channels of the condition: the rainy image y itself for the paper's
3-channel condition, the predictor's estimate b = P(y) for the predict-and-refine condition
[y, b] (``cond_channels = 6``).

Either way the estimator **returns eps_hat**: the fused step, the exporter, the runtimes and the
schedule's (a, b, c, d) encoding are the same for every kind. Only the training target differs
(:meth:`MultiScaleEstimator.target`): with eps-prediction the loss weights x_0 errors by the SNR,
about 1e-4 at t = 900, so an undertrained eps model knows almost nothing about x_0 at high t and a
10-step DDIM trajectory from pure noise never recovers (measured in docs/quality.md).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from training.unet import UNet, UNetConfig

__all__ = ["COND_CHANNELS", "EstimatorConfig", "FusedStep", "MultiScaleEstimator", "PREDICTIONS", "Prologue", "ToEps",
           "cond_base", "fused_step"]

#: What the estimator's fused maps predict (see the module docstring).
PREDICTIONS = ("eps", "v", "v_residual", "x0_residual")

#: Condition widths: the rainy image y (the paper), or [y, b] with b = P(y) (predict-and-refine).
COND_CHANNELS = (3, 6)


@dataclass
class EstimatorConfig:
    unet: UNetConfig = field(default_factory=UNetConfig)
    scales: tuple[float, ...] = (1.0, 0.5, 0.25)
    attn_hidden: int = 16
    prediction: str = "eps"
    #: 3: cond = y (the paper); 6: cond = [y, b], b = P(y) the predictor's estimate.
    cond_channels: int = 3

    def __post_init__(self) -> None:
        if self.cond_channels not in COND_CHANNELS:
            raise ValueError(f"cond_channels must be one of {COND_CHANNELS}, got {self.cond_channels!r}")
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {', '.join(PREDICTIONS)}, got {self.prediction!r}")
        if isinstance(self.unet, dict):
            self.unet = UNetConfig.from_dict(self.unet)
        self.scales = tuple(float(s) for s in self.scales)
        if not self.scales:
            raise ValueError("scales must name at least one scale")
        for s in self.scales:
            f = 1.0 / s if s > 0 else 0
            if not (0 < s <= 1 and abs(f - round(f)) < 1e-9 and (round(f) & (round(f) - 1)) == 0):
                raise ValueError(f"scale {s} must be 1/2^k (1, 0.5, 0.25, ...)")
        if len(set(self.scales)) != len(self.scales):
            raise ValueError(f"scales must be distinct, got {self.scales}")
        if (self.unet.in_channels != 3 + self.cond_channels or self.unet.out_channels != 3
                or not self.unet.time_embedding):
            raise ValueError(f"the estimator's U-Net takes {3 + self.cond_channels} channels (x_t, cond), "
                             f"outputs 3 and uses time")

    @property
    def refines(self) -> bool:
        """True for the predict-and-refine condition [y, b]."""
        return self.cond_channels == 6

    @property
    def factors(self) -> tuple[int, ...]:
        return tuple(round(1.0 / s) for s in self.scales)

    @property
    def size_multiple(self) -> int:
        return max(self.factors) * self.unet.size_multiple

    def to_dict(self) -> dict:
        d = asdict(self)
        d["unet"] = self.unet.to_dict()
        d["scales"] = list(self.scales)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> EstimatorConfig:
        return cls(unet=UNetConfig.from_dict(d["unet"]), scales=tuple(d["scales"]),
                   attn_hidden=int(d.get("attn_hidden", 16)), prediction=str(d.get("prediction", "eps")),
                   cond_channels=int(d.get("cond_channels", 3)))


def cond_base(cond: torch.Tensor) -> torch.Tensor:
    """What the residual kinds are residuals of: the condition's last three channels (y, or b = P(y))."""
    return cond[:, -3:]


class ToEps(nn.Module):
    """v, v_residual or x0_residual maps -> eps_hat, with sqrt(ab_t) and sqrt(1 - ab_t) from runtime's table.

    Its own module so the exported nodes are scoped ``/estimator/to_eps/...``: the FP16 export keeps
    them FP32 (with the DDIM update they form a cancellation a * x_t - b * eps_hat with a, b ~ 156
    at t = 1000). The tables are not persistent: they come from the schedule, not the weights.
    """

    def __init__(self, prediction: str, schedule=None) -> None:
        super().__init__()
        from runtime.schedule import DDIMSchedule, ScheduleConfig

        self.prediction = prediction
        ab = torch.from_numpy(DDIMSchedule(schedule or ScheduleConfig()).alpha_bar.copy())
        self.register_buffer("sqrt_ab", ab.sqrt().float(), persistent=False)
        self.register_buffer("sqrt_1m_ab", (1.0 - ab).sqrt().float(), persistent=False)

    def _tables(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        idx = t.long()
        s = self.sqrt_ab[idx].to(like.dtype)[:, None, None, None]
        r = self.sqrt_1m_ab[idx].to(like.dtype)[:, None, None, None]
        return s, r

    def forward(self, raw: torch.Tensor, x_t: torch.Tensor, cond: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        s, r = self._tables(t, raw)
        if self.prediction == "x0_residual":
            return (x_t - s * (raw + cond_base(cond))) / r  # t >= 1, so r >= sqrt(beta_1) > 0
        v = raw - r * cond_base(cond) if self.prediction == "v_residual" else raw
        return s * v + r * x_t

    def target(self, x_0: torch.Tensor, eps: torch.Tensor, cond: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What ``raw`` should be for this (x_0, eps, cond, t)."""
        if self.prediction == "x0_residual":
            return x_0 - cond_base(cond)
        s, r = self._tables(t, x_0)
        return s * eps - r * (x_0 - cond_base(cond) if self.prediction == "v_residual" else x_0)


class MultiScaleEstimator(nn.Module):
    """``forward`` returns eps_hat whatever ``config.prediction`` is; ``predict`` returns the raw
    fused maps and ``target`` what they are trained toward. ``schedule`` (a ScheduleConfig) is
    needed by the v kinds only."""

    def __init__(self, config: EstimatorConfig, schedule=None) -> None:
        super().__init__()
        self.config = config
        self.to_eps = ToEps(config.prediction, schedule) if config.prediction != "eps" else None
        self.unet = UNet(config.unet)
        k = len(config.scales)
        self.factors = config.factors
        # Attention head (Eq. 14): cond + K noise maps -> K logits per pixel.
        self.attn_head = (
            nn.Sequential(
                nn.Conv2d(config.cond_channels + 3 * k, config.attn_hidden, 3, padding=1),
                nn.SiLU(),
                nn.Conv2d(config.attn_hidden, config.attn_hidden, 3, padding=1),
                nn.SiLU(),
                nn.Conv2d(config.attn_hidden, k, 1),
            )
            if k > 1
            else None
        )
        if self.attn_head is not None:  # start from equal weights over the scales
            nn.init.zeros_(self.attn_head[-1].weight)
            nn.init.zeros_(self.attn_head[-1].bias)

    @property
    def size_multiple(self) -> int:
        return self.config.size_multiple

    def check_input_size(self, height: int, width: int) -> None:
        m = self.size_multiple
        if height % m or width % m:
            raise ValueError(
                f"input size {height}x{width} is not a multiple of the model's size multiple {m}; "
                f"pad to {math.ceil(height / m) * m}x{math.ceil(width / m) * m}"
            )

    def scale_maps(self, x_t: torch.Tensor, cond: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Noise maps of every scale upsampled to full size: [N, K, 3, H, W]."""
        h, w = x_t.shape[-2], x_t.shape[-1]
        inp = torch.cat([x_t, cond], dim=1)
        maps = []
        for f in self.factors:  # static loop over the configured scales
            x_r = F.avg_pool2d(inp, kernel_size=f) if f > 1 else inp  # (x_t^r, cond^r), Eq. 13
            eps_r = self.unet(x_r, t)
            if f > 1:
                eps_r = F.interpolate(eps_r, size=(h, w), mode="bilinear", align_corners=False)
            maps.append(eps_r)
        return torch.stack(maps, dim=1)

    def fusion_weights(self, cond: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
        """Per-pixel softmax weights over the scales (Eq. 14): [N, K, 1, H, W]."""
        n, k, c, h, w = maps.shape
        if self.attn_head is None:
            return torch.ones(n, 1, 1, h, w, dtype=maps.dtype, device=maps.device)
        logits = self.attn_head(torch.cat([cond, maps.reshape(n, k * c, h, w)], dim=1))
        return torch.softmax(logits, dim=1).unsqueeze(2)

    def predict(self, x_t: torch.Tensor, cond: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The fused maps (Eq. 15): eps_hat, or v_hat for the v kinds."""
        if not torch.jit.is_tracing() and not torch.compiler.is_compiling():
            self.check_input_size(int(x_t.shape[-2]), int(x_t.shape[-1]))
        maps = self.scale_maps(x_t, cond, t)
        weights = self.fusion_weights(cond, maps)
        return (weights * maps).sum(dim=1)

    def target(self, x_0: torch.Tensor, eps: torch.Tensor, cond: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The training target of :meth:`predict` (eps for the paper's kind)."""
        return eps if self.to_eps is None else self.to_eps.target(x_0, eps, cond, t)

    def forward(self, x_t: torch.Tensor, cond: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """eps_hat(x_t, cond, t)."""
        raw = self.predict(x_t, cond, t)
        return raw if self.to_eps is None else self.to_eps(raw, x_t, cond, t)


def fused_step(estimator: nn.Module, x_t: torch.Tensor, cond: torch.Tensor, t: torch.Tensor,
               coef: torch.Tensor) -> torch.Tensor:
    """One eta = 0 DDIM step: x_next = c * (a * x_t - b * eps_hat) + d * eps_hat.

    ``coef`` is [N, 4] = (a, b, c, d) from ``runtime.schedule.DDIMSchedule.step_coefficients``.
    """
    eps_hat = estimator(x_t, cond, t)
    a, b, c, d = (coef[:, i, None, None, None] for i in range(4))
    x0_hat = a * x_t - b * eps_hat
    return c * x0_hat + d * eps_hat


class FusedStep(nn.Module):
    """The exported graph: inputs (x_t, cond, t, coef), output x_next."""

    def __init__(self, estimator: MultiScaleEstimator) -> None:
        super().__init__()
        self.estimator = estimator

    def forward(self, x_t: torch.Tensor, cond: torch.Tensor, t: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
        return fused_step(self.estimator, x_t, cond, t, coef)


class Prologue(nn.Module):
    """The predict-and-refine prologue graph: rainy y -> cond = [y, P(y)] (once per frame).

    ``predictor`` is the NTB's derain generator G_B. The refiner (the derain estimator with
    ``cond_channels = 6``) reads this condition at every DDIM step; with zero steps the output
    is its last three channels, P(y).
    """

    def __init__(self, predictor: nn.Module) -> None:
        super().__init__()
        self.predictor = predictor

    def forward(self, rainy: torch.Tensor) -> torch.Tensor:
        return torch.cat([rainy, self.predictor(rainy)], dim=1)
