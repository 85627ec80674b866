"""The README's Quick start is the contract with a new user: its main job must run as written.

Extracts the ``rd-run derain ...`` invocation of the Quick start's first command and runs it
(with the installed console script) against the shipped default model, in a temp directory.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


def _quick_start_commands() -> list[str]:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.+?)\n```", section, flags=re.S)


def test_quick_start_has_exactly_two_commands():
    cmds = _quick_start_commands()
    assert len(cmds) == 2, cmds
    assert all("\n" not in c for c in cmds), "each Quick start command is one line"
    assert "torch==2.13.0" in cmds[0] and "rd-run derain" in cmds[0]
    assert "pytest" in cmds[1]


def test_ci_runs_the_readme_test_command():
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    test_cmd = _quick_start_commands()[1].split("&&")[-1].strip()
    assert test_cmd in ci


def test_quick_start_main_job_runs(tmp_path):
    from runtime.derainer import default_artifact
    from runtime.errors import ArtifactError

    try:
        default_artifact()
    except ArtifactError as e:
        pytest.skip(f"no shipped default model: {e}")
    rd_run = shutil.which("rd-run", path=str(Path(sys.executable).parent))
    if rd_run is None:
        pytest.skip("the rd-run console script is not installed (pip install -e .)")
    main_job = _quick_start_commands()[0].split("&&")[-1].strip()
    argv = shlex.split(main_job)
    assert Path(argv[0]).name == "rd-run" and argv[1] == "derain"
    # Run it as written, from a scratch copy of the example so the repo stays clean.
    (tmp_path / "examples").mkdir()
    for a in argv[2:]:
        if a.startswith("examples/"):
            shutil.copy(REPO / a, tmp_path / a)
    proc = subprocess.run([rd_run, *argv[1:]], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    from runtime.io import load_rgb

    src = load_rgb(REPO / "examples" / "rainy_street.jpg")
    out = load_rgb(tmp_path / "out" / "rainy_street.jpg")
    assert out.shape == src.shape
    assert np.isfinite(out.astype(np.float64)).all()
