"""rd-run bench / info / --help with a FAKE derainer."""

from __future__ import annotations

import pytest
import typer

import runtime.cli as cli


def test_bench_json_keys(rd_run, fake_factory):
    r = rd_run("bench", "--size", "40x24", "--runs", "3", "--warmup", "1", "--steps", "5", "--threads", "2", "--json")
    assert r.code == 0, r
    j = r.json
    for key in ("step_min_ms", "step_median_ms", "step_p95_ms", "frame_min_ms", "frame_median_ms", "frame_p95_ms",
                "fps", "peak_rss_mib", "backend", "device", "threads", "steps", "batch", "runs", "warmup", "size"):
        assert key in j, key
    assert j["backend"] == "fake" and j["threads"] == 2 and j["steps"] == 5 and j["size"] == "40x24"
    assert j["step_median_ms"] == pytest.approx(j["frame_median_ms"] / 5)
    assert j["frame_min_ms"] <= j["frame_median_ms"] <= j["frame_p95_ms"]
    assert j["peak_rss_mib"] > 10 and j["fps"] > 0
    assert fake_factory[0].frames == 4  # warmup + runs


def test_bench_batch_and_text_output(rd_run, fake_factory):
    r = rd_run("bench", "--size", "16", "--runs", "2", "--warmup", "0", "--batch", "3")
    assert r.code == 0, r
    assert "frame: min" in r.stdout and "fps" in r.stdout and "peak RSS" in r.stdout
    assert fake_factory[0].batch_calls == 2 and fake_factory[0].frames == 6
    assert fake_factory[0].options["batch"] == 3  # frames per call and tiles per engine call, as in derain


def test_bench_batches_tiles_as_derain_does(rd_run, fake_factory):
    """Without --batch the bench measures what rd-run derain runs: one frame per call and the tiles
    batched by the engine's default (it used to force one tile per engine call)."""
    r = rd_run("bench", "--size", "16", "--runs", "1", "--warmup", "0", "--json")
    assert r.code == 0, r
    assert fake_factory[0].options["batch"] is None and r.json["batch"] == 1 and fake_factory[0].frames == 1


def test_run_bench_at_zero_steps_has_no_step_times():
    from runtime.bench import run_bench

    class PredictorOnly:
        steps = 0

        def derain(self, frame):
            return frame

    out = run_bench(PredictorOnly(), width=8, height=8, runs=2, warmup=0)
    assert out["steps"] == 0 and out["frame_median_ms"] >= 0
    assert out["step_median_ms"] is None and out["step_p95_ms"] is None
    assert run_bench(PredictorOnly(), width=8, height=8, runs=1, warmup=0, steps=3)["steps"] == 3


@pytest.mark.parametrize("size", ["big", "0x10", "10x"])
def test_bench_bad_size_is_usage_error(rd_run, size):
    r = rd_run("bench", "--size", size)
    assert r.code == 2 and r.stderr.startswith("rd-run: error: --size")


def test_info(rd_run):
    r = rd_run("info", "--json")
    assert r.code == 0, r
    j = r.json
    assert j["versions"]["raindiffusion-edge"] and j["versions"]["numpy"]
    assert "onnxruntime" in j["backends"] and "fp32" in j["default_models"]
    ov = j["backends"]["openvino"]
    import importlib.util

    assert ov["available"] == (importlib.util.find_spec("openvino") is not None)
    assert isinstance(ov["native_bf16"], bool) if ov["available"] else "[openvino]" in ov["install"]
    assert j["exit_codes"]["7"].startswith("partial failure")
    r = rd_run("info")
    assert r.code == 0 and "default models:" in r.stdout and "backends:" in r.stdout


def test_version(rd_run):
    r = rd_run("--version")
    assert r.code == 0 and r.stdout.startswith("rd-run ")


def test_help_explains_every_option_and_lists_exit_codes(rd_run):
    group = typer.main.get_command(cli.app)
    for name, command in group.commands.items():
        for param in command.params:
            if param.param_type_name == "option":
                assert (param.help or "").strip(), f"rd-run {name} {param.opts[0]} has no help"
        r = rd_run(name, "--help")
        assert r.code == 0
        for code in ("  7  partial failure", "130  interrupted"):
            assert code in r.stdout, (name, r.stdout)


