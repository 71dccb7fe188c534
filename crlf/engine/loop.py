"""The training loop itself: epochs of optimisation steps over precomputed schedules, and nothing else.

Everything around it is a hook (crlf.engine.runhooks.RunHooks: the metrics line, checkpoints, the kNN monitor) or a
Reporter (output.py's progress), so the loop reads like DINO's ``train_one_epoch``. Nothing in the step loop reads a
value back to the host: the epoch's loss is summed on the device and read once at the end of the epoch.
"""

from __future__ import annotations

import logging
import math
import signal
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any, Protocol

import torch

from crlf.engine import augment, distributed, gradcache
from crlf.engine.backbones import BackboneSpec
from crlf.engine.device import autocast, make_generator
from crlf.engine.encoder import prepare
from crlf.engine.files import Background
from crlf.engine.methods import Method
from crlf.engine.optim import Plateau, lr_at
from crlf.engine.plan import TrainConfig
from crlf.engine.progress import StartInfo
from crlf.engine.signals import StopFlag
from crlf.engine.sources.feed import Feed
from crlf.errors import InputError, Interrupted, RunError

log = logging.getLogger(__name__)


class Reporter(Protocol):
    """How the loop tells the outside world about progress (output.py draws it; tests may record it)."""

    def on_start(self, info: StartInfo) -> None:
        """Before the first step."""

    def on_step(self, epoch: int, step: int, steps: int, **running: Any) -> None:
        """After each step (`step` of `steps`, 1-based, in 0-based `epoch`); running: loss_sum, the epoch's summed
        loss so far as a device tensor (reading it is a host sync: do it rarely), and lr, the step's learning rate."""

    def on_epoch(self, metrics: dict[str, Any]) -> None: ...


class Hooks(Protocol):
    """What happens around the steps: the run directory's side of the loop (crlf.engine.runhooks.RunHooks)."""

    def after_step(self, step: int, loss: torch.Tensor, lr: float) -> None:
        """After each step (`step` counts from 1 over the run): the step's loss as a device tensor (reading it is a
        host sync: the trackers do it every --log-every-steps steps) and its learning rate."""

    def epoch_metrics(self, epoch: int) -> dict[str, Any]:
        """Extra metrics after `epoch` (1-based) ends: the kNN monitor."""

    def end_epoch(self, epoch: int, metrics: dict[str, Any], progress: Progress) -> None:
        """Write the metrics line and the checkpoint of a finished epoch."""

    def stop(self, epoch: int, progress: Progress, states: list[dict[str, torch.Tensor]]) -> None:
        """Write the checkpoint of a run stopped by a signal inside an epoch."""

    def diverged(self, what: str, epoch: int) -> Exception:
        """The error of a run that diverged in `epoch` (0-based)."""


@dataclass
class Progress:
    """Where a run is: the epochs done, and inside the next one (a stop mid-epoch) the steps done, their summed loss
    and seconds; the plateau schedule's state. Saved in the checkpoint's metadata as JSON."""

    epoch: int = 0
    step: int = 0
    loss_sum: float = 0.0
    seconds: float = 0.0
    plateau: dict[str, Any] = field(default_factory=lambda: Plateau().state())
    world_size: int = 1

    def state(self) -> dict[str, Any]:
        """The JSON object a checkpoint keeps (an epoch boundary keeps epoch, step and plateau only)."""
        full = asdict(self)
        return full if self.step else {k: full[k] for k in ("epoch", "step", "plateau")}

    @classmethod
    def of(cls, state: dict[str, Any]) -> Progress:
        """From a checkpoint's JSON (InputError for values a crafted file could hold)."""
        try:
            done = cls(**{k: state[k] for k in cls.__dataclass_fields__ if k in state})
            Plateau.from_state(done.plateau)
            ok = all(type(getattr(done, k)) is int and getattr(done, k) >= 0 for k in ("epoch", "step", "world_size"))
            if not ok or not all(isinstance(getattr(done, k), (int, float)) for k in ("loss_sum", "seconds")):
                raise ValueError(f"progress {str(state)[:60]}")
        except (TypeError, ValueError) as e:
            raise InputError(f"the checkpoint's progress is not crlf's ({str(e)[:80]}); "
                             "use --force to start over") from None
        return done


