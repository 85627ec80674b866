"""Quality of a checkpoint on the paired dev set: G_B (NTB) and DTB (DDIM) outputs vs the input.

For every pair of ``dev/sirr`` it scores, on the Y channel (PSNR / SSIM, deraining papers'
convention): the rainy input, the rainy input after its best global brightness shift, G_B's
output, and the DTB output (the exported fused step run by the runtime, or the torch sampler
with --torch). Two checks tell deraining from a brightness shift (DESIGN.md):

- ``gain_matched``: output PSNR after matching the output's mean luminance to the clean
  image's, minus the same for the input (a pure darkening scores 0 here);
- ``corr``: correlation of (output - rainy) with (clean - rainy) on Y (0 for a change that
  has nothing to do with the rain).

    python benchmarks/quality.py --checkpoint training/assets/default.pt \
        --onnx runtime/assets/default.onnx --steps 10 --panels docs/img --json

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


def score(out: np.ndarray, rainy: np.ndarray, clean: np.ndarray) -> dict:
    from runtime.metrics import brightness_matched, change_correlation, psnr_y, ssim_y

    return {"psnr": psnr_y(out, clean), "ssim": ssim_y(out, clean),
            "psnr_matched": psnr_y(brightness_matched(out, clean), clean),
            "corr": change_correlation(out, rainy, clean) if out is not rainy else 0.0}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, default=DEFAULT_CKPT)
    ap.add_argument("--onnx", type=Path, default=DEFAULT_ONNX, help="DTB artifact run by the runtime")
    ap.add_argument("--torch", action="store_true", help="run the DTB with the torch reference sampler instead")
    ap.add_argument("--no-dtb", action="store_true", help="score the NTB generator G_B only (cheap ablations)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--limit", type=int, default=0, help="first N pairs only (0 = all)")
    ap.add_argument("--panels", type=Path, default=None,
                    help="write rainy | G_B | DTB | clean panels here (no DTB column with --no-dtb)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
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

    # Block 1 (torch): G_B, and the DTB when --torch.
    gb_out, dtb_out = {}, {}
    est = build_estimator(ckpt, "derain") if a.torch else None
    with torch.no_grad():
        for n, rainy, _ in pairs:
            x = to_tensor(rainy)
            xp, (h, w) = pad_to_multiple(x, mult)
            gb_out[n] = to_uint8(G_B(xp)[..., :h, :w])
            if est is not None:
                dtb_out[n] = to_uint8(ddim_sample(est, x, steps=a.steps, seed=a.seed))
    # Block 2 (onnxruntime): the DTB through the runtime, as users run it.
    if est is None and not a.no_dtb:
        from runtime.derainer import Derainer

        with Derainer(a.onnx, steps=a.steps, seed=a.seed, threads=a.threads) as d:
            for n, rainy, _ in pairs:
                dtb_out[n] = d.derain(rainy)

    outputs = {"G_B": gb_out} if a.no_dtb else {"G_B": gb_out, "DTB": dtb_out}
    rows = []
    for n, rainy, clean in pairs:
        row = {"name": n, "input": score(rainy, rainy, clean)}
        row.update({k: score(out[n], rainy, clean) for k, out in outputs.items()})
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
              "steps": a.steps,
              "seed": a.seed, "pairs": len(rows), "mean": mean, "per_image": rows}
    if a.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"{len(rows)} pairs of dev/sirr, DTB {a.steps} DDIM steps (seed {a.seed})")
        print(f"{'':8s} {'PSNR':>7s} {'SSIM':>7s} {'PSNR(bright-matched)':>21s} {'corr':>6s}")
        for k in mean:
            m = mean[k]
            print(f"{k:8s} {m['psnr']:7.2f} {m['ssim']:7.4f} {m['psnr_matched']:21.2f} {m['corr']:6.3f}")
        for k in outputs:
            m = mean[k]
            print(f"{k} gain: raw {m['gain_raw']:+.2f} dB, brightness-matched {m['gain_matched']:+.2f} dB, "
                  f"SSIM {m['ssim_gain']:+.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
