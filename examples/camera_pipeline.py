"""Minimal camera pipeline: OpenCV capture -> Derainer -> window or file. No PyTorch involved.

    pip install 'raindiffusion-edge[cpu,stream]'                       # or [trt,stream] for a plan
    python examples/camera_pipeline.py --source 0                      # webcam, shipped model
    python examples/camera_pipeline.py --source rtsp://cam/1 --engine model.trt.plan --out derained.mp4

OpenCV frames are BGR: ``derain(frame, bgr=True)`` takes and returns BGR, so nothing is copied
around. This loop derains every frame it reads; for a live camera with a slower model, use
``rd-run stream`` (a capture thread keeps only the newest frame, reconnects on drops).
"""

from __future__ import annotations

import argparse
import time

import cv2

from runtime.derainer import Derainer


def run(source: int | str, derainer, *, out: str | None = None, max_frames: int | None = None,
        show: bool = False) -> int:
    """Derain frames from ``source`` until it ends (or ``max_frames``); returns the number of frames."""
    cap = cv2.VideoCapture(source)
    if not cap.isOpened():
        raise SystemExit(f"cannot open video source {source!r}")
    fps = cap.get(cv2.CAP_PROP_FPS) or 25.0
    writer = None
    frames, t0 = 0, time.perf_counter()
    try:
        while max_frames is None or frames < max_frames:
            ok, frame = cap.read()  # HxWx3 uint8, BGR
            if not ok:
                break
            clean = derainer.derain(frame, bgr=True)  # same shape, BGR
            if out is not None:
                if writer is None:
                    h, w = clean.shape[:2]
                    writer = cv2.VideoWriter(out, cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
                writer.write(clean)
            if show:
                cv2.imshow("derained (q quits)", clean)
                if cv2.waitKey(1) & 0xFF == ord("q"):
                    break
            frames += 1
    finally:
        cap.release()
        if writer is not None:
            writer.release()
        if show:
            cv2.destroyAllWindows()
    seconds = time.perf_counter() - t0
    print(f"{frames} frames in {seconds:.1f} s ({frames / max(seconds, 1e-9):.2f} fps)")
    return frames


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--source", default="0", help="camera index, stream URL or video file (default 0)")
    p.add_argument("--engine", default=None, help="model artifact (.onnx / .trt.plan); default: the shipped model")
    p.add_argument("--steps", type=int, default=None, help="DDIM steps (default: the model's)")
    p.add_argument("--out", default=None, help="write the derained video here (.mp4)")
    p.add_argument("--max-frames", type=int, default=None)
    p.add_argument("--show", action="store_true", help="show a window (needs opencv-python with GUI)")
    args = p.parse_args(argv)
    source = int(args.source) if args.source.isdigit() else args.source
    with Derainer(args.engine, steps=args.steps) as derainer:
        run(source, derainer, out=args.out, max_frames=args.max_frames, show=args.show)


if __name__ == "__main__":
    main()
