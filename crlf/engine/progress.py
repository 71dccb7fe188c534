"""Progress of the library's long work (embedding, probe and fine-tuning epochs, kNN, t-SNE), torch-free.

The library calls ``report(what, done, total)`` (total 0 when unknown); the terminal layer (crlf.output) installs the
hook that draws it with ``reporting(hook)``. Without a hook the library logs a line now and then instead; it never
imports Rich or Typer.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

ProgressHook = Callable[[str, int, int], None]
hook: ProgressHook | None = None


def report(what: str, done: int, total: int) -> bool:
    """Tell the hook (if any) how far `what` is; False when no hook is set."""
    if hook is None:
        return False
    hook(what, done, total)
    return True


@contextlib.contextmanager
def reporting(to: ProgressHook) -> Iterator[ProgressHook]:
    """Send the library's progress to `to` while the block runs (the previous hook comes back after it)."""
    global hook
    previous, hook = hook, to
    try:
        yield to
    finally:
        hook = previous


@dataclass(frozen=True)
class StartInfo:
    """What a training run tells its Reporter before the first step (crlf.engine.loop.fit)."""

    epochs: int
    start_epoch: int  # epochs done before this start (a resume)
    steps: int  # per epoch
    batch_size: int = 0  # global
    start_step: int = 0  # steps done inside start_epoch (a resume of a run stopped mid-epoch)
    images: int = 0
    device: str = ""
