"""What training scale the DTB's measured curve points to (issue 8): fits and extrapolation.

Reads the DTB scores measured along the shipped model's training (``docs/data/issue8_dtb_points.csv``:
``dtb_curve.py`` on the 60 fixed 64-px crops of ``dev/sirr`` for every snapshot, with the number of
training crops each had seen), fits the brightness-matched score against log2(samples) on chosen
stretches of the shipped model's lineage, and says how many samples each fit needs to reach the
rainy input's brightness-matched score (issue 8's third point, on these crops), and what that is in
steps and hours at a measured throughput.

    python benchmarks/scale_curve.py --plot docs/dtb_scale.png

The fit is a straight line in log(samples) through measured points: a reading of the curve, not a
law. Stretches where the slope is <= 0 never reach the target and say so. Needs no data folder.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CSV = REPO / "docs" / "data" / "issue8_dtb_points.csv"
INPUT_MATCHED = 31.20  # the rainy input's brightness-matched Y-PSNR on dtb_curve.py's crops
NUMERIC = ("batch", "step", "samples", "psnr", "matched", "corr", "lineage")

#: name -> (what it is, predicate on a lineage row). The 31,000-sample point (phase 4's last,
#: where phase 5 started) belongs to phase 5's stretch.
STRETCHES = {
    "phase5": ("phase 5: batch 64 on a GPU (the SDS recipe), from its start",
               lambda r: r["phase"] == "5" or r["samples"] == 31000),
    "phase5_tail": ("phase 5 after its first jump (250 steps on): the slope it ended on",
                    lambda r: r["phase"] == "5" and r["samples"] > 31000),
    "since_phase2": ("everything after phase 2's end (the SDS prior's dip included)",
                     lambda r: r["samples"] >= 24000),
    "phase2_late": ("phase 2's second half (batch 4, v_residual, no prior)",
                    lambda r: r["phase"] == "2" and r["samples"] >= 16000),
}


def load_points(path: Path) -> list[dict]:
    """The CSV's rows ('#' lines are comments), numeric columns as floats."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(line for line in f if not line.startswith("#")))
    if not rows:
        raise ValueError(f"{path}: no rows")
    missing = {"phase", *NUMERIC} - set(rows[0])
    if missing:
        raise ValueError(f"{path}: missing column(s) {sorted(missing)}")
    for r in rows:
        for k in NUMERIC:
            r[k] = float(r[k])
    return rows


def fit_log2(samples: list[float], values: list[float]) -> tuple[float, float]:
    """Least-squares ``value = a + b * log2(samples)``; returns (a, b), b in dB per doubling."""
    if len(samples) != len(values) or len(samples) < 2:
        raise ValueError("need at least two (samples, value) points")
    xs = [math.log2(s) for s in samples]
    mx, my = sum(xs) / len(xs), sum(values) / len(values)
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        raise ValueError("all points have the same number of samples")
    b = sum((x - mx) * (y - my) for x, y in zip(xs, values)) / sxx
    return my - b * mx, b


def samples_to_reach(a: float, b: float, target: float) -> float | None:
    """Samples at which ``a + b * log2(samples)`` reaches ``target``; None when b <= 0."""
    return None if b <= 0 else 2.0 ** ((target - a) / b)


def analyse(rows: list[dict], *, target: float, batch: int, it_s: float, cpu_batch: int,
            cpu_it_s: float) -> dict:
    lineage = sorted((r for r in rows if r["lineage"]), key=lambda r: r["samples"])
    now = lineage[-1]
    fits = {}
    for name, (what, pick) in STRETCHES.items():
        pts = [r for r in lineage if pick(r)]
        a, b = fit_log2([r["samples"] for r in pts], [r["matched"] for r in pts])
        need = samples_to_reach(a, b, target)
        row = {"what": what, "points": len(pts), "from": pts[0]["samples"], "to": pts[-1]["samples"],
               "slope_db_per_doubling": b, "intercept": a, "samples_needed": need}
        if need is not None:
            more = max(need - now["samples"], 0.0)
            row.update({"x_current": need / now["samples"], "more_samples": more,
                        "gpu_steps": more / batch, "gpu_hours": more / batch / it_s / 3600,
                        "cpu_hours": more / cpu_batch / cpu_it_s / 3600})
        fits[name] = row
    return {"target_matched": target, "current": {k: now[k] for k in ("run", "step", "samples", "matched", "corr")},
            "gap_db": target - now["matched"], "gpu": {"batch": batch, "it_s": it_s},
            "cpu": {"batch": cpu_batch, "it_s": cpu_it_s}, "fits": fits}


