"""Property tests (hypothesis) of the pure helpers: padding, pixel conversions, Y channel, manifests.

numpy only (no model, no engine); settings are modest for the shared 2-core CI box.
"""

from __future__ import annotations

import copy
import json
import math
import string
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime.derainer import Derainer, pad_reflect, to_float, to_uint8
from runtime.descriptor import ShapeProfile, StepDescriptor
from runtime.errors import ManifestError
from runtime.manifest import _OPTIONAL, _REQUIRED, FORMATS, MODELS, PRECISIONS, Manifest
from runtime.metrics import rgb_to_y

SETTINGS = settings(max_examples=80, deadline=None, derandomize=True)


def _next_multiple(n: int, m: int) -> int:
    return -(-n // m) * m


# ============================================================================ (a) pad / crop


@st.composite
def pad_case(draw):
    h, w = draw(st.integers(1, 70)), draw(st.integers(1, 70))
    m = draw(st.sampled_from([1, 8, 32]))
    lead = draw(st.sampled_from([(), (3,), (2, 3)]))
    seed = draw(st.integers(0, 2**32 - 1))
    x = np.random.default_rng(seed).standard_normal((*lead, h, w)).astype(np.float32)
    return x, m


@SETTINGS
@given(pad_case())
def test_pad_reflect_then_crop_round_trips(case):
    x, m = case
    h, w = x.shape[-2:]
    hp, wp = _next_multiple(h, m), _next_multiple(w, m)
    y = pad_reflect(x, hp, wp)
    assert y.shape == (*x.shape[:-2], hp, wp), "padded to the next multiple"
    assert y.shape[-2] % m == 0 and y.shape[-1] % m == 0 and y.shape[-2] - h < m and y.shape[-1] - w < m
    assert y.dtype == x.dtype
    np.testing.assert_array_equal(y[..., :h, :w], x)  # crop back: exact
    # Padding only repeats existing rows / columns (reflection, or replication of a 1-pixel side).
    rows = {x[..., i, :].tobytes() for i in range(h)}
    assert all(y[..., i, :w].tobytes() in rows for i in range(hp))
    cols = {x[..., :, j].tobytes() for j in range(w)}
    assert all(y[..., :h, j].tobytes() in cols for j in range(wp))


@SETTINGS
@given(st.integers(2, 40), st.integers(1, 40))
def test_pad_reflect_first_round_is_a_mirror(h, extra):
    x = np.arange(h, dtype=np.float32)[:, None] * np.ones((1, 3), np.float32)
    y = pad_reflect(x, h + extra, 3)
    k = min(extra, h - 1)
    np.testing.assert_array_equal(y[h:h + k, 0], x[h - 2::-1, 0][:k])  # numpy "reflect" (edge not repeated)


def test_pad_reflect_refuses_to_shrink():
    with pytest.raises(ValueError, match="cannot pad"):
        pad_reflect(np.zeros((4, 4), np.float32), 3, 4)


# ============================================================================ (b) colour conversions


def test_to_float_to_uint8_round_trip_exact_for_every_uint8_value():
    u8 = np.arange(256, dtype=np.uint8).reshape(16, 16, 1).repeat(3, axis=2)
    x = to_float(u8)
    assert x.dtype == np.float32 and x.shape == (3, 16, 16)
    assert x.min() == -1.0 and x.max() == 1.0
    np.testing.assert_array_equal(to_uint8(x), u8)


@st.composite
def u8_frames(draw):
    lead = draw(st.sampled_from([(), (1,), (2,)]))
    h, w = draw(st.integers(1, 12)), draw(st.integers(1, 12))
    seed = draw(st.integers(0, 2**32 - 1))
    return np.random.default_rng(seed).integers(0, 256, (*lead, h, w, 3), dtype=np.uint8)


@SETTINGS
@given(u8_frames())
def test_to_float_layout_and_round_trip(frames):
    x = to_float(frames)
    assert x.shape == (*frames.shape[:-3], 3, *frames.shape[-3:-1]) and x.flags.c_contiguous
    assert np.all((x >= -1) & (x <= 1))
    np.testing.assert_array_equal(np.moveaxis(x, -3, -1), frames.astype(np.float32) / np.float32(127.5) - 1)
    back = to_uint8(x)
    assert back.dtype == np.uint8 and back.flags.c_contiguous
    np.testing.assert_array_equal(back, frames)


@SETTINGS
@given(st.lists(st.floats(allow_nan=False, width=32), min_size=3, max_size=24).filter(lambda v: len(v) % 3 == 0))
def test_to_uint8_clips_and_rounds(values):
    x = np.asarray(values, np.float32).reshape(3, 1, -1)
    y = to_uint8(x)
    ref = np.clip(np.round((x.astype(np.float64) + 1) * 127.5), 0, 255)
    assert np.all(np.abs(np.moveaxis(y, -1, -3).astype(np.float64) - ref) <= 1)  # float32 vs float64 only
    assert y.dtype == np.uint8


def _fake_derainer(transform):
    """Enough of a Derainer for ``_derain_group``: ``sample`` maps float [N,3,H,W] -> float."""
    return SimpleNamespace(sample=transform)


def _boost_channel0(cond: np.ndarray) -> np.ndarray:
    out = cond.copy()
    out[:, 0] = np.minimum(out[:, 0] + np.float32(0.5), 1)  # only the model's R (RGB channel 0)
    return out


@SETTINGS
@given(u8_frames().map(lambda f: f if f.ndim == 4 else f[None]))
def test_bgr_handling_round_trips(frames):
    group = Derainer._derain_group
    identity = _fake_derainer(lambda c: c)
    for bgr in (False, True):
        out = group(identity, frames, bgr=bgr)
        np.testing.assert_array_equal(out, frames)  # identity model: same frame, same channel order
        assert out.flags.c_contiguous
    model = _fake_derainer(_boost_channel0)
    rgb_out = group(model, frames, bgr=False)
    bgr_out = group(model, np.ascontiguousarray(frames[..., ::-1]), bgr=True)
    np.testing.assert_array_equal(bgr_out, rgb_out[..., ::-1])  # BGR in -> same result, BGR out
    np.testing.assert_array_equal(bgr_out[..., :2], frames[..., ::-1][..., :2])  # B and G untouched
    assert np.all(bgr_out[..., 2] >= frames[..., 0])  # the model saw R in BGR's last channel


def _y_exact(img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """BT.601 studio-range Y in exact integer arithmetic: (value rounded half up, is-exact-tie)."""
    r, g, b = (img[..., i].astype(np.int64) for i in range(3))
    n = 65481 * r + 128553 * g + 24966 * b  # 1000 * (65.481 R + 128.553 G + 24.966 B)
    return 16 + (2 * n + 255000) // 510000, n % 255000 == 127500


@settings(max_examples=60, deadline=None, derandomize=True)
@given(u8_frames().map(lambda f: f.reshape(-1, f.shape[-2], 3)))
def test_rgb_to_y_matches_bt601_and_stays_in_studio_range(img):
    y = rgb_to_y(img)
    assert y.shape == img.shape[:2] and y.dtype == np.float64
    assert np.all((y >= 16) & (y <= 235)) and np.all(y == np.round(y))
    ref, tie = _y_exact(img)
    np.testing.assert_array_equal(y[~tie], ref[~tie])
    assert np.all((y[tie] == ref[tie]) | (y[tie] == ref[tie] - 1))  # an exact .5: either neighbour


def test_rgb_to_y_exhaustive_and_extremes():
    """All 2**24 colours, one red value at a time (about 1 s): exact away from .5 ties, 16..235."""
    assert rgb_to_y(np.zeros((1, 1, 3), np.uint8))[0, 0] == 16
    assert rgb_to_y(np.full((1, 1, 3), 255, np.uint8))[0, 0] == 235
    g, b = np.meshgrid(np.arange(256), np.arange(256), indexing="ij")
    ties = 0
    for r in range(256):
        img = np.stack([np.full_like(g, r), g, b], axis=-1).astype(np.uint8)
        y = rgb_to_y(img)
        ref, tie = _y_exact(img)
        assert y.min() >= 16 and y.max() <= 235
        assert np.array_equal(y[~tie], ref[~tie]), f"R={r}"
        ties += int(tie.sum())
    assert ties == 194  # exact .5 values of the formula; float rounding decides those either way


def test_rgb_to_y_refuses_non_uint8_rgb():
    for bad in (np.zeros((2, 2, 3), np.float32), np.zeros((2, 2), np.uint8), np.zeros((2, 2, 4), np.uint8)):
        with pytest.raises(ValueError, match="HxWx3 uint8"):
            rgb_to_y(bad)


# ============================================================================ (c) manifests

json_scalars = (st.none() | st.booleans() | st.integers(-(2**70), 2**70)
                | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12))
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=10), inner, max_size=4), max_leaves=12)


