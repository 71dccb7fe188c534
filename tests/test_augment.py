"""Batched augmentations: agreement with torchvision per op, random-choice frequencies, reproducibility, shapes."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision.transforms.v2.functional as TF
from torchvision.transforms import InterpolationMode

from crlf.engine import augment as A
from crlf.engine import imageops as ops
from crlf.errors import InputError

BILINEAR = InterpolationMode.BILINEAR
COLOUR_TOL = 1e-5  # colour ops: same formulas as torchvision, so only float rounding differs
CROP_TOL = 1e-4  # resampling: our affine grid and torchvision's resize compute source coordinates differently


def _images(b: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """Float (B, 3, H, W) in [0, 1]: the top half continuous, the bottom half on 5 levels (channel ties, gray pixels,
    0 and 1)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(b, 3, h, w, generator=g)
    x[:, :, h // 2 :] = torch.randint(0, 5, (b, 3, h - h // 2, w), generator=g) / 4
    return x


def _t(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# --- colour ops against torchvision, one different factor per sample --------------------------------------------------

COLOUR_CASES = {
    "brightness": (ops.adjust_brightness, TF.adjust_brightness, [0.0, 0.3, 0.6, 1.0, 1.4, 1.8]),
    "contrast": (ops.adjust_contrast, TF.adjust_contrast, [0.0, 0.3, 0.6, 1.0, 1.4, 1.8]),
    "saturation": (ops.adjust_saturation, TF.adjust_saturation, [0.0, 0.3, 0.6, 1.0, 1.4, 2.5]),
    "hue": (ops.adjust_hue, TF.adjust_hue, [-0.5, -0.3, -0.05, 0.0, 0.1, 0.25, 0.4999, 0.5]),
}


@pytest.mark.parametrize("name", COLOUR_CASES)
def test_colour_op_matches_torchvision_per_sample(name):
    ours, theirs, factors = COLOUR_CASES[name]
    x = _images(len(factors), 16, 12)
    expected = torch.stack([theirs(img, f) for img, f in zip(x, factors)])
    assert _max_err(ours(x, _t(factors)), expected) <= COLOUR_TOL


def test_grayscale_solarize_and_blur_match_torchvision():
    x = _images(4, 16, 20)
    assert _max_err(ops.rgb_to_grayscale(x), TF.rgb_to_grayscale(x, num_output_channels=3)) <= COLOUR_TOL
    mask = torch.tensor([True, False, True, False])
    expected = torch.stack([TF.solarize(img, 0.5) if m else img for img, m in zip(x, mask)])
    assert torch.equal(ops.solarize(x, mask), expected)
    sigmas = [0.1, 0.7, 1.3, 2.0]
    expected = torch.stack([TF.gaussian_blur(img, [5, 5], [s, s]) for img, s in zip(x, sigmas)])
    assert _max_err(ops.gaussian_blur(x, _t(sigmas), 5), expected) <= COLOUR_TOL


# --- geometry against torchvision ----------------------------------------------------------------------------


def _tv_crops(x, boxes, out, flips=None):
    crops = [
        TF.resized_crop(img, *box, [out, out], interpolation=BILINEAR, antialias=False) for img, box in zip(x, boxes)
    ]
    return torch.stack([TF.horizontal_flip(c) if flips is not None and flips[i] else c for i, c in enumerate(crops)])


def _ours(x, boxes, out, flips=None, angles=None):
    top, left, height, width = _t(boxes).unbind(1)
    flip = torch.tensor(flips) if flips is not None else None
    return ops.resized_crop(x, top, left, height, width, out, flip, _t(angles) if angles is not None else None)


def test_resized_crop_matches_torchvision_inside_the_box():
    """Upscaled integer boxes, away from the image edges, on a 24 x 20 image.

    torchvision resizes the cropped tensor, so within half a source pixel of a box edge it clamps to the
    edge pixel; we sample the whole image and interpolate with the real pixel beyond the edge. Those
    output rows / columns (source coordinate < 0 or > size - 1 inside the box) are left out.
    """
    out = 24
    boxes = [(2, 3, 12, 12), (5, 1, 8, 16), (9, 4, 13, 7), (1, 2, 20, 17)]
    x = _images(len(boxes), 24, 20)
    ours, theirs = _ours(x, boxes, out), _tv_crops(x, boxes, out)
    j = torch.arange(out) + 0.5
    for o, t, (_, _, h, w) in zip(ours, theirs, boxes):
        uy, ux = j * h / out - 0.5, j * w / out - 0.5  # source coordinates inside the box
        rows, cols = (uy >= 0) & (uy <= h - 1), (ux >= 0) & (ux <= w - 1)
        assert _max_err(o[:, rows][:, :, cols], t[:, rows][:, :, cols]) <= CROP_TOL
        assert _max_err(o, t) > CROP_TOL  # the excluded rim really differs: the exclusion is needed, not hiding a shift


def test_resized_crop_and_flip_match_torchvision_everywhere_at_image_edges_and_equal_size():
    """Full-image boxes (upscaled: the clamp at the image edge is border padding) and same-size boxes (pixel
    centres)."""
    x = _images(4, 24, 20)
    flips = [True, False, True, False]
    full = [(0, 0, 24, 20)] * 4
    assert _max_err(_ours(x, full, 40, flips), _tv_crops(x, full, 40, flips)) <= CROP_TOL
    same = [(0, 0, 16, 16), (8, 4, 16, 16), (3, 1, 16, 16), (5, 4, 16, 16)]
    assert _max_err(_ours(x, same, 16, flips), _tv_crops(x, same, 16, flips)) <= CROP_TOL


def test_resized_crop_alignment_with_non_integer_boxes():
    """Bilinear interpolation reproduces a linear ramp exactly, so fractional boxes can be checked analytically."""
    h, w, out = 20, 30, 17
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    ramp = (0.02 * xx + 0.01 * yy).expand(3, 3, h, w)  # value at pixel centre (y, x)
    boxes = [(0.0, 0.0, 20.0, 30.0), (2.5, 3.25, 10.5, 7.75), (7.3, 12.9, 12.7, 17.1)]
    flips = [False, True, False]
    o = _ours(ramp, boxes, out, flips)
    j = torch.arange(out) + 0.5
    for i, (top, left, bh, bw) in enumerate(boxes):
        sy = (top + j * bh / out - 0.5).clamp(0, h - 1)  # source pixel coordinates; border padding clamps them
        sx = (left + j * bw / out - 0.5).clamp(0, w - 1)
        sx = sx.flip(0) if flips[i] else sx
        expected = 0.02 * sx[None, :] + 0.01 * sy[:, None]
        assert _max_err(o[i], expected.expand(3, out, out)) <= CROP_TOL


def test_rotation_matches_torchvision_inside_the_image():
    angles = [-30.0, 10.0, 45.0, 90.0]
    x = _images(len(angles), 24, 24)
    ours = _ours(x, [(0, 0, 24, 24)] * 4, 24, angles=angles)
    theirs = torch.stack([TF.rotate(img, a, interpolation=BILINEAR) for img, a in zip(x, angles)])
    c = torch.arange(24) - 11.5
    inner = c[:, None] ** 2 + c[None, :] ** 2 <= 10.5**2  # sample points at least a pixel inside the image
    assert _max_err(ours[:, :, inner], theirs[:, :, inner]) <= CROP_TOL
    assert (
        ours[2, :, 0, 0].abs().max() == 0
    )  # the 45 degree corner comes from outside the image: zero, like torchvision


# --- apply: the whole pipeline, composed in the documented order ---------------------------------------------


def _params(n, h, w, **over):
    p = dict(top=torch.zeros(n), left=torch.zeros(n), height=torch.full((n,), float(h)),
             width=torch.full((n,), float(w)), flip=torch.zeros(n, dtype=torch.bool), angle=None, jitter=None,
             brightness=torch.ones(n), contrast=torch.ones(n), saturation=torch.ones(n), hue=torch.zeros(n),
             grayscale=None, blur=None, blur_sigma=torch.ones(n), solarize=None, noise_std=None)  # fmt: skip
    return A.AugmentParams(**{**p, **over})


def test_apply_composes_the_ops_in_order_with_masks():
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8, generator=g)
    jitter = [True, False, True, True]
    gray = [False, True, True, False]
    blur = [True, False, False, True]
    sol = [False, False, True, True]
    b, c, s = _t([1.3, 0.5, 0.7, 1.0]), _t([0.6, 1.4, 1.2, 0.9]), _t([1.5, 0.2, 0.0, 0.8])
    hue, sigma = _t([0.3, -0.2, -0.45, 0.1]), _t([0.5, 1, 1, 1.5])
    params = _params(4, 64, 64, jitter=torch.tensor(jitter), brightness=b, contrast=c, saturation=s, hue=hue,
                     grayscale=torch.tensor(gray), blur=torch.tensor(blur), blur_sigma=sigma,
                     solarize=torch.tensor(sol))  # fmt: skip
    expected = []
    for i, img in enumerate(images.float() / 255):
        if jitter[i]:
            img = TF.adjust_hue(
                TF.adjust_saturation(TF.adjust_contrast(TF.adjust_brightness(img, b[i]), c[i]), s[i]), hue[i].item()
            )
        img = TF.rgb_to_grayscale(img, 3) if gray[i] else img
        img = TF.gaussian_blur(img, [7, 7], [sigma[i].item()] * 2) if blur[i] else img  # 10% of 64 px, odd
        expected.append(TF.solarize(img, 0.5) if sol[i] else img)
    assert _max_err(A.apply(images, params, 64), torch.stack(expected)) <= CROP_TOL


def test_apply_with_every_op_off_is_the_identity():
    images = torch.randint(0, 256, (3, 3, 12, 12), dtype=torch.uint8)
    assert _max_err(A.apply(images, _params(3, 12, 12), 12), images.float() / 255) <= 1e-5  # grid rounding only


def test_noise_has_the_configured_std():
    cfg = A.Augment(crop_min_scale=1.0, flip_p=0.0, jitter_p=0.0, grayscale_p=0.0, noise_std=0.05)
    images = torch.full((64, 3, 16, 16), 128, dtype=torch.uint8)
    v1, _ = A.views(images, cfg, torch.Generator().manual_seed(0))
    noise = v1 - 128 / 255
    assert abs(noise.std().item() - 0.05) < 0.002 and abs(noise.mean().item()) < 0.002


# --- sample_params: frequencies and ranges -------------------------------------------------------------------

N = 20_000


def _rate_ok(mask: torch.Tensor, p: float) -> bool:
    return abs(mask.float().mean().item() - p) <= 4 * math.sqrt(p * (1 - p) / N)


def test_random_choices_have_their_probabilities():
    cfg = A.Augment(flip_p=0.5, jitter_p=0.8, grayscale_p=0.2, blur_p=0.3, solarize_p=0.1)
    p = A.sample_params(N, 32, 32, cfg, torch.Generator().manual_seed(0))
    masks = [(p.flip, 0.5), (p.jitter, 0.8), (p.grayscale, 0.2), (p.blur, 0.3), (p.solarize, 0.1)]
    for mask, prob in masks:
        assert mask.dtype == torch.bool and _rate_ok(mask, prob)
    for i, (m1, p1) in enumerate(masks):  # independent choices: each pair co-occurs at the product of the rates
        for m2, p2 in masks[i + 1 :]:
            assert _rate_ok(m1 & m2, p1 * p2)


def test_ops_that_are_off_are_none():
    p = A.sample_params(8, 32, 32, A.Augment(jitter_strength=0.0, grayscale_p=0.0), torch.Generator())
    assert (
        p.angle is None
        and p.jitter is None
        and p.grayscale is None
        and p.blur is None
        and p.solarize is None
        and p.noise_std is None
    )


@pytest.mark.parametrize("scales", [(0.2, 1.0), (0.9, 1.0), (0.08, 0.3), (0.08, 1.0)])
@pytest.mark.parametrize("size", [(64, 64), (48, 80)])
def test_crop_boxes_follow_torchvisions_random_resized_crop(scales, size):
    """The area and aspect-ratio distributions of torchvision's RandomResizedCrop.get_params (which redraws boxes
    that do not fit): quantiles agree within sampling noise and its integer rounding; every box lies inside."""
    from torchvision.transforms import v2

    (lo, hi), (height, width) = scales, size
    p = A.sample_params(N, height, width, A.Augment(crop_min_scale=lo, crop_max_scale=hi),
                        torch.Generator().manual_seed(2))  # fmt: skip
    torch.manual_seed(0)
    image = torch.empty(3, height, width)
    tv = torch.tensor([v2.RandomResizedCrop.get_params(image, [lo, hi], [3 / 4, 4 / 3]) for _ in range(N)]).double()
    ours = {"area": p.height * p.width / (height * width), "log ratio": torch.log(p.width / p.height)}
    theirs = {"area": tv[:, 2] * tv[:, 3] / (height * width), "log ratio": torch.log(tv[:, 3] / tv[:, 2])}
    q = torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9], dtype=torch.float64)
    for name in ours:
        gap = (torch.quantile(ours[name].double(), q) - torch.quantile(theirs[name], q)).abs().max()
        assert gap < 0.03, (name, gap)
    rho = math.log(width / height)  # no box of area >= lo fits: torchvision's central fallback box
    fallback = max(math.log(3 / 4), math.log(lo) + rho) >= min(math.log(4 / 3), rho - math.log(lo))
    assert ours["area"].min() >= (0 if fallback else lo - 1e-4) and ours["area"].max() <= hi + 1e-4
    assert ours["log ratio"].abs().max() <= math.log(4 / 3) + 1e-5
    assert p.top.min() >= 0 and p.left.min() >= 0
    assert (p.top + p.height).max() <= height + 1e-3 and (p.left + p.width).max() <= width + 1e-3
    full = ((p.height > height - 0.5) | (p.width > width - 0.5)).float().mean()  # clamping gave 16% at (0.2, 1)
    assert full <= ((tv[:, 2] > height - 0.5) | (tv[:, 3] > width - 0.5)).float().mean() + 0.02


