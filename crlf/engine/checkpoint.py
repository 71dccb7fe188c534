"""Safetensors checkpoints: atomic writes, self-describing metadata, the encoder file and the resumable state.

Two kinds of file, told apart by the metadata key ``format``:
- ``crlf-encoder``: the backbone alone, keys as in its library (torchvision, timm); written and read by
  ``crlf.engine.encoder`` (the Encoder object), whose metadata says how to rebuild it.
- ``crlf-state``: everything ``--resume`` needs: ``model.*`` (backbone + head), ``optim.*`` (optimizer
  buffers), and in the metadata the optimizer's param groups, the epoch, the schedule state and the config.
No pickle anywhere: tensors go to safetensors, everything else to JSON strings in the metadata.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import struct
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from crlf import __version__
from crlf.engine.files import atomic_write
from crlf.errors import InputError, quoted

ENCODER_FORMAT = "crlf-encoder"
STATE_FORMAT = "crlf-state"
FORMAT_VERSION = "1"


def digest(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes and over the metadata: safetensors has no checksum
    of its own, and a flipped bit in the weights would otherwise load silently."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b"")  # the buffer itself, no copy
    h.update(json.dumps({k: v for k, v in metadata.items() if k != "sha256"}, sort_keys=True).encode())
    return h.hexdigest()


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Atomically write a safetensors file (tensors moved to CPU and made contiguous) with its checksum."""
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    meta = {"crlf_version": __version__, "format_version": FORMAT_VERSION, **metadata}
    data = st_save(cpu, metadata={**meta, "sha256": digest(cpu, meta)})
    atomic_write(path, lambda f: _write(f, data, path.name))


_WRITES: dict[str, int] = {}  # files written by this process, by name, for the test hook below


