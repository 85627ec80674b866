"""The ``gpu`` tests of tests/gpu/test_cuda_gpu.py, run here on the fakes.

A lent GPU runs those tests for real (benchmarks/gpu_checks.py). Here the same test bodies run
with their hardware hooks pointed at the fake cudart (tests/fakes/fake_cuda.py) and the torch
stand-in on torch CPU tensors over the fake's memory: the production executor and backend, the
stand-in's kernel code, and the tests' own logic (counts, the ping-pong pattern, the graph node
count, the table-ordering premise, which the fake's legacy stream reproduces) are checked on
CPU, so a lease is not spent finding a broken test. What only a GPU shows (real kernels on a
real stream via torch.cuda.ExternalStream, real capture, real timing) is what the lease is for.
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

GPU_TESTS = Path(__file__).resolve().parents[1] / "gpu"
if str(GPU_TESTS) not in sys.path:
    sys.path.insert(0, str(GPU_TESTS))

torch = pytest.importorskip("torch")

import standin  # noqa: E402
import test_cuda_gpu  # noqa: E402

NAMES = [n for n in dir(test_cuda_gpu) if n.startswith("test_")]


@pytest.fixture
def fake_hw(monkeypatch):
    import fake_cuda

    cudart = fake_cuda.install(monkeypatch)
    return SimpleNamespace(cudart=cudart, device=standin.counting_device_class(cudart),
                           memory=lambda: standin.FakeCuda(cudart),
                           sleep_on_default_stream=lambda cycles: None,  # the fake never runs queued work early
                           synchronize=lambda: cudart.cudaDeviceSynchronize(), name="Fake GPU")


@pytest.mark.parametrize("name", NAMES)
def test_gpu_test_body_runs_on_the_fakes(fake_hw, name):
    recorded = {}
    fn = getattr(test_cuda_gpu, name)
    kwargs = {"gpu": fake_hw}
    if "record_property" in fn.__code__.co_varnames[: fn.__code__.co_argcount]:
        kwargs["record_property"] = recorded.__setitem__
    fn(**kwargs)
    if name == "test_table_upload_is_ordered_before_the_steps":
        assert recorded["legacy_stream_copy_landed_after_the_steps"] is True


def test_every_gpu_test_is_covered():
    assert len(NAMES) == 6
