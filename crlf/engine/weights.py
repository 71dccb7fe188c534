"""Starting weights for a backbone (``--init SOURCE``): a crlf encoder or run directory, a safetensors state dict with
torchvision or timm key names, a ``.pth`` / ``.bin`` file read by torch's restricted unpickler, or ``timm:NAME``
resolved in the local Hugging Face cache. Never the network; keys matched as the libraries do (a classifier the
backbone has no use for is left out), position embeddings interpolated to another image size, and every mismatch
one line that names the first keys and the flag that fixes it."""

from __future__ import annotations

import hashlib
import io
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from crlf.engine.backbones import BackboneSpec, build, spec_for
from crlf.engine.backbones.vit import resized_positions
from crlf.engine.checkpoint import ENCODER_FORMAT, STATE_FORMAT, read_tensors_hashed
from crlf.engine.encoder import Encoder, load_encoder, parse_metadata
from crlf.errors import InputError, quoted, short_reason

HEADS = ("fc.", "head.", "heads.", "classifier.", "head_drop.", "last_linear.")  # classifiers crlf's backbones lack
PREFIXES = ("module.", "backbone.", "model.", "encoder_q.", "base_encoder.")  # wrappers around a backbone's keys
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # what public weights were trained with


@dataclass(frozen=True)
class InitSource:
    """Where a run's starting weights came from: what config.json and the encoder's provenance record."""

    source: str  # as the user gave it
    path: str  # the file read
    sha256: str
    loaded: int  # tensors loaded
    skipped: int  # classifier tensors left out


def resolve(source: str, flag: str = "--init") -> Path:
    """The weights file `source` names: a file, a run directory (its encoder.safetensors), or timm:NAME in the local
    Hugging Face cache (model.safetensors, else pytorch_model.bin)."""
    if source.startswith("timm:"):
        return _timm_cached(source.removeprefix("timm:"), flag)
    path = Path(source).expanduser()
    if path.is_dir():
        if (path / "encoder.safetensors").is_file():
            return path / "encoder.safetensors"
        raise InputError(f"{flag} {quoted(path)} is a folder without encoder.safetensors: give a crlf run directory "
                         "or a weights file (.safetensors, .pth, .bin)")  # fmt: skip
    if not path.is_file():
        raise InputError(f"{flag} {quoted(path)} does not exist: give a crlf encoder or run directory, a weights file "
                         "(.safetensors, .pth, .bin) or timm:NAME with its weights in the Hugging Face cache")
    if path.suffix.lower() not in WEIGHT_SUFFIXES:
        raise InputError(f"{flag} {quoted(path)}: expected a .safetensors, .pth, .pt or .bin file")
    return path


def _timm_cached(name: str, flag: str = "--init") -> Path:
    """timm:NAME's weights in the local Hugging Face cache, offline (timm publishes them as timm/NAME)."""
    base, _, tag = name.partition(".")
    repo = f"timm/{name}" if tag else f"timm/{base}"
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - timm installs it
        raise InputError(f"{flag} timm:NAME needs huggingface_hub (pip install timm)") from None
    cache = os.environ.get("HF_HUB_CACHE") or os.path.join(os.environ.get("HF_HOME", "~/.cache/huggingface"), "hub")
    for filename in ("model.safetensors", "pytorch_model.bin"):
        found = try_to_load_from_cache(repo, filename, cache_dir=os.path.expanduser(cache))
        if isinstance(found, str) and os.path.isfile(found):
            return Path(found)
    raise InputError(f"{flag} timm:{name}: no weights in the local Hugging Face cache ({cache}); crlf does not "
                     f"download: fetch them on a connected machine (huggingface-cli download {repo}) and copy the "
                     "cache, or pass the model.safetensors file itself")  # fmt: skip


def read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str], str]:
    """Tensors, metadata and SHA-256 of a weights file; a pickle only through torch's weights_only unpickler."""
    if path.suffix.lower() == ".safetensors":
        return read_tensors_hashed(path)
    data = path.read_bytes()
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - the restricted unpickler refuses code in many ways
        raise InputError(f"--init {quoted(path)} is not a plain weights file: torch's restricted unpickler "
                         f"refused it ({short_reason(e, 100)}); only tensors are read, never code") from None
    for key in ("state_dict", "model", "module"):  # checkpoints that wrap the weights
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise InputError(f"--init {quoted(path)} holds no state dict of tensors")
    return {str(k): v for k, v in obj.items()}, {}, hashlib.sha256(data).hexdigest()


def backbone_tensors(tensors: dict[str, torch.Tensor], meta: dict[str, str], spec: BackboneSpec, shown: str,
                     ) -> dict[str, torch.Tensor]:  # fmt: skip
    """The backbone's tensors of a crlf file (its spec must be the run's) or of a plain state dict (wrappers
    stripped)."""
    fmt = meta.get("format")
    if fmt in (ENCODER_FORMAT, STATE_FORMAT):
        theirs = parse_metadata(meta, shown).spec
        if theirs.arch != spec.arch:
            raise InputError(f"--init {shown} is a {theirs.arch} encoder and --arch is {spec.arch}: use --arch "
                             f"{theirs.arch}")  # fmt: skip
        if fmt == STATE_FORMAT:
            inner = "model.backbone."
            tensors = {k.removeprefix(inner): v for k, v in tensors.items() if k.startswith(inner)}
        return tensors
    for prefix in PREFIXES:
        if tensors and all(k.startswith(prefix) for k in tensors):
            tensors = {k.removeprefix(prefix): v for k, v in tensors.items()}
    return tensors


