"""``build_int8``: the artifact, its manifest, the quality floor, the runtime, and the failure modes."""

from __future__ import annotations

import json

import numpy as np
import pytest

from calibration.api import build_int8, int8_path_for
from runtime.derainer import Derainer
from runtime.errors import InputError, ManifestError, UsageError, VerificationError
from runtime.manifest import Manifest, manifest_path_for, sha256_file
from runtime.metrics import psnr_y
from runtime.schedule import DDIMSchedule

#: INT8 vs FP32, end to end, on the tiny model (conftest; gentle schedule, 4 steps). Measured: s8
#: graph (exact Q/DQ) and u8r CPU graph ~57-59 dB held out; the s8 graph through onnxruntime's
#: AVX2 kernels ~40 dB (int16 pair saturation, reported separately, floor 35 dB).
QUALITY_FLOOR_DB = 50.0
S8_ON_AVX2_FLOOR_DB = 35.0


def test_paths():
    assert int8_path_for("/a/model.onnx").as_posix() == "/a/model.int8.onnx"
    assert int8_path_for("/a/model.onnx", "/b").as_posix() == "/b/model.int8.onnx"
    assert int8_path_for("/a/model.onnx", "/b/x.int8.onnx").as_posix() == "/b/x.int8.onnx"
    assert int8_path_for("/a/model.onnx", suffix=".int8.cpu").as_posix() == "/a/model.int8.cpu.onnx"
    assert int8_path_for("/a/model.onnx", "/b/x.int8.onnx", suffix=".int8.cpu").as_posix() == "/b/x.int8.cpu.onnx"


def test_artifacts_and_manifest(tiny_int8, tiny_fp32, steps):
    assert tiny_int8.name == "model.int8.onnx"
    out = tiny_int8.parent
    assert sorted(p.name for p in out.iterdir()) == ["model.int8.cpu.json", "model.int8.cpu.onnx",
                                                     "model.int8.json", "model.int8.onnx"]  # no temp files left
    m = Manifest.for_artifact(tiny_int8)
    m.check_artifact_hash(tiny_int8)
    fp32 = Manifest.for_artifact(tiny_fp32.onnx)
    assert (m.precision, m.format, m.artifact) == ("int8", "onnx", "model.int8.onnx")
    assert m.descriptor == fp32.descriptor and m.schedule == fp32.schedule
    assert m.get("source")["onnx_sha256"] == sha256_file(tiny_fp32.onnx)
    c = m.get("calibration")
    sched = DDIMSchedule(fp32.schedule_config)
    # every step of every calibrated step count: 2, 3, 5, 10 and the build's own
    counts = sorted({2, 3, 5, 10, steps})
    assert c["calibrated_step_counts"] == counts
    assert c["noise_scale"] == fp32.noise_scale == 1.0  # the trajectories start where the runtime's do
    union = sorted({int(t) for n in counts for t in sched.set_timesteps(n)}, reverse=True)
    assert c["timesteps"] == union
    assert c["samples"] == 4 * sum(counts)
    assert c["sizes"] == [[32, 32], [16, 16]]
    assert not set(c["images"]) & set(c["held_out_images"]) and len(c["held_out_images"]) == 2
    assert c["recipe"] == "s8" and c["activation_symmetric"] is True
    assert c["graph"]["activation_types"] == ["int8"] and c["graph"]["nonzero_zero_points"] == 0
    assert len(c["fp32_nodes"]) == 3 and all("attn_head" in n for n in c["fp32_nodes"])
    assert c["siblings"] == {"onnxruntime_cpu": "model.int8.cpu.onnx"}
    lat = c["latency"]
    assert list(lat["models"]) == ["fp32", "int8_s8", "int8_u8r"] and lat["models"]["fp32"]["speedup"] == 1.0
    assert m.get("verification")["semantics"].startswith("Q/DQ reference")
    assert "quality_onnxruntime_cpu" in c  # the s8 graph through onnxruntime's CPU kernels, reported apart
    cpu = Manifest.for_artifact(out / "model.int8.cpu.onnx")
    cc = cpu.get("calibration")
    assert cc["recipe"] == "u8r" and cc["graph"]["activation_types"] == ["uint8"] and "7-bit" in cc["weights"]
    assert "not TensorRT" in cc["target"] and cc["siblings"] == {"tensorrt": "model.int8.onnx"}
    assert cpu.get("verification")["semantics"] == "onnxruntime CPU kernels"


