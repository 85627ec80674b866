"""A small client for the served ``derain`` model: numpy frames in, numpy frames out (HTTP).

    from runtime.serving.client import DerainClient

    with DerainClient("http://127.0.0.1:8000") as client:
        client.wait_ready(timeout_s=30)
        clean = client.derain(frame)              # HxWx3 uint8 RGB -> HxWx3 uint8
        clean4 = client.derain_batch(frames)      # N frames of one size in one request

Works against ``rd-run serve`` and against either repository of ``rd-export triton`` (they share
the contract of :mod:`runtime.serving.contract`). Needs only ``tritonclient[http]`` (not PyTriton),
so a camera box can run it beside any numpy. One client per thread: ``tritonclient``'s HTTP client
is not meant to be shared between threads.

Errors: :class:`RequestError` when the server refused or failed the request (its one-line reason),
:class:`ServerUnavailableError` when no server answers; both are ``RDError``\\ s.
"""

from __future__ import annotations

import contextlib
import re
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from urllib.parse import urlsplit

import numpy as np

from runtime.errors import DependencyError, RDError, UsageError
from runtime.serving.contract import FRAME_CHANNELS, INPUT, MODEL_NAME, OUTPUT, TRITON_DTYPE

__all__ = ["DerainClient", "RequestError", "ServerUnavailableError", "fetch_metrics", "one_line"]


class RequestError(RDError):
    """The server answered the request with an error (bad input, over a limit, a failed inference)."""

    exit_code = 3


class ServerUnavailableError(RDError):
    """No server answers at the URL, or it is not ready."""

    exit_code = 1


def one_line(message: str) -> str:
    """The reason in a server's error, on one line.

    Triton's own checks are one line already; PyTriton wraps what the inference callable raised in
    its traceback (then "At: <stub frame>"): keep the last ``SomeError: reason`` line, and drop the
    class name of the toolkit's own UsageError.
    """
    text = str(message).strip()
    lines = [ln.strip() for ln in text.split("\nAt:\n", 1)[0].splitlines() if ln.strip()]
    if not lines:
        return "unknown error"
    if len(lines) == 1:
        return lines[0]
    raised = [ln for ln in lines if _RAISED.match(ln)]
    last = raised[-1] if raised else lines[-1]
    return _OWN.sub("", last)


_RAISED = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit)\b.*?: ")
_OWN = re.compile(r"^runtime\.errors\.UsageError: ")


def _host_port(url: str) -> str:
    text = url if "://" in url else f"http://{url}"
    parts = urlsplit(text)
    if parts.scheme not in ("http", "") or not parts.hostname:
        raise UsageError(f"server URL {url!r}: expected http://HOST:PORT")
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"{host}:{parts.port or 8000}"


class DerainClient:
    """HTTP client of the ``derain`` model (see the module docstring)."""

    def __init__(self, url: str = "http://127.0.0.1:8000", *, model: str = MODEL_NAME,
                 timeout_s: float = 120.0) -> None:
        try:
            import tritonclient.http as httpclient
            from tritonclient.utils import InferenceServerException
        except ImportError:
            raise DependencyError("the serving client needs tritonclient: pip install 'tritonclient[http]'") from None
        self._http = httpclient
        self._error = InferenceServerException
        self.url = _host_port(url)
        self.model = model
        self._client = httpclient.InferenceServerClient(self.url, connection_timeout=timeout_s,
                                                        network_timeout=timeout_s)

    # ------------------------------------------------------------------ health
    def is_live(self) -> bool:
        with contextlib.suppress(Exception):
            return bool(self._client.is_server_live())
        return False

    def is_ready(self) -> bool:
        """The server is up and the model is loaded."""
        with contextlib.suppress(Exception):
            return bool(self._client.is_server_ready() and self._client.is_model_ready(self.model))
        return False

    def wait_ready(self, timeout_s: float = 60.0, poll_s: float = 0.25) -> None:
        deadline = time.monotonic() + timeout_s
        while not self.is_ready():
            if time.monotonic() > deadline:
                raise ServerUnavailableError(f"no ready model {self.model!r} at http://{self.url} "
                                             f"after {timeout_s:g} s")
            time.sleep(poll_s)

    # ------------------------------------------------------------------ inference
    def derain(self, frame: np.ndarray) -> np.ndarray:
        """One HxWx3 uint8 RGB frame -> the derained frame (same shape)."""
        if not isinstance(frame, np.ndarray) or frame.ndim != 3:
            raise UsageError(f"frame must be an HxWx{FRAME_CHANNELS} uint8 array, got "
                             f"{getattr(frame, 'shape', type(frame).__name__)}")
        return self.infer(frame[None])[0]

    def derain_batch(self, frames: Sequence[np.ndarray] | np.ndarray) -> np.ndarray:
        """N frames of one size (NxHxWx3 or a list) in one request -> NxHxWx3 uint8."""
        arr = np.stack(list(frames)) if not isinstance(frames, np.ndarray) else frames
        return self.infer(arr)

    def infer(self, batch: np.ndarray) -> np.ndarray:
        """Send ``batch`` as the model's input as it is (no checks here: the server checks), return the output."""
        if not isinstance(batch, np.ndarray):
            raise UsageError(f"expected a numpy array, got {type(batch).__name__}")
        dtype = TRITON_DTYPE if batch.dtype == np.uint8 else self._triton_dtype(batch.dtype)
        inp = self._http.InferInput(INPUT, list(batch.shape), dtype)
        inp.set_data_from_numpy(np.ascontiguousarray(batch), binary_data=True)
        out = self._http.InferRequestedOutput(OUTPUT, binary_data=True)
        try:
            result = self._client.infer(self.model, [inp], outputs=[out])
        except self._error as e:
            raise RequestError(one_line(e.message() or str(e))) from None
        except (ConnectionError, OSError) as e:
            raise ServerUnavailableError(f"no answer from http://{self.url}: {e}") from None
        y = result.as_numpy(OUTPUT)
        if y is None:
            raise RequestError(f"the server's response has no {OUTPUT!r} output")
        return y

    def _triton_dtype(self, dtype: np.dtype) -> str:
        from tritonclient.utils import np_to_triton_dtype

        return np_to_triton_dtype(dtype)

    # ------------------------------------------------------------------ lifetime
    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._client.close()

    def __enter__(self) -> DerainClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def fetch_metrics(url: str = "http://127.0.0.1:8002/metrics", timeout_s: float = 10.0) -> str:
    """Triton's Prometheus metrics as text (``nv_inference_request_success``, ``nv_inference_exec_count``, ...)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as r:
            return r.read().decode("utf-8", errors="replace")
    except (urllib.error.URLError, OSError) as e:
        raise ServerUnavailableError(f"no metrics at {url}: {e}") from None


def metric_total(text: str, name: str, model: str = MODEL_NAME) -> float:
    """Sum of a Prometheus counter over the lines of ``model`` (0.0 when absent)."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and f'model="{model}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


__all__.append("metric_total")


def settled_metrics(url: str, name: str, total: float, *, model: str = MODEL_NAME, timeout_s: float = 10.0,
                    poll_s: float = 0.1) -> str:
    """The metrics text once counter ``name`` of ``model`` reaches ``total``, or the last read after
    ``timeout_s``. Triton counts a request after it has sent the response, so a client that has all
    its answers can read the counters a moment early; callers compare what this returns."""
    deadline = time.monotonic() + timeout_s
    while True:
        text = fetch_metrics(url)
        if metric_total(text, name, model) >= total or time.monotonic() >= deadline:
            return text
        time.sleep(poll_s)


__all__.append("settled_metrics")
