"""The CUDA half of the TensorRT backend on a real GPU, with the torch stand-in in TensorRT's place.

``pytest -m gpu tests/gpu`` (or benchmarks/gpu_checks.py, which runs this in one call and prints a
summary). The executor, the step backend and the stream / copy / graph logic are the production
code (runtime/backends/); only the engine is tests/gpu/standin.py: PyTorch kernels launched on
the executor's own stream through ``torch.cuda.ExternalStream``. Checked here: allocations once
per shape, the address ping-pong, the S-step loop captured as one CUDA graph and replayed, graph
output == eager output, two threads on one instance, the table-upload ordering of issue 18
point 1 (with the legacy default stream kept busy), and a prologue writing cond in place.
Measured numbers go to ``record_property`` (the script prints them).
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from runtime.backends.cuda_backend import CudaStepBackend
from runtime.descriptor import ShapeProfile, StepDescriptor, TensorSpec
from runtime.manifest import Manifest
from runtime.schedule import DDIMSchedule, ScheduleConfig

pytestmark = pytest.mark.gpu

PROFILE = ShapeProfile(min_batch=1, opt_batch=2, max_batch=4, min_size=(64, 64), opt_size=(256, 256),
                       max_size=(512, 512))
PLAIN = StepDescriptor(size_multiple=8, profile=PROFILE)


class RefineDescriptor(StepDescriptor):
    """cond with 6 channels, as predict-and-refine's [y, b]."""

    @property
    def inputs(self):
        return tuple(TensorSpec(s.name, s.dtype, ("batch", 6, "height", "width")) if s.name == self.COND else s
                     for s in super().inputs)


def _schedule(steps: int, beta_end: float = 0.02) -> DDIMSchedule:
    s = DDIMSchedule(ScheduleConfig(beta_end=beta_end))
    s.set_timesteps(steps)
    return s


def _backend(gpu, descriptor=PLAIN, *, cuda_graph=True):
    import standin

    device = gpu.device(0)
    engine = standin.StandInStep(gpu.memory(), descriptor)
    manifest = Manifest(artifact="standin.plan", format="trt", precision="fp32", model="derain", sha256="0" * 64,
                        descriptor=descriptor.to_dict(), schedule={"default_steps": 10}, model_config={})
    be = CudaStepBackend("standin.plan", manifest, device=device, engine=engine, cuda_graph=cuda_graph,
                         limits=descriptor.profile, descriptor=descriptor)
    return be, engine, device


def _inputs(rng, n, h, w, cond_channels=3):
    return (rng.standard_normal((n, 3, h, w), dtype=np.float32),
            rng.uniform(-1, 1, (n, cond_channels, h, w)).astype(np.float32))


def _reference(x, cond, sched):
    import fake_tensorrt

    return fake_tensorrt.reference_loop(x, cond, sched.timesteps, sched.coefficients())


def _close(got, want):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * max(1.0, float(np.abs(want).max())))


def _frame(be, x, cond):
    be.set_cond(cond)
    be.set_x(x)
    be.run()
    return be.get_x()


def test_allocations_once_per_shape_and_the_address_swap(gpu, record_property):
    rng = np.random.default_rng(0)
    sched = _schedule(10)
    be, engine, device = _backend(gpu)
    be.set_schedule(sched.timesteps, sched.coefficients())
    be.bind(2, 256, 256)
    ptrs = be.buffer_pointers()
    x, cond = _inputs(rng, 2, 256, 256)
    _close(_frame(be, x, cond), _reference(x, cond, sched))
    mallocs, host = device.mallocs, device.host_mallocs
    assert mallocs == 5  # x[0], x[1], cond, the t and coef tables
    for _ in range(5):
        x, cond = _inputs(rng, 2, 256, 256)
        _close(_frame(be, x, cond), _reference(x, cond, sched))
    assert (device.mallocs, device.host_mallocs, device.frees) == (mallocs, host, 0)
    assert be.buffer_pointers() == ptrs
    x0, x1, c = ptrs
    first = engine.executed[:10]  # the warm-up loop: x[0] -> x[1] -> x[0] ...
    assert [(e["x_t"], e["x_next"]) for e in first] == [(x0, x1), (x1, x0)] * 5
    assert {e["cond"] for e in engine.executed} == {c}
    be.bind(1, 128, 192)  # a new shape: new buffers and (batch changed) tables, the old ones freed
    assert device.mallocs == mallocs + 5 and device.frees == 5
    x, cond = _inputs(rng, 1, 128, 192)
    _close(_frame(be, x, cond), _reference(x, cond, sched))
    be.close()
    assert device.frees == device.mallocs and device.host_frees == device.host_mallocs
    record_property("device", gpu.name)
    record_property("mallocs_per_shape", mallocs)


