"""Unpaired data loading: corrupt files, small images, determinism and resumable order."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from runtime.errors import InputError
from training.data import UnpairedSampler, load_folder


def write(folder, name, arr):
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(folder / name)


def images(n, h=40, w=48, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for _ in range(n)]


def test_corrupt_file_skipped_with_one_warning(tmp_path):
    for i, im in enumerate(images(3)):
        write(tmp_path, f"{i}.png", im)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.warns(UserWarning) as rec:
        imgs, paths = load_folder(tmp_path)
    msgs = [str(w.message) for w in rec]
    assert len(msgs) == 2
    assert any("broken.png" in m for m in msgs) and any("empty.jpg" in m for m in msgs)
    assert len(imgs) == 3 and [p.name for p in paths] == ["0.png", "1.png", "2.png"]


def test_folder_without_images_raises(tmp_path):
    (tmp_path / "a.png").write_bytes(b"nope")
    with pytest.warns(UserWarning), pytest.raises(InputError, match="no readable images"):
        load_folder(tmp_path)


def test_small_images_are_upscaled(tmp_path):
    write(tmp_path / "c", "tiny.png", images(1, 20, 30)[0])
    write(tmp_path / "r", "tall.png", images(1, 100, 10)[0])
    clean, _ = load_folder(tmp_path / "c", min_side=32)
    rainy, _ = load_folder(tmp_path / "r", min_side=32)
    assert clean[0].shape == (32, 48, 3)  # shorter side -> crop, aspect kept
    assert rainy[0].shape == (320, 32, 3)
    s = UnpairedSampler(clean, rainy, batch=3, crop=32, seed=0)
    x, y = s.next_batch()
    assert x.shape == y.shape == (3, 3, 32, 32)
    assert x.dtype == torch.float32 and -1 <= float(x.min()) and float(x.max()) <= 1


def test_order_is_deterministic_per_seed_and_rank():
    clean, rainy = images(5, seed=1), images(7, seed=2)

    def draws(seed, rank=0, n=4):
        s = UnpairedSampler(clean, rainy, batch=2, crop=16, seed=seed, rank=rank)
        return torch.cat([torch.cat(s.next_batch()) for _ in range(n)])

    assert torch.equal(draws(0), draws(0))
    assert not torch.equal(draws(0), draws(1))
    assert not torch.equal(draws(0, rank=0), draws(0, rank=1))


def test_every_image_once_per_epoch():
    clean = [np.full((16, 16, 3), i, np.uint8) for i in range(5)]
    s = UnpairedSampler(clean, clean, batch=5, crop=16, seed=3)
    x, _ = s.next_batch()
    seen = sorted(round(float((v[0, 0, 0] + 1) * 127.5)) for v in x)
    assert seen == [0, 1, 2, 3, 4]


def test_state_dict_resumes_the_same_stream():
    clean, rainy = images(3, seed=1), images(4, seed=2)
    a = UnpairedSampler(clean, rainy, batch=2, crop=16, seed=0)
    ref = [a.next_batch() for _ in range(5)]
    b = UnpairedSampler(clean, rainy, batch=2, crop=16, seed=0)
    for _ in range(2):
        b.next_batch()
    state = b.state_dict()
    buf = io.BytesIO()  # the state must be plain data: round-trip it through weights_only
    torch.save(state, buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    c = UnpairedSampler(clean, rainy, batch=2, crop=16, seed=123)  # seed is overridden by the state
    c.load_state_dict(state)
    assert c.position == 2
    for i in range(2, 5):
        x, y = c.next_batch()
        assert torch.equal(x, ref[i][0]) and torch.equal(y, ref[i][1])
