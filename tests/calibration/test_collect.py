"""Calibration data: image selection and its errors, and trajectories that cover every timestep."""

from __future__ import annotations

import numpy as np
import pytest

from calibration.collect import (
    CalibrationWarning,
    TrajectoryDataReader,
    calibration_sizes,
    make_session,
    record_trajectories,
    select_images,
    timestep_coverage,
)
from runtime.descriptor import ShapeProfile, StepDescriptor
from runtime.errors import InputError, UsageError
from runtime.manifest import Manifest
from runtime.schedule import DDIMSchedule, initial_noise


def _unreadable(folder, names=("broken.png", "empty.jpg", "text.webp")):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / names[0]).write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)  # truncated PNG
    (folder / names[1]).write_bytes(b"")
    (folder / names[2]).write_text("not an image")
    return folder


# ------------------------------------------------------------------ bad folders: InputError naming the folder
def test_missing_folder(tmp_path):
    with pytest.raises(InputError, match=r"nope.*does not exist"):
        select_images(tmp_path / "nope", calib_images=2)


def test_not_a_folder(tmp_path):
    f = tmp_path / "file.png"
    f.write_bytes(b"x")
    with pytest.raises(InputError, match=r"file\.png.*not a directory"):
        select_images(f, calib_images=2)


def test_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(InputError, match=r"empty.*no image files"):
        select_images(tmp_path / "empty", calib_images=2)


def test_only_unreadable_files(tmp_path):
    folder = _unreadable(tmp_path / "bad")
    with pytest.warns(CalibrationWarning), pytest.raises(InputError, match=r"bad: none of its 3 image files"):
        select_images(folder, calib_images=2)


def test_unreadable_files_are_skipped_with_a_warning(tmp_path, rainy_images):
    folder = rainy_images(_unreadable(tmp_path / "mixed"), n=3)
    with pytest.warns(CalibrationWarning) as record:  # asks for more than there is: every file is visited
        calib, held = select_images(folder, calib_images=4, eval_images=1)
    messages = [str(w.message) for w in record]
    for name in ("broken.png", "empty.jpg", "text.webp"):
        assert sum(name in m and m.startswith("skipping unreadable calibration image") for m in messages) == 1
    assert any("only 3 readable images" in m for m in messages)
    assert len(calib) == 2 and len(held) == 1
    assert all(item.path.name.startswith("rain") for item in calib + held)


def test_held_out_images_are_disjoint_and_seeded(rainy_dir):
    calib, held = select_images(rainy_dir, calib_images=4, eval_images=2, seed=3)
    names = [i.path.name for i in calib + held]
    assert len(set(names)) == 6
    again, _ = select_images(rainy_dir, calib_images=4, eval_images=2, seed=3)
    assert [i.path.name for i in again] == names[:4]
    other, _ = select_images(rainy_dir, calib_images=4, eval_images=2, seed=4)
    assert [i.path.name for i in other] != names[:4]


def test_too_few_images_shrinks_the_held_out_set(tmp_path, rainy_images):
    folder = rainy_images(tmp_path / "two", n=2)
    with pytest.warns(CalibrationWarning, match="only 2 readable images"):
        calib, held = select_images(folder, calib_images=8, eval_images=2)
    assert len(calib) == 1 and len(held) == 1


# ------------------------------------------------------------------ sizes
def test_calibration_sizes_default_and_errors():
    desc = StepDescriptor(size_multiple=32)  # profile 64 / 256 / 1024
    assert calibration_sizes(desc) == [(256, 256), (128, 128)]
    assert calibration_sizes(desc, [96, (64, 128)]) == [(96, 96), (64, 128)]
    with pytest.raises(UsageError, match="100x100 is not a multiple of the model's size multiple 32"):
        calibration_sizes(desc, [100])
    with pytest.raises(UsageError, match=r"2048x2048 is outside the shape profile 64x64\.\.1024x1024"):
        calibration_sizes(desc, [2048])
    tight = StepDescriptor(size_multiple=8, profile=ShapeProfile(min_size=(32, 32), opt_size=(32, 32),
                                                                 max_size=(64, 64)))
    assert calibration_sizes(tight) == [(32, 32)]  # half of opt would leave the profile


# ------------------------------------------------------------------ trajectories: every timestep, every image
STEPS = 4  # the tiny artifact's default_steps (conftest)


