"""Quality of exported artifacts on both dev sets, through the runtime, at several DDIM step counts.

For every artifact (an .onnx with its manifest) and every step count S it derains every pair of
``dev/sirr`` (light rain) and ``dev/jorder_h`` (heavy rain with haze) with ``runtime.Derainer``
exactly as ``rd-run derain`` does (native tiles, seed 0), and scores on the Y channel: PSNR, SSIM,
PSNR after the output's best global brightness shift (``matched``: a pure darkening scores
nothing there) and the correlation of the change with (clean - rainy). The rainy input is the
first row. ``S = 0`` is the predictor P alone (predict-and-refine artifacts only).

    python benchmarks/quality_table.py runtime/assets/default.onnx --steps 0,2,3,5,10 --markdown

``--panels DIR`` writes rainy | output at each S panels of a few real rainy photos (no ground
truth there). Skips with a clear message where ../shared/data is absent. Never trains.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DATA, DEV_SETS, add_device_option, dev_pairs, step_counts
from quality import score

REAL_PANELS = ("1.jpg", "22.jpg", "45.jpg", "101.jpg")


def _mean(rows: list[dict]) -> dict:
    return {k: statistics.fmean(r[k] for r in rows) for k in rows[0]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifacts", type=Path, nargs="+")
    ap.add_argument("--steps", default="0,2,3,5,10", help="comma-separated step counts (0 = P alone)")
    ap.add_argument("--sets", default=",".join(DEV_SETS))
    ap.add_argument("--limit", type=int, default=0, help="first N pairs of each set (0 = all)")
    ap.add_argument("--threads", type=int, default=2)
    add_device_option(ap)
    ap.add_argument("--overlap", type=int, default=None, help="tile overlap (default: the runtime's)")
    ap.add_argument("--refine-strength", type=float, default=None,
                    help="the share of the refiner's correction kept (default: the manifest's)")
    ap.add_argument("--noise-scale", type=float, default=None,
                    help="the initial noise's scale, x_T = s * N(0, I) (default: the manifest's)")
    ap.add_argument("--refine-lowpass", type=float, default=None,
                    help="the Gaussian sigma (px) of the kept correction, 0 = off (default: the manifest's)")
    ap.add_argument("--panels", type=Path, default=None)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--markdown", action="store_true", help="print the table as markdown")
    a = ap.parse_args(argv)
    sets = {name: dev_pairs(name, a.limit) for name in a.sets.split(",")}
    if any(v is None for v in sets.values()):
        print(f"quality_table: skipped: dev sets {a.sets} not found under {DATA / 'dev'}", file=sys.stderr)
        return 0
    steps = step_counts(a.steps, "quality_table")
    if steps is None:
        return 2
    from runtime.derainer import Derainer
    from runtime.errors import RDError

    rows = [{"artifact": "rainy input", "steps": None,
             **{name: _mean([score(r, r, c) for _, r, c in pairs]) for name, pairs in sets.items()}}]
    if not a.json:
        print(_line(rows[0], sets), flush=True)
    panels: dict[str, list[np.ndarray]] = {}
    for art in a.artifacts:
        for s in steps:
            try:
                d = Derainer(art, steps=s, threads=a.threads, overlap=a.overlap, device=a.device,
                             refine_strength=a.refine_strength, noise_scale=a.noise_scale,
                             refine_lowpass=a.refine_lowpass)
            except RDError as e:
                print(f"quality_table: {art.name} at {s} steps: {e}", file=sys.stderr)
                continue
            t0 = time.perf_counter()
            row = {"artifact": art.name + (f" ({a.device})" if a.device else "")
                   + (f" a={d.refine_strength:g}" if d.refine_strength != 1 else "")
                   + (f" s={d.noise_scale:g}" if d.noise_scale != 1 else "")
                   + (f" lowpass={d.refine_lowpass:g}" if d.refine_lowpass else ""),
                   "steps": s, "overlap": d.overlap, "refine_strength": d.refine_strength,
                   "noise_scale": d.noise_scale, "refine_lowpass": d.refine_lowpass}
            for name, pairs in sets.items():
                row[name] = _mean([score(d.derain(r), r, c) for _, r, c in pairs])
            row["seconds"] = round(time.perf_counter() - t0, 1)
            if a.panels:
                from runtime.io import load_rgb

                for f in REAL_PANELS:
                    p = DATA / "unpaired" / "rainy_real" / f
                    if p.is_file():
                        img = load_rgb(p)
                        panels.setdefault(f"{art.stem}_{f}", [img]).append(d.derain(img))
            d.close()
            rows.append(row)
            if not a.json:
                print(_line(row, sets), flush=True)
    if a.panels:
        from runtime.io import save_image

        for key, imgs in panels.items():
            save_image(a.panels / f"panel_{Path(key).stem}.jpg", np.concatenate(imgs, axis=1))
    if a.json:
        print(json.dumps({"sets": list(sets), "pairs": {k: len(v) for k, v in sets.items()}, "rows": rows}, indent=2))
    elif a.markdown:
        print(_markdown(rows, sets))
    return 0


def _line(row: dict, sets) -> str:
    steps = "" if row["steps"] is None else str(row["steps"])
    parts = [f"{row['artifact']:28s} S={steps:>4s}"]
    for name in sets:
        m = row[name]
        parts.append(f"{name}: {m['psnr']:.2f} / {m['ssim']:.4f} / {m['psnr_matched']:.2f} / {m['corr']:+.3f}")
    return "  ".join(parts)


def _markdown(rows: list[dict], sets) -> str:
    head = "| artifact | S | " + " | ".join(f"{n} PSNR | SSIM | matched | corr" for n in sets) + " |"
    sep = "|" + "---|" * (2 + 4 * len(sets))
    lines = [head, sep]
    for r in rows:
        cells = [r["artifact"], "" if r["steps"] is None else str(r["steps"])]
        for n in sets:
            m = r[n]
            cells += [f"{m['psnr']:.2f}", f"{m['ssim']:.4f}", f"{m['psnr_matched']:.2f}", f"{m['corr']:+.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