def test_rd_run_never_imports_torch(tmp_path):
    import subprocess
    import sys

    code = (
        "import sys, runtime.cli, runtime.batch, runtime.video, runtime.evaluate, runtime.bench, runtime.stream\n"
        "from typer.testing import CliRunner\n"
        "assert CliRunner().invoke(runtime.cli.app, ['info', '--json']).exit_code == 0\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'training', 'rd_export'))\n"
        "assert not bad, bad\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr


def test_precision_int8_prefers_the_x86_cpu_graph(tmp_path, monkeypatch):
    """--precision int8 picks default.int8.cpu.onnx (u8 activations, 7-bit weights) when shipped,
    else the TensorRT-style default.int8.onnx; neither shipped -> a clear ArtifactError."""
    import pytest

    import runtime.cli as cli
    import runtime.derainer as dmod
    from runtime.errors import ArtifactError, UsageError


    monkeypatch.setattr(dmod, "_assets", lambda: tmp_path)
    with pytest.raises(ArtifactError, match=r"--precision int8: the INT8 model .* is not shipped.*--precision fp32"):
        cli.resolve_engine(None, cli.Precision.int8)
    with pytest.raises(ArtifactError, match=r"no default model is installed"):
        cli.resolve_engine(None, cli.Precision.fp32)
    # auto (no --precision) falls back to FP32 where the INT8 model it would pick is missing
    monkeypatch.setattr("runtime.backends.default_precision", lambda device=None: "int8")
    (tmp_path / "default.onnx").write_bytes(b"x")
    assert dmod.default_artifact() == tmp_path / "default.onnx"
    (tmp_path / "default.int8.onnx").write_bytes(b"x")
    assert cli.resolve_engine(None, cli.Precision.int8) == tmp_path / "default.int8.onnx"
    (tmp_path / "default.int8.cpu.onnx").write_bytes(b"x")
    assert cli.resolve_engine(None, cli.Precision.int8) == tmp_path / "default.int8.cpu.onnx"
    assert dmod.default_artifact() == tmp_path / "default.int8.cpu.onnx"
    with pytest.raises(UsageError, match="precision must be one of fp32, int8"):
        dmod.default_artifact("fp16")


@pytest.mark.parametrize(("backend", "device", "header"), [
    ("openvino", "openvino", "openvino on the CPU (2 threads)"),  # not "openvino on openvino"
    ("onnxruntime", "cpu", "onnxruntime on cpu (2 threads)"),
    ("tensorrt", "cuda:0", "tensorrt on cuda:0 (2 threads)"),
])
def test_bench_header_names_engine_and_device_once(rd_run, monkeypatch, fake_cls, backend, device, header):
    class Named(fake_cls):
        backend_name = backend

    monkeypatch.setattr(cli, "derainer_factory", lambda artifact=None, **kw: Named(artifact, **dict(kw, device=device)))
    r = rd_run("bench", "--size", "16", "--runs", "1", "--warmup", "0", "--threads", "2")
    assert r.code == 0, r
    assert r.stdout.splitlines()[0].startswith(header + ", 16x16"), r.stdout  # no manifest: no precision


def test_bench_header_names_the_model_precision(rd_run, monkeypatch, fake_cls):
    """The default precision is auto (INT8 on OpenVINO without BF16): the header says which model ran."""
    from types import SimpleNamespace

    class Int8(fake_cls):
        backend_name = "openvino"
        manifest = SimpleNamespace(precision="int8")

    monkeypatch.setattr(cli, "derainer_factory",
                        lambda artifact=None, **kw: Int8(artifact, **dict(kw, device="openvino")))
    r = rd_run("bench", "--size", "16", "--runs", "1", "--warmup", "0", "--threads", "2")
    assert r.code == 0, r
    assert r.stdout.splitlines()[0].startswith("openvino on the CPU (2 threads), int8 model, 16x16"), r.stdout
