"""Stopping a training run cleanly: SIGINT / SIGTERM set a flag that the loop reads at step boundaries."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

log = logging.getLogger("crlf.engine.train")


class StopFlag:
    """SIGINT / SIGTERM ask the loop to stop at the next step boundary and save; a second SIGINT aborts at once.

    Python runs signal handlers only between bytecodes, so inside a long native op (a CPU backward pass can take
    seconds) two Ctrl-Cs arrive as one handler call. With `hard_abort` (the CLI), a watcher thread reads every
    signal from a wakeup pipe the moment it arrives and ends the process on the second SIGINT; files on disk are
    safe (atomic writes) and the next start removes any temp file left behind.
    """

    def __init__(self, hard_abort: bool = False) -> None:
        self.signum = 0
        self.hard_abort = hard_abort

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        log.warning(
            "%s received: finishing this step and saving a resumable checkpoint (Ctrl-C again aborts at once)",
            signal.Signals(signum).name,
        )

    @staticmethod
    def _watch(fd: int) -> None:
        interrupts = 0
        while data := os.read(fd, 64):  # b"" once the write end is closed
            interrupts += data.count(signal.SIGINT)
            if interrupts >= 2:
                _hold_log_handlers()
                for hold in list(_DISPLAYS):
                    hold()
                # fd 2 itself: a live display's stderr proxy would print the line above its bars and draw them again
                # below it (the bars ended the screen, not the error)
                _say(b"error: interrupted: a second Ctrl-C aborted the run; --resume continues from the last "
                     b"checkpoint\n")
                if os.isatty(2):  # a live progress bar hid the cursor; os._exit skips its cleanup
                    _say(b"\x1b[?25h")
                os._exit(130)

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        """Handle the signals for the duration of the loop (only possible in the main thread)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        watcher, old_fd = None, None
        if self.hard_abort:
            read_end, write_end = os.pipe()
            os.set_blocking(write_end, False)  # the C-level handler must never block
            old_fd = signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
            watcher = threading.Thread(target=self._watch, args=(read_end,), name="crlf-signals", daemon=True)
            watcher.start()
        old = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in old.items():
                signal.signal(sig, handler)
            if watcher is not None:
                signal.set_wakeup_fd(old_fd)  # type: ignore[arg-type]
                os.close(write_end)
                watcher.join()
                os.close(read_end)


# what draws on the terminal besides logging (the CLI's live progress bars): each function, called by the watcher
# before a hard abort, stops its display from drawing again and leaves the cursor on a line of its own
_DISPLAYS: set[Callable[[], None]] = set()


def hold_on_abort(hold: Callable[[], None]) -> Callable[[], None]:
    """Register `hold` (see _DISPLAYS) for as long as a display is on screen; returns the function that unregisters
    it."""
    _DISPLAYS.add(hold)
    return lambda: _DISPLAYS.discard(hold)


def _say(data: bytes) -> None:
    """Write to fd 2 past any Python-level stderr wrapper."""
    while data:
        data = data[os.write(2, data):]


def _hold_log_handlers() -> None:
    """Take every log handler's lock and keep it (the process ends next), so the abort message is the last line.

    The main thread may be logging the first SIGINT's warning right now (its handler runs once a native op ends);
    that line finishes first, and nothing after it is written."""
    for logger in (logging.getLogger("crlf"), logging.getLogger()):
        for handler in logger.handlers:
            if handler.lock is not None:
                handler.lock.acquire(timeout=2.0)  # bounded: a wedged handler must not keep the process alive
