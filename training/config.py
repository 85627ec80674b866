"""Configuration dataclasses of training, one per concern (STYLE #8), and the model presets.

Every config is stored in the checkpoint as a plain dict (numbers, strings, lists), so
``torch.load(weights_only=True)`` can read it and a model is rebuilt from the checkpoint alone:

- ``UNetConfig`` (training.unet) of the noise estimators' shared U-Net, and ``ntb_unet`` for
  the two NTB generators G_A (clean -> rainy) and G_B (rainy -> clean);
- ``EstimatorConfig`` (training.multiscale): the U-Net plus the scales of Eqs. 13-15;
- ``ScheduleConfig`` (runtime.schedule): T and the linear betas;
- ``TrainConfig`` (here): optimisation, losses, data, EMA and logging.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from enum import Enum

from runtime.errors import UsageError
from runtime.schedule import MIN_STEPS, ScheduleConfig, steps_error
from training.multiscale import EstimatorConfig
from training.unet import UNetConfig

__all__ = ["NTBMode", "Preset", "TrainConfig", "ModelConfigs", "model_preset", "PRESET_TRAIN_DEFAULTS"]


class NTBMode(str, Enum):
    """How the NTB generators are trained (docs/training.md has each mode's origin and results).

    - ``faithful``: exactly Algorithm 1 (cycle L1 only), which identity generators satisfy: on
      unpaired data it collapses to them (docs/ARCHITECTURE.md), so it serves ablations.
    - ``synthetic``: documented deviation. Adds ``lambda_syn * |G_A(x) - synthrain(x)|_1``: the
      synthetic rain renderer is a weak prior for G_A (the Syn2Real line), so x' = G_A(x) looks
      rainy, the clean-side cycle |G_B(G_A(x)) - x| teaches G_B to derain, and the DTB's A-loss
      on (x | x') sees real derain pairs.

    - ``render``: documented deviation. On the clean branch the synthetic rain renderer takes
      G_A's place: x' = synthrain(x). Then the cycle term |G_B(x') - x| and the A-loss on
      (x | x') learn from (rendered) rainy/clean pairs, while the rainy branch stays as in
      Algorithm 1 (G_A is still trained through y'' = G_A(G_B(y))). Unlike ``synthetic``, the
      target is not averaged away: an L1 pull toward randomly placed streaks has the clean image
      as its per-pixel median, so ``synthetic`` tends to identity too.
    """

    faithful = "faithful"
    synthetic = "synthetic"
    render = "render"


class Preset(str, Enum):
    tiny = "tiny"  # tests: seconds on a CPU
    small = "small"  # the y-only CPU-trainable model (~1.09M-param estimator U-Net)
    edge = "edge"  # predict-and-refine: P (attention-free G_B) + a small refiner (the shipped model)
    base = "base"  # GPU-scale


@dataclass
class TrainConfig:
    """Everything about one training run that is not the model's shape."""

    steps: int = 10000
    batch: int = 4
    crop: int = 128
    lr: float = 2e-5
    #: Learning rate of the NTB generators (G_A, G_B); None = ``lr``. A lower one slows the
    #: generators' tone drift under the score-distillation prior.
    gen_lr: float | None = None
    #: Keep the NTB generators G_A, G_B fixed (train the estimators only): refining on a predictor
    #: trained before (predict-and-refine's last stage).
    freeze_ntb: bool = False
    beta1: float = 0.5
    beta2: float = 0.999
    lambda_cyc: float = 1.0
    ntb: str = NTBMode.synthetic.value
    lambda_syn: float = 1.0
    #: training.synthrain.rain_batch style of the rendered rain (one of RAIN_STYLES: v1 .. v4).
    rain_style: str = "v1"
    #: Detach the generator outputs used as diffusion conditions (the paper does not).
    detach_cond: bool = False
    #: Weight of CycleGAN's LSGAN term for the NTB (0 = off, the paper; training.gan).
    lambda_adv: float = 0.0
    #: Weight of CycleGAN's identity loss |G_B(x) - x|_1 + |G_A(y) - y|_1 (0 = off, the paper).
    lambda_idt: float = 0.0
    #: Probability that the noise losses of the real images (A on clean x, B on rainy y) drop their
    #: condition, so the estimators also learn unconditional priors (what ``lambda_sds`` distils).
    cond_drop: float = 0.0
    #: Weight of the score-distillation prior on the generators (needs cond_drop > 0; 0 = off).
    lambda_sds: float = 0.0
    #: Width of the PatchGAN discriminators' first layer (used when lambda_adv > 0).
    disc_channels: int = 64
    ema_decay: float = 0.999
    #: EMA decay ramps as min(decay, (1 + n) / (ema_warmup + n)) over the first updates.
    ema_warmup: int = 10
    grad_clip: float = 1.0
    seed: int = 0
    ckpt_every: int = 500
    #: Also keep RUN/snap_<step>.pt (the stripped model, like model.pt) every N steps; 0 = off.
    snapshot_every: int = 0
    val_every: int = 1000
    log_every: int = 10
    val_steps: int = 10
    val_size: int = 128
    val_max_images: int = 8
    preset: str = Preset.small.value
    #: The named recipe (training.recipes) whose defaults this run started from; None: none.
    recipe: str | None = None

    def __post_init__(self) -> None:
        for name in ("steps", "batch", "crop", "disc_channels", "ckpt_every", "val_every", "log_every",
                     "val_steps", "val_size", "val_max_images"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < (0 if name == "steps" else 1):
                raise UsageError(f"{name} must be a positive integer, got {v!r}")
        if self.val_steps < MIN_STEPS:
            raise UsageError(f"val_steps: {steps_error(self.val_steps)}")
        if not isinstance(self.snapshot_every, int) or self.snapshot_every < 0:
            raise UsageError(f"snapshot_every must be an integer >= 0 (0 = off), got {self.snapshot_every!r}")
        if not self.lr > 0:
            raise UsageError(f"lr must be > 0, got {self.lr}")
        if self.gen_lr is not None and not (isinstance(self.gen_lr, (int, float)) and self.gen_lr > 0):
            raise UsageError(f"gen_lr must be > 0 (or unset: the generators then use lr), got {self.gen_lr!r}")
        for name in ("lambda_adv", "lambda_idt", "lambda_sds"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and v >= 0):
                raise UsageError(f"{name} must be >= 0, got {v!r}")
        if not (isinstance(self.cond_drop, (int, float)) and 0 <= self.cond_drop < 1):
            raise UsageError(f"cond_drop must be in [0, 1), got {self.cond_drop!r}")
        if self.lambda_sds > 0 and self.cond_drop == 0:
            raise UsageError("lambda_sds needs cond_drop > 0: the prior is the estimators' unconditional "
                             "model, which only condition dropout trains")
        if self.recipe is not None and not isinstance(self.recipe, str):
            raise UsageError(f"recipe must be a recipe's name, got {self.recipe!r}")
        if not 0 <= self.ema_decay < 1:
            raise UsageError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        from training.synthrain import RAIN_STYLES

        if self.rain_style not in RAIN_STYLES:
            raise UsageError(f"rain_style must be one of {', '.join(RAIN_STYLES)}, got {self.rain_style!r}")
        try:
            self.ntb = NTBMode(self.ntb).value
        except ValueError:
            raise UsageError(f"ntb must be one of {[m.value for m in NTBMode]}, got {self.ntb!r}") from None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass
class ModelConfigs:
    """The shapes of the four networks and the forward process."""

    estimator: EstimatorConfig
    ntb_unet: UNetConfig
    schedule: ScheduleConfig

    def to_dict(self) -> dict:
        est = self.estimator.to_dict()
        return {"unet": est["unet"], "estimator": est, "ntb_unet": self.ntb_unet.to_dict(),
                "diffusion": self.schedule.to_dict()}

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfigs:
        return cls(estimator=EstimatorConfig.from_dict(d["estimator"]),
                   ntb_unet=UNetConfig.from_dict(d["ntb_unet"]),
                   schedule=ScheduleConfig.from_dict(d["diffusion"]))


#: TrainConfig defaults a preset brings to a new run, under a recipe's and the explicit options.
#: tiny's U-Net has two levels, so self-attention works at half the crop: over 4,096 tokens at
#: crop 128, over 256 at crop 32 (docs/field_tests.md measures the difference).
PRESET_TRAIN_DEFAULTS: dict[str, dict] = {Preset.tiny.value: {"crop": 32, "batch": 4, "val_size": 32}}

#: (prediction, cond_channels) of each preset when not given.
PRESET_DEFAULTS = {Preset.edge: ("x0_residual", 6)}


def model_preset(name: str | Preset, *, scales: tuple[float, ...] | None = None,
                 prediction: str | None = None, cond_channels: int | None = None) -> ModelConfigs:
    """The model shapes of a preset; ``scales`` overrides the estimator's scales (Table 5 ablation),
    ``prediction`` what the estimator's maps predict (eps = the paper; v, v_residual, x0_residual),
    ``cond_channels`` its condition (3: y, the paper; 6: [y, P(y)], predict-and-refine). Unset,
    both take the preset's defaults (eps / 3, and x0_residual / 6 for ``edge``)."""
    try:
        name = Preset(name)
    except ValueError:
        raise UsageError(f"config must be one of {[p.value for p in Preset]}, got {name!r}") from None
    default_prediction, default_cond = PRESET_DEFAULTS.get(name, ("eps", 3))
    prediction = default_prediction if prediction is None else prediction
    cond_channels = default_cond if cond_channels is None else int(cond_channels)
    if name is Preset.tiny:
        unet = UNetConfig(base_channels=8, channel_mult=(1, 2), groups=4)
        ntb = UNetConfig(in_channels=3, base_channels=8, channel_mult=(1, 2), groups=4, time_embedding=False,
                         residual=True)
        attn_hidden = 8
    elif name is Preset.small:
        unet = UNetConfig()
        ntb = UNetConfig(in_channels=3, base_channels=16, channel_mult=(1, 2, 2), groups=8, time_embedding=False,
                         residual=True)
        attn_hidden = 16
    elif name is Preset.edge:
        # P: the NTB generators without self-attention (fully convolutional: any frame size, a
        # whole frame at --steps 0); the refiner: the small estimator at half the width.
        unet = UNetConfig(base_channels=16, channel_mult=(1, 2, 2, 2))
        ntb = UNetConfig(in_channels=3, base_channels=16, channel_mult=(1, 2, 2), groups=8, time_embedding=False,
                         residual=True, attention_levels=())
        attn_hidden = 16
    else:
        unet = UNetConfig(base_channels=64, channel_mult=(1, 2, 2, 4), num_res_blocks=2)
        ntb = UNetConfig(in_channels=3, base_channels=32, channel_mult=(1, 2, 2, 2), groups=8, time_embedding=False,
                         residual=True)
        attn_hidden = 32
    unet.in_channels = 3 + cond_channels
    try:
        est = EstimatorConfig(unet=unet, scales=tuple(scales) if scales else (1.0, 0.5, 0.25),
                              attn_hidden=attn_hidden, prediction=prediction, cond_channels=cond_channels)
    except ValueError as e:
        raise UsageError(str(e)) from None
    return ModelConfigs(estimator=est, ntb_unet=ntb, schedule=ScheduleConfig())
