"""Image reading and atomic writing shared by every entry point (training, export, runtime).

``load_image`` is the one image loader of the toolkit: it applies EXIF orientation exactly
once, converts every Pillow mode to RGB uint8 (alpha returned separately so callers can pass
it through), refuses decompression bombs above a configurable pixel limit, and turns every
decoder failure into an :class:`~runtime.errors.ImageError` naming the file. It also returns the
file's photo metadata (ICC profile, EXIF with the orientation reset to 1, DPI) and its frame count;
``load_frames`` reads every frame of an animated WebP / APNG / multi-page TIFF, and
``save_image`` / ``save_frames`` write them back with the metadata the format can hold.

Temporary files of ``atomic_path`` are named ``.<stem>.<8 random chars>.tmp<suffix>`` beside
their destination; ``own_temporary`` recognises that pattern (so a later run can remove the
leftovers of a killed one).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import tempfile
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from runtime.errors import ImageError, InputError

__all__ = [
    "interrupt",
    "signals_deferred",
    "IMAGE_SUFFIXES",
    "VIDEO_SUFFIXES",
    "DEFAULT_MAX_PIXELS",
    "GRAYSCALE_MODES",
    "ImageMetadata",
    "LoadedImage",
    "LoadedFrames",
    "load_image",
    "load_frames",
    "load_rgb",
    "save_image",
    "save_frames",
    "atomic_write_bytes",
    "atomic_path",
    "own_temporary",
    "missing_reason",
    "iter_image_files",
]

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm"})
VIDEO_SUFFIXES = frozenset({".mp4", ".mov", ".mkv", ".avi"})
#: Refuse images above this many pixels (about 16k x 16k) unless the caller raises the limit.
DEFAULT_MAX_PIXELS = int(os.environ.get("RD_MAX_PIXELS", 268_435_456))


#: Pillow modes whose pixels carry no colour (the 3 RGB channels come back equal).
GRAYSCALE_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})


#: ICC colour-space signatures (bytes 16-19 of the profile header) that fit an RGB / a gray output.
_ICC_SPACE = {"RGB": b"RGB ", "L": b"GRAY"}
#: What each output format's Pillow writer can hold (JPEG, PNG, TIFF: all three; WebP: no DPI).
_META_KEYS = {"JPEG": ("icc_profile", "exif", "dpi"), "MPO": ("icc_profile", "exif", "dpi"),
              "PNG": ("icc_profile", "exif", "dpi"), "TIFF": ("icc_profile", "exif", "dpi"),
              "WEBP": ("icc_profile", "exif"), "BMP": ("dpi",)}


@dataclass
class ImageMetadata:
    """Photo metadata carried from an input to its output: ICC profile, EXIF, DPI.

    ``exif`` has its orientation tag reset to 1, since the loaded pixels are already upright.
    """

    icc_profile: bytes | None = None
    exif: bytes | None = None
    dpi: tuple[float, float] | None = None
    #: what was in the file but could not be read (a malformed EXIF block), one phrase each
    unreadable: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.icc_profile or self.exif or self.dpi)

    def names(self) -> list[str]:
        return [n for n, v in (("icc_profile", self.icc_profile), ("exif", self.exif), ("dpi", self.dpi)) if v]

    def save_kwargs(self, fmt: str, mode: str) -> tuple[dict, dict[str, str]]:
        """Pillow ``save`` keywords for ``fmt`` and an output of ``mode``; plus what cannot be kept
        (name -> why)."""
        keep = _META_KEYS.get(fmt, ())
        kwargs: dict = {}
        dropped: dict[str, str] = {}
        for name in self.names():
            if name not in keep:
                dropped[name] = f"{name}: {fmt} cannot hold it"
                continue
            value = getattr(self, name)
            if name == "icc_profile":
                space = bytes(value[16:20])
                gray = mode in ("L", "LA")
                if space != _ICC_SPACE["L" if gray else "RGB"]:
                    dropped[name] = (f"ICC profile: its colour space {space.decode('latin-1').strip() or '?'} does "
                                     f"not fit the {'gray' if gray else 'RGB'} output")
                    continue
            kwargs[name] = value
        return kwargs, dropped


#: TIFF tags that describe the pixel layout of the file they are in (a TIFF's own IFD0 is its
#: EXIF to Pillow): never carried to another file, whose writer sets its own.
_LAYOUT_TAGS = frozenset({254, 255, 256, 257, 258, 259, 262, 263, 266, 273, 277, 278, 279, 280, 281, 284, 288, 289,
                          290, 291, 292, 293, 317, 318, 319, 320, 322, 323, 324, 325, 338, 339, 340, 341, 530, 531,
                          532, 34675})


def _read_metadata(img: Image.Image) -> ImageMetadata:
    """ICC, EXIF (orientation reset to 1) and DPI of an opened image (the image is not changed)."""
    icc = img.info.get("icc_profile") or None
    exif_bytes = None
    unreadable: list[str] = []
    try:  # a malformed EXIF block is dropped (and said so), never fatal
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            original = img.getexif()
            if len(original):
                exif = Image.Exif()
                exif.load(original.tobytes())  # a copy, with the Exif (camera, date) and GPS sub-IFDs
                for tag in _LAYOUT_TAGS & set(exif):
                    del exif[tag]
                if 0x0112 in exif:
                    exif[0x0112] = 1  # the pixels are returned upright
                if len(exif):
                    exif_bytes = exif.tobytes()
        if caught:
            raise ValueError(str(caught[0].message))
    except Exception as e:
        exif_bytes = None
        unreadable.append(f"EXIF: malformed ({e})")
    dpi = None
    raw_dpi = img.info.get("dpi")
    with contextlib.suppress(TypeError, ValueError):
        if raw_dpi and len(raw_dpi) == 2 and float(raw_dpi[0]) > 0 and float(raw_dpi[1]) > 0:
            dpi = (float(raw_dpi[0]), float(raw_dpi[1]))
    return ImageMetadata(icc_profile=icc, exif=exif_bytes, dpi=dpi, unreadable=unreadable)


@dataclass
class LoadedImage:
    rgb: np.ndarray  # HxWx3 uint8
    alpha: np.ndarray | None  # HxW uint8 or None
    mode: str  # the file's original Pillow mode
    high_bit_depth: bool  # True when the source had more than 8 bits per channel
    grayscale: bool = False  # True when the source had no colour channels (L, LA, I;16, ...)
    metadata: ImageMetadata = field(default_factory=ImageMetadata)
    n_frames: int = 1  # frames in the file (animated WebP / APNG, multi-page TIFF); rgb is the first
    format: str | None = None  # the file's real format as Pillow names it (PNG, JPEG, MPO, TIFF, ...)


@dataclass
class LoadedFrames:
    """Every frame of a multi-frame image (``load_frames``), as :class:`LoadedImage` each."""

    frames: list[LoadedImage]
    format: str | None
    metadata: ImageMetadata
    durations: list[int] | None  # ms per frame (animations), None for page stacks
    loop: int | None


def _raw_modes(img: Image.Image) -> list[str]:
    """The decoder's raw modes (e.g. 'RGB;16B' for a 48-bit PNG that Pillow opens as 8-bit 'RGB')."""
    out = []
    for tile in getattr(img, "tile", None) or []:
        args = tile[3] if len(tile) > 3 else None
        raw = args[0] if isinstance(args, tuple) and args else args
        if isinstance(raw, str):
            out.append(raw)
    return out


