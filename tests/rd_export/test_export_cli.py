"""rd-export CLI: build / inspect / verify, exit codes, one-line errors, no torch on the edge path."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap

import pytest
from rdx_helpers import write_random_checkpoint
from typer.testing import CliRunner

from rd_export.cli import app
from runtime.errors import InputError
from runtime.manifest import manifest_path_for

SMALL = ["--min-size", "32x32", "--opt-size", "32x32", "--max-size", "64x64", "--batch", "1..2"]


@pytest.fixture
def cli():
    runner = CliRunner()

    def run(*args):
        return runner.invoke(app, [str(a) for a in args], catch_exceptions=True)

    return run


@pytest.fixture
def no_tensorrt(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)


def _one_error_line(result):
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert "Traceback" not in result.stderr
    return errors[0]


def test_build_trained_checkpoint_json(cli, tiny_checkpoint, tmp_path, no_tensorrt):
    out = tmp_path / "out"
    r = cli("build", tiny_checkpoint, "-o", out, "--precision", "fp16", "--format", "onnx", "--steps", "2", *SMALL,
            "--json")
    assert r.exit_code == 0, r.stderr
    res = json.loads(r.stdout)
    assert [(a["precision"], a["path"].split("/")[-1]) for a in res["artifacts"]] == [
        ("fp32", "model.onnx"), ("fp16", "model.fp16.onnx")]
    assert res["artifacts"][0]["psnr_db"] >= 60 and res["artifacts"][1]["psnr_db"] >= 40
    assert res["notes"] == []  # --format onnx: no engine was asked for
    assert "stage 1/3 export" in r.stderr and "stage 2/3 precision" in r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["model.fp16.json", "model.fp16.onnx", "model.json", "model.onnx"]


def test_build_from_onnx_table_and_format_all_note(cli, exported, tmp_path, no_tensorrt):
    src = tmp_path / "src"
    src.mkdir()
    for p in (exported.onnx, manifest_path_for(exported.onnx)):
        shutil.copy(p, src / p.name)
    r = cli("build", src / "model.onnx", "--precision", "fp16", "--format", "all", "-o", tmp_path / "dev")
    assert r.exit_code == 0, r.stderr
    assert "model.fp16.onnx" in r.stderr and "vs FP32 ONNX" in r.stderr  # the summary table
    assert "note: TensorRT engine skipped" in r.stderr and "raindiffusion-edge[trt]" in r.stderr
    assert (tmp_path / "dev" / "model.fp16.json").is_file()


def test_build_onnx_without_tensorrt_exits_6(cli, exported, no_tensorrt):
    r = cli("build", exported.onnx)  # default --format for an ONNX is trt: the engine is the point
    assert r.exit_code == 6
    line = _one_error_line(r)
    assert "pip install 'raindiffusion-edge[trt]'" in line and "rd-export build model.onnx" in line


def test_clear_errors_and_exit_codes(cli, tmp_path, random_checkpoint):
    png = tmp_path / "rain.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 32)
    r = cli("build", png)
    assert r.exit_code == 3 and "is a PNG image, not a checkpoint" in _one_error_line(r)

    bad = tmp_path / "bad.pt"
    bad.write_bytes(random_checkpoint.read_bytes()[:4096])
    r = cli("build", bad, "-o", tmp_path / "o")
    assert r.exit_code == 3 and "bad.pt" in _one_error_line(r)

    r = cli("build", random_checkpoint, "-o", tmp_path / "o", "--min-size", "30x30")
    assert r.exit_code == 2 and "not a multiple of 8" in _one_error_line(r)
    r = cli("build", random_checkpoint, "-o", tmp_path / "o", "--max-size", "big")
    assert r.exit_code == 2 and "--max-size 'big' is not HxW" in _one_error_line(r)
    r = cli("build", random_checkpoint, "--batch", "4..1")
    assert r.exit_code == 2 and "1 <= min <= opt <= max" in _one_error_line(r)
    r = cli("build", tmp_path / "missing.pt")
    assert r.exit_code == 2  # typer: path does not exist
    r = cli("build", random_checkpoint, "-o", tmp_path / "o", "--steps", "1")
    assert r.exit_code == 2 and "got 1 (a single step of Algorithm 2" in " ".join(r.output.replace("│", " ").split())
    assert not (tmp_path / "o").exists()

    r = cli("--debug", "build", png)  # --debug: the exception (and its traceback) comes through
    assert isinstance(r.exception, InputError)


def test_inspect(cli, exported):
    r = cli("inspect", exported.fp16, "--json")
    assert r.exit_code == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["hash_ok"] and info["manifest"]["precision"] == "fp16" and info["opset"] >= 17
    assert [s["name"] for s in info["io"]["inputs"]] == ["x_t", "cond", "t", "coef"]
    r = cli("inspect", exported.fp16)
    assert r.exit_code == 0
    assert "fp32 islands: normalization" in r.stdout and "[batch, 3, height, width]" in r.stdout


def test_verify_passes_and_fails_with_numbers(cli, exported, tmp_path):
    r = cli("verify", exported.onnx, "--checkpoint", exported.checkpoint, "--steps", "2")
    assert r.exit_code == 0, r.stderr
    assert "passed" in r.stderr and "end-to-end PSNR" in r.stderr

    other = write_random_checkpoint(tmp_path / "other.pt", seed=5)  # same config, other weights
    r = cli("verify", exported.onnx, "--checkpoint", other, "--steps", "2", "--json")
    assert r.exit_code == 5
    report = json.loads(r.stdout)
    assert report["passed"] is False and report["checkpoint_matches_manifest"] is False
    assert "failed verification" in _one_error_line(r)


def test_edge_path_never_imports_torch(exported, tmp_path):
    """Mira's flow (ONNX + manifest on a device) must not need PyTorch: inspect and build."""
    code = textwrap.dedent(f"""
        import sys
        sys.modules["torch"] = None          # any import of torch now fails loudly
        sys.modules["tensorrt"] = None
        from typer.testing import CliRunner
        from rd_export.cli import app
        r = CliRunner().invoke(app, ["inspect", r"{exported.onnx}"])
        assert r.exit_code == 0, r.output
        r = CliRunner().invoke(app, ["build", r"{exported.onnx}", "--precision", "fp16", "--format", "all",
                                     "-o", r"{tmp_path}", "--steps", "2"])
        assert r.exit_code == 0, (r.stdout, r.stderr)
        print("ok")
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-2000:]


def test_int8_calibration_flags_reach_build_int8_and_misuse_names_the_flag(cli, exported, tmp_path, monkeypatch):
    """--calib-target-psnr / --calib-max-fp32 (the FP32-fallback search) are forwarded to build_int8;
    given to a precision that takes no calibration, the error names the flag the user typed."""
    seen = {}

    def fake_build_int8(fp32_onnx, calib_dir, **kw):
        seen.update(calib_dir=calib_dir, **kw)
        raise InputError("stop here: the options were recorded")

    monkeypatch.setattr("calibration.api.build_int8", fake_build_int8)
    calib = tmp_path / "calib"
    calib.mkdir()
    src = tmp_path / "src"
    shutil.copytree(exported.out_dir, src)
    res = cli("build", src / "model.onnx", "--precision", "int8", "--format", "onnx", "--calib", calib,
              "--calib-images", 3, "--calib-method", "percentile", "--calib-target-psnr", 38, "--calib-max-fp32", 6)
    assert res.exit_code == 3 and "stop here" in _one_error_line(res)
    assert seen["calib_dir"] == calib and seen["calib_images"] == 3 and seen["method"] == "percentile"
    assert seen["target_psnr_db"] == 38.0 and seen["max_fp32_layers"] == 6
    res = cli("build", src / "model.onnx", "--precision", "fp16", "--format", "onnx", "--calib-target-psnr", 38)
    assert res.exit_code == 2
    assert "--calib-target-psnr is not used by precision fp16" in _one_error_line(res)
