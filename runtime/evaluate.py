"""Paired evaluation behind ``rd-run eval``: PSNR / SSIM on the Y channel (BT.601), as papers report.

For every rainy/clean pair (matched by file stem) three things are scored against the clean image:

- the derained output (the model's score),
- the rainy input as it is (``rainy``), and
- the rainy input after its best global brightness shift (``matched``): rain brightens images, so
  a model that only darkens already "gains" over the raw input (docs/ARCHITECTURE.md measures
  how much). Deraining is claimed only above the ``matched`` baseline, with SSIM.

The brightness shift is :func:`runtime.metrics.brightness_matched`: one constant added to R, G and
B so that the mean of Y equals the clean image's (the least-squares-optimal shift of Y), clipped.
"""

from __future__ import annotations

import math
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from runtime.errors import InputError, RDError
from runtime.io import DEFAULT_MAX_PIXELS, iter_image_files, load_rgb, save_image

__all__ = ["Pair", "PairScore", "EvalReport", "pair_folders", "evaluate"]


class _Derainer(Protocol):
    def derain(self, frame: np.ndarray) -> np.ndarray: ...


def _metrics():
    from runtime import metrics  # numpy + scikit-image

    metrics.require_ssim()  # no scikit-image: one DependencyError before any pair, not one failure per pair
    return metrics


@dataclass(frozen=True)
class Pair:
    name: str  # the shared stem
    rainy: Path
    clean: Path


def pair_folders(rainy_dir: str | os.PathLike, clean_dir: str | os.PathLike
                 ) -> tuple[list[Pair], list[str]]:
    """Match images of two folders by file stem ('12.jpg' <-> '12.png'); returns ``(pairs, problems)``.

    ``problems`` lists files without a partner and ambiguous stems (two files with one stem).
    """
    problems: list[str] = []

    def by_stem(folder: str | os.PathLike) -> dict[str, Path]:
        out: dict[str, Path] = {}
        ambiguous: set[str] = set()
        for p in iter_image_files(folder):
            if p.stem in out or p.stem in ambiguous:
                problems.append(f"{p}: ambiguous, another file in {folder} has the stem {p.stem!r}; skipped")
                ambiguous.add(p.stem)
                out.pop(p.stem, None)
            else:
                out[p.stem] = p
        return out

    rainy, clean = by_stem(rainy_dir), by_stem(clean_dir)
    pairs = [Pair(stem, rainy[stem], clean[stem]) for stem in sorted(rainy, key=_natural) if stem in clean]
    problems += [f"{r}: no clean partner named {stem}.* in {clean_dir}"
                 for stem, r in sorted(rainy.items()) if stem not in clean]
    problems += [f"{c}: no rainy partner named {stem}.* in {rainy_dir}"
                 for stem, c in sorted(clean.items()) if stem not in rainy]
    return pairs, problems


