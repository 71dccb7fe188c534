"""The pretraining loop, method-agnostic: build (data feed, backbone, method, optimizer), then epochs of steps,
a metrics line, a probe and a checkpoint each; what a start does with the run directory is runplan's.

In memory, each step indexes a uint8 batch where the data lives and the method draws its augmented views with
per-sample parameters on the device (no DataLoader, no per-image Python); a streamed source hands over crops cut
by its workers. Nothing in the step loop reads a value back to the host; the epoch's loss is summed on the
device and read once at the end of the epoch, and the checkpoint is written on a thread while the next one trains.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

import torch

from crlf.engine import augment, backbones, distributed, evaluate, methods, runplan, sources
from crlf.engine.backbones import BackboneSpec
from crlf.engine.checkpoint import load_state, save_state, save_tensors, state_tensors
from crlf.engine.device import autocast, autocast_dtype, make_generator, seed_everything
from crlf.engine.encoder import Encoder, prepare
from crlf.engine.files import Background, atomic_write
from crlf.engine.optim import Plateau, build_optimizer, lr_at
from crlf.engine.rundir import RunDir
from crlf.engine.signals import StopFlag
from crlf.engine.sources.feed import Feed, MemoryFeed, open_feed
from crlf.errors import InputError, Interrupted, RunError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    """Everything a run needs, as the command layer resolved it (crlf.commands.pretrain builds it from the settings;
    crlf.options documents each field): the method and its config, the backbone, the data, the augmentation and the
    optimisation; `values` is the resolved settings as config.json records them, `identity` the subset of them that
    --resume refuses to change."""

    method: str
    method_config: Any  # the method's Config dataclass
    augment: augment.Augment
    data: Any  # the data source's spec (sources.DataSpec)
    out: Path
    arch: str = "resnet18"
    stem: str = "auto"
    patch_size: int | None = None
    epochs: int = 100
    batch_size: int = 512
    optimizer: str = "sgd"
    lr: float = 0.48
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    warmup_epochs: float = 1.0
    grad_clip: float = 0.0
    seed: int = 0
    checkpoint_every: int = 1
    keep_checkpoints: int = 3
    compile: bool = False
    sync_bn: bool = False
    knn_every: int = 0
    k: int = 200
    knn_temperature: float = 0.1
    device: str = "auto"
    precision: str = "auto"
    values: dict[str, Any] = field(default_factory=dict)
    identity: dict[str, Any] = field(default_factory=dict)
    backbone: torch.nn.Module | None = None  # a user's own backbone instead of building `arch`
    images: sources.ImageSet | None = None  # a user's own images instead of reading `data`


class Reporter(Protocol):
    """How the loop tells the outside world about progress (output.py draws it; tests may record it)."""

    def on_start(self, info: dict[str, Any]) -> None:
        """Before the first step: epochs, start_epoch, start_step (inside start_epoch, after a resume), steps (per
        epoch), batch_size (global), images, device."""

    def on_step(self, epoch: int, step: int, steps: int, **running: Any) -> None:
        """After each step (`step` of `steps`, 1-based, in 0-based `epoch`); running: loss_sum, the epoch's summed
        loss so far as a device tensor (reading it is a host sync: do it rarely), and lr, the step's learning rate."""

    def on_epoch(self, metrics: dict[str, Any]) -> None: ...


class _Silent:
    def on_start(self, info: dict[str, Any]) -> None: ...
    def on_step(self, epoch: int, step: int, steps: int, **running: Any) -> None: ...
    def on_epoch(self, metrics: dict[str, Any]) -> None: ...


@dataclass
class _Monitor:
    """Labels of the training images and the labelled test split that --knn-every scores."""

    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    num_classes: int


@dataclass
class _Setup:
    """Everything built once before the first step."""

    model: methods.Method
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
    monitor: _Monitor | None  # the --knn-every evaluation data, when asked for (main process only)
    world: distributed.World
    record: dict[str, Any] = field(default_factory=dict)  # config.json's contents (main process only)
    writer: Background = field(default_factory=Background)  # the per-epoch checkpoint, written while training goes on


