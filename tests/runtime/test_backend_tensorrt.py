"""TensorRT backend.

CPU tests drive runtime/backends/tensorrt.py against FAKE ``tensorrt`` and ``cuda.bindings.runtime``
modules (tests/fakes/fake_trt_runtime.py, tests/fakes/fake_cuda.py) that record every call and
run a pointwise stand-in for the fused step on fake device memory: the manifest checks and their
order (nothing of TensorRT runs for a tampered or mismatched plan), cudaMalloc once per shape,
the ping-pong address swap, the 256-byte aligned per-step t / coef rows, CUDA graph capture
after one warm-up loop and its replay, refusal of failed enqueues. The ``trt``-marked tests run
the real thing and skip without TensorRT and a GPU.
"""

from __future__ import annotations

import importlib
import sys

import numpy as np
import pytest

from runtime.backends import open_backend
from runtime.backends.tensorrt import CudaError, TensorRTBackend, check_engine_compat, rebuild_command
from runtime.derainer import Derainer, pad_reflect, to_float
from runtime.descriptor import ShapeProfile, StepDescriptor
from runtime.errors import DependencyError, EngineMismatchError, ManifestError, UsageError
from runtime.manifest import Manifest, manifest_path_for, sha256_file
from runtime.schedule import DDIMSchedule, initial_noise

PROFILE = ShapeProfile(min_batch=1, opt_batch=1, max_batch=4, min_size=(16, 16), opt_size=(32, 32),
                       max_size=(64, 64))


def make_plan(directory, *, version="10.9.0", cc="8.6", flags=(), body=None, name="model"):
    """A fake ``<name>.trt.plan`` and its manifest ``<name>.trt.json``."""
    import fake_trt_runtime

    plan = directory / f"{name}.trt.plan"
    plan.write_bytes(body if body is not None else fake_trt_runtime.PLAN_MAGIC + bytes(range(64)))
    Manifest(
        artifact=plan.name, format="trt", precision="fp16", model="derain", sha256=sha256_file(plan),
        descriptor=StepDescriptor(size_multiple=8, profile=PROFILE).to_dict(),
        schedule={"num_train_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02, "default_steps": 3},
        model_config={}, toolkit_version="test",
        extra={"tensorrt": {"version": version, "gpu_name": "Fake GPU", "compute_capability": cc,
                            "build_flags": list(flags)}},
    ).save(manifest_path_for(plan))
    return plan


@pytest.fixture
def schedule() -> DDIMSchedule:
    s = DDIMSchedule()
    s.set_timesteps(3)
    return s


def _rand(rng, shape):
    return rng.standard_normal(shape, dtype=np.float32)


def _ready(plan, schedule, shape=(2, 16, 24), **kw) -> TensorRTBackend:
    be = open_backend(plan, **kw)
    be.set_schedule(schedule.timesteps, schedule.coefficients())
    be.bind(*shape)
    return be


def _run_frame(be, schedule, rng):
    import fake_trt_runtime

    n, h, w = be.shape
    x, cond = _rand(rng, (n, 3, h, w)), _rand(rng, (n, 3, h, w))
    be.set_cond(cond)
    be.set_x(x)
    be.run()
    got = be.get_x()
    want = fake_trt_runtime.reference_loop(x, cond, schedule.timesteps, schedule.coefficients())
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max()))
    return got


# ------------------------------------------------------------------ refusals before TensorRT runs
def test_tampered_plan_is_refused_before_tensorrt_is_called(fake_gpu, tmp_path):
    plan = make_plan(tmp_path)
    data = bytearray(plan.read_bytes())
    data[-1] ^= 1
    plan.write_bytes(bytes(data))
    with pytest.raises(EngineMismatchError, match="sha256"):
        open_backend(plan)
    assert fake_gpu.trt.calls == [] and fake_gpu.cudart.calls == []


def test_tampered_plan_is_refused_even_without_tensorrt(monkeypatch, tmp_path):
    plan = make_plan(tmp_path, body=b"FAKEPLAN-old")
    plan.write_bytes(b"FAKEPLAN-new")
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(EngineMismatchError, match="sha256"):
        open_backend(plan)


def test_other_tensorrt_version_is_refused_with_the_rebuild_command(fake_gpu, tmp_path):
    plan = make_plan(tmp_path, version="10.8.0")
    with pytest.raises(EngineMismatchError) as e:
        open_backend(plan)
    msg = str(e.value)
    assert "TensorRT 10.8.0" in msg and "10.9.0 is installed" in msg
    assert f"rd-export build {tmp_path / 'model.onnx'} --format trt" in msg
    assert fake_gpu.trt.count("Runtime") == 0 and fake_gpu.trt.count("deserialize_cuda_engine") == 0


