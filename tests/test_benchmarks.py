"""benchmarks/dtb_curve.py and train_step.py: skip where they must, measure on tiny inputs."""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str, monkeypatch, data: Path):
    monkeypatch.setenv("RD_DATA", str(data))
    monkeypatch.syspath_prepend(str(BENCH))
    for mod in ("_common", name):
        sys.modules.pop(mod, None)
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dtb_curve_skips_without_data(tmp_path, monkeypatch, capsys):
    mod = _load("dtb_curve", monkeypatch, tmp_path / "nowhere")
    assert mod.main(["x.pt"]) == 0
    assert "skipped: paired dev set not found" in capsys.readouterr().err


def test_dtb_curve_scores_a_checkpoint(tmp_path, monkeypatch, capsys, image_dirs, tiny_checkpoint):
    clean, rainy = image_dirs
    dev = tmp_path / "data" / "dev" / "sirr"
    (dev / "clean").mkdir(parents=True)
    shutil.copytree(rainy, dev / "rainy")
    for i, p in enumerate(sorted((dev / "rainy").iterdir())):  # pair by name: rainy rNN <-> clean cNN as rNN
        shutil.copy(sorted(clean.iterdir())[i], dev / "clean" / p.name)
    mod = _load("dtb_curve", monkeypatch, tmp_path / "data")
    assert mod.main([str(tiny_checkpoint), "--size", "16", "--per-image", "1", "--steps", "2", "--json",
                     "--plot", str(tmp_path / "curve.png")]) == 0
    out = json.loads(capsys.readouterr().out)
    (row,) = out["rows"]
    assert row["crops"] == 4 and row["prediction"] == "eps" and row["step"] >= 1
    assert all(0 < row[k] < 100 for k in ("x0@101", "x0@501", "x0@901", "ddim", "ddim_matched"))
    assert -1 <= row["ddim_corr"] <= 1 and 0 < out["baseline"]["input"] < 100
    assert (tmp_path / "curve.png").stat().st_size > 1000
    assert mod.main([str(tmp_path / "missing.pt")]) == 2



