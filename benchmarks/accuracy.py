"""Accuracy for a budget: pretrain + linear-eval + knn-eval of one configuration, or a named sweep, as JSON rows.

    python benchmarks/accuracy.py --epochs 10 --set lr=0.5 --json row.json             # one configuration
    python benchmarks/accuracy.py --sweep ablation --budget 450 --parallel 3 --out "$OUT"   # a table per GPU run
    python benchmarks/accuracy.py --smoke --sweep ablation --max-configs 2 --parallel 2     # CPU, tiny (the suite)

One row: name, the settings changed from the baseline, epochs, pretraining and total wall time, images/s, linear
top-1, kNN top-1 (k 200, T 0.1), final loss, the exact commands, date, machine, commit. The data is CIFAR-10
re-encoded as JPEG (../shared/data/cifar10-jpeg.tar.gz, unpacked to $CRLF_C10 by .gpu/setup.sh): not the original
PNG-equivalent pixels, so numbers can differ slightly from papers'. The baseline is crlf's SimCLR defaults on
ResNet-18 (CIFAR stem), batch 512, 32 px, bf16, kNN monitor off.

Sweeps (--sweep NAME): each configuration runs in a process of its own; --parallel N runs N at once on the one GPU
(CIFAR-10 at batch 512 uses a fraction of an H100); a configuration that no longer fits the budget is skipped,
and one still running at the deadline is stopped (its row says so). ``--seconds S`` turns a time budget into
epochs with --epoch-seconds (measure it with benchmarks/gpu.py: an eager epoch of the baseline).
Files in --out: results.json (every row), accuracy.md (the table), accuracy.log.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import tomllib

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu import ROOT, VIT_ONLY, commit, pretrain_command, tiny_folder  # noqa: E402  (benchmarks/ is not a package)

log = logging.getLogger("accuracy")
METHODS = ["simclr", "moco", "byol", "simsiam", "barlow", "vicreg", "dino", "swav", "mae", "ibot"]


def seed_recipe() -> dict[str, Any]:
    """examples/seed.toml's [pretrain] table: the seed project's recipe."""
    return tomllib.loads((ROOT / "examples" / "seed.toml").read_text())["pretrain"]


def sweep(name: str, epochs: int, epoch_seconds: float) -> list[tuple[str, dict[str, Any]]]:
    """The named list of (row name, settings changed from the baseline); "seed,ablation": both, each row once."""
    if "," in name:
        rows = [row for part in name.split(",") for row in sweep(part, epochs, epoch_seconds)]
        return [row for k, row in enumerate(rows) if row[0] not in [r[0] for r in rows[:k]]]
    if name == "ablation":  # one change at a time from the baseline
        return [
            ("baseline", {}),
            ("lr x0.5", {"lr": 0.06 * 512 / 64 / 2}),
            ("lr x2", {"lr": 0.06 * 512 / 64 * 2}),
            ("temperature 0.1", {"temperature": 0.1}),
            ("temperature 0.5", {"temperature": 0.5}),
            ("batch 256", {"batch_size": 256}),
            ("batch 1024", {"batch_size": 1024}),
            ("head 3 layers", {"head_layers": 3}),
            ("head 512-128", {"head_hidden": 512}),
            ("crop 0.08-1", {"crop_min_scale": 0.08}),
            ("crop 0.5-1", {"crop_min_scale": 0.5}),
            ("jitter 0.25", {"jitter_strength": 0.25}),
            ("jitter 1.0", {"jitter_strength": 1.0}),
            ("schedule none", {"schedule": "none"}),
            ("LARS", {"optimizer": "lars"}),
            (f"epochs {2 * epochs}", {"epochs": 2 * epochs}),
        ]
    if name == "seed":
        return [("baseline", {}), ("seed recipe (examples/seed.toml)", seed_recipe())]
    if name == "methods":
        vit = {m: {"arch": arch} for m, arch in VIT_ONLY.items()}  # a ViT-only method on its ViT
        return [(f"{m} ({VIT_ONLY[m]})" if m in vit else m, {"method": m, **vit.get(m, {})}) for m in METHODS]
    if name == "targets":  # the issue's: >= 75% linear after 10 epochs, >= 85% kNN within 3 minutes
        return [("10 epochs", {"epochs": 10}), ("3 minutes", {"epochs": max(1, int(170 // epoch_seconds))})]
    raise SystemExit(f"unknown sweep {name!r}: ablation, seed, methods or targets")


def run_one(name: str, options: dict[str, Any], work: Path) -> dict[str, Any]:
    """Pretrain with `options`, embed train and test, linear probe and kNN: one row."""
    import torch

    from crlf import PretrainSettings, pretrain
    from crlf.commands.evaluate import knn_eval, linear_eval
    from crlf.commands.extract import extract
    from crlf.settings import ExtractSettings, KnnEvalSettings, LinearEvalSettings

    run = work / "run"
    t0 = time.perf_counter()
    summary = pretrain(PretrainSettings(**options, out=run), force=True)
    pretrain_s = time.perf_counter() - t0
    ckpt = run / "encoder.safetensors"
    common = {"data": options["data"], "data_dir": options["data_dir"], "device": options["device"]}
    for split in ("train", "test"):
        extract(ExtractSettings(ckpt=ckpt, split=split, out=str(work / f"{split}.npy"), **common))
    emb = {"train_emb": work / "train.npy", "test_emb": work / "test.npy", "device": options["device"]}
    lin = linear_eval(LinearEvalSettings(**emb, results=work / "linear.json"))
    knn = knn_eval(KnnEvalSettings(**emb, results=work / "knn.json"))
    cuda = torch.cuda.is_available() and options["device"] != "cpu"
    return {
        "name": name,
        "epochs": options["epochs"],
        "pretrain_s": round(pretrain_s, 1),
        "wall_s": round(time.perf_counter() - t0, 1),
        "images_per_s": summary.get("images_per_s"),
        "final_loss": summary.get("final_loss"),
        "linear_top1": lin["top1"],
        "knn_top1": knn["top1"],
        "commands": [
            pretrain_command({**options, "out": "runs/x"}),
            "crlf extract --ckpt runs/x/encoder.safetensors --data folder --data-dir DIR --split train "
            "--out train.npy (and --split test --out test.npy)",
            "crlf linear-eval --train-emb train.npy --test-emb test.npy",
            "crlf knn-eval --train-emb train.npy --test-emb test.npy",
        ],
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": torch.cuda.get_device_name(0) if cuda else f"cpu ({os.cpu_count()} cores, {platform.node()})",
        "commit": commit(),
    }


def markdown(rows: list[dict[str, Any]]) -> str:
    """The rows as the results table of docs/results.md."""
    lines = [
        "| configuration | epochs | pretrain s | wall s | images/s | linear top-1 | kNN top-1 |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "error" in r or "skipped" in r:
            lines.append(f"| {r['name']} | | | | | {r.get('error') or r.get('skipped')} | |")
            continue
        lines.append(
            f"| {r['name']} | {r['epochs']} | {r['pretrain_s']} | {r['wall_s']} | {r['images_per_s']:,.0f} | "
            f"{r['linear_top1']:.2f} | {r['knn_top1']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def run_sweep(args: argparse.Namespace, base: dict[str, Any], work: Path) -> list[dict[str, Any]]:
    """Every configuration of the sweep in a child process, --parallel at a time, within --budget seconds."""
    configs = sweep(args.sweep, args.epochs, args.epoch_seconds)[args.start :][: args.max_configs]
    deadline = time.perf_counter() + args.budget
    pending = list(enumerate(configs))
    running: dict[int, tuple[subprocess.Popen, Path, float]] = {}
    rows: dict[int, dict[str, Any]] = {}
    longest = 0.0
    while pending or running:
        while pending and len(running) < args.parallel:
            i, (name, change) = pending.pop(0)
            if time.perf_counter() + longest > deadline:  # would not finish: skip it
                rows[i] = {"name": name, "skipped": "budget"}
                continue
            row_file = work / f"row{i}.json"
            spec = json.dumps({"name": name, "options": {**base, **change}})
            cmd = [sys.executable, __file__, "--child", spec, "--json", str(row_file)]
            log.info("start %s: %s", name, change)
            running[i] = (subprocess.Popen(cmd, cwd=ROOT, start_new_session=True), row_file, time.perf_counter())
        for i, (proc, row_file, t0) in list(running.items()):
            name = configs[i][0]
            if proc.poll() is None and time.perf_counter() < deadline:
                continue
            if proc.poll() is None:
                os.killpg(proc.pid, 9)
                proc.wait()
                rows[i] = {"name": name, "error": "stopped at the budget's end"}
            elif proc.returncode == 0 and row_file.is_file():
                rows[i] = json.loads(row_file.read_text())
                longest = max(longest, time.perf_counter() - t0)
            else:
                rows[i] = {"name": name, "error": f"exit {proc.returncode}"}
            log.info("done %s: %s", name, json.dumps(rows[i])[:300])
            del running[i]
            save(args, [rows[k] for k in sorted(rows)])
        time.sleep(0.2)
    return [rows[k] for k in sorted(rows)]


def save(args: argparse.Namespace, rows: list[dict[str, Any]]) -> None:
    """results.json and accuracy.md in --out (after every finished configuration)."""
    (args.out / "results.json").write_text(json.dumps({"sweep": args.sweep, "rows": rows}, indent=1))
    (args.out / "accuracy.md").write_text(markdown(rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path(os.environ.get("CRLF_C10", "/tmp/data/c10")))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seconds", type=float, help="a time budget per configuration, turned into epochs")
    parser.add_argument("--epoch-seconds", type=float, default=2.2, help="seconds per epoch, for --seconds")
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="settings changed (TOML values)")
    parser.add_argument("--sweep", help="ablation, seed, methods or targets; several: seed,ablation")
    parser.add_argument("--start", type=int, default=0, help="skip the sweep's first N configurations (a 2nd call)")
    parser.add_argument("--max-configs", type=int, help="only the first N configurations of the sweep")
    parser.add_argument("--parallel", type=int, default=1, help="configurations at once (sweeps)")
    parser.add_argument("--budget", type=float, default=450.0, help="seconds for the whole sweep")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "accuracy-out"))
    parser.add_argument("--json", type=Path, help="write the one configuration's row here")
    parser.add_argument("--smoke", action="store_true", help="CPU, a generated JPEG folder, tiny sizes")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    with tempfile.TemporaryDirectory(prefix="crlf-acc-") as tmp:
        work = Path(tmp)
        if args.child:  # one configuration of a sweep
            spec = json.loads(args.child)
            args.json.write_text(json.dumps(run_one(spec["name"], spec["options"], work)))
            return
        os.environ.setdefault("CRLF_CACHE_DIR", str(work / "cache"))  # children decode from the same cache
        epochs = max(1, int(args.seconds // args.epoch_seconds)) if args.seconds else args.epochs
        base: dict[str, Any] = {
            "data": "folder",
            "data_dir": str(args.data),
            "image_size": 32,
            "batch_size": args.batch,
            "epochs": epochs,
            "device": args.device,
            "knn_every": 0,
        }
        if args.smoke:
            base.update(data_dir=str(tiny_folder(work / "data")), image_size=8, batch_size=8, epochs=1, device="cpu")
            os.environ["OMP_NUM_THREADS"] = "1"  # tiny ops on shared cores: one thread is many times faster
            args.epochs = 1
        for item in args.set:
            key, value = item.split("=", 1)
            try:
                base[key.replace("-", "_")] = tomllib.loads(f"v = {value}")["v"]
            except tomllib.TOMLDecodeError:  # a bare word: a string
                base[key.replace("-", "_")] = value
        args.out.mkdir(parents=True, exist_ok=True)
        logging.getLogger().addHandler(logging.FileHandler(args.out / "accuracy.log"))
        from crlf import load_data
        from crlf.settings import PretrainSettings

        for split in ("train", "test"):  # decode (and cache) the data once, before any child
            load_data(PretrainSettings(**base), split)
        if args.sweep:
            rows = run_sweep(args, base, work)
        else:
            name = ", ".join(args.set) or "baseline"
            rows = [run_one(name, base, work)]
            if args.json:
                args.json.write_text(json.dumps(rows[0], indent=1))
        save(args, rows)
        print(markdown(rows))


if __name__ == "__main__":
    main()
