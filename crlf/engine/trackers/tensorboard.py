"""TensorBoard: event files in RUN/tb/ (torch's SummaryWriter). A continued run opens a new event file whose
``purge_step`` makes TensorBoard drop the earlier files' points at and after it: a rolled-back epoch is rewritten."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from crlf.engine.trackers.base import flat_config, register


@register
class TensorBoard:
    """--logger tensorboard: scalars, the config (text and hparams) and figures (images) in RUN/tb/."""

    name = "tensorboard"
    package = "tensorboard"

    def __init__(self) -> None:
        self.writer: Any = None

    def start(self, run_dir: Path, config: dict[str, Any], resume_step: int | None, recorded: dict[str, Any] | None
              ) -> dict[str, Any]:  # fmt: skip
        from torch.utils.tensorboard import SummaryWriter

        folder = run_dir / "tb"
        _after_existing_files(folder)
        purge = resume_step + 1 if recorded is not None and resume_step is not None else None
        self.writer = SummaryWriter(str(folder), purge_step=purge, flush_secs=30)
        if recorded is None:  # a new run: the config as text and as the hparams plugin's table, at step 0
            from torch.utils.tensorboard.summary import hparams

            self.writer.add_text("config", f"```\n{json.dumps(config, indent=1)}\n```", 0)
            for summary in hparams(flat_config(config), {}):
                self.writer.file_writer.add_summary(summary, 0)
            self.writer.flush()
        return {}

    def log(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)

    def log_figure(self, name: str, path: Path, step: int) -> None:
        import numpy as np
        from PIL import Image

        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB"))
        self.writer.add_image(name, pixels, step, dataformats="HWC")

    def flush(self) -> None:
        self.writer.flush()

    def close(self, status: str) -> None:
        self.writer.close()


def _after_existing_files(folder: Path) -> None:
    """Wait (under a second) until a new event file's name sorts after the folder's: TensorBoard reads the files in
    name order, which starts with the second of their creation, and a purge applies to the files read before it."""
    stamps = [int(p.name.split(".")[3]) for p in folder.glob("events.out.tfevents.*") if p.name.split(".")[3].isdigit()]
    if stamps:
        time.sleep(max(0.0, max(stamps) + 1 - time.time()))
