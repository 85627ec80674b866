"""Helpers of the serving tests (the fixtures are in conftest.py)."""

from __future__ import annotations

import socket

import numpy as np

STEPS = 2
SEED = 0
MAX_PIXELS = 200 * 200  # small, so the over-the-limit request is cheap to send


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port_triple() -> int:
    """An HTTP port p on 127.0.0.1 with p + 1 and p + 2 free as well (gRPC, metrics)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            p = s.getsockname()[1]
        if p < 65000 and all(_free(q) for q in (p, p + 1, p + 2)):
            return p
    raise RuntimeError("no three consecutive free ports on 127.0.0.1")


def frames(seed: int, *shapes: tuple[int, int]) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in shapes]
