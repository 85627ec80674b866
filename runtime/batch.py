"""Input discovery and the never-lose-work batch runner behind ``rd-run derain``.

Rules (Ana's cron jobs depend on them):

- Inputs are files, folders (top level only unless ``recursive``) or glob patterns. Hidden files
  (our own temporary files included) are never inputs; an output directory inside an input
  folder is excluded from discovery, so outputs are never fed back as inputs.
- Output of ``<root>/<rel>`` is ``<outdir>/<rel>`` with the same extension (``suffix`` is added to
  the stem). An output path that is the input file itself is refused.
- Every output is written to a temporary file beside it and renamed when complete, so an
  interrupted run leaves either the finished file or nothing.
- One bad file is reported (status ``failed`` with the message) and the batch goes on; the report's
  exit code is then 7. ``skip_existing`` skips inputs whose output already exists (resume).
- Colour: alpha (RGBA, LA, P with transparency) is passed through untouched; grayscale inputs
  (L, LA, I;16, ...) are derained as RGB and written back as grayscale (luma, ITU-R 601-2);
  inputs with more than 8 bits per channel are written as 8-bit, with a warning.
"""

from __future__ import annotations

import glob
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image

from runtime.errors import InputError, RDError, UsageError
from runtime.io import DEFAULT_MAX_PIXELS, IMAGE_SUFFIXES, VIDEO_SUFFIXES, LoadedImage, load_image, save_image

__all__ = [
    "FrameDerainer",
    "WorkItem",
    "FileResult",
    "BatchReport",
    "BatchObserver",
    "BatchRunner",
    "discover_inputs",
    "output_path_for",
    "check_suffix",
    "kind_of",
]


class FrameDerainer(Protocol):
    """What the batch layer needs from :class:`runtime.derainer.Derainer` (and what test fakes provide)."""

    def derain(self, frame: np.ndarray) -> np.ndarray: ...

    def derain_batch(self, frames: Sequence[np.ndarray]) -> list[np.ndarray]: ...


def kind_of(path: Path) -> str:
    s = path.suffix.lower()
    return "image" if s in IMAGE_SUFFIXES else "video" if s in VIDEO_SUFFIXES else "unsupported"


@dataclass(frozen=True)
class WorkItem:
    source: Path  # the input file as found
    rel: Path  # its name relative to the input root: the output goes to <outdir>/<rel>
    kind: str  # "image" | "video" | "unsupported"


def _is_hidden(p: Path) -> bool:
    return p.name.startswith(".")


def _inside(child: Path, parent: Path) -> bool:
    try:
        child.relative_to(parent)
        return True
    except ValueError:
        return False


def _walk(root: Path, recursive: bool, prune: Path | None) -> list[Path]:
    """Media files under ``root`` (sorted), skipping hidden entries and the ``prune`` directory."""
    if not recursive:
        return sorted(p for p in root.iterdir() if p.is_file() and not _is_hidden(p) and kind_of(p) != "unsupported")
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".")
                             and not (prune is not None and (here / d).resolve() == prune))
        found += [here / f for f in filenames if not f.startswith(".") and kind_of(here / f) != "unsupported"]
    return sorted(found)


def _glob_base(pattern: str) -> Path:
    """The directory part of a pattern before its first wildcard ('data/2024/*/cam*.jpg' -> data/2024)."""
    parts = Path(pattern).parts
    base: list[str] = []
    for part in parts[:-1]:
        if glob.has_magic(part):
            break
        base.append(part)
    return Path(*base) if base else Path(".")