def test_the_step_loop_is_one_cuda_graph_and_replays(gpu, record_property):
    rng = np.random.default_rng(1)
    steps = 10
    sched = _schedule(steps)
    be, engine, _ = _backend(gpu)
    be.set_schedule(sched.timesteps, sched.coefficients())
    be.bind(2, 256, 256)
    x, cond = _inputs(rng, 2, 256, 256)
    _frame(be, x, cond)  # warm-up
    assert not be.graph_captured and engine.enqueues == steps
    _close(_frame(be, x, cond), _reference(x, cond, sched))  # capture + launch
    assert be.graph_captured and be.graph_error is None and engine.enqueues == 2 * steps
    err, _, nodes = gpu.cudart.cudaGraphGetNodes(be._graph.graph)
    assert err == gpu.cudart.cudaError_t.cudaSuccess
    assert nodes >= steps and nodes % steps == 0  # the same kernel sequence, S times, in one graph
    for _ in range(5):
        x, cond = _inputs(rng, 2, 256, 256)
        _close(_frame(be, x, cond), _reference(x, cond, sched))
    assert engine.enqueues == 2 * steps  # replays enqueue nothing

    def timed(backend, frames=20):
        backend.set_x(x)
        backend.run()
        backend.get_x()
        t0 = time.perf_counter()
        for _ in range(frames):
            backend.set_x(x)
            backend.run()
            backend.get_x()
        return (time.perf_counter() - t0) / frames * 1e3

    eager, _, _ = _backend(gpu, cuda_graph=False)
    eager.set_schedule(sched.timesteps, sched.coefficients())
    eager.bind(2, 256, 256)
    eager.set_cond(cond)
    be.set_cond(cond)
    record_property("graph_nodes", nodes)
    record_property("frame_ms_graph_2x256x256_S10", round(timed(be), 3))
    record_property("frame_ms_eager_2x256x256_S10", round(timed(eager), 3))
    be.close()
    eager.close()


def test_graph_output_equals_eager_output(gpu):
    rng = np.random.default_rng(2)
    sched = _schedule(10)
    graph, _, _ = _backend(gpu, cuda_graph=True)
    eager, _, _ = _backend(gpu, cuda_graph=False)
    for be in (graph, eager):
        be.set_schedule(sched.timesteps, sched.coefficients())
        be.bind(2, 128, 256)
    for k in range(4):
        x, cond = _inputs(rng, 2, 128, 256)
        a, b = _frame(graph, x, cond), _frame(eager, x, cond)
        np.testing.assert_array_equal(a, b)  # same kernels, same order: bit for bit
        if k >= 1:
            assert graph.graph_captured
    assert not eager.graph_captured
    graph.close()
    eager.close()


def test_two_threads_share_one_instance(gpu):
    sched = _schedule(5)
    be, _, _ = _backend(gpu)
    be.set_schedule(sched.timesteps, sched.coefficients())
    lock = threading.Lock()  # what Derainer does around a frame
    errors, devices = [], []

    def work(seed, shape):
        rng = np.random.default_rng(seed)
        try:
            for _ in range(8):
                x, cond = _inputs(rng, *shape)
                with lock:
                    be.bind(*shape)
                    got = _frame(be, x, cond)
                _close(got, _reference(x, cond, sched))
            devices.append(int(gpu.cudart.cudaGetDevice()[1]))
        except Exception as e:  # reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=work, args=(k, s)) for k, s in enumerate([(2, 128, 128), (1, 64, 192)])]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    assert devices == [0, 0]  # each thread had the backend's device made current
    be.close()


