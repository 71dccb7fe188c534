"""Peak memory and images/s of crlf's training step with and without --micro-batch and --activation-checkpointing.

    python benchmarks/memory.py                          # the full set (GPU): batch 512, 4096 at 32 px, 256 at 224
    python benchmarks/memory.py --device cpu --set cpu   # the reduced CPU set (batch 128 at 32 px, 2 timed steps)
    python benchmarks/memory.py --smoke                  # two tiny configurations (the test suite runs this)

Each configuration runs in a fresh process of its own, so peaks never mix: CUDA's max_memory_allocated over the
timed steps, or on a CPU the process's peak RSS (which includes torch itself, about 0.4 GB). The step is
crlf.engine.loop.train_step itself (SimCLR, ResNet-18, augmentation drawn on the device, SGD, bf16 autocast on CUDA
under --precision auto), on random uint8 images; images/s over the timed steps after the warm-up ones. An
out-of-memory configuration is a row saying so. Prints a table and writes the rows as JSON with --json; nothing is
asserted.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

# (batch, image size, micro-batch (0: the whole batch), activation checkpointing)
SETS: dict[str, list[tuple[int, int, int, bool]]] = {
    "full": [(512, 32, 0, False), (512, 32, 128, False), (512, 32, 0, True), (512, 32, 128, True),
             (4096, 32, 0, False), (4096, 32, 512, False), (4096, 32, 1024, False), (4096, 32, 512, True),
             (256, 224, 0, False), (256, 224, 64, False), (256, 224, 0, True), (256, 224, 64, True)],
    "cpu": [(128, 32, 0, False), (128, 32, 32, False), (128, 32, 0, True), (128, 32, 32, True)],
    "smoke": [(8, 8, 0, False), (8, 8, 4, True)],
}  # fmt: skip


def measure(device_name: str, batch: int, size: int, micro: int, checkpointing: bool, steps: int, warmup: int,
            precision: str) -> dict[str, Any]:  # fmt: skip
    """One configuration in this process: images/s and the peak memory of `steps` steps after `warmup` ones."""
    import torch

    from crlf.engine import augment, backbones
    from crlf.engine.device import autocast_dtype, grad_scaler, select_device
    from crlf.engine.distributed import World
    from crlf.engine.loop import Setup, train_step
    from crlf.engine.methods import SimCLR
    from crlf.engine.optim import build_optimizer
    from crlf.engine.plan import TrainConfig
    from crlf.engine.sources import DataSpec

    device = select_device(device_name)
    torch.manual_seed(0)
    spec = backbones.spec_for("resnet18", size)
    model = SimCLR(backbones.build(spec), None, spec.feature_dim)
    if checkpointing:
        backbones.checkpoint_activations(spec, model.backbone)
    model = model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    amp = autocast_dtype(device, precision)
    optimizer = build_optimizer(model, "sgd", 0.06 * batch / 64, 5e-4)
    stats = torch.full((1, 3, 1, 1), 0.5, device=device)
    s = Setup(model, SimCLR.recipe(model.config, augment.Augment(), size), model, optimizer, None, None, stats, stats,
              spec, device, amp, World(device=device),
              scaler=grad_scaler(device, amp))  # fmt: skip
    cfg = TrainConfig("simclr", model.config, augment.Augment(), DataSpec(), Path("unused"), batch_size=batch,
                      micro_batch=micro, activation_checkpointing=checkpointing)  # fmt: skip
    gen = torch.Generator(device=device).manual_seed(0)
    images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=gen, device=device)
    total = warmup + steps
    row: dict[str, Any] = {"batch": batch, "image_size": size, "micro_batch": micro,
                           "activation_checkpointing": checkpointing, "device": str(device)}  # fmt: skip
    try:
        for i in range(warmup):
            train_step(cfg, s, images, gen, i + 1, total)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        for i in range(warmup, total):
            loss = train_step(cfg, s, images, gen, i + 1, total)
        loss.item()  # waits for the device
        seconds = time.perf_counter() - t0
    except Exception as e:  # noqa: BLE001 - a row saying what failed (out of memory above all)
        return {**row, "error": str(e).splitlines()[0][:160]}
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        row["device_name"] = torch.cuda.get_device_name(device)
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    row.update(peak_gb=round(peak / 1e9, 3), images_per_s=round(batch * steps / seconds, 1),
               seconds_per_step=round(seconds / steps, 3), steps=steps, warmup=warmup,
               peak_kind="max_memory_allocated" if device.type == "cuda" else "peak RSS")  # fmt: skip
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--set", choices=sorted(SETS), default="full", help="which configurations")
    p.add_argument("--smoke", action="store_true", help="the two tiny configurations, 1 step each")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 5; smoke 1; cpu 2)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 2; cpu 1; smoke 0)")
    p.add_argument("--precision", default="auto")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # a configuration, run in this process
    a = p.parse_args()
    if a.one:
        print(json.dumps(measure(**json.loads(a.one))))
        return
    name = "smoke" if a.smoke else a.set
    light = name in ("smoke", "cpu")
    steps = a.steps or (1 if name == "smoke" else 2 if light else 5)
    warmup = a.warmup if a.warmup is not None else (0 if name == "smoke" else 1 if light else 2)
    rows = []
    for batch, size, micro, ckpt in SETS[name]:
        one = dict(device_name=a.device, batch=batch, size=size, micro=micro, checkpointing=ckpt, steps=steps,
                   warmup=warmup, precision=a.precision)  # fmt: skip
        r = subprocess.run([sys.executable, __file__, "--one", json.dumps(one)], capture_output=True, text=True)
        lines = r.stdout.strip().splitlines()
        row = json.loads(lines[-1]) if r.returncode == 0 and lines else \
            {"batch": batch, "image_size": size, "micro_batch": micro, "activation_checkpointing": ckpt,
             "error": (r.stderr.strip().splitlines() or ["failed"])[-1][:160]}  # fmt: skip
        rows.append(row)
        full = next((x for x in rows if x["batch"] == batch and x["image_size"] == size and not x["micro_batch"]
                     and not x["activation_checkpointing"] and "images_per_s" in x), None)  # fmt: skip
        if full and "images_per_s" in row:
            row["of_full_batch"] = round(row["images_per_s"] / full["images_per_s"], 3)
        what = f"batch {batch:5d} @ {size:3d} px  micro {micro or '-':>5}  ckpt {'yes' if ckpt else 'no ':3}"
        if "error" in row:
            print(f"{what}  {row['error']}", flush=True)
        else:
            print(f"{what}  peak {row['peak_gb']:7.3f} GB  {row['images_per_s']:9.1f} images/s"
                  f"  {row.get('of_full_batch', 1.0):.2f} of full", flush=True)  # fmt: skip
    if a.json:
        a.json.write_text(json.dumps({"set": name, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
