"""Batched SimCLR augmentations with per-sample random parameters, on any device.

Modelled on airbench: the data set stays on the device as uint8 and each batch is augmented by a
handful of batched tensor ops (no per-image Python, no DataLoader). Every op is a standard op that
runs on cpu, cuda and mps, and nothing makes the host wait for the device: no ``.item()``, no
boolean indexing, no host value copied in (per-sample choices are masks applied with ``torch.where``
or neutral factors; constants are made on the device with ``torch.full``).
The colour ops match ``torchvision.transforms.v2.functional`` on float images in [0, 1].
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

import torch

from crlf.engine.imageops import (
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    gaussian_blur,
    resized_crop,
    rgb_to_grayscale,
    solarize,
)
from crlf.errors import InputError

Tensor = torch.Tensor


@dataclass(frozen=True)
class Augment:
    """The strengths of the SimCLR augmentations (crlf.options.AugmentSettings documents each; the same names): what
    sample_params draws from. A plain value, so a method's recipe can change it per view (dataclasses.replace)."""

    crop_min_scale: float = 0.2  # random resized crop: area fraction U(min, max)
    crop_max_scale: float = 1.0
    flip_p: float = 0.5
    jitter_strength: float = 0.5  # s: brightness, contrast, saturation 0.8 s, hue 0.2 s
    jitter_p: float = 0.8
    grayscale_p: float = 0.2
    blur_p: float = 0.0  # kernel 10% of the side, sigma U(0.1, 2)
    rotation: float = 0.0  # largest angle in degrees
    noise_std: float = 0.0  # on [0, 1] pixels
    solarize_p: float = 0.0


@dataclass
class AugmentParams:
    """Per-sample parameters of one batch, so a batch can be re-augmented or inspected; all (B,) tensors on one device.

    ``None`` turns an op off for the whole batch: decided from the settings in Python, so ``apply``
    skips the work without looking at device data.
    """

    top: Tensor  # crop box in source pixels, float; edge coordinates, so the full image is 0, 0, H, W
    left: Tensor
    height: Tensor
    width: Tensor
    flip: Tensor  # bool: mirror horizontally (after the crop)
    angle: Tensor | None  # rotation in degrees, counter-clockwise like torchvision (after the flip)
    jitter: Tensor | None  # bool: colour jitter, in the fixed order brightness, contrast, saturation, hue
    brightness: Tensor  # jitter factors, drawn for every sample and used only where `jitter` is set
    contrast: Tensor
    saturation: Tensor
    hue: Tensor  # in [-0.5, 0.5] turns
    grayscale: Tensor | None  # bool
    blur: Tensor | None  # bool
    blur_sigma: Tensor  # pixels of the output image
    solarize: Tensor | None  # bool: invert pixels >= 0.5
    noise_std: Tensor | None  # additive Gaussian noise std on [0, 1] pixels

    def rows(self, start: int, stop: int) -> AugmentParams:
        """The parameters of samples start..stop-1."""
        return AugmentParams(
            **{f.name: None if (v := getattr(self, f.name)) is None else v[start:stop] for f in fields(self)}
        )

    def to(self, device: torch.device | str) -> AugmentParams:
        """The same parameters on `device` (a no-op when already there)."""
        return AugmentParams(
            **{f.name: None if (v := getattr(self, f.name)) is None else v.to(device) for f in fields(self)}
        )


