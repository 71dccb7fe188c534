"""The run directory's side of the loop (crlf.engine.loop.Hooks): after each epoch the kNN monitor, the metrics line,
the trackers' points and the checkpoint (written on the writer thread while the next epoch trains); a stop's
checkpoint; the error of a divergence; and the Encoder a run's backbone is saved as."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from crlf.engine import evaluate, sources
from crlf.engine.checkpoint import save_state, save_tensors, state_tensors
from crlf.engine.encoder import Encoder
from crlf.engine.loop import Progress, Setup
from crlf.engine.plan import TrainConfig
from crlf.engine.rundir import RunDir
from crlf.engine.sources.feed import Feed, MemoryFeed
from crlf.engine.trackers import Trackers, epoch_metrics, epoch_step
from crlf.errors import InputError, RunError

log = logging.getLogger(__name__)


@dataclass
class Monitor:
    """Labels of the training images and the labelled test split that --knn-every scores."""

    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    num_classes: int


def monitor_data(cfg: TrainConfig, feed: Feed) -> Monitor:
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
    return Monitor(feed.labels, test.images, test.labels, classes)


@contextlib.contextmanager
def writing(run: RunDir) -> Iterator[None]:
    """A failed write (full disk, read-only or vanished folder) is a RunError: exit 1; the previous files are intact."""
    try:
        yield
    except OSError as e:
        raise RunError(
            f"cannot write to {run.path}: {e.strerror or e}; the previous checkpoint is kept: "
            "free some space (or fix the folder) and run the same command with --resume"
        ) from None


def encoder_of(cfg: TrainConfig, s: Setup, epoch: int) -> Encoder:
    """The run's backbone as an Encoder (shared weights, not a copy) with its normalisation and provenance."""
    config = s.record or cfg.values
    return Encoder(s.model.backbone, s.spec, s.mean.flatten().tolist(), s.std.flatten().tolist(), epoch, config)


def metadata(cfg: TrainConfig, s: Setup, epoch: int) -> dict[str, str]:
    return encoder_of(cfg, s, epoch).metadata()


class RunHooks:
    """The run directory's side of the loop: after each epoch the kNN monitor, the metrics line, the trackers' points
    and the checkpoint (written on the writer thread while the next epoch trains); every --log-every-steps steps
    the trackers' step points; a stop's checkpoint; the error of a divergence."""

    def __init__(self, cfg: TrainConfig, s: Setup, run: RunDir, monitor: Monitor | None,
                 trackers: Trackers | None = None):  # fmt: skip
        self.cfg, self.s, self.run, self.monitor, self.trackers = cfg, s, run, monitor, trackers
        self.steps = len(s.feed) // cfg.batch_size

    def after_step(self, step: int, loss: torch.Tensor, lr: float) -> None:
        every = self.cfg.log_every_steps
        if self.trackers is not None and every and step % every == 0:  # the one host sync of N steps
            self.trackers.log({"step/loss": float(loss), "step/lr": lr}, step)

    def epoch_metrics(self, epoch: int) -> dict[str, Any]:
        cfg, m = self.cfg, self.monitor
        if m is None or not (epoch % cfg.knn_every == 0 or epoch == cfg.epochs):
            return {}
        return _knn(cfg, self.s, m)

    def end_epoch(self, epoch: int, metrics: dict[str, Any], progress: Progress) -> None:
        if not self.s.world.main:
            return
        with writing(self.run):  # the metrics line first: a crash between the two re-runs this epoch, never skips it
            self.run.append_metrics(metrics)
            if self.trackers is not None:  # durable before the checkpoint: a resume after it never misses a point
                self.trackers.log(epoch_metrics(metrics), epoch_step(epoch, self.steps))
                self.trackers.flush()
            self._save(epoch, progress)

    def stop(self, epoch: int, progress: Progress, states: list[dict[str, torch.Tensor]]) -> None:
        s = self.s
        if s.world.main:
            if self.trackers is not None:
                self.trackers.flush()
            with writing(self.run):
                s.writer.wait()  # the epoch's checkpoint first, then this one over it
                save_state(self.run.last, s.model, s.optimizer, metadata(self.cfg, s, epoch), progress.state(),
                           states, s.scaler)  # fmt: skip

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
        tensors, meta = state_tensors(s.model, s.optimizer, metadata(cfg, s, epoch), progress.state(),
                                     scaler=s.scaler)  # fmt: skip

        def write() -> None:
            save_tensors(run.last, tensors, meta)
            if epoch % cfg.checkpoint_every == 0 or epoch == cfg.epochs:
                run.snapshot(epoch, cfg.keep_checkpoints)

        s.writer.submit(write)


def _knn(cfg: TrainConfig, s: Setup, m: Monitor) -> dict[str, float]:
    """kNN top-1 of the test split against the training images, embedded by the backbone in eval mode (no randomness
    is drawn, so the monitor does not change the run)."""
    t0 = time.perf_counter()
    encoder = encoder_of(cfg, s, 0)
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


