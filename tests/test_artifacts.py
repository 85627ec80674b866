"""External-data locations of ONNX artifacts must stay inside the model's folder (runtime/artifacts.py).

The models here are tiny hand-built graphs with the fused step's signature (x_next = x_t + W,
the other inputs unused) whose one initializer W lives in an external-data file.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from rd_export.graph import load_model  # noqa: E402
from runtime.artifacts import check_external_data  # noqa: E402
from runtime.errors import ArtifactError, RDError  # noqa: E402

W_VALUE = np.full((1,), 0.25, np.float32)


def set_external(tensor: onnx.TensorProto, location: str, length: int) -> None:
    """Point ``tensor`` at ``location`` verbatim (onnx's own helpers would normalise it)."""
    tensor.ClearField("float_data")
    tensor.ClearField("raw_data")
    del tensor.external_data[:]
    for key, value in (("location", location), ("offset", "0"), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    tensor.data_location = TensorProto.EXTERNAL


def _graph_model(weight: np.ndarray = W_VALUE) -> onnx.ModelProto:
    dims = ["N", 3, "H", "W"]
    inputs = [helper.make_tensor_value_info("x_t", TensorProto.FLOAT, dims),
              helper.make_tensor_value_info("cond", TensorProto.FLOAT, dims),
              helper.make_tensor_value_info("t", TensorProto.FLOAT, ["N"]),
              helper.make_tensor_value_info("coef", TensorProto.FLOAT, ["N", 4])]
    out = helper.make_tensor_value_info("x_next", TensorProto.FLOAT, dims)
    graph = helper.make_graph([helper.make_node("Add", ["x_t", "W"], ["x_next"], name="add")], "step", inputs,
                              [out], initializer=[numpy_helper.from_array(weight, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def make_model(folder: Path, location: str, *, name: str = "model.onnx", data_file: Path | None = None) -> Path:
    """``folder/name`` whose initializer W refers to external data at ``location`` (written verbatim).

    The raw bytes of W go to ``data_file`` (default: ``folder/location`` when that is a plain name).
    """
    folder.mkdir(parents=True, exist_ok=True)
    model = _graph_model()
    w = model.graph.initializer[0]
    raw = numpy_helper.to_array(w).tobytes()
    if data_file is not None:
        data_file.parent.mkdir(parents=True, exist_ok=True)
        data_file.write_bytes(raw)
    set_external(w, location, len(raw))
    path = folder / name
    onnx.save_model(model, str(path))  # no conversion: the location is kept exactly as given
    return path


def _location_of(path: Path) -> str:
    m = onnx.load(str(path), load_external_data=False)
    return {e.key: e.value for e in m.graph.initializer[0].external_data}["location"]


# ---------------------------------------------------------------------------- accepted


def test_sibling_weights_file_is_accepted_and_loads(tmp_path):
    folder = tmp_path / "m"
    path = make_model(folder, "weights.bin", data_file=folder / "weights.bin")
    assert _location_of(path) == "weights.bin"
    check_external_data(path)
    model = load_model(path)  # rd_export path: loads the external data too
    np.testing.assert_array_equal(numpy_helper.to_array(model.graph.initializer[0]), W_VALUE)


def test_subfolder_and_harmless_dotdot_are_accepted(tmp_path):
    folder = tmp_path / "m"
    check_external_data(make_model(folder, "data/w.bin", data_file=folder / "data" / "w.bin"))
    check_external_data(make_model(folder, "data/../w2.bin", name="b.onnx", data_file=folder / "w2.bin"))
    check_external_data(make_model(folder, "./w3.bin", name="c.onnx", data_file=folder / "w3.bin"))


def test_model_without_external_data_is_accepted(tmp_path):
    path = tmp_path / "plain.onnx"
    onnx.save_model(_graph_model(), str(path))
    check_external_data(path)


def test_symlink_inside_the_folder_is_accepted(tmp_path):
    folder = tmp_path / "m"
    make_model(folder, "real.bin", data_file=folder / "real.bin")
    (folder / "link.bin").symlink_to("real.bin")
    check_external_data(make_model(folder, "link.bin", name="b.onnx"))


def test_model_reached_through_a_symlinked_folder_is_accepted(tmp_path):
    real = tmp_path / "real"
    make_model(real, "weights.bin", data_file=real / "weights.bin")
    (tmp_path / "alias").symlink_to(real, target_is_directory=True)
    check_external_data(tmp_path / "alias" / "model.onnx")


# ---------------------------------------------------------------------------- refused


@pytest.mark.parametrize("location", ["/etc/passwd", "//etc/passwd", "\\\\server\\share\\w.bin", "C:\\w.bin",
                                      "C:w.bin"])
def test_absolute_location_is_refused(tmp_path, location):
    path = make_model(tmp_path / "m", location)
    with pytest.raises(ArtifactError, match="absolute location") as exc:
        check_external_data(path)
    msg = str(exc.value)
    assert "\n" not in msg and "'W'" in msg and repr(location) in msg


@pytest.mark.parametrize("location", ["../x.bin", "../../etc/passwd", "a/../../x.bin", "..\\x.bin", "..", "./../x"])
def test_dotdot_leaving_the_folder_is_refused(tmp_path, location):
    path = make_model(tmp_path / "m", location, data_file=tmp_path / "x.bin")
    with pytest.raises(ArtifactError, match=r"leaves the model's folder") as exc:
        check_external_data(path)
    assert "\n" not in str(exc.value) and "tensor 'W'" in str(exc.value) and repr(location) in str(exc.value)


@pytest.mark.parametrize("location", ["", ".", "a/.."])
def test_location_naming_no_file_is_refused(tmp_path, location):
    with pytest.raises(ArtifactError, match="tensor 'W'"):
        check_external_data(make_model(tmp_path / "m", location))


def test_symlink_pointing_outside_is_refused(tmp_path):
    secret = tmp_path / "secret.bin"
    secret.write_bytes(W_VALUE.tobytes())
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "weights.bin").symlink_to(secret)
    path = make_model(folder, "weights.bin")
    with pytest.raises(ArtifactError, match="resolves outside the model's folder") as exc:
        check_external_data(path)
    assert "tensor 'W'" in str(exc.value) and "'weights.bin'" in str(exc.value) and "\n" not in str(exc.value)


def test_symlinked_subfolder_pointing_outside_is_refused(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "w.bin").write_bytes(W_VALUE.tobytes())
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "sub").symlink_to(outside, target_is_directory=True)
    with pytest.raises(ArtifactError, match="resolves outside"):
        check_external_data(make_model(folder, "sub/w.bin"))


def test_symlink_loop_is_refused(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    os.symlink("loop.bin", folder / "loop.bin")
    with pytest.raises(ArtifactError, match="tensor 'W'"):
        check_external_data(make_model(folder, "loop.bin"))


def test_constant_node_and_subgraph_tensors_are_checked(tmp_path):
    """Tensors in node attributes (Constant) and in subgraphs (If branches) are checked too."""
    def external(name: str, location: str) -> onnx.TensorProto:
        t = numpy_helper.from_array(W_VALUE, name)
        set_external(t, location, 4)
        return t

    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    const = helper.make_node("Constant", [], ["c"], name="const", value=external("", "/etc/hosts"))
    g = helper.make_graph([const], "g", [], [helper.make_tensor_value_info("c", TensorProto.FLOAT, [1])])
    path = tmp_path / "const.onnx"
    onnx.save_model(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    with pytest.raises(ArtifactError, match=r"Constant node 'const' attribute 'value'.*'/etc/hosts'"):
        check_external_data(path)

    branch = helper.make_graph([helper.make_node("Identity", ["k"], ["y"])], "then", [], [out],
                               initializer=[external("k", "../k.bin")])
    cond = helper.make_tensor_value_info("b", TensorProto.BOOL, [])
    node = helper.make_node("If", ["b"], ["y"], name="if", then_branch=branch, else_branch=branch)
    path = tmp_path / "if.onnx"
    onnx.save_model(helper.make_model(helper.make_graph([node], "g", [cond], [out]),
                                      opset_imports=[helper.make_opsetid("", 17)]), str(path))
    with pytest.raises(ArtifactError, match=r"tensor 'k'.*'\.\./k\.bin'"):
        check_external_data(path)


def test_unreadable_model_is_an_artifact_error(tmp_path):
    path = tmp_path / "junk.onnx"
    path.write_bytes(b"\xff\xff not a model")
    with pytest.raises(ArtifactError, match="not a readable ONNX model"):
        check_external_data(path)
    with pytest.raises(ArtifactError, match="not a readable ONNX model"):
        load_model(path)


def test_rd_export_load_model_refuses_before_reading(tmp_path):
    path = make_model(tmp_path / "m", "../x.bin", data_file=tmp_path / "x.bin")
    with pytest.raises(ArtifactError, match=r"tensor 'W'.*leaves the model's folder"):
        load_model(path)


# ---------------------------------------------------------------------------- through the runtime backend


def _write_manifest(onnx_path: Path) -> None:
    from runtime.descriptor import StepDescriptor
    from runtime.manifest import Manifest, manifest_path_for, sha256_file

    Manifest(artifact=onnx_path.name, format="onnx", precision="fp32", model="derain",
             sha256=sha256_file(onnx_path), descriptor=StepDescriptor(size_multiple=8).to_dict(),
             schedule={"num_train_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02, "default_steps": 2},
             model_config={}, toolkit_version="test").save(manifest_path_for(onnx_path))


@pytest.fixture
def no_onnxruntime(monkeypatch):
    """Any attempt of the backend to reach onnxruntime fails the test."""
    import runtime.backends.onnxruntime as ortb

    def forbidden():
        raise AssertionError("onnxruntime was reached before the external-data check")

    monkeypatch.setattr(ortb, "_import_onnxruntime", forbidden)


@pytest.mark.parametrize("kind", ["absolute", "dotdot", "symlink"])
def test_open_backend_refuses_escaping_external_data(tmp_path, no_onnxruntime, kind):
    from runtime.backends import open_backend

    secret = tmp_path / "secret.bin"
    secret.write_bytes(W_VALUE.tobytes())  # valid bytes: only the check stands between ORT and this file
    folder = tmp_path / "m"
    if kind == "absolute":
        path = make_model(folder, str(secret))
    elif kind == "dotdot":
        path = make_model(folder, "../secret.bin")
    else:
        folder.mkdir()
        (folder / "weights.bin").symlink_to(secret)
        path = make_model(folder, "weights.bin")
    _write_manifest(path)
    with pytest.raises(ArtifactError, match="tensor 'W' refers to external data") as exc:
        open_backend(path)
    assert exc.value.exit_code == 4 and isinstance(exc.value, RDError)


def test_open_backend_runs_a_model_with_sibling_external_data(tmp_path):
    pytest.importorskip("onnxruntime")
    from runtime.backends import open_backend

    folder = tmp_path / "m"
    path = make_model(folder, "weights.bin", data_file=folder / "weights.bin")
    _write_manifest(path)
    backend = open_backend(path, threads=1)
    try:
        backend.bind(1, 8, 8)
        backend.set_schedule(np.array([1], np.int64), np.array([[1, 0, 1, 0]], np.float32))
        backend.set_cond(np.zeros((1, 3, 8, 8), np.float32))
        backend.set_x(np.zeros((1, 3, 8, 8), np.float32))
        backend.run()
        np.testing.assert_allclose(backend.get_x(), 0.25)  # W came from weights.bin
    finally:
        backend.close()


def test_without_onnx_only_models_free_of_external_data_pass(tmp_path, monkeypatch):
    from runtime.errors import DependencyError

    plain = tmp_path / "plain.onnx"
    onnx.save_model(_graph_model(), str(plain))
    bad = make_model(tmp_path / "m", "../x.bin")
    monkeypatch.setitem(__import__("sys").modules, "onnx", None)  # `import onnx` now fails
    check_external_data(plain)
    with pytest.raises(DependencyError, match="external data"):
        check_external_data(bad)
