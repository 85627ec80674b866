"""The one TensorRT executor (runtime/backends/trt_executor.py) and the CUDA step backend on CPU.

Against the fake cudart (tests/fakes/fake_cuda.py: queued streams, pinned memory read when a
copy runs, per-thread current device): buffers kept per size, copies staged through pinned
memory, frees that wait for queued work, the device made current on every call; a prologue
engine whose output buffer is the step's cond buffer (predict-and-refine, 6-channel cond);
and the PyTorch stand-in engine of tests/gpu/standin.py run on torch CPU tensors over the
fake's memory, so the stand-in's kernel code and the executor's stream / graph logic it relies
on run here; tests/gpu runs the same stand-in on a real GPU.
"""

from __future__ import annotations

import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from runtime.backends.cuda_backend import CudaStepBackend
from runtime.backends.cuda_device import CudaDevice, CudaError
from runtime.backends.trt_executor import Executor, TensorRTEngine
from runtime.descriptor import ShapeProfile, StepDescriptor, TensorSpec
from runtime.errors import UsageError
from runtime.manifest import Manifest
from runtime.schedule import DDIMSchedule

GPU_TESTS = Path(__file__).resolve().parents[1] / "gpu"
if str(GPU_TESTS) not in sys.path:
    sys.path.insert(0, str(GPU_TESTS))

PROFILE = ShapeProfile(min_batch=1, opt_batch=1, max_batch=2, min_size=(8, 8), opt_size=(16, 16), max_size=(32, 32))


@dataclass(frozen=True)
class RefineDescriptor(StepDescriptor):
    """A step whose cond has 6 channels ([y, b] of predict-and-refine): the runtime must take
    channel counts from the descriptor's specs, never assume 3."""

    cond_channels: int = 6

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        return tuple(TensorSpec(s.name, s.dtype, ("batch", self.cond_channels, "height", "width"))
                     if s.name == self.COND else s for s in super().inputs)


PLAIN = StepDescriptor(size_multiple=8, profile=PROFILE)
REFINE = RefineDescriptor(size_multiple=8, profile=PROFILE)


@pytest.fixture
def cudart(monkeypatch):
    import fake_cuda

    return fake_cuda.install(monkeypatch)


@pytest.fixture
def trt(monkeypatch, cudart):
    import fake_tensorrt

    return fake_tensorrt.install(monkeypatch, "10.9.0", cudart=cudart)


@pytest.fixture
def schedule() -> DDIMSchedule:
    s = DDIMSchedule()
    s.set_timesteps(3)
    return s


def _backend(cudart, engine, descriptor, *, device=0, cuda_graph=True) -> CudaStepBackend:
    manifest = Manifest(artifact="engine.plan", format="trt", precision="fp32", model="derain", sha256="0" * 64,
                        descriptor=descriptor.to_dict(), schedule={"default_steps": 3}, model_config={})
    return CudaStepBackend("engine.plan", manifest, device=CudaDevice(device, cudart=cudart), engine=engine,
                           cuda_graph=cuda_graph, limits=descriptor.profile, descriptor=descriptor)


def _fake_engine(trt, descriptor) -> TensorRTEngine:
    import fake_tensorrt

    return TensorRTEngine(fake_tensorrt.step_plan(descriptor), trt=trt, name="fake step")


def _frame(be, schedule, rng, cond_channels=3):
    import fake_tensorrt

    n, h, w = be.shape
    x = rng.standard_normal((n, 3, h, w), dtype=np.float32)
    cond = rng.standard_normal((n, cond_channels, h, w), dtype=np.float32)
    be.set_cond(cond)
    be.set_x(x)
    be.run()
    got = be.get_x()
    want = fake_tensorrt.reference_loop(x, cond, schedule.timesteps, schedule.coefficients())
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max()))
    return got


# ------------------------------------------------------------------ the fake matches the real API
def test_fake_enums_are_scoped_like_tensorrts():
    """TensorRT's enums are pybind11 scoped enums: int() works, comparing with an int does not."""
    import fake_tensorrt

    assert int(fake_tensorrt.DataType.FLOAT) == 0 and fake_tensorrt.DataType.FLOAT != 0
    trt = fake_tensorrt.make_module("11.0.0")
    assert not hasattr(trt.BuilderFlag, "FP16") and hasattr(trt.BuilderFlag, "VERSION_COMPATIBLE")
    with pytest.raises(TypeError):
        trt.Builder(None).create_builder_config().set_flag(13)  # an int is not a BuilderFlag


