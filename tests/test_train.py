"""The pretraining loop, in-process: learning, exact resume, divergence, run-directory rules."""

import json
import math
import os
import signal

import pytest
import torch

from crlf import PretrainSettings, load_encoder, pretrain
from crlf.engine.methods import simclr
from crlf.engine.rundir import RunDir
from crlf.errors import InputError, Interrupted, LockedError, RunError


@pytest.fixture(autouse=True)
def _no_crlf_env(monkeypatch):
    import os

    for key in [k for k in os.environ if k.startswith("CRLF_")]:
        monkeypatch.delenv(key)


def tiny(tmp_path, name="run", **overrides) -> PretrainSettings:
    """A small but real run: 64 digits at their native 8 px, ResNet-18, batch 16 (4 steps per epoch), on CPU."""
    values = dict(
        data="digits",
        limit=64,
        image_size=8,
        batch_size=16,
        epochs=2,
        head_hidden=64,
        head_out=32,
        device="cpu",
        out=tmp_path / name,
        cache_dir=tmp_path / "cache",
    )
    values.update(overrides)
    return PretrainSettings(**values)


class StopAfter:
    """A reporter that interrupts the run after `epochs` epochs, as a Ctrl-C at an epoch boundary would."""

    def __init__(self, epochs: int):
        self.epochs = epochs
        self.seen: list[dict] = []

    def on_start(self, info):
        self.info = info

    def on_step(self, epoch, step, steps, **running):
        pass

    def on_epoch(self, metrics):
        self.seen.append(metrics)
        if metrics["epoch"] >= self.epochs:
            raise KeyboardInterrupt


def weights(path):
    from safetensors.torch import load_file

    return load_file(str(path))


def test_loss_goes_down_and_run_dir_is_complete(tmp_path):
    s = tiny(tmp_path, epochs=6, lr=0.2, warmup_epochs=0, checkpoint_every=2, keep_checkpoints=2)
    summary = pretrain(s)
    run = RunDir(s.out)
    metrics = run.read_metrics()
    assert [m["epoch"] for m in metrics] == [1, 2, 3, 4, 5, 6]
    losses = [m["loss"] for m in metrics]
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0] - 0.05, losses
    assert summary["status"] == "trained" and summary["final_loss"] == losses[-1]
    assert json.loads(run.config.read_text())["epochs"] == 6
    assert sorted(p.name for p in run.checkpoints.iterdir()) == ["epoch-0004.safetensors", "epoch-0006.safetensors"]
    assert "epoch 6/6" in run.log_file.read_text()
    encoder = load_encoder(run.encoder)
    assert encoder.epoch == 6 and encoder.image_size == 8 and encoder.spec.stem == "cifar" and len(encoder.mean) == 3
    with torch.no_grad():
        feats = encoder.backbone(torch.rand(3, 3, 8, 8))
    assert feats.shape == (3, 512) and torch.isfinite(feats).all()


@pytest.mark.parametrize("optimizer,schedule", [("sgd", "cosine"), ("adam", "plateau"), ("lars", "none")])
def test_interrupted_then_resumed_equals_uninterrupted(tmp_path, optimizer, schedule):
    full = tiny(tmp_path, "full", epochs=2, optimizer=optimizer, schedule=schedule, head_dropout=0.1, head_layers=3)
    pretrain(full)

    part = tiny(tmp_path, "part", epochs=2, optimizer=optimizer, schedule=schedule, head_dropout=0.1, head_layers=3)
    with pytest.raises(KeyboardInterrupt):
        pretrain(part, StopAfter(1))
    assert RunDir(part.out).progress()["epoch"] == 1
    pretrain(part, resume=True)

    a, b = weights(full.out / "last.safetensors"), weights(part.out / "last.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed run differs from the uninterrupted one"
    strip = lambda ms: [{k: v for k, v in m.items() if k in ("epoch", "loss", "lr")} for m in ms]  # noqa: E731
    assert strip(RunDir(full.out).read_metrics()) == strip(RunDir(part.out).read_metrics())




@pytest.mark.parametrize(
    "sig,code,epoch,step",  # 4 steps an epoch: its first step, the middle, its last step, between two epochs
    [(signal.SIGTERM, 143, 2, 1), (signal.SIGINT, 130, 2, 2), (signal.SIGTERM, 143, 2, 4), (signal.SIGTERM, 143, 1, 0)],
)
def test_signal_mid_epoch_saves_and_resume_is_exact(tmp_path, reference_run, sig, code, epoch, step, signal_at):
    full = RunDir(reference_run.path)  # the same settings, uninterrupted (head dropout: torch's RNG state matters)
    part = reference_run.settings(tmp_path / "part")
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}  # SIG_IGN under nohup & co.
    with pytest.raises(Interrupted) as info:
        pretrain(part, signal_at(epoch=epoch, step=step, sig=sig))
    assert info.value.exit_code == code and "--resume" in str(info.value)
    assert {s: signal.getsignal(s) for s in handlers} == handlers  # the handlers from before are back
    progress = RunDir(part.out).progress()
    assert (progress["epoch"], progress["step"]) == ((epoch - 1, step) if step else (epoch, 1))
    pretrain(part, resume=True)
    a, b = weights(full.last), weights(part.out / "last.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a), (
        "a run stopped mid-epoch and resumed differs from the uninterrupted one"
    )
    timing = ("images_per_s", "seconds", "time")  # every other field of every epoch is the uninterrupted run's
    strip = lambda ms: [{k: v for k, v in m.items() if k not in timing} for m in ms]  # noqa: E731
    assert strip(full.read_metrics()) == strip(RunDir(part.out).read_metrics())