def load_into(net: nn.Module, source: str, spec: BackboneSpec) -> InitSource:
    """Load `source`'s weights into the freshly built backbone `net` of `spec`; InputError on any mismatch."""
    path = resolve(source)
    tensors, meta, sha = read(path)
    tensors = backbone_tensors(tensors, meta, spec, quoted(path))
    loaded, skipped = _copy_into(net, tensors, spec, f"--init {quoted(path)}")
    return InitSource(source, str(path), sha, loaded, skipped)


def open_encoder(source: str | Path, device: torch.device, arch: str | None = None,
                 image_size: int | None = None, arch_flag: str = "--arch") -> Encoder:  # fmt: skip
    """The encoder of --ckpt SOURCE for extract and the evaluations: a crlf encoder or training state as it is, or
    public weights as they are (timm:NAME from the local cache, or a weights file with --arch, which `arch_flag`
    names in the message when it is missing) with ImageNet's normalisation (timm's own for a timm model) at
    `image_size` px (default 224)."""
    text = str(source)
    path = Path(text).expanduser()
    if not text.startswith("timm:"):
        if not path.is_file() or path.suffix.lower() not in WEIGHT_SUFFIXES:
            return load_encoder(path, device)  # its own messages for folders, missing and foreign files
        meta = read_tensors_hashed(path)[1] if path.suffix.lower() == ".safetensors" else {}
        if meta.get("format") in (ENCODER_FORMAT, STATE_FORMAT):  # a crlf file knows its backbone
            return load_encoder(path, device)
        if arch is None:
            raise InputError(f"{quoted(path)} is not a crlf checkpoint (no crlf metadata): read it as public "
                             f"weights, the file with {arch_flag} ARCH (e.g. {arch_flag} resnet50), or give a crlf "
                             "encoder")  # fmt: skip
    else:
        path = _timm_cached(text.removeprefix("timm:"), "--ckpt")
        arch = arch or text
    tensors, meta, sha = read(path)
    tensors = backbone_tensors(tensors, meta, BackboneSpec(arch or "", 0, 0), quoted(path))
    conv1 = tensors.get("conv1.weight")
    stem = "imagenet" if conv1 is not None and conv1.ndim == 4 and conv1.shape[-1] == 7 else "auto"
    spec = spec_for(arch or "", image_size or 224, stem)
    net = build(spec)
    _copy_into(net, tensors, spec, f"--ckpt {quoted(path)}")
    cfg = getattr(net, "pretrained_cfg", None) or {}
    mean, std = list(cfg.get("mean", IMAGENET_MEAN)), list(cfg.get("std", IMAGENET_STD))
    encoder = Encoder(net, spec, mean, std, config={"source": text, "path": str(path)}, sha256=sha)
    net.to(device).eval()
    return encoder


def _copy_into(net: nn.Module, tensors: dict[str, torch.Tensor], spec: BackboneSpec, shown: str) -> tuple[int, int]:
    """Copy a state dict's tensors into `net` (see the module docstring); returns (loaded, skipped) counts."""
    mine = net.state_dict()
    skipped = [k for k in tensors if k not in mine and k.startswith(HEADS)]
    tensors = {k: v for k, v in tensors.items() if k not in skipped}
    missing = [k for k in mine if k not in tensors]
    unexpected = [k for k in tensors if k not in mine]
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]  # older torchvision files lack them
    if missing or unexpected:
        timm_like = any(k.startswith(("blocks.", "stem.", "stages.", "patch_embed.")) for k in unexpected)
        hint = "; they look like timm weights: use --arch timm:NAME" if timm_like and "timm:" not in spec.arch else ""
        found = "; ".join(part for part in (_few("missing", missing), _few("unexpected", unexpected)) if part)
        raise InputError(f"{shown} does not fit --arch {spec.arch}: {found}{hint}")
    for key, value in list(tensors.items()):
        want = mine[key].shape
        if value.shape != want and key.endswith("pos_embedding") and value.ndim == 3 and value.shape[-1] == want[-1]:
            tensors[key] = _resized_positions(value, want[1])
        elif value.shape != want:
            raise InputError(f"{shown} does not fit --arch {spec.arch}: {key} has shape {tuple(value.shape)}, "
                             f"the backbone {tuple(want)}{_shape_hint(key, value, spec)}")  # fmt: skip
    with torch.no_grad():
        for key, value in tensors.items():
            mine[key].copy_(value.to(mine[key].dtype))
    return len(tensors), len(skipped)


def _few(what: str, keys: list[str]) -> str:
    if not keys:
        return ""
    more = f" and {len(keys) - 3} more" if len(keys) > 3 else ""
    return f"{what} {', '.join(keys[:3])}{more}"


def _shape_hint(key: str, value: torch.Tensor, spec: BackboneSpec) -> str:
    """Which flag fixes a shape mismatch, where one can: the ResNet stem, the ViT patch size."""
    if key == "conv1.weight" and value.ndim == 4:
        return f": the weights have a {value.shape[-1]}x{value.shape[-1]} stem, use --stem " + (
            "imagenet" if value.shape[-1] == 7 else "cifar")
    if key == "conv_proj.weight" and value.ndim == 4:
        return f": the weights have {value.shape[-1]} px patches, use --patch-size {value.shape[-1]}"
    return ""


def _resized_positions(pos: torch.Tensor, tokens: int) -> torch.Tensor:
    """ViT position embeddings (1, 1 + n^2, D) resized to (1, tokens, D): the class token's kept, the grid bicubic."""
    old, new = math.isqrt(pos.shape[1] - 1), math.isqrt(tokens - 1)
    if old * old != pos.shape[1] - 1 or new * new != tokens - 1:
        raise InputError(f"--init: cannot resize position embeddings of {pos.shape[1]} tokens to {tokens}")
    return resized_positions(pos, old, (new, new))
