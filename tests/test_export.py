"""crlf export: ONNX and TorchScript files give crlf extract's rows (the preprocessing inside, any batch and image
size), the Hugging Face folder loads back through crlf and timm, and what cannot be done is one line, exit 2."""

import json
import sys

import numpy as np
import onnxruntime
import pytest
import torch
from inprocess import run_crlf

from crlf import load_encoder
from crlf.engine import backbones
from crlf.engine.encoder import Encoder

FAMILIES = {"resnet": ("resnet18", "cifar"), "vit": ("vit_tiny", "auto"), "timm": ("timm:test_resnet", "auto")}


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    """One random 16 px encoder file per backbone family (a ResNet with the CIFAR stem, a ViT, a timm model), each
    with its own normalisation, and 6 images at its size."""
    root = tmp_path_factory.mktemp("encoders")
    paths = {}
    for i, (family, (arch, stem)) in enumerate(FAMILIES.items()):
        torch.manual_seed(i)
        spec = backbones.spec_for(arch, 16, stem)
        mean, std = [0.5, 0.4 + 0.1 * i, 0.3], [0.25, 0.2, 0.3 - 0.05 * i]
        config = {"method": "byol", "data": "npy", "arch": arch, "epochs": 3}
        Encoder(backbones.build(spec), spec, mean, std, 3, config).save(paths.setdefault(family, root / f"{i}.st"))
    images = np.random.default_rng(0).integers(0, 256, (6, 16, 16, 3), dtype=np.uint8)
    np.save(root / "images.npy", images)
    return paths, root / "images.npy"


def _extract_rows(ckpt, images, tmp_path) -> np.ndarray:
    r = run_crlf("extract", "--ckpt", ckpt, "--data", "npy", "--data-dir", images, "--out", tmp_path / "rows.npy",
                 "--device", "cpu", "-q")  # fmt: skip
    assert r.returncode == 0, r.stderr
    return np.load(tmp_path / "rows.npy")


def _runner(path, fmt: str):
    """The written file, loaded once, as a function of a batch (onnxruntime on the CPU, torch.jit.load)."""
    if fmt == "onnx":
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return lambda x: session.run(None, {"images": x})[0]
    net = torch.jit.load(str(path))
    return lambda x: net(torch.from_numpy(x)).detach().numpy()


