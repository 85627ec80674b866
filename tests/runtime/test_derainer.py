"""Derainer end to end on onnxruntime (CPU) with the tiny exported model of conftest.py."""

from __future__ import annotations

import importlib.resources
import shutil
import threading

import numpy as np
import pytest

from runtime.derainer import Derainer, default_artifact, pad_reflect, to_float, to_uint8
from runtime.errors import ArtifactError, UsageError
from runtime.manifest import Manifest, manifest_path_for


def _frame(rng, h, w):
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_parity_with_torch_reference_sampler(tiny_model, tiny_derainer, rng, psnr):
    """Runtime x_0 vs training.diffusion.ddim_sample (same seed, 37x53 so padding is exercised).

    Measured: 156 dB (PSNR with the peak at the reference's range; max |diff| 7.6e-6 on values
    spanning ~66; 153.9 dB at 10 steps). The uint8 outputs agree within 1 LSB (measured: equal).
    """
    frame = _frame(rng, 37, 53)
    cond = to_float(frame)[None]
    got = tiny_derainer.sample(cond)
    want = tiny_model.reference(cond, steps=tiny_derainer.steps, seed=0)
    assert got.shape == want.shape == (1, 3, 37, 53)
    assert psnr(got, want) >= 60.0
    u8 = tiny_derainer.derain(frame)
    ref_u8 = to_uint8(want[0])
    assert u8.shape == frame.shape and u8.dtype == np.uint8
    assert int(np.abs(u8.astype(int) - ref_u8).max()) <= 1


def test_deterministic_for_a_seed(tiny_model, tiny_derainer, rng):
    frame = _frame(rng, 24, 32)
    a = tiny_derainer.derain(frame)
    np.testing.assert_array_equal(tiny_derainer.derain(frame), a)
    with Derainer(tiny_model.onnx, steps=3, seed=0, threads=1) as other:
        np.testing.assert_array_equal(other.derain(frame), a)
    with Derainer(tiny_model.onnx, steps=3, seed=1, threads=1) as other:
        assert not np.array_equal(other.sample(to_float(frame)[None]), tiny_derainer.sample(to_float(frame)[None]))


@pytest.mark.parametrize(("h", "w"), [(37, 53), (8, 8), (1, 1), (1, 9), (5, 2), (3, 17)])
def test_any_size_comes_back_the_same_size(tiny_derainer, rng, h, w):
    frame = _frame(rng, h, w)
    out = tiny_derainer.derain(frame)
    assert out.shape == (h, w, 3) and out.dtype == np.uint8


@pytest.mark.parametrize(("h", "w"), [(37, 53), (1, 1), (2, 7), (3, 1), (9, 4)])
def test_padding_matches_the_torch_reference(rng, h, w):
    import torch

    from training.diffusion import pad_to_multiple

    x = rng.standard_normal((1, 3, h, w)).astype(np.float32)
    want = pad_to_multiple(torch.from_numpy(x), 8)[0].numpy()
    got = pad_reflect(x, *want.shape[-2:])
    np.testing.assert_array_equal(got, want)
    hp, wp = want.shape[-2] + 16, want.shape[-1] + 8  # beyond the multiple (a TensorRT profile's minimum)
    big = pad_reflect(x, hp, wp)
    assert big.shape == (1, 3, hp, wp)
    np.testing.assert_array_equal(big[..., :h, :w], x)


def test_tiny_frame_matches_reference(tiny_model, tiny_derainer, rng, psnr):
    frame = _frame(rng, 3, 5)  # padded 8x8 in rounds of reflection, then replication
    cond = to_float(frame)[None]
    assert psnr(tiny_derainer.sample(cond), tiny_model.reference(cond, steps=3, seed=0)) >= 60.0


def test_tiling_close_to_full_frame(tiny_model, tiny_derainer, rng, psnr):
    """80x96 frame, 32-px tiles with 8-px overlap (12 tiles, batches of 4) vs the full frame.

    Measured: 42.8 dB (PSNR, peak at the full frame's range) with this random-weight model,
    whose receptive field is much wider than the overlap; floor 35 dB. A tile that covers the
    whole frame reproduces the full frame exactly.
    """
    cond = to_float(_frame(rng, 80, 96))[None]
    full = tiny_derainer.sample(cond)
    with Derainer(tiny_model.onnx, steps=3, seed=0, threads=1, tile=32, overlap=8) as tiled:
        got = tiled.sample(cond)
        assert tiled.backend.shape == (4, 32, 32)  # tiles batched through the engine
    assert got.shape == full.shape
    assert psnr(got, full) >= 35.0
    with Derainer(tiny_model.onnx, steps=3, seed=0, threads=1, tile=96, overlap=8) as one_tile:
        np.testing.assert_array_equal(one_tile.sample(cond), full)


