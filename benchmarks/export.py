"""Images/s of an encoder exported by crlf export (onnxruntime on the CPU, and the TorchScript file) against the
PyTorch encoder on the CPU (the same preprocessing + backbone module in eager mode, and Encoder.features, fp32),
preprocessing included everywhere (uint8 NHWC in).

    python benchmarks/export.py --threads 1           # ResNet-18 at 32 and 224 px, batch sizes 1 and 64
    python benchmarks/export.py --smoke --json r.json # tiny: a few seconds (tests/test_benchmarks.py)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from crlf.engine import backbones
from crlf.engine import export as ex
from crlf.engine.encoder import Encoder


def _rate(run: Callable[[torch.Tensor], Any], images: torch.Tensor, seconds: float, warmup: int) -> float:
    """Images per second of `run(images)` from the median call, after `warmup` calls, over at least `seconds` (and
    3 calls): the median, since other processes share the machine's cores."""
    for _ in range(warmup):
        run(images)
    times: list[float] = []
    while len(times) < 3 or sum(times) < seconds:
        t0 = time.perf_counter()
        run(images)
        times.append(time.perf_counter() - t0)
    return len(images) / statistics.median(times)


def measure(arch: str, size: int, batches: list[int], seconds: float, warmup: int, folder: Path,
            ) -> list[dict[str, Any]]:  # fmt: skip
    import onnxruntime

    torch.manual_seed(0)
    spec = backbones.spec_for(arch, size)
    encoder = Encoder(backbones.build(spec).eval(), spec, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    onnx_file, ts_file = folder / f"{arch}-{size}.onnx", folder / f"{arch}-{size}.pt"
    ex.export(encoder, onnx_file, ex.ExportConfig("onnx", "uint8"), force=True)
    ex.export(encoder, ts_file, ex.ExportConfig("torchscript", "uint8"), force=True)
    options = onnxruntime.SessionOptions()  # its threads would spin between calls, starving PyTorch's
    options.intra_op_num_threads = torch.get_num_threads()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = onnxruntime.InferenceSession(str(onnx_file), options, providers=["CPUExecutionProvider"])
    scripted = torch.jit.load(str(ts_file))
    eager = ex.Preprocessed(encoder, "uint8").eval()  # the same graph as the files, run by PyTorch
    variants = {
        "pytorch": eager,
        "crlf embed": lambda x: encoder.features(x.permute(0, 3, 1, 2), batch_size=len(x), precision="fp32"),
        "onnxruntime": lambda x: session.run(None, {"images": x.numpy()}),
        "torchscript": lambda x: scripted(x),
    }
    rows = []
    for batch in batches:
        x = ex.probe_images(encoder, "uint8", batch, seed=1)
        with torch.no_grad():
            rates = {name: _rate(run, x, seconds, warmup) for name, run in variants.items()}
        for name, rate in rates.items():
            rows.append({"arch": arch, "image_size": size, "batch": batch, "variant": name,
                         "images_per_s": round(rate, 1), "of_pytorch": round(rate / rates["pytorch"], 2)})  # fmt: skip
            print(f"{arch} {size:>3} px  batch {batch:>3}  {name:<11} {rate:9.1f} images/s  "
                  f"x{rate / rates['pytorch']:.2f}", flush=True)  # fmt: skip
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--sizes", type=int, nargs="+", default=[32, 224])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64])
    p.add_argument("--seconds", type=float, default=3.0, help="time per measurement")
    p.add_argument("--threads", type=int, help="CPU threads of torch and onnxruntime (default: torch's)")
    p.add_argument("--smoke", action="store_true", help="tiny: a timm test model at 16 px, a few calls")
    p.add_argument("--json", type=Path, help="write the rows here")
    args = p.parse_args()
    if args.smoke:
        args.arch, args.sizes, args.batch_sizes, args.seconds = "timm:test_resnet", [16], [1, 4], 0.0
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for size in args.sizes:
            rows += measure(args.arch, size, args.batch_sizes, args.seconds, 1 if args.smoke else 3, Path(folder))
    env = {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
           "machine": platform.processor() or platform.machine(), "load_average": os.getloadavg()}  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({"env": env, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