def _export(ckpt, out, *args) -> dict:
    r = run_crlf("export", "--ckpt", ckpt, "--out", out, *args, "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)  # stdout holds the summary alone


@pytest.mark.parametrize("family", list(FAMILIES))
def test_onnx_and_torchscript_give_extracts_rows_for_every_family(family, encoders, tmp_path):
    paths, images = encoders
    rows = _extract_rows(paths[family], images, tmp_path)
    pixels = np.load(images)
    floats = np.ascontiguousarray(pixels.transpose(0, 3, 1, 2)).astype(np.float32) / 255
    inputs = ("uint8", "float") if family == "vit" else ("float", "uint8")  # each family, both inputs, both formats
    for fmt, input in zip(("onnx", "torchscript"), inputs):
        out = tmp_path / f"{fmt}-{input}"
        done = _export(paths[family], out, "--format", fmt, "--input", input)
        assert done["path"] == str(out) and done["max_diff"] < 1e-4 and done["bytes"] == out.stat().st_size
        assert done["opset"] == (18 if fmt == "onnx" else None) and done["input"] == input
        x = pixels if input == "uint8" else floats
        run = _runner(out, fmt)
        got = run(x)
        assert got.shape == rows.shape and np.abs(got - rows).max() < 1e-4, (fmt, input)
        assert np.abs(run(x[:1]) - rows[:1]).max() < 1e-4  # another batch size
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left


def test_other_image_sizes_are_resized_as_embed_resizes_them(encoders, tmp_path):
    """A 24 x 20 float batch: the centre square resized with antialiasing, as Encoder.embed does for tensors."""
    paths, _ = encoders
    out = tmp_path / "r.onnx"
    _export(paths["timm"], out, "--input", "float")
    encoder = load_encoder(paths["timm"])
    for x in (torch.rand(3, 3, 24, 20, generator=torch.Generator().manual_seed(3)), torch.rand(2, 3, 10, 12)):
        want = encoder.embed(x, precision="fp32").numpy()  # downscaled, then upscaled
        assert np.abs(_runner(out, "onnx")(x.numpy()) - want).max() < 1e-4


def test_hf_folder_loads_back_through_crlf_and_timm_with_the_run_on_its_card(encoders, tmp_path):
    import timm

    paths, images = encoders
    run = tmp_path / "run"
    run.mkdir()
    (run / "encoder.safetensors").write_bytes(paths["timm"].read_bytes())
    (run / "config.json").write_text(json.dumps({"method": "byol", "data": "npy", "epochs": 3}))
    (run / "linear_eval.json").write_text(json.dumps({"protocol": "linear", "data": "npy test", "top1": 0.4321,
                                                      "top5": 0.9, "runs": []}))  # fmt: skip
    out = tmp_path / "hub"
    done = _export(run, out, "--format", "hf")
    assert done["files"] == ["model.safetensors", "config.json", "README.md"] and done["max_diff"] == 0.0
    original, loaded = load_encoder(paths["timm"]), load_encoder(out)
    x = torch.from_numpy(np.load(images)).permute(0, 3, 1, 2).contiguous()
    assert torch.equal(loaded.features(x), original.features(x))
    assert (loaded.mean, loaded.std, loaded.spec) == (original.mean, original.std, original.spec)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architecture"] == "test_resnet" and cfg["pretrained_cfg"]["input_size"] == [3, 16, 16]
    card = (out / "README.md").read_text()
    assert "| linear | npy test | 0.4321 | 0.9000 |" in card and "byol" in card and "local-dir:" in card
    mean, std = original.normaliser(torch.device("cpu"))
    for net in (timm.create_model(f"local-dir:{out}", pretrained=True),
                timm.create_model("test_resnet", pretrained=True, num_classes=0,
                                  pretrained_cfg_overlay={"file": str(out / "model.safetensors")})):  # fmt: skip
        with torch.no_grad():
            assert torch.allclose(net.eval()((x.float() / 255 - mean) / std), original.features(x), atol=1e-5)
    again = run_crlf("export", "--ckpt", paths["vit"], "--out", out, "--format", "hf")
    assert again.returncode == 2 and "--force" in again.stderr and load_encoder(out).arch == "timm:test_resnet"
    _export(paths["vit"], out, "--format", "hf", "--force")
    assert load_encoder(out).arch == "vit_tiny" and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    rows = _extract_rows(out, images, tmp_path)  # extract reads the folder too
    assert np.array_equal(rows, load_encoder(paths["vit"]).features(x).numpy())


def _one_line_exit_2(r, *words):
    assert r.returncode == 2 and r.stdout == "" and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "Traceback" not in r.stderr and all(w in r.stderr for w in words), r.stderr


def test_missing_onnxruntime_is_one_line_naming_the_extra(encoders, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime -> ImportError
    r = run_crlf("export", "--ckpt", encoders[0]["resnet"], "--out", tmp_path / "r.onnx")
    _one_line_exit_2(r, 'pip install "crlf[onnx]"', "onnxruntime")
    assert list(tmp_path.iterdir()) == []


def test_a_model_that_does_not_export_is_one_line_and_nothing_is_written(encoders, tmp_path, monkeypatch):
    """A backbone with an FFT (as GFNet-style models have): torch's ONNX exporter has no complex numbers."""
    from timm.models.resnet import ResNet

    forward = ResNet.forward
    monkeypatch.setattr(ResNet, "forward", lambda self, x: forward(self, torch.fft.rfft2(x).abs()[..., : x.shape[-1]]))
    r = run_crlf("export", "--ckpt", encoders[0]["timm"], "--out", tmp_path / "r.onnx")
    _one_line_exit_2(r, "timm:test_resnet encoder does not export to ONNX")
    assert list(tmp_path.iterdir()) == []
    r = run_crlf("export", "--ckpt", encoders[0]["timm"], "--out", tmp_path / "r.pt", "--format", "torchscript",
                 "--opset", "30")  # fmt: skip
    _one_line_exit_2(r, "opset")
