"""Serve ``Derainer`` through NVIDIA Triton Inference Server (PyTriton's bundled ``tritonserver``).

    from runtime.serving import ServeConfig, DerainServer

    with DerainServer(lambda threads: Derainer("model.onnx", steps=10, threads=threads),
                      ServeConfig(http_port=8000, instances=2, max_batch=8)) as server:
        server.wait()                          # until Ctrl-C / SIGTERM (KeyboardInterrupt) or the server dies

What runs: one real ``tritonserver`` process on ``host`` (HTTP, gRPC, Prometheus metrics); the model
``derain`` (:mod:`runtime.serving.contract`) with Triton's dynamic batcher (requests of the same
frame size are batched together, up to ``max_batch`` frames, waiting at most ``queue_delay_us``)
and ``instances`` model instances, each with its own ``Derainer`` (a ``Derainer`` serialises its
calls, so parallelism needs one per instance). The inference itself runs in this process (PyTriton
hands each instance's batches to its callable over shared memory). Health: ``/v2/health/live``,
``/v2/health/ready``, ``/v2/models/derain/ready`` on the HTTP port; metrics: ``/metrics`` on the
metrics port.

:class:`RepositoryServer` starts the same bundled server on a model repository written by
``rd-export triton`` (the tests load the exported CPU repository with it).

Library code: errors raise (``RDError`` subclasses), nothing here prints or exits.
"""

from __future__ import annotations

import contextlib
import os
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from runtime.errors import DependencyError, RDError, UsageError
from runtime.serving.contract import (
    DEFAULT_MAX_PIXELS,
    DEFAULT_PORTS,
    FRAME_CHANNELS,
    INPUT,
    MODEL_NAME,
    OUTPUT,
)
from runtime.serving.environment import INSTALL_HINT, server_environment
from runtime.serving.handler import FrameHandler

__all__ = ["ServeConfig", "ServerError", "DerainServer", "RepositoryServer", "default_threads"]

#: seconds Triton waits for in-flight requests when stopping
EXIT_TIMEOUT_S = 10


class ServerError(RDError):
    """The Triton server could not start or died (exit code 1; the message carries its log's tail)."""


def default_threads(instances: int) -> int:
    """onnxruntime threads per instance: the CPU cores shared out, at least one each."""
    return max(1, (os.cpu_count() or 1) // max(1, instances))


@dataclass(frozen=True)
class ServeConfig:
    """Where and how to serve (see the module docstring). Ports None: gRPC = HTTP + 1, metrics = HTTP + 2."""

    host: str = "127.0.0.1"
    http_port: int = DEFAULT_PORTS["http"]
    grpc_port: int | None = None
    metrics_port: int | None = None
    instances: int = 1
    max_batch: int = 8
    queue_delay_us: int = 2000
    max_pixels: int = DEFAULT_MAX_PIXELS
    model_name: str = MODEL_NAME
    log_file: Path | None = None  # the server's log; None: a temporary file, removed on stop
    startup_timeout_s: float = 120.0
    ports: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name, v, lo in (("instances", self.instances, 1), ("max_batch", self.max_batch, 1),
                            ("queue_delay_us", self.queue_delay_us, 0), ("max_pixels", self.max_pixels, 0)):
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise UsageError(f"{name} must be an integer >= {lo}, got {v!r}")
        ports = {"http": self.http_port,
                 "grpc": self.http_port + 1 if self.grpc_port is None else self.grpc_port,
                 "metrics": self.http_port + 2 if self.metrics_port is None else self.metrics_port}
        for name, p in ports.items():
            if isinstance(p, bool) or not isinstance(p, int) or not 1 <= p <= 65535:
                raise UsageError(f"{name} port must be an integer in 1..65535, got {p!r}")
        if len(set(ports.values())) != 3:
            raise UsageError(f"the HTTP, gRPC and metrics ports must differ, got {ports}")
        if not self.model_name or not all(c.isalnum() or c in "._-" for c in self.model_name):
            raise UsageError(f"model name {self.model_name!r}: use letters, digits, '.', '_' and '-' only")
        object.__setattr__(self, "ports", ports)

    def url(self, endpoint: str = "http") -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'grpc' if endpoint == 'grpc' else 'http'}://{host}:{self.ports[endpoint]}"

    def urls(self) -> dict[str, str]:
        return {"http": self.url("http"), "grpc": self.url("grpc"), "metrics": self.url("metrics") + "/metrics"}


