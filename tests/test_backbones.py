"""Backbones (ResNets, ViTs, timm), the projection head, the optimizer's weight-decay groups, and the Encoder object:
save / load / embed equal to ``crlf extract``."""

import os
import sys

import numpy as np
import pytest
import torch
from inprocess import run_crlf
from PIL import Image
from safetensors.torch import load_file
from torch import nn
from torchvision import models

from crlf import PretrainSettings, load_encoder, pretrain
from crlf.catalog import ARCHS as BUILTIN_ARCHS
from crlf.commands.pretrain import resolve as method_defaults
from crlf.engine import backbones, methods
from crlf.engine.backbones.resnet import resolve_stem
from crlf.engine.heads import build_head
from crlf.engine.loss import nt_xent
from crlf.engine.optim import LARS, build_optimizer
from crlf.errors import InputError, short_reason
from crlf.typed import config_of

timm = pytest.importorskip("timm")  # in the dev extra: skipped only where crlf[timm] is not installed


def build(arch, size=32, stem="auto", patch=None):
    return backbones.build(backbones.spec_for(arch, size, stem, patch))


# --- ResNets -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size,stem", [(8, "cifar"), (32, "cifar"), (64, "cifar"), (65, "imagenet"), (96, "imagenet")])
def test_auto_stem(size, stem):
    assert resolve_stem("auto", size) == stem
    assert resolve_stem("imagenet", 32) == "imagenet"
    assert backbones.spec_for("resnet18", size).stem == stem


def test_cifar_stem_keeps_resolution():
    net = build("resnet18", stem="cifar")
    assert net.conv1.kernel_size == (3, 3) and net.conv1.stride == (1, 1)
    assert isinstance(net.maxpool, nn.Identity)
    feats = net.layer1(net.maxpool(net.relu(net.bn1(net.conv1(torch.randn(2, 3, 32, 32))))))
    assert feats.shape[-1] == 32  # no downsampling before layer2


@pytest.mark.parametrize("arch", ["resnet18", "resnet34", "resnet50"])
def test_feature_dims_and_torchvision_keys(arch):
    spec = backbones.spec_for(arch, 64, "imagenet")
    net = backbones.build(spec)
    out = net.eval()(torch.randn(1, 3, 64, 64))
    assert out.shape == (1, spec.feature_dim) == (1, {"resnet50": 2048}.get(arch, 512))
    # the keys load into a plain torchvision model of the same architecture (minus its classifier)
    plain = getattr(models, arch)(weights=None)
    missing, unexpected = plain.load_state_dict(net.state_dict(), strict=False)
    assert set(missing) == {"fc.weight", "fc.bias"} and not unexpected


def test_every_builtin_arch_has_a_family_and_unknown_names_are_refused():
    assert all(backbones.family_of(a).owns(a) for a in BUILTIN_ARCHS)
    with pytest.raises(InputError, match="unknown --arch 'vgg'"):
        backbones.spec_for("vgg", 32)
    with pytest.raises(ValueError, match="unknown arch 'vgg'.*did you mean|unknown arch 'vgg'"):
        PretrainSettings(arch="vgg")
    with pytest.raises(ValueError, match="did you mean 'vit_tiny'"):
        PretrainSettings(arch="vit_tiyn")
    assert PretrainSettings(arch="timm:convnext_atto").arch == "timm:convnext_atto"


# --- ViTs ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size,patch", [(8, 4), (32, 4), (48, 4), (64, 8), (96, 16), (224, 16)])
def test_vit_patch_size_follows_the_image_size(size, patch):
    spec = backbones.spec_for("vit_small", size)
    assert spec.patch_size == patch and spec.feature_dim == 384 and spec.stem is None


def test_vit_refuses_patches_that_do_not_tile_the_image():
    with pytest.raises(InputError, match="4 px patches do not tile 18 px"):
        backbones.spec_for("vit_tiny", 18)
    assert backbones.spec_for("vit_tiny", 18, patch_size=6).patch_size == 6


def test_vit_loads_into_plain_torchvision_and_takes_other_sizes():
    torch.manual_seed(0)
    spec = backbones.spec_for("vit_tiny", 16)
    net = backbones.build(spec).eval()
    x = torch.randn(2, 3, 16, 16)
    out = net(x)
    assert out.shape == (2, 192)
    # what the README shows: torchvision alone rebuilds it from the spec's words
    plain = models.VisionTransformer(image_size=16, patch_size=4, num_layers=12, num_heads=3, hidden_dim=192,
                                     mlp_dim=768)  # fmt: skip
    plain.heads = nn.Identity()
    plain.load_state_dict(net.state_dict(), strict=True)
    assert torch.allclose(plain.eval()(x), out, atol=1e-5)
    assert "VisionTransformer(image_size=16, patch_size=4" in spec.family.plain_code(spec)
    # other sizes: position embeddings interpolated (DINO's local crops); the native size is untouched
    assert net(torch.randn(2, 3, 8, 8)).shape == (2, 192) and net(torch.randn(1, 3, 24, 32)).shape == (1, 192)
    with pytest.raises(InputError, match="multiples of 4"):
        net(torch.randn(1, 3, 10, 10))


