"""Engine x precision on CPUs this machine can imitate: what the runtime's default should pick.

OpenVINO's CPU plugin runs oneDNN kernels, and oneDNN honours ``ONEDNN_MAX_CPU_ISA``: capped at
``AVX512_CORE_VNNI`` an AMX machine runs the kernels a Cascade Lake / Ice Lake server runs (VNNI,
no BF16, no AMX), at ``AVX2_VNNI`` an Alder Lake's, at ``AVX2`` a Zen 2's. Each row runs in a child
process with that cap and with the runtime's capability probes set to match (OpenVINO's native
BF16, ``runtime.cpu.has_avx512_vnni``), so ``Derainer()`` there decides as it would on such a CPU: the
``default`` row is that decision, timed. The cache, memory and clocks stay this machine's, and
onnxruntime's MLAS picks its kernels from CPUID alone (the cap does not reach it): its rows are
this CPU's, the baseline every ratio is measured against, in the same run.

    python benchmarks/isa_matrix.py --size 720x1280 --steps 0,2 --runs 3
    python benchmarks/isa_matrix.py --isa AVX512_CORE_VNNI --quality 0   # + both dev sets, all pairs

Rows: onnxruntime FP32 (the baseline) and INT8 (the CPU graph); OpenVINO FP32, the INT8 CPU graph
and the s8 graph at FP32 inference precision; OpenVINO BF16 where the imitated CPU has it; the
default. ``--quality N`` adds PSNR / SSIM on the first N pairs of both dev sets (0 = all) at the
largest S for the OpenVINO INT8 rows and the default (skipped with a message where
``../shared/data`` is absent). Never trains.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DATA, REPO, dev_pairs, frame_size, step_counts

ASSETS = REPO / "runtime" / "assets"
#: cap -> (native BF16, AVX512_VNNI) of the CPU it imitates; "" = this CPU as it is
ISAS = {"": None, "AVX512_CORE_VNNI": (False, True), "AVX2_VNNI": (False, False), "AVX2": (False, False)}
#: key -> (label, artifact or None for the default, device, OpenVINO precision)
ROWS = {"ort-fp32": ("onnxruntime FP32", "default.onnx", "cpu", None),
        "ort-int8": ("onnxruntime INT8 (CPU graph)", "default.int8.cpu.onnx", "cpu", None),
        "ov-fp32": ("OpenVINO FP32", "default.onnx", "openvino", "f32"),
        "ov-int8": ("OpenVINO INT8 (CPU graph)", "default.int8.cpu.onnx", "openvino", "f32"),
        "ov-s8": ("OpenVINO INT8 (s8 graph)", "default.int8.onnx", "openvino", "f32"),
        "ov-bf16": ("OpenVINO BF16", "default.onnx", "openvino", "bf16"),
        "default": ("default (Derainer())", None, None, None)}


def child(cfg: dict) -> dict:
    """One row in this process (ONEDNN_MAX_CPU_ISA set by the parent): latency at each S, quality."""
    import numpy as np

    import runtime.backends.openvino as ovb
    import runtime.cpu as cpu
    from runtime.derainer import Derainer

    if cfg["imitate"] is not None:  # the probes of the imitated CPU
        bf16, vnni = cfg["imitate"]
        ovb.native_bf16 = lambda core: bf16
        cpu.has_native_bf16 = lambda: bf16
        cpu.has_avx512_vnni = lambda: vnni
    if cfg["ov_precision"]:
        init = ovb.OpenVINOBackend.__init__

        def forced(self, *args, **kw):
            kw["precision"] = cfg["ov_precision"]
            init(self, *args, **kw)

        ovb.OpenVINOBackend.__init__ = forced
    os.environ.pop("RD_DEVICE", None)  # the default row decides as a user's process would
    art = None if cfg["artifact"] is None else ASSETS / cfg["artifact"]
    h, w = cfg["size"]
    frame = np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)
    out: dict = {"latency_s": {}}
    for s in cfg["steps"]:
        with Derainer(art, steps=s, device=cfg["device"], threads=cfg["threads"]) as d:
            out.update(artifact=d.artifact.name, backend=d.backend_name,
                       arithmetic=getattr(d.backend, "inference_precision", None) or "-")
            for _ in range(cfg["warmup"]):
                d.derain(frame)
            times = []
            for _ in range(cfg["runs"]):
                t0 = time.perf_counter()
                d.derain(frame)
                times.append(time.perf_counter() - t0)
            out["latency_s"][str(s)] = round(statistics.median(times), 3)
    if cfg["quality"] is not None:
        from quality import score
        from quality_table import _mean

        s = max(cfg["steps"])
        with Derainer(art, steps=s, device=cfg["device"], threads=cfg["threads"]) as d:
            out["quality"] = {"steps": s}
            for name in ("sirr", "jorder_h"):
                pairs = dev_pairs(name, cfg["quality"])
                out["quality"][name] = _mean([score(d.derain(r), r, c) for _, r, c in pairs])
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=frame_size, default=(720, 1280), help="HxW of the random frame")
    ap.add_argument("--steps", default="0,2")
    ap.add_argument("--isa", default=",".join(k or "native" for k in ISAS),
                    help="comma-separated caps: native, " + ", ".join(k for k in ISAS if k))
    ap.add_argument("--rows", default=",".join(ROWS), help="comma-separated rows: " + ", ".join(ROWS)
                    + " (ort-fp32 is every ratio's baseline)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quality", type=int, default=None, metavar="N",
                    help="also score the first N pairs of both dev sets (0 = all) at the largest S")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        print("RESULT " + json.dumps(child(json.loads(a.child))), flush=True)
        return 0
    steps = step_counts(a.steps, "isa_matrix")
    if steps is None:
        return 2
    caps = ["" if c.strip().lower() == "native" else c.strip().upper() for c in a.isa.split(",")]
    if bad := [c for c in caps if c not in ISAS]:
        print(f"isa_matrix: unknown --isa {', '.join(bad)}: use native or {', '.join(k for k in ISAS if k)}",
              file=sys.stderr)
        return 2
    keys = [k.strip().lower() for k in a.rows.split(",") if k.strip()]
    if bad := [k for k in keys if k not in ROWS]:
        print(f"isa_matrix: unknown --rows {', '.join(bad)}: use {', '.join(ROWS)}", file=sys.stderr)
        return 2
    if "ort-fp32" not in keys:
        keys.insert(0, "ort-fp32")
    try:
        import openvino  # noqa: F401
    except ImportError:
        print("isa_matrix: skipped: OpenVINO is not installed (pip install 'raindiffusion-edge[openvino]')",
              file=sys.stderr)
        return 0
    quality = a.quality
    if quality is not None and not (DATA / "dev" / "sirr").is_dir():
        print(f"isa_matrix: no dev sets under {DATA / 'dev'}: latency only", file=sys.stderr)
        quality = None
    from runtime.cpu import isa_label

    report = {"cpu_isa": isa_label(), "size": list(a.size), "threads": a.threads, "runs": a.runs, "rows": []}
    print(f"isa_matrix: this CPU {report['cpu_isa']}, {a.size[0]}x{a.size[1]}, {a.threads} threads, "
          f"median of {a.runs}", file=sys.stderr)
    for cap in caps:  # onnxruntime ignores the cap; it is measured again in every block, as its baseline
        base: dict[str, float] = {}
        imitate = ISAS[cap]
        for key in sorted(keys, key=list(ROWS).index):
            label, artifact, device, ov_precision = ROWS[key]
            if ov_precision == "bf16" and imitate is not None:
                continue  # the imitated CPUs have no native BF16
            if artifact is not None and not (ASSETS / artifact).is_file():
                continue
            wants_quality = quality is not None and (artifact is None or ("INT8" in label and device == "openvino"))
            cfg = {"imitate": imitate, "artifact": artifact, "device": device, "ov_precision": ov_precision,
                   "size": list(a.size), "steps": steps, "runs": a.runs, "warmup": a.warmup, "threads": a.threads,
                   "quality": quality if wants_quality else None}
            env = {**os.environ, "ONEDNN_MAX_CPU_ISA": cap} if cap else {
                k: v for k, v in os.environ.items() if k != "ONEDNN_MAX_CPU_ISA"}
            r = subprocess.run([sys.executable, __file__, "--child", json.dumps(cfg)], env=env,
                               capture_output=True, text=True)
            line = next((ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if r.returncode or line is None:
                tail = (r.stderr.strip().splitlines() or ["(no output)"])[-1]
                print(f"isa_matrix: {cap or 'native'} / {label}: failed: {tail}", file=sys.stderr)
                continue
            row = {"isa": cap or "native", "row": label, **json.loads(line[len("RESULT "):])}
            if label == "onnxruntime FP32":
                base = dict(row["latency_s"])
            row["x_onnxruntime_fp32"] = {s: round(base[s] / t, 2) for s, t in row["latency_s"].items() if s in base}
            report["rows"].append(row)
            if not a.json:
                lat = "  ".join(f"S={s} {t:.3f} s ({row['x_onnxruntime_fp32'].get(s, float('nan')):.2f}x)"
                                for s, t in row["latency_s"].items())
                q = row.get("quality")
                qs = ("  sirr {:.2f} / {:.4f}  jorder_h {:.2f} / {:.4f} (S={})".format(
                    q["sirr"]["psnr"], q["sirr"]["ssim"], q["jorder_h"]["psnr"], q["jorder_h"]["ssim"], q["steps"])
                    if q else "")
                print(f"{row['isa']:<17} {label:<29} {row['artifact']:<22} {row['backend']:<11} "
                      f"{row['arithmetic']:<5} {lat}{qs}", flush=True)
    if a.json:
        print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