def discover_inputs(inputs: Sequence[str | os.PathLike], *, outdir: str | os.PathLike | None = None,
                    recursive: bool = False, suffix: str = "") -> tuple[list[WorkItem], list[str]]:
    """Expand files, folders and globs into work items; returns ``(items, warnings)``.

    A literal path that does not exist raises :class:`InputError`; a glob that matches nothing,
    or a folder without media files, is a warning. A folder that *is* the output directory needs
    ``suffix`` (else every output would replace its input: :class:`UsageError`), and files whose
    stem already ends with ``suffix`` are then taken as earlier outputs and skipped.
    """
    check_suffix(suffix)
    out_resolved = Path(outdir).resolve() if outdir is not None else None
    items: list[WorkItem] = []
    warnings: list[str] = []
    seen: set[Path] = set()

    def add(path: Path, rel: Path) -> None:
        r = path.resolve()
        if r in seen:
            return
        seen.add(r)
        items.append(WorkItem(source=path, rel=rel, kind=kind_of(path)))

    def add_folder(root: Path, rel_base: Path) -> int:
        root_r = root.resolve()
        prune = None
        if out_resolved is not None:
            if out_resolved == root_r:
                if not suffix:
                    raise UsageError(f"output directory {outdir} is the input folder {root}: outputs would replace "
                                     f"the inputs; choose another -o or add --suffix (e.g. --suffix _derained)")
            elif _inside(out_resolved, root_r):
                prune = out_resolved  # outputs inside the input folder are never re-read
        n = 0
        for f in _walk(root, recursive, prune):
            if prune is not None and _inside(f.resolve(), prune):
                continue
            if out_resolved == root_r and f.stem.endswith(suffix):
                continue  # an earlier output written beside its input
            add(f, rel_base / f.relative_to(root))
            n += 1
        return n

    for raw in inputs:
        s = os.fspath(raw)
        p = Path(s)
        if p.is_dir():
            if add_folder(p, Path()) == 0:
                warnings.append(f"{p}: no image or video files{'' if recursive else ' (top level; use --recursive)'}")
        elif p.is_file():
            add(p, Path(p.name))
        elif glob.has_magic(s):
            base = _glob_base(s)
            matches = sorted(Path(m) for m in glob.glob(s, recursive=True))
            n = 0
            for m in matches:
                if _is_hidden(m):
                    continue
                if m.is_dir():
                    if out_resolved is not None and _inside(m.resolve(), out_resolved):
                        continue  # the output directory (or a folder in it) matched the pattern
                    n += add_folder(m, m.relative_to(base) if _inside(m, base) else Path(m.name))
                elif m.is_file() and kind_of(m) != "unsupported":
                    if out_resolved is not None and _inside(m.resolve(), out_resolved) and not _inside(base.resolve(),
                                                                                                     out_resolved):
                        continue
                    add(m, m.relative_to(base) if _inside(m, base) else Path(m.name))
                    n += 1
            if n == 0:
                warnings.append(f"{s}: pattern matched no image or video files")
        else:
            raise InputError(f"{s}: no such file or directory")
    return items, warnings


def check_suffix(suffix: str) -> None:
    """An output-name suffix is plain text: a path separator would move the output out of OUTDIR."""
    if any(c in suffix for c in "/\\\0"):
        raise UsageError(f"--suffix {suffix!r}: must be plain text added to the file name (no '/' or '\\')")


def output_path_for(item: WorkItem, outdir: str | os.PathLike, suffix: str = "") -> Path:
    rel = item.rel
    return Path(outdir) / rel.parent / f"{rel.stem}{suffix}{rel.suffix}"


# ----------------------------------------------------------------------------- results


@dataclass
class FileResult:
    input: str
    output: str | None
    kind: str
    status: str = "pending"  # ok | skipped | failed
    error: str | None = None
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)  # width, height, alpha, bit depth / frames, fps, audio

    def to_dict(self) -> dict[str, Any]:
        d = {"input": self.input, "output": self.output, "kind": self.kind, "status": self.status,
             "error": self.error, "seconds": round(self.seconds, 4), "warnings": self.warnings}
        d.update(self.details)
        return d


@dataclass
class BatchReport:
    files: list[FileResult] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0
    interrupted: bool = False
    total: int = 0  # inputs planned (some may be unprocessed when interrupted)

    def count(self, status: str) -> int:
        return sum(1 for f in self.files if f.status == status)

    @property
    def exit_code(self) -> int:
        if self.interrupted:
            return 130
        return 7 if self.count("failed") else 0

    def totals(self) -> dict[str, Any]:
        done = self.count("ok") + self.count("skipped") + self.count("failed")
        return {"files": self.total, "ok": self.count("ok"), "skipped": self.count("skipped"),
                "failed": self.count("failed"), "not_processed": self.total - done,
                "seconds": round(self.seconds, 3)}

    def to_dict(self) -> dict[str, Any]:
        return {"files": [f.to_dict() for f in self.files], "totals": self.totals(), "warnings": self.warnings,
                "interrupted": self.interrupted, "exit_code": self.exit_code}


