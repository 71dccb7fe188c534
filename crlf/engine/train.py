"""A pretraining run, method-agnostic: lock and prepare the run directory, build (data feed, backbone, method,
optimizer) from a typed TrainConfig, restore a checkpoint, run the loop (crlf.engine.loop.fit) with the run
directory's hooks (metrics line, checkpoint, kNN monitor), save the encoder. What a start does with the run directory
is runplan's.

In memory, each step indexes a uint8 batch where the data lives and the method's recipe draws its augmented views
with per-sample parameters on the device (no DataLoader, no per-image Python); a streamed source hands over crops
cut (or views augmented) by its workers. The checkpoint is written on a thread while the next epoch trains.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
from typing import Any

import torch

from crlf.engine import augment, backbones, distributed, methods, runplan, sources, trackers, weights
from crlf.engine.checkpoint import load_state
from crlf.engine.device import autocast_dtype, grad_scaler, seed_everything
from crlf.engine.files import atomic_write
from crlf.engine.loop import Progress, Reporter, Setup, fit, smaller_chunk
from crlf.engine.optim import build_optimizer
from crlf.engine.plan import TrainConfig
from crlf.engine.progress import StartInfo
from crlf.engine.rundir import RunDir
from crlf.engine.runhooks import RunHooks, encoder_of, monitor_data, writing
from crlf.engine.signals import StopFlag
from crlf.engine.sources.feed import Feed, MemoryFeed, open_feed
from crlf.errors import InputError, Interrupted

log = logging.getLogger(__name__)


class _Silent:
    def on_start(self, info: StartInfo) -> None: ...
    def on_step(self, epoch: int, step: int, steps: int, **running: Any) -> None: ...
    def on_epoch(self, metrics: dict[str, Any]) -> None: ...


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
    trackers.check(cfg.logger)  # a missing package fails before anything is loaded or written
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
            with writing(run):
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
    # bad data or settings fail here, before anything is changed or written; a resume restores its own weights
    setup = _build(cfg, world, load_init=plan != runplan.RESUME)
    monitor = monitor_data(cfg, setup.feed) if cfg.knn_every and main else None
    if main:
        with writing(run):
            run.remove_temp_files()  # left by a process killed while writing
            if plan == runplan.FRESH and run.has_run():
                log.warning("--force: discarding the run in %s and starting over", run.path)
                run.clear()
            elif plan == runplan.RESTART:
                log.info("%s has no checkpoint yet: starting fresh", run.path)
                run.truncate_metrics(0)  # a line of an epoch whose checkpoint was never written
            setup.record = runplan.run_record(cfg.values, setup.device, setup.amp, world)
            if setup.init is not None:  # where the starting weights came from, and their hash
                setup.record["resolved"]["init"] = setup.init
            config = json.dumps(setup.record, indent=2)
            atomic_write(run.config, lambda f: f.write(config.encode()))
    distributed.barrier(world)  # the others read checkpoints only after the main process has set up
    progress, rng = _restore(run, setup, world) if plan == runplan.RESUME else (Progress(), {})
    tracked = _open_trackers(cfg, run, setup, progress) if main else None
    hooks = RunHooks(cfg, setup, run, monitor, tracked)
    stop = StopFlag(hard_abort)
    status = "failed"
    with stop.installed():
        try:
            history = fit(cfg, setup, progress, rng, stop, reporter, hooks)
            setup.feed.close()
            if main:
                with writing(run):
                    setup.writer.wait()
                    encoder_of(cfg, setup, max(progress.epoch, cfg.epochs)).save(run.encoder)
                log.info("encoder written to %s", run.encoder)
            status = "finished"
        except (Interrupted, KeyboardInterrupt):
            status = "interrupted"
            raise
        finally:  # a run that fails still finishes writing the checkpoint it started; its own error is the one shown
            with contextlib.suppress(Exception):
                setup.writer.wait()
            if tracked is not None:
                tracked.close(status)
    summary = {
        "status": "trained",
        "run_dir": str(run.path),
        "encoder": str(run.encoder),
        "epochs": cfg.epochs,
        "epochs_run": len(history),
        "final_loss": history[-1]["loss"] if history else None,
        "images_per_s": round(sum(m["images_per_s"] for m in history) / max(1, len(history)), 1),
        "seconds": round(sum(m["seconds"] for m in history), 3),
        "device": str(setup.device),
    }
    return {**summary, "rank": world.rank, "world_size": world.world_size} if world.active else summary


def _open_trackers(cfg: TrainConfig, run: RunDir, s: Setup, progress: Progress) -> trackers.Trackers | None:
    """The --logger trackers, continuing the runs trackers.json records after the restored step (None: none)."""
    if not cfg.logger:
        return None
    steps = len(s.feed) // cfg.batch_size
    tracked = trackers.Trackers(run, cfg.logger)
    tracked.start(s.record, progress.epoch * steps + progress.step, steps, run.read_metrics())
    return tracked


def _restore(run: RunDir, s: Setup, world: distributed.World) -> tuple[Progress, dict[str, torch.Tensor]]:
    """Load the newest checkpoint that is intact (last.safetensors, else the newest good snapshot)."""
    problems = []
    for path in run.checkpoints_newest_first():
        try:
            state, rng = load_state(path, s.model, s.optimizer, s.scaler)
            progress = Progress.of(state)
        except (InputError, ValueError) as e:
            problems.append(str(e))
            log.warning("cannot resume from %s: %s", path, e)
            continue
        if path != run.last:
            log.warning("resuming from the snapshot %s instead", path)
        if progress.step and progress.world_size != world.world_size:
            log.warning("the run stopped inside epoch %d with %d processes, now %d: that epoch starts over",
                        progress.epoch + 1, progress.world_size, world.world_size)  # fmt: skip
            progress = Progress(progress.epoch, plateau=progress.plateau)
        rng = distributed.own_states(rng, world)
        if world.main:
            with writing(run):
                run.truncate_metrics(progress.epoch)
        log.info("resuming %s at epoch %d, step %d", run.path, progress.epoch + 1, progress.step)
        return progress, rng
    raise InputError(f"no intact checkpoint in {run.path} ({problems[0]}); use --force to start over")


def _build(cfg: TrainConfig, world: distributed.World, load_init: bool = True) -> Setup:
    """Load the data, build model and optimizer (seeded, so weights are reproducible) on this process's device;
    the backbone starts from cfg.init's weights when `load_init`."""
    device = world.device
    if cfg.freeze_epochs and world.active:
        raise InputError("--freeze-epochs is not supported under torchrun yet (DDP fixes the trained "
                         "parameters when it wraps the model): train the heads first in one process, or drop it")
    method = methods.get(cfg.method)
    local = cfg.batch_size // world.world_size
    if cfg.micro_batch and local % cfg.micro_batch:
        per = f" ({world.world_size} processes x {local})" if world.active else ""
        raise InputError(f"--micro-batch {cfg.micro_batch} must divide the batch of each process, {local} images"
                         f"{per}: try --micro-batch {smaller_chunk(local, 4 * cfg.micro_batch)}")  # fmt: skip
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
    init = None
    if cfg.init and load_init:
        init = dataclasses.asdict(weights.load_into(backbone, cfg.init, spec))
        log.info("backbone weights from %s (%d tensors, sha256 %s)", init["path"], init["loaded"], init["sha256"][:12])
    no_decay = {f"backbone.{n}" for n in backbones.no_weight_decay(spec, backbone)}
    model = method(backbone, cfg.method_config, spec.feature_dim)
    if cfg.micro_batch and not (method.splits() or model.per_image_loss):
        raise InputError(f"--micro-batch: --method {cfg.method} has neither the embed / objective split nor a "
                         "per-image loss (crlf.engine.methods.base): drop --micro-batch")  # fmt: skip
    if cfg.activation_checkpointing:  # the backbone only: teachers run without a graph
        backbones.checkpoint_activations(spec, model.backbone)
    mean, std = channel_stats(feed.spaced(10_000))
    model.set_normalisation(torch.tensor(mean), torch.tensor(std))
    model = model.to(device)
    if cfg.sync_bn and world.active:
        model = distributed.sync_batchnorm(model, device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, cfg.optimizer, cfg.lr, cfg.weight_decay, no_decay, cfg.layer_decay,
                                method.adam_betas)  # fmt: skip
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
    return Setup(
        model=model,
        recipe=recipe,
        step_model=torch.compile(step_model) if cfg.compile else step_model,
        embed=torch.compile(model.embed) if cfg.compile and cfg.micro_batch and method.splits() else None,
        scaler=grad_scaler(device, amp),
        optimizer=optimizer,
        feed=feed,
        probe=feed.head(64),
        mean=torch.tensor(mean, device=device).view(1, 3, 1, 1),
        std=torch.tensor(std, device=device).view(1, 3, 1, 1),
        spec=spec,
        device=device,
        amp=amp,
        world=world,
        init=init,
    )


def channel_stats(images: torch.Tensor, sample: int = 10_000) -> tuple[list[float], list[float]]:
    """Per-channel mean and std on [0, 1] of (up to `sample` evenly spaced) images: the normalisation the encoder
    keeps."""
    step = max(1, len(images) // sample)
    x = images[::step].to(torch.float64) / 255.0
    return x.mean(dim=(0, 2, 3)).tolist(), x.std(dim=(0, 2, 3)).clamp_min(1e-3).tolist()


