"""onnxruntime backend: parity of one fused step with torch, buffer reuse, no per-step allocation."""

from __future__ import annotations

import gc
import shutil
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from runtime.backends import open_backend
from runtime.backends.onnxruntime import OnnxRuntimeBackend
from runtime.errors import ArtifactError, DependencyError, ManifestError, UsageError
from runtime.manifest import Manifest, manifest_path_for
from runtime.schedule import DDIMSchedule


@pytest.fixture
def schedule() -> DDIMSchedule:
    s = DDIMSchedule()
    s.set_timesteps(4)
    return s


@pytest.fixture
def backend(tiny_model, schedule):
    be = open_backend(tiny_model.onnx, threads=1)
    be.set_schedule(schedule.timesteps, schedule.coefficients())
    yield be
    be.close()


def _rand(rng, shape):
    return rng.standard_normal(shape, dtype=np.float32)


def test_open_backend_by_suffix(backend):
    assert isinstance(backend, OnnxRuntimeBackend)
    assert backend.name == "onnxruntime"
    assert backend.providers == ["CPUExecutionProvider"]
    assert backend.limits is None  # onnxruntime runs any shape
    opts = backend._session.get_session_options()
    assert opts.intra_op_num_threads == 1
    assert str(opts.graph_optimization_level).endswith("ORT_ENABLE_ALL")


def test_one_step_matches_torch_fused_step(tiny_model, backend, schedule, rng):
    """Step 0 of the backend vs training.multiscale.fused_step on the same inputs (batch 2, 16x24)."""
    n, h, w = 2, 16, 24
    x, cond = _rand(rng, (n, 3, h, w)), _rand(rng, (n, 3, h, w))
    backend.bind(n, h, w)
    backend.set_cond(cond)
    backend.set_x(x)
    backend.run_step(0)
    got = backend.get_x()
    t = np.full((n,), float(schedule.timesteps[0]), np.float32)
    coef = np.repeat(schedule.coefficients()[:1], n, axis=0)
    want = tiny_model.fused_step(x, cond, t, coef)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3 * float(np.abs(want).max()))


def test_full_loop_matches_numpy_of_single_steps(backend, schedule, rng):
    """run() equals S explicit run_step calls, and set_x restarts from buffer 0."""
    x, cond = _rand(rng, (1, 3, 16, 16)), _rand(rng, (1, 3, 16, 16))
    backend.bind(1, 16, 16)
    backend.set_cond(cond)
    backend.set_x(x)
    backend.run()
    a = backend.get_x()
    backend.set_x(x)
    for i in range(schedule.timesteps.shape[0]):
        backend.run_step(i)
    np.testing.assert_array_equal(backend.get_x(), a)


def test_buffers_bound_once_per_shape_and_output_written_in_place(backend, rng):
    backend.bind(1, 16, 16)
    ptrs = backend.buffer_pointers()
    x0, x1 = backend._x
    cond = _rand(rng, (1, 3, 16, 16))
    for _frame in range(3):
        backend.set_cond(cond)
        backend.set_x(_rand(rng, (1, 3, 16, 16)))
        for i in range(4):
            backend.run_step(i)
            # onnxruntime wrote x_next straight into our preallocated buffer: no output allocation
            assert backend.output_pointer() == ptrs[backend._cur]
            assert backend.buffer_pointers() == ptrs
        assert backend._x[0] is x0 and backend._x[1] is x1
    np.testing.assert_array_equal(backend.get_x(), backend._x[backend._cur])
    backend.bind(1, 16, 16)  # same shape: nothing reallocated
    assert backend.buffer_pointers() == ptrs and backend._x[0] is x0
    backend.bind(2, 16, 16)  # new shape: new buffers
    assert backend._x[0] is not x0 and backend._x[0].shape == (2, 3, 16, 16)


def test_step_tables_prepared_once_per_steps_and_batch(backend, schedule):
    backend.bind(1, 16, 16)
    t_ov = list(backend._t_ov)
    backend.set_schedule(schedule.timesteps, schedule.coefficients())  # same schedule: kept
    assert backend._t_ov == t_ov and all(a is b for a, b in zip(backend._t_ov, t_ov))
    backend.bind(3, 16, 16)  # new batch: rebuilt, one row per step
    assert len(backend._t_ov) == 4 and backend._t_ov[0].shape() == [3]
    assert backend._coef_ov[0].shape() == [3, 4]
    s2 = DDIMSchedule()
    s2.set_timesteps(7)
    backend.set_schedule(s2.timesteps, s2.coefficients())
    assert len(backend._t_ov) == 7 and backend.num_steps == 7
    np.testing.assert_array_equal(backend._tables[0][:, 0], s2.timesteps.astype(np.float32))