# 16/32 bits per channel (PNG 'RGB;16B', TIFF 'RGB;16N', 'I;16B', 'LA;16B'); not BMP's 5-6-5 'BGR;16'.
_DEEP_RAWMODE = re.compile(r"^(1|L|LA|I|F|RGB|RGBA|RGBX|CMYK);(16|32)")


_PIL_LIMIT_LOCK = threading.Lock()


def _open_image(p: Path) -> Image.Image:
    """``Image.open`` (header only) without Pillow's own decompression-bomb check.

    Pillow refuses anything above 2 x ``Image.MAX_IMAGE_PIXELS`` at open time and warns above 1x,
    which would silently cap a limit the caller raised and word the refusal differently; our own
    check in ``load_image`` runs right after the header is read, before any pixel is decoded.
    The global is only touched under a lock, for the duration of the open.
    """
    with _PIL_LIMIT_LOCK:
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            return Image.open(p)
        finally:
            Image.MAX_IMAGE_PIXELS = saved


@contextlib.contextmanager
def _exif_warnings():
    """Collect Pillow's warnings about a malformed EXIF block (yielded as messages) instead of
    letting them reach the user's terminal; other warnings pass on unchanged."""
    problems: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield problems
    for w in caught:
        if "exif" in str(w.message).lower():
            problems.append(str(w.message))
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


