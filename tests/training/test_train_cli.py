"""``rd-train`` through typer's CliRunner: fit (tiny, 3 steps), resume, sample, errors."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image
from typer.testing import CliRunner

from training.cli import app

runner = CliRunner()


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

    res = runner.invoke(app, ["fit", "--clean", str(clean), "--rainy", str(rainy), "--out", str(run),
                              "--resume", str(run / "last.pt"), "--steps", "4", "--quiet", "--threads", "1"])
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
    res = runner.invoke(app, ["fit", "--clean", str(clean), "--rainy", str(rainy), "--out", str(tmp_path / "r"),
                              "--resume", str(bad)])
    assert res.exit_code == 3
    assert "error:" in res.output and "bad.pt" in res.output and "Traceback" not in res.output
    res = runner.invoke(app, ["sample", str(bad), str(bad), "-o", str(tmp_path)])
    assert res.exit_code == 3


def test_usage_errors_exit_2(tmp_path, image_dirs):
    clean, rainy = image_dirs
    res = runner.invoke(app, ["fit", "--clean", str(clean), "--rainy", str(rainy), "--out", str(tmp_path / "r"),
                              "--config", "tiny", "--scales", "1,0.3"])
    assert res.exit_code == 2 and "scale 0.3" in res.output
    res = runner.invoke(app, ["fit", "--clean", str(clean), "--rainy", str(rainy), "--out", str(tmp_path / "r"),
                              "--config", "tiny", "--val-rainy", str(rainy)])
    assert res.exit_code == 2 and "go together" in res.output
