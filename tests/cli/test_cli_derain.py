"""rd-run derain with a FAKE derainer (inverts images): the never-lose-work batch rules."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from runtime.batch import RECORD_NAME
from runtime.errors import ArtifactError


def _arr(path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img)


def _hidden(folder) -> list:
    """Hidden files left in an output folder, apart from rd-run's record of its outputs."""
    return [p for p in folder.rglob("*") if p.name.startswith(".") and p.name != RECORD_NAME]


def _names(folder) -> list[str]:
    """What a user sees in a folder (``ls``): the visible names."""
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))


def test_folder_of_images(tmp_path, rd_run, make_image, fake_factory):
    a = make_image(tmp_path / "in" / "a.png")
    make_image(tmp_path / "in" / "b.jpg", quality=95)
    r = rd_run("derain", tmp_path / "in", "-o", tmp_path / "out", "--json", "--steps", "3", "--seed", "7")
    assert r.code == 0, r
    rep = r.json
    assert rep["totals"] == {"files": 2, "ok": 2, "skipped": 0, "failed": 0, "partial": 0, "not_processed": 0,
                             "seconds": rep["totals"]["seconds"]}
    assert [f["status"] for f in rep["files"]] == ["ok", "ok"]
    assert rep["engine"]["backend"] == "fake" and rep["exit_code"] == 0
    np.testing.assert_array_equal(_arr(tmp_path / "out" / "a.png"), 255 - _arr(a))
    assert (tmp_path / "out" / "b.jpg").is_file()
    assert fake_factory[0].options["steps"] == 3 and fake_factory[0].options["seed"] == 7
    assert fake_factory[0].artifact is None  # the shipped default model
    assert "2 files: 2 ok, 0 skipped, 0 failed" in r.stderr
    assert not _hidden(tmp_path / "out")


