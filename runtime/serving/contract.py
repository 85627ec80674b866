"""The served model's I/O contract: what a client sends and gets back (one place for every name).

``rd-run serve`` (PyTriton), the CPU model repository and the GPU repository's BLS model all
expose the same model, so one client works against all three::

    model   "derain" (``MODEL_NAME``; --model-name changes it)
    input   "frame"    UINT8 [N, H, W, 3]   N frames of one size, RGB, 0..255
    output  "derained" UINT8 [N, H, W, 3]   the derained frames, same shape

Inside, the frames go through :class:`runtime.Derainer` (or, on a GPU repository, the same DDIM
loop over the TensorRT plan): the graphs' own tensor names live in :mod:`runtime.descriptor`.
Frames are uint8 RGB at the edges of the system (docs/ARCHITECTURE.md), so the channel count of
a served frame is fixed at 3 whatever the model's condition carries.
"""

from __future__ import annotations

__all__ = ["MODEL_NAME", "INPUT", "OUTPUT", "FRAME_CHANNELS", "FRAME_DTYPE", "TRITON_DTYPE",
           "DEFAULT_MAX_PIXELS", "DEFAULT_PORTS"]

MODEL_NAME = "derain"
INPUT = "frame"
OUTPUT = "derained"
FRAME_CHANNELS = 3
FRAME_DTYPE = "uint8"  # numpy
TRITON_DTYPE = "UINT8"  # Triton's name for it (config.pbtxt TYPE_UINT8, the HTTP/gRPC protocol UINT8)
#: frames above this many pixels are refused (4K UHD, 3840 x 2160); --max-pixels changes it
DEFAULT_MAX_PIXELS = 3840 * 2160
#: Triton's defaults: HTTP, gRPC, Prometheus metrics
DEFAULT_PORTS = {"http": 8000, "grpc": 8001, "metrics": 8002}