def test_table_upload_is_ordered_before_the_steps(gpu, record_property):
    """Issue 18.1 on hardware. First the premise: a copy issued to the legacy default stream
    behind a long kernel has not landed when steps on the backend's non-blocking stream read
    the tables. Then the fix: set_schedule's upload on the backend's own stream, under the same
    load, is always seen by the next steps."""
    cudart = gpu.cudart
    rng = np.random.default_rng(3)
    a, b = _schedule(3), _schedule(3, beta_end=0.012)  # same t values, different coefficients
    assert np.array_equal(a.timesteps, b.timesteps) and not np.allclose(a.coefficients(), b.coefficients())
    be, _, _ = _backend(gpu, cuda_graph=False)
    be.set_schedule(a.timesteps, a.coefficients())
    be.bind(1, 64, 64)
    x, cond = _inputs(rng, 1, 64, 64)
    _close(_frame(be, x, cond), _reference(x, cond, a))
    cycles = int(5e8)  # ~0.25 s of spinning on a ~2 GHz SM

    # the premise: the tables of b copied on the legacy stream behind a spinning kernel
    ex = be.executor
    coef_rows = np.zeros((3, ex.nbytes("coef") // (3 * 4)), np.float32)  # 3 rows, 256-byte aligned
    coef_rows[:, :4] = b.coefficients()
    host = ex.device.malloc_host(coef_rows.nbytes)
    host.view()[:] = coef_rows.reshape(-1).view(np.uint8)
    gpu.sleep_on_default_stream(cycles)
    kind = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
    legacy = cudart.cudaStream_t(cudart.cudaStreamLegacy)  # the form cuda-python's own tests use
    assert cudart.cudaMemcpyAsync(ex.pointer("coef"), host.ptr, coef_rows.nbytes, kind, legacy)[0] == 0
    raced = _frame(be, x, cond)  # steps on the non-blocking stream do not wait for it
    gpu.synchronize()
    ex.device.free_host(host)
    landed_late = bool(np.allclose(raced, _reference(x, cond, a), rtol=1e-4, atol=1e-3))
    record_property("legacy_stream_copy_landed_after_the_steps", landed_late)
    assert landed_late, "the legacy-stream copy was visible to the steps (the premise of the check did not hold)"

    # the fix: every table upload on the backend's stream, the default stream busy each time
    for sched in (b, a, _schedule(5), _schedule(10), b):
        gpu.sleep_on_default_stream(cycles)
        be.set_schedule(sched.timesteps, sched.coefficients())
        _close(_frame(be, x, cond), _reference(x, cond, sched))
    stream = ex.stream_handle
    assert set(ex.device.copy_streams) == {stream}  # every copy the executor made went to its stream
    gpu.synchronize()
    be.close()


def test_a_prologue_writes_cond_in_place_on_the_gpu(gpu):
    import fake_tensorrt
    import standin

    rng = np.random.default_rng(4)
    sched = _schedule(10)
    refine = RefineDescriptor(size_multiple=8, profile=PROFILE)
    be, _, _ = _backend(gpu, refine)
    ex = be.executor
    prologue = standin.StandInPrologue(gpu.memory(), "y", "cond", channels=3,
                                       profile=((1, 3, 64, 64), (2, 3, 256, 256), (4, 3, 512, 512)))
    be.set_schedule(sched.timesteps, sched.coefficients())
    n, h, w = 2, 128, 128
    be.bind(n, h, w)
    ex.allocate({"y": n * 3 * h * w * 4})
    ex.set_shapes(prologue, {"y": (n, 3, h, w)})
    ex.bind(prologue, {"y": ex.pointer("y"), "cond": ex.pointer("cond")})
    for _ in range(3):
        y = rng.uniform(-1, 1, (n, 3, h, w)).astype(np.float32)
        x = rng.standard_normal((n, 3, h, w), dtype=np.float32)
        ex.upload("y", y)
        ex.enqueue(prologue)
        be.set_x(x)
        be.run()
        _close(be.get_x(), _reference(x, fake_tensorrt.prologue_reference(y), sched))
    assert be.graph_captured
    be.close()