@dataclass
class Setup:
    """Everything built once before the first step (crlf.engine.train builds it)."""

    model: Method
    recipe: augment.Recipe  # the method's views of these images
    step_model: torch.nn.Module  # the model, compiled when asked
    optimizer: torch.optim.Optimizer
    feed: Feed  # the training images: in memory (on the device when they fit) or streamed
    probe: torch.Tensor  # uint8 (<= 64, 3, S, S): the fixed batch the divergence / collapse probe embeds
    mean: torch.Tensor  # (1, 3, 1, 1) on the device
    std: torch.Tensor
    spec: BackboneSpec  # the backbone's, resolved for the data's image size
    device: torch.device
    amp: torch.dtype | None
    world: distributed.World
    record: dict[str, Any] = field(default_factory=dict)  # config.json's contents (main process only)
    init: dict[str, Any] | None = None  # where the backbone's starting weights came from (weights.InitSource)
    writer: Background = field(default_factory=Background)  # the per-epoch checkpoint, written while training goes on
    scaler: torch.amp.GradScaler | None = None  # fp16's loss scaling (its state is in the checkpoint)
    embed: Callable[[list[torch.Tensor]], list[torch.Tensor]] | None = None  # model.embed compiled (--micro-batch)


@dataclass(frozen=True)
class Schedule:
    """The run's step counts and per-step learning rates, computed once (before the plateau's scale)."""

    steps: int  # per epoch: the last partial batch is dropped, so every step sees the same number of negatives
    total: int
    lrs: list[float]

    @classmethod
    def of(cls, images: int, batch_size: int, epochs: int, warmup_epochs: float, peak: float, kind: str) -> Schedule:
        steps = images // batch_size
        total = steps * epochs
        warmup = min(total, round(warmup_epochs * steps))
        return cls(steps, total, [lr_at(i, total, warmup, peak, kind) for i in range(total)])


