"""crlf's layers: no import circles, no settings below the command layer, the registry as the one list of names, a
new method as one module (registered here, run from the CLI with its own option), and the library's parts used
around a user's own module."""

import ast
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import crlf
import crlf.options
from crlf.engine import methods, registries
from crlf.engine.methods.base import Method, opt, pair

ROOT = Path(crlf.__file__).parent
# the command layer: the only modules that may import the settings (pydantic) models
COMMAND_LAYER = {"crlf", "crlf.__main__", "crlf.cli", "crlf.flags", "crlf.guard", "crlf.settings", "crlf.options",
                 "crlf.configfile", "crlf.output", "crlf.explore_app"}  # fmt: skip
SETTINGS = {"crlf.settings", "crlf.options", "pydantic", "pydantic_settings", "typer"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """Every crlf module -> the modules it imports anywhere in its code (function-level imports included: one that
    only dodges a circle is still a circle), resolved to crlf modules where they are ones."""
    names = {_module_name(p): p for p in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in names.items():
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                base = node.module if not node.level else ".".join(name.split(".")[: -node.level] + [node.module])
                # `from pkg import module` imports the module; `from module import name` the module itself
                found |= {f"{base}.{a.name}" if f"{base}.{a.name}" in names else base for a in node.names}
        graph[name] = {m for m in found if m != name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one crlf module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_crlf_has_no_import_circle():
    graph = _imports()
    assert _cycles(graph) == []
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]  # the check itself


def test_no_module_below_the_command_layer_imports_the_settings():
    graph = _imports()
    library = [m for m in graph if m not in COMMAND_LAYER and not m.startswith("crlf.commands")]
    assert "crlf.engine.train" in library and "crlf.engine.methods.simclr" in library
    offenders = {m: sorted(graph[m] & SETTINGS) for m in library if graph[m] & SETTINGS}
    assert offenders == {}


def test_the_generated_catalog_is_the_registries():
    """crlf/catalog.py is what the registries say: after adding a method or backbone, regenerate it with
    python -m crlf.engine.registries."""
    assert registries.TARGET.read_text() == registries.render()
    from crlf import catalog

    assert list(catalog.METHODS["methods"]) == list(methods.REGISTRY)
    assert catalog.ARCHS == crlf.engine.backbones.names()
    assert list(catalog.SOURCES) == list(crlf.engine.sources.REGISTRY)
    assert set(crlf.options.DataSettings.model_fields["data"].annotation.__args__) == set(catalog.SOURCES)


# ---- a new method is one module: this one, registered from the test, runs from the CLI with its own option ----------


@dataclass(frozen=True)
class TinyConfig:
    head_out: int = 8
    tiny_weight: float = opt(1.0, "Weight of the tiny test method's loss.", gt=0.0, le=10.0)


class Tiny(Method):
    """A linear head and 1 - cos between the views' projections, times tiny_weight."""

    name = "tiny_test"
    Config = TinyConfig

    def __init__(self, backbone: nn.Module, config: TinyConfig | None = None, feature_dim: int | None = None):
        super().__init__(backbone, config, feature_dim)
        self.head = nn.Linear(self.feature_dim, self.config.head_out)

    def forward(self, views: list[torch.Tensor]) -> torch.Tensor:
        z1, z2 = pair(lambda x: self.head(self.backbone(x)), views)
        return self.config.tiny_weight * (1 - F.cosine_similarity(z1, z2)).mean()


@pytest.fixture
def tiny_method():
    from crlf import cli, configfile, settings

    methods.register(Tiny)
    try:
        yield Tiny
    finally:
        del methods.REGISTRY[Tiny.name]
        commands = configfile.COMMANDS
        commands[:] = [settings.PretrainSettings if c.section == "pretrain" else c for c in commands]
        cli._pretrain_command()


def _main(*args: object) -> int:
    from crlf.cli import main

    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    return e.value.code or 0


def test_a_method_registered_at_run_time_runs_from_the_cli_with_its_own_option(tmp_path, tiny_method, capsys):
    out = tmp_path / "run"
    common = ["--data", "digits", "--limit", 32, "--image-size", 8, "--batch-size", 16, "--epochs", 1, "--device",
              "cpu", "--out", out]  # fmt: skip
    assert _main("pretrain", "--method", "tiny_test", "--tiny-weight", 2.5, *common) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["method"] == "tiny_test" and config["tiny_weight"] == 2.5 and config["head_out"] == 8
    assert (out / "encoder.safetensors").is_file()
    loss = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["loss"]
    assert 0 < loss <= 2.5 * 2  # 1 - cos lies in [0, 2], times the weight the flag gave
    capsys.readouterr()
    assert _main("pretrain", "--method", "tiny_test", "--print-config", "--tiny-weight", 3) == 0
    assert "tiny_weight = 3.0" in capsys.readouterr().out
    assert _main("pretrain", "--method", "tiny_test", "--tiny-weight", 11) == 2  # its bounds, from its config
    assert "tiny-weight" in capsys.readouterr().err


def test_an_option_the_chosen_method_lacks_is_named_in_a_warning(capsys):
    assert _main("pretrain", "--method", "byol", "--queue-size", 16, "--print-config") == 0
    err = capsys.readouterr().err
    assert "--queue-size is not an option of --method byol" in err


# ---- the library's parts around a user's own module ---------------------------------------------------------------


def test_a_method_wraps_any_module_and_reads_its_width_off_a_forward_pass():
    from crlf.engine import augment
    from crlf.engine.methods import SimCLR, SimCLRConfig

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    method = SimCLR(net, SimCLRConfig(temperature=0.2, head_hidden=16, head_out=4))
    assert method.feature_dim == 6 and method.head[-1].out_features == 4
    batch = torch.randint(0, 256, (8, 3, 12, 12), dtype=torch.uint8)
    views = augment.draw(SimCLR.recipe(method.config, augment.Augment(), 12), batch, torch.Generator().manual_seed(0))
    loss = method(views)
    loss.backward()
    assert torch.isfinite(loss) and net[0].weight.grad is not None


def test_pretrain_takes_a_users_module_and_images_and_the_encoder_file_asks_for_the_module(tmp_path):
    from crlf.errors import InputError

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    images = torch.randint(0, 256, (32, 3, 8, 8), dtype=torch.uint8)
    s = crlf.PretrainSettings(epochs=1, batch_size=16, out=tmp_path / "run", device="cpu", head_hidden=16, head_out=4)
    summary = crlf.pretrain(s, backbone=net, data=images)
    assert summary["status"] == "trained"
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (config["arch"], config["data"], config["image_size"]) == ("custom", "tensor", 8)
    with pytest.raises(InputError, match="module of your own"):
        crlf.load_encoder(tmp_path / "run" / "encoder.safetensors")
    twin = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    encoder = crlf.load_encoder(tmp_path / "run" / "encoder.safetensors", backbone=twin)
    assert encoder.backbone is twin and torch.equal(twin[0].weight, net[0].weight.detach())
    assert encoder.embed(images[:4]).shape == (4, 6)
    with pytest.raises(InputError, match="uint8"):
        crlf.pretrain(s.model_copy(update={"out": tmp_path / "bad"}), backbone=net, data=images.float())
    assert not (tmp_path / "bad").exists()


def test_the_readme_library_examples_run(tmp_path, monkeypatch):
    """README's "crlf as a library" section, block by block, as a user would paste it."""
    import re

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text.split("## crlf as a library")[1].split("\n## ")[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 2
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)
    assert namespace["summary"]["status"] == "trained" and (tmp_path / "runs/mine/encoder.safetensors").is_file()
    assert torch.isfinite(namespace["l"]) and namespace["method"].feature_dim == 32
    assert namespace["head"](torch.randn(4, 32)).shape == (4, 64) and namespace["bank"].bank.shape == (1, 4096, 64)
    assert len(namespace["local"].crop_plan(32)) == 6


def test_a_dataset_of_pil_images_and_tensors_with_labels_becomes_the_run_data():
    import numpy as np
    from PIL import Image

    from crlf.commands.pretrain import image_set
    from crlf.engine.encoder import to_batch
    from crlf.errors import InputError

    pil = Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 24, 3), dtype=np.uint8))
    tensor = torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8)
    data = image_set([(pil, 1), (tensor, 0)], None)  # a list is a Dataset: __len__ and __getitem__
    assert data.images.shape == (2, 3, 20, 20) and data.labels.tolist() == [1, 0] and data.class_names == ["0", "1"]
    assert torch.equal(data.images, to_batch([pil, tensor], 20))  # decoded as embed() and extract decode
    assert image_set([pil, tensor], 8).images.shape == (2, 3, 8, 8) and image_set([pil], 8).labels is None
    with pytest.raises(InputError, match="item 1 is a ndarray"):
        image_set([pil, np.zeros((3, 3))], None)
    with pytest.raises(InputError, match="empty"):
        image_set([], None)
