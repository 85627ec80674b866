"""One error-to-exit-code policy for the three CLIs (rd-run, rd-export, rd-train).

Toolkit errors (``RDError``) print one line and exit with their code; Ctrl-C exits 130 and SIGTERM
143 (both raised as KeyboardInterrupt, so ``finally`` blocks and atomic writers clean up); any
other exception is a bug and still prints one line (exit 1) unless ``debug`` asks for the traceback.
No torch here: rd-run imports it.
"""

from __future__ import annotations

import contextlib
import re
import signal
import sys
from collections.abc import Callable, Iterator
from typing import Any

import typer
from typer.core import TyperGroup

try:  # typer >= 0.26 ships its own copy of click
    from typer._click.exceptions import ClickException, NoArgsIsHelpError
    from typer._click.exceptions import UsageError as ClickUsageError
except ImportError:  # pragma: no cover - older typer on click itself
    from click.exceptions import ClickException
    from click.exceptions import UsageError as ClickUsageError

    try:
        from click.exceptions import NoArgsIsHelpError
    except ImportError:
        class NoArgsIsHelpError(ClickUsageError):  # type: ignore[no-redef]
            """Absent from click < 8.2 (it printed the help itself)."""

from runtime import extras
from runtime.errors import RDError, UsageError
from runtime.io import interrupt
from runtime.schedule import MIN_STEPS, steps_error

__all__ = ["Terminated", "error_exits", "check_steps", "one_line_group", "HELP_OPTIONS", "STEPS_RANGE",
           "parse_hw"]

#: ``-h`` and ``--help`` on every command of every CLI (typer's default is ``--help`` only).
HELP_OPTIONS = {"help_option_names": ["-h", "--help"]}

#: How every ``--steps`` help states the range: the lower bound is checked here, the upper one
#: (the model's T, 1000 for every preset) where the model is known.
STEPS_RANGE = (f"{MIN_STEPS}..1000 (at most the model's T, 1000), or 0 for a predict-and-refine model "
               f"(its predictor alone)")


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C (same cleanup) but exiting 143."""


@contextlib.contextmanager
def error_exits(say: Callable[[str], None], *, debug: bool = False,
                report: Callable[[dict], None] | None = None) -> Iterator[None]:
    """Run the body; turn what it raises into ``say(one line)`` + ``typer.Exit(code)``.

    ``report`` (optional) also receives ``{"error", "error_type", "exit_code"}`` for --json output.
    """
    previous = previous_int = None
    with contextlib.suppress(ValueError):  # signal handlers can only be set in the main thread

        def on_term(signum: int, frame: Any) -> None:
            interrupt(Terminated())  # at once, or after the bookkeeping under way (runtime.io.signals_deferred)

        def on_int(signum: int, frame: Any) -> None:
            interrupt(KeyboardInterrupt())

        previous = signal.signal(signal.SIGTERM, on_term)
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # an ignored Ctrl-C stays ignored
            previous_int = signal.signal(signal.SIGINT, on_int)

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
        if previous_int is not None:
            signal.signal(signal.SIGINT, previous_int)


def check_steps(value: int | None) -> int | None:
    """Callback of every CLI's DDIM ``--steps``: 0 or at least MIN_STEPS, with the reason when it is 1.

    0 is the predictor alone, which only a predict-and-refine model has: the model's own check
    (``Derainer``, the exporter) refuses it for the others, as it checks the upper bound (its T).
    """
    if value is not None and value != 0 and value < MIN_STEPS:
        raise typer.BadParameter(steps_error(value))
    return value


def _check_sampling_setting(name: str, value: float | None) -> float | None:
    """A sampling setting's option value, checked as :data:`runtime.manifest.SAMPLING_SETTINGS` checks it."""
    from runtime.manifest import SAMPLING_SETTINGS

    if value is not None and (why := SAMPLING_SETTINGS[name][1](value)):
        raise typer.BadParameter(why)
    return value


def check_refine_strength(value: float | None) -> float | None:
    """Callback of ``--refine-strength`` (rd-run, rd-export build): a number in (0, 2]."""
    return _check_sampling_setting("refine_strength", value)


def check_noise_scale(value: float | None) -> float | None:
    """Callback of ``--noise-scale`` (rd-run, rd-export build): a number in [0, 1]."""
    return _check_sampling_setting("noise_scale", value)


def check_refine_lowpass(value: float | None) -> float | None:
    """Callback of ``--refine-lowpass`` (rd-run, rd-export build): a sigma in [0, 64] pixels."""
    return _check_sampling_setting("refine_lowpass", value)


def one_line_group(prefix: str) -> type[TyperGroup]:
    """A typer group class whose command-line errors (unknown option, bad value, missing argument)
    are one line on stderr, ``<prefix>error: <message> (see '<command> --help')``, exit 2.

    click prints the usage, a hint and the message on three lines, and typer with rich draws them
    in a box; the README promises one line per error for every CLI.
    """

    class OneLineErrorGroup(TyperGroup):
        def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
            try:
                rv = super().main(args=args, prog_name=prog_name, complete_var=complete_var,
                                  standalone_mode=False, **extra)
            except NoArgsIsHelpError as e:  # a bare command: its help, as click shows it
                if not standalone_mode:
                    raise
                e.show()
                sys.exit(e.exit_code)
            except ClickException as e:
                if not standalone_mode:
                    raise
                hint = ""
                ctx = getattr(e, "ctx", None)
                if isinstance(e, ClickUsageError) and ctx is not None:
                    hint = f" (see '{ctx.command_path} --help')"
                typer.echo(f"{prefix}error: {' '.join(e.format_message().split())}{hint}", err=True)
                sys.exit(e.exit_code)
            except typer.Abort:
                if not standalone_mode:
                    raise
                typer.echo(f"{prefix}error: aborted", err=True)
                sys.exit(1)
            if not standalone_mode:
                return rv
            sys.exit(rv if isinstance(rv, int) else 0)

    return OneLineErrorGroup


_HW = re.compile(r"\s*(\d+)\s*(?:[xX*]\s*(\d+))?\s*")
_LABELLED = re.compile(r"\s*(?:(?:w(?:idth)?\s*=?\s*\d+|h(?:eight)?\s*=?\s*\d+)\s*[,x* ]?\s*)+", re.IGNORECASE)


def parse_hw(text: str, option: str, *, limit: int = 16384) -> tuple[int, int]:
    """A frame size as every CLI writes it: ``HEIGHTxWIDTH`` (rows first, like numpy shapes, TensorRT
    profiles and the manifest), or one number for a square; returns ``(height, width)``.

    Sizes written the other way round cannot be told apart from the text, so the message of every
    refusal names the order, and a size labelled with w/h (``w640,h480``) is refused with the
    HxW spelling of the same size.
    """
    m = _HW.fullmatch(str(text))
    if m is None:
        if _LABELLED.fullmatch(str(text)):
            sides = dict(re.findall(r"([wh])\D*?(\d+)", str(text).lower()))
            if set(sides) == {"w", "h"}:
                raise UsageError(f"{option} {text!r}: sizes are HxW (height x width): write {sides['h']}x{sides['w']}")
        raise UsageError(f"{option} {text!r} is not HxW (height x width, e.g. 1080x1920 for a 1080p frame) or "
                         f"a single number for a square")
    h = int(m.group(1))
    w = int(m.group(2)) if m.group(2) else h
    if not (1 <= h <= limit and 1 <= w <= limit):
        raise UsageError(f"{option} {text!r}: height and width must be within 1..{limit}")
    return h, w
