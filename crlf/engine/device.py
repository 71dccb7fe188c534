"""Device choice (auto: cuda > mps > cpu), precision policy and seeding."""

from __future__ import annotations

import contextlib
import random
import re

import numpy as np
import torch

from crlf.errors import InputError


def select_device(name: str = "auto") -> torch.device:
    """Resolve 'auto' / 'cpu' / 'cuda' / 'cuda:N' / 'mps' to an available torch.device, or raise InputError."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    if re.fullmatch(r"cuda(:\d{1,4})?", name):
        if not torch.cuda.is_available():
            raise InputError(f"--device {name}: no CUDA GPU is available here (available: {available()}); use "
                             "--device cpu (or auto)")
        device = torch.device(name)
        if (device.index or 0) >= torch.cuda.device_count():
            raise InputError(f"--device {name}: no such CUDA device here (available: {available()})")
        return device
    if name == "mps":
        if not _mps_available():
            raise InputError(f"--device mps: Apple's MPS backend is not available here (available: {available()}); "
                             "use one of those or auto")
        return torch.device("mps")
    raise InputError(f"unknown device {str(name)[:40]!r}: use auto, cpu, cuda, cuda:N or mps (available here: "
                     f"{available()})")


def available() -> str:
    """The devices this machine has, for messages: 'cpu', 'cpu, cuda:0 .. cuda:3', 'cpu, mps'."""
    names = ["cpu"]
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count:
        names.append("cuda:0" if count == 1 else f"cuda:0 .. cuda:{count - 1}")
    if _mps_available():
        names.append("mps")
    return ", ".join(names)


def describe(name: str, precision: str) -> dict[str, str]:
    """What a device name and precision resolve to on this machine, for --print-config."""
    try:
        device = select_device(name)
    except InputError as e:
        return {"device": f"unavailable ({e})"}
    return {"device": str(device), "precision": precision_name(autocast_dtype(device, precision))}


def precision_name(dtype: torch.dtype | None) -> str:
    """'bf16', 'fp16' or 'fp32' for an autocast dtype (None: float32)."""
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")  # type: ignore[arg-type]


def _mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def autocast_dtype(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """The autocast dtype for this device: under 'auto' bf16 on CUDA, fp16 on CUDA GPUs without bf16 (pre-Ampere:
    T4, V100), None (float32) elsewhere; fp16 training takes a GradScaler (crlf.engine.loop)."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return None


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """An autocast context for the forward pass, or a no-op when running in float32."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def grad_scaler(device: torch.device, dtype: torch.dtype | None) -> torch.amp.GradScaler | None:
    """fp16's loss scaling on `device` (None for other precisions; an InputError where torch has none for it)."""
    if dtype != torch.float16:
        return None
    try:
        return torch.amp.GradScaler(device.type)
    except (RuntimeError, ValueError, AssertionError) as e:
        raise InputError(f"--precision fp16 on {device.type}: torch {torch.__version__} has no gradient scaler for it "
                         f"({str(e)[:60]}); use --precision bf16 or fp32") from None


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices): the same seed gives the same CPU run."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def make_generator(device: torch.device, seed: int) -> torch.Generator:
    """A torch.Generator on `device` (augmentation draws stay on the device: no host round trip)."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen
