"""``crlf visualize``: find the inputs each figure needs (run directory, embeddings file, checkpoint + data,
linear-eval result), compute what is drawn (projections, neighbours, augmented views), and write the files.

With --run and no --kind, every figure the directory allows is drawn into RUN/figures/ with an index.html.
A figure asked for by name whose input is missing is an InputError naming the file that is needed.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from crlf.commands.extract import embed_images, encoder_data
from crlf.engine import augment, plots, sources, trackers, weights
from crlf.engine.checkpoint import read_tensors
from crlf.engine.device import select_device
from crlf.engine.embedfile import read_embeddings
from crlf.engine.files import check_writable, make_folder, os_failure
from crlf.engine.mapview import static_map
from crlf.engine.methods import mae
from crlf.engine.projection import project
from crlf.engine.rundir import RunDir
from crlf.engine.runpage import write_index
from crlf.engine.sources.squares import open_images
from crlf.errors import InputError, quoted
from crlf.options import AugmentSettings, DataSettings
from crlf.settings import VisualizeSettings, merge
from crlf.typed import config_of

log = logging.getLogger(__name__)

EMBEDDING_KINDS = ("pca", "tsne", "umap")
ORDER = ("loss", "confusion", "pca", "tsne", "umap", "neighbors", "augmentations", "reconstructions")


@dataclass
class _Points:
    """Embeddings to draw, with their labels and (when known) their images."""

    x: np.ndarray  # float32 (N, D)
    labels: np.ndarray | None
    class_names: list[str]
    images: np.ndarray | None  # uint8 (N, H, W, 3)
    source: str
    ids: list[str] = field(default_factory=list)


class _Inputs:
    """What the settings and the run directory provide; each input is loaded once, on first use."""

    def __init__(self, settings: VisualizeSettings):
        self.settings = settings
        self.runs = [RunDir(p.expanduser()) for p in settings.run]
        for run in self.runs:
            if not run.path.is_dir():
                raise InputError(
                    f"run directory {quoted(run.path)} does not exist: pass the --out folder of a crlf pretrain run"
                )
        self.run = self.runs[0] if self.runs else None
        self._points: _Points | None = None
        self.maps: dict[str, np.ndarray] = {}  # the 2-D maps drawn, for index.html's interactive map

    # --- what is available ---
    @property
    def checkpoint(self) -> Path | None:
        if self.settings.ckpt is not None:
            return self.settings.ckpt.expanduser()
        if self.run is not None:
            return next((p for p in (self.run.encoder, self.run.last) if p.is_file()), None)
        return None

    @property
    def results(self) -> Path | None:
        if self.settings.results is not None:
            return self.settings.results.expanduser()
        return self.run.path / "linear_eval.json" if self.run is not None else None

    def missing(self, kind: str) -> str | None:
        """Why `kind` cannot be drawn from these inputs (None: it can)."""
        s, run = self.settings, self.run
        if kind == "loss":
            if run is None:
                return "loss needs a run directory: --run DIR (its metrics.jsonl)"
            empty = [str(r.metrics) for r in self.runs if not r.metrics.is_file() or not r.metrics.stat().st_size]
            return f"loss needs {empty[0]}, written by crlf pretrain" if empty else None
        if kind == "confusion":
            path = self.results
            if path is None:
                return (
                    "confusion needs a linear-eval result: --results FILE.json or --run DIR holding linear_eval.json "
                    "(crlf linear-eval writes it)"
                )
            return (
                None
                if path.is_file()
                else f"confusion needs {path}: write it with crlf linear-eval (--results {path.name})"
            )
        if kind in EMBEDDING_KINDS or kind == "neighbors":
            if kind == "neighbors" and s.emb is not None:
                return "neighbors needs the images: use --ckpt FILE with the data options, or --run DIR"
            if s.emb is not None:
                return (
                    None
                    if s.emb.expanduser().is_file()
                    else f"{kind} needs {s.emb}: write it with crlf extract --out {s.emb.name}"
                )
            if self.checkpoint is None:
                where = (
                    f"{run.encoder}, written by crlf pretrain"
                    if run is not None
                    else "--emb FILE, --ckpt FILE or --run DIR"
                )
                return f"{kind} needs {where}"
            return (
                None
                if self.checkpoint.is_file()
                else f"{kind} needs {self.checkpoint}: a checkpoint written by crlf pretrain"
            )
        if kind == "reconstructions":
            if run is None or run.saved_config().get("method") != "mae":
                return "reconstructions needs an MAE run: --run DIR of crlf pretrain --method mae"
            return None if run.last.is_file() else f"reconstructions needs {run.last}, the state with the decoder"
        return None  # augmentations: the data options (or the run's) are enough

    def default_kinds(self) -> list[str]:
        """With no --kind: everything these inputs allow (run: all figures; otherwise what the inputs were given
        for)."""
        s = self.settings
        if self.run is not None:
            kinds = [k for k in ORDER if k != "reconstructions" or not self.missing(k)]  # MAE runs only
        else:
            kinds = (["pca", "tsne"] if s.emb is not None else []) + (
                ["pca", "tsne", "neighbors"] if s.ckpt is not None else []
            )
            kinds += ["confusion"] if s.results is not None else []
        kinds = [k for k in ORDER if k in kinds and k != "umap"]  # umap only when asked: its package is optional
        if not kinds:
            raise InputError(
                "nothing to draw: give --run DIR, --emb FILE, --ckpt FILE with the data options, "
                "--results FILE, or --kind augmentations with the data options"
            )
        return kinds

    # --- loaded inputs ---
    def merged(self, model: type[DataSettings] | type[AugmentSettings]) -> Any:
        """Data / augmentation settings: those the user gave, else the run's config.json, else the defaults."""
        saved = self.run.saved_config() if self.run is not None else {}
        saved = {k: v for k, v in saved.items() if k != "limit"}  # --limit shrank training, not the figures
        where = self.run.path if self.run is not None else "visualize"
        return merge(model, self.settings, saved, f"settings of {where} are invalid")

    def points(self) -> _Points:
        if self._points is None:
            self._points = self._read_points() if self.settings.emb is not None else self._embed_points()
        return self._points

    def _read_points(self) -> _Points:
        assert self.settings.emb is not None
        x, y, names, prov = read_embeddings(self.settings.emb)
        keep = sources.pick(len(x), self.settings.max_points, self.settings.seed)
        if keep is not None:
            x, y = x[keep], None if y is None else y[keep]
        return _Points(
            x.numpy(), None if y is None else y.numpy(), names, None, prov.get("source") or str(self.settings.emb)
        )

    def _embed_points(self) -> _Points:
        s, ckpt = self.settings, self.checkpoint
        assert ckpt is not None
        device = select_device(s.device)
        encoder = weights.open_encoder(ckpt, device, s.arch, s.image_size)
        data_settings = encoder_data(self.merged(DataSettings), encoder)
        images = None
        sample = (s.max_points, s.seed)
        if self.run is not None and "split" not in s.model_fields_set:
            try:  # a run's figures show its held-out images when the source has them
                images = open_images(data_settings, "test", s.embed_batch_size, sample, keep=True)
            except InputError:
                images = None
        if images is None:
            images = open_images(data_settings, None, s.embed_batch_size, sample, keep=True)
        x = embed_images(encoder, images, s.embed_batch_size, s.precision)
        return _Points(
            x.numpy(),
            None if images.labels is None else images.labels.numpy(),
            images.class_names,
            images.images.permute(0, 2, 3, 1).numpy(),
            images.source,
            images.ids,
        )


