"""``crlf explore``: the space to serve, from the settings: a run's or a checkpoint's embeddings of its data (train
and test splits), or an ``extract`` file with its images; their 2-D map (PCA / t-SNE / UMAP), the encoder that embeds
uploads and linear-eval's probe that names their class. Embeddings and maps are computed once and cached in
RUN/explore/ (keyed by the encoder's and the images' hashes, and by the embeddings' hash and the map's settings); a
run directory that cannot be written only means computing again. Nothing is written anywhere else.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from crlf.engine import sources, weights
from crlf.engine.device import select_device
from crlf.engine.embedfile import read_embeddings
from crlf.engine.explore import Cache, Embedder, Space, digest, read_probe
from crlf.engine.projection import fit_unit_square, project
from crlf.engine.rundir import RunDir
from crlf.errors import InputError, quoted
from crlf.options import DataSettings
from crlf.settings import ExploreSettings, merge

log = logging.getLogger(__name__)

TSNE_MAX_POINTS = 10_000  # --projection auto: t-SNE up to this many points (a few minutes on a CPU), PCA beyond


def open_space(settings: ExploreSettings) -> Space:
    """Load, embed (or read), project and cache what ``crlf explore`` serves."""
    if settings.projection == "umap" and importlib.util.find_spec("umap") is None:  # say so before the embedding
        raise InputError("--projection umap needs the umap-learn package: pip install umap-learn (or use tsne)")
    device = select_device(settings.device)
    run = _run_dir(settings)
    cache = Cache(run.path / "explore" if run is not None else None)
    ckpt = _checkpoint(settings, run)
    embedder = None
    if ckpt is not None:
        encoder = weights.open_encoder(ckpt, device, settings.arch, settings.image_size)
        embedder = Embedder(encoder, settings.embed_batch_size, settings.precision)
    if settings.emb is not None:
        x, labels, names, prov = read_embeddings(settings.emb)
        images = _images_of_file(settings, prov, len(x))
        if embedder is not None and embedder.dim != x.shape[1]:
            raise InputError(f"{settings.emb} holds {x.shape[1]}-dim embeddings but {ckpt} gives {embedder.dim}: "
                             "give the --ckpt the file was extracted with")
        ids, source, title = images.ids, prov.get("source") or images.source, settings.emb.name
    else:
        assert embedder is not None
        images = _load_images(settings, run, embedder.image_size)
        key = digest(embedder.sha256, images.images.numpy())
        x = torch.from_numpy(cache.get(f"embeddings-{key}.npz", lambda: embedder.images(images.images).numpy()))
        labels, names, ids, source = images.labels, images.class_names, images.ids, images.source
        title = run.path.name if run is not None else Path(settings.ckpt or "").name
    bad = int((~torch.isfinite(x).all(dim=1)).sum())
    if bad:
        raise InputError(f"{bad:,} of {len(x):,} embeddings are NaN or infinite: the encoder diverged in training; "
                         "use an earlier checkpoint (checkpoints/epoch-*.safetensors)")
    if len(x) < 3:
        raise InputError(f"explore needs at least 3 images, found {len(x)}")
    method = settings.projection
    if method == "auto":
        method = "tsne" if len(x) <= TSNE_MAX_POINTS else "pca"
        log.info("map: %s of %s points (--projection auto: t-SNE up to %s points)", method, f"{len(x):,}",
                 f"{TSNE_MAX_POINTS:,}")  # fmt: skip
    coords = cache.get(f"map-{method}-{digest(method, settings.seed, x.numpy())}.npz",
                       lambda: _project(x.numpy(), method, settings.seed))  # fmt: skip
    return Space(
        x,
        fit_unit_square(coords),
        method,
        None if labels is None else labels.numpy().astype(np.int64),
        list(names) or ([] if labels is None else [str(i) for i in range(int(labels.max()) + 1)]),
        list(ids),
        images.images,
        source,
        title,
        embedder,
        read_probe(run.path / "linear_eval_probe.safetensors" if run is not None else None, embedder, x.shape[1]),
    )


def _project(x: np.ndarray, method: str, seed: int) -> np.ndarray:
    """The map's coordinates, with a log line of how long they took (what the cache stores)."""
    coords, seconds = project(x, method, seed)
    log.info("computed the %s map of %s points in %.1f s", method, f"{len(x):,}", seconds)
    return coords


def _run_dir(settings: ExploreSettings) -> RunDir | None:
    """--run, else the run directory holding --ckpt (its config.json says so), else None."""
    if settings.run is not None:
        run = RunDir(settings.run.expanduser())
        if not run.path.is_dir():
            raise InputError(f"run directory {quoted(run.path)} does not exist: pass the --out folder of a crlf "
                             "pretrain run")
        return run
    ckpt = settings.ckpt.expanduser() if settings.ckpt is not None else None
    return RunDir(ckpt.parent) if ckpt is not None and (ckpt.parent / "config.json").is_file() else None


def _checkpoint(settings: ExploreSettings, run: RunDir | None) -> Path | None:
    if settings.ckpt is not None:
        return settings.ckpt.expanduser()
    if settings.run is not None and run is not None:
        found = next((p for p in (run.encoder, run.last) if p.is_file()), None)
        if found is None:
            raise InputError(f"{run.path} has no encoder.safetensors: train it with crlf pretrain --out {run.path}")
        return found
    return None  # --emb alone: the map without uploads


def _data_settings(settings: ExploreSettings, saved: dict[str, Any], image_size: int | None) -> DataSettings:
    """The data options given, else the run's (or the embeddings file's) own, at the encoder's image size."""
    saved = {"image_size": image_size, **{k: v for k, v in saved.items() if v is not None}}
    return merge(DataSettings, settings, saved, "invalid data settings for explore")


def _load_images(settings: ExploreSettings, run: RunDir | None, image_size: int) -> sources.ImageSet:
    """The images to explore: --split, or the train split and the test split when the source has one."""
    saved = {k: v for k, v in (run.saved_config() if run is not None else {}).items() if k not in ("limit", "split")}
    options = _data_settings(settings, saved, image_size)
    if "split" in settings.model_fields_set:
        return sources.load(options)
    parts = [sources.load(options, "train")]
    try:
        test = sources.load(options, "test")
        test.ids = [i if i.startswith("test") else f"test/{i}" for i in test.ids]
        parts.append(test)
    except InputError as e:
        log.info("exploring the train split alone: %s", e)
    labelled = all(p.labels is not None for p in parts)
    return sources.ImageSet(
        torch.cat([p.images for p in parts]),
        torch.cat([p.labels for p in parts]) if labelled else None,  # type: ignore[misc]
        parts[0].class_names,
        [i for p in parts for i in p.ids],
        " + ".join(p.source for p in parts),
    )


def _images_of_file(settings: ExploreSettings, prov: dict[str, Any], count: int) -> sources.ImageSet:
    """The images an embeddings file was extracted from: the data options given, else its provenance's."""
    saved = {k: prov.get(k) for k in ("data", "data_dir", "split", "image_size")}
    images = sources.load(_data_settings(settings, saved, None))
    if len(images) != count:
        raise InputError(f"{settings.emb} holds {count:,} embeddings but the data options give {len(images):,} "
                         "images: give the data options (--data, --data-dir, --split, --limit) it was extracted from")
    return images


