"""Pretraining throughput, side by side: the model floor, crlf end to end, and a torchvision DataLoader baseline.

    python benchmarks/throughput.py                                   # GPU: batch 256/512/1024, eager + compiled
    python benchmarks/throughput.py --device cpu --batch-sizes 64 --modes eager --images 2048 --steps 5

Variants (each measured in a process of its own, so compile caches and memory never mix):
- floor:       encoder + head, two views, NT-Xent, backward and SGD step on views already on the device
               (bf16 autocast and channels_last on CUDA): the most any data pipeline can reach.
- crlf:        ``crlf.pretrain`` itself on a uint8 data set (real augmentation, optimizer, per-epoch
               bookkeeping, checkpoints), images/s of its last epoch.
- torchvision: per-image PIL transforms (RandomResizedCrop, flip, ColorJitter, RandomGrayscale) in a
               DataLoader with --workers processes feeding the same model step.
- augment:     views per second of crlf's batched augmentation alone, and of the torchvision DataLoader
               alone (no model): the CPU comparison.
Prints a table (images/s, seconds per CIFAR-10 epoch of 50,000 images, ratio to the floor of the same mode
and batch, peak device memory, TFLOP/s) and writes it as JSON with --json. No result is asserted anywhere.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

EPOCH = 50_000  # images per CIFAR-10 epoch, for the seconds-per-epoch column


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _model_and_step(device: torch.device, compile_: bool, batch: int):
    """The crlf model, optimizer and one training step on normalised float views (the floor's unit of work)."""
    from crlf.engine import backbones
    from crlf.engine.device import autocast, autocast_dtype
    from crlf.engine.methods import SimCLR
    from crlf.engine.optim import build_optimizer

    spec = backbones.spec_for("resnet18", 32, "cifar")
    model = SimCLR(backbones.build(spec), None, spec.feature_dim).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, "sgd", 0.06 * batch / 64, 5e-4)
    net = torch.compile(model) if compile_ else model
    amp = autocast_dtype(device)

    def step(x: torch.Tensor) -> torch.Tensor:
        with autocast(device, amp):
            loss = net(list(x.chunk(2)))  # the method: projections of both views and NT-Xent
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.detach()

    return model, step


def _flops_per_image(device: torch.device, size: int) -> float:
    """Forward + backward FLOPs of one source image (two views), counted by torch on a small batch."""
    from torch.utils.flop_counter import FlopCounterMode

    _, step = _model_and_step(device, False, 8)
    x = torch.randn(16, 3, size, size, device=device)
    with FlopCounterMode(display=False) as counter:
        step(x)
    return counter.get_total_flops() / 8


def run_floor(args: argparse.Namespace, device: torch.device, batch: int, compile_: bool) -> dict[str, Any]:
    _, step = _model_and_step(device, compile_, batch)
    x = torch.randn(2 * batch, 3, args.image_size, args.image_size, device=device)
    if device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    for _ in range(args.warmup):
        step(x)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step(x)
    _sync(device)
    return {"images_per_s": args.steps * batch / (time.perf_counter() - t0)}


def _dataset(args: argparse.Namespace, folder: Path) -> Path:
    """A uint8 N x H x W x 3 .npy data set: random pixels (the arithmetic is the same as for real images)."""
    path = folder / "images.npy"
    rng = np.random.default_rng(0)
    np.save(path, rng.integers(0, 256, (args.images, args.image_size, args.image_size, 3), dtype=np.uint8))
    return path


