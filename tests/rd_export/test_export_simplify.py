"""onnxslim simplification: optional (off by default, measured no latency gain), output-preserving."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from rd_export.export import export_estimator_onnx, make_descriptor
from rd_export.graph import check_model
from rd_export.simplify import SIMPLIFY_DEFAULT
from rd_export.verify import OnnxStep, verification_cond
from runtime.manifest import Manifest


def test_default_is_off_and_recorded(exported):
    assert SIMPLIFY_DEFAULT is False
    assert Manifest.for_artifact(exported.onnx).get("export")["simplified"] is False


@pytest.mark.slow  # onnxslim's Python shape inference: ~20-40 s on 2 shared cores even for the tiny graph
def test_simplified_graph_is_smaller_and_equivalent(exported, estimator_of, tmp_path):
    est = estimator_of(exported.checkpoint)
    desc = make_descriptor(est.size_multiple)
    path = export_estimator_onnx(est, tmp_path / "slim.onnx", desc, simplify=True)  # the export option
    slim = onnx.load(str(path))
    check_model(slim)
    assert len(slim.graph.node) < len(onnx.load(str(exported.onnx)).graph.node)
    rng = np.random.default_rng(0)
    for n, h, w in [(1, 32, 32), (2, 24, 40)]:  # dynamic axes survive simplification
        args = (rng.standard_normal((n, 3, h, w), dtype=np.float32), verification_cond(n, h, w),
                np.full((n,), 333.0, np.float32), np.tile(np.array([[2.0, 1.7, 0.5, 0.8]], np.float32), (n, 1)))
        np.testing.assert_allclose(OnnxStep(path)(*args), OnnxStep(exported.onnx)(*args), atol=1e-5, rtol=0)
