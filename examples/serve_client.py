"""Send photos to a running derain server (``rd-run serve`` or a repository of ``rd-export triton``).

    rd-run serve --port 8000 &                                         # one terminal: the server
    python examples/serve_client.py examples/rainy_street.jpg -o out/  # another: derained copies in out/
    python examples/serve_client.py cam*.png -o out/ --url http://gpu-box:8000 --workers 4

Each image is one request (UINT8 [1, H, W, 3]); ``--workers`` sends that many at once, which is what
lets Triton's dynamic batcher put same-size frames from several cameras into one batch. Needs only
``tritonclient[http]``, numpy and Pillow on the client side.
"""

from __future__ import annotations

import argparse
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from runtime.errors import RDError
from runtime.serving.client import DerainClient


def derain_files(paths: list[Path], out_dir: Path, *, url: str, workers: int = 1) -> int:
    """Derain each image through the server into ``out_dir`` (same name); returns how many failed."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with DerainClient(url) as probe:
        probe.wait_ready(timeout_s=60)

    def one(path: Path) -> str | None:
        try:
            with Image.open(path) as im:
                frame = np.asarray(im.convert("RGB"))
        except OSError as e:
            return f"{path}: cannot read it ({e})"
        with DerainClient(url) as client:  # one client per thread
            try:
                clean = client.derain(frame)
            except RDError as e:
                return f"{path}: {e}"
        target = out_dir / path.name
        tmp = target.with_name(f".{target.name}.tmp{target.suffix}")
        Image.fromarray(clean).save(tmp)
        tmp.replace(target)  # never a half-written output
        return None

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        errors = [e for e in pool.map(one, paths) if e is not None]
    for e in errors:
        print(f"serve_client: failed: {e}", file=sys.stderr)
    done = len(paths) - len(errors)
    print(f"{done} of {len(paths)} images derained in {time.perf_counter() - t0:.1f} s -> {out_dir}")
    return len(errors)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("images", nargs="+", type=Path, help="image files (any format Pillow reads)")
    ap.add_argument("-o", "--out", type=Path, required=True, help="output folder")
    ap.add_argument("--url", default="http://127.0.0.1:8000", help="the server's HTTP address")
    ap.add_argument("--workers", type=int, default=1, help="requests in flight at once")
    args = ap.parse_args(argv)
    try:
        return 1 if derain_files(args.images, args.out, url=args.url, workers=max(1, args.workers)) else 0
    except RDError as e:  # no server, not ready
        print(f"serve_client: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
