"""build_engine against a RECORDING FAKE of tensorrt (tests/fakes/fake_tensorrt.py) + fake cuda-python.

These pin the exact TensorRT calls (strongly typed network, profile from the descriptor,
workspace pool limit, optimisation level, timing cache load/save, raw atomic plan, parser
errors). They prove nothing about TensorRT itself: see test_export_trt_real.py (``-m trt``).
"""

from __future__ import annotations

import shutil
import sys

import numpy as np
import pytest

from rd_export.tensorrt import INSTALL_HINT, build_engine
from rd_export.verify import OnnxStep
from runtime.descriptor import ShapeProfile
from runtime.errors import ArtifactError, DependencyError, ManifestError, UsageError, VerificationError
from runtime.manifest import Manifest, manifest_path_for, sha256_file
from tests.fakes import fake_cuda, fake_tensorrt

VERSIONS = ["10.9.0.34", "11.0.0.12"]


@pytest.fixture
def onnx_copy(exported, tmp_path):
    """The exported FP32 ONNX + manifest copied into a fresh folder (builds write beside it)."""
    for p in (exported.onnx, manifest_path_for(exported.onnx), exported.fp16, manifest_path_for(exported.fp16)):
        shutil.copy(p, tmp_path / p.name)
    return tmp_path / exported.onnx.name


@pytest.fixture
def cudart(monkeypatch):
    return fake_cuda.install(monkeypatch)


def onnx_backed_execute(cudart, onnx_path):
    """on_execute hook: compute the step with onnxruntime on the fake device memory."""
    step = OnnxStep(onnx_path)

    def run(context) -> bool:
        names = ("x_t", "cond", "t", "coef")
        ins = [cudart.read(context.addresses[n], context.input_shapes[n]) for n in names]
        cudart.write(context.addresses["x_next"], step(*ins))
        return True

    return run


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if ".tmp" in p.name or p.name.startswith("."))


@pytest.mark.parametrize("version", VERSIONS)
def test_build_engine_contract(onnx_copy, cudart, monkeypatch, version):
    trt = fake_tensorrt.install(monkeypatch, version)
    trt.on_execute = onnx_backed_execute(cudart, onnx_copy)
    cache = onnx_copy.parent / "timing.cache"
    plan = build_engine(onnx_copy, max_size=(64, 48), batch=(1, 2), workspace=123 << 20, timing_cache=cache,
                        opt_level=2, steps=2)

    assert plan == onnx_copy.parent / "model.trt.plan"
    # strongly typed network: the only creation flag; no precision builder flags at all
    (create,) = trt.called("Builder.create_network")
    assert create.args == (1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED),)
    assert trt.called("IBuilderConfig.set_flag") == [] and trt.called("IBuilderConfig.flags") == []
    assert [c.args for c in trt.called("parse_from_file")] == [(str(onnx_copy),)]
    assert [c.args for c in trt.called("IBuilderConfig.set_memory_pool_limit")] == [
        (trt.MemoryPoolType.WORKSPACE, 123 << 20)]
    assert [c.args for c in trt.called("IBuilderConfig.builder_optimization_level")] == [(2,)]
    # one optimisation profile, shapes from the descriptor with the overrides applied
    expected = ShapeProfile(min_batch=1, opt_batch=1, max_batch=2, min_size=(32, 32), opt_size=(32, 32),
                            max_size=(64, 48)).shapes()
    set_shape = {c.args[0]: c.args[1:] for c in trt.called("IOptimizationProfile.set_shape")}
    assert set_shape == expected
    assert len(trt.called("IBuilderConfig.add_optimization_profile")) == 1
    # timing cache: created empty (no file yet), attached strictly, saved after the build
    assert [c.args for c in trt.called("IBuilderConfig.create_timing_cache")] == [(b"",)]
    assert [c.kwargs for c in trt.called("IBuilderConfig.set_timing_cache")] == [{"ignore_mismatch": False}]
    assert cache.read_bytes() == fake_tensorrt.TIMING_CACHE_MAGIC + b"+build"
    # the plan is written raw: byte for byte what build_serialized_network returned
    assert plan.read_bytes() == trt.last_plan and plan.read_bytes().startswith(fake_tensorrt.PLAN_MAGIC)

    m = Manifest.for_artifact(plan)
    assert manifest_path_for(plan).name == "model.trt.json"
    assert (m.artifact, m.format, m.precision, m.model) == ("model.trt.plan", "trt", "fp32", "derain")
    assert m.sha256 == sha256_file(plan)
    assert m.get("source")["onnx"] == "model.onnx" and m.get("source")["onnx_sha256"] == sha256_file(onnx_copy)
    info = m.get("tensorrt")
    assert (info["version"], info["gpu_name"], info["compute_capability"]) == (version, "Fake GPU", "8.6")
    assert info["build_flags"]["strongly_typed"] is True
    assert info["build_flags"]["workspace_bytes"] == 123 << 20
    assert info["build_flags"]["builder_optimization_level"] == 2
    assert info["build_flags"]["timing_cache"] == "timing.cache"
    assert m.step_descriptor.profile.max_size == (64, 48) and m.step_descriptor.profile.max_batch == 2
    v = m.get("verification")
    assert v["passed"] and v["reference"] == "onnx" and v["psnr_db"] >= 40
    assert trt.called("IExecutionContext.execute_async_v3")  # the engine ran (on the fake)
    assert _leftovers(onnx_copy.parent) == []

    # a second build loads the saved timing cache
    trt.calls.clear()
    build_engine(onnx_copy, timing_cache=cache, verify=False)
    assert [c.args for c in trt.called("IBuilderConfig.create_timing_cache")] == [
        (fake_tensorrt.TIMING_CACHE_MAGIC + b"+build",)]
    assert Manifest.for_artifact(plan).get("tensorrt")["build_flags"]["timing_cache_loaded"] is True