def _to_rgb8(img: Image.Image) -> tuple[np.ndarray, np.ndarray | None, bool]:
    mode = img.mode
    alpha = None
    high = False
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img, dtype=np.float64)
        high = True
        peak = 65535.0 if arr.max(initial=0) > 255 or mode.startswith("I;16") else 255.0
        g = np.clip(np.round(arr / peak * 255.0), 0, 255).astype(np.uint8)
        return np.repeat(g[..., None], 3, axis=2), None, high
    if mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        g = np.clip(np.round(arr), 0, 255).astype(np.uint8)
        return np.repeat(g[..., None], 3, axis=2), None, True
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        arr = np.asarray(rgba)
        return np.ascontiguousarray(arr[..., :3]), np.ascontiguousarray(arr[..., 3]), False
    if mode != "RGB":
        img = img.convert("RGB")
    return np.asarray(img, dtype=np.uint8).copy(), alpha, high


def missing_reason(path: str | os.PathLike) -> str:
    """Why ``path`` cannot be opened although it was named: a symbolic-link loop, a link whose
    target is missing, or no such file."""
    p = Path(path)
    if p.is_symlink():
        target = os.readlink(p)
        try:
            os.stat(p)
        except OSError as e:
            if e.errno == errno.ELOOP:
                return f"{p}: symbolic link loop ({p} -> {target} -> ... never reaches a file)"
            return f"{p}: broken symbolic link (its target {target} does not exist)"
    return f"{p}: no such file or directory"


def load_image(path: str | os.PathLike, *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> LoadedImage:
    """Read an image file as RGB uint8 (+ alpha), raising :class:`ImageError` on any failure.

    Multi-frame files give their first frame, with ``n_frames`` saying how many there are
    (``load_frames`` reads them all).
    """
    p = Path(path)
    if not p.exists():
        raise InputError(missing_reason(p))
    if p.is_dir():
        raise InputError(f"{p}: is a directory, not an image")
    if p.stat().st_size == 0:
        raise ImageError(f"{p}: empty file (0 bytes)")
    if max_pixels is not None and max_pixels <= 0:
        max_pixels = None  # 0 or negative: no limit
    try:
        with _exif_warnings() as exif_problems, _open_image(p) as img:
            w, h = img.size
            if max_pixels is not None and w * h > max_pixels:
                raise ImageError(
                    f"{p}: {w}x{h} = {w * h} pixels exceeds the limit of {max_pixels} "
                    f"(raise it with RD_MAX_PIXELS or --max-pixels)"
                )
            # Decide bit depth and colour from the decoder's raw mode before load() drops it:
            # Pillow opens a 48-bit PNG as 8-bit "RGB" and a 16-bit LA PNG as "RGBA".
            raw_modes = _raw_modes(img)
            deep = any(_DEEP_RAWMODE.match(r) for r in raw_modes)
            gray = img.mode in GRAYSCALE_MODES or any(r.startswith(("L;", "LA;", "I;")) for r in raw_modes)
            n_frames, fmt = int(getattr(img, "n_frames", 1) or 1), img.format
            img.load()
            metadata = _read_metadata(img)
            img = ImageOps.exif_transpose(img)  # orientation applied exactly once
            rgb, alpha, high = _to_rgb8(img)
            mode = img.mode
        if exif_problems:  # Pillow warned while parsing the EXIF block when opening the file
            metadata.exif = None
            metadata.unreadable.append(f"EXIF: malformed ({exif_problems[0]})")
    except ImageError:
        raise
    except PermissionError as e:
        raise InputError(f"{p}: cannot read ({e.strerror or e})") from None
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"{p}: not a readable image ({e.__class__.__name__}: {e})") from None
    except (OSError, ValueError, SyntaxError, EOFError, MemoryError) as e:
        raise ImageError(f"{p}: corrupt or truncated image ({e.__class__.__name__}: {e})") from None
    if rgb.shape[0] < 1 or rgb.shape[1] < 1:
        raise ImageError(f"{p}: image has no pixels")
    return LoadedImage(rgb=rgb, alpha=alpha, mode=mode, high_bit_depth=high or deep, grayscale=gray,
                       metadata=metadata, n_frames=n_frames, format=fmt)


