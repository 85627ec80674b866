"""Shared helpers of the benchmark scripts: locating the model, a real input frame, timing."""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

# The benchmarks measure onnxruntime on the CPU unless asked otherwise (RD_DEVICE, or a script's
# --device): the runtime's own default, "auto", would pick OpenVINO on a CPU with native BF16.
os.environ.setdefault("RD_DEVICE", "cpu")

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("RD_DATA", REPO.parent / "shared" / "data"))
DEFAULT_CKPT = REPO / "training" / "assets" / "default.pt"
DEFAULT_ONNX = REPO / "runtime" / "assets" / "default.onnx"
DEFAULT_INT8 = REPO / "runtime" / "assets" / "default.int8.onnx"
EXAMPLE = REPO / "examples" / "rainy_street.jpg"


def frame_size(text: str) -> tuple[int, int]:
    """An argparse type: HxW (rows first) or one number, as every rd-run option reads sizes."""
    import argparse

    from runtime.cli_errors import parse_hw
    from runtime.errors import UsageError

    try:
        return parse_hw(text, "size")
    except UsageError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def step_counts(text: str, script: str) -> list[int] | None:
    """Comma-separated step counts, or None after printing the script's one-line error."""
    try:
        return [int(s) for s in text.split(",")]
    except ValueError:
        print(f"{script}: --steps must be comma-separated integers, got {text!r}", file=sys.stderr)
        return None


def add_device_option(ap) -> None:
    """``--device`` of the scripts that run the shipped model through ``Derainer``."""
    ap.add_argument("--device", default=None,
                    help="the runtime's device: cpu (onnxruntime; the default here, or $RD_DEVICE), openvino (BF16 on "
                         "CPUs that have it) or auto (the runtime's own default)")


def dev_pair_dirs(script: str) -> tuple[Path, Path] | None:
    """(rainy, clean) folders of the paired dev set, or None after printing the script's skip line."""
    root = DATA / "dev" / "sirr"
    rainy, clean = root / "rainy", root / "clean"
    if rainy.is_dir() and clean.is_dir():
        return rainy, clean
    print(f"{script}: skipped: paired dev set not found under {root}", file=sys.stderr)
    return None


#: the paired development sets (scoring only, never trained on)
DEV_SETS = ("sirr", "jorder_h")


def dev_pairs(name: str, limit: int = 0) -> list[tuple[str, np.ndarray, np.ndarray]] | None:
    """(file name, rainy, clean) uint8 pairs of ``dev/<name>``; None where the set is absent."""
    from runtime.io import load_rgb

    root = DATA / "dev" / name
    if not (root / "rainy").is_dir() or not (root / "clean").is_dir():
        return None
    names = sorted(p.name for p in (root / "rainy").iterdir() if (root / "clean" / p.name).is_file())
    names = names[:limit] if limit else names
    return [(n, load_rgb(root / "rainy" / n), load_rgb(root / "clean" / n)) for n in names]


def runtime_artifacts(fp32: Path, int8: Path) -> tuple[dict[str, Path], str | None]:
    """The runtime variants to measure: FP32 always, INT8 where its file exists (else why not)."""
    if int8.is_file():
        return {"onnxruntime_fp32": fp32, "onnxruntime_int8": int8}, None
    return {"onnxruntime_fp32": fp32}, f"{int8} not found"


def real_frame(height: int, width: int) -> np.ndarray:
    """A real rainy photo (shared data if present, else the shipped example) resized to HxW."""
    from PIL import Image

    rainy = DATA / "unpaired" / "rainy_real" / "22.jpg"
    src = rainy if rainy.is_file() else EXAMPLE
    with Image.open(src) as im:
        return np.asarray(im.convert("RGB").resize((width, height), Image.BICUBIC))


def median_ms(fn, *, runs: int, warmup: int) -> dict:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return {"min_ms": times[0], "median_ms": statistics.median(times),
            "p95_ms": times[min(len(times) - 1, round(0.95 * (len(times) - 1)))], "runs": runs}


def machine() -> dict:
    from runtime.cpu import cpu_name, isa_label

    return {"cpu": cpu_name(), "isa": isa_label(), "cores": os.cpu_count(), "python": sys.version.split()[0]}