def _check_ports_free(config: ServeConfig) -> None:
    """UsageError naming the busy port (tritonserver would otherwise exit with a log line only)."""
    family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
    for name, port in config.ports.items():
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((config.host, port))
            except OSError as e:
                raise UsageError(f"{name} port {port} on {config.host} is not available ({e.strerror or e}); "
                                 f"choose other ports (--port, --grpc-port, --metrics-port)") from None


def _log_tail(path: Path | None, lines: int = 15) -> str:
    if path is None or not path.is_file():
        return ""
    text = path.read_text(encoding="utf-8", errors="replace").strip().splitlines()
    keep = [ln for ln in text if ln.startswith(("E", "W")) or "rror" in ln][-lines:] or text[-lines:]
    return " | ".join(s.strip() for s in keep)


class _TritonProcess:
    """Start / wait / stop one bundled ``tritonserver`` through PyTriton's ``Triton``."""

    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self._triton = None
        self._tmp: tempfile.TemporaryDirectory | None = None
        self._log: Path | None = config.log_file
        self._stopped = threading.Event()

    @property
    def urls(self) -> dict[str, str]:
        return self.config.urls()

    @property
    def log_file(self) -> Path | None:
        return self._log

    def _triton_config(self, **extra: Any):
        from pytriton.triton import TritonConfig

        c = self.config
        if self._log is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="rd-serve-")
            self._log = Path(self._tmp.name) / "tritonserver.log"
        return TritonConfig(http_address=c.host, http_port=c.ports["http"], grpc_address=c.host,
                            grpc_port=c.ports["grpc"], metrics_address=c.host, metrics_port=c.ports["metrics"],
                            allow_gpu_metrics=False, exit_timeout_secs=EXIT_TIMEOUT_S, log_file=self._log,
                            log_verbose=0, **extra)

    def _bind(self, triton) -> None:  # subclasses bind their models
        pass

    def start(self) -> None:
        try:
            from pytriton.triton import Triton
        except ImportError as e:
            raise DependencyError(f"serving needs PyTriton ({e}): {INSTALL_HINT}") from None
        _check_ports_free(self.config)
        triton = None
        try:
            with server_environment():
                triton = Triton(config=self._triton_config(**self._extra_config()))
                self._bind(triton)
                self._triton = triton
                triton.run()  # starts tritonserver, loads the models, waits until they are ready
        except BaseException as e:
            self.stop()
            if isinstance(e, (RDError, KeyboardInterrupt)):
                raise
            tail = _log_tail(self._log)
            from runtime.serving.client import one_line

            raise ServerError(f"Triton Inference Server did not start ({type(e).__name__}: {one_line(str(e))})"
                              + (f"; its log: {tail}" if tail else "")) from None
        if not triton.is_alive():
            tail = _log_tail(self._log)
            self.stop()
            raise ServerError("Triton Inference Server exited right after starting" + (f"; its log: {tail}"
                                                                                         if tail else ""))

    def _extra_config(self) -> dict[str, Any]:
        return {}

    def is_alive(self) -> bool:
        return self._triton is not None and not self._stopped.is_set() and self._triton.is_alive()

    def wait(self, stop: threading.Event | None = None, poll_s: float = 0.5) -> None:
        """Block until ``stop`` is set, the server dies (ServerError), or KeyboardInterrupt (Ctrl-C; the
        CLI raises it on SIGTERM too), which propagates; the caller's ``with`` / ``stop()`` shuts down."""
        while not (stop is not None and stop.is_set()):
            if not self.is_alive():
                if self._stopped.is_set():
                    return
                tail = _log_tail(self._log)
                raise ServerError("Triton Inference Server stopped unexpectedly" + (f"; its log: {tail}"
                                                                                      if tail else ""))
            time.sleep(poll_s) if stop is None else stop.wait(poll_s)

    def stop(self) -> None:
        """Stop the server (in-flight requests get up to EXIT_TIMEOUT_S to finish); idempotent."""
        self._stopped.set()
        triton, self._triton = self._triton, None
        if triton is not None:
            with contextlib.suppress(Exception):
                triton.stop()
        self._close_models()
        if self._tmp is not None:
            with contextlib.suppress(OSError):
                self._tmp.cleanup()
            self._tmp = None

    def _close_models(self) -> None:
        pass

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class DerainServer(_TritonProcess):
    """``Derainer`` behind Triton: ``factory(threads) -> Derainer`` is called once per instance."""

    def __init__(self, factory: Callable[[int], Any], config: ServeConfig | None = None, *,
                 threads: int | None = None) -> None:
        super().__init__(config or ServeConfig())
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            raise UsageError(f"threads must be a positive integer, got {threads!r}")
        self.threads = threads or default_threads(self.config.instances)
        self._factory = factory
        self.derainers: list[Any] = []

    def _bind(self, triton) -> None:
        from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor

        c = self.config
        for _ in range(c.instances):
            self.derainers.append(self._factory(self.threads))
        frames = (-1, -1, FRAME_CHANNELS)  # per request [N, H, W, 3]; N is Triton's batch dimension
        triton.bind(
            model_name=c.model_name,
            infer_func=[_infer_callable(FrameHandler(d, max_pixels=c.max_pixels, hint="rd-run serve --max-pixels"))
                        for d in self.derainers],
            inputs=[Tensor(name=INPUT, dtype=np.uint8, shape=frames)],
            outputs=[Tensor(name=OUTPUT, dtype=np.uint8, shape=frames)],
            config=ModelConfig(max_batch_size=c.max_batch,
                               batcher=DynamicBatcher(max_queue_delay_microseconds=c.queue_delay_us)),
            strict=True,
        )

    def _close_models(self) -> None:
        for d in self.derainers:
            close = getattr(d, "close", None)
            if callable(close):
                with contextlib.suppress(Exception):
                    close()
        self.derainers = []


