"""Input discovery and the never-lose-work batch runner behind ``rd-run derain``.

Rules (Ana's cron jobs depend on them):

- Inputs are files, folders (top level only unless ``recursive``) or glob patterns. Hidden files
  (our own temporary files included) are never inputs; an output directory inside an input
  folder is excluded from discovery, so outputs are never fed back as inputs.
- Output of ``<root>/<rel>`` is ``<outdir>/<rel>`` with the same extension (``suffix`` is added to
  the stem). An output path that is the input file itself is refused.
- Every output is written to a temporary file beside it and renamed when complete, so an
  interrupted run leaves either the finished file or nothing.
- rd-run's own outputs are told from a user's files by a record in the output folder
  (``OUTDIR/.rd-run-outputs.jsonl``: path, size and mtime of each output written). A file at an
  output path that rd-run did not write (or that was changed since) is never replaced: the input
  fails with a message (or, with ``skip_existing``, is skipped with a warning). Only recorded
  outputs are taken as earlier outputs: in an output folder that is also the input folder, a
  user's ``bird_d.png`` is an input like any other.
- One bad file is reported (status ``failed`` with the message) and the batch goes on; the report's
  exit code is then 7. ``skip_existing`` skips inputs whose output already exists (resume).
  Status ``partial``: an output was written but does not cover the whole input (a truncated
  video); also exit 7. A symbolic link whose target is missing, or a link loop, fails as a file
  of the batch (found in a folder, with or without ``recursive``, or by a glob).
- Each output is locked while it is written (``.<name>.rd-lock`` beside it, an ``flock`` the kernel
  drops if the process dies), so two runs on one output folder share the work: the second skips
  what the first is writing and says so. Temporaries and lock files of earlier runs that were
  killed (``kill -9``) are removed when a later run writes to the same folder.
- Colour: alpha (RGBA, LA, P with transparency) is passed through untouched; grayscale inputs
  (L, LA, I;16, ...) are derained as RGB and written back as grayscale (luma, ITU-R 601-2);
  inputs with more than 8 bits per channel are written as 8-bit, with a warning.
- Photo metadata (ICC profile, EXIF with the orientation reset to 1, DPI) is kept unless
  ``strip_metadata``. Multi-frame images (animated WebP / APNG, multi-page TIFF) are derained
  frame by frame into the same format.
"""

from __future__ import annotations

import contextlib
import datetime
import glob
import json
import os
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image

from runtime.errors import InputError, RDError, UsageError
from runtime.io import (
    DEFAULT_MAX_PIXELS,
    IMAGE_SUFFIXES,
    VIDEO_SUFFIXES,
    LoadedImage,
    load_frames,
    load_image,
    missing_reason,
    own_temporary,
    save_frames,
    save_image,
    signals_deferred,
)

try:  # POSIX; elsewhere outputs are not locked (runs on one folder must not overlap there)
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "FrameDerainer",
    "WorkItem",
    "OutputRecord",
    "OutputLock",
    "RECORD_NAME",
    "remove_stale_files",
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


def _real(p: Path) -> Path:
    """``p`` with symbolic links resolved; unlike ``Path.resolve`` it never raises on a link loop."""
    return Path(os.path.realpath(p))


def _inside(child: Path, parent: Path) -> bool:
    try:
        child.relative_to(parent)
        return True
    except ValueError:
        return False


def _dangling(p: Path) -> bool:
    """A symbolic link that leads to no file (missing target, or a loop)."""
    return p.is_symlink() and not p.exists()