def test_fp16_onnx_gives_fp16_plan(onnx_copy, cudart, monkeypatch):
    trt = fake_tensorrt.install(monkeypatch, "11.0.0.12")
    fp16 = onnx_copy.with_name("model.fp16.onnx")
    trt.on_execute = onnx_backed_execute(cudart, fp16)
    plan = build_engine(fp16, steps=2)
    m = Manifest.for_artifact(plan)
    assert plan.name == "model.fp16.trt.plan" and manifest_path_for(plan).name == "model.fp16.trt.json"
    assert m.precision == "fp16" and m.get("fp32_islands")[0]["name"] == "normalization"


def test_parser_errors_are_raised_with_their_messages(onnx_copy, cudart, monkeypatch):
    trt = fake_tensorrt.install(monkeypatch)
    trt.parse_errors = ["Einsum equation not supported", "second problem"]
    with pytest.raises(ArtifactError, match=r"ONNX parser failed: .*Einsum equation not supported.*second problem"):
        build_engine(onnx_copy)
    assert not list(onnx_copy.parent.glob("*.plan")) and not onnx_copy.with_name("model.trt.json").exists()
    assert trt.called("Builder.build_serialized_network") == []


def test_build_failure_quotes_the_log(onnx_copy, cudart, monkeypatch):
    trt = fake_tensorrt.install(monkeypatch)
    trt.build_fails = True
    with pytest.raises(ArtifactError, match=r"could not build an engine: .*no implementation obeys"):
        build_engine(onnx_copy, timing_cache=onnx_copy.parent / "t.cache")
    assert not list(onnx_copy.parent.glob("*.plan")) and _leftovers(onnx_copy.parent) == []


