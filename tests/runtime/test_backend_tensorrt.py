"""TensorRT backend.

CPU tests drive runtime/backends/tensorrt.py against FAKE ``tensorrt`` and
``cuda.bindings.runtime`` modules (tests/fakes/fake_tensorrt.py, tests/fakes/fake_cuda.py). The
fakes queue work on streams and run it when a stream is waited for, keep the current device per
thread, refuse shapes outside a plan's profile and version-compatible plans without host code
allowed (see their docstrings): so these tests see stream ordering, the per-thread device,
buffers once per shape, the ping-pong swap, the 256-byte aligned per-step t / coef rows, CUDA
graph capture after one warm-up and its replay, refusal of failed enqueues. The ``trt``-marked
tests at the end run the real thing and skip without TensorRT and a GPU.
"""

from __future__ import annotations

import shutil
import sys
import threading

import numpy as np
import pytest

from runtime.backends import open_backend
from runtime.backends.tensorrt import (
    CudaError,
    TensorRTBackend,
    check_engine_compat,
    rebuild_command,
    version_compatible_runs,
)
from runtime.derainer import Derainer, pad_reflect, to_float
from runtime.descriptor import ShapeProfile, StepDescriptor
from runtime.errors import DependencyError, EngineMismatchError, ManifestError, UsageError
from runtime.manifest import Manifest, manifest_path_for, sha256_file
from runtime.schedule import DDIMSchedule, initial_noise

PROFILE = ShapeProfile(min_batch=1, opt_batch=1, max_batch=4, min_size=(16, 16), opt_size=(32, 32),
                       max_size=(64, 64))
DESCRIPTOR = StepDescriptor(size_multiple=8, profile=PROFILE)