def pretrain(
    cfg: TrainConfig,
    reporter: Reporter | None = None,
    *,
    resume: bool = False,
    force: bool = False,
    hard_abort: bool = False,
) -> dict[str, Any]:
    """Train an encoder as `cfg` says, writing the run directory; returns a summary dict.

    resume: continue from last.safetensors when there is one (a no-op when the run is complete);
    force: discard whatever run the directory holds and start over;
    hard_abort: a second SIGINT ends the process at once, even inside a long native op (the CLI's choice).
    """
    world = distributed.join(cfg.device)
    logger, level = logging.getLogger("crlf"), logging.getLogger("crlf").level
    if not world.main:
        logger.setLevel(logging.WARNING)  # the main process tells the story; the others speak up only about problems
    try:
        return _pretrain(
            cfg, (reporter or _Silent()) if world.main else _Silent(), world, resume, force, hard_abort
        )
    finally:
        logger.setLevel(level)
        distributed.leave(world)


def _pretrain(
    cfg: TrainConfig,
    reporter: Reporter,
    world: distributed.World,
    resume: bool,
    force: bool,
    hard_abort: bool,
) -> dict[str, Any]:
    """The run, in every process; the main process (rank 0) alone locks, decides, writes and reports."""
    if cfg.batch_size % world.world_size:
        raise InputError(
            f"--batch-size {cfg.batch_size} is the global batch: "
            f"it must divide evenly among {world.world_size} processes"
        )
    run = RunDir(cfg.out)
    main = world.main
    if main:
        run.check_owner()  # a foreign folder or a link is refused before anything is opened in it
        if resume and run.path.is_dir() and not run.writable():  # e.g. a finished run on a read-only mount
            if runplan.plan(run, cfg.identity, cfg.epochs, resume=True, force=False) == runplan.COMPLETE:
                return runplan.complete(run)
            raise InputError(f"cannot write to {run.path} (read-only): it holds an unfinished run; copy it elsewhere")
    with contextlib.ExitStack() as held:
        if main:
            held.enter_context(run.removed_on_failed_start())  # bad data or settings leave nothing behind
            held.enter_context(run.locked())
            with _writing(run):
                run.mark()  # before train.log: a folder with crlf's log in it is always crlf's
            held.enter_context(run.logging_to_file())
        return _start(cfg, reporter, world, run, resume, force, hard_abort)


def _start(
    cfg: TrainConfig,
    reporter: Reporter,
    world: distributed.World,
    run: RunDir,
    resume: bool,
    force: bool,
    hard_abort: bool,
) -> dict[str, Any]:
    """Plan, build, prepare the directory and train, with the directory locked and logged to."""
    main = world.main
    # the main process decides; the others follow
    plan = runplan.plan(run, cfg.identity, cfg.epochs, resume=resume, force=force) if main else runplan.FRESH
    plan = distributed.any_flag(plan, world)
    if plan == runplan.COMPLETE:
        return runplan.complete(run)
    setup = _build(cfg, world)  # bad data or settings fail here, before anything is changed or written
    if main:
        with _writing(run):
            run.remove_temp_files()  # left by a process killed while writing
            if plan == runplan.FRESH and run.has_run():
                log.warning("--force: discarding the run in %s and starting over", run.path)
                run.clear()
            elif plan == runplan.RESTART:
                log.info("%s has no checkpoint yet: starting fresh", run.path)
                run.truncate_metrics(0)  # a line of an epoch whose checkpoint was never written
            setup.record = runplan.run_record(cfg.values, setup.device, setup.amp, world)
            config = json.dumps(setup.record, indent=2)
            atomic_write(run.config, lambda f: f.write(config.encode()))
    distributed.barrier(world)  # the others read checkpoints only after the main process has set up
    progress, rng = _restore(run, setup, world) if plan == runplan.RESUME else (None, {})
    stop = StopFlag(hard_abort)
    with stop.installed():
        try:
            return _loop(
                cfg, setup, run, reporter, progress or {"epoch": 0, "plateau": Plateau().state()}, rng, stop
            )
        finally:  # a run that fails still finishes writing the checkpoint it started; its own error is the one shown
            with contextlib.suppress(Exception):
                setup.writer.wait()