def test_steps_outside_the_calibrated_timesteps_warn_once(tiny_int8):
    import warnings

    from runtime.derainer import Derainer

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Derainer(tiny_int8, steps=3, threads=1).close()  # calibrated: no warning
    with pytest.warns(UserWarning, match=r"not calibrated at timesteps \[858, 715, 572"):
        Derainer(tiny_int8, steps=7, threads=1).close()


def test_quality_floor(tiny_int8):
    for path in (tiny_int8, tiny_int8.with_name("model.int8.cpu.onnx")):
        m = Manifest.for_artifact(path)
        q = m.get("calibration")["quality"]
        assert q["held_out"] is True and q["images"] == 2
        assert q["psnr_db_min"] >= QUALITY_FLOOR_DB, q
        v = m.get("verification")
        assert v["reference"] == "fp32" and v["finite"] and v["psnr_db"] >= QUALITY_FLOOR_DB, v
        assert min(m.get("calibration")["step_psnr_db"].values()) >= QUALITY_FLOOR_DB
    on_cpu = Manifest.for_artifact(tiny_int8).get("calibration")["quality_onnxruntime_cpu"]
    assert on_cpu["psnr_db_min"] >= S8_ON_AVX2_FLOOR_DB


def test_int8_runs_through_the_runtime(tiny_int8, tiny_fp32):
    rng = np.random.Generator(np.random.PCG64(0))
    frame = rng.integers(0, 256, (24, 40, 3), dtype=np.uint8)  # not a multiple of 8: padded by the runtime
    with Derainer(tiny_fp32.onnx, seed=1) as fp32:
        want = fp32.derain(frame)
    for path, floor in ((tiny_int8, 35.0), (tiny_int8.with_name("model.int8.cpu.onnx"), 45.0)):
        with Derainer(path, seed=1) as int8:
            assert int8.manifest.precision == "int8"
            got = int8.derain(frame)
        assert got.shape == frame.shape and got.dtype == np.uint8
        assert psnr_y(got, want) > floor, path.name


def test_registry_derive_forwards_to_build_int8(monkeypatch, tmp_path):
    seen = {}

    def fake(fp32_onnx, calib_dir, **kw):
        seen.update(fp32_onnx=fp32_onnx, calib_dir=calib_dir, **kw)
        return tmp_path / "x.int8.onnx"

    from rd_export.precision import PRECISIONS

    monkeypatch.setattr("calibration.api.build_int8", fake)
    out = PRECISIONS["int8"].derive(tmp_path / "m.onnx", out=tmp_path / "m.int8.onnx", calib=tmp_path / "c",
                                    steps=None, seed=3, progress=None, calib_images=5)
    assert out == tmp_path / "x.int8.onnx"
    assert seen["calib_dir"] == tmp_path / "c" and seen["calib_images"] == 5 and seen["seed"] == 3
    assert seen["min_psnr_db"] == 35.0  # the precision table's row, or DEFAULT_MIN_PSNR_DB


# ------------------------------------------------------------------ failures: clear errors, nothing written
@pytest.mark.parametrize("case", ["missing", "empty", "unreadable"])
def test_bad_calibration_folder(tiny_fp32, tmp_path, case):
    folder = tmp_path / f"calib_{case}"
    if case != "missing":
        folder.mkdir()
    if case == "unreadable":
        (folder / "a.jpg").write_bytes(b"\xff\xd8\xff garbage")
        (folder / "b.png").write_bytes(b"")
    out = tmp_path / "out"
    with pytest.raises(InputError, match=f"calib_{case}") as info:
        if case == "unreadable":
            with pytest.warns(UserWarning, match="skipping unreadable calibration image"):
                build_int8(tiny_fp32.onnx, folder, out=out, latency=False)
        else:
            build_int8(tiny_fp32.onnx, folder, out=out, latency=False)
    assert info.value.exit_code == 3
    assert not out.exists() or not any(out.iterdir())


