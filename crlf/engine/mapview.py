"""The embedding map without a server, for ``crlf visualize --run``'s index.html: the canvas of ``crlf explore``
(crlf/static/map.js, inlined), the points as inline JSON, and hover thumbnails cut from one sprite sheet written
beside the page, so that the folder can be shared as files."""

from __future__ import annotations

import html
import io
import json
import math
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

import numpy as np
from PIL import Image

from crlf.engine.files import atomic_write
from crlf.engine.projection import fit_unit_square

SPRITE = "map-thumbnails.jpg"
TILE_MAX = 32  # px a side of a thumbnail in the sheet (smaller images keep their size)
SHOWN = 96  # px a side of the hover thumbnail on the page
NAMES = {"pca": "PCA", "tsne": "t-SNE", "umap": "UMAP"}


def sprite_sheet(images: np.ndarray, tile: int) -> tuple[Image.Image, int]:
    """uint8 (N, H, W, 3) images as one RGB sheet of tile x tile thumbnails, row by row; and its number of columns."""
    n = len(images)
    cols = max(1, math.ceil(math.sqrt(n)))
    sheet = Image.new("RGB", (cols * tile, math.ceil(n / cols) * tile), "white")
    for i, image in enumerate(images):
        thumb = Image.fromarray(image)
        if thumb.size != (tile, tile):
            thumb = thumb.resize((tile, tile), Image.Resampling.BILINEAR)
        sheet.paste(thumb, ((i % cols) * tile, (i // cols) * tile))
    return sheet, cols


def static_map(
    folder: Path,
    coords: np.ndarray,
    labels: np.ndarray | None,
    class_names: Sequence[str],
    ids: Sequence[str],
    images: np.ndarray,
    method: str,
) -> str:
    """Write the sprite sheet into `folder` and return the HTML section (canvas, data, script) of the map."""
    tile = min(TILE_MAX, images.shape[1])
    sheet, cols = sprite_sheet(images, tile)
    buf = io.BytesIO()
    sheet.save(buf, "JPEG", quality=90)
    atomic_write(folder / SPRITE, lambda f: f.write(buf.getvalue()))
    unit = fit_unit_square(np.asarray(coords, dtype=np.float32)).astype(np.float64)
    payload = {
        "x": np.round(unit[:, 0], 5).tolist(),
        "y": np.round(unit[:, 1], 5).tolist(),
        "labels": None if labels is None else np.asarray(labels).astype(int).tolist(),
        "class_names": list(class_names),
        "ids": list(ids),
        "sprite": SPRITE,
        "cols": cols,
    }
    data = json.dumps(payload).replace("<", "\\u003c")  # no "</script>" from a file name can end the script
    script = resources.files("crlf").joinpath("static", "map.js").read_text(encoding="utf-8")
    name = NAMES.get(method, method)
    return f"""<h2>Map</h2>
<p>{html.escape(name)} of {len(unit):,} embeddings: hover a point for its image, click to keep it; the wheel zooms,
a drag pans, a double click resets (crlf explore adds neighbours, search and queries with your own images).</p>
<canvas id="crlf-map" style="width:100%;height:720px;border:1px solid #ddd;cursor:crosshair"></canvas>
<div id="crlf-tip" style="position:fixed;display:none;pointer-events:none;background:#fff;border:1px solid #999;
padding:4px;font-size:12px;max-width:220px"><div id="crlf-tile"></div><div id="crlf-cap"></div></div>
<script>{script}</script>
<script>
(function () {{
  const D = {data};
  const tip = document.getElementById("crlf-tip"), tile = document.getElementById("crlf-tile");
  const cap = document.getElementById("crlf-cap"), S = {SHOWN};
  tile.style.cssText = "width:" + S + "px;height:" + S + "px;image-rendering:pixelated;background-image:url(" +
    D.sprite + ");background-size:" + (D.cols * S) + "px auto";
  function name(i) {{
    if (!D.labels) return "";
    const l = D.labels[i];
    return D.class_names[l] !== undefined ? D.class_names[l] : String(l);
  }}
  function show(i, x, y) {{
    if (i < 0) {{ tip.style.display = "none"; return; }}
    tile.style.backgroundPosition = (-(i % D.cols) * S) + "px " + (-Math.floor(i / D.cols) * S) + "px";
    cap.textContent = [name(i), D.ids[i] || "#" + i].filter(Boolean).join(" · ");
    tip.style.left = (x + 14) + "px";
    tip.style.top = (y + 14) + "px";
    tip.style.display = "block";
  }}
  window.crlfStaticMap = crlfMap(document.getElementById("crlf-map"), D, {{
    classes: D.class_names.length, onHover: show, onClick: (i) => window.crlfStaticMap.select(i)}});
}})();
</script>
"""
