"""``rd-export triton`` repositories loaded by the bundled tritonserver and answering for real.

CPU: the repository exactly as exported. GPU: the exported repository with one change, since no
TensorRT (and no TensorRT backend) exists here: its ``tensorrt_plan`` step model is swapped for a
Python-backend model with the same name, tensors and shapes (from runtime.descriptor) that runs the
same fused step on onnxruntime. Everything else - the BLS model, its settings, the configs of the
top model - is what the exporter wrote, so the DDIM loop over BLS is tested against ``Derainer``
byte for byte.
"""

from __future__ import annotations

import json
import shutil
import textwrap
from pathlib import Path

import numpy as np
import pytest

from tests.serve.serve_helpers import SEED, STEPS, frames, free_port_triple

pytestmark = pytest.mark.serve

ONNX_STEP_MODEL = textwrap.dedent('''
    """Stand-in for the tensorrt_plan step model in tests: the same fused step on onnxruntime."""
    import os

    import numpy as np
    import onnxruntime as ort
    import triton_python_backend_utils as pb_utils

    NAMES = {names!r}


    class TritonPythonModel:
        def initialize(self, args):
            options = ort.SessionOptions()
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            options.intra_op_num_threads = 1
            options.inter_op_num_threads = 1
            path = os.path.join(args["model_repository"], args["model_version"], "step.onnx")
            self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])

        def execute(self, requests):
            responses = []
            for request in requests:
                feed = {{n: pb_utils.get_input_tensor_by_name(request, n).as_numpy() for n in NAMES["inputs"]}}
                (x_next,) = self.session.run(NAMES["outputs"], feed)
                responses.append(pb_utils.InferenceResponse(
                    output_tensors=[pb_utils.Tensor(NAMES["outputs"][0], np.ascontiguousarray(x_next))]))
            return responses
''')


def _serve(repo: Path):
    from runtime.serving.server import RepositoryServer, ServeConfig

    return RepositoryServer(repo, ServeConfig(http_port=free_port_triple()))


def test_exported_cpu_repository_loads_and_answers(serve_available, reference, tmp_path):
    from rd_export.triton import TritonOptions, export_triton
    from runtime.derainer import default_artifact
    from runtime.serving.client import DerainClient, RequestError

    repo = export_triton(default_artifact(), tmp_path / "repo", TritonOptions(steps=STEPS, seed=SEED, threads=1))
    with _serve(repo) as server, DerainClient(server.urls["http"]) as client:
        f = frames(8, (40, 48))[0]
        np.testing.assert_array_equal(client.derain(f), reference.derain(f))
        with pytest.raises(RequestError, match=r"input 'frame' is empty: shape \[1, 0, 8, 3\]"):
            client.infer(np.zeros((1, 0, 8, 3), np.uint8))


def _fake_plan(tmp_path: Path) -> Path:
    """A '.trt.plan' with a valid 'trt' manifest (the shipped model's descriptor); its bytes are
    the ONNX, which the stand-in step model runs. rd-export triton only copies a plan."""
    from runtime.derainer import default_artifact
    from runtime.manifest import Manifest, sha256_file

    onnx = default_artifact()
    plan = tmp_path / "model.trt.plan"
    shutil.copyfile(onnx, plan)
    m = Manifest.for_artifact(onnx)
    d = m.to_dict()
    # profile minimum 32 (the size multiple): a plan pads small frames up to its minimum, onnxruntime
    # only to the multiple; with 32 both pad 17x23 to 32x32, as Derainer on this ONNX does
    d["descriptor"]["profile"]["min_size"] = [32, 32]
    d["descriptor"]["profile"]["min_batch"] = 1
    d.update(artifact=plan.name, format="trt", sha256=sha256_file(plan),
             tensorrt={"version": "10.0.0", "gpu_name": "none (test)", "compute_capability": "9.0"})
    Manifest.from_dict(d).save(tmp_path / "model.trt.json")
    return plan


def test_exported_gpu_repository_bls_loop_equals_derainer(serve_available, reference, tmp_path):
    from rd_export.triton import TritonOptions, config_pbtxt, export_triton
    from runtime.derainer import default_artifact
    from runtime.manifest import Manifest
    from runtime.serving.client import DerainClient, RequestError

    plan = _fake_plan(tmp_path)
    repo = export_triton(plan, tmp_path / "repo", TritonOptions(steps=STEPS, seed=SEED, max_batch=8))
    assert sorted(p.name for p in repo.iterdir()) == ["derain", "derain_step"]
    assert (repo / "derain_step" / "1" / "model.plan").read_bytes() == plan.read_bytes()
    assert 'platform: "tensorrt_plan"' in (repo / "derain_step" / "config.pbtxt").read_text()

    # the swap: same model name, tensors and shapes; the Python backend instead of TensorRT
    desc = Manifest.for_artifact(plan).step_descriptor
    step = repo / "derain_step"
    shutil.rmtree(step)
    (step / "1").mkdir(parents=True)
    shutil.copyfile(default_artifact(), step / "1" / "step.onnx")
    names = {"inputs": desc.input_names, "outputs": desc.output_names}
    (step / "1" / "model.py").write_text(ONNX_STEP_MODEL.format(names=names))
    (step / "config.pbtxt").write_text(config_pbtxt("derain_step", inputs=desc.inputs, outputs=desc.outputs,
                                                    max_batch=0, backend="python"))

    settings = json.loads((repo / "derain" / "1" / "derain.json").read_text())
    assert settings["step"]["cond"] == desc.COND and settings["prologue"] is None
    with _serve(repo) as server, DerainClient(server.urls["http"]) as client:
        for f in frames(9, (40, 48), (64, 64), (17, 23)):
            np.testing.assert_array_equal(client.derain(f), reference.derain(f))
        batch = np.stack(frames(10, (40, 48), (40, 48), (40, 48)))
        for f, y in zip(batch, client.derain_batch(batch)):
            np.testing.assert_array_equal(y, reference.derain(f))
        with pytest.raises(RequestError, match=r"beyond the TensorRT plan's profile \(at most 64x64\)"):
            client.derain(np.zeros((65, 64, 3), np.uint8))
        with pytest.raises(RequestError, match="expects 'UINT8'"):
            client.infer(np.zeros((1, 8, 8, 3), np.float32))