def plot(rows: list[dict], report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lineage = sorted((r for r in rows if r["lineage"]), key=lambda r: r["samples"])
    side = [r for r in rows if not r["lineage"]]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4))
    ax.plot([r["samples"] for r in lineage], [r["matched"] for r in lineage], "o-", label="shipped model's lineage")
    ax.plot([r["samples"] for r in side], [r["matched"] for r in side], "x", color="grey", label="side runs")
    ax.axhline(report["target_matched"], color="k", ls=":", label="rainy input")
    right = max(r["samples"] for r in rows)
    for name, f in report["fits"].items():
        if f["samples_needed"] is None:
            continue
        right = max(right, f["samples_needed"])
        xs = [f["from"], f["samples_needed"]]
        ax.plot(xs, [f["intercept"] + f["slope_db_per_doubling"] * math.log2(x) for x in xs], "--",
                label=f"fit {name}: {f['slope_db_per_doubling']:+.2f} dB/doubling")
    ax.set_xscale("log", base=2)
    ax.set_xlim(right=right * 1.3)
    ax.set_xlabel("training crops seen")
    ax.set_ylabel("DTB Y-PSNR after brightness match (dB)")
    ax.set_title("DTB on 60 dev crops (dtb_curve.py)")
    ax.legend(fontsize=7)
    bx.plot([r["samples"] for r in lineage], [r["corr"] for r in lineage], "o-")
    bx.plot([r["samples"] for r in side], [r["corr"] for r in side], "x", color="grey")
    bx.set_xscale("log", base=2)
    bx.set_xlabel("training crops seen")
    bx.set_ylabel("corr(change, clean - rainy)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--csv", type=Path, default=DEFAULT_CSV)
    ap.add_argument("--target", type=float, default=INPUT_MATCHED,
                    help="matched score to reach (default: the rainy input's on these crops)")
    ap.add_argument("--batch", type=int, default=64, help="GPU batch of the run to plan")
    ap.add_argument("--it-s", type=float, default=2.4,
                    help="its steps per second (H200, batch 64 x 64 px, SDS on: docs/benchmarks.md)")
    ap.add_argument("--cpu-batch", type=int, default=4)
    ap.add_argument("--cpu-it-s", type=float, default=0.77, help="this 2-core CPU at batch 4 (docs/quality.md)")
    ap.add_argument("--plot", type=Path, default=None)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    if a.batch < 1 or a.cpu_batch < 1 or not a.it_s > 0 or not a.cpu_it_s > 0:
        print("scale_curve: --batch/--cpu-batch must be >= 1 and --it-s/--cpu-it-s > 0", file=sys.stderr)
        return 2
    try:
        rows = load_points(a.csv)
    except (OSError, ValueError) as e:
        print(f"scale_curve: {e}", file=sys.stderr)
        return 2
    report = analyse(rows, target=a.target, batch=a.batch, it_s=a.it_s, cpu_batch=a.cpu_batch,
                     cpu_it_s=a.cpu_it_s)
    if a.plot:
        plot(rows, report, a.plot)
    if a.json:
        print(json.dumps(report, indent=2))
        return 0
    cur = report["current"]
    print(f"now: {cur['run']} step {cur['step']:.0f}, {cur['samples']:,.0f} crops seen, "
          f"matched {cur['matched']:.2f} dB (target {report['target_matched']:.2f}: gap {report['gap_db']:.2f} dB), "
          f"corr {cur['corr']:+.3f}")
    for name, f in report["fits"].items():
        head = (f"{name:13s} {f['points']:.0f} points, {f['from']:,.0f}-{f['to']:,.0f} crops: "
                f"{f['slope_db_per_doubling']:+.2f} dB per doubling")
        if f["samples_needed"] is None:
            print(f"{head}; never reaches the target")
            continue
        if f["samples_needed"] <= cur["samples"]:
            print(f"{head}; predicted the target at {f['samples_needed']:,.0f} crops, fewer than now: "
                  f"this stretch's slope did not hold")
            continue
        print(f"{head}; reaches it at {f['samples_needed']:,.0f} crops ({f['x_current']:.1f}x now): "
              f"{f['gpu_steps']:,.0f} more steps at batch {a.batch} = {f['gpu_hours']:.1f} h at {a.it_s} it/s; "
              f"{f['cpu_hours']:,.0f} h on the CPU (batch {a.cpu_batch}, {a.cpu_it_s} it/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