def _no_decay_names(model, optimizer):
    names = {id(p): n for n, p in model.named_parameters()}
    decay, keep = optimizer.param_groups
    return {names[id(p)] for p in keep["params"]}, {names[id(p)] for p in decay["params"]}, keep, decay


def test_vit_optimizer_groups_spare_norms_biases_position_embedding_and_class_token():
    settings = method_defaults(PretrainSettings(arch="vit_tiny", head_hidden=32, head_out=16))
    assert settings.optimizer == "adamw" and settings.resolved_weight_decay == 0.05
    spec = backbones.spec_for("vit_tiny", 8)
    net = backbones.build(spec)
    model = methods.SimCLR(net, config_of(methods.SimCLRConfig, settings), spec.feature_dim)
    no_decay = {f"backbone.{n}" for n in backbones.no_weight_decay(spec, net)}
    opt = build_optimizer(model, settings.optimizer, settings.resolved_lr, settings.resolved_weight_decay, no_decay)
    kept, decayed, keep, decay = _no_decay_names(model, opt)
    assert isinstance(opt, torch.optim.AdamW) and keep["weight_decay"] == 0 and decay["weight_decay"] == 0.05
    expected = {n for n, p in model.named_parameters() if p.ndim == 1} | {
        "backbone.class_token",
        "backbone.encoder.pos_embedding",
    }
    assert kept == expected
    assert "backbone.conv_proj.weight" in decayed and "backbone.encoder.layers.encoder_layer_0.mlp.0.weight" in decayed
    assert kept.isdisjoint(decayed) and len(kept) + len(decayed) == len(list(model.parameters()))


def test_lars_neither_adapts_nor_decays_the_spared_group():
    w, pos = nn.Parameter(torch.ones(4, 4)), nn.Parameter(torch.ones(1, 3, 4))
    opt = LARS([{"params": [w], "weight_decay": 0.1}, {"params": [pos], "weight_decay": 0.0, "adapt": False}], lr=1.0)
    w.grad, pos.grad = torch.full((4, 4), 0.5), torch.full((1, 3, 4), 0.5)
    opt.step()
    assert torch.allclose(pos, torch.full_like(pos, 0.5))  # plain SGD step: 1 - lr * grad
    assert not torch.allclose(w, torch.full_like(w, 0.5))  # scaled by the trust ratio


def test_family_defaults_come_before_the_methods_and_the_user_before_both():
    assert method_defaults(PretrainSettings(arch="vit_small", method="barlow")).optimizer == "adamw"
    assert method_defaults(PretrainSettings(arch="resnet18", method="barlow")).optimizer == "lars"
    assert method_defaults(PretrainSettings(arch="vit_small", optimizer="sgd")).optimizer == "sgd"
    assert PretrainSettings(optimizer="adamw", batch_size=512).resolved_lr == pytest.approx(1e-3)


# --- timm ----------------------------------------------------------------------------------------------------------
def test_timm_spec_discovers_the_width_and_the_image_size_argument():
    vit = backbones.spec_for("timm:test_vit", 16)
    cnn = backbones.spec_for("timm:test_convnext", 32)
    assert vit.kwargs == {"img_size": 16} and vit.feature_dim == 64
    assert cnn.kwargs == {} and cnn.feature_dim == backbones.build(cnn).eval()(torch.zeros(1, 3, 32, 32)).shape[1]
    names = backbones.no_weight_decay(vit, backbones.build(vit))
    assert {"cls_token", "pos_embed"} <= names
    with pytest.raises(InputError, match="has no model 'no_such_net'"):
        backbones.spec_for("timm:no_such_net", 32)
    with pytest.raises(InputError, match="cannot take 16 px images") as info:
        backbones.spec_for("timm:test_convnext", 16)
    assert "Kernel size can't be greater than actual input size)" in str(info.value)  # timm's line, not cut


@pytest.mark.parametrize("arch", ["timm:hf-hub:timm/resnet18.a1_in1k", "timm:local-dir:/tmp/x", "timm:../../etc",
                                  "timm:..", "timm:a/b", "timm:x\\y"])
def test_timm_takes_plain_model_names_only(arch):
    for make in (lambda: backbones.spec_for(arch, 32), lambda: backbones.build(backbones.BackboneSpec(arch, 32, 8))):
        with pytest.raises(InputError, match="not a plain timm model name") as info:
            make()
        assert "\n" not in str(info.value)


