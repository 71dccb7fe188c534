"""Two CPU processes over gloo: the same loss and gradients as one process on the whole batch, and a short
torchrun pretrain that writes one set of files and resumes."""

import json
import os
import socket
import subprocess
import sys

import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from crlf.settings import PretrainSettings

# 32 digits at 8 px, batch 8 (4 images per process), ResNet-18 with a small head; GlobalBatchNorm via --sync-bn
STEP = dict(
    data="digits",
    limit=32,
    image_size=8,
    batch_size=8,
    head_hidden=32,
    head_out=16,
    device="cpu",
    sync_bn=True,
    temperature=0.5,
    out="unused",
)


def _fixed_views(recipe, batch, generator):
    """Deterministic 'augmentation' (the image and its mirror), so one and two processes see the same views."""
    x = batch.float() / 255
    return x, x.flip(-1)


def _one_step(rank: int, world_size: int, port: int, out: str) -> None:
    """Build the run as pretrain does, take rank's share of the first batch, do one real training step."""
    from crlf.commands.pretrain import resolve, train_config
    from crlf.engine import augment, distributed, loop, train

    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    augment.draw = _fixed_views
    cfg = train_config(resolve(PretrainSettings(**STEP)))
    world = distributed.join("cpu")
    try:
        setup = train._build(cfg, world)
        share = cfg.batch_size // world.world_size
        batch = setup.feed.images[rank * share : (rank + 1) * share]
        loss = loop.train_step(cfg, setup, batch, torch.Generator(), 1, 1)
        tensors = {f"grad.{k}": p.grad for k, p in setup.model.named_parameters()}
        tensors.update({f"buffer.{k}": b for k, b in setup.model.named_buffers() if "running" in k})
        tensors["loss"] = loss.reshape(1)
        save_file({k: v.detach().contiguous() for k, v in tensors.items()}, f"{out}.{rank}")
    finally:
        distributed.leave(world)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_compute_the_loss_and_gradients_of_the_whole_batch(tmp_path, monkeypatch):
    for key in [k for k in os.environ if k.startswith("CRLF_")]:
        monkeypatch.delenv(key)
    out = str(tmp_path / "step")
    mp.spawn(_one_step, args=(2, _free_port(), out), nprocs=2, join=True)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    _one_step_single(out)
    one, r0, r1 = (load_file(f"{out}.{r}") for r in ("single", 0, 1))
    assert one.keys() == r0.keys() == r1.keys()
    assert torch.allclose(r0["loss"], one["loss"], rtol=1e-5) and torch.equal(r0["loss"], r1["loss"])
    grads = [k for k in one if k.startswith("grad.")]
    assert len(grads) > 60 and all(one[k].abs().sum() > 0 for k in ("grad.backbone.conv1.weight", "grad.head.0.weight"))
    for k in one:
        scale = one[k].abs().max().clamp_min(1e-6)
        assert torch.allclose(r0[k], one[k], atol=2e-4 * float(scale), rtol=1e-3), k  # gradients and BN statistics
        assert torch.allclose(r0[k], r1[k], atol=1e-7), k  # DDP: every process holds the same averaged gradient


def _one_step_single(out: str) -> None:
    from crlf.commands.pretrain import resolve, train_config
    from crlf.engine import augment, distributed, loop, train

    real = augment.draw
    augment.draw = _fixed_views
    try:
        cfg = train_config(resolve(PretrainSettings(**STEP)))
        setup = train._build(cfg, distributed.World(device=torch.device("cpu")))
        loss = loop.train_step(cfg, setup, setup.feed.images[: cfg.batch_size], torch.Generator(), 1, 1)
        tensors = {f"grad.{k}": p.grad for k, p in setup.model.named_parameters()}
        tensors.update({f"buffer.{k}": b for k, b in setup.model.named_buffers() if "running" in k})
        tensors["loss"] = loss.reshape(1)
        save_file({k: v.detach().contiguous() for k, v in tensors.items()}, f"{out}.single")
    finally:
        augment.draw = real


def test_without_gathering_the_loss_would_differ():
    """The check above can fail: the loss of each process's share alone is not the loss of the whole batch."""
    from crlf.engine.loss import nt_xent

    torch.manual_seed(0)
    z1, z2 = torch.randn(8, 16), torch.randn(8, 16)
    whole = nt_xent(z1, z2, 0.5)
    halves = (nt_xent(z1[:4], z2[:4], 0.5) + nt_xent(z1[4:], z2[4:], 0.5)) / 2
    assert not torch.allclose(whole, halves, rtol=1e-3)


def torchrun(tmp_path, *args):
    env = {k: v for k, v in os.environ.items() if not k.startswith("CRLF_")}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "crlf",
        "pretrain",
        "--data",
        "digits",
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
        "--sync-bn",
        "--out",
        str(tmp_path / "run"),
        "--json",
        *args,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


def test_torchrun_two_processes_end_to_end_and_resume(tmp_path):
    r = torchrun(tmp_path, "--epochs", "2", "--logger", "tensorboard")  # rank 0 alone logs
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads(r.stdout)  # one JSON document: the main process alone reports
    assert summary["status"] == "trained" and summary["world_size"] == 2 and summary["rank"] == 0
    run = tmp_path / "run"
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1, 2]  # one set of files, not one per process
    assert r.stderr.count("epoch 1/2") == 1
    assert (run / "encoder.safetensors").is_file() and json.loads((run / "config.json").read_text())["sync_bn"] is True
    assert len(list((run / "tb").glob("events.out.tfevents.*"))) == 1
    again = torchrun(tmp_path, "--epochs", "3", "--resume", "--logger", "tensorboard")
    assert again.returncode == 0, again.stderr[-3000:]
    resumed = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in resumed] == [1, 2, 3] and resumed[:2] == metrics
    assert json.loads(again.stdout)["epochs_run"] == 1
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tb"))
    events.Reload()  # one file per session, each from the main process; every epoch once at its global step
    assert len(list((run / "tb").glob("events.out.tfevents.*"))) == 2
    assert [(e.step, round(e.value, 6)) for e in events.Scalars("epoch/loss")] == \
        [(4 * m["epoch"], m["loss"]) for m in resumed]  # fmt: skip
