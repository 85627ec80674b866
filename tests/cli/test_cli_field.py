"""The field test of issue 21, case by case: rd-run derain as a new user and an operator use it.

Each test names the case; docs/field_tests.md lists them all (case -> behaviour -> test). The
derainer is the FAKE of conftest.py (it inverts images), so an output is told from its input.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageCms

from runtime.batch import RECORD_NAME, OutputLock, OutputRecord

LAUNCHER = Path(__file__).with_name("rd_run_fake.py")


def _arr(path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if p.name.startswith(".") and p.name != RECORD_NAME)


def _by_name(report: dict) -> dict[str, dict]:
    return {Path(f["input"]).name: f for f in report["files"]}


def _start(args: list, delay: float) -> subprocess.Popen:
    env = dict(os.environ, RD_FAKE_DELAY=str(delay))
    return subprocess.Popen([sys.executable, str(LAUNCHER), *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _wait_for(cond, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"rd-run ended early ({proc.returncode}): {out}\n{err}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("timed out waiting for rd-run")
        time.sleep(0.02)


# --------------------------------------------------------------------------- 1: a user's file is overwritten


def test_suffix_in_the_input_folder_never_replaces_a_users_file(tmp_path, rd_run, make_image):
    """photo_d.png of the user is not replaced by photo.png's output, and bird_d.png is an input."""
    sfx = tmp_path / "sfx"
    make_image(sfx / "photo.png", np.full((6, 8, 3), 10, np.uint8))
    make_image(sfx / "photo_d.png", np.full((6, 8, 3), 77, np.uint8))  # the user's, not an output
    make_image(sfx / "bird_d.png", np.full((6, 8, 3), 30, np.uint8))
    users = (sfx / "photo_d.png").read_bytes()
    r = rd_run("derain", sfx, "-o", sfx, "--suffix", "_d", "--steps", "2", "--json")
    assert r.code == 7, r
    files = _by_name(r.json)
    assert set(files) == {"photo.png", "photo_d.png", "bird_d.png"}  # bird_d.png is not skipped as an output
    assert files["photo.png"]["status"] == "failed"
    assert "refusing to replace" in files["photo.png"]["error"]
    assert "rd-run did not write it" in files["photo.png"]["error"]
    assert (sfx / "photo_d.png").read_bytes() == users
    assert files["bird_d.png"]["status"] == "ok" and (_arr(sfx / "bird_d_d.png") == 225).all()
    assert files["photo_d.png"]["status"] == "ok" and (_arr(sfx / "photo_d_d.png") == 178).all()
    # the second run knows its own outputs: they are neither inputs nor refused
    r = rd_run("derain", sfx, "-o", sfx, "--suffix", "_d", "--json")
    assert set(_by_name(r.json)) == {"photo.png", "photo_d.png", "bird_d.png"}
    assert [f["status"] for f in r.json["files"]] == ["ok", "failed", "ok"]  # bird_d, photo (refused), photo_d
    assert (sfx / "photo_d.png").read_bytes() == users


@pytest.mark.parametrize("skip", [False, True])
def test_a_file_at_an_output_path_that_rd_run_did_not_write_is_kept(tmp_path, rd_run, make_image, skip):
    src, out = tmp_path / "in", tmp_path / "out"
    make_image(src / "a.png")
    make_image(src / "b.png")
    make_image(out / "a.png", np.full((3, 3, 3), 5, np.uint8))  # a user's file where a's output goes
    before = (out / "a.png").read_bytes()
    r = rd_run("derain", src, "-o", out, "--json", *(["--skip-existing"] if skip else []))
    files = _by_name(r.json)
    assert files["b.png"]["status"] == "ok"
    if skip:  # skipped, and said so
        assert r.code == 0 and files["a.png"]["status"] == "skipped"
        assert files["a.png"]["skip_reason"] == "output exists, not written by rd-run"
        assert "left alone" in files["a.png"]["warnings"][0] and "rd-run: warning:" in r.stderr
    else:
        assert r.code == 7 and files["a.png"]["status"] == "failed" and "refusing to replace" in files["a.png"]["error"]
    assert (out / "a.png").read_bytes() == before


