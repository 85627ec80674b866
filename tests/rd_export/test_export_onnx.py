"""Checkpoint -> verified FP32 ONNX: graph contract, parity, manifest, atomicity, clear errors."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from rdx_helpers import TEST_PROFILE, TEST_STEPS

from rd_export.export import export_onnx
from rd_export.graph import check_model, check_signature, io_signature
from rd_export.verify import OnnxStep, compare_to_torch, psnr, verification_cond
from runtime.descriptor import ShapeProfile
from runtime.errors import CheckpointError, InputError, UsageError, VerificationError
from runtime.manifest import Manifest, sha256_file


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if ".tmp" in p.name or p.name.startswith("."))


def test_graph_contract(exported):
    model = onnx.load(str(exported.onnx))
    inferred = check_model(model)  # onnx.checker + strict shape inference
    manifest = Manifest.for_artifact(exported.onnx)
    check_signature(inferred, manifest.step_descriptor)
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17
    sig = io_signature(model)
    assert [(s["name"], s["dtype"], s["shape"]) for s in sig["inputs"]] == [
        ("x_t", "float32", ["batch", 3, "height", "width"]), ("cond", "float32", ["batch", 3, "height", "width"]),
        ("t", "float32", ["batch"]), ("coef", "float32", ["batch", 4])]
    assert [(s["name"], s["shape"]) for s in sig["outputs"]] == [("x_next", ["batch", 3, "height", "width"])]
    assert len({n.name for n in model.graph.node}) == len(model.graph.node)  # unique node names


def test_manifest_contents_and_hashes(exported):
    m = Manifest.for_artifact(exported.onnx)
    assert (m.artifact, m.format, m.precision, m.model) == ("model.onnx", "onnx", "fp32", "derain")
    assert m.sha256 == sha256_file(exported.onnx)
    m.check_artifact_hash(exported.onnx)
    assert m.descriptor["size_multiple"] == 8
    assert m.step_descriptor.profile == ShapeProfile(**TEST_PROFILE)
    assert m.schedule == {"num_train_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02,
                          "default_steps": TEST_STEPS}
    assert m.model_config["unet"]["base_channels"] == 8 and m.model_config["scales"] == [1.0, 0.5, 0.25]
    src = m.get("source")
    assert src["checkpoint"] == "model.pt" and src["checkpoint_sha256"] == sha256_file(exported.checkpoint)
    assert src["estimator"] == "ema_A"
    v = m.get("verification")
    assert v["passed"] and v["reference"] == "torch" and v["steps"] == TEST_STEPS
    # low / middle / high t of the 3-step schedule (tau = 667, 334, 1)
    assert [(r["at"], r["t"]) for r in v["per_step"]] == [("high", 667), ("middle", 334), ("low", 1)]
    assert v["per_step_max_abs"] <= 1e-4 and v["psnr_db"] >= 60.0
    assert v["shapes"][0]["shape"] == [2, 3, 32, 40]  # batch 2, non-square: every dynamic axis
    assert v["thresholds"] == {"psnr_db": 60.0, "per_step_max_abs": 1e-4}
    json.dumps(m.to_dict(), allow_nan=False)  # strict JSON (no NaN / Infinity)
    assert _leftovers(exported.out_dir) == []


@pytest.mark.parametrize("shape", [(1, 32, 32), (1, 32, 48), (2, 40, 24)], ids=["square", "non-square", "batch2"])
def test_onnxruntime_parity_per_step(exported, estimator_of, shape):
    import torch

    from training.multiscale import fused_step

    n, h, w = shape
    rng = np.random.default_rng(h * w + n)
    x_t = rng.standard_normal((n, 3, h, w), dtype=np.float32)
    cond = verification_cond(n, h, w, seed=3)
    t = np.array([901.0, 41.0][:n], np.float32)
    coef = np.array([[58.7, 58.6, 0.04, 0.99], [1.02, 0.2, 1.0, 0.05]][:n], np.float32)
    got = OnnxStep(exported.onnx)(x_t, cond, t, coef)
    est = estimator_of(exported.checkpoint)
    with torch.no_grad():
        want = fused_step(est, *(torch.from_numpy(a) for a in (x_t, cond, t, coef))).numpy()
    assert got.shape == (n, 3, h, w)
    assert np.abs(got - want).max() <= 1e-4


def test_end_to_end_matches_torch_sampler(exported, estimator_of):
    """The DDIM loop driven by the ONNX step reproduces training.diffusion.ddim_sample (batch 2, 32x48)."""
    rep = compare_to_torch(exported.onnx, estimator_of(exported.checkpoint), steps=TEST_STEPS, seed=5,
                           size=(32, 48), batch=2)
    assert rep["psnr_db"] >= 60.0 and rep["per_step_max_abs"] <= 1e-4 and rep["finite"]


def test_rain_model_exports_ema_b(tmp_path, random_checkpoint, exported):
    path = export_onnx(random_checkpoint, tmp_path, model="rain", name="rain", steps=2,
                       profile=ShapeProfile(**TEST_PROFILE))
    m = Manifest.for_artifact(path)
    assert path.name == "rain.onnx" and m.model == "rain" and m.get("source")["estimator"] == "ema_B"
    args = (np.zeros((1, 3, 32, 32), np.float32), verification_cond(1, 32, 32), np.array([500.0], np.float32),
            np.array([[1.0, 0.5, 1.0, 0.3]], np.float32))
    assert psnr(OnnxStep(path)(*args), OnnxStep(exported.onnx)(*args)) < 100  # a different network


def test_failed_verification_writes_nothing(tmp_path, random_checkpoint, monkeypatch):
    """A graph that does not compute what torch computes raises and leaves no artifact (nor temp file)."""
    import rd_export.export as ex

    original = ex.export_estimator_onnx

    def broken_export(estimator, dest, descriptor, **kw):
        original(estimator, dest, descriptor, **kw)
        model = onnx.load(str(dest))
        w = max(model.graph.initializer, key=lambda i: len(i.raw_data))  # a real weight tensor
        arr = onnx.numpy_helper.to_array(w) * 1.5
        w.CopyFrom(onnx.numpy_helper.from_array(arr, w.name))
        onnx.save(model, str(dest))
        return dest

    (tmp_path / "model.onnx").write_bytes(b"previous artifact")
    monkeypatch.setattr(ex, "export_estimator_onnx", broken_export)
    with pytest.raises(VerificationError, match="failed verification"):
        export_onnx(random_checkpoint, tmp_path, steps=2, profile=ShapeProfile(**TEST_PROFILE))
    assert (tmp_path / "model.onnx").read_bytes() == b"previous artifact"  # untouched
    assert not (tmp_path / "model.json").exists()
    assert _leftovers(tmp_path) == []


def test_clear_errors(tmp_path, random_checkpoint):
    from rd_export.pipeline import build, sniff

    png = tmp_path / "photo.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)
    with pytest.raises(InputError, match="is a PNG image, not a checkpoint"):
        build(png, tmp_path)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(random_checkpoint.read_bytes()[:2000])
    assert sniff(truncated) == "checkpoint"
    with pytest.raises(CheckpointError, match=r"truncated\.pt"):
        export_onnx(truncated, tmp_path)
    with pytest.raises(UsageError, match="not a multiple of 8"):
        export_onnx(random_checkpoint, tmp_path, profile=ShapeProfile(min_size=(30, 30)))
    with pytest.raises(UsageError, match="model must be"):
        export_onnx(random_checkpoint, tmp_path, model="snow")
    assert not (tmp_path / "model.onnx").exists()
