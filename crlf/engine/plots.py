"""The figures of ``visualize``: matplotlib Figures built without pyplot (no display, no global state).

Each function takes plain arrays and returns a Figure of a fixed size; ``save`` writes it atomically in the format
its suffix names (.png, .svg, .pdf). Every figure has a title, labelled axes and text readable at 100 %.
"""

from __future__ import annotations

import io
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from crlf.engine.files import atomic_write

matplotlib.rcParams.update(
    {
        "font.size": 10,
        "axes.titlesize": 11,
        "figure.titlesize": 13,
        "axes.grid": False,
        "savefig.facecolor": "white",
        "svg.fonttype": "none",
    }
)
DPI = 100


def save(fig: Figure, path: Path) -> None:
    """Render to memory, then write the file atomically (a failed render leaves nothing behind)."""
    buf = io.BytesIO()
    fig.savefig(buf, format=path.suffix.lstrip(".").lower() or "png", dpi=DPI)
    atomic_write(path, lambda f: f.write(buf.getvalue()))


def short_source(source: str) -> str:
    """A data source or file for a figure's title: absolute paths shortened to their last part (npy:images.npy)."""
    return re.sub(r"(?:(?<=[\s:(])|^)(?:~|/)[^\s,;()]*", lambda m: Path(m.group()).name or m.group(), source)


def _figure(width: float, height: float) -> Figure:
    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def _colours(n: int) -> Any:
    """A qualitative palette for up to 20 classes, a continuous one beyond."""
    return matplotlib.colormaps["tab10" if n <= 10 else "tab20" if n <= 20 else "turbo"].resampled(max(n, 1))


def loss_curves(runs: Sequence[tuple[str, list[dict[str, Any]]]]) -> Figure:
    """Per-epoch panels from metrics.jsonl: loss, learning rate, images/s, and kNN top-1 when any run recorded it."""
    panels = [
        ("loss", "NT-Xent loss", "Training loss"),
        ("lr", "learning rate", "Learning rate (end of epoch)"),
        ("images_per_s", "images / s", "Throughput"),
    ]
    if any("knn_top1" in m for _, metrics in runs for m in metrics):
        panels.append(("knn_top1", "kNN top-1 (%)", "kNN accuracy on the test split"))
    fig = _figure(11, 7.5)
    axes = fig.subplots(2, 2).flatten()
    colours = _colours(len(runs))
    for ax, (key, label, title) in zip(axes, panels):
        for i, (name, metrics) in enumerate(runs):
            points = [(m["epoch"], m[key]) for m in metrics if m.get(key) is not None]
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3, color=colours(i), label=name)
        ax.set(title=title, xlabel="epoch", ylabel=label)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if key == "lr":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    epochs = [m["epoch"] for _, metrics in runs for m in metrics]
    if epochs:  # the same epoch axis on every panel, also when a panel has a single point
        lo, hi = min(epochs), max(epochs)
        pad = max(0.5, 0.03 * (hi - lo))
        for ax in axes[: len(panels)]:
            ax.set_xlim(lo - pad, hi + pad)
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    if len(runs) > 1 or runs[0][0]:
        axes[0].legend(fontsize=9)
    last = runs[0][1][-1] if runs[0][1] else {}
    fig.suptitle(
        f"Training of {', '.join(name for name, _ in runs)}"
        + (f" ({last['epoch']} epochs, final loss {last['loss']:.4f})" if len(runs) == 1 and last else "")
    )
    return fig


def embedding_map(
    coords: np.ndarray,
    labels: np.ndarray | None,
    class_names: Sequence[str],
    title: str,
    method: str,
    note: str,
    axes: Sequence[str] | None = None,
) -> Figure:
    """A 2-D map of embeddings, coloured by class with a legend (grey dots when there are no labels).

    axes: the two axis labels (default "<method> 1", "<method> 2"), e.g. PCA's share of the variance."""
    fig = _figure(9, 7.5)
    ax = fig.subplots()
    size = max(4.0, min(20.0, 6000 / max(len(coords), 1)))
    if labels is None:
        ax.scatter(coords[:, 0], coords[:, 1], s=size, c="0.35", alpha=0.6, linewidths=0)
    else:
        n = max(len(class_names), int(labels.max()) + 1)
        names = list(class_names) + [str(i) for i in range(len(class_names), n)]
        colours = _colours(n)
        for c in np.unique(labels):
            rows = labels == c
            ax.scatter(
                coords[rows, 0], coords[rows, 1], s=size, color=colours(int(c)), alpha=0.7, linewidths=0, label=names[c]
            )
        if n <= 20:
            ax.legend(
                loc="center left",
                bbox_to_anchor=(1.0, 0.5),
                markerscale=max(1.0, 12 / size) ** 0.5,
                frameon=False,
                title="class",
            )
    xlabel, ylabel = axes if axes is not None else (f"{method} 1", f"{method} 2")
    ax.set(title=note, xlabel=xlabel, ylabel=ylabel)
    ax.set_xticks([]), ax.set_yticks([])
    fig.suptitle(title)
    return fig