def test_own_outputs_are_replaced_but_not_once_someone_changed_them(tmp_path, rd_run, make_image):
    src, out = tmp_path / "in", tmp_path / "out"
    make_image(src / "a.png")
    assert rd_run("derain", src, "-o", out).code == 0
    assert rd_run("derain", src, "-o", out).code == 0  # its own output: replaced
    make_image(out / "a.png", np.full((2, 2, 3), 1, np.uint8))  # the user edits it
    edited = (out / "a.png").read_bytes()
    r = rd_run("derain", src, "-o", out, "--json")
    assert r.code == 7 and "refusing to replace" in r.json["files"][0]["error"]
    assert (out / "a.png").read_bytes() == edited


def test_output_record_survives_a_torn_line(tmp_path):
    """A run killed mid-append leaves half a line: later records start on a fresh line and still count."""
    out = tmp_path / "out"
    out.mkdir()
    (out / RECORD_NAME).write_bytes(b'{"output": "x.png", "si')
    dest, tmp = out / "a.png", out / ".a.12345678.tmp.png"
    tmp.write_bytes(b"abc")
    rec = OutputRecord(out)
    rec.add(dest, tmp, "in/a.png")
    os.replace(tmp, dest)
    assert OutputRecord(out).owns(dest) and not OutputRecord(out).owns(out / "x.png")
    lines = (out / RECORD_NAME).read_text().splitlines()
    assert len(lines) == 2 and json.loads(lines[1])["output"] == "a.png"


