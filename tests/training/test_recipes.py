"""``rd-train fit --recipe NAME``: named, documented settings; explicit options win; the run records it."""

from __future__ import annotations

import json
import shlex

import pytest
from typer.testing import CliRunner

from runtime.errors import UsageError
from training.cli import app
from training.config import TrainConfig
from training.recipes import RECIPES, get_recipe, recipe_flags

runner = CliRunner()


def _fit(clean, rainy, out, args):
    return runner.invoke(app, ["fit", "--clean", str(clean), "--rainy", str(rainy), "--out", str(out), *args])


@pytest.fixture
def planned(monkeypatch):
    """What ``rd-train fit`` would train (TrainConfig, ModelConfigs), without training."""
    import training.train as train_mod

    seen: dict = {}

    def fake_fit(clean, rainy, out, *, train, models, **kw):
        seen["train"], seen["models"] = train, models
        raise SystemExit(0)

    monkeypatch.setattr(train_mod, "fit", fake_fit)
    return seen


def test_the_recipes_are_the_documented_settings():
    paper = get_recipe("paper")  # Algorithm 1 exactly
    assert (paper.preset, paper.prediction) == ("small", "eps")
    t = TrainConfig(**paper.train)
    assert (t.ntb, t.lambda_cyc, t.lr, t.gen_lr, t.beta1, t.beta2, t.batch, t.crop) == \
        ("faithful", 1.0, 2e-5, None, 0.5, 0.999, 4, 128)
    assert (t.grad_clip, t.detach_cond, t.lambda_adv, t.lambda_idt, t.cond_drop, t.lambda_sds) == \
        (0.0, False, 0.0, 0.0, 0.0, 0.0)
    edge = get_recipe("edge")
    assert (edge.preset, edge.prediction) == ("edge", None)  # the edge preset's own x0_residual
    assert dict(edge.train) == {"ntb": "render", "detach_cond": True, "crop": 64, "batch": 8, "lr": 1e-4,
                                "gen_lr": 5e-5}
    sds = get_recipe("sds")
    assert (sds.preset, sds.prediction) == ("small", "v_residual")
    assert dict(sds.train) == {"ntb": "render", "cond_drop": 0.2, "lambda_sds": 10.0, "lr": 1e-4, "crop": 64,
                               "batch": 4}
    for r in RECIPES.values():
        TrainConfig(**r.train)  # each is a valid configuration on its own
    refine = get_recipe("edge-refine")  # the shipped model's last stage: the refiner on a fixed predictor
    assert refine.preset == "edge" and refine.train["freeze_ntb"] is True and refine.train["ntb"] == "render"
    assert refine.train["rain_style"] == "v4"  # the renders its predictor was last trained on
    with pytest.raises(UsageError, match="recipe 'nope' is not one of paper, edge, edge-refine, sds"):
        get_recipe("nope")


@pytest.mark.parametrize("name", list(RECIPES))
def test_a_recipe_is_the_options_it_lists(name, planned, tmp_path, image_dirs):
    """``--recipe NAME`` trains what typing ``recipe_flags`` would (every listed option exists)."""
    clean, rainy = image_dirs
    _fit(clean, rainy, tmp_path / "a", ["--recipe", name])
    by_recipe = planned["train"].to_dict(), planned["models"].to_dict()
    res = _fit(clean, rainy, tmp_path / "b", shlex.split(recipe_flags(get_recipe(name))))
    assert res.exit_code == 0, res.output
    by_flags = planned["train"].to_dict(), planned["models"].to_dict()
    assert by_recipe[0]["recipe"] == name and by_flags[0]["recipe"] is None
    assert {**by_recipe[0], "recipe": None} == by_flags[0] and by_recipe[1] == by_flags[1]


