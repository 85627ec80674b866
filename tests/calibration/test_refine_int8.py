"""INT8 of a predict-and-refine artifact: both graphs quantized from one run, verified end to end."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "rd_export"))

from rdx_helpers import one_torch_thread, write_random_checkpoint


@pytest.fixture(scope="module")
def refine_int8(tmp_path_factory, rainy_dir):
    from calibration.api import build_int8
    from rd_export.export import export_onnx

    d = tmp_path_factory.mktemp("refine_int8")
    with one_torch_thread():
        ck = write_random_checkpoint(d / "r.pt", cond_channels=6, prediction="x0_residual", crop=32)
        fp32 = export_onnx(ck, d, steps=3)
    return fp32, build_int8(fp32, rainy_dir, calib_images=3, eval_images=1, steps=3, min_psnr_db=None,
                            latency=False, threads=1)


def test_both_graphs_are_quantized(refine_int8):
    _, int8 = refine_int8
    names = sorted(p.name for p in int8.parent.iterdir() if p.suffix in (".onnx", ".json"))
    assert {"model.int8.onnx", "model.int8.prologue.onnx", "model.int8.cpu.onnx", "model.int8.cpu.prologue.onnx",
            "model.int8.json", "model.int8.cpu.json"} <= set(names)
    for stem, zero_points in (("model.int8", 0), ("model.int8.cpu", None)):
        m = json.loads(int8.with_name(f"{stem}.json").read_text())
        pro = m["prologue"]
        assert pro["artifact"] == f"{stem}.prologue.onnx" and pro["precision"] == "int8"
        assert pro["graph"]["quantized_ops"] > 0
        if zero_points is not None:  # the TensorRT graph: symmetric, like its step
            assert pro["graph"]["nonzero_zero_points"] == 0
        v = m["verification"]
        assert np.isfinite(v["psnr_db"]) and np.isfinite(v["prologue_psnr_db"])


def test_int8_artifacts_run_through_the_runtime(refine_int8):
    from runtime.derainer import Derainer

    fp32, int8 = refine_int8
    frame = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    with Derainer(fp32, steps=3, threads=1) as d32, Derainer(int8, steps=3, threads=1) as d8:
        a, b = d32.derain(frame), d8.derain(frame)
        assert d8.backend.has_prologue
        assert a.shape == b.shape and not np.array_equal(b, frame)
    with Derainer(int8, steps=0, threads=1) as d:  # the INT8 prologue alone
        assert d.derain(frame).shape == frame.shape
