"""Named training recipes: ``rd-train fit --recipe NAME`` (docs/training.md).

A recipe is a documented set of defaults for one way of training: the model preset, what the
estimators predict, and the :class:`~training.config.TrainConfig` fields that make it. It sets
defaults only: any option given on the command line (or any key of ``overrides``) wins, and the
run's config records the recipe's name (``train.recipe``) next to the values actually used. The
individual options stay for experiments; a recipe names the combinations that mean something.

- ``paper``: Algorithm 1 as the paper writes it, nothing added.
- ``edge``: the predict-and-refine model (the ``edge`` preset) with the rendered-rain NTB.
- ``edge-refine``: its refiner alone on a fixed predictor (the shipped model's last stage).
- ``sds``: the y-only v-prediction model with the score-distillation prior (the model shipped
  before ``edge``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Any

from runtime.errors import UsageError

__all__ = ["Recipe", "RECIPES", "get_recipe", "recipe_flags"]


@dataclass(frozen=True)
class Recipe:
    name: str
    #: one line for ``--help``
    summary: str
    #: the model preset (``--config``); None leaves it to the options (default ``small``)
    preset: str | None = None
    #: what the estimators predict (``--prediction``); None: the preset's default
    prediction: str | None = None
    #: TrainConfig fields the recipe sets
    train: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from training.config import TrainConfig

        known = {f.name for f in fields(TrainConfig)} - {"recipe", "preset"}
        unknown = sorted(set(self.train) - known)
        if unknown:
            raise ValueError(f"recipe {self.name}: {unknown} are not TrainConfig fields")
        object.__setattr__(self, "train", MappingProxyType(dict(self.train)))


#: the recipes ``--recipe`` offers, by name
RECIPES: dict[str, Recipe] = {}


def _register(recipe: Recipe) -> None:
    RECIPES[recipe.name] = recipe


# Algorithm 1 exactly: the cycle L1 with weight 1 and the four noise losses, Adam(2e-5) (betas
# 0.5, 0.999 and the separate generator rate unset are TrainConfig's defaults), batch 4, 128x128
# crops, eps-prediction, no gradient clipping, none of the deviations. The EMA of the estimators
# stays: it does not change the updates, only which weights are kept.
_register(Recipe(
    name="paper", preset="small", prediction="eps",
    summary="Algorithm 1 exactly, no deviation (it collapses to identity generators on unpaired data: "
            "docs/quality.md)",
    train={"ntb": "faithful", "lambda_cyc": 1.0, "lr": 2e-5, "batch": 4, "crop": 128, "grad_clip": 0.0,
           "detach_cond": False, "lambda_adv": 0.0, "lambda_idt": 0.0, "cond_drop": 0.0, "lambda_sds": 0.0}))

# The predict-and-refine model: the edge preset (an attention-free predictor P = G_B and a small
# refiner of P(y), which predicts x_0 - P(y)), the rain renderer as G_A on the clean branch,
# conditions detached, 64-px crops (the estimator's native tile), the generators at half the
# estimators' learning rate. Trained on several --clean folders.
_register(Recipe(
    name="edge", preset="edge",
    summary="the predict-and-refine model (a predictor P = G_B and a refiner of P(y)) with the rendered-rain "
            "NTB; give it several --clean folders",
    train={"ntb": "render", "detach_cond": True, "crop": 64, "batch": 8, "lr": 1e-4, "gen_lr": 5e-5}))

# The shipped model's last stage: the refiner trained on a fixed predictor (both generators frozen),
# warm-started with --init from an edge checkpoint whose G_B is the predictor to keep
# (benchmarks/predictor_probe.py --into trains P on the rendered pairs alone and writes one), on the
# v4 renders (v1's streaks + a dense added rain field) its predictor was last trained on.
_register(Recipe(
    name="edge-refine", preset="edge",
    summary="the edge model's refiner alone on a fixed predictor (--freeze-ntb), on v4 renders; --init it "
            "from an edge checkpoint holding that predictor",
    train={"ntb": "render", "rain_style": "v4", "detach_cond": True, "freeze_ntb": True, "crop": 64, "batch": 8,
           "lr": 1e-4}))

# The y-only model shipped before edge: v-prediction of the residual x_0 - y, the rain renderer,
# condition dropout and score distillation under the unconditional priors (lr 1e-4, 64-px crops,
# batch 4). The prior needs a few hundred steps of --cond-drop alone first: start from such a run
# with --init (docs/quality.md).
_register(Recipe(
    name="sds", preset="small", prediction="v_residual",
    summary="the previous y-only model: v-prediction of x_0 - y, the rendered-rain NTB and the "
            "score-distillation prior; --init it from a run trained with --cond-drop alone first",
    train={"ntb": "render", "cond_drop": 0.2, "lambda_sds": 10.0, "lr": 1e-4, "crop": 64, "batch": 4}))


def get_recipe(name: str) -> Recipe:
    try:
        return RECIPES[str(name)]
    except KeyError:
        raise UsageError(f"recipe {name!r} is not one of {', '.join(RECIPES)}") from None


def recipe_flags(recipe: Recipe) -> str:
    """The ``rd-train fit`` options a recipe stands for, as one would type them."""
    parts = [f"--config {recipe.preset}"] if recipe.preset else []
    if recipe.prediction:
        parts.append(f"--prediction {recipe.prediction}")
    for key, value in recipe.train.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            parts.append(flag if value else f"--no-{key.replace('_', '-')}")
        else:
            parts.append(f"{flag} {value:g}" if isinstance(value, float) else f"{flag} {value}")
    return " ".join(parts)