def test_crop_boxes_lie_inside_non_square_images():
    p = A.sample_params(N, 24, 40, A.Augment(crop_min_scale=0.5), torch.Generator().manual_seed(3))
    assert p.top.min() >= 0 and p.left.min() >= 0
    assert (p.top + p.height).max() <= 24 + 1e-4 and (p.left + p.width).max() <= 40 + 1e-4
    for pos, room in [(p.top, 24 - p.height), (p.left, 40 - p.width)]:  # placed uniformly in the room left by the box
        u = pos[room > 1] / room[room > 1]
        assert u.min() < 0.01 and u.max() > 0.99 and abs(u.mean().item() - 0.5) < 0.02


@pytest.mark.parametrize(
    ("strength", "lo", "hi", "hue"), [(0.5, 0.6, 1.4, 0.1), (1.0, 0.2, 1.8, 0.2), (3.0, 0.0, 3.4, 0.5)]
)
def test_jitter_factors_rotation_and_sigma_ranges(strength, lo, hi, hue):
    cfg = A.Augment(jitter_strength=strength, rotation=15.0)
    p = A.sample_params(N, 32, 32, cfg, torch.Generator().manual_seed(4))
    for f in (p.brightness, p.contrast, p.saturation):
        assert lo <= f.min() < lo + 0.01 and hi - 0.01 < f.max() <= hi
    assert -hue <= p.hue.min() < -hue + 0.01 and hue - 0.01 < p.hue.max() <= hue
    assert -15 <= p.angle.min() < -14.9 and 14.9 < p.angle.max() <= 15
    assert 0.1 <= p.blur_sigma.min() < 0.11 and 1.99 < p.blur_sigma.max() <= 2.0


