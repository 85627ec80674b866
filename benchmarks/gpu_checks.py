"""The GPU checks of issue 18 in one call, with a summary: for a session with a lent GPU.

    PYTHONUNBUFFERED=1 python3 benchmarks/gpu_checks.py            # summary on stdout
    PYTHONUNBUFFERED=1 python3 benchmarks/gpu_checks.py --out $OUT # + gpu_checks.json / .xml / .log there

What runs (docs/gpu_checks.md has the details and what each check proves):

1. the environment: Python, PyTorch and its CUDA, the GPU (name, compute capability, memory),
   cuda-python (cuda-bindings), TensorRT if installed;
2. ``pytest -m gpu tests/gpu``: the executor and the CUDA step backend of runtime/backends/ with
   the PyTorch stand-in engine in TensorRT's place (allocations once per shape, the address
   swap, the S-step loop as one CUDA graph and its replay, graph == eager bit for bit, two
   threads on one instance, the table-upload ordering with the default stream busy, a prologue
   writing cond in place), with the numbers the tests record (frame times, graph nodes);
3. only where TensorRT is installed: ``pytest -m trt`` (real plan builds, verification and
   parity with onnxruntime).

It needs nothing beyond what the GPU image has (numpy, torch, cuda-bindings, pytest; onnxruntime
and onnx for step 3) and runs from the repository root without installing the package. Budget:
under 8 minutes (the gpu tests take well under one; step 3 is bounded by --trt-timeout). Exit
code 0 when every check that could run passed, 1 when one failed, 2 when no GPU was found.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment() -> dict:
    env = {"python": platform.python_version(), "machine": platform.machine()}
    try:
        import torch

        env["torch"] = torch.__version__
        env["torch_cuda"] = torch.version.cuda
        env["cuda_available"] = bool(torch.cuda.is_available())
        if env["cuda_available"]:
            p = torch.cuda.get_device_properties(0)
            env["gpu"] = p.name
            env["compute_capability"] = f"{p.major}.{p.minor}"
            env["gpu_memory_gib"] = round(p.total_memory / 2**30, 1)
            env["gpus"] = torch.cuda.device_count()
    except ImportError:
        env["torch"] = None
        env["cuda_available"] = False
    env["cuda_bindings"] = _version("cuda-bindings") or _version("cuda-python")
    try:
        env["tensorrt"] = importlib.import_module("tensorrt").__version__
    except ImportError:
        env["tensorrt"] = None
    for dist in ("numpy", "pytest", "onnxruntime", "onnx"):
        env[dist] = _version(dist)
    return env


def run_pytest(args: list[str], xml: Path, log: Path, timeout: int) -> tuple[int, float]:
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-o", "addopts=", "--strict-markers", "-rA",
           "-q", f"--junitxml={xml}", *args]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    t0 = time.perf_counter()
    with open(log, "w") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        try:
            rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            f.write(f"\n[gpu_checks] pytest stopped after {timeout} s\n")
            rc = 124
    return rc, time.perf_counter() - t0


def parse_junit(xml: Path) -> list[dict]:
    if not xml.is_file():
        return []
    rows = []
    for case in ET.parse(xml).getroot().iter("testcase"):
        outcome, detail = "passed", ""
        for tag in ("failure", "error", "skipped"):
            el = case.find(tag)
            if el is not None:
                outcome = {"failure": "FAILED", "error": "ERROR", "skipped": "skipped"}[tag]
                detail = (el.get("message") or el.text or "").strip().splitlines()[0][:200] if (
                    el.get("message") or el.text) else ""
                break
        props = {p.get("name"): p.get("value") for p in case.iter("property")}
        rows.append({"test": f"{case.get('classname', '').split('.')[-1]}::{case.get('name')}", "outcome": outcome,
                     "seconds": round(float(case.get("time", 0.0)), 3), "detail": detail, "properties": props})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(os.environ["OUT"]) if os.environ.get("OUT") else None,
                    help="folder for gpu_checks.json, the junit XML and the pytest logs (default: $OUT, else a "
                         "temporary folder)")
    ap.add_argument("--gpu-timeout", type=int, default=240, help="seconds for the gpu tests (default 240)")
    ap.add_argument("--trt-timeout", type=int, default=180, help="seconds for the trt tests (default 180)")
    args = ap.parse_args(argv)
    out = args.out or Path(tempfile.mkdtemp(prefix="gpu_checks_"))
    out.mkdir(parents=True, exist_ok=True)

    env = environment()
    print("== environment")
    for k, v in env.items():
        print(f"   {k:20s} {v}")
    result = {"environment": env, "suites": {}}
    if not env.get("cuda_available"):
        print("\nno CUDA GPU visible to PyTorch: nothing to check here (the gpu tests skip on such machines)")
        (out / "gpu_checks.json").write_text(json.dumps(result, indent=2))
        return 2

    suites = [("gpu", ["-m", "gpu", "tests/gpu"], args.gpu_timeout)]
    if env.get("tensorrt"):
        suites.append(("trt", ["-m", "trt", "tests/rd_export/test_export_trt_real.py",
                               "tests/runtime/test_backend_tensorrt.py"], args.trt_timeout))
    else:
        print("\n(TensorRT is not installed: the -m trt tests are not run; the stand-in takes its place)")

    ok = True
    for name, pytest_args, timeout in suites:
        xml, log = out / f"gpu_checks_{name}.xml", out / f"gpu_checks_{name}.log"
        print(f"\n== pytest {' '.join(pytest_args)}  (limit {timeout} s)")
        rc, seconds = run_pytest(pytest_args, xml, log, timeout)
        rows = parse_junit(xml)
        result["suites"][name] = {"returncode": rc, "seconds": round(seconds, 1), "tests": rows}
        width = max([len(r["test"]) for r in rows] + [20])
        for r in rows:
            print(f"   {r['outcome']:8s} {r['seconds']:7.2f} s  {r['test']:{width}s}  {r['detail']}")
            for k, v in r["properties"].items():
                print(f"   {'':8s} {'':9s}  {'':{width}s}  {k} = {v}")
        counts = {o: sum(r["outcome"] == o for r in rows) for o in ("passed", "FAILED", "ERROR", "skipped")}
        print(f"   -> {counts['passed']} passed, {counts['FAILED']} failed, {counts['ERROR']} errors, "
              f"{counts['skipped']} skipped in {seconds:.1f} s (pytest exit {rc}; log: {log})")
        suite_ok = rc == 0 and counts["passed"] > 0 and not counts["FAILED"] and not counts["ERROR"]
        if name == "gpu" and counts["skipped"]:
            suite_ok = False  # on a GPU machine none of them may skip
        ok &= suite_ok
        if not suite_ok:
            tail = log.read_text().splitlines()[-40:]
            print("   ---- last lines of the log ----")
            for line in tail:
                print("   " + line)
    (out / "gpu_checks.json").write_text(json.dumps(result, indent=2))
    print(f"\n== {'ALL PASSED' if ok else 'SOME CHECKS FAILED'}  (details: {out / 'gpu_checks.json'})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
