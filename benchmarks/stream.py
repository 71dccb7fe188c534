"""Streaming throughput: crlf's streaming source vs torchvision ImageFolder + DataLoader, side by side in one run.

Both make two SimCLR views per image at --size px (random-resized crop 0.08-1 of the full-resolution JPEG, flip,
colour jitter 0.8, grayscale 0.2) with the same --workers decoding processes; crlf cuts the crops while decoding and
augments the rest batched (on a CPU inside the workers, one batch each; on CUDA on the device; "main process
augments" is the CPU path before that change), torchvision does everything per image in the workers. With --train
(the GPU part) each also feeds a ResNet-50 step at --size px: images/s, and how busy the model keeps the device (the
model's own step time over the step time with data; >= 90% means the input keeps up). --gpu-decode adds crlf with JPEGs
decoded by torchvision.io on the device. --smoke: a tiny generated folder, every path, seconds on a CPU.

    python benchmarks/stream.py --make 2000 --folder /tmp/jpegs --workers 2            # CPU here
    python benchmarks/stream.py --make 6000 --folder /tmp/jpegs --device cuda --train --gpu-decode --workers 16
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from crlf.engine import augment
from crlf.engine.sources import catalog
from crlf.engine.sources.feed import StreamFeed
from crlf.options import DataSettings

AUG = augment.Augment(crop_min_scale=0.08, jitter_strength=0.5, jitter_p=0.8, grayscale_p=0.2)


def make(folder: Path, count: int, size: tuple[int, int] = (500, 375)) -> None:
    """`count` photo-like JPEGs (smooth colour fields plus noise) of 500x375, in 10 class folders; one process per
    core (about 20 ms an image on one core)."""
    from concurrent.futures import ProcessPoolExecutor

    cores = os.cpu_count() or 1
    if count < 64 or cores == 1:
        _make_some(folder, range(count), size)
        return
    with ProcessPoolExecutor(cores) as pool:
        list(pool.map(_make_some, [folder] * cores, [range(k, count, cores) for k in range(cores)], [size] * cores))


def _make_some(folder: Path, indices: range, size: tuple[int, int]) -> None:
    """The images of `make` with these indices (each seeded by its index: the same files whatever the cores)."""
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    for i in indices:
        path = folder / f"c{i % 10}" / f"{i:06d}.jpg"
        if path.exists():
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(i)
        a, b, c = rng.uniform(0.005, 0.03, 3)
        base = np.stack([np.sin(xx * a + i), np.cos(yy * b), np.sin((xx + yy) * c)], -1) * 100 + 128
        pixels = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(path, quality=90)


class _TwoViews:
    """torchvision's per-image SimCLR pair (a class, so spawned workers can unpickle it)."""

    def __init__(self, one) -> None:
        self.one = one

    def __call__(self, im: Image.Image) -> torch.Tensor:
        return torch.stack([self.one(im), self.one(im)])


def _torchvision_loader(folder: Path, size: int, batch: int, workers: int) -> torch.utils.data.DataLoader:
    from torchvision import datasets, transforms

    s = AUG.jitter_strength
    one = transforms.Compose([
        transforms.RandomResizedCrop(size, scale=(0.08, 1.0)),
        transforms.RandomHorizontalFlip(),
        transforms.RandomApply([transforms.ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s)], p=0.8),
        transforms.RandomGrayscale(0.2),
        transforms.ToTensor(),
    ])  # fmt: skip
    data = datasets.ImageFolder(str(folder), transform=_TwoViews(one))
    extra = {"multiprocessing_context": "spawn", "persistent_workers": True, "prefetch_factor": 4} if workers else {}
    return torch.utils.data.DataLoader(data, batch_size=batch, shuffle=True, num_workers=workers, drop_last=True,
                                       pin_memory=torch.cuda.is_available(), **extra)  # fmt: skip


