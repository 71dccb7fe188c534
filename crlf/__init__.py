"""crlf: Contrastive Representation Learning Framework.

The Python API mirrors the CLI: ``pretrain(PretrainSettings(...))`` is ``crlf pretrain``.
Names are imported lazily so that ``crlf --help`` does not wait for torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "PretrainSettings": "crlf.settings",
    "pretrain": "crlf.commands.pretrain",
    "load_encoder": "crlf.engine.encoder",
    "Encoder": "crlf.engine.encoder",
    "BackboneSpec": "crlf.engine.backbones",
    "nt_xent": "crlf.engine.loss",
    "ImageSet": "crlf.engine.sources",
    "load_data": ("crlf.engine.sources", "load"),
    "select_device": "crlf.engine.device",
    "embed": "crlf.commands.extract",
    "Embeddings": "crlf.engine.embedfile",
}
__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    target = _EXPORTS.get(name)
    if target is None:
        raise AttributeError(f"module 'crlf' has no attribute {name!r}")
    module, attr = target if isinstance(target, tuple) else (target, name)
    return getattr(importlib.import_module(module), attr)
