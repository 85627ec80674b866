"""Training throughput: one step of Algorithm 1 at several batch x crop sizes, on CPU or a GPU.

Builds the model of a preset (random weights: speed does not depend on them), feeds random
batches and times ``algorithm1_step`` (with the synthetic rain of ``--ntb`` and the EMA update, as
``rd-train fit`` does; bf16 autocast on CUDA like ``rd-train --device cuda``). Each size is
measured in its own block after warm-up steps; the table gives it/s, samples/s and the ratio of
samples/s to the first row (the baseline, measured in the same run). ``--calls unbatched,batched``
measures every size twice: one network call per loss term (the literal Algorithm 1) and
``RainDiffusion.batch_calls`` (each network once on its two batches, rd-train's default). ``--profile`` adds
torch.profiler's top operators for the baseline size and the kernel launches per step (CUDA).

    python benchmarks/train_step.py --device cuda --sizes 4x64,16x64,64x64,16x128 --steps 20
    python benchmarks/train_step.py --sizes 4x64 --steps 3          # this CPU
    python benchmarks/train_step.py --device cuda --sizes 64x64 --calls unbatched,batched \
        --cond-drop 0.2 --lambda-sds 10

Not a test: numbers go to docs/benchmarks.md with the machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, machine

sys.path.insert(0, str(REPO))


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """'4x64,16x128' -> [(4, 64), (16, 128)] (batch x crop)."""
    out = []
    for part in text.split(","):
        try:
            b, c = (int(v) for v in part.lower().split("x"))
        except ValueError:
            raise SystemExit(f"train_step.py: error: size {part!r} is not BATCHxCROP (e.g. 16x64)") from None
        if b < 1 or c < 8:
            raise SystemExit(f"train_step.py: error: size {part!r}: batch >= 1 and crop >= 8 please")
        out.append((b, c))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--preset", default="small", choices=["tiny", "small", "base"])
    ap.add_argument("--prediction", default="v_residual", choices=["eps", "v", "v_residual"])
    ap.add_argument("--ntb", default="render", choices=["faithful", "synthetic", "render"])
    ap.add_argument("--sizes", default="4x64,16x64", help="comma-separated BATCHxCROP; the first is the baseline")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per size")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--calls", default="batched",
                    help="comma-separated: batched (rd-train's default) and / or unbatched (one call per term)")
    ap.add_argument("--cond-drop", type=float, default=0.0, help="as rd-train fit --cond-drop")
    ap.add_argument("--lambda-sds", type=float, default=0.0, help="as rd-train fit --lambda-sds (needs --cond-drop)")
    ap.add_argument("--profile", action="store_true", help="torch.profiler table for the baseline row")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    sizes = parse_sizes(args.sizes)
    calls = [c.strip() for c in args.calls.split(",") if c.strip()]
    if not calls or any(c not in ("batched", "unbatched") for c in calls):
        ap.error(f"--calls takes batched and / or unbatched, got {args.calls!r}")
    if args.lambda_sds > 0 and args.cond_drop <= 0:
        ap.error("--lambda-sds needs --cond-drop > 0 (the unconditional prior it distils)")

    import torch

    from training.algorithm import RainDiffusion, algorithm1_step
    from training.config import model_preset
    from training.synthrain import rain_batch
    from training.train import EMA

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("train_step.py: skipped: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 0
    dev = torch.device(args.device)
    torch.manual_seed(0)
    model = RainDiffusion(model_preset(args.preset, prediction=args.prediction)).to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4, betas=(0.5, 0.999))
    ema = EMA(model, 0.999, 10)
    ema.ema_A.to(dev)
    ema.ema_B.to(dev)
    gen = torch.Generator().manual_seed(0)
    autocast = torch.bfloat16 if dev.type == "cuda" else None
    synthetic = args.ntb != "faithful"

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    def step(b: int, c: int) -> None:
        x = torch.rand(b, 3, c, c, device=dev) * 2 - 1
        y = torch.rand(b, 3, c, c, device=dev) * 2 - 1
        x_syn = rain_batch(x, gen) if synthetic else None
        algorithm1_step(model, opt, x, y, ntb=args.ntb, x_syn=x_syn, grad_clip=1.0, autocast_dtype=autocast,
                        cond_drop=args.cond_drop, lambda_sds=args.lambda_sds)
        ema.update(model)

    rows = []
    for b, c in sizes:
        for mode in calls:  # each (size, calls) its own block
            model.batch_calls = mode == "batched"
            for _ in range(args.warmup):
                step(b, c)
            sync()
            t0 = time.perf_counter()
            for _ in range(args.steps):
                step(b, c)
            sync()
            sec = (time.perf_counter() - t0) / args.steps
            rows.append({"batch": b, "crop": c, "calls": mode, "step_ms": round(sec * 1e3, 1),
                         "it_s": round(1 / sec, 3), "samples_s": round(b / sec, 2)})
    base = rows[0]["samples_s"]
    for r in rows:
        r["samples_ratio"] = round(r["samples_s"] / base, 2)
    info = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else machine()["cpu"],
            "torch": torch.__version__, "preset": args.preset, "prediction": args.prediction, "ntb": args.ntb,
            "cond_drop": args.cond_drop, "lambda_sds": args.lambda_sds, "steps": args.steps, "rows": rows}
    if args.profile:  # the first size, once per call mode
        acts = [torch.profiler.ProfilerActivity.CPU]
        if dev.type == "cuda":
            acts.append(torch.profiler.ProfilerActivity.CUDA)
        b, c = sizes[0]
        n = 3
        launches = {}
        for i, mode in enumerate(calls):
            model.batch_calls = mode == "batched"
            with torch.profiler.profile(activities=acts) as prof:
                for _ in range(n):
                    step(b, c)
                sync()
            avg = prof.key_averages()
            if dev.type == "cuda":
                launches[mode] = sum(e.count for e in avg if e.key == "cudaLaunchKernel") / n
            if i == 0:
                sort = "cuda_time_total" if dev.type == "cuda" else "cpu_time_total"
                print(avg.table(sort_by=sort, row_limit=15, max_name_column_width=50))
        if launches:
            info["kernel_launches_per_step"] = launches
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print(f"{info['device']} | torch {info['torch']} | {args.preset}, {args.prediction}, ntb {args.ntb}")
        print(f"{'batch x crop':>13} {'calls':>10} {'step ms':>9} {'it/s':>7} {'samples/s':>10} {'vs first':>9}")
        for r in rows:
            print(f"{r['batch']:>6} x {r['crop']:<4} {r['calls']:>10} {r['step_ms']:>9} {r['it_s']:>7} "
                  f"{r['samples_s']:>10} {r['samples_ratio']:>8}x")
        for mode, k in info.get("kernel_launches_per_step", {}).items():
            print(f"kernel launches per step ({mode}, {sizes[0][0]}x{sizes[0][1]}): {k:.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
