"""Video deraining, frame by frame, with PyAV (optional: ``pip install 'raindiffusion-edge[video]'``).

One pass, no temporary frame folders: packets are demuxed in file order, video frames are decoded,
derained (in groups of ``batch``) and re-encoded with their original timestamps, so the output has
the same frame count and frame rate; audio packets are remuxed untouched (no re-encoding). The
output is written to a temporary file beside the destination and renamed only when complete.

A truncated or damaged input (fewer frames decoded than the container declares, by count or by
duration) still gives an output of the frames there were, with a warning in the result saying
how many were missing; ``rd-run derain`` marks such a file ``partial``.

Not kept: subtitle/data streams, and the rotation side data of phone videos (frames come out
as stored, unrotated).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from runtime.errors import DependencyError, InputError
from runtime.io import atomic_path

__all__ = ["VideoInfo", "VideoResult", "import_av", "probe_video", "derain_video", "ENCODERS"]


class _Derainer(Protocol):
    def derain(self, frame: np.ndarray) -> np.ndarray: ...

    def derain_batch(self, frames: Sequence[np.ndarray]) -> list[np.ndarray]: ...


#: input codec -> encoder we re-encode it with (first one available); anything else -> libx264/mpeg4.
ENCODERS: dict[str, tuple[str, ...]] = {
    "h264": ("libx264",),
    "hevc": ("libx265", "libx264"),
    "mpeg4": ("mpeg4",),
    "mjpeg": ("mjpeg",),
    "vp9": ("libvpx-vp9",),
    "vp8": ("libvpx",),
}
_FALLBACK = {".avi": ("mpeg4", "mjpeg"), ".mp4": ("libx264", "mpeg4"), ".mov": ("libx264", "mpeg4"),
             ".mkv": ("libx264", "mpeg4")}
_CRF = {"libx264": "18", "libx265": "20"}


def import_av():
    """Import PyAV lazily; a one-line :class:`DependencyError` when it is absent."""
    try:
        import av
    except ImportError:
        raise DependencyError("video needs PyAV: pip install 'raindiffusion-edge[video]' (or pip install av)") from None
    return av


@dataclass
class VideoInfo:
    frames: int  # counted by decoding when the container does not say
    fps: float | None
    width: int
    height: int
    codec: str
    audio_streams: int
    audio_codecs: list[str]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class VideoResult:
    frames: int
    fps: float | None
    width: int
    height: int
    codec: str  # encoder used for the output
    audio_streams: int  # audio streams passed through
    seconds: float
    expected_frames: int | None = None  # what the container declares (count, or duration x rate)
    warnings: list[str] = field(default_factory=list)  # a truncated or damaged input

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_HMS = re.compile(r"^(\d+):(\d\d):(\d\d(?:\.\d+)?)$")


def declared_frames(container, stream, rate) -> tuple[int | None, str]:
    """How many frames the container says the video stream has, and where that comes from.

    The stream's frame count (mp4, mov) when set; else its duration (the stream's own, or the
    DURATION tag Matroska muxers write) times the frame rate; else the container's duration.
    ``(None, "")`` when nothing is declared.
    """
    if stream.frames:
        return int(stream.frames), "frame count"
    fps = float(rate) if rate else None
    if not fps:
        return None, ""
    seconds = None
    where = ""
    if stream.duration and stream.time_base:
        seconds, where = float(stream.duration * stream.time_base), "stream duration"
    else:
        m = _HMS.match(str(stream.metadata.get("DURATION") or stream.metadata.get("duration") or ""))
        if m:
            seconds = int(m.group(1)) * 3600 + int(m.group(2)) * 60 + float(m.group(3))
            where = "stream duration"
        elif container.duration:
            seconds, where = container.duration / 1_000_000, "container duration"
    if not seconds or seconds <= 0:
        return None, ""
    return round(seconds * fps), f"{where} {seconds:.3f} s at {fps:g} fps"


def truncation_warning(src: Path, decoded: int, declared: int | None, where: str) -> str | None:
    """A warning when fewer frames were decoded than declared (by more than 1 frame or 2%)."""
    if declared is None or decoded >= declared - max(1, round(0.02 * declared)):
        return None
    return (f"{src}: truncated or damaged input: decoded {decoded} of the {declared} frames its container "
            f"declares ({where}); the output has the {decoded} frames there were")


def _fps(stream) -> float | None:
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    return float(rate) if rate else None


def probe_video(path: str | Path, *, count: bool = True) -> VideoInfo:
    """Frame count, fps, size and audio streams of a video (decodes to count frames when asked)."""
    av = import_av()
    path = Path(path)
    try:
        with av.open(str(path)) as c:
            if not c.streams.video:
                raise InputError(f"{path}: no video stream")
            v = c.streams.video[0]
            frames = v.frames
            if count:
                frames = sum(1 for _ in c.decode(v))
            audio = list(c.streams.audio)
            return VideoInfo(frames=int(frames), fps=_fps(v), width=v.codec_context.width,
                             height=v.codec_context.height, codec=v.codec_context.name,
                             audio_streams=len(audio), audio_codecs=[a.codec_context.name for a in audio])
    except av.error.FFmpegError as e:
        raise InputError(f"{path}: not a readable video ({e})") from None


def _pick_encoder(av, in_codec: str, suffix: str) -> str:
    for name in ENCODERS.get(in_codec, ()) + _FALLBACK.get(suffix.lower(), ("libx264", "mpeg4")):
        try:
            av.codec.Codec(name, "w")
        except Exception:
            continue
        return name
    raise DependencyError(f"no video encoder available for {suffix} (tried libx264, mpeg4); "
                          f"install a PyAV build with one")


def derain_video(src: str | Path, dest: str | Path, derainer: _Derainer, *, batch: int = 1,
                 on_frame: Callable[[int, int | None], None] | None = None,
                 before_replace: Callable[[Path], None] | None = None) -> VideoResult:
    """Derain every frame of ``src`` into ``dest`` (same container type), keeping timing and audio.

    ``on_frame(done, total)`` is called after each derained frame (``total`` may be None).
    Raises :class:`InputError` for an unreadable/corrupt video, :class:`DependencyError` without
    PyAV. On any error or interrupt nothing is left at ``dest`` (nor any temporary file). Fewer
    frames than the container declares give a result with a warning (``warnings``).
    ``before_replace``: see :func:`runtime.io.atomic_path`.
    """
    av = import_av()
    src, dest = Path(src), Path(dest)
    t0 = time.perf_counter()
    try:
        inp = av.open(str(src))
    except av.error.FFmpegError as e:
        raise InputError(f"{src}: not a readable video ({e})") from None
    done = 0
    with inp:
        if not inp.streams.video:
            raise InputError(f"{src}: no video stream")
        vin = inp.streams.video[0]
        vin.thread_type = "AUTO"
        audio_in = list(inp.streams.audio)
        rate = vin.average_rate or vin.guessed_rate or Fraction(25, 1)
        declared, declared_from = declared_frames(inp, vin, rate)
        total = declared
        width, height = vin.codec_context.width, vin.codec_context.height
        encoder = _pick_encoder(av, vin.codec_context.name, dest.suffix)

        with atomic_path(dest, before_replace=before_replace) as tmp, \
                av.open(str(tmp), "w", format=_container_format(dest)) as out:
            out.metadata.update({k: v for k, v in inp.metadata.items() if k not in ("encoder",)})
            vout = out.add_stream(encoder, rate=rate)
            vout.width, vout.height = width, height
            supported = [f.name for f in (vout.codec_context.codec.video_formats or [])]
            vout.pix_fmt = _pick_pix_fmt(vin.codec_context.pix_fmt, supported, odd=bool(width % 2 or height % 2))
            vout.time_base = vin.time_base or Fraction(1, 1000)
            opts = {"crf": _CRF[encoder]} if encoder in _CRF else {}
            if encoder not in _CRF:
                vout.bit_rate = max(int(vin.bit_rate or 0), 4_000_000)
            vout.options = opts
            audio_out = {s.index: out.add_stream_from_template(s) for s in audio_in}

            pending: list[tuple[Any, np.ndarray]] = []  # (source frame, rgb) waiting for inference
            counter = 0

            def flush() -> None:
                nonlocal done
                if not pending:
                    return
                rgbs = [rgb for _, rgb in pending]
                outs = derainer.derain_batch(rgbs) if len(rgbs) > 1 else [derainer.derain(rgbs[0])]
                for (frame, _), y in zip(pending, outs):
                    nf = av.VideoFrame.from_ndarray(np.ascontiguousarray(y, dtype=np.uint8), format="rgb24")
                    nf.pts, nf.time_base = frame.pts, frame.time_base
                    for pkt in vout.encode(nf.reformat(format=vout.pix_fmt)):
                        out.mux(pkt)
                    done += 1
                    if on_frame is not None:
                        on_frame(done, total)
                pending.clear()

            try:
                for packet in inp.demux(vin, *audio_in):
                    if packet.stream.type == "audio":
                        if packet.dts is None:  # demuxer flush packet
                            continue
                        packet.stream = audio_out[packet.stream.index]
                        out.mux(packet)
                        continue
                    for frame in packet.decode():
                        if frame.pts is None:  # no timestamps (some AVI): number the frames
                            frame.pts, frame.time_base = counter, 1 / Fraction(rate)
                        counter += 1
                        pending.append((frame, frame.to_ndarray(format="rgb24")))
                        if len(pending) >= batch:
                            flush()
                flush()
                for pkt in vout.encode(None):
                    out.mux(pkt)
            except av.error.FFmpegError as e:
                raise InputError(f"{src}: video error near frame {counter} ({e})") from None
            if counter == 0:
                raise InputError(f"{src}: no video frames could be decoded")
    warning = truncation_warning(src, done, declared, declared_from)
    return VideoResult(frames=done, fps=float(rate), width=width, height=height, codec=encoder,
                       audio_streams=len(audio_in), seconds=time.perf_counter() - t0, expected_frames=declared,
                       warnings=[warning] if warning else [])


_PIX_8BIT = ("yuv420p", "yuvj420p", "yuv422p", "yuvj422p", "yuv444p", "yuvj444p")


def _pick_pix_fmt(in_fmt: str | None, supported: list[str], *, odd: bool) -> str:
    """The input's 8-bit pixel format when the encoder takes it, else yuv420p; 4:4:4 for odd sizes
    (chroma subsampling needs even width and height)."""
    candidates = [f for f in (in_fmt, *_PIX_8BIT) if f in _PIX_8BIT and (not supported or f in supported)]
    if odd:
        candidates = [f for f in candidates if f.endswith("444p")] or candidates
    return candidates[0] if candidates else (supported[0] if supported else "yuv420p")


def _container_format(dest: Path) -> str | None:
    return {".mp4": "mp4", ".mov": "mov", ".mkv": "matroska", ".avi": "avi"}.get(dest.suffix.lower())
