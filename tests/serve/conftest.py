"""Fixtures of the serving tests: a real tritonserver on loopback, bounded in count and time.

Tests marked ``serve`` need PyTriton's bundled server. Where it cannot run (no [serve] extra, a
Python without a shared libpython, ...) they skip with the one-line reason of
``runtime.serving.environment.check_server``; where ``CI`` is set (``.ci/run`` runs with CI=true) that
reason is a failure instead, so CI never passes by skipping them.

Servers: one module-scoped ``DerainServer`` (2 instances, 1 thread each, 2 DDIM steps on the
shipped 64-px model) serves most tests; the CLI and repository tests start their own. Each has a
startup bound (PyTriton's 120 s) and stops in about 5 s.
"""

from __future__ import annotations

import os

import pytest

from tests.serve.serve_helpers import MAX_PIXELS, SEED, STEPS, free_port_triple


def _unavailable() -> str | None:
    try:
        from runtime.serving.environment import check_server

        check_server()
    except Exception as e:  # DependencyError: the reason
        return str(e)
    return None


@pytest.fixture(scope="session")
def serve_available() -> None:
    why = _unavailable()
    if why is not None:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the serving tests, but the server cannot start here: {why}")
        pytest.skip(f"the bundled tritonserver cannot start here: {why}")


@pytest.fixture(scope="session")
def reference():
    """The shipped model under ``Derainer`` with the served settings: what every server must match."""
    from runtime import Derainer

    d = Derainer(steps=STEPS, seed=SEED, threads=1)
    yield d
    d.close()


@pytest.fixture(scope="module")
def served(serve_available):
    """A running ``DerainServer``: 2 instances, max batch 8, a small pixel limit."""
    from runtime import Derainer
    from runtime.serving.server import DerainServer, ServeConfig

    config = ServeConfig(http_port=free_port_triple(), instances=2, max_batch=8, queue_delay_us=5000,
                         max_pixels=MAX_PIXELS)
    with DerainServer(lambda threads: Derainer(steps=STEPS, seed=SEED, threads=threads), config, threads=1) as srv:
        yield srv