def test_timm_builds_with_the_hub_offline_and_no_pretrained_weights(monkeypatch):
    import huggingface_hub.constants as hub

    seen = []
    real = timm.create_model

    def create_model(name, **kwargs):
        seen.append((name, kwargs["pretrained"], os.environ.get("HF_HUB_OFFLINE"), hub.HF_HUB_OFFLINE))
        return real(name, **kwargs)

    monkeypatch.setattr(timm, "create_model", create_model)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", False)
    backbones.build(backbones.spec_for("timm:test_vit", 16))
    assert seen and all(s == ("test_vit", False, "1", True) for s in seen)
    assert "HF_HUB_OFFLINE" not in os.environ and hub.HF_HUB_OFFLINE is False  # restored


def test_timm_errors_are_cut_between_words():
    assert short_reason(ValueError("short\nsecond line")) == "short"
    cut = short_reason(ValueError("Kernel size can't be greater than actual input size"), limit=30)
    assert cut == "Kernel size can't be..." and len(cut) <= 30
    assert short_reason(RuntimeError("")) == "RuntimeError"


def test_without_timm_the_cli_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm -> ImportError
    r = run_crlf("pretrain", "--data", "digits", "--arch", "timm:test_vit", "--out", tmp_path / "r", "--epochs", 1)
    assert r.returncode == 2 and 'pip install "crlf[timm]"' in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "r").exists()


# --- pretrain, save, load, extract, embed ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two-step runs of a ViT and a timm ViT on 64 digits at 8 / 16 px (module-scoped: each trains once)."""
    root = tmp_path_factory.mktemp("backbones")
    out = {}
    for arch, size in (("vit_tiny", 8), ("timm:test_vit", 16)):
        settings = PretrainSettings(data="digits", limit=64, image_size=size, batch_size=32, epochs=1, arch=arch,
                                    head_hidden=32, head_out=16, device="cpu", out=root / arch.replace(":", "_"),
                                    cache_dir=root / "cache")  # fmt: skip
        assert pretrain(settings)["status"] == "trained"
        out[arch] = settings.out
    return out


@pytest.mark.parametrize("arch", ["vit_tiny", "timm:test_vit"])
def test_pretrain_save_load_extract(runs, arch, tmp_path):
    run = runs[arch]
    encoder = load_encoder(run / "encoder.safetensors")
    assert encoder.arch == arch and encoder.spec.family.name == ("vit" if arch == "vit_tiny" else "timm")
    r = run_crlf("extract", "--ckpt", run / "encoder.safetensors", "--data", "digits", "--split", "test",
                 "--limit", 20, "--device", "cpu", "--out", tmp_path / "e.npy")  # fmt: skip
    assert r.returncode == 0, r.stderr
    rows = np.load(tmp_path / "e.npy")
    assert rows.shape == (20, encoder.feature_dim) and np.isfinite(rows).all()
    # the weights load into the plain library model, as the README shows
    weights = load_file(run / "encoder.safetensors")
    if arch == "vit_tiny":
        plain = models.VisionTransformer(image_size=8, patch_size=4, num_layers=12, num_heads=3, hidden_dim=192,
                                         mlp_dim=768)  # fmt: skip
        plain.heads = nn.Identity()
    else:
        plain = timm.create_model("test_vit", num_classes=0, img_size=16)
    plain.load_state_dict(weights, strict=True)
    x = torch.rand(3, 3, encoder.image_size, encoder.image_size)
    assert torch.allclose(plain.eval()(x), encoder.backbone(x), atol=1e-5)


def test_a_changed_backbone_is_refused_on_resume(runs, tmp_path):
    r = run_crlf("pretrain", "--data", "digits", "--limit", 64, "--image-size", 8, "--batch-size", 32, "--epochs", 2,
                 "--arch", "vit_tiny", "--patch-size", 2, "--out", runs["vit_tiny"], "--resume")  # fmt: skip
    assert r.returncode == 2 and "patch_size" in r.stderr


