"""Several processes, one run, on PyTorch's own engine: ``torchrun ... -m crlf pretrain``.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; crlf joins the process group (NCCL on CUDA, gloo on CPU), puts
each process on its own device, wraps the model in DDP, and computes NT-Xent over the embeddings of *all*
processes, gathered with their gradients, so N processes at batch B/N compute the loss and gradients of one
process at batch B (with ``--sync-bn``, BatchNorm statistics too). One process (WORLD_SIZE unset or 1) uses
none of this.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
from torch import nn

from crlf.engine.device import select_device
from crlf.errors import InputError


@dataclass(frozen=True)
class World:
    """Where this process stands: rank among world_size processes, and its device."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def join(device_name: str) -> World:
    """Join torchrun's process group when there is one (world size > 1), else describe a single process."""
    size = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if size <= 1:
        return World(device=select_device(device_name))
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = select_device(device_name)
    if device.type == "cuda":
        if local >= torch.cuda.device_count():
            raise InputError(
                f"local rank {local} has no GPU of its own ({torch.cuda.device_count()} here): "
                f"use --nproc-per-node {torch.cuda.device_count()} or fewer"
            )
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise InputError(
            f"several processes run on cuda (NCCL) or cpu (gloo), not {device.type}: use --device cuda or cpu"
        )
    if not dist.is_initialized():
        dist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo",
            rank=rank,
            world_size=size,
            timeout=datetime.timedelta(minutes=30),
        )
    return World(rank, size, device)


def leave(world: World) -> None:
    if world.active and dist.is_initialized():
        dist.destroy_process_group()


def gather(z: torch.Tensor) -> torch.Tensor:
    """Every process's rows, in rank order, with gradients flowing back to the process that made them (the rows
    themselves in a single process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return z
    return torch.cat(dist_nn.all_gather(z), dim=0)


def any_flag(value: int, world: World) -> int:
    """The largest of every process's value (a stop signal number, 0 = none): all processes agree."""
    if not world.active:
        return value
    flag = torch.tensor([value], dtype=torch.int64, device=world.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag.item())


def barrier(world: World) -> None:
    """Wait until every process gets here."""
    if world.active:
        dist.barrier()


def gather_states(states: dict[str, torch.Tensor], world: World) -> dict[str, torch.Tensor]:
    """Random generator states of every process, keyed ``name.rank`` (for a mid-epoch checkpoint)."""
    if not world.active:
        return states
    out = {}
    for name, state in sorted(states.items()):
        local = state.to(world.device)
        parts = [torch.empty_like(local) for _ in range(world.world_size)]
        dist.all_gather(parts, local)
        out.update({f"{name}.{r}": p.cpu() for r, p in enumerate(parts)})
    return out


def own_states(states: dict[str, torch.Tensor], world: World) -> dict[str, torch.Tensor]:
    """This process's generator states out of a checkpoint's (None-free; {} when they are not there)."""
    if not world.active:
        return states
    suffix = f".{world.rank}"
    return {k[: -len(suffix)]: v for k, v in states.items() if k.endswith(suffix)}


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics cover the batch of every process (any device, any backend).

    torch's SyncBatchNorm runs on GPUs only; this one sums (sum x, sum x^2, count) with a differentiable
    all_reduce, so it also runs on CPU over gloo, where the multi-process tests run. Same numbers as one
    BatchNorm over the concatenated batch.
    """

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2-D input, got {x.dim()}-D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        xf = x.float()
        count = torch.tensor([x.numel() / x.shape[1]], dtype=torch.float32, device=x.device)
        stats = dist_nn.all_reduce(torch.cat([xf.sum(dims), (xf * xf).sum(dims), count]))
        c = x.shape[1]
        n = stats[-1]
        mean = stats[:c] / n
        var = (stats[c : 2 * c] / n - mean * mean).clamp_min(0)
        if self.track_running_stats and self.running_mean is not None and self.running_var is not None:
            with torch.no_grad():
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked + 1)
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(var.detach() * n / (n - 1).clamp_min(1), alpha=m)
                self.num_batches_tracked.add_(1)
        y = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


def sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """BatchNorm -> batch statistics over all processes: torch's SyncBatchNorm on CUDA, GlobalBatchNorm elsewhere."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for name, child in model.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm) and not isinstance(child, GlobalBatchNorm):
            new = GlobalBatchNorm(
                child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats
            )
            new.load_state_dict(child.state_dict())
            setattr(model, name, new.to(device))
        else:
            sync_batchnorm(child, device)
    return model


def wrap(model: nn.Module, world: World) -> nn.Module:
    """DDP around the model when several processes train it (gradients averaged across them)."""
    if not world.active:
        return model
    ids = [world.device.index] if world.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def average_gradients(model: nn.Module, world: World) -> None:
    """The mean over processes of every parameter's gradient, as DDP's backward gives it (for steps that run the
    model outside DDP: --micro-batch)."""
    if not world.active:
        return
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world.world_size
    for g, part in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(part.view_as(g))
