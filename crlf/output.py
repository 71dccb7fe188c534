"""The terminal: one stderr console for logs and progress, results alone on stdout.

On a terminal: Rich progress bar and coloured log lines. Otherwise (cron, pipes, CI): plain timestamped
lines without ANSI codes, one per epoch plus one every `log_every` seconds, that read well in a log file.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

console = Console(stderr=True, highlight=False)
log = logging.getLogger("crlf.cli")


class _ConsoleHandler(logging.Handler):
    """Log records to the shared stderr console (so they print above a live progress bar)."""

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        prefix = {logging.WARNING: "warning: ", logging.ERROR: "error: "}.get(record.levelno, "")
        if console.is_terminal:
            style = {logging.WARNING: "yellow", logging.ERROR: "red"}.get(record.levelno)
            console.print(f"{prefix}{msg}", style=style, markup=False, soft_wrap=True)
        else:
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
            console.file.write(f"{stamp} {prefix}{msg}\n")
            console.file.flush()


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
    """One line on stderr; the caller chooses the exit code."""
    console.file.write(f"error: {message}\n")
    console.file.flush()


def emit_json(result: Any) -> None:
    """A result on stdout as one JSON document (the only thing crlf ever writes to stdout besides data)."""
    sys.stdout.write(json.dumps(result, indent=2, default=str) + "\n")
    sys.stdout.flush()


class TrainingReporter:
    """The engine's Reporter: a progress bar on a terminal (not with --json), periodic plain lines elsewhere, nothing with --quiet."""

    def __init__(self, quiet: bool = False, bar: bool = True, log_every: float = 30.0):
        self.quiet = quiet
        self.bar = bar
        self.log_every = log_every
        self.progress: Progress | None = None
        self.task = None
        self.epochs = 0
        self.last_line = time.monotonic()
        self.log = logging.getLogger("crlf.progress")

    def on_start(self, info: dict[str, Any]) -> None:
        self.epochs = info["epochs"]
        if self.quiet or not self.bar or not console.is_terminal:
            return
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=console,
            transient=True,
        )
        total = (info["epochs"] - info["start_epoch"]) * info["steps"]
        self.task = self.progress.add_task(f"epoch {info['start_epoch'] + 1}/{self.epochs}", total=total)
        self.progress.start()

    def on_step(self, epoch: int, step: int, steps: int) -> None:
        if self.progress is not None:
            self.progress.update(self.task, advance=1, description=f"epoch {epoch + 1}/{self.epochs}")
        elif not self.quiet and time.monotonic() - self.last_line >= self.log_every:
            self.last_line = time.monotonic()
            self.log.info("epoch %d/%d  step %d/%d", epoch + 1, self.epochs, step, steps)

    def on_epoch(self, metrics: dict[str, Any]) -> None:
        self.last_line = time.monotonic()  # the engine has just logged the epoch's line

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


def results_table(result: dict[str, Any]) -> None:
    """An evaluation result for a person: accuracy per label fraction (mean +- std over seeds), then per class."""
    table = Table(
        title=f"{result['protocol']} evaluation: {result['train_size']:,} train / {result['test_size']:,} test, {result['dim']} dims"
    )
    for column in ("label fraction", "runs", "top-1 %", "top-5 %"):
        table.add_column(column, justify="right")
    for row in result["summary"]:
        spread = row["runs"] > 1  # a std over one run says nothing

        def cell(metric: str) -> str:
            return f"{row[metric + '_mean']:.2f}" + (f" ± {row[metric + '_std']:.2f}" if spread else "")

        table.add_row(f"{row['fraction']:g}", str(row["runs"]), cell("top1"), cell("top5"))
    console.print(table)
    per_class = result.get("per_class")
    if per_class and len(per_class) <= 20:
        classes = Table(title="per-class top-1 %")
        for name in result["class_names"]:
            classes.add_column(str(name), justify="right")
        classes.add_row(*("-" if a is None else f"{a:.1f}" for a in per_class))
        console.print(classes)
