"""Weights & Biases: offline into RUN/wandb unless WANDB_MODE says otherwise; the run id crlf chose is recorded and
every later session (a resume, an evaluation, figures) opens it again with resume="allow" (`wandb sync RUN/wandb`
uploads the offline sessions into that one run). Online, W&B itself ignores points at steps it already has."""

from __future__ import annotations

import os
import re
import secrets
from pathlib import Path
from typing import Any

from crlf.engine.trackers.base import register

PROJECT = "crlf"  # unless WANDB_PROJECT says otherwise


@register
class WandB:
    """--logger wandb: metrics at explicit steps, the config, figures as images; no console capture, no system
    statistics, no git or code snapshot."""

    name = "wandb"
    package = "wandb"

    def __init__(self) -> None:
        self.run: Any = None

    def start(self, run_dir: Path, config: dict[str, Any], resume_step: int | None, recorded: dict[str, Any] | None
              ) -> dict[str, Any]:  # fmt: skip
        import wandb

        run_id = recorded.get("id") if recorded else None
        new = not (isinstance(run_id, str) and re.fullmatch(r"[a-z0-9]{8,32}", run_id))
        run_id = secrets.token_hex(4) if new else run_id
        settings = wandb.Settings(console="off", silent=True, x_disable_stats=True, disable_git=True, save_code=False)
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT") or PROJECT, dir=str(run_dir), id=run_id, resume="allow",
            name=run_dir.name, mode=None if os.environ.get("WANDB_MODE") else "offline", settings=settings,
        )  # fmt: skip
        self.run.config.update(config, allow_val_change=True)
        return {"id": run_id}

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def log_figure(self, name: str, path: Path, step: int) -> None:
        import wandb

        self.run.log({name: wandb.Image(str(path))}, step=step)

    def flush(self) -> None:
        """Nothing to do: the run's service process writes each point as it arrives."""

    def close(self, status: str) -> None:
        self.run.finish(exit_code={"finished": 0, "interrupted": 130}.get(status, 1))
