"""The terminal: one stderr console for logs and progress, results alone on stdout.

On a terminal: Rich progress bar and coloured log lines. Otherwise (cron, pipes, CI): plain timestamped
lines without ANSI codes, one per epoch plus one every `log_every` seconds, that read well in a log file.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    SpinnerColumn,
    Task,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from crlf.engine import progress, signals
from crlf.errors import one_line

console = Console(stderr=True, highlight=False)
log = logging.getLogger("crlf.cli")


class _ConsoleHandler(logging.Handler):
    """Log records to the shared stderr console (so they print above a live progress bar)."""

    def emit(self, record: logging.LogRecord) -> None:
        msg = one_line(record.getMessage())  # a value with a newline in it must not start a line of its own
        prefix = {logging.WARNING: "warning: ", logging.ERROR: "error: "}.get(record.levelno, "")
        if console.is_terminal:
            style = {logging.WARNING: "yellow", logging.ERROR: "red"}.get(record.levelno)
            console.print(f"{prefix}{msg}", style=style, markup=False, soft_wrap=True)
        else:
            _stamped(f"{prefix}{msg}")


def setup_logging(quiet: bool = False, verbose: bool = False) -> None:
    """Route the engine's `crlf.*` loggers to stderr: warnings only with --quiet, debug with --verbose."""
    logger = logging.getLogger("crlf")
    for h in [h for h in logger.handlers if isinstance(h, _ConsoleHandler)]:
        logger.removeHandler(h)
    handler = _ConsoleHandler()
    handler.setLevel(logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO)
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False


def error(message: str) -> None:
    """One line on stderr (control characters in echoed values escaped); the caller chooses the exit code."""
    console.file.write(f"error: {one_line(message)}\n")
    console.file.flush()


def emit_json(result: Any) -> None:
    """A result on stdout as one JSON document (the only thing crlf ever writes to stdout besides data)."""
    sys.stdout.write(json.dumps(result, indent=2, default=str) + "\n")
    sys.stdout.flush()