def _natural(s: str) -> tuple:
    """'2' before '10'."""
    return tuple((0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", s) if t)


@dataclass
class PairScore:
    name: str
    rainy: str
    clean: str
    status: str = "ok"  # ok | failed
    error: str | None = None
    psnr: float | None = None  # derained vs clean
    ssim: float | None = None
    psnr_rainy: float | None = None  # raw rainy input vs clean
    ssim_rainy: float | None = None
    psnr_matched: float | None = None  # brightness-matched rainy input vs clean
    ssim_matched: float | None = None
    seconds: float = 0.0
    panel: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: _json_num(v) for k, v in self.__dict__.items()}


_SCORE_KEYS = ("psnr", "ssim", "psnr_rainy", "ssim_rainy", "psnr_matched", "ssim_matched")


def _json_num(v: Any) -> Any:
    """inf (identical images) and nan are not JSON: report them as None."""
    if isinstance(v, float):
        return round(v, 4) if math.isfinite(v) else None
    return v


@dataclass
class EvalReport:
    pairs: list[PairScore] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0
    interrupted: bool = False

    @property
    def scored(self) -> list[PairScore]:
        return [p for p in self.pairs if p.status == "ok"]

    def means(self) -> dict[str, float | None]:
        ok = self.scored
        out: dict[str, float | None] = {}
        for k in _SCORE_KEYS:
            vals = [getattr(p, k) for p in ok if getattr(p, k) is not None]
            out[k] = float(np.mean(vals)) if vals else None
        if out["psnr"] is not None and out["psnr_matched"] is not None:
            out["psnr_gain_over_matched"] = out["psnr"] - out["psnr_matched"]
            out["psnr_gain_over_rainy"] = out["psnr"] - out["psnr_rainy"]
        return out

    @property
    def exit_code(self) -> int:
        if self.interrupted:
            return 130
        return 7 if any(p.status == "failed" for p in self.pairs) else 0

    def to_dict(self) -> dict[str, Any]:
        return {"pairs": [p.to_dict() for p in self.pairs],
                "mean": {k: _json_num(v) for k, v in self.means().items()},
                "count": {"pairs": len(self.pairs), "scored": len(self.scored),
                          "failed": sum(p.status == "failed" for p in self.pairs)},
                "problems": self.problems, "seconds": round(self.seconds, 3),
                "interrupted": self.interrupted, "exit_code": self.exit_code}


def evaluate(pairs: Sequence[Pair], derainer: _Derainer, *, save_dir: str | os.PathLike | None = None,
             max_pixels: int | None = DEFAULT_MAX_PIXELS, on_pair: Callable[[PairScore], None] | None = None,
             report: EvalReport | None = None) -> EvalReport:
    """Score ``derainer`` on ``pairs``; a pair that cannot be read or whose sizes differ is ``failed``.

    With ``save_dir``, writes ``<name>.png`` panels: rainy | derained | clean, side by side.
    Pass ``report`` to keep the partial results when interrupted (KeyboardInterrupt propagates).
    """
    if not pairs:
        raise InputError("no rainy/clean pairs to evaluate (pairs are matched by file name stem)")
    m = _metrics()
    report = report if report is not None else EvalReport()
    t_start = time.perf_counter()
    try:
        for pair in pairs:
            t0 = time.perf_counter()
            s = PairScore(name=pair.name, rainy=str(pair.rainy), clean=str(pair.clean))
            report.pairs.append(s)
            try:
                rainy = load_rgb(pair.rainy, max_pixels=max_pixels)
                clean = load_rgb(pair.clean, max_pixels=max_pixels)
                if rainy.shape != clean.shape:
                    raise InputError(f"{pair.name}: rainy {rainy.shape[1]}x{rainy.shape[0]} and clean "
                                     f"{clean.shape[1]}x{clean.shape[0]} differ in size")
                derained = np.asarray(derainer.derain(rainy))
                if derained.shape != rainy.shape or derained.dtype != np.uint8:
                    raise RDError(f"{pair.name}: derainer returned {derained.dtype} {derained.shape}, "
                                  f"expected uint8 {rainy.shape}")
                matched = m.brightness_matched(rainy, clean)
                s.psnr, s.ssim = float(m.psnr_y(derained, clean)), float(m.ssim_y(derained, clean))
                s.psnr_rainy, s.ssim_rainy = float(m.psnr_y(rainy, clean)), float(m.ssim_y(rainy, clean))
                s.psnr_matched, s.ssim_matched = float(m.psnr_y(matched, clean)), float(m.ssim_y(matched, clean))
                if save_dir is not None:
                    dest = Path(save_dir) / f"{pair.name}.png"
                    save_image(dest, np.concatenate([rainy, derained, clean], axis=1))
                    s.panel = str(dest)
            except RDError as e:
                s.status, s.error = "failed", str(e)
            except Exception as e:  # one bad pair never stops the evaluation
                s.status, s.error = "failed", f"{pair.name}: {e.__class__.__name__}: {e}"
            s.seconds = time.perf_counter() - t0
            if on_pair is not None:
                on_pair(s)
    except KeyboardInterrupt:
        report.interrupted = True
        raise
    finally:
        report.seconds = time.perf_counter() - t_start
    return report
