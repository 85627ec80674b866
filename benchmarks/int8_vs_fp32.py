"""INT8 (Q/DQ) vs FP32 on CPU with onnxruntime: latency ratio and quality, in one run.

    .venv/bin/python benchmarks/int8_vs_fp32.py [--fp32 model.onnx] [--size 256] [--json]

1. Builds ``model.int8.onnx`` (s8, TensorRT) + ``model.int8.cpu.onnx`` (u8r, onnxruntime CPU) from ``--fp32`` with
   ``calibration.build_int8``, calibrating on ``DATA/unpaired/rainy_real`` (--calib-images).
   ``--methods minmax,percentile,entropy`` builds one per range estimator to compare them.
2. Latency: the whole S-step DDIM loop per frame at --size, FP32 then each INT8 graph, each in
   its own block (not interleaved), same process, same session settings as the runtime.
   Prints the ratio INT8/FP32 (< 1 = faster) and its inverse (the speedup).
3. Quality on ``DATA/dev/sirr`` (never used for calibration): every rainy image derained by
   ``runtime.Derainer`` with FP32 and with INT8 (same seed): PSNR of INT8 vs FP32 (uint8 Y and
   float), and Y-PSNR vs the clean ground truth of both, i.e. the dB INT8 loses.
4. ``--sensitivity``: per-layer end-to-end sensitivity (all layers quantized but one), printed
   as a table: what keeping each layer in FP32 would buy.

Targets (issue 5, real model, 2-core x86, 256x256, 10 steps): >= 1.6x faster than onnxruntime
FP32, >= 35 dB vs FP32 end to end, <= 0.3 dB loss vs ground truth on dev/sirr.

DATA is ``$RD_DATA`` or ``../shared/data`` beside the repository; without it the benchmark says
so and exits 0 (the data are not part of the product).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

import runtime.cpu  # noqa: E402

DATA = Path(os.environ.get("RD_DATA", ROOT.parent / "shared" / "data"))


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def cpu_flags() -> list[str]:
    return sorted(f for f in runtime.cpu.cpu_flags() if f.startswith(("avx512", "avx_vnni", "amx")) or f == "avx2")


def dev_quality(fp32: Path, int8: Path, dev: Path, *, steps: int, seed: int, limit: int | None,
                threads: int | None) -> dict:
    from runtime.derainer import Derainer
    from runtime.io import iter_image_files, load_rgb
    from runtime.metrics import psnr_y

    rainy = iter_image_files(dev / "rainy")[:limit]
    rows = []
    with Derainer(fp32, steps=steps, seed=seed, threads=threads, device="cpu") as d32, \
            Derainer(int8, steps=steps, seed=seed, threads=threads, device="cpu") as d8:
        for path in rainy:
            clean_path = dev / "clean" / path.name
            frame = load_rgb(path)
            a, b = d32.derain(frame), d8.derain(frame)
            af, bf = a.astype(np.float64) / 127.5 - 1, b.astype(np.float64) / 127.5 - 1
            mse = float(np.mean((af - bf) ** 2))
            row = {"image": path.name, "psnr_y_vs_fp32": psnr_y(b, a),
                   "psnr_vs_fp32": 99.0 if mse == 0 else 10 * np.log10(4 / mse)}
            if clean_path.is_file():
                clean = load_rgb(clean_path)
                row.update(gt_fp32=psnr_y(a, clean), gt_int8=psnr_y(b, clean))
            rows.append(row)
            log(f"  {path.name}: INT8 vs FP32 {row['psnr_y_vs_fp32']:.2f} dB (Y)")
    out = {"images": len(rows),
           "psnr_y_vs_fp32_mean": float(np.mean([min(r["psnr_y_vs_fp32"], 99.0) for r in rows])),
           "psnr_y_vs_fp32_min": float(min(r["psnr_y_vs_fp32"] for r in rows)),
           "psnr_vs_fp32_mean": float(np.mean([r["psnr_vs_fp32"] for r in rows]))}
    with_gt = [r for r in rows if "gt_fp32" in r]
    if with_gt:
        out.update(gt_psnr_y_fp32=float(np.mean([r["gt_fp32"] for r in with_gt])),
                   gt_psnr_y_int8=float(np.mean([r["gt_int8"] for r in with_gt])))
        out["gt_loss_db"] = out["gt_psnr_y_fp32"] - out["gt_psnr_y_int8"]
    out["per_image"] = rows
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--fp32", type=Path, default=ROOT / "runtime" / "assets" / "default.onnx",
                   help="verified FP32 ONNX with its manifest (default: the shipped model)")
    p.add_argument("--calib", type=Path, default=DATA / "unpaired" / "rainy_real", help="calibration photos")
    p.add_argument("--dev", type=Path, default=DATA / "dev" / "sirr", help="paired rainy/ + clean/ for quality")
    p.add_argument("--calib-images", type=int, default=8)
    p.add_argument("--steps", type=int, default=None, help="DDIM steps (default: the manifest's)")
    p.add_argument("--size", type=int, default=256, help="latency frame size (square)")
    p.add_argument("--repeats", type=int, default=5, help="timed frames per model (after 1 warm-up)")
    p.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads (default: all cores)")
    p.add_argument("--methods", default="minmax", help="comma list of minmax, percentile, entropy")
    p.add_argument("--no-cpu-variant", action="store_true", help="skip the u8r (x86 CPU) graph")
    p.add_argument("--dev-limit", type=int, default=None, help="use only the first N dev images")
    p.add_argument("--no-quality", action="store_true", help="latency only")
    p.add_argument("--sensitivity", action="store_true", help="per-layer sensitivity table (slow: one "
                   "quantization + evaluation per layer)")
    p.add_argument("--target-psnr", type=float, default=None,
                   help="as rd-export build --calib-target-psnr: keep sensitive layers FP32 until reached")
    p.add_argument("--max-fp32", type=int, default=4, help="as rd-export build --calib-max-fp32")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="keep the INT8 artifacts here (default: a temp dir)")
    p.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    args = p.parse_args(argv)

    if not args.fp32.is_file():
        log(f"skipping: no FP32 ONNX at {args.fp32} (export one with `rd-export build CHECKPOINT --format onnx` "
            f"and pass --fp32)")
        return 0
    if not args.calib.is_dir():
        log(f"skipping: calibration data {args.calib} not found (set RD_DATA or pass --calib; the shared data "
            f"folder is not part of the product)")
        return 0

    from calibration.api import build_int8
    from calibration.collect import CalibrationWarning
    from calibration.report import compare_latency
    from runtime.manifest import Manifest

    warnings.simplefilter("always", CalibrationWarning)
    manifest = Manifest.for_artifact(args.fp32)
    steps = args.steps or manifest.verify_steps
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    result: dict = {"fp32": str(args.fp32), "cpu": runtime.cpu.cpu_name(), "cpu_flags": cpu_flags(),
                    "cores": os.cpu_count(),
                    "threads": args.threads or os.cpu_count(), "size": args.size, "steps": steps, "methods": {}}
    import onnxruntime

    result["onnxruntime"] = onnxruntime.__version__
    tmp = tempfile.TemporaryDirectory(prefix="int8-bench-")
    out_root = args.out or Path(tmp.name)
    try:
        for method in methods:
            out = out_root / method
            log(f"building INT8 ({method}) from {args.fp32.name} on {args.calib}")
            t0 = time.perf_counter()
            int8 = build_int8(args.fp32, args.calib, out=out, calib_images=args.calib_images, steps=steps,
                              seed=args.seed, method=method, cpu_variant=not args.no_cpu_variant, min_psnr_db=None,
                              target_psnr_db=args.target_psnr, max_fp32_layers=args.max_fp32, latency=False,
                              threads=args.threads, progress=lambda s: log(f"  {s}"))
            entry: dict = {"build_s": round(time.perf_counter() - t0, 1), "artifact": str(int8)}
            cal = Manifest.for_artifact(int8).get("calibration")
            entry["held_out_psnr_db"] = cal["quality"]["psnr_db_mean"]
            entry["verification_psnr_db"] = Manifest.for_artifact(int8).get("verification")["psnr_db"]
            graphs = {"int8_s8": int8}
            cpu = int8.with_name(int8.name.removesuffix(".int8.onnx") + ".int8.cpu.onnx")
            if cpu.is_file():
                graphs["int8_cpu"] = cpu

            log(f"timing at {args.size}x{args.size}, {steps} steps: FP32, then {', '.join(graphs)} (blocks)")
            lat = compare_latency({"fp32": args.fp32, **graphs}, size=(args.size, args.size), steps=steps,
                                  descriptor=manifest.step_descriptor, repeats=args.repeats, threads=args.threads)
            entry["latency"] = lat
            for name, m in lat["models"].items():
                if name != "fp32":
                    m["ratio_int8_over_fp32"] = m["median_s"] / lat["models"]["fp32"]["median_s"]

            if not args.no_quality:
                if (args.dev / "rainy").is_dir():
                    entry["dev"] = {}
                    for name, path in graphs.items():
                        log(f"quality on {args.dev} ({name} vs FP32)")
                        entry["dev"][name] = dev_quality(args.fp32, path, args.dev, steps=steps, seed=args.seed,
                                                         limit=args.dev_limit, threads=args.threads)
                else:
                    log(f"skipping quality: {args.dev}/rainy not found")
            if args.sensitivity:
                entry["sensitivity"] = run_sensitivity(args.fp32, args.calib, manifest, steps=steps, method=method,
                                                       calib_images=args.calib_images, seed=args.seed)
            result["methods"][method] = entry
    finally:
        tmp.cleanup()

    if args.json:
        print(json.dumps(result, indent=2, default=float))
    else:
        print_summary(result)
    return 0


def run_sensitivity(fp32: Path, calib: Path, manifest, *, steps: int, method: str, calib_images: int,
                    seed: int) -> list[dict]:
    """All-but-one sensitivity of every layer on 2 held-out crops at the smaller calibration size."""
    from calibration.api import _eval_conds, _schedule_config, default_fp32_nodes
    from calibration.collect import (
        TrajectoryDataReader,
        calibration_sizes,
        make_session,
        record_trajectories,
        select_images,
    )
    from calibration.quantize import calibrate, preprocess, quantize
    from calibration.report import compare_quality
    from calibration.sensitivity import format_table, sensitivity

    desc, cfg = manifest.step_descriptor, _schedule_config(manifest)
    sizes = calibration_sizes(desc)
    images, held = select_images(calib, calib_images=calib_images, eval_images=2, seed=seed)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        pre = preprocess(fp32, work / "pre.onnx")
        trajs = record_trajectories(fp32, images, descriptor=desc, schedule_config=cfg, steps=steps, sizes=sizes,
                                    seed=seed)
        cache = calibrate(pre, TrajectoryDataReader.from_trajectories(trajs, desc), cache=work / "r.json",
                          method=method, workdir=work)
        conds = _eval_conds(held, sizes[-1:], seed)
        s32 = make_session(fp32)

        def probe(path: Path) -> float:  # exact Q/DQ semantics (what TensorRT executes)
            return compare_quality(s32, make_session(path, reference=True), conds, descriptor=desc,
                                   schedule_config=cfg, steps=steps, seed=seed).mean_psnr_db

        base = quantize(pre, work / "all.onnx", cache=cache, method=method)
        baseline = probe(base)
        head = default_fp32_nodes(pre)
        with_head = probe(quantize(pre, work / "head.onnx", cache=cache, method=method, nodes_to_exclude=head))
        log(f"all quantized: {baseline:.2f} dB; attention head FP32: {with_head:.2f} dB")
        ranked = sensitivity(pre, cache, probe, workdir=work, mode="all_but", method=method,
                             on_result=lambda r: log(f"  {r.group}: {r.psnr_db:.2f} dB"))
        log(format_table(ranked, baseline_db=baseline))
        return [dict(r.to_dict(), gain_db=r.psnr_db - baseline) for r in ranked] + [
            {"group": "(none: all quantized)", "psnr_db": baseline},
            {"group": "(attention head FP32)", "psnr_db": with_head}]


def print_summary(result: dict) -> None:
    print(f"CPU: {result['cpu']} ({', '.join(result['cpu_flags']) or 'no AVX2/AVX-512 flags'}), "
          f"{result['threads']} threads, onnxruntime {result['onnxruntime']}; "
          f"{result['size']}x{result['size']}, {result['steps']} steps")
    for method, e in result["methods"].items():
        lat = e["latency"]["models"]
        print(f"[{method}] FP32 {lat['fp32']['median_s'] * 1000:.0f} ms/frame")
        for name, m in lat.items():
            if name == "fp32":
                continue
            print(f"[{method}] {name}: {m['median_s'] * 1000:.0f} ms/frame, latency ratio INT8/FP32 "
                  f"{m['ratio_int8_over_fp32']:.3f} ({m['speedup']:.2f}x faster; CPU-time {m['cpu_speedup']:.2f}x)")
        print(f"[{method}] held-out calibration-folder PSNR vs FP32: {e['held_out_psnr_db']:.2f} dB; "
              f"verification image: {e['verification_psnr_db']:.2f} dB")
        for name, q in (e.get("dev") or {}).items():
            line = (f"[{method}] {name} on dev ({q['images']} images): PSNR vs FP32 {q['psnr_y_vs_fp32_mean']:.2f} dB "
                    f"Y mean (min {q['psnr_y_vs_fp32_min']:.2f}), {q['psnr_vs_fp32_mean']:.2f} dB float")
            if "gt_loss_db" in q:
                line += (f"; vs ground truth FP32 {q['gt_psnr_y_fp32']:.2f} dB, INT8 {q['gt_psnr_y_int8']:.2f} dB "
                         f"(loss {q['gt_loss_db']:.3f} dB)")
            print(line)


if __name__ == "__main__":
    sys.exit(main())