def confusion(matrix: np.ndarray, class_names: Sequence[str], title: str) -> Figure:
    """The confusion matrix normalised per row (true class), with the percentage in each cell for up to 20 classes."""
    n = len(matrix)
    counts = matrix.sum(1, keepdims=True)
    norm = np.divide(matrix, counts, out=np.zeros(matrix.shape, dtype=float), where=counts > 0)
    side = min(14.0, max(6.0, 0.55 * n + 2.5))
    fig = _figure(side + 1.2, side)
    ax = fig.subplots()
    image = ax.imshow(norm * 100, cmap="Blues", vmin=0, vmax=100)
    fig.colorbar(image, ax=ax, shrink=0.8, label="% of the true class")
    names = list(class_names) if len(class_names) == n else [str(i) for i in range(n)]
    if n <= 30:
        ax.set_xticks(range(n), names, rotation=45, ha="right")
        ax.set_yticks(range(n), names)
    if n <= 20:
        for i in range(n):
            for j in range(n):
                if norm[i, j] >= 0.005:
                    ax.text(
                        j,
                        i,
                        f"{100 * norm[i, j]:.0f}",
                        ha="center",
                        va="center",
                        fontsize=8 if n > 10 else 9,
                        color="white" if norm[i, j] > 0.5 else "black",
                    )
    ax.set(title=title, xlabel="predicted class", ylabel="true class")
    return fig


def _show(ax: Any, image: np.ndarray, caption: str = "", edge: str | None = None) -> None:
    ax.imshow(image, interpolation="nearest")
    ax.set_xticks([]), ax.set_yticks([])
    if caption:
        ax.set_xlabel(caption, fontsize=8)
    for spine in ax.spines.values():
        spine.set_visible(edge is not None)
        if edge is not None:
            spine.set_color(edge)
            spine.set_linewidth(3)


def neighbors(
    queries: np.ndarray,
    found: np.ndarray,
    distance: np.ndarray,
    query_captions: Sequence[str],
    captions: Sequence[Sequence[str]],
    match: np.ndarray | None,
    title: str,
) -> Figure:
    """Query images (first column) beside their nearest neighbours; green / red frames: same / other class.

    Each neighbour is captioned with its rank and its distance to the query (1 - cosine, 3 significant digits):
    close neighbours' cosines all read 0.99x, their distances differ visibly."""
    rows, k = found.shape[:2]
    fig = _figure(1.25 * (k + 1) + 0.5, 1.45 * rows + 0.8)
    axes = fig.subplots(rows, k + 1, squeeze=False)
    for r in range(rows):
        _show(axes[r, 0], queries[r], query_captions[r], edge="black")
        for j in range(k):
            edge = None if match is None else ("tab:green" if match[r, j] else "tab:red")
            label = f"{captions[r][j]}\n#{j + 1} d={distance[r, j]:.3g}".lstrip("\n")
            _show(axes[r, j + 1], found[r, j], label, edge=edge)
    axes[0, 0].set_title("query", fontsize=9)
    for j in range(k):
        axes[0, j + 1].set_title(f"#{j + 1}", fontsize=9)
    fig.suptitle(title)
    return fig


def augmentations(originals: np.ndarray, views: np.ndarray, captions: Sequence[str], title: str) -> Figure:
    """Each row: an original image, then its view pairs (view 1 and view 2 of pair p side by side)."""
    rows, pairs = views.shape[:2]
    fig = _figure(1.2 * (2 * pairs + 1) + 0.5, 1.35 * rows + 1.0)
    axes = fig.subplots(rows, 2 * pairs + 1, squeeze=False)
    for r in range(rows):
        _show(axes[r, 0], originals[r], captions[r], edge="black")
        for p in range(pairs):
            for v in range(2):
                _show(axes[r, 1 + 2 * p + v], views[r, p, v])
    axes[0, 0].set_title("original", fontsize=9)
    for p in range(pairs):
        axes[0, 1 + 2 * p].set_title(f"pair {p + 1}: view 1", fontsize=8)
        axes[0, 2 + 2 * p].set_title("view 2", fontsize=8)
    fig.suptitle(title)
    return fig


def reconstructions(originals: np.ndarray, masked: np.ndarray, rebuilt: np.ndarray, captions: Sequence[str],
                    title: str) -> Figure:  # fmt: skip
    """Each row: an original image, its masked input (masked patches grey) and the reconstruction."""
    rows = len(originals)
    fig = _figure(1.3 * 3 + 0.5, 1.35 * rows + 1.0)
    axes = fig.subplots(rows, 3, squeeze=False)
    for r in range(rows):
        _show(axes[r, 0], originals[r], captions[r], edge="black")
        _show(axes[r, 1], masked[r])
        _show(axes[r, 2], rebuilt[r])
    for j, name in enumerate(("original", "masked input", "reconstruction")):
        axes[0, j].set_title(name, fontsize=9)
    fig.suptitle(title)
    return fig
