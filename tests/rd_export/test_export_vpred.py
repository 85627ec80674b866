"""v-prediction estimators (issue 8) export through the same fused step: ONNX == torch, and the
v -> eps conversion stays FP32 in the FP16 graph (it feeds the DDIM update's cancellation)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from rdx_helpers import TEST_PROFILE, TEST_STEPS, write_random_checkpoint

from rd_export.export import export_onnx
from rd_export.fp16 import DEFAULT_ISLANDS, make_fp16, measure_islands
from rd_export.graph import TO_EPS_SCOPE, island_nodes
from runtime.descriptor import ShapeProfile
from runtime.manifest import Manifest


@pytest.fixture(scope="module")
def vres(tmp_path_factory):
    out = tmp_path_factory.mktemp("vres")
    ckpt = write_random_checkpoint(out / "model.pt", seed=3, prediction="v_residual")
    onnx_path = export_onnx(ckpt, out, steps=TEST_STEPS, profile=ShapeProfile(**TEST_PROFILE))
    return ckpt, onnx_path


def test_v_residual_exports_and_verifies_against_torch(vres):
    _, onnx_path = vres
    v = Manifest.for_artifact(onnx_path).get("verification")
    assert v["passed"] and v["psnr_db"] >= 80.0  # FP32 ONNX vs the torch sampler, end to end
    model = onnx.load(str(onnx_path))
    names = [n.name for n in model.graph.node if n.name.startswith(TO_EPS_SCOPE)]
    assert {"Gather", "Mul", "Sub", "Add"} <= {n.op_type for n in model.graph.node if n.name in names}


def test_to_eps_is_in_the_ddim_update_island(vres):
    _, onnx_path = vres
    model = onnx.load(str(onnx_path))
    island = set(island_nodes(model, "ddim_update"))
    to_eps = {n.name for n in model.graph.node if n.name.startswith(TO_EPS_SCOPE) and n.op_type != "Constant"}
    assert to_eps and to_eps <= island


def test_fp16_of_a_v_model_verifies_and_the_island_matters(vres):
    _, onnx_path = vres
    fp16 = make_fp16(onnx_path)
    assert Manifest.for_artifact(fp16).get("verification")["passed"]
    res = measure_islands(onnx_path, steps=TEST_STEPS, size=(32, 32), variants={
        "all": DEFAULT_ISLANDS, "without_ddim_update": tuple(i for i in DEFAULT_ISLANDS if i != "ddim_update")})
    assert res["all"]["finite"] and np.isfinite(res["all"]["psnr_db"])
    assert res["all"]["psnr_db"] > res["without_ddim_update"]["psnr_db"] + 3.0