def _valid_manifest_dict(size_multiple: int = 8) -> dict:
    m = size_multiple
    prof = ShapeProfile(min_batch=1, opt_batch=2, max_batch=4, min_size=(m, m), opt_size=(4 * m, 4 * m),
                        max_size=(16 * m, 16 * m))
    return {
        "schema_version": 1, "toolkit_version": "0.1.0", "artifact": "model.onnx", "format": "onnx",
        "precision": "fp32", "model": "derain", "sha256": "ab" * 32,
        "descriptor": StepDescriptor(size_multiple=m, profile=prof).to_dict(),
        "schedule": {"num_train_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02, "default_steps": 10},
        "model_config": {"unet": {"base_channels": 8}},
    }


def _from_dict_only_manifest_errors(d) -> Manifest | None:
    try:
        m = Manifest.from_dict(d)
    except ManifestError as e:
        assert "\n" not in str(e)
        return None
    assert isinstance(m, Manifest)
    return m


@SETTINGS
@given(json_values)
def test_from_dict_random_json_gives_manifest_or_manifest_error(value):
    _from_dict_only_manifest_errors(value)


# Paths into a valid manifest (top level, and inside descriptor / profile / schedule) to mutate.
_PATHS = ([(k,) for k in _REQUIRED] + [(k,) for k in _OPTIONAL]
          + [("descriptor", k) for k in ("size_multiple", "channels", "opset", "profile")]
          + [("descriptor", "profile", k) for k in ("min_batch", "opt_batch", "max_batch", "min_size",
                                                     "opt_size", "max_size")]
          + [("schedule", k) for k in ("num_train_timesteps", "beta_start", "beta_end", "default_steps")])


@st.composite
def mutated_manifest(draw):
    d = _valid_manifest_dict(draw(st.sampled_from([1, 8, 32])))
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(_PATHS))
        parent = d
        for key in path[:-1]:
            parent = parent.get(key) if isinstance(parent, dict) else None
            if not isinstance(parent, dict):
                break
        else:
            if draw(st.booleans()) and path[-1] in parent:
                del parent[path[-1]]
            else:
                parent[path[-1]] = draw(json_values | st.lists(st.integers(-64, 300), max_size=3)
                                        | st.integers(-3, 300))
    return d


