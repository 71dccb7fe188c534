"""The whole GPU measurement in one run within a time budget: results.json + gpu.log in one output folder.

    source .gpu/setup.sh && python benchmarks/gpu.py --budget 450 --out "$OUT"      # the H100 (benchmarks/gpu.sh)
    python benchmarks/gpu.py --smoke --out /tmp/gpu-smoke                          # every stage on a CPU, tiny

Stages, in order, each with its own time cap; a stage that no longer fits the budget left is skipped (and said so),
and results.json is rewritten after every stage, so a run cut short still leaves what it measured:

1. env:        GPU, driver, torch / CUDA / cuDNN versions, crlf's commit (.gpu/COMMIT, else .git), date.
2. e2e_eager:  ``crlf pretrain`` end to end (Python API = the CLI's engine: per-epoch checkpoint and metrics,
               kNN monitor off) on CIFAR-10 from $CRLF_C10 (folder), ResNet-18 CIFAR stem, batch 512, bf16:
               images/s of every epoch from metrics.jsonl (the first carries cuDNN's autotuning).
3. e2e_compile: the same with --compile (the first epoch carries the compilation).
4. profile:    a few steps of crlf's real step (train._build's model, optimizer, feed; a benchmark-side copy of
               loop.train_step with record_function ranges and CUDA events around the pieces): shares of augmentation,
               forward, loss, backward, optimizer, and of the per-epoch checkpoint; the top-15 kernels (profile.txt);
               the real step unsynchronised against its kernels' own time (how busy the GPU is).
5. e2e_big_batch: e2e_eager at --big-batch (1024): what per-step overheads cost at batch 512.
6. e2e_compile_graphs: e2e_compile with torch.compile's CUDA graphs (mode reduce-overhead, patched in here);
   e2e_compile_graphs_augment: the same with the augmentation (augment.apply) compiled too.
7. throughput: benchmarks/throughput.py's table (eager: floor, crlf, torchvision DataLoader, augmentation alone).
8. methods:    two epochs of each method (simclr moco byol simsiam barlow vicreg dino swav; mae, ibot on vit_small),
               images/s of the last.
9. evaluation: extract of train + test (60,000 images), linear-eval, knn-eval on the e2e_eager encoder, and the
               --knn-every cost: one monitor evaluation's seconds over 10 epochs of pretraining.
10. torchrun:  ``torchrun --nproc-per-node 1 -m crlf pretrain`` with e2e_eager's settings: images/s and losses
               against the plain run.

Files in --out: results.json, gpu.log, throughput.json, profile.txt (the run directories live in a temporary
folder). ``--smoke`` runs every stage on a CPU with a generated JPEG folder, 8 px images and tiny batches
(torch.compile is switched off there: the flag's path is taken, nothing is compiled), in well under a minute.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
METHODS = ["simclr", "moco", "byol", "simsiam", "barlow", "vicreg", "dino", "swav", "mae", "ibot"]
VIT_ONLY = {"mae": "vit_small", "ibot": "vit_small"}  # methods that train ViTs alone: their row's arch (else resnet18)
log = logging.getLogger("gpu")


# --- helpers ---------------------------------------------------------------------------------------------------------


def commit() -> str | None:
    """crlf's commit: from .gpu/COMMIT when there (written just before the GPU run: the GPU machine's copy of .git
    was seen to name an older commit), else from .git."""
    from crlf.engine.runplan import git_commit

    marker = ROOT / ".gpu" / "COMMIT"
    return (marker.read_text().strip() if marker.is_file() else None) or git_commit()


def run_command(cmd: list[str], timeout: float) -> tuple[int, str, float]:
    """Run a program in its own process group (killed whole on timeout); returns exit code, output, seconds."""
    t0 = time.perf_counter()
    log.info("$ %s", " ".join(cmd))
    with subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True, cwd=ROOT
    ) as proc:
        try:
            out, _ = proc.communicate(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
            out += f"\n[killed after {timeout:.0f} s]"
            return 124, out, time.perf_counter() - t0
    for line in out.strip().splitlines()[-40:]:
        log.info("  | %s", line)
    return proc.returncode, out, time.perf_counter() - t0


def metrics(run: Path) -> list[dict[str, Any]]:
    """The metrics.jsonl lines of a run directory."""
    path = run / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


@contextlib.contextmanager
def no_compile(active: bool) -> Iterator[None]:
    """Make torch.compile a no-op while active (smoke: the --compile path without minutes of compilation)."""
    if not active:
        yield
        return
    import torch._dynamo

    old = torch._dynamo.config.disable
    torch._dynamo.config.disable = True
    try:
        yield
    finally:
        torch._dynamo.config.disable = old


def pretrain_command(options: dict[str, Any]) -> str:
    """The `crlf pretrain` command line of PretrainSettings keywords (unset ones left out), for the docs."""
    flags = []
    for k, v in options.items():
        if v is None:
            continue
        flag = "--" + k.replace("_", "-")
        flags += [flag] if v is True else [f"--no-{flag[2:]}"] if v is False else [flag, str(v)]
    return "crlf pretrain " + " ".join(flags)


class Driver:
    """The stages and the budget; `results` is what results.json holds."""

    def __init__(self, args: argparse.Namespace, work: Path):
        self.args, self.work = args, work
        self.out: Path = args.out
        self.t0 = time.perf_counter()
        self.results: dict[str, Any] = {"budget_s": args.budget, "smoke": args.smoke, "stages": {}}
        self.device = "cpu" if args.smoke else args.device
        self.data = args.data
        self.eager_run: Path | None = None

    def left(self) -> float:
        """Seconds of the budget left."""
        return self.args.budget - (time.perf_counter() - self.t0)

    def save(self) -> None:
        """Rewrite results.json (after every stage)."""
        self.results["elapsed_s"] = round(time.perf_counter() - self.t0, 1)
        tmp = self.out / "results.json.tmp"
        tmp.write_text(json.dumps(self.results, indent=1, default=str))
        tmp.replace(self.out / "results.json")

    def stage(self, name: str, cap: float, fn: Callable[[float], dict[str, Any]]) -> None:
        """Run one stage if `cap` seconds (its own limit) still fit the budget, record its result or its error."""
        if self.left() < cap * self.args.fit:
            log.info("== %s skipped: %.0f s left, the stage needs up to %.0f s", name, self.left(), cap)
            self.results["stages"][name] = {"skipped": f"{self.left():.0f} s left of the budget, cap {cap:.0f} s"}
            self.save()
            return
        log.info("== %s (cap %.0f s, %.0f s left)", name, cap, self.left())
        t0 = time.perf_counter()
        try:
            result = fn(min(cap, self.left()))
        except Exception as e:  # a stage's failure is a result too: the next stages still run
            log.exception("stage %s failed", name)
            result = {"error": f"{type(e).__name__}: {e}"[:2000]}
        result["stage_seconds"] = round(time.perf_counter() - t0, 2)
        self.results["stages"][name] = result
        log.info("== %s done in %.1f s: %s", name, result["stage_seconds"], json.dumps(result, default=str)[:800])
        self.save()

    # --- settings shared by the stages ----------------------------------------------------------------------------

    def pretrain_options(self, **extra: Any) -> dict[str, Any]:
        """PretrainSettings keywords of the measured configuration (the issue's: batch 512, ResNet-18, monitor off)."""
        a = self.args
        base = {
            "data": "folder",
            "data_dir": self.data,
            "image_size": a.image_size,
            "batch_size": a.batch,
            "epochs": a.epochs,
            "device": self.device,
            "knn_every": 0,
            "arch": "resnet18",
            "limit": a.limit,
        }
        return {**base, **extra}

    def pretrain(self, name: str, **extra: Any) -> tuple[dict[str, Any], Path]:
        """One in-process `crlf pretrain` into the work folder; its metrics and the CLI command."""
        from crlf import PretrainSettings, pretrain

        options = self.pretrain_options(**extra)
        run = self.work / name
        settings = PretrainSettings(**options, out=run)
        t0 = time.perf_counter()
        with no_compile(self.args.smoke and bool(options.get("compile"))):
            summary = pretrain(settings, force=True)
        rows = metrics(run)
        return {
            "command": pretrain_command({**options, "out": f"runs/{name}"}),
            "wall_s": round(time.perf_counter() - t0, 2),
            "images_per_s": [m["images_per_s"] for m in rows],
            "epoch_seconds": [m["seconds"] for m in rows],
            "losses": [m["loss"] for m in rows],
            "best_images_per_s": max((m["images_per_s"] for m in rows), default=None),
            "final_loss": summary.get("final_loss"),
        }, run

    # --- the stages ------------------------------------------------------------------------------------------------

    def env(self, cap: float) -> dict[str, Any]:
        """Where the numbers come from."""
        import torchvision

        info = {
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "commit": commit(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "torchvision": torchvision.__version__,
            "cpus": os.cpu_count(),
            "host": platform.node(),
            "data": str(self.data),
            "device": self.device,
        }
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            info.update(
                gpu=props.name,
                gpu_memory_gib=round(props.total_memory / 2**30, 1),
                cuda=torch.version.cuda,
                cudnn=torch.backends.cudnn.version(),
            )
            if shutil.which("nvidia-smi"):
                rc, out, _ = run_command(
                    ["nvidia-smi", "--query-gpu=driver_version,clocks.max.sm,power.limit", "--format=csv,noheader"], cap
                )
                info["nvidia_smi"] = out.strip() if rc == 0 else None
        return info

    def e2e(self, compile_: bool) -> Callable[[float], dict[str, Any]]:
        """crlf pretrain end to end, eager or compiled."""

        def run(cap: float) -> dict[str, Any]:
            extra = {"epochs": self.args.compile_epochs} if compile_ and self.args.compile_epochs else {}
            result, path = self.pretrain("compile" if compile_ else "eager", compile=compile_, **extra)
            if not compile_:
                self.eager_run = path
            target = 29_500 if compile_ else 23_500
            result["target_images_per_s"] = target
            result["meets_target"] = bool(result["best_images_per_s"] and result["best_images_per_s"] >= target)
            return result

        return run

    def big_batch(self, cap: float) -> dict[str, Any]:
        """crlf pretrain eager at --big-batch (lr by the rule): per-step costs that do not grow with the batch (Python,
        kernel launches) are spread over twice the images; the gain says how much of a step they are."""
        result, _ = self.pretrain("big-batch", batch_size=self.args.big_batch, epochs=min(3, self.args.epochs))
        return result

    def compiled(self, augmentation: bool) -> Callable[[float], dict[str, Any]]:
        """e2e_compile with torch.compile's CUDA graphs (mode reduce-overhead) for the model, and with the
        augmentation (augment.apply, eager in crlf today) compiled too when asked: patched in here, to see what
        each removes of the launch costs before crlf offers them as options."""
        from crlf.engine import augment

        def run(cap: float) -> dict[str, Any]:
            compile_, apply = torch.compile, augment.apply
            torch.compile = functools.partial(compile_, mode="reduce-overhead")  # what train._build calls
            if augmentation:
                augment.apply = compile_(apply, dynamic=False)  # what augment.views and multi_crop call
            try:
                name = "graphs-augment" if augmentation else "graphs"
                result, _ = self.pretrain(name, compile=True, epochs=min(3, self.args.epochs))
            finally:
                torch.compile, augment.apply = compile_, apply
            return result

        return run

    def profile(self, cap: float) -> dict[str, Any]:
        """Shares of one training step (CUDA events, synchronised per step) and the profiler's top kernels."""
        from torch.autograd import DeviceType
        from torch.profiler import ProfilerActivity, profile, record_function

        from crlf import PretrainSettings
        from crlf.commands.pretrain import resolve, train_config
        from crlf.engine import augment, distributed, loop, train
        from crlf.engine.device import autocast
        from crlf.engine.methods import simclr

        settings = resolve(PretrainSettings(**self.pretrain_options(), out=self.work / "profile"))
        cfg = train_config(settings)
        world = distributed.join(settings.device)
        s = train._build(cfg, world)
        cuda = s.device.type == "cuda"
        steps = len(s.feed) // settings.batch_size

        def endless() -> Iterator[torch.Tensor]:
            for epoch in range(10**6):
                perm = torch.randperm(len(s.feed), device=s.feed.rows_on)
                yield from s.feed.batches(epoch, perm, 0, steps, settings.batch_size, 0, settings.batch_size)

        batches = endless()
        gen = torch.Generator(device=s.device).manual_seed(0)
        real_loss = simclr.nt_xent
        marks: list[tuple[str, Any]] = []

        def mark(name: str) -> None:
            if cuda:
                event = torch.cuda.Event(enable_timing=True)
                event.record()
                marks.append((name, event))
            else:
                marks.append((name, time.perf_counter()))

        def timed_loss(*a: Any, **k: Any) -> torch.Tensor:
            mark("forward")
            with record_function("crlf/loss"):
                out = real_loss(*a, **k)
            mark("loss")
            return out

        def step(i: int, batch: torch.Tensor) -> dict[str, float]:
            """loop.train_step, piece by piece (same calls, same order), with a mark after each piece."""
            marks.clear()
            mark("start")
            with record_function("crlf/augment"):
                views = augment.draw(s.recipe, batch, gen)
                views = [(v - s.mean) / s.std for v in views]
                if cuda:
                    views = [v.contiguous(memory_format=torch.channels_last) for v in views]
            mark("augment")
            with record_function("crlf/forward"), autocast(s.device, s.amp):
                loss = s.step_model(views)
            s.optimizer.zero_grad(set_to_none=True)
            with record_function("crlf/backward"):
                loss.backward()
            mark("backward")
            with record_function("crlf/optimizer"):
                s.optimizer.step()
                s.model.after_step(i + 1, steps, 1)
            mark("optimizer")
            if cuda:
                torch.cuda.synchronize()
                return {b: a_e.elapsed_time(b_e) / 1e3 for (_, a_e), (b, b_e) in zip(marks, marks[1:])}
            return {b: b_t - a_t for (_, a_t), (b, b_t) in zip(marks, marks[1:])}

        warm, timed = (1, 2) if self.args.smoke else (10, 20)
        simclr.nt_xent = timed_loss  # the loss's own range and marks; the function itself is unchanged
        try:
            for i in range(warm):
                step(i, next(batches))
            pieces = [step(warm + i, next(batches)) for i in range(timed)]
            # the real step as the loop runs it, not synchronised: with the kernels' own time per step (below), how
            # busy the GPU is; well under 100% means it waits for the CPU (Python / launches) or a host sync
            sync = torch.cuda.synchronize if cuda else (lambda: None)
            sync()
            t0 = time.perf_counter()
            for i in range(timed):
                loop.train_step(cfg, s, next(batches), gen, warm + i + 1, steps)
            sync()
            unsynced_s = (time.perf_counter() - t0) / timed
            profiled = 3 if not self.args.smoke else 1
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
            with profile(activities=activities) as prof:
                for i in range(profiled):
                    step(warm + timed + i, next(batches))
                if cuda:
                    torch.cuda.synchronize()
        finally:
            simclr.nt_xent = real_loss
        mean = {k: sum(p[k] for p in pieces) / len(pieces) for k in pieces[0]}
        step_s = sum(mean.values())
        # the per-epoch checkpoint (last.safetensors + the snapshot), spread over the epoch's steps
        run = train.RunDir(self.work / "profile")
        run.path.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        train.RunHooks(cfg, s, run, None)._save(1, loop.Progress(1))
        ckpt_s = time.perf_counter() - t0  # what the loop waits for (the rest may be written on a writer thread)
        if getattr(s, "writer", None) is not None:
            s.writer.wait()
        ckpt_total_s = time.perf_counter() - t0
        epoch_s = step_s * steps + ckpt_s
        shares = {k: round(v * steps / epoch_s, 4) for k, v in mean.items()}
        shares["checkpoint"] = round(ckpt_s / epoch_s, 4)
        key = "self_device_time_total" if cuda else "self_cpu_time_total"

        def own(e: Any) -> float:
            """An event's own time (us) on the device (CUDA) or the CPU; older torch names the device time cuda."""
            return getattr(e, key, None) or getattr(e, "self_cuda_time_total", 0) if cuda else e.self_cpu_time_total

        events = [e for e in prof.key_averages() if not e.key.startswith("crlf/")]
        if cuda:  # the kernels themselves (and memcpy / memset): the device's events
            events = [e for e in events if getattr(e, "device_type", None) == DeviceType.CUDA and own(e) > 0] or events
        events.sort(key=own, reverse=True)
        total = sum(own(e) for e in events) or 1
        top = [
            {"name": e.key[:160], "calls": e.count, "ms": round(own(e) / 1e3, 3), "share": round(own(e) / total, 4)}
            for e in events[:15]
        ]
        (self.out / "profile.txt").write_text(
            prof.key_averages().table(sort_by=key, row_limit=40, max_name_column_width=100)
        )
        s.feed.close()
        return {
            "step_ms": {k: round(v * 1e3, 3) for k, v in mean.items()},
            "step_total_ms": round(step_s * 1e3, 3),
            "steps_per_epoch": steps,
            "checkpoint_s": round(ckpt_s, 3),
            "checkpoint_write_s": round(ckpt_total_s, 3),
            "epoch_shares": shares,
            "images_per_s_from_steps": round(settings.batch_size / step_s, 1),
            "unsynced_step_ms": round(unsynced_s * 1e3, 3),
            "kernel_ms_per_step": round(total / 1e3 / profiled, 3),
            "gpu_busy_share": round(total / 1e6 / profiled / unsynced_s, 4) if cuda else None,
            "top_kernels": top,
        }

    def throughput(self, cap: float) -> dict[str, Any]:
        """benchmarks/throughput.py's table (eager), as a program of its own."""
        a = self.args
        sizes = (
            [
                "--images",
                "64",
                "--steps",
                "1",
                "--warmup",
                "1",
                "--epochs",
                "1",
                "--image-size",
                "16",
                "--workers",
                "0",
                "--batch-sizes",
                "8",
                "--variants",
                "floor",
                "--device",
                "cpu",
            ]
            if a.smoke
            else [
                "--images",
                "20480",
                "--steps",
                "30",
                "--warmup",
                "5",
                "--epochs",
                "2",
                "--image-size",
                str(a.image_size),
                "--workers",
                str(min(16, os.cpu_count() or 1)),
                "--batch-sizes",
                str(a.batch),
                "--data",
                str(self.data),
            ]
        )
        cmd = [
            sys.executable,
            str(ROOT / "benchmarks" / "throughput.py"),
            "--modes",
            "eager",
            *sizes,
            "--json",
            str(self.out / "throughput.json"),
        ]
        rc, out, seconds = run_command(cmd, cap)
        table = self.out / "throughput.json"  # rewritten after every row: a killed run keeps what it measured
        rows = json.loads(table.read_text())["rows"] if table.is_file() else []
        return {
            "command": "python benchmarks/throughput.py " + " ".join(cmd[2:]).replace(str(self.out), "$OUT"),
            "exit": rc,
            "rows": rows,
            "table": out.strip().splitlines()[-(len(rows) + 2) :] if rc == 0 else out.strip().splitlines()[-5:],
        }

    def evaluation(self, cap: float) -> dict[str, Any]:
        """extract (train + test), linear-eval and knn-eval of the eager run's encoder; the --knn-every cost."""
        from crlf.commands.evaluate import knn_eval, linear_eval
        from crlf.commands.extract import extract
        from crlf.settings import ExtractSettings, KnnEvalSettings, LinearEvalSettings

        if self.eager_run is None:
            self.pretrain("eval-encoder", epochs=1)
            self.eager_run = self.work / "eval-encoder"
        ckpt = self.eager_run / "encoder.safetensors"
        common = {"data": "folder", "data_dir": self.data, "device": self.device}
        result: dict[str, Any] = {}
        t0 = time.perf_counter()
        for split in ("train", "test"):
            extract(ExtractSettings(ckpt=ckpt, split=split, out=str(self.work / f"{split}.npy"), **common))
        result["extract_s"] = round(time.perf_counter() - t0, 2)
        emb = {"train_emb": self.work / "train.npy", "test_emb": self.work / "test.npy", "device": self.device}
        t0 = time.perf_counter()
        lin = linear_eval(LinearEvalSettings(**emb, results=self.work / "linear.json"))
        result.update(linear_eval_s=round(time.perf_counter() - t0, 2), linear_top1=lin["top1"])
        t0 = time.perf_counter()
        knn = knn_eval(KnnEvalSettings(**emb, results=self.work / "knn.json"))
        result.update(knn_eval_s=round(time.perf_counter() - t0, 2), knn_top1=knn["top1"])
        result["images_embedded"] = lin.get("train_size", 0) + lin.get("test_size", 0)
        monitor, _ = self.pretrain("knn-monitor", epochs=1, knn_every=1)
        knn_s = metrics(self.work / "knn-monitor")[-1].get("knn_seconds")
        epoch_s = self.results["stages"].get("e2e_eager", {}).get("epoch_seconds") or monitor["epoch_seconds"]
        pretrain_10 = 10 * min(epoch_s)  # 10 epochs of steady-state pretraining
        result.update(
            knn_monitor_s=knn_s,
            knn_every_10_share=round(knn_s / (pretrain_10 + knn_s), 4) if knn_s else None,
            commands=[
                "crlf extract --ckpt runs/eager/encoder.safetensors --data folder --data-dir DIR "
                "--split train --out train.npy (and --split test)",
                "crlf linear-eval --train-emb train.npy --test-emb test.npy",
                "crlf knn-eval --train-emb train.npy --test-emb test.npy",
            ],
        )
        return result

    def torchrun(self, cap: float) -> dict[str, Any]:
        """torchrun --nproc-per-node 1 against the plain eager run: images/s within 3%, the same losses."""
        options = self.pretrain_options()
        plain = self.results["stages"].get("e2e_eager", {})
        if "losses" not in plain:
            plain, _ = self.pretrain("plain")
        flags = pretrain_command({**options, "out": str(self.work / "torchrun")}).split()[2:]
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "1",
            "-m",
            "crlf",
            "pretrain",
            *flags,
            "--quiet",
        ]
        rc, _, seconds = run_command(cmd, cap)
        rows = metrics(self.work / "torchrun")
        losses = [m["loss"] for m in rows]
        ips = [m["images_per_s"] for m in rows]
        diff = max((abs(a - b) / max(abs(b), 1e-12) for a, b in zip(losses, plain["losses"])), default=None)
        ratio = ips[-1] / plain["images_per_s"][-1] if ips and plain.get("images_per_s") else None
        return {
            "command": "torchrun --standalone --nproc-per-node 1 -m crlf pretrain " + " ".join(flags[:-2]),
            "exit": rc,
            "wall_s": round(seconds, 2),
            "images_per_s": ips,
            "losses": losses,
            "plain_losses": plain["losses"],
            "max_rel_loss_diff": diff,
            "last_epoch_ratio_to_plain": round(ratio, 4) if ratio else None,
            "within_3_percent": bool(ratio and ratio >= 0.97),
        }

    def methods(self, cap: float) -> dict[str, Any]:
        """Two epochs per method (one in smoke), images/s of the last; methods that no longer fit are skipped."""
        t_end = time.perf_counter() + cap
        per: dict[str, Any] = {}
        for name in self.args.methods:
            if per and time.perf_counter() + max(v.get("wall_s", 0) for v in per.values()) > t_end:
                per[name] = {"skipped": "the stage's cap"}
                continue
            try:
                arch = {"arch": VIT_ONLY[name]} if name in VIT_ONLY else {}
                result, _ = self.pretrain(f"method-{name}", method=name, epochs=self.args.method_epochs, **arch)
                per[name] = {k: result[k] for k in ("images_per_s", "losses", "wall_s", "command")}
            except Exception as e:
                log.exception("method %s failed", name)
                per[name] = {"error": f"{type(e).__name__}: {e}"[:500]}
        return per


def tiny_folder(root: Path) -> Path:
    """A small labelled JPEG folder (3 classes, train 8 / test 4 images each, 8 px) for --smoke."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 8), ("test", 4)):
        for c in ("a", "b", "c"):
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for k in range(n):
                Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(root / split / c / f"{k}.jpg")
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=450.0, help="seconds for everything (default 450)")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "gpu-out"))
    parser.add_argument(
        "--data",
        type=Path,
        default=Path(os.environ.get("CRLF_C10", "/tmp/data/c10")),
        help="CIFAR-10 image folder with train/ and test/ (default $CRLF_C10)",
    )
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--big-batch", type=int, default=1024, help="batch of the e2e_big_batch stage")
    parser.add_argument("--epochs", type=int, default=3, help="epochs of the end-to-end runs")
    parser.add_argument("--compile-epochs", type=int, help="epochs of the compiled run (default: --epochs)")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--limit", type=int, help="train on this many images (default: all)")
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument("--method-epochs", type=int, default=2)
    parser.add_argument("--stages", nargs="+", help="run only these stages (env always runs)")
    parser.add_argument("--fit", type=float, default=0.5, help="run a stage when this share of its cap is left")
    parser.add_argument("--smoke", action="store_true", help="every stage on a CPU, tiny sizes (the test suite)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="crlf-gpu-") as tmp:
        work = Path(tmp)
        os.environ.setdefault("CRLF_CACHE_DIR", str(work / "cache"))  # decoded folders: cached once, for every stage
        if args.smoke:
            args.data, args.batch, args.epochs, args.image_size = tiny_folder(work / "data"), 8, 1, 8
            args.big_batch = 16
            args.methods, args.method_epochs = args.methods if args.methods != METHODS else ["dino"], 1
            os.environ["OMP_NUM_THREADS"] = "1"  # tiny ops on shared cores: one thread is many times faster
            torch.set_num_threads(1)
        handler = logging.FileHandler(args.out / "gpu.log")
        logging.basicConfig(
            level=logging.INFO,
            format="%(asctime)s %(name)s %(message)s",
            handlers=[handler, logging.StreamHandler(sys.stderr)],
        )
        driver = Driver(args, work)
        caps = {
            "e2e_eager": 60,
            "e2e_compile": 130,
            "profile": 40,
            "e2e_big_batch": 45,
            "e2e_compile_graphs": 90,
            "e2e_compile_graphs_augment": 90,
            "throughput": 150,
            "methods": 100,
            "evaluation": 60,
            "torchrun": 50,
        }
        if args.smoke:
            caps = {k: 60 for k in caps}
        stages: dict[str, Callable[[float], dict[str, Any]]] = {
            "e2e_eager": driver.e2e(False),
            "e2e_compile": driver.e2e(True),
            "profile": driver.profile,
            "e2e_big_batch": driver.big_batch,
            "e2e_compile_graphs": driver.compiled(augmentation=False),
            "e2e_compile_graphs_augment": driver.compiled(augmentation=True),
            "throughput": driver.throughput,
            "methods": driver.methods,
            "evaluation": driver.evaluation,
            "torchrun": driver.torchrun,
        }
        driver.stage("env", 10, driver.env)
        for name, fn in stages.items():
            if args.stages and name not in args.stages:
                continue
            driver.stage(name, caps[name], fn)
        log.info("done in %.0f s: %s", time.perf_counter() - driver.t0, args.out / "results.json")


if __name__ == "__main__":
    main()
