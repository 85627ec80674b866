"""One batch of served requests -> derained frames or a per-request error (no Triton imports here).

Shared by ``rd-run serve`` (PyTriton's inference callable) and the exported CPU repository's
Python-backend model, so both check requests and derain them the same way. Each request carries
``[n, H, W, 3]`` uint8 frames; the frames of all valid requests go through one
``Derainer.derain_batch`` call (which groups equal sizes and batches them through the engine), and
every frame equals ``Derainer.derain(frame)`` byte for byte. A request that cannot be served gets
its own one-line error; the others in the batch are served.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from runtime.errors import UsageError
from runtime.serving.contract import DEFAULT_MAX_PIXELS, FRAME_CHANNELS, INPUT

__all__ = ["FrameHandler", "check_request"]


def check_request(frames: object, *, max_pixels: int = DEFAULT_MAX_PIXELS, name: str = INPUT,
                  hint: str = "") -> np.ndarray:
    """The request's frames as a C-contiguous uint8 [n, H, W, 3] array, or UsageError saying what is wrong."""
    if not isinstance(frames, np.ndarray):
        raise UsageError(f"input {name!r} must be a tensor, got {type(frames).__name__}")
    if frames.dtype != np.uint8:
        raise UsageError(f"input {name!r} must be UINT8 (0..255 RGB), got {frames.dtype}")
    if frames.ndim != 4 or frames.shape[-1] != FRAME_CHANNELS:
        raise UsageError(f"input {name!r} must have shape [N, H, W, {FRAME_CHANNELS}] (N frames of one size, RGB), "
                         f"got {list(frames.shape)}")
    n, h, w, _ = frames.shape
    if n < 1 or h < 1 or w < 1:
        raise UsageError(f"input {name!r} is empty: shape {list(frames.shape)}")
    if max_pixels and h * w > max_pixels:
        raise UsageError(f"frame {h}x{w} ({h * w} pixels) is over the server's limit of {max_pixels} pixels"
                         + (f" ({hint})" if hint else ""))
    return np.ascontiguousarray(frames)


class FrameHandler:
    """Derain the frames of a batch of requests with one ``Derainer`` (see the module docstring)."""

    def __init__(self, derainer, *, max_pixels: int = DEFAULT_MAX_PIXELS, hint: str = "") -> None:
        if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 0:
            raise UsageError(f"max_pixels must be a non-negative integer (0 = no limit), got {max_pixels!r}")
        self.derainer = derainer
        self.max_pixels = max_pixels
        self.hint = hint  # where the limit is set, named in the refusal

    def __call__(self, requests: Sequence[object]) -> list[np.ndarray | UsageError]:
        """``requests``: one [n, H, W, 3] uint8 array per request. Returns, per request, its derained
        frames (same shape) or the UsageError that refused it."""
        results: list[np.ndarray | UsageError | None] = [None] * len(requests)
        frames: list[np.ndarray] = []
        owners: list[tuple[int, int]] = []  # (request index, frame count)
        for i, arr in enumerate(requests):
            try:
                arr = check_request(arr, max_pixels=self.max_pixels, hint=self.hint)
            except UsageError as e:
                results[i] = e
                continue
            frames.extend(arr)
            owners.append((i, arr.shape[0]))
        if frames:
            out = self.derainer.derain_batch(frames)
            k = 0
            for i, n in owners:
                results[i] = np.stack(out[k:k + n])
                k += n
        return results  # type: ignore[return-value]
