"""Checkpoints: atomic save, safe load (``weights_only=True``) and model rebuilding.

Layout (plain data + tensors only, so ``torch.load(weights_only=True)`` reads it)::

    format_version: int            toolkit_version: str
    config: {unet, estimator, ntb_unet, diffusion, train}    (plain dicts)
    state:  {G_A, G_B, eps_A, eps_B, ema_A, ema_B}           (state dicts)
    optimizer, step, rng, ema_updates                        (training checkpoints only)

A *stripped* checkpoint (``model.pt``, what is shipped and exported) keeps the configs, the
generators and the EMA estimators only: ``state = {G_A, G_B, ema_A, ema_B}``.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import torch
from torch import nn

from runtime import __version__ as toolkit_version
from runtime.errors import CheckpointError
from runtime.io import atomic_path
from training.config import ModelConfigs
from training.multiscale import EstimatorConfig, MultiScaleEstimator, Prologue
from training.unet import UNet, UNetConfig

__all__ = ["FORMAT_VERSION", "save_checkpoint", "load_checkpoint", "strip_checkpoint", "build_estimator",
           "build_generators", "build_prologue", "model_configs", "check_state_dict"]

FORMAT_VERSION = 1
_REQUIRED = ("format_version", "toolkit_version", "config", "state")
_CONFIG_KEYS = ("estimator", "ntb_unet", "diffusion")


def _on_cpu(obj):
    """``obj`` with every tensor in its dicts, lists and tuples moved to the CPU (others untouched).

    Containers keep their type: a state dict stays an ``OrderedDict`` with its ``_metadata``
    (the module versions ``load_state_dict`` reads), a namedtuple stays that namedtuple.
    """
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        items = {k: _on_cpu(v) for k, v in obj.items()}
        if type(obj) is dict:
            return items
        out = type(obj)(items)
        if hasattr(obj, "_metadata"):
            out._metadata = obj._metadata
        return out
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(_on_cpu(v) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(_on_cpu(v) for v in obj)
    return obj


def save_checkpoint(path: str | os.PathLike, ckpt: dict) -> Path:
    """Write ``ckpt`` atomically (temp file beside ``path``, then rename); adds the version keys.

    Tensors are saved from the CPU, so a checkpoint trained with ``--device cuda`` loads anywhere,
    also with a plain ``torch.load`` (no ``map_location``) on a machine without a GPU.
    """
    ckpt = _on_cpu({"format_version": FORMAT_VERSION, "toolkit_version": toolkit_version, **ckpt})
    with atomic_path(path) as tmp:
        torch.save(ckpt, tmp)
    return Path(path)


def strip_checkpoint(ckpt: dict) -> dict:
    """The shipped form: configs + generators + EMA estimators, no optimizer / raw estimators."""
    state = ckpt["state"]
    return {"format_version": ckpt.get("format_version", FORMAT_VERSION),
            "toolkit_version": ckpt.get("toolkit_version", toolkit_version),
            "config": ckpt["config"], "step": ckpt.get("step", 0),
            "state": {k: state[k] for k in ("G_A", "G_B", "ema_A", "ema_B")}}


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint safely; every failure is a one-line :class:`CheckpointError`."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{p}: no such checkpoint file")
    if p.stat().st_size == 0:
        raise CheckpointError(f"{p}: empty file (0 bytes), not a checkpoint")
    try:
        ckpt = torch.load(p, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
        raise CheckpointError(
            f"{p}: refused to load: the file holds Python objects that weights_only loading does not allow "
            f"(a pickle payload or a non-RainDiffusion checkpoint): {first}") from None
    except Exception as e:  # the unpickler raises many types (RuntimeError, KeyError, EOFError, ...)
        msg = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
        raise CheckpointError(f"{p}: truncated or not a torch checkpoint ({msg})") from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{p}: not a RainDiffusion checkpoint (top level is {type(ckpt).__name__}, not dict)")
    missing = [k for k in _REQUIRED if k not in ckpt]
    if missing:
        raise CheckpointError(f"{p}: not a RainDiffusion checkpoint: missing key(s) {', '.join(missing)}")
    if ckpt["format_version"] != FORMAT_VERSION:
        raise CheckpointError(f"{p}: format_version {ckpt['format_version']!r} is not supported "
                              f"(this toolkit reads {FORMAT_VERSION})")
    missing = [f"config.{k}" for k in _CONFIG_KEYS if k not in ckpt["config"]]
    if missing:
        raise CheckpointError(f"{p}: missing key(s) {', '.join(missing)}")
    ckpt["_path"] = str(p)
    return ckpt


def _where(ckpt: dict) -> str:
    return ckpt.get("_path", "checkpoint")


def model_configs(ckpt: dict) -> ModelConfigs:
    try:
        return ModelConfigs.from_dict(ckpt["config"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{_where(ckpt)}: invalid model config ({e.__class__.__name__}: {e})") from None


def check_state_dict(module: nn.Module, state: dict, name: str, where: str = "checkpoint") -> None:
    """Raise CheckpointError naming every missing / unexpected key and shape mismatch."""
    expected = module.state_dict()
    problems = []
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing:
        problems.append(f"missing {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    if unexpected:
        problems.append(f"unexpected {', '.join(unexpected[:5])}{' ...' if len(unexpected) > 5 else ''}")
    for k, v in state.items():
        if k in expected and tuple(v.shape) != tuple(expected[k].shape):
            problems.append(f"{k} has shape {tuple(v.shape)}, the config needs {tuple(expected[k].shape)}")
    if problems:
        raise CheckpointError(f"{where}: state.{name} does not match its config: {'; '.join(problems)}")


def _state(ckpt: dict, key: str) -> dict:
    state = ckpt.get("state", {})
    if key not in state:
        hint = " (a stripped checkpoint holds only the EMA estimators: use ema=True)" if key.startswith("eps") else ""
        raise CheckpointError(f"{_where(ckpt)}: missing key state.{key}{hint}")
    return state[key]


def build_estimator(ckpt: dict, model: str = "derain", ema: bool = True) -> MultiScaleEstimator:
    """The derain (eps_A) or rain-generation (eps_B) estimator of a checkpoint, in eval mode."""
    names = {"derain": "A", "rain": "B"}
    if model not in names:
        raise CheckpointError(f"model must be 'derain' or 'rain', got {model!r}")
    key = f"{'ema' if ema else 'eps'}_{names[model]}"
    try:
        cfg = EstimatorConfig.from_dict(ckpt["config"]["estimator"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{_where(ckpt)}: invalid config.estimator ({e.__class__.__name__}: {e})") from None
    net = MultiScaleEstimator(cfg, model_configs(ckpt).schedule)
    state = _state(ckpt, key)
    check_state_dict(net, state, key, _where(ckpt))
    net.load_state_dict(state)
    return net.eval()


def build_prologue(ckpt: dict) -> Prologue | None:
    """The predict-and-refine prologue (y -> [y, G_B(y)]) of a checkpoint whose derain estimator
    refines, in eval mode; None for the paper's y-only condition."""
    try:
        cfg = EstimatorConfig.from_dict(ckpt["config"]["estimator"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{_where(ckpt)}: invalid config.estimator ({e.__class__.__name__}: {e})") from None
    if not cfg.refines:
        return None
    return Prologue(build_generators(ckpt)[1]).eval()


def build_generators(ckpt: dict) -> tuple[UNet, UNet]:
    """(G_A clean -> rainy, G_B rainy -> clean) of a checkpoint, in eval mode."""
    try:
        cfg = UNetConfig.from_dict(ckpt["config"]["ntb_unet"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{_where(ckpt)}: invalid config.ntb_unet ({e.__class__.__name__}: {e})") from None
    nets = []
    for key in ("G_A", "G_B"):
        g = UNet(cfg)
        state = _state(ckpt, key)
        check_state_dict(g, state, key, _where(ckpt))
        g.load_state_dict(state)
        nets.append(g.eval())
    return nets[0], nets[1]