def test_no_allocation_per_step_or_per_frame(backend, rng):
    """tracemalloc over the step loop: retained bytes do not grow with steps or frames.

    Measured (2-core CI CPU, 48x48): ~0-5 B retained per step (onnxruntime's run_with_iobinding
    keeps a bounded ~1 KB cache that stops growing after a few thousand steps: +1,096 B after
    6,000 steps, still +1,096 B after 18,000), no buffer-sized transient allocation; a frame
    (set_cond, set_x, run, get_x into a preallocated array) retains ~0 B. An x-sized allocation
    per step would be 27,648 B.
    """
    n, h, w = 1, 48, 48
    backend.bind(n, h, w)
    cond, x = _rand(rng, (n, 3, h, w)), _rand(rng, (n, 3, h, w))
    out = np.empty_like(x)
    backend.set_cond(cond)
    backend.set_x(x)
    backend.run()
    backend.get_x(out)  # warm-up
    ptrs = backend.buffer_pointers()
    gc.collect()
    tracemalloc.start()
    try:
        for i in range(40):
            backend.run_step(i % 4)
        c1, _ = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        steps = 120
        for i in range(steps):
            backend.run_step(i % 4)
        c2, peak = tracemalloc.get_traced_memory()
        frames = 8
        for _ in range(frames):
            backend.set_cond(cond)
            backend.set_x(x)
            backend.run()
            backend.get_x(out)
        c3, peak3 = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    per_step = (c2 - c1) / steps
    assert per_step < 64, f"{per_step:.1f} B retained per step"
    assert peak - c1 < 16_384, f"transient {peak - c1} B inside the step loop"
    assert (c3 - c2) / frames < 256, f"{(c3 - c2) / frames:.1f} B retained per frame"
    assert peak3 - c1 < 16_384
    assert backend.buffer_pointers() == ptrs


def test_input_checks(backend, rng):
    with pytest.raises(UsageError, match="bind"):
        backend.set_x(_rand(rng, (1, 3, 16, 16)))
    with pytest.raises(UsageError, match="multiple of the model's size multiple 8"):
        backend.bind(1, 12, 16)
    backend.bind(1, 16, 16)
    with pytest.raises(UsageError, match=r"float32 array of shape \(1, 3, 16, 16\)"):
        backend.set_x(_rand(rng, (1, 3, 8, 16)))
    with pytest.raises(UsageError, match="float32"):
        backend.set_cond(np.zeros((1, 3, 16, 16), np.float64))
    with pytest.raises(UsageError, match="step index 9"):
        backend.run_step(9)
    backend.close()
    with pytest.raises(UsageError, match="closed"):
        backend.bind(1, 16, 16)


def test_schedule_required(tiny_model, rng):
    with open_backend(tiny_model.onnx, threads=1) as be:
        be.bind(1, 8, 8)
        be.set_x(_rand(rng, (1, 3, 8, 8)))
        with pytest.raises(UsageError, match="set_schedule"):
            be.run()


def _copy_artifact(tiny_model, dest_dir):
    onnx = dest_dir / "model.onnx"
    shutil.copy(tiny_model.onnx, onnx)
    shutil.copy(manifest_path_for(tiny_model.onnx), manifest_path_for(onnx))
    return onnx


def test_refuses_missing_or_tampered_artifacts(tiny_model, tmp_path):
    onnx = _copy_artifact(tiny_model, tmp_path)
    with pytest.raises(ArtifactError, match="not found"):
        open_backend(tmp_path / "absent.onnx")
    with pytest.raises(UsageError, match="unknown artifact type"):
        open_backend(tmp_path / "model.pt")
    data = bytearray(onnx.read_bytes())
    data[-1] ^= 0xFF
    onnx.write_bytes(bytes(data))
    with pytest.raises(ManifestError, match="sha256"):
        open_backend(onnx)
    manifest_path_for(onnx).unlink()
    with pytest.raises(ManifestError, match="manifest not found"):
        open_backend(onnx)


def test_refuses_a_file_that_is_not_onnx(tiny_model, tmp_path):
    onnx = _copy_artifact(tiny_model, tmp_path)
    onnx.write_bytes(b"not an onnx model")
    m = Manifest.for_artifact(onnx)
    from runtime.manifest import sha256_file

    m.sha256 = sha256_file(onnx)
    m.save(manifest_path_for(onnx))
    with pytest.raises(ArtifactError, match=r"onnxruntime cannot load it|not a readable ONNX model"):
        open_backend(onnx)


