"""Quality of a checkpoint on the paired dev set: G_B (NTB) and DTB (DDIM) outputs vs the input.

For every pair of ``dev/sirr`` it scores, on the Y channel (PSNR / SSIM, deraining papers'
convention): the rainy input, the rainy input after its best global brightness shift, G_B's
output, and the DTB output (the exported fused step run by the runtime, or the torch sampler
with --torch). Two checks tell deraining from a brightness shift (docs/ARCHITECTURE.md):

- ``gain_matched``: output PSNR after matching the output's mean luminance to the clean
  image's, minus the same for the input (a pure darkening scores 0 here);
- ``corr``: correlation of (output - rainy) with (clean - rainy) on Y (0 for a change that
  has nothing to do with the rain).

    python benchmarks/quality.py --checkpoint training/assets/default.pt \
        --onnx runtime/assets/default.onnx --steps 10 --panels docs/img --json

``--bands`` splits the mean-removed error into a low and a high band (where does the output lose
to the input: tone or detail?); ``--seeds K`` scores the mean of K samples (the sampler's variance
vs the model's bias).

Skips with a clear message where ../shared/data is absent. Never trains on anything.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DEFAULT_CKPT, DEFAULT_ONNX, dev_pair_dirs

BAND_SIGMA = 4.0  # Gaussian sigma (px) between the --bands' low and high band


def band_psnr(out: np.ndarray, clean: np.ndarray, sigma: float = BAND_SIGMA) -> tuple[float, float]:
    """PSNR (dB, peak 255) of the Y error's low band and high band, its mean removed first.

    The error e = Y(out) - Y(clean) minus its mean (what brightness matching removes) is split
    into lo = gaussian(e, sigma) and hi = e - lo (lo + hi = e); each is scored as a PSNR of its own
    mean square. Rain streaks and sampler grain live in the high band, tone and haze in the low.
    """
    from scipy.ndimage import gaussian_filter

    from runtime.metrics import rgb_to_y

    e = rgb_to_y(out) - rgb_to_y(clean)
    e -= e.mean()
    lo = gaussian_filter(e, sigma)
    return tuple(10.0 * np.log10(255.0**2 / max(float(np.mean(b**2)), 1e-12)) for b in (lo, e - lo))


def score(out: np.ndarray, rainy: np.ndarray, clean: np.ndarray, *, bands: bool = False) -> dict:
    from runtime.metrics import brightness_matched, change_correlation, psnr_y, ssim_y

    row = {"psnr": psnr_y(out, clean), "ssim": ssim_y(out, clean),
           "psnr_matched": psnr_y(brightness_matched(out, clean), clean),
           "corr": change_correlation(out, rainy, clean) if out is not rainy else 0.0}
    if bands:
        row["psnr_lo"], row["psnr_hi"] = band_psnr(out, clean)
    return row


def seed_mean(outputs: list[np.ndarray]) -> np.ndarray:
    """The per-pixel mean of several uint8 outputs, rounded back to uint8."""
    return np.clip(np.rint(np.mean(np.stack(outputs).astype(np.float64), axis=0)), 0, 255).astype(np.uint8)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, default=DEFAULT_CKPT)
    ap.add_argument("--onnx", type=Path, default=DEFAULT_ONNX, help="DTB artifact run by the runtime")
    ap.add_argument("--torch", action="store_true", help="run the DTB with the torch reference sampler instead")
    ap.add_argument("--no-dtb", action="store_true", help="score the NTB generator G_B only (cheap ablations)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--seeds", type=int, default=1,
                    help="average the DTB outputs of K seeds (seed .. seed+K-1): how much of its error is the "
                         "sampler's variance rather than the model's bias (K x the time)")
    ap.add_argument("--bands", action="store_true",
                    help=f"also score the mean-removed Y error's low and high band (Gaussian sigma {BAND_SIGMA:g} px)")
    ap.add_argument("--limit", type=int, default=0, help="first N pairs only (0 = all)")
    ap.add_argument("--panels", type=Path, default=None,
                    help="write rainy | G_B | DTB | clean panels here (no DTB column with --no-dtb)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    if a.seeds < 1:
        print(f"quality: --seeds must be >= 1, got {a.seeds}", file=sys.stderr)
        return 2
    dirs = dev_pair_dirs("quality")
    if dirs is None:
        return 0
    rainy_dir, clean_dir = dirs
    if not a.checkpoint.is_file():
        print(f"quality: {a.checkpoint} not found", file=sys.stderr)
        return 2

    import torch

    from runtime.io import load_rgb, save_image
    from training.checkpoint import build_estimator, build_generators, load_checkpoint
    from training.diffusion import ddim_sample, pad_to_multiple, to_tensor, to_uint8

    torch.set_num_threads(a.threads)
    ckpt = load_checkpoint(a.checkpoint)
    _, G_B = build_generators(ckpt)
    names = sorted(p.name for p in rainy_dir.iterdir() if (clean_dir / p.name).is_file())
    if a.limit:
        names = names[: a.limit]
    pairs = [(n, load_rgb(rainy_dir / n), load_rgb(clean_dir / n)) for n in names]
    mult = G_B.config.size_multiple

    seeds = range(a.seed, a.seed + a.seeds)
    # Block 1 (torch): G_B, and the DTB when --torch.
    gb_out, dtb_out = {}, {}
    est = build_estimator(ckpt, "derain") if a.torch else None
    with torch.no_grad():
        for n, rainy, _ in pairs:
            x = to_tensor(rainy)
            xp, (h, w) = pad_to_multiple(x, mult)
            gb_out[n] = to_uint8(G_B(xp)[..., :h, :w])
            if est is not None:
                dtb_out[n] = seed_mean([to_uint8(ddim_sample(est, x, steps=a.steps, seed=s)) for s in seeds])
    # Block 2 (onnxruntime): the DTB through the runtime, as users run it.
    if est is None and not a.no_dtb:
        from runtime.derainer import Derainer

        runs = {n: [] for n, _, _ in pairs}
        for s in seeds:
            with Derainer(a.onnx, steps=a.steps, seed=s, threads=a.threads) as d:
                for n, rainy, _ in pairs:
                    runs[n].append(d.derain(rainy))
        dtb_out = {n: seed_mean(v) for n, v in runs.items()}

    outputs = {"G_B": gb_out} if a.no_dtb else {"G_B": gb_out, "DTB": dtb_out}
    rows = []
    for n, rainy, clean in pairs:
        row = {"name": n, "input": score(rainy, rainy, clean, bands=a.bands)}
        row.update({k: score(out[n], rainy, clean, bands=a.bands) for k, out in outputs.items()})
        rows.append(row)
        if a.panels:
            save_image(a.panels / f"panel_{Path(n).stem}.png",
                       np.concatenate([rainy, *(out[n] for out in outputs.values()), clean], axis=1))
    mean = {k: {m: statistics.fmean(r[k][m] for r in rows) for m in rows[0][k]} for k in ("input", *outputs)}
    for k in outputs:
        mean[k]["gain_raw"] = mean[k]["psnr"] - mean["input"]["psnr"]
        mean[k]["gain_matched"] = mean[k]["psnr_matched"] - mean["input"]["psnr_matched"]
        mean[k]["ssim_gain"] = mean[k]["ssim"] - mean["input"]["ssim"]
    report = {"checkpoint": str(a.checkpoint), "dtb": None if a.no_dtb else "torch" if a.torch else str(a.onnx),
              "steps": a.steps, "seed": a.seed, "seeds": a.seeds, "pairs": len(rows), "mean": mean,
              "per_image": rows}
    if a.json:
        print(json.dumps(report, indent=2))
    else:
        seeds_txt = f"seed {a.seed}" if a.seeds == 1 else f"mean of seeds {a.seed}..{a.seed + a.seeds - 1}"
        print(f"{len(rows)} pairs of dev/sirr, DTB {a.steps} DDIM steps ({seeds_txt})")
        bands_head = f" {'low band':>9s} {'high band':>9s}" if a.bands else ""
        print(f"{'':8s} {'PSNR':>7s} {'SSIM':>7s} {'PSNR(bright-matched)':>21s} {'corr':>6s}{bands_head}")
        for k in mean:
            m = mean[k]
            bands_row = f" {m['psnr_lo']:9.2f} {m['psnr_hi']:9.2f}" if a.bands else ""
            print(f"{k:8s} {m['psnr']:7.2f} {m['ssim']:7.4f} {m['psnr_matched']:21.2f} {m['corr']:6.3f}{bands_row}")
        for k in outputs:
            m = mean[k]
            print(f"{k} gain: raw {m['gain_raw']:+.2f} dB, brightness-matched {m['gain_matched']:+.2f} dB, "
                  f"SSIM {m['ssim_gain']:+.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