def test_train_step_times_each_size_against_the_first(tmp_path, monkeypatch, capsys):
    mod = _load("train_step", monkeypatch, tmp_path)
    assert mod.main(["--preset", "tiny", "--sizes", "1x16,2x16", "--steps", "1", "--warmup", "1",
                     "--threads", "1", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    rows = info["rows"]
    assert [(r["batch"], r["crop"]) for r in rows] == [(1, 16), (2, 16)]
    assert rows[0]["samples_ratio"] == 1.0 and all(r["step_ms"] > 0 for r in rows)
    assert rows[1]["samples_ratio"] == pytest.approx(rows[1]["samples_s"] / rows[0]["samples_s"], rel=0.02)
    assert all(r["calls"] == "batched" for r in rows)  # rd-train's default


def test_train_step_measures_both_call_modes_with_the_sds_recipe(tmp_path, monkeypatch, capsys):
    mod = _load("train_step", monkeypatch, tmp_path)
    assert mod.main(["--preset", "tiny", "--sizes", "2x16", "--calls", "unbatched,batched", "--steps", "1",
                     "--warmup", "1", "--threads", "1", "--cond-drop", "0.2", "--lambda-sds", "10", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert [r["calls"] for r in info["rows"]] == ["unbatched", "batched"]
    assert info["lambda_sds"] == 10 and info["rows"][0]["samples_ratio"] == 1.0
    with pytest.raises(SystemExit):
        mod.main(["--calls", "fast"])
    with pytest.raises(SystemExit):
        mod.main(["--lambda-sds", "1"])  # needs --cond-drop


def test_train_step_rejects_a_bad_size_and_skips_without_cuda(tmp_path, monkeypatch, capsys):
    import torch

    mod = _load("train_step", monkeypatch, tmp_path)
    with pytest.raises(SystemExit, match="not BATCHxCROP"):
        mod.main(["--sizes", "4y64"])
    if not torch.cuda.is_available():
        assert mod.main(["--device", "cuda"]) == 0
        assert "skipped: --device cuda" in capsys.readouterr().err


def test_gpu_skips_without_cuda_and_checks_its_variants(tmp_path, monkeypatch, capsys):
    mod = _load("gpu", monkeypatch, tmp_path)
    if mod.skip_reason() is None:
        pytest.skip("a CUDA GPU is present: the skip path does not apply")
    assert mod.main(["--json"]) == 0
    assert json.loads(capsys.readouterr().out)["skipped"] is True
    assert mod.main(["--variants", "torch_eager_fp32,nope"]) == 2
    assert "unknown --variants nope" in capsys.readouterr().err
    assert mod.main(["--device", "cpu"]) == 2  # only the eager variant runs off-GPU
    assert "only --variants torch_eager_fp32" in capsys.readouterr().err


def test_gpu_streams_each_variant_row(tmp_path, monkeypatch, capsys, tiny_checkpoint):
    mod = _load("gpu", monkeypatch, tmp_path)
    args = ["--device", "cpu", "--variants", "torch_eager_fp32", "--checkpoint", str(tiny_checkpoint),
            "--size", "16", "--steps", "2", "--runs", "1", "--warmup", "0"]
    assert mod.main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("16x16, 2 steps, cpu (smoke test)")
    (row,) = [ln for ln in lines if ln.startswith("torch_eager_fp32")]
    step_ms, loop_ms, frame_ms, fps = map(float, row.split()[1:])
    assert 0 < step_ms and 0 < loop_ms and 0 < frame_ms and fps > 0
    assert mod.main([*args, "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert list(rep["variants"]) == ["torch_eager_fp32"] and rep["tensorrt_skipped"] is None
    assert rep["variants"]["torch_eager_fp32"]["loop_ms"]["runs"] == 1


def test_scale_curve_fit_and_extrapolation(tmp_path, monkeypatch, capsys):
    mod = _load("scale_curve", monkeypatch, tmp_path / "nowhere")
    a, b = mod.fit_log2([1000, 2000, 4000, 8000], [20.0, 20.5, 21.0, 21.5])
    assert b == pytest.approx(0.5) and a == pytest.approx(20.0 - 0.5 * math.log2(1000))
    assert mod.samples_to_reach(a, b, 22.0) == pytest.approx(16000)
    assert mod.samples_to_reach(a, -0.1, 22.0) is None
    with pytest.raises(ValueError, match="two"):
        mod.fit_log2([1000], [20.0])
    # A lineage that gains 0.5 dB per doubling reaches 31.20 - 0.5 * k at 2^k times its last point.
    rows = ["run,phase,batch,step,samples,psnr,matched,corr,lineage,section"]
    sizes = [31000, 62000, 124000, 248000]
    rows += [f"r,5,64,{i},{n},24.0,{30.2 - 0.5 * (3 - i)},0.2,1,6" for i, n in enumerate(sizes)]
    rows += ["r,2,4,1,16000,24,28.0,0.1,1,2", "r,2,4,2,24000,24,28.1,0.1,1,2", "side,side,4,1,50000,24,1.0,0,0,3"]
    csv_path = tmp_path / "points.csv"
    csv_path.write_text("# comment\n" + "\n".join(rows) + "\n")
    assert mod.main(["--csv", str(csv_path), "--json", "--plot", str(tmp_path / "scale.png")]) == 0
    rep = json.loads(capsys.readouterr().out)
    f = rep["fits"]["phase5"]
    assert f["points"] == 4 and f["slope_db_per_doubling"] == pytest.approx(0.5)
    assert f["samples_needed"] == pytest.approx(248000 * 4) and f["x_current"] == pytest.approx(4)
    assert f["gpu_steps"] == pytest.approx(248000 * 3 / 64)
    assert rep["current"]["samples"] == 248000 and rep["gap_db"] == pytest.approx(1.0)  # side runs ignored
    assert (tmp_path / "scale.png").stat().st_size > 1000
    assert mod.main(["--csv", str(tmp_path / "missing.csv")]) == 2
    assert "scale_curve:" in capsys.readouterr().err


def test_scale_curve_reads_the_shipped_measurements(tmp_path, monkeypatch, capsys):
    mod = _load("scale_curve", monkeypatch, tmp_path / "nowhere")
    assert mod.main([]) == 0
    out = capsys.readouterr().out
    assert out.startswith("now: gpu_sds step 891, 88,024 crops seen, matched 29.82 dB")
    assert "phase2_late" in out and "did not hold" in out


def _dev_set(tmp_path, image_dirs) -> Path:
    clean, rainy = image_dirs
    dev = tmp_path / "data" / "dev" / "sirr"
    (dev / "clean").mkdir(parents=True)
    shutil.copytree(rainy, dev / "rainy")
    for i, p in enumerate(sorted((dev / "rainy").iterdir())):  # pair by name
        shutil.copy(sorted(clean.iterdir())[i], dev / "clean" / p.name)
    return tmp_path / "data"


def test_quality_bands_and_seed_mean(tmp_path, monkeypatch, capsys, image_dirs, tiny_checkpoint):
    mod = _load("quality", monkeypatch, _dev_set(tmp_path, image_dirs))
    args = ["--checkpoint", str(tiny_checkpoint), "--torch", "--steps", "2", "--limit", "2", "--threads", "1",
            "--json", "--bands"]
    assert mod.main(args) == 0
    one = json.loads(capsys.readouterr().out)
    assert mod.main([*args, "--seeds", "2"]) == 0
    two = json.loads(capsys.readouterr().out)
    assert one["seeds"] == 1 and two["seeds"] == 2 and one["pairs"] == two["pairs"] == 2
    for rep in (one, two):
        for k in ("input", "G_B", "DTB"):
            assert 0 < rep["mean"][k]["psnr_lo"] < 200 and 0 < rep["mean"][k]["psnr_hi"] < 200
    assert one["mean"]["G_B"] == two["mean"]["G_B"]  # the seeds only touch the DTB
    assert one["mean"]["DTB"]["psnr"] != two["mean"]["DTB"]["psnr"]
    assert mod.main([*args, "--seeds", "0"]) == 2
    assert "--seeds must be >= 1" in capsys.readouterr().err


def test_quality_band_split_and_seed_mean_are_exact(tmp_path, monkeypatch):
    mod = _load("quality", monkeypatch, tmp_path / "nowhere")
    rng = np.random.default_rng(0)
    clean = rng.integers(40, 200, (48, 64, 3), dtype=np.uint8)
    assert mod.band_psnr(clean, clean) == (pytest.approx(168.13, abs=0.01),) * 2  # zero error: capped
    shifted = (clean.astype(np.int16) + 10).astype(np.uint8)  # a pure brightness shift: no error left
    assert min(mod.band_psnr(shifted, clean)) > 45  # only Y's integer rounding is left
    noisy = np.clip(clean + rng.normal(0, 8, clean.shape), 0, 255).astype(np.uint8)  # white noise: high band
    lo, hi = mod.band_psnr(noisy, clean)
    assert lo > hi + 15
    ramp = np.clip(clean + np.linspace(-20, 20, 64)[None, :, None], 0, 255).astype(np.uint8)  # a tone ramp: low band
    lo, hi = mod.band_psnr(ramp, clean)
    assert hi > lo + 10
    a, b = np.zeros((2, 2, 3), np.uint8), np.full((2, 2, 3), 3, np.uint8)
    assert (mod.seed_mean([a, b]) == 2).all() and mod.seed_mean([b]).dtype == np.uint8  # 1.5 rounds to 2


def test_frame_latency_phases_and_torch_anchors(tmp_path, monkeypatch, capsys):
    """The shipped model at a small size: each (size, S) row has its phases, the torch eager anchor and,
    with --bf16, the bf16-autocast one, each ratio being that anchor's time over the runtime's median."""
    fl = _load("frame_latency", monkeypatch, tmp_path / "no-data")
    assert fl.main(["--sizes", "64x96", "--steps", "0,2", "--runs", "1", "--threads", "1", "--no-memory",
                    "--bf16", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    rows = {r["steps"]: r for r in report["rows"]}
    assert set(rows) == {0, 2} and all(r["size"] == [64, 96] for r in rows.values())
    assert rows[0]["per_step_s"] is None and rows[2]["per_step_s"] > 0
    assert rows[0]["phases_s"]["steps"] == 0 and rows[2]["phases_s"]["steps"] > 0
    assert rows[0]["phases_s"]["prologue"] > 0
    for r in rows.values():
        for key, ratio in (("torch_eager_s", "speedup_vs_torch"), ("torch_bf16_s", "speedup_vs_torch_bf16")):
            assert r[key] > 0
            # the report rounds seconds to 3 decimals and ratios to 2: at this size that is a few percent
            assert r[ratio] == pytest.approx(r[key] / r["median_s"], rel=0.15, abs=0.02)
        assert r["backend"] == "onnxruntime"


def test_frame_latency_on_openvino(tmp_path, monkeypatch, capsys):
    pytest.importorskip("openvino")
    fl = _load("frame_latency", monkeypatch, tmp_path / "no-data")
    assert fl.main(["--sizes", "64x96", "--steps", "2", "--runs", "1", "--threads", "1", "--no-torch",
                    "--device", "openvino", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    (row,) = report["rows"]
    assert report["device"] == "openvino" and row["backend"] == "openvino"
    assert row["inference_precision"] in ("bf16", "f32") and row["peak_rss_mib"] > 0


def _probe_data(root: Path, image_dir_factory) -> Path:
    """unpaired/clean + clean_more and both dev sets (pairs by name) of small synthetic images."""
    clean, rainy = image_dir_factory(root / "src", n=4, size=(40, 48))
    for name in ("clean", "clean_more"):
        shutil.copytree(clean, root / "unpaired" / name)
    for dev in ("sirr", "jorder_h"):
        shutil.copytree(rainy, root / "dev" / dev / "rainy")
        (root / "dev" / dev / "clean").mkdir()
        for c, r in zip(sorted(clean.iterdir()), sorted(rainy.iterdir())):
            shutil.copy(c, root / "dev" / dev / "clean" / r.name)
    return root


def test_predictor_probe_cosine_ema_snapshots_and_scoring_an_init(tmp_path, monkeypatch, capsys, image_dir_factory):
    import torch

    data = _probe_data(tmp_path / "data", image_dir_factory)
    mod = _load("predictor_probe", monkeypatch, data)
    common = ["--crop", "16", "--batch", "2", "--base", "8", "--threads", "1"]
    lrs = []
    real_step = torch.optim.Adam.step

    def spy(self, *a, **k):  # the learning rate each optimiser step runs at
        lrs.append(self.param_groups[0]["lr"])
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.Adam, "step", spy)
    assert mod.main([*common, "--steps", "4", "--lr", "1e-3", "--lr-min", "1e-4", "--ema", "0.5",
                     "--save", str(tmp_path / "p.pt"), "--save-every", "2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["steps"] == 4 and report["ema"] == 0.5 and set(report["dev"]) == {"sirr", "jorder_h"}
    # cosine from --lr at step 0 to --lr-min at the last step's end
    assert lrs == pytest.approx([1e-4 + 0.45e-3 * (1 + math.cos(math.pi * i / 4)) for i in range(4)])
    assert lrs[0] == pytest.approx(1e-3) and lrs[-1] > 1e-4
    snaps = {p.name for p in tmp_path.glob("p*.pt")}
    assert snaps == {"p.pt", "p_2.pt", "p_4.pt"}
    final, at4 = torch.load(tmp_path / "p.pt", weights_only=True), torch.load(tmp_path / "p_4.pt", weights_only=True)
    assert all(torch.equal(final[k], at4[k]) for k in final)
    # --minutes 0 trains nothing and scores --init as it is: the same numbers as the run's own report
    assert mod.main([*common, "--minutes", "0", "--init", str(tmp_path / "p.pt"), "--json"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["steps"] == 0 and again["final_l1"] is None
    assert again["dev"]["sirr"]["out"] == pytest.approx(report["dev"]["sirr"]["out"])
    assert mod.main([*common, "--minutes", "0", "--init", str(tmp_path / "p.pt")]) == 0
    assert "not trained" in capsys.readouterr().out


def test_predictor_probe_ema_is_what_is_saved(tmp_path, monkeypatch, capsys, image_dir_factory):
    import torch

    data = _probe_data(tmp_path / "data", image_dir_factory)
    mod = _load("predictor_probe", monkeypatch, data)
    common = ["--crop", "16", "--batch", "2", "--base", "8", "--threads", "1", "--steps", "3", "--seed", "1"]
    assert mod.main([*common, "--save", str(tmp_path / "raw.pt")]) == 0
    assert mod.main([*common, "--ema", "0.9", "--save", str(tmp_path / "ema.pt")]) == 0
    raw, ema = (torch.load(tmp_path / f"{n}.pt", weights_only=True) for n in ("raw", "ema"))
    assert raw.keys() == ema.keys() and any(not torch.equal(raw[k], ema[k]) for k in raw)
    with pytest.raises(SystemExit):
        mod.main([*common[:-4], "--lr-min", "1e-5"])  # a cosine needs --steps
    with pytest.raises(SystemExit):
        mod.main([*common, "--save-every", "2"])  # snapshots need --save
    capsys.readouterr()


def test_predictor_probe_styles_take_turns_and_a_bad_one_is_refused(tmp_path, monkeypatch, capsys, image_dir_factory):
    import training.synthrain as synthrain

    data = _probe_data(tmp_path / "data", image_dir_factory)
    mod = _load("predictor_probe", monkeypatch, data)
    common = ["--crop", "16", "--batch", "2", "--base", "8", "--threads", "1", "--steps", "4"]
    seen, real = [], synthrain.rain_batch
    monkeypatch.setattr(synthrain, "rain_batch", lambda x, gen, style="v1": seen.append(style) or real(x, gen, style))
    assert mod.main([*common, "--style", "v1, v3"]) == 0
    assert seen == ["v1", "v3", "v1", "v3"]
    capsys.readouterr()
    assert mod.main([*common, "--style", "v1,v9"]) == 2
    assert "unknown rain style v9" in capsys.readouterr().err


def test_isa_matrix_imitates_a_vnni_cpu_and_an_avx2_one(tmp_path, monkeypatch, capsys):
    """The default row decides in a child capped with ONEDNN_MAX_CPU_ISA and the probes set to match:
    on a VNNI CPU without BF16 the shipped INT8 CPU graph on OpenVINO, on an AVX2 one onnxruntime FP32."""
    pytest.importorskip("openvino")
    assets = Path(__file__).resolve().parents[1] / "runtime" / "assets"
    if not (assets / "default.int8.cpu.onnx").is_file():
        pytest.skip("the INT8 CPU graph is not shipped in this checkout")
    mod = _load("isa_matrix", monkeypatch, tmp_path / "nowhere")
    assert mod.main(["--isa", "avx2,vnni"]) == 2
    assert "unknown --isa VNNI" in capsys.readouterr().err
    assert mod.main(["--rows", "default,fast"]) == 2
    assert "unknown --rows fast" in capsys.readouterr().err
    assert mod.main(["--size", "32x64", "--steps", "0", "--runs", "1", "--warmup", "0", "--threads", "1",
                     "--isa", "AVX512_CORE_VNNI,AVX2", "--rows", "default", "--quality", "0", "--json"]) == 0
    out = capsys.readouterr()
    assert "no dev sets" in out.err  # RD_DATA points nowhere: latency only
    rows = {(r["isa"], r["row"]): r for r in json.loads(out.out)["rows"]}
    assert set(rows) == {(isa, row) for isa in ("AVX512_CORE_VNNI", "AVX2")
                         for row in ("onnxruntime FP32", "default (Derainer())")}  # the baseline is always run
    vnni, avx2 = rows["AVX512_CORE_VNNI", "default (Derainer())"], rows["AVX2", "default (Derainer())"]
    assert (vnni["artifact"], vnni["backend"], vnni["arithmetic"]) == ("default.int8.cpu.onnx", "openvino", "f32")
    assert (avx2["artifact"], avx2["backend"], avx2["arithmetic"]) == ("default.onnx", "onnxruntime", "-")
    assert rows["AVX2", "onnxruntime FP32"]["x_onnxruntime_fp32"] == {"0": 1.0}


def test_isa_matrix_scores_the_dev_sets(tmp_path, monkeypatch, capsys, image_dirs):
    pytest.importorskip("openvino")
    data = _dev_set(tmp_path, image_dirs)
    shutil.copytree(data / "dev" / "sirr", data / "dev" / "jorder_h")
    mod = _load("isa_matrix", monkeypatch, data)
    assert mod.main(["--size", "32x64", "--steps", "0", "--runs", "1", "--warmup", "0", "--threads", "1",
                     "--isa", "AVX2", "--rows", "default", "--quality", "1", "--json"]) == 0
    base, row = json.loads(capsys.readouterr().out)["rows"]
    assert "quality" not in base and row["row"] == "default (Derainer())"  # the default row is scored
    q = row["quality"]
    assert q["steps"] == 0 and set(q) == {"steps", "sirr", "jorder_h"}
    assert 0 < q["sirr"]["psnr"] < 100 and 0 < q["sirr"]["ssim"] <= 1 and q["sirr"] == q["jorder_h"]
    assert mod.main(["--size", "32x64", "--steps", "0,x"]) == 2
    assert "--steps must be comma-separated integers" in capsys.readouterr().err