def run_crlf(args: argparse.Namespace, device: torch.device, batch: int, compile_: bool) -> dict[str, Any]:
    from crlf import PretrainSettings, pretrain

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(args.data) if args.data else _dataset(args, Path(tmp))
        kind = "folder" if data.is_dir() else "npy"
        settings = PretrainSettings(
            data=kind,
            data_dir=data,
            image_size=args.image_size,
            batch_size=batch,
            epochs=args.epochs,
            device=str(device),
            compile=compile_,
            out=Path(tmp) / "run",
            head_hidden=2048,
            head_out=128,
        )
        pretrain(settings)
        metrics = [json.loads(line) for line in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
    return {
        "images_per_s": metrics[-1]["images_per_s"],
        "epoch_images": metrics[-1]["images_per_s"] * metrics[-1]["seconds"],
    }


class _PILPairs(torch.utils.data.Dataset):
    """The usual SimCLR data path: per-image PIL transforms, two views per image."""

    def __init__(self, images: np.ndarray, size: int):
        from torchvision import transforms as T

        self.images = images
        self.transform = T.Compose(
            [
                T.RandomResizedCrop(size, scale=(0.2, 1.0)),
                T.RandomHorizontalFlip(),
                T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
                T.RandomGrayscale(0.2),
                T.ToTensor(),
                T.Normalize((0.49, 0.48, 0.45), (0.25, 0.24, 0.26)),
            ]
        )

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        from PIL import Image

        im = Image.fromarray(self.images[i])
        return self.transform(im), self.transform(im)


def _loader(args: argparse.Namespace, batch: int):
    images = np.random.default_rng(0).integers(
        0, 256, (args.images, args.image_size, args.image_size, 3), dtype=np.uint8
    )
    return torch.utils.data.DataLoader(
        _PILPairs(images, args.image_size),
        batch_size=batch,
        shuffle=True,
        drop_last=True,
        num_workers=args.workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=args.workers > 0,
    )


def run_torchvision(args: argparse.Namespace, device: torch.device, batch: int, compile_: bool) -> dict[str, Any]:
    _, step = _model_and_step(device, compile_, batch)
    loader, done, t0 = _loader(args, batch), 0, None
    for _epoch in range(100):
        for i, (v1, v2) in enumerate(loader):
            x = torch.cat([v1, v2]).to(device, non_blocking=True)
            if device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            step(x)
            if t0 is None and i + 1 >= args.warmup:
                _sync(device)
                t0 = time.perf_counter()
            elif t0 is not None:
                done += batch
            if done >= args.steps * batch:
                _sync(device)
                return {"images_per_s": done / (time.perf_counter() - t0)}
    raise SystemExit("--images is too small for --warmup + --steps batches")


def run_augment(args: argparse.Namespace, device: torch.device, batch: int, compile_: bool) -> dict[str, Any]:
    """Source images per second turned into two views: crlf's batched ops vs the torchvision DataLoader."""
    from crlf.engine import augment
    from crlf.options import AugmentSettings

    cfg = AugmentSettings(jitter_strength=0.5)
    images = torch.randint(0, 256, (batch, 3, args.image_size, args.image_size), dtype=torch.uint8, device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    for _ in range(args.warmup):
        augment.views(images, cfg, gen)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        augment.views(images, cfg, gen)
    _sync(device)
    ours = args.steps * batch / (time.perf_counter() - t0)
    loader, seen, t0 = _loader(args, batch), 0, None
    for i, _ in enumerate(loader):
        if i + 1 == args.warmup:
            t0 = time.perf_counter()
        elif t0 is not None:
            seen += batch
        if seen >= args.steps * batch:
            break
    theirs = seen / (time.perf_counter() - t0) if t0 and seen else float("nan")
    return {"images_per_s": ours, "torchvision_images_per_s": theirs, "speedup": ours / theirs}


VARIANTS = {"floor": run_floor, "crlf": run_crlf, "torchvision": run_torchvision, "augment": run_augment}


def measure_one(args: argparse.Namespace) -> dict[str, Any]:
    """One variant, in this process."""
    from crlf.engine.device import select_device

    device = select_device(args.device)
    torch.manual_seed(0)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.cuda.reset_peak_memory_stats(device)
    result = VARIANTS[args.variant](args, device, args.batch, args.mode == "compile")
    result.update(variant=args.variant, mode=args.mode, batch=args.batch, device=str(device))
    if device.type == "cuda":
        result["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    return result


def derive(rows: list[dict], flops: float, peak_tflops: float) -> None:
    """Seconds per epoch, TFLOP/s, MFU and the share of the floor of every measured row (in place)."""
    for row in rows:
        floor = next(
            (r for r in rows if r["variant"] == "floor" and r["mode"] == row["mode"] and r["batch"] == row["batch"]),
            None,
        )
        if "images_per_s" in row and row["variant"] != "augment":
            row["seconds_per_epoch"] = round(EPOCH / row["images_per_s"], 3)
            row["tflops"] = round(row["images_per_s"] * flops / 1e12, 2)
            row["mfu"] = round(row["tflops"] / peak_tflops, 4)
            if floor and "images_per_s" in floor and row["variant"] in ("crlf", "torchvision"):
                row["of_floor"] = round(row["images_per_s"] / floor["images_per_s"], 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[256, 512, 1024])
    parser.add_argument("--modes", nargs="+", default=["eager", "compile"], choices=["eager", "compile"])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--steps", type=int, default=50, help="timed steps (floor, torchvision, augment)")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--images", type=int, default=50_000, help="data set size for crlf and torchvision")
    parser.add_argument("--epochs", type=int, default=3, help="crlf epochs; the last one is reported")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1))
    parser.add_argument("--data", help="an image folder or .npy for the crlf variant (default: random pixels)")
    parser.add_argument(
        "--peak-tflops", type=float, default=800.0, help="matmul peak for the MFU column (H100 bf16, measured)"
    )
    parser.add_argument("--json", help="also write the rows here")
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:  # a child: measure one variant, print one JSON line
        print(json.dumps(measure_one(args)))
        return
    from crlf.engine.device import select_device

    device = select_device(args.device)
    flops = _flops_per_image(device, args.image_size)
    rows = []
    for batch in args.batch_sizes:
        for mode in args.modes:
            for variant in args.variants:
                if variant == "augment" and mode == "compile":
                    continue
                cmd = [
                    sys.executable,
                    __file__,
                    "--variant",
                    variant,
                    "--batch",
                    str(batch),
                    "--mode",
                    mode,
                    *sum(
                        (
                            [f"--{k.replace('_', '-')}", str(v)]
                            for k, v in vars(args).items()
                            if k in ("device", "steps", "warmup", "images", "epochs", "image_size", "workers")
                            and v is not None
                        ),
                        [],
                    ),
                    *(["--data", args.data] if args.data else []),
                ]
                done = subprocess.run(cmd, capture_output=True, text=True)
                if done.returncode:
                    row = {
                        "variant": variant,
                        "mode": mode,
                        "batch": batch,
                        "error": (done.stderr.strip().splitlines() or ["?"])[-1],
                    }
                else:
                    row = json.loads(done.stdout.strip().splitlines()[-1])
                rows.append(row)
                print(
                    f"measured {variant} {mode} batch {batch}: {row.get('images_per_s', row.get('error'))}",
                    file=sys.stderr,
                )
                derive(rows, flops, args.peak_tflops)
                if args.json:  # after every row: a run stopped at a time limit keeps what it measured
                    Path(args.json).write_text(
                        json.dumps({"device": str(device), "gflop_per_image": flops / 1e9, "rows": rows}, indent=1)
                    )
    header = (
        f"{'variant':<12}{'mode':<9}{'batch':>6}{'images/s':>11}{'s/epoch':>9}"
        f"{'of floor':>9}{'TFLOP/s':>9}{'peak GiB':>9}  note"
    )
    print(f"device {device}, {flops / 1e9:.2f} GFLOP per source image (fwd + bwd, two views)")
    print(header)
    for r in rows:
        note = r.get("error", "")
        if r["variant"] == "augment" and "speedup" in r:
            note = f"torchvision DataLoader: {r['torchvision_images_per_s']:,.0f} images/s -> crlf {r['speedup']:.1f}x"
        print(
            f"{r['variant']:<12}{r['mode']:<9}{r['batch']:>6}{r.get('images_per_s', float('nan')):>11,.0f}"
            f"{r.get('seconds_per_epoch', float('nan')):>9.2f}{r.get('of_floor', float('nan')):>9.2f}"
            f"{r.get('tflops', float('nan')):>9.1f}{r.get('peak_memory_gib', float('nan')):>9.2f}  {note}"
        )


if __name__ == "__main__":
    main()
