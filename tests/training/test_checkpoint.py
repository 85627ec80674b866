"""Checkpoint save / load: round trip, weights_only, and clear errors for bad files."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from runtime.errors import CheckpointError
from training.checkpoint import build_estimator, build_generators, load_checkpoint, save_checkpoint, strip_checkpoint
from training.multiscale import MultiScaleEstimator
from training.unet import UNet


class Payload:
    """Unpickling this would create a file: the sentinel of a code-execution attempt."""

    def __init__(self, sentinel: Path) -> None:
        self.sentinel = sentinel

    def __reduce__(self):
        return (Path.touch, (self.sentinel,))


def test_tiny_checkpoint_layout(tiny_checkpoint):
    ck = load_checkpoint(tiny_checkpoint)
    assert ck["format_version"] == 1 and isinstance(ck["toolkit_version"], str)
    assert set(ck["config"]) >= {"unet", "estimator", "ntb_unet", "diffusion", "train"}
    assert set(ck["state"]) == {"G_A", "G_B", "ema_A", "ema_B"}  # stripped: what gets shipped
    assert "optimizer" not in ck
    full = load_checkpoint(tiny_checkpoint.parent / "last.pt")
    assert set(full["state"]) == {"G_A", "G_B", "eps_A", "eps_B", "ema_A", "ema_B"}
    assert {"optimizer", "rng", "step"} <= set(full)
    assert full["step"] == 3


def test_plain_weights_only_load(tiny_checkpoint):
    for p in (tiny_checkpoint, tiny_checkpoint.parent / "last.pt"):
        ck = torch.load(p, map_location="cpu", weights_only=True)
        assert isinstance(ck["config"]["estimator"]["scales"], list)


def test_round_trip_rebuilds_identical_models(tiny_checkpoint, tmp_path):
    ck = load_checkpoint(tiny_checkpoint)
    est = build_estimator(ck, model="derain")
    assert isinstance(est, MultiScaleEstimator) and not est.training
    for k, v in est.state_dict().items():
        assert torch.equal(v, ck["state"]["ema_A"][k])
    rain = build_estimator(ck, model="rain")
    for k, v in rain.state_dict().items():
        assert torch.equal(v, ck["state"]["ema_B"][k])
    g_a, g_b = build_generators(ck)
    assert isinstance(g_a, UNet) and isinstance(g_b, UNet)
    # save -> load -> same numbers
    again = save_checkpoint(tmp_path / "copy.pt", strip_checkpoint(load_checkpoint(tiny_checkpoint.parent / "last.pt")))
    est2 = build_estimator(load_checkpoint(again))
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    t = torch.tensor([500.0])
    with torch.no_grad():
        torch.testing.assert_close(est(x, x, t), est2(x, x, t), rtol=0, atol=0)
    raw = build_estimator(load_checkpoint(tiny_checkpoint.parent / "last.pt"), ema=False)
    assert isinstance(raw, MultiScaleEstimator)


def test_stripped_checkpoint_has_no_raw_estimators(tiny_checkpoint):
    with pytest.raises(CheckpointError, match=r"state\.eps_A.*ema=True"):
        build_estimator(load_checkpoint(tiny_checkpoint), ema=False)


# The crafted legacy payload is a protocol-4 pickle, which torch.load warns about before refusing it.
@pytest.mark.filterwarnings("ignore:Detected pickle protocol 4:UserWarning")
@pytest.mark.parametrize("legacy", [False, True])
def test_pickle_payload_is_refused_without_side_effect(tmp_path, legacy):
    sentinel = tmp_path / "pwned"
    bad = tmp_path / "evil.pt"
    obj = {"format_version": 1, "config": {}, "state": Payload(sentinel)}
    if legacy:
        with open(bad, "wb") as f:
            pickle.dump(obj, f)
    else:
        torch.save(obj, bad)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(bad)
    assert not sentinel.exists()
    assert str(bad) in str(e.value) and "\n" not in str(e.value)


def test_truncated_file(tiny_checkpoint, tmp_path):
    data = tiny_checkpoint.read_bytes()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or not a torch checkpoint"):
        load_checkpoint(cut)


@pytest.mark.parametrize("content,match", [(b"", "empty"), (b"hello, not a checkpoint", "truncated or not")])
def test_not_a_checkpoint(tmp_path, content, match):
    p = tmp_path / "x.pt"
    p.write_bytes(content)
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(p)
    with pytest.raises(CheckpointError, match="no such"):
        load_checkpoint(tmp_path / "missing.pt")


def test_wrong_top_level_and_missing_keys(tiny_checkpoint, tmp_path):
    p = tmp_path / "list.pt"
    torch.save([1, 2, 3], p)
    with pytest.raises(CheckpointError, match="top level is list"):
        load_checkpoint(p)
    ck = torch.load(tiny_checkpoint, weights_only=True)
    del ck["state"]
    torch.save(ck, p)
    with pytest.raises(CheckpointError, match=r"missing key.*state"):
        load_checkpoint(p)
    ck = torch.load(tiny_checkpoint, weights_only=True)
    del ck["config"]["estimator"]
    torch.save(ck, p)
    with pytest.raises(CheckpointError, match=r"config\.estimator"):
        load_checkpoint(p)
    ck = torch.load(tiny_checkpoint, weights_only=True)
    del ck["state"]["ema_A"]
    torch.save(ck, p)
    with pytest.raises(CheckpointError, match=r"missing key state\.ema_A"):
        build_estimator(load_checkpoint(p))


def test_state_mismatch_names_keys(tiny_checkpoint, tmp_path):
    ck = torch.load(tiny_checkpoint, weights_only=True)
    sd = ck["state"]["ema_A"]
    key = "unet.stem.weight"
    sd[key] = torch.zeros(1, 2, 3, 3)
    del sd["unet.out_conv.bias"]
    sd["unet.extra"] = torch.zeros(1)
    p = tmp_path / "bad.pt"
    torch.save(ck, p)
    with pytest.raises(CheckpointError) as e:
        build_estimator(load_checkpoint(p))
    msg = str(e.value)
    assert "state.ema_A" in msg and key in msg and "(1, 2, 3, 3)" in msg
    assert "missing unet.out_conv.bias" in msg and "unexpected unet.extra" in msg
    ck = torch.load(tiny_checkpoint, weights_only=True)
    ck["format_version"] = 99
    torch.save(ck, p)
    with pytest.raises(CheckpointError, match="format_version 99"):
        load_checkpoint(p)


class _RecordingTensor(torch.Tensor):
    """Stands in for a device tensor: records that save_checkpoint asked for its CPU copy."""

    moved: list = []

    def cpu(self, *args, **kwargs):
        _RecordingTensor.moved.append(tuple(self.shape))
        return self.as_subclass(torch.Tensor)


def test_save_moves_every_tensor_to_the_cpu_and_keeps_the_structure(tmp_path):
    _RecordingTensor.moved = []
    w = torch.arange(6.0).reshape(2, 3)
    ckpt = {"config": {"a": 1, "name": "x"}, "step": 7,
            "state": {"net": {"w": w.as_subclass(_RecordingTensor), "b": torch.zeros(4).as_subclass(_RecordingTensor)}},
            "rng": [torch.ones(2, dtype=torch.uint8).as_subclass(_RecordingTensor), None],
            "pair": (1, torch.full((5,), 2.0).as_subclass(_RecordingTensor))}
    save_checkpoint(tmp_path / "c.pt", ckpt)
    assert sorted(_RecordingTensor.moved) == [(2,), (2, 3), (4,), (5,)]
    back = torch.load(tmp_path / "c.pt", weights_only=True)  # no map_location needed
    assert back["config"] == {"a": 1, "name": "x"} and back["step"] == 7 and back["rng"][1] is None
    assert type(back["state"]["net"]["w"]) is torch.Tensor and torch.equal(back["state"]["net"]["w"], w)
    assert isinstance(back["pair"], tuple) and back["pair"][0] == 1
    assert torch.equal(back["pair"][1], torch.full((5,), 2.0))
    assert back["rng"][0].dtype == torch.uint8


def test_save_keeps_state_dict_and_namedtuple_types(tmp_path):
    from collections import OrderedDict, namedtuple

    from training.checkpoint import _on_cpu

    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.GroupNorm(2, 4))
    sd = net.state_dict()
    save_checkpoint(tmp_path / "s.pt", {"config": {}, "state": {"net": sd}})
    back = torch.load(tmp_path / "s.pt", weights_only=True)["state"]["net"]
    assert type(back) is OrderedDict and list(back) == list(sd)
    assert back._metadata == sd._metadata  # the module versions load_state_dict reads
    net.load_state_dict(back)
    Pair = namedtuple("Pair", "a b")
    moved = _on_cpu({"p": Pair(1, torch.ones(2).as_subclass(_RecordingTensor))})["p"]
    assert type(moved) is Pair and moved.a == 1 and type(moved.b) is torch.Tensor


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_checkpoint_saved_from_cuda_loads_without_map_location(tmp_path):
    net = torch.nn.Linear(3, 2).cuda()
    save_checkpoint(tmp_path / "g.pt", {"config": {}, "state": {"net": net.state_dict()}})
    back = torch.load(tmp_path / "g.pt", weights_only=True)
    assert all(t.device.type == "cpu" for t in back["state"]["net"].values())
