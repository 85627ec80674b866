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
    if m.prologue is not None:  # the shipped model's prologue ONNX, as the plan's (a stand-in runs it)
        from runtime.manifest import prologue_name

        pro = tmp_path / prologue_name(plan.name)
        shutil.copyfile(m.prologue_path(onnx), pro)
        d["prologue"] = dict(m.prologue, artifact=pro.name, sha256=sha256_file(pro))
    Manifest.from_dict(d).save(tmp_path / "model.trt.json")
    return plan


def test_exported_gpu_repository_bls_loop_equals_derainer(serve_available, reference, tmp_path):
    from rd_export.triton import TritonOptions, config_pbtxt, export_triton
    from runtime.derainer import default_artifact
    from runtime.manifest import Manifest
    from runtime.serving.client import DerainClient, RequestError

    plan = _fake_plan(tmp_path)
    repo = export_triton(plan, tmp_path / "repo", TritonOptions(steps=STEPS, seed=SEED, max_batch=8))
    assert sorted(p.name for p in repo.iterdir()) == ["derain", "derain_prologue", "derain_step"]  # two plans
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
    assert settings["step"]["cond"] == desc.COND
    if settings["prologue"] is not None:  # the shipped model's prologue plan: the same swap
        pd = desc.prologue()
        pro = repo / settings["prologue"]["model"]
        assert (pro / "1" / "model.plan").is_file()
        shutil.rmtree(pro)
        (pro / "1").mkdir(parents=True)
        shutil.copyfile(Manifest.for_artifact(plan).prologue_path(plan), pro / "1" / "step.onnx")
        names = {"inputs": pd.input_names, "outputs": pd.output_names}
        (pro / "1" / "model.py").write_text(ONNX_STEP_MODEL.format(names=names))
        (pro / "config.pbtxt").write_text(config_pbtxt(pro.name, inputs=pd.inputs, outputs=pd.outputs,
                                                       max_batch=0, backend="python"))
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


PROLOGUE_MODEL = textwrap.dedent('''
    """Stand-in prologue plan: cond = [y, 0.5 y] (6 channels), as a predict-and-refine prologue shapes it."""
    import numpy as np
    import triton_python_backend_utils as pb_utils


    class TritonPythonModel:
        def execute(self, requests):
            out = []
            for request in requests:
                y = pb_utils.get_input_tensor_by_name(request, {inp!r}).as_numpy()
                cond = np.concatenate([y, np.float32(0.5) * y], axis=1)
                out.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor({out!r}, cond)]))
            return out
''')

TOY_STEP_MODEL = textwrap.dedent('''
    """Stand-in step plan over a 6-channel condition: eps_hat = cond[:, 3:] * t / 1000, then the DDIM update."""
    import numpy as np
    import triton_python_backend_utils as pb_utils

    X, COND, T, COEF, OUT = {names!r}


    class TritonPythonModel:
        def execute(self, requests):
            out = []
            for r in requests:
                x, cond, t, coef = (pb_utils.get_input_tensor_by_name(r, n).as_numpy() for n in (X, COND, T, COEF))
                a, b, c, d = (coef[:, k, None, None, None] for k in range(4))
                eps = cond[:, 3:] * (t / np.float32(1000))[:, None, None, None]
                x_next = (c * (a * x - b * eps) + d * eps).astype(np.float32)
                out.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(OUT, x_next)]))
            return out
''')