def sample_params(n: int, height: int, width: int, cfg: Augment, generator: torch.Generator) -> AugmentParams:
    """Draw the parameters of `n` augmentations of `height` x `width` images, all from `generator` (a seed reproduces
    them).

    Random resized crop as torchvision's RandomResizedCrop (see crop_box): area fraction U(crop_min_scale,
    crop_max_scale), log aspect ratio U(log 3/4, log 4/3), boxes that do not fit drawn again, each box placed
    uniformly inside the image.
    """
    dev = generator.device
    # one draw for everything: 15 rows of U[0, 1), one per random choice
    (u_area, u_ratio, u_top, u_left, u_flip, u_angle, u_jit, u_b, u_c, u_s, u_h, u_gray, u_blur, u_sigma, u_sol) = (
        torch.rand(15, n, generator=generator, device=dev)
    )
    top, left, h, w = crop_box(u_area, u_ratio, u_top, u_left, height, width, cfg.crop_min_scale, cfg.crop_max_scale)

    s = cfg.jitter_strength
    lo, hi = max(0.0, 1 - 0.8 * s), 1 + 0.8 * s  # brightness / contrast / saturation range
    hue_max = min(0.2 * s, 0.5)

    def on(p: float, u: Tensor) -> Tensor | None:
        return u < p if p > 0 else None  # a Bernoulli(p) mask; None switches the op off for the batch

    return AugmentParams(
        top=top,
        left=left,
        height=h,
        width=w,
        flip=u_flip < cfg.flip_p,
        angle=(2 * u_angle - 1) * cfg.rotation if cfg.rotation > 0 else None,
        jitter=on(cfg.jitter_p, u_jit) if s > 0 else None,
        brightness=lo + (hi - lo) * u_b,
        contrast=lo + (hi - lo) * u_c,
        saturation=lo + (hi - lo) * u_s,
        hue=(2 * u_h - 1) * hue_max,
        grayscale=on(cfg.grayscale_p, u_gray),
        blur=on(cfg.blur_p, u_blur),
        blur_sigma=0.1 + 1.9 * u_sigma,
        solarize=on(cfg.solarize_p, u_sol),
        noise_std=torch.full((n,), cfg.noise_std, device=dev) if cfg.noise_std > 0 else None,
    )


_LOG_RATIO = (math.log(3 / 4), math.log(4 / 3))  # RandomResizedCrop's aspect ratios (w / h), drawn log-uniform
_GRID = 128  # steps of the area's inverse CDF: its error is far below torchvision's own pixel rounding


