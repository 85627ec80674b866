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


def test_gen_lr_sets_the_generators_step_only():
    """Adam's first step moves each parameter by at most its group's lr (|m / sqrt(v)| <= 1), by ~lr
    where the gradient is not tiny: the generators' bound is gen_lr, the estimators' lr. The output
    convolutions are randomised first: at the zero init every generator is the identity, where the
    cycle L1 and the zero-init estimators give some networks no gradient at all."""
    from training.algorithm import RainDiffusion, algorithm1_step
    from training.config import model_preset
    from training.train import param_groups

    torch.manual_seed(0)
    model = RainDiffusion(model_preset("tiny"))
    for net in (model.G_A, model.G_B, model.eps_A.unet, model.eps_B.unet):
        torch.nn.init.normal_(net.out_conv.weight, std=0.05)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.Adam(param_groups(model, TrainConfig(lr=1e-3, gen_lr=1e-5)), betas=(0.5, 0.999))
    x, y = torch.rand(2, 2, 3, 16, 16) * 2 - 1
    algorithm1_step(model, opt, x, y, ntb="faithful")
    for net, lr in (("G_A", 1e-5), ("G_B", 1e-5), ("eps_A", 1e-3), ("eps_B", 1e-3)):
        delta = max(float((v - before[k]).abs().max()) for k, v in model.state_dict().items()
                    if k.startswith(net + ".") and v.is_floating_point())
        assert 0.5 * lr < delta <= 1.01 * lr, (net, delta)  # 1%: float32 rounding of the weights


def test_gen_lr_reaches_the_optimiser_and_the_run_config(tmp_path, image_dirs):
    clean, rainy = image_dirs
    cfg = dict(preset="tiny", batch=2, crop=16, seed=3, lr=1e-3)
    run = fit(clean, rainy, tmp_path / "one", train=TrainConfig(steps=1, ckpt_every=1, gen_lr=1e-5, **cfg))
    assert [g["lr"] for g in params_and_optimizer(run.last)["optimizer"]["param_groups"]] == [1e-5, 1e-3]
    assert json.loads((tmp_path / "one" / "config.json").read_text())["train"]["gen_lr"] == 1e-5
    resumed = resolve_train_config(run.last, {"steps": 2, "lr": 2e-3})  # gen_lr stays, lr changes
    run = fit(clean, rainy, tmp_path / "one", train=resumed, resume=run.last)
    assert [g["lr"] for g in params_and_optimizer(run.last)["optimizer"]["param_groups"]] == [1e-5, 2e-3]
    with pytest.raises(UsageError, match="gen_lr must be > 0"):
        TrainConfig(gen_lr=0.0)


def test_resume_of_a_single_group_checkpoint(tmp_path, image_dirs):
    """Checkpoints written before --gen-lr hold one optimiser group: resuming splits it, keeps every
    parameter's Adam state, and continues exactly like a run that never stopped."""
    clean, rainy = image_dirs
    cfg = dict(preset="tiny", batch=2, crop=16, log_every=1, seed=5)
    full = fit(clean, rainy, tmp_path / "full", train=TrainConfig(steps=3, ckpt_every=3, **cfg))
    split = fit(clean, rainy, tmp_path / "split", train=TrainConfig(steps=2, ckpt_every=2, **cfg))
    old = torch.load(split.last, weights_only=True)
    groups = old["optimizer"]["param_groups"]
    assert len(groups) == 2
    old["optimizer"]["param_groups"] = [{**groups[0], "params": groups[0]["params"] + groups[1]["params"]}]
    torch.save(old, split.last)
    part = fit(clean, rainy, tmp_path / "split", train=resolve_train_config(split.last, {"steps": 3}),
               resume=split.last)
    a, b = params_and_optimizer(full.last), params_and_optimizer(part.last)
    for net in ("G_A", "G_B", "eps_A", "eps_B"):
        for k, v in a["state"][net].items():
            assert torch.equal(v, b["state"][net][k]), f"{net}.{k} differs after resume"
    assert len(b["optimizer"]["param_groups"]) == 2


def test_split_param_groups_refuses_a_foreign_optimizer_state():
    from training.train import split_param_groups

    state = {"state": {}, "param_groups": [{"lr": 1.0, "params": [0, 1, 2]}]}
    out = split_param_groups(state, [1, 2])
    assert [g["params"] for g in out["param_groups"]] == [[0], [1, 2]]
    assert state["param_groups"][0]["params"] == [0, 1, 2]  # the input is not modified
    assert split_param_groups(out, [1, 2]) is out
    with pytest.raises(CheckpointError, match=r"1 parameter group\(s\) of \[3\] parameters; this model needs \[2, 2\]"):
        split_param_groups(state, [2, 2])
