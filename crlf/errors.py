"""The exceptions crlf raises on purpose; each carries the exit code the CLI returns for it."""

from __future__ import annotations

import difflib
import re
from typing import Any
from urllib.error import URLError

# what would break a message over lines or reach the terminal as a control code: C0 / C1 controls, DEL and the
# Unicode line / paragraph separators
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


class CrlfError(Exception):
    """A failure with a one-line message meant for the user (no traceback is shown)."""

    exit_code = 1


class InputError(CrlfError):
    """Bad usage or invalid input: a setting, a data set, a checkpoint, a path (exit 2)."""

    exit_code = 2


class RunError(CrlfError):
    """Failure during work: diverged loss, out of memory, I/O (exit 1)."""

    exit_code = 1


class LockedError(CrlfError):
    """Another process holds the run directory's lock (exit 75, EX_TEMPFAIL)."""

    exit_code = 75


class Interrupted(CrlfError):
    """Stopped by a signal after saving a resumable checkpoint (exit 128 + signal: 130 for SIGINT, 143 for SIGTERM)."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.exit_code = 128 + signum


def did_you_mean(name: str, choices: Any, shown: str = "'{}'") -> str:
    """' (did you mean X?)' for the choice closest to `name` ('-' and '_' alike), or '' when none is close."""
    norm = {c.replace("-", "_").lower(): c for c in choices}
    close = difflib.get_close_matches(name.replace("-", "_").lower(), list(norm), n=1, cutoff=0.7)
    return f" (did you mean {shown.format(norm[close[0]])}?)" if close else ""


def one_line(text: str) -> str:
    """`text` with its control characters written as Python escapes (a newline as \\n), so that a message echoing a
    user's value stays one line and sends no control code to the terminal."""
    return _CONTROL.sub(lambda m: repr(m.group())[1:-1], text)


def quoted(path: Any) -> str:
    """A path (or any value) for a message: in quotes, one line ('./data', 'a\\nb'), so it reads as a name."""
    return repr(str(path))


def short_reason(e: BaseException, limit: int = 120) -> str:
    """The first line of an exception's text (a URLError: its reason) as one line of at most `limit` characters, cut
    between words ('...' marks the cut), for 'cannot read X (reason)'."""
    text = (str(e.reason) if isinstance(e, URLError) else str(e)).strip()
    text = one_line(text.splitlines()[0] if text else type(e).__name__)
    if len(text) <= limit:
        return text
    head = text[: limit - 3]
    return (head.rsplit(" ", 1)[0] if " " in head else head).rstrip(" ,;:") + "..."