def _toy_reference(frame: np.ndarray, steps: int, seed: int, multiple: int, min_size: int,
                   strength: float = 1.0, noise_scale: float = 1.0, lowpass: float = 0.0) -> np.ndarray:
    """What the BLS loop must compute with the toy prologue and step, from the runtime's own helpers."""
    from runtime.derainer import pad_reflect, to_float, to_uint8
    from runtime.lowpass import keep_correction
    from runtime.schedule import DDIMSchedule, initial_noise

    h, w = frame.shape[:2]
    hp, wp = (max(-(-v // multiple) * multiple, min_size) for v in (h, w))
    y = pad_reflect(to_float(frame[None]), hp, wp)
    cond = np.concatenate([y, np.float32(0.5) * y], axis=1)
    if steps == 0:
        return to_uint8(cond[:, 3:, :h, :w])[0]
    s = DDIMSchedule()
    s.set_timesteps(steps)
    x = initial_noise((1, 3, hp, wp), seed) * np.float32(noise_scale)
    for i, coef in enumerate(s.coefficients()):
        t = np.full((1,), float(s.timesteps[i]), np.float32)
        co = np.repeat(coef[None], 1, axis=0)
        a, b, c, d = (co[:, k, None, None, None] for k in range(4))
        eps = cond[:, 3:] * (t / np.float32(1000))[:, None, None, None]
        x = (c * (a * x - b * eps) + d * eps).astype(np.float32)
    x = np.ascontiguousarray(x[:, :, :h, :w])
    keep_correction(x, np.ascontiguousarray(cond[:, 3:, :h, :w]), strength, lowpass)  # of the cropped frame
    return to_uint8(x)[0]


def test_gpu_repository_bls_runs_a_prologue_first_and_zero_steps_returns_its_estimate(serve_available, tmp_path):
    """The predict-and-refine path of the BLS model (a prologue plan, a 6-channel condition, steps = 0),
    driven by its settings as rd-export writes them for such an artifact, against a numpy reference."""
    from rd_export.triton import TritonOptions, config_pbtxt, export_triton
    from runtime.descriptor import TensorSpec
    from runtime.manifest import Manifest
    from runtime.serving.client import DerainClient

    plan = _fake_plan(tmp_path)
    desc = Manifest.for_artifact(plan).step_descriptor
    repo = export_triton(plan, tmp_path / "repo", TritonOptions(steps=STEPS, seed=SEED))
    img = ("batch", 3, "height", "width")
    cond6 = TensorSpec(desc.COND, "float32", ("batch", 6, "height", "width"))
    step_inputs = tuple(cond6 if s.name == desc.COND else s for s in desc.inputs)
    for name, inputs, outputs, code in (
            ("derain_step", step_inputs, desc.outputs,
             TOY_STEP_MODEL.format(names=(desc.X, desc.COND, desc.T, desc.COEF, desc.OUT))),
            ("derain_prologue", (TensorSpec("rainy", "float32", img),), (cond6,),
             PROLOGUE_MODEL.format(inp="rainy", out=desc.COND))):
        shutil.rmtree(repo / name, ignore_errors=True)
        (repo / name / "1").mkdir(parents=True)
        (repo / name / "1" / "model.py").write_text(code)
        (repo / name / "config.pbtxt").write_text(config_pbtxt(name, inputs=inputs, outputs=outputs, max_batch=0,
                                                               backend="python"))
    settings_path = repo / "derain" / "1" / "derain.json"
    settings = json.loads(settings_path.read_text())
    settings["prologue"] = {"model": "derain_prologue", "input": "rainy", "output": desc.COND,
                            "estimate_channels": [3, 6]}
    settings_path.write_text(json.dumps(settings))
    shutil.copytree(repo / "derain", repo / "derain0")  # the same model at zero steps
    cfg = repo / "derain0" / "config.pbtxt"
    cfg.write_text(cfg.read_text().replace('name: "derain"', 'name: "derain0"'))
    zero = repo / "derain0" / "1" / "derain.json"
    zero.write_text(json.dumps({**settings, "steps": 0, "schedule": {"timesteps": [], "coefficients": []}}))
    shutil.copytree(repo / "derain", repo / "derain_half")  # ... and keeping half the refiner's correction
    cfg = repo / "derain_half" / "config.pbtxt"
    cfg.write_text(cfg.read_text().replace('name: "derain"', 'name: "derain_half"'))
    (repo / "derain_half" / "1" / "derain.json").write_text(json.dumps(
        {**settings, "prologue": {**settings["prologue"], "refine_strength": 0.5}}))
    shutil.copytree(repo / "derain", repo / "derain_mean")  # ... and starting from x_T = 0
    cfg = repo / "derain_mean" / "config.pbtxt"
    cfg.write_text(cfg.read_text().replace('name: "derain"', 'name: "derain_mean"'))
    (repo / "derain_mean" / "1" / "derain.json").write_text(json.dumps(
        {**settings, "prologue": {**settings["prologue"], "noise_scale": 0.0}}))
    shutil.copytree(repo / "derain", repo / "derain_low")  # ... and keeping the correction's low frequencies
    cfg = repo / "derain_low" / "config.pbtxt"
    cfg.write_text(cfg.read_text().replace('name: "derain"', 'name: "derain_low"'))
    (repo / "derain_low" / "1" / "derain.json").write_text(json.dumps(
        {**settings, "prologue": {**settings["prologue"], "refine_strength": 0.75, "refine_lowpass": 3.0}}))

    m, lo = desc.size_multiple, desc.profile.min_size[0]
    shots = frames(14, (40, 48), (17, 23))
    with _serve(repo) as server:
        for model, steps, strength, scale, low in (
                ("derain", STEPS, 1.0, 1.0, 0.0), ("derain0", 0, 1.0, 1.0, 0.0), ("derain_half", STEPS, 0.5, 1.0, 0.0),
                ("derain_mean", STEPS, 1.0, 0.0, 0.0), ("derain_low", STEPS, 0.75, 1.0, 3.0)):
            with DerainClient(server.urls["http"], model=model) as client:
                for f in shots:
                    got, want = client.derain(f), _toy_reference(f, steps, SEED, m, lo, strength, scale, low)
                    # the blur's float32 sums differ in order from the runtime's: a uint8 level at most
                    assert np.abs(got.astype(int) - want).max() <= (1 if low else 0), model
        assert not np.array_equal(_toy_reference(shots[0], STEPS, SEED, m, lo, 0.5),
                                  _toy_reference(shots[0], STEPS, SEED, m, lo))  # the strength shows
        assert not np.array_equal(_toy_reference(shots[0], STEPS, SEED, m, lo, 1.0, 0.0),
                                  _toy_reference(shots[0], STEPS, SEED, m, lo))  # the noise scale shows
        low = _toy_reference(shots[0], STEPS, SEED, m, lo, 0.75, 1.0, 3.0)
        assert np.abs(low.astype(int) - _toy_reference(shots[0], STEPS, SEED, m, lo, 0.75)).max() > 2  # it shows


def test_a_repository_whose_model_cannot_load_is_a_one_line_server_error(serve_available, tmp_path):
    from rd_export.triton import TritonOptions, export_triton
    from runtime.derainer import default_artifact
    from runtime.serving.server import ServerError

    repo = export_triton(default_artifact(), tmp_path / "repo", TritonOptions(steps=STEPS))
    (repo / "derain" / "1" / "default.onnx").write_bytes(b"not the artifact")  # its sha256 no longer matches
    with pytest.raises(ServerError, match="does not match its manifest") as info:
        _serve(repo).start()
    assert "\n" not in str(info.value)