def test_engine_failing_verification_writes_nothing(onnx_copy, cudart, monkeypatch):
    trt = fake_tensorrt.install(monkeypatch)
    trt.on_execute = lambda context: True  # "runs" but never writes x_next: zeros
    (onnx_copy.parent / "model.trt.plan").write_bytes(b"older plan")
    with pytest.raises(VerificationError, match="TensorRT engine failed verification"):
        build_engine(onnx_copy, steps=2)
    assert (onnx_copy.parent / "model.trt.plan").read_bytes() == b"older plan"
    assert not onnx_copy.with_name("model.trt.json").exists() and _leftovers(onnx_copy.parent) == []


def test_failed_enqueue_is_an_error(onnx_copy, cudart, monkeypatch):
    trt = fake_tensorrt.install(monkeypatch)
    trt.on_execute = lambda context: False
    with pytest.raises(ArtifactError, match="enqueue failed"):
        build_engine(onnx_copy, steps=2)


def test_bad_profile_and_hash_fail_before_tensorrt(onnx_copy, cudart, monkeypatch):
    trt = fake_tensorrt.install(monkeypatch)
    with pytest.raises(UsageError, match="width 60 in the shape profile is not a multiple of 8"):
        build_engine(onnx_copy, max_size=(64, 60))
    with pytest.raises(UsageError, match=r"outside 0\.\.5"):
        build_engine(onnx_copy, opt_level=7)
    onnx_copy.write_bytes(onnx_copy.read_bytes() + b"\0")
    with pytest.raises(ManifestError, match="does not match its manifest"):
        build_engine(onnx_copy)
    assert trt.calls == []


def test_missing_tensorrt_is_one_line(onnx_copy, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt -> ImportError
    with pytest.raises(DependencyError) as e:
        build_engine(onnx_copy)
    assert str(e.value) == INSTALL_HINT and "\n" not in INSTALL_HINT
    assert "pip install 'raindiffusion-edge[trt]'" in INSTALL_HINT and "rd-export build model.onnx" in INSTALL_HINT
    assert DependencyError.exit_code == 6


def test_pipeline_edge_flow(onnx_copy, cudart, monkeypatch, tmp_path_factory):
    """`rd-export build model.onnx` on a device: no export, no torch checkpoint; plan written to -o."""
    from rd_export.pipeline import BuildOptions, build

    trt = fake_tensorrt.install(monkeypatch)
    out = tmp_path_factory.mktemp("device")
    trt.on_execute = onnx_backed_execute(cudart, onnx_copy)
    result = build(onnx_copy, out, BuildOptions(steps=2))
    assert [(a.path.name, a.format) for a in result.artifacts] == [("model.trt.plan", "trt")]
    assert trt.called("Builder") != [] and (out / "model.trt.json").is_file()
    with pytest.raises(UsageError, match="holds the derain model"):
        build(onnx_copy, out, BuildOptions(model="rain"))


def test_engine_step_reuses_buffers(onnx_copy, cudart, monkeypatch):
    """EngineStep binds named tensors, reallocates only when a shape grows, checks every enqueue."""
    from rd_export.tensorrt import EngineStep

    trt = fake_tensorrt.install(monkeypatch)
    build_engine(onnx_copy, verify=False)
    trt.on_execute = onnx_backed_execute(cudart, onnx_copy)
    step = EngineStep(onnx_copy.with_name("model.trt.plan").read_bytes())
    rng = np.random.default_rng(0)
    ref = OnnxStep(onnx_copy)
    for shape in [(1, 32, 32), (1, 32, 32), (2, 32, 40)]:
        n, h, w = shape
        args = (rng.standard_normal((n, 3, h, w), dtype=np.float32),
                rng.uniform(-1, 1, (n, 3, h, w)).astype(np.float32),
                np.full((n,), 500.0, np.float32), np.tile(np.array([[1.2, 0.7, 0.9, 0.4]], np.float32), (n, 1)))
        np.testing.assert_array_equal(step(*args), ref(*args))
    assert cudart.count("cudaMalloc") == 5 + 5  # 5 tensors at 32x32, again when batch 2 grows them
    step.close()
    assert cudart.count("cudaFree") >= 10
