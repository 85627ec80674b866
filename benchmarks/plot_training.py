"""Plot a training run's loss terms and the |G_B(y) - y| collapse monitor from RUN/metrics.jsonl.

    python benchmarks/plot_training.py runs/default -o docs/loss_curve.png
    python benchmarks/plot_training.py runs/ablation_* -o docs/ablation_id_dist.png --id-only
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def read(run: Path) -> list[dict]:
    return [r for r in (json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line)
            if r.get("kind") == "train"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", type=Path, nargs="+")
    ap.add_argument("-o", "--out", type=Path, required=True)
    ap.add_argument("--id-only", action="store_true", help="plot only |G_B(y) - y| per run")
    a = ap.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if a.id_only:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for run in a.runs:
            rows = read(run)
            ax.plot([r["step"] for r in rows], [r["id_dist"] for r in rows], label=run.name)
        ax.set(xlabel="step", ylabel="|G_B(y) - y| (mean abs, [-1,1])", yscale="log")
        ax.legend()
    else:
        rows = read(a.runs[0])
        fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 3.8))
        steps = [r["step"] for r in rows]
        for k, label in (("A_x", "A (x | x')"), ("B_xp", "B (x' | x'')"), ("B_y", "B (y | y')"),
                         ("A_yp", "A (y' | y'')"), ("cyc", "L_cyc")):
            ax.plot(steps, [r[k] for r in rows], label=label)
        ax.set(xlabel="step", ylabel="loss", yscale="log", title=f"{a.runs[0].name}: Algorithm 1 loss terms")
        ax.legend(fontsize=8)
        ax2.plot(steps, [r["id_dist"] for r in rows])
        ax2.set(xlabel="step", ylabel="|G_B(y) - y|", title="distance of G_B from identity")
    fig.tight_layout()
    a.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(a.out, dpi=110)
    print(a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
