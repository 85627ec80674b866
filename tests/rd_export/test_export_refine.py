"""Export of a predict-and-refine checkpoint: two graphs, one manifest, both verified."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("torch")

from rdx_helpers import one_torch_thread, write_random_checkpoint

from rd_export.export import export_onnx, native_profile, prologue_name
from runtime.errors import ArtifactError, ManifestError


@pytest.fixture(scope="module")
def refine_export(tmp_path_factory):
    d = tmp_path_factory.mktemp("refine")
    with one_torch_thread():
        ck = write_random_checkpoint(d / "r.pt", cond_channels=6, prediction="x0_residual", crop=32)
        onnx = export_onnx(ck, d / "out", steps=3)
    return ck, onnx


def test_two_graphs_one_manifest(refine_export):
    _, onnx = refine_export
    m = json.loads(onnx.with_suffix(".json").read_text())
    pro = onnx.with_name("model.prologue.onnx")
    assert pro.is_file() and m["prologue"]["artifact"] == pro.name
    assert m["descriptor"]["cond_channels"] == 6
    assert m["native_tile"] == 32
    # the default profile is the native one: tiles of at most the training crop
    assert m["descriptor"]["profile"]["max_size"] == [32, 32]
    v = m["verification"]
    assert v["passed"] and v["psnr_db"] >= 60 and v["prologue_max_abs"] <= 1e-4
    # min, opt and max of the profile were all checked (besides the batch-2 non-square shape)
    checked = {tuple(r["shape"]) for r in v["shapes"]}
    assert (8, 3, 32, 32) in checked and (4, 3, 32, 32) in checked
    assert {tuple(r["shape"]) for r in v["prologue"]} >= {(8, 3, 32, 32), (4, 3, 32, 32)}


def test_prologue_name():
    assert prologue_name("model.onnx") == "model.prologue.onnx"
    assert prologue_name("default.int8.onnx") == "default.int8.prologue.onnx"
    assert prologue_name("model.trt.plan") == "model.trt.prologue.plan"


def test_native_profile_fits_the_size_multiple():
    p = native_profile(32, 64)
    assert (p.min_size, p.opt_size, p.max_size) == ((32, 32), (64, 64), (64, 64))
    assert native_profile(32, 80).max_size == (96, 96)  # rounded up to the multiple


def test_tampered_prologue_is_refused(refine_export, tmp_path):
    import shutil

    from runtime.derainer import Derainer

    _, onnx = refine_export
    for f in onnx.parent.iterdir():
        shutil.copy(f, tmp_path / f.name)
    pro = tmp_path / "model.prologue.onnx"
    pro.write_bytes(pro.read_bytes() + b"\0")
    with pytest.raises(ManifestError, match=r"prologue\.onnx: sha256 .* does not match its manifest"):
        Derainer(tmp_path / "model.onnx")
    pro.unlink()
    with pytest.raises(ArtifactError, match=r"the prologue graph of model\.onnx is missing"):
        Derainer(tmp_path / "model.onnx")


def test_manifest_needs_a_prologue_for_a_six_channel_step(refine_export, tmp_path):
    from runtime.manifest import Manifest

    _, onnx = refine_export
    d = json.loads(onnx.with_suffix(".json").read_text())
    del d["prologue"]
    with pytest.raises(ManifestError, match="6-channel condition needs a 'prologue' entry"):
        Manifest.from_dict(d)
    d = json.loads(onnx.with_suffix(".json").read_text())
    d["prologue"]["artifact"] = "../elsewhere.onnx"
    with pytest.raises(ManifestError, match=r"prologue\.artifact\' must be a plain file name"):
        Manifest.from_dict(d)


def test_rain_model_of_a_refine_checkpoint_is_refused(refine_export, tmp_path):
    from runtime.errors import UsageError

    ck, _ = refine_export
    with pytest.raises(UsageError, match="exports its derain model"):
        export_onnx(ck, tmp_path, model="rain", steps=3)
    assert not any(tmp_path.iterdir())


def test_verification_checks_the_exported_prologue(refine_export, tmp_path):
    """A prologue that computes something else fails verification (prologue_max_abs)."""
    import torch

    from rd_export.export import export_prologue_onnx, verify_onnx
    from runtime.manifest import Manifest
    from training.checkpoint import build_estimator, build_prologue, load_checkpoint

    ck, onnx = refine_export
    c = load_checkpoint(ck)
    est, pro = build_estimator(c), build_prologue(c)
    desc = Manifest.for_artifact(onnx).step_descriptor
    wrong = build_prologue(c)
    with torch.no_grad():
        for p in wrong.predictor.parameters():
            p.add_(0.01)
    bad = export_prologue_onnx(wrong, tmp_path / "bad.prologue.onnx", desc.prologue())
    from runtime.errors import VerificationError

    with one_torch_thread(), pytest.raises(VerificationError, match="prologue max abs error"):
        verify_onnx(onnx, est, desc, steps=3, prologue=pro, prologue_path=bad)
    with one_torch_thread():
        ok = verify_onnx(onnx, est, desc, steps=3, prologue=pro, prologue_path=onnx.with_name("model.prologue.onnx"))
    assert ok["prologue_max_abs"] < 1e-4 and np.isfinite(ok["psnr_db"])


def test_default_steps_zero_and_derived_precisions_verify_at_steps(refine_export, tmp_path):
    """A refine model may ship with 0 default steps (the predictor alone): the manifest says 0, the
    runtime then runs the prologue only, and FP16 (derived) is still verified through DDIM steps."""
    from rd_export.fp16 import make_fp16
    from runtime.derainer import Derainer
    from runtime.manifest import Manifest

    ck, _ = refine_export
    with one_torch_thread():
        onnx = export_onnx(ck, tmp_path, steps=3, default_steps=0)
    m = Manifest.for_artifact(onnx)
    assert m.default_steps == 0 and m.verify_steps == 3 and m.get("verification")["steps"] == 3
    with Derainer(onnx, threads=1) as d:
        assert d.steps == 0
    fp16 = Manifest.for_artifact(make_fp16(onnx))
    assert fp16.default_steps == 0 and fp16.get("verification")["steps"] == 3
    from runtime.errors import UsageError

    with pytest.raises(UsageError, match="0 needs a predict-and-refine model"):
        from rdx_helpers import write_random_checkpoint as w

        export_onnx(w(tmp_path / "y.pt"), tmp_path / "y", steps=3, default_steps=0)
