"""The run directory: its file layout, its lock, the metrics log and the checkpoint snapshots.

runs/NAME/
  config.json  metrics.jsonl  last.safetensors  checkpoints/epoch-0005.safetensors  encoder.safetensors  train.log
  trackers.json (the tracker runs it continues)  tb/  mlruns/  wandb/ (--logger's local stores)
  .crlf-run (the marker that says crlf made this folder)  .lock

crlf clears or resumes only folders it made, and never writes through a symbolic link in one.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import re
import shutil
import sys
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TextIO

from safetensors import SafetensorError, safe_open

from crlf import __version__
from crlf.engine.files import append_line, atomic_write, make_folder, open_no_follow, os_failure, temp_target
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
        self.marker = self.path / ".crlf-run"
        self.trackers = self.path / "trackers.json"
        self.tb = self.path / "tb"

    def _own_files(self) -> list[Path]:
        """Every name crlf writes in a run directory (evaluation results included)."""
        results = [
            self.path / f"{kind}_eval{ext}"
            for kind in ("linear", "knn")
            for ext in (".json", "_confusion.npy", "_probe.safetensors")
        ]
        return [self.config, self.metrics, self.last, self.encoder, self.log_file, self.checkpoints, *results,
                self.trackers, self.tb]

    def check_owner(self) -> None:
        """Refuse a folder crlf did not make (its files would be overwritten or cleared), a folder inside another run
        or the root / home folder itself, and links in a run directory (a write would land in whatever they point
        at)."""
        links = [p for p in [*self._own_files(), self.lock_file, self.marker] if p.is_symlink()]
        if links:
            raise InputError(f"{links[0]} is a symbolic link: crlf never writes through links in a run directory; "
                             "remove it or choose another --out")
        for path in (self.lock_file, self.metrics, self.log_file):  # written in place: opening checks them again
            with contextlib.suppress(FileNotFoundError):
                os.close(open_no_follow(path, os.O_RDONLY))
        if self.path.exists() and not self.path.is_dir():
            raise InputError(f"--out {self.path} is a file, not a folder: choose another --out")
        where = self.path.expanduser().resolve()
        if where == Path(where.anchor) or where == Path.home().resolve():
            raise InputError(f"--out {self.path} is the {'root' if where == Path(where.anchor) else 'home'} folder "
                             "itself: give a folder of its own, e.g. --out runs/NAME")
        outer = next((p for p in where.parents if (p / self.marker.name).is_file()), None)
        if outer is not None:
            raise InputError(f"--out {self.path} is inside the crlf run {outer}, which would overwrite or clear it: "
                             "choose a folder outside it")
        if self.is_ours():
            return
        present = [p.name for p in self._own_files() if p.exists()]
        if present:
            raise InputError(f"{self.path} was not made by crlf (no {self.marker.name} marker) and holds "
                             f"{', '.join(present[:4])}: crlf will not overwrite or clear it; choose another --out")

    def is_ours(self) -> bool:
        """Whether crlf made this folder: its marker, or (runs from before the marker) a crlf checkpoint in it."""
        if self.marker.is_file():
            return True
        for path in (self.last, self.encoder):
            with contextlib.suppress(SafetensorError, OSError, ValueError), safe_open(str(path), framework="pt") as f:
                if (f.metadata() or {}).get("format", "").startswith("crlf-"):
                    return True
        return False

    def mark(self) -> None:
        """Write the marker that makes this folder a crlf run directory (once)."""
        if not self.marker.is_file():
            stamp = {"crlf_version": __version__, "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
            atomic_write(self.marker, lambda f: f.write(json.dumps(stamp).encode()))

    def writable(self) -> bool:
        """Whether files can be created here (False on a read-only file system or folder)."""
        return os.access(self.path, os.W_OK | os.X_OK)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold an OS-level lock (flock) on the directory: the kernel releases it when the process dies."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            fd = open_no_follow(self.lock_file, os.O_RDWR | os.O_CREAT)
        except OSError as e:
            raise os_failure(e, f"the run directory {self.path}", "choose another --out") from None
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
            with contextlib.suppress(OSError):  # the PID is for messages only: a full disk must not stop here
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    @contextlib.contextmanager
    def removed_on_failed_start(self) -> Iterator[None]:
        """A start that fails before config.json is written (missing data, a batch larger than the data, a model too
        big for the images) removes what it made: the marker, the lock, train.log and the folders it created, so a
        failed start leaves nothing behind."""
        made = [p for p in (self.marker, self.lock_file, self.log_file) if not os.path.lexists(p)]
        folders = [p for p in (self.path, *self.path.parents) if not os.path.lexists(p)]  # the innermost first
        try:
            yield
        except BaseException:
            if not self.config.exists():
                for path in made:
                    path.unlink(missing_ok=True)
                for folder in folders:
                    with contextlib.suppress(OSError):  # only when empty: whatever else is in it stays
                        folder.rmdir()
            raise

    @contextlib.contextmanager
    def logging_to_file(self) -> Iterator[None]:
        """Copy crlf's log lines into train.log for the duration of the run."""
        handler = _LogFile(self.log_file)
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
        """Remove a previous run's files (--force). train.log stays and goes on (it is the folder's history), and so
        do the lock, the marker and files crlf did not write. TensorBoard's events go with the run; MLflow and W&B
        stores stay, and the next start opens new runs in them (trackers.json is removed)."""
        for f in self._own_files():
            if f in (self.checkpoints, self.tb):
                shutil.rmtree(f, ignore_errors=True)
            elif f != self.log_file:
                f.unlink(missing_ok=True)

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
        return ([self.last] if self.last.is_file() else []) + self.snapshots()[::-1]

    def snapshots(self) -> list[Path]:
        """checkpoints/epoch-N.safetensors, oldest first, ordered by the number (epoch 10000 sorts after 9999)."""
        if not self.checkpoints.is_dir():
            return []
        found = [(int(m[1]), p) for p in self.checkpoints.iterdir() if (m := _SNAPSHOT.fullmatch(p.name))]
        return [p for _, p in sorted(found)]

    def finished_epoch(self) -> int | None:
        """The epoch last.safetensors completed, from its metadata alone (None when it is missing or damaged)."""
        try:
            return int(self.progress()["epoch"]) if self.last.is_file() else None
        except (InputError, KeyError, ValueError):
            return None

    def remove_temp_files(self) -> None:
        """Delete the temporary files of writes that a killed process never finished: only the names crlf's atomic
        writer and snapshot make for its own files, never a user's '.notes.tmp'."""
        own = {p.name for p in [*self._own_files(), self.marker]}
        if self.path.is_dir():
            for tmp in self.path.glob(".*.tmp"):
                if temp_target(tmp.name) in own:
                    tmp.unlink(missing_ok=True)
        if self.checkpoints.is_dir() and not self.checkpoints.is_symlink():
            for tmp in self.checkpoints.glob(".*.tmp"):
                if _SNAPSHOT.fullmatch(tmp.name[1:].removesuffix(".tmp")):  # snapshot()'s own temporary name
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
        append_line(self.metrics, json.dumps(record) + "\n")

    def read_metrics(self) -> list[dict[str, Any]]:
        """The per-epoch records of metrics.jsonl ([] when there are none)."""
        if not self.metrics.is_file():
            return []
        text = self.metrics.read_text(encoding="utf-8", errors="replace")
        if text and not text.endswith("\n"):  # a line torn by a crash: its epoch is re-run on resume
            log.warning("ignoring the incomplete last line of %s", self.metrics)
            text = text[: text.rfind("\n") + 1]
        try:
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        except ValueError as e:
            raise InputError(f"{self.metrics} is damaged ({e}); use --force to start over") from None

    def truncate_metrics(self, epoch: int) -> None:
        """Drop records after `epoch` (written after the checkpoint a resume starts from), atomically."""
        kept = [r for r in self.read_metrics() if r.get("epoch", 0) <= epoch]
        atomic_write(self.metrics, lambda f: f.write("".join(json.dumps(r) + "\n" for r in kept).encode()))

    def snapshot(self, epoch: int, keep: int) -> None:
        """Copy last.safetensors to checkpoints/epoch-NNNN; only afterwards delete the oldest beyond `keep`."""
        make_folder(self.checkpoints)
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
        for old in self.snapshots()[:-keep]:
            old.unlink()


_SNAPSHOT = re.compile(r"epoch-(\d+)\.safetensors")


class _LogFile(logging.Handler):
    """train.log: appended line by line, never through a link. A failing write (full disk) turns the file off with
    one warning instead of logging's multi-line '--- Logging error ---' report; the run's own error says the rest."""

    def __init__(self, path: Path):
        super().__init__()
        self.path = path
        self.file: TextIO | None = os.fdopen(open_no_follow(path), "a", encoding="utf-8", errors="backslashreplace")

    def emit(self, record: logging.LogRecord) -> None:
        if self.file is None:
            return
        try:
            self.file.write(self.format(record).replace("\n", "\\n") + "\n")
            self.file.flush()
        except (OSError, ValueError) as e:
            self.file = None
            sys.stderr.write(f"warning: cannot write {self.path} ({getattr(e, 'strerror', None) or e}); "
                             "going on without it\n")

    def close(self) -> None:
        if self.file is not None:
            with contextlib.suppress(OSError, ValueError):
                self.file.close()
            self.file = None
        super().close()