def test_other_gpu_is_refused_with_the_rebuild_command(fake_gpu, tmp_path):
    fake_gpu.cudart.compute_capability = (7, 5)
    plan = make_plan(tmp_path, cc="8.6", name="model.fp16")
    with pytest.raises(EngineMismatchError) as e:
        open_backend(plan)
    msg = str(e.value)
    assert "compute capability 8.6" in msg and "7.5" in msg and "Fake GPU" in msg
    assert f"rd-export build {tmp_path / 'model.fp16.onnx'} --format trt" in msg
    assert fake_gpu.trt.count("Runtime") == 0


def test_missing_tensorrt_section_is_a_manifest_error(fake_gpu, tmp_path):
    plan = make_plan(tmp_path)
    m = Manifest.for_artifact(plan)
    del m.extra["tensorrt"]
    m.save(manifest_path_for(plan))
    with pytest.raises(ManifestError, match="'tensorrt' section"):
        open_backend(plan)
    assert fake_gpu.trt.calls == []


def test_unreadable_plan_is_an_engine_mismatch(fake_gpu, tmp_path):
    plan = make_plan(tmp_path, body=b"not a plan at all")
    with pytest.raises(EngineMismatchError, match="could not deserialise"):
        open_backend(plan)


def test_missing_dependencies_are_one_line(monkeypatch, fake_gpu, tmp_path):
    plan = make_plan(tmp_path)
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(DependencyError, match=r"pip install 'raindiffusion-edge\[trt\]'"):
        open_backend(plan)
    import fake_trt_runtime

    fake_trt_runtime.install(monkeypatch, fake_gpu.cudart)
    monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", None)
    monkeypatch.setitem(sys.modules, "cuda.cudart", None)
    with pytest.raises(DependencyError, match=r"cuda-python is not installed: pip install 'raindiffusion-edge\[trt\]'"):
        open_backend(plan)


def test_a_plan_needs_cuda(fake_gpu, tmp_path):
    with pytest.raises(UsageError, match="device='cuda'"):
        open_backend(make_plan(tmp_path), device="cpu")


@pytest.mark.parametrize(("built", "installed", "flags", "ok"), [
    ("10.9.0", "10.9.0", (), True),
    ("10.9.0.34", "10.9.0.34", (), True),
    ("10.9.0", "10.9.1", (), False),
    ("10.9.0", "11.0.0", (), False),
    ("10.9.0", "10.12.0", ("version_compatible",), True),
    ("10.9.0", "10.8.0", ("version_compatible",), False),
    ("10.9.0", "11.0.0", ("version_compatible",), False),
])
def test_version_rules(tmp_path, built, installed, flags, ok):
    m = Manifest.for_artifact(make_plan(tmp_path, version=built, flags=flags))
    plan = tmp_path / "model.trt.plan"
    if ok:
        check_engine_compat(m, artifact=plan, trt_version=installed)
    else:
        with pytest.raises(EngineMismatchError):
            check_engine_compat(m, artifact=plan, trt_version=installed)


@pytest.mark.parametrize(("built", "have", "flags", "ok"), [
    ("8.6", (8, 6), (), True),
    ([8, 6], (8, 6), (), True),
    ("sm_86", (8, 6), (), True),
    ("8.6", (8, 9), (), False),
    ("8.7", (8, 7), (), True),
    ("8.0", (9, 0), ("ampere_plus",), True),
    ("8.6", (7, 5), ("ampere_plus",), False),
])
def test_compute_capability_rules(tmp_path, built, have, flags, ok):
    m = Manifest.for_artifact(make_plan(tmp_path, cc=built, flags=flags))
    plan = tmp_path / "model.trt.plan"
    if ok:
        check_engine_compat(m, artifact=plan, compute_capability=have)
    else:
        with pytest.raises(EngineMismatchError, match="Rebuild it here"):
            check_engine_compat(m, artifact=plan, compute_capability=have)


def test_rebuild_command_names_the_onnx(tmp_path):
    want = f"rd-export build {tmp_path / 'model.int8.onnx'} --format trt"
    assert rebuild_command(tmp_path / "model.int8.trt.plan") == want
    assert rebuild_command(tmp_path / "x.plan") == f"rd-export build {tmp_path / 'x.onnx'} --format trt"