def _model(device: torch.device, size: int):
    """A ResNet-50 SimCLR-like step (backbone on both views, a scalar loss); None for --no-train."""
    from torchvision.models import resnet50

    net = resnet50().to(device).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(net.parameters(), lr=0.01)

    def step(x: torch.Tensor) -> None:
        with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
            loss = net(x.contiguous(memory_format=torch.channels_last)).float().logsumexp(1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cpu_seconds() -> float:
    """CPU seconds used so far by this process and its live descendants (the loaders' workers), from /proc (Linux):
    the work a variant costs, whatever else shares the cores."""
    total, todo = 0, [os.getpid()]
    while todo:
        pid = todo.pop()
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
            for task in Path(f"/proc/{pid}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return total / os.sysconf("SC_CLK_TCK")


def run(name: str, batches, device: torch.device, steps: int, warmup: int, step=None) -> dict:
    """Images/s over `steps` batches after `warmup`, each batch two float views (B, 3, S, S) on the device; and the
    CPU milliseconds per image that every process of the variant spent meanwhile."""
    it = iter(batches)
    for _ in range(warmup):
        x = next(it)
        if step:
            step(torch.cat(x))
    _sync(device)
    t0, n, cpu0 = time.perf_counter(), 0, _cpu_seconds()
    for _ in range(steps):
        x = next(it)
        n += len(x[0])
        if step:
            step(torch.cat(x))
    _sync(device)
    seconds, cpu = time.perf_counter() - t0, _cpu_seconds() - cpu0
    it.close()  # each variant's workers stop now, not killed at interpreter exit
    return {"variant": name, "images_per_s": round(n / seconds, 1), "seconds": round(seconds, 2),
            "cpu_ms_per_image": round(1000 * cpu / n, 1)}  # fmt: skip


def crlf_batches(
    folder: Path, size: int, batch: int, workers: int, device: torch.device, gpu_decode: bool, in_workers: bool = True
):
    listed = catalog(DataSettings(data="folder", data_dir=folder))
    plan = [(size, 0.08, 1.0)] * 2
    recipe = functools.partial(augment.draw, augment.pair_recipe(AUG)) if in_workers else None
    feed = StreamFeed(listed, size, plan, 0, device, workers, gpu_decode, recipe)
    feed.gpu = gpu_decode  # --smoke on a CPU: the device-decode path with the CPU as the device
    feed.decoder.gpu = gpu_decode
    gen = torch.Generator(device).manual_seed(0)
    steps = len(listed) // batch
    epoch = 0
    try:
        while True:
            perm = torch.randperm(len(listed), generator=torch.Generator().manual_seed(epoch))
            for crops in feed.batches(epoch, perm, 0, steps, batch, 0, batch):
                yield tuple(crops.views) if isinstance(crops, augment.Views) else augment.views(crops, AUG, gen)
            epoch += 1
    finally:
        feed.close()


def tv_batches(loader, device: torch.device):
    while True:
        for x, _ in loader:
            x = x.to(device, non_blocking=True)
            yield x[:, 0], x[:, 1]


def floor_batches(batch: int, size: int, device: torch.device):
    x = torch.rand(batch, 3, size, size, device=device)
    while True:
        yield x, x


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--folder", type=Path, default=Path("/tmp/crlf-stream-bench"))
    p.add_argument("--make", type=int, default=0, help="generate this many 500x375 JPEGs into --folder first")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=1, help="run the variants this many times, interleaved; medians")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--train", action="store_true", help="feed a ResNet-50 step (the GPU part)")
    p.add_argument("--gpu-decode", action="store_true", help="also crlf with JPEGs decoded on the device")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, every variant (the test suite runs this)")
    p.add_argument("--json", type=Path, help="write the rows here")
    a = p.parse_args()
    if a.smoke:
        a.make, a.size, a.batch, a.steps, a.warmup, a.workers, a.rounds = 24, 32, 4, 2, 1, 1, 2
        a.train = a.gpu_decode = True
    device = torch.device(a.device)
    if a.make:
        make(a.folder, a.make, (64, 48) if a.smoke else (500, 375))
    step = _model(device, a.size) if a.train else None
    variants = {"crlf stream": lambda: crlf_batches(a.folder, a.size, a.batch, a.workers, device, False)}
    if step:
        variants = {"model alone (floor)": lambda: floor_batches(a.batch, a.size, device), **variants}
    if device.type == "cpu":
        variants["crlf stream, main process augments"] = lambda: crlf_batches(
            a.folder, a.size, a.batch, a.workers, device, False, in_workers=False)  # fmt: skip
    if a.gpu_decode:
        variants["crlf stream, device JPEG decode"] = lambda: crlf_batches(
            a.folder, a.size, a.batch, a.workers, device, True)  # fmt: skip
    variants["torchvision ImageFolder + DataLoader"] = lambda: tv_batches(
        _torchvision_loader(a.folder, a.size, a.batch, a.workers), device)  # fmt: skip
    # variants interleaved round by round, so that a slow spell of shared cores hits all of them alike; each
    # measurement is printed and saved as it ends, so a run stopped at a time limit keeps what it measured
    runs: list[list[dict]] = []
    given = {k: str(v) for k, v in vars(a).items()}
    for k in range(a.rounds):
        runs.append([])
        for name, feed in variants.items():
            t0 = time.perf_counter()
            runs[-1].append(run(name, feed(), device, a.steps, a.warmup, step))
            print(f"round {k + 1}: {name}: {runs[-1][-1]['images_per_s']:,.1f} images/s "
                  f"({time.perf_counter() - t0:.1f} s with start-up)", flush=True)  # fmt: skip
            if a.json:
                a.json.write_text(json.dumps({"args": given, "runs": runs}))
    rows = []
    for k, name in enumerate(variants):
        mine = [r[k] for r in runs]
        ratios = [r[k]["images_per_s"] / r[-1]["images_per_s"] for r in runs]
        cpu_ratios = [r[-1]["cpu_ms_per_image"] / max(r[k]["cpu_ms_per_image"], 1e-9) for r in runs]
        rows.append({
            "variant": name,
            "images_per_s": statistics.median(r["images_per_s"] for r in mine),
            "cpu_ms_per_image": statistics.median(r["cpu_ms_per_image"] for r in mine),
            "vs_torchvision": round(statistics.median(ratios), 2),  # median of the rounds' ratios
            "cpu_vs_torchvision": round(statistics.median(cpu_ratios), 2),  # torchvision's CPU ms / this one's
            "rounds": mine,
        })  # fmt: skip
        if step:
            rows[-1]["device_busy"] = round(min(1.0, rows[-1]["images_per_s"] / rows[0]["images_per_s"]), 3)
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores" + (
        f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else "")  # fmt: skip
    print(f"{a.workers} workers, batch {a.batch}, {a.size} px, {device} ({machine}); medians of {a.rounds} rounds")
    for r in rows:
        busy = f"  device busy {r['device_busy']:.0%}" if "device_busy" in r else ""
        print(f"{r['variant']:<40} {r['images_per_s']:>9,.1f} images/s  x{r['vs_torchvision']:.2f}  "
              f"{r['cpu_ms_per_image']:>6.1f} CPU ms/image  x{r['cpu_vs_torchvision']:.2f}{busy}")
    if a.json:
        a.json.write_text(json.dumps({"args": given, "machine": machine, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