def load_frames(path: str | os.PathLike, *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> LoadedFrames:
    """Every frame of an animated WebP / APNG or every page of a multi-page TIFF, as RGB uint8.

    The pixel limit applies to all frames together (an animation is decoded whole). Frames of an
    animation come composited (as shown); pages of a TIFF may differ in size and mode.
    """
    p = Path(path)
    if not p.exists():
        raise InputError(missing_reason(p))
    if max_pixels is not None and max_pixels <= 0:
        max_pixels = None
    frames: list[LoadedImage] = []
    durations: list[int] = []
    try:
        with _open_image(p) as img:
            n = int(getattr(img, "n_frames", 1) or 1)
            fmt, loop = img.format, img.info.get("loop")
            total = 0
            for i in range(n):
                img.seek(i)
                w, h = img.size
                total += w * h
                if max_pixels is not None and total > max_pixels:
                    raise ImageError(f"{p}: {n} frames of {w}x{h} exceed the limit of {max_pixels} pixels in all "
                                     f"(raise it with RD_MAX_PIXELS or --max-pixels)")
                raw_modes = _raw_modes(img)
                deep = any(_DEEP_RAWMODE.match(r) for r in raw_modes)
                gray = img.mode in GRAYSCALE_MODES or any(r.startswith(("L;", "LA;", "I;")) for r in raw_modes)
                img.load()
                metadata = _read_metadata(img) if i == 0 else ImageMetadata()
                frame = ImageOps.exif_transpose(img) if i == 0 else img.copy()
                rgb, alpha, high = _to_rgb8(frame)
                durations.append(int(img.info.get("duration") or 0))
                frames.append(LoadedImage(rgb=rgb, alpha=alpha, mode=frame.mode, high_bit_depth=high or deep,
                                          grayscale=gray, metadata=metadata, n_frames=n, format=fmt))
    except ImageError:
        raise
    except PermissionError as e:
        raise InputError(f"{p}: cannot read ({e.strerror or e})") from None
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"{p}: not a readable image ({e.__class__.__name__}: {e})") from None
    except (OSError, ValueError, SyntaxError, EOFError, MemoryError) as e:
        raise ImageError(f"{p}: corrupt or truncated frame {len(frames) + 1} ({e.__class__.__name__}: {e})") from None
    animated = fmt in ("WEBP", "PNG", "GIF") and any(durations)
    return LoadedFrames(frames=frames, format=fmt, metadata=frames[0].metadata,
                        durations=durations if animated else None, loop=loop)