# ------------------------------------------------------------------ buffers, steps, graphs
def test_loop_matches_reference_and_buffers_are_allocated_once_per_shape(fake_gpu, tmp_path, schedule, rng):
    cudart = fake_gpu.cudart
    be = _ready(make_plan(tmp_path), schedule)
    assert be.name == "tensorrt" and be.limits == PROFILE
    assert cudart.count("cudaMalloc") == 5  # x[0], x[1], cond + the t and coef tables
    ptrs = be.buffer_pointers()
    for _ in range(4):  # frames: no cudaMalloc, no cudaFree
        _run_frame(be, schedule, rng)
    assert cudart.count("cudaMalloc") == 5 and cudart.count("cudaFree") == 0
    assert be.buffer_pointers() == ptrs
    be.bind(2, 16, 24)  # same shape: nothing
    assert cudart.count("cudaMalloc") == 5
    be.bind(1, 32, 32)  # new shape: 3 buffers + 2 tables (batch changed), the old 5 freed
    assert cudart.count("cudaMalloc") == 10 and cudart.count("cudaFree") == 5
    _run_frame(be, schedule, rng)
    ctx = fake_gpu.trt.contexts[0]
    assert ctx.shapes == {"x_t": (1, 3, 32, 32), "cond": (1, 3, 32, 32), "t": (1,), "coef": (1, 4)}
    be.close()
    assert cudart.count("cudaFree") == 10 and not cudart.memory
    assert cudart.count("cudaStreamDestroy") == 1


def test_steps_swap_addresses_and_point_at_their_table_rows(fake_gpu, tmp_path, schedule, rng):
    be = _ready(make_plan(tmp_path), schedule, shape=(2, 16, 16), cuda_graph=False)
    _run_frame(be, schedule, rng)
    x0, x1, _ = be.buffer_pointers()
    executed = fake_gpu.trt.executed
    assert [(e[0], e[1]) for e in executed] == [(x0, x1), (x1, x0), (x0, x1)]  # ping-pong
    t_rows = [e[2] for e in executed]
    coef_rows = [e[3] for e in executed]
    assert all(p % 256 == 0 for p in t_rows + coef_rows)  # TensorRT's alignment rule
    assert t_rows[1] - t_rows[0] == t_rows[2] - t_rows[1] == 256
    assert coef_rows[1] - coef_rows[0] == 256
    assert be._cur == 1  # S = 3: the result sits in x[1]
    # the cond address is set once per shape, never per step
    sets = [a for n, a in fake_gpu.trt.calls if n == "set_tensor_address" and a[0] == "cond"]
    assert len(sets) == 1


def test_cuda_graph_captured_after_one_warm_up_and_replayed(fake_gpu, tmp_path, schedule, rng):
    cudart, trt = fake_gpu.cudart, fake_gpu.trt
    be = _ready(make_plan(tmp_path), schedule)
    _run_frame(be, schedule, rng)  # warm-up: 3 plain enqueues, no capture
    assert trt.enqueues == 3 and cudart.count("cudaStreamBeginCapture") == 0 and not be.graph_captured
    _run_frame(be, schedule, rng)  # capture the 3 enqueues as one graph, then launch it
    assert trt.enqueues == 6 and cudart.count("cudaStreamBeginCapture") == 1
    assert cudart.count("cudaGraphInstantiate") == 1 and cudart.launches == 1 and be.graph_captured
    assert len(cudart.graphs[0].ops) == 3
    for k in range(3):  # replay: one launch per frame, no enqueue
        _run_frame(be, schedule, rng)
        assert trt.enqueues == 6 and cudart.launches == 2 + k
    be.bind(1, 16, 16)  # new shape: graph dropped; warm-up again before the next capture
    assert not be.graph_captured and cudart.count("cudaGraphExecDestroy") == 1
    _run_frame(be, schedule, rng)
    assert cudart.count("cudaStreamBeginCapture") == 1
    _run_frame(be, schedule, rng)
    assert cudart.count("cudaStreamBeginCapture") == 2 and be.graph_captured
    s2 = DDIMSchedule()
    s2.set_timesteps(5)
    be.set_schedule(s2.timesteps, s2.coefficients())  # new schedule: graph dropped too
    assert not be.graph_captured
    _run_frame(be, s2, rng)
    _run_frame(be, s2, rng)
    assert len(cudart.graphs[-1].ops) == 5


def test_failed_enqueue_raises_and_never_leaves_a_graph(fake_gpu, tmp_path, schedule, rng):
    cudart, trt = fake_gpu.cudart, fake_gpu.trt
    be = _ready(make_plan(tmp_path), schedule)
    trt.fail_enqueue_at = 2
    with pytest.raises(CudaError, match=r"enqueue .* failed at step 1"):
        _run_frame(be, schedule, rng)
    trt.fail_enqueue_at = None
    _run_frame(be, schedule, rng)  # warm-up completes
    trt.fail_enqueue_at = trt.enqueues + 2  # the 2nd enqueue of the capture fails
    with pytest.raises(CudaError, match="failed at step 1"):
        _run_frame(be, schedule, rng)
    assert not be.graph_captured and not cudart.capturing  # capture ended, nothing kept
    trt.fail_enqueue_at = None
    _run_frame(be, schedule, rng)  # captures afresh, correct numbers
    assert be.graph_captured


