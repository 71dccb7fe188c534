"""What an experiment tracker is (the `Tracker` protocol) and the registry of them; torch-free, and no backend's
package is imported until a tracker starts (a missing one is an InputError naming the pip extra, before any work).

One x-axis for every point: the global optimisation step (a finished epoch E is logged at step E x steps per
epoch), so a resume at step S drops or rewrites exactly the points after S.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any, ClassVar, Protocol

from crlf.errors import InputError


class Tracker(Protocol):
    """One tracking backend's run: started (a new run, or the recorded one continued), fed points, closed."""

    name: ClassVar[str]  # the --logger value
    package: ClassVar[str]  # the module that must import (also the pip extra's name)

    def start(self, run_dir: Path, config: dict[str, Any], resume_step: int | None, recorded: dict[str, Any] | None
              ) -> dict[str, Any]:  # fmt: skip
        """Open the run: `recorded` (the entry trackers.json keeps, None: a new run) continued, the points after
        `resume_step` dropped or rewritten (None: nothing is rolled back, e.g. an evaluation appended); `config`
        logged as hyper-parameters on a new run. Returns the entry to record."""

    def log(self, metrics: dict[str, float], step: int) -> None:
        """Scalars at the global step `step`."""

    def log_figure(self, name: str, path: Path, step: int) -> None:
        """An image file (a PNG figure) under `name`."""

    def flush(self) -> None:
        """Make every point logged so far durable (called before each checkpoint is written)."""

    def close(self, status: str) -> None:
        """End this session: status is finished, interrupted or failed."""


REGISTRY: dict[str, type[Tracker]] = {}


def register(cls: type[Tracker]) -> type[Tracker]:
    """Class decorator: make a backend available as --logger NAME."""
    REGISTRY[cls.name] = cls
    return cls


def check(names: list[str] | tuple[str, ...]) -> None:
    """Each named backend is known and its package imports; else one InputError (exit 2) naming the extra."""
    for name in names:
        if name not in REGISTRY:
            raise InputError(f"--logger {name!r} is not one of {', '.join(REGISTRY)}")
        package = REGISTRY[name].package
        try:
            importlib.import_module(package)
        except ImportError:
            raise InputError(f"--logger {name} needs the {package} package: pip install \"crlf[{name}]\"") from None


def scalars(values: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """The numbers of a record (booleans and text left out), as floats under `prefix`."""
    return {prefix + k: float(v) for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def flat_config(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """config.json flattened for hyper-parameter tables: nested keys joined with '.', values int / float / str / bool
    (None and lists as their JSON text)."""
    out: dict[str, Any] = {}
    for k, v in config.items():
        if isinstance(v, dict):
            out.update(flat_config(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v if isinstance(v, (int, float, str, bool)) else json.dumps(v)
    return out
