"""The one error policy of rd-run, rd-export and rd-train (runtime.cli_errors)."""

from __future__ import annotations

import pytest
import typer

from runtime.cli_errors import Terminated, error_exits
from runtime.errors import ArtifactError, InputError


@pytest.mark.parametrize(("exc", "code", "line"), [
    (InputError("a.png: not an image"), InputError.exit_code, "a.png: not an image"),
    (ArtifactError("bad\nplan"), ArtifactError.exit_code, "bad plan"),
    (KeyboardInterrupt(), 130, "interrupted"),
    (Terminated(), 143, "terminated"),
    (ZeroDivisionError("division by zero"), 1, "unexpected ZeroDivisionError: division by zero"),
])
def test_one_line_and_exit_code(exc, code, line):
    said, reported = [], []
    with pytest.raises(typer.Exit) as e, error_exits(said.append, report=reported.append):
        raise exc
    assert e.value.exit_code == code
    assert len(said) == 1 and said[0].startswith(line) and "\n" not in said[0]
    if code not in (130, 143):
        assert reported == [{"error": str(exc), "error_type": type(exc).__name__, "exit_code": code}]


def test_debug_reraises_errors_but_not_interrupts():
    with pytest.raises(InputError), error_exits(lambda s: None, debug=True):
        raise InputError("x")
    with pytest.raises(typer.Exit), error_exits(lambda s: None, debug=True):
        raise KeyboardInterrupt


@pytest.mark.parametrize(("module", "wrapper"), [("runtime.cli", "_guard"), ("rd_export.cli", "_run"),
                                               ("training.cli", "_run")])
def test_every_cli_uses_it(module, wrapper):
    import importlib
    import inspect

    src = inspect.getsource(getattr(importlib.import_module(module), wrapper))
    assert "error_exits(" in src and "except" not in src