def test_tiling_with_all_tiles_in_one_batch_equals_chunked(tiny_model, rng):
    cond = to_float(_frame(rng, 40, 48))[None]  # 24-px tiles, overlap 8: 2 x 3 = 6 tiles
    with Derainer(tiny_model.onnx, steps=2, tile=24, overlap=8, batch=6, threads=1) as one_batch, \
            Derainer(tiny_model.onnx, steps=2, tile=24, overlap=8, batch=4, threads=1) as chunked:
        a, b = one_batch.sample(cond), chunked.sample(cond)
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(np.abs(a).max()))


def test_batch_equals_individual_frames(tiny_derainer, rng):
    frames = [_frame(rng, 24, 40) for _ in range(5)] + [_frame(rng, 16, 16)]
    singles = [tiny_derainer.sample(to_float(f)[None])[0] for f in frames]
    batched = tiny_derainer.derain_batch(frames)  # 24x40 x5 in chunks of 4 and 1, plus 16x16
    assert [b.shape for b in batched] == [f.shape for f in frames]
    for b, s in zip(batched, singles):
        d = np.abs(to_uint8(s).astype(int) - b.astype(int))
        assert int(d.max()) <= 1 and float(d.mean()) < 0.01
    as_array = tiny_derainer.derain_batch(np.stack(frames[:3]))
    for a, b in zip(as_array, batched[:3]):
        np.testing.assert_array_equal(a, b)
    x = tiny_derainer.sample(np.stack([to_float(f) for f in frames[:4]]))
    np.testing.assert_allclose(x, np.stack(singles[:4]), rtol=1e-4, atol=1e-4 * float(np.abs(x).max()))


def test_bgr_frames(tiny_derainer, rng):
    frame = _frame(rng, 16, 24)
    rgb_out = tiny_derainer.derain(frame)
    bgr_out = tiny_derainer.derain(np.ascontiguousarray(frame[..., ::-1]), bgr=True)
    np.testing.assert_array_equal(bgr_out, rgb_out[..., ::-1])


def test_two_threads_share_one_derainer(tiny_derainer, rng):
    """The lock serialises calls: results equal sequential ones, no crash, no mixed buffers."""
    frames = [_frame(rng, 16 + 8 * (i % 2), 24) for i in range(6)]
    sequential = [tiny_derainer.derain(f) for f in frames]
    results: dict[int, np.ndarray] = {}
    errors: list[BaseException] = []

    def work(indices):
        try:
            for i in indices:
                results[i] = tiny_derainer.derain(frames[i])
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(range(k, 6, 2),)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors
    for i, want in enumerate(sequential):
        np.testing.assert_array_equal(results[i], want)


@pytest.mark.parametrize(("frame", "match"), [
    (np.zeros((8, 8, 3), np.float32), "uint8"),
    (np.zeros((8, 8), np.uint8), "HxWx3"),
    (np.zeros((8, 8, 4), np.uint8), "4 channels"),
    (np.zeros((0, 8, 3), np.uint8), "empty"),
    ([[0, 0, 0]], "numpy array"),
])
def test_frame_validation(tiny_derainer, frame, match):
    with pytest.raises(UsageError, match=match):
        tiny_derainer.derain(frame)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"steps": 0}, r"steps must be an integer in 2\.\.1000, got 0$"),
    ({"steps": 1}, r"in 2\.\.1000, got 1 \(a single step of Algorithm 2 is at t = 1 and returns the initial noise\)"),
    ({"steps": 2.5}, "steps"),
    ({"seed": -1}, "seed"),
    ({"tile": 20}, "multiple of the model's size multiple 8"),
    ({"tile": 16, "overlap": 16}, "overlap 16 must be smaller than tile 16"),
    ({"overlap": -2}, "overlap"),
    ({"batch": 0}, "batch"),
    ({"device": "gpu"}, "device"),
])
def test_option_validation(tiny_model, kwargs, match):
    with pytest.raises(UsageError, match=match):
        Derainer(tiny_model.onnx, threads=1, **kwargs)


def test_properties(tiny_model, tiny_derainer):
    d = tiny_derainer
    assert d.steps == 3 and d.seed == 0 and d.size_multiple == tiny_model.size_multiple == 8
    assert d.backend_name == "onnxruntime"
    assert isinstance(d.manifest, Manifest) and d.manifest.format == "onnx"
    assert d.tile is None and d.overlap == 16 and d.batch == 4  # an eighth of the 128-px profile maximum
    assert "onnxruntime" in repr(d)
    with Derainer(tiny_model.onnx, threads=1) as default_steps:
        assert default_steps.steps == tiny_model_default_steps(tiny_model)


