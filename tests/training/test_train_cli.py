"""``rd-train`` through typer's CliRunner: fit (tiny, 3 steps), resume, sample, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from training.cli import app

runner = CliRunner()


def fit(clean, rainy, out, args):
    """``rd-train fit --clean CLEAN --rainy RAINY --out OUT *args`` through the CliRunner."""
    return runner.invoke(app, ["fit", "--clean", str(clean), "--rainy", str(rainy), "--out", str(out), *args])


def test_fit_resume_and_sample(tmp_path, image_dirs):
    clean, rainy = image_dirs
    run = tmp_path / "run"
    args = ["fit", "--clean", str(clean), "--rainy", str(rainy), "--out", str(run), "--config", "tiny",
            "--crop", "16", "--batch", "2", "--log-every", "1", "--ckpt-every", "2", "--threads", "1"]
    res = runner.invoke(app, [*args, "--steps", "3", "--val-rainy", str(rainy), "--val-clean", str(rainy),
                              "--val-every", "3", "--val-steps", "2", "--val-size", "16"])
    assert res.exit_code == 0, res.output
    assert {"last.pt", "model.pt", "metrics.jsonl", "config.json"} <= {p.name for p in run.iterdir()}
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3]
    assert {"loss", "A_x", "B_xp", "B_y", "A_yp", "cyc", "syn", "id_dist", "it_s", "eta_s"} <= set(train[0])
    val = [r for r in recs if r["kind"] == "val"]
    assert len(val) == 1 and val[0]["psnr_in"] == 100.0  # rainy vs itself: inf, capped
    assert "step 3: loss" in res.output and "val step 3" in res.output

    res = fit(clean, rainy, run, ["--resume", str(run / "last.pt"), "--steps", "4", "--quiet", "--threads", "1"])
    assert res.exit_code == 0, res.output
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if r["kind"] == "train"] == [1, 2, 3, 4]

    img = tmp_path / "in.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (12, 20, 3), dtype=np.uint8)).save(img)
    res = runner.invoke(app, ["sample", str(run / "model.pt"), str(img), "-o", str(tmp_path / "out"),
                              "--steps", "2", "--json", "--threads", "1"])
    assert res.exit_code == 0, res.output
    out = np.asarray(Image.open(tmp_path / "out" / "in.png"))
    assert out.shape == (12, 20, 3)


def test_bad_checkpoint_is_one_line_and_exit_3(tmp_path, image_dirs):
    clean, rainy = image_dirs
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    res = fit(clean, rainy, tmp_path / "r", ["--resume", str(bad)])
    assert res.exit_code == 3
    assert "error:" in res.output and "bad.pt" in res.output and "Traceback" not in res.output
    res = runner.invoke(app, ["sample", str(bad), str(bad), "-o", str(tmp_path)])
    assert res.exit_code == 3


def test_usage_errors_exit_2(tmp_path, image_dirs):
    clean, rainy = image_dirs
    res = fit(clean, rainy, tmp_path / "r", ["--config", "tiny", "--scales", "1,0.3"])
    assert res.exit_code == 2 and "scale 0.3" in res.output
    res = fit(clean, rainy, tmp_path / "r", ["--config", "tiny", "--val-rainy", str(rainy)])
    assert res.exit_code == 2 and "go together" in res.output
    res = runner.invoke(app, ["sample", str(tmp_path / "no.pt"), str(rainy), "-o", str(tmp_path / "s"), "--steps", "1"])
    assert res.exit_code == 2 and "got 1 (a single step" in " ".join(res.output.replace("│", " ").split())
    res = fit(clean, rainy, tmp_path / "r", ["--config", "tiny", "--val-steps", "1"])
    assert res.exit_code == 2 and "val_steps: steps must be an integer >= 2, got 1 (a single step" in res.output
    res = fit(clean, rainy, tmp_path / "r", ["--config", "tiny", "--gen-lr", "0"])
    assert res.exit_code == 2 and "gen_lr must be > 0" in res.output and "Traceback" not in res.output


def test_gen_lr_option_reaches_the_run(tmp_path, image_dirs):
    import torch

    clean, rainy = image_dirs
    run = tmp_path / "run"
    res = fit(clean, rainy, run, ["--config", "tiny", "--crop", "16", "--batch", "2", "--steps", "1", "--lr", "1e-3",
                                  "--gen-lr", "1e-4", "--quiet", "--threads", "1"])
    assert res.exit_code == 0, res.output
    groups = torch.load(run / "last.pt", weights_only=True)["optimizer"]["param_groups"]
    assert [g["lr"] for g in groups] == [1e-4, 1e-3]


def test_init_warm_starts_a_v_residual_run(tmp_path, image_dirs, tiny_checkpoint):
    """--init copies all four networks (step 0, new optimiser) and may switch --prediction."""
    import torch

    from training.checkpoint import build_estimator, build_generators, load_checkpoint

    clean, rainy = image_dirs
    run = tmp_path / "warm"
    res = fit(clean, rainy, run, ["--init", str(tiny_checkpoint), "--prediction", "v_residual", "--steps", "1",
                              "--crop", "16", "--batch", "2", "--lr", "1e-12", "--quiet", "--threads", "1"])
    assert res.exit_code == 0, res.output
    src, dst = load_checkpoint(tiny_checkpoint), load_checkpoint(run / "model.pt")
    assert dst["step"] == 1 and dst["config"]["estimator"]["prediction"] == "v_residual"
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["init"] == str(tiny_checkpoint) and cfg["train"]["preset"] == "tiny"
    for a, b in zip(build_generators(src), build_generators(dst)):  # lr ~ 0: the weights came across
        for (k, p), q in zip(a.state_dict().items(), b.state_dict().values()):
            torch.testing.assert_close(p, q, atol=1e-6, rtol=0, msg=k)
    ea, eb = build_estimator(src, "derain"), build_estimator(dst, "derain")
    assert eb.to_eps is not None and ea.to_eps is None
    for (k, p), q in zip(ea.state_dict().items(), eb.state_dict().values()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0, msg=k)

    res = fit(clean, rainy, tmp_path / "x", ["--init", str(tiny_checkpoint), "--resume",
                                             str(tiny_checkpoint.parent / "last.pt"), "--steps", "1", "--quiet"])
    assert res.exit_code == 2 and "--init starts a new run" in res.output
    res = fit(clean, rainy, tmp_path / "y", ["--init", str(tiny_checkpoint), "--scales", "1", "--steps", "1",
                                             "--quiet"])
    assert res.exit_code == 2 and "--init takes the model's shape" in res.output


def test_lambda_adv_adds_discriminators_to_a_warm_start(tmp_path, image_dirs, tiny_checkpoint):
    """--init + --lambda-adv: the checkpoint has no discriminators, so they start fresh; last.pt keeps
    them and their optimiser, model.pt (what ships) does not."""
    import torch

    clean, rainy = image_dirs
    run = tmp_path / "gan"
    res = fit(clean, rainy, run, ["--init", str(tiny_checkpoint), "--ntb", "render", "--lambda-adv", "0.1",
                              "--lambda-idt", "0.5", "--steps", "2", "--crop", "16", "--batch", "2", "--quiet",
                              "--threads", "1"])
    assert res.exit_code == 0, res.output
    last = torch.load(run / "last.pt", weights_only=True)
    assert last["config"]["train"]["lambda_adv"] == 0.1 and "optimizer_disc" in last
    assert last["config"]["train"]["lambda_idt"] == 0.5
    assert {"D_clean.net.0.weight", "D_rainy.net.0.weight"} <= set(last["state"]["disc"])
    assert "disc" not in torch.load(run / "model.pt", weights_only=True)["state"]
    rec = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert rec["adv"] > 0 and rec["D"] > 0
    res = fit(clean, rainy, tmp_path / "bad", ["--config", "tiny", "--lambda-adv", "-1", "--steps", "1", "--quiet"])
    assert res.exit_code == 2 and "lambda_adv must be >= 0" in res.output


def test_score_distillation_options(tmp_path, image_dirs, tiny_checkpoint):
    """--cond-drop + --lambda-sds (issue 8 candidate 1) reach the run's config and its logged terms;
    --lambda-sds without condition dropout has no prior to distil and is refused."""
    import torch

    clean, rainy = image_dirs
    run = tmp_path / "sds"
    common = ["--steps", "2", "--crop", "16", "--batch", "2", "--quiet", "--threads", "1", "--log-every", "1"]
    res = fit(clean, rainy, run, [*common, "--init", str(tiny_checkpoint), "--ntb", "render", "--cond-drop", "0.2",
                                  "--lambda-sds", "1"])
    assert res.exit_code == 0, res.output
    train = torch.load(run / "last.pt", weights_only=True)["config"]["train"]
    assert (train["cond_drop"], train["lambda_sds"]) == (0.2, 1.0)
    rec = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert rec["sds"] > 0
    res = fit(clean, rainy, tmp_path / "bad", [*common, "--config", "tiny", "--lambda-sds", "1"])
    assert res.exit_code == 2 and "lambda_sds needs cond_drop > 0" in res.output


@pytest.mark.gpu
def test_fit_on_cuda_with_the_sds_recipe_saves_a_cpu_checkpoint(tmp_path, image_dirs):
    """rd-train fit --device cuda (bf16 autocast, batched calls, render + SDS): finite losses, and
    model.pt / last.pt hold CPU tensors (a plain torch.load works without a GPU)."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    clean, rainy = image_dirs
    run = tmp_path / "run"
    res = fit(clean, rainy, run, ["--config", "tiny", "--crop", "16", "--batch", "4", "--steps", "4", "--ntb", "render",
                                  "--prediction", "v_residual", "--cond-drop", "0.2", "--lambda-sds", "10",
                                  "--device", "cuda", "--log-every", "1", "--ckpt-every", "2", "--quiet"])
    assert res.exit_code == 0, res.output
    train = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"train"' in x]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    assert all(np.isfinite(r[k]) for r in train for k in ("loss", "A_x", "B_xp", "B_y", "A_yp", "sds"))
    for name in ("model.pt", "last.pt"):
        ck = torch.load(run / name, map_location=None, weights_only=True)
        devices = {t.device.type for net in ck["state"].values() for t in net.values()}
        assert devices == {"cpu"}, name


