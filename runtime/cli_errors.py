"""One error-to-exit-code policy for the three CLIs (rd-run, rd-export, rd-train).

Toolkit errors (``RDError``) print one line and exit with their code; Ctrl-C exits 130 and SIGTERM
143 (both raised as KeyboardInterrupt, so ``finally`` blocks and atomic writers clean up); any
other exception is a bug and still prints one line (exit 1) unless ``debug`` asks for the traceback.
No torch here: rd-run imports it.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Callable, Iterator
from typing import Any

import typer

from runtime import extras
from runtime.errors import RDError
from runtime.schedule import MIN_STEPS, steps_error

__all__ = ["Terminated", "error_exits", "check_steps"]


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C (same cleanup) but exiting 143."""


@contextlib.contextmanager
def error_exits(say: Callable[[str], None], *, debug: bool = False,
                report: Callable[[dict], None] | None = None) -> Iterator[None]:
    """Run the body; turn what it raises into ``say(one line)`` + ``typer.Exit(code)``.

    ``report`` (optional) also receives ``{"error", "error_type", "exit_code"}`` for --json output.
    """
    previous = None
    with contextlib.suppress(ValueError):  # signal handlers can only be set in the main thread

        def on_term(signum: int, frame: Any) -> None:
            raise Terminated

        previous = signal.signal(signal.SIGTERM, on_term)

    def fail(message: str, error: BaseException, code: int) -> typer.Exit:
        say(" ".join(message.split()))
        if report is not None:
            report({"error": str(error), "error_type": type(error).__name__, "exit_code": code})
        return typer.Exit(code)

    try:
        yield
    except typer.Exit:
        raise
    except KeyboardInterrupt as e:  # never a traceback, --debug or not
        code = 143 if isinstance(e, Terminated) else 130
        say("terminated" if code == 143 else "interrupted")
        raise typer.Exit(code) from None
    except RDError as e:
        if debug:
            raise
        raise fail(str(e), e, e.exit_code) from None
    except Exception as e:  # a bug: still one line unless --debug
        if debug:
            raise
        dep = extras.from_import_error(e) if isinstance(e, ImportError) else None
        if dep is not None:  # an optional dependency imported where it is used: name its extra (exit 6)
            raise fail(str(dep), dep, dep.exit_code) from None
        raise fail(f"unexpected {type(e).__name__}: {e} (rerun with --debug for the traceback)", e, 1) from None
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def check_steps(value: int | None) -> int | None:
    """Callback of every CLI's DDIM ``--steps``: at least MIN_STEPS, with the reason when it is 1.

    The upper bound (the model's T) is checked where the model is known.
    """
    if value is not None and value < MIN_STEPS:
        raise typer.BadParameter(steps_error(value))
    return value
