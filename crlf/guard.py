"""The one top-level handler: every subcommand's work runs inside `guarded`, which turns known failures into one line
on stderr and their exit code (CRLF_DEBUG=1 shows tracebacks), Ctrl-C into 130 and SIGTERM into 143."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

import typer

from crlf import output
from crlf.errors import CrlfError


class _Terminated(BaseException):
    """SIGTERM arrived: unwinds the work like Ctrl-C's KeyboardInterrupt (past `except Exception`, through the
    clean-ups of atomic writes and run directories)."""


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """While the block runs, SIGTERM raises _Terminated in the main thread instead of killing the process outright
    (pretrain's loop installs its own handler, which saves a checkpoint first). Any exception that ends the block
    after the signal becomes _Terminated: C code can turn the handler's exception into its own (numpy's writer into
    'seeking file failed'). A second SIGTERM, or one that reaches a forked worker that inherited the handler, ends
    the process as before."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pid, received = os.getpid(), []

    def handle(signum: int, frame: Any) -> None:
        signal.signal(signal.SIGTERM, previous)
        if os.getpid() != pid:
            os.kill(os.getpid(), signal.SIGTERM)
            return
        received.append(signum)
        raise _Terminated

    previous = signal.getsignal(signal.SIGTERM)
    previous = signal.SIG_DFL if previous is None else previous  # None: a handler not set from Python
    signal.signal(signal.SIGTERM, handle)
    try:
        yield
    except Exception:
        if received:
            raise _Terminated from None
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)


def guarded(quiet: bool, verbose: bool, work: Callable[[], int | None]) -> None:
    """Run `work`, turning known failures into one line and their exit code (CRLF_DEBUG=1 shows tracebacks); SIGINT
    exits 130 and SIGTERM 143."""
    output.setup_logging(quiet=quiet, verbose=verbose)
    debug = os.environ.get("CRLF_DEBUG", "") not in ("", "0")
    try:
        with _sigterm_raises():
            code = work()
    except _Terminated:
        output.error("stopped by SIGTERM")
        raise typer.Exit(128 + signal.SIGTERM) from None
    except CrlfError as e:
        if debug:
            raise
        output.error(str(e))
        raise typer.Exit(e.exit_code) from None
    except KeyboardInterrupt:
        output.error("interrupted")
        raise typer.Exit(130) from None
    except Exception as e:  # noqa: BLE001 - the last line of defence: one line, not a traceback
        if debug:
            raise
        if type(e).__name__ == "OutOfMemoryError":
            output.error("out of memory on the device; try a smaller --batch-size")
        else:
            output.error(
                f"unexpected {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} "
                "(set CRLF_DEBUG=1 for the traceback)"
            )
        raise typer.Exit(1) from None
    if code:
        raise typer.Exit(code)