def make_plan(directory, *, version="10.9.0", cc="8.6", flags=(), body=None, name="model", vc=False,
              dtype="FLOAT"):
    """A fake ``<name>.trt.plan`` (the fused step of DESCRIPTOR) and its manifest ``<name>.trt.json``."""
    import fake_tensorrt

    plan = directory / f"{name}.trt.plan"
    plan.write_bytes(body if body is not None else
                     fake_tensorrt.step_plan(DESCRIPTOR, version=version, dtype=dtype, version_compatible=vc))
    info = {"version": version, "gpu_name": "Fake GPU", "compute_capability": cc, "build_flags": list(flags)}
    if vc:
        info["version_compatible"] = True
    Manifest(
        artifact=plan.name, format="trt", precision="fp16", model="derain", sha256=sha256_file(plan),
        descriptor=DESCRIPTOR.to_dict(),
        schedule={"num_train_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02, "default_steps": 3},
        model_config={}, toolkit_version="test", extra={"tensorrt": info},
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
    import fake_tensorrt

    n, h, w = be.shape
    x, cond = _rand(rng, (n, 3, h, w)), _rand(rng, (n, 3, h, w))
    be.set_cond(cond)
    be.set_x(x)
    be.run()
    got = be.get_x()
    want = fake_tensorrt.reference_loop(x, cond, schedule.timesteps, schedule.coefficients())
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
    assert "TensorRT 10.8.0" in msg and "10.9.0 is installed" in msg and "--version-compatible" in msg
    assert f"rd-export build {tmp_path / 'model.onnx'} --format trt" in msg
    assert fake_gpu.trt.count("Runtime") == 0 and fake_gpu.trt.count("Runtime.deserialize_cuda_engine") == 0


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
    with pytest.raises(EngineMismatchError, match=r"could not deserialise the plan .*magic.*rebuild it here"):
        open_backend(plan)


def test_float16_io_is_refused(fake_gpu, tmp_path):
    with pytest.raises(Exception, match="engine tensor 'x_t' is HALF, the fused step's I/O is float32"):
        open_backend(make_plan(tmp_path, dtype="HALF"))


def test_missing_dependencies_are_one_line(monkeypatch, fake_gpu, tmp_path):
    plan = make_plan(tmp_path)
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(DependencyError, match=r"TensorRT is not installed: pip install 'raindiffusion-edge\[trt\]'"):
        open_backend(plan)
    import fake_tensorrt

    fake_tensorrt.install(monkeypatch, "10.9.0", cudart=fake_gpu.cudart)
    monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", None)
    monkeypatch.setitem(sys.modules, "cuda.cudart", None)
    with pytest.raises(DependencyError, match=r"cuda-python is not installed: pip install 'raindiffusion-edge\[trt\]'"):
        open_backend(plan)


def test_a_plan_needs_cuda(fake_gpu, tmp_path):
    with pytest.raises(UsageError, match="device='cuda'"):
        open_backend(make_plan(tmp_path), device="cpu")


@pytest.mark.parametrize(("built", "installed", "vc", "ok"), [
    ("10.9.0", "10.9.0", False, True),
    ("10.9.0.34", "10.9.0.34", False, True),
    ("10.9.0", "10.9.1", False, False),
    ("10.9.0", "11.0.0", False, False),
    ("10.9.0", "10.12.0", True, True),
    ("10.9.0", "10.8.0", True, False),    # never on an older release
    ("10.9.0", "11.0.0", True, True),     # the next major: TensorRT 10 vc plans run on 11
    ("10.9.0", "11.4.1", True, True),
    ("10.9.0", "12.0.0", True, False),    # two majors up: not documented
    ("11.0.0", "11.1.0", True, True),
    ("11.1.0", "12.0.0", True, False),    # not documented (yet)
    ("8.6.1", "10.0.0", True, True),      # 8 -> 10 is documented
    ("8.6.1", "9.3.0", True, True),       # and 8 -> 9
])
def test_version_rules(tmp_path, built, installed, vc, ok):
    m = Manifest.for_artifact(make_plan(tmp_path, version=built, vc=vc))
    plan = tmp_path / "model.trt.plan"
    if vc:
        assert version_compatible_runs(built, installed) is ok
    if ok:
        check_engine_compat(m, artifact=plan, trt_version=installed)
    else:
        with pytest.raises(EngineMismatchError, match="Rebuild it here"):
            check_engine_compat(m, artifact=plan, trt_version=installed)


def test_version_compatible_refusal_says_where_it_runs(tmp_path):
    m = Manifest.for_artifact(make_plan(tmp_path, version="10.9.0", vc=True))
    with pytest.raises(EngineMismatchError, match=r"built version-compatible by TensorRT 10\.9\.0, so it runs on "
                                                  r"TensorRT 10\.9\.0 or a later 10\.x or 11\.x, but TensorRT "
                                                  r"10\.8\.0"):
        check_engine_compat(m, artifact=tmp_path / "model.trt.plan", trt_version="10.8.0")


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


# ------------------------------------------------------------------ issue 18.3: version-compatible plans
@pytest.mark.parametrize("installed", ["10.9.0", "10.12.0", "11.0.0"])
def test_version_compatible_plan_loads_with_host_code_allowed(monkeypatch, fake_gpu, tmp_path, schedule, rng,
                                                              installed):
    import fake_tensorrt

    trt = fake_tensorrt.install(monkeypatch, installed, cudart=fake_gpu.cudart)
    plan = make_plan(tmp_path, version="10.9.0", vc=True)
    be = _ready(plan, schedule)
    _run_frame(be, schedule, rng)
    assert [c.args for c in trt.called("Runtime.engine_host_code_allowed")] == [(True,)]
    be.close()


def test_plain_plan_never_allows_host_code(fake_gpu, tmp_path, schedule, rng):
    be = _ready(make_plan(tmp_path), schedule)
    _run_frame(be, schedule, rng)
    assert fake_gpu.trt.called("Runtime.engine_host_code_allowed") == []


# ------------------------------------------------------------------ buffers, steps, graphs
def test_loop_matches_reference_and_buffers_are_allocated_once_per_shape(fake_gpu, tmp_path, schedule, rng):
    cudart = fake_gpu.cudart
    be = _ready(make_plan(tmp_path), schedule)
    assert be.name == "tensorrt" and be.limits == PROFILE
    assert cudart.count("cudaMalloc") == 5  # x[0], x[1], cond + the t and coef tables
    ptrs = be.buffer_pointers()
    _run_frame(be, schedule, rng)
    pinned = cudart.count("cudaMallocHost")  # staging of the tables, cond, x[0] and the result buffer
    assert pinned == 5
    for _ in range(3):  # frames: no allocation of any kind, nothing freed
        _run_frame(be, schedule, rng)
    assert cudart.count("cudaMalloc") == 5 and cudart.count("cudaFree") == 0
    assert cudart.count("cudaMallocHost") == pinned and cudart.count("cudaFreeHost") == 0
    assert be.buffer_pointers() == ptrs
    be.bind(2, 16, 24)  # same shape: nothing
    assert cudart.count("cudaMalloc") == 5
    be.bind(1, 32, 32)  # new shape: 3 buffers + 2 tables (batch changed), the old 5 freed
    assert cudart.count("cudaMalloc") == 10 and cudart.count("cudaFree") == 5
    _run_frame(be, schedule, rng)
    ctx = fake_gpu.trt.contexts[0]
    assert ctx.input_shapes == {"x_t": (1, 3, 32, 32), "cond": (1, 3, 32, 32), "t": (1,), "coef": (1, 4)}
    be.close()
    assert cudart.count("cudaFree") == 10 and not cudart.memory and not cudart.pinned
    assert cudart.count("cudaStreamDestroy") == 1


def test_step_tables_are_ordered_before_the_steps(fake_gpu, tmp_path, schedule, rng):
    """Issue 18.1: the t / coef tables must land before a step reads them. A synchronous
    cudaMemcpy goes to the legacy default stream, which a cudaStreamNonBlocking stream does not
    wait for (the fake queues it there), so the first steps would read empty tables."""
    cudart = fake_gpu.cudart
    be = open_backend(make_plan(tmp_path))
    be.bind(2, 16, 24)
    be.set_schedule(schedule.timesteps, schedule.coefficients())  # tables uploaded just now ...
    _run_frame(be, schedule, rng)  # ... and the very next steps must see them
    s2 = DDIMSchedule()
    s2.set_timesteps(5)
    be.set_schedule(s2.timesteps, s2.coefficients())  # a new schedule: new tables, same ordering
    _run_frame(be, s2, rng)
    stream = int(be.executor.stream)
    assert cudart.stream_flags(stream) == cudart.cudaStreamNonBlocking
    assert cudart.count("cudaMemcpy") == 0  # no synchronous copy on the default stream
    assert {a[-1] for a in cudart.calls_of("cudaMemcpyAsync")} == {stream}  # every copy on the steps' stream


def test_a_backend_on_cuda_1_stays_on_cuda_1_from_every_thread(fake_gpu, tmp_path, rng):
    """Issue 18.2: cudaSetDevice is per host thread. A Derainer on cuda:1 shared by threads:
    a frame bound from a thread that never selected cuda:1 must still allocate and run there."""
    import fake_tensorrt

    cudart = fake_gpu.cudart
    plan = make_plan(tmp_path)
    frames = [rng.integers(0, 256, (16, 24, 3), dtype=np.uint8), rng.integers(0, 256, (24, 16, 3), dtype=np.uint8)]
    with Derainer(plan, device="cuda:1", seed=3) as d:
        sched = DDIMSchedule()
        sched.set_timesteps(3)
        results, errors = {}, []

        def work(k):
            try:
                cudart.cudaSetDevice(0)  # this thread's current device is cuda:0
                results[k] = d.sample(to_float(frames[k])[None])
            except Exception as e:  # re-raised below with the assertion
                errors.append(e)

        threads = [threading.Thread(target=work, args=(k,)) for k in range(2)]
        for th in threads:
            th.start()
            th.join()  # one after the other: two shapes, so each thread binds (allocates) itself
        assert not errors, errors
        assert set(cudart.memory_device.values()) == {1}  # every buffer on cuda:1
        for k, f in enumerate(frames):
            cond = to_float(f)[None]
            want = fake_tensorrt.reference_loop(initial_noise(cond.shape, 3), cond, sched.timesteps,
                                                sched.coefficients())
            np.testing.assert_allclose(results[k], want, rtol=1e-5, atol=1e-4)


def test_steps_swap_addresses_and_point_at_their_table_rows(fake_gpu, tmp_path, schedule, rng):
    be = _ready(make_plan(tmp_path), schedule, shape=(2, 16, 16), cuda_graph=False)
    _run_frame(be, schedule, rng)
    x0, x1, cond = be.buffer_pointers()
    executed = [e.addresses for e in fake_gpu.trt.executed]
    assert [(e["x_t"], e["x_next"]) for e in executed] == [(x0, x1), (x1, x0), (x0, x1)]  # ping-pong
    assert {e["cond"] for e in executed} == {cond}
    t_rows = [e["t"] for e in executed]
    coef_rows = [e["coef"] for e in executed]
    assert all(p % 256 == 0 for p in t_rows + coef_rows)  # TensorRT's alignment rule
    assert t_rows[1] - t_rows[0] == t_rows[2] - t_rows[1] == 256
    assert coef_rows[1] - coef_rows[0] == 256
    assert be._cur == 1  # S = 3: the result sits in x[1]
    sets = [c.args for c in fake_gpu.trt.called("IExecutionContext.set_tensor_address") if c.args[0] == "cond"]
    assert len(sets) == 1  # the cond address is set once per shape, never per step


def test_cuda_graph_captured_after_one_warm_up_and_replayed(fake_gpu, tmp_path, schedule, rng):
    cudart, trt = fake_gpu.cudart, fake_gpu.trt
    be = _ready(make_plan(tmp_path), schedule)
    _run_frame(be, schedule, rng)  # warm-up: 3 plain enqueues, no capture
    assert trt.enqueues == 3 and cudart.count("cudaStreamBeginCapture") == 0 and not be.graph_captured
    _run_frame(be, schedule, rng)  # capture the 3 enqueues as one graph, then launch it
    assert trt.enqueues == 6 and cudart.count("cudaStreamBeginCapture") == 1
    assert cudart.count("cudaGraphInstantiate") == 1 and cudart.launches == 1 and be.graph_captured
    assert len(cudart.graphs[0].ops) == 3 and be.graph_error is None
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
    with pytest.raises(CudaError, match=r"enqueue .* failed at step 1: \[fake\] enqueue failed"):
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
    assert fake_gpu.trt.enqueues == 3 * 3 + 3  # the refused capture's enqueues recorded, never ran
    assert fake_gpu.cudart.kernels_run == 3 * 3


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


def test_the_engine_itself_refuses_shapes_outside_its_profile(fake_gpu, tmp_path, schedule):
    """Issue 18.7: the one fake refuses what TensorRT refuses; the executor names the profile."""
    be = _ready(make_plan(tmp_path), schedule)
    engine = be._engine
    with pytest.raises(UsageError,
                       match=r"refused input shape 1x3x128x16 for 'x_t'.*profile is 1x3x16x16\.\.4x3x64x64"):
        be.executor.set_shapes(engine, {"x_t": (1, 3, 128, 16)})


def test_close_waits_for_queued_work_and_frees_everything(fake_gpu, tmp_path, schedule, rng):
    cudart = fake_gpu.cudart
    be = _ready(make_plan(tmp_path), schedule)
    n, h, w = be.shape
    be.set_cond(_rand(rng, (n, 3, h, w)))
    be.set_x(_rand(rng, (n, 3, h, w)))
    be.run()  # queued, nobody waited
    assert cudart.pending() > 0
    be.close()
    assert cudart.pending() == 0 and not cudart.memory and not cudart.pinned


# ------------------------------------------------------------------ Derainer on the fake engine
def test_derainer_on_a_plan_pads_tiles_and_replays(fake_gpu, tmp_path, rng):
    import fake_tensorrt

    plan = make_plan(tmp_path)
    with Derainer(plan, seed=3) as d:
        assert d.backend_name == "tensorrt" and d.steps == 3 and d.batch == 4
        sched = DDIMSchedule()
        sched.set_timesteps(3)

        def reference(frame, hp, wp):
            cond = pad_reflect(to_float(frame)[None], hp, wp)
            x = fake_tensorrt.reference_loop(initial_noise((1, 3, hp, wp), 3), cond, sched.timesteps,
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
        assert fake_gpu.cudart.launches == 2 and d.backend.graph_captured  # warm-up, capture + launch, launch
        for o in outs[1:]:
            np.testing.assert_array_equal(o, outs[0])
    with pytest.raises(UsageError, match="device='cuda'"):
        Derainer(plan, device="cpu")
    with pytest.raises(UsageError, match=r"tile 128 is outside the engine's profile 16\.\.64"):
        Derainer(plan, tile=128)


# ------------------------------------------------------------------ the real thing
@pytest.mark.trt
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_real_tensorrt_matches_onnxruntime(tiny_model, tmp_path, rng, psnr, precision):
    """A plan built here (FP32 from the FP32 ONNX, FP16 from its FP16 ONNX), run by Derainer
    against onnxruntime on the same ONNX; the S-step loop must be captured and replayed."""
    pytest.importorskip("tensorrt", reason="TensorRT is not installed")
    pytest.importorskip("cuda.bindings.runtime", reason="cuda-python is not installed")
    from rd_export.tensorrt import ENGINE_MIN_PSNR_DB, build_engine

    onnx = tmp_path / "model.onnx"
    shutil.copy(tiny_model.onnx, onnx)
    shutil.copy(manifest_path_for(tiny_model.onnx), manifest_path_for(onnx))
    if precision == "fp16":
        from rd_export.fp16 import make_fp16

        onnx = make_fp16(onnx)
    plan = build_engine(onnx, steps=3)
    assert Manifest.for_artifact(plan).precision == precision
    frame = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    with Derainer(onnx, steps=3) as cpu, Derainer(plan, steps=3) as gpu:
        want = cpu.sample(to_float(frame)[None])
        outs = [gpu.sample(to_float(frame)[None]) for _ in range(3)]  # warm-up, capture, replay
        assert gpu.backend.graph_captured and gpu.backend.graph_error is None
    for got in outs:
        assert psnr(got, want) >= ENGINE_MIN_PSNR_DB  # the plan vs onnxruntime on the same ONNX
    np.testing.assert_array_equal(outs[1], outs[2])  # replays of one graph


# ------------------------------------------------------------------ predict-and-refine: two plans
def make_refine_plans(directory, *, tamper_prologue=False):
    """``model.trt.plan`` (the step with a 6-channel cond) + ``model.trt.prologue.plan`` + one manifest."""
    import fake_tensorrt

    from runtime.manifest import prologue_name

    desc = StepDescriptor(size_multiple=8, profile=PROFILE, cond_channels=6)
    pd = desc.prologue()
    plan = directory / "model.trt.plan"
    plan.write_bytes(fake_tensorrt.step_plan(desc))
    p = PROFILE
    pro = directory / prologue_name(plan.name)
    pro.write_bytes(fake_tensorrt.prologue_plan(pd.RAINY, pd.OUT, channels=3, profile_points=[
        (p.min_batch, p.min_size), (p.opt_batch, p.opt_size), (p.max_batch, p.max_size)]))
    Manifest(
        artifact=plan.name, format="trt", precision="fp16", model="derain", sha256=sha256_file(plan),
        descriptor=desc.to_dict(),
        schedule={"num_train_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02, "default_steps": 3},
        model_config={}, toolkit_version="test",
        extra={"tensorrt": {"version": "10.9.0", "gpu_name": "Fake GPU", "compute_capability": "8.6",
                            "build_flags": []},
               "prologue": {"artifact": pro.name, "sha256": sha256_file(pro), "precision": "fp16"}},
    ).save(manifest_path_for(plan))
    if tamper_prologue:
        pro.write_bytes(pro.read_bytes() + b" ")
    return plan


def test_prologue_plan_writes_the_bound_cond_and_the_steps_read_it(fake_gpu, tmp_path, schedule, rng):
    import fake_tensorrt

    plan = make_refine_plans(tmp_path)
    be = _ready(plan, schedule, shape=(2, 16, 24))
    assert be.has_prologue
    y, x = _rand(rng, (2, 3, 16, 24)), _rand(rng, (2, 3, 16, 24))
    before = be.buffer_pointers()
    be.set_rainy(y)
    be.run_prologue()
    np.testing.assert_allclose(be.get_cond(), fake_tensorrt.prologue_reference(y), rtol=1e-6, atol=1e-6)
    be.set_x(x)
    be.run()
    want = fake_tensorrt.reference_loop(x, fake_tensorrt.prologue_reference(y), schedule.timesteps,
                                        schedule.coefficients())
    np.testing.assert_allclose(be.get_x(), want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max()))
    assert be.buffer_pointers() == before  # the prologue wrote cond in place: no buffer moved
    be.close()


def test_derainer_steps_zero_on_a_plan_returns_the_prologue_estimate(fake_gpu, tmp_path):
    import fake_tensorrt

    plan = make_refine_plans(tmp_path)
    frame = np.random.default_rng(0).integers(0, 256, (16, 24, 3), dtype=np.uint8)
    with Derainer(plan, steps=0) as d:
        got = d.derain(frame)
    y = to_float(frame[None])
    b = fake_tensorrt.prologue_reference(y)[:, 3:]
    from runtime.derainer import to_uint8

    assert np.array_equal(got, to_uint8(b)[0])


def test_tampered_prologue_plan_is_refused_before_tensorrt_sees_it(fake_gpu, tmp_path):
    plan = make_refine_plans(tmp_path, tamper_prologue=True)
    with pytest.raises(ManifestError, match=r"prologue\.plan: sha256"):
        open_backend(plan)
    assert not [c for c in fake_gpu.trt.calls if "deserialize" in str(c)]