def test_fake_refuses_shapes_outside_the_profile(trt):
    engine = _fake_engine(trt, PLAIN)
    assert engine.set_input_shape("x_t", (1, 3, 16, 16))
    assert not engine.set_input_shape("x_t", (1, 3, 64, 16))  # beyond the profile's max
    assert not engine.set_input_shape("x_t", (1, 4, 16, 16))  # a fixed axis differs
    assert engine.profile("x_t") == ((1, 3, 8, 8), (1, 3, 16, 16), (2, 3, 32, 32))


# ------------------------------------------------------------------ executor: buffers and copies
def test_buffers_are_kept_per_size_and_reallocated_when_it_changes(cudart):
    ex = Executor(CudaDevice(0, cudart=cudart))
    a = ex.allocate({"a": 1024, "b": 256})
    assert ex.allocate({"a": 1024, "b": 256}) == a and ex.mallocs == 2  # same sizes: kept
    b = ex.allocate({"a": 2048, "b": 256})
    assert b["b"] == a["b"] and ex.mallocs == 3 and cudart.count("cudaFree") == 1  # only "a" changed
    with pytest.raises(UsageError, match="no device buffer 'c'"):
        ex.pointer("c")
    ex.close()
    assert not cudart.memory and cudart.count("cudaStreamDestroy") == 1


def test_upload_is_staged_so_the_callers_array_and_the_staging_may_change(cudart):
    """Pinned copies read the host buffer when they run: the executor must not rewrite its
    staging while a copy from it is queued, and the caller's array is free at once."""
    ex = Executor(CudaDevice(0, cudart=cudart))
    ex.allocate({"a": 64, "b": 64})
    first = np.arange(16, dtype=np.float32)

    def copy_a_to_b():  # a queued kernel reading "a"
        cudart.write(ex.pointer("b"), cudart.read(ex.pointer("a"), (16,)))

    ex.upload("a", first)
    first[:] = -1  # the caller reuses its array immediately
    assert cudart.launch(ex.stream, copy_a_to_b, touches=[ex.pointer("a")]) == 0
    ex.upload("a", np.full(16, 7.0, np.float32))  # staging rewritten while the first copy is queued
    np.testing.assert_array_equal(ex.download("b", np.empty(16, np.float32)), np.arange(16, dtype=np.float32))
    np.testing.assert_array_equal(ex.download("a", np.empty(16, np.float32)), np.full(16, 7.0))
    ex.close()


def test_free_waits_for_queued_work(cudart):
    ex = Executor(CudaDevice(0, cudart=cudart))
    ex.allocate({"a": 64})
    ex.upload("a", np.ones(16, np.float32))
    assert cudart.pending() == 1
    ex.free(["a"])  # the queued copy ran before its memory went away
    assert cudart.pending() == 0 and not cudart.memory and not cudart.pinned
    ex.close()


def test_every_call_makes_the_executors_device_current(cudart):
    ex = Executor(CudaDevice(1, cudart=cudart))
    seen = []

    def other_thread():
        cudart.cudaSetDevice(0)
        ex.allocate({"a": 64})
        ex.upload("a", np.ones(16, np.float32))
        seen.append(cudart.device)

    th = threading.Thread(target=other_thread)
    th.start()
    th.join()
    assert seen == [1] and set(cudart.memory_device.values()) == {1}
    ex.close()


def test_a_failed_cuda_call_names_the_call_and_the_error(cudart):
    cudart.malloc_fails = True
    ex = Executor(CudaDevice(0, cudart=cudart))
    with pytest.raises(CudaError, match=r"cudaMalloc\(64 bytes\) failed on cuda:0: cudaErrorMemoryAllocation"):
        ex.allocate({"a": 64})
    ex.close()


# ------------------------------------------------------------------ the step backend, any descriptor
def test_cond_channels_come_from_the_descriptor(cudart, trt, schedule, rng):
    be = _backend(cudart, _fake_engine(trt, REFINE), REFINE)
    be.set_schedule(schedule.timesteps, schedule.coefficients())
    be.bind(2, 16, 24)
    assert trt.contexts[0].input_shapes["cond"] == (2, 6, 16, 24)
    for _ in range(3):
        _frame(be, schedule, rng, cond_channels=6)
    assert be.graph_captured
    with pytest.raises(UsageError, match=r"cond must be a float32 array of shape \(2, 6, 16, 24\)"):
        be.set_cond(np.zeros((2, 3, 16, 24), np.float32))
    be.close()