def _images(tmp_path):
    """Six files of several sizes, modes and formats (JPEG included: its reduced-scale decode must match too)."""
    rng = np.random.default_rng(3)
    paths = []
    for i, (w, h) in enumerate([(40, 30), (16, 16), (25, 50), (64, 48), (9, 33), (100, 80)]):
        im = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        path = tmp_path / "imgs" / "c" / f"{i}.{'jpg' if i % 2 else 'png'}"
        path.parent.mkdir(parents=True, exist_ok=True)
        (im.convert("L") if i == 4 else im).save(path)
        paths.append(path)
    return paths


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_encoder_embed_equals_extract_for_paths_pil_images_and_arrays(reference_run, tmp_path, precision):
    encoder = load_encoder(reference_run.path / "encoder.safetensors")
    paths = _images(tmp_path)
    r = run_crlf("extract", "--ckpt", reference_run.path / "encoder.safetensors", "--data", "folder", "--data-dir",
                 tmp_path / "imgs", "--device", "cpu", "--precision", precision, "--cache-dir", tmp_path / "cache",
                 "--out", tmp_path / "folder.npy")  # fmt: skip
    assert r.returncode == 0, r.stderr
    extracted = torch.from_numpy(np.load(tmp_path / "folder.npy"))
    order = [str(p.relative_to(tmp_path / "imgs")) for p in paths]
    ids = __import__("json").loads((tmp_path / "folder.npy.json").read_text())["ids"]
    rows = extracted[[ids.index(i) for i in order]]
    assert torch.equal(encoder.embed(paths, precision=precision), rows)
    assert torch.equal(encoder.embed([str(p) for p in paths], batch_size=4, precision=precision), rows)
    assert torch.equal(encoder.embed([Image.open(p) for p in paths], precision=precision), rows)
    # a batch of one: the same preprocessing, only the float sums of another batch size
    tol = {"rtol": 1e-5, "atol": 1e-3} if precision == "fp32" else {"rtol": 0.05, "atol": 1.0}
    assert torch.allclose(encoder.embed(Image.open(paths[2]), precision=precision), rows[2:3], **tol)
    # arrays go the npy source's way: (N, H, W, 3) uint8 at another size, center-cropped and resized
    arr = np.random.default_rng(4).integers(0, 256, (12, 20, 14, 3), dtype=np.uint8)
    np.save(tmp_path / "a.npy", arr)
    r = run_crlf("extract", "--ckpt", reference_run.path / "encoder.safetensors", "--data", "npy", "--data-dir",
                 tmp_path / "a.npy", "--device", "cpu", "--precision", precision,
                 "--out", tmp_path / "a_emb.npy")  # fmt: skip
    assert r.returncode == 0, r.stderr
    from_file = torch.from_numpy(np.load(tmp_path / "a_emb.npy"))
    assert torch.equal(encoder.embed(arr, precision=precision), from_file)
    assert torch.equal(encoder.embed(list(arr), precision=precision), from_file)
    assert torch.allclose(encoder.embed(arr[0], precision=precision), from_file[:1], **tol)
    # transform: the same preprocessing, one image at a time, for a user's own DataLoader
    batch = torch.stack([encoder.transform(p) for p in paths])
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16"):
        direct = encoder.backbone.eval()(batch).float()
    assert torch.equal(direct, rows)


def test_precision_reaches_the_embedding(reference_run, tmp_path):
    encoder = load_encoder(reference_run.path / "encoder.safetensors")
    x = torch.randint(0, 256, (4, 3, encoder.image_size, encoder.image_size), dtype=torch.uint8)
    fp32, bf16 = encoder.features(x, precision="fp32"), encoder.features(x, precision="bf16")
    assert not torch.equal(fp32, bf16)  # bf16 rounds: not the same numbers, the same directions
    assert torch.nn.functional.cosine_similarity(fp32, bf16).min() > 0.99


def test_embed_refuses_what_it_cannot_read(reference_run, tmp_path):
    encoder = load_encoder(reference_run.path / "encoder.safetensors")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(InputError, match="cannot read the image .*notes.txt"):
        encoder.embed([tmp_path / "notes.txt"])
    with pytest.raises(InputError, match="uint8 array"):
        encoder.embed(np.zeros((2, 8, 8, 3), np.float32))
    with pytest.raises(InputError, match="cannot embed a dict"):
        encoder.embed({"a": 1})


# --- heads ---------------------------------------------------------------------------------------------------------
def test_head_shapes_and_dropout():
    seed = build_head(512, 256, 64, layers=2, dropout=0.1)
    assert [type(m).__name__ for m in seed] == ["Linear", "BatchNorm1d", "ReLU", "Dropout", "Linear"]
    assert seed(torch.randn(4, 512)).shape == (4, 64)
    deep = build_head(512, 2048, 128, layers=3)
    assert sum(isinstance(m, nn.Linear) for m in deep) == 3
    assert build_head(512, 2048, 128, layers=1)(torch.randn(2, 512)).shape == (2, 128)


def test_simclr_forward_is_the_loss_of_its_projections():
    model = methods.SimCLR(build("resnet18", stem="cifar"), methods.SimCLRConfig(head_hidden=32, head_out=16), 512)
    x1, x2 = torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16)
    z = model.head(model.backbone(torch.cat([x1, x2])))
    assert z.shape == (8, 16) and torch.allclose(model([x1, x2]), nt_xent(z[:4], z[4:], 0.2))
