"""The run directory: its file layout, its lock, the metrics log and the checkpoint snapshots.

runs/NAME/
  config.json  metrics.jsonl  last.safetensors  checkpoints/epoch-0005.safetensors  encoder.safetensors  train.log
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open

from crlf.engine.checkpoint import atomic_write
from crlf.errors import InputError, LockedError

log = logging.getLogger(__name__)


class RunDir:
    """Paths and file operations of one run directory; every write is atomic or an fsync'ed append."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.config = self.path / "config.json"
        self.metrics = self.path / "metrics.jsonl"
        self.last = self.path / "last.safetensors"
        self.checkpoints = self.path / "checkpoints"
        self.encoder = self.path / "encoder.safetensors"
        self.log_file = self.path / "train.log"
        self.lock_file = self.path / ".lock"

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold an OS-level lock (flock) on the directory: the kernel releases it when the process dies."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise InputError(f"cannot create run directory {self.path}: {e.strerror}; choose another --out") from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
                raise LockedError(
                    f"{self.path} is in use by another crlf process (PID {holder}); wait for it or choose another --out"
                ) from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    @contextlib.contextmanager
    def logging_to_file(self) -> Iterator[None]:
        """Copy crlf's log lines into train.log for the duration of the run."""
        handler = logging.FileHandler(self.log_file, encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        handler.setLevel(logging.INFO)
        root = logging.getLogger("crlf")
        level = root.level
        if root.getEffectiveLevel() > logging.INFO:  # used as a library, with no logging set up
            root.setLevel(logging.INFO)
        root.addHandler(handler)
        try:
            yield
        finally:
            root.removeHandler(handler)
            root.setLevel(level)
            handler.close()

    def has_run(self) -> bool:
        """Whether the directory already holds (part of) a run."""
        return self.config.is_file() or self.last.is_file() or self.encoder.is_file()

    def clear(self) -> None:
        """Remove a previous run's files (--force); the lock file and unrelated files stay."""
        for f in (self.config, self.metrics, self.last, self.encoder, self.log_file):
            f.unlink(missing_ok=True)
        shutil.rmtree(self.checkpoints, ignore_errors=True)

    def saved_config(self) -> dict[str, Any]:
        """The settings the run was started with ({} when config.json is missing)."""
        if not self.config.is_file():
            return {}
        try:
            return json.loads(self.config.read_text())
        except (OSError, ValueError) as e:
            raise InputError(f"{self.config} is unreadable ({e}); use --force to start over") from None

    def checkpoints_newest_first(self) -> list[Path]:
        """Files a resume can start from: last.safetensors, then the snapshots, newest first."""
        snapshots = (
            sorted(self.checkpoints.glob("epoch-*.safetensors"), reverse=True) if self.checkpoints.is_dir() else []
        )
        return ([self.last] if self.last.is_file() else []) + snapshots

    def finished_epoch(self) -> int | None:
        """The epoch last.safetensors completed, from its metadata alone (None when it is missing or damaged)."""
        try:
            return int(self.progress()["epoch"]) if self.last.is_file() else None
        except (InputError, KeyError, ValueError):
            return None

    def remove_temp_files(self) -> None:
        """Delete the temporary files of writes that a killed process never finished (only crlf's own names)."""
        for folder in (self.path, self.checkpoints):
            if folder.is_dir():
                for tmp in folder.glob(".*.tmp"):
                    tmp.unlink(missing_ok=True)

    def progress(self) -> dict[str, Any]:
        """The progress record of last.safetensors (epoch, schedule state), read from its metadata alone."""
        try:
            with safe_open(str(self.last), framework="pt") as f:
                return json.loads((f.metadata() or {})["progress"])
        except (SafetensorError, OSError, KeyError, ValueError) as e:
            raise InputError(
                f"{self.last} is damaged ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                "use --force to start over"
            ) from None

    def append_metrics(self, record: dict[str, Any]) -> None:
        """Append one epoch's record as a JSON line, flushed to disk."""
        with open(self.metrics, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def read_metrics(self) -> list[dict[str, Any]]:
        """The per-epoch records of metrics.jsonl ([] when there are none)."""
        if not self.metrics.is_file():
            return []
        return [json.loads(line) for line in self.metrics.read_text(encoding="utf-8").splitlines() if line.strip()]

    def truncate_metrics(self, epoch: int) -> None:
        """Drop records after `epoch` (written after the checkpoint a resume starts from), atomically."""
        kept = [r for r in self.read_metrics() if r.get("epoch", 0) <= epoch]
        atomic_write(self.metrics, lambda f: f.write("".join(json.dumps(r) + "\n" for r in kept).encode()))

    def snapshot(self, epoch: int, keep: int) -> None:
        """Keep a copy of last.safetensors as checkpoints/epoch-NNNN; delete the oldest beyond `keep` only afterwards."""
        self.checkpoints.mkdir(exist_ok=True)
        target = self.checkpoints / f"epoch-{epoch:04d}.safetensors"
        tmp = target.with_name(f".{target.name}.tmp")
        tmp.unlink(missing_ok=True)
        try:
            os.link(
                self.last, tmp
            )  # last.safetensors is replaced by rename, never rewritten: a hard link is a true copy
        except OSError:
            shutil.copyfile(self.last, tmp)
        os.replace(tmp, target)
        for old in sorted(self.checkpoints.glob("epoch-*.safetensors"))[:-keep]:
            old.unlink()
