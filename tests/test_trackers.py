"""--logger tensorboard / mlflow / wandb: the points read back through each tool's own reader, equal to
metrics.jsonl; interrupted and resumed runs (points written after the last checkpoint, as a kill -9 leaves them)
end with exactly the uninterrupted run's points in the same tracker run; a missing package and a failing tracker."""

from __future__ import annotations

import json
import logging
import os
import sys

import pytest
import torch
from inprocess import run_crlf
from torch import nn

from crlf import PretrainSettings, pretrain, settings
from crlf.engine import backbones, runhooks, trackers
from crlf.engine.encoder import Encoder
from crlf.engine.rundir import RunDir
from crlf.options import RunSettings

STEPS = 4  # 32 images, batch 8


@pytest.fixture(autouse=True)
def _local_only(monkeypatch):
    for key in [k for k in os.environ if k.startswith(("CRLF_", "MLFLOW_", "WANDB_"))]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # what the backend sets for its own local store


def tiny(out, **overrides) -> PretrainSettings:
    values = dict(data="digits", limit=32, image_size=8, batch_size=8, epochs=3, head_hidden=16, head_out=8,
                  head_dropout=0.1, device="cpu", lr=0.1, log_every_steps=3, out=out)  # fmt: skip
    return PretrainSettings(**{**values, **overrides})


