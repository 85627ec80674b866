"""Image robustness (issue 7): every odd file the loader can meet, one test each.

Each bad file must raise :class:`ImageError` (an :class:`InputError`, exit code 3) naming the
file; each odd but valid file must load as HxWx3 uint8 RGB with alpha / bit depth reported.
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from runtime.errors import ImageError, InputError
from runtime.io import atomic_path, atomic_write_bytes, iter_image_files, load_image, load_rgb, save_image


def _png_bytes(w: int, h: int, bit_depth: int, color_type: int, rows: bytes) -> bytes:
    """A PNG written chunk by chunk, so we control bit depth and can lie in the header."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, bit_depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def _png16(w: int, h: int, channels: int, value: int) -> bytes:
    color_type = {1: 0, 2: 4, 3: 2, 4: 6}[channels]
    row = b"\x00" + np.full((w, channels), value, ">u2").tobytes()
    return _png_bytes(w, h, 16, color_type, row * h)


def _gradient(h: int = 24, w: int = 32) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), (x + y) % 256], -1).astype(np.uint8)


def _write(tmp_path: Path, name: str, img: Image.Image, **kw) -> Path:
    p = tmp_path / name
    img.save(p, **kw)
    return p


# ----------------------------------------------------------------------------- bad files


def test_truncated_jpeg_is_image_error(tmp_path):
    good = _write(tmp_path, "good.jpg", Image.fromarray(_gradient(64, 64)), quality=90)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ImageError, match=r"bad\.jpg"):
        load_image(bad)


def test_truncated_png_is_image_error(tmp_path):
    good = _write(tmp_path, "good.png", Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3),
                                                                                         dtype=np.uint8)))
    bad = tmp_path / "bad.png"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ImageError, match=r"bad\.png"):
        load_image(bad)


def test_zero_byte_file(tmp_path):
    p = tmp_path / "empty.png"
    p.write_bytes(b"")
    with pytest.raises(ImageError, match="empty file"):
        load_image(p)


def test_text_file_named_png(tmp_path):
    p = tmp_path / "notes.png"
    p.write_text("this is not an image\n")
    with pytest.raises(ImageError, match=r"notes\.png: not a readable image"):
        load_image(p)


