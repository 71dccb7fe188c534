"""`crlf ARGS` in-process through the real Typer app, for test modules (``from inprocess import run_crlf``): a
subprocess would only add a torch import per call (the entry point itself is tested as a subprocess in
test_cli.py)."""

from __future__ import annotations

import logging
import subprocess

from typer.testing import CliRunner


def run_crlf(*args: object, binary: bool = False) -> subprocess.CompletedProcess:
    """The command's exit code, stdout and stderr (bytes with `binary`, else text) as a CompletedProcess."""
    from crlf.cli import app

    logger = logging.getLogger("crlf")
    handlers, level, propagate = logger.handlers[:], logger.level, logger.propagate
    try:
        r = CliRunner().invoke(app, [str(a) for a in args])
    finally:  # the CLI routes crlf's loggers to its stderr console; give them back to pytest
        logger.handlers[:] = handlers
        logger.setLevel(level)
        logger.propagate = propagate
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    out, err = (r.stdout_bytes, r.stderr_bytes) if binary else (r.stdout, r.stderr)
    return subprocess.CompletedProcess(args, r.exit_code, out, err)
