"""2-D maps of embeddings: PCA, t-SNE (after PCA to 50 dims) or UMAP, and their scaling into the unit square, for
visualize's figures, its static map and explore's map. NumPy only; scikit-learn and umap-learn are imported when a
t-SNE or UMAP is computed."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from crlf.engine import progress
from crlf.errors import InputError


def project(
    x: np.ndarray, method: str, seed: int = 0, stats: dict[str, Any] | None = None
) -> tuple[np.ndarray, float]:
    """2-D coordinates of (N, D) embeddings by PCA, t-SNE (after PCA to 50 dims) or UMAP; and the seconds it took.

    stats, when given, receives PCA's "explained" fractions of the variance of the two axes.
    """
    t0 = time.perf_counter()
    x = np.asarray(x, dtype=np.float64)
    if len(x) < 3:
        raise InputError(f"a {method} map needs at least 3 embeddings, got {len(x)}")
    centred = x - x.mean(0)
    if method == "pca":
        _, singular, vt = np.linalg.svd(centred, full_matrices=False)
        coords = centred @ vt[:2].T
        if stats is not None:
            variance = singular**2
            stats["explained"] = (variance[:2] / max(variance.sum(), 1e-30)).tolist()
    elif method == "tsne":
        from sklearn.decomposition import PCA
        from sklearn.manifold import TSNE

        progress.report("t-SNE", 0, 0)  # no progress to report from inside scikit-learn: a spinner and the clock
        reduced = PCA(n_components=min(50, *x.shape), random_state=seed).fit_transform(centred)
        perplexity = float(min(30.0, max(2.0, (len(x) - 1) / 3)))
        coords = TSNE(
            n_components=2, init="pca", learning_rate="auto", perplexity=perplexity, random_state=seed
        ).fit_transform(reduced)
        progress.report("t-SNE", 1, 1)
    elif method == "umap":
        try:
            import umap  # type: ignore[import-not-found]
        except ImportError:
            raise InputError(
                "the umap figure needs the umap-learn package: pip install umap-learn (or use --kind tsne)"
            ) from None
        progress.report("UMAP", 0, 0)
        coords = umap.UMAP(n_components=2, random_state=seed).fit_transform(x)
        progress.report("UMAP", 1, 1)
    else:
        raise InputError(f"unknown projection {method!r}: use pca, tsne or umap")
    return np.asarray(coords, dtype=np.float32), time.perf_counter() - t0


def fit_unit_square(coords: np.ndarray) -> np.ndarray:
    """2-D coordinates scaled into [0, 1] with the aspect ratio kept (the shorter axis centred)."""
    lo, hi = coords.min(0), coords.max(0)
    span = float(max((hi - lo).max(), 1e-12))
    return (((coords - lo) + (span - (hi - lo)) / 2) / span).astype(np.float32)
