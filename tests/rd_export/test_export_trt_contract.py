"""build_engine against a RECORDING FAKE of tensorrt (tests/fakes/fake_tensorrt.py) + fake cuda-python.

These pin the exact TensorRT calls (strongly typed network, profile from the descriptor,
workspace pool limit, optimisation level, timing cache load/save, the version-compatible flag,
raw atomic plan, parser errors) and what verification checks (min, opt and max of the profile,
through the runtime's executor). They prove nothing about TensorRT itself: see
test_export_trt_real.py (``-m trt``).
"""

from __future__ import annotations

import shutil
import sys

import numpy as np
import pytest

from rd_export.tensorrt import INSTALL_HINT, EngineStep, build_engine
from rd_export.verify import OnnxStep
from runtime.backends.cuda_device import CudaError
from runtime.descriptor import ShapeProfile, StepDescriptor
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


def onnx_backed_execute(cudart, onnx_path, *, corrupt=None):
    """on_execute hook: the step computed by onnxruntime on the fake device memory when the
    kernel runs; ``corrupt(out, shape)`` may alter the output (e.g. an FP16 overflow)."""
    step = OnnxStep(onnx_path)

    def run(ex) -> None:
        names = ("x_t", "cond", "t", "coef")
        ins = [cudart.read(ex.addresses[n], ex.input_shapes[n]) for n in names]
        out = step(*ins)
        if corrupt is not None:
            out = corrupt(out, ex.input_shapes["x_t"])
        cudart.write(ex.addresses["x_next"], out)

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
                            max_size=(64, 48)).shapes(StepDescriptor(size_multiple=8).inputs)
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
    assert info["version_compatible"] is False and info["build_flags"]["version_compatible"] is False
    assert info["build_flags"]["strongly_typed"] is True
    assert info["build_flags"]["workspace_bytes"] == 123 << 20
    assert info["build_flags"]["builder_optimization_level"] == 2
    assert info["build_flags"]["timing_cache"] == "timing.cache"
    assert m.step_descriptor.profile.max_size == (64, 48) and m.step_descriptor.profile.max_batch == 2
    v = m.get("verification")
    assert v["passed"] and v["reference"] == "onnx" and v["psnr_db"] >= 40
    # the optimum equals the minimum here (checked by the loop); the maximum gets its own steps
    assert [(p["at"], p["shape"]) for p in v["profile_points"]] == [("max", [2, 3, 64, 48])]
    assert all(r["psnr_db"] >= 40 and r["finite"] for r in v["profile_points"][0]["steps"])
    assert trt.called("IExecutionContext.execute_async_v3")  # the engine ran (on the fake)
    assert _leftovers(onnx_copy.parent) == []

    # a second build loads the saved timing cache
    trt.calls.clear()
    build_engine(onnx_copy, timing_cache=cache, verify=False)
    assert [c.args for c in trt.called("IBuilderConfig.create_timing_cache")] == [
        (fake_tensorrt.TIMING_CACHE_MAGIC + b"+build",)]
    assert Manifest.for_artifact(plan).get("tensorrt")["build_flags"]["timing_cache_loaded"] is True


@pytest.mark.parametrize("version", VERSIONS)
def test_version_compatible_build(onnx_copy, cudart, monkeypatch, version):
    """Issue 18.3: --version-compatible sets the builder flag, records it in the manifest, and
    the plan (which carries host code) is verified with engine_host_code_allowed."""
    trt = fake_tensorrt.install(monkeypatch, version)
    trt.on_execute = onnx_backed_execute(cudart, onnx_copy)
    plan = build_engine(onnx_copy, version_compatible=True, steps=2)
    assert [c.args for c in trt.called("IBuilderConfig.set_flag")] == [(trt.BuilderFlag.VERSION_COMPATIBLE,)]
    assert [c.args for c in trt.called("Runtime.engine_host_code_allowed")] == [(True,)]
    info = Manifest.for_artifact(plan).get("tensorrt")
    assert info["version_compatible"] is True and info["build_flags"]["version_compatible"] is True
    assert Manifest.for_artifact(plan).get("verification")["passed"]


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_verification_covers_the_profiles_largest_shape(onnx_copy, cudart, monkeypatch, precision):
    """Issue 18.4: an engine that overflows only at large shapes (what FP16 normalisation does)
    must fail verification; checking the profile's minimum alone passed it."""
    trt = fake_tensorrt.install(monkeypatch)
    src = onnx_copy if precision == "fp32" else onnx_copy.with_name("model.fp16.onnx")

    def overflow(out, shape):
        n, _, h, w = shape
        return np.full_like(out, np.inf) if n * h * w > 32 * 32 else out

    trt.on_execute = onnx_backed_execute(cudart, src, corrupt=overflow)
    with pytest.raises(VerificationError, match=r"NaN/Inf at the profile's max shape 2x3x64x64, t=\d+"):
        build_engine(src, steps=2)
    assert not list(onnx_copy.parent.glob("*.plan")) and _leftovers(onnx_copy.parent) == []


