"""Precisions are table rows: a new row (as INT8 will be) is picked up by the pipeline, with its options."""

from __future__ import annotations

import shutil

import pytest
import rdx_helpers

from rd_export.pipeline import BuildOptions, build, parse_batch, parse_size
from rd_export.precision import PRECISIONS, PrecisionSpec, get_precision, onnx_name, plan_name
from runtime.errors import UsageError
from runtime.manifest import manifest_path_for


def test_names():
    assert onnx_name("model", "fp32") == "model.onnx" and onnx_name("model", "fp16") == "model.fp16.onnx"
    assert plan_name("out/model.fp16.onnx") == "model.fp16.trt.plan"
    with pytest.raises(UsageError, match="precision 'int4' is not supported"):
        get_precision("int4")
    assert parse_size("256x192") == (256, 192) and parse_size("64") == (64, 64)
    assert parse_batch("1..4") == (1, 1, 4) and parse_batch("1..2..4") == (1, 2, 4) and parse_batch("2") == (2, 2, 2)


def test_registered_precision_is_used_by_the_pipeline(exported, tmp_path, monkeypatch):
    monkeypatch.setitem(PRECISIONS, "int8test", PrecisionSpec(
        name="int8test", suffix=".int8test", derive=rdx_helpers.fake_int8_derive, reference="fp32",
        min_psnr_db=30.0, max_step_abs=None, requires=("calib",)))
    src = tmp_path / "src"
    src.mkdir()
    for p in (exported.onnx, manifest_path_for(exported.onnx)):
        shutil.copy(p, src / p.name)
    calib = tmp_path / "calib"
    calib.mkdir()
    rdx_helpers.DERIVE_CALLS.clear()
    with pytest.raises(UsageError, match="precision int8test needs --calib"):
        build(src / "model.onnx", tmp_path / "o", BuildOptions(precision="int8test", fmt="onnx"))
    with pytest.raises(UsageError, match="--calib is not used by precision fp16"):
        build(src / "model.onnx", tmp_path / "o", BuildOptions(precision="fp16", fmt="onnx", options={"calib": calib}))
    result = build(src / "model.onnx", tmp_path / "o",
                   BuildOptions(precision="int8test", fmt="onnx", steps=2, options={"calib": calib}))
    assert [a.path.name for a in result.artifacts] == ["model.int8test.onnx"]
    assert rdx_helpers.DERIVE_CALLS == [{"calib": calib, "out": tmp_path / "o" / "model.int8test.onnx", "steps": 2}]