def test_snapshot_every_keeps_the_stripped_model_along_the_run(tmp_path, image_dirs):
    import torch

    clean, rainy = image_dirs
    run = tmp_path / "run"
    res = fit(clean, rainy, run, ["--config", "tiny", "--crop", "16", "--batch", "2", "--steps", "5",
                                  "--snapshot-every", "2", "--ckpt-every", "100", "--quiet", "--threads", "1"])
    assert res.exit_code == 0, res.output
    snaps = sorted(p.name for p in run.glob("snap_*.pt"))
    assert snaps == ["snap_000002.pt", "snap_000004.pt"]  # not at 5: a checkpoint step, not a snapshot step
    for name, step in zip(snaps, (2, 4)):
        ck = torch.load(run / name, weights_only=True)
        assert ck["step"] == step and set(ck["state"]) == {"G_A", "G_B", "ema_A", "ema_B"}
    assert torch.load(run / "model.pt", weights_only=True)["step"] == 5
    res = fit(clean, rainy, tmp_path / "bad", ["--config", "tiny", "--snapshot-every", "-1"])
    assert res.exit_code == 2 and "snapshot_every must be an integer >= 0" in res.output


# --------------------------------------------------------------------------- field test (issue 21)


def test_an_existing_run_is_not_overwritten_without_resume_or_overwrite(tmp_path, image_dirs):
    """Field test, issue 21 point 2: fit into a folder holding a run started at step 0 and replaced it."""
    clean, rainy = image_dirs
    run = tmp_path / "run"
    common = ["--config", "tiny", "--crop", "16", "--batch", "2", "--quiet", "--threads", "1"]
    assert fit(clean, rainy, run, [*common, "--steps", "2"]).exit_code == 0
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in run.iterdir()}
    res = fit(clean, rainy, run, [*common, "--steps", "1"])
    assert res.exit_code == 2, res.output
    line = " ".join(res.output.split())
    assert "already holds a training run" in line and f"--resume {run / 'last.pt'}" in line and "--overwrite" in line
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in run.iterdir()} == before  # untouched
    res = fit(clean, rainy, tmp_path / "other", [*common, "--steps", "3", "--resume", str(run / "last.pt")])
    assert res.exit_code == 0, res.output  # resuming into an empty folder is fine
    res = fit(clean, rainy, tmp_path / "other", [*common, "--steps", "4", "--resume", str(run / "last.pt")])
    assert res.exit_code == 2 and "another training run" in res.output  # but not over another run
    res = fit(clean, rainy, run, [*common, "--steps", "1", "--overwrite", "--resume", str(run / "last.pt")])
    assert res.exit_code == 2 and "pass one of them" in res.output

    res = fit(clean, rainy, run, [*common, "--steps", "3", "--resume", str(run / "last.pt")])
    assert res.exit_code == 0, res.output  # --resume continues it
    res = fit(clean, rainy, run, [*common, "--steps", "1", "--overwrite"])
    assert res.exit_code == 0, res.output
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if r["kind"] == "train"] == [1]  # a fresh run, not appended to the old one
    import torch

    assert torch.load(run / "last.pt", weights_only=True)["step"] == 1