@settings(max_examples=150, deadline=None, derandomize=True)
@given(mutated_manifest())
def test_from_dict_mutated_manifest_gives_manifest_or_manifest_error(d):
    m = _from_dict_only_manifest_errors(d)
    if m is not None:  # whatever validates must be usable by the runtime
        desc = m.step_descriptor
        assert desc.size_multiple >= 1 and desc.channels >= 1
        desc.profile.validate(desc.size_multiple)
        assert m.default_steps >= 1
        assert math.isfinite(m.schedule["beta_start"]) and math.isfinite(m.schedule["beta_end"])


def test_from_dict_json_text_edge_cases():
    """Values only JSON text can carry (NaN / Infinity / huge ints) through Manifest.load's parser."""
    for key, text in (("size_multiple", "Infinity"), ("size_multiple", "NaN"), ("size_multiple", "0"),
                      ("size_multiple", "-8"), ("channels", "0"), ("opset", "1e400")):
        d = _valid_manifest_dict()
        d["descriptor"][key] = json.loads(text)
        with pytest.raises(ManifestError, match=f"descriptor.{key}|descriptor"):
            Manifest.from_dict(d)
    d = _valid_manifest_dict()
    d["descriptor"]["profile"]["min_size"] = [8]
    with pytest.raises(ManifestError, match="min_size"):
        Manifest.from_dict(d)
    for key in ("beta_start", "beta_end"):
        d = _valid_manifest_dict()
        d["schedule"][key] = float("nan")
        with pytest.raises(ManifestError, match=f"schedule.{key}"):
            Manifest.from_dict(d)


def test_load_hostile_json_is_a_manifest_error(tmp_path):
    path = tmp_path / "model.json"
    for text in ("[" * 100_000, "1" * 5000, '{"a": ' + "9" * 5000 + "}", "\ud800"):
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
        with pytest.raises(ManifestError, match=r"model\.json"):
            Manifest.load(path)
    path.write_bytes(b"\xff\xfe{}")
    with pytest.raises(ManifestError, match="not valid JSON"):
        Manifest.load(path)


hex64 = st.text(alphabet="0123456789abcdef", min_size=64, max_size=64)
plain_name = st.text(alphabet=string.ascii_letters + string.digits + "._-", min_size=1, max_size=20).filter(
    lambda s: s not in (".", ".."))