def _clock(seconds: float) -> str:
    """h:mm:ss, as Rich prints elapsed time."""
    minutes, s = divmod(int(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{s:02d}"


class _Countdown(ProgressColumn):
    """Time left from the reporter's own estimate (the run's rate, so it works after one or two steps), counted
    down by Rich's refresh thread between updates: the clock keeps moving during a long step."""

    def render(self, task: Task) -> Text:
        at = task.fields.get("eta_at")
        left = "-:--:--" if at is None else _clock(max(0.0, at - time.monotonic()))
        return Text(f"eta {left}", style="progress.remaining")


class TrainingReporter:
    """The engine's Reporter: progress bars on a terminal (not with --json), a plain line every `log_every` seconds
    elsewhere, nothing with --quiet.

    On a terminal: one bar for the epochs of the run (with the time left) and one for the steps of this epoch (with
    the running loss, learning rate and images/s). The loss is a device tensor the loop sums without reading it;
    the reporter reads it at most once every `live_every` seconds (one host sync), and only when it shows it.
    """

    def __init__(self, quiet: bool = False, bar: bool = True, log_every: float = 30.0, live_every: float = 1.0):
        self.quiet = quiet
        self.bar = bar
        self.log_every = log_every
        self.live_every = live_every
        self.progress: Progress | None = None
        self.run_task: TaskID | None = None
        self.task: TaskID | None = None  # the steps of this epoch
        self.epochs = self.steps = self.batch = 0
        self.remaining = 0  # steps left in the run
        self.done = 0  # steps run by this process
        self.started_at = time.monotonic()
        self.first_step_at: float | None = None
        self.window = (time.monotonic(), 0)  # (time, steps done) at the last reading: images/s since then
        self.last_read = float("-inf")
        self.stats = ""
        self.eta_at: float | None = None
        self.per_step: float | None = None
        self.last_line = time.monotonic()
        self.log = logging.getLogger("crlf.progress")

    def on_start(self, info: progress.StartInfo) -> None:
        self.epochs, self.steps, self.batch = info.epochs, info.steps, info.batch_size
        start_epoch, start_step = info.start_epoch, info.start_step
        self.remaining = (self.epochs - start_epoch) * self.steps - start_step
        self.started_at = time.monotonic()
        self.window = (self.started_at, 0)
        if self.quiet or not self.bar or not console.is_terminal:
            return
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(bar_width=30),
            MofNCompleteColumn(),
            TextColumn("{task.fields[unit]}"),
            TimeElapsedColumn(),
            _Countdown(),
            TextColumn("{task.fields[stats]}"),
            console=console,
            transient=True,
            refresh_per_second=4,  # the refresh thread: elapsed and eta move also during a long step
        )
        self.run_task = self.progress.add_task("run", total=self.epochs, completed=start_epoch, unit="epochs", stats="")
        self.task = self.progress.add_task(
            f"epoch {start_epoch + 1}/{self.epochs}", total=self.steps, completed=start_step, unit="steps", stats=""
        )
        self.progress.start()
        self._unhold = signals.hold_on_abort(_holder(self.progress))

    def on_step(self, epoch: int, step: int, steps: int, loss_sum: Any = None, lr: float | None = None) -> None:
        """`step` of `steps` in `epoch` (0-based) is done; loss_sum: the epoch's summed loss so far (a tensor, read
        here now and then); lr: the learning rate of the step."""
        now = time.monotonic()
        self.done += 1
        self.remaining -= 1
        if self.first_step_at is None:
            self.first_step_at = now
        # seconds per step since the first step (which carries the start-up costs); after one step, that step's
        per_step = (now - self.first_step_at) / (self.done - 1) if self.done > 1 else now - self.started_at
        self.per_step = per_step
        self.eta_at = now + per_step * max(self.remaining, 0)
        plain_due = self.progress is None and not self.quiet and now - self.last_line >= self.log_every
        if (self.progress is not None and now - self.last_read >= self.live_every) or plain_due:
            self._read(now, step, loss_sum, lr)
        if self.progress is not None:
            assert self.task is not None and self.run_task is not None
            self.progress.update(self.run_task, eta_at=self.eta_at)
            self.progress.update(
                self.task,
                completed=step,
                description=f"epoch {epoch + 1}/{self.epochs}",
                eta_at=now + per_step * (steps - step),
                stats=self.stats,
            )
        elif plain_due:
            self.last_line = now
            left = "" if self.eta_at is None else f"  eta {_clock(self.eta_at - now)}"
            self.log.info("epoch %d/%d  step %d/%d%s%s", epoch + 1, self.epochs, step, steps, self.stats, left)

    def _read(self, now: float, step: int, loss_sum: Any, lr: float | None) -> None:
        """Running loss (the one host sync), lr, recent images/s and the run's time left."""
        self.last_read = now
        parts = []
        if loss_sum is not None and step:
            parts.append(f"loss {float(loss_sum) / step:.4f}")
        if lr is not None:
            parts.append(f"lr {lr:.3g}")
        t, done = self.window
        if self.batch and self.done > done and now > t:
            parts.append(f"{(self.done - done) * self.batch / (now - t):,.0f} img/s")
        self.window = (now, self.done)
        self.stats = "  " + "  ".join(parts) if parts else ""

    def on_epoch(self, metrics: dict[str, Any]) -> None:
        self.last_line = time.monotonic()  # the engine has just logged the epoch's line
        if self.progress is not None:
            assert self.task is not None and self.run_task is not None
            epoch = metrics["epoch"]
            self.progress.update(self.run_task, completed=epoch)
            if epoch < self.epochs:
                self.progress.reset(  # reset replaces the fields: all of them
                    self.task,
                    total=self.steps,
                    description=f"epoch {epoch + 1}/{self.epochs}",
                    unit="steps",
                    stats=self.stats,
                    eta_at=None if self.per_step is None else time.monotonic() + self.per_step * self.steps,
                )

    def close(self) -> None:
        if self.progress is not None:
            self._unhold()
            self.progress.stop()
            self.progress = None


def _holder(progress: Progress) -> Callable[[], None]:
    """What a hard abort does to a live progress display: take its lock for good (its refresh thread draws no more;
    the process ends next) and end the line the bars stand on, so that the abort line is the screen's last."""

    def hold() -> None:
        if progress.live._lock.acquire(timeout=2.0):  # bounded: a wedged display must not keep the process alive
            os.write(2, b"\n")

    return hold


class TaskProgress:
    """The engine's progress hook (crlf.engine.progress, called as hook(what, done, total); total 0: unknown):
    a transient bar per running task on a terminal (not with --json), a plain line every `log_every` seconds
    elsewhere, nothing with --quiet."""

    def __init__(self, quiet: bool = False, bar: bool = True, log_every: float = 30.0):
        self.quiet = quiet
        self.live = bar and console.is_terminal
        self.log_every = log_every
        self.progress: Progress | None = None
        self.tasks: dict[str, TaskID] = {}
        self.started: dict[str, tuple[float, float]] = {}  # what -> (start, last line)
        self.log = logging.getLogger("crlf.progress")

    def __call__(self, what: str, done: int, total: int) -> None:
        if self.quiet:
            return
        finished = total > 0 and done >= total
        if self.live:
            self._draw(what, done, total, finished)
            return
        now = time.monotonic()
        start, last = self.started.setdefault(what, (now, now))
        if finished:
            self.started.pop(what)
        elif now - last >= self.log_every:
            self.started[what] = (start, now)
            if total:
                left = (now - start) / done * (total - done) if done else None
                eta = "" if left is None else f", eta {_clock(left)}"
                self.log.info("%s: %s of %s%s", what, f"{done:,}", f"{total:,}", eta)
            else:
                self.log.info("%s: running for %s", what, _clock(now - start))

    def _draw(self, what: str, done: int, total: int, finished: bool) -> None:
        if self.progress is None:
            self.progress = Progress(
                SpinnerColumn(),
                TextColumn("{task.description}"),
                BarColumn(bar_width=30),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=console,
                transient=True,
            )
            self.progress.start()
        task = self.tasks.get(what)
        if task is None:
            task = self.tasks[what] = self.progress.add_task(what, total=total or None, completed=done)
        else:
            self.progress.update(task, total=total or None, completed=done)
        if finished:
            self.progress.remove_task(self.tasks.pop(what))
            if not self.tasks:
                self.close()

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
        self.tasks.clear()


@contextlib.contextmanager
def engine_progress(quiet: bool = False, bar: bool = True, log_every: float = 30.0) -> Iterator[TaskProgress]:
    """Show the engine's progress (embedding, probes, fine-tuning, kNN, t-SNE) while the block runs."""
    hook = TaskProgress(quiet=quiet, bar=bar, log_every=log_every)
    try:
        with progress.reporting(hook):
            yield hook
    finally:
        hook.close()


def _stamped(message: str) -> None:
    """One plain timestamped line on stderr (a log file's format: no ANSI codes, no boxes)."""
    console.file.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {message}\n")
    console.file.flush()


def results_table(result: dict[str, Any]) -> None:
    """An evaluation result for a person: accuracy per label fraction (mean +- std over seeds), then per class.

    A table on a terminal; plain timestamped lines otherwise. kNN shows its k and temperature."""
    knn = result["protocol"] == "knn"
    first = (result.get("runs") or [{}])[0]
    params = f", k {first['k']}, temperature {first['temperature']:g}" if knn and "k" in first else ""
    title = (
        f"{result['protocol']} evaluation{params}: {result['train_size']:,} train / {result['test_size']:,} test, "
        f"{result['dim']} dims"
    )

    def cell(row: dict[str, Any], metric: str) -> str:
        spread = row["runs"] > 1  # a std over one run says nothing
        return f"{row[metric + '_mean']:.2f}" + (f" ± {row[metric + '_std']:.2f}" if spread else "")

    per_class = result.get("per_class")
    names = [str(n) for n in result.get("class_names") or range(len(per_class or []))]
    if not console.is_terminal:
        _stamped(title)
        for row in result["summary"]:
            what = f"k {first.get('k')}" if knn else f"label fraction {row['fraction']:g}"
            runs = f" ({row['runs']} runs)" if row["runs"] > 1 else ""
            _stamped(f"{what}: top-1 {cell(row, 'top1')}%  top-5 {cell(row, 'top5')}%{runs}")
        if per_class:
            shown = ", ".join(f"{n} {'-' if a is None else f'{a:.1f}'}" for n, a in zip(names, per_class))
            _stamped(f"per-class top-1 %: {shown}")
        return
    table = Table(title=title)
    columns = ("k", "temperature", "top-1 %", "top-5 %") if knn else ("label fraction", "runs", "top-1 %", "top-5 %")
    for column in columns:
        table.add_column(column, justify="right")
    for row in result["summary"]:
        head = (
            (str(first.get("k")), f"{first.get('temperature', 0):g}")
            if knn
            else (f"{row['fraction']:g}", str(row["runs"]))
        )
        table.add_row(*head, cell(row, "top1"), cell(row, "top5"))
    console.print(table)
    if per_class and len(per_class) <= 20:
        classes = Table(title="per-class top-1 %")
        for name in names:
            classes.add_column(name, justify="right")
        classes.add_row(*("-" if a is None else f"{a:.1f}" for a in per_class))
        console.print(classes)
