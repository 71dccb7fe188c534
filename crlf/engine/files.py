"""File primitives every writer uses: atomic replacement, appends that never follow a link, hashing, and
checking that an output can be written before the work that produces it starts. No torch here."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import stat
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from crlf.errors import InputError, RunError, quoted

# atomic_write's temporary files: '.' + the target's name + '.' + mkstemp's 8 random characters + '.tmp'
_TEMP = re.compile(r"\.(?P<name>.+)\.[a-z0-9_]{8}\.tmp")


def temp_target(name: str) -> str | None:
    """The file an atomic_write temporary name was for ('.config.json.ab12cd_9.tmp' -> 'config.json'), else None."""
    m = _TEMP.fullmatch(name)
    return m["name"] if m else None


# errors that say "the disk is full or failing", as opposed to "this path is wrong"
_DISK_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EFBIG}


def new_file_mode(path: Path) -> int:
    """The permission bits a plain ``open(path, "w")`` would give: the file's own when it exists, else 0o666 less
    the umask (mkstemp alone makes every file 0o600)."""
    with contextlib.suppress(OSError):
        st = os.lstat(path)
        if stat.S_ISREG(st.st_mode):
            return stat.S_IMODE(st.st_mode)
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write(path: Path, write: Callable[[Any], None]) -> None:
    """Write via `write(file)` to a temp file in the same directory, fsync, then rename over `path`.

    A crash at any moment leaves either the old file or the new one, never half of one. A symbolic link at `path`
    is replaced, never written through.
    """
    path = Path(path)
    mode = new_file_mode(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


class Background:
    """One write at a time on a worker thread, so training goes on while a checkpoint is hashed and written (~100 MB
    for a ResNet-18 state: 0.4 s on a CPU, a quarter of an H100 epoch). wait() returns once it is on disk and raises
    its error there, in the caller's thread; the thread is not a daemon, so an exit waits for the rename."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def submit(self, work: Callable[[], None]) -> None:
        """Run `work` in the background once the previous work is done (whose error is raised here)."""
        self.wait()

        def run() -> None:
            try:
                work()
            except BaseException as e:  # handed to the next wait(), in the training thread
                self._error = e

        self._thread = threading.Thread(target=run, name="crlf-writer")
        self._thread.start()

    def wait(self) -> None:
        """Block until the submitted work is done; raise its error, if any (once)."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        error, self._error = self._error, None
        if error is not None:
            raise error


def open_no_follow(path: Path, flags: int = os.O_WRONLY | os.O_APPEND | os.O_CREAT) -> int:
    """os.open for writing in place (an append, the lock's PID) that refuses, with an InputError, what would write
    into another file: a symbolic link, a file with other hard links (``ln precious.txt RUN/.lock``) or anything
    that is not a regular file (a FIFO, a device). The check is on the opened descriptor, so no race gets past it."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o666)  # a FIFO must not block
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise InputError(f"{path} is a symbolic link: crlf never writes through links in a run directory; "
                             "remove it or choose another --out") from None
        raise
    st = os.fstat(fd)
    problem = (None if stat.S_ISREG(st.st_mode) and st.st_nlink <= 1 else
               f"has {st.st_nlink} hard links (it is also another file)" if stat.S_ISREG(st.st_mode) else
               "is not a regular file")
    if problem:
        os.close(fd)
        raise InputError(f"{path} {problem}: crlf never writes into a file that is linked elsewhere; remove it or "
                         "choose another --out")
    os.set_blocking(fd, True)
    return fd


def make_folder(path: Path, option: str = "--out") -> None:
    """mkdir -p for a folder crlf writes into inside a run directory (figures/, explore/, checkpoints/): a symbolic
    link there is refused (InputError), since every file written into it would land in the folder it points at."""
    path = Path(path)
    if path.is_symlink():
        raise InputError(f"{path} is a symbolic link: crlf never writes through links in a run directory; remove it "
                         f"or choose another {option}")
    path.mkdir(parents=True, exist_ok=True)


def append_line(path: Path, line: str) -> None:
    """Append one line and fsync it (never through a link); a write that fails half way (full disk) is cut off
    again, so the file never ends in a torn line."""
    fd = open_no_follow(path)
    try:
        size = os.fstat(fd).st_size
        data = line.encode()
        try:
            while data:
                data = data[os.write(fd, data) :]
            os.fsync(fd)
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, size)
            raise
    finally:
        os.close(fd)


def sha256(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def os_failure(e: OSError, what: str, fix: str) -> InputError | RunError:
    """A failed write as a one-line error: a full or failing disk is a RunError (exit 1), a path that cannot be
    written (missing folder, permissions, read-only file system) an InputError (exit 2)."""
    reason = e.strerror or str(e)
    if e.errno in _DISK_ERRORS:
        return RunError(f"cannot write {what}: {reason}; free some space and run the command again")
    return InputError(f"cannot write {what}: {reason}; {fix}")


def check_writable(path: Path, option: str) -> None:
    """Fail now, before any work, when `path` could not be written later (its folder is missing, not writable, or
    full): creates and removes a temp file beside it."""
    path = Path(path)
    if not path.parent.is_dir():
        raise InputError(f"cannot write {quoted(path)}: the folder {quoted(path.parent)} does not exist; create it or "
                         f"choose another {option}")
    if path.is_dir():
        raise InputError(f"cannot write {quoted(path)}: it is a folder; give a file name to {option}")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise os_failure(e, str(path), f"choose a writable {option}") from None
