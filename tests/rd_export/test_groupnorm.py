"""GroupNorm traced as reductions (rd_export.groupnorm): the same function as nn.GroupNorm, in
torch and in the exported prologue, with its statistics kept FP32 by the FP16 derivation."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

pytest.importorskip("torch")

import torch
from rdx_helpers import one_torch_thread, write_random_checkpoint

from rd_export.export import export_onnx, prologue_name
from rd_export.graph import inline_identity_initializers, island_nodes
from rd_export.groupnorm import ReducedGroupNorm, reduced_groupnorm
from runtime.backends.onnxruntime import make_session


@pytest.mark.parametrize("groups,channels,offset", [(8, 16, 0.0), (4, 32, 5.0), (1, 8, -3.0), (8, 8, 0.0)])
def test_reduced_groupnorm_is_nn_groupnorm(groups, channels, offset):
    g = torch.Generator().manual_seed(groups * channels)
    norm = torch.nn.GroupNorm(groups, channels)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(channels, generator=g))
        norm.bias.copy_(torch.randn(channels, generator=g))
    x = torch.randn(3, channels, 24, 40, generator=g) * 2.0 + offset  # a mean far from 0 stresses E[x^2] - E[x]^2
    with torch.no_grad():
        np.testing.assert_allclose(ReducedGroupNorm(norm)(x).numpy(), norm(x).numpy(), atol=2e-5, rtol=1e-4)
    flat = torch.zeros(2, channels, 8, 8) + 3.0  # zero variance: clamped at 0, no NaN
    with torch.no_grad():
        out = ReducedGroupNorm(norm)(flat).numpy()
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, norm(flat).detach().numpy(), atol=1e-3)


def test_reduced_groupnorm_swaps_a_copy_and_refuses_non_affine():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.GroupNorm(4, 8),
                              torch.nn.Sequential(torch.nn.GroupNorm(2, 8)))
    swapped = reduced_groupnorm(net)
    assert sum(isinstance(m, torch.nn.GroupNorm) for m in swapped.modules()) == 0
    assert sum(isinstance(m, ReducedGroupNorm) for m in swapped.modules()) == 2
    assert sum(isinstance(m, torch.nn.GroupNorm) for m in net.modules()) == 2  # the original is untouched
    x = torch.randn(1, 3, 12, 12)
    with torch.no_grad():
        np.testing.assert_allclose(swapped(x).numpy(), net(x).numpy(), atol=2e-5)
    with pytest.raises(ValueError, match="affine"):
        ReducedGroupNorm(torch.nn.GroupNorm(2, 8, affine=False))


@pytest.fixture(scope="module")
def refine_onnx(tmp_path_factory):
    d = tmp_path_factory.mktemp("gn")
    with one_torch_thread():
        ck = write_random_checkpoint(d / "r.pt", cond_channels=6, prediction="x0_residual", crop=32)
        return export_onnx(ck, d / "out", steps=2)


def test_prologue_exports_reductions_and_the_step_keeps_instancenorm(refine_onnx):
    pro = onnx.load(str(refine_onnx.with_name(prologue_name(refine_onnx.name))))
    step = onnx.load(str(refine_onnx))
    pro_ops = {n.op_type for n in pro.graph.node}
    assert "InstanceNormalization" not in pro_ops and "ReduceMean" in pro_ops
    assert island_nodes(pro, "groupnorm_stats")  # every statistic is named for its island
    stats = set(island_nodes(pro, "groupnorm_stats"))
    assert [n for n in pro.graph.node if n.op_type == "ReduceMean"] and all(
        n.name in stats for n in pro.graph.node if n.op_type == "ReduceMean")
    assert not [n for n in pro.graph.node if n.op_type == "Identity"]  # folded constant copies inlined
    assert "InstanceNormalization" in {n.op_type for n in step.graph.node}
    assert not island_nodes(step, "groupnorm_stats")


def test_fp16_keeps_the_reduced_statistics_fp32(refine_onnx):
    from rd_export.fp16 import make_fp16
    from runtime.manifest import Manifest

    fp16 = make_fp16(refine_onnx)
    pro = onnx.load(str(fp16.with_name(prologue_name(fp16.name))))
    inferred = onnx.shape_inference.infer_shapes(pro)
    types = {v.name: v.type.tensor_type.elem_type for v in
             list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)}
    types.update({i.name: i.data_type for i in inferred.graph.initializer})
    reduces = [n for n in inferred.graph.node if n.op_type == "ReduceMean"]
    assert reduces and all(types[n.input[0]] == TensorProto.FLOAT for n in reduces)
    convs = [n for n in inferred.graph.node if n.op_type == "Conv"]
    assert convs and all(types[n.input[0]] == TensorProto.FLOAT16 for n in convs)
    from rd_export.fp16 import PROLOGUE_ISLANDS, island_report

    fp32_pro = onnx.load(str(refine_onnx.with_name(prologue_name(refine_onnx.name))))
    (row,) = island_report(fp32_pro, PROLOGUE_ISLANDS)["islands"]
    assert row["name"] == "normalization" and row["select"] == "groupnorm_stats"
    assert row["nodes"] == len(island_nodes(fp32_pro, "groupnorm_stats")) > 0
    assert Manifest.for_artifact(fp16).prologue["fp32_islands"] == ["normalization"]


def test_inline_identity_initializers_rewires_readers_and_keeps_outputs():
    w = numpy_helper.from_array(np.full((1, 2), 2.0, np.float32), "w")
    nodes = [helper.make_node("Identity", ["w"], ["w1"]), helper.make_node("Identity", ["w"], ["w2"]),
             helper.make_node("Mul", ["x", "w1"], ["a"]), helper.make_node("Add", ["a", "w2"], ["y"]),
             helper.make_node("Identity", ["w"], ["wout"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2]),
                               helper.make_tensor_value_info("wout", TensorProto.FLOAT, [1, 2])], [w])
    model = inline_identity_initializers(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    assert [n.op_type for n in model.graph.node] == ["Mul", "Add", "Identity"]  # the graph output's copy stays
    assert list(model.graph.node[0].input) == ["x", "w"] and list(model.graph.node[1].input) == ["a", "w"]
    y, wout = make_session(model.SerializeToString(), quiet=True).run(None, {"x": np.ones((1, 2), np.float32)})
    np.testing.assert_array_equal(y, [[4.0, 4.0]])
    np.testing.assert_array_equal(wout, [[2.0, 2.0]])
