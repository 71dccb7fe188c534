"""Augmentation fidelity: crlf's batched views against torchvision's ``transforms.v2`` pipeline on the same images.

    python benchmarks/augfidelity.py --folder /tmp/c10/test --images 4000 --json aug.json --markdown aug.md
    python benchmarks/augfidelity.py --smoke                # generated images, seconds, for the test suite

Both sides use the same settings: RandomResizedCrop(scale crop_min-crop_max, ratio 3/4-4/3), horizontal flip 0.5,
ColorJitter(0.8 s, 0.8 s, 0.8 s, 0.2 s) with p jitter_p (crlf's strength s mapping; s 0.5 -> 0.4, 0.4, 0.4, 0.1),
RandomGrayscale(grayscale_p), GaussianBlur(kernel 10% of the side, sigma 0.1-2) with p blur_p. Measured:

- crop geometry (parameters, many draws): area fraction, log aspect ratio w/h, box centre x and y, as drawn by
  ``augment.sample_params`` and by ``RandomResizedCrop.get_params`` (which redraws boxes that do not fit, up to 10
  times, and rounds to whole pixels);
- colour jitter (on the output images, jitter alone): per-image ratios out / in of mean luma, luma std and mean HSV
  saturation, and the hue shift of coloured images (saturation-weighted circular mean of the per-pixel shift), for
  crlf (fixed order brightness, contrast, saturation, hue), torchvision (a random order per image) and torchvision
  in crlf's fixed order, so that the order's own effect is visible;
- grayscale and blur rates, counted on the output images (every op but the one measured switched off).

Each distribution is summarised (mean, 5/50/95th percentiles) and compared with the two-sample Kolmogorov-Smirnov
statistic D; ``D / D95`` > 1 means the difference is larger than sampling noise at the 5% level. No result is
asserted anywhere: the numbers go to docs/results.md.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

QUANTILES = (5, 50, 95)


def load_images(folder: Path | None, n: int, size: int, seed: int) -> torch.Tensor:
    """uint8 (N, 3, S, S): n images picked at random from an image folder (any depth), or generated coloured
    blobs when folder is None."""
    if folder is None:
        g = torch.Generator().manual_seed(seed)
        low = torch.rand(n, 3, 4, 4, generator=g)  # smooth coloured images: low-frequency noise, upsampled
        x = torch.nn.functional.interpolate(low, size=(size, size), mode="bicubic", align_corners=False)
        x = x + 0.05 * torch.randn(n, 3, size, size, generator=g)
        return (x.clamp(0, 1) * 255).round().to(torch.uint8)
    from PIL import Image

    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    pick = np.random.default_rng(seed).choice(len(files), size=min(n, len(files)), replace=False)
    arrays = [np.asarray(Image.open(files[i]).convert("RGB").resize((size, size))) for i in sorted(pick)]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def ks(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """The two-sample Kolmogorov-Smirnov statistic D and its 5% critical value D95."""
    a, b = np.sort(a), np.sort(b)
    grid = np.concatenate([a, b])
    d = np.abs(np.searchsorted(a, grid, side="right") / len(a) - np.searchsorted(b, grid, side="right") / len(b))
    return float(d.max()), 1.358 * math.sqrt((len(a) + len(b)) / (len(a) * len(b)))


def summary(x: np.ndarray) -> dict[str, float]:
    """Mean and percentiles of a sample."""
    return {"mean": float(x.mean()), **{f"p{q}": float(np.percentile(x, q)) for q in QUANTILES}}


def compare(name: str, ours: np.ndarray, theirs: np.ndarray, **extra: np.ndarray) -> dict[str, Any]:
    """One row: both summaries (and any extra sample's), D and D95 of crlf vs torchvision."""
    d, d95 = ks(ours, theirs)
    row = {"measure": name, "crlf": summary(ours), "torchvision": summary(theirs), "ks": d, "ks95": d95}
    for key, sample in extra.items():
        row[key] = summary(sample)
        row[f"ks_{key}"] = ks(sample, theirs)[0]
    return row


# --- crop geometry --------------------------------------------------------------------------------------------------


def crop_geometry(cfg: Any, n: int, side: int, seed: int) -> list[dict[str, Any]]:
    """Area fraction, log aspect ratio and box centre of n crlf boxes and n torchvision boxes on a side x side image."""
    from torchvision.transforms import v2

    from crlf.engine import augment

    p = augment.sample_params(n, side, side, cfg, torch.Generator().manual_seed(seed))
    t, le, h, w = (v.numpy().astype(np.float64) for v in (p.top, p.left, p.height, p.width))
    ours = {
        "area": h * w / side**2,
        "log_ratio": np.log(w / h),
        "centre_x": (le + w / 2) / side,
        "centre_y": (t + h / 2) / side,
    }
    torch.manual_seed(seed)
    img = torch.empty(3, side, side)
    boxes = np.array(
        [
            v2.RandomResizedCrop.get_params(img, [cfg.crop_min_scale, cfg.crop_max_scale], [3 / 4, 4 / 3])
            for _ in range(n)
        ],
        dtype=np.float64,
    )
    t, le, h, w = boxes.T
    theirs = {
        "area": h * w / side**2,
        "log_ratio": np.log(w / h),
        "centre_x": (le + w / 2) / side,
        "centre_y": (t + h / 2) / side,
    }
    rows = [compare(f"crop {k} ({side} px)", ours[k], theirs[k]) for k in ours]
    full = (p.width.numpy() >= side - 1e-4) | (p.height.numpy() >= side - 1e-4)
    rows.append(
        {
            "measure": f"crop: boxes spanning the full width or height ({side} px)",
            "crlf": {"mean": float(full.mean())},
            "torchvision": {"mean": float(np.mean((w >= side) | (h >= side)))},
        }
    )
    return rows


# --- colour jitter --------------------------------------------------------------------------------------------------


def _hsv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pixel hue in turns [0, 1) and saturation of float (N, 3, H, W)."""
    r, g, b = x.unbind(1)
    mx, mn = x.amax(1), x.amin(1)
    rng = mx - mn
    safe = torch.where(rng == 0, 1.0, rng)
    h6 = torch.where(mx == r, (g - b) / safe, torch.where(mx == g, 2 + (b - r) / safe, 4 + (r - g) / safe))
    return (h6 / 6).remainder(1.0), torch.where(mx > 0, rng / torch.where(mx == 0, 1.0, mx), 0.0)


def colour_stats(x: torch.Tensor, y: torch.Tensor) -> dict[str, np.ndarray]:
    """Per-image ratios out / in (mean luma, luma std, mean saturation) and hue shift (turns) of y = jitter(x)."""
    from crlf.engine.imageops import _luma

    lx, ly = _luma(x).flatten(1), _luma(y).flatten(1)
    hx, sx = _hsv(x)
    hy, sy = _hsv(y)
    d = torch.remainder(hy - hx + 0.5, 1.0) - 0.5  # per-pixel hue shift in [-0.5, 0.5)
    wgt = (sx * sy).flatten(1)
    ang = 2 * math.pi * d.flatten(1)
    shift = torch.atan2((wgt * ang.sin()).sum(1), (wgt * ang.cos()).sum(1)) / (2 * math.pi)
    coloured = sx.flatten(1).mean(1) > 0.25
    stats = {
        "luma_mean_ratio": ly.mean(1) / lx.mean(1).clamp_min(1e-3),
        "luma_std_ratio": ly.std(1) / lx.std(1).clamp_min(1e-3),
        "saturation_ratio": sy.flatten(1).mean(1) / sx.flatten(1).mean(1).clamp_min(1e-3),
        "hue_shift": shift[coloured],
    }  # rounded: an un-jittered image is then exactly 1 (or 0) on both sides, whatever float rounding the op left
    return {k: v.double().mul(1e5).round().div(1e5).numpy() for k, v in stats.items()}


def jitter_outputs(x: torch.Tensor, cfg: Any, seed: int) -> dict[str, torch.Tensor]:
    """Jitter alone on float images x: crlf's batched op, torchvision's ColorJitter (random order per image) applied
    per image with p jitter_p, and torchvision's functional ops in crlf's fixed order with the same factor ranges."""
    import torchvision.transforms.v2.functional as TF
    from torchvision.transforms import v2

    from crlf.engine import augment, imageops

    n = len(x)
    off = {"crop_min_scale": 1.0, "flip_p": 0.0, "grayscale_p": 0.0, "blur_p": 0.0}
    gen = torch.Generator().manual_seed(seed)
    p = augment.sample_params(n, x.shape[-2], x.shape[-1], cfg.model_copy(update=off), gen)
    ours = x
    if p.jitter is not None:
        ours = imageops.adjust_brightness(ours, torch.where(p.jitter, p.brightness, 1.0))
        ours = imageops.adjust_contrast(ours, torch.where(p.jitter, p.contrast, 1.0))
        ours = imageops.adjust_saturation(ours, torch.where(p.jitter, p.saturation, 1.0))
        ours = imageops.adjust_hue(ours, torch.where(p.jitter, p.hue, 0.0))
    s = cfg.jitter_strength
    jitter = v2.RandomApply([v2.ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, min(0.2 * s, 0.5))], p=cfg.jitter_p)
    torch.manual_seed(seed)
    theirs = torch.stack([jitter(img) for img in x])
    g = torch.Generator().manual_seed(seed + 1)
    fixed = []
    for img in x:
        if torch.rand((), generator=g) < cfg.jitter_p:
            b, c, sat = (1 + 0.8 * s * (2 * torch.rand(3, generator=g) - 1)).tolist()
            hue = float(min(0.2 * s, 0.5) * (2 * torch.rand((), generator=g) - 1))
            img = TF.adjust_hue(TF.adjust_saturation(TF.adjust_contrast(TF.adjust_brightness(img, b), c), sat), hue)
        fixed.append(img)
    return {"crlf": ours, "torchvision": theirs, "torchvision_fixed_order": torch.stack(fixed)}


def colour_rows(x: torch.Tensor, cfg: Any, seed: int) -> list[dict[str, Any]]:
    """Jitter statistics, crlf vs torchvision (and torchvision in the fixed order)."""
    out = jitter_outputs(x, cfg, seed)
    stats = {k: colour_stats(x, v) for k, v in out.items()}
    return [
        compare(
            f"jitter {m}",
            stats["crlf"][m],
            stats["torchvision"][m],
            torchvision_fixed_order=stats["torchvision_fixed_order"][m],
        )
        for m in stats["crlf"]
    ]


# --- grayscale and blur rates ----------------------------------------------------------------------------------------


def rates(x: torch.Tensor, cfg: Any, seed: int) -> list[dict[str, Any]]:
    """Share of output images that are gray (grayscale alone) and that differ from the input (blur alone)."""
    from torchvision.transforms import v2

    from crlf.engine import augment

    n, side = len(x), x.shape[-1]
    u8 = (x * 255).round().to(torch.uint8)
    base = {"crop_min_scale": 1.0, "flip_p": 0.0, "jitter_p": 0.0, "grayscale_p": 0.0, "blur_p": 0.0}
    gray_p, blur_p = cfg.grayscale_p, cfg.blur_p or 0.5  # blur is off by default: measure its rate at 0.5
    g = torch.Generator().manual_seed(seed)
    ours_gray = augment.apply(
        u8, augment.sample_params(n, side, side, cfg.model_copy(update={**base, "grayscale_p": gray_p}), g), side
    )
    ours_blur = augment.apply(
        u8, augment.sample_params(n, side, side, cfg.model_copy(update={**base, "blur_p": blur_p}), g), side
    )
    torch.manual_seed(seed)
    xf = u8.float() / 255
    theirs_gray = torch.stack([v2.RandomGrayscale(gray_p)(img) for img in xf])
    kernel = max(3, int(0.1 * side) | 1)
    blur = v2.RandomApply([v2.GaussianBlur(kernel, (0.1, 2.0))], p=blur_p)
    theirs_blur = torch.stack([blur(img) for img in xf])

    def is_gray(y: torch.Tensor) -> np.ndarray:
        return ((y.amax(1) - y.amin(1)).flatten(1).amax(1) < 1e-5).float().numpy()

    def changed(y: torch.Tensor) -> np.ndarray:
        return ((y - xf).abs().flatten(1).amax(1) > 1e-4).float().numpy()

    coloured = ~torch.from_numpy(is_gray(xf).astype(bool))
    return [
        {
            "measure": f"grayscale rate (p {gray_p})",
            "crlf": {"mean": float(is_gray(ours_gray)[coloured].mean())},
            "torchvision": {"mean": float(is_gray(theirs_gray)[coloured].mean())},
        },
        {
            "measure": f"blur rate (p {blur_p}, kernel {kernel})",
            "crlf": {"mean": float(changed(ours_blur).mean())},
            "torchvision": {"mean": float(changed(theirs_blur).mean())},
        },
    ]


# --- report ----------------------------------------------------------------------------------------------------------


def markdown(rows: list[dict[str, Any]]) -> str:
    """The rows as a Markdown table."""

    def fmt(s: dict[str, float] | None) -> str:
        if not s:
            return ""
        if len(s) == 1:
            return f"{s['mean']:.3f}"
        return f"{s['mean']:.3f} ({s['p5']:.3f} / {s['p50']:.3f} / {s['p95']:.3f})"

    lines = [
        "| measure | crlf: mean (p5 / p50 / p95) | torchvision v2 | KS D / D95 | torchvision, crlf's fixed order "
        "| KS D (fixed vs random order) |",
        "|---|---|---|---:|---|---:|",
    ]
    for r in rows:
        ksd = f"{r['ks']:.3f} / {r['ks95']:.3f}" if "ks" in r else ""
        fixed = r.get("torchvision_fixed_order")
        lines.append(
            f"| {r['measure']} | {fmt(r['crlf'])} | {fmt(r['torchvision'])} | {ksd} | {fmt(fixed)} | "
            f"{r['ks_torchvision_fixed_order']:.3f} |"
            if fixed
            else f"| {r['measure']} | {fmt(r['crlf'])} | {fmt(r['torchvision'])} | {ksd} | | |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", type=Path, help="image folder to sample from (default: generated images)")
    parser.add_argument("--images", type=int, default=4000, help="images for the colour measurements")
    parser.add_argument("--draws", type=int, default=100_000, help="crop boxes drawn per side")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--jitter-strength", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, generated images (the test suite)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args()
    if args.smoke:
        args.folder, args.images, args.draws, args.size = None, 64, 2000, 16
        torch.set_num_threads(1)  # tiny ops on shared cores: one thread is many times faster
    from crlf.options import AugmentSettings

    cfg = AugmentSettings(jitter_strength=args.jitter_strength)
    t0 = time.perf_counter()
    images = load_images(args.folder, args.images, args.size, args.seed)
    x = images.float() / 255
    rows = crop_geometry(cfg, args.draws, args.size, args.seed) + crop_geometry(cfg, args.draws, 224, args.seed)
    rows += colour_rows(x, cfg, args.seed) + rates(x, cfg, args.seed)
    table = markdown(rows)
    print(table)
    print(f"{len(images)} images ({args.folder or 'generated'}), {args.draws} boxes, {time.perf_counter() - t0:.1f} s")
    if args.json:
        args.json.write_text(
            json.dumps(
                {"settings": cfg.model_dump(), "images": len(images), "folder": str(args.folder), "rows": rows},
                indent=1,
            )
        )
    if args.markdown:
        args.markdown.write_text(table)


if __name__ == "__main__":
    main()
