"""Cost growth: time per pixel-step of onnxruntime FP32 (and INT8) over frame sizes and step counts.

For every size in ``--sizes`` (default 128, 256, 512, 1024, square) and every S in ``--steps``
(default 5, 10, 25) times whole ``Derainer.derain`` calls (u8 in, u8 out) and reports
``ns / (pixel * step)`` = median frame time / (H * W * S). A fully convolutional step should
cost the same per pixel at every size; the target is a ratio of at most 1.2 between 1024^2 and
256^2 (``--ratio-sizes``).

Tiling. ``Derainer`` tiles frames larger than the manifest's shape profile by default (with
onnxruntime too: it bounds the quadratic lowest-level attention). So each size is measured

- ``full``: one tile covering the whole frame (sizes up to ``--max-full``, default the largest
  size), i.e. the plain full-frame cost of the step graph, and
- ``tiled``: ``Derainer(tile=--tile, overlap=--overlap)`` for sizes larger than the tile
  (default tile = the profile's opt size), which is what happens beyond the profile on TensorRT.
  Its time per pixel-step counts output pixels, so the overlap's extra work shows up in it;
  ``work x`` (pixels the engine runs / output pixels) and the time per *computed* pixel-step
  separate that overhead from the engine's own cost. The 1.2 target applies to full frames.

Backends are measured in blocks (all of FP32, then all of INT8). A plot of latency vs size per
backend/mode, one panel per S, goes to ``--plot`` (default docs/latency_vs_size.png; matplotlib).

    python benchmarks/cost_growth.py [--sizes 128,256,512,1024] [--steps 5,10,25] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DEFAULT_INT8, DEFAULT_ONNX, REPO, machine, median_ms, real_frame, runtime_artifacts

RATIO_TARGET = 1.2


def int_list(text: str) -> list[int]:
    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not vals or min(vals) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return vals


def measure_backend(path: Path, sizes: list[int], steps_list: list[int], *, max_full: int, tile: int,
                    overlap: int, runs: int, warmup: int, threads: int) -> list[dict]:
    """Rows {mode, size, steps, median_ms, ns_per_pixel_step, ...} for one artifact."""
    from runtime.derainer import Derainer
    from runtime.tiling import plan_tiles

    rows = []
    frames = {s: real_frame(s, s) for s in sizes}
    for steps in steps_list:
        for mode, kw, wanted in (("full", {"tile": max(sizes)}, [s for s in sizes if s <= max_full]),
                                 ("tiled", {"tile": tile, "overlap": overlap}, [s for s in sizes if s > tile])):
            if not wanted:
                continue
            with Derainer(path, steps=steps, threads=threads, **kw) as d:
                for size in wanted:
                    r = median_ms(lambda d=d, f=frames[size]: d.derain(f), runs=runs, warmup=warmup)
                    r.update(mode=mode, size=size, steps=steps,
                             ns_per_pixel_step=r["median_ms"] * 1e6 / (size * size * steps))
                    if mode == "tiled":
                        plan = plan_tiles(size, size, tile, overlap, multiple=d.size_multiple)
                        computed = len(plan) * plan.tile_h * plan.tile_w  # pixels the engine runs
                        r.update(tile=tile, overlap=overlap, tiles=len(plan), work_factor=computed / (size * size),
                                 ns_per_computed_pixel_step=r["median_ms"] * 1e6 / (computed * steps))
                    rows.append(r)
    return rows


def growth_ratios(rows: list[dict], lo: int, hi: int) -> list[dict]:
    """ns/pixel-step at ``hi`` over that at ``lo`` (full-frame at ``lo``), per mode at ``hi`` and S."""
    out = []
    base = {r["steps"]: r for r in rows if r["mode"] == "full" and r["size"] == lo}
    for r in rows:
        if r["size"] == hi and r["steps"] in base:
            out.append({"steps": r["steps"], "mode": r["mode"], "lo": lo, "hi": hi,
                        "ratio": r["ns_per_pixel_step"] / base[r["steps"]]["ns_per_pixel_step"]})
    return out


def plot(results: dict, dest: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    steps_list = sorted({r["steps"] for rows in results.values() for r in rows})
    fig, axes = plt.subplots(1, len(steps_list), figsize=(4.2 * len(steps_list), 3.8), squeeze=False)
    for ax, steps in zip(axes[0], steps_list):
        for backend, rows in results.items():
            for mode, style in (("full", "-o"), ("tiled", "--s")):
                pts = sorted((r["size"], r["median_ms"]) for r in rows if r["steps"] == steps and r["mode"] == mode)
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=f"{backend} {mode}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        sizes = sorted({r["size"] for rows in results.values() for r in rows})
        ax.set_xticks(sizes, [str(s) for s in sizes])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_xlabel("frame side (px, square)")
        ax.set_ylabel("ms per frame (median)")
        ax.set_title(f"{steps} steps")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    dest.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(dest, dpi=120)
    plt.close(fig)
    return dest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--onnx", type=Path, default=DEFAULT_ONNX)
    ap.add_argument("--int8", type=Path, default=DEFAULT_INT8, help="skipped when the file is absent")
    ap.add_argument("--sizes", type=int_list, default=[128, 256, 512, 1024])
    ap.add_argument("--steps", type=int_list, default=[5, 10, 25])
    ap.add_argument("--ratio-sizes", type=int_list, default=[256, 1024], help="LO,HI of the growth ratio")
    ap.add_argument("--max-full", type=int, default=None, help="largest full-frame size (default: profile max)")
    ap.add_argument("--tile", type=int, default=None, help="tile size of the tiled mode (default: profile opt)")
    ap.add_argument("--overlap", type=int, default=32)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--plot", type=Path, default=REPO / "docs" / "latency_vs_size.png")
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    if not a.onnx.is_file():
        print(f"cost_growth: {a.onnx} not found (export the default model first, or pass --onnx)", file=sys.stderr)
        return 2
    if len(a.ratio_sizes) != 2:
        ap.error("--ratio-sizes takes two sizes, LO,HI")
    from runtime.manifest import Manifest

    profile = Manifest.for_artifact(a.onnx).step_descriptor.profile
    max_full = a.max_full or max(a.sizes)  # onnxruntime runs any shape; the profile only bounds engines
    tile = a.tile or min(profile.opt_size)
    arts, int8_skipped = runtime_artifacts(a.onnx, a.int8)
    # One block per backend: every size and step count of FP32, then of INT8.
    results = {name: measure_backend(path, a.sizes, a.steps, max_full=max_full, tile=tile, overlap=a.overlap,
                                     runs=a.runs, warmup=a.warmup, threads=a.threads)
               for name, path in arts.items()}
    lo, hi = a.ratio_sizes
    ratios = {name: growth_ratios(rows, lo, hi) for name, rows in results.items()}
    note = (f"Derainer tiles frames beyond the manifest's profile ({profile.min_size[0]}..{profile.max_size[0]} px, "
            f"opt {profile.opt_size[0]}); full = one tile covering the frame (sizes <= {max_full}); "
            f"tiled = tile={tile}, overlap={a.overlap} (sizes > {tile}).")
    report = {"machine": machine(), "threads": a.threads, "runs": a.runs, "note": note, "ratio_target": RATIO_TARGET,
              "results": results, "growth_ratios": ratios, "int8_skipped": int8_skipped}
    if not a.no_plot:
        title = f"RainDiffusion latency vs frame size ({report['machine']['cpu']}, {a.threads} threads)"
        try:
            report["plot"] = str(plot(results, a.plot, title))
        except ImportError:
            report["plot"] = None
            print("cost_growth: matplotlib is not installed (pip install matplotlib); no plot written",
                  file=sys.stderr)
    if a.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"{report['machine']['cpu']}, {a.threads} threads, median of {a.runs} runs")
    print(note)
    print(f"{'backend':18s} {'mode':6s} {'size':>6s} {'steps':>5s} {'ms/frame':>10s} {'ns/pixel-step':>14s} "
          f"{'tiles':>6s} {'work x':>7s} {'ns/computed px-step':>20s}")
    for name, rows in results.items():
        for r in sorted(rows, key=lambda r: (r["mode"], r["steps"], r["size"])):
            tiled = (f"{r['tiles']:6d} {r['work_factor']:7.2f} {r['ns_per_computed_pixel_step']:20.2f}"
                     if r["mode"] == "tiled" else "")
            print(f"{name:18s} {r['mode']:6s} {r['size']:6d} {r['steps']:5d} {r['median_ms']:10.1f} "
                  f"{r['ns_per_pixel_step']:14.2f} {tiled}".rstrip())
    for name, rs in ratios.items():
        if not rs:
            print(f"{name}: growth ratio {hi}^2 / {lo}^2 n/a (measure both sizes: --sizes ...,{lo},...,{hi})")
        for r in rs:
            verdict = (f"target <= {RATIO_TARGET}: {'met' if r['ratio'] <= RATIO_TARGET else 'NOT met'}"
                       if r["mode"] == "full" else "tiling overhead included, see work x")
            print(f"{name}: ns/pixel-step {hi}^2 {r['mode']} / {lo}^2 full, {r['steps']} steps: "
                  f"{r['ratio']:.3f}x ({verdict})")
    if int8_skipped:
        print(f"onnxruntime_int8: skipped ({int8_skipped})")
    if report.get("plot"):
        print(f"plot: {report['plot']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