# --- views: reproducibility, shapes ---------------------------------------------------------------------------

CFG = A.Augment(blur_p=0.5, rotation=10.0, noise_std=0.02, solarize_p=0.2)


def _uint8(b, h, w):
    return torch.randint(0, 256, (b, 3, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("cfg", [A.Augment(), CFG], ids=["defaults", "every-op"])
def test_views_are_reproducible_and_differ(cfg):
    x = _uint8(8, 32, 32)
    a1, b1 = A.views(x, cfg, torch.Generator().manual_seed(7))
    a2, b2 = A.views(x, cfg, torch.Generator().manual_seed(7))
    a3, _ = A.views(x, cfg, torch.Generator().manual_seed(8))
    assert torch.equal(a1, a2) and torch.equal(b1, b2)
    assert not torch.equal(a1, a3)
    assert all(not torch.equal(u, v) for u, v in zip(a1, b1))  # the two views of every image differ


def test_the_two_views_draw_independent_crops():
    """With the crop the only random op, the two views of every image still differ: each view drew its own box.
    With boxes that always cover the whole image (scale 1), the views are equal: the difference is the crop."""
    x = _uint8(16, 32, 32)
    crop_only = dict(flip_p=0.0, jitter_p=0.0, grayscale_p=0.0)
    v1, v2 = A.views(x, A.Augment(**crop_only), torch.Generator().manual_seed(3))
    assert all(not torch.equal(u, v) for u, v in zip(v1, v2))
    w1, w2 = A.views(x, A.Augment(crop_min_scale=1.0, **crop_only), torch.Generator().manual_seed(3))
    assert torch.equal(w1, w2) and torch.allclose(w1, x.float() / 255, atol=1e-4)


@pytest.mark.parametrize(
    ("b", "h", "w", "out", "side"),
    [(4, 32, 32, 24, 24), (4, 32, 32, 48, 48), (3, 20, 36, None, 20), (1, 32, 32, None, 32)],
)
def test_views_shape_dtype_and_range(b, h, w, out, side):
    v1, v2 = A.views(_uint8(b, h, w), CFG, torch.Generator().manual_seed(0), out_size=out)
    for v in (v1, v2):
        assert v.shape == (b, 3, side, side) and v.dtype == torch.float32
        assert v.min() >= 0 and v.max() <= 1


@pytest.mark.parametrize(
    "bad",
    [torch.zeros(2, 3, 8, 8), torch.zeros(2, 1, 8, 8, dtype=torch.uint8), torch.zeros(3, 8, 8, dtype=torch.uint8)],
)
def test_views_reject_wrong_images(bad):
    with pytest.raises(InputError, match="uint8"):
        A.views(bad, CFG, torch.Generator())