def test_bad_files_are_reported_and_the_rest_complete(tmp_path, rd_run, make_image):
    src = tmp_path / "in"
    make_image(src / "1_good.png")
    (src / "2_text.png").write_text("not an image")
    (src / "3_empty.jpg").write_bytes(b"")
    good_jpg = make_image(src / "4_trunc.jpg", quality=95).read_bytes()
    (src / "4_trunc.jpg").write_bytes(good_jpg[: len(good_jpg) // 2])
    make_image(src / "5_good.jpg")
    r = rd_run("derain", src, "-o", tmp_path / "out", "--json")
    assert r.code == 7, r
    rep = r.json
    status = {f["input"].split("/")[-1]: f for f in rep["files"]}
    assert status["1_good.png"]["status"] == status["5_good.jpg"]["status"] == "ok"
    for name, words in (("2_text.png", "not a readable image"), ("3_empty.jpg", "empty file"),
                        ("4_trunc.jpg", "truncated")):
        assert status[name]["status"] == "failed" and words in status[name]["error"], status[name]
        assert not (tmp_path / "out" / name).exists()
    assert rep["totals"]["failed"] == 3 and rep["totals"]["ok"] == 2 and rep["exit_code"] == 7
    assert "rd-run: failed:" in r.stderr and "2_text.png" in r.stderr
    assert _names(tmp_path / "out") == ["1_good.png", "5_good.jpg"] and not _hidden(tmp_path / "out")


def test_skip_existing_resumes_without_loading_the_model(tmp_path, rd_run, make_image, fake_factory):
    src, out = tmp_path / "in", tmp_path / "out"
    make_image(src / "a.png")
    make_image(src / "b.png")
    assert rd_run("derain", src, "-o", out).code == 0
    stamp = (out / "a.png").stat().st_mtime_ns
    r = rd_run("derain", src, "-o", out, "--skip-existing", "--json")
    assert r.code == 0 and r.json["totals"]["skipped"] == 2
    assert len(fake_factory) == 1  # all done already: no model loaded the second time
    assert (out / "a.png").stat().st_mtime_ns == stamp
    make_image(src / "c.png")
    r = rd_run("derain", src, "-o", out, "--skip-existing", "--json")
    assert [f["status"] for f in r.json["files"]] == ["skipped", "skipped", "ok"]


def test_output_equal_to_input_is_refused(tmp_path, rd_run, make_image):
    src = make_image(tmp_path / "a.png")
    before = src.read_bytes()
    r = rd_run("derain", src, "-o", tmp_path, "--json")
    assert r.code == 7
    f = r.json["files"][0]
    assert f["status"] == "failed" and "refusing to overwrite the input" in f["error"]
    assert src.read_bytes() == before


def test_outdir_equal_to_input_folder_needs_a_suffix(tmp_path, rd_run, make_image):
    src = tmp_path / "in"
    make_image(src / "a.png")
    r = rd_run("derain", src, "-o", src)
    assert r.code == 2 and "rd-run: error:" in r.stderr and "--suffix" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    r = rd_run("derain", src, "-o", src, "--suffix", "_d", "--json")
    assert r.code == 0 and (src / "a_d.png").is_file()
    r = rd_run("derain", src, "-o", src, "--suffix", "_d", "--json")  # a_d.png is an output, not an input
    assert r.code == 0 and r.json["totals"]["files"] == 1
    assert _names(src) == ["a.png", "a_d.png"] and not _hidden(src)


@pytest.mark.parametrize("recursive", [False, True])
def test_outdir_inside_input_folder_is_not_read_back(tmp_path, rd_run, make_image, recursive):
    src = tmp_path / "in"
    make_image(src / "a.png")
    make_image(src / "sub" / "b.png")
    out = src / "derained"
    flags = ["-r"] if recursive else []
    for _ in range(2):
        r = rd_run("derain", src, "-o", out, "--json", *flags)
        assert r.code == 0, r
        assert r.json["totals"]["files"] == (2 if recursive else 1)
    assert not (out / "derained").exists()
    assert (out / "a.png").is_file() and (out / "sub" / "b.png").is_file() == recursive


def test_glob_and_recursive_keep_layout(tmp_path, rd_run, make_image, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_image(tmp_path / "data" / "cam1" / "x.png")
    make_image(tmp_path / "data" / "cam2" / "x.png")
    make_image(tmp_path / "data" / "cam2" / "y.jpg")
    r = rd_run("derain", "data/*/*.png", "-o", "out", "--json")
    assert r.code == 0, r
    assert (tmp_path / "out" / "cam1" / "x.png").is_file() and (tmp_path / "out" / "cam2" / "x.png").is_file()
    r = rd_run("derain", "data", "-o", "out2", "-r", "--json")
    assert r.code == 0 and r.json["totals"]["files"] == 3
    assert (tmp_path / "out2" / "cam2" / "y.jpg").is_file()


def test_same_output_name_from_two_inputs_is_not_overwritten(tmp_path, rd_run, make_image):
    a = make_image(tmp_path / "a" / "x.png", np.full((4, 4, 3), 10, np.uint8))
    b = make_image(tmp_path / "b" / "x.png", np.full((4, 4, 3), 20, np.uint8))
    r = rd_run("derain", a, b, "-o", tmp_path / "out", "--json")
    assert r.code == 7
    assert [f["status"] for f in r.json["files"]] == ["ok", "failed"]
    assert "already written from" in r.json["files"][1]["error"]
    assert _arr(tmp_path / "out" / "x.png")[0, 0, 0] == 245


def test_alpha_passes_through_untouched(tmp_path, rd_run, make_image):
    rgba = np.dstack([np.full((6, 8, 3), 30, np.uint8), np.arange(48, dtype=np.uint8).reshape(6, 8) * 5])
    make_image(tmp_path / "in" / "rgba.png", rgba, "RGBA")
    la = np.dstack([np.full((6, 8), 50, np.uint8), np.arange(48, dtype=np.uint8).reshape(6, 8)])
    make_image(tmp_path / "in" / "la.png", la, "LA")
    r = rd_run("derain", tmp_path / "in", "-o", tmp_path / "out", "--json")
    assert r.code == 0, r
    out = _arr(tmp_path / "out" / "rgba.png")
    np.testing.assert_array_equal(out[..., 3], rgba[..., 3])
    assert (out[..., :3] == 225).all()
    with Image.open(tmp_path / "out" / "la.png") as img:
        assert img.mode == "LA"  # grayscale + alpha stays grayscale + alpha
        np.testing.assert_array_equal(np.asarray(img)[..., 1], la[..., 1])
        assert (np.asarray(img)[..., 0] == 205).all()


def test_grayscale_comes_back_grayscale(tmp_path, rd_run, make_image):
    make_image(tmp_path / "in" / "g.png", np.full((5, 7), 40, np.uint8), "L")
    r = rd_run("derain", tmp_path / "in", "-o", tmp_path / "out", "--json")
    assert r.code == 0 and r.json["files"][0]["grayscale"] is True
    with Image.open(tmp_path / "out" / "g.png") as img:
        assert img.mode == "L" and (np.asarray(img) == 215).all()


def test_16bit_input_is_flagged_and_written_as_8bit(tmp_path, rd_run):
    (tmp_path / "in").mkdir()
    Image.fromarray(np.full((4, 6), 65535, np.uint16)).save(tmp_path / "in" / "deep.png")
    r = rd_run("derain", tmp_path / "in", "-o", tmp_path / "out", "--json")
    assert r.code == 0, r
    f = r.json["files"][0]
    assert f["input_high_bit_depth"] is True and f["output_bit_depth"] == 8
    assert "output written as 8-bit" in f["warnings"][0]
    assert "rd-run: warning:" in r.stderr and "8-bit" in r.stderr
    with Image.open(tmp_path / "out" / "deep.png") as img:
        assert img.mode == "L" and (np.asarray(img) == 0).all()


def test_exif_orientation_applied_once_end_to_end(tmp_path, rd_run):
    arr = np.zeros((32, 64, 3), np.uint8)
    arr[:, :32] = 255  # left half white
    img = Image.fromarray(arr)
    exif = img.getexif()
    exif[0x0112] = 6
    (tmp_path / "in").mkdir()
    img.save(tmp_path / "in" / "r.jpg", exif=exif.tobytes(), quality=95)
    assert rd_run("derain", tmp_path / "in", "-o", tmp_path / "out").code == 0
    with Image.open(tmp_path / "out" / "r.jpg") as out:
        assert out.size == (32, 64)  # upright portrait, and no orientation tag left to rotate it again
        assert out.getexif().get(0x0112) in (None, 1)
        o = np.asarray(out)
    assert o[8, 16].mean() < 60 and o[56, 16].mean() > 200  # inverted: the white half (now on top) is dark


def test_batch_of_images_and_fallback_to_single_on_failure(tmp_path, rd_run, make_image, monkeypatch, fake_cls):
    import runtime.cli as cli

    FakeDerainer = fake_cls
    created = []

    def factory(artifact=None, **kw):
        created.append(FakeDerainer(artifact, fail_on_value=99, **kw))
        return created[-1]

    monkeypatch.setattr(cli, "derainer_factory", factory)
    for i in range(5):
        make_image(tmp_path / "in" / f"{i}.png", np.full((4, 4, 3), 99 if i == 2 else i, np.uint8))
    r = rd_run("derain", tmp_path / "in", "-o", tmp_path / "out", "--batch", "2", "--json")
    assert r.code == 7, r
    assert [f["status"] for f in r.json["files"]] == ["ok", "ok", "failed", "ok", "ok"]
    assert "fake engine failure" in r.json["files"][2]["error"]
    assert created[0].batch_calls >= 2
    assert created[0].options["batch"] == 2


def test_missing_input_is_one_line_exit_3(tmp_path, rd_run):
    r = rd_run("derain", tmp_path / "nope", "-o", tmp_path / "out")
    assert r.code == 3
    assert r.stderr.strip() == f"rd-run: error: {tmp_path / 'nope'}: no such file or directory"


def test_empty_folder_and_unmatched_glob_are_warnings(tmp_path, rd_run, make_image):
    (tmp_path / "empty").mkdir()
    good = make_image(tmp_path / "a.png")
    r = rd_run("derain", tmp_path / "empty", str(tmp_path / "*.none"), good, "-o", tmp_path / "out", "--json")
    assert r.code == 0 and r.json["totals"]["files"] == 1
    assert "no image or video files" in r.stderr and "matched no" in r.stderr
    # the warnings are in the JSON too, not only on stderr (field test, issue 21 point 7)
    assert len(r.json["warnings"]) == 2 and "matched no" in r.json["warnings"][1]


def test_nothing_matched_is_a_usage_error_with_the_reason_in_the_json(tmp_path, rd_run, fake_factory):
    """Field test, issue 21 point 7: a run that processed nothing because nothing matched exited 0."""
    (tmp_path / "empty").mkdir()
    r = rd_run("derain", tmp_path / "empty", "-o", tmp_path / "o", "--json")
    assert r.code == 2, r
    j = r.json
    assert j["exit_code"] == 2 and j["error_type"] == "UsageError" and "nothing to derain" in j["error"]
    assert j["files"] == [] and j["totals"]["files"] == 0
    assert "no image or video files" in j["error"] and "no image or video files" in j["warnings"][0]
    assert r.stderr.strip().splitlines()[-1].startswith("rd-run: error: nothing to derain:")
    r = rd_run("derain", str(tmp_path / "*.jpg"), "-o", tmp_path / "o")
    assert r.code == 2 and "pattern matched no image or video files" in r.stderr
    assert not fake_factory and not (tmp_path / "o").exists()  # no model loaded, nothing created


def test_unsupported_explicit_file_fails_alone(tmp_path, rd_run, make_image):
    (tmp_path / "notes.txt").write_text("hello")
    good = make_image(tmp_path / "a.png")
    r = rd_run("derain", tmp_path / "notes.txt", good, "-o", tmp_path / "out", "--json")
    assert r.code == 7
    assert [f["status"] for f in r.json["files"]] == ["failed", "ok"]
    assert "unsupported file type '.txt'" in r.json["files"][0]["error"]


def test_model_error_is_one_line_with_its_exit_code_and_json(tmp_path, rd_run, make_image, monkeypatch):
    import runtime.cli as cli

    def broken(artifact=None, **kw):
        raise ArtifactError("model.onnx: manifest not found")

    monkeypatch.setattr(cli, "derainer_factory", broken)
    make_image(tmp_path / "in" / "a.png")
    r = rd_run("derain", tmp_path / "in", "-o", tmp_path / "out", "--json")
    assert r.code == 4
    assert r.stderr.strip().splitlines()[-1] == "rd-run: error: model.onnx: manifest not found"
    assert r.json["exit_code"] == 4 and r.json["error_type"] == "ArtifactError"


def test_unexpected_error_is_one_line_exit_1_and_debug_shows_it(tmp_path, rd_run, make_image, monkeypatch):
    import runtime.cli as cli

    def buggy(artifact=None, **kw):
        raise ZeroDivisionError("oops")

    monkeypatch.setattr(cli, "derainer_factory", buggy)
    make_image(tmp_path / "in" / "a.png")
    r = rd_run("derain", tmp_path / "in", "-o", tmp_path / "out")
    assert r.code == 1
    assert "rd-run: error: unexpected ZeroDivisionError: oops (rerun with --debug" in r.stderr
    r = rd_run("derain", tmp_path / "in", "-o", tmp_path / "out", "--debug")
    assert isinstance(r.result.exception, ZeroDivisionError)


def test_precision_rules(tmp_path, rd_run, make_image):
    make_image(tmp_path / "in" / "a.png")
    engine = tmp_path / "m.onnx"
    engine.write_bytes(b"x")
    r = rd_run("derain", tmp_path / "in", "-o", tmp_path / "out", "--engine", engine, "--precision", "int8")
    assert r.code == 2 and "drop --precision" in r.stderr
    import runtime.cli as cli

    if not cli.shipped_models()["int8"].is_file():
        r = rd_run("derain", tmp_path / "in", "-o", tmp_path / "out", "--precision", "int8")
        assert r.code == 4 and "not shipped" in r.stderr
    r = rd_run("derain", tmp_path / "in", "-o", tmp_path / "out", "--tile", "64", "--overlap", "64")
    assert r.code == 2 and "--overlap 64 must be smaller than --tile 64" in r.stderr


def test_video_round_trip_keeps_frames_fps_and_audio(tmp_path, rd_run, make_video):
    from runtime.video import probe_video

    src = make_video(tmp_path / "in" / "clip.mp4", frames=7, fps=12, audio=True)
    r = rd_run("derain", tmp_path / "in", "-o", tmp_path / "out", "--json", "--batch", "3")
    assert r.code == 0, r
    f = r.json["files"][0]
    assert f["kind"] == "video" and f["frames"] == 7 and f["audio_streams"] == 1
    a, b = probe_video(src), probe_video(tmp_path / "out" / "clip.mp4")
    assert (b.frames, b.fps, b.width, b.height) == (a.frames, a.fps, a.width, a.height) == (7, 12.0, 48, 32)
    assert b.audio_streams == 1 and b.audio_codecs == ["aac"]
    import av

    with av.open(str(src)) as ci, av.open(str(tmp_path / "out" / "clip.mp4")) as co:
        fi = next(ci.decode(video=0)).to_ndarray(format="rgb24").astype(int)
        fo = next(co.decode(video=0)).to_ndarray(format="rgb24").astype(int)
        assert np.abs((255 - fi) - fo).mean() < 12  # inverted by the fake, up to codec loss
    with av.open(str(src)) as ci, av.open(str(tmp_path / "out" / "clip.mp4")) as co:
        pi = [bytes(p) for p in ci.demux(audio=0) if p.size]
        po = [bytes(p) for p in co.demux(audio=0) if p.size]
        assert pi == po  # audio remuxed, not re-encoded
    assert not _hidden(tmp_path / "out")


def test_avi_without_audio_and_corrupt_video(tmp_path, rd_run, make_video):
    make_video(tmp_path / "in" / "a.avi", frames=4, fps=8, audio=False)
    (tmp_path / "in" / "b.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 truncated")
    r = rd_run("derain", tmp_path / "in", "-o", tmp_path / "out", "--json")
    assert r.code == 7, r
    files = {f["input"].split("/")[-1]: f for f in r.json["files"]}
    assert files["a.avi"]["status"] == "ok" and files["a.avi"]["frames"] == 4
    assert files["b.mp4"]["status"] == "failed" and "not a readable video" in files["b.mp4"]["error"]
    assert _names(tmp_path / "out") == ["a.avi"] and not _hidden(tmp_path / "out")


def test_glob_matching_the_output_dir_does_not_read_it(tmp_path, rd_run, make_image, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_image(tmp_path / "in" / "a.png")
    make_image(tmp_path / "in" / "cam" / "b.png")
    for _ in range(2):
        r = rd_run("derain", "in/*", "-o", "in/out", "--json")
        assert r.code == 0, r
        assert sorted(f["output"] for f in r.json["files"]) == ["in/out/a.png", "in/out/cam/b.png"]


def test_output_dir_that_is_a_file(tmp_path, rd_run, make_image):
    make_image(tmp_path / "a.png")
    (tmp_path / "out").write_text("x")
    r = rd_run("derain", tmp_path / "a.png", "-o", tmp_path / "out")
    assert r.code == 2 and "is a file" in r.stderr


def test_suffix_cannot_escape_the_output_dir(tmp_path, rd_run, make_image):
    make_image(tmp_path / "in" / "a.png")
    r = rd_run("derain", tmp_path / "in", "-o", tmp_path / "out", "--suffix", "/../../x")
    assert r.code == 2 and "--suffix" in r.stderr
    r = rd_run("derain", tmp_path / "in", "-o", tmp_path / "out", "--suffix", ".derained")
    assert r.code == 0 and (tmp_path / "out" / "a.derained.png").is_file()


def test_one_step_is_a_usage_error_before_any_work(tmp_path, rd_run, make_image, fake_factory):
    make_image(tmp_path / "in" / "a.png")
    r = rd_run("derain", tmp_path / "in", "-o", tmp_path / "out", "--steps", "1")
    assert r.code == 2 and "steps must be an integer >= 2, got 1 (a single step of Algorithm 2" in r.stderr, r
    assert "Traceback" not in r.stderr and not fake_factory and not (tmp_path / "out").exists()


@pytest.mark.parametrize(("option", "attr", "value", "bad"), [
    ("--refine-strength", "refine_strength", 0.5, ("0", "2.5", "nan", "x")),  # (0, 2]
    ("--noise-scale", "noise_scale", 0.0, ("-0.5", "1.5", "nan", "x")),  # [0, 1]
    ("--refine-lowpass", "refine_lowpass", 8.0, ("-1", "65", "nan", "x")),  # [0, 64] pixels
])
def test_sampling_options(tmp_path, rd_run, make_image, fake_factory, option, attr, value, bad):
    """--refine-strength / --noise-scale / --refine-lowpass reach the Derainer only when given (else the model's own
    setting applies); a value out of range is a one-line usage error, on every command that runs a
    model."""
    make_image(tmp_path / "in" / "a.png")
    r = rd_run("derain", tmp_path / "in", "-o", tmp_path / "out", option, str(value))
    assert r.code == 0, r.stderr
    assert getattr(fake_factory[-1], attr) == value
    r = rd_run("derain", tmp_path / "in", "-o", tmp_path / "out2")
    assert r.code == 0 and getattr(fake_factory[-1], attr) is None
    for v in bad:
        r = rd_run("derain", tmp_path / "in", "-o", tmp_path / "out3", option, v)
        assert r.code == 2 and option in r.stderr, (v, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    for command in ("derain", "eval", "bench", "stream", "serve"):
        r = rd_run(command, "--help")
        assert option in r.result.stdout, command
