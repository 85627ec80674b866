"""DTB quality of several checkpoints on fixed 64-px crops of the paired dev set: a training curve.

For each checkpoint (e.g. snapshots of one run, or runs with different ``--prediction``) the EMA
derain estimator is scored on the same seeded 64x64 crops of ``dev/sirr`` (the shipped model's tile
size), on the Y channel like benchmarks/quality.py:

- ``x0@t``: the estimator's one-shot x_0 estimate from the *true* clean crop noised to t. At high t
  this is its guess of the clean image from the condition alone; an undertrained eps model scores
  far below the input there, which is why its 10-step DDIM output is noise (docs/quality.md);
- ``ddim``: the torch reference sampler (Algorithm 2, S steps from x_T ~ N(0, I)), with the
  brightness-matched PSNR and the correlation of its change with (clean - rainy).

    python benchmarks/dtb_curve.py runs/snap_*.pt --json --plot docs/dtb_curve.png

Skips with a clear message where ../shared/data is absent. The ground truth only scores.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import dev_pair_dirs

X0_TIMESTEPS = (101, 501, 901)


def crops(rainy_dir: Path, clean_dir: Path, *, size: int, per_image: int, seed: int) -> list[tuple]:
    from runtime.io import iter_image_files, load_rgb

    rng = np.random.default_rng(seed)
    out = []
    for rp in iter_image_files(rainy_dir):
        cp = clean_dir / rp.name
        if not cp.is_file():
            continue
        r, c = load_rgb(rp), load_rgb(cp)
        for _ in range(per_image):
            y0, x0 = int(rng.integers(0, r.shape[0] - size + 1)), int(rng.integers(0, r.shape[1] - size + 1))
            out.append((r[y0:y0 + size, x0:x0 + size], c[y0:y0 + size, x0:x0 + size]))
    return out


def evaluate(checkpoint: Path, pairs: list[tuple], *, steps: int, seed: int) -> dict:
    import torch

    from runtime.metrics import brightness_matched, change_correlation, psnr_y
    from training.checkpoint import build_estimator, load_checkpoint, model_configs
    from training.diffusion import alpha_bar_tensor, ddim_sample, to_uint8

    ck = load_checkpoint(checkpoint)
    est = build_estimator(ck, "derain")
    cfgs = model_configs(ck)
    ab = alpha_bar_tensor(cfgs.schedule).float()
    to_t = lambda a: torch.from_numpy(np.stack(a).transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1.0)  # noqa: E731
    rainy, clean = [p[0] for p in pairs], [p[1] for p in pairs]
    y, x = to_t(rainy), to_t(clean)
    u8 = lambda b: [to_uint8(b[i:i + 1]) for i in range(b.shape[0])]  # noqa: E731
    res = {"checkpoint": str(checkpoint), "step": int(ck.get("step", -1)),
           "prediction": cfgs.estimator.prediction, "crops": len(pairs)}
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in X0_TIMESTEPS:
            eps = torch.randn(x.shape, generator=gen)
            x_t = ab[t].sqrt() * x + (1 - ab[t]).sqrt() * eps
            eps_hat = est(x_t, y, torch.full((x.shape[0],), float(t)))
            x0 = (x_t - (1 - ab[t]).sqrt() * eps_hat) / ab[t].sqrt()
            res[f"x0@{t}"] = statistics.fmean(psnr_y(o, c) for o, c in zip(u8(x0), clean))
        out = u8(ddim_sample(est, y, steps=steps, seed=seed, schedule_config=cfgs.schedule))
    res["ddim"] = statistics.fmean(psnr_y(o, c) for o, c in zip(out, clean))
    res["ddim_matched"] = statistics.fmean(psnr_y(brightness_matched(o, c), c) for o, c in zip(out, clean))
    res["ddim_corr"] = statistics.fmean(change_correlation(o, r, c) for o, r, c in zip(out, rainy, clean))
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoints", type=Path, nargs="+")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--per-image", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--plot", type=Path, default=None, help="PNG of DDIM PSNR vs step (one line per prediction)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    dirs = dev_pair_dirs("dtb_curve")
    if dirs is None:
        return 0
    rainy_dir, clean_dir = dirs
    missing = [str(p) for p in a.checkpoints if not p.is_file()]
    if missing:
        print(f"dtb_curve: not found: {', '.join(missing)}", file=sys.stderr)
        return 2
    import torch

    from runtime.metrics import brightness_matched, psnr_y

    torch.set_num_threads(a.threads)
    pairs = crops(rainy_dir, clean_dir, size=a.size, per_image=a.per_image, seed=a.seed)
    base = {"input": statistics.fmean(psnr_y(r, c) for r, c in pairs),
            "input_matched": statistics.fmean(psnr_y(brightness_matched(r, c), c) for r, c in pairs)}
    print(f"{len(pairs)} crops of {a.size}px; input {base['input']:.2f} dB (brightness-matched "
          f"{base['input_matched']:.2f})", file=sys.stderr)
    rows = []
    for ck in a.checkpoints:
        r = evaluate(ck, pairs, steps=a.steps, seed=a.seed)
        rows.append(r)
        x0s = "  ".join(f"x0@{t} {r[f'x0@{t}']:.2f}" for t in X0_TIMESTEPS)
        print(f"{ck.name:24s} step {r['step']:>6}  {r['prediction']:10s} {x0s}  ddim{a.steps} {r['ddim']:.2f} "
              f"(matched {r['ddim_matched']:.2f}, corr {r['ddim_corr']:+.3f})", file=sys.stderr)
    if a.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6.5, 3.8))
        for pred in dict.fromkeys(r["prediction"] for r in rows):
            sel = sorted((r for r in rows if r["prediction"] == pred), key=lambda r: r["step"])
            ax.plot([r["step"] for r in sel], [r["ddim"] for r in sel], "o-", label=f"DTB, {pred}")
        ax.axhline(base["input"], color="k", ls="--", label="rainy input")
        ax.axhline(base["input"] + 1, color="g", ls=":", label="target (input + 1 dB)")
        ax.set(xlabel="training step", ylabel=f"Y-PSNR on dev/sirr {a.size}px crops (dB)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        a.plot.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(a.plot, dpi=110)
    if a.json:
        print(json.dumps({"baseline": base, "size": a.size, "steps": a.steps, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
