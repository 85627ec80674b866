"""Serving under load: ``rd-run serve``'s server (a real tritonserver on loopback) next to direct
``Derainer`` calls, in one run, on the same frames.

    .venv/bin/python benchmarks/serve_load.py                      # 8 clients x 20 requests, 64x64, 10 steps
    .venv/bin/python benchmarks/serve_load.py --clients 8 --requests 20 --size 64x64 --steps 10 --json out.json

Rows:
- ``direct``: one ``Derainer`` (all cores), frames one after the other - one camera, no server;
- ``direct_batch``: the same frames through ``derain_batch`` in groups of ``--max-batch``;
- ``served nobatch``: the server with ``max_batch 1`` (no dynamic batching), C concurrent clients;
- ``served batch``: the same with Triton's dynamic batching (``--max-batch``, ``--queue-delay-us``);
- ``served batch Kx``: dynamic batching with K instances (cores shared out).
Each served row: request latency p50 / p95 (client side, the whole HTTP round trip), throughput
(requests/s over the wall time of the load), failed requests, and the mean batch Triton executed
(requests / executions, from its Prometheus metrics). Frames: a real rainy photo resized.
Every request's output is checked equal to the direct ``Derainer``'s, byte for byte.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import DEFAULT_ONNX, machine, real_frame

import runtime.cpu


def cpu_flags() -> str:
    flags = runtime.cpu.cpu_flags()
    if not flags:
        return "unknown"
    return ", ".join(f for f in ("avx512f", "avx512_vnni", "avx2", "fma") if f in flags) or "none of avx2/avx512"


def pct(values: list[float], q: float) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, round(q * (len(v) - 1)))]


def direct_rows(artifact: Path, steps: int, shots: list[np.ndarray], max_batch: int, threads: int) -> tuple[list, list]:
    from runtime import Derainer

    d = Derainer(artifact, steps=steps, threads=threads)
    d.derain(shots[0])  # warm-up: bind buffers
    lat = []
    t0 = time.perf_counter()
    expected = []
    for f in shots:
        t = time.perf_counter()
        expected.append(d.derain(f))
        lat.append((time.perf_counter() - t) * 1e3)
    seconds = time.perf_counter() - t0
    rows = [{"mode": "direct", "instances": 1, "threads": threads, "max_batch": 1, "clients": 1,
             "requests": len(shots), "p50_ms": statistics.median(lat), "p95_ms": pct(lat, 0.95),
             "throughput_rps": len(shots) / seconds, "failed": 0, "mean_batch": 1.0}]
    t0 = time.perf_counter()
    for j in range(0, len(shots), max_batch):
        d.derain_batch(shots[j:j + max_batch])
    seconds = time.perf_counter() - t0
    rows.append({"mode": "direct_batch", "instances": 1, "threads": threads, "max_batch": max_batch, "clients": 1,
                 "requests": len(shots), "p50_ms": None, "p95_ms": None, "throughput_rps": len(shots) / seconds,
                 "failed": 0, "mean_batch": float(max_batch)})
    d.close()
    return rows, expected


def served_row(artifact: Path, steps: int, shots: list[np.ndarray], expected: list[np.ndarray], *, instances: int,
               max_batch: int, queue_delay_us: int, clients: int, port: int, cores: int,
               log_dir: Path | None = None) -> dict:
    from runtime import Derainer
    from runtime.serving.client import DerainClient, fetch_metrics, metric_total, settled_metrics
    from runtime.serving.server import DerainServer, ServeConfig

    per_client = len(shots) // clients
    log = None if log_dir is None else log_dir / f"tritonserver_{instances}x_b{max_batch}.log"
    config = ServeConfig(http_port=port, instances=instances, max_batch=max_batch, queue_delay_us=queue_delay_us,
                         log_file=log)
    threads = max(1, cores // instances)
    lat: list[float] = []
    failed: list[str] = []
    wrong = [0]
    with DerainServer(lambda th: Derainer(artifact, steps=steps, threads=th), config, threads=threads) as server:
        with DerainClient(server.urls["http"]) as c:  # warm-up: every instance binds its buffers
            for _ in range(2 * instances):
                c.derain(shots[0])
        before = fetch_metrics(server.urls["metrics"])
        barrier = threading.Barrier(clients + 1)

        def worker(k: int) -> None:
            with DerainClient(server.urls["http"], timeout_s=600) as client:
                barrier.wait()
                for i in range(per_client):
                    j = k * per_client + i
                    t = time.perf_counter()
                    try:
                        y = client.derain(shots[j])
                    except Exception as e:
                        failed.append(str(e))
                        continue
                    lat.append((time.perf_counter() - t) * 1e3)
                    if not np.array_equal(y, expected[j]):
                        wrong[0] += 1

        pool = [threading.Thread(target=worker, args=(k,)) for k in range(clients)]
        for t in pool:
            t.start()
        barrier.wait()
        t0 = time.perf_counter()
        for t in pool:
            t.join()
        seconds = time.perf_counter() - t0
        success = "nv_inference_request_success"  # counted after each response is sent: let it settle
        after = settled_metrics(server.urls["metrics"], success, metric_total(before, success) + len(lat))
    done = metric_total(after, "nv_inference_request_success") - metric_total(before, "nv_inference_request_success")
    execs = metric_total(after, "nv_inference_exec_count") - metric_total(before, "nv_inference_exec_count")
    return {"mode": "served", "instances": instances, "threads": threads, "max_batch": max_batch, "clients": clients,
            "requests": per_client * clients, "p50_ms": statistics.median(lat) if lat else None,
            "p95_ms": pct(lat, 0.95) if lat else None, "throughput_rps": len(lat) / seconds, "failed": len(failed),
            "not_equal": wrong[0], "mean_batch": done / execs if execs else None}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--engine", type=Path, default=DEFAULT_ONNX, help="artifact (default: the shipped model)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--size", default="64x64", help="frame HxW")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=20, help="requests per client")
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--queue-delay-us", type=int, default=5000)
    ap.add_argument("--instances", type=int, nargs="+", default=[2], help="instance counts of the extra rows")
    ap.add_argument("--port", type=int, default=18800)
    ap.add_argument("--json", type=Path, help="also write the rows as JSON here")
    ap.add_argument("--log-dir", type=Path, help="keep each server's tritonserver log in this folder")
    args = ap.parse_args(argv)

    from runtime.serving.environment import check_server

    try:
        check_server()
    except Exception as e:
        print(f"serve_load.py: skipped: {e}", file=sys.stderr)
        return 0
    import os

    cores = os.cpu_count() or 1
    h, w = (int(v) for v in args.size.lower().split("x"))
    base = real_frame(h, w)
    rng = np.random.default_rng(0)
    n = args.clients * args.requests
    # distinct frames (the photo with a little noise each), so nothing can be cached along the way
    shots = [np.clip(base.astype(np.int16) + rng.integers(-3, 4, base.shape), 0, 255).astype(np.uint8)
             for _ in range(n)]
    rows, expected = direct_rows(args.engine, args.steps, shots, args.max_batch, cores)
    if args.log_dir is not None:
        args.log_dir.mkdir(parents=True, exist_ok=True)
    common = {"shots": shots, "expected": expected, "clients": args.clients, "cores": cores,
              "queue_delay_us": args.queue_delay_us, "log_dir": args.log_dir}
    rows.append(served_row(args.engine, args.steps, port=args.port, instances=1, max_batch=1, **common))
    rows.append(served_row(args.engine, args.steps, port=args.port + 10, instances=1, max_batch=args.max_batch,
                           **common))
    for k, inst in enumerate(i for i in args.instances if i != 1):
        rows.append(served_row(args.engine, args.steps, port=args.port + 20 + 10 * k, instances=inst,
                               max_batch=args.max_batch, **common))
    info = {**machine(), "cpu_flags": cpu_flags(), "artifact": args.engine.name, "steps": args.steps,
            "size": f"{h}x{w}", "clients": args.clients, "requests_per_client": args.requests,
            "queue_delay_us": args.queue_delay_us}

    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    print(f"# {info['cpu']} ({info['cores']} cores; {info['cpu_flags']}), {info['artifact']}, {h}x{w}, "
          f"{args.steps} steps, {args.clients} clients x {args.requests} requests")
    print("| mode | instances x threads | max batch | clients | p50 ms | p95 ms | req/s | failed | not equal | "
          "mean batch |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['instances']} x {r['threads']} | {r['max_batch']} | {r['clients']} | "
              f"{f(r['p50_ms'], '.0f')} | {f(r['p95_ms'], '.0f')} | {r['throughput_rps']:.2f} | {r['failed']} | "
              f"{r.get('not_equal', 0)} | {f(r['mean_batch'], '.2f')} |")
    nob = next(r for r in rows if r["mode"] == "served" and r["max_batch"] == 1)
    bat = next(r for r in rows if r["mode"] == "served" and r["max_batch"] > 1 and r["instances"] == 1)
    gain = bat["throughput_rps"] / nob["throughput_rps"]
    print(f"dynamic batching: {gain:.2f}x the throughput of the same server without it "
          f"({'raised' if gain > 1.05 else 'did not raise'} throughput)")
    if args.json:
        args.json.write_text(json.dumps({"machine": info, "rows": rows, "batching_gain": gain}, indent=2) + "\n")
    return 0 if all(r["failed"] == 0 and r.get("not_equal", 0) == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
