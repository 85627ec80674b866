"""Test-only launcher: ``python tests/cli/rd_run_fake.py ARGS`` runs ``rd-run ARGS`` with a slow FAKE derainer.

Used by the subprocess tests (signals need a real process). Nothing in the package reads it or
its environment variable: normal ``rd-run`` users cannot be affected.
``RD_FAKE_DELAY`` (seconds per frame, default 0.05) makes the fake slow enough to interrupt.
"""

from __future__ import annotations

import os
import time

import numpy as np

import runtime.cli as cli


class SlowFakeDerainer:
    """Not a model: inverts each frame after sleeping RD_FAKE_DELAY seconds."""

    backend_name = "slow-fake"
    manifest = None
    steps = 1

    def __init__(self, artifact=None, **options):
        self.delay = float(os.environ.get("RD_FAKE_DELAY", "0.05"))

    def derain(self, frame: np.ndarray, *, bgr: bool = False) -> np.ndarray:
        time.sleep(self.delay)
        return 255 - frame

    def derain_batch(self, frames):
        return [self.derain(f) for f in frames]


if __name__ == "__main__":
    cli.derainer_factory = SlowFakeDerainer
    cli.app(prog_name="rd-run")