def test_tiny_is_fast_at_its_own_defaults(tmp_path, image_dirs, monkeypatch):
    """Field test, issue 21 point 10: --config tiny took ~45-100 s and 8-10 GB a step at crop 128
    (self-attention over 4,096 tokens); its defaults are now crop 32 / batch 4 / val-size 32."""
    import training.train as train_mod

    seen = {}

    def fake_fit(clean, rainy, out, *, train, models, **kw):
        seen["train"], seen["models"] = train, models
        raise SystemExit(0)

    monkeypatch.setattr(train_mod, "fit", fake_fit)
    clean, rainy = image_dirs
    fit(clean, rainy, tmp_path / "a", ["--config", "tiny"])
    t = seen["train"]
    assert (t.crop, t.batch, t.val_size, t.preset) == (32, 4, 32, "tiny")
    fit(clean, rainy, tmp_path / "b", ["--config", "tiny", "--crop", "64", "--batch", "2"])
    assert (seen["train"].crop, seen["train"].batch) == (64, 2)  # explicit options win
    fit(clean, rainy, tmp_path / "c", ["--config", "small"])
    assert (seen["train"].crop, seen["train"].val_size) == (128, 128)  # the other presets keep the paper's
    help_text = " ".join(runner.invoke(app, ["fit", "--help"]).output.split())
    assert "crop 32, batch 4 and val-size 32 unless given" in help_text