def test_device_and_threads_options(tiny_model):
    import onnxruntime

    with pytest.raises(UsageError, match="device"):
        open_backend(tiny_model.onnx, device="tpu")
    with pytest.raises(UsageError, match="threads"):
        open_backend(tiny_model.onnx, threads=0)
    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        with pytest.raises(DependencyError, match=r"raindiffusion-edge\[gpu\]"):
            open_backend(tiny_model.onnx, device="cuda")


@pytest.mark.gpu
def test_cuda_execution_provider_matches_cpu(tiny_model, schedule, rng):
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        pytest.skip("onnxruntime-gpu (CUDAExecutionProvider) is not installed")
    x, cond = _rand(rng, (2, 3, 16, 16)), _rand(rng, (2, 3, 16, 16))
    outs = []
    for device in ("cpu", "cuda"):
        with open_backend(tiny_model.onnx, device=device) as be:
            be.set_schedule(schedule.timesteps, schedule.coefficients())
            be.bind(2, 16, 16)
            be.set_cond(cond)
            be.set_x(x)
            be.run()
            outs.append(be.get_x())
    np.testing.assert_allclose(outs[1], outs[0], rtol=1e-3, atol=1e-3 * float(np.abs(outs[0]).max()))


# ------------------------------------------------------------------ the one session factory
def _add_one_graph() -> bytes:
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 2])
    one = helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0])
    graph = helper.make_graph([helper.make_node("Add", ["x", "one"], ["y"])], "add_one", [x], [y], [one])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model.SerializeToString()


@pytest.mark.parametrize("optimization,level", [("all", "ORT_ENABLE_ALL"), ("basic", "ORT_ENABLE_BASIC"),
                                                ("disabled", "ORT_DISABLE_ALL")])
def test_make_session_options_for_files_and_in_memory_graphs(tiny_model, optimization, level):
    """Every session of the toolkit (backend, verification, calibration, FP16 probes, the
    simplification timing) comes from make_session: one set of options for a file or a graph
    built in memory (what calibration.collect and rd_export.fp16 had their own copies for)."""
    import onnxruntime as ort

    from calibration.collect import make_session as calibration_session
    from runtime.backends.onnxruntime import make_session

    for model in (_add_one_graph(), tiny_model.onnx):
        s = make_session(model, threads=1, optimization=optimization, quiet=True)
        opts = s.get_session_options()
        assert opts.graph_optimization_level == getattr(ort.GraphOptimizationLevel, level)
        assert (opts.intra_op_num_threads, opts.inter_op_num_threads, opts.log_severity_level) == (1, 1, 3)
        assert s.get_providers() == ["CPUExecutionProvider"]
    out = make_session(_add_one_graph()).run(None, {"x": np.zeros((1, 2), np.float32)})[0]
    assert out.tolist() == [[1.0, 1.0]]
    # calibration's sessions: ALL, or the exact Q/DQ semantics (optimisations off) with reference=True
    ref = calibration_session(_add_one_graph(), threads=1, reference=True).get_session_options()
    assert ref.graph_optimization_level == ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    assert calibration_session(tiny_model.onnx).get_session_options().graph_optimization_level == \
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL


def test_the_prologue_session_runs_without_the_memory_pattern():
    """On whole frames onnxruntime's memory pattern (allocated from the second run on, beside the
    arena of the first) raised the steady peak of a 720p frame by ~0.37 GB: the prologue's session
    runs without it; the step's (small tiles) keeps it."""
    from runtime.backends.onnxruntime import OnnxRuntimeBackend, make_session

    assert make_session(_add_one_graph()).get_session_options().enable_mem_pattern is True
    assert make_session(_add_one_graph(), mem_pattern=False).get_session_options().enable_mem_pattern is False
    assets = Path(__file__).resolve().parents[2] / "runtime" / "assets"
    with OnnxRuntimeBackend(assets / "default.onnx", threads=1) as b:
        assert b._pro_session.get_session_options().enable_mem_pattern is False
        assert b._session.get_session_options().enable_mem_pattern is True


def test_make_session_refuses_bad_models_and_options():
    from runtime.backends.onnxruntime import make_session

    with pytest.raises(ArtifactError, match=r"^an in-memory model: onnxruntime cannot load it"):
        make_session(b"not a model")
    with pytest.raises(UsageError, match="optimization must be one of all, basic, disabled, got 'fast'"):
        make_session(_add_one_graph(), optimization="fast")
    with pytest.raises(UsageError, match="threads must be a positive integer, got 0"):
        make_session(_add_one_graph(), threads=0)