def test_output_record_is_compacted_when_it_is_mostly_history(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    dest = out / "a.png"
    dest.write_bytes(b"1")
    rec = OutputRecord(out)
    for _ in range(150):
        rec.add(dest, dest, "in/a.png")
    assert len((out / RECORD_NAME).read_text().splitlines()) == 150
    rec.compact()
    assert len((out / RECORD_NAME).read_text().splitlines()) == 1 and OutputRecord(out).owns(dest)


# --------------------------------------------------------------------------- 3: multi-frame images


def _frames(n: int = 3, shape=(8, 12)) -> list[Image.Image]:
    h, w = shape
    return [Image.fromarray(np.stack([np.full((h, w), 40 * i + 20, np.uint8), np.tile(np.arange(w, dtype=np.uint8) * 9,
                                                                                        (h, 1)),
                                      np.full((h, w), 200 - 30 * i, np.uint8)], -1)) for i in range(n)]


@pytest.mark.parametrize(("name", "save_kw", "tol"), [
    ("anim.webp", {"duration": [100, 150, 200], "loop": 0, "lossless": True}, 12),
    ("anim.png", {"duration": [100, 150, 200], "loop": 0}, 0),  # APNG
    ("pages.tif", {}, 0),
])
def test_every_frame_of_a_multi_frame_image_is_derained(tmp_path, rd_run, name, save_kw, tol):
    src = tmp_path / "in"
    src.mkdir()
    frames = _frames()
    frames[0].save(src / name, save_all=True, append_images=frames[1:], **save_kw)
    r = rd_run("derain", src, "-o", tmp_path / "out", "--json", "--batch", "2")
    assert r.code == 0, r
    f = r.json["files"][0]
    assert f["status"] == "ok" and f["frames"] == 3
    with Image.open(tmp_path / "out" / name) as out:
        assert getattr(out, "n_frames", 1) == 3
        for i, frame in enumerate(frames):
            out.seek(i)
            got = np.asarray(out.convert("RGB")).astype(int)
            assert np.abs(got - (255 - np.asarray(frame).astype(int))).max() <= tol, (name, i)
            if "duration" in save_kw:
                assert out.info.get("duration") == save_kw["duration"][i]


def test_a_format_that_cannot_hold_several_frames_is_refused(tmp_path):
    from runtime.errors import ImageError
    from runtime.io import save_frames

    frames = [(np.zeros((4, 4, 3), np.uint8), None)] * 3
    with pytest.raises(ImageError, match="cannot hold 3 frames; refusing to write only the first"):
        save_frames(tmp_path / "x.bmp", frames)
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- 4: metadata


def _srgb() -> bytes:
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


def _photo_with_metadata(path: Path, orientation: int = 6) -> None:
    arr = np.zeros((16, 24, 3), np.uint8)
    arr[:, :12] = 255
    img = Image.fromarray(arr)
    exif = img.getexif()
    exif[0x010F] = "RainCam"  # Make
    exif[0x0110] = "RC-1"  # Model
    exif[0x0112] = orientation
    exif.get_ifd(0x8769)[0x9003] = "2024:05:01 10:00:00"  # DateTimeOriginal
    gps = exif.get_ifd(0x8825)
    gps[1], gps[2] = "N", (52.0, 30.0, 0.0)
    path.parent.mkdir(parents=True, exist_ok=True)
    kw = {"quality": 95} if path.suffix == ".jpg" else {}
    img.save(path, exif=exif.tobytes(), icc_profile=_srgb(), dpi=(300, 300), **kw)


@pytest.mark.parametrize("name", ["photo.jpg", "photo.png", "photo.tif"])
def test_icc_exif_and_dpi_are_kept_and_orientation_reset(tmp_path, rd_run, name):
    _photo_with_metadata(tmp_path / "in" / name)
    with Image.open(tmp_path / "in" / name) as src:
        icc = src.info["icc_profile"]  # the profile's header holds its creation time: compare with this one
    r = rd_run("derain", tmp_path / "in", "-o", tmp_path / "out", "--json")
    assert r.code == 0, r
    assert r.json["files"][0]["metadata"] == ["icc_profile", "exif", "dpi"]
    with Image.open(tmp_path / "out" / name) as out:
        assert out.size == (16, 24)  # upright portrait
        assert out.info.get("icc_profile") == icc
        exif = out.getexif()
        assert exif[0x010F] == "RainCam" and exif[0x0110] == "RC-1"
        # JPEG and PNG keep the tag at 1; Pillow's TIFF writer leaves it out, and absent means 1
        assert exif.get(0x0112) == (None if name.endswith(".tif") else 1)
        assert exif.get_ifd(0x8769)[0x9003] == "2024:05:01 10:00:00"
        assert exif.get_ifd(0x8825)[1] == "N"
        assert out.info["dpi"] == pytest.approx((300, 300), abs=0.01)


def test_strip_metadata_removes_them(tmp_path, rd_run):
    _photo_with_metadata(tmp_path / "in" / "photo.jpg")
    r = rd_run("derain", tmp_path / "in", "-o", tmp_path / "out", "--strip-metadata", "--json")
    assert r.code == 0 and r.json["files"][0]["metadata"] == "stripped"
    with Image.open(tmp_path / "out" / "photo.jpg") as out:
        assert out.size == (16, 24)  # still upright: the pixels were rotated, not tagged
        assert "icc_profile" not in out.info and len(out.getexif()) == 0 and "dpi" not in out.info


def test_an_icc_profile_of_another_colour_space_is_dropped_with_a_warning(tmp_path, rd_run):
    fake_cmyk = bytes(16) + b"CMYK" + bytes(108)  # an ICC header that says CMYK
    (tmp_path / "in").mkdir()
    Image.new("CMYK", (8, 8), (0, 100, 200, 10)).save(tmp_path / "in" / "c.jpg", icc_profile=fake_cmyk)
    r = rd_run("derain", tmp_path / "in", "-o", tmp_path / "out", "--json")
    assert r.code == 0, r
    f = r.json["files"][0]
    assert "ICC profile: its colour space CMYK does not fit the RGB output" in f["warnings"][0]
    with Image.open(tmp_path / "out" / "c.jpg") as out:
        assert out.mode == "RGB" and "icc_profile" not in out.info


# --------------------------------------------------------------------------- 5: a truncated video


def _noise_video(path: Path, frames: int, fps: int) -> Path:
    """An H.264 Matroska video of seeded noise frames: every frame costs bytes, so half the file
    holds about half the frames (a flat test pattern would fit in the header's half)."""
    av = pytest.importorskip("av", reason="PyAV (the [video] extra) is not installed")
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    with av.open(str(path), "w") as c:
        v = c.add_stream("libx264", rate=fps)
        v.width, v.height, v.pix_fmt = 48, 32, "yuv420p"
        for _ in range(frames):
            img = rng.integers(0, 256, (32, 48, 3), dtype=np.uint8)
            for pkt in v.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(pkt)
        for pkt in v.encode(None):
            c.mux(pkt)
    return path


def test_truncated_video_is_partial_with_a_warning(tmp_path, rd_run):
    full = _noise_video(tmp_path / "in" / "full.mkv", frames=24, fps=12)
    data = full.read_bytes()
    (tmp_path / "in" / "half.mkv").write_bytes(data[: len(data) // 2])
    r = rd_run("derain", tmp_path / "in", "-o", tmp_path / "out", "--json")
    assert r.code == 7, r
    files = _by_name(r.json)
    assert files["full.mkv"]["status"] == "ok" and files["full.mkv"]["frames"] == 24
    assert files["full.mkv"]["expected_frames"] == 24 and files["full.mkv"]["warnings"] == []
    half = files["half.mkv"]
    assert half["status"] == "partial" and half["expected_frames"] == 24 and 0 < half["frames"] < 24
    assert f"decoded {half['frames']} of the 24 frames" in half["warnings"][0]
    assert "rd-run: warning:" in r.stderr and "truncated or damaged input" in r.stderr
    assert r.json["totals"]["partial"] == 1 and "1 partial" in r.stderr
    from runtime.video import probe_video

    assert probe_video(tmp_path / "out" / "half.mkv").frames == half["frames"]  # what there was is kept


def test_audio_only_file_fails_alone(tmp_path, rd_run, make_image):
    av = pytest.importorskip("av")
    path = tmp_path / "in" / "voice.mp4"
    path.parent.mkdir()
    with av.open(str(path), "w") as c:
        a = c.add_stream("aac", rate=8000)
        a.layout = "mono"
        af = av.AudioFrame.from_ndarray(np.zeros((1, 4096), np.float32), format="fltp", layout="mono")
        af.sample_rate, af.pts = 8000, 0
        for p in [*a.encode(af), *a.encode(None)]:
            c.mux(p)
    make_image(tmp_path / "in" / "a.png")
    r = rd_run("derain", tmp_path / "in", "-o", tmp_path / "out", "--json")
    assert r.code == 7
    files = _by_name(r.json)
    assert files["voice.mp4"]["status"] == "failed" and "no video stream" in files["voice.mp4"]["error"]
    assert files["a.png"]["status"] == "ok" and _names(tmp_path / "out") == ["a.png"]


# --------------------------------------------------------------------------- 6: leftovers of kill -9


def test_stale_temporaries_and_locks_of_a_killed_run_are_removed(tmp_path, rd_run, make_image):
    src, out = tmp_path / "in", tmp_path / "out"
    make_image(src / "img00.jpg")
    out.mkdir()
    stale = [out / ".img00.k2j4h6g8.tmp.jpg", out / ".img01.abcdefgh.tmp.png", out / ".img00.jpg.rd-lock"]
    for p in stale:
        p.write_bytes(b"")
    kept = [out / ".keep", out / ".notes.tmp.txt", out / ".cfg.abcdefgh.tmp.json"]  # not rd-run's media temporaries
    for p in kept:
        p.write_text("mine")
    fresh = out / ".img02.zzzzzzzz.tmp.png"  # written after this run started: another live run's
    fresh.write_bytes(b"")
    old = time.time() - 3600
    for p in stale + kept:
        os.utime(p, (old, old))
    future = time.time() + 3600
    os.utime(fresh, (future, future))
    r = rd_run("derain", src, "-o", out, "--json")
    assert r.code == 0, r
    assert sorted(Path(p).name for p in r.json["removed_stale"]) == sorted(p.name for p in stale)
    assert "removed 3 leftover" in r.stderr
    assert all(p.exists() for p in kept) and fresh.exists() and not any(p.exists() for p in stale)
    assert r.json["totals"]["files"] == 1 and _names(out) == ["img00.jpg"]


def test_a_temporary_whose_output_is_being_written_is_kept(tmp_path, rd_run, make_image):
    src, out = tmp_path / "in", tmp_path / "out"
    make_image(src / "a.png")
    out.mkdir()
    tmp = out / ".b.abcdefgh.tmp.png"
    tmp.write_bytes(b"")
    os.utime(tmp, (time.time() - 3600,) * 2)
    lock = OutputLock(out / "b.png")  # another process is writing b.png
    assert lock.acquire() is None
    try:
        r = rd_run("derain", src, "-o", out, "--json")
        assert r.code == 0 and r.json["removed_stale"] == [] and tmp.exists()
    finally:
        lock.release()


def test_kill_9_during_a_video_then_rerun_cleans_up(tmp_path, rd_run, make_video):
    src = make_video(tmp_path / "in" / "clip.mp4", frames=40, fps=10, audio=True)
    out = tmp_path / "out"
    proc = _start(["derain", src, "-o", out], delay=0.05)
    _wait_for(lambda: out.is_dir() and any(".tmp" in p.name for p in out.iterdir()), proc)  # mid-encode
    proc.kill()  # SIGKILL: no cleanup runs
    proc.communicate(timeout=30)
    left = _leftovers(out)
    assert any(n.startswith(".clip.") and n.endswith(".tmp.mp4") for n in left)  # what kill -9 leaves
    r = rd_run("derain", src, "-o", out, "--json")
    assert r.code == 0, r
    assert _leftovers(out) == [] and _names(out) == ["clip.mp4"] and r.json["files"][0]["frames"] == 40
    assert sorted(Path(p).name for p in r.json["removed_stale"]) == left  # the temporary and its lock file
    assert ".clip.mp4.rd-lock" in left


def test_kill_9_mid_image_batch_then_resume(tmp_path, rd_run):
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    for i in range(12):
        Image.fromarray(np.full((8, 8, 3), i * 10, np.uint8)).save(src / f"{i:02d}.png")
    proc = _start(["derain", src, "-o", out], delay=0.1)
    _wait_for(lambda: out.is_dir() and len(_names(out)) >= 2, proc)
    proc.kill()
    proc.communicate(timeout=30)
    done = _names(out)
    assert 2 <= len(done) < 12
    for name in done:  # every output there is complete
        assert (_arr(out / name) == 255 - int(name[:2]) * 10).all()
    r = rd_run("derain", src, "-o", out, "--skip-existing", "--json")
    assert r.code == 0, r
    assert r.json["totals"]["skipped"] == len(done) and r.json["totals"]["ok"] == 12 - len(done)
    assert _leftovers(out) == []


# --------------------------------------------------------------------------- 7: symbolic links


@pytest.mark.parametrize("recursive", [False, True])
def test_dangling_symlinks_fail_with_their_reason_with_or_without_r(tmp_path, rd_run, make_image, recursive):
    src = tmp_path / "in"
    make_image(src / "a.png")
    (src / "gone.png").symlink_to(tmp_path / "missing.png")
    os.symlink("loop2.png", src / "loop1.png")
    os.symlink("loop1.png", src / "loop2.png")
    r = rd_run("derain", src, "-o", tmp_path / "out", "--json", *(["-r"] if recursive else []))
    assert r.code == 7, r
    files = _by_name(r.json)
    assert files["a.png"]["status"] == "ok"
    assert files["gone.png"]["status"] == "failed" and "broken symbolic link" in files["gone.png"]["error"]
    for n in ("loop1.png", "loop2.png"):
        assert files[n]["status"] == "failed" and "symbolic link loop" in files[n]["error"]


def test_a_symlink_loop_given_directly_says_so(tmp_path, rd_run):
    os.symlink("b.png", tmp_path / "a.png")
    os.symlink("a.png", tmp_path / "b.png")
    (tmp_path / "gone.jpg").symlink_to(tmp_path / "nothing.jpg")
    r = rd_run("derain", tmp_path / "a.png", "-o", tmp_path / "out")
    assert r.code == 3 and "symbolic link loop" in r.stderr and "no such file" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    r = rd_run("derain", tmp_path / "gone.jpg", "-o", tmp_path / "out")
    assert r.code == 3 and "broken symbolic link (its target" in r.stderr


def test_a_directory_symlink_loop_in_a_recursive_walk_ends(tmp_path, rd_run, make_image):
    src = tmp_path / "in"
    make_image(src / "sub" / "a.png")
    (src / "sub" / "back").symlink_to(src, target_is_directory=True)
    r = rd_run("derain", src, "-o", tmp_path / "out", "-r", "--json")
    assert r.code == 0 and r.json["totals"]["files"] == 1


# --------------------------------------------------------------------------- 8: two runs, one output folder


def test_an_output_being_written_by_another_run_is_skipped_and_said_so(tmp_path, rd_run, make_image):
    src, out = tmp_path / "in", tmp_path / "out"
    make_image(src / "a.png")
    make_image(src / "b.png")
    lock = OutputLock(out / "a.png")
    assert lock.acquire() is None  # "another run" holds a.png
    try:
        r = rd_run("derain", src, "-o", out, "--json")
        assert r.code == 0, r
        files = _by_name(r.json)
        assert files["a.png"]["status"] == "skipped" and files["a.png"]["skip_reason"] == "being written by another run"
        assert f"pid {os.getpid()}" in files["a.png"]["warnings"][0]
        assert files["b.png"]["status"] == "ok" and not (out / "a.png").exists()
        assert lock.path.exists()  # the other run's lock is not touched
    finally:
        lock.release()
    assert not lock.path.exists()
    r = rd_run("derain", src, "-o", out, "--skip-existing", "--json")
    assert [f["status"] for f in r.json["files"]] == ["ok", "skipped"]


def test_two_processes_on_one_output_folder_share_the_work(tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    for i in range(10):
        Image.fromarray(np.full((8, 8, 3), i * 10, np.uint8)).save(src / f"{i:02d}.png")
    procs = [_start(["derain", src, "-o", out, "--skip-existing", "--json"], delay=0.15) for _ in range(2)]
    reports = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=120)
        assert p.returncode == 0, stderr
        reports.append(json.loads(stdout))
    ok = [sum(f["status"] == "ok" for f in rep["files"]) for rep in reports]
    assert sum(ok) == 10  # every file derained exactly once between the two
    for i in range(10):
        statuses = sorted(_by_name(rep)[f"{i:02d}.png"]["status"] for rep in reports)
        assert statuses == ["ok", "skipped"], (i, statuses)
        assert (_arr(out / f"{i:02d}.png") == 255 - i * 10).all()
    assert _leftovers(out) == []


# --------------------------------------------------------------------------- outputs that held


def test_missing_output_folder_is_created_and_an_unwritable_one_refused(tmp_path, rd_run, make_image):
    make_image(tmp_path / "in" / "a.png")
    r = rd_run("derain", tmp_path / "in", "-o", tmp_path / "new" / "deep" / "out")
    assert r.code == 0 and (tmp_path / "new" / "deep" / "out" / "a.png").is_file()
    (tmp_path / "afile").write_text("x")
    r = rd_run("derain", tmp_path / "in", "-o", tmp_path / "afile" / "sub")  # cannot be created, even by root
    assert r.code == 3 and "cannot create it" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    if os.geteuid() == 0:
        pytest.skip("root writes to read-only folders: the read-only case needs an unprivileged user")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        r = rd_run("derain", tmp_path / "in", "-o", ro)
        assert r.code == 3 and "not writable" in r.stderr
        r = rd_run("derain", tmp_path / "in", "-o", ro / "sub")
        assert r.code == 3 and "cannot create it" in r.stderr
    finally:
        ro.chmod(0o755)


# --------------------------------------------------------------------------- 9: help and docs agree


def test_bench_size_is_height_by_width_like_rd_export(rd_run, fake_factory):
    r = rd_run("bench", "--size", "24x40", "--runs", "1", "--warmup", "0", "--json")
    assert r.code == 0, r
    assert (r.json["height"], r.json["width"], r.json["size"]) == (24, 40, "24x40")
    r = rd_run("bench", "--size", "w40,h24")
    assert r.code == 2 and "sizes are HxW (height x width): write 24x40" in r.stderr
    r = rd_run("bench", "--size", "40 by 24")
    assert r.code == 2 and "is not HxW (height x width" in r.stderr


def test_tile_help_says_the_shipped_model_tiles_at_its_native_size(rd_run):
    text = " ".join(rd_run("derain", "--help").stdout.split())
    assert "Default: whole frames" not in text
    assert "native tile size" in text and "The shipped model's native tile is 64x64" in text
    assert "2..1000" in text  # --steps' upper limit


def test_readme_lists_every_exit_code():
    from runtime.errors import EXIT_CODES

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    line = " ".join(readme[readme.index("Exit codes (every CLI)"):].split("\n\n")[0].split())
    for code in EXIT_CODES:
        assert f" {code} " in line, (code, line)


def _app(module: str):
    import importlib

    return importlib.import_module(module).app


@pytest.mark.parametrize(("module", "args"), [
    ("rd_export.cli", ["-h"]), ("rd_export.cli", ["build", "-h"]), ("rd_export.cli", ["inspect", "-h"]),
    ("rd_export.cli", ["verify", "-h"]), ("runtime.cli", ["-h"]), ("runtime.cli", ["derain", "-h"]),
])
def test_every_command_takes_h(module, args):
    from typer.testing import CliRunner

    res = CliRunner().invoke(_app(module), args)
    assert res.exit_code == 0 and "Usage:" in res.output, res.output


@pytest.mark.parametrize(("module", "args", "prefix"), [
    ("rd_export.cli", ["build", "missing.pt"], "error: "),
    ("rd_export.cli", ["build", "--bogus"], "error: "),
    ("rd_export.cli", ["inspect"], "error: "),
    ("rd_export.cli", ["nope"], "error: "),
    ("runtime.cli", ["derain"], "rd-run: error: "),
    ("runtime.cli", ["derain", "x.png", "-o", "o", "--bogus"], "rd-run: error: "),
    ("runtime.cli", ["bench", "--runs", "zero"], "rd-run: error: "),
])
def test_usage_errors_are_one_line_in_every_cli(module, args, prefix):
    from typer.testing import CliRunner

    res = CliRunner().invoke(_app(module), args)
    assert res.exit_code == 2
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(prefix) and lines[0].endswith("--help')"), res.stderr
    assert not any(c in res.stderr for c in "╭│╰") and "Usage:" not in res.stderr


def test_rd_export_help_states_sizes_as_hxw_and_the_step_range():
    from typer.testing import CliRunner

    text = " ".join(CliRunner().invoke(_app("rd_export.cli"), ["build", "--help"]).output.split())
    assert "HxW, height x width" in text and "2..1000" in text


def test_field_tests_doc_cites_only_existing_tests():
    """docs/field_tests.md: every test it names exists, and its count is the number of rows."""
    import re

    root = Path(__file__).resolve().parents[2]
    doc = (root / "docs" / "field_tests.md").read_text()
    cited = re.findall(r"`([\w/]+\.py)::(test_\w+)`", doc)
    assert len(cited) > 60
    for path, name in cited:
        source = (root / "tests" / path.removeprefix("tests/")).read_text()
        assert re.search(rf"^def {name}\(", source, re.M), f"{path}::{name} is cited but does not exist"
    rows = re.findall(r"^\| (\d+) \|", doc.split("## The tiny preset")[0], re.M)
    assert [int(r) for r in rows] == list(range(1, len(rows) + 1))
    count = int(re.search(r"\*\*Count: (\d+) cases\*\*", doc).group(1))
    a, b, c = re.search(r"— (\d+) under the ten points .*? (\d+) that held(?:.*? (\d+) found later)?",
                        doc, re.S).groups()
    assert count == len(rows) == int(a) + int(b) + int(c or 0)


def test_the_output_folder_reached_another_way_is_the_same_folder(tmp_path, rd_run, make_image, monkeypatch):
    """Outputs written through a symlinked or relative spelling of -o are still known as rd-run's."""
    sfx = tmp_path / "sfx"
    make_image(sfx / "photo.png")
    (tmp_path / "alias").symlink_to(sfx, target_is_directory=True)
    assert rd_run("derain", sfx, "-o", tmp_path / "alias", "--suffix", "_d").code == 0
    monkeypatch.chdir(tmp_path)
    r = rd_run("derain", "alias", "-o", "sfx/", "--suffix", "_d", "--json")
    assert r.code == 0 and [Path(f["input"]).name for f in r.json["files"]] == ["photo.png"], r
