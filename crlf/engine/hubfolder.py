"""A Hugging Face model folder of an encoder, as timm publishes its models: ``model.safetensors`` (the backbone in its
library's key names), ``config.json`` (timm's keys: architecture, num_classes, num_features, model_args,
pretrained_cfg with input_size / mean / std; plus crlf's encoder metadata under "crlf") and a ``README.md`` model
card. ``crlf.load_encoder(folder)`` reads it back (through read()), timm reads a timm model's folder itself
(``timm.create_model("local-dir:FOLDER", pretrained=True)``), all without the network."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from crlf import __version__
from crlf.engine.backbones import BackboneSpec, describe
from crlf.engine.checkpoint import ENCODER_FORMAT
from crlf.errors import InputError, quoted

WEIGHTS, CONFIG, CARD = "model.safetensors", "config.json", "README.md"
_JSON_KEYS = ("backbone", "mean", "std", "config")  # encoder metadata values that are JSON text
_EVALS = ("linear_eval.json", "knn_eval.json")  # what linear-eval / knn-eval leave in a run directory


def is_folder(path: Path) -> bool:
    """Whether `path` is a folder of this layout (its config.json and model.safetensors)."""
    return (path / CONFIG).is_file() and (path / WEIGHTS).is_file()


def config(meta: dict[str, str]) -> dict[str, Any]:
    """config.json: timm's keys for the backbone, then crlf's metadata (JSON values decoded) under "crlf"."""
    spec = BackboneSpec.from_json(meta["backbone"])
    timm = spec.arch.startswith("timm:")
    size, mean, std = spec.image_size, json.loads(meta["mean"]), json.loads(meta["std"])
    crlf = {k: json.loads(v) if k in _JSON_KEYS else int(v) if k == "epoch" else v for k, v in meta.items()}
    return {
        "architecture": spec.arch.removeprefix("timm:"),
        "library": "timm" if timm else "torchvision",
        "num_classes": 0,
        "num_features": spec.feature_dim,
        "model_args": dict(spec.kwargs),
        "pretrained_cfg": {
            "tag": "crlf", "input_size": [3, size, size], "interpolation": "bilinear", "crop_pct": 1.0,
            "crop_mode": "center", "mean": mean, "std": std, "num_classes": 0,
        },  # fmt: skip
        "crlf": {"format": ENCODER_FORMAT, "crlf_version": __version__, **crlf},
    }


def read(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, str], str]:
    """The tensors, the crlf metadata (as the encoder file's strings) and the SHA-256 of model.safetensors."""
    try:
        cfg = json.loads((folder / CONFIG).read_text(encoding="utf-8"))
        data = (folder / WEIGHTS).read_bytes()
        tensors = st_load(data)
    except (OSError, ValueError, UnicodeDecodeError, RuntimeError) as e:
        raise InputError(f"{quoted(folder)} is not a readable model folder: {str(e)[:200]}") from None
    crlf = cfg.get("crlf") if isinstance(cfg, dict) else None
    if not isinstance(crlf, dict) or crlf.get("format") != ENCODER_FORMAT:
        raise InputError(f"{quoted(folder)}: its config.json has no crlf encoder metadata; it was not written by "
                         "crlf export --format hf (a timm folder: load it with timm.create_model('local-dir:...'))")
    meta = {str(k): json.dumps(v) if k in _JSON_KEYS else str(v) for k, v in crlf.items()}
    return tensors, meta, hashlib.sha256(data).hexdigest()


def write(out: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str], run: Path | None, force: bool,
          ) -> list[str]:  # fmt: skip
    """Write the folder into a temporary folder beside `out`, then rename it into place (an existing `out` only with
    `force`); returns its file names."""
    cfg = config(meta)
    files = {
        WEIGHTS: st_save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata={"format": "pt"}),
        CONFIG: (json.dumps(cfg, indent=2) + "\n").encode(),
        CARD: card(cfg, run).encode(),
    }
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        for name, data in files.items():
            with open(tmp / name, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        _swap_in(tmp, out, force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return list(files)


def _swap_in(tmp: Path, out: Path, force: bool) -> None:
    """Rename the finished folder `tmp` to `out`; an existing `out` (with `force`) is moved aside first and removed
    after, so `out` is at every moment the old folder or the new one, never half of one."""
    if not (out.exists() or out.is_symlink()):
        os.replace(tmp, out)
        return
    if not force:
        raise InputError(f"--out {out} exists: add --force to replace it, or choose another --out")
    aside = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", suffix=".tmp", dir=out.parent))
    os.replace(out, aside / out.name)
    os.replace(tmp, out)
    shutil.rmtree(aside, ignore_errors=True)


# --- the model card --------------------------------------------------------------------------------------------------
def _evaluations(run: Path | None) -> list[str]:
    """Table rows of the run directory's linear-eval / knn-eval results (none when there are none)."""
    rows = []
    for name in _EVALS if run is not None else ():
        try:
            doc = json.loads((run / name).read_text(encoding="utf-8"))
            top1, top5 = float(doc["top1"]), float(doc["top5"])
        except (OSError, ValueError, KeyError, TypeError):
            continue  # absent, or not a result document
        data = str(doc.get("data", "?"))[:80].replace("|", "/")
        rows.append(f"| {str(doc.get('protocol', name.split('_')[0]))[:20]} | {data} | {top1:.4f} | {top5:.4f} |")
    return rows


def _usage(cfg: dict[str, Any], spec: BackboneSpec) -> str:
    """How to load the folder: crlf, and timm or torchvision without crlf."""
    args = "".join(f", {k}={v}" for k, v in cfg["model_args"].items())
    lines = ["```python", "import crlf", 'encoder = crlf.load_encoder("FOLDER")', "features = encoder.embed(images)",
             "```", ""]  # fmt: skip
    if cfg["library"] == "timm":
        lines += ["Or with timm alone (offline):", "", "```python", "import timm",
                  'net = timm.create_model("local-dir:FOLDER", pretrained=True)  # timm >= 1.0.16',
                  "# or, any timm version:",
                  f'net = timm.create_model("{cfg["architecture"]}", pretrained=True, num_classes=0{args},',
                  '                         pretrained_cfg_overlay=dict(file="FOLDER/model.safetensors"))', "```"]
    else:
        lines += ["Or with torchvision alone:", "", "```python", "import torch, torchvision",
                  "from safetensors.torch import load_file", spec.family.plain_code(spec),
                  'net.load_state_dict(load_file("FOLDER/model.safetensors"))', "```"]  # fmt: skip
    return "\n".join(lines)


def card(cfg: dict[str, Any], run: Path | None) -> str:
    """README.md: what the encoder is (method, backbone, data), how it was evaluated, how to load it, the config."""
    crlf = cfg["crlf"]
    spec = BackboneSpec.from_json(json.dumps(crlf["backbone"]))
    run_cfg = crlf.get("config") or {}
    method, data = str(run_cfg.get("method", "unknown"))[:40], str(run_cfg.get("data", "unknown"))[:80]
    size, mean, std = spec.image_size, cfg["pretrained_cfg"]["mean"], cfg["pretrained_cfg"]["std"]
    tags = ["image-feature-extraction", "self-supervised-learning", "crlf", method]
    head = ["---", *([f"library_name: {cfg['library']}"] if cfg["library"] == "timm" else []), "tags:",
            *[f"- {t}" for t in tags], "pipeline_tag: image-feature-extraction", "---", ""]  # fmt: skip
    evals = _evaluations(run)
    body = [
        f"# {spec.arch} encoder, {method} (crlf)", "",
        f"A self-supervised image encoder trained with crlf {crlf['crlf_version']}: "
        f"{describe(spec)}, {spec.feature_dim}-dimensional features of {size} x {size} px RGB images.", "",
        "| | |", "|---|---|", f"| method | {method} |", f"| backbone | {describe(spec)} |", f"| data | {data} |",
        f"| image size | {size} |", f"| epochs | {crlf.get('epoch', '?')} |", "",
        "## Evaluation", "",
        *(["| protocol | data | top-1 | top-5 |", "|---|---|---|---|", *evals] if evals
          else ["No evaluation results: run crlf linear-eval or knn-eval on the run directory before exporting."]), "",
        "## Preprocessing", "",
        f"RGB, the centred square resized to {size} px (bilinear), pixels scaled to [0, 1], then normalised with "
        f"mean {mean} and std {std}.", "",
        "## Usage", "", _usage(cfg, spec), "",
        "## Training configuration", "", "```json", json.dumps(run_cfg, indent=1, sort_keys=True), "```", "",
    ]  # fmt: skip
    return "\n".join(head + body)
