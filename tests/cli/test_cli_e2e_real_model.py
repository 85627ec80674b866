"""ONE end-to-end test through the real Derainer: tiny checkpoint -> ONNX -> rd-run derain / bench.

Skipped, with the reason, where a piece is missing (runtime.derainer, rd_export, the training
fixture ``tiny_checkpoint`` from tests/conftest.py, or onnxruntime).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner


@pytest.fixture(scope="module")
def tiny_onnx(request, tmp_path_factory):
    for module, why in (("runtime.derainer", "runtime/derainer.py is not available"),
                        ("rd_export.export", "rd_export.export.export_onnx is not available"),
                        ("onnxruntime", "onnxruntime is not installed")):
        pytest.importorskip(module, reason=why)
    try:
        ckpt = request.getfixturevalue("tiny_checkpoint")
    except pytest.FixtureLookupError:
        pytest.skip("the tiny_checkpoint fixture (tests/conftest.py) is not available")
    from rd_export.export import export_onnx

    return export_onnx(ckpt, tmp_path_factory.mktemp("tiny_onnx"), steps=2)


def test_derain_and_bench_with_the_real_derainer(tiny_onnx, tmp_path, make_video):
    import runtime.cli as cli
    from runtime.derainer import Derainer

    assert cli.derainer_factory is cli._default_derainer_factory  # the real one, no fake
    rng = np.random.default_rng(0)
    src = tmp_path / "in"
    src.mkdir()
    rgb = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(src / "a.png")
    rgba = np.dstack([rng.integers(0, 256, (37, 45, 3), dtype=np.uint8), np.full((37, 45), 128, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(src / "b.png")  # odd size: padded to the size multiple, cropped back
    make_video(src / "c.mp4", frames=3, fps=5, size=(32, 40), audio=True)

    runner = CliRunner()
    args = ["derain", str(src), "-o", str(tmp_path / "out"), "--engine", str(tiny_onnx), "--steps", "2",
            "--seed", "3", "--json"]
    r = runner.invoke(cli.app, args)
    assert r.exit_code == 0, (r.stdout, r.stderr)
    rep = json.loads(r.stdout)
    assert [f["status"] for f in rep["files"]] == ["ok", "ok", "ok"]
    assert rep["engine"]["backend"] and rep["engine"]["steps"] == 2
    assert not {"noise_scale", "refine_lowpass"} & set(rep["engine"])  # a y-only model: nothing to report
    with Derainer(tiny_onnx, steps=2, seed=3) as d:
        expected = d.derain(rgb)
    with Image.open(tmp_path / "out" / "a.png") as img:
        np.testing.assert_array_equal(np.asarray(img), expected)  # the CLI computes what the library computes
    with Image.open(tmp_path / "out" / "b.png") as img:
        out = np.asarray(img)
    assert out.shape == (37, 45, 4) and (out[..., 3] == 128).all()
    assert rep["files"][2]["frames"] == 3 and rep["files"][2]["audio_streams"] == 1

    r = runner.invoke(cli.app, ["bench", "--engine", str(tiny_onnx), "--size", "32x32", "--steps", "2", "--runs", "2",
                                "--warmup", "1", "--threads", "1", "--json"])
    assert r.exit_code == 0, (r.stdout, r.stderr)
    b = json.loads(r.stdout)
    assert b["backend"] and b["device"] and b["frame_median_ms"] > 0 and b["steps"] == 2


def test_the_report_says_what_the_shipped_model_sampled_with(tmp_path):
    """rd-run derain --json on the shipped predict-and-refine model reports its refine strength, noise
    scale and low-pass (the manifest's, or the options'), so a report is enough to reproduce its output."""
    import runtime.cli as cli

    rng = np.random.default_rng(4)
    (tmp_path / "in").mkdir()
    Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(tmp_path / "in" / "a.png")
    runner = CliRunner()
    for extra, want in (([], (0.5, 0.0, 8.0)),
                        (["--noise-scale", "0.5", "--refine-strength", "1", "--refine-lowpass", "0"], (1.0, 0.5, 0.0))):
        r = runner.invoke(cli.app, ["derain", str(tmp_path / "in"), "-o", str(tmp_path / f"out{len(extra)}"),
                                    "--device", "cpu", "--json", *extra])
        assert r.exit_code == 0, (r.stdout, r.stderr)
        engine = json.loads(r.stdout)["engine"]
        assert (engine["refine_strength"], engine["noise_scale"], engine["refine_lowpass"]) == want