def test_missing_file_and_directory_are_input_errors(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        load_image(tmp_path / "nope.png")
    with pytest.raises(InputError, match="directory"):
        load_image(tmp_path)


def test_pixel_limit_is_configurable(tmp_path):
    p = _write(tmp_path, "big.png", Image.new("RGB", (200, 100)))
    with pytest.raises(ImageError, match=r"200x100 = 20000 pixels exceeds the limit of 19999"):
        load_image(p, max_pixels=19_999)
    assert load_image(p, max_pixels=20_000).rgb.shape == (100, 200, 3)
    assert load_image(p, max_pixels=0).rgb.shape == (100, 200, 3)  # 0 = no limit


def test_decompression_bomb_refused_from_the_header(tmp_path):
    # A 100k x 100k header over a few bytes of data: must be refused before any decoding
    # (decoding it would need 30 GB), with the default limit and not only Pillow's.
    p = tmp_path / "bomb.png"
    p.write_bytes(_png_bytes(100_000, 100_000, 8, 2, b"\x00" * 16))
    with pytest.raises(ImageError, match=r"bomb\.png: 100000x100000 = 10000000000 pixels exceeds"):
        load_image(p)


def test_raised_limit_is_not_capped_by_pillow(tmp_path):
    # Pillow alone refuses > 2 * MAX_IMAGE_PIXELS at open time; a caller's higher limit must win
    # (we only check the header here: the lie in the IDAT then shows up as a decode error).
    p = tmp_path / "wide.png"
    p.write_bytes(_png_bytes(20_000, 10_000, 8, 0, b"\x00" * 16))
    assert 20_000 * 10_000 > 2 * Image.MAX_IMAGE_PIXELS
    with pytest.raises(ImageError) as info:
        load_image(p, max_pixels=300_000_000)
    assert "exceeds the limit" not in str(info.value) and "DecompressionBomb" not in str(info.value)
    assert Image.MAX_IMAGE_PIXELS == 89_478_485  # Pillow's global restored


# ----------------------------------------------------------------------------- odd but valid


def test_one_by_one(tmp_path):
    p = _write(tmp_path, "px.png", Image.new("RGB", (1, 1), (10, 20, 30)))
    li = load_image(p)
    assert li.rgb.shape == (1, 1, 3) and li.rgb.dtype == np.uint8
    assert li.rgb[0, 0].tolist() == [10, 20, 30]


def test_extreme_aspect_ratio(tmp_path):
    p = _write(tmp_path, "strip.png", Image.new("RGB", (500, 1), (1, 2, 3)))
    assert load_rgb(p).shape == (1, 500, 3)
    p = _write(tmp_path, "column.png", Image.new("RGB", (1, 500), (1, 2, 3)))
    assert load_rgb(p).shape == (500, 1, 3)


def test_grayscale_l(tmp_path):
    p = _write(tmp_path, "gray.png", Image.fromarray(np.arange(48, dtype=np.uint8).reshape(6, 8), "L"))
    li = load_image(p)
    assert li.rgb.shape == (6, 8, 3) and li.grayscale and li.alpha is None and not li.high_bit_depth
    assert (li.rgb[..., 0] == li.rgb[..., 2]).all() and li.rgb[1, 0, 0] == 8


def test_palette_p(tmp_path):
    img = Image.fromarray(_gradient()).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    p = _write(tmp_path, "pal.png", img)
    li = load_image(p)
    assert li.mode == "P" and li.rgb.shape == (24, 32, 3) and li.alpha is None and not li.grayscale
    np.testing.assert_array_equal(li.rgb, np.asarray(img.convert("RGB")))


def test_palette_with_transparency_gets_alpha(tmp_path):
    img = Image.new("P", (4, 4), 1)
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    img.putpixel((0, 0), 0)
    p = _write(tmp_path, "ptrans.png", img, transparency=0)
    li = load_image(p)
    assert li.alpha is not None and li.alpha[0, 0] == 0 and li.alpha[1, 1] == 255


def test_rgba_alpha_kept(tmp_path):
    rgba = np.dstack([_gradient(), np.tile(np.arange(32, dtype=np.uint8) * 8, (24, 1))])
    p = _write(tmp_path, "rgba.png", Image.fromarray(rgba, "RGBA"))
    li = load_image(p)
    np.testing.assert_array_equal(li.rgb, rgba[..., :3])
    np.testing.assert_array_equal(li.alpha, rgba[..., 3])
    # and it survives a save round trip untouched
    out = save_image(tmp_path / "out.png", li.rgb, alpha=li.alpha)
    np.testing.assert_array_equal(np.asarray(Image.open(out)), rgba)


def test_la_alpha_kept(tmp_path):
    la = np.dstack([np.full((5, 7), 100, np.uint8), np.arange(35, dtype=np.uint8).reshape(5, 7)])
    p = _write(tmp_path, "la.png", Image.fromarray(la, "LA"))
    li = load_image(p)
    assert li.grayscale and li.rgb.shape == (5, 7, 3) and (li.rgb == 100).all()
    np.testing.assert_array_equal(li.alpha, la[..., 1])


def test_cmyk_jpeg(tmp_path):
    p = _write(tmp_path, "cmyk.jpg", Image.new("CMYK", (16, 8), (0, 255, 255, 0)), quality=95)
    li = load_image(p)
    assert li.mode == "CMYK" and li.rgb.shape == (8, 16, 3)
    r, g, b = li.rgb[4, 8].tolist()
    assert r > 200 and g < 60 and b < 60  # cyan 0, magenta+yellow full = red


def test_16bit_grayscale_flagged(tmp_path):
    p = tmp_path / "g16.png"
    p.write_bytes(_png16(4, 3, 1, 40_000))
    li = load_image(p)
    assert li.high_bit_depth and li.grayscale and li.mode.startswith("I;16")
    assert li.rgb.shape == (3, 4, 3) and li.rgb.dtype == np.uint8
    assert li.rgb[0, 0, 0] == round(40_000 / 65535 * 255)


def test_16bit_grayscale_pillow_i16(tmp_path):
    p = _write(tmp_path, "i16.tif", Image.fromarray(np.full((3, 4), 65535, np.uint16)))
    li = load_image(p)
    assert li.high_bit_depth and (li.rgb == 255).all()


def test_48bit_png_flagged(tmp_path):
    # Pillow opens this as 8-bit "RGB": the flag must come from the decoder's raw mode.
    p = tmp_path / "rgb48.png"
    p.write_bytes(_png16(4, 3, 3, 40_000))
    li = load_image(p)
    assert li.high_bit_depth and not li.grayscale and li.alpha is None
    assert li.rgb.shape == (3, 4, 3) and abs(int(li.rgb[0, 0, 0]) - 156) <= 1


def test_64bit_rgba_png_flagged_alpha_kept(tmp_path):
    p = tmp_path / "rgba64.png"
    p.write_bytes(_png16(4, 3, 4, 40_000))
    li = load_image(p)
    assert li.high_bit_depth and li.alpha is not None and li.alpha.shape == (3, 4)


def test_8bit_files_not_flagged(tmp_path):
    for name in ("a.png", "a.jpg", "a.bmp", "a.tif"):
        li = load_image(_write(tmp_path, name, Image.fromarray(_gradient())))
        assert not li.high_bit_depth and not li.grayscale, name


def _jpeg_with_orientation(path: Path, orientation: int) -> None:
    # stored 64 wide x 32 tall: left half red, right half blue
    arr = np.zeros((32, 64, 3), np.uint8)
    arr[:, :32] = (255, 0, 0)
    arr[:, 32:] = (0, 0, 255)
    img = Image.fromarray(arr)
    exif = img.getexif()
    exif[0x0112] = orientation
    img.save(path, exif=exif.tobytes(), quality=95)


def test_exif_orientation_applied_exactly_once(tmp_path):
    p = tmp_path / "rot.jpg"
    _jpeg_with_orientation(p, 6)  # 6 = display rotated 90 degrees clockwise
    li = load_image(p)
    assert li.rgb.shape == (64, 32, 3)  # portrait after rotation
    top, bottom = li.rgb[8, 16].tolist(), li.rgb[56, 16].tolist()
    assert top[0] > 200 and top[2] < 60  # the stored left (red) half is now on top
    assert bottom[2] > 200 and bottom[0] < 60
    # Saving the upright pixels and reading them back must not rotate a second time.
    out = save_image(tmp_path / "out.jpg", li.rgb)
    again = load_image(out)
    assert again.rgb.shape == (64, 32, 3)
    assert again.rgb[8, 16, 0] > 200


# ----------------------------------------------------------------------------- writing


def test_save_grayscale_2d(tmp_path):
    g = np.arange(12, dtype=np.uint8).reshape(3, 4)
    out = save_image(tmp_path / "g.png", g)
    with Image.open(out) as img:
        assert img.mode == "L"
        np.testing.assert_array_equal(np.asarray(img), g)
    out = save_image(tmp_path / "ga.jpg", g, alpha=np.zeros_like(g))  # JPEG drops the alpha
    with Image.open(out) as img:
        assert img.mode == "L"


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    dest = tmp_path / "sub" / "x.bin"
    with pytest.raises(KeyboardInterrupt), atomic_path(dest) as tmp:
        tmp.write_bytes(b"partial")
        raise KeyboardInterrupt
    assert list((tmp_path / "sub").iterdir()) == []
    atomic_write_bytes(dest, b"done")
    assert dest.read_bytes() == b"done" and sorted(p.name for p in dest.parent.iterdir()) == ["x.bin"]


def test_iter_image_files_skips_hidden_and_other(tmp_path):
    for name in ("b.png", "a.JPG", ".hidden.png", "notes.txt", ".x.abc.tmp.png"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "dir.png").mkdir()
    assert [p.name for p in iter_image_files(tmp_path)] == ["a.JPG", "b.png"]


def test_loader_does_not_leak_warnings(tmp_path, recwarn):
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, "PNG")
    p = tmp_path / "ok.png"
    p.write_bytes(buf.getvalue())
    load_image(p)
    assert not [w for w in recwarn if issubclass(w.category, Image.DecompressionBombWarning)]


