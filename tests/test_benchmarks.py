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
    assert [row["variant"] for row in rows] == ["model alone (floor)", "crlf stream", "crlf stream, device JPEG decode",
                                                "torchvision ImageFolder + DataLoader"]  # fmt: skip
    assert all(row["images_per_s"] > 0 and 0 < row["device_busy"] <= 1 for row in rows)
