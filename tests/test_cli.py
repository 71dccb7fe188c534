"""The `crlf` command as a subprocess (`python -m crlf` of this interpreter: no PATH lookup, so nothing skips in a
fresh venv; the console-script declaration is checked separately): exit codes, stdout discipline, precedence."""

import json
import os
import subprocess
import sys

import pytest
import tomllib

from crlf.engine.progress import StartInfo

CRLF = [sys.executable, "-m", "crlf"]
TINY = [
    "--limit",
    "64",
    "--image-size",
    "8",
    "--batch-size",
    "16",
    "--head-hidden",
    "32",
    "--head-out",
    "16",
    "--device",
    "cpu",
]


def crlf(*args, env=None, cwd=None, timeout=300):
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("CRLF_")}
    full_env.update(env or {})
    return subprocess.run(
        [*CRLF, *map(str, args)], capture_output=True, text=True, env=full_env, cwd=cwd, timeout=timeout
    )


def one_error_line(result, fragment):
    """Nothing on stdout, no traceback, and exactly one error line (the last) that holds `fragment`."""
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0] and fragment in errors[0], result.stderr


def test_help_and_version():
    r = crlf("--help")
    assert r.returncode == 0
    for name in ("pretrain", "extract", "linear-eval", "knn-eval", "visualize"):
        assert name in r.stdout
    r = crlf("--version")
    assert r.returncode == 0 and r.stdout.startswith("crlf ")
    from importlib.metadata import entry_points

    from crlf.cli import main

    (script,) = entry_points(group="console_scripts", name="crlf")  # what pip puts on PATH as `crlf`
    assert script.load() is main


def test_pretrain_help_lists_every_setting():
    from crlf.settings import PretrainSettings

    r = crlf("pretrain", "--help", env={"COLUMNS": "200"})
    assert r.returncode == 0
    for name in PretrainSettings.model_fields:
        assert "--" + name.replace("_", "-") in r.stdout, name


def test_pretrain_json_on_npy(tmp_path, tiny_npy):
    out = tmp_path / "run"
    r = crlf("pretrain", "--data", "npy", "--data-dir", tiny_npy, "--epochs", "2", "--out", out, "--json", *TINY)
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)  # stdout is exactly one JSON document
    assert summary["status"] == "trained" and summary["epochs"] == 2 and summary["device"] == "cpu"
    assert (out / "encoder.safetensors").is_file() and (out / "last.safetensors").is_file()
    assert "epoch 2/2" in r.stderr and "\x1b[" not in r.stderr  # plain lines, no ANSI codes off a terminal
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2

    again = crlf(
        "pretrain", "--data", "npy", "--data-dir", tiny_npy, "--epochs", "2", "--out", out, "--resume", "--json", *TINY
    )
    assert again.returncode == 0 and json.loads(again.stdout)["status"] == "complete"
    refused = crlf("pretrain", "--data", "npy", "--data-dir", tiny_npy, "--epochs", "2", "--out", out, *TINY)
    assert refused.returncode == 2 and "--resume" in refused.stderr


def test_nothing_on_stdout_without_json(tmp_path, tiny_npy):
    r = crlf("pretrain", "--data", "npy", "--data-dir", tiny_npy, "--epochs", "1", "--out", tmp_path / "run", *TINY)
    assert r.returncode == 0, r.stderr
    assert r.stdout == ""
    assert "done: 1 epoch," in r.stderr  # not "1 epochs"
    q = crlf(
        "pretrain", "--data", "npy", "--data-dir", tiny_npy, "--epochs", "1", "--out", tmp_path / "q", "--quiet", *TINY
    )
    assert q.returncode == 0 and q.stdout == "" and q.stderr == ""


