"""MAE (He et al. 2022, masked autoencoders): mask most patches of each image, encode the visible ones with the ViT,
reconstruct the pixels of the masked ones with a light transformer decoder.

Conventions (official code: facebookresearch/mae, models_mae.py and main_pretrain.py; lightly's ``MAE`` example and
``MAEDecoderTIMM``; solo-learn's scripts/pretrain/cifar/mae.yaml):

- masking: per image, ``--mask-ratio`` (0.75) of the L patches by argsort of uniform noise (official
  ``random_masking``: int(L (1 - ratio)) patches kept, at least one), the noise drawn from the run's augmentation
  generator after the views (``Method.set_generator``), so a seed gives the same masks and --resume continues them.
- encoder: the backbone itself on the class token and the visible patches only (backbones/tokens.py: crlf's ViT or
  a timm ViT, their learned position embeddings; the official MAE fixes its encoder's to sin-cos, not done here).
- decoder: linear to ``--decoder-width`` (256), a mask token (normal, std 0.02) at every masked position, fixed 2-D
  sin-cos positions (half the width for the row, half for the column; 0 for the class token), ``--decoder-depth``
  (4) pre-norm transformer blocks of 32-dim heads, MLP 4x, LayerNorm, linear to patch x patch x 3 values;
  xavier-uniform linear layers as the official initialisation. Official ImageNet and solo-learn CIFAR: 512 wide,
  8 deep; the paper's ablation (Table 1) loses about 2 points of linear probing at 4 x 256, for an 8x smaller
  decoder, which keeps MAE the cheapest ViT pretraining per step.
- loss: loss.mae_loss on the masked patches of the normalised views, per-patch-normalised targets (norm_pix_loss
  True, the paper's setting), the mean over the images of the global batch.
- optimizer: AdamW, betas (0.9, 0.95) and lr 1.5e-4 x batch / 256 (official ``--blr``, lightly's; solo-learn CIFAR
  2e-4), weight decay 0.05 (crlf's AdamW default, as all three); a warm-up as long as ``--warmup-epochs``.
- views: one random resized crop (the settings' scale: 0.2-1 by default, the official ``RandomResizedCrop(scale=
  (0.2, 1.0))``) and the flip; no colour, blur or other augmentation (the method's recipe).

The encoder file holds the ViT alone, whose features are its normal forward's: the class token after the final
LayerNorm for crlf's ViTs (a timm ViT: its own pooling), as the official linear probe (main_linprobe.py) reads
them; extract, the kNN monitor and the evaluations see the same features as for every other method.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from crlf.engine import augment, distributed
from crlf.engine.backbones.tokens import Tokens, tokens_of, visible
from crlf.engine.loss import mae_loss
from crlf.engine.methods.base import Method, full_precision, opt, register
from crlf.errors import InputError

HEAD_DIM = 32  # the decoder's attention heads: official 512 wide / 16 heads


@dataclass(frozen=True)
class MAEConfig:
    """MAE's options: the masking ratio and the decoder's size."""

    mask_ratio: float = 0.75
    decoder_depth: int = opt(4, "MAE decoder's transformer blocks.", identity=True, ge=1, le=24)
    decoder_width: int = opt(256, "MAE decoder's width (a multiple of 32).", identity=True, ge=32, le=4096)


def vit_tokens(backbone: nn.Module, method: str) -> Tokens:
    """The backbone's token interface, or the one-line error of a method that needs a ViT."""
    tokens = tokens_of(backbone)
    if tokens is None:
        raise InputError(f"--method {method} trains ViTs only: choose --arch vit_tiny, vit_small, vit_base or a timm "
                         f"ViT (timm:vit_...), not a {type(backbone).__name__}")  # fmt: skip
    return tokens