def _walk(root: Path, recursive: bool, prune: Path | None) -> list[Path]:
    """Media files under ``root`` (sorted), skipping hidden entries and the ``prune`` directory.

    Dangling symbolic links with a media suffix are listed too (they fail as files of the batch,
    with the reason), whether or not ``recursive``: ``os.walk`` lists them among the files.
    """
    if not recursive:
        return sorted(p for p in root.iterdir() if (p.is_file() or _dangling(p)) and not _is_hidden(p)
                      and kind_of(p) != "unsupported")
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".")
                             and not (prune is not None and _real(here / d) == prune))
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

    A literal path that does not exist (or is a dangling symbolic link: the message says which)
    raises :class:`InputError`; a glob that matches nothing, or a folder without media files, is
    a warning. A folder that *is* the output directory needs ``suffix`` (else every output would
    replace its input: :class:`UsageError`); files in it that the output record names as rd-run's
    own outputs are not inputs.
    """
    check_suffix(suffix)
    out_resolved = _real(Path(outdir)) if outdir is not None else None
    record = OutputRecord(outdir) if outdir is not None else None
    items: list[WorkItem] = []
    warnings: list[str] = []
    seen: set[Path] = set()

    def add(path: Path, rel: Path) -> None:
        r = _real(path)
        if r in seen:
            return
        seen.add(r)
        items.append(WorkItem(source=path, rel=rel, kind=kind_of(path)))

    def add_folder(root: Path, rel_base: Path) -> int:
        root_r = _real(root)
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
            if prune is not None and _inside(_real(f), prune):
                continue
            if out_resolved == root_r and record is not None and record.owns(f):
                continue  # an earlier output written beside its input (a user's file with that name is an input)
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
        elif p.is_symlink():
            raise InputError(missing_reason(p))
        elif glob.has_magic(s):
            base = _glob_base(s)
            matches = sorted(Path(m) for m in glob.glob(s, recursive=True))
            n = 0
            for m in matches:
                if _is_hidden(m):
                    continue
                if m.is_dir():
                    if out_resolved is not None and _inside(_real(m), out_resolved):
                        continue  # the output directory (or a folder in it) matched the pattern
                    n += add_folder(m, m.relative_to(base) if _inside(m, base) else Path(m.name))
                elif (m.is_file() or _dangling(m)) and kind_of(m) != "unsupported":
                    if out_resolved is not None and _inside(_real(m), out_resolved) and not _inside(_real(base),
                                                                                                  out_resolved):
                        continue
                    if record is not None and record.owns(m):
                        continue  # an earlier output of this output folder
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


# ----------------------------------------------------------------------------- ownership and locks

#: The record of outputs in an output folder (hidden, so never an input).
RECORD_NAME = ".rd-run-outputs.jsonl"
LOCK_SUFFIX = ".rd-lock"


@contextlib.contextmanager
def _locked_append(path: Path) -> Iterator[int]:
    """An fd of ``path`` (created if needed) opened for appending, under an exclusive ``flock``.

    The lock is on the file itself; a compaction replaces the file by a rename while holding the
    lock on the old one, so a waiter re-opens when the path no longer names the file it locked.
    Without fcntl (not POSIX) there is no lock.
    """
    while True:
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        if fcntl is None:  # pragma: no cover
            break
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        yield fd
    finally:
        os.close(fd)  # closing drops the lock


class OutputRecord:
    """Which files of an output folder rd-run wrote, so they can be told from a user's files.

    ``OUTDIR/.rd-run-outputs.jsonl`` holds one JSON line per output written: its path relative
    to OUTDIR, its size and its mtime (ns), appended (under a lock, fsync'd) just before the
    finished temporary file is renamed onto the output. A file counts as rd-run's only while its
    size and mtime are the recorded ones: a user's file at that path, or an output changed since,
    is not. Other processes' appends are picked up as they come (concurrent runs on one folder).
    """

    def __init__(self, outdir: str | os.PathLike) -> None:
        self.outdir = Path(outdir)
        self.path = self.outdir / RECORD_NAME
        self._entries: dict[str, tuple[int, int]] = {}
        self._lines = 0
        self._ino: int | None = None
        self._offset = 0

    def _key(self, path: Path) -> str:
        # folders resolved (an output folder reached through another spelling or a symbolic link is
        # the same folder), the file name itself not
        where = os.path.join(os.path.realpath(path.parent), path.name)
        return Path(os.path.relpath(where, os.path.realpath(self.outdir))).as_posix()

    def _refresh(self) -> None:
        try:
            st = os.stat(self.path)
        except OSError:
            self._entries, self._ino, self._offset, self._lines = {}, None, 0, 0
            return
        if st.st_ino != self._ino or st.st_size < self._offset:  # new (compacted) file: read it whole
            self._entries, self._ino, self._offset, self._lines = {}, st.st_ino, 0, 0
        if st.st_size == self._offset:
            return
        with open(self.path, "rb") as f:
            f.seek(self._offset)
            data = f.read()
        end = data.rfind(b"\n") + 1  # whole lines only: a line being appended is read next time
        for line in data[:end].splitlines():
            try:
                rec = json.loads(line)
                self._entries[str(rec["output"])] = (int(rec["size"]), int(rec["mtime_ns"]))
                self._lines += 1
            except (ValueError, KeyError, TypeError):
                continue  # a torn line of a killed run, or not ours: ignored
        self._offset += end

    def owns(self, path: str | os.PathLike) -> bool:
        """True when ``path`` is an output rd-run wrote here and nobody changed since."""
        self._refresh()
        entry = self._entries.get(self._key(Path(path)))
        if entry is None:
            return False
        try:
            st = os.stat(path)
        except OSError:
            return False
        return (st.st_size, st.st_mtime_ns) == entry

    def add(self, dest: Path, written: Path, source: Path | str) -> None:
        """Record ``written`` (the finished temporary file about to be renamed onto ``dest``)."""
        st = os.stat(written)
        key = self._key(dest)
        line = (json.dumps({"output": key, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "input": str(source),
                            "written": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                            "pid": os.getpid()}) + "\n").encode()
        self.outdir.mkdir(parents=True, exist_ok=True)
        with _locked_append(self.path) as fd:
            if os.fstat(fd).st_size:
                os.lseek(fd, -1, os.SEEK_END)  # O_APPEND: the write below still goes to the end
                if os.read(fd, 1) != b"\n":
                    line = b"\n" + line  # a killed writer left a torn line: start a fresh one
            os.write(fd, line)
            os.fsync(fd)
        self._entries[key] = (st.st_size, st.st_mtime_ns)

    def compact(self) -> None:
        """Rewrite the record with one line per output when re-runs made it mostly history."""
        self._refresh()
        if self._lines <= 2 * len(self._entries) + 100:
            return
        with _locked_append(self.path):
            self._refresh()  # another process may have appended meanwhile
            lines = [json.dumps({"output": k, "size": size, "mtime_ns": mtime}) + "\n"
                     for k, (size, mtime) in sorted(self._entries.items())]
            tmp = self.path.with_name(f"{RECORD_NAME}.{os.getpid()}.compact")
            with open(tmp, "w", encoding="utf-8") as f:
                f.writelines(lines)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        self._ino = None  # read the new file from the start next time
        self._refresh()


class OutputLock:
    """An exclusive lock on one output path: ``.<name>.rd-lock`` beside it, held with ``flock``.

    The kernel drops an ``flock`` when its process dies, so a run killed with ``kill -9`` never
    blocks a later one; its lock file is taken over (and removed by ``remove_stale_files``).
    The file holds the owner's pid and host, for the message of a run that finds it held.
    """

    def __init__(self, dest: Path) -> None:
        self.path = dest.with_name(f".{dest.name}{LOCK_SUFFIX}")
        self._fd: int | None = None

    def acquire(self) -> str | None:
        """Take the lock; None on success, else a description of who holds it."""
        if fcntl is None:  # pragma: no cover
            return None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Ctrl-C / SIGTERM wait until the fd is either closed or kept in self._fd, so that
        # release() removes the file; the interrupt is then raised as acquire returns (the caller
        # holds the lock in its cleanup set before calling).
        with signals_deferred():
            while True:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip()
                    os.close(fd)
                    return f"pid {holder}" if holder else "another process"
                try:  # the holder we waited on may have removed the file: lock the one at the path
                    same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
                except FileNotFoundError:
                    same = False
                if not same:
                    os.close(fd)
                    continue
                self._fd = fd
                try:
                    os.ftruncate(fd, 0)
                    os.pwrite(fd, f"{os.getpid()} on {socket.gethostname()}\n".encode(), 0)
                except BaseException:
                    self.release()
                    raise
                return None

    def release(self) -> None:
        """Remove the lock file and drop the lock; a second call does nothing (the cleanup after an
        interrupt releases again what the interrupted code may have released already)."""
        with signals_deferred():
            fd, self._fd = self._fd, None
            if fd is None:
                return
            try:
                with contextlib.suppress(OSError):
                    os.unlink(self.path)  # while still holding it: a waiter re-checks the path (see acquire)
            finally:
                os.close(fd)


def remove_stale_files(folders: Sequence[Path], before: float) -> list[Path]:
    """Remove what killed runs left in ``folders``: temporaries of ``atomic_path`` for media
    outputs, and free lock files, last modified before ``before`` (a ``time.time()``).

    A temporary whose output is locked by a live run is kept; so is any file that is not of
    rd-run's own naming. Returns the removed paths.
    """
    removed: list[Path] = []
    media = IMAGE_SUFFIXES | VIDEO_SUFFIXES
    for folder in folders:
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        for e in entries:
            if not e.name.startswith(".") or not e.is_file(follow_symlinks=False):
                continue
            try:
                if e.stat(follow_symlinks=False).st_mtime >= before:
                    continue
            except OSError:
                continue
            target = own_temporary(e.name)
            if target is not None and Path(target).suffix.lower() in media:
                lock = OutputLock(Path(folder) / target)
                stale_lock = lock.path.exists()  # taken over and removed with the temporary
                took = False
                try:  # released also when an interrupt comes as acquire returns
                    took = lock.acquire() is None
                    if took:
                        with contextlib.suppress(OSError):
                            os.unlink(e.path)
                            removed.append(Path(e.path))
                finally:
                    lock.release()
                if took and stale_lock and lock.path not in removed:
                    removed.append(lock.path)
            elif e.name.endswith(LOCK_SUFFIX) and fcntl is not None:
                try:
                    fd = os.open(e.path, os.O_RDWR)
                except OSError:
                    continue  # removed above with its temporary, or by its owner meanwhile
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    os.close(fd)
                    continue  # held: a live run is writing that output
                try:
                    if os.stat(e.path).st_ino == os.fstat(fd).st_ino:
                        os.unlink(e.path)
                        removed.append(Path(e.path))
                except OSError:
                    pass
                finally:
                    os.close(fd)
    return removed


# ----------------------------------------------------------------------------- results


@dataclass
class FileResult:
    input: str
    output: str | None
    kind: str
    status: str = "pending"  # ok | skipped | failed | partial (an output that does not cover the whole input)
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
    removed: list[str] = field(default_factory=list)  # stale temporaries / lock files of killed runs

    def count(self, status: str) -> int:
        return sum(1 for f in self.files if f.status == status)

    @property
    def exit_code(self) -> int:
        if self.interrupted:
            return 130
        return 7 if self.count("failed") or self.count("partial") else 0

    def totals(self) -> dict[str, Any]:
        done = sum(self.count(s) for s in ("ok", "skipped", "failed", "partial"))
        return {"files": self.total, "ok": self.count("ok"), "skipped": self.count("skipped"),
                "failed": self.count("failed"), "partial": self.count("partial"), "not_processed": self.total - done,
                "seconds": round(self.seconds, 3)}

    def to_dict(self) -> dict[str, Any]:
        return {"files": [f.to_dict() for f in self.files], "totals": self.totals(), "warnings": self.warnings,
                "removed_stale": self.removed, "interrupted": self.interrupted, "exit_code": self.exit_code}


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
    lock: OutputLock


class BatchRunner:
    """Derain a list of work items into ``outdir``; ``report`` is filled as it goes.

    ``make_derainer`` is called once, only when a file actually needs processing (a resumed run
    whose outputs all exist loads no model). Errors creating the derainer propagate (they are not
    about one file); errors on one file are recorded in its :class:`FileResult`. On
    ``KeyboardInterrupt`` the report is marked ``interrupted`` and the exception propagates; no
    partial output or temporary file is left behind.

    Before the first file, temporaries and lock files that killed runs left in the output folders
    are removed (``report.removed``). Each output is locked while it is processed
    (:class:`OutputLock`), recorded as rd-run's when written (:class:`OutputRecord`), and never
    written over a file rd-run did not write.
    """

    def __init__(self, items: Sequence[WorkItem], outdir: str | os.PathLike, make_derainer: Callable[[], FrameDerainer],
                 *, suffix: str = "", skip_existing: bool = False, max_pixels: int | None = DEFAULT_MAX_PIXELS,
                 batch: int = 1, observer: BatchObserver | None = None, strip_metadata: bool = False) -> None:
        if batch < 1:
            raise UsageError(f"batch {batch} must be >= 1")
        self.items = list(items)
        self.outdir = Path(outdir)
        self.make_derainer = make_derainer
        self.suffix = suffix
        self.skip_existing = skip_existing
        self.max_pixels = max_pixels
        self.batch = batch
        self.strip_metadata = strip_metadata
        self.observer = observer or BatchObserver()
        self.report = BatchReport(total=len(self.items))
        self.record = OutputRecord(self.outdir)
        self._derainer: FrameDerainer | None = None
        self._pending: list[_Pending] = []
        self._held: set[OutputLock] = set()

    @property
    def derainer(self) -> FrameDerainer:
        if self._derainer is None:
            self._derainer = self.make_derainer()
        return self._derainer

    # ------------------------------------------------------------------ main loop
    def run(self) -> BatchReport:
        t_start = time.perf_counter()
        started = time.time()
        dests = [output_path_for(item, self.outdir, self.suffix) for item in self.items]
        folders = sorted({d.parent for d in dests if d.parent.is_dir()})
        self.report.removed = [str(p) for p in remove_stale_files(folders, before=started)]
        with contextlib.suppress(OSError):
            self.record.compact()
        self.observer.start(len(self.items))
        claimed: dict[Path, str] = {}  # output path -> input that claimed it
        try:
            for index, (item, dest) in enumerate(zip(self.items, dests)):
                result = FileResult(input=str(item.source), output=str(dest), kind=item.kind)
                self.report.files.append(result)
                self.observer.file_started(item, index)
                t0 = time.perf_counter()
                problem = self._refusal(item, dest, claimed)
                if problem is not None:
                    self._finish(result, "failed", t0, error=problem)
                    continue
                claimed[_real(dest)] = str(item.source)
                lock = OutputLock(dest)
                self._held.add(lock)  # before acquire: an interrupt raised as it returns still releases it
                try:
                    holder = lock.acquire()
                except OSError as e:
                    self._held.discard(lock)
                    self._finish(result, "failed", t0, error=f"{dest}: cannot lock it ({e.strerror or e})")
                    continue
                if holder is not None:
                    self._held.discard(lock)
                    result.details["skip_reason"] = "being written by another run"
                    result.warnings.append(f"{dest} is being written by another rd-run ({holder}); left to it")
                    self._finish(result, "skipped", t0)
                    continue
                if not self._may_write(dest, result, t0):
                    self._release(lock)
                    continue
                if item.kind == "video":
                    self._flush()
                    try:
                        self._run_video(item, dest, result, t0)
                    finally:
                        self._release(lock)
                else:
                    self._queue_image(item, dest, result, t0, lock)
            self._flush()
        except KeyboardInterrupt:
            self.report.interrupted = True
            for p in self._pending:
                p.result.status, p.result.error = "failed", "interrupted before it was written"
            raise
        finally:
            for lock in list(self._held):
                self._release(lock)
            self.report.seconds = time.perf_counter() - t_start
        return self.report

    def _release(self, lock: OutputLock) -> None:
        lock.release()
        self._held.discard(lock)

    def _may_write(self, dest: Path, result: FileResult, t0: float) -> bool:
        """False (and the file finished as skipped or failed) when ``dest`` must be left alone."""
        if not os.path.lexists(dest):
            return True
        if self.record.owns(dest):
            if self.skip_existing and dest.is_file() and dest.stat().st_size > 0:
                self._finish(result, "skipped", t0)
                return False
            return True  # an earlier output of ours: replaced (atomically)
        why = (f"{dest} exists and rd-run did not write it (it is not in {self.record.path.name} of "
               f"{self.outdir}, or it changed since)")
        if self.skip_existing:
            result.details["skip_reason"] = "output exists, not written by rd-run"
            result.warnings.append(f"{why}: left alone, input not derained")
            self._finish(result, "skipped", t0)
        else:
            self._finish(result, "failed", t0, error=f"refusing to replace {why}; move it away or choose another "
                                                     f"-o or --suffix")
        return False

    def _refusal(self, item: WorkItem, dest: Path, claimed: dict[Path, str]) -> str | None:
        if item.kind == "unsupported":
            return (f"unsupported file type {item.source.suffix or '(no suffix)'!r} "
                    f"(images: {', '.join(sorted(IMAGE_SUFFIXES))}; videos: {', '.join(sorted(VIDEO_SUFFIXES))})")
        if not item.source.exists():
            return missing_reason(item.source)
        src_r, dest_r = _real(item.source), _real(dest)
        if src_r == dest_r or (dest.exists() and os.path.samefile(item.source, dest)):
            return f"refusing to overwrite the input: output {dest} is the input file; choose another -o or --suffix"
        if dest_r in claimed:
            return f"output {dest} is already written from {claimed[dest_r]} (same name); derain them separately"
        return None

    def _finish(self, result: FileResult, status: str, t0: float, *, error: str | None = None) -> None:
        result.status, result.error = status, error
        result.seconds += time.perf_counter() - t0
        self.observer.file_done(result)

    def _recorder(self, dest: Path, source: Path) -> Callable[[Path], None]:
        return lambda tmp: self.record.add(dest, tmp, source)

    # ------------------------------------------------------------------ images
    def _queue_image(self, item: WorkItem, dest: Path, result: FileResult, t0: float, lock: OutputLock) -> None:
        try:
            image = load_image(item.source, max_pixels=self.max_pixels)
        except RDError as e:
            self._release(lock)
            self._finish(result, "failed", t0, error=str(e))
            return
        except Exception as e:  # one bad file never stops the batch
            self._release(lock)
            self._finish(result, "failed", t0, error=f"{item.source}: {e.__class__.__name__}: {e}")
            return
        if image.n_frames > 1:
            self._flush()
            try:
                self._run_frames(item, dest, result, t0)
            finally:
                self._release(lock)
            return
        h, w = image.rgb.shape[:2]
        result.details.update(width=w, height=h, alpha=image.alpha is not None, grayscale=image.grayscale,
                              input_high_bit_depth=image.high_bit_depth, output_bit_depth=8)
        if image.high_bit_depth:
            result.warnings.append(f"{item.source}: input has more than 8 bits per channel; output written as 8-bit")
        result.seconds += time.perf_counter() - t0
        if self._pending and self._pending[0].image.rgb.shape != image.rgb.shape:
            self._flush()
        self._pending.append(_Pending(item, dest, result, image, time.perf_counter(), lock))
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
                self._release(p.lock)
                self._finish(p.result, "failed", t1, error=str(e))
                continue
            except Exception as e:
                self._release(p.lock)
                self._finish(p.result, "failed", t1, error=f"{p.item.source}: {e.__class__.__name__}: {e}")
                continue
            self._release(p.lock)
            p.result.seconds += share
            self._finish(p.result, "ok", t1)

    def _check_output(self, source: Path, y: Any, like: np.ndarray) -> np.ndarray:
        y = np.asarray(y)
        if y.dtype != np.uint8 or y.shape != like.shape:
            raise RDError(f"{source}: derainer returned {y.dtype} {y.shape}, expected uint8 {like.shape}")
        return y

    def _metadata_notes(self, result: FileResult, meta, dropped: dict[str, str]) -> None:
        result.details["metadata"] = ("stripped" if self.strip_metadata
                                      else [n for n in meta.names() if n not in dropped] if meta else [])
        lost = [*dropped.values(), *(meta.unreadable if meta else [])]
        if lost:
            result.warnings.append(f"{result.input}: metadata not kept: {'; '.join(lost)}")

    def _write_image(self, p: _Pending, y: np.ndarray) -> None:
        y = self._check_output(p.item.source, y, p.image.rgb)
        out = _to_gray(y) if p.image.grayscale else y
        meta = None if self.strip_metadata else p.image.metadata
        dropped: dict[str, str] = {}
        save_image(p.dest, out, alpha=p.image.alpha, metadata=meta, dropped=dropped,
                   before_replace=self._recorder(p.dest, p.item.source))
        self._metadata_notes(p.result, meta, dropped)

    # ------------------------------------------------------------------ multi-frame images
    def _run_frames(self, item: WorkItem, dest: Path, result: FileResult, t0: float) -> None:
        """Every frame of an animated WebP / APNG or multi-page TIFF, derained into one file of its format."""
        derainer = self.derainer  # outside the try: a model that cannot load is not this file's fault
        try:
            loaded = load_frames(item.source, max_pixels=self.max_pixels)
            outs: list[tuple[np.ndarray, np.ndarray | None]] = []
            frames = loaded.frames
            i = 0
            while i < len(frames):  # consecutive frames of one shape go together, up to --batch
                j = i + 1
                while j < len(frames) and j - i < self.batch and frames[j].rgb.shape == frames[i].rgb.shape:
                    j += 1
                group = frames[i:j]
                ys = (derainer.derain_batch([f.rgb for f in group]) if len(group) > 1
                      else [derainer.derain(group[0].rgb)])
                for f, y in zip(group, ys, strict=True):
                    y = self._check_output(item.source, y, f.rgb)
                    outs.append((_to_gray(y) if f.grayscale else y, f.alpha))
                self.observer.frames(j, len(frames))
                i = j
            meta = None if self.strip_metadata else loaded.metadata
            dropped: dict[str, str] = {}
            save_frames(dest, outs, fmt=loaded.format, durations=loaded.durations, loop=loaded.loop, metadata=meta,
                        dropped=dropped, before_replace=self._recorder(dest, item.source))
        except KeyboardInterrupt:
            raise
        except RDError as e:
            self._finish(result, "failed", t0, error=str(e))
            return
        except Exception as e:  # one bad file never stops the batch
            self._finish(result, "failed", t0, error=f"{item.source}: {e.__class__.__name__}: {e}")
            return
        first = frames[0]
        h, w = first.rgb.shape[:2]
        result.details.update(width=w, height=h, frames=len(frames), format=loaded.format,
                              alpha=first.alpha is not None, grayscale=first.grayscale,
                              input_high_bit_depth=any(f.high_bit_depth for f in frames), output_bit_depth=8)
        if result.details["input_high_bit_depth"]:
            result.warnings.append(f"{item.source}: input has more than 8 bits per channel; output written as 8-bit")
        self._metadata_notes(result, meta, dropped)
        self._finish(result, "ok", t0)

    # ------------------------------------------------------------------ videos
    def _run_video(self, item: WorkItem, dest: Path, result: FileResult, t0: float) -> None:
        from runtime.video import derain_video

        derainer = self.derainer  # outside the try: a model that cannot load is not this file's fault
        try:
            v = derain_video(item.source, dest, derainer, batch=self.batch, on_frame=self.observer.frames,
                             before_replace=self._recorder(dest, item.source))
        except RDError as e:
            self._finish(result, "failed", t0, error=str(e))
            return
        except Exception as e:  # one bad file never stops the batch
            self._finish(result, "failed", t0, error=f"{item.source}: {e.__class__.__name__}: {e}")
            return
        result.details.update(width=v.width, height=v.height, frames=v.frames, fps=v.fps, codec=v.codec,
                              audio_streams=v.audio_streams, expected_frames=v.expected_frames)
        result.warnings.extend(v.warnings)
        self._finish(result, "partial" if v.warnings else "ok", t0)
