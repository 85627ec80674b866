"""Camera loop behind ``rd-run stream``: OpenCV capture thread -> latest-frame slot -> Derainer.

OpenCV is optional (``pip install 'raindiffusion-edge[stream]'``) and imported lazily.

- A capture thread reads frames as fast as the source delivers them and keeps only the newest
  one (older frames are dropped and counted), so a slow model never builds up latency: each
  derained frame is the most recent one. For a video *file* nothing is dropped by default (it is
  not live): the reader waits for the consumer.
- When a live source stops delivering (camera unplugged, RTSP drop), the capture thread releases
  it and reopens it with exponential backoff (0.5 s doubling to 8 s), forever unless
  ``max_reconnects`` is set. The end of a file ends the stream.
- ``run_stream`` derains frames (BGR, as OpenCV delivers them), optionally writes them to a
  video (temporary file renamed at the end) and shows them in a window, and reports the rate.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from runtime.errors import DependencyError, InputError, UsageError

__all__ = ["import_cv2", "parse_source", "is_live", "LatestFrameCapture", "StreamStats", "run_stream"]


def import_cv2():
    """Import OpenCV lazily; a one-line :class:`DependencyError` when it is absent."""
    try:
        import cv2
    except ImportError:
        raise DependencyError("stream needs OpenCV: pip install 'raindiffusion-edge[stream]' "
                              "(or pip install opencv-python-headless)") from None
    return cv2


def parse_source(source: str) -> int | str:
    """'0' -> camera index 0; anything else (rtsp://..., http://..., a file) as given."""
    s = source.strip()
    return int(s) if s.isdigit() else s


def is_live(source: int | str) -> bool:
    return isinstance(source, int) or "://" in str(source) or str(source).startswith("/dev/video")


class _Capture(Protocol):  # the part of cv2.VideoCapture we use
    def isOpened(self) -> bool: ...

    def read(self) -> tuple[bool, np.ndarray | None]: ...

    def release(self) -> None: ...

    def get(self, prop: int) -> float: ...


class LatestFrameCapture:
    """Read frames in a background thread, keeping only the newest (``drop=True``) or all of them.

    ``open_capture(source) -> capture`` defaults to ``cv2.VideoCapture``; tests pass a fake.
    ``read(timeout)`` returns ``(index, frame)`` or ``None`` once the stream has ended.
    """

    def __init__(self, source: int | str, *, open_capture: Callable[[int | str], _Capture] | None = None,
                 drop: bool | None = None, live: bool | None = None, max_reconnects: int | None = None,
                 backoff: tuple[float, float] = (0.5, 8.0), on_event: Callable[[str], None] | None = None) -> None:
        self.source = source
        self.live = is_live(source) if live is None else live
        self.drop = self.live if drop is None else drop
        self.max_reconnects = max_reconnects
        self.backoff = backoff
        self.on_event = on_event or (lambda msg: None)
        if open_capture is None:
            cv2 = import_cv2()
            open_capture = cv2.VideoCapture
        self._open = open_capture
        self._cond = threading.Condition()
        self._frame: np.ndarray | None = None
        self._index = -1  # index of the frame in the slot
        self._taken = -1  # last index handed out
        self._ended = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.error: str | None = None
        self.captured = 0
        self.dropped = 0
        self.reconnects = 0
        self.fps: float | None = None
        self.size: tuple[int, int] | None = None  # (width, height)

    # ---------------------------------------------------------------- lifecycle
    def start(self) -> LatestFrameCapture:
        cap = self._open(self.source)
        if not cap.isOpened():
            cap.release()
            raise InputError(f"cannot open video source {self.source!r}")
        with contextlib.suppress(Exception):
            fps = float(cap.get(5))  # cv2.CAP_PROP_FPS
            self.fps = fps if 0 < fps < 1000 else None
        self._thread = threading.Thread(target=self._loop, args=(cap,), name="rd-capture", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> LatestFrameCapture:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # ---------------------------------------------------------------- consumer side
    def read(self, timeout: float | None = None) -> tuple[int, np.ndarray] | None:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._index == self._taken and not self._ended:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError(f"no frame from {self.source!r} within {timeout} s")
                self._cond.wait(left if left is not None else 0.5)
            if self._index == self._taken:  # ended and nothing new
                return None
            self._taken = self._index
            frame, self._frame = self._frame, None
            self._cond.notify_all()
            return self._index, frame

    # ---------------------------------------------------------------- capture thread
    def _put(self, frame: np.ndarray) -> None:
        with self._cond:
            if not self.drop:
                while self._index != self._taken and not self._stop.is_set():
                    self._cond.wait(0.5)
            elif self._index != self._taken:
                self.dropped += 1  # the consumer never saw the previous frame
            self._index += 1
            self._frame = frame
            self.captured += 1
            self._cond.notify_all()

    def _loop(self, cap: _Capture) -> None:
        delay = self.backoff[0]
        try:
            while not self._stop.is_set():
                ok, frame = cap.read()
                if ok and frame is not None:
                    if self.size is None:
                        self.size = (frame.shape[1], frame.shape[0])
                    delay = self.backoff[0]
                    self._put(frame)
                    continue
                if not self.live:
                    break  # end of file
                # live source dropped: reopen with exponential backoff
                cap.release()
                while not self._stop.is_set():
                    if self.max_reconnects is not None and self.reconnects >= self.max_reconnects:
                        self.error = f"video source {self.source!r} lost after {self.reconnects} reconnect attempts"
                        return
                    self.on_event(f"source {self.source!r} dropped; reconnecting in {delay:.1f} s")
                    if self._stop.wait(delay):
                        return
                    self.reconnects += 1
                    delay = min(delay * 2, self.backoff[1])
                    cap = self._open(self.source)
                    if cap.isOpened():
                        self.on_event(f"source {self.source!r} reconnected")
                        break
                    cap.release()
        except Exception as e:  # a crashing capture thread must not hang the consumer
            self.error = f"capture from {self.source!r} failed: {e.__class__.__name__}: {e}"
        finally:
            with contextlib.suppress(Exception):
                cap.release()
            with self._cond:
                self._ended = True
                self._cond.notify_all()


@dataclass
class StreamStats:
    frames: int = 0
    captured: int = 0
    dropped: int = 0
    reconnects: int = 0
    seconds: float = 0.0
    fps: float = 0.0  # derained frames per second, overall
    derain_ms_mean: float = 0.0
    output: str | None = None
    interrupted: bool = False
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Derainer(Protocol):
    def derain(self, frame: np.ndarray, *, bgr: bool = False) -> np.ndarray: ...


def run_stream(source: str | int, derainer: _Derainer, *, out: str | Path | None = None, display: bool = False,
               max_frames: int | None = None, drop: bool | None = None, max_reconnects: int | None = None,
               open_capture: Callable[[int | str], _Capture] | None = None,
               on_status: Callable[[StreamStats], None] | None = None,
               on_event: Callable[[str], None] | None = None) -> StreamStats:
    """Derain a live or file source until it ends, ``max_frames`` are done, or Ctrl-C.

    On Ctrl-C the output video written so far is finalised and kept (``stats.interrupted``);
    on an error it is removed. ``on_status`` is called about once a second.
    """
    cv2 = import_cv2()
    src = parse_source(source) if isinstance(source, str) else source
    if max_frames is not None and max_frames < 1:
        raise UsageError(f"--max-frames {max_frames} must be >= 1")
    stats = StreamStats()
    writer = None
    tmp: Path | None = None
    dest = Path(out) if out is not None else None
    t0 = time.perf_counter()
    derain_s = 0.0
    last_status = t0
    cap = LatestFrameCapture(src, open_capture=open_capture, drop=drop, max_reconnects=max_reconnects,
                             on_event=on_event)
    ok = False
    try:
        with cap:
            while max_frames is None or stats.frames < max_frames:
                got = cap.read()
                if got is None:
                    break
                _, frame = got
                t1 = time.perf_counter()
                y = derainer.derain(frame, bgr=True)
                derain_s += time.perf_counter() - t1
                if dest is not None:
                    if writer is None:
                        writer, tmp = _open_writer(cv2, dest, y.shape[1], y.shape[0], cap.fps or 25.0)
                    writer.write(np.ascontiguousarray(y))
                stats.frames += 1
                if display and _show(cv2, y):
                    break  # q or Esc in the window
                now = time.perf_counter()
                if on_status is not None and now - last_status >= 1.0:
                    last_status = now
                    _fill(stats, cap, now - t0, derain_s)
                    on_status(stats)
            if cap.error and stats.frames == 0:
                raise InputError(cap.error)
            stats.error = cap.error
        ok = True
    except KeyboardInterrupt:
        stats.interrupted = True
        ok = True  # keep what was recorded
    finally:
        if writer is not None:
            writer.release()
        if tmp is not None and dest is not None:
            if ok and stats.frames:
                os.replace(tmp, dest)
                stats.output = str(dest)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
        if display:
            with contextlib.suppress(Exception):
                cv2.destroyAllWindows()
    _fill(stats, cap, time.perf_counter() - t0, derain_s)
    return stats


def _fill(stats: StreamStats, cap: LatestFrameCapture, seconds: float, derain_s: float) -> None:
    stats.captured, stats.dropped, stats.reconnects = cap.captured, cap.dropped, cap.reconnects
    stats.seconds = seconds
    stats.fps = stats.frames / seconds if seconds > 0 else 0.0
    stats.derain_ms_mean = 1000 * derain_s / stats.frames if stats.frames else 0.0


def _open_writer(cv2, dest: Path, width: int, height: int, fps: float):
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.stem}.{os.getpid()}.tmp{dest.suffix}")
    fourcc = {".avi": "MJPG", ".mkv": "mp4v"}.get(dest.suffix.lower(), "mp4v")
    writer = cv2.VideoWriter(str(tmp), cv2.VideoWriter_fourcc(*fourcc), fps, (width, height))
    if not writer.isOpened():
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise UsageError(f"--out {dest}: OpenCV cannot write this video type (use .mp4 or .avi)")
    return writer, tmp


def _show(cv2, frame: np.ndarray) -> bool:
    """Show a frame; True when the user pressed q or Esc."""
    try:
        cv2.imshow("rd-run stream (q to quit)", frame)
        key = cv2.waitKey(1) & 0xFF
    except cv2.error as e:
        raise DependencyError("--display needs OpenCV with GUI support (pip install opencv-python, "
                              f"not -headless) and a display ({str(e).strip().splitlines()[-1]})") from None
    return key in (ord("q"), 27)