def crop_box(
    u_area: Tensor, u_ratio: Tensor, u_top: Tensor, u_left: Tensor, height: float, width: float,
    min_scale: float | Tensor, max_scale: float | Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """Random resized crop boxes (top, left, height, width) of height x width images from four U[0, 1) draws each
    (see sample_params); the streaming sources draw their boxes on the full-resolution image with it too.

    The distribution is torchvision's RandomResizedCrop: area uniform in [min, max] x the image, log aspect ratio
    uniform in [log 3/4, log 4/3], and a draw whose box does not fit the image drawn again. Instead of redrawing,
    the area comes from the inverse CDF of the areas that fit (weighted by the width of their fitting ratio
    interval) and the ratio uniformly from that interval: the same boxes, with no loop and no data-dependent
    branch. Clamping boxes to the image instead (before) gave 16% of boxes the full width or height, against 1%.
    """
    n, dtype, device = u_area.shape[0], u_area.dtype, u_area.device
    # torch.full, not torch.as_tensor: a float made into a CUDA tensor is a blocking copy that syncs the stream
    lo, hi = (
        v.to(device, dtype).expand(n) if isinstance(v, Tensor) else torch.full((n,), v, dtype=dtype, device=device)
        for v in (min_scale, max_scale)
    )
    rho = math.log(width / height)

    def fitting(a: Tensor) -> tuple[Tensor, Tensor]:  # log ratios whose box of area fraction a fits: [low, low + len]
        low = (a.log() + rho).clamp(min=_LOG_RATIO[0])
        return low, ((rho - a.log()).clamp(max=_LOG_RATIO[1]) - low).clamp(min=0)

    grid = lo[:, None] + (hi - lo)[:, None] * torch.linspace(0, 1, _GRID + 1, dtype=dtype, device=device)
    _, density = fitting(grid)  # (n, GRID + 1): how many ratios fit at each area
    cdf = torch.cat([torch.zeros_like(grid[:, :1]), ((density[:, 1:] + density[:, :-1]) / 2).cumsum(1)], 1)
    target = u_area[:, None] * cdf[:, -1:]
    j = torch.searchsorted(cdf, target).clamp(1, _GRID)  # (n, 1): the grid step the target falls in
    c0, c1, a0, a1 = cdf.gather(1, j - 1), cdf.gather(1, j), grid.gather(1, j - 1), grid.gather(1, j)
    area = (a0 + (a1 - a0) * ((target - c0) / (c1 - c0).clamp(min=1e-12)).clamp(0, 1)).squeeze(1)
    low, length = fitting(area)
    ratio = torch.exp(low + u_ratio * length)
    w = torch.sqrt(area * height * width * ratio).clamp(max=width)
    h = torch.sqrt(area * height * width / ratio).clamp(max=height)
    # no box of the scale range fits (a wide image and a large min_scale): torchvision's fallback, the largest
    # central box of an allowed aspect ratio
    fits = cdf[:, -1] > 0
    ratio_clamped = min(max(width / height, 3 / 4), 4 / 3)
    fw, fh = min(width, height * ratio_clamped), min(height, width / ratio_clamped)
    w, h = torch.where(fits, w, fw), torch.where(fits, h, fh)
    u_top, u_left = torch.where(fits, u_top, 0.5), torch.where(fits, u_left, 0.5)
    return u_top * (height - h), u_left * (width - w), h, w


@dataclass
class Views:
    """Views already augmented (float in [0, 1], the method's recipe applied) by a streaming source's worker
    processes: on a CPU the workers run the whole recipe, so every core augments (sources.stream)."""

    views: list[Tensor]

    def __len__(self) -> int:
        return len(self.views[0])


@dataclass
class Crops:
    """Views already cut from the full-resolution images and resized while decoding (the streaming sources): uint8
    (B, 3, S, S) each, in the recipe's order (2 global views, then the local ones). Augmenting them skips the crop
    (their box is the whole view) and applies the rest of each view's parameters, batched on the device."""

    views: list[Tensor]

    def __len__(self) -> int:
        return len(self.views[0])

    @property
    def shape(self) -> torch.Size:
        """The shape of the first view, as a batch of source images would have."""
        return self.views[0].shape


def apply(
    images: Tensor | Crops, params: AugmentParams, out_size: int, generator: torch.Generator | None = None
) -> Tensor:
    """Augment uint8 (B, 3, H, W) images with `params`: float32 (B, 3, out_size, out_size) in [0, 1], not normalised.

    Order: crop + resize + flip + rotation (one resampling), colour jitter, grayscale, blur, solarize,
    noise. `generator` draws the noise (the only randomness not in `params`). Crops (one view, or several, rows in
    their order) are already cut and resized: their crop box is ignored, flip and rotation still apply.
    """
    cropped = isinstance(images, Crops)
    parts = images.views if isinstance(images, Crops) else [images]
    for part in parts:
        if part.ndim != 4 or part.shape[1] != 3 or part.dtype != torch.uint8:
            raise InputError(f"augmentation expects uint8 (B, 3, H, W) images, got {part.dtype} {tuple(part.shape)}")
        if cropped and part.shape[-2:] != (out_size, out_size):
            raise InputError(f"pre-cropped views of {part.shape[-1]} px cannot make {out_size} px views")
    p = params.to(parts[0].device)
    # one CPU thread (a streaming worker): the colour stage in cache-sized chunks; else whole-batch passes, which
    # parallelise over the threads (small chunks on several threads spend their time in thread barriers)
    chunked = parts[0].device.type == "cpu" and torch.get_num_threads() == 1
    if cropped and p.angle is None and chunked:
        x = _chunked(parts, p)  # the views are read in place, not concatenated
    else:
        x = torch.cat(parts) if len(parts) > 1 else parts[0]
        if cropped and p.angle is None:  # the box is the whole view: only the flip is left of the resampling
            x = torch.where(p.flip.view(-1, 1, 1, 1), x.flip(-1), x).float().mul_(1 / 255)
        else:
            top, left, height, width = (p.top, p.left, p.height, p.width) if not cropped else (
                torch.zeros_like(p.top), torch.zeros_like(p.top), *[torch.full_like(p.top, out_size)] * 2
            )  # fmt: skip
            x = resized_crop(x.float(), top, left, height, width, out_size, p.flip, p.angle).mul_(1 / 255)
    if not chunked:
        x = _colour(x, p)
    elif not (cropped and p.angle is None):
        x = _chunked([x], p)
    x = _finish(x, p, out_size)
    if p.noise_std is not None:
        dev = generator.device if generator is not None else x.device
        noise = torch.randn(x.shape, generator=generator, device=dev).to(x.device)
        x = x.add_(noise.mul_(p.noise_std.view(-1, 1, 1, 1))).clamp_(0, 1)
    return x


_MASKED = ("jitter", "grayscale")  # the colour ops with a per-sample on / off mask that _chunked skips


def _chunked(parts: list[Tensor], p: AugmentParams) -> Tensor:
    """apply's colour jitter and grayscale on one CPU thread, in chunks of about 1 MB (a 224 px view alone stays in
    the cache: about 2x faster than whole-batch passes), skipping the ops that no sample of a chunk has on (the
    identity the neutral factors give, to a float32 ulp). The rows are those of `parts` in order: float views are
    changed in place; uint8 ones (pre-cut views, read where they are) are flipped and scaled here into a new tensor."""
    first = parts[0]
    out = first if first.is_floating_point() else empty((sum(map(len, parts)), *first.shape[1:]), dtype=torch.float32)
    step, row = max(1, 2**20 // (4 * first[0].numel())), 0
    for part in parts:
        for i in range(0, len(part), step):
            xi = part[i : i + step]
            q = p.rows(row, row + len(xi))
            if not xi.is_floating_point():
                flipped = xi.flip(-1) if q.flip.all() else torch.where(q.flip.view(-1, 1, 1, 1), xi.flip(-1), xi)
                xi = (xi if not q.flip.any() else flipped).float().mul_(1 / 255)
            q = replace(q, **{k: None for k in _MASKED if (m := getattr(q, k)) is not None and not m.any()})
            out[row : row + len(xi)] = _colour(xi, q, uniform=q.grayscale is None or bool(q.grayscale.all()))
            row += len(xi)
    return out


def empty(shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """An uninitialised CPU tensor; in a DataLoader worker (a streaming source's), in shared memory, as torch's
    default_collate makes its batches: handing it to the training process then copies nothing (a 224 px batch of
    64 images' two float views is 77 MB)."""
    if torch.utils.data.get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    storage = torch.UntypedStorage._new_shared(math.prod(shape) * dtype.itemsize)
    return torch.empty(0, dtype=dtype).set_(storage, 0, shape)


def _colour(x: Tensor, p: AugmentParams, uniform: bool = False) -> Tensor:
    """apply's colour jitter and grayscale of float views x with their parameters p; uniform: the grayscale mask,
    if any, is on for every sample (then no torch.where, which is slow on a CPU)."""
    if p.jitter is not None:  # neutral factors where the mask is off: no gather, no sync
        x = adjust_brightness(x, torch.where(p.jitter, p.brightness, 1.0))
        x = adjust_contrast(x, torch.where(p.jitter, p.contrast, 1.0))
        x = adjust_saturation(x, torch.where(p.jitter, p.saturation, 1.0))
        x = adjust_hue(x, torch.where(p.jitter, p.hue, 0.0))
    if p.grayscale is not None:
        x = rgb_to_grayscale(x) if uniform else torch.where(p.grayscale.view(-1, 1, 1, 1), rgb_to_grayscale(x), x)
    return x


def _finish(x: Tensor, p: AugmentParams, out_size: int) -> Tensor:
    """apply's blur and solarize of float views x with their parameters p (whole-batch: per chunk, blur is slower)."""
    if p.blur is not None:  # kernel ~10% of the image side, odd, >= 3 (SimCLR's)
        x = torch.where(p.blur.view(-1, 1, 1, 1), gaussian_blur(x, p.blur_sigma, max(3, int(0.1 * out_size) | 1)), x)
    if p.solarize is not None:
        x = solarize(x, p.solarize)
    return x


@dataclass(frozen=True)
class Pass:
    """Views augmented in one batched pass: one Augment per view, all at `size` px (None: the images' shorter side).
    `joint`: the views' parameters come from one draw for all of them (the views then share one Augment), else one
    draw per view in order."""

    views: tuple[Augment, ...]
    size: int | None = None
    joint: bool = True


@dataclass(frozen=True)
class Recipe:
    """A method's views as a value: passes in order (e.g. the 2 global views, then the local crops). The loop draws
    it on the device, a streaming source's workers on their CPU, and crop_plan reads what to cut from it."""

    passes: tuple[Pass, ...]

    def crop_plan(self, size: int) -> list[tuple[int, float, float]]:
        """(side, min area, max area) of each view of `size`-pixel images: what a streaming source cuts while
        decoding (then Crops)."""
        return [(p.size or size, a.crop_min_scale, a.crop_max_scale) for p in self.passes for a in p.views]


def pair_recipe(aug: Augment) -> Recipe:
    """SimCLR's two independent views of the same strengths."""
    return Recipe((Pass((aug, aug)),))


# Area range of multi-crop's local crops. DINO (ImageNet, 224 px globals, 96 px locals): globals 0.4-1, locals
# 0.05-0.4; SwAV: 0.14-1 and 0.05-0.14. On 32 px images 0.05-0.4 of the area is a 7-20 px box, resized to 16 px.
LOCAL_SCALE = (0.05, 0.4)


def multi_crop_recipe(
    aug: Augment, local_crops: int, local_size: int, local_scale: tuple[float, float] = LOCAL_SCALE
) -> Recipe:
    """Multi-crop (SwAV, DINO): the pair at the images' size, then `local_crops` views of `local_scale` of the area at
    `local_size` px, every other augmentation as `aug` says."""
    if local_crops <= 0:
        return pair_recipe(aug)
    lo, hi = local_scale
    if not 0 < lo <= hi <= 1:
        raise InputError(f"local crop scale must satisfy 0 < min <= max <= 1, got {local_scale}")
    local = replace(aug, crop_min_scale=lo, crop_max_scale=hi)
    return Recipe((Pass((aug, aug)), Pass((local,) * local_crops, local_size)))


def draw(recipe: Recipe, images: Tensor | Crops, generator: torch.Generator) -> list[Tensor]:
    """The recipe's views of a uint8 batch (B, 3, H, W), float in [0, 1], not normalised; parameters come from the
    one generator pass by pass, so a generator state reproduces the batch. Pre-cut views (Crops, in the recipe's
    order) draw the same parameters and use all but their boxes."""
    n, (h, w) = len(images), images.shape[-2:]
    out: list[Tensor] = []
    for p in recipe.passes:
        k = len(p.views)
        if p.joint:
            params = sample_params(k * n, h, w, p.views[0], generator)
        else:
            params = _cat([sample_params(n, h, w, a, generator) for a in p.views])
        if isinstance(images, Crops):  # this pass's views follow the previous passes', cut at this pass's size
            done = len(out)
            cut = images.views[done : done + k]
            if len(cut) != k:
                raise InputError(f"the recipe needs {done + k} views and the data source cut {len(images.views)}")
            x = apply(Crops(cut), params, cut[0].shape[-1], generator)
        else:
            x = apply(torch.cat([images] * k) if k > 1 else images, params, p.size or min(h, w), generator)
        out += list(x.split(n))
    return out


def _cat(params: list[AugmentParams]) -> AugmentParams:
    """Several batches' parameters as one; an op off (None) in one batch and on in another becomes a False mask."""
    fields_ = {}
    for f in fields(AugmentParams):
        values = [getattr(p, f.name) for p in params]
        ref = next((v for v in values if v is not None), None)
        # False for masks; not reached for noise_std (the same in every view)
        off = None if ref is None else torch.zeros_like(ref)
        fields_[f.name] = None if ref is None else torch.cat([off if v is None else v for v in values])
    return AugmentParams(**fields_)


def views(
    images: Tensor | Crops, cfg: Augment, generator: torch.Generator, out_size: int | None = None
) -> tuple[Tensor, Tensor]:
    """The SimCLR pair: two independent augmentations of a uint8 batch, in one batched pass; out_size defaults to the
    shorter side."""
    x1, x2 = draw(Recipe((Pass((cfg, cfg), out_size),)), images, generator)
    return x1, x2


def multi_crop(
    images: Tensor | Crops, cfg: Augment, generator: torch.Generator, global_size: int | None = None,
    local_crops: int = 0, local_size: int | None = None, local_scale: tuple[float, float] = LOCAL_SCALE,
) -> list[Tensor]:  # fmt: skip
    """Multi-crop (SwAV, DINO): 2 global views, then `local_crops` local views of the uint8 batch, float in [0, 1]
    (multi_crop_recipe; local_size defaults to half the global size)."""
    size = global_size or min(images.shape[-2:])
    recipe = multi_crop_recipe(cfg, local_crops, local_size or max(1, size // 2), local_scale)
    if global_size is not None:
        recipe = Recipe((replace(recipe.passes[0], size=global_size), *recipe.passes[1:]))
    return draw(recipe, images, generator)
