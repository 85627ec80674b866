"""Derainer on a predict-and-refine artifact: the prologue once per frame, steps 0 = P(y), native tiles."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "rd_export"))

from rdx_helpers import one_torch_thread, write_random_checkpoint

from runtime.derainer import Derainer
from runtime.errors import UsageError


@pytest.fixture(scope="module")
def refine(tmp_path_factory):
    from rd_export.export import export_onnx
    from training.checkpoint import build_estimator, build_prologue, load_checkpoint

    d = tmp_path_factory.mktemp("refine_rt")
    with one_torch_thread():
        ck = write_random_checkpoint(d / "r.pt", cond_channels=6, prediction="x0_residual", crop=32)
        onnx = export_onnx(ck, d / "out", steps=3)
    c = load_checkpoint(ck)
    return onnx, build_estimator(c), build_prologue(c)


def reference(est, pro, frames_u8: np.ndarray, steps: int, noise_scale: float = 1.0) -> np.ndarray:
    import torch

    from runtime.derainer import to_float
    from training.diffusion import ddim_sample

    with one_torch_thread(), torch.no_grad():
        return ddim_sample(est, torch.from_numpy(to_float(frames_u8)), steps=steps, seed=0, prologue=pro,
                           noise_scale=noise_scale).numpy()


@pytest.mark.parametrize("steps", [0, 2, 3])
def test_matches_the_torch_reference(refine, steps):
    onnx, est, pro = refine
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 256, (24, 30, 3), dtype=np.uint8)  # within the native tile: one pass
    with Derainer(onnx, steps=steps, threads=1) as d:
        got = d.sample(d_in := (frame[None].astype(np.float32) / 127.5 - 1).transpose(0, 3, 1, 2).copy())
    want = reference(est, pro, frame[None], steps)
    np.testing.assert_allclose(got, want, atol=2e-4, rtol=0)
    assert d_in.shape == (1, 3, 24, 30)


def test_zero_steps_is_the_prologue_estimate(refine):
    import torch

    onnx, _, pro = refine
    frame = np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    with Derainer(onnx, steps=0, threads=1) as d:
        out = d.derain(frame)
    from runtime.derainer import to_float, to_uint8

    with torch.no_grad():
        b = pro(torch.from_numpy(to_float(frame[None])))[:, 3:].numpy()
    assert np.abs(out.astype(int) - to_uint8(b)[0].astype(int)).max() <= 1
    assert not np.array_equal(out, frame)


def test_batch_equals_single_frames(refine):
    onnx, _, _ = refine
    rng = np.random.default_rng(2)
    frames = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(3)]
    with Derainer(onnx, steps=2, threads=1) as d:
        batched = d.derain_batch(frames)
        single = [d.derain(f) for f in frames]
    for a, b in zip(batched, single):
        assert np.array_equal(a, b)


def _tiled_reference(est, pro, frame: np.ndarray, steps: int, *, whole: bool) -> np.ndarray:
    """Derainer's tiled loop in torch: 32-px tiles (overlap 4) blended after every step; the
    condition from the prologue on the whole frame (``whole``) or on each tile's crop."""
    import torch

    from runtime.derainer import to_float
    from runtime.schedule import DDIMSchedule, initial_noise, step_inputs
    from runtime.tiling import TileBlender, plan_tiles
    from training.multiscale import fused_step

    h, w = frame.shape[:2]
    y = to_float(frame[None])[0]
    blender = TileBlender(plan_tiles(h, w, 32, 4, multiple=8))
    k = len(blender.plan)

    def cut(canvas: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(blender.cut(canvas, np.zeros((k, canvas.shape[0], 32, 32), np.float32), range(k)))

    with one_torch_thread(), torch.no_grad():
        cond = cut(pro(torch.from_numpy(y[None]))[0].numpy()) if whole else pro(cut(y))
        if steps == 0:
            return blender.blend(cond[:, 3:].numpy())
        s = DDIMSchedule()
        s.set_timesteps(steps)
        canvas = initial_noise((1, 3, h, w), 0)[0]
        for i in range(steps):
            t, coef = step_inputs(s.coefficients(), s.timesteps, i, k)
            canvas = blender.blend(fused_step(est, cut(canvas), cond, torch.from_numpy(t),
                                              torch.from_numpy(coef)).numpy())
        return canvas


@pytest.mark.parametrize("steps", [0, 2])
def test_frames_beyond_the_native_tile_get_the_prologue_whole_and_tiled_steps(refine, steps):
    """A frame larger than the native tile (32): P runs on the whole frame once (no seams), the
    refiner's steps on 32-px tiles cut from that condition, blended after every step."""
    from runtime.derainer import to_float

    onnx, est, pro = refine
    frame = np.random.default_rng(3).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    with Derainer(onnx, steps=steps, threads=1) as d:
        assert d.native_tile == 32 and d.overlap == 4
        got = d.sample(to_float(frame[None]))[0]
    want = _tiled_reference(est, pro, frame, steps, whole=True)
    np.testing.assert_allclose(got, want, atol=2e-4, rtol=0)
    if steps == 0:  # the whole-frame estimate is the torch reference itself (no tiles at all)
        import torch

        with torch.no_grad():
            ref = pro(torch.from_numpy(to_float(frame[None])))[0, 3:].numpy()
        np.testing.assert_allclose(got, ref, atol=2e-5, rtol=0)


@pytest.mark.parametrize("steps", [0, 2])
def test_frames_beyond_the_pixel_budget_run_the_prologue_per_tile(refine, steps, monkeypatch):
    import runtime.derainer as derainer_mod
    from runtime.derainer import to_float

    onnx, est, pro = refine
    monkeypatch.setattr(derainer_mod, "FRAME_PROLOGUE_MAX_PIXELS", 1000)  # 48 x 64 = 3072 pixels: over it
    frame = np.random.default_rng(4).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    with Derainer(onnx, steps=steps, threads=1) as d:
        got = d.sample(to_float(frame[None]))[0]
    np.testing.assert_allclose(got, _tiled_reference(est, pro, frame, steps, whole=False), atol=2e-4, rtol=0)


def test_frame_prologue_reuses_its_buffers_per_shape(refine):
    onnx, _, _ = refine
    with Derainer(onnx, steps=2, threads=1) as d:
        be = d.backend
        y = np.zeros((1, 3, 48, 64), np.float32)
        be.frame_prologue(y)
        first = be._frame[2].data_ptr()
        be.frame_prologue(y + 0.5)
        assert be._frame[2].data_ptr() == first  # same input buffer for the same frame shape
        be.frame_prologue(np.zeros((1, 3, 32, 64), np.float32))
        assert be._frame[0] == (1, 3, 32, 64)


def test_zero_steps_refused_for_a_y_only_model(tiny_model):
    with pytest.raises(UsageError, match=r"steps must be an integer in 2\.\.1000, got 0"):
        Derainer(tiny_model.onnx, steps=0)


def test_leaving_the_native_tile_warns(refine):
    onnx, _, _ = refine
    with pytest.warns(UserWarning, match="tile 64 differs from the model's native tile size 32"):
        Derainer(onnx, steps=2, tile=64, threads=1).close()


def test_rd_run_steps_zero(refine, tmp_path, tiny_model):
    """rd-run derain --steps 0: the predictor alone on a refine artifact; a y-only one says why not."""
    from typer.testing import CliRunner

    from runtime.cli import app
    from runtime.io import save_image

    onnx, _, _ = refine
    src = tmp_path / "in.png"
    save_image(src, np.random.default_rng(5).integers(0, 256, (40, 48, 3), dtype=np.uint8))
    runner = CliRunner()
    ok = runner.invoke(app, ["derain", str(src), "-o", str(tmp_path / "out"), "--engine", str(onnx), "--steps", "0",
                             "--threads", "1"])
    assert ok.exit_code == 0, ok.output
    assert (tmp_path / "out" / "in.png").is_file()
    bad = runner.invoke(app, ["derain", str(src), "-o", str(tmp_path / "out2"), "--engine", str(tiny_model.onnx),
                              "--steps", "0"])
    assert bad.exit_code == 2 and "got 0" in bad.output
    one = runner.invoke(app, ["derain", str(src), "-o", str(tmp_path / "out3"), "--steps", "1"])
    assert one.exit_code == 2 and "a single step of Algorithm 2" in one.output


# --------------------------------------------------------------------------- refine strength
# The output keeps a share a of the refiner's correction, P(y) + a * (x_0 - P(y)), or with a low-pass
# sigma (the manifest's prologue.refine_lowpass) P(y) + a * G_sigma(x_0 - P(y)) of the whole cropped
# frame (docs/quality.md chose a = 0.5, sigma = 8 for the shipped model). Checked against the runtime's
# own P(y) (0 steps) and x_0 (a = 1, no low-pass) on every path: one pass, whole-frame prologue +
# tiles, per-tile prologue, chunks; so a tiled frame's output is the formula on its merged x_0 and P(y).

@pytest.mark.parametrize(("shape", "budget", "batch"), [
    ((24, 30), None, None),    # within the native tile: one pass (padded: the blur sees the cropped frame)
    ((70, 90), None, None),    # tiles, P on the whole frame, several chunks
    ((70, 90), 100, None),     # tiles, P per tile (beyond the whole-frame budget), several chunks
    ((70, 90), 100, 64),       # ... every tile in one chunk: the engine's bound condition
])
def test_the_output_keeps_that_share_of_the_correction(refine, monkeypatch, shape, budget, batch):
    import runtime.derainer as dmod
    from runtime.lowpass import gaussian_blur

    if budget is not None:
        monkeypatch.setattr(dmod, "FRAME_PROLOGUE_MAX_PIXELS", budget)
    onnx = refine[0]
    y = np.random.default_rng(5).uniform(-1, 1, (2, 3, *shape)).astype(np.float32)
    out = {}
    for steps, a, sigma in ((0, None, None), (2, 1.0, None), (2, 0.5, None), (2, 1.25, None), (2, 1.0, 3.0),
                            (2, 0.75, 8.0), (0, None, 8.0)):
        with Derainer(onnx, steps=steps, threads=1, batch=batch, refine_strength=a, refine_lowpass=sigma) as d:
            out[steps, a, sigma] = d.sample(y)
            assert (d.refine_strength, d.refine_lowpass) == (1.0 if a is None else a, sigma or 0.0)
    p, x0 = out[0, None, None], out[2, 1.0, None]
    assert np.abs(x0 - p).max() > 1e-2  # the refiner changes something, so the share shows
    for a in (0.5, 1.25):
        np.testing.assert_allclose(out[2, a, None], p + np.float32(a) * (x0 - p), atol=1e-6, rtol=0)
    for a, sigma in ((1.0, 3.0), (0.75, 8.0)):
        got = out[2, a, sigma]
        np.testing.assert_allclose(got, p + np.float32(a) * gaussian_blur(x0 - p, sigma), atol=1e-5, rtol=0)
        assert np.abs(got - (p + np.float32(a) * (x0 - p))).max() > 1e-2  # the low-pass shows
    np.testing.assert_array_equal(out[0, None, 8.0], p)  # 0 steps: P(y), nothing to filter


@pytest.mark.parametrize(("field", "value", "unsaid", "bad", "why"), [
    ("refine_strength", 0.5, 1.0, (0, -0.5, 2.5, float("nan"), True, "0.5"), r"must be a number in \(0, 2\]"),
    ("noise_scale", 0.0, 1.0, (-0.1, 1.5, float("nan"), True, "0"), r"must be a number in \[0, 1\]"),
    ("refine_lowpass", 4.0, 0.0, (-1.0, 65.0, float("inf"), True, "4"), r"must be a number of pixels in \[0, 64\]"),
])
def test_sampling_settings_come_from_the_manifest_and_are_checked(refine, tmp_path, tiny_model, field, value,
                                                                  unsaid, bad, why):
    """refine_strength, noise_scale and refine_lowpass: the manifest's prologue entry sets the default,
    the argument wins, unsaid means Algorithm 2's (1, 1; no low-pass, 0); bad values are refused in
    both places; a y-only model takes only Algorithm 2's value."""
    import json
    import shutil

    from runtime.errors import ManifestError

    onnx = refine[0]
    for f in onnx.parent.iterdir():
        shutil.copy(f, tmp_path / f.name)
    art = tmp_path / onnx.name
    mpath = art.with_suffix(".json")
    data = json.loads(mpath.read_text())
    data["prologue"][field] = value
    mpath.write_text(json.dumps(data))
    y = np.random.default_rng(6).uniform(-1, 1, (1, 3, 24, 30)).astype(np.float32)
    with Derainer(art, steps=2, threads=1) as d, Derainer(onnx, steps=2, threads=1, **{field: value}) as e:
        assert getattr(d, field) == value
        np.testing.assert_array_equal(d.sample(y), e.sample(y))
    with Derainer(art, steps=2, threads=1, **{field: unsaid}) as d, Derainer(onnx, steps=2, threads=1) as e:
        assert getattr(d, field) == getattr(e, field) == unsaid  # the argument wins; unsaid: Algorithm 2's
        np.testing.assert_array_equal(d.sample(y), e.sample(y))
    for v in bad:
        with pytest.raises(UsageError, match=f"{field} {why}"):
            Derainer(onnx, steps=2, threads=1, **{field: v})
        data["prologue"][field] = v
        mpath.write_text(json.dumps(data))
        with pytest.raises(ManifestError, match=f"'prologue.{field}' {why}"):
            Derainer(art, steps=2, threads=1)
    with pytest.raises(UsageError, match=f"{field} applies to predict-and-refine models"):
        Derainer(tiny_model.onnx, steps=2, threads=1, **{field: value})
    with Derainer(tiny_model.onnx, steps=2, threads=1, **{field: unsaid}) as d:  # Algorithm 2's: allowed
        assert getattr(d, field) == unsaid


# The noise scale s (x_T = s * N(0, I); the manifest's prologue.noise_scale, 0 for the shipped model,
# chosen on both dev sets: docs/quality.md). Checked against the torch reference at s = 0 and 0.5, on
# one pass and on tiles (the tiles' noise is cut from the frame's), and at s = 0 seed-independent.

@pytest.mark.parametrize("noise_scale", [0.0, 0.5])
def test_noise_scale_matches_the_torch_reference(refine, noise_scale):
    onnx, est, pro = refine
    frame = np.random.default_rng(7).integers(0, 256, (24, 30, 3), dtype=np.uint8)
    y = (frame[None].astype(np.float32) / 127.5 - 1).transpose(0, 3, 1, 2).copy()
    with Derainer(onnx, steps=3, threads=1, noise_scale=noise_scale) as d:
        assert d.noise_scale == noise_scale
        got = d.sample(y)
    np.testing.assert_allclose(got, reference(est, pro, frame[None], 3, noise_scale), atol=2e-4, rtol=0)
    assert np.abs(got - reference(est, pro, frame[None], 3)).max() > 1e-3  # s = 1 differs: s is used


@pytest.mark.parametrize("shape", [(24, 30), (70, 90)])  # one pass; tiles (the frame's noise cut per tile)
def test_noise_scale_zero_does_not_depend_on_the_seed(refine, shape):
    onnx = refine[0]
    y = np.random.default_rng(8).uniform(-1, 1, (1, 3, *shape)).astype(np.float32)
    out = {}
    for seed in (0, 1):
        for s in (0.0, 1.0):
            with Derainer(onnx, steps=2, threads=1, seed=seed, noise_scale=s) as d:
                out[seed, s] = d.sample(y)
    np.testing.assert_array_equal(out[0, 0.0], out[1, 0.0])
    assert np.abs(out[0, 1.0] - out[1, 1.0]).max() > 1e-3  # with noise the seed matters


@pytest.mark.parametrize(("field", "value", "y_only_why", "bad", "bad_why"), [
    ("refine_strength", 0.5, "only a predict-and-refine checkpoint has a refiner",
     3.0, r"refine strength must be a number in \(0, 2\]"),
    ("noise_scale", 0.0, "only a predict-and-refine checkpoint stores one", 2.0,
     r"noise scale must be a number in \[0, 1\]"),
    ("refine_lowpass", 8.0, "only a predict-and-refine checkpoint has a correction", 70.0,
     r"refine low-pass must be a number of pixels in \[0, 64\]"),
])
def test_export_stores_the_sampling_setting(refine, tmp_path, field, value, y_only_why, bad, bad_why):
    """rd-export build --refine-strength / --noise-scale / --refine-lowpass: stored in the manifest's
    prologue entry (not stored when not given), kept by derived artifacts, refused for a y-only
    checkpoint, out of range, or on an ONNX source (which keeps its manifest's)."""
    from rd_export.export import export_onnx
    from rd_export.pipeline import BuildOptions, build
    from rd_export.precision import derive_fp16
    from runtime.manifest import Manifest

    onnx = refine[0]
    ck = onnx.parent.parent / "r.pt"
    with one_torch_thread():
        art = export_onnx(ck, tmp_path / "set", steps=2, **{field: value})
        fp16 = derive_fp16(art, out=tmp_path / "set16", steps=2)
    assert Manifest.for_artifact(art).prologue[field] == value
    assert getattr(Manifest.for_artifact(fp16), field) == value  # derived artifacts keep it
    with Derainer(art, steps=2, threads=1) as d:
        assert getattr(d, field) == value
    assert field not in Manifest.for_artifact(onnx).prologue  # not given: not stored (Algorithm 2's)
    y_only = write_random_checkpoint(tmp_path / "y.pt", crop=32)
    with pytest.raises(UsageError, match=y_only_why):
        export_onnx(y_only, tmp_path / "y", steps=2, **{field: value})
    with pytest.raises(UsageError, match=bad_why):
        export_onnx(ck, tmp_path / "bad", steps=2, **{field: bad})
    flag = "--" + field.replace("_", "-")
    with pytest.raises(UsageError, match=f"{flag} is set when exporting a checkpoint"):
        build(onnx, tmp_path / "again", BuildOptions(**{field: value}, fmt="onnx"))
