"""The index.html of ``crlf visualize --run``: one static page with a run's figures, how and where it trained, its
final metrics, its evaluation results and its settings."""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

import torch

from crlf import __version__
from crlf.engine.files import atomic_write
from crlf.engine.rundir import RunDir


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, s = divmod(round(seconds), 60)
    return f"{minutes} min {s:02d} s" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


def run_facts(config: dict[str, Any], metrics: list[dict[str, Any]]) -> dict[str, str]:
    """How long, where and with what the run trained: config.json's "resolved" block when it has one (device,
    precision, versions, command, commit), else the settings; the training time is the sum of the epochs' seconds."""
    resolved = config.get("resolved") if isinstance(config.get("resolved"), dict) else {}
    facts: dict[str, Any] = {}
    if metrics:
        facts["epochs"] = f"{metrics[-1].get('epoch', len(metrics))} of {config.get('epochs', '?')}"
        facts["training time"] = _duration(sum(float(m.get("seconds") or 0) for m in metrics))
    if resolved.get("device"):
        name = resolved.get("device_name")
        shown = name and name != resolved["device"]
        facts["device"] = f"{resolved['device']} ({name})" if shown else resolved["device"]
    elif config.get("device"):
        facts["device"] = f"{config['device']} (as set; the device used was not recorded)"
    facts["precision"] = resolved.get("precision") or config.get("precision")
    facts["processes"] = resolved.get("world_size") if (resolved.get("world_size") or 1) > 1 else None
    facts["trained with"] = ", ".join(f"{k} {resolved[k]}" for k in ("crlf", "torch", "python") if resolved.get(k))
    facts["command"] = resolved.get("command")
    facts["git commit"] = resolved.get("git_commit")
    facts["figures drawn with"] = f"crlf {__version__}, torch {torch.__version__}"
    return {k: str(v) for k, v in facts.items() if v not in (None, "")}


def write_index(run: RunDir, folder: Path, figures: dict[str, dict[str, Any]], map_section: str = "") -> Path:
    """One static page in `folder`: the figures, `map_section` (mapview.static_map's HTML, or ""), the run's settings
    and its final metrics and evaluation results."""
    esc = html.escape
    config = run.saved_config()
    try:
        metrics = run.read_metrics()
    except ValueError:
        metrics = []
    final = metrics[-1] if metrics else {}
    evals = {}
    for name in ("linear_eval", "knn_eval"):
        path = run.path / f"{name}.json"
        if path.is_file():
            try:
                evals[name] = json.loads(path.read_text())
            except ValueError:
                pass

    def table(rows: dict[str, Any]) -> str:
        shown = {k: f"{v:.6g}" if isinstance(v, float) else str(v) for k, v in rows.items()}  # lr 0.0108571428...
        cells = "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in shown.items())
        return f"<table>{cells}</table>"

    results = {
        f"{name.replace('_', ' ')} top-1 / top-5": (
            f"{r.get('top1', float('nan')):.2f}% / {r.get('top5', float('nan')):.2f}%"
        )
        for name, r in evals.items()
    }
    settings = {k: v for k, v in config.items() if k != "resolved"}
    images = "".join(
        f'<figure><img src="{esc(Path(f["path"]).name)}" alt="{esc(kind)}">'
        f"<figcaption>{esc(kind)}</figcaption></figure>"
        for kind, f in figures.items()
    )
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>crlf run {esc(run.path.name)}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1200px}} img{{max-width:100%;border:1px solid #ddd}}
table{{border-collapse:collapse;margin-bottom:1.5em}} th,td{{text-align:left;padding:2px 12px 2px 0;font-size:14px}}
figure{{margin:0 0 2em 0}} figcaption{{color:#555}}</style></head>
<body><h1>Run {esc(run.path.name)}</h1>
<h2>Run</h2>{table(run_facts(config, metrics))}
<h2>Final metrics</h2>{table({**final, **results}) if final or results else "<p>no metrics yet</p>"}
<h2>Figures</h2>{images or "<p>no figures</p>"}
{map_section}
<h2>Settings</h2>{table(settings) if settings else "<p>no config.json</p>"}
</body></html>
"""
    path = folder / "index.html"
    atomic_write(path, lambda f: f.write(page.encode()))
    return path
