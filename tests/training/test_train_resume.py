"""Resume equivalence: 2N steps == N steps, save, resume, N more (same data order and RNG)."""

from __future__ import annotations

import json

import pytest
import torch

from runtime.errors import CheckpointError, UsageError
from training.config import TrainConfig
from training.train import fit, resolve_train_config


def params_and_optimizer(path):
    ck = torch.load(path, weights_only=True)
    return ck


def records(run_dir):
    out = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        out.append({k: v for k, v in r.items() if k not in ("it_s", "eta_s", "time")})
    return out


@pytest.mark.parametrize("ntb,lambda_adv", [("synthetic", 0.0), ("faithful", 0.0), ("render", 0.1)])
def test_resume_is_equivalent(tmp_path, image_dirs, ntb, lambda_adv):
    clean, rainy = image_dirs
    cfg = dict(preset="tiny", batch=2, crop=16, log_every=1, seed=5, ntb=ntb, lambda_adv=lambda_adv)
    full = fit(clean, rainy, tmp_path / "full", train=TrainConfig(steps=4, ckpt_every=4, **cfg))
    fit(clean, rainy, tmp_path / "split", train=TrainConfig(steps=2, ckpt_every=2, **cfg))
    resumed_cfg = resolve_train_config(tmp_path / "split" / "last.pt", {"steps": 4})
    assert resumed_cfg.seed == 5 and resumed_cfg.ntb == ntb  # the checkpoint's config, steps overridden
    part = fit(clean, rainy, tmp_path / "split", train=resumed_cfg, resume=tmp_path / "split" / "last.pt")
    assert full.step == part.step == 4
    a, b = params_and_optimizer(full.last), params_and_optimizer(part.last)
    for net in ("G_A", "G_B", "eps_A", "eps_B", "ema_A", "ema_B"):
        for k, v in a["state"][net].items():
            assert torch.equal(v, b["state"][net][k]), f"{net}.{k} differs after resume"
    for pid, st in a["optimizer"]["state"].items():
        assert torch.equal(st["exp_avg"], b["optimizer"]["state"][pid]["exp_avg"])
    assert a["ema_updates"] == b["ema_updates"] == 4
    assert ("disc" in a["state"]) == ("optimizer_disc" in a) == (lambda_adv > 0)
    if lambda_adv > 0:  # the discriminators and their optimiser resume too
        for k, v in a["state"]["disc"].items():
            assert torch.equal(v, b["state"]["disc"][k]), f"disc.{k} differs after resume"
        for pid, st in a["optimizer_disc"]["state"].items():
            assert torch.equal(st["exp_avg"], b["optimizer_disc"]["state"][pid]["exp_avg"])
        assert "disc" not in torch.load(full.model, weights_only=True)["state"]  # not shipped
    assert records(tmp_path / "full") == records(tmp_path / "split")  # log truncated and continued


def test_stripped_model_cannot_be_resumed(tiny_checkpoint):
    with pytest.raises(CheckpointError, match=r"last\.pt"):
        resolve_train_config(tiny_checkpoint, {})


def test_preset_must_match_on_resume(tiny_checkpoint):
    with pytest.raises(UsageError, match="differs from the checkpoint"):
        resolve_train_config(tiny_checkpoint.parent / "last.pt", {}, preset="small")
    cfg = resolve_train_config(tiny_checkpoint.parent / "last.pt", {"steps": 9}, preset="tiny")
    assert cfg.steps == 9 and cfg.crop == 32