def test_a_prologue_writes_cond_in_place_for_the_steps(cudart, trt, schedule, rng):
    """Predict-and-refine: the prologue (y -> cond [y, b]) runs once per frame into the bound cond
    buffer, then the S-step loop (one CUDA graph) reads it; cond never crosses the host."""
    import fake_tensorrt

    be = _backend(cudart, _fake_engine(trt, REFINE), REFINE)
    ex = be.executor
    prologue = TensorRTEngine(fake_tensorrt.prologue_plan(
        "y", "cond", channels=3, profile_points=[(1, (8, 8)), (1, (16, 16)), (2, (32, 32))]), trt=trt, name="prologue")
    be.set_schedule(schedule.timesteps, schedule.coefficients())
    n, h, w = 2, 16, 24
    be.bind(n, h, w)
    ex.allocate({"y": n * 3 * h * w * 4})
    ex.set_shapes(prologue, {"y": (n, 3, h, w)})
    ex.bind(prologue, {"y": ex.pointer("y"), "cond": ex.pointer("cond")})  # its output IS the step's cond
    h2d_before = cudart.count("cudaMemcpyAsync")
    for _ in range(3):
        y = rng.uniform(-1, 1, (n, 3, h, w)).astype(np.float32)
        x = rng.standard_normal((n, 3, h, w), dtype=np.float32)
        ex.upload("y", y)
        ex.enqueue(prologue)  # ordered before the steps: same stream
        be.set_x(x)
        be.run()
        want = fake_tensorrt.reference_loop(x, fake_tensorrt.prologue_reference(y), schedule.timesteps,
                                            schedule.coefficients())
        np.testing.assert_allclose(be.get_x(), want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max()))
    assert be.graph_captured and cudart.launches == 2
    assert cudart.count("cudaMemcpyAsync") - h2d_before == 3 * 3  # y in, x in, x out per frame: no cond copy
    prologue.close()
    be.close()


# ------------------------------------------------------------------ the torch stand-in, on the fake
@pytest.mark.parametrize("descriptor", [PLAIN, REFINE], ids=["cond3", "cond6"])
def test_the_torch_stand_in_runs_through_the_backend_on_cpu(cudart, schedule, rng, descriptor):
    pytest.importorskip("torch")
    import standin

    engine = standin.StandInStep(standin.FakeCuda(cudart), descriptor)
    be = _backend(cudart, engine, descriptor)
    be.set_schedule(schedule.timesteps, schedule.coefficients())
    be.bind(2, 16, 24)
    ptrs = be.buffer_pointers()
    mallocs = cudart.count("cudaMalloc")
    outs = [_frame(be, schedule, rng, cond_channels=descriptor.inputs[1].shape[1]) for _ in range(4)]
    assert be.graph_captured and be.graph_error is None and cudart.launches == 3
    assert engine.enqueues == 6  # warm-up + capture; the replays enqueue nothing
    assert be.buffer_pointers() == ptrs and cudart.count("cudaMalloc") == mallocs
    x0, x1, _ = ptrs
    assert [(e["x_t"], e["x_next"]) for e in engine.executed[:3]] == [(x0, x1), (x1, x0), (x0, x1)]
    assert all(np.isfinite(o).all() for o in outs)
    be.close()


def test_the_torch_stand_in_refuses_shapes_outside_its_profile(cudart):
    pytest.importorskip("torch")
    import standin

    engine = standin.StandInStep(standin.FakeCuda(cudart), PLAIN)
    be = _backend(cudart, engine, PLAIN)
    with pytest.raises(UsageError, match="refused input shape 4x3x16x16"):
        be.executor.set_shapes(engine, {"x_t": (4, 3, 16, 16)})
    be.close()


def test_the_torch_stand_in_prologue_matches_its_reference(cudart):
    pytest.importorskip("torch")
    import fake_tensorrt
    import standin

    ex = Executor(CudaDevice(0, cudart=cudart))
    pro = standin.StandInPrologue(standin.FakeCuda(cudart), "y", "cond", channels=3,
                                  profile=((1, 3, 8, 8), (1, 3, 16, 16), (2, 3, 32, 32)))
    y = np.random.default_rng(0).uniform(-1, 1, (2, 3, 16, 16)).astype(np.float32)
    out = ex.run(pro, {"y": y})["cond"]
    np.testing.assert_allclose(out, fake_tensorrt.prologue_reference(y), rtol=1e-6, atol=1e-6)
    ex.close()
