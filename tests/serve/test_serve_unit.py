"""Serving without a server: request checks, the handler, the interpreter check and fix, the
repository writer and its configs (parsed with Triton's own ModelConfig schema)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from runtime.errors import ArtifactError, DependencyError, UsageError
from tests.serve.serve_helpers import SEED, STEPS, frames


# ---------------------------------------------------------------------- requests and the handler
def test_one_line_takes_the_reason_out_of_pytriton_tracebacks():
    from runtime.serving.client import one_line

    wrapped = ("Failed to process the request(s) for model 'derain_0_0', message: TritonModelException: Model "
               "execute error: Traceback (most recent call last):\n  File \"x.py\", line 1, in f\n"
               "c_python_backend_utils.TritonModelException: Traceback (most recent call last):\n  File \"y\"\n"
               "runtime.errors.UsageError: frame 201x200 is over the server's limit\n\n\n"
               "At:\n  /tmp/m.py(501): execute\n")
    assert one_line(wrapped) == "frame 201x200 is over the server's limit"
    assert one_line("x\nTypeError: memoryview: cannot cast view\n\nAt:\n  m.py(1): f\n") == \
        "TypeError: memoryview: cannot cast view"
    assert one_line("[request id: <id_unknown>] batch-size must be <= 8") == \
        "[request id: <id_unknown>] batch-size must be <= 8"


@pytest.mark.parametrize(("arr", "match"), [
    (np.zeros((1, 8, 8, 3), np.float32), "must be UINT8"),
    (np.zeros((8, 8, 3), np.uint8), r"must have shape \[N, H, W, 3\]"),
    (np.zeros((1, 8, 8, 4), np.uint8), r"got \[1, 8, 8, 4\]"),
    (np.zeros((1, 0, 8, 3), np.uint8), "is empty"),
    (np.zeros((0, 8, 8, 3), np.uint8), "is empty"),
    (np.zeros((1, 11, 10, 3), np.uint8), r"11x10 \(110 pixels\) is over the server's limit of 100 pixels \(--x\)"),
    ([1, 2, 3], "must be a tensor"),
])
def test_check_request_refuses_with_the_reason(arr, match):
    from runtime.serving.handler import check_request

    with pytest.raises(UsageError, match=match):
        check_request(arr, max_pixels=100, hint="--x")


def test_frame_handler_serves_the_good_requests_of_a_batch_and_refuses_the_bad(reference):
    from runtime.serving.handler import FrameHandler

    a = np.stack(frames(11, (40, 48), (40, 48)))
    b = frames(12, (64, 64))[0][None]
    results = FrameHandler(reference, max_pixels=64 * 64)([a, a.astype(np.float32), b, np.zeros((1, 65, 64, 3),
                                                                                              np.uint8)])
    assert isinstance(results[1], UsageError) and isinstance(results[3], UsageError)
    for req, out in ((a, results[0]), (b, results[2])):
        assert out.shape == req.shape
        for f, y in zip(req, out):
            np.testing.assert_array_equal(y, reference.derain(f))


def test_serve_config_ports_and_checks():
    from runtime.serving.server import ServeConfig

    c = ServeConfig(http_port=9000)
    assert c.ports == {"http": 9000, "grpc": 9001, "metrics": 9002}
    assert c.urls()["metrics"] == "http://127.0.0.1:9002/metrics"
    with pytest.raises(UsageError, match="must differ"):
        ServeConfig(http_port=9000, grpc_port=9000)
    with pytest.raises(UsageError, match="instances must be an integer >= 1"):
        ServeConfig(instances=0)
    with pytest.raises(UsageError, match="model name"):
        ServeConfig(model_name="a/b")


# ---------------------------------------------------------------------- the interpreter
def test_interpreter_library_is_this_pythons_own():
    from runtime.serving.environment import interpreter_library

    try:
        lib = interpreter_library()
    except DependencyError as e:
        pytest.skip(str(e))
    assert lib.is_file() and lib.name.startswith(f"libpython{sys.version_info[0]}.{sys.version_info[1]}")


def test_a_static_python_is_refused_with_what_to_use(monkeypatch):
    import sysconfig

    from runtime.serving import environment

    real = sysconfig.get_config_var
    monkeypatch.setattr(environment.sysconfig, "get_config_var",
                        lambda name: 0 if name == "Py_ENABLE_SHARED" else real(name))
    with pytest.raises(DependencyError, match="--enable-shared"):
        environment.interpreter_library()


def test_numpy_2_is_refused(monkeypatch):
    pytest.importorskip("pytriton")
    from runtime.serving import environment

    monkeypatch.setattr(np, "__version__", "2.0.0")
    with pytest.raises(DependencyError, match=r"numpy < 2 .*pip install 'numpy<2'"):
        environment.check_server()


def test_the_stub_loads_this_interpreters_libpython_under_the_fix():
    """The cause of the pyenv failure: the stub links libpython3.X.so.1.0 by name and, left alone,
    the loader takes the system's; under server_environment() it resolves to this interpreter's."""
    pytest.importorskip("pytriton")
    if shutil.which("ldd") is None:
        pytest.skip("no ldd")
    from pytriton.utils.distribution import get_stub_path

    from runtime.serving.environment import check_server, interpreter_library, server_environment

    try:
        check_server()
    except DependencyError as e:
        pytest.skip(str(e))
    stub = Path(get_stub_path(f"{sys.version_info[0]}.{sys.version_info[1]}"))
    soname = interpreter_library().name
    with server_environment() as env:
        out = subprocess.run(["ldd", str(stub)], capture_output=True, text=True, env={"LD_LIBRARY_PATH": env[
            "LD_LIBRARY_PATH"]}).stdout
    line = next(ln for ln in out.splitlines() if soname in ln)
    assert Path(line.split("=>")[1].split("(")[0].strip()).resolve() == interpreter_library().resolve()


# ---------------------------------------------------------------------- rd-export triton
def _fake_plan(tmp_path: Path) -> Path:
    from runtime.derainer import default_artifact
    from runtime.manifest import Manifest, sha256_file

    plan = tmp_path / "model.trt.plan"
    shutil.copyfile(default_artifact(), plan)
    m = Manifest.for_artifact(default_artifact())
    d = m.to_dict()
    d.update(artifact=plan.name, format="trt", sha256=sha256_file(plan),
             tensorrt={"version": "10.0.0", "gpu_name": "none (test)", "compute_capability": "9.0"})
    if m.prologue is not None:  # the shipped model's prologue, as the plan's
        from runtime.manifest import prologue_name

        pro = tmp_path / prologue_name(plan.name)
        shutil.copyfile(m.prologue_path(default_artifact()), pro)
        d["prologue"] = dict(m.prologue, artifact=pro.name, sha256=sha256_file(pro))
    Manifest.from_dict(d).save(tmp_path / "model.trt.json")
    return plan


def _parse(path: Path):
    pb = pytest.importorskip("tritonclient.grpc.model_config_pb2")
    from google.protobuf import text_format

    return text_format.Parse(path.read_text(), pb.ModelConfig())


def test_gpu_repository_layout_and_configs_parse_as_triton_model_configs(tmp_path):
    from rd_export.triton import TritonOptions, export_triton
    from runtime.descriptor import StepDescriptor
    from runtime.manifest import Manifest

    plan = _fake_plan(tmp_path)
    desc: StepDescriptor = Manifest.for_artifact(plan).step_descriptor
    repo = export_triton(plan, tmp_path / "repo", TritonOptions(steps=3, instances=2, gpu_instances=1,
                                                                queue_delay_us=700))
    step = _parse(repo / "derain_step" / "config.pbtxt")
    assert step.name == "derain_step" and step.platform == "tensorrt_plan" and step.max_batch_size == 0
    assert [i.name for i in step.input] == desc.input_names and [o.name for o in step.output] == desc.output_names
    dims = {i.name: list(i.dims) for i in step.input}
    assert dims[desc.X] == [-1, desc.channels, -1, -1] and dims[desc.T] == [-1] and dims[desc.COEF] == [-1, 4]
    assert step.instance_group[0].kind == step.instance_group[0].KIND_GPU
    top = _parse(repo / "derain" / "config.pbtxt")
    assert top.backend == "python" and top.max_batch_size == desc.profile.max_batch
    assert top.dynamic_batching.max_queue_delay_microseconds == 700
    assert top.instance_group[0].count == 2
    assert [list(i.dims) for i in top.input] == [[-1, -1, 3]]
    settings = json.loads((repo / "derain" / "1" / "derain.json").read_text())
    assert len(settings["schedule"]["timesteps"]) == 3 and len(settings["schedule"]["coefficients"]) == 3
    assert settings["step"]["channels"] == desc.channels and settings["tensorrt"]["version"] == "10.0.0"
    from runtime.schedule import DDIMSchedule

    s = DDIMSchedule()
    s.set_timesteps(3)
    assert settings["schedule"]["timesteps"] == s.timesteps.tolist()
    assert np.array_equal(np.asarray(settings["schedule"]["coefficients"], np.float32), s.coefficients())


def test_cpu_repository_layout(tmp_path):
    from rd_export.triton import TritonOptions, export_triton
    from runtime.derainer import default_artifact

    repo = export_triton(default_artifact(), tmp_path / "repo", TritonOptions(steps=STEPS, seed=SEED))
    files = sorted(str(p.relative_to(repo)) for p in repo.rglob("*") if p.is_file())
    # the shipped model is two graphs
    assert files == ["derain/1/default.json", "derain/1/default.onnx", "derain/1/default.prologue.onnx",
                     "derain/1/derain.json", "derain/1/model.py", "derain/config.pbtxt"]
    top = _parse(repo / "derain" / "config.pbtxt")
    assert top.backend == "python" and top.instance_group[0].kind == top.instance_group[0].KIND_CPU
    assert (repo / "derain" / "1" / "default.onnx").read_bytes() == default_artifact().read_bytes()


def test_export_refuses_to_overwrite_and_replaces_with_force(tmp_path):
    from rd_export.triton import export_triton
    from runtime.derainer import default_artifact

    out = tmp_path / "repo"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(UsageError, match="not empty; choose a new folder or pass --force"):
        export_triton(default_artifact(), out)
    assert (out / "keep.txt").read_text() == "mine"
    export_triton(default_artifact(), out, force=True)
    assert not (out / "keep.txt").exists() and (out / "derain" / "config.pbtxt").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["repo"]  # no temporary folder left


def test_export_refuses_a_rain_model_and_unknown_files(tmp_path):
    from rd_export.triton import export_triton
    from runtime.derainer import default_artifact
    from runtime.manifest import Manifest

    onnx = tmp_path / "rain.onnx"
    shutil.copyfile(default_artifact(), onnx)
    d = Manifest.for_artifact(default_artifact()).to_dict()
    d.update(artifact=onnx.name, model="rain")
    Manifest.from_dict(d).save(tmp_path / "rain.json")
    with pytest.raises(ArtifactError, match="is a 'rain' model"):
        export_triton(onnx, tmp_path / "repo")
    (tmp_path / "model.pt").write_bytes(b"x")
    with pytest.raises(UsageError, match=r"expected a TensorRT plan \(.plan"):
        export_triton(tmp_path / "model.pt", tmp_path / "repo2")
    assert not (tmp_path / "repo").exists()


def test_rd_export_triton_cli(tmp_path):
    from typer.testing import CliRunner

    from rd_export.cli import app
    from runtime.derainer import default_artifact

    runner = CliRunner()
    r = runner.invoke(app, ["triton", str(default_artifact()), "-o", str(tmp_path / "repo"), "--steps", "2",
                            "--instances", "2", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["models"] == ["derain"]
    r = runner.invoke(app, ["triton", str(default_artifact()), "-o", str(tmp_path / "repo")])
    assert r.exit_code == 2 and "--force" in r.output
    r = runner.invoke(app, ["triton", str(default_artifact()), "-o", str(tmp_path / "r3"), "--steps", "1"])
    assert r.exit_code == 2


def test_cpu_repository_carries_a_predict_and_refine_prologue_file(tmp_path):
    """A predict-and-refine ONNX is two files (the manifest's 'prologue' entry names the second):
    both go into the repository, and a missing prologue is refused."""
    from rd_export.triton import export_triton
    from runtime.derainer import default_artifact
    from runtime.manifest import Manifest, sha256_file

    onnx = tmp_path / "model.onnx"
    shutil.copyfile(default_artifact(), onnx)
    pro = tmp_path / "model.prologue.onnx"
    pro.write_bytes(b"prologue graph bytes")
    d = Manifest.for_artifact(default_artifact()).to_dict()
    d.update(artifact=onnx.name, prologue={"artifact": pro.name, "sha256": sha256_file(pro)})
    d["descriptor"] = dict(d["descriptor"], cond_channels=6)  # a prologue's step takes [y, P(y)]
    Manifest.from_dict(d).save(tmp_path / "model.json")
    repo = export_triton(onnx, tmp_path / "repo")
    assert (repo / "derain" / "1" / pro.name).read_bytes() == pro.read_bytes()
    pro.unlink()
    with pytest.raises(ArtifactError, match=r"prologue graph of model\.onnx is missing"):
        export_triton(onnx, tmp_path / "repo2")


def test_settled_metrics_reads_until_a_trailing_counter_reaches_its_total():
    """Triton counts a request after sending its response: settled_metrics re-reads until the counter
    arrives (or its timeout passes, returning the last read for the caller to compare)."""
    import http.server
    import threading

    from runtime.serving.client import metric_total, settled_metrics

    reads = []

    class Metrics(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # http.server calls it by that name
            reads.append(self.path)
            body = f'nv_inference_request_success{{model="derain",version="1"}} {min(len(reads), 3)}\n'.encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Metrics)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/metrics"
        name = "nv_inference_request_success"
        assert metric_total(settled_metrics(url, name, 3, poll_s=0.01), name) == 3 and len(reads) == 3
        text = settled_metrics(url, name, 5, timeout_s=0.2, poll_s=0.01)  # never reaches 5: the last read
        assert metric_total(text, name) == 3 and len(reads) > 4
    finally:
        server.shutdown()
        server.server_close()
