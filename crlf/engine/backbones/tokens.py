"""ViTs as sequences of tokens, for the masked image modelling methods (MAE, iBOT): the patch embedding, the
transformer over any subset of tokens, and the backbone's features from its output tokens.

crlf's torchvision ViT (backbones/vit.py: ``patch_tokens`` / ``encode_tokens``) and timm's VisionTransformer
(``patch_embed``, ``_pos_embed``, ``blocks``, ``norm``, ``forward_head``) are both seen here; their normal
forward is untouched, so the encoder file stays the plain library model. Anything else is not a ViT (None).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from crlf.engine.backbones.vit import _ViT

Tensor = torch.Tensor


@dataclass(frozen=True)
class Tokens:
    """One ViT's token interface. embed(x, mask, mask_token): (B, prefix + L, D) tokens with their positions, the
    patches where the bool mask (B, L) is set replaced by mask_token (D,) before the positions are added (mask None:
    the image as it is); encode(tokens): the blocks and the final norm over any of them; features(encoded): what
    the backbone's forward returns for the full sequence (its class token or its pooling)."""

    patch: int  # patch side in px
    prefix: int  # class (and register) tokens before the patches
    width: int
    embed: Callable[[Tensor, Tensor | None, Tensor | None], Tensor]
    encode: Callable[[Tensor], Tensor]
    features: Callable[[Tensor], Tensor]


def tokens_of(net: nn.Module) -> Tokens | None:
    """The token interface of crlf's ViT or a timm VisionTransformer; None for any other backbone."""
    if isinstance(net, _ViT):
        return Tokens(net.patch_size, 1, net.hidden_dim, net.patch_tokens, net.encode_tokens,
                      lambda t: net.heads(t[:, 0]))  # fmt: skip
    timm_vit = all(hasattr(net, a) for a in ("patch_embed", "_pos_embed", "blocks", "norm", "forward_head"))
    if not timm_vit:
        return None
    patch = net.patch_embed.patch_size
    patch = patch[0] if isinstance(patch, (tuple, list)) else int(patch)

    def embed(x: Tensor, mask: Tensor | None = None, mask_token: Tensor | None = None) -> Tensor:
        t = net.patch_embed(x)  # (B, L, D), or (B, h, w, D) for a dynamic image size
        if mask is not None and mask_token is not None:
            flat = t.reshape(len(t), -1, t.shape[-1])
            t = torch.where(mask.unsqueeze(-1), mask_token.to(t.dtype), flat).reshape(t.shape)
        return net.norm_pre(net.patch_drop(net._pos_embed(t)))

    return Tokens(patch, int(net.num_prefix_tokens), int(net.embed_dim), embed,
                  lambda t: net.norm(net.blocks(t)), net.forward_head)  # fmt: skip


def visible(tokens: Tensor, keep: Tensor, prefix: int) -> Tensor:
    """The prefix tokens and the patch tokens at the indices `keep` (B, K) of each image: (B, prefix + K, D)."""
    patches = tokens[:, prefix:].gather(1, keep.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
    return torch.cat([tokens[:, :prefix], patches], dim=1)
