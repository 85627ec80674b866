"""Image reading and atomic writing shared by every entry point (training, export, runtime).

``load_image`` is the one image loader of the toolkit: it applies EXIF orientation exactly
once, converts every Pillow mode to RGB uint8 (alpha returned separately so callers can pass
it through), refuses decompression bombs above a configurable pixel limit, and turns every
decoder failure into an :class:`~runtime.errors.ImageError` naming the file.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from runtime.errors import ImageError, InputError

__all__ = [
    "IMAGE_SUFFIXES",
    "VIDEO_SUFFIXES",
    "DEFAULT_MAX_PIXELS",
    "GRAYSCALE_MODES",
    "LoadedImage",
    "load_image",
    "load_rgb",
    "save_image",
    "atomic_write_bytes",
    "atomic_path",
    "iter_image_files",
]

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm"})
VIDEO_SUFFIXES = frozenset({".mp4", ".mov", ".mkv", ".avi"})
#: Refuse images above this many pixels (about 16k x 16k) unless the caller raises the limit.
DEFAULT_MAX_PIXELS = int(os.environ.get("RD_MAX_PIXELS", 268_435_456))


#: Pillow modes whose pixels carry no colour (the 3 RGB channels come back equal).
GRAYSCALE_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})


@dataclass
class LoadedImage:
    rgb: np.ndarray  # HxWx3 uint8
    alpha: np.ndarray | None  # HxW uint8 or None
    mode: str  # the file's original Pillow mode
    high_bit_depth: bool  # True when the source had more than 8 bits per channel
    grayscale: bool = False  # True when the source had no colour channels (L, LA, I;16, ...)


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


def load_image(path: str | os.PathLike, *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> LoadedImage:
    """Read an image file as RGB uint8 (+ alpha), raising :class:`ImageError` on any failure."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: no such file")
    if p.is_dir():
        raise InputError(f"{p}: is a directory, not an image")
    if p.stat().st_size == 0:
        raise ImageError(f"{p}: empty file (0 bytes)")
    if max_pixels is not None and max_pixels <= 0:
        max_pixels = None  # 0 or negative: no limit
    try:
        with _open_image(p) as img:
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
            img.load()
            img = ImageOps.exif_transpose(img)  # orientation applied exactly once
            rgb, alpha, high = _to_rgb8(img)
            mode = img.mode
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
    return LoadedImage(rgb=rgb, alpha=alpha, mode=mode, high_bit_depth=high or deep, grayscale=gray)


def load_rgb(path: str | os.PathLike, *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Read an image file as HxWx3 uint8 RGB."""
    return load_image(path, max_pixels=max_pixels).rgb


def _umask_file_mode() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


_FILE_MODE = _umask_file_mode()


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike):
    """Yield a temporary path beside ``dest``; rename it onto ``dest`` only on success.

    On any exception (KeyboardInterrupt included) the temporary file is removed, so an
    interrupted run never leaves partial outputs.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.stem}.", suffix=f".tmp{dest.suffix}", dir=dest.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        # mkstemp creates 0600; give the result the permissions a plain open() would have.
        with contextlib.suppress(OSError):
            os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, dest)
    except BaseException:
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


def save_image(dest: str | os.PathLike, rgb: np.ndarray, *, alpha: np.ndarray | None = None,
               quality: int = 95) -> Path:
    """Write HxWx3 uint8 RGB, or HxW uint8 grayscale, (plus optional HxW alpha) atomically.

    The format comes from the suffix; formats without alpha (JPEG) drop it.
    """
    dest = Path(dest)
    gray = rgb.ndim == 2
    if rgb.dtype != np.uint8 or not (gray or (rgb.ndim == 3 and rgb.shape[2] == 3)):
        raise ValueError(f"save_image expects HxWx3 or HxW uint8, got {rgb.dtype} {rgb.shape}")
    img = Image.fromarray(rgb, "L" if gray else "RGB")
    if alpha is not None:
        img.putalpha(Image.fromarray(alpha, "L"))
    fmt = Image.registered_extensions().get(dest.suffix.lower())
    if fmt is None:
        raise ValueError(f"{dest}: unknown image suffix {dest.suffix!r}")
    if fmt == "JPEG" and img.mode in ("RGBA", "LA"):
        img = img.convert(img.mode[:-1])
    kwargs = {"quality": quality} if fmt in ("JPEG", "WEBP") else {}
    with atomic_path(dest) as tmp:
        img.save(tmp, format=fmt, **kwargs)
    return dest


def iter_image_files(folder: str | os.PathLike) -> list[Path]:
    """Image files directly inside ``folder`` (sorted, hidden files skipped)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: not a directory")
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES)