def _loss(inp: _Inputs) -> tuple[Any, dict[str, Any]]:
    runs = []
    for run in inp.runs:
        try:
            runs.append((run.path.name, run.read_metrics()))
        except ValueError:
            raise InputError(f"{run.metrics} is not valid JSON lines: it was not written by crlf pretrain") from None
    return plots.loss_curves(runs), {"runs": [str(r.path) for r in inp.runs]}


def _confusion(inp: _Inputs) -> tuple[Any, dict[str, Any]]:
    path = inp.results
    assert path is not None
    try:
        result = json.loads(path.read_text())
        matrix = np.asarray(result["confusion"], dtype=np.int64)
    except (OSError, ValueError, KeyError, TypeError):
        raise InputError(
            f"{path} holds no confusion matrix: write it with crlf linear-eval (knn-eval results have none)"
        ) from None
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise InputError(f"{path}: the confusion matrix is not square {matrix.shape}")
    protocol = {"linear": "Linear probe", "finetune": "Fine-tuning"}.get(result.get("protocol"), "Classifier")
    title = f"{protocol} confusion: top-1 {result.get('top1', float('nan')):.2f}% on {matrix.sum():,} test images"
    return plots.confusion(matrix, result.get("class_names") or [], title), {"results": str(path)}


def _embedding(method: str) -> Callable[[_Inputs], tuple[Any, dict[str, Any]]]:
    def draw(inp: _Inputs) -> tuple[Any, dict[str, Any]]:
        pts = inp.points()
        stats: dict[str, Any] = {}
        coords, seconds = project(pts.x, method, inp.settings.seed, stats)
        inp.maps[method] = coords
        name = {"pca": "PCA", "tsne": "t-SNE", "umap": "UMAP"}[method]
        how = " after PCA to 50 dims" if method == "tsne" else ""
        note = f"{len(coords):,} points{how}" + ("" if pts.labels is not None else " (no labels)")
        log.info("%s of %s points in %.1f s", name, f"{len(coords):,}", seconds)  # the log has the time, not the figure
        axes = None
        if "explained" in stats:
            axes = tuple(f"PC {i + 1} ({100 * r:.1f}% of the variance)" for i, r in enumerate(stats["explained"]))
        title = f"{name} of the embeddings of {plots.short_source(pts.source)}"
        fig = plots.embedding_map(coords, pts.labels, pts.class_names, title, name, note, axes=axes)
        facts = {"points": len(coords), "seconds": round(seconds, 2), "coords_shape": list(coords.shape)}
        if "explained" in stats:
            facts["explained_variance"] = [round(r, 4) for r in stats["explained"]]
        return fig, facts

    return draw