def test_failed_verification_writes_nothing(tiny_fp32, rainy_dir, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(VerificationError, match=r"model\.int8\.onnx failed verification: end-to-end PSNR"):
        build_int8(tiny_fp32.onnx, rainy_dir, out=out, calib_images=2, eval_images=1, sizes=[16],
                   min_psnr_db=150.0, latency=False)
    assert list(out.iterdir()) == []  # no artifact, no manifest, no temp folder


def test_refuses_what_is_not_a_verified_fp32_onnx(tiny_int8, tiny_fp32, rainy_dir, tmp_path):
    with pytest.raises(UsageError, match="is int8; INT8 is derived from the FP32 ONNX"):
        build_int8(tiny_int8, rainy_dir, out=tmp_path)
    tampered = tmp_path / "model.onnx"
    tampered.write_bytes(tiny_fp32.onnx.read_bytes() + b"\0")
    manifest_path_for(tampered).write_text(manifest_path_for(tiny_fp32.onnx).read_text())
    with pytest.raises(ManifestError, match="sha256"):
        build_int8(tampered, rainy_dir, out=tmp_path)
    with pytest.raises(UsageError, match="not a multiple of the model's size multiple 8"):
        build_int8(tiny_fp32.onnx, rainy_dir, out=tmp_path, sizes=[20])
    with pytest.raises(UsageError, match="fp32_nodes not found"), \
            pytest.warns(RuntimeWarning, match="no held-out image"):
        build_int8(tiny_fp32.onnx, rainy_dir, out=tmp_path / "o", calib_images=1, eval_images=0, sizes=[16],
                   fp32_nodes=["nope"], latency=False)


def test_manifest_is_json_with_finite_numbers(tiny_int8):
    text = manifest_path_for(tiny_int8).read_text()
    json.loads(text, parse_constant=lambda c: pytest.fail(f"non-finite number {c} in the manifest"))


def test_from_checkpoint_through_the_real_exporter(tiny_checkpoint, rainy_dir, tmp_path):
    """Checkpoint -> rd_export.export_onnx (verified FP32) -> build_int8: node names of the real export
    are found (the attention head), and the artifact carries the checkpoint provenance."""
    from rd_export.export import export_onnx

    fp32 = export_onnx(tiny_checkpoint, tmp_path, steps=2, seed=0)
    int8 = build_int8(fp32, rainy_dir, steps=2, seed=0, calib_images=2, eval_images=1, sizes=[32],
                      cpu_variant=False, latency=False, min_psnr_db=None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.int8.json", "model.int8.onnx", "model.json",
                                                          "model.onnx"]
    m = Manifest.for_artifact(int8)
    assert m.get("source")["checkpoint"] == tiny_checkpoint.name and m.get("source")["onnx"] == "model.onnx"
    assert len(m.get("calibration")["fp32_nodes"]) == 3
    sched = DDIMSchedule()
    union = sorted({int(t) for n in (2, 3, 5, 10) for t in sched.set_timesteps(n)}, reverse=True)
    c = m.get("calibration")
    assert c["timesteps"] == union and c["calibrated_step_counts"] == [2, 3, 5, 10]


@pytest.mark.slow  # ~50 s: every layer group is quantized and probed once
def test_fp32_search_keeps_the_most_sensitive_layer(tiny_fp32, rainy_dir, tmp_path):
    """target_psnr_db out of reach: the all-but-one ranking is measured, the most sensitive layer
    group (one, max_fp32_layers=1) is kept FP32 on top of the default ones, and the manifest says so."""
    int8 = build_int8(tiny_fp32.onnx, rainy_dir, out=tmp_path, calib_images=2, eval_images=1, sizes=[16],
                      cpu_variant=False, latency=False, min_psnr_db=None, target_psnr_db=300.0, max_fp32_layers=1)
    c = Manifest.for_artifact(int8).get("calibration")
    search = c["fp32_search"]
    assert search["target_psnr_db"] == 300.0 and search["before_db"] < 300.0 and "after_db" in search
    ranking = search["ranking"]
    psnrs = [r["psnr_db_all_but"] for r in ranking]  # all but this group quantized: most sensitive first
    assert psnrs and psnrs == sorted(psnrs, reverse=True)
    default = build_int8.__globals__["default_fp32_nodes"](str(tiny_fp32.onnx))
    assert len(c["fp32_nodes"]) > len(default)
