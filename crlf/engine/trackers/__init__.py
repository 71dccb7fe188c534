"""Experiment trackers (--logger tensorboard / mlflow / wandb) around a run directory; torch-free.

`Trackers` is a run's set of them: every point goes to each; one that fails (disk, server gone) warns once and is
dropped, and the run goes on. The runs they continue are recorded in RUN/trackers.json (written atomically), so a
resume, an evaluation or `visualize --run` adds to the same tracker runs; --force (which removes that file) starts
new ones. A backend is one module here with @register, and its import line below.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from crlf.engine.files import atomic_write
from crlf.engine.rundir import RunDir
from crlf.engine.trackers import mlflow, tensorboard, wandb  # noqa: F401 - the backends register themselves
from crlf.engine.trackers.base import REGISTRY, Tracker, check, scalars

__all__ = ["REGISTRY", "Tracker", "Trackers", "check", "epoch_metrics", "epoch_step", "scalars"]

log = logging.getLogger(__name__)


class Trackers:
    """The trackers of one session of a run directory (the main process's alone)."""

    def __init__(self, run: RunDir, names: list[str] | tuple[str, ...]):
        self.run = run
        self.names = list(dict.fromkeys(names))
        self.active: dict[str, Tracker] = {}
        self.warned: set[str] = set()

    def start(self, config: dict[str, Any], resume_step: int | None, steps_per_epoch: int | None = None,
              history: list[dict[str, Any]] | None = None) -> None:  # fmt: skip
        """Open each tracker's run (the recorded one, else a new one) and record them in trackers.json; a new
        one of a resumed run gets the epochs `history` (metrics.jsonl) kept."""
        state = read_state(self.run)
        before = json.dumps(state, sort_keys=True)
        runs = state.setdefault("runs", {})
        for name in self.names:
            tracker = REGISTRY[name]()
            recorded = runs.get(name)
            try:
                runs[name] = tracker.start(self.run.path, config, resume_step, recorded if isinstance(recorded, dict)
                                           else None)  # fmt: skip
                if recorded is None and history and steps_per_epoch:  # --logger added on --resume: the epochs kept
                    for record in history:
                        tracker.log(epoch_metrics(record), epoch_step(record["epoch"], steps_per_epoch))
            except Exception as e:  # noqa: BLE001 - a tracker never stops the run
                self._failed(name, "start", e)
                continue
            self.active[name] = tracker
        if steps_per_epoch is not None:
            state["steps_per_epoch"] = steps_per_epoch
        if json.dumps(state, sort_keys=True) == before:
            return
        text = json.dumps(state, indent=1)
        try:
            atomic_write(self.run.trackers, lambda f: f.write(text.encode()))
        except OSError as e:
            log.warning("cannot write %s (%s): the next session will start new tracker runs", self.run.trackers,
                        e.strerror or e)  # fmt: skip

    def log(self, metrics: dict[str, float], step: int) -> None:
        self._each("log", metrics, step)

    def log_figure(self, name: str, path: Path, step: int) -> None:
        self._each("log_figure", name, path, step)

    def flush(self) -> None:
        self._each("flush")

    def close(self, status: str) -> None:
        self._each("close", status)
        self.active.clear()

    def _each(self, method: str, *args: Any) -> None:
        for name, tracker in list(self.active.items()):
            try:
                getattr(tracker, method)(*args)
            except Exception as e:  # noqa: BLE001 - a tracker never stops the run
                del self.active[name]
                self._failed(name, method, e)

    def _failed(self, name: str, what: str, e: Exception) -> None:
        if name not in self.warned:
            self.warned.add(name)
            text = " ".join(str(e).split())[:160] or type(e).__name__
            log.warning("the %s tracker failed (%s: %s); going on without it (metrics.jsonl has every epoch)", name,
                        what, text)  # fmt: skip


def read_state(run: RunDir) -> dict[str, Any]:
    """trackers.json ({} when it is missing or unreadable: the trackers then start new runs)."""
    try:
        state = json.loads(run.trackers.read_text())
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) and isinstance(state.get("runs", {}), dict) else {}


def epoch_metrics(record: dict[str, Any]) -> dict[str, float]:
    """A metrics.jsonl record as the trackers' epoch/ scalars."""
    return scalars({k: v for k, v in record.items() if k != "epoch"}, "epoch/")


def epoch_step(epoch: int, steps_per_epoch: int) -> int:
    """The global step a finished epoch (1-based) is logged at."""
    return epoch * steps_per_epoch


def continued(run: RunDir) -> Trackers | None:
    """The trackers a run directory recorded, continued for an evaluation or figures (nothing is rolled back);
    None when it has none. A backend whose package is gone now is left out with a warning."""
    state = read_state(run)
    names = [n for n in state.get("runs", {}) if n in REGISTRY]
    usable = []
    for name in names:
        try:
            check([name])
        except Exception as e:  # noqa: BLE001
            log.warning("not logging to the run's %s tracker: %s", name, e)
            continue
        usable.append(name)
    if not usable:
        return None
    trackers = Trackers(run, usable)
    trackers.start(run.saved_config(), None)
    return trackers


def final_step(run: RunDir) -> int:
    """The step of a run's last finished epoch (where evaluations and figures are logged)."""
    steps = read_state(run).get("steps_per_epoch")
    epoch = run.finished_epoch() or 0
    return epoch_step(epoch, steps) if isinstance(steps, int) and steps > 0 else epoch


def log_evaluation(run: RunDir, protocol: str, result: dict[str, Any]) -> None:
    """An evaluation's top-1 / top-5 (per label fraction when there are several) into the run's trackers."""
    trackers = continued(run)
    if trackers is None:
        return
    metrics = {f"eval/{protocol}_{k}": result[k] for k in ("top1", "top5") if isinstance(result.get(k), (int, float))}
    rows = result.get("summary") or []
    if len(rows) > 1:
        for row in rows:
            metrics.update({f"eval/{protocol}_{k}@{row['fraction']:g}": row[f"{k}_mean"] for k in ("top1", "top5")})
    trackers.log(scalars(metrics), final_step(run))
    trackers.close("finished")


def log_figures(run: RunDir, figures: dict[str, Path]) -> None:
    """visualize's figures (kind -> PNG file) into the run's trackers."""
    trackers = continued(run)
    if trackers is None:
        return
    step = final_step(run)
    for kind, path in figures.items():
        if path.suffix.lower() == ".png":
            trackers.log_figure(f"figures/{kind}", path, step)
    trackers.close("finished")