def load_rgb(path: str | os.PathLike, *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Read an image file as HxWx3 uint8 RGB."""
    return load_image(path, max_pixels=max_pixels).rgb


def _umask_file_mode() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


_FILE_MODE = _umask_file_mode()


#: ``atomic_path``'s temporaries: ``.<stem>.<mkstemp's 8 random characters>.tmp<suffix>``.
_TEMP_NAME = re.compile(r"^\.(?P<stem>.*)\.[a-z0-9_]{8}\.tmp(?P<suffix>\.[^./\\]*)?$")


def own_temporary(name: str) -> str | None:
    """The destination name a temporary file of ``atomic_path`` was for, or None if ``name`` is
    not one (``.img00.k2j4h6g8.tmp.jpg`` -> ``img00.jpg``)."""
    m = _TEMP_NAME.match(name)
    if m is None or not m.group("stem"):
        return None
    return m.group("stem") + (m.group("suffix") or "")


class _Deferral:
    """State of :func:`signals_deferred` (main thread only: Python runs signal handlers there)."""

    depth = 0
    pending: BaseException | None = None


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def interrupt(exc: BaseException) -> None:
    """What the CLIs' Ctrl-C / SIGTERM handlers call: raise ``exc`` now, or, inside a
    :func:`signals_deferred` block, at its end."""
    if _in_main_thread() and _Deferral.depth:
        if _Deferral.pending is None:
            _Deferral.pending = exc
        return
    _Deferral.pending = None
    raise exc


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold Ctrl-C and SIGTERM back while a few lines of bookkeeping run that must not be cut in
    half (a file created and not yet tracked, a lock fd closed and not yet forgotten): the
    exception of a signal that arrives meanwhile is raised right after the block.

    The CLIs raise from their handlers, which Python runs between any two bytecodes of the main
    thread; without this, SIGTERM between ``os.close(fd)`` and ``fd = None`` made the cleanup close
    the fd a second time (EBADF, exit 1 instead of 143), and between ``os.open`` of a lock file and
    keeping its fd the lock file stayed behind. The deferral is in the handlers (:func:`interrupt`),
    not in the signal mask: in a process with engine threads the kernel hands a blocked signal to
    another thread, whose handler still trips the main thread's. A plain block outside the main
    thread; handlers that do not call :func:`interrupt` (Python's own Ctrl-C outside the CLIs) are
    not deferred.
    """
    if not _in_main_thread():
        yield
        return
    _Deferral.depth += 1
    try:
        yield
    finally:
        _Deferral.depth -= 1
        if not _Deferral.depth and _Deferral.pending is not None:
            exc, _Deferral.pending = _Deferral.pending, None
            raise exc


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike, *, before_replace: Callable[[Path], None] | None = None):
    """Yield a temporary path beside ``dest``; rename it onto ``dest`` only on success.

    On any exception (KeyboardInterrupt included) the temporary file is removed, so an
    interrupted run never leaves partial outputs. ``before_replace(tmp)``, if given, runs on the
    finished temporary file just before the rename (it may raise to cancel it).
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp: str | None = None
    try:
        with signals_deferred():  # the temporary is created and named at once; an interrupt comes after
            fd, tmp = tempfile.mkstemp(prefix=f".{dest.stem}.", suffix=f".tmp{dest.suffix}", dir=dest.parent)
            os.close(fd)
        yield Path(tmp)
        # mkstemp creates 0600; give the result the permissions a plain open() would have.
        with contextlib.suppress(OSError):
            os.chmod(tmp, _FILE_MODE)
        if before_replace is not None:
            before_replace(Path(tmp))
        os.replace(tmp, dest)
    except BaseException:
        if tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        raise


def atomic_write_bytes(dest: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(dest) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    return Path(dest)


def _to_pil(rgb: np.ndarray, alpha: np.ndarray | None, fmt: str) -> Image.Image:
    gray = rgb.ndim == 2
    if rgb.dtype != np.uint8 or not (gray or (rgb.ndim == 3 and rgb.shape[2] == 3)):
        raise ValueError(f"save_image expects HxWx3 or HxW uint8, got {rgb.dtype} {rgb.shape}")
    img = Image.fromarray(rgb, "L" if gray else "RGB")
    if alpha is not None:
        img.putalpha(Image.fromarray(alpha, "L"))
    if fmt in ("JPEG", "MPO") and img.mode in ("RGBA", "LA"):
        img = img.convert(img.mode[:-1])
    return img


def _format_for(dest: Path, fmt: str | None) -> str:
    suffix_fmt = Image.registered_extensions().get(dest.suffix.lower())
    if suffix_fmt is None:
        raise ValueError(f"{dest}: unknown image suffix {dest.suffix!r}")
    # an MPO (a camera JPEG with extra frames) is a .jpg: keep it MPO; otherwise the suffix decides
    return "MPO" if fmt == "MPO" and suffix_fmt == "JPEG" else suffix_fmt


def save_image(dest: str | os.PathLike, rgb: np.ndarray, *, alpha: np.ndarray | None = None,
               quality: int = 95, metadata: ImageMetadata | None = None,
               before_replace: Callable[[Path], None] | None = None,
               dropped: dict[str, str] | None = None) -> Path:
    """Write HxWx3 uint8 RGB, or HxW uint8 grayscale, (plus optional HxW alpha) atomically.

    The format comes from the suffix; formats without alpha (JPEG) drop it. ``metadata`` (ICC,
    EXIF, DPI) is written where the format holds it; what could not be kept goes into ``dropped``
    (name -> why) when a dict is given. ``before_replace``: see :func:`atomic_path`.
    """
    dest = Path(dest)
    fmt = _format_for(dest, None)
    img = _to_pil(rgb, alpha, fmt)
    kwargs = {"quality": quality} if fmt in ("JPEG", "WEBP") else {}
    if metadata:
        meta_kwargs, lost = metadata.save_kwargs(fmt, img.mode)
        kwargs.update(meta_kwargs)
        if dropped is not None:
            dropped.update(lost)
    with atomic_path(dest, before_replace=before_replace) as tmp:
        img.save(tmp, format=fmt, **kwargs)
    return dest


def save_frames(dest: str | os.PathLike, frames: Sequence[tuple[np.ndarray, np.ndarray | None]], *,
                fmt: str | None = None, durations: Sequence[int] | None = None, loop: int | None = None,
                quality: int = 95, metadata: ImageMetadata | None = None,
                before_replace: Callable[[Path], None] | None = None,
                dropped: dict[str, str] | None = None) -> Path:
    """Write several frames ``[(rgb or gray, alpha or None), ...]`` into one file (animated WebP /
    APNG, multi-page TIFF, MPO) atomically; ``durations`` (ms) and ``loop`` for animations.

    Raises :class:`ImageError` when the destination's format cannot hold several frames.
    ``metadata`` and ``dropped`` as in :func:`save_image`.
    """
    dest = Path(dest)
    fmt = _format_for(dest, fmt)
    Image.init()
    if fmt not in Image.SAVE_ALL:
        raise ImageError(f"{dest}: {fmt} cannot hold {len(frames)} frames; refusing to write only the first")
    images = [_to_pil(rgb, alpha, fmt) for rgb, alpha in frames]
    kwargs: dict = {"save_all": True, "append_images": images[1:]}
    if fmt in ("JPEG", "MPO", "WEBP"):
        kwargs["quality"] = quality
    if durations is not None and fmt in ("WEBP", "PNG", "GIF"):
        kwargs["duration"] = list(durations)
        if loop is not None:
            kwargs["loop"] = loop
    if metadata:
        meta_kwargs, lost = metadata.save_kwargs(fmt, images[0].mode)
        kwargs.update(meta_kwargs)
        if dropped is not None:
            dropped.update(lost)
    with atomic_path(dest, before_replace=before_replace) as tmp:
        images[0].save(tmp, format=fmt, **kwargs)
    return dest


def iter_image_files(folder: str | os.PathLike) -> list[Path]:
    """Image files directly inside ``folder`` (sorted, hidden files skipped)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: not a directory")
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES)
