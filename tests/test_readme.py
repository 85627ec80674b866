"""The README's Quick start is the contract with a new user: its main job must run as written.

Extracts the ``rd-run derain ...`` invocation of the Quick start's first command and runs it
(with the installed console script) against the shipped default model, in a temp directory, and
checks that the output is a plausible derain of the photo. ``.ci/run`` runs both Quick start
commands as written (checked here); tests/test_packaging.py runs the first in a fresh venv.
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


def _pip_installs(command: str) -> list[list[str]]:
    """The arguments of each ``pip install`` in a ``&&`` chain, in order."""
    out = []
    for part in command.split("&&"):
        argv = shlex.split(part)
        if len(argv) >= 2 and Path(argv[0]).name == "pip" and argv[1] == "install":
            out.append([a for a in argv[2:] if not a.startswith("-") or a == "-e"])
    return out


def test_quick_start_has_exactly_two_commands():
    cmds = _quick_start_commands()
    assert len(cmds) == 2, cmds
    assert all("\n" not in c for c in cmds), "each Quick start command is one line"
    # 1: the runtime alone (the CPU engine extra), no torch, then the derain
    assert _pip_installs(cmds[0]) == [["-e", ".[cpu]"]], cmds[0]
    assert "torch" not in cmds[0] and "rd-run derain examples/rainy_street.jpg" in cmds[0]
    # 2: the CPU torch wheel before the extra that pulls torch, then the tests
    assert _pip_installs(cmds[1]) == [["torch==2.13.0"], ["-e", ".[dev]"]], cmds[1]
    assert cmds[1].split("&&")[-1].strip() == ".venv/bin/python -m pytest -q"


def test_ci_runs_the_readme_quick_start_commands():
    ci_lines = [line.strip() for line in (REPO / ".ci" / "run").read_text(encoding="utf-8").splitlines()]
    first, second = _quick_start_commands()
    assert first in ci_lines and second in ci_lines, "the README's Quick start lines must be in .ci/run as written"
    assert ci_lines.index(first) < ci_lines.index(second)
    assert not [line for line in ci_lines if "pytest" in line and line != second], "CI runs only the README's tests"


def check_plausible_derain(src: np.ndarray, out: np.ndarray) -> None:
    """Fail unless ``out`` is a derained ``src``: same shape, changed, and still the same scene.

    Changed: Y PSNR vs the input below 45 dB and the mean |difference| above one grey level (a
    copy of the input fails). The same scene: Y PSNR at least 18 dB and the Y correlation with
    the input at least 0.95 (noise, a blank or a shifted image fails). The shipped model scores
    26.1 dB and 0.997 on the Quick start photo.
    """
    from runtime.metrics import psnr_y, rgb_to_y

    assert out.shape == src.shape and out.dtype == np.uint8, (out.shape, out.dtype)
    p = psnr_y(out, src)
    mean_diff = float(np.abs(out.astype(np.int16) - src.astype(np.int16)).mean())
    assert p < 45.0 and mean_diff > 1.0, f"the output is (nearly) the input: {p:.1f} dB, mean |diff| {mean_diff:.2f}"
    ys, yo = rgb_to_y(src).ravel(), rgb_to_y(out).ravel()
    corr = float(np.corrcoef(ys, yo)[0, 1]) if yo.std() > 0 else 0.0
    assert p >= 18.0 and corr >= 0.95, f"the output is not the input's scene: {p:.1f} dB, correlation {corr:.3f}"


def test_the_plausibility_check_rejects_what_is_not_a_derain():
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:64, 0:96]
    src = np.stack([(xx * 2 + c * 40) % 256 for c in range(3)], axis=-1).astype(np.uint8)
    src[yy % 9 == 0] = 240  # some streaks
    with pytest.raises(AssertionError, match="nearly"):
        check_plausible_derain(src, src.copy())
    noise = np.clip(src + rng.normal(0, 80, src.shape), 0, 255).astype(np.uint8)
    with pytest.raises(AssertionError, match="scene"):
        check_plausible_derain(src, noise)
    with pytest.raises(AssertionError, match="scene"):
        check_plausible_derain(src, np.full_like(src, 128))
    with pytest.raises(AssertionError):
        check_plausible_derain(src, src[:, :-1])
    check_plausible_derain(src, np.clip(src.astype(np.int16) - 12, 0, 255).astype(np.uint8))  # darker: passes


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
    check_plausible_derain(src, out)