class BatchObserver:
    """Progress hooks (no-ops); the CLI implements them with rich on stderr."""

    def start(self, total: int) -> None: ...

    def file_started(self, item: WorkItem, index: int) -> None: ...

    def frames(self, done: int, total: int | None) -> None: ...

    def file_done(self, result: FileResult) -> None: ...


# ----------------------------------------------------------------------------- runner


def _to_gray(rgb: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(rgb, "RGB").convert("L"))


@dataclass
class _Pending:
    item: WorkItem
    dest: Path
    result: FileResult
    image: LoadedImage
    t0: float


class BatchRunner:
    """Derain a list of work items into ``outdir``; ``report`` is filled as it goes.

    ``make_derainer`` is called once, only when a file actually needs processing (a resumed run
    whose outputs all exist loads no model). Errors creating the derainer propagate (they are not
    about one file); errors on one file are recorded in its :class:`FileResult`. On
    ``KeyboardInterrupt`` the report is marked ``interrupted`` and the exception propagates; no
    partial output or temporary file is left behind.
    """

    def __init__(self, items: Sequence[WorkItem], outdir: str | os.PathLike, make_derainer: Callable[[], FrameDerainer],
                 *, suffix: str = "", skip_existing: bool = False, max_pixels: int | None = DEFAULT_MAX_PIXELS,
                 batch: int = 1, observer: BatchObserver | None = None) -> None:
        if batch < 1:
            raise UsageError(f"batch {batch} must be >= 1")
        self.items = list(items)
        self.outdir = Path(outdir)
        self.make_derainer = make_derainer
        self.suffix = suffix
        self.skip_existing = skip_existing
        self.max_pixels = max_pixels
        self.batch = batch
        self.observer = observer or BatchObserver()
        self.report = BatchReport(total=len(self.items))
        self._derainer: FrameDerainer | None = None
        self._pending: list[_Pending] = []

    @property
    def derainer(self) -> FrameDerainer:
        if self._derainer is None:
            self._derainer = self.make_derainer()
        return self._derainer

    # ------------------------------------------------------------------ main loop
    def run(self) -> BatchReport:
        t_start = time.perf_counter()
        self.observer.start(len(self.items))
        claimed: dict[Path, str] = {}  # output path -> input that claimed it
        try:
            for index, item in enumerate(self.items):
                dest = output_path_for(item, self.outdir, self.suffix)
                result = FileResult(input=str(item.source), output=str(dest), kind=item.kind)
                self.report.files.append(result)
                self.observer.file_started(item, index)
                t0 = time.perf_counter()
                problem = self._refusal(item, dest, claimed)
                if problem is not None:
                    self._finish(result, "failed", t0, error=problem)
                    continue
                claimed[dest.resolve()] = str(item.source)
                if self.skip_existing and dest.is_file() and dest.stat().st_size > 0:
                    self._finish(result, "skipped", t0)
                    continue
                if item.kind == "video":
                    self._flush()
                    self._run_video(item, dest, result, t0)
                else:
                    self._queue_image(item, dest, result, t0)
            self._flush()
        except KeyboardInterrupt:
            self.report.interrupted = True
            for p in self._pending:
                p.result.status, p.result.error = "failed", "interrupted before it was written"
            raise
        finally:
            self.report.seconds = time.perf_counter() - t_start
        return self.report

    def _refusal(self, item: WorkItem, dest: Path, claimed: dict[Path, str]) -> str | None:
        if item.kind == "unsupported":
            return (f"unsupported file type {item.source.suffix or '(no suffix)'!r} "
                    f"(images: {', '.join(sorted(IMAGE_SUFFIXES))}; videos: {', '.join(sorted(VIDEO_SUFFIXES))})")
        src_r, dest_r = item.source.resolve(), dest.resolve()
        if src_r == dest_r or (dest.exists() and os.path.samefile(item.source, dest)):
            return f"refusing to overwrite the input: output {dest} is the input file; choose another -o or --suffix"
        if dest_r in claimed:
            return f"output {dest} is already written from {claimed[dest_r]} (same name); derain them separately"
        return None

    def _finish(self, result: FileResult, status: str, t0: float, *, error: str | None = None) -> None:
        result.status, result.error = status, error
        result.seconds += time.perf_counter() - t0
        self.observer.file_done(result)

    # ------------------------------------------------------------------ images
    def _queue_image(self, item: WorkItem, dest: Path, result: FileResult, t0: float) -> None:
        try:
            image = load_image(item.source, max_pixels=self.max_pixels)
        except RDError as e:
            self._finish(result, "failed", t0, error=str(e))
            return
        except Exception as e:  # one bad file never stops the batch
            self._finish(result, "failed", t0, error=f"{item.source}: {e.__class__.__name__}: {e}")
            return
        h, w = image.rgb.shape[:2]
        result.details.update(width=w, height=h, alpha=image.alpha is not None, grayscale=image.grayscale,
                              input_high_bit_depth=image.high_bit_depth, output_bit_depth=8)
        if image.high_bit_depth:
            result.warnings.append(f"{item.source}: input has more than 8 bits per channel; output written as 8-bit")
        result.seconds += time.perf_counter() - t0
        if self._pending and self._pending[0].image.rgb.shape != image.rgb.shape:
            self._flush()
        self._pending.append(_Pending(item, dest, result, image, time.perf_counter()))
        if len(self._pending) >= self.batch:
            self._flush()

    def _flush(self) -> None:
        """Derain the queued images (one call when they share a shape) and write them."""
        pending, self._pending = self._pending, []
        if not pending:
            return
        try:
            derainer = self.derainer  # outside the per-file try: a model that cannot load stops the batch
        except BaseException:
            self._pending = pending
            raise
        t0 = time.perf_counter()
        outs: list[np.ndarray | None] = [None] * len(pending)
        if len(pending) > 1:
            try:
                outs = list(derainer.derain_batch([p.image.rgb for p in pending]))
            except KeyboardInterrupt:
                self._pending = pending
                raise
            except Exception:  # retry one by one so only the culprit fails
                outs = [None] * len(pending)
            if len(outs) != len(pending):
                outs = [None] * len(pending)
        share = (time.perf_counter() - t0) / len(pending)
        for i, p in enumerate(pending):
            t1 = time.perf_counter()
            try:
                y = outs[i] if outs[i] is not None else derainer.derain(p.image.rgb)
                self._write_image(p, y)
            except KeyboardInterrupt:
                self._pending = pending[i:]
                raise
            except RDError as e:
                self._finish(p.result, "failed", t1, error=str(e))
                continue
            except Exception as e:
                self._finish(p.result, "failed", t1, error=f"{p.item.source}: {e.__class__.__name__}: {e}")
                continue
            p.result.seconds += share
            self._finish(p.result, "ok", t1)

    def _write_image(self, p: _Pending, y: np.ndarray) -> None:
        y = np.asarray(y)
        if y.dtype != np.uint8 or y.shape != p.image.rgb.shape:
            raise RDError(f"{p.item.source}: derainer returned {y.dtype} {y.shape}, expected uint8 {p.image.rgb.shape}")
        out = _to_gray(y) if p.image.grayscale else y
        save_image(p.dest, out, alpha=p.image.alpha)

    # ------------------------------------------------------------------ videos
    def _run_video(self, item: WorkItem, dest: Path, result: FileResult, t0: float) -> None:
        from runtime.video import derain_video

        derainer = self.derainer  # outside the try: a model that cannot load is not this file's fault
        try:
            v = derain_video(item.source, dest, derainer, batch=self.batch, on_frame=self.observer.frames)
        except RDError as e:
            self._finish(result, "failed", t0, error=str(e))
            return
        except Exception as e:  # one bad file never stops the batch
            self._finish(result, "failed", t0, error=f"{item.source}: {e.__class__.__name__}: {e}")
            return
        result.details.update(width=v.width, height=v.height, frames=v.frames, fps=v.fps, codec=v.codec,
                              audio_streams=v.audio_streams)
        self._finish(result, "ok", t0)
