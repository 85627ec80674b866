"""benchmarks/gpu_checks.py: the one-call GPU check script (its GPU part runs only on a lent GPU)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_checks  # noqa: E402


def test_without_a_gpu_it_says_so_and_exits_2(tmp_path, monkeypatch, capsys):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the script would run the checks")
    assert gpu_checks.main(["--out", str(tmp_path)]) == 2
    out = capsys.readouterr().out
    assert "== environment" in out and "no CUDA GPU visible to PyTorch" in out
    assert json.loads((tmp_path / "gpu_checks.json").read_text())["environment"]["cuda_available"] is False


def test_junit_summary_keeps_outcomes_messages_and_recorded_numbers(tmp_path):
    xml = tmp_path / "r.xml"
    xml.write_text("""<?xml version="1.0"?><testsuites><testsuite name="pytest">
      <testcase classname="tests.gpu.test_cuda_gpu" name="test_a" time="1.5">
        <properties><property name="frame_ms_graph" value="0.42"/></properties></testcase>
      <testcase classname="tests.gpu.test_cuda_gpu" name="test_b" time="0.1">
        <failure message="AssertionError: 3 != 5">long traceback</failure></testcase>
      <testcase classname="tests.gpu.test_cuda_gpu" name="test_c" time="0"><skipped message="no GPU"/></testcase>
    </testsuite></testsuites>""")
    rows = gpu_checks.parse_junit(xml)
    assert [(r["test"], r["outcome"]) for r in rows] == [
        ("test_cuda_gpu::test_a", "passed"), ("test_cuda_gpu::test_b", "FAILED"), ("test_cuda_gpu::test_c", "skipped")]
    assert rows[0]["properties"] == {"frame_ms_graph": "0.42"} and rows[0]["seconds"] == 1.5
    assert rows[1]["detail"] == "AssertionError: 3 != 5" and rows[2]["detail"] == "no GPU"
    assert gpu_checks.parse_junit(tmp_path / "missing.xml") == []
