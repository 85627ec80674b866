"""The shipped artifacts (runtime/assets): manifests verified, hashes match, and the INT8 graphs
run through the same Derainer as the FP32 model, close to it (issue 5)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from runtime.derainer import Derainer, default_artifact
from runtime.manifest import Manifest
from runtime.metrics import psnr_y

ASSETS = Path(default_artifact()).parent
INT8 = [p for p in (ASSETS / "default.int8.cpu.onnx", ASSETS / "default.int8.onnx") if p.is_file()]


def _frame() -> np.ndarray:
    from PIL import Image

    img = Image.open(Path(__file__).resolve().parents[2] / "examples" / "rainy_street.jpg").convert("RGB")
    return np.asarray(img)[100:164, 200:296]  # 64x96: two 64-px tiles


def test_fp32_default_is_verified():
    path = default_artifact()
    m = Manifest.for_artifact(path)
    m.check_artifact_hash(path)
    assert m.precision == "fp32" and m.get("verification")["passed"]


@pytest.mark.skipif(not INT8, reason="no INT8 model shipped")
@pytest.mark.parametrize("path", INT8, ids=[p.name for p in INT8])
def test_shipped_int8_loads_through_the_derainer_and_stays_close(path):
    m = Manifest.for_artifact(path)
    m.check_artifact_hash(path)
    v = m.get("verification")
    assert m.precision == "int8" and v["passed"] and v["psnr_db"] >= 35.0
    frame = _frame()
    with Derainer(threads=1, steps=4) as fp32, Derainer(path, threads=1, steps=4) as int8:
        a, b = fp32.derain(frame), int8.derain(frame)
    assert b.shape == frame.shape and b.dtype == np.uint8
    assert psnr_y(b, a) >= 30.0  # INT8 vs FP32 output, 4 steps, uint8 Y channel