def _infer_callable(handler: FrameHandler) -> Callable[[list], list[dict[str, np.ndarray]]]:
    """PyTriton's inference callable for one instance: a batch of requests in, one response each out.

    PyTriton fails every request of a batch when the callable raises. Triton's dynamic batcher only
    batches requests whose shapes match and checks dtype and rank itself, and every check here
    depends on the shape alone, so a refused request shares its batch only with requests refused
    for the same reason.
    """

    def infer(requests: list) -> list[dict[str, np.ndarray]]:
        results = handler([r.data.get(INPUT) for r in requests])
        for i, r in enumerate(results):
            if isinstance(r, Exception):
                raise UsageError(str(r) if len(results) == 1 else f"request {i + 1} of {len(results)}: {r}")
        return [{OUTPUT: r} for r in results]

    return infer


class RepositoryServer(_TritonProcess):
    """The bundled ``tritonserver`` serving every model of a model repository (``rd-export triton``)."""

    def __init__(self, repository: str | os.PathLike, config: ServeConfig | None = None) -> None:
        repo = Path(repository)
        if not repo.is_dir():
            raise UsageError(f"model repository {repo} is not a folder")
        super().__init__(config or ServeConfig())
        self.repository = repo.resolve()

    def _extra_config(self) -> dict[str, Any]:
        return {"model_repository": self.repository}

