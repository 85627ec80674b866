"""A fixed short training of the predictor P alone on rendered pairs, scored on both dev sets.

The renderer's yardstick (issue 16): a change to ``training.synthrain`` is kept only when this
probe, run the same way with the old and the new style, scores better on ``dev/sirr`` **and**
``dev/jorder_h``. P is the NTB's derain generator shape (a residual U-Net without attention, so
it runs on whole frames), trained with L1 on (rain_batch(x), x) crops of the clean photos for a
fixed wall-clock budget; the dev sets are never trained on.

    python benchmarks/predictor_probe.py --style v1 --minutes 10 --threads 1 --json > v1.json
    python benchmarks/predictor_probe.py --style v2 --minutes 10 --threads 1 --json > v2.json

Two probes may run side by side with ``--threads 1`` each (the same machine, the same budget).
Prints PSNR / SSIM / brightness-matched PSNR / change correlation (Y channel) of the input and of
P per dev set. ``--save P.pt`` keeps the trained weights (a state dict), e.g. to warm-start a run.
Skips with a clear message where ../shared/data is absent.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DATA, DEV_SETS, dev_pairs


def score_set(fn, pairs) -> dict:
    """Mean scores of the input and of ``fn(rainy) -> uint8`` over ``pairs``."""
    from quality import score

    rows = [{"input": score(r, r, c), "out": score(fn(r), r, c)} for _, r, c in pairs]
    return {k: {m: statistics.fmean(row[k][m] for row in rows) for m in rows[0][k]} for k in ("input", "out")}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--style", default="v1",
                    help="rain_batch style (v1, v2, v3, v4), or several comma-separated: the steps take turns")
    ap.add_argument("--minutes", type=float, default=10.0,
                    help="training wall-clock budget (0: no training, score --init as it is)")
    ap.add_argument("--steps", type=int, default=0,
                    help="train exactly this many steps instead (a budget independent of the machine's load)")
    ap.add_argument("--crop", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--lr-min", type=float, default=None,
                    help="with --steps: decay the learning rate from --lr to this on a cosine (default: constant)")
    ap.add_argument("--base", type=int, default=16, help="P's base channels")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--ema", type=float, default=None, metavar="DECAY",
                    help="keep an exponential moving average of P's weights (e.g. 0.999); it is what is saved "
                         "and scored")
    ap.add_argument("--save", type=Path, default=None, help="write P's state dict here")
    ap.add_argument("--save-every", type=int, default=0,
                    help="with --save: also write it (atomically) every N steps, and keep a copy STEM_STEP.pt")
    ap.add_argument("--init", type=Path, default=None,
                    help="start from this P state dict (a --save of an earlier run, or G_B of a checkpoint)")
    ap.add_argument("--into", nargs=2, type=Path, default=None, metavar=("CKPT", "OUT"),
                    help="also write OUT: a copy of the checkpoint CKPT (model.pt or last.pt of a --config edge "
                         "run) whose G_B is the trained P, to warm-start the refiner on it (rd-train fit --init OUT "
                         "--freeze-ntb)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    styles = [x.strip() for x in a.style.split(",")]
    if a.lr_min is not None and not a.steps:
        ap.error("--lr-min needs --steps (the cosine runs over a known number of steps)")
    if a.save_every and not a.save:
        ap.error("--save-every needs --save")
    clean_dirs = [DATA / "unpaired" / "clean", DATA / "unpaired" / "clean_more"]
    if not all(d.is_dir() for d in clean_dirs) or not (DATA / "dev" / "jorder_h").is_dir():
        print(f"predictor_probe: skipped: clean photos or dev sets not found under {DATA}", file=sys.stderr)
        return 0

    import torch
    import torch.nn.functional as F

    from training.data import UnpairedSampler, load_folders
    from training.diffusion import pad_to_multiple, to_tensor, to_uint8
    from training.synthrain import RAIN_STYLES, rain_batch
    from training.unet import UNet, UNetConfig

    if bad := [x for x in styles if x not in RAIN_STYLES]:
        print(f"predictor_probe: unknown rain style {', '.join(bad)}; one of {', '.join(RAIN_STYLES)}", file=sys.stderr)
        return 2
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    clean, _ = load_folders(clean_dirs, min_side=a.crop)
    sampler = UnpairedSampler(clean, clean[:1], batch=a.batch, crop=a.crop, seed=a.seed)
    gen = torch.Generator().manual_seed(a.seed + 1)
    cfg = UNetConfig(in_channels=3, base_channels=a.base, channel_mult=(1, 2, 2), groups=8, time_embedding=False,
                     residual=True, attention_levels=())
    P = UNet(cfg)
    if a.init is not None:
        state = torch.load(a.init, weights_only=True)
        state = state.get("state", {}).get("G_B", state) if "state" in state else state  # a checkpoint's G_B
        P.load_state_dict(state)
    opt = torch.optim.Adam(P.parameters(), lr=a.lr)
    ema = None
    if a.ema is not None:
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        ema = AveragedModel(P, multi_avg_fn=get_ema_multi_avg_fn(a.ema))

    def kept() -> torch.nn.Module:
        return P if ema is None else ema.module

    def save_state(path: Path) -> None:
        from runtime.io import atomic_path

        with atomic_path(path) as tmp:
            torch.save(kept().state_dict(), tmp)

    t0, steps, losses = time.perf_counter(), 0, []
    while (steps < a.steps) if a.steps else (time.perf_counter() - t0 < a.minutes * 60):
        if a.lr_min is not None:
            for group in opt.param_groups:
                group["lr"] = a.lr_min + 0.5 * (a.lr - a.lr_min) * (1 + math.cos(math.pi * steps / a.steps))
        x, _ = sampler.next_batch()
        y = rain_batch(x, gen, styles[steps % len(styles)])
        loss = F.l1_loss(P(y), x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if ema is not None:
            ema.update_parameters(P)
        steps += 1
        losses.append(float(loss.detach()))
        if a.save_every and steps % a.save_every == 0:
            save_state(a.save)
            save_state(a.save.with_name(f"{a.save.stem}_{steps}{a.save.suffix}"))
            print(f"predictor_probe: step {steps}, L1 {statistics.fmean(losses[-a.save_every:]):.4f}, "
                  f"{time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    train_s = time.perf_counter() - t0
    P = kept()
    if a.save:
        save_state(a.save)
    if a.into:
        from training.checkpoint import check_state_dict, load_checkpoint, save_checkpoint, strip_checkpoint

        ck = load_checkpoint(a.into[0])
        if UNetConfig.from_dict(ck["config"]["ntb_unet"]) != cfg:
            print(f"predictor_probe: {a.into[0]}'s G_B is not this P's shape", file=sys.stderr)
            return 2
        check_state_dict(P, ck["state"]["G_B"], "G_B", str(a.into[0]))
        ck = strip_checkpoint(ck) if "optimizer" in ck else ck
        ck["state"] = dict(ck["state"], G_B=P.state_dict())
        ck.pop("_path", None)
        save_checkpoint(a.into[1], ck)
    P.eval()

    @torch.no_grad()
    def run(rainy: np.ndarray) -> np.ndarray:
        xp, (h, w) = pad_to_multiple(to_tensor(rainy), cfg.size_multiple)
        return to_uint8(P(xp)[..., :h, :w])

    report = {"style": a.style, "minutes": a.minutes, "steps": steps, "train_s": round(train_s, 1),
              "init": str(a.init) if a.init else None,
              "crop": a.crop, "batch": a.batch, "lr": a.lr, "lr_min": a.lr_min, "ema": a.ema, "seed": a.seed,
              "base": a.base,
              "params": sum(p.numel() for p in P.parameters()),
              "final_l1": statistics.fmean(losses[-100:]) if losses else None,
              "dev": {name: score_set(run, dev_pairs(name)) for name in DEV_SETS}}
    if a.json:
        print(json.dumps(report, indent=2))
        return 0
    final = f"{report['final_l1']:.4f}" if losses else "- (not trained: --minutes 0 scores --init)"
    print(f"style {a.style}: {steps} steps in {train_s:.0f} s ({report['params']} params, batch {a.batch}, "
          f"crop {a.crop}), final L1 {final}")
    for name, d in report["dev"].items():
        for k in ("input", "out"):
            m = d[k]
            print(f"  {name:9s} {k:6s} PSNR {m['psnr']:6.2f}  SSIM {m['ssim']:.4f}  matched {m['psnr_matched']:6.2f}  "
                  f"corr {m['corr']:+.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