def fit(
    cfg: TrainConfig, s: Setup, progress: Progress, rng: dict[str, torch.Tensor], stop: StopFlag, reporter: Reporter,
    hooks: Hooks,
) -> list[dict[str, Any]]:  # fmt: skip
    """Train from `progress` to cfg.epochs; returns the metrics of the epochs run."""
    n, world, bsz = len(s.feed), s.world, cfg.batch_size  # bsz is global: each process takes its share
    sched = Schedule.of(n, bsz, cfg.epochs, cfg.warmup_epochs, cfg.lr, cfg.schedule)
    start, plateau = progress.epoch, Plateau.from_state(progress.plateau)
    gen = make_generator(s.device, cfg.seed)
    s.model.set_generator(gen)  # a method that draws in forward (MAE's masks) draws from the same stream
    index_device = s.feed.rows_on  # batches are drawn where the data lives
    index_gen = gen if index_device == s.device else make_generator(index_device, cfg.seed)
    reporter.on_start(StartInfo(cfg.epochs, start, sched.steps, bsz, progress.step, n, str(s.device)))
    history = []
    for epoch in range(start, cfg.epochs):
        # Every epoch's randomness depends on (seed, epoch) alone, so a run resumed at an epoch boundary draws exactly
        # the batches and augmentations the uninterrupted run would have. Several processes: the same permutation
        # everywhere, each its own augmentation stream (rank 0's is the single-process one).
        epoch_seed = cfg.seed * 1_000_003 + epoch
        gen.manual_seed(epoch_seed + world.rank * 0x9E3779B1)
        index_gen.manual_seed(epoch_seed)
        torch.manual_seed(epoch_seed)  # dropout
        perm = torch.randperm(n, generator=index_gen, device=index_device)
        s.model.train()
        if cfg.freeze_epochs:  # heads first: the backbone takes no gradient (and no decay) until then
            s.model.backbone.requires_grad_(epoch >= cfg.freeze_epochs)
        loss_sum = torch.zeros((), device=s.device)
        first, before = 0, 0.0  # a run stopped inside this epoch continues at its next step
        if epoch == start and progress.step:
            first, before = progress.step, progress.seconds
            loss_sum += progress.loss_sum
            set_rng(gen, rng, s.device)
        batches = s.feed.batches(epoch, perm, first, sched.steps, bsz, world.rank, bsz // world.world_size)
        t0 = time.perf_counter()
        for step in range(first, sched.steps):
            it = epoch * sched.steps + step
            lr = sched.lrs[it] * plateau.scale
            for group in s.optimizer.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)  # a ViT's layer-wise decay (optim.layer_scales)
            step_loss = train_step(cfg, s, next(batches), gen, it + 1, sched.total)
            loss_sum += step_loss
            hooks.after_step(it + 1, step_loss, lr)
            reporter.on_step(epoch, step + 1, sched.steps, loss_sum=loss_sum, lr=lr)  # it reads the loss rarely
            # one process reads its own flag at every step; several agree every 8 steps (a host sync) on one stop
            last = step == sched.steps - 1
            signum = (distributed.any_flag(stop.signum, world) if step % 8 == 7 or last else 0) if world.active \
                else stop.signum  # fmt: skip
            if signum:
                mid = Progress(epoch, step + 1, loss_sum.item(), before + time.perf_counter() - t0, plateau.state(),
                               world.world_size)  # fmt: skip
                if probe(s) is None:
                    raise hooks.diverged(f"the encoder diverged in epoch {epoch + 1}", epoch)
                hooks.stop(epoch, mid, distributed.gather_states(rng_states(gen, s.device), world))
                raise Interrupted(signum, f"stopped by {signal.Signals(signum).name} at step {step + 1}/{sched.steps} "
                                  f"of epoch {epoch + 1}; the state is saved: run the same command with --resume to "
                                  "continue")  # fmt: skip
        loss = (loss_sum / sched.steps).item()  # the one host sync of the epoch
        # the epoch's last step's lr (also when a run stopped after that step resumes here and runs no step)
        lr = sched.lrs[(epoch + 1) * sched.steps - 1] * plateau.scale
        seconds = before + time.perf_counter() - t0
        if not math.isfinite(loss):
            raise hooks.diverged(f"loss became {loss} in epoch {epoch + 1}", epoch)
        spread = probe(s)
        if spread is None:  # BatchNorm in train mode can keep the loss finite while the encoder itself is broken
            raise hooks.diverged(f"the encoder diverged in epoch {epoch + 1}: its eval-mode embeddings of a fixed "
                                 f"probe batch are NaN or infinite (training loss {loss:.4g})", epoch)  # fmt: skip
        if cfg.schedule == "plateau":
            plateau.update(loss)
        metrics = {"epoch": epoch + 1, "loss": round(loss, 6), "lr": lr,
                   "images_per_s": round(sched.steps * bsz / seconds, 1), "seconds": round(seconds, 3),
                   "embedding_std": round(spread, 5), "time": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        skipped = s.feed.skipped()
        if skipped:  # streaming: unreadable images, each replaced by the next readable one
            metrics["skipped_images"] = len(skipped)
            log.warning("skipped %s unreadable image%s in epoch %d (each replaced by the next readable one): %s",
                        f"{len(skipped):,}", "" if len(skipped) == 1 else "s", epoch + 1,
                        ", ".join(skipped[:3]) + (" ..." if len(skipped) > 3 else ""))  # fmt: skip
        if spread < 1e-4:
            log.warning("the embeddings have collapsed (std %.2g across a probe batch): every image maps to the "
                        "same point; try a lower --lr or another method's defaults", spread)
        metrics.update(hooks.epoch_metrics(epoch + 1))
        hooks.end_epoch(epoch + 1, metrics, Progress(epoch + 1, plateau=plateau.state()))
        history.append(metrics)
        log.info("epoch %d/%d  loss %.4f  lr %.4g  %s img/s  %.1f s%s", epoch + 1, cfg.epochs, loss, lr,
                 f"{metrics['images_per_s']:,.0f}", seconds,
                 f"  kNN top-1 {metrics['knn_top1']:.2f}%" if "knn_top1" in metrics else "")  # fmt: skip
        reporter.on_epoch(metrics)
    return history


def train_step(
    cfg: TrainConfig, s: Setup, batch: torch.Tensor | augment.Views, gen: torch.Generator, step: int, total_steps: int
) -> torch.Tensor:
    """One optimisation step on a uint8 batch (`step` counts from 1 over the run); returns the loss as a device
    tensor (no host sync but fp16's skipped-step check). An out-of-memory error names the flags that help."""
    try:
        # the method's recipe, float in [0, 1] (a streaming source on a CPU ran it in its workers: augment.Views)
        views = batch.views if isinstance(batch, augment.Views) else augment.draw(s.recipe, batch, gen)
        views = [prepare(v, s.mean, s.std) for v in views]  # drawn for the whole batch: the same for any micro-batch
        s.optimizer.zero_grad(set_to_none=True)
        scale = s.scaler.scale if s.scaler is not None else _unscaled
        if 0 < cfg.micro_batch < len(views[0]):  # outside DDP (whose backward would all-reduce every chunk)
            loss = gradcache.backward(s.model, views, cfg.micro_batch, lambda: autocast(s.device, s.amp), scale,
                                      s.embed, s.model if s.world.active else s.step_model)  # fmt: skip
            distributed.average_gradients(s.model, s.world)
        else:
            with autocast(s.device, s.amp):
                loss = s.step_model(views)  # the loss of the global batch
            scale(loss).backward()
        if s.scaler is not None:  # fp16: a step whose gradients hold an inf or NaN is skipped, the scale lowered
            if cfg.grad_clip > 0:
                s.scaler.unscale_(s.optimizer)
                torch.nn.utils.clip_grad_norm_(s.model.parameters(), cfg.grad_clip)
            s.scaler.step(s.optimizer)
            s.scaler.update()
        else:
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(s.model.parameters(), cfg.grad_clip)
            s.optimizer.step()
        s.model.after_step(step, total_steps, cfg.epochs)
    except RuntimeError as e:
        text = str(e)
        if not isinstance(e, torch.cuda.OutOfMemoryError) and "out of memory" not in text \
                and "allocate memory" not in text:  # fmt: skip
            raise
        local = cfg.batch_size // s.world.world_size
        raise RunError(f"out of memory on {s.device} at batch {local} ({text.splitlines()[0][:80]}): try "
                       f"--micro-batch {smaller_chunk(local, cfg.micro_batch or local)} or --activation-checkpointing "
                       f"(or --batch-size {max(2, cfg.batch_size // 2)}); the last checkpoint is kept") from None
    return loss.detach()


def _unscaled(loss: torch.Tensor) -> torch.Tensor:
    return loss


def smaller_chunk(batch: int, current: int) -> int:
    """The largest divisor of `batch` at most a quarter of `current` (1 at least): the --micro-batch to suggest."""
    m = max(1, current // 4)
    while batch % m:
        m -= 1
    return m


def probe(s: Setup) -> float | None:
    """The backbone in eval mode (as extract will use it) on the first 64 images: None when an embedding is NaN or
    infinite, else the std across the batch of the L2-normalised embeddings, averaged over dimensions (a collapse
    indicator: 0 when every image maps to one point, about 1/sqrt(dim) when they spread). Checked before every
    checkpoint is written, so the one kept after a divergence is a good one. Draws no random numbers and changes no
    buffers (resume stays exact); every process checks the same weights."""
    was_training = s.model.training
    s.model.eval()
    try:
        with torch.no_grad(), autocast(s.device, s.amp):
            out = s.model.backbone((s.probe.to(s.device).float() / 255 - s.mean) / s.std).float()
        if not bool(torch.isfinite(out).all()):
            return None
        return float(torch.nn.functional.normalize(out, dim=1).std(dim=0).mean())
    finally:
        s.model.train(was_training)


def rng_states(gen: torch.Generator, device: torch.device) -> dict[str, torch.Tensor]:
    """The generator states a run stopped inside an epoch needs to continue exactly."""
    states = {"augment": gen.get_state(), "torch": torch.get_rng_state()}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def set_rng(gen: torch.Generator, states: dict[str, torch.Tensor], device: torch.device) -> None:
    try:
        gen.set_state(states["augment"])
        torch.set_rng_state(states["torch"])
        if "cuda" in states and device.type == "cuda":
            torch.cuda.set_rng_state(states["cuda"], device)
    except (KeyError, RuntimeError) as e:  # a state file whose checksum was recomputed can hold anything
        raise InputError(f"the checkpoint's random generator states do not fit this run ({str(e)[:60]}); "
                         "use --force to start over") from None