def _restore(run: RunDir, s: _Setup, world: distributed.World) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Load the newest checkpoint that is intact (last.safetensors, else the newest good snapshot)."""
    problems = []
    for path in run.checkpoints_newest_first():
        try:
            progress, rng = load_state(path, s.model, s.optimizer)
            Plateau.from_state(progress.get("plateau"))
        except (InputError, ValueError) as e:
            problems.append(str(e))
            log.warning("cannot resume from %s: %s", path, e)
            continue
        if path != run.last:
            log.warning("resuming from the snapshot %s instead", path)
        if progress.get("step") and progress.get("world_size", 1) != world.world_size:
            log.warning(
                "the run stopped inside epoch %d with %d processes, now %d: that epoch starts over",
                progress["epoch"] + 1,
                progress.get("world_size", 1),
                world.world_size,
            )
            progress = {**progress, "step": 0}
        rng = distributed.own_states(rng, world)
        if world.main:
            with _writing(run):
                run.truncate_metrics(progress["epoch"])
        log.info("resuming %s at epoch %d, step %d", run.path, progress["epoch"] + 1, progress.get("step", 0))
        return progress, rng
    raise InputError(f"no intact checkpoint in {run.path} ({problems[0]}); use --force to start over")


@contextlib.contextmanager
def _writing(run: RunDir) -> Iterator[None]:
    """A failed write (full disk, read-only or vanished folder) is a RunError: exit 1; the previous files are intact."""
    try:
        yield
    except OSError as e:
        raise RunError(
            f"cannot write to {run.path}: {e.strerror or e}; the previous checkpoint is kept: "
            "free some space (or fix the folder) and run the same command with --resume"
        ) from None


def _build(cfg: TrainConfig, world: distributed.World) -> _Setup:
    """Load the data, build model and optimizer (seeded, so weights are reproducible) on this process's device."""
    device = world.device
    method = methods.get(cfg.method)
    if cfg.images is not None:
        size = cfg.images.images.shape[-1]
        recipe = method.recipe(cfg.method_config, cfg.augment, size)
        feed: Feed = MemoryFeed(cfg.images, device)
    else:
        size = cfg.data.image_size or sources.REGISTRY[cfg.data.data].default_size or 0
        recipe = method.recipe(cfg.method_config, cfg.augment, size)
        feed = open_feed(cfg.data, device, recipe.crop_plan(size), cfg.seed, functools.partial(augment.draw, recipe))
    if len(feed) < cfg.batch_size:
        raise InputError(
            f"batch size {cfg.batch_size} is larger than the data set ({len(feed)} images): "
            f"use --batch-size {len(feed)} or less"
        )
    amp = autocast_dtype(device, cfg.precision)
    if feed.size != size:  # the recipe is the method's for the images' own size
        recipe = method.recipe(cfg.method_config, cfg.augment, feed.size)
    size = feed.size
    seed_everything(cfg.seed)
    if cfg.backbone is None:
        spec = backbones.spec_for(cfg.arch, size, cfg.stem, cfg.patch_size)
        backbone = backbones.build(spec)
    else:  # a user's own module: its width read off one forward pass
        backbone = cfg.backbone
        spec = backbones.custom_spec(backbone, size)
    no_decay = {f"backbone.{n}" for n in backbones.no_weight_decay(spec, backbone)}
    model = method(backbone, cfg.method_config, spec.feature_dim)
    mean, std = channel_stats(feed.spaced(10_000))
    model = model.to(device)
    if cfg.sync_bn and world.active:
        model = distributed.sync_batchnorm(model, device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(
        model, cfg.optimizer, cfg.lr, cfg.weight_decay, no_decay
    )
    monitor = _monitor_data(cfg, feed) if cfg.knn_every and world.main else None
    step_model = distributed.wrap(model, world)
    log.info(
        "%s image%s %dx%d from %s; %s on %s%s; %s%s",
        f"{len(feed):,}",
        "" if len(feed) == 1 else "s",
        size,
        size,
        feed.source,
        backbones.describe(spec),
        device,
        f" ({str(amp).removeprefix('torch.')})" if amp else f" ({torch.get_num_threads()} threads)"
        if device.type == "cpu" else "",
        "1 step/epoch" if len(feed) // cfg.batch_size == 1 else f"{len(feed) // cfg.batch_size} steps/epoch",
        f"; {world.world_size} processes x {cfg.batch_size // world.world_size} images" if world.active else "",
    )
    return _Setup(
        model=model,
        recipe=recipe,
        step_model=torch.compile(step_model) if cfg.compile else step_model,
        optimizer=optimizer,
        feed=feed,
        probe=feed.head(64),
        mean=torch.tensor(mean, device=device).view(1, 3, 1, 1),
        std=torch.tensor(std, device=device).view(1, 3, 1, 1),
        spec=spec,
        device=device,
        amp=amp,
        monitor=monitor,
        world=world,
    )


def _monitor_data(cfg: TrainConfig, feed: Feed) -> _Monitor:
    """The test split for the kNN monitor, at the training image size; labels are required on both sides."""
    if not isinstance(feed, MemoryFeed):
        raise InputError(
            "--knn-every embeds every training image each time: it needs them in memory; use --no-stream, or "
            "--knn-every 0 and score the checkpoints with crlf knn-eval"
        )
    if feed.labels is None:
        raise InputError(
            f"--knn-every needs labelled training images, and {feed.source} has none: "
            "use a labelled split (e.g. --split train) or --knn-every 0"
        )
    test = sources.load(_sized(cfg.data, feed.size), "test")
    if test.labels is None:
        raise InputError(f"--knn-every needs a labelled test split, and {test.source} has none: use --knn-every 0")
    classes = int(max(feed.labels.max(), test.labels.max())) + 1
    if cfg.k > len(feed):
        log.warning("-k %d is more than the %s training images: the kNN monitor uses k = %s", cfg.k,
                    f"{len(feed):,}", f"{len(feed):,}")  # fmt: skip
    return _Monitor(feed.labels, test.images, test.labels, classes)


def _sized(data: Any, size: int) -> Any:
    """The data spec at another image size."""
    return dataclasses.replace(data, image_size=size) if dataclasses.is_dataclass(data) else data.model_copy(
        update={"image_size": size})


def channel_stats(images: torch.Tensor, sample: int = 10_000) -> tuple[list[float], list[float]]:
    """Per-channel mean and std on [0, 1] of (up to `sample` evenly spaced) images: the normalisation the encoder
    keeps."""
    step = max(1, len(images) // sample)
    x = images[::step].to(torch.float64) / 255.0
    return x.mean(dim=(0, 2, 3)).tolist(), x.std(dim=(0, 2, 3)).clamp_min(1e-3).tolist()


def _loop(
    cfg: TrainConfig,
    s: _Setup,
    run: RunDir,
    reporter: Reporter,
    progress: dict[str, Any],
    rng: dict[str, torch.Tensor],
    stop: StopFlag,
) -> dict[str, Any]:
    start, plateau = progress["epoch"], Plateau.from_state(progress["plateau"])
    n, world = len(s.feed), s.world
    bsz = cfg.batch_size  # global: this process takes its share of each batch
    share = bsz // world.world_size
    steps = n // bsz  # drop the last partial batch: every step sees the same number of negatives
    total_steps = steps * cfg.epochs
    warmup = min(total_steps, round(cfg.warmup_epochs * steps))
    peak = cfg.lr
    gen = make_generator(s.device, cfg.seed)
    index_device = s.feed.rows_on  # batches are drawn where the data lives
    index_gen = gen if index_device == s.device else make_generator(index_device, cfg.seed)
    reporter.on_start(
        {
            "epochs": cfg.epochs,
            "start_epoch": start,
            "start_step": progress.get("step") or 0,
            "steps": steps,
            "batch_size": bsz,
            "images": n,
            "device": str(s.device),
        }
    )
    history = []
    for epoch in range(start, cfg.epochs):
        # Every epoch's randomness depends on (seed, epoch) alone, so a run resumed at an epoch boundary
        # draws exactly the batches and augmentations the uninterrupted run would have.
        # Several processes: the same permutation everywhere, each its own augmentation stream (rank 0's is
        # the single-process one).
        epoch_seed = cfg.seed * 1_000_003 + epoch
        gen.manual_seed(epoch_seed + world.rank * 0x9E3779B1)
        index_gen.manual_seed(epoch_seed)
        torch.manual_seed(epoch_seed)  # dropout
        perm = torch.randperm(n, generator=index_gen, device=index_device)
        s.model.train()
        loss_sum = torch.zeros((), device=s.device)
        first, before = 0, 0.0  # a run stopped inside this epoch continues at its next step
        if epoch == start and progress.get("step"):
            first, before = progress["step"], progress["seconds"]
            loss_sum += progress["loss_sum"]
            _set_rng(gen, rng, s.device)
        batches = s.feed.batches(epoch, perm, first, steps, bsz, world.rank, share)
        t0 = time.perf_counter()
        for step in range(first, steps):
            lr = lr_at(epoch * steps + step, total_steps, warmup, peak, cfg.schedule) * plateau.scale
            for group in s.optimizer.param_groups:
                group["lr"] = lr
            batch = next(batches)
            try:
                loss_sum += _step(cfg, s, batch, gen, epoch * steps + step + 1, total_steps)
            except RuntimeError as e:
                if (
                    not isinstance(e, torch.cuda.OutOfMemoryError)
                    and "out of memory" not in str(e)
                    and "allocate memory" not in str(e)
                ):
                    raise
                raise RunError(
                    f"out of memory on {s.device} at --batch-size {bsz} ({str(e).splitlines()[0][:80]}); "
                    f"try --batch-size {max(2, bsz // 2)}; the last checkpoint is kept"
                ) from None
            reporter.on_step(epoch, step + 1, steps, loss_sum=loss_sum, lr=lr)  # the reporter reads the loss rarely
            # one process reads its own flag at every step; several agree every 8 steps (a host sync) on one stop
            if world.active:
                signum = distributed.any_flag(stop.signum, world) if step % 8 == 7 or step == steps - 1 else 0
            else:
                signum = stop.signum
            if signum:
                mid = {
                    "epoch": epoch,
                    "step": step + 1,
                    "loss_sum": loss_sum.item(),
                    "seconds": before + time.perf_counter() - t0,
                    "plateau": plateau.state(),
                    "world_size": world.world_size,
                }
                if _probe(s) is None:
                    raise _diverged(f"the encoder diverged in epoch {epoch + 1}", epoch, run)
                states = distributed.gather_states(_get_rng(gen, s.device), world)
                if world.main:
                    with _writing(run):
                        s.writer.wait()  # the epoch's checkpoint first, then this one over it
                        save_state(run.last, s.model, s.optimizer, _metadata(cfg, s, epoch), mid, states)
                name = signal.Signals(signum).name
                raise Interrupted(
                    signum,
                    f"stopped by {name} at step {step + 1}/{steps} of epoch {epoch + 1}; "
                    f"the state is saved: run the same command with --resume to continue",
                )
        loss = (loss_sum / steps).item()  # the one host sync of the epoch
        # the epoch's last step's lr (also when a run stopped after that step resumes here and runs no step)
        lr = lr_at((epoch + 1) * steps - 1, total_steps, warmup, peak, cfg.schedule) * plateau.scale
        seconds = before + time.perf_counter() - t0
        if not math.isfinite(loss):
            raise _diverged(f"loss became {loss} in epoch {epoch + 1}", epoch, run)
        spread = _probe(s)
        if spread is None:  # BatchNorm in train mode can keep the loss finite while the encoder itself is broken
            raise _diverged(f"the encoder diverged in epoch {epoch + 1}: its eval-mode embeddings of a fixed probe "
                            f"batch are NaN or infinite (training loss {loss:.4g})", epoch, run)
        if cfg.schedule == "plateau":
            plateau.update(loss)
        skipped = s.feed.skipped()
        metrics = {
            "epoch": epoch + 1,
            "loss": round(loss, 6),
            "lr": lr,
            "images_per_s": round(steps * bsz / seconds, 1),
            "seconds": round(seconds, 3),
            "embedding_std": round(spread, 5),
            "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        if skipped:  # streaming: unreadable images, each replaced by the next readable one
            metrics["skipped_images"] = len(skipped)
            log.warning("skipped %s unreadable image%s in epoch %d (each replaced by the next readable one): %s",
                        f"{len(skipped):,}", "" if len(skipped) == 1 else "s", epoch + 1,
                        ", ".join(skipped[:3]) + (" ..." if len(skipped) > 3 else ""))  # fmt: skip
        if spread < 1e-4:
            log.warning("the embeddings have collapsed (std %.2g across a probe batch): every image maps to the "
                        "same point; try a lower --lr or another method's defaults", spread)
        if s.monitor is not None and ((epoch + 1) % cfg.knn_every == 0 or epoch + 1 == cfg.epochs):
            metrics.update(_knn(cfg, s, s.monitor))
        if world.main:
            with _writing(
                run
            ):  # the metrics line first: a crash between the two re-runs this epoch, never skips its line
                run.append_metrics(metrics)
                _save(cfg, s, run, epoch + 1, plateau)
        history.append(metrics)
        log.info(
            "epoch %d/%d  loss %.4f  lr %.4g  %s img/s  %.1f s%s",
            epoch + 1,
            cfg.epochs,
            loss,
            lr,
            f"{metrics['images_per_s']:,.0f}",
            seconds,
            f"  kNN top-1 {metrics['knn_top1']:.2f}%" if "knn_top1" in metrics else "",
        )
        reporter.on_epoch(metrics)
    s.feed.close()
    if world.main:
        with _writing(run):
            s.writer.wait()
            _save_encoder(cfg, s, run, max(start, cfg.epochs))
    summary = {
        "status": "trained",
        "run_dir": str(run.path),
        "encoder": str(run.encoder),
        "epochs": cfg.epochs,
        "epochs_run": len(history),
        "final_loss": history[-1]["loss"] if history else None,
        "images_per_s": round(sum(m["images_per_s"] for m in history) / max(1, len(history)), 1),
        "seconds": round(sum(m["seconds"] for m in history), 3),
        "device": str(s.device),
    }
    return {**summary, "rank": world.rank, "world_size": world.world_size} if world.active else summary


def _probe(s: _Setup) -> float | None:
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


def _diverged(what: str, epoch: int, run: RunDir) -> RunError:
    """The error of a run that diverged: which checkpoint is left and what to try."""
    kept = f"the last good checkpoint (epoch {epoch}) is kept in {run.path}" if epoch else "no checkpoint was written"
    return RunError(f"{what}; {kept}. Try a lower --lr, --grad-clip 1.0 or a higher --temperature")


def _knn(cfg: TrainConfig, s: _Setup, m: _Monitor) -> dict[str, float]:
    """kNN top-1 of the test split against the training images, embedded by the backbone in eval mode (no randomness
    is drawn, so the monitor does not change the run)."""
    t0 = time.perf_counter()
    encoder = _encoder(cfg, s, 0)
    assert isinstance(s.feed, MemoryFeed)  # _monitor_data refuses a stream
    bank = encoder.features(s.feed.images, batch_size=cfg.batch_size, precision=cfg.precision)
    queries = encoder.features(m.test_images, batch_size=cfg.batch_size, precision=cfg.precision)
    result = evaluate.knn_classify(
        bank,
        m.train_labels,
        queries,
        m.test_labels,
        m.num_classes,
        k=cfg.k,
        temperature=cfg.knn_temperature,
        device=s.device,
    )
    return {"knn_top1": round(result["top1"], 2), "knn_seconds": round(time.perf_counter() - t0, 3)}


def _get_rng(gen: torch.Generator, device: torch.device) -> dict[str, torch.Tensor]:
    """The generator states a run stopped inside an epoch needs to continue exactly."""
    states = {"augment": gen.get_state(), "torch": torch.get_rng_state()}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def _set_rng(gen: torch.Generator, states: dict[str, torch.Tensor], device: torch.device) -> None:
    try:
        gen.set_state(states["augment"])
        torch.set_rng_state(states["torch"])
        if "cuda" in states and device.type == "cuda":
            torch.cuda.set_rng_state(states["cuda"], device)
    except (KeyError, RuntimeError) as e:  # a state file whose checksum was recomputed can hold anything
        raise InputError(f"the checkpoint's random generator states do not fit this run ({str(e)[:60]}); "
                         "use --force to start over") from None


def _step(
    cfg: TrainConfig, s: _Setup, batch: torch.Tensor, gen: torch.Generator, step: int, total_steps: int
) -> torch.Tensor:
    """One optimisation step on a uint8 batch (`step` counts from 1 over the run); returns the loss as a device
    tensor (no host sync)."""
    # the method's recipe, float in [0, 1] (a streaming source on a CPU ran it in its workers: augment.Views)
    views = batch.views if isinstance(batch, augment.Views) else augment.draw(s.recipe, batch, gen)
    views = [prepare(v, s.mean, s.std) for v in views]
    with autocast(s.device, s.amp):
        loss = s.step_model(views)  # the loss of the global batch
    s.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(s.model.parameters(), cfg.grad_clip)
    s.optimizer.step()
    s.model.after_step(step, total_steps, cfg.epochs)
    return loss.detach()


def _encoder(cfg: TrainConfig, s: _Setup, epoch: int) -> Encoder:
    """The run's backbone as an Encoder (shared weights, not a copy) with its normalisation and provenance."""
    config = s.record or cfg.values
    return Encoder(s.model.backbone, s.spec, s.mean.flatten().tolist(), s.std.flatten().tolist(), epoch, config)


def _metadata(cfg: TrainConfig, s: _Setup, epoch: int) -> dict[str, str]:
    return _encoder(cfg, s, epoch).metadata()


def _save(cfg: TrainConfig, s: _Setup, run: RunDir, epoch: int, plateau: Plateau) -> None:
    """last.safetensors every epoch; a snapshot in checkpoints/ every `checkpoint_every` epochs, keeping the
    newest K. The state is copied now and hashed and written on the writer thread while the next epoch trains;
    the previous write is waited for (and its error raised) first."""
    progress = {"epoch": epoch, "step": 0, "plateau": plateau.state()}
    tensors, meta = state_tensors(s.model, s.optimizer, _metadata(cfg, s, epoch), progress)

    def write() -> None:
        save_tensors(run.last, tensors, meta)
        if epoch % cfg.checkpoint_every == 0 or epoch == cfg.epochs:
            run.snapshot(epoch, cfg.keep_checkpoints)

    s.writer.submit(write)


def _save_encoder(cfg: TrainConfig, s: _Setup, run: RunDir, epoch: int) -> None:
    _encoder(cfg, s, epoch).save(run.encoder)
    log.info("encoder written to %s", run.encoder)