def test_verification_checks_the_optimum_too(onnx_copy, cudart, monkeypatch):
    trt = fake_tensorrt.install(monkeypatch)

    def wrong_at_opt(out, shape):
        return out * 1.5 if tuple(shape[2:]) == (48, 48) else out

    trt.on_execute = onnx_backed_execute(cudart, onnx_copy, corrupt=wrong_at_opt)
    with pytest.raises(VerificationError, match=r"step PSNR .* dB < 40 dB at the profile's opt shape 1x3x48x48"):
        build_engine(onnx_copy, opt_size=(48, 48), steps=2)


def test_cuda_failure_is_a_cuda_error_not_a_bad_artifact(onnx_copy, cudart, monkeypatch):
    """Issue 18.4: out of GPU memory during verification is CudaError (exit 1), not exit 4."""
    trt = fake_tensorrt.install(monkeypatch)
    trt.on_execute = onnx_backed_execute(cudart, onnx_copy)
    cudart.malloc_fails = True
    with pytest.raises(CudaError, match=r"cudaMalloc\(\d+ bytes\) failed on cuda:0: cudaErrorMemoryAllocation "
                                        r"\(out of GPU memory") as e:
        build_engine(onnx_copy, steps=2)
    assert not isinstance(e.value, ArtifactError) and e.value.exit_code == 1


def _int8_cpu_copy(onnx_copy, *, calibration=True):
    """A stand-in for calibration's ``model.int8.cpu.onnx`` + manifest (the FP32 graph under that
    name, with the calibration section the CPU recipe writes)."""
    dest = onnx_copy.with_name("model.int8.cpu.onnx")
    shutil.copy(onnx_copy, dest)
    m = Manifest.for_artifact(onnx_copy)
    extra = dict(m.extra)
    if calibration:
        extra["calibration"] = {"recipe": "u8r", "activations": "uint8", "activation_symmetric": False,
                                "siblings": {"tensorrt": "model.int8.onnx"}}
    Manifest(artifact=dest.name, format="onnx", precision="int8", model=m.model, sha256=sha256_file(dest),
             descriptor=m.descriptor, schedule=m.schedule, model_config=m.model_config,
             toolkit_version=m.toolkit_version, extra=extra).save(manifest_path_for(dest))
    return dest


def test_cpu_int8_graph_is_refused_before_tensorrt(onnx_copy, cudart, monkeypatch):
    """Issue 18.5: the .int8.cpu.onnx (unsigned asymmetric Q/DQ) gets one line naming the .int8.onnx."""
    trt = fake_tensorrt.install(monkeypatch)
    src = _int8_cpu_copy(onnx_copy)
    with pytest.raises(UsageError) as e:
        build_engine(src)
    msg = str(e.value)
    assert "\n" not in msg and "zero point 0" in msg
    assert f"rd-export build {onnx_copy.with_name('model.int8.onnx')} --format trt" in msg
    assert trt.calls == [] and cudart.calls == []