@pytest.mark.parametrize("args", [["-h"], ["fit", "-h"], ["sample", "-h"]])
def test_rd_train_takes_h(args):
    res = runner.invoke(app, args)
    assert res.exit_code == 0 and "Usage:" in res.output


@pytest.mark.parametrize("args", [["fit", "--bogus"], ["sample", "missing.pt", "x.png", "-o", "o"],
                                  ["fit", "--clean", "nowhere", "--rainy", "nowhere", "--out", "r"], ["nope"]])
def test_rd_train_usage_errors_are_one_line(args):
    res = runner.invoke(app, args)
    assert res.exit_code == 2
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "--help" in lines[0], res.stderr
    assert not any(c in res.stderr for c in "╭│╰")


def test_rd_train_help_states_the_step_range_and_the_prediction_default():
    fit_help = " ".join(runner.invoke(app, ["fit", "--help"]).output.split())
    assert "Default: eps" in fit_help and "[eps]" in fit_help  # rich markup used to swallow "[eps]"
    assert "2..1000" in fit_help  # --val-steps
    sample_help = " ".join(runner.invoke(app, ["sample", "--help"]).output.split())
    assert "2..1000" in sample_help


def test_a_predict_and_refine_run_on_several_clean_folders(tmp_path, image_dirs):
    """--clean twice (both folders' images are used), a 6-channel refine model with x0_residual,
    --rain-style v3, validation through the prologue; the checkpoint exports two graphs' worth."""
    import shutil

    clean, rainy = image_dirs
    second = tmp_path / "more_clean"
    shutil.copytree(clean, second)
    run = tmp_path / "run"
    res = runner.invoke(app, ["fit", "--clean", str(clean), "--clean", str(second), "--rainy", str(rainy),
                              "--out", str(run), "--config", "tiny", "--ntb", "render", "--detach-cond",
                              "--rain-style", "v3", "--prediction", "x0_residual", "--condition", "refine",
                              "--steps", "2", "--crop", "16",
                              "--batch", "2", "--threads", "1", "--val-rainy", str(rainy), "--val-clean",
                              str(rainy), "--val-every", "2", "--val-steps", "2", "--val-size", "16", "--quiet"])
    assert res.exit_code == 0, res.output
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["train"]["rain_style"] == "v3" and cfg["estimator"]["prediction"] == "x0_residual"
    assert cfg["estimator"]["cond_channels"] == 6 and cfg["unet"]["in_channels"] == 9
    val = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
           if json.loads(line)["kind"] == "val"]
    assert val and np.isfinite(val[-1]["psnr"])
    bad = runner.invoke(app, ["fit", "--clean", str(clean), "--clean", str(tmp_path / "nope"), "--rainy", str(rainy),
                              "--out", str(tmp_path / "r2"), "--config", "tiny"])
    assert bad.exit_code == 2 and "nope" in bad.output
    bad = runner.invoke(app, ["fit", "--clean", str(clean), "--rainy", str(rainy), "--out", str(tmp_path / "r3"),
                              "--config", "tiny", "--rain-style", "v9"])
    assert bad.exit_code == 2 and "rain_style must be one of v1, v2, v3" in " ".join(bad.output.split())


def test_freeze_ntb_trains_the_estimators_only(tmp_path, image_dirs):
    import torch

    from training.checkpoint import load_checkpoint

    clean, rainy = image_dirs
    run = tmp_path / "run"
    res = fit(clean, rainy, run, ["--config", "tiny", "--ntb", "render", "--freeze-ntb", "--steps", "2", "--crop",
                                  "16", "--batch", "2", "--threads", "1", "--quiet", "--seed", "3"])
    assert res.exit_code == 0, res.output
    ck = load_checkpoint(run / "last.pt")
    assert ck["config"]["train"]["freeze_ntb"] is True
    from training.algorithm import RainDiffusion
    from training.checkpoint import model_configs

    torch.manual_seed(3)  # the run's initial weights: the same seed builds the same fresh model
    fresh = RainDiffusion(model_configs(ck))
    for name in ("G_A", "G_B"):
        for k, v in fresh.state_dict().items():
            if k.startswith(name + "."):
                assert torch.equal(ck["state"][name][k[len(name) + 1:]], v), k
    assert any(not torch.equal(ck["state"]["eps_A"][k], v) for k, v in fresh.eps_A.state_dict().items())