def test_different_seed_gives_different_weights(tmp_path):
    pretrain(tiny(tmp_path, "a", epochs=1, seed=1))
    pretrain(tiny(tmp_path, "b", epochs=1, seed=2))
    a, b = weights(tmp_path / "a" / "encoder.safetensors"), weights(tmp_path / "b" / "encoder.safetensors")
    assert not torch.equal(a["conv1.weight"], b["conv1.weight"])


def test_resume_rules(tmp_path):
    s = tiny(tmp_path, epochs=1)
    pretrain(s)
    with pytest.raises(InputError, match="already holds a run"):
        pretrain(s)
    assert pretrain(s, resume=True)["status"] == "complete"  # no-op
    with pytest.raises(InputError, match=r"batch_size: 16 -> 8"):
        pretrain(tiny(tmp_path, epochs=1, batch_size=8), resume=True)
    longer = pretrain(tiny(tmp_path, epochs=2), resume=True)  # extending a finished run
    assert longer["epochs_run"] == 1 and [m["epoch"] for m in RunDir(s.out).read_metrics()] == [1, 2]
    forced = pretrain(tiny(tmp_path, epochs=1, batch_size=8), force=True)
    assert forced["status"] == "trained" and [m["epoch"] for m in RunDir(s.out).read_metrics()] == [1]


IDENTITY_CHANGES = {  # for every setting that defines a run: a valid value the reference run does not have
    "data": "cifar10",
    "data_dir": "elsewhere",
    "split": "test",
    "image_size": 16,
    "limit": 32,
    "method": "byol",
    "arch": "resnet34",
    "stem": "imagenet",
    "patch_size": 2,
    "init": "elsewhere.safetensors",
    "teacher": "teacher.safetensors",
    "ssl_weight": 0.5,
    "teacher_arch": "resnet18",
    "teacher_queue": 16,
    "decoder_width": 64,
    "decoder_depth": 2,
    "layer_decay": 0.9,
    "head_hidden": 48,
    "head_out": 8,
    "head_layers": 3,
    "head_dropout": 0.2,
    "queue_size": 64,
    "pred_hidden": 16,
    "prototypes": 10,
    "batch_size": 8,
    "optimizer": "adam",
    "seed": 1,
}


def test_every_identity_setting_has_a_resume_refusal_case():
    from crlf.commands.pretrain import identity_keys

    assert sorted(IDENTITY_CHANGES) == sorted(identity_keys())


@pytest.mark.parametrize("key", IDENTITY_CHANGES)
def test_resume_refuses_every_changed_identity_setting(tmp_path, reference_run, key):
    """The refusal comes before anything is loaded or trained, so one saved run serves every key: a copy of the
    reference run whose checkpoints are hard links (crlf replaces them by rename, never writes into them)."""
    import shutil

    out = tmp_path / "run"
    link = lambda src, dst: os.link(src, dst) if src.endswith(".safetensors") else shutil.copy2(src, dst)  # noqa: E731
    shutil.copytree(reference_run.path, out, copy_function=link, ignore=shutil.ignore_patterns(".lock"))
    before = {p: p.read_bytes() for p in (out / "config.json", out / "metrics.jsonl")}
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*.safetensors")}
    changed = reference_run.settings(out, **{key: IDENTITY_CHANGES[key]})
    assert getattr(changed, key) != getattr(reference_run.settings(out), key)
    # (another method also brings its own defaults, which differ too: the key must be among those named)
    with pytest.raises(InputError, match=rf"settings differ from the saved run \((.*; )?{key}: [^;]*(; .*)?\); use"):
        pretrain(changed, resume=True)
    assert {p: p.read_bytes() for p in before} == before  # nothing was trained or rewritten
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.safetensors")} == stamps
    assert pretrain(reference_run.settings(out), resume=True)["status"] == "complete"  # the same settings: a no-op


