"""Faults, for real: processes killed at named points (before the first checkpoint, while one is written, while the
encoder is written), a second Ctrl-C, checkpoints corrupted byte by byte, a full disk, out of memory, and a table of
bad inputs with their exit codes and messages."""

import errno
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from crlf import PretrainSettings, pretrain
from crlf.engine import augment, backbones, checkpoint, methods
from crlf.engine.checkpoint import load_state, read_tensors
from crlf.engine.encoder import Encoder, load_encoder
from crlf.engine.optim import build_optimizer
from crlf.engine.rundir import RunDir
from crlf.errors import InputError, RunError

CRLF = [sys.executable, "-m", "crlf"]  # the CLI of this interpreter's crlf: no PATH lookup, nothing to skip


@pytest.fixture(autouse=True)
def _no_crlf_env(monkeypatch):
    for key in [k for k in os.environ if k.startswith("CRLF_")]:
        monkeypatch.delenv(key)


def env(**extra):
    return {**{k: v for k, v in os.environ.items() if not k.startswith("CRLF_")}, **extra}


def start(*args, log=None):
    return subprocess.Popen(
        [*CRLF, *map(str, args)],
        stdout=subprocess.DEVNULL,
        stderr=log or subprocess.DEVNULL,
        env=env(),
        start_new_session=True,
    )


def run_cli(*args, timeout=300, kill_at=None):
    """`crlf ARGS` in a subprocess; kill_at="FILE#n": the engine's test hook SIGKILLs it in its n-th write of FILE."""
    extra = {"CRLF_TEST_KILL_AT": kill_at} if kill_at else {}
    return subprocess.run([*CRLF, *map(str, args)], capture_output=True, text=True, env=env(**extra), timeout=timeout)


def settings(out, **overrides):
    values = dict(
        data="digits",
        limit=64,
        image_size=8,
        batch_size=16,
        head_hidden=32,
        head_out=16,
        device="cpu",
        lr=0.1,
        epochs=4,
        out=out,
    )
    values.update(overrides)
    return PretrainSettings(**values)


def same_weights(a: Path, b: Path) -> bool:
    x, y = load_file(str(a)), load_file(str(b))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def losses(run: Path) -> list[tuple[int, float]]:
    return [(m["epoch"], m["loss"]) for m in RunDir(run).read_metrics()]


