"""Big batches on small devices (--micro-batch M): one step's backward in chunks of M images, the loss that of the
whole batch.

A loss that spans the batch (NT-Xent's negatives, Barlow / VICReg's batch statistics, SwAV's Sinkhorn) is not the sum
of its chunks' losses, so plain gradient accumulation would train another objective. Gradient caching (Gao et al.
2021, luyug/GradCache) keeps it exact: embed every chunk without a graph (Method.embed), compute the objective of the
whole batch on those embeddings as leaves and back-propagate it to them, then re-run each chunk with a graph and
back-propagate its slice of that cached gradient. Each chunk's random state (dropout, stochastic depth) is recorded
before its first pass and replayed in its second, so both passes compute the same thing; BatchNorm's running
statistics are restored after the first pass, so they are updated once per chunk. A method whose loss is a mean over
images (Method.per_image_loss) accumulates its chunks' losses weighted M / B instead: no second forward.

What stays per chunk: BatchNorm's batch statistics (as they are per process under DDP without --sync-bn).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import nn

from crlf.engine.methods import Method

Scale = Callable[[torch.Tensor], torch.Tensor]  # the loss scaling of fp16 (GradScaler.scale), else the identity
Context = Callable[[], contextlib.AbstractContextManager]  # the forward's autocast


def backward(
    model: Method, views: list[torch.Tensor], micro: int, amp: Context, scale: Scale,
    embed: Callable[[list[torch.Tensor]], list[torch.Tensor]] | None = None,
    forward: Callable[[list[torch.Tensor]], torch.Tensor] | None = None,
) -> torch.Tensor:  # fmt: skip
    """Accumulate into the parameters' .grad the gradient of the whole batch's loss, `micro` images at a time;
    returns that loss (detached). `embed` / `forward`: the method's, compiled or not."""
    chunks = [[v[i : i + micro] for v in views] for i in range(0, len(views[0]), micro)]
    if model.per_image_loss:
        forward = forward or model
        total = torch.zeros((), device=views[0].device)
        for chunk in chunks:
            with amp():
                loss = forward(chunk) * (len(chunk[0]) / len(views[0]))
            scale(loss).backward()
            total = total + loss.detach().float()
        return total
    return _cached(model, chunks, amp, scale, embed or model.embed)


def _cached(
    model: Method, chunks: list[list[torch.Tensor]], amp: Context, scale: Scale,
    embed: Callable[[list[torch.Tensor]], list[torch.Tensor]],
) -> torch.Tensor:  # fmt: skip
    device = chunks[0][0].device
    statistics = _batchnorm_buffers(model)
    states, outs = [], []
    with torch.no_grad():
        for chunk in chunks:
            states.append(_random_state(device))
            with amp():
                outs.append(embed(chunk))
    after = _random_state(device)
    for live, saved in statistics:
        live.copy_(saved)
    leaves = [torch.cat([o[j] for o in outs]).requires_grad_(outs[0][j].is_floating_point())
              for j in range(len(outs[0]))]  # fmt: skip
    del outs
    with amp():
        loss = model.objective(leaves)
    if loss.requires_grad:
        scale(loss).backward()
    grads = [leaf.grad for leaf in leaves]
    del leaves
    start = 0
    for chunk, state in zip(chunks, states):
        _set_random_state(state, device)
        with amp():
            out = embed(chunk)
        n = len(chunk[0])
        pairs = [(o, g[start : start + n]) for o, g in zip(out, grads) if g is not None and o.requires_grad]
        if pairs:
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        start += n
    _set_random_state(after, device)  # the stream goes on from where the first pass left it
    return loss.detach()


def _batchnorm_buffers(model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(live, copy) of every BatchNorm buffer (running statistics, batch count), teachers' included."""
    return [(b, b.clone()) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
            for b in m.buffers()]  # fmt: skip


def _random_state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The generators a forward's dropout draws from: the CPU one, and the device's on CUDA."""
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def _set_random_state(state: tuple[torch.Tensor, torch.Tensor | None], device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)