def test_explicit_options_override_the_recipe(planned, tmp_path, image_dirs):
    clean, rainy = image_dirs
    _fit(clean, rainy, tmp_path / "a", ["--recipe", "paper", "--config", "tiny", "--crop", "16", "--lr", "1e-3"])
    t, m = planned["train"], planned["models"]
    assert (t.recipe, t.preset, t.crop, t.lr, t.ntb, t.batch) == ("paper", "tiny", 16, 1e-3, "faithful", 4)
    assert t.val_size == 32  # tiny's own default where the recipe says nothing
    assert m.estimator.prediction == "eps"
    _fit(clean, rainy, tmp_path / "b", ["--recipe", "edge", "--prediction", "v_residual", "--no-detach-cond"])
    t, m = planned["train"], planned["models"]
    assert (t.preset, t.detach_cond, t.gen_lr, m.estimator.prediction, m.estimator.cond_channels) == \
        ("edge", False, 5e-5, "v_residual", 6)
    _fit(clean, rainy, tmp_path / "c", ["--recipe", "sds", "--lambda-sds", "3"])
    assert (planned["train"].lambda_sds, planned["train"].cond_drop) == (3.0, 0.2)


def test_the_run_records_its_recipe_and_resume_keeps_it(tmp_path, image_dirs):
    clean, rainy = image_dirs
    run = tmp_path / "run"
    small = ["--config", "tiny", "--crop", "16", "--batch", "2", "--quiet", "--threads", "1"]
    res = _fit(clean, rainy, run, ["--recipe", "paper", *small, "--steps", "1"])
    assert res.exit_code == 0, res.output
    cfg = json.loads((run / "config.json").read_text())["train"]
    assert (cfg["recipe"], cfg["ntb"], cfg["grad_clip"], cfg["crop"]) == ("paper", "faithful", 0.0, 16)
    last = str(run / "last.pt")
    res = _fit(clean, rainy, run, ["--resume", last, "--recipe", "edge", "--steps", "2", "--quiet"])
    assert res.exit_code == 2 and "--recipe edge differs from the checkpoint's recipe 'paper'" in res.output
    res = _fit(clean, rainy, run, ["--resume", last, "--recipe", "paper", "--steps", "2", "--quiet",
                                   "--threads", "1"])
    assert res.exit_code == 0, res.output
    assert json.loads((run / "config.json").read_text())["train"]["recipe"] == "paper"


def test_checkpoints_from_before_recipes_have_none(tiny_checkpoint, tmp_path, image_dirs):
    import torch

    from training.checkpoint import load_checkpoint

    ckpt = load_checkpoint(tiny_checkpoint)
    old = {k: v for k, v in ckpt["config"]["train"].items() if k != "recipe"}
    assert TrainConfig.from_dict(old).recipe is None
    # a run started before --recipe existed resumes, and refuses a recipe it never had
    last = torch.load(tiny_checkpoint.parent / "last.pt", weights_only=True)
    last["config"]["train"].pop("recipe", None)
    torch.save(last, tmp_path / "old.pt")
    clean, rainy = image_dirs
    res = _fit(clean, rainy, tmp_path / "r", ["--resume", str(tmp_path / "old.pt"), "--recipe", "paper", "--quiet"])
    assert res.exit_code == 2 and "differs from the checkpoint's recipe None" in res.output


def test_init_refuses_a_recipe_for_another_model(tmp_path, image_dirs, tiny_checkpoint):
    clean, rainy = image_dirs
    res = _fit(clean, rainy, tmp_path / "r", ["--init", str(tiny_checkpoint), "--recipe", "edge", "--quiet"])
    assert res.exit_code == 2 and "--recipe edge trains the edge model, but --init" in res.output
    assert "holds a tiny model" in " ".join(res.output.split())


def test_rd_train_recipes_lists_them():
    res = runner.invoke(app, ["recipes", "--json"])
    assert res.exit_code == 0
    listed = json.loads(res.stdout)
    assert list(listed) == list(RECIPES)
    assert listed["edge"]["options"] == "--config edge --ntb render --detach-cond --crop 64 --batch 8 --lr 0.0001 " \
                                        "--gen-lr 5e-05"
    text = runner.invoke(app, ["recipes"]).stdout
    assert "paper: Algorithm 1 exactly" in text
    assert "--recipe <paper|edge|edge-refine|sds>" in runner.invoke(app, ["fit", "--help"]).output