def test_asymmetric_qdq_in_the_graph_is_refused(onnx_copy, cudart, monkeypatch):
    """A Q/DQ graph with a uint8 zero point and no calibration section is refused from the graph."""
    import onnx
    from onnx import TensorProto, helper

    trt = fake_tensorrt.install(monkeypatch)
    graph = helper.make_graph(
        [helper.make_node("QuantizeLinear", ["x_t", "s", "zp"], ["q"], name="q0"),
         helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["x_next"], name="dq0")],
        "qdq", [helper.make_tensor_value_info("x_t", TensorProto.FLOAT, ["batch", 3, "height", "width"])],
        [helper.make_tensor_value_info("x_next", TensorProto.FLOAT, ["batch", 3, "height", "width"])],
        initializer=[helper.make_tensor("s", TensorProto.FLOAT, [], [0.05]),
                     helper.make_tensor("zp", TensorProto.UINT8, [], [128])])
    src = onnx_copy.with_name("hand.onnx")
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), src)
    m = Manifest.for_artifact(onnx_copy)
    Manifest(artifact=src.name, format="onnx", precision="int8", model=m.model, sha256=sha256_file(src),
             descriptor=m.descriptor, schedule=m.schedule, model_config=m.model_config,
             toolkit_version=m.toolkit_version, extra={}).save(manifest_path_for(src))
    with pytest.raises(UsageError, match=r"hand\.onnx has Q/DQ nodes with unsigned or non-zero zero points "
                                         r"\(q0: uint8 zero point\)"):
        build_engine(src)
    assert trt.calls == []


def test_a_graph_without_asymmetric_qdq_passes_the_check(onnx_copy, cudart, monkeypatch):
    from rd_export.tensorrt import check_tensorrt_quantization

    src = _int8_cpu_copy(onnx_copy, calibration=False)  # no calibration section, no Q/DQ in the graph
    check_tensorrt_quantization(src.with_name("model.int8.cpu.onnx"), Manifest.for_artifact(src))


def test_fp16_onnx_gives_fp16_plan(onnx_copy, cudart, monkeypatch):
    trt = fake_tensorrt.install(monkeypatch, "11.0.0.12")
    fp16 = onnx_copy.with_name("model.fp16.onnx")
    trt.on_execute = onnx_backed_execute(cudart, fp16)
    plan = build_engine(fp16, steps=2)
    m = Manifest.for_artifact(plan)
    assert plan.name == "model.fp16.trt.plan" and manifest_path_for(plan).name == "model.fp16.trt.json"
    assert m.precision == "fp16" and m.get("fp32_islands")[0]["name"] == "normalization"
    assert [p["at"] for p in m.get("verification")["profile_points"]] == ["max"]


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
    trt.on_execute = lambda ex: None  # "runs" but never writes x_next: zeros
    (onnx_copy.parent / "model.trt.plan").write_bytes(b"older plan")
    with pytest.raises(VerificationError, match="TensorRT engine failed verification"):
        build_engine(onnx_copy, steps=2)
    assert (onnx_copy.parent / "model.trt.plan").read_bytes() == b"older plan"
    assert not onnx_copy.with_name("model.trt.json").exists() and _leftovers(onnx_copy.parent) == []


def test_failed_enqueue_is_an_error(onnx_copy, cudart, monkeypatch):
    trt = fake_tensorrt.install(monkeypatch)
    trt.fail_enqueue_at = 1
    with pytest.raises(CudaError, match=r"enqueue \(execute_async_v3\) failed: \[fake\] enqueue failed"):
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
    result = build(onnx_copy, out, BuildOptions(steps=2, version_compatible=True))
    assert [(a.path.name, a.format) for a in result.artifacts] == [("model.trt.plan", "trt")]
    assert trt.called("Builder") != [] and (out / "model.trt.json").is_file()
    assert Manifest.for_artifact(out / "model.trt.plan").get("tensorrt")["version_compatible"] is True
    with pytest.raises(UsageError, match="holds the derain model"):
        build(onnx_copy, out, BuildOptions(model="rain"))


def test_engine_step_reuses_buffers_per_shape(onnx_copy, cudart, monkeypatch):
    """EngineStep (the runtime's executor) binds named tensors, allocates once per shape, checks every enqueue."""
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
    assert cudart.count("cudaMalloc") == 5 + 5  # 5 tensors at 32x32, again when the shapes change
    assert {a[-1] for a in cudart.calls_of("cudaMemcpyAsync")} == {step.executor.stream_handle}
    assert cudart.count("cudaMemcpy") == 0
    # a shape outside the plan's profile: TensorRT refuses it, the message names the profile
    with pytest.raises(UsageError, match=r"refused input shape 4x3x32x32 for 'x_t'.*profile is 1x3x32x32\.\.2x3x64x64"):
        step(*(np.zeros((4, 3, 32, 32), np.float32),) * 2, np.zeros(4, np.float32), np.zeros((4, 4), np.float32))
    step.close()
    assert not cudart.memory and not cudart.pinned