def test_atomic_outputs_get_normal_permissions(tmp_path):
    import os

    mask = os.umask(0o022)
    os.umask(mask)
    out = save_image(tmp_path / "perm.png", np.zeros((2, 2, 3), np.uint8))
    assert out.stat().st_mode & 0o777 == 0o666 & ~mask  # not mkstemp's 0600


# --------------------------------------------------------------------------- field test (issue 21)


def test_metadata_is_read_with_the_orientation_reset(tmp_path):
    from runtime.io import ImageMetadata

    p = tmp_path / "rot.jpg"
    arr = np.zeros((32, 64, 3), np.uint8)
    img = Image.fromarray(arr)
    exif = img.getexif()
    exif[0x0112], exif[0x010F] = 6, "RainCam"
    img.save(p, exif=exif.tobytes(), dpi=(240, 240), quality=95)
    li = load_image(p)
    assert li.rgb.shape == (64, 32, 3)  # rotated once, although the metadata was read first
    assert isinstance(li.metadata, ImageMetadata) and li.metadata.icc_profile is None
    read = Image.Exif()
    read.load(li.metadata.exif)
    assert read[0x0112] == 1 and read[0x010F] == "RainCam"
    assert li.metadata.dpi == (240, 240) and li.n_frames == 1 and li.format == "JPEG"