@pytest.mark.parametrize(
    "args,fragment",
    [
        (["--epochs", "0"], "epochs"),
        (["--temperature", "0"], "temperature"),
        (["--temperature", "-0.5"], "temperature"),
        (["--device", "tpu"], "unknown device 'tpu'"),
        (["--image-size", "0"], "image-size"),
        (["--data", "folder"], "needs --data-dir"),
        (["--data", "folder", "--data-dir", "/nonexistent/photos"], "'/nonexistent/photos' does not exist"),
        (["--data", "folder", "--data-dir", "{tmp}", "--split", "test"], "'{tmp}' has no test/ sub-folder"),
        (["--data", "cifar10", "--data-dir", "{tmp}", "--no-download"], "CIFAR-10 not found in '{tmp}'"),
        (["--data", "cifar10", "--no-download"], "CIFAR-10 not found in './data'"),  # the default, in the cwd
        (["--batch-size", "5000", "--limit", "100"], "larger than the data set"),
        (["--config", "{tmp}/missing.toml"], "missing.toml"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, monkeypatch, args, fragment):
    """In-process through the real Typer app: a subprocess per row would only add torch imports (the same handler as
    a subprocess: test_unknown_flag_is_usage_error, test_diverging_loss_exits_1, test_locked_run_dir_exits_75)."""
    import logging

    from typer.testing import CliRunner

    from crlf.cli import app

    for key in [k for k in os.environ if k.startswith("CRLF_")]:
        monkeypatch.delenv(key)
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    fragment = fragment.replace("{tmp}", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    logger = logging.getLogger("crlf")
    handlers, level, propagate = logger.handlers[:], logger.level, logger.propagate
    try:
        out = CliRunner().invoke(app, ["pretrain", "--out", str(tmp_path / "run"), "--device", "cpu", *args])
    finally:  # the CLI routes crlf's loggers to its stderr console; give them back to pytest
        logger.handlers[:] = handlers
        logger.setLevel(level)
        logger.propagate = propagate
    assert out.exception is None or isinstance(out.exception, SystemExit), repr(out.exception)
    r = subprocess.CompletedProcess(args, out.exit_code, out.stdout, out.stderr)
    assert r.returncode == 2
    one_error_line(r, fragment)
    from crlf.engine.rundir import RunDir

    assert not RunDir(tmp_path / "run").has_run()  # nothing half-made that a later run would trip over


def test_unknown_flag_is_usage_error():
    r = crlf("pretrain", "--epoch", "3")
    assert r.returncode == 2 and r.stdout == "" and "Traceback" not in r.stderr


def test_unavailable_cuda_is_a_clear_error(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    one_error_line(
        crlf("pretrain", "--device", "cuda", "--out", tmp_path / "run", "--limit", "64", "--batch-size", "32"),
        "no CUDA GPU",
    )


def test_print_config_precedence_and_round_trip(tmp_path):
    cfg = tmp_path / "exp.toml"
    cfg.write_text('epochs = 7\nbatch_size = 64\ntemperature = 0.3\n[pretrain]\noptimizer = "adam"\n')
    r = crlf(
        "pretrain",
        "--config",
        cfg,
        "--batch-size",
        "16",
        "--print-config",
        env={"CRLF_EPOCHS": "3", "CRLF_BATCH_SIZE": "32"},
    )
    assert r.returncode == 0, r.stderr
    resolved = tomllib.loads(r.stdout)
    assert (resolved["epochs"], resolved["batch_size"], resolved["temperature"], resolved["optimizer"]) == (
        3,
        16,
        0.3,
        "adam",
    )
    back = tmp_path / "back.toml"
    back.write_text(r.stdout)
    again = crlf("pretrain", "--config", back, "--print-config", "--json")
    printed = json.loads(again.stdout)
    assert again.returncode == 0 and printed.pop("resolved") == {"device": "cpu", "precision": "fp32"}
    assert printed == {**resolved, **{k: None for k in printed if k not in resolved}}


def test_invalid_toml_and_unknown_key(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("epochs = = 3\n")
    one_error_line(crlf("pretrain", "--config", bad, "--print-config"), "not valid TOML")
    bad.write_text("epocs = 3\n")
    one_error_line(crlf("pretrain", "--config", bad, "--print-config"), "unknown setting 'epocs'")


def test_sigterm_saves_exits_143_and_resume_finishes(tmp_path, tiny_npy):
    import signal
    import time

    out = tmp_path / "run"
    args = ["pretrain", "--data", "npy", "--data-dir", tiny_npy, "--epochs", "50", "--out", out, *TINY]
    env = {k: v for k, v in os.environ.items() if not k.startswith("CRLF_")}
    pipe = subprocess.PIPE
    proc = subprocess.Popen([*CRLF, *map(str, args)], stdout=pipe, stderr=pipe, text=True, env=env)
    deadline = time.monotonic() + 240
    while not (out / "metrics.jsonl").is_file() and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr
    assert stdout == "" and "Traceback" not in stderr and "--resume" in stderr
    from crlf.engine.rundir import RunDir

    done = RunDir(out).progress()["epoch"]
    assert 1 <= done < 50
    r = crlf(*args[:6], "2", *args[7:], "--resume", "--json")  # finish early: --epochs 2
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["status"] in ("trained", "complete")


def test_diverging_loss_exits_1(tmp_path):
    r = crlf("pretrain", "--out", tmp_path / "run", "--lr", "1e12", "--warmup-epochs", "0", "--epochs", "2", *TINY)
    assert r.returncode == 1
    one_error_line(r, "loss became nan in epoch 1; no checkpoint was written")
    assert not (tmp_path / "run" / "encoder.safetensors").exists()


def test_locked_run_dir_exits_75(tmp_path):
    from crlf.engine.rundir import RunDir

    with RunDir(tmp_path / "run").locked():
        r = crlf("pretrain", "--out", tmp_path / "run", "--device", "cpu")
    assert r.returncode == 75
    one_error_line(r, f"PID {os.getpid()}")


def test_pretrain_help_is_short_common_first_with_env_names_and_choices():
    """In-process: the common options lead, every setting shows its CRLF_* variable, --precision its choices, no flag
    shows a <bool> type, and the page stays well under its former 185 lines at 80 columns."""
    from typer.testing import CliRunner

    from crlf.cli import app
    from crlf.settings import PretrainSettings

    r = CliRunner().invoke(app, ["pretrain", "--help"], env={"COLUMNS": "80"})
    assert r.exit_code == 0, r.output
    text = r.output
    lines = text.splitlines()
    # 185 lines for 44 settings before (4.2 a setting); the CRLF_* names included, now at most 3.5
    assert len(lines) <= 3.5 * len(PretrainSettings.model_fields) and max(map(len, lines)) <= 80
    assert "<bool>" not in text and "<str>" not in text
    panels = [line.split("─ ")[1].split(" ─")[0] for line in lines if line.startswith("╭─ ")]
    assert panels[0] == "Options" and panels[-1] == "Output"
    first = text[: text.index("╭─ Data")]
    for flag in ("--data ", "--data-dir", "--epochs", "--batch-size", "--device", "--out", "--resume", "--json"):
        assert flag in first, flag
    flat = " ".join(line.strip("│ ") for line in lines)  # help text wraps; join the lines of the page
    for name in PretrainSettings.model_fields:
        assert f"CRLF_{name.upper()}" in flat.replace(" ", "").replace("│", ""), name
    precision = flat[flat.index("--precision") :][:200]
    assert all(c in precision for c in ("auto", "bf16", "fp32"))
    assert "[default: 100]" in flat and "(100)" not in flat


def test_help_does_not_read_settings_from_the_environment_itself(monkeypatch):
    """Typer shows the CRLF_* names but pydantic-settings alone reads them (flag > env > config > default)."""
    from typer.testing import CliRunner

    from crlf.cli import app

    r = CliRunner().invoke(
        app,
        ["pretrain", "--print-config", "--json", "--batch-size", "64"],
        env={"CRLF_EPOCHS": "7", "CRLF_BATCH_SIZE": "32", "CRLF_PRECISION": "bf16"},
    )
    assert r.exit_code == 0, r.output
    resolved = json.loads(r.stdout)
    assert resolved["epochs"] == 7 and resolved["batch_size"] == 64 and resolved["precision"] == "bf16"
    bad = CliRunner().invoke(app, ["pretrain", "--print-config", "--precision", "fp8"])
    assert bad.exit_code == 2 and "precision" in bad.output


@pytest.mark.parametrize(
    "args, line",
    [
        (["pretrain", "--epoch", "3"], "no such option: --epoch (did you mean --epochs?); see 'crlf pretrain --help'"),
        (["pretrian"], "no such command 'pretrian' (did you mean 'pretrain'?); see 'crlf --help'"),
        (["--bogus"], "no such option: --bogus; see 'crlf --help'"),
        (["extract", "foo"], "got unexpected extra argument(s) (foo); see 'crlf extract --help'"),
        (["pretrain", "--epochs", "x"], "invalid value for '--epochs': "),
        (["pretrain", "--epochs"], "option '--epochs' requires an argument"),
    ],
)
def test_usage_errors_are_one_line_on_stderr_and_exit_2(args, line, capsys):
    from crlf.cli import main

    with pytest.raises(SystemExit) as stop:
        main(args)
    out, err = capsys.readouterr()
    assert stop.value.code == 2 and out == ""
    assert err.startswith("error: " + line) and err.count("\n") == 1, err


def test_unknown_flag_from_the_entry_point_is_one_line():
    r = crlf("pretrain", "--epoch", "3")
    assert r.returncode == 2
    one_error_line(r, "no such option: --epoch (did you mean --epochs?)")


def test_bare_crlf_still_shows_the_help(capsys):
    from crlf.cli import main

    with pytest.raises(SystemExit) as stop:
        main([])
    assert stop.value.code == 2 and "pretrain" in capsys.readouterr().out
    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0 and capsys.readouterr().out.startswith("crlf ")


# --- progress and results on stderr (in-process, a fake console) -------------------------------------------------
@pytest.fixture
def fake_console(monkeypatch):
    """output's stderr console replaced by one writing to a buffer; terminal=True/False chooses bars or plain lines."""
    import io

    from rich.console import Console

    from crlf import output

    def make(terminal):
        buf = io.StringIO()
        monkeypatch.setattr(output, "console", Console(file=buf, force_terminal=terminal, width=120, highlight=False))
        output.setup_logging()
        return buf

    yield make
    output.setup_logging()


class CountingLoss:
    """Stands in for the loop's device tensor: counts the host reads."""

    def __init__(self):
        self.reads, self.value = 0, 0.0

    def __float__(self):
        self.reads += 1
        return self.value


def test_training_bar_per_epoch_with_live_stats_eta_and_resume_totals(fake_console):
    from crlf import output

    fake_console(True)
    r = output.TrainingReporter(live_every=3600)
    r.on_start(StartInfo(epochs=4, start_epoch=1, start_step=3, steps=5, batch_size=8, images=40))
    try:
        assert r.progress is not None and r.progress.live.auto_refresh  # a refresh thread keeps the clock moving
        run, epoch = (r.progress._tasks[t] for t in (r.run_task, r.task))
        assert (run.completed, run.total, epoch.completed, epoch.total) == (1, 4, 3, 5)  # resumed at epoch 2, step 3
        loss = CountingLoss()
        for step in (4, 5):
            loss.value += 2.0
            r.on_step(1, step, 5, loss_sum=loss, lr=0.25)
        assert loss.reads == 1  # the first step reads; then at most once per live_every seconds
        assert "loss 0.5000" in epoch.fields["stats"] and "lr 0.25" in epoch.fields["stats"]
        assert "img/s" in epoch.fields["stats"]
        assert run.fields["eta_at"] is not None and epoch.completed == 5  # an ETA after a single step
        r.on_epoch({"epoch": 2})
        assert run.completed == 2 and epoch.completed == 0 and epoch.description == "epoch 3/4"
    finally:
        r.close()
    assert r.progress is None


def test_training_plain_lines_read_the_loss_only_when_printing(fake_console):
    from crlf import output

    buf = fake_console(False)
    loss = CountingLoss()
    quiet = output.TrainingReporter(quiet=True, log_every=0)
    quiet.on_start(StartInfo(epochs=1, start_epoch=0, steps=3, batch_size=4))
    quiet.on_step(0, 1, 3, loss_sum=loss, lr=0.1)
    assert loss.reads == 0 and buf.getvalue() == ""
    plain = output.TrainingReporter(log_every=0)
    plain.on_start(StartInfo(epochs=1, start_epoch=0, steps=3, batch_size=4))
    assert plain.progress is None
    loss.value = 3.0
    plain.on_step(0, 1, 3, loss_sum=loss, lr=0.1)
    line = buf.getvalue()
    assert "\x1b" not in line and "epoch 1/1  step 1/3  loss 3.0000  lr 0.1" in line and "eta 0:00:" in line
    assert line[:4].isdigit() and line[10] == "T"  # timestamped


def test_task_progress_bars_close_and_plain_lines(fake_console):
    from crlf import output
    from crlf.engine import progress

    fake_console(True)
    with output.engine_progress() as hook:
        assert progress.hook is hook
        progress.report("embedding", 2, 4)
        progress.report("t-SNE", 0, 0)  # unknown length: a spinner and the clock
        assert set(hook.tasks) == {"embedding", "t-SNE"} and hook.progress is not None
        progress.report("embedding", 4, 4)
        progress.report("t-SNE", 1, 1)
        assert hook.tasks == {} and hook.progress is None  # the transient bar is gone with its last task
    assert progress.hook is None
    buf = fake_console(False)
    with output.engine_progress(log_every=0):
        progress.report("linear probe epoch", 0, 10)
        progress.report("linear probe epoch", 5, 10)
        progress.report("linear probe epoch", 10, 10)
    text = buf.getvalue()
    assert "linear probe epoch: 5 of 10, eta" in text and "\x1b" not in text
    with output.engine_progress(quiet=True):
        progress.report("kNN", 1, 2)
    assert buf.getvalue() == text


KNN_RESULT = {
    "protocol": "knn",
    "train_size": 1438,
    "test_size": 359,
    "dim": 512,
    "class_names": ["a", "b"],
    "summary": [{"fraction": 1.0, "runs": 1, "top1_mean": 91.5, "top1_std": 0, "top5_mean": 99.0, "top5_std": 0}],
    "runs": [{"fraction": 1.0, "seed": 0, "top1": 91.5, "top5": 99.0, "k": 20, "temperature": 0.07}],
}


def test_results_are_plain_timestamped_lines_off_a_terminal_and_show_knn_k(fake_console):
    from crlf import output

    buf = fake_console(False)
    output.results_table({**KNN_RESULT, "per_class": [90.0, None]})
    lines = buf.getvalue().splitlines()
    assert all(line[:4].isdigit() and line[10] == "T" for line in lines), lines
    assert not any(c in buf.getvalue() for c in "┏━│╭\x1b")
    assert "k 20, temperature 0.07" in lines[0] and "top-1 91.50%" in lines[1] and "a 90.0, b -" in lines[2]
    buf = fake_console(True)
    output.results_table(KNN_RESULT)
    table = buf.getvalue()
    assert "k 20, temperature 0.07" in table and " 20 " in table and " 0.07 " in table
    assert "label fraction" not in table  # kNN has neither label fractions nor runs: its columns are k, temperature


def test_second_ctrl_c_shows_the_cursor_again_on_a_terminal():
    """The hard abort (os._exit from the watcher thread) skips Rich's cleanup: it shows the cursor itself."""
    import pty

    code = (
        "import os, signal; from crlf.engine.signals import StopFlag; r, w = os.pipe(); "
        "os.write(w, bytes([signal.SIGINT, signal.SIGINT])); StopFlag._watch(r)"
    )
    main, child = pty.openpty()
    proc = subprocess.run([sys.executable, "-c", code], stderr=child, stdout=subprocess.DEVNULL, timeout=60)
    os.close(child)
    seen = os.read(main, 4096)
    os.close(main)
    assert proc.returncode == 130 and b"\x1b[?25h" in seen and b"second Ctrl-C" in seen
    piped = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
    assert piped.returncode == 130 and b"\x1b" not in piped.stderr  # not a terminal: no escape codes


# --- SIGTERM outside the training loop, binary on a terminal, kNN's k ------------------------------------------
def test_sigterm_stops_extract_with_143_and_one_line(reference_run):
    """extract died by the signal (-15) where pretrain exits 143 with a line. The child blocks writing the .npy to a
    pipe nobody reads: its first bytes say that it is at work, with no timing guess."""
    import signal

    env = {k: v for k, v in os.environ.items() if not k.startswith("CRLF_")}
    args = ["extract", "--ckpt", reference_run.path / "encoder.safetensors", "--limit", "200", "--out", "-"]
    pipe = subprocess.PIPE
    proc = subprocess.Popen([*CRLF, *map(str, args), "--device", "cpu"], stdout=pipe, stderr=pipe, env=env)
    try:
        assert proc.stdout.read(6) == b"\x93NUMPY"  # 200 x 512 float32 rows: far more than a pipe holds
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 143, stderr
    one_error_line(subprocess.CompletedProcess(args, 143, "", stderr.decode()), "stopped by SIGTERM")


class _UnhandledSigterm(BaseException):
    """SIGTERM reached the test's own handler: the CLI had none installed."""


@pytest.fixture
def sigterm_fallback():
    """A SIGTERM handler of the test's while it runs, so that a CLI without its own fails the test instead of
    killing pytest; yields it (the CLI must restore it)."""
    import signal

    def unhandled(signum, frame):
        raise _UnhandledSigterm

    before = signal.signal(signal.SIGTERM, unhandled)
    yield unhandled
    signal.signal(signal.SIGTERM, before)


def _stopped_by_sigterm(*args, **kwargs):
    """An engine call that gets SIGTERM (as from `kill`) while it works."""
    import signal

    os.kill(os.getpid(), signal.SIGTERM)
    raise AssertionError("SIGTERM did not stop the work")


@pytest.mark.parametrize(
    "target,args",
    [
        ("crlf.engine.train.pretrain", ["pretrain"]),
        ("crlf.commands.extract.extract", ["extract", "--ckpt", "e.safetensors", "--out", "e.npy"]),
        ("crlf.commands.evaluate.linear_eval", ["linear-eval", "--ckpt", "e.safetensors"]),
        ("crlf.commands.evaluate.knn_eval", ["knn-eval", "--ckpt", "e.safetensors"]),
        ("crlf.commands.visualize.visualize", ["visualize", "--run", "r"]),
        ("crlf.commands.explore.open_space", ["explore", "--emb", "e.npy", "--port", "0"]),
    ],
)
def test_every_subcommand_exits_143_on_sigterm(monkeypatch, sigterm_fallback, target, args):
    import signal

    from inprocess import run_crlf

    monkeypatch.setattr(target, _stopped_by_sigterm)
    r = run_crlf(*args, "--device", "cpu")
    assert r.returncode == 143 and r.stdout == "" and r.stderr.endswith("error: stopped by SIGTERM\n"), r.stderr
    assert signal.getsignal(signal.SIGTERM) is sigterm_fallback  # the handler is the CLI's only while it runs


def test_sigterm_is_reported_when_c_code_swallows_its_exception(monkeypatch, sigterm_fallback):
    """numpy's file writer turns the handler's exception into its own OSError('seeking file failed'): still 143."""
    from inprocess import run_crlf

    def swallowed(*args, **kwargs):
        try:
            _stopped_by_sigterm()
        except BaseException:
            raise OSError("seeking file failed") from None

    monkeypatch.setattr("crlf.commands.extract.extract", swallowed)
    r = run_crlf("extract", "--ckpt", "e.safetensors", "--out", "-", "--device", "cpu")
    assert r.returncode == 143 and r.stderr.endswith("error: stopped by SIGTERM\n"), r.stderr


def test_sigterm_during_extract_leaves_no_file(reference_run, tmp_path, monkeypatch, sigterm_fallback):
    """The signal lands half way through writing the .npy: neither it nor its temp file remains."""
    from inprocess import run_crlf

    from crlf.engine import embedfile, files

    def write_half(path, write):
        def half(f):
            f.write(b"\x93NUMPY half")
            _stopped_by_sigterm()

        files.atomic_write(path, half)

    monkeypatch.setattr(embedfile, "atomic_write", write_half)
    out = tmp_path / "e.npy"
    r = run_crlf("extract", "--ckpt", reference_run.path / "encoder.safetensors", "--limit", "16", "--out", out,
                 "--device", "cpu")  # fmt: skip
    assert r.returncode == 143 and "error: stopped by SIGTERM" in r.stderr, r.stderr
    assert os.listdir(tmp_path) == []


def test_extract_refuses_to_write_binary_to_a_terminal(monkeypatch, capsys):
    """`--out -` on a terminal garbled it with .npy bytes; gzip refuses the same."""
    import io
    import pty

    from crlf.cli import main

    parent, child = pty.openpty()
    terminal = io.TextIOWrapper(open(child, "wb", buffering=0))
    try:
        monkeypatch.setattr(sys, "stdout", terminal)
        with pytest.raises(SystemExit) as stop:
            main(["extract", "--ckpt", "e.safetensors", "--out", "-", "--device", "cpu"])
    finally:
        monkeypatch.undo()
        terminal.close()
        os.close(parent)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1 and "stdout, which is a terminal: redirect it" in err, err


def test_knn_eval_says_when_k_is_lowered_to_the_train_size(tmp_path):
    import numpy as np
    from inprocess import run_crlf

    rng = np.random.default_rng(0)
    for name, n in (("train", 12), ("test", 6)):
        np.savez(
            tmp_path / f"{name}.npz",
            embeddings=rng.normal(size=(n, 4)).astype(np.float32),
            labels=np.arange(n) % 2,
            ids=np.array([str(i) for i in range(n)]),
            class_names=np.array(["a", "b"]),
            provenance=np.array("{}"),
        )
    r = run_crlf("knn-eval", "--train-emb", tmp_path / "train.npz", "--test-emb", tmp_path / "test.npz",
                 "-k", "100000", "--json")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["runs"][0]["k"] == 12
    assert "warning: -k 100000 is more than the 12 training images: using k = 12" in r.stderr
    missing = run_crlf("knn-eval", "--train-emb", tmp_path / "one", "--test-emb", tmp_path / "test.npz")
    assert missing.returncode == 2 and f"error: {str(tmp_path / 'one')!r} does not exist" in missing.stderr  # a name
