"""Python-backend model files that ``rd-export triton`` writes into a Triton model repository.

These modules run inside Triton's Python backend stub (they import ``triton_python_backend_utils``,
which only exists there); the toolkit never imports them, it copies their source as ``model.py``:

- :mod:`.bls`: the GPU repository's top model, the DDIM loop (Algorithm 2) over the TensorRT
  step plan (and a prologue plan, for predict-and-refine models) through BLS; numpy only, so it
  runs in NVIDIA's Triton container as it is.
- :mod:`.cpu`: the CPU repository's model, ``runtime.Derainer`` on onnxruntime (needs
  raindiffusion-edge installed in the Python that runs the stub).

Both read their settings from ``derain.json`` beside them and expose the contract of
:mod:`runtime.serving.contract`.
"""