def _write(f: Any, data: bytes, name: str) -> None:
    """f.write(data). Test hook (fault-injection tests only): with $CRLF_TEST_KILL_AT = "NAME#n", the process kills
    itself with SIGKILL, as a power cut would, half way through its n-th write of the file NAME."""
    _WRITES[name] = _WRITES.get(name, 0) + 1
    f.write(memoryview(data)[: len(data) // 2])
    if os.environ.get("CRLF_TEST_KILL_AT") == f"{name}#{_WRITES[name]}":
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    f.write(memoryview(data)[len(data) // 2 :])


def read_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read every tensor and the metadata of a safetensors file; InputError when it is missing or unreadable."""
    tensors, metadata, _ = read_tensors_hashed(path)
    return tensors, metadata


def read_tensors_hashed(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str], str]:
    """read_tensors plus the SHA-256 of the very bytes the tensors came from (the file is read once, so a file
    replaced meanwhile cannot be named for weights it did not hold)."""
    path = Path(path)
    if path.is_dir():
        inside = " (encoder.safetensors is in it)" if (path / "encoder.safetensors").is_file() else ""
        raise InputError(f"checkpoint {path} is a folder, not a file: pass the .safetensors file{inside}")
    if not path.is_file():
        raise InputError(f"checkpoint {quoted(path)} does not exist")
    try:
        data = path.read_bytes()
        (size,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8 : 8 + size])
        metadata = header.get("__metadata__") or {}
        tensors = st_load(data)
    except (SafetensorError, OSError, ValueError, RuntimeError, UnicodeDecodeError, struct.error, AttributeError) as e:
        reason = (str(e).splitlines() or [type(e).__name__])[0]
        raise InputError(f"{path} is not a readable safetensors file (truncated or corrupt?): {reason}") from None
    if "sha256" in metadata and digest(tensors, metadata) != metadata["sha256"]:
        raise InputError(
            f"{path} is damaged (its checksum does not match its contents): use an earlier checkpoint or re-create it"
        )
    return tensors, metadata, hashlib.sha256(data).hexdigest()


def save_state(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    metadata: dict[str, str],
    progress: dict[str, Any],
    rng: dict[str, torch.Tensor] | None = None,
    scaler: torch.amp.GradScaler | None = None,
) -> None:
    """Full training state for --resume: weights, optimizer buffers and param groups, progress (epoch, step,
    schedule state), fp16's loss scale and, for a run stopped inside an epoch, the random generators' states (`rng`)."""
    save_tensors(path, *state_tensors(model, optimizer, metadata, progress, rng, scaler))


def state_tensors(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    metadata: dict[str, str],
    progress: dict[str, Any],
    rng: dict[str, torch.Tensor] | None = None,
    scaler: torch.amp.GradScaler | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """What save_state writes, as CPU copies: training may go on (and change the live tensors in place) while
    they are hashed and written on another thread."""
    tensors = {f"model.{k}": v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    tensors.update({f"rng.{k}": v.detach().to("cpu", copy=True) for k, v in (rng or {}).items()})
    if scaler is not None:  # fp16: the loss scale and the steps since it last changed (a host sync: once an epoch)
        scaling = scaler.state_dict()
        tensors["scaler.scale"] = torch.tensor([scaling["scale"]], dtype=torch.float64)
        tensors["scaler.growth_tracker"] = torch.tensor([scaling["_growth_tracker"]], dtype=torch.int64)
    opt = optimizer.state_dict()
    for idx, buffers in opt["state"].items():
        for name, value in buffers.items():
            value = value if torch.is_tensor(value) else torch.tensor(value)
            tensors[f"optim.{idx}.{name}"] = value.detach().to("cpu", copy=True)
    meta = {
        **metadata,
        "format": STATE_FORMAT,
        "param_groups": json.dumps(opt["param_groups"]),
        "progress": json.dumps(progress),
    }
    return tensors, meta


def load_state(
    path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None = None
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Restore weights, optimizer and fp16's loss scale (when both the run and the file have one) from a state file
    (strictly); returns the saved progress and generator states."""
    tensors, meta = read_tensors(path)
    if meta.get("format") != STATE_FORMAT:
        raise InputError(f"{path} is not a crlf training state; delete it or start a fresh run in another --out")
    weights = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
    try:
        model.load_state_dict(weights, strict=True)
        state: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in tensors.items():
            if key.startswith("optim."):
                _, idx, name = key.split(".", 2)
                state.setdefault(int(idx), {})[name] = value
        groups, progress = json.loads(meta["param_groups"]), json.loads(meta["progress"])
        problem = _groups_problem(groups, optimizer.state_dict()["param_groups"])
        if not isinstance(progress, dict) or type(progress.get("epoch")) is not int or progress["epoch"] < 0:
            problem = problem or f"progress {str(progress)[:40]} has no epoch count"
        if problem:
            raise ValueError(problem)
        optimizer.load_state_dict({"state": state, "param_groups": groups})
        if scaler is not None and "scaler.scale" in tensors:
            scale, tracker = float(tensors["scaler.scale"][0]), int(tensors["scaler.growth_tracker"][0])
            if not (math.isfinite(scale) and scale > 0 and tracker >= 0):
                raise ValueError(f"loss scale {scale:.3g} / {tracker}")
            scaler.load_state_dict({**scaler.state_dict(), "scale": scale, "_growth_tracker": tracker})
        rng = {k[len("rng.") :]: v for k, v in tensors.items() if k.startswith("rng.")}
        if any(v.dtype != torch.uint8 or v.ndim != 1 for v in rng.values()):
            raise ValueError("a random generator state is not a byte vector")
        return progress, rng
    except (RuntimeError, ValueError, KeyError) as e:
        raise InputError(
            f"{path} does not match this run's model or optimizer ({str(e).splitlines()[0]}); use --force to start over"
        ) from None


def _groups_problem(saved: Any, current: list[dict[str, Any]]) -> str | None:
    """What makes a state file's optimizer param groups other than this optimizer's with other numbers, or None: a
    crafted file (its checksum recomputed) must not switch an implementation flag (fused, foreach, capturable) or
    hand the optimizer a value of another type."""
    if not isinstance(saved, list) or len(saved) != len(current) or not all(isinstance(g, dict) for g in saved):
        return f"{len(current)} optimizer param groups expected, found {str(saved)[:40]}"
    for group, mine in zip(saved, current):
        if set(group) != set(mine):
            return f"optimizer settings {sorted(set(group) ^ set(mine))[:4]} differ"
        for key, value in mine.items():
            if not _same_kind(group[key], value):
                return f"optimizer setting {key} = {str(group[key])[:30]}, expected one like {str(value)[:30]}"
    return None


def _same_kind(saved: Any, mine: Any) -> bool:
    """A finite number for a number (int or float), a list of as many numbers for a list or tuple, else equal."""
    if isinstance(mine, (list, tuple)):
        return isinstance(saved, list) and len(saved) == len(mine) and all(map(_same_kind, saved, mine))
    if isinstance(mine, (int, float)) and not isinstance(mine, bool):
        return type(saved) in (int, float) and math.isfinite(saved)
    return saved == mine and type(saved) is type(mine)
