"""What a start does with a run directory, decided before anything in it changes: start fresh, restart, resume or
nothing (the run is complete), refusing a resume whose settings would mix two experiments; and config.json's
record of what ran."""

from __future__ import annotations

import logging
import platform
import shlex
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from crlf import __version__
from crlf.engine import distributed
from crlf.engine.device import precision_name
from crlf.engine.rundir import RunDir
from crlf.errors import InputError

log = logging.getLogger(__name__)

FRESH, RESTART, RESUME, COMPLETE = 0, 1, 2, 3  # what a start does with the run directory (the largest wins)


def plan(run: RunDir, identity: dict[str, Any], epochs: int, *, resume: bool, force: bool) -> int:
    """Decide what to do with the run directory without changing it; refuse what would mix two experiments: a
    resume whose `identity` values (the settings that define a run, as JSON values) differ from the saved ones."""
    if force or not run.has_run():
        return FRESH
    if not resume:
        raise InputError(
            f"{run.path} already holds a run: pass --resume to continue it, --force to start over, "
            "or choose another --out"
        )
    saved = run.saved_config()
    if not run.checkpoints_newest_first():
        return RESTART
    conflicts = [
        f"{k}: {saved.get(k)!r} -> {v!r}"
        for k, v in identity.items()
        if k in saved and saved[k] != v
    ]
    if conflicts:
        raise InputError(
            f"cannot resume {run.path}: settings differ from the saved run ({'; '.join(conflicts)}); "
            "use --force to start over"
        )
    done = run.finished_epoch()
    if done is None or done < epochs:
        _warn_if_not_exact(saved.get("resolved") or {})
    return COMPLETE if done is not None and done >= epochs and run.encoder.is_file() else RESUME


def cpu_numerics() -> dict[str, Any]:
    """What a CPU run's numbers depend on besides its settings: the intra-op thread count (reductions and matrix
    products split their sums by it) and the instruction set torch's kernels use (AVX-512 and AVX2 round apart)."""
    return {"threads": torch.get_num_threads(), "cpu_capability": torch.backends.cpu.get_cpu_capability()}


def _warn_if_not_exact(resolved: dict[str, Any]) -> None:
    """A CPU run resumed with another thread count, instruction set or torch goes on, but not bit for bit."""
    if resolved.get("device") != "cpu":
        return
    now = {**cpu_numerics(), "torch": torch.__version__}
    changed = [f"{k} {resolved[k]} -> {v}" for k, v in now.items() if k in resolved and resolved[k] != v]
    if changed:
        log.warning("resuming a CPU run with %s: it continues, but not exactly as the uninterrupted run would%s",
                    ", ".join(changed), f" (OMP_NUM_THREADS={resolved['threads']} restores the thread count)"
                    if "threads" in changed[0] else "")  # fmt: skip


def complete(run: RunDir) -> dict[str, Any]:
    """The summary of a run that has nothing left to do (--resume of a finished run)."""
    done = run.finished_epoch()
    log.info("run %s is complete (%d epoch%s): nothing to do", run.path, done, "" if done == 1 else "s")
    return {"status": "complete", "run_dir": str(run.path), "encoder": str(run.encoder), "epochs": done}


def run_record(
    values: dict[str, Any], device: torch.device, amp: torch.dtype | None, world: distributed.World
) -> dict[str, Any]:
    """config.json: the settings' JSON values (with the lr and weight decay that were used), and a 'resolved' block
    of what the defaults turned into and where the run ran (device, precision, versions, command line, git commit)."""
    resolved = {
        "lr": values["lr"],
        "weight_decay": values["weight_decay"],
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "precision": precision_name(amp),
        "world_size": world.world_size,
        **(cpu_numerics() if device.type == "cpu" else {}),
        "crlf": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "command": shlex.join(["crlf", *sys.argv[1:]]) if Path(sys.argv[0]).name in ("crlf", "__main__.py") else None,
        "git_commit": git_commit(),
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    return {**values, "resolved": resolved}


def git_commit() -> str | None:
    """The commit of crlf's own source when it runs from a git checkout (an editable install), else None. Read from
    .git's files: crlf runs no programs."""
    for folder in Path(__file__).resolve().parents:
        git = folder / ".git"
        if not git.is_dir():
            continue
        try:
            head = (git / "HEAD").read_text().strip()
            if not head.startswith("ref: "):
                return head  # a detached HEAD is the commit itself
            ref = head.removeprefix("ref: ")
            if (git / ref).is_file():
                return (git / ref).read_text().strip()
            packed = (git / "packed-refs").read_text().splitlines() if (git / "packed-refs").is_file() else []
            return next((line.split()[0] for line in packed if line.endswith(" " + ref)), None)
        except OSError:
            return None
    return None
