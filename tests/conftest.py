"""Shared fixtures. ``tiny_checkpoint`` trains the tiny config for a few steps (seconds on CPU)."""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# pytest's default "prepend" import mode puts tests/ (and tests/<pkg>/) on sys.path; the folders
# tests/training and tests/runtime would then shadow the real packages as namespace packages
# (the editable install's finder runs after the path finder). Put the repository root first.
_ROOT = str(Path(__file__).resolve().parents[1])
if sys.path[:1] != [_ROOT]:
    sys.path.insert(0, _ROOT)

# The runtime's default device is "auto" (OpenVINO in BF16 on a CPU with native BF16, else
# onnxruntime), so which engine an unpinned test meets would depend on the machine. The suite pins
# onnxruntime, in this process and the CLIs it starts, the way a user pins it (RD_DEVICE); the
# tests of the default itself unset it (tests/runtime/test_default_device.py), and OpenVINO's own
# tests name their device.
os.environ["RD_DEVICE"] = "cpu"
# OpenVINO's compile cache (runtime.backends.openvino.cache_dir) goes to a folder of this run, not
# the user's ~/.cache: the tests of the cache itself name their own.
if "RD_OPENVINO_CACHE" not in os.environ:
    os.environ["RD_OPENVINO_CACHE"] = tempfile.mkdtemp(prefix="rd_ov_cache_")
    atexit.register(shutil.rmtree, os.environ["RD_OPENVINO_CACHE"], ignore_errors=True)


def make_scene(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A smooth synthetic 'photo' (gradients + a few rectangles), uint8 HxWx3."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    img = np.empty((h, w, 3))
    for c in range(3):
        a, b, p = rng.uniform(-1, 1, 3)
        img[..., c] = 110 + 60 * np.sin(a * xx / 9 + b * yy / 11 + p * 3)
    for _ in range(3):
        y0, x0 = rng.integers(0, h - 4), rng.integers(0, w - 4)
        img[y0:y0 + h // 4, x0:x0 + w // 4] = rng.uniform(20, 230, 3)
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def make_image_dirs(root: Path, *, n: int = 4, size: tuple[int, int] = (40, 48), seed: int = 0) -> tuple[Path, Path]:
    """``root/clean`` and ``root/rainy`` (rainy = synthetic rain on other scenes), PNG files."""
    from training.synthrain import render_rain

    rng = np.random.Generator(np.random.PCG64(seed))
    clean, rainy = root / "clean", root / "rainy"
    clean.mkdir(parents=True, exist_ok=True)
    rainy.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(make_scene(rng, *size)).save(clean / f"c{i:02d}.png")
        Image.fromarray(render_rain(make_scene(rng, *size), seed=i)).save(rainy / f"r{i:02d}.png")
    return clean, rainy


@pytest.fixture(scope="session")
def image_dirs(tmp_path_factory) -> tuple[Path, Path]:
    """(clean_dir, rainy_dir): 4 small synthetic images each (40x48)."""
    return make_image_dirs(tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, image_dirs) -> Path:
    """Path to a stripped ``model.pt`` of the tiny config trained for 3 steps (``last.pt`` beside it).

    Tiny = estimator U-Net base 8, channel_mult (1, 2), groups 4, scales (1, .5, .25): size
    multiple 8. Its self-attention sits at 1/2 resolution, so keep inputs small (<= 128 px).
    """
    import torch

    from training.config import TrainConfig
    from training.train import fit

    clean, rainy = image_dirs
    run = tmp_path_factory.mktemp("tiny_run")
    cfg = TrainConfig(preset="tiny", steps=3, batch=2, crop=32, ckpt_every=3, log_every=1, seed=0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors on a shared 2-core machine: 1 thread is ~4x faster under load
    try:
        result = fit(clean, rainy, run, train=cfg)
    finally:
        torch.set_num_threads(threads)
    return result.model


@pytest.fixture(scope="session")
def image_dir_factory():
    """The ``make_image_dirs(root, n=4, size=(40, 48), seed=0)`` helper, for tests that need their own folders."""
    return make_image_dirs
