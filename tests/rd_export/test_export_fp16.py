"""FP16 ONNX: FP32 I/O, FP32 islands (and that they matter), verification vs FP32, nothing on failure."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from rd_export.fp16 import (
    DEFAULT_ISLANDS,
    convert_fp16,
    drop_cast_round_trips,
    make_fp16,
    measure_islands,
    tensor_errors,
    time_embedding_tensors,
)
from rd_export.verify import OnnxStep, check_report
from runtime.errors import ManifestError, UsageError, VerificationError
from runtime.manifest import Manifest, sha256_file


def _types(model):
    inferred = onnx.shape_inference.infer_shapes(model)
    t = {v.name: v.type.tensor_type.elem_type for v in list(inferred.graph.value_info) + list(inferred.graph.input)
         + list(inferred.graph.output)}
    t.update({i.name: i.data_type for i in inferred.graph.initializer})
    return inferred, t


def test_fp16_graph_io_and_islands(exported):
    model = onnx.load(str(exported.fp16))
    inferred, types = _types(model)
    assert all(v.type.tensor_type.elem_type == TensorProto.FLOAT for v in model.graph.input)
    assert all(v.type.tensor_type.elem_type == TensorProto.FLOAT for v in model.graph.output)
    assert any(i.data_type == TensorProto.FLOAT16 for i in model.graph.initializer)  # weights are FP16
    convs = [n for n in inferred.graph.node if n.op_type == "Conv"]
    assert convs and all(types[n.input[0]] == TensorProto.FLOAT16 for n in convs)
    for op in ("InstanceNormalization", "Softmax", "Cos", "Sin"):  # islands compute in FP32
        nodes = [n for n in inferred.graph.node if n.op_type == op]
        assert nodes and all(types[n.input[0]] == TensorProto.FLOAT for n in nodes), op
    producer = {o: n for n in inferred.graph.node for o in n.output}
    out = producer["x_next"]  # the DDIM update's last Add feeds the output without an FP16 round trip
    assert out.op_type == "Identity" and producer[out.input[0]].op_type == "Add"
    assert types[out.input[0]] == TensorProto.FLOAT
    readers_of_x_t = {n.op_type for n in inferred.graph.node if "x_t" in n.input}
    assert "Mul" in readers_of_x_t  # a * x_t reads the FP32 input itself, not its FP16 copy


def test_fp16_manifest(exported):
    m = Manifest.for_artifact(exported.fp16)
    assert (m.artifact, m.format, m.precision) == ("model.fp16.onnx", "onnx", "fp16")
    m.check_artifact_hash(exported.fp16)
    assert [i["name"] for i in m.get("fp32_islands")] == list(DEFAULT_ISLANDS)
    assert all(i["nodes"] > 0 and i["reason"] for i in m.get("fp32_islands"))
    v = m.get("verification")
    assert v["passed"] and v["finite"] and v["reference"] == "fp32" and v["psnr_db"] >= 40.0
    assert v["nonfinite_at_t"] == []
    src = m.get("source")
    assert src["onnx"] == "model.onnx" and src["onnx_sha256"] == sha256_file(exported.onnx)
    assert src["checkpoint_sha256"] == sha256_file(exported.checkpoint)
    assert m.descriptor == Manifest.for_artifact(exported.onnx).descriptor


def test_fp16_runs_batch2_non_square(exported):
    rng = np.random.default_rng(0)
    args = (rng.standard_normal((2, 3, 24, 40), dtype=np.float32),
            rng.uniform(-1, 1, (2, 3, 24, 40)).astype(np.float32),
            np.array([901.0, 1.0], np.float32), np.array([[58.7, 58.6, 0.04, 0.99], [1.0, 0.01, 1.0, 0.0]], np.float32))
    a, b = OnnxStep(exported.fp16)(*args), OnnxStep(exported.onnx)(*args)
    assert a.dtype == np.float32 and a.shape == (2, 3, 24, 40) and np.isfinite(a).all()
    assert np.abs(a - b).max() < 0.05


def test_islands_matter(exported):
    """Measured: dropping the DDIM-update island multiplies the low-t step error (x_t and a*x_t
    rounded to FP16); dropping the time-embedding island perturbs the sinusoid at high t."""
    res = measure_islands(exported.onnx, steps=3, size=(32, 32), variants={
        "all": DEFAULT_ISLANDS,
        "without_ddim_update": tuple(i for i in DEFAULT_ISLANDS if i != "ddim_update")})
    low = {k: next(r["max_abs"] for r in v["per_step"] if r["at"] == "low") for k, v in res.items()}
    assert low["without_ddim_update"] > 10 * low["all"]

    fp32 = onnx.load(str(exported.onnx))
    names = time_embedding_tensors(fp32)
    assert len(names) == 6  # cos + sin of the shared U-Net, once per scale
    feeds = {"x_t": np.zeros((1, 3, 32, 32), np.float32), "cond": np.zeros((1, 3, 32, 32), np.float32),
             "t": np.array([901.0], np.float32), "coef": np.array([[1.0, 0.0, 1.0, 0.0]], np.float32)}
    with_island = tensor_errors(fp32, convert_fp16(fp32)[0], names, feeds)
    without = tensor_errors(fp32, convert_fp16(fp32, ("normalization", "softmax", "ddim_update"))[0], names, feeds)
    assert max(with_island.values()) == 0.0
    assert max(without.values()) > 5e-3


def test_drop_cast_round_trips():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])
    z = helper.make_tensor_value_info("z", TensorProto.FLOAT, [2])
    nodes = [helper.make_node("Cast", ["x"], ["x16"], to=TensorProto.FLOAT16, name="c16"),
             helper.make_node("Cast", ["x16"], ["x32"], to=TensorProto.FLOAT, name="c32"),
             helper.make_node("Relu", ["x32"], ["y"], name="relu"),
             helper.make_node("Cast", ["x16"], ["z"], to=TensorProto.FLOAT, name="c32_out")]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y, z]), opset_imports=[helper.make_opsetid("", 17)])
    out, removed = drop_cast_round_trips(model)
    assert removed == 2
    by_name = {n.name: n for n in out.graph.node}
    assert list(by_name["relu"].input) == ["x"]  # reads the FP32 tensor directly
    assert by_name["c32_out"].op_type == "Identity" and list(by_name["c32_out"].input) == ["x"]
    assert "c16" not in by_name and "c32" not in by_name
    onnx.checker.check_model(out)


def test_nan_fails_verification_and_writes_nothing(exported, tmp_path, monkeypatch):
    import rd_export.fp16 as fp16

    original = fp16.convert_fp16

    def overflowing(model, islands=DEFAULT_ISLANDS):
        m, report = original(model, islands)
        w = next(i for i in m.graph.initializer if i.data_type == TensorProto.FLOAT16 and len(i.dims) == 4)
        arr = onnx.numpy_helper.to_array(w).astype(np.float32) * 1e6  # inf in FP16
        with np.errstate(over="ignore"):
            w.CopyFrom(onnx.numpy_helper.from_array(arr.astype(np.float16), w.name))
        return m, report

    monkeypatch.setattr(fp16, "convert_fp16", overflowing)
    dest = tmp_path / "broken.fp16.onnx"
    with pytest.raises(VerificationError, match="NaN/Inf"):
        make_fp16(exported.onnx, dest)
    assert list(tmp_path.iterdir()) == []


def test_fp16_usage_errors(exported, tmp_path):
    with pytest.raises(UsageError, match="derived from the FP32 ONNX"):
        make_fp16(exported.fp16, tmp_path / "x.fp16.onnx")
    bare = tmp_path / "bare.onnx"
    bare.write_bytes(exported.onnx.read_bytes())
    with pytest.raises(ManifestError, match="manifest not found"):
        make_fp16(bare)
    with pytest.raises(UsageError, match="unknown FP32 island"):
        convert_fp16(onnx.load(str(exported.onnx)), ("everything",))


def test_check_report_names_the_failing_number():
    rep = {"reference": "torch", "psnr_db": 55.0, "per_step_max_abs": 2e-4, "finite": True}
    with pytest.raises(VerificationError, match=r"PSNR 55.00 dB < 60 dB .*per-step max abs error 0.0002 > 0.0001"):
        check_report(rep, min_psnr_db=60.0, max_step_abs=1e-4, what="model.onnx")
    ok = check_report(dict(rep, psnr_db=70.0, per_step_max_abs=1e-6), min_psnr_db=60.0, max_step_abs=1e-4, what="m")
    assert ok["passed"] and ok["thresholds"] == {"psnr_db": 60.0, "per_step_max_abs": 1e-4}