def test_unsupported_capture_falls_back_to_steps(fake_gpu, tmp_path, schedule, rng):
    fake_gpu.cudart.capture_fails = True
    be = _ready(make_plan(tmp_path), schedule)
    for _ in range(3):
        _run_frame(be, schedule, rng)
    assert not be.graph_captured and "cudaStreamEndCapture" in be.graph_error
    assert fake_gpu.trt.enqueues == 3 * 3 + 3  # the aborted capture's enqueues recorded nothing


def test_graphs_off(fake_gpu, tmp_path, schedule, rng):
    be = _ready(make_plan(tmp_path), schedule, cuda_graph=False)
    for _ in range(3):
        _run_frame(be, schedule, rng)
    assert fake_gpu.cudart.count("cudaStreamBeginCapture") == 0 and fake_gpu.trt.enqueues == 9


def test_shapes_outside_the_profile_are_refused(fake_gpu, tmp_path, schedule):
    be = _ready(make_plan(tmp_path), schedule)
    with pytest.raises(UsageError, match=r"height 128 is outside the engine's profile 16\.\.64"):
        be.bind(1, 128, 16)
    with pytest.raises(UsageError, match="batch 5 is outside"):
        be.bind(5, 16, 16)


# ------------------------------------------------------------------ Derainer on the fake engine
def test_derainer_on_a_plan_pads_tiles_and_replays(fake_gpu, tmp_path, rng):
    import fake_trt_runtime

    plan = make_plan(tmp_path)
    with Derainer(plan, seed=3) as d:
        assert d.backend_name == "tensorrt" and d.steps == 3 and d.batch == 4
        sched = DDIMSchedule()
        sched.set_timesteps(3)

        def reference(frame, hp, wp):
            cond = pad_reflect(to_float(frame)[None], hp, wp)
            x = fake_trt_runtime.reference_loop(initial_noise((1, 3, hp, wp), 3), cond, sched.timesteps,
                                                sched.coefficients())
            return x[..., : frame.shape[0], : frame.shape[1]]

        small = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)  # padded up to the profile's 16x16 minimum
        np.testing.assert_allclose(d.sample(to_float(small)[None]), reference(small, 16, 16), rtol=1e-5, atol=1e-4)
        big = rng.integers(0, 256, (80, 100, 3), dtype=np.uint8)  # beyond 64x64: 64-px tiles
        got = d.sample(to_float(big)[None])
        assert d.backend.shape == (4, 64, 64)
        # the fake step is pointwise, so blending tiles at every step reproduces the full frame
        np.testing.assert_allclose(got, reference(big, 80, 104), rtol=1e-4, atol=1e-4)
        frame = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
        outs = [d.derain(frame) for _ in range(3)]
        assert fake_gpu.cudart.launches >= 1  # warm-up, capture + launch, launch
        for o in outs[1:]:
            np.testing.assert_array_equal(o, outs[0])
    with pytest.raises(UsageError, match="device='cuda'"):
        Derainer(plan, device="cpu")
    with pytest.raises(UsageError, match=r"tile 128 is outside the engine's profile 16\.\.64"):
        Derainer(plan, tile=128)


# ------------------------------------------------------------------ the real thing
def _build_plan(onnx_path):
    for mod, fn in (("rd_export.engine", "build_engine"), ("rd_export.tensorrt", "build_engine"),
                    ("rd_export", "build_engine")):
        try:
            build = getattr(importlib.import_module(mod), fn)
        except (ImportError, AttributeError):
            continue
        return build(onnx_path, Manifest.for_artifact(onnx_path).step_descriptor)
    pytest.skip("rd_export has no build_engine yet")


@pytest.mark.trt
def test_real_tensorrt_matches_onnxruntime(tiny_model, tmp_path, rng, psnr):
    pytest.importorskip("tensorrt", reason="TensorRT is not installed")
    pytest.importorskip("cuda.bindings.runtime", reason="cuda-python is not installed")
    import shutil

    onnx = tmp_path / "model.onnx"
    shutil.copy(tiny_model.onnx, onnx)
    shutil.copy(manifest_path_for(tiny_model.onnx), manifest_path_for(onnx))
    plan = _build_plan(onnx)
    frame = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    with Derainer(onnx, steps=3) as cpu, Derainer(plan, steps=3) as gpu:
        want = cpu.sample(to_float(frame)[None])
        outs = [gpu.sample(to_float(frame)[None]) for _ in range(3)]  # warm-up, capture, replay
        assert gpu.backend.graph_captured or gpu.backend.graph_error
    for got in outs:
        assert psnr(got, want) >= 30.0  # FP16 plan vs FP32 onnxruntime