def random_masking(
    n: int, patches: int, ratio: float, generator: torch.Generator | None, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image, int(patches x (1 - ratio)) patches (at least 1, at most all but 1) kept at random: (keep (n, K)
    indices in a random order, mask (n, L) bool, True where masked). One (n, L) draw of uniform noise from
    `generator` (else torch's)."""
    if generator is not None:
        noise = torch.rand(n, patches, generator=generator, device=generator.device).to(device)
    else:
        noise = torch.rand(n, patches, device=device)
    kept = min(max(1, int(patches * (1 - ratio))), patches - 1)  # at least one patch masked, one seen (if two)
    keep = noise.argsort(dim=1)[:, :kept]
    mask = torch.ones(n, patches, dtype=torch.bool, device=device).scatter(1, keep, False)
    return keep, mask


def patchify(x: torch.Tensor, patch: int) -> torch.Tensor:
    """(N, C, H, W) images as (N, L, patch x patch x C) patches, row by row, each patch's values (row, column,
    channel) as the official ``patchify``."""
    n, c, h, w = x.shape
    x = x.reshape(n, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(n, (h // patch) * (w // patch), patch * patch * c)


def unpatchify(p: torch.Tensor, patch: int, grid: tuple[int, int]) -> torch.Tensor:
    """patchify's inverse: (N, L, patch x patch x C) patches of a grid (rows, columns) as (N, C, H, W)."""
    n, (gh, gw) = len(p), grid
    x = p.reshape(n, gh, gw, patch, patch, -1).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(n, -1, gh * patch, gw * patch)


def sincos_positions(width: int, grid: tuple[int, int], device: torch.device) -> torch.Tensor:
    """Fixed 2-D sine-cosine position embeddings (rows x columns, width) of a patch grid: the first half of the width
    encodes the row, the second the column, each as sin and cos of the position at frequencies 1 / 10000^(k / (w/4))
    (official get_2d_sincos_pos_embed, MoCo v3's)."""
    quarter = width // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float32, device=device) / quarter)

    def axis(length: int) -> torch.Tensor:
        angles = torch.arange(length, dtype=torch.float32, device=device)[:, None] * omega  # (length, w/4)
        return torch.cat([angles.sin(), angles.cos()], dim=1)  # (length, w/2)

    rows, cols = axis(grid[0]), axis(grid[1])
    return torch.cat([rows[:, None].expand(-1, grid[1], -1), cols[None].expand(grid[0], -1, -1)], -1).flatten(0, 1)


class MAEDecoder(nn.Module):
    """Encoded visible tokens -> a prediction of every patch's pixels (see the module docstring)."""

    def __init__(self, in_dim: int, width: int, depth: int, out_dim: int):
        super().__init__()
        if width % HEAD_DIM:
            raise InputError(f"--decoder-width {width} must be a multiple of {HEAD_DIM} (heads of {HEAD_DIM} dims)")
        self.embed = nn.Linear(in_dim, width)
        self.mask_token = nn.Parameter(torch.zeros(width))
        self.blocks = nn.Sequential(*[
            nn.TransformerEncoderLayer(width, width // HEAD_DIM, 4 * width, dropout=0.0, activation="gelu",
                                       batch_first=True, norm_first=True)
            for _ in range(depth)
        ])  # fmt: skip
        self.norm = nn.LayerNorm(width)
        self.pred = nn.Linear(width, out_dim)
        for m in self.modules():  # the official initialisation
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, latent: torch.Tensor, keep: torch.Tensor, prefix: int, grid: tuple[int, int]) -> torch.Tensor:
        """latent (N, prefix + K, D): the encoder's output for the patches at `keep` (N, K) -> (N, L, out_dim)."""
        x = self.embed(latent)
        n, width = len(x), x.shape[-1]
        full = self.mask_token.to(x.dtype).expand(n, grid[0] * grid[1], width)
        full = full.scatter(1, keep.unsqueeze(-1).expand(-1, -1, width), x[:, prefix:])
        full = full + sincos_positions(width, grid, x.device).to(x.dtype)
        out = self.norm(self.blocks(torch.cat([x[:, :prefix], full], dim=1)))
        return self.pred(out[:, prefix:])


@register
class MAE(Method):
    """ViT encoder on the visible quarter of the patches, light decoder; MSE of the masked patches' pixels."""

    name = "mae"
    Config = MAEConfig
    config: MAEConfig
    optimizer = "adamw"
    adam_lr = 1.5e-4  # per 256 images: the official --blr
    adam_betas = (0.9, 0.95)

    def __init__(self, backbone: nn.Module, config: MAEConfig | None = None, feature_dim: int | None = None):
        super().__init__(backbone, config, feature_dim)
        self.tokens = vit_tokens(backbone, self.name)
        c, t = self.config, self.tokens
        self.decoder = MAEDecoder(t.width, c.decoder_width, c.decoder_depth, t.patch * t.patch * 3)

    @classmethod
    def recipe(cls, config: MAEConfig, aug: augment.Augment, image_size: int) -> augment.Recipe:
        """One view: the random resized crop and the flip, nothing else."""
        crop_flip = replace(aug, jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, rotation=0.0, noise_std=0.0,
                            solarize_p=0.0)  # fmt: skip
        return augment.Recipe((augment.Pass((crop_flip,)),))

    def predict(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The decoder's patches (N, L, P) for normalised images (N, 3, H, W), and the mask (N, L) drawn for them."""
        t, p = self.tokens, self.tokens.patch
        grid = (x.shape[-2] // p, x.shape[-1] // p)
        keep, mask = random_masking(len(x), grid[0] * grid[1], self.config.mask_ratio, self.generator, x.device)
        latent = t.encode(visible(t.embed(x, None, None), keep, t.prefix))
        return self.decoder(latent, keep, t.prefix, grid), mask

    def forward(self, views: list[torch.Tensor]) -> torch.Tensor:
        x = views[0]
        pred, mask = self.predict(x)
        with full_precision(pred):
            per_image = mae_loss(pred.float(), patchify(x, self.tokens.patch).float(), mask, reduction="none")
        return distributed.gather(per_image).mean()  # the global batch's mean over images

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """For a figure, of normalised images `x` (N, 3, H, W): the mask as pixels (N, 1, H, W, True where masked)
        and the reconstruction (the visible patches as they are, the masked ones predicted and un-normalised with
        each original patch's mean and std, as the norm_pix target was normalised)."""
        p = self.tokens.patch
        grid = (x.shape[-2] // p, x.shape[-1] // p)
        pred, mask = self.predict(x)
        target = patchify(x, p).float()
        mean, std = target.mean(-1, keepdim=True), (target.var(-1, keepdim=True) + 1e-6).sqrt()
        filled = torch.where(mask.unsqueeze(-1), pred.float() * std + mean, target)
        pixels = unpatchify(mask.unsqueeze(-1).expand(-1, -1, p * p).float(), p, grid) > 0.5
        return pixels, unpatchify(filled, p, grid)


def from_state(backbone: nn.Module, config: MAEConfig, tensors: dict[str, torch.Tensor]) -> MAE:
    """An MAE around a trained `backbone` with the decoder of a run's training state (checkpoint.state_tensors'
    ``model.decoder.*``); an InputError when the state holds no decoder of this config."""
    method = MAE(backbone, config)
    decoder = {k.removeprefix("model.decoder."): v for k, v in tensors.items() if k.startswith("model.decoder.")}
    try:
        method.decoder.load_state_dict(decoder)
    except RuntimeError as e:
        raise InputError(f"the checkpoint holds no MAE decoder of depth {config.decoder_depth} and width "
                         f"{config.decoder_width} ({str(e).splitlines()[0][:80]})") from None  # fmt: skip
    return method.eval()

