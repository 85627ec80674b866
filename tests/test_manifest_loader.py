"""One manifest loader (runtime.manifest.load_manifest) with one exception policy, for every
caller: the runtime backends, the exporter (FP16, pipeline, engine build, re-verification) and
calibration. A problem with an artifact reads the same whichever command meets it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from runtime.derainer import default_artifact
from runtime.errors import ArtifactError, EngineMismatchError, ManifestError
from runtime.manifest import load_manifest, manifest_path_for, sha256_file

SHIPPED = Path(default_artifact())


def _copy(tmp_path: Path, name: str = "model.onnx") -> Path:
    dest = tmp_path / name
    shutil.copyfile(SHIPPED, dest)
    shutil.copyfile(manifest_path_for(SHIPPED), manifest_path_for(dest))
    _edit(dest, artifact=name)
    return dest


def _edit(target: Path, **fields) -> None:
    path = manifest_path_for(target)
    d = json.loads(path.read_text())
    d.update(fields)
    path.write_text(json.dumps(d))


def test_a_good_artifact_loads_with_and_without_a_format(tmp_path):
    onnx = _copy(tmp_path)
    assert load_manifest(onnx, "onnx").artifact == "model.onnx"
    assert load_manifest(onnx).format == "onnx"


def test_each_problem_has_one_exception(tmp_path):
    with pytest.raises(ArtifactError, match=r"nope\.onnx: artifact not found") as e:
        load_manifest(tmp_path / "nope.onnx", "onnx")
    assert type(e.value) is ArtifactError and e.value.exit_code == 4
    bare = tmp_path / "bare.onnx"
    shutil.copyfile(SHIPPED, bare)
    with pytest.raises(ManifestError, match="manifest not found"):
        load_manifest(bare)
    onnx = _copy(tmp_path)
    with pytest.raises(ManifestError, match=r"describes a 'onnx' artifact, but model\.onnx is 'trt'"):
        load_manifest(onnx, "trt")
    _edit(onnx, artifact="other.onnx")
    with pytest.raises(ManifestError, match=r"describes 'other\.onnx', not 'model\.onnx'"):
        load_manifest(onnx)
    _edit(onnx, artifact="model.onnx")
    onnx.write_bytes(onnx.read_bytes() + b"\0")
    with pytest.raises(ManifestError, match=r"sha256 .* does not match its manifest") as e:
        load_manifest(onnx, "onnx")
    assert type(e.value) is ManifestError


def test_a_plan_whose_hash_differs_is_an_engine_mismatch(tmp_path):
    plan = tmp_path / "model.trt.plan"
    plan.write_bytes(b"a raw plan")
    shutil.copyfile(manifest_path_for(SHIPPED), manifest_path_for(plan))
    _edit(plan, artifact=plan.name, format="trt", sha256=sha256_file(plan))
    assert load_manifest(plan, "trt").format == "trt"
    plan.write_bytes(b"another plan")
    with pytest.raises(EngineMismatchError, match="sha256"):
        load_manifest(plan, "trt")
    with pytest.raises(EngineMismatchError, match="sha256"):
        load_manifest(plan)  # the policy follows the manifest's format, not the caller's


def _callers(tmp_path: Path) -> dict:
    """Every entry point that opens an ONNX artifact, each as a function of its path."""
    from calibration.api import build_int8
    from rd_export.fp16 import make_fp16
    from rd_export.pipeline import BuildOptions, build
    from rd_export.tensorrt import build_engine
    from runtime.backends import open_backend

    calib = tmp_path / "calib"
    calib.mkdir(exist_ok=True)
    return {
        "runtime backend": lambda p: open_backend(p, threads=1),
        "fp16": lambda p: make_fp16(p, tmp_path / "out.fp16.onnx"),
        "rd-export build": lambda p: build(p, tmp_path / "o", BuildOptions(precision="fp16", fmt="onnx")),
        "engine build": lambda p: build_engine(p, out=tmp_path / "out.trt.plan"),  # before TensorRT is imported
        "int8": lambda p: build_int8(p, calib, out=tmp_path / "o8"),
    }


@pytest.mark.parametrize("problem,fields,match", [
    ("another file", {"artifact": "other.onnx"}, r"describes 'other\.onnx', not 'model\.onnx'"),
    ("another format", {"format": "trt"}, r"describes a 'trt' artifact, but model\.onnx is 'onnx'"),
])
def test_every_caller_reports_the_same_error(tmp_path, problem, fields, match):
    pytest.importorskip("onnx")
    onnx = _copy(tmp_path)
    _edit(onnx, **fields)
    for call in _callers(tmp_path).values():
        with pytest.raises(ManifestError, match=match):
            call(onnx)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib", "model.json", "model.onnx"]  # nothing written


def test_every_caller_refuses_a_tampered_onnx_the_same_way(tmp_path):
    pytest.importorskip("onnx")
    onnx = _copy(tmp_path)
    onnx.write_bytes(onnx.read_bytes() + b"\0")
    for call in _callers(tmp_path).values():
        with pytest.raises(ManifestError, match=r"model\.onnx: sha256 .* does not match its manifest"):
            call(onnx)


def test_reverify_loads_through_the_same_loader(tmp_path):
    pytest.importorskip("torch")
    from rd_export.pipeline import reverify

    onnx = _copy(tmp_path)
    _edit(onnx, artifact="other.onnx")
    with pytest.raises(ManifestError, match=r"describes 'other\.onnx', not 'model\.onnx'"):
        reverify(onnx, Path(__file__).resolve().parents[1] / "training" / "assets" / "default.pt")
    with pytest.raises(ArtifactError, match="artifact not found"):
        reverify(tmp_path / "gone.onnx", tmp_path / "unused.pt")