def test_version_compatible_is_a_build_option_for_plans_only(onnx_copy, tmp_path_factory):
    from typer.testing import CliRunner

    from rd_export.cli import app
    from rd_export.pipeline import BuildOptions, build

    with pytest.raises(UsageError, match="--version-compatible applies to TensorRT plans"):
        build(onnx_copy, tmp_path_factory.mktemp("o"), BuildOptions(fmt="onnx", version_compatible=True))
    result = CliRunner().invoke(app, ["build", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0 and "--version-compatible" in result.output


# --------------------------------------------------------------------------- predict-and-refine: two plans
@pytest.fixture(scope="module")
def refine_onnx(tmp_path_factory):
    from rdx_helpers import one_torch_thread, write_random_checkpoint

    from rd_export.export import export_onnx

    d = tmp_path_factory.mktemp("trt_refine")
    with one_torch_thread():
        ck = write_random_checkpoint(d / "r.pt", cond_channels=6, prediction="x0_residual", crop=32)
        return export_onnx(ck, d / "out", steps=2)


def onnx_backed_two_graphs(cudart, onnx_path):
    """on_execute for both engines of a predict-and-refine artifact: the prologue engine (input
    'rainy') runs the prologue ONNX, the step engine the step ONNX, on the fake device memory."""
    from rd_export.verify import OnnxPrologue

    step = onnx_backed_execute(cudart, onnx_path)
    pro = OnnxPrologue(onnx_path.with_name("model.prologue.onnx"))

    def run(ex) -> None:
        if "rainy" in ex.addresses:
            cudart.write(ex.addresses["cond"], pro(cudart.read(ex.addresses["rainy"], ex.input_shapes["rainy"])))
        else:
            step(ex)

    return run


def test_two_plans_built_verified_and_run(refine_onnx, cudart, monkeypatch, tmp_path):
    for p in refine_onnx.parent.iterdir():
        shutil.copy(p, tmp_path / p.name)
    onnx = tmp_path / refine_onnx.name
    trt = fake_tensorrt.install(monkeypatch, "10.9.0.34")
    trt.on_execute = onnx_backed_two_graphs(cudart, onnx)
    plan = build_engine(onnx, steps=2)
    assert len(trt.called("Builder.build_serialized_network")) == 2  # the step and the prologue
    m = Manifest.for_artifact(plan)
    pro = m.prologue
    assert pro["artifact"] == "model.trt.prologue.plan" and pro["sha256"] == sha256_file(tmp_path / pro["artifact"])
    v = m.get("verification")
    assert v["passed"] and v["prologue_psnr_db"] >= 40
    assert [p["at"] for p in v["prologue_points"]] == ["min", "opt", "max"] and all(p["psnr_db"] >= 40
                                                                            for p in v["prologue_points"])
    assert _leftovers(tmp_path) == []
    # the runtime runs both plans: the same frame as the ONNX artifact through onnxruntime
    from runtime.derainer import Derainer

    frame = np.random.default_rng(0).integers(0, 256, (24, 32, 3), dtype=np.uint8)
    with Derainer(onnx, steps=2, threads=1) as ref, Derainer(plan, steps=2) as d:
        a, b = ref.derain(frame), d.derain(frame)
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1


def test_a_prologue_engine_that_differs_fails_verification(refine_onnx, cudart, monkeypatch, tmp_path):
    for p in refine_onnx.parent.iterdir():
        shutil.copy(p, tmp_path / p.name)
    onnx = tmp_path / refine_onnx.name
    trt = fake_tensorrt.install(monkeypatch, "10.9.0.34")
    good = onnx_backed_two_graphs(cudart, onnx)

    def wrong_prologue(ex) -> None:
        good(ex)
        if "rainy" in ex.addresses:  # the estimate channels come out shifted
            shape = (ex.input_shapes["rainy"][0], 6, *ex.input_shapes["rainy"][2:])
            cond = cudart.read(ex.addresses["cond"], shape)
            cond[:, 3:] += 0.1
            cudart.write(ex.addresses["cond"], cond)

    trt.on_execute = wrong_prologue
    with pytest.raises(VerificationError, match="prologue PSNR"):
        build_engine(onnx, steps=2)
    assert not (tmp_path / "model.trt.plan").exists() and not (tmp_path / "model.trt.prologue.plan").exists()
