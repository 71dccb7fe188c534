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
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from crlf.engine import augment, backbones, distributed, evaluate, methods, runplan, sources
from crlf.engine.checkpoint import load_state, save_state, save_tensors, state_tensors
from crlf.engine.device import autocast_dtype, seed_everything
from crlf.engine.encoder import Encoder
from crlf.engine.files import atomic_write
from crlf.engine.loop import Progress, Reporter, Setup, fit
from crlf.engine.optim import build_optimizer
from crlf.engine.progress import StartInfo
from crlf.engine.rundir import RunDir
from crlf.engine.signals import StopFlag
from crlf.engine.sources.feed import Feed, MemoryFeed, open_feed
from crlf.errors import InputError, RunError

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
    data: sources.DataSpec
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


class _Silent:
    def on_start(self, info: StartInfo) -> None: ...
    def on_step(self, epoch: int, step: int, steps: int, **running: Any) -> None: ...
    def on_epoch(self, metrics: dict[str, Any]) -> None: ...


@dataclass
class _Monitor:
    """Labels of the training images and the labelled test split that --knn-every scores."""

    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    num_classes: int


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
    monitor = _monitor_data(cfg, setup.feed) if cfg.knn_every and main else None
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
    progress, rng = _restore(run, setup, world) if plan == runplan.RESUME else (Progress(), {})
    hooks = RunHooks(cfg, setup, run, monitor)
    stop = StopFlag(hard_abort)
    with stop.installed():
        try:
            history = fit(cfg, setup, progress, rng, stop, reporter, hooks)
            setup.feed.close()
            if main:
                with _writing(run):
                    setup.writer.wait()
                    _encoder(cfg, setup, max(progress.epoch, cfg.epochs)).save(run.encoder)
                log.info("encoder written to %s", run.encoder)
        finally:  # a run that fails still finishes writing the checkpoint it started; its own error is the one shown
            with contextlib.suppress(Exception):
                setup.writer.wait()
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





def _restore(run: RunDir, s: Setup, world: distributed.World) -> tuple[Progress, dict[str, torch.Tensor]]:
    """Load the newest checkpoint that is intact (last.safetensors, else the newest good snapshot)."""
    problems = []
    for path in run.checkpoints_newest_first():
        try:
            state, rng = load_state(path, s.model, s.optimizer)
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
            with _writing(run):
                run.truncate_metrics(progress.epoch)
        log.info("resuming %s at epoch %d, step %d", run.path, progress.epoch + 1, progress.step)
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


def _build(cfg: TrainConfig, world: distributed.World) -> Setup:
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
        optimizer=optimizer,
        feed=feed,
        probe=feed.head(64),
        mean=torch.tensor(mean, device=device).view(1, 3, 1, 1),
        std=torch.tensor(std, device=device).view(1, 3, 1, 1),
        spec=spec,
        device=device,
        amp=amp,
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
    test = sources.load(dataclasses.replace(cfg.data, image_size=feed.size), "test")
    if test.labels is None:
        raise InputError(f"--knn-every needs a labelled test split, and {test.source} has none: use --knn-every 0")
    classes = int(max(feed.labels.max(), test.labels.max())) + 1
    if cfg.k > len(feed):
        log.warning("-k %d is more than the %s training images: the kNN monitor uses k = %s", cfg.k,
                    f"{len(feed):,}", f"{len(feed):,}")  # fmt: skip
    return _Monitor(feed.labels, test.images, test.labels, classes)


def channel_stats(images: torch.Tensor, sample: int = 10_000) -> tuple[list[float], list[float]]:
    """Per-channel mean and std on [0, 1] of (up to `sample` evenly spaced) images: the normalisation the encoder
    keeps."""
    step = max(1, len(images) // sample)
    x = images[::step].to(torch.float64) / 255.0
    return x.mean(dim=(0, 2, 3)).tolist(), x.std(dim=(0, 2, 3)).clamp_min(1e-3).tolist()


def _encoder(cfg: TrainConfig, s: Setup, epoch: int) -> Encoder:
    """The run's backbone as an Encoder (shared weights, not a copy) with its normalisation and provenance."""
    config = s.record or cfg.values
    return Encoder(s.model.backbone, s.spec, s.mean.flatten().tolist(), s.std.flatten().tolist(), epoch, config)


def _metadata(cfg: TrainConfig, s: Setup, epoch: int) -> dict[str, str]:
    return _encoder(cfg, s, epoch).metadata()


class RunHooks:
    """The run directory's side of the loop: after each epoch the kNN monitor, the metrics line and the checkpoint
    (written on the writer thread while the next epoch trains); a stop's checkpoint; the error of a divergence."""

    def __init__(self, cfg: TrainConfig, s: Setup, run: RunDir, monitor: _Monitor | None):
        self.cfg, self.s, self.run, self.monitor = cfg, s, run, monitor

    def epoch_metrics(self, epoch: int) -> dict[str, Any]:
        cfg, m = self.cfg, self.monitor
        if m is None or not (epoch % cfg.knn_every == 0 or epoch == cfg.epochs):
            return {}
        return _knn(cfg, self.s, m)

    def end_epoch(self, epoch: int, metrics: dict[str, Any], progress: Progress) -> None:
        if not self.s.world.main:
            return
        with _writing(self.run):  # the metrics line first: a crash between the two re-runs this epoch, never skips it
            self.run.append_metrics(metrics)
            self._save(epoch, progress)

    def stop(self, epoch: int, progress: Progress, states: list[dict[str, torch.Tensor]]) -> None:
        s = self.s
        if s.world.main:
            with _writing(self.run):
                s.writer.wait()  # the epoch's checkpoint first, then this one over it
                save_state(self.run.last, s.model, s.optimizer, _metadata(self.cfg, s, epoch), progress.state(),
                           states)  # fmt: skip

    def diverged(self, what: str, epoch: int) -> Exception:
        """The error of a run that diverged: which checkpoint is left and what to try."""
        kept = (f"the last good checkpoint (epoch {epoch}) is kept in {self.run.path}" if epoch
                else "no checkpoint was written")  # fmt: skip
        return RunError(f"{what}; {kept}. Try a lower --lr, --grad-clip 1.0 or a higher --temperature")

    def _save(self, epoch: int, progress: Progress) -> None:
        """last.safetensors every epoch; a snapshot in checkpoints/ every `checkpoint_every` epochs, keeping the
        newest K. The state is copied now and hashed and written on the writer thread while the next epoch trains;
        the previous write is waited for (and its error raised) first."""
        cfg, s, run = self.cfg, self.s, self.run
        tensors, meta = state_tensors(s.model, s.optimizer, _metadata(cfg, s, epoch), progress.state())

        def write() -> None:
            save_tensors(run.last, tensors, meta)
            if epoch % cfg.checkpoint_every == 0 or epoch == cfg.epochs:
                run.snapshot(epoch, cfg.keep_checkpoints)

        s.writer.submit(write)


def _knn(cfg: TrainConfig, s: Setup, m: _Monitor) -> dict[str, float]:
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
    return {"knn_top1": round(result.top1, 2), "knn_seconds": round(time.perf_counter() - t0, 3)}


