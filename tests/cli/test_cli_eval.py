"""rd-run eval on tiny synthetic pairs whose PSNR is known, with a FAKE derainer that only darkens."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

import runtime.cli as cli

metrics = pytest.importorskip("runtime.metrics", reason="runtime.metrics (the training engineer's) is not there yet")


class DarkenFake:
    """Not a model: subtracts 10 from every channel, the 'gain' a brightness shift alone gives."""

    backend_name = "fake-darken"
    manifest = None
    steps = 2

    def __init__(self, artifact=None, **kw):
        pass

    def derain(self, frame, *, bgr=False):
        return np.clip(frame.astype(int) - 10, 0, 255).astype(np.uint8)


def _y(rgb: np.ndarray) -> np.ndarray:
    """BT.601 luma as MATLAB's rgb2ycbcr (16..235), rounded: the papers' Y."""
    r, g, b = (rgb[..., i].astype(np.float64) for i in range(3))
    return np.round(16 + (65.481 * r + 128.553 * g + 24.966 * b) / 255)


def _known_psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((_y(a) - _y(b)) ** 2)
    return 10 * math.log10(255**2 / mse)


def _pair(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    clean = rng.integers(40, 180, (16, 24, 3), dtype=np.uint8)
    rainy = clean.copy()
    rainy[:, ::3] += 60  # bright streaks every third column
    return rainy, clean


@pytest.fixture
def pairs(tmp_path):
    (tmp_path / "rainy").mkdir()
    (tmp_path / "clean").mkdir()
    data = {}
    for name, seed in (("2", 2), ("10", 10)):
        rainy, clean = _pair(seed)
        Image.fromarray(rainy).save(tmp_path / "rainy" / f"{name}.png")
        Image.fromarray(clean).save(tmp_path / "clean" / f"{name}.png")  # lossless: known values
        data[name] = (rainy, clean)
    Image.fromarray(_pair(3)[0]).save(tmp_path / "rainy" / "orphan.png")
    Image.fromarray(_pair(4)[1]).save(tmp_path / "clean" / "lonely.png")
    return tmp_path, data


def test_eval_scores_and_baselines(pairs, rd_run, monkeypatch):
    root, data = pairs
    monkeypatch.setattr(cli, "derainer_factory", DarkenFake)
    r = rd_run("eval", "--rainy", root / "rainy", "--clean", root / "clean", "--json", "--save", root / "panels")
    assert r.code == 0, r
    rep = r.json
    assert [p["name"] for p in rep["pairs"]] == ["2", "10"]  # natural order
    for p in rep["pairs"]:
        rainy, clean = data[p["name"]]
        derained = np.clip(rainy.astype(int) - 10, 0, 255).astype(np.uint8)
        assert p["psnr"] == pytest.approx(_known_psnr(derained, clean), abs=1e-3)
        assert p["psnr_rainy"] == pytest.approx(_known_psnr(rainy, clean), abs=1e-3)
        matched = metrics.brightness_matched(rainy, clean)
        assert p["psnr_matched"] == pytest.approx(_known_psnr(matched, clean), abs=1e-3)
        assert p["psnr_matched"] > p["psnr_rainy"]  # rain brightens: the shift alone gains
        assert p["ssim"] == pytest.approx(metrics.ssim_y(derained, clean), abs=1e-4)
        assert 0 < p["ssim_rainy"] < 1
        with Image.open(p["panel"]) as img:
            panel = np.asarray(img)
        assert panel.shape == (16, 72, 3)
        np.testing.assert_array_equal(panel[:, :24], rainy)
        np.testing.assert_array_equal(panel[:, 24:48], derained)
        np.testing.assert_array_equal(panel[:, 48:], clean)
    mean = rep["mean"]
    assert mean["psnr"] == pytest.approx(np.mean([p["psnr"] for p in rep["pairs"]]), abs=1e-3)
    assert mean["psnr_gain_over_matched"] == pytest.approx(mean["psnr"] - mean["psnr_matched"], abs=1e-3)
    assert len(rep["problems"]) == 2
    assert any("orphan.png: no clean partner" in s for s in rep["problems"])
    assert any("lonely.png: no rainy partner" in s for s in rep["problems"])
    assert "brightness-matched input" in r.stderr and "rd-run: warning:" in r.stderr
    assert rep["engine"]["backend"] == "fake-darken"


def test_eval_limit_and_size_mismatch(pairs, rd_run, monkeypatch):
    root, _ = pairs
    monkeypatch.setattr(cli, "derainer_factory", DarkenFake)
    r = rd_run("eval", "--rainy", root / "rainy", "--clean", root / "clean", "--json", "--limit", "1")
    assert r.code == 0 and len(r.json["pairs"]) == 1
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "clean" / "2.png")
    r = rd_run("eval", "--rainy", root / "rainy", "--clean", root / "clean", "--json")
    assert r.code == 7, r
    bad = r.json["pairs"][0]
    assert bad["status"] == "failed" and "differ in size" in bad["error"]
    assert r.json["pairs"][1]["status"] == "ok" and r.json["count"]["scored"] == 1


def test_eval_without_pairs_is_an_input_error(tmp_path, rd_run):
    (tmp_path / "r").mkdir()
    (tmp_path / "c").mkdir()
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "r" / "a.png")
    r = rd_run("eval", "--rainy", tmp_path / "r", "--clean", tmp_path / "c")
    assert r.code == 3 and "rd-run: error: no rainy/clean pairs" in r.stderr