def tiny_model_default_steps(tiny_model) -> int:
    return Manifest.for_artifact(tiny_model.onnx).default_steps


class _FakeFiles:
    def __init__(self, root):
        self.root = root

    def joinpath(self, *parts):
        return self.root.joinpath(*parts)


def test_default_artifact_missing_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(importlib.resources, "files", lambda pkg: _FakeFiles(tmp_path))
    with pytest.raises(ArtifactError, match="no default model is installed"):
        Derainer()


def test_default_artifact_is_loaded_from_the_package(monkeypatch, tmp_path, tiny_model):
    assets = tmp_path / "assets"
    assets.mkdir()
    shutil.copy(tiny_model.onnx, assets / "default.onnx")
    m = Manifest.for_artifact(tiny_model.onnx)
    m.artifact = "default.onnx"
    m.save(manifest_path_for(assets / "default.onnx"))
    monkeypatch.setattr(importlib.resources, "files", lambda pkg: _FakeFiles(tmp_path))
    assert default_artifact() == assets / "default.onnx"
    with Derainer(steps=2, threads=1) as d:
        assert d.artifact.name == "default.onnx"
        assert d.derain(np.zeros((8, 8, 3), np.uint8)).shape == (8, 8, 3)


def test_closed_derainer_refuses_work(tiny_model):
    d = Derainer(tiny_model.onnx, steps=2, threads=1)
    d.close()
    with pytest.raises(UsageError, match="closed"):
        d.derain(np.zeros((8, 8, 3), np.uint8))


def test_artifact_written_by_export_onnx(request, tmp_path_factory, rng, psnr):
    """The shipped pipeline end to end: tiny_checkpoint -> rd_export.export_onnx -> Derainer == torch."""
    pytest.importorskip("rd_export.export", reason="rd_export.export is not available")
    import torch

    from rd_export.export import export_onnx
    from training.checkpoint import build_estimator, load_checkpoint, model_configs
    from training.diffusion import ddim_sample

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # ~20 s for the 3-step training run + export instead of ~70 s on the shared box
    try:
        try:
            ckpt = request.getfixturevalue("tiny_checkpoint")
        except pytest.FixtureLookupError:
            pytest.skip("the tiny_checkpoint fixture (tests/conftest.py) is not available")
        onnx = export_onnx(ckpt, tmp_path_factory.mktemp("export_onnx"), steps=2)
        state = load_checkpoint(ckpt)
        frame = _frame(rng, 37, 45)
        cond = to_float(frame)[None]
        with Derainer(onnx, threads=1) as d:
            assert d.steps == 2 and d.manifest.get("source")  # the manifest rd_export wrote
            got = d.sample(cond)
            out = d.derain(frame)
        want = ddim_sample(build_estimator(state), torch.from_numpy(cond), steps=2, seed=0,
                           schedule_config=model_configs(state).schedule).numpy()
    finally:
        torch.set_num_threads(threads)
    assert psnr(got, want) >= 60.0
    assert int(np.abs(out.astype(int) - to_uint8(want[0])).max()) <= 1


def test_onnxruntime_tiles_frames_beyond_the_manifest_profile(tiny_model, rng):
    """onnxruntime accepts any shape, but a frame beyond the manifest's profile (max 128 here) is
    tiled at the profile's max size, which bounds memory (quadratic lowest-level attention)."""
    frame = _frame(rng, 136, 72)
    with Derainer(tiny_model.onnx, steps=2, seed=0, threads=1) as d:
        out = d.derain(frame)
        assert out.shape == frame.shape
        assert d.backend.shape[1] == 128  # tiles of the profile height (the width 72 fits)


def test_a_batch_is_sampled_like_the_torch_reference_batch(tiny_model, tiny_derainer, rng, psnr):
    """Derainer and ddim_sample draw x_T the same way for a batch (one draw per frame, the same for
    every frame of a padded size: runtime.schedule.frame_noise), so a batch agrees number for number."""
    frames = np.stack([to_float(_frame(rng, 24, 40)) for _ in range(3)])
    got = tiny_derainer.sample(frames)
    want = tiny_model.reference(frames, steps=3, seed=0)
    assert psnr(got, want) > 60
    import torch

    from training.diffusion import ddim_sample

    _, traj = ddim_sample(tiny_model.estimator, torch.from_numpy(frames), steps=3, seed=0, return_trajectory=True)
    assert np.array_equal(traj[0]["x_t"][0], traj[0]["x_t"][2])  # the same x_T for every frame