def net() -> nn.Module:
    """A backbone small enough that the trackers, not the steps, are what a run spends its time on."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())


def train(s: PretrainSettings, reporter=None, **kwargs) -> dict:
    return pretrain(s, reporter, backbone=net(), **kwargs)


class StopAt:
    """Raises KeyboardInterrupt after global step `step`: no checkpoint of that epoch, but the trackers' points up to
    it are written (closing flushes them), as a process killed after a flush leaves them."""

    def __init__(self, step: int):
        self.step = step

    def on_start(self, info): ...
    def on_epoch(self, metrics): ...

    def on_step(self, epoch, step, steps, **running):
        if epoch * steps + step == self.step:
            raise KeyboardInterrupt


def scalars(run) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series of RUN/tb as TensorBoard shows it (purged points gone)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def mlflow_history(run) -> tuple[str, dict[str, list[tuple[int, float]]]]:
    from mlflow.tracking import MlflowClient

    run_id = json.loads((run / "trackers.json").read_text())["runs"]["mlflow"]["run_id"]
    client = MlflowClient(tracking_uri=(run / "mlruns").resolve().as_uri())
    keys = client.get_run(run_id).data.metrics
    return run_id, {k: sorted((m.step, m.value) for m in client.get_metric_history(run_id, k)) for k in keys}


def test_points_equal_metrics_jsonl_and_survive_interruptions_exactly(tmp_path, monkeypatch):
    full = tmp_path / "full"
    train(tiny(full, logger=["tensorboard", "mlflow"]))
    epochs = RunDir(full).read_metrics()
    tb = scalars(full)
    assert tb["epoch/loss"] == [(e["epoch"] * STEPS, pytest.approx(e["loss"], abs=1e-6)) for e in epochs]
    assert [s for s, _ in tb["epoch/lr"]] == [4, 8, 12] and [s for s, _ in tb["step/loss"]] == [3, 6, 9, 12]
    assert tb["step/loss"] != tb["epoch/loss"]  # the step's own loss, not the epoch's mean
    _, history = mlflow_history(full)
    assert history["epoch/loss"] == [(e["epoch"] * STEPS, pytest.approx(e["loss"], abs=1e-6)) for e in epochs]

    # 1. stopped in epoch 2 after step 7: point 6 was written after epoch 1's checkpoint
    part = tmp_path / "part"
    with pytest.raises(KeyboardInterrupt):
        train(tiny(part, logger=["tensorboard", "mlflow"]), StopAt(7))
    first_id, _ = mlflow_history(part)
    assert 6 in [s for s, _ in scalars(part)["step/loss"]]
    # 2. resumed; stopped again between epoch 3's points (flushed) and its checkpoint
    save = runhooks.RunHooks._save

    def killed_before_checkpoint(self, epoch, progress):
        if epoch == 3:
            raise KeyboardInterrupt
        save(self, epoch, progress)

    with monkeypatch.context() as patched, pytest.raises(KeyboardInterrupt):
        patched.setattr(runhooks.RunHooks, "_save", killed_before_checkpoint)
        train(tiny(part, logger=["tensorboard", "mlflow"]), resume=True)
    assert RunDir(part).finished_epoch() == 2 and [s for s, _ in scalars(part)["epoch/loss"]] == [4, 8, 12]
    # 3. resumed to the end: every point once, at the uninterrupted run's steps, with its values (CPU: exact)
    train(tiny(part, logger=["tensorboard", "mlflow"]), resume=True)
    assert len(list((part / "tb").glob("events.out.tfevents.*"))) == 3
    timing = ("epoch/images_per_s", "epoch/seconds")
    got = scalars(part)
    assert got.keys() == tb.keys()
    assert {k: v for k, v in got.items() if k not in timing} == {k: v for k, v in tb.items() if k not in timing}
    assert {k: [s for s, _ in v] for k, v in got.items()} == {k: [s for s, _ in v] for k, v in tb.items()}
    run_id, resumed = mlflow_history(part)
    assert run_id == first_id  # one MLflow run across the three sessions
    drop = lambda series: {k: v for k, v in series.items() if k not in timing}  # noqa: E731
    assert drop(resumed) == drop(history)
    assert all(len({s for s, _ in v}) == len(v) for v in resumed.values())  # no step twice


def test_added_on_resume_force_starts_new_tracker_runs_and_eval_and_figures_join_the_run(tmp_path):
    out = tmp_path / "run"
    train(tiny(out, epochs=1))
    train(tiny(out, epochs=2, logger=["tensorboard", "mlflow"]), resume=True)  # epoch 1 comes from metrics.jsonl
    losses = [(e["epoch"] * STEPS, pytest.approx(e["loss"], abs=1e-6)) for e in RunDir(out).read_metrics()]
    assert scalars(out)["epoch/loss"] == losses and [s for s, _ in scalars(out)["step/loss"]] == [6]
    old_id, history = mlflow_history(out)
    assert history["epoch/loss"] == losses
    train(tiny(out, epochs=1, logger=["tensorboard", "mlflow"]), force=True)
    run_id, history = mlflow_history(out)
    assert run_id != old_id and [s for s, _ in history["epoch/loss"]] == [4]
    assert len(list((out / "tb").glob("events.out.tfevents.*"))) == 1  # the discarded run's events went with it
    # an encoder crlf can load by itself (the tiny run's needs its module), then the evaluation and a figure
    spec = backbones.spec_for("resnet18", 8, "cifar")
    Encoder(backbones.build(spec), spec, [0.5] * 3, [0.25] * 3, 1, {}).save(out / "encoder.safetensors")
    r = run_crlf("knn-eval", "--ckpt", out / "encoder.safetensors", "--data", "digits", "--limit", 32,
                 "--device", "cpu", "--json", "-q")  # fmt: skip
    assert r.returncode == 0, r.stderr
    top1 = json.loads(r.stdout)["top1"]
    assert run_crlf("visualize", "--run", out, "--kind", "loss", "-q").returncode == 0
    assert scalars(out)["eval/knn_top1"] == [(4, pytest.approx(top1, abs=1e-4))]
    same_id, history = mlflow_history(out)
    assert same_id == run_id and history["eval/knn_top1"] == [(4, pytest.approx(top1, abs=1e-4))]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(out / "mlruns").resolve().as_uri())
    assert [a.path for a in client.list_artifacts(run_id, "figures")] == ["figures/loss.png"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tb"), size_guidance={"images": 0})
    acc.Reload()
    assert acc.Tags()["images"] == ["figures/loss"]


def test_wandb_writes_an_offline_run_and_a_resume_reuses_its_id(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train(tiny(out, epochs=2, logger=["wandb"]), StopAt(6))
    run_id = json.loads((out / "trackers.json").read_text())["runs"]["wandb"]["id"]
    train(tiny(out, epochs=2, logger=["wandb"]), resume=True)
    assert json.loads((out / "trackers.json").read_text())["runs"]["wandb"]["id"] == run_id
    sessions = sorted((out / "wandb").glob("offline-run-*"))
    assert len(sessions) == 2 and all(p.name.endswith(run_id) for p in sessions)
    assert all((p / f"run-{run_id}.wandb").stat().st_size > 0 for p in sessions)


def test_a_missing_package_is_one_line_exit_2_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # import mlflow -> ImportError
    out = tmp_path / "run"
    r = run_crlf("pretrain", "--data", "digits", "--limit", 32, "--device", "cpu", "--logger", "mlflow", "--out", out)
    assert r.returncode == 2 and not out.exists()
    assert r.stderr.strip().count("\n") == 0 and 'pip install "crlf[mlflow]"' in r.stderr


class Failing:
    """A tracker whose disk fills up at its third point."""

    name, package = "tensorboard", "json"
    points: list[int] = []

    def start(self, run_dir, config, resume_step, recorded):
        return {}

    def log(self, metrics, step):
        if len(Failing.points) == 2:
            raise OSError(28, "No space left on device")
        Failing.points.append(step)

    def log_figure(self, name, path, step): ...
    def flush(self): ...
    def close(self, status): ...


def test_a_failing_tracker_warns_once_and_the_run_completes(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(trackers.REGISTRY, "tensorboard", Failing)
    Failing.points = []
    out = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="crlf"):
        summary = train(tiny(out, logger=["tensorboard"], log_every_steps=1))
    warnings = [r.getMessage() for r in caplog.records if "tracker failed" in r.getMessage()]
    assert len(warnings) == 1 and "No space left" in warnings[0], warnings
    assert Failing.points == [1, 2] and summary["epochs_run"] == 3 and (out / "encoder.safetensors").is_file()
    assert len(RunDir(out).read_metrics()) == 3


def test_logger_is_a_list_setting_everywhere_and_its_names_are_the_registry(tmp_path, monkeypatch):
    choices = RunSettings.model_fields["logger"].annotation.__args__[0].__args__
    assert set(choices) == set(trackers.REGISTRY)
    monkeypatch.setenv("CRLF_LOGGER", "tensorboard,wandb")
    assert settings.resolve(PretrainSettings, {}).logger == ["tensorboard", "wandb"]
    monkeypatch.delenv("CRLF_LOGGER")
    toml = tmp_path / "c.toml"
    toml.write_text('logger = ["mlflow"]\nlog_every_steps = 10\n')
    s = settings.resolve(PretrainSettings, {}, toml)
    assert s.logger == ["mlflow"] and s.log_every_steps == 10
    r = run_crlf("pretrain", "--logger", "tensorbord", "--print-config")
    assert r.returncode == 2 and "did you mean 'tensorboard'" in r.stderr