@pytest.fixture(scope="module")
def trajectories(tiny_fp32, rainy_dir, steps):
    assert steps == STEPS
    m = Manifest.for_artifact(tiny_fp32.onnx)
    calib, _ = select_images(rainy_dir, calib_images=3, seed=0)
    cfg = m.schedule_config
    trajs = record_trajectories(tiny_fp32.onnx, calib, descriptor=m.step_descriptor, schedule_config=cfg,
                                steps=STEPS, sizes=[(32, 32), (16, 16)], seed=5)
    return m, cfg, trajs, tiny_fp32.onnx


def test_calibration_covers_every_timestep(trajectories):
    _, cfg, trajs, _ = trajectories
    sched = DDIMSchedule(cfg)
    timesteps = sched.set_timesteps(STEPS)
    coefficients = sched.coefficients()
    assert timestep_coverage(trajs) == {int(t): 3 for t in timesteps}  # every step, every image
    for traj in trajs:
        assert [s.step for s in traj.samples] == list(range(STEPS))
        np.testing.assert_array_equal([float(s.t[0]) for s in traj.samples], timesteps.astype(np.float32))
        np.testing.assert_array_equal(np.stack([s.coef[0] for s in traj.samples]), coefficients)
        for s in traj.samples:
            assert s.x_t.dtype == s.cond.dtype == s.t.dtype == s.coef.dtype == np.float32
            assert s.t.shape == (1,) and s.coef.shape == (1, 4)


def test_trajectories_are_the_fp32_loop(trajectories):
    m, _, trajs, onnx_path = trajectories
    d = m.step_descriptor
    assert [t.size for t in trajs] == [(32, 32), (16, 16), (32, 32)]  # sizes alternate
    session = make_session(onnx_path)
    for k, traj in enumerate(trajs):
        first = traj.samples[0]
        np.testing.assert_array_equal(first.x_t, initial_noise(first.x_t.shape, 5 + k))  # x_T, PCG64(seed + k)
        for a, b in zip(traj.samples, [*traj.samples[1:], None]):
            (x_next,) = session.run([d.OUT], a.feed(d))
            np.testing.assert_allclose(x_next, b.x_t if b is not None else traj.x_0, rtol=0, atol=1e-6)


@pytest.mark.parametrize("noise_scale", [0.0, 0.5])
def test_trajectories_start_from_the_scaled_noise(tiny_fp32, rainy_dir, noise_scale):
    """With a noise scale s the runtime starts from x_T = s * N(0, I): calibration records those
    trajectories (api.build_int8 passes the manifest's prologue.noise_scale)."""
    m = Manifest.for_artifact(tiny_fp32.onnx)
    calib, _ = select_images(rainy_dir, calib_images=1, seed=0)
    kw = dict(descriptor=m.step_descriptor, schedule_config=m.schedule_config, steps=STEPS, sizes=[(32, 32)], seed=5)
    (scaled,) = record_trajectories(tiny_fp32.onnx, calib, noise_scale=noise_scale, **kw)
    (plain,) = record_trajectories(tiny_fp32.onnx, calib, **kw)
    first = scaled.samples[0].x_t
    np.testing.assert_array_equal(first, initial_noise(first.shape, 5) * np.float32(noise_scale))
    np.testing.assert_array_equal(plain.samples[0].x_t, initial_noise(first.shape, 5))
    assert np.abs(scaled.x_0 - plain.x_0).max() > 1e-4  # the trajectory follows its start


def test_reader_feeds_every_sample_and_rewinds(trajectories):
    m, _, trajs, _ = trajectories
    reader = TrajectoryDataReader.from_trajectories(trajs, m.step_descriptor)
    feeds = list(reader)
    assert len(feeds) == len(reader) == 3 * STEPS
    assert set(feeds[0]) == set(m.step_descriptor.input_names)
    assert reader.get_next() is None
    reader.rewind()
    assert reader.get_next() is not None
    chunks = reader.chunks(3)
    assert chunks[0][0] == 0 and chunks[-1][1] == len(reader)
    for start, end in chunks:  # a chunk never mixes frame shapes (histogram calibrators stack them)
        assert 0 < end - start <= 3
        assert len({reader.samples[i].x_t.shape for i in range(start, end)}) == 1
    reader.set_range(2, 5)
    assert len(list(reader)) == 3


def test_reader_needs_samples(trajectories):
    with pytest.raises(UsageError, match="no calibration samples"):
        TrajectoryDataReader([], trajectories[0].step_descriptor)
