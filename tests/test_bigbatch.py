"""Big batches on small devices: --micro-batch (gradient caching / accumulation) gives the whole batch's loss and
update, activation checkpointing the same gradients, fp16's scaler skips a step with an inf and resumes exactly."""

import contextlib
import copy
import math
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from crlf import PretrainSettings, pretrain
from crlf.engine import augment, backbones, gradcache, methods, train
from crlf.engine.backbones.base import CheckpointedBlocks, checkpointed
from crlf.engine.backbones.vit import _ViT
from crlf.engine.checkpoint import load_state, save_tensors, state_tensors
from crlf.engine.distributed import World
from crlf.engine.loop import Setup, train_step
from crlf.engine.plan import TrainConfig
from crlf.engine.rundir import RunDir
from crlf.engine.sources import DataSpec
from crlf.errors import InputError, Interrupted

HEAD = dict(head_hidden=32, head_out=16)
CONFIGS = {  # tiny heads; multi-crop methods with 2 local 4 px crops
    "simclr": HEAD, "moco": {**HEAD, "queue_size": 0, "pred_hidden": 32}, "barlow": HEAD, "vicreg": HEAD,
    "swav": {**HEAD, "prototypes": 20, "local_crops": 2, "local_size": 4},
    "dino": {**HEAD, "prototypes": 20, "local_crops": 2, "local_size": 4},
    "byol": {**HEAD, "pred_hidden": 32}, "simsiam": {**HEAD, "pred_hidden": 32},
}  # fmt: skip


def tiny_vit(dropout: float = 0.0) -> nn.Module:
    """A 2-block ViT on 8 px images (no BatchNorm: its batch statistics are per micro-batch)."""
    torch.manual_seed(0)
    net = _ViT(image_size=8, patch_size=4, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32, dropout=dropout)
    net.heads = nn.Identity()
    return net


def tiny_method(name: str, dropout: float = 0.0) -> methods.Method:
    """The method around a tiny ViT, its heads' BatchNorm in eval mode (so that chunks change nothing)."""
    cls = methods.get(name)
    torch.manual_seed(1)
    model = cls(tiny_vit(dropout), cls.Config(**CONFIGS[name]), 16).train()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
    if name == "swav":
        model.frozen.fill_(False)  # the prototypes take their gradient too
    return model


def batch_views(name: str, n: int = 32) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    views = [torch.randn(n, 3, 8, 8, generator=g) for _ in range(2)]
    return views + ([torch.randn(n, 3, 4, 4, generator=g) for _ in range(2)] if name in ("swav", "dino") else [])


def sgd_step(model: nn.Module, backward) -> torch.Tensor:
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5, momentum=0.9)
    loss = backward()
    opt.step()
    return loss


@pytest.mark.parametrize("name", list(CONFIGS))
def test_micro_batches_give_the_loss_and_update_of_the_whole_batch(name):
    whole, chunked = tiny_method(name), None
    chunked = copy.deepcopy(whole)
    views = batch_views(name)

    def full():
        loss = whole(views)
        loss.backward()
        return loss.detach()

    a = sgd_step(whole, full)
    b = sgd_step(chunked, lambda: gradcache.backward(chunked, views, 8, contextlib.nullcontext, lambda x: x))
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), (a, b)
    moved = 0
    for (k, p), q in zip(whole.named_parameters(), chunked.parameters()):
        assert torch.allclose(p, q, rtol=1e-5, atol=1e-6), k
        moved += p.requires_grad and not torch.equal(p, tiny_method(name).get_parameter(k))
    assert moved > 10  # the step did change the weights


def test_each_chunk_replays_its_random_state_so_dropout_matches():
    """With dropout the chunked step equals chunks embedded with a graph from the same random state."""
    model = tiny_method("simclr", dropout=0.3)
    ref = copy.deepcopy(model)
    views = batch_views("simclr")
    torch.manual_seed(5)
    loss = gradcache.backward(model, views, 8, contextlib.nullcontext, lambda x: x)
    after = torch.get_rng_state()
    torch.manual_seed(5)
    outs = [ref.embed([v[i : i + 8] for v in views]) for i in range(0, 32, 8)]
    expected = ref.objective([torch.cat([o[j] for o in outs]) for j in range(2)])
    expected.backward()
    assert torch.equal(after, torch.get_rng_state())  # the stream goes on as after one pass
    assert torch.allclose(loss, expected.detach(), rtol=1e-6)
    for (k, p), q in zip(model.named_parameters(), ref.parameters()):
        assert (p.grad is None) == (q.grad is None) and (p.grad is None or torch.allclose(p.grad, q.grad, atol=1e-6)), k


def test_batchnorm_statistics_are_updated_once_per_chunk():
    model = methods.get("simclr")(tiny_vit(), methods.get("simclr").Config(**HEAD), 16).train()
    ref = copy.deepcopy(model)
    views = batch_views("simclr")
    gradcache.backward(model, views, 8, contextlib.nullcontext, lambda x: x)
    with torch.no_grad():
        for i in range(0, 32, 8):
            ref.embed([v[i : i + 8] for v in views])
    for a, b in zip(model.buffers(), ref.buffers()):
        assert torch.allclose(a, b), (a, b)


