"""Triton Python-backend model: RainDiffusion deraining on onnxruntime (``runtime.Derainer``).

Written into ``REPO/<model>/1/model.py`` by ``rd-export triton ARTIFACT.onnx``; the artifact, its
manifest and ``derain.json`` (the settings) lie beside it. Each model instance holds its own
``Derainer``; the requests of a dynamic batch go through ``runtime.serving.handler.FrameHandler``,
as under ``rd-run serve``, so both servers answer byte for byte alike, and a refused request gets its
own error while the others of its batch are served. Needs raindiffusion-edge (and so numpy and
onnxruntime) in the Python environment that runs Triton's Python backend stub.
"""

import json
import os

import triton_python_backend_utils as pb_utils

SETTINGS = "derain.json"


class TritonPythonModel:
    def initialize(self, args):
        folder = os.path.join(args["model_repository"], args["model_version"])
        with open(os.path.join(folder, SETTINGS), encoding="utf-8") as f:
            self.settings = s = json.load(f)
        try:
            from runtime.derainer import Derainer
            from runtime.serving.handler import FrameHandler
        except ImportError as e:
            raise pb_utils.TritonModelException(
                f"{args['model_name']}: this model runs raindiffusion-edge's runtime; install it in the Python that "
                f"runs Triton's Python backend: pip install raindiffusion-edge ({e})") from None
        threads = s.get("threads") or max(1, (os.cpu_count() or 1) // max(1, int(s.get("instances") or 1)))
        try:
            self.derainer = Derainer(os.path.join(folder, s["artifact"]), steps=s.get("steps"), seed=int(s["seed"]),
                                     tile=s.get("tile"), overlap=s.get("overlap"), threads=int(threads))
        except Exception as e:  # an RDError: the one line that says what is wrong
            raise pb_utils.TritonModelException(f"{args['model_name']}: {e}") from None
        self.handler = FrameHandler(self.derainer, max_pixels=int(s["max_pixels"]),
                                    hint="rd-export triton --max-pixels")
        self.input, self.output = s["contract"]["input"], s["contract"]["output"]

    def execute(self, requests):
        frames = []
        for request in requests:
            tensor = pb_utils.get_input_tensor_by_name(request, self.input)
            frames.append(None if tensor is None else tensor.as_numpy())
        responses = []
        for result in self.handler(frames):
            if isinstance(result, Exception):
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(str(result))))
            else:
                responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(self.output, result)]))
        return responses

    def finalize(self):
        self.derainer.close()
