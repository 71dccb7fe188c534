"""The method interface: SimCLR on it exactly as before, the registry, method defaults, what a run records."""

import dataclasses
import json
import os
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import torch
from conftest import copy_run
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import crlf
from crlf import PretrainSettings, pretrain
from crlf.engine import methods
from crlf.engine.augment import Augment
from crlf.engine.checkpoint import read_tensors
from crlf.errors import InputError
from crlf.typed import config_of


@pytest.fixture(autouse=True)
def _no_crlf_env(monkeypatch):
    for key in [k for k in os.environ if k.startswith("CRLF_")]:
        monkeypatch.delenv(key)


# The conditions under which a CPU run gives the same numbers on any x86-64 machine with this torch: one thread
# (intra-op reductions split by the thread count), torch's and oneDNN's portable kernels (AVX-512 and AVX2 ones round
# differently), MKL's reproducible mode. On one machine at its default threads a run is also repeatable; see the README.
PORTABLE = {"OMP_NUM_THREADS": "1", "ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41",
            "MKL_CBWR": "COMPATIBLE"}  # fmt: skip


def test_simclr_on_the_method_interface_reproduces_the_pinned_run(tmp_path):
    """Losses and weights of a tiny run recorded before SimCLR moved onto the interface (commit 83d461b), re-recorded
    when crop boxes became torchvision's (redrawn, not clamped) and again under PORTABLE, in a process of its own
    (the variables act when torch loads), so that no CPU or core count moves them; any change to the views, the
    forward pass, the loss or the step order does."""
    s = PretrainSettings(data="digits", limit=64, image_size=8, batch_size=16, epochs=2, head_hidden=64, head_out=32,
                         head_dropout=0.1, device="cpu", out=tmp_path / "run")  # fmt: skip
    code = f"import crlf; crlf.pretrain(crlf.PretrainSettings.model_validate_json({s.model_dump_json()!r}))"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CRLF_", "OMP_", "MKL_", "ATEN_", "ONEDNN_"))}
    r = subprocess.run([sys.executable, "-c", code], env={**env, **PORTABLE}, capture_output=True, text=True,
                       timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr
    losses = [json.loads(line)["loss"] for line in (s.out / "metrics.jsonl").read_text().splitlines()]
    assert losses == pytest.approx([3.624192, 3.815046], rel=1e-5)
    t, _ = read_tensors(s.out / "last.safetensors")
    sums = [float(t[k].sum()) for k in ("model.head.0.weight", "model.backbone.conv1.weight",
                                        "model.backbone.layer4.1.bn2.weight")]  # fmt: skip
    assert sums == pytest.approx([0.44217062, 0.02215248, 512.02612305], rel=1e-4)


def test_every_listed_method_is_registered_with_a_config_of_real_defaults():
    """The registry is the one list: the CLI's names and the resolved settings come from each method's config."""
    from crlf import catalog
    from crlf.commands.pretrain import resolve as method_defaults

    assert list(catalog.METHODS["methods"]) == list(methods.REGISTRY) and "simclr" in methods.REGISTRY
    for name, cls in methods.REGISTRY.items():
        resolved = method_defaults(PretrainSettings(method=name))
        config = cls.Config()
        assert resolved.method == name and (name in {"distill", *MASKED} or resolved.head_hidden and resolved.head_out)
        assert all(getattr(resolved, f.name) == getattr(config, f.name) for f in dataclasses.fields(config)), name
    given = method_defaults(PretrainSettings(temperature=0.5, head_out=64))
    assert (given.temperature, given.head_out, given.head_hidden) == (0.5, 64, 2048)  # the user's values win
    assert given.queue_size is None  # an option simclr does not have stays unset


def test_print_config_shows_the_methods_resolved_defaults(capsys):
    from crlf.cli import main

    with pytest.raises(SystemExit) as e:
        main(["pretrain", "--print-config", "--head-out", "64"])
    assert e.value.code in (0, None)
    out = capsys.readouterr().out
    assert 'method = "simclr"' in out and "temperature = 0.2" in out and "head_hidden = 2048" in out
    assert "head_out = 64" in out


def test_resume_refuses_another_method(tmp_path, reference_run):
    run = tmp_path / "run"
    copy_run(reference_run.path, run)
    for other in sorted(set(methods.REGISTRY) - {"simclr"})[:1]:
        with pytest.raises(InputError, match=f"method: 'simclr' -> '{other}'"):
            pretrain(reference_run.settings(run, method=other), resume=True)
    config = json.loads((run / "config.json").read_text())
    assert config["method"] == "simclr" and config["temperature"] == 0.2  # recorded resolved


def test_every_method_keeps_its_encoder_under_backbone(tmp_path):
    from crlf.engine import backbones

    for name, cls in methods.REGISTRY.items():
        spec = backbones.spec_for("vit_tiny" if name in MASKED else "resnet18", 32, "cifar")  # mae: a ViT
        backbone = backbones.build(spec)
        m = cls(backbone, config_of(cls.Config, {"head_hidden": 16, "head_out": 8, "teacher": _tiny_teacher()}),
                spec.feature_dim)  # fmt: skip
        assert isinstance(m, methods.Method) and m.backbone is backbone
        keys = set(m.state_dict())
        assert {f"backbone.{k}" for k in backbone.state_dict()} <= keys, name


# ---- every method: two real processes (gloo) equal one process on the whole batch --------------------------------


def _tiny_teacher() -> str:
    """A small seeded crlf encoder (vit_tiny, 8 px) for distill, written once per machine and read by every process."""
    import tempfile

    from crlf.engine import backbones
    from crlf.engine.encoder import Encoder

    path = Path(tempfile.gettempdir()) / f"crlf-test-teacher-{torch.__version__}.safetensors"
    if not path.is_file():
        torch.manual_seed(7)
        spec = backbones.spec_for("vit_tiny", 8)
        Encoder(backbones.build(spec), spec, [0.5] * 3, [0.25] * 3).save(path)
    return str(path)


MASKED = {"mae", "ibot"}  # the masked image modelling methods: ViTs only, masks drawn in forward
MASKS_PER_IMAGE = {"ibot": 2}  # one per global crop (mae: one per image)


def _tiny(name: str, **options) -> tuple[methods.Method, object]:
    """The method around a one-conv backbone (any view size), small heads, weights seeded alike in every process;
    the multi-crop methods with two small crops; distill from a small teacher; mae and ibot around a one-block ViT
    of 2 px patches (4 x 4 views: 4 patches), mae with a small decoder."""
    from crlf.engine.backbones.vit import _ViT

    cls = methods.get(name)
    values = dict(head_hidden=16, head_out=8, prototypes=10, queue_size=32, pred_hidden=8, local_crops=2,
                  decoder_width=32, decoder_depth=1, **options)  # fmt: skip
    if name == "distill":
        values["teacher"] = _tiny_teacher()
    config = config_of(cls.Config, values)
    torch.manual_seed(0)
    if name in MASKED:
        backbone = _ViT(image_size=4, patch_size=2, num_layers=1, num_heads=2, hidden_dim=12, mlp_dim=24)
        backbone.heads = nn.Identity()
    else:
        backbone = nn.Sequential(nn.Conv2d(3, 12, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return cls(backbone, config, 12), config


def _rows_generator(rows: slice, masks: int = 1) -> torch.Generator:
    """A generator whose next (n x masks, 4) draw is rows `rows` of the whole batch's (8 x masks, 4) draw (CPU draws
    are sequential): the masks of a process's share of the batch are the single process's masks of those images."""
    g = torch.Generator().manual_seed(5)
    torch.rand(rows.start * masks, 4, generator=g)
    return g


def _fixed_views(config: object, rows: slice) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    crops = [torch.randn(8, 3, 4, 4, generator=g) for _ in range(2)]
    crops += [torch.randn(8, 3, 2, 2, generator=g) for _ in range(getattr(config, "local_crops", 0))]  # dino, swav
    return [c[rows] for c in crops]


def _two_process_steps(rank: int, world_size: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from crlf.engine import distributed

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        result = {}
        for name in methods.REGISTRY:
            method, config = _tiny(name)
            method.set_generator(_rows_generator(slice(rank * 4, rank * 4 + 4), MASKS_PER_IMAGE.get(name, 1)))
            method = distributed.sync_batchnorm(method, torch.device("cpu"))
            loss = method(_fixed_views(config, slice(rank * 4, rank * 4 + 4)))
            loss.backward()
            for k, p in method.named_parameters():
                if p.grad is not None:  # DDP's average over processes
                    dist.all_reduce(p.grad)
                    result[f"{name}.grad.{k}"] = p.grad / world_size
            result[f"{name}.loss"] = loss.detach().reshape(1)
            result.update({f"{name}.buffer.{k}": b.clone() for k, b in method.named_buffers() if "running" not in k})
        save_file({k: v.contiguous() for k, v in result.items()}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_every_method_on_two_processes_equals_one_process_on_the_whole_batch(tmp_path):
    """Losses, gradients and kept state (queues, centres) over the global batch: what gather and sync-bn promise."""
    import socket

    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "step")
    # spawn, not fork: a forked child of a process whose OpenMP threads have run can hang in its first parallel op
    mp.start_processes(_two_process_steps, args=(2, port, out), nprocs=2, join=True, start_method="spawn")
    r0, r1 = load_file(f"{out}.0"), load_file(f"{out}.1")
    for name in methods.REGISTRY:
        method, config = _tiny(name)
        method.set_generator(_rows_generator(slice(0, 8), MASKS_PER_IMAGE.get(name, 1)))
        loss = method(_fixed_views(config, slice(0, 8)))
        loss.backward()
        assert torch.allclose(r0[f"{name}.loss"], loss.reshape(1), rtol=1e-4, atol=1e-6), name
        assert torch.equal(r0[f"{name}.loss"], r1[f"{name}.loss"]), name
        grads = {k: p.grad for k, p in method.named_parameters() if p.grad is not None}
        assert {k for k in r0 if k.startswith(f"{name}.grad.")} == {f"{name}.grad.{k}" for k in grads}, name
        scale = max(float(g.abs().max()) for g in grads.values())
        for k, g in grads.items():
            assert torch.allclose(r0[f"{name}.grad.{k}"], g, atol=1e-4 * scale, rtol=1e-3), (name, k)
        for k, b in method.named_buffers():
            if "running" not in k:  # the queue, its pointer, the centre, schedules
                assert torch.allclose(r0[f"{name}.buffer.{k}"].float(), b.float(), atol=1e-5), (name, k)


@pytest.mark.parametrize("name", ["moco", "dino"])  # the most state besides weights: teacher + queue / centre
def test_a_method_killed_while_saving_resumes_bit_for_bit(tmp_path, name):
    """SIGKILL half way through epoch 2's checkpoint (the engine's test hook), then --resume: the run that finishes
    equals the uninterrupted one, teacher, queue and centre included. (SIGTERM mid-epoch: each method's own tests.)"""
    import subprocess
    import sys

    from safetensors.torch import load_file as load

    values = dict(method=name, data="digits", limit=32, image_size=8, batch_size=8, epochs=3, head_hidden=16,
                  head_out=8, prototypes=16, queue_size=16, knn_every=3, device="cpu")  # fmt: skip
    pretrain(PretrainSettings(**values, out=tmp_path / "ref"))
    args = [f"--{k.replace('_', '-')}={v}" for k, v in values.items()]
    env = {k: v for k, v in os.environ.items() if not k.startswith("CRLF_")}
    killed = subprocess.run([sys.executable, "-m", "crlf", "pretrain", *args, "--out", str(tmp_path / "run")],
                            env={**env, "CRLF_TEST_KILL_AT": "last.safetensors#2"}, capture_output=True, text=True,
                            timeout=600)  # fmt: skip
    assert killed.returncode == -9, killed.stderr
    pretrain(PretrainSettings(**values, out=tmp_path / "run"), resume=True)
    a, b = load(str(tmp_path / "ref" / "last.safetensors")), load(str(tmp_path / "run" / "last.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(k.startswith("model.teacher") or "queue" in k or "center" in k or "centre" in k for k in a)
    final = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert final["knn_top1"] > 10 and "embedding_std" in final  # the kNN monitor works on any method's backbone



@pytest.mark.parametrize("name", sorted(methods.REGISTRY))
def test_every_method_lowers_its_loss(name):
    """Twenty steps of the method's own loop (forward, backward, optimizer step, after_step) on fixed views, then
    the loss of the trained weights against the loss of the initial ones, both with the state the run ended with
    (teacher, queue, centre, schedules): the optimizer's steps lowered the method's loss. A broken gradient path (a
    detach in the wrong place, a head left out of the optimizer) keeps them equal."""
    from crlf.engine.optim import build_optimizer

    method, config = _tiny(name)
    initial = {k: p.detach().clone() for k, p in method.named_parameters() if p.requires_grad}
    optimizer = build_optimizer(method, "sgd", 0.02, 0.0)
    views = _fixed_views(config, slice(0, 8))
    for step in range(1, 21):
        loss = method(views)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        method.after_step(step, 20, 10)
    end = {k: v.clone() for k, v in method.state_dict().items()}

    def loss_with(weights: dict[str, torch.Tensor]) -> float:
        method.load_state_dict({**end, **weights})  # forward may write queues / centres: start from the end state
        torch.manual_seed(0)  # the same masks (mae) for both
        with torch.no_grad():
            return float(method(views))

    trained, untrained = loss_with({}), loss_with(initial)
    assert trained < untrained, (trained, untrained)


# where crlf's and torch.optim's code lives, by the modules' own paths: a checkout in a folder named 'crlf' (git's
# default) has '/crlf/' in the test files' paths too
CRLF_CODE = os.path.dirname(crlf.__file__) + os.sep
OPTIM_CODE = os.path.dirname(torch.optim.__file__) + os.sep


class _HostSyncs(TorchDispatchMode):
    """Records the ops that make the host wait for a GPU: reading a device value back (item, bool, nonzero, masked
    selection) or making a tensor of host data (torch.tensor / as_tensor, copied with a stream sync). On a CPU the
    same ops run, so a CPU test finds what would stall a CUDA step."""

    NAMES = {"aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select", "aten::lift_fresh",
             "aten::unique_consecutive", "aten::_unique2", "aten::repeat_interleave"}  # fmt: skip

    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        indices = [i for a in args if isinstance(a, (list, tuple)) for i in a if isinstance(i, torch.Tensor)]
        masked = func.name().startswith("aten::index") and any(i.dtype == torch.bool for i in indices)
        if func.name() in self.NAMES or masked:
            stack = [f for f in traceback.extract_stack() if f.filename.startswith((CRLF_CODE, OPTIM_CODE))]
            if not stack[-1].filename.startswith(OPTIM_CODE):  # torch's optimizers read their host-side step counts
                self.seen.append(f"{func.name()} at {Path(stack[-1].filename).name}:{stack[-1].lineno}")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("optimizer", ["sgd", "lars", "adamw"])
def test_a_training_step_never_makes_the_host_wait_for_the_device(optimizer):
    """loop.train_step of every method (augmentation, forward, loss, backward, optimizer, after_step, gradient clipping)
    dispatches no op that synchronises a CUDA stream, so the host queues the next step while the GPU works. One such
    op (a float made into a device tensor in the crop sampling) made every step wait for the previous backward."""
    from types import SimpleNamespace

    from crlf.engine import loop
    from crlf.engine.optim import build_optimizer

    batch = torch.randint(0, 256, (8, 3, 12, 12), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    for name in sorted(methods.REGISTRY):
        method, config = _tiny(name, local_size=4)
        s = SimpleNamespace(
            model=method, step_model=method, optimizer=build_optimizer(method, optimizer, 0.1, 1e-4), amp=None,
            mean=torch.full((1, 3, 1, 1), 0.5), std=torch.full((1, 3, 1, 1), 0.25), device=torch.device("cpu"),
            recipe=type(method).recipe(config, Augment(), 12), scaler=None,
        )
        cfg = SimpleNamespace(grad_clip=1.0, epochs=1, batch_size=8, micro_batch=0)
        gen = torch.Generator().manual_seed(1)
        loop.train_step(cfg, s, batch, gen, 1, 4)  # the first step may build state (momentum buffers, queues)
        with _HostSyncs() as syncs:
            loss = loop.train_step(cfg, s, batch, gen, 2, 4)
        assert torch.isfinite(loss) and not syncs.seen, (name, syncs.seen)
