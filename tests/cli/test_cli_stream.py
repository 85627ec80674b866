"""rd-run stream: the latest-frame capture thread, reconnects, and the loop on a small video file."""

from __future__ import annotations

import sys
import threading
import time

import numpy as np
import pytest

from runtime.stream import LatestFrameCapture, parse_source

cv2 = pytest.importorskip("cv2", reason="OpenCV (the [stream] extra) is not installed")


class FakeCapture:
    """Stands in for cv2.VideoCapture: ``n`` frames (value = index), then read() fails."""

    def __init__(self, n: int, *, start: int = 0, opened: bool = True, delay: float = 0.0, fps: float = 30.0):
        self.n, self.i, self.start, self.opened, self.delay, self.fps = n, 0, start, opened, delay, fps
        self.released = False

    def isOpened(self) -> bool:
        return self.opened

    def read(self):
        if self.delay:
            time.sleep(self.delay)
        if self.i >= self.n:
            return False, None
        self.i += 1
        return True, np.full((4, 4, 3), self.start + self.i - 1, np.uint8)

    def release(self) -> None:
        self.released = True

    def get(self, prop: int) -> float:
        return self.fps


def test_parse_source():
    assert parse_source("0") == 0 and parse_source(" 2 ") == 2
    assert parse_source("rtsp://cam/1") == "rtsp://cam/1" and parse_source("a.mp4") == "a.mp4"


def test_slow_consumer_gets_the_newest_frame_and_old_ones_are_dropped():
    cap = LatestFrameCapture("cam", open_capture=lambda s: FakeCapture(60, delay=0.002), live=False, drop=True)
    seen = []
    with cap:
        while (got := cap.read(timeout=5)) is not None:
            index, frame = got
            assert frame[0, 0, 0] == index  # the frame in the slot is the one with that index
            seen.append(index)
            time.sleep(0.02)  # a model slower than the camera
    assert seen == sorted(seen) and len(set(seen)) == len(seen)
    assert cap.captured == 60 and cap.dropped > 0 and len(seen) + cap.dropped == 60
    assert seen[-1] == 59  # the newest frame is never lost


def test_file_source_drops_nothing():
    cap = LatestFrameCapture("clip.mp4", open_capture=lambda s: FakeCapture(20))
    assert not cap.live and not cap.drop
    seen = []
    with cap:
        while (got := cap.read(timeout=5)) is not None:
            seen.append(got[0])
            time.sleep(0.002)
    assert seen == list(range(20)) and cap.dropped == 0


def test_live_source_reconnects_with_backoff_then_gives_up():
    opened = [FakeCapture(3, start=0), FakeCapture(0, opened=False), FakeCapture(2, start=100),
              FakeCapture(0, opened=False), FakeCapture(0, opened=False)]
    events = []
    cap = LatestFrameCapture("rtsp://cam", open_capture=lambda s: opened.pop(0), drop=False,
                             max_reconnects=3, backoff=(0.01, 0.02), on_event=events.append)
    values = []
    with cap:
        while (got := cap.read(timeout=5)) is not None:
            values.append(int(got[1][0, 0, 0]))
    assert values == [0, 1, 2, 100, 101]
    assert cap.reconnects == 3
    assert "lost after 3 reconnect attempts" in cap.error
    assert any("reconnected" in e for e in events) and any("reconnecting in" in e for e in events)


def test_unopenable_source_is_an_input_error():
    from runtime.errors import InputError

    with pytest.raises(InputError, match="cannot open video source"):
        LatestFrameCapture("nope.mp4", open_capture=lambda s: FakeCapture(0, opened=False)).start()


def test_stop_does_not_hang_on_a_blocked_producer():
    cap = LatestFrameCapture("f.mp4", open_capture=lambda s: FakeCapture(1000)).start()
    assert cap.read(timeout=5) is not None
    t = threading.Thread(target=cap.stop)
    t.start()
    t.join(timeout=5)
    assert not t.is_alive()


def _write_video(path, frames=8, size=(32, 48), fps=10.0):
    h, w = size
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
    assert writer.isOpened()
    for i in range(frames):
        writer.write(np.full((h, w, 3), 20 + i * 10, np.uint8))
    writer.release()
    return path


def _count_frames(path) -> int:
    c = cv2.VideoCapture(str(path))
    n = 0
    while c.read()[0]:
        n += 1
    c.release()
    return n


def test_stream_cli_on_a_video_file(tmp_path, rd_run, fake_factory):
    src = _write_video(tmp_path / "clip.mp4")
    out = tmp_path / "rec" / "out.mp4"
    r = rd_run("stream", "--source", src, "--out", out, "--max-frames", "5", "--json")
    assert r.code == 0, r
    j = r.json
    assert j["frames"] == 5 and j["dropped"] == 0 and j["output"] == str(out) and j["fps"] > 0
    assert _count_frames(out) == 5
    assert [p.name for p in out.parent.iterdir()] == ["out.mp4"]  # no temp file left
    c = cv2.VideoCapture(str(out))
    ok, frame = c.read()
    c.release()
    assert ok and abs(int(frame.mean()) - (255 - 20)) < 6  # the fake inverted it
    assert "rd-run: stream: 5 frames" in r.stderr
    r = rd_run("stream", "--source", src, "--json")  # to the end of the file, no output
    assert r.code == 0 and r.json["frames"] == 8 and r.json["output"] is None


def test_stream_cli_bad_source(tmp_path, rd_run):
    r = rd_run("stream", "--source", tmp_path / "missing.mp4")
    assert r.code == 3 and "rd-run: error: cannot open video source" in r.stderr


def test_stream_without_opencv_is_one_line_exit_6(rd_run, monkeypatch):
    monkeypatch.setitem(sys.modules, "cv2", None)  # import cv2 -> ImportError
    r = rd_run("stream", "--source", "0")
    assert r.code == 6
    assert r.stderr.strip() == ("rd-run: error: stream needs OpenCV: pip install 'raindiffusion-edge[stream]' "
                                "(or pip install opencv-python-headless)")