def _neighbors(inp: _Inputs) -> tuple[Any, dict[str, Any]]:
    s, pts = inp.settings, inp.points()
    assert pts.images is not None
    n = len(pts.x)
    k = min(s.neighbors, n - 1)
    if k < 1:
        raise InputError("neighbors needs at least 2 images")
    rng = np.random.default_rng(s.seed)
    q = np.sort(rng.choice(n, min(s.queries, n), replace=False))
    z = torch.nn.functional.normalize(torch.from_numpy(pts.x), dim=1)
    sim = z[q] @ z.T
    sim[torch.arange(len(q)), torch.from_numpy(q)] = -2.0  # never the query itself
    top, idx = sim.topk(k, dim=1)
    idx_np = idx.numpy()
    names = pts.class_names

    def caption(row: int) -> str:
        return (
            ""
            if pts.labels is None
            else (names[pts.labels[row]] if pts.labels[row] < len(names) else str(pts.labels[row]))
        )

    match = None if pts.labels is None else pts.labels[idx_np] == pts.labels[q][:, None]
    fig = plots.neighbors(
        pts.images[q],
        pts.images[idx_np],
        (1 - top).clamp_min(0).numpy(),  # cosine distance: 0.0012 vs 0.0031 separates what 0.999 vs 0.997 hides
        [caption(r) for r in q],
        [[caption(r) for r in row] for row in idx_np],
        match,
        f"Nearest neighbours (d = 1 - cosine) among {n:,} images of {plots.short_source(pts.source)}",
    )
    facts = {"queries": len(q), "neighbors": k}
    if match is not None:
        facts["same_class"] = round(float(match.mean()), 4)
    return fig, facts