def test_a_malformed_exif_block_is_dropped_not_fatal(tmp_path):
    p = tmp_path / "bad_exif.jpg"
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(p, exif=b"Exif\x00\x00II*\x00\xff\xff\xff\x7f", quality=95)
    li = load_image(p)
    assert li.rgb.shape == (4, 4, 3) and li.metadata.exif is None
    assert li.metadata.unreadable and li.metadata.unreadable[0].startswith("EXIF: malformed")


def test_missing_reason_tells_loops_and_broken_links_from_missing_files(tmp_path):
    import os

    from runtime.io import missing_reason

    os.symlink("b.png", tmp_path / "a.png")
    os.symlink("a.png", tmp_path / "b.png")
    (tmp_path / "gone.png").symlink_to(tmp_path / "nothing.png")
    assert "symbolic link loop" in missing_reason(tmp_path / "a.png")
    assert f"broken symbolic link (its target {tmp_path / 'nothing.png'} does not exist)" in missing_reason(
        tmp_path / "gone.png")
    assert missing_reason(tmp_path / "none.png").endswith("no such file or directory")
    with pytest.raises(InputError, match="symbolic link loop"):
        load_image(tmp_path / "a.png")


def test_own_temporary_recognises_atomic_paths_names_only(tmp_path):
    from runtime.io import own_temporary

    with atomic_path(tmp_path / "img00.jpg") as tmp:
        assert own_temporary(tmp.name) == "img00.jpg"
        tmp.write_bytes(b"x")
    assert own_temporary(".my.photo.a1b2c3d4.tmp.png") == "my.photo.png"
    for name in (".notes.tmp.txt", "img.abcdefgh.tmp.jpg", ".img.ABCDEFGH.tmp.jpg", ".img.abc.tmp.jpg", ".keep"):
        assert own_temporary(name) is None, name


def test_before_replace_runs_on_the_finished_file_and_can_cancel(tmp_path):
    seen = []
    with atomic_path(tmp_path / "a.bin", before_replace=lambda t: seen.append(t.read_bytes())) as tmp:
        tmp.write_bytes(b"done")
    assert seen == [b"done"] and (tmp_path / "a.bin").read_bytes() == b"done"

    def refuse(t):
        raise RuntimeError("no")

    with pytest.raises(RuntimeError), atomic_path(tmp_path / "b.bin", before_replace=refuse) as tmp:
        tmp.write_bytes(b"x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin"]


