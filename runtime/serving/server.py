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
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
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


#: tritonserver log lines that every CPU-only start prints (no CUDA driver, no DCGM): not the reason
_NOISE = ("pinned memory", "CudaDriverHelper", "NVML", "DCGM", "config modification time", "CUDA driver")


def _log_tail(path: Path | None, lines: int = 6) -> str:
    """The server log's error lines (else its last lines), joined on one line; '' without a log."""
    if path is None or not path.is_file():
        return ""
    text = [ln.strip() for ln in path.read_text(encoding="utf-8", errors="replace").splitlines()
            if ln.strip() and not any(n in ln for n in _NOISE)]
    keep = [ln for ln in text if ln.startswith("E")][-lines:] or text[-lines:]
    return " | ".join(keep)


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
            tail = _log_tail(self._log)  # before stop() removes a temporary log
            self.stop()
            if isinstance(e, (RDError, KeyboardInterrupt)):
                raise
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
            if stop is None:
                time.sleep(poll_s)
            else:
                stop.wait(poll_s)

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
    """The bundled ``tritonserver`` serving every model of a model repository (``rd-export triton``).

    Started as the plain command a user runs in NVIDIA's container (``tritonserver
    --model-repository REPO ...``), with PyTriton's binaries, the Python backend stub of this
    interpreter and the library-path fix of :mod:`runtime.serving.environment`; the Python models
    run under this interpreter's environment (its ``bin/`` first on ``PATH``). Readiness is polled on
    ``/v2/health/ready``; a server that exits while loading (a model that fails) raises ServerError
    at once with the reason from its log.
    """

    def __init__(self, repository: str | os.PathLike, config: ServeConfig | None = None, *,
                 startup_timeout_s: float = 120.0) -> None:
        repo = Path(repository)
        if not repo.is_dir():
            raise UsageError(f"model repository {repo} is not a folder")
        super().__init__(config or ServeConfig())
        self.repository = repo.resolve()
        self.startup_timeout_s = float(startup_timeout_s)
        self._proc: subprocess.Popen | None = None
        self._out: Path | None = None

    def _command(self, server_dir: Path) -> list[str]:
        c = self.config
        return [str(server_dir / "bin" / "tritonserver"), "--model-repository", str(self.repository),
                "--backend-directory", str(server_dir / "backends"), "--cache-directory", str(server_dir / "caches"),
                "--http-address", c.host, "--http-port", str(c.ports["http"]),
                "--grpc-address", c.host, "--grpc-port", str(c.ports["grpc"]),
                "--metrics-address", c.host, "--metrics-port", str(c.ports["metrics"]),
                "--allow-gpu-metrics", "false", "--exit-timeout-secs", str(EXIT_TIMEOUT_S),
                "--log-verbose", "0", "--log-file", str(self._log),
                f"--backend-config=python,shm-region-prefix-name=rd{os.getpid()}x{id(self)}_"]

    def start(self) -> None:
        with server_environment() as fixed:
            from pytriton.utils.distribution import get_libs_path, get_root_module_path, get_stub_path

            _check_ports_free(self.config)
            self._tmp = tempfile.TemporaryDirectory(prefix="rd-triton-")
            tmp = Path(self._tmp.name)
            if self._log is None:
                self._log = tmp / "tritonserver.log"
            server_dir = tmp / "tritonserver"  # the stub of this Python goes where the backend looks for it
            shutil.copytree(get_root_module_path() / "tritonserver", server_dir,
                            ignore=shutil.ignore_patterns("python_backend_stubs"))
            shutil.copy(get_stub_path(f"{sys.version_info[0]}.{sys.version_info[1]}"),
                        server_dir / "backends" / "python" / "triton_python_backend_stub")
            env = dict(os.environ)
            env["LD_LIBRARY_PATH"] = os.pathsep.join([fixed["LD_LIBRARY_PATH"], str(get_libs_path())])
            env["PATH"] = os.pathsep.join([str(Path(sys.prefix) / "bin"), env.get("PATH", "")])
        self._out = tmp / "stdout.log"
        with open(self._out, "wb") as out:
            self._proc = subprocess.Popen(self._command(server_dir), env=env, stdin=subprocess.DEVNULL, stdout=out,
                                          stderr=subprocess.STDOUT)
        ready = self.config.url("http") + "/v2/health/ready"
        deadline = time.monotonic() + self.startup_timeout_s
        while True:
            code = self._proc.poll()
            if code is not None:
                why = self._reason()
                self.stop()
                raise ServerError(f"tritonserver exited (status {code}) while loading {self.repository}"
                                  + (f": {why}" if why else ""))
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(ready, timeout=2) as r:
                    if r.status == 200:
                        return
            if time.monotonic() > deadline:
                why = self._reason()
                self.stop()
                raise ServerError(f"tritonserver was not ready after {self.startup_timeout_s:g} s"
                                  + (f": {why}" if why else ""))
            time.sleep(0.25)

    def _reason(self) -> str:
        lines = []
        if self._out is not None and self._out.is_file():
            lines = [ln for ln in self._out.read_text(errors="replace").splitlines() if ln.startswith("error")]
        tail = _log_tail(self._log, lines=4)
        return " | ".join([*(ln.strip() for ln in lines[-1:]), *([tail] if tail else [])])

    def is_alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None and not self._stopped.is_set()

    def stop(self) -> None:
        self._stopped.set()
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # tritonserver's clean shutdown
            try:
                proc.wait(timeout=EXIT_TIMEOUT_S + 10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._tmp is not None:
            with contextlib.suppress(OSError):
                self._tmp.cleanup()
            self._tmp = None