def _augmentations(inp: _Inputs) -> tuple[Any, dict[str, Any]]:
    s = inp.settings
    data_settings, cfg = inp.merged(DataSettings), inp.merged(AugmentSettings)
    images = sources.load(data_settings)
    rows = torch.from_numpy(
        np.sort(np.random.default_rng(s.seed).choice(len(images), min(s.queries, len(images)), replace=False))
    )
    batch = images.images[rows]
    gen = torch.Generator().manual_seed(s.seed)
    strengths = config_of(augment.Augment, cfg)
    pairs = [torch.stack(augment.views(batch, strengths, gen), dim=1) for _ in range(s.views)]  # each (R, 2, 3, H, W)
    views = (torch.stack(pairs, dim=1).permute(0, 1, 2, 4, 5, 3).clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    captions = [
        images.class_names[int(images.labels[r])]
        if images.labels is not None and images.class_names
        else images.ids[r].split("/")[-1]
        for r in rows.tolist()
    ]
    changed = {k: v for k, v in cfg.model_dump().items() if v != AugmentSettings.model_fields[k].default}
    subtitle = ", ".join(f"{k}={v}" for k, v in changed.items()) or "default settings"
    fig = plots.augmentations(
        batch.permute(0, 2, 3, 1).numpy(),
        views,
        captions,
        f"Augmented view pairs of {plots.short_source(images.source)} ({subtitle})",
    )
    return fig, {"images": len(rows), "pairs": s.views, "settings": cfg.model_dump()}


def _reconstructions(inp: _Inputs) -> tuple[Any, dict[str, Any]]:
    """An MAE run's originals, masked inputs and reconstructions (the decoder of its last.safetensors; the masks
    drawn from --seed) of a few of its images."""
    s, run = inp.settings, inp.run
    assert run is not None
    encoder = weights.open_encoder(run.last, torch.device("cpu"))
    tensors, _ = read_tensors(run.last)
    method = mae.from_state(encoder.backbone, config_of(mae.MAEConfig, run.saved_config()), tensors)
    images = sources.load(encoder_data(inp.merged(DataSettings), encoder))
    rows = torch.from_numpy(
        np.sort(np.random.default_rng(s.seed).choice(len(images), min(s.queries, len(images)), replace=False))
    )
    batch = images.images[rows].float() / 255
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (encoder.mean, encoder.std))
    method.set_generator(torch.Generator().manual_seed(s.seed))
    masked, rebuilt = method.reconstruct((batch - mean) / std)
    rebuilt = rebuilt * std + mean

    def pixels(x: torch.Tensor) -> np.ndarray:
        return (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()

    captions = [images.class_names[int(images.labels[r])] if images.labels is not None and images.class_names
                else images.ids[r].split("/")[-1] for r in rows.tolist()]  # fmt: skip
    ratio = method.config.mask_ratio
    fig = plots.reconstructions(pixels(batch), pixels(torch.where(masked, 0.5, batch)), pixels(rebuilt), captions,
                                f"MAE reconstructions of {plots.short_source(images.source)} ({ratio:.0%} masked)")
    return fig, {"images": len(rows), "mask_ratio": ratio, "masked": round(float(masked.float().mean()), 4)}


_DRAW: dict[str, Callable[[_Inputs], tuple[Any, dict[str, Any]]]] = {
    "loss": _loss,
    "confusion": _confusion,
    "pca": _embedding("pca"),
    "tsne": _embedding("tsne"),
    "umap": _embedding("umap"),
    "neighbors": _neighbors,
    "augmentations": _augmentations,
    "reconstructions": _reconstructions,
}


def visualize(settings: VisualizeSettings) -> dict[str, Any]:
    """Draw the figures the settings ask for (or all the inputs allow); returns where they went and what was skipped."""
    inp = _Inputs(settings)
    asked = list(dict.fromkeys(settings.kind))
    kinds = asked or inp.default_kinds()
    for kind in asked:  # named figures must be possible: say which input is missing before drawing anything
        reason = inp.missing(kind)
        if reason:
            raise InputError(reason)
    out = (
        settings.out.expanduser()
        if settings.out is not None
        else inp.run.path / "figures"
        if inp.run is not None
        else Path("figures")
    )
    single = out.suffix != ""
    folder = out.parent if single else out
    try:
        if settings.out is None and inp.run is not None:  # RUN/figures/ as a link would fill the folder it names
            make_folder(folder)
        else:  # a folder the user named, link or not
            folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise os_failure(e, str(folder), "choose another --out") from None
    check_writable(out if single else folder / "index.html", "--out")  # before hours of t-SNE, not after
    figures: dict[str, dict[str, Any]] = {}
    skipped: dict[str, str] = {}
    for kind in kinds:
        reason = inp.missing(kind)
        if reason:
            skipped[kind] = reason
            log.info("skipping %s: %s", kind, reason)
            continue
        t0 = time.perf_counter()
        try:
            fig, facts = _DRAW[kind](inp)
        except InputError as e:
            if asked:
                raise
            skipped[kind] = str(e)  # drawing everything a run allows: one figure's missing data is not fatal
            log.warning("skipping %s: %s", kind, e)
            continue
        path = out if single else folder / f"{kind}.png"
        try:
            plots.save(fig, path)
        except OSError as e:
            raise os_failure(e, str(path), "choose another --out") from None
        figures[kind] = {"path": str(path), **facts, "seconds_total": round(time.perf_counter() - t0, 2)}
        log.info("wrote %s", path)
    result: dict[str, Any] = {"out": str(out), "figures": figures, "skipped": skipped}
    if inp.run is not None and inp.run.is_ours():  # the run's trackers get the figures too
        trackers.log_figures(inp.run, {kind: Path(f["path"]) for kind, f in figures.items()})
    if inp.run is not None and not single:
        result["index"] = str(write_index(inp.run, folder, figures, _static_map(inp, folder)))
        log.info("open %s in a browser: every figure with the run's settings and metrics", result["index"])
    return result


def _static_map(inp: _Inputs, folder: Path) -> str:
    """index.html's server-free map (hover thumbnails) of the t-SNE, UMAP or PCA drawn; "" when none was drawn."""
    method = next((m for m in ("tsne", "umap", "pca") if m in inp.maps), None)
    pts = inp._points
    if method is None or pts is None or pts.images is None:
        return ""
    return static_map(folder, inp.maps[method], pts.labels, pts.class_names, pts.ids, pts.images, method)
