"""The OpenVINO backend (``device="openvino"``): the same artifact and protocol as onnxruntime.

At FP32 inference precision it must compute what onnxruntime computes (steps, the prologue into
the bound cond buffer, whole-frame prologue); its buffers are allocated once per shape and
reused; BF16 is chosen only where the CPU has it natively and stays close to FP32 on the shipped
model.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("openvino", reason="OpenVINO is not installed (pip install 'raindiffusion-edge[openvino]')")
pytest.importorskip("torch")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "rd_export"))

from rdx_helpers import one_torch_thread, write_random_checkpoint

import runtime.backends.openvino as ovb
from runtime import cpu
from runtime.backends import open_backend
from runtime.backends.onnxruntime import OnnxRuntimeBackend
from runtime.backends.openvino import OpenVINOBackend
from runtime.derainer import Derainer
from runtime.errors import DependencyError, UsageError
from runtime.schedule import DDIMSchedule

ASSETS = Path(__file__).resolve().parents[2] / "runtime" / "assets"


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    from rd_export.export import export_onnx

    d = tmp_path_factory.mktemp("ov")
    with one_torch_thread():
        y_only = export_onnx(write_random_checkpoint(d / "y.pt", crop=32), d / "y", steps=2)
        refine = export_onnx(write_random_checkpoint(d / "r.pt", cond_channels=6, prediction="x0_residual",
                                                     crop=32), d / "r", steps=2)
    return {"y": y_only, "refine": refine}


def _loop(backend, cond_or_rainy: np.ndarray, x_T: np.ndarray, steps: int = 2) -> np.ndarray:
    n, _, h, w = x_T.shape
    backend.bind(n, h, w)
    s = DDIMSchedule(backend.manifest.schedule_config)
    s.set_timesteps(steps)
    backend.set_schedule(s.timesteps, s.coefficients())
    if backend.has_prologue:
        backend.set_rainy(cond_or_rainy)
        backend.run_prologue()
    else:
        backend.set_cond(cond_or_rainy)
    backend.set_x(x_T)
    backend.run()
    return backend.get_x()


@pytest.mark.parametrize("kind", ["y", "refine"])
def test_f32_equals_onnxruntime(artifacts, kind):
    rng = np.random.default_rng(0)
    y = rng.uniform(-1, 1, (2, 3, 32, 32)).astype(np.float32)
    x_T = rng.standard_normal((2, 3, 32, 32)).astype(np.float32)
    with OnnxRuntimeBackend(artifacts[kind], threads=1) as ort, \
            OpenVINOBackend(artifacts[kind], threads=1, precision="f32") as ov:
        assert ov.inference_precision == "f32" and ov.name == "openvino"
        ref, got = _loop(ort, y, x_T), _loop(ov, y, x_T)
        scale = float(np.abs(ref).max()) or 1.0
        assert np.abs(got - ref).max() <= 1e-4 * scale
        if kind == "refine":
            np.testing.assert_allclose(ov.get_cond(), ort.get_cond(), atol=1e-5)
            frame = rng.uniform(-1, 1, (1, 3, 48, 64)).astype(np.float32)  # a whole frame, outside the bound shape
            np.testing.assert_allclose(ov.frame_prologue(frame), ort.frame_prologue(frame), atol=1e-5)


def test_buffers_are_allocated_once_and_ping_pong(artifacts):
    rng = np.random.default_rng(1)
    with OpenVINOBackend(artifacts["refine"], threads=1, precision="f32") as ov:
        _loop(ov, rng.uniform(-1, 1, (1, 3, 32, 32)).astype(np.float32),
              rng.standard_normal((1, 3, 32, 32)).astype(np.float32))
        pointers = ov.buffer_pointers()
        assert ov.output_pointer() in pointers[:2]  # x_next was written into an x buffer, not a new one
        _loop(ov, rng.uniform(-1, 1, (1, 3, 32, 32)).astype(np.float32),
              rng.standard_normal((1, 3, 32, 32)).astype(np.float32))
        assert ov.buffer_pointers() == pointers  # the same shape: the same buffers
        ov.set_x(np.zeros((1, 3, 32, 32), np.float32))
        ov.run_step(0)
        assert ov.output_pointer() == pointers[1]  # step 0 reads x[0] and writes x[1]
        ov.run_step(1)
        assert ov.output_pointer() == pointers[0]
        ov.bind(2, 32, 32)
        assert ov.buffer_pointers() != pointers  # a new shape: new buffers


def test_the_step_is_compiled_per_bound_shape_and_kept(artifacts, monkeypatch):
    monkeypatch.setattr(ovb, "STATIC_SHAPES", 2)
    with OpenVINOBackend(artifacts["y"], threads=1, precision="f32") as ov:
        assert ov.compiled_shapes == []  # nothing compiled for the step before a shape is bound
        ov.bind(1, 32, 32)
        first = ov._static[(1, 32, 32)]
        ov.bind(2, 32, 32)
        ov.bind(1, 32, 32)  # back to the first shape: its compiled model, not a new compile
        assert ov._static[(1, 32, 32)] is first and ov.compiled_shapes == [(2, 32, 32), (1, 32, 32)]
        ov.bind(1, 16, 16)  # a third shape evicts the least recently bound
        assert ov.compiled_shapes == [(1, 32, 32), (1, 16, 16)]
        inputs = {p.get_any_name(): p.get_partial_shape() for p in first.inputs}
        assert all(s.is_static for s in inputs.values()) and list(inputs["x_t"].to_shape()) == [1, 3, 32, 32]


def test_the_prologue_is_compiled_per_frame_shape_when_it_first_runs(artifacts, monkeypatch):
    monkeypatch.setattr(ovb, "STATIC_SHAPES", 2)
    monkeypatch.setattr(ovb, "STATIC_PROLOGUE_MIN_PIXELS", 2 * 32 * 32)  # these tiny frames count as large
    rng = np.random.default_rng(7)
    with OpenVINOBackend(artifacts["refine"], threads=1, precision="f32") as ov, \
            OnnxRuntimeBackend(artifacts["refine"], threads=1) as ort:
        assert ov.compiled_prologue_shapes == []  # nothing compiled at open
        ov.bind(2, 32, 32)
        assert ov.compiled_prologue_shapes == []  # bound, but the prologue has not run on that shape
        for shape in ((1, 3, 48, 64), (1, 3, 32, 64), (1, 3, 48, 64)):
            frame = rng.uniform(-1, 1, shape).astype(np.float32)
            np.testing.assert_allclose(ov.frame_prologue(frame), ort.frame_prologue(frame), atol=1e-5)
        assert ov.compiled_prologue_shapes == [(1, 32, 64), (1, 48, 64)]  # the repeat reused its model
        ov.set_rainy(rng.uniform(-1, 1, (2, 3, 32, 32)).astype(np.float32))
        ov.run_prologue()  # the bound shape's prologue, compiled now; the oldest shape evicted
        assert ov.compiled_prologue_shapes == [(1, 48, 64), (2, 32, 32)]
        model = ov._pro_static[(2, 32, 32)]
        assert all(port.get_partial_shape().is_static for port in model.inputs)
        small = rng.uniform(-1, 1, (1, 3, 16, 32)).astype(np.float32)  # below the threshold: the dynamic model
        np.testing.assert_allclose(ov.frame_prologue(small), ort.frame_prologue(small), atol=1e-5)
        assert ov.compiled_prologue_shapes == [(1, 48, 64), (2, 32, 32)] and ov._pro_dynamic is not None
        assert not ov._pro_dynamic.inputs[0].get_partial_shape().is_static


def test_derainer_on_openvino_is_close_to_onnxruntime_on_the_shipped_model():
    """Whatever precision the CPU picks (BF16 where native): the shipped model's output stays
    within a few uint8 levels of onnxruntime FP32 (docs/quality.md measures the dev-set cost)."""
    frame = np.random.default_rng(2).integers(0, 256, (64, 96, 3), dtype=np.uint8)
    with Derainer(ASSETS / "default.onnx", threads=1) as ref, Derainer(ASSETS / "default.onnx", device="openvino",
                                                                     threads=1) as ov:
        assert ov.backend.name == "openvino" and ov.backend.device == "openvino"
        a, b = ref.derain(frame).astype(int), ov.derain(frame).astype(int)
        assert ov.steps == ref.steps == 2
    diff = np.abs(a - b)
    assert diff.mean() < 1.0 and diff.max() <= 16
    if ov.backend.inference_precision == "f32":
        assert diff.max() <= 1


def test_tiles_are_batched_by_the_backend_and_the_batch_does_not_change_the_output():
    frame = np.random.default_rng(4).integers(0, 256, (150, 170, 3), dtype=np.uint8)  # 12 native tiles
    with Derainer(ASSETS / "default.onnx", device="openvino", threads=1) as big, \
            Derainer(ASSETS / "default.onnx", device="openvino", threads=1, batch=5) as small, \
            Derainer(ASSETS / "default.onnx", threads=1) as ort:
        assert big.batch == OpenVINOBackend.default_batch == 32 and small.batch == 5
        assert ort.batch == ort.backend.descriptor.profile.max_batch  # onnxruntime: the profile's
        np.testing.assert_array_equal(big.derain(frame), small.derain(frame))


def test_precision_follows_the_cpu(artifacts, monkeypatch):
    monkeypatch.setattr(ovb, "native_bf16", lambda core: False)
    with OpenVINOBackend(artifacts["y"], threads=1) as ov:
        assert ov.inference_precision == "f32"  # auto without native BF16
    with pytest.raises(UsageError, match="no native BF16"):
        OpenVINOBackend(artifacts["y"], precision="bf16")
    monkeypatch.setattr(ovb, "native_bf16", lambda core: True)
    with OpenVINOBackend(artifacts["y"], threads=1) as ov:
        assert ov.inference_precision == "bf16"
    with pytest.raises(UsageError, match="precision must be one of"):
        OpenVINOBackend(artifacts["y"], precision="fp16")
    with pytest.raises(UsageError, match="threads"):
        OpenVINOBackend(artifacts["y"], threads=0)


def test_open_backend_routes_the_device(artifacts, tmp_path, monkeypatch):
    with open_backend(artifacts["y"], device="OpenVINO", threads=1) as b:
        assert isinstance(b, OpenVINOBackend)
    with open_backend(artifacts["y"], device="cpu", threads=1) as b:
        assert isinstance(b, OnnxRuntimeBackend)
    plan = tmp_path / "m.trt.plan"
    plan.write_bytes(b"x")
    with pytest.raises(UsageError, match=r"runs \.onnx artifacts"):
        open_backend(plan, device="openvino")
    real_import = ovb.importlib.import_module

    def no_openvino(name, *a, **k):
        if name == "openvino":
            raise ImportError("No module named 'openvino'")
        return real_import(name, *a, **k)

    monkeypatch.setattr(ovb.importlib, "import_module", no_openvino)
    with pytest.raises(DependencyError, match=r"raindiffusion-edge\[openvino\]"):
        OpenVINOBackend(artifacts["y"])


def test_auto_picks_openvino_only_with_native_bf16(artifacts, monkeypatch):
    import importlib.util

    import runtime.backends as backends

    monkeypatch.setattr(ovb, "native_bf16", lambda core: True)
    with open_backend(artifacts["y"], device="auto", threads=1) as b:
        assert isinstance(b, OpenVINOBackend) and b.inference_precision == "bf16"
    monkeypatch.setattr(ovb, "native_bf16", lambda core: False)
    with open_backend(artifacts["y"], device="auto", threads=1) as b:
        assert isinstance(b, OnnxRuntimeBackend)
    monkeypatch.setattr(ovb, "native_bf16", lambda core: True)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "openvino"
                        else real_find_spec(name, *a))
    assert backends._openvino_probe().get("native_bf16", False) is False  # not installed: onnxruntime, no error
    with open_backend(artifacts["y"], device="auto", threads=1) as b:
        assert isinstance(b, OnnxRuntimeBackend)


def test_rd_run_derain_on_openvino(artifacts, tmp_path):
    import json

    from PIL import Image
    from typer.testing import CliRunner

    import runtime.cli as cli

    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(src / "a.png")
    r = CliRunner().invoke(cli.app, ["derain", str(src), "-o", str(tmp_path / "out"), "--engine",
                                     str(artifacts["refine"]), "--device", "openvino", "--threads", "1", "--json"])
    assert r.exit_code == 0, (r.stdout, r.stderr)
    rep = json.loads(r.stdout)
    assert [f["status"] for f in rep["files"]] == ["ok"]
    assert rep["engine"]["backend"] == "openvino" and rep["engine"]["device"] == "openvino"
    assert (tmp_path / "out" / "a.png").is_file()


# --------------------------------------------------------------------------- the default device
# tests/conftest.py pins RD_DEVICE=cpu for the suite; these tests unset it to see the real default.

def test_default_device_is_auto_and_rd_device_overrides_it(artifacts, monkeypatch):
    import runtime.backends as backends

    monkeypatch.delenv("RD_DEVICE", raising=False)
    assert backends.default_device() == "auto"
    monkeypatch.setattr(ovb, "native_bf16", lambda core: True)
    with open_backend(artifacts["refine"], threads=1) as b:  # no device: auto -> OpenVINO in BF16
        assert isinstance(b, OpenVINOBackend) and b.inference_precision == "bf16"
    with Derainer(artifacts["refine"], steps=2, threads=1) as d:
        assert isinstance(d.backend, OpenVINOBackend)
    monkeypatch.setattr(ovb, "native_bf16", lambda core: False)
    with open_backend(artifacts["refine"], threads=1) as b:  # no native BF16: onnxruntime
        assert isinstance(b, OnnxRuntimeBackend)
    monkeypatch.setattr(ovb, "native_bf16", lambda core: True)
    for value, kind in (("cpu", OnnxRuntimeBackend), (" CPU ", OnnxRuntimeBackend), ("openvino", OpenVINOBackend),
                        ("auto", OpenVINOBackend), ("", OpenVINOBackend)):
        monkeypatch.setenv("RD_DEVICE", value)
        with open_backend(artifacts["refine"], threads=1) as b:
            assert isinstance(b, kind), value
    monkeypatch.setenv("RD_DEVICE", "cpu")
    with open_backend(artifacts["refine"], device="openvino", threads=1) as b:  # an explicit device wins
        assert isinstance(b, OpenVINOBackend)


def test_rd_device_bad_value_is_one_line_usage_error(artifacts, monkeypatch, tmp_path):
    from PIL import Image
    from typer.testing import CliRunner

    import runtime.cli as cli

    monkeypatch.setenv("RD_DEVICE", "gpu0")
    with pytest.raises(UsageError, match=r"RD_DEVICE='gpu0' is not a device"):
        open_backend(artifacts["y"])
    Image.fromarray(np.zeros((24, 24, 3), np.uint8)).save(tmp_path / "a.png")
    r = CliRunner().invoke(cli.app, ["derain", str(tmp_path / "a.png"), "-o", str(tmp_path / "out"),
                                     "--engine", str(artifacts["y"])])
    assert r.exit_code == UsageError.exit_code == 2, (r.stdout, r.stderr)
    assert "RD_DEVICE='gpu0' is not a device" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_rd_device_does_not_apply_to_plans(tmp_path, monkeypatch):
    import runtime.backends.tensorrt as trt_backend

    seen = {}

    class Recorder:
        def __init__(self, path, *, device, cuda_graph):
            seen.update(path=path, device=device)

    monkeypatch.setattr(trt_backend, "TensorRTBackend", Recorder)
    monkeypatch.setenv("RD_DEVICE", "openvino")
    plan = tmp_path / "m.trt.plan"
    plan.write_bytes(b"x")
    open_backend(plan)
    assert seen == {"path": plan, "device": "cuda"}


def test_rd_run_info_names_the_default_device(monkeypatch):
    import json

    from typer.testing import CliRunner

    import runtime.cli as cli

    monkeypatch.delenv("RD_DEVICE", raising=False)
    monkeypatch.setattr(ovb, "native_bf16", lambda core: True)
    r = CliRunner().invoke(cli.app, ["info", "--json"])
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["default_device"] == {"setting": "auto", "from": "default", "onnx": "openvino (BF16)",
                                                      "shipped_model": "fp32 on openvino (BF16)"}
    assert json.loads(r.stdout)["backends"]["openvino"]["cache_dir"] == os.environ[ovb.CACHE_ENV]
    monkeypatch.setenv("RD_DEVICE", "cpu")
    r = CliRunner().invoke(cli.app, ["info"])
    assert "default device for .onnx: cpu (RD_DEVICE) -> cpu (onnxruntime)" in r.stdout
    assert f"compile cache: {os.environ[ovb.CACHE_ENV]})" in r.stdout  # where compiled models are kept
    cache = os.environ[ovb.CACHE_ENV]
    monkeypatch.setenv(ovb.CACHE_ENV, "off")
    r = CliRunner().invoke(cli.app, ["info"])
    assert "compile cache: off (RD_OPENVINO_CACHE))" in r.stdout
    monkeypatch.setenv(ovb.CACHE_ENV, cache)
    # OpenVINO absent on a CPU with native BF16: the line says what to install
    monkeypatch.delenv("RD_DEVICE")
    monkeypatch.setattr(ovb, "probe", lambda: {"available": False})
    monkeypatch.setattr(cpu, "has_native_bf16", lambda: True)
    r = CliRunner().invoke(cli.app, ["info"])
    assert "auto -> cpu (onnxruntime)" in r.stdout
    assert "hint: this CPU has native BF16: pip install" in r.stdout and "[openvino]" in r.stdout
    # ... on a CPU with VNNI and no BF16: the INT8 model on OpenVINO is what installing it buys
    monkeypatch.setattr(cpu, "has_native_bf16", lambda: False)
    monkeypatch.setattr(cpu, "has_avx512_vnni", lambda: True)
    r = CliRunner().invoke(cli.app, ["info"])
    assert "shipped model without --engine / --precision: fp32 on cpu (onnxruntime)" in r.stdout
    assert "hint: this CPU has AVX512_VNNI: pip install" in r.stdout and "INT8" in r.stdout
    # OpenVINO installed there: the shipped model is the INT8 one, on OpenVINO
    monkeypatch.setattr(ovb, "probe", lambda: {"available": True, "native_bf16": False})
    r = CliRunner().invoke(cli.app, ["info"])
    assert "default device for .onnx: auto -> cpu (onnxruntime)" in r.stdout  # an FP32 artifact: onnxruntime
    assert "shipped model without --engine / --precision: int8 on openvino (INT8 kernels)" in r.stdout
    assert "hint" not in r.stdout


# --------------------------------------------------------------------------- INT8 where OpenVINO runs it
# Measured (docs/benchmarks.md): on a VNNI CPU without native BF16 OpenVINO ran the shipped INT8
# CPU graph 1.4x onnxruntime's FP32 at 720p within the INT8 gate; onnxruntime's own INT8 was slower
# than its FP32 on every CPU measured. So auto takes OpenVINO for INT8 artifacts there, and the
# shipped model's default precision is INT8 where it runs on OpenVINO without native BF16.

def _as_int8(artifact: Path, dest: Path) -> Path:
    """A copy of ``artifact`` whose manifest says int8 (the device rule reads the manifest only)."""
    import json
    import shutil

    dest.mkdir(exist_ok=True)
    for f in artifact.parent.iterdir():
        if f.name.startswith(artifact.stem):
            shutil.copy(f, dest / f.name)
    m = dest / (artifact.stem + ".json")
    data = json.loads(m.read_text())
    data["precision"] = "int8"
    m.write_text(json.dumps(data))
    return dest / artifact.name


def test_auto_runs_int8_artifacts_on_openvino_where_the_cpu_has_avx512_vnni(artifacts, monkeypatch, tmp_path):
    int8 = _as_int8(artifacts["refine"], tmp_path / "q")
    monkeypatch.setattr(ovb, "native_bf16", lambda core: False)
    monkeypatch.setattr(cpu, "has_avx512_vnni", lambda: True)
    with open_backend(int8, device="auto", threads=1) as b:
        assert isinstance(b, OpenVINOBackend) and b.inference_precision == "f32"
    with open_backend(artifacts["refine"], device="auto", threads=1) as b:  # FP32: onnxruntime is faster
        assert isinstance(b, OnnxRuntimeBackend)
    with open_backend(int8, device="cpu", threads=1) as b:  # an explicit device wins
        assert isinstance(b, OnnxRuntimeBackend)
    monkeypatch.setattr(cpu, "has_avx512_vnni", lambda: False)
    with open_backend(int8, device="auto", threads=1) as b:  # no AVX512_VNNI (AVX2): onnxruntime
        assert isinstance(b, OnnxRuntimeBackend)
    monkeypatch.setattr(ovb, "probe", lambda: {"available": False})
    monkeypatch.setattr(cpu, "has_avx512_vnni", lambda: True)
    with open_backend(int8, device="auto", threads=1) as b:  # OpenVINO absent: onnxruntime, no error
        assert isinstance(b, OnnxRuntimeBackend)


@pytest.mark.parametrize(("probe", "vnni", "device", "expected"), [
    ({"available": True, "native_bf16": True}, True, "auto", "fp32"),       # BF16 on OpenVINO
    ({"available": True, "native_bf16": True}, True, "openvino", "fp32"),
    ({"available": True, "native_bf16": False}, True, "auto", "int8"),      # AVX512_VNNI, no BF16
    ({"available": True, "native_bf16": False}, True, "openvino", "int8"),
    ({"available": True, "native_bf16": False}, False, "auto", "fp32"),     # AVX2: onnxruntime FP32
    ({"available": True, "native_bf16": False}, False, "openvino", "fp32"),  # INT8 not measured to pay there
    ({"available": True, "native_bf16": False}, True, "cpu", "fp32"),       # onnxruntime: FP32 is faster
    ({"available": True, "native_bf16": False}, True, "cuda", "fp32"),
    ({"available": False}, True, "auto", "fp32"),
])
def test_default_precision(probe, vnni, device, expected, monkeypatch):
    from runtime.backends import default_precision

    monkeypatch.setattr(cpu, "has_avx512_vnni", lambda: vnni)
    assert default_precision(device, openvino_probe=probe) == expected
    monkeypatch.setenv("RD_DEVICE", device)
    assert default_precision(openvino_probe=probe) == expected  # the same through $RD_DEVICE


def test_derainer_without_an_artifact_takes_the_int8_model_on_openvino(monkeypatch):
    """Derainer() and rd-run without --precision on a VNNI CPU without BF16: the shipped INT8 CPU
    graph on OpenVINO; --precision fp32 (or RD_DEVICE=cpu) keeps the FP32 model."""
    if not (ASSETS / "default.int8.cpu.onnx").is_file():
        pytest.skip("the INT8 CPU graph is not shipped in this checkout")
    from runtime.cli import Precision, resolve_engine
    from runtime.derainer import default_artifact

    monkeypatch.delenv("RD_DEVICE", raising=False)
    monkeypatch.setattr(ovb, "native_bf16", lambda core: False)
    monkeypatch.setattr(cpu, "has_avx512_vnni", lambda: True)
    with Derainer(threads=1) as d:
        assert d.artifact.name == "default.int8.cpu.onnx" and isinstance(d.backend, OpenVINOBackend)
        assert d.backend.inference_precision == "f32"
    assert resolve_engine(None, None) is None and resolve_engine(None, Precision.auto) is None  # the Derainer picks
    assert resolve_engine(None, Precision.fp32).name == "default.onnx"
    assert default_artifact(device="cpu").name == "default.onnx"
    monkeypatch.setenv("RD_DEVICE", "cpu")
    assert default_artifact().name == "default.onnx"
    monkeypatch.setattr(cpu, "has_avx512_vnni", lambda: False)
    monkeypatch.delenv("RD_DEVICE")
    assert default_artifact().name == "default.onnx"  # AVX2, no BF16: onnxruntime FP32


# ------------------------------------------------------------------ the compile cache between processes

def test_cache_dir_follows_the_environment(tmp_path, monkeypatch):
    import stat

    for off in ("off", "0", "", "OFF", "no"):
        monkeypatch.setenv(ovb.CACHE_ENV, off)
        assert ovb.cache_dir() is None
    monkeypatch.setenv(ovb.CACHE_ENV, str(tmp_path / "mine" / "ov"))
    assert ovb.cache_dir(create=False) == tmp_path / "mine" / "ov" and not (tmp_path / "mine").exists()
    path = ovb.cache_dir()
    assert path == tmp_path / "mine" / "ov" and path.is_dir()
    assert stat.S_IMODE(path.stat().st_mode) == 0o700  # private to the user
    monkeypatch.delenv(ovb.CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert ovb.cache_dir() == tmp_path / "xdg" / "raindiffusion-edge" / "openvino"
    (tmp_path / "a_file").write_text("x")
    monkeypatch.setenv(ovb.CACHE_ENV, str(tmp_path / "a_file" / "ov"))  # cannot be made: caching off
    assert ovb.cache_dir() is None


def test_compiled_models_are_cached_and_a_damaged_cache_only_costs_a_compile(artifacts, tmp_path, monkeypatch):
    """A second backend (a new OpenVINO Core, as in a new process) loads what the first compiled
    and computes the same; entries truncated or overwritten are recompiled, with the same output."""
    cache = tmp_path / "cache"
    monkeypatch.setenv(ovb.CACHE_ENV, str(cache))
    rng = np.random.default_rng(11)
    rainy = rng.uniform(-1, 1, (1, 3, 32, 32)).astype(np.float32)
    x_T = rng.standard_normal((1, 3, 32, 32)).astype(np.float32)
    with OpenVINOBackend(artifacts["refine"], threads=1, precision="f32") as ov:
        assert ov.cache_dir == cache
        first = _loop(ov, rainy, x_T).copy()
    blobs = sorted(cache.glob("*.blob"))
    assert len(blobs) >= 2  # the step and the prologue
    with OpenVINOBackend(artifacts["refine"], threads=1, precision="f32") as ov:
        np.testing.assert_array_equal(_loop(ov, rainy, x_T), first)
    assert sorted(cache.glob("*.blob")) == blobs  # loaded, nothing new compiled
    for i, blob in enumerate(blobs):
        blob.chmod(0o600)
        data = bytearray(blob.read_bytes())
        if i % 2:
            blob.write_bytes(bytes(data[: len(data) // 3]))  # a write cut short
        else:
            data[len(data) // 2:len(data) // 2 + 64] = bytes(64)  # altered
            blob.write_bytes(bytes(data))
    with OpenVINOBackend(artifacts["refine"], threads=1, precision="f32") as ov:
        np.testing.assert_array_equal(_loop(ov, rainy, x_T), first)
    monkeypatch.setenv(ovb.CACHE_ENV, "off")
    with OpenVINOBackend(artifacts["refine"], threads=1, precision="f32") as ov:
        assert ov.cache_dir is None
        np.testing.assert_array_equal(_loop(ov, rainy, x_T), first)