def test_resume_without_checkpoint_starts_fresh(tmp_path):
    s = tiny(tmp_path, epochs=1)
    assert pretrain(s, resume=True)["status"] == "trained"


def test_diverged_loss_exits_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    s = tiny(tmp_path, epochs=3)
    real = simclr.nt_xent
    calls = {"n": 0}

    def poisoned(z1, z2, t):
        calls["n"] += 1
        loss = real(z1, z2, t)
        return loss * float("nan") if calls["n"] > 4 else loss  # epoch 2 (steps 5-8) diverges

    monkeypatch.setattr(simclr, "nt_xent", poisoned)
    with pytest.raises(RunError, match=r"loss became nan in epoch 2.*epoch 1"):
        pretrain(s)
    run = RunDir(s.out)
    assert run.progress()["epoch"] == 1
    assert all(torch.isfinite(v.float()).all() for v in weights(run.last).values())
    assert not run.encoder.exists()


def test_batch_larger_than_data(tmp_path):
    with pytest.raises(InputError, match="batch size 256 is larger than the data set \\(64 images\\)"):
        pretrain(tiny(tmp_path, batch_size=256))


def test_locked_run_dir(tmp_path):
    s = tiny(tmp_path)
    with RunDir(s.out).locked():
        with pytest.raises(LockedError, match=r"in use by another crlf process \(PID \d+\)"):
            pretrain(s)


def test_grad_clip_is_applied_when_set(tmp_path, monkeypatch):
    norms = []
    real = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(
        torch.nn.utils, "clip_grad_norm_", lambda params, max_norm: norms.append(max_norm) or real(params, max_norm)
    )
    pretrain(tiny(tmp_path, "clipped", epochs=1, grad_clip=0.5))
    assert norms == [0.5] * 4  # every step of the epoch
    pretrain(tiny(tmp_path, "free", epochs=1))
    assert len(norms) == 4  # 0 = off


def test_knn_monitor_scores_epochs_without_changing_the_run(tmp_path, reference_run, caplog):
    from crlf.commands.evaluate import knn_eval
    from crlf.settings import KnnEvalSettings

    watched = reference_run.settings(tmp_path / "watched", knn_every=2, k=10)
    pretrain(watched)
    with caplog.at_level("WARNING", logger="crlf"):  # k larger than the 64 images: said, not silent
        pretrain(reference_run.settings(tmp_path / "wide", knn_every=3, k=100, epochs=1))
    assert "-k 100 is more than the 64 training images: the kNN monitor uses k = 64" in caplog.text
    metrics = RunDir(watched.out).read_metrics()
    scored = {m["epoch"]: m["knn_top1"] for m in metrics if "knn_top1" in m}
    assert list(scored) == [2, 3]  # every 2nd epoch and after the last
    assert all(m["knn_seconds"] > 0 for m in metrics if "knn_top1" in m)
    for epoch, top1 in scored.items():  # knn-eval's score for that epoch's snapshot on the same images
        ckpt = watched.out / "checkpoints" / f"epoch-{epoch:04d}.safetensors"
        same = KnnEvalSettings(ckpt=ckpt, data="digits", limit=64, image_size=8, k=10, device="cpu")
        assert top1 == pytest.approx(knn_eval(same)["top1"], abs=0.01), epoch
        assert top1 > 30, scored  # 10 digit classes: far above chance even after 2 epochs
    a, b = weights(reference_run.path / "encoder.safetensors"), weights(RunDir(watched.out).encoder)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # eval mode, no random draws


def test_knn_monitor_needs_a_labelled_test_split(tmp_path, tiny_npy):
    with pytest.raises(InputError, match="has no 'test' split"):
        pretrain(tiny(tmp_path, data="npy", data_dir=tiny_npy, limit=None, knn_every=1))
    assert not (tmp_path / "run" / "config.json").exists()


def test_a_cpu_run_records_what_its_numbers_depend_on_and_a_changed_thread_count_warns(tmp_path, caplog):
    s = tiny(tmp_path, epochs=1, limit=16)  # 16 images, batch 16: one step an epoch
    with caplog.at_level("INFO", logger="crlf"):
        pretrain(s)
    assert "1 step/epoch" in caplog.text and f"({torch.get_num_threads()} threads)" in caplog.text
    resolved = json.loads(RunDir(s.out).config.read_text())["resolved"]
    assert resolved["threads"] == torch.get_num_threads()
    assert resolved["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    threads = torch.get_num_threads()
    caplog.clear()
    try:
        torch.set_num_threads(threads + 1)
        with caplog.at_level("WARNING", logger="crlf"):
            pretrain(s.model_copy(update={"epochs": 2}), resume=True)
    finally:
        torch.set_num_threads(threads)
    assert f"threads {threads} -> {threads + 1}" in caplog.text and "not exactly" in caplog.text