def test_load_frames_reads_every_frame_and_limits_their_pixels_together(tmp_path):
    from runtime.io import load_frames

    frames = [Image.fromarray(np.full((10, 10, 3), 20 * i, np.uint8)) for i in range(3)]
    p = tmp_path / "pages.tif"
    frames[0].save(p, save_all=True, append_images=frames[1:])
    assert load_image(p).n_frames == 3
    lf = load_frames(p)
    assert [int(f.rgb[0, 0, 0]) for f in lf.frames] == [0, 20, 40] and lf.format == "TIFF"
    with pytest.raises(ImageError, match="3 frames of 10x10 exceed the limit of 250 pixels in all"):
        load_frames(p, max_pixels=250)  # each frame (100 px) is under the limit, all three are not


# --------------------------------------------------------------------------- interrupts in bookkeeping

_DEFERRAL_SCRIPT = """
import os, signal, sys, threading
from runtime.io import interrupt, signals_deferred

class StopError(Exception):
    pass

def raise_stop(signum, frame):
    interrupt(StopError())  # what the CLIs' handlers do

signal.signal(signal.SIGTERM, raise_stop)
stop = threading.Event()
worker = threading.Thread(target=stop.wait)  # an engine's thread pool: the kernel may pick any thread
worker.start()
reached = []
for _ in range(20):
    reached.clear()
    try:
        with signals_deferred():
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(2000):  # many bytecodes: an undeferred handler would have run here
                pass
            with signals_deferred():  # nested: delivered at the end of the outermost block
                pass
            reached.append("end of block")
    except StopError:
        assert reached == ["end of block"], reached
    else:
        sys.exit("not delivered after the block")
try:  # outside a block the handler raises at once, as before
    os.kill(os.getpid(), signal.SIGTERM)
    for _ in range(2000):
        pass
    sys.exit("not delivered outside a block")
except StopError:
    pass
stop.set()
worker.join()
print("ok")
"""


def test_signals_deferred_delivers_after_the_block():
    """In a fresh process: the pytest process holds native libraries' threads (OpenVINO, torch)
    under which a SIGTERM sent to itself crashed it (not the runtime's processes: measured)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "-c", _DEFERRAL_SCRIPT], cwd=root, capture_output=True, text=True,
                       timeout=60, env={**os.environ, "PYTHONPATH": str(root)})
    assert r.returncode == 0 and r.stdout.strip() == "ok", (r.returncode, r.stdout, r.stderr)


def test_output_lock_released_twice_after_an_interrupt_closes_its_fd_once(tmp_path, monkeypatch):
    """SIGTERM right after the lock's fd was closed: the cleanup's second release must not close
    it again (it raised EBADF, and rd-run exited 1 instead of 143), nor close an fd reused since."""
    import os

    import runtime.batch as batch

    lock = batch.OutputLock(tmp_path / "a.png")
    assert lock.acquire() is None and lock.path.exists()
    real_close, closed = os.close, []

    def close_then_interrupt(fd):
        real_close(fd)
        closed.append(fd)
        raise KeyboardInterrupt  # what the SIGTERM handler raises, at the worst moment

    monkeypatch.setattr(batch.os, "close", close_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        lock.release()
    monkeypatch.setattr(batch.os, "close", real_close)
    reused = os.open(tmp_path / "other", os.O_CREAT | os.O_RDWR)  # likely the same number as the lock's fd
    try:
        lock.release()  # the cleanup path: nothing left to do
        os.fstat(reused)  # still open
    finally:
        os.close(reused)
    assert len(closed) == 1 and not lock.path.exists()


def test_atomic_path_interrupted_as_its_temporary_is_made_leaves_nothing(tmp_path, monkeypatch):
    """An interrupt deferred over mkstemp is raised as the block ends: the temporary is removed."""
    import runtime.io as rio

    real = rio.tempfile.mkstemp

    def mkstemp_then_interrupt(*a, **k):
        made = real(*a, **k)
        rio.interrupt(KeyboardInterrupt())  # what a CLI's handler does when the signal comes now
        return made

    monkeypatch.setattr(rio.tempfile, "mkstemp", mkstemp_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        with rio.atomic_path(tmp_path / "out.png") as tmp:
            tmp.write_bytes(b"never")
    assert list(tmp_path.iterdir()) == []
