"""The throughput benchmark runs end to end on a CPU at toy sizes (its numbers are for docs, never asserted)."""

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "throughput.py"


def test_throughput_benchmark_runs_every_variant_on_cpu(tmp_path):
    out = tmp_path / "tp.json"
    r = subprocess.run(
        [
            sys.executable,
            SCRIPT,
            "--device",
            "cpu",
            "--batch-sizes",
            "16",
            "--modes",
            "eager",
            "--steps",
            "2",
            "--warmup",
            "1",
            "--images",
            "64",
            "--epochs",
            "1",
            "--image-size",
            "16",
            "--workers",
            "0",
            "--json",
            out,
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr
    rows = json.loads(out.read_text())["rows"]
    assert [row["variant"] for row in rows] == ["floor", "crlf", "torchvision", "augment"]
    assert all("error" not in row and row["images_per_s"] > 0 for row in rows), rows
    assert {"of_floor", "seconds_per_epoch", "tflops"} <= set(rows[1]) and "speedup" in rows[3]
    assert "images/s" in r.stdout and "floor" in r.stdout


def test_stream_benchmark_smoke_runs_every_variant_on_cpu(tmp_path):
    out = tmp_path / "stream.json"
    script = Path(__file__).parents[1] / "benchmarks" / "stream.py"
    r = subprocess.run([sys.executable, script, "--smoke", "--device", "cpu", "--folder", tmp_path / "jpegs", "--json",
                        out], capture_output=True, text=True, timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stderr
    rows = json.loads(out.read_text())["rows"]
    assert [row["variant"] for row in rows] == ["model alone (floor)", "crlf stream",
                                                "crlf stream, main process augments", "crlf stream, device JPEG decode",
                                                "torchvision ImageFolder + DataLoader"]  # fmt: skip
    assert all(row["cpu_ms_per_image"] > 0 for row in rows)
    assert all(row["images_per_s"] > 0 and 0 < row["device_busy"] <= 1 for row in rows)


def test_gpu_driver_smoke_runs_every_stage_on_cpu(tmp_path):
    """benchmarks/gpu.py --smoke: every stage of the GPU measurement runs (tiny, CPU) and writes its few files."""
    script = Path(__file__).parents[1] / "benchmarks" / "gpu.py"
    r = subprocess.run([sys.executable, script, "--smoke", "--out", tmp_path], capture_output=True, text=True,
                       timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    stages = json.loads((tmp_path / "results.json").read_text())["stages"]
    expected = ["env", "e2e_eager", "e2e_compile", "profile", "e2e_big_batch", "e2e_compile_graphs",
                "e2e_compile_graphs_augment", "throughput", "methods", "evaluation", "torchrun"]
    assert list(stages) == expected
    assert not [name for name, s in stages.items() if "error" in s or "skipped" in s], stages
    assert stages["e2e_eager"]["images_per_s"][0] > 0 and stages["torchrun"]["max_rel_loss_diff"] < 1e-4
    assert set(stages["profile"]["epoch_shares"]) == {"augment", "forward", "loss", "backward", "optimizer",
                                                      "checkpoint"} and stages["profile"]["top_kernels"]  # fmt: skip
    assert stages["profile"]["unsynced_step_ms"] > 0 and stages["profile"]["kernel_ms_per_step"] > 0
    assert "--batch-size 16" in stages["e2e_big_batch"]["command"] and stages["e2e_big_batch"]["images_per_s"][0] > 0
    assert "--compile" in stages["e2e_compile_graphs"]["command"] and stages["e2e_compile_graphs"]["losses"]
    assert 0 <= stages["evaluation"]["linear_top1"] <= 100 and stages["evaluation"]["knn_every_10_share"] > 0
    assert "images_per_s" in stages["methods"]["dino"], stages["methods"]
    files = list(tmp_path.iterdir())
    assert len(files) <= 8 and all(f.stat().st_size < 16 * 2**20 for f in files)
    assert {"results.json", "gpu.log", "profile.txt", "throughput.json"} <= {f.name for f in files}


def test_accuracy_sweep_smoke_runs_two_configurations_at_once_on_cpu(tmp_path):
    """benchmarks/accuracy.py --smoke --sweep: pretrain + linear + kNN per configuration, two processes at once."""
    script = Path(__file__).parents[1] / "benchmarks" / "accuracy.py"
    r = subprocess.run([sys.executable, script, "--smoke", "--sweep", "ablation", "--max-configs", "2", "--parallel",
                        "2", "--out", tmp_path], capture_output=True, text=True, timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert [row["name"] for row in rows] == ["baseline", "lr x0.5"]
    assert all(0 <= row["linear_top1"] <= 100 and 0 <= row["knn_top1"] <= 100 and row["commit"] for row in rows)
    assert rows[1]["commands"][0].startswith("crlf pretrain") and "--lr 0.24" in rows[1]["commands"][0]
    assert "| baseline |" in (tmp_path / "accuracy.md").read_text()


def test_augmentation_fidelity_smoke_compares_every_measure(tmp_path):
    script = Path(__file__).parents[1] / "benchmarks" / "augfidelity.py"
    out = tmp_path / "aug.json"
    r = subprocess.run([sys.executable, script, "--smoke", "--json", out], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = {row["measure"]: row for row in json.loads(out.read_text())["rows"]}
    assert {"crop area (16 px)", "crop area (224 px)", "jitter hue_shift", "grayscale rate (p 0.2)"} <= set(rows)
    assert 0 <= rows["jitter luma_mean_ratio"]["ks"] <= 1 and "torchvision_fixed_order" in rows["jitter hue_shift"]


def test_accuracy_sweeps_join_with_commas_each_row_once():
    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    import accuracy

    names = [name for name, _ in accuracy.sweep("seed,ablation", 10, 2.0)]
    assert names[:3] == ["baseline", "seed recipe (examples/seed.toml)", "lr x0.5"]
    assert len(names) == len(set(names)) == len(accuracy.sweep("ablation", 10, 2.0)) + 1


def test_export_benchmark_smoke_measures_every_variant(tmp_path):
    """benchmarks/export.py --smoke: the exported ONNX / TorchScript files and PyTorch, each batch size."""
    out = tmp_path / "export.json"
    script = Path(__file__).parents[1] / "benchmarks" / "export.py"
    r = subprocess.run([sys.executable, script, "--smoke", "--json", out], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(row["batch"], row["variant"]) for row in rows] == [
        (b, v) for b in (1, 4) for v in ("pytorch", "crlf embed", "onnxruntime", "torchscript")]
    assert all(row["images_per_s"] > 0 for row in rows)


def test_memory_benchmark_smoke_measures_each_configuration(tmp_path):
    out = tmp_path / "memory.json"
    script = Path(__file__).parents[1] / "benchmarks" / "memory.py"
    r = subprocess.run([sys.executable, script, "--smoke", "--device", "cpu", "--json", out], capture_output=True,
                       text=True, timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stderr
    rows = json.loads(out.read_text())["rows"]
    assert [(row["micro_batch"], row["activation_checkpointing"]) for row in rows] == [(0, False), (4, True)]
    assert all("error" not in row and row["peak_gb"] > 0 and row["images_per_s"] > 0 for row in rows), rows
    assert "of_full_batch" in rows[1] and "images/s" in r.stdout