finite_json = st.recursive(st.none() | st.booleans() | st.integers(-(2**40), 2**40)
                           | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                                        max_size=3), max_leaves=8)


@st.composite
def valid_manifest(draw):
    m = draw(st.sampled_from([1, 4, 8, 32]))
    lo = [m * draw(st.integers(1, 4)) for _ in range(2)]
    opt = [v + m * draw(st.integers(0, 4)) for v in lo]
    hi = [v + m * draw(st.integers(0, 4)) for v in opt]
    b = sorted(draw(st.lists(st.integers(1, 8), min_size=3, max_size=3)))
    prof = ShapeProfile(min_batch=b[0], opt_batch=b[1], max_batch=b[2], min_size=tuple(lo), opt_size=tuple(opt),
                        max_size=tuple(hi))
    beta_start = draw(st.floats(1e-6, 1e-2))
    num_train = draw(st.integers(2, 2000))
    extra = {}
    artifact = draw(plain_name)
    refines = draw(st.booleans())  # predict-and-refine: a 6-channel cond and its prologue entry go together
    if refines:
        extra["prologue"] = {"artifact": draw(plain_name.filter(lambda n: n != artifact)), "sha256": draw(hex64)}
    for key, types in _OPTIONAL.items():
        if key != "prologue" and draw(st.booleans()):
            kind = types[0]
            extra[key] = draw(st.text(max_size=10) if kind is str else
                              st.lists(finite_json, max_size=3) if kind is list else
                              st.dictionaries(st.text(max_size=6), finite_json, max_size=3))
    extra.update(draw(st.dictionaries(st.text(max_size=8).filter(lambda k: k not in _REQUIRED and k not in _OPTIONAL),
                                      finite_json, max_size=2)))
    return Manifest(
        artifact=artifact, format=draw(st.sampled_from(FORMATS)), precision=draw(st.sampled_from(PRECISIONS)),
        model=draw(st.sampled_from(MODELS)), sha256=draw(hex64),
        descriptor=StepDescriptor(size_multiple=m, profile=prof, cond_channels=6 if refines else 3).to_dict(),
        schedule={"num_train_timesteps": num_train, "beta_start": beta_start,
                  "beta_end": beta_start + draw(st.floats(0, 0.1)), "default_steps": draw(st.integers(2, num_train))},
        model_config=draw(st.dictionaries(st.text(max_size=6), finite_json, max_size=3)),
        toolkit_version=draw(st.text(max_size=10)), schema_version=1, extra=extra,
    )


@SETTINGS
@given(valid_manifest())
def test_valid_manifest_round_trips(m):
    d = m.to_dict()
    again = Manifest.from_dict(d)
    assert again == m
    assert again.to_dict() == d
    via_json = Manifest.from_dict(json.loads(json.dumps(d)))  # what save / load do
    assert via_json.to_dict() == json.loads(json.dumps(d))


def _wrong_type_values(types: tuple[type, ...]):
    def wrong(v) -> bool:
        return isinstance(v, bool) or not isinstance(v, types)

    return json_values.filter(wrong)


@SETTINGS
@given(st.sampled_from(sorted(_REQUIRED)), st.data())
def test_required_field_of_wrong_type_is_named(key, data):
    d = _valid_manifest_dict()
    d[key] = data.draw(_wrong_type_values(_REQUIRED[key]), label=key)
    with pytest.raises(ManifestError, match=f"'{key}'"):
        Manifest.from_dict(d)


@pytest.mark.parametrize("key", sorted(_REQUIRED))
def test_missing_required_field_is_named(key):
    d = _valid_manifest_dict()
    del d[key]
    with pytest.raises(ManifestError, match=f"'{key}'"):
        Manifest.from_dict(d)


@SETTINGS
@given(st.sampled_from(sorted(_OPTIONAL)), st.data())
def test_optional_field_of_wrong_type_is_named(key, data):
    d = _valid_manifest_dict()
    d[key] = data.draw(_wrong_type_values(_OPTIONAL[key]).filter(lambda v: v is not None), label=key)
    with pytest.raises(ManifestError, match=f"'{key}'"):
        Manifest.from_dict(d)


def test_sha256_must_be_hex():
    d = _valid_manifest_dict()
    d["sha256"] = "z" * 64
    with pytest.raises(ManifestError, match="'sha256'"):
        Manifest.from_dict(d)


def test_valid_manifest_dict_is_valid():
    d = _valid_manifest_dict()
    assert Manifest.from_dict(copy.deepcopy(d)).to_dict() == d