@pytest.mark.parametrize("arch, dropout", [("resnet18", 0.0), ("vit", 0.2)])
def test_activation_checkpointing_gives_the_same_gradients(arch, dropout):
    if arch == "resnet18":
        spec = backbones.spec_for("resnet18", 8)
        torch.manual_seed(0)
        plain = backbones.build(spec)
    else:
        spec, plain = backbones.spec_for("vit_tiny", 8), tiny_vit(dropout)
    checked = copy.deepcopy(plain)
    backbones.checkpoint_activations(spec, checked)
    assert type(checked) is type(plain) and checked.state_dict().keys() == plain.state_dict().keys()
    x = torch.randn(6, 3, 8, 8)
    for net in (plain, checked):
        torch.manual_seed(3)
        net.train()(x).pow(2).sum().backward()
    for (k, p), q in zip(plain.named_parameters(), checked.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-5, atol=1e-6), k


def test_a_backbone_without_checkpointing_is_a_clear_error():
    with pytest.raises(InputError, match="--activation-checkpointing: .*set_grad_checkpointing"):
        backbones.checkpoint_activations(backbones.custom_spec(nn.Sequential(nn.Flatten()), 8), nn.Flatten())


def fp16_setup(model: methods.Method) -> Setup:
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    zero, one = torch.zeros(1, 3, 1, 1), torch.ones(1, 3, 1, 1)
    return Setup(model, None, model, opt, None, None, zero, one, None, torch.device("cpu"), torch.float16, World(),
                 scaler=torch.amp.GradScaler("cpu"))  # fmt: skip


def test_fp16_scaler_skips_a_step_with_an_inf_and_its_state_resumes(tmp_path):
    model = tiny_method("simclr")
    s = fp16_setup(model)
    cfg = TrainConfig("simclr", model.config, augment.Augment(), DataSpec(), Path("unused"), micro_batch=8)
    batch = augment.Views([v.clamp(0, 1) for v in batch_views("simclr")])
    before = copy.deepcopy(model.state_dict())
    hook = model.head[0].weight.register_hook(lambda g: g * math.inf)  # an overflow in the backward
    loss = train_step(cfg, s, batch, torch.Generator(), 1, 10)
    hook.remove()
    assert math.isfinite(float(loss)) and s.scaler.get_scale() == 2.0**15  # the scale was halved ...
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # ... and the step skipped
    train_step(cfg, s, batch, torch.Generator(), 2, 10)
    assert not torch.equal(model.head[0].weight, before["head.0.weight"])
    tensors, meta = state_tensors(model, s.optimizer, {}, {"epoch": 1, "step": 0}, scaler=s.scaler)
    path = tmp_path / "state.safetensors"
    save_tensors(path, tensors, meta)
    again = fp16_setup(tiny_method("simclr"))
    load_state(path, again.model, again.optimizer, again.scaler)
    assert again.scaler.state_dict() == s.scaler.state_dict()


class CheckpointableViT(_ViT):
    """The tiny ViT as a user's own module with timm's set_grad_checkpointing."""

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        checkpointed(self.encoder.layers, CheckpointedBlocks)


def own_vit() -> nn.Module:
    torch.manual_seed(0)
    net = CheckpointableViT(image_size=8, patch_size=4, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32,
                            dropout=0.1)  # fmt: skip
    net.heads = nn.Identity()
    return net


def run_settings(out: Path, **overrides) -> PretrainSettings:
    values = dict(data="digits", limit=32, image_size=8, batch_size=16, head_hidden=32, head_out=16, head_dropout=0.1,
                  device="cpu", lr=0.1, epochs=2, micro_batch=4, out=out)  # fmt: skip
    return PretrainSettings(**{**values, **overrides})


def test_a_micro_batch_fp16_checkpointed_run_resumes_bit_for_bit(tmp_path, signal_at):
    extra = {"precision": "fp16", "activation_checkpointing": True}  # simclr: gradient caching
    full = run_settings(tmp_path / "full", **extra)
    pretrain(full, backbone=own_vit())
    part = run_settings(tmp_path / "part", **extra)
    with pytest.raises(Interrupted):
        pretrain(part, signal_at(epoch=2, step=1, sig=signal.SIGTERM), backbone=own_vit())
    pretrain(part, resume=True, backbone=own_vit())
    a, b = load_file(str(full.out / "last.safetensors")), load_file(str(part.out / "last.safetensors"))
    assert a.keys() == b.keys() and [k for k in a if not torch.equal(a[k], b[k])] == []
    assert float(a["scaler.scale"][0]) > 0  # fp16's scaler state is in the checkpoint
    losses = [[m["loss"] for m in RunDir(r.out).read_metrics()] for r in (full, part)]
    assert losses[0] == losses[1] and all(math.isfinite(x) for x in losses[0])


def test_a_micro_batch_that_does_not_divide_the_batch_is_one_line(tmp_path):
    with pytest.raises(InputError, match=r"--micro-batch 5 must divide the batch of each process, 16 images: "
                                         r"try --micro-batch 4"):  # fmt: skip
        pretrain(run_settings(tmp_path / "run", micro_batch=5), backbone=own_vit())
    assert not (tmp_path / "run" / "last.safetensors").exists()


def test_a_method_without_the_split_refuses_micro_batches(tmp_path):
    class Whole(methods.get("simclr")):  # its own forward only: neither the split nor a per-image loss
        name = "whole_test"
        embed = methods.Method.embed
        objective = methods.Method.objective

    methods.register(Whole)
    try:
        cfg = TrainConfig("whole_test", Whole.Config(**HEAD), augment.Augment(),
                          DataSpec(data="digits", limit=32, image_size=8), tmp_path, micro_batch=4, batch_size=16,
                          device="cpu", backbone=own_vit())  # fmt: skip
        with pytest.raises(InputError, match="--method whole_test has neither"):
            train._build(cfg, World())
    finally:
        del methods.REGISTRY["whole_test"]