# --- killed processes ----------------------------------------------------------------------------------------
def test_sigkill_at_named_points_then_resume_is_exact(tmp_path, reference_run):
    """Processes killed with SIGKILL (a power cut) at three deterministic points, each one resumed by the next: the
    finished run is the uninterrupted one, bit for bit, and no temp file is left. The points are the engine's test
    hook (checkpoint._write): $CRLF_TEST_KILL_AT="FILE#n" kills a process half way through its n-th write of FILE."""
    out, run = tmp_path / "run", RunDir(tmp_path / "run")
    args = ["pretrain", *reference_run.args(), "--out", out, "--resume", "--logger", "tensorboard", "--log-every-steps",
            3]  # fmt: skip

    def killed_at(point):
        r = run_cli(*args, kill_at=point)
        assert r.returncode == -signal.SIGKILL, r.stderr  # killed by the hook, not ended in any other way
        temps = list(out.glob(".*.tmp"))
        assert [t.name.split(".")[1:3] for t in temps] == [point.split("#")[0].split(".")], temps
        for path in run.checkpoints_newest_first():
            read_tensors(path)  # whatever is on disk after a SIGKILL is intact
        return temps[0]

    # 1. epoch 1's metrics line is written, its checkpoint (the first) only half: there is no checkpoint yet
    killed_at("last.safetensors#1")
    assert [e for e, _ in losses(out)] == [1] and not run.last.exists() and not run.checkpoints_newest_first()
    # 2. the resume starts fresh without the orphan line; killed inside epoch 2's save, after a checkpoint existed
    half = killed_at("last.safetensors#2")
    progress, _ = load_state(run.last, *_fresh_model_and_optimizer())  # the previous checkpoint is whole
    assert progress["epoch"] == 1 and run.finished_epoch() == 1 and 0 < half.stat().st_size < run.last.stat().st_size
    assert [e for e, _ in losses(out)] == [1, 2] and losses(out)[0] == losses(reference_run.path)[0]
    # 3. resumed at epoch 2, trained to the end, killed while writing the encoder
    killed_at("encoder.safetensors#1")
    assert run.finished_epoch() == 3 and not run.encoder.exists() and not half.exists()
    # 4. the last resume has no epoch left to train: it writes the encoder
    assert pretrain(reference_run.settings(out), resume=True)["epochs_run"] == 0
    assert same_weights(run.encoder, reference_run.path / "encoder.safetensors")
    assert same_weights(run.last, reference_run.path / "last.safetensors")
    assert losses(out) == losses(reference_run.path)  # every epoch once, the same numbers
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tb"))
    events.Reload()  # TensorBoard too: every point once (the killed sessions' extra ones purged), none missing
    assert [(e.step // 4, round(e.value, 6)) for e in events.Scalars("epoch/loss")] == losses(reference_run.path)
    assert [e.step for e in events.Scalars("step/loss")] == [3, 6, 9, 12]
    assert not list(out.glob(".*.tmp")) and not list((out / "checkpoints").glob(".*.tmp"))


def _fresh_model_and_optimizer():
    config = methods.SimCLRConfig(head_hidden=32, head_out=16, head_dropout=0.1)  # the reference run's
    model = methods.SimCLR(backbones.build(backbones.spec_for("resnet18", 8, "cifar")), config, 512)
    return model, build_optimizer(model, "sgd", 0.1, 5e-4)


def test_second_sigint_aborts_at_once_and_its_line_stays_last_on_a_terminal(tmp_path):
    """On a terminal (a pty: Rich draws its live bars), the second Ctrl-C's line is the last thing drawn: the bars
    were drawn again below it, and the shell's prompt landed on them."""
    import pty
    import select

    out = tmp_path / "run"
    master, slave = pty.openpty()
    # big steps (batch 256 of 32 px images): the first Ctrl-C would wait for the step to end; the second must not
    args = ["pretrain", "--data", "digits", "--image-size", "32", "--batch-size", "256", "--epochs", "3",
            "--device", "cpu", "--out", out]  # fmt: skip
    proc = subprocess.Popen([*CRLF, *map(str, args)], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=slave, env=env(TERM="xterm", COLUMNS="120"), start_new_session=True)  # fmt: skip
    os.close(slave)
    screen = bytearray()

    def read(until, limit):
        deadline = time.monotonic() + limit
        while not until() and time.monotonic() < deadline:
            if select.select([master], [], [], 0.1)[0]:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # EIO: the process is gone
                    return
                if not chunk:
                    return
                screen.extend(chunk)

    read(lambda: b"steps/epoch" in screen, 120)
    read(lambda: False, 1.0)  # inside the first step, the bars drawn
    proc.send_signal(signal.SIGINT)
    read(lambda: False, 0.2)
    proc.send_signal(signal.SIGINT)
    code = proc.wait(timeout=60)
    read(lambda: False, 1.0)
    os.close(master)
    text = screen.decode(errors="replace")
    assert code == 130 and "Traceback" not in text and "\r" in text  # a live display (it rewrites its lines)
    line = text.rfind("error: interrupted: a second Ctrl-C aborted the run")
    assert line > 0, text
    after = text[line:].split("\n", 1)[1]  # aborted, not "stopped ... state is saved"; nothing drawn after it
    assert after.replace("\x1b[?25h", "").strip() == "", repr(text[line - 200 :])
    assert not (out / "last.safetensors").exists() and not list(out.glob(".*.tmp"))  # the step never finished


def test_abort_message_waits_for_a_log_line_being_written(monkeypatch):
    """The first SIGINT's warning can be mid-write when the second arrives: the abort line must still come last."""
    import logging
    import threading

    from crlf.engine import signals
    from crlf.engine.signals import StopFlag

    lines: list[str] = []

    class SlowHandler(logging.Handler):
        def emit(self, record):
            time.sleep(0.3)
            lines.append("warning")

    def fake_exit(code):
        lines.append(f"exit {code}")

    monkeypatch.setattr(logging.getLogger("crlf"), "handlers", [SlowHandler()])
    monkeypatch.setattr(logging.getLogger(), "handlers", [])
    monkeypatch.setattr(signals, "_say", lambda data: lines.append("error"))
    monkeypatch.setattr(os, "_exit", fake_exit)
    monkeypatch.setattr(os, "isatty", lambda fd: False)
    writer = threading.Thread(target=logging.getLogger("crlf.engine.train").warning, args=("SIGINT received",))
    writer.start()
    time.sleep(0.05)  # the warning is being written
    read_end, write_end = os.pipe()
    os.write(write_end, bytes([signal.SIGINT, signal.SIGINT]))
    os.close(write_end)  # the watcher ends once it has read both
    watcher = threading.Thread(target=StopFlag._watch, args=(read_end,))
    watcher.start()
    watcher.join(timeout=10)
    writer.join(timeout=10)
    os.close(read_end)
    assert lines == ["warning", "error", "exit 130"]


# --- corrupted files -----------------------------------------------------------------------------------------
def test_checkpoints_corrupted_byte_by_byte_never_load(tmp_path, reference_run):
    for name in ("last.safetensors", "encoder.safetensors"):
        good = (reference_run.path / name).read_bytes()  # read only: the damaged copies go to tmp_path
        header = 8 + int.from_bytes(good[:8], "little")
        rng = random.Random(name)
        positions = sorted(rng.sample(range(header), 30) + rng.sample(range(header, len(good)), 20)) + [
            0,
            7,
            header - 1,
            len(good) - 1,
        ]
        bad = tmp_path / "bad.safetensors"
        bad.write_bytes(good)  # once: each case flips one byte in place and back (not 50 copies of ~90 MB)
        with open(bad, "r+b") as f:
            for i, pos in enumerate(positions):
                f.seek(pos)
                f.write(bytes([good[pos] ^ 1 << rng.randrange(8)]))
                f.flush()
                with pytest.raises(InputError):
                    (load_encoder if i % 10 == 0 else read_tensors)(bad)  # every reader goes through read_tensors
                f.seek(pos)
                f.write(good[pos : pos + 1])
                f.flush()
        assert bad.read_bytes() == good
        for cut in [len(good) - 1, len(good) // 2, header + 1, header, header // 2, 8, 4, 0]:  # shorter each time
            os.truncate(bad, cut)
            with pytest.raises(InputError):
                read_tensors(bad)


def test_resume_falls_back_to_the_newest_intact_snapshot(tmp_path, reference_run):
    s = reference_run.settings(tmp_path / "run", keep_checkpoints=2)
    with pytest.raises(KeyboardInterrupt):
        pretrain(s, _StopAfter(2))
    last = tmp_path / "run" / "last.safetensors"
    data = bytearray(last.read_bytes())
    data[len(data) // 2] ^= 0xFF  # a flipped byte in the weights: only the checksum can tell
    last.write_bytes(bytes(data))
    assert [p.name for p in RunDir(s.out).checkpoints_newest_first()][1:] == [
        "epoch-0002.safetensors",
        "epoch-0001.safetensors",
    ]
    pretrain(s, resume=True)
    assert same_weights(tmp_path / "run" / "encoder.safetensors", reference_run.path / "encoder.safetensors")
    assert losses(tmp_path / "run") == losses(reference_run.path)


class _StopAfter:
    def __init__(self, epochs):
        self.epochs = epochs

    def on_start(self, info): ...
    def on_step(self, epoch, step, steps, **running): ...

    def on_epoch(self, metrics):
        if metrics["epoch"] >= self.epochs:
            raise KeyboardInterrupt


# --- full disk and out of memory -------------------------------------------------------------------------------
def test_full_disk_on_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch, reference_run):
    real_fdopen = os.fdopen

    class FullDisk:
        """The disk fills for the epoch-2 state: the epoch-1 one may still be on the writer thread when the reporter
        hears of epoch 1, and it gets through."""

        def __init__(self, fd, *args, **kwargs):
            self.f, self.full = real_fdopen(fd, *args, **kwargs), None

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def __getattr__(self, name):  # flush, fileno: the real file's
            return getattr(self.f, name)

        def write(self, data):
            if self.full is None:  # the first write holds the header and its progress record
                self.full = b'\\"epoch\\": 1,' not in bytes(data[:65536])
            if not self.full:
                return self.f.write(data)
            self.f.write(data[: len(data) // 3])
            raise OSError(errno.ENOSPC, "No space left on device")

    class FillDiskAfterEpoch1(_StopAfter):
        def on_epoch(self, metrics):
            if metrics["epoch"] == 1:
                monkeypatch.setattr(checkpoint.os, "fdopen", FullDisk)

    s = reference_run.settings(tmp_path / "run")
    with pytest.raises(RunError, match="No space left on device.*previous checkpoint is kept.*--resume"):
        pretrain(s, FillDiskAfterEpoch1(0))
    monkeypatch.setattr(checkpoint.os, "fdopen", real_fdopen)
    assert RunDir(s.out).finished_epoch() == 1 and not list(s.out.glob(".*.tmp"))
    read_tensors(s.out / "last.safetensors")
    pretrain(s, resume=True)  # space is back
    assert same_weights(s.out / "encoder.safetensors", reference_run.path / "encoder.safetensors")
    assert losses(s.out) == losses(reference_run.path)


def test_out_of_memory_is_a_clear_run_error(tmp_path, monkeypatch):
    def oom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(augment, "draw", oom)  # inside the step: where an allocation fails
    with pytest.raises(RunError, match=r"out of memory on cpu at batch 16 .*: try --micro-batch 4 "
                       r"or --activation-checkpointing \(or --batch-size 8\)"):
        pretrain(settings(tmp_path / "run"))


# --- bad input: one line, a documented exit code, no traceback -----------------------------------------------------
def _bad_inputs(tmp: Path) -> None:
    """Write every bad input the table below refers to into `tmp`."""
    import numpy as np
    from PIL import Image

    (tmp / "empty").mkdir()
    (tmp / "a_file.txt").write_text("not a folder")
    junk = tmp / "junk" / "cls"
    junk.mkdir(parents=True)
    for i in range(20):
        Image.fromarray(np.full((12, 12, 3), i * 10, np.uint8)).save(junk / f"ok_{i}.png")
    (junk / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (junk / "notes.txt").write_text("hello")
    np.save(tmp / "floats.npy", np.zeros((10, 8, 8, 3), np.float32))
    np.save(tmp / "flat.npy", np.zeros((10, 8), np.uint8))
    torch.manual_seed(0)
    save_file({"w": torch.zeros(3)}, str(tmp / "foreign.safetensors"))
    r18, r34 = (backbones.spec_for(arch, 8, "cifar") for arch in ("resnet18", "resnet34"))
    Encoder(backbones.build(r18), r34, [0.5] * 3, [0.2] * 3, 1).save(tmp / "r18_as_r34.safetensors")
    good = tmp / "good.safetensors"
    Encoder(backbones.build(r18), r18, [0.5] * 3, [0.2] * 3, 1).save(good)
    (tmp / "truncated.safetensors").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    (tmp / "bad.toml").write_text("epochs = [unclosed\n")
    (tmp / "unknown.toml").write_text("epochs = 2\nlearning_rate = 0.1\n")


BAD = [  # (command line, exit code, fragment of the one error line)
    ("pretrain --data folder --data-dir {tmp}/missing", 2, "does not exist"),
    ("pretrain --data folder --data-dir {tmp}/empty", 2, "is empty"),
    ("pretrain --data folder --data-dir {tmp}/a_file.txt", 2, "not a folder"),
    ("pretrain --data npy --data-dir {tmp}/floats.npy", 2, "uint8"),
    ("pretrain --data npy --data-dir {tmp}/flat.npy", 2, "found (10, 8)"),
    ("pretrain --config {tmp}/bad.toml", 2, "bad.toml"),
    ("pretrain --config {tmp}/unknown.toml", 2, "unknown setting 'learning_rate'"),
    ("pretrain --crop-min-scale 0.9 --crop-max-scale 0.5", 2, "must not exceed"),
    ("pretrain --out /proc/crlf-run", 2, "cannot write the run directory"),
    ("extract --ckpt {tmp}/truncated.safetensors --out {tmp}/e.npy", 2, "not a readable safetensors file"),
    ("extract --ckpt {tmp}/foreign.safetensors --out {tmp}/e.npy", 2, "not a crlf checkpoint"),
    ("extract --ckpt {tmp}/r18_as_r34.safetensors --out {tmp}/e.npy", 2, "does not match a resnet34"),
    ("extract --ckpt {tmp}/good.safetensors --out {tmp}/missing/e.npy", 2, "does not exist"),
    ("extract --ckpt {tmp}/good.safetensors --out /proc/e.npy", 2, "cannot write"),
    ("linear-eval --ckpt {tmp}/good.safetensors --train-emb {tmp}/x.npy --test-emb {tmp}/y.npy", 2, "not both"),
    ("knn-eval --train-emb {tmp}/missing.npy --test-emb {tmp}/missing.npy", 2, "does not exist"),
    ("visualize --run {tmp}/empty --kind loss", 2, "metrics.jsonl"),
]


@pytest.mark.parametrize("line,code,fragment", BAD, ids=[b[0].split(" --")[0] + ":" + b[2][:20] for b in BAD])
def test_bad_input_table(tmp_path, line, code, fragment):
    """In-process through the real Typer app (a subprocess per row would cost minutes of torch imports; the
    subprocess behaviour of the same handler is covered in test_cli.py)."""
    from typer.testing import CliRunner

    from crlf.cli import app

    _bad_inputs(tmp_path)
    args = line.replace("{tmp}", str(tmp_path)).split()
    defaults = ["--device", "cpu"] + (
        ["--out", str(tmp_path / "run")] if args[0] == "pretrain" and "--out" not in args else []
    )
    r = CliRunner().invoke(app, [*args, *defaults])
    lines = r.stderr.strip().splitlines()
    assert r.exit_code == code and r.stdout == "" and "Traceback" not in r.stderr, r.stderr
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    assert lines and lines[-1].startswith("error: ") and fragment in lines[-1], r.stderr
    assert not (tmp_path / "e.npy").exists() and not RunDir(tmp_path / "run").has_run()


def test_corrupt_and_non_image_files_are_skipped_and_counted(tmp_path):
    from typer.testing import CliRunner

    from crlf.cli import app

    _bad_inputs(tmp_path)
    args = [
        "pretrain",
        "--data",
        "folder",
        "--data-dir",
        tmp_path / "junk",
        "--image-size",
        "8",
        "--batch-size",
        "10",
        "--epochs",
        "1",
        "--head-hidden",
        "16",
        "--head-out",
        "8",
        "--device",
        "cpu",
        "--out",
        tmp_path / "run",
        "--json",
    ]
    r = CliRunner().invoke(app, list(map(str, args)))  # in-process: the CLI's own output, without a torch import
    assert r.exit_code == 0, r.stderr
    warnings = [line for line in r.stderr.splitlines() if "warning:" in line]
    assert len(warnings) == 1 and "2" in warnings[0] and "skipped" in warnings[0], r.stderr
    assert json.loads(r.stdout)["status"] == "trained"


# --- security --------------------------------------------------------------------------------------------------
def test_no_pickle_and_no_shell_anywhere_in_the_package():
    """Only the restricted CIFAR unpickler and torch's weights_only unpickler (--init .pth files) may touch pickle;
    nothing runs a shell or interpolates paths into one."""
    package = Path(checkpoint.__file__).parents[1]
    lines = [(p.name, line) for p in package.rglob("*.py") for line in p.read_text().splitlines()]
    loads = [(name, line) for name, line in lines if "torch.load(" in line]
    assert loads and all("weights_only=True" in line for _, line in loads), loads
    forbidden = [
        r"allow_pickle=True",
        r"pickle\.loads?\(",
        r"os\.system\(",
        r"os\.popen\(",
        r"shell=True",
        r"\bsubprocess\b",
        r"(?<![\w.])eval\(",
        r"(?<![\w.])exec\(",
    ]
    for path in package.rglob("*.py"):
        text = path.read_text()
        for pattern in forbidden:
            assert not re.search(pattern, text), f"{path.name} matches {pattern}"
    assert "pickle.Unpickler" in (package / "engine" / "sources" / "builtin.py").read_text()  # the one, restricted
