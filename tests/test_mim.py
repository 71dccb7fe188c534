"""Masked image modelling (--method mae): the masking, the encoder on the visible patches only, the loss against its
written-out formula, and a tiny run that learns, resumes exactly, embeds with extract and draws its reconstructions;
--method ibot: its masked-patch loss against the written-out formula, its masks, a tiny run that learns and resumes."""

import json
import math
import os
import signal
import statistics

import numpy as np
import pytest
import torch
from inprocess import run_crlf
from safetensors.torch import load_file
from torch import nn

from crlf import PretrainSettings, load_encoder, pretrain
from crlf.commands.visualize import visualize
from crlf.engine.backbones.tokens import tokens_of
from crlf.engine.backbones.vit import _ViT
from crlf.engine.loss import mae_loss, masked_patch_loss
from crlf.engine.methods.ibot import IBOT, IBOTConfig
from crlf.engine.methods.mae import MAE, MAEConfig, patchify, random_masking, unpatchify
from crlf.engine.rundir import RunDir
from crlf.errors import InputError, Interrupted
from crlf.settings import VisualizeSettings


@pytest.fixture(autouse=True)
def _no_crlf_env(monkeypatch):
    for key in [k for k in os.environ if k.startswith("CRLF_")]:
        monkeypatch.delenv(key)


def tiny_vit(seed: int = 0) -> nn.Module:
    """crlf's ViT at 16 px with 4 px patches (16 patches), two blocks of width 24."""
    torch.manual_seed(seed)
    net = _ViT(image_size=16, patch_size=4, num_layers=2, num_heads=2, hidden_dim=24, mlp_dim=48)
    net.heads = nn.Identity()
    return net


def tiny_timm_vit() -> nn.Module:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    return timm.create_model("test_vit", num_classes=0, img_size=16, patch_size=4)


def tiny_mae(backbone: nn.Module, **options) -> MAE:
    return MAE(backbone, MAEConfig(decoder_width=32, decoder_depth=1, **options))



def _stopped_and_resumed_equals(full, part, losses, signal_at) -> None:
    """`part` stopped by SIGTERM in epoch 2 and resumed ends with `full`'s state and per-epoch losses, bit for bit."""
    with pytest.raises(Interrupted):
        pretrain(part, signal_at(epoch=2, step=1, sig=signal.SIGTERM))
    pretrain(part, resume=True)
    a, b = load_file(str(full.out / "last.safetensors")), load_file(str(part.out / "last.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "the resumed run differs"
    assert losses == [m["loss"] for m in RunDir(part.out).read_metrics()]

def test_the_masking_ratio_holds_per_image_and_a_seed_repeats_the_masks():
    for ratio, kept in ((0.75, 4), (0.5, 8), (0.1, 14), (0.99, 1)):
        keep, mask = random_masking(6, 16, ratio, torch.Generator().manual_seed(1), torch.device("cpu"))
        assert keep.shape == (6, kept) and mask.sum(1).tolist() == [16 - kept] * 6, ratio
        assert not mask.gather(1, keep).any()  # the kept patches are the unmasked ones
    a = random_masking(6, 16, 0.75, torch.Generator().manual_seed(1), torch.device("cpu"))[1]
    b = random_masking(6, 16, 0.75, torch.Generator().manual_seed(1), torch.device("cpu"))[1]
    c = random_masking(6, 16, 0.75, torch.Generator().manual_seed(2), torch.device("cpu"))[1]
    assert torch.equal(a, b) and not torch.equal(a, c) and len({tuple(r) for r in a.tolist()}) > 1  # per image


@pytest.mark.parametrize("kind", ["crlf", "timm"])
def test_the_encoder_sees_the_visible_patches_only(kind):
    """Change a masked patch: the encoder's output is the same; change a visible one: it is not. The normal forward
    (the features extract uses) is the token path's class token."""
    backbone = tiny_vit() if kind == "crlf" else tiny_timm_vit()
    method = tiny_mae(backbone).eval()
    seen = []
    method.decoder.register_forward_hook(lambda mod, inputs, out: seen.append(inputs[0].clone()))
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))

    def encoded(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        method.set_generator(torch.Generator().manual_seed(4))  # the same masks every time
        _, mask = method.predict(images)
        return seen[-1], mask

    latent, mask = encoded(x)
    masked_patch, visible_patch = int(mask[0].nonzero()[0]), int((~mask[0]).nonzero()[0])
    for patch, same in ((masked_patch, True), (visible_patch, False)):
        changed = x.clone()
        r, c = divmod(patch, 4)
        changed[0, :, 4 * r:4 * r + 4, 4 * c:4 * c + 4] += 1.0
        assert torch.equal(encoded(changed)[0], latent) is same, (patch, same)
    t = tokens_of(backbone)
    with torch.no_grad():
        assert torch.allclose(t.features(t.encode(t.embed(x, None, None))), backbone(x), atol=1e-6)


def test_the_mae_loss_is_the_written_out_formula_and_the_official_mean():
    pred = torch.tensor([[[0.5, -1.0, 2.0], [1.0, 0.0, 0.0]], [[0.0, 0.0, 1.0], [3.0, 1.0, -2.0]]])
    target = torch.tensor([[[1.0, 2.0, 4.0], [0.0, 1.0, 1.0]], [[2.0, 2.0, 5.0], [1.0, -1.0, 0.0]]])
    mask = torch.tensor([[True, False], [False, True]])
    expected = []
    for i in range(2):
        errors = []
        for j in range(2):
            if mask[i, j]:
                t = target[i, j].tolist()
                mu, var = statistics.mean(t), statistics.variance(t)  # unbiased, as torch.var
                norm = [(v - mu) / math.sqrt(var + 1e-6) for v in t]
                errors.append(sum((p - q) ** 2 for p, q in zip(pred[i, j].tolist(), norm, strict=True)) / 3)
        expected.append(sum(errors) / len(errors))
    per_image = mae_loss(pred, target, mask, reduction="none")
    assert per_image.tolist() == pytest.approx(expected, rel=1e-6)
    assert float(mae_loss(pred, target, mask)) == pytest.approx(sum(expected) / 2, rel=1e-6)
    # the official forward_loss (norm_pix_loss): the mean over every masked patch of the batch
    norm = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
    official = (((pred - norm) ** 2).mean(-1) * mask).sum() / mask.sum()
    assert float(mae_loss(pred, target, mask)) == pytest.approx(float(official), rel=1e-6)
    # patches as the official patchify (einsum nchpwq -> nhwpqc), and back
    x = torch.randn(2, 3, 8, 12)
    official_patches = torch.einsum("nchpwq->nhwpqc", x.reshape(2, 3, 2, 4, 3, 4)).reshape(2, 6, 48)
    assert torch.equal(patchify(x, 4), official_patches) and torch.equal(unpatchify(patchify(x, 4), 4, (2, 3)), x)


def _settings(out, **overrides) -> PretrainSettings:
    values = dict(method="mae", arch="vit_tiny", data="digits", limit=16, image_size=16, batch_size=8, epochs=2,
                  decoder_width=32, decoder_depth=1, lr=2e-3, warmup_epochs=0, device="cpu", out=out)  # fmt: skip
    return PretrainSettings(**{**values, **overrides})


@pytest.fixture
def one_thread():
    """One intra-op thread: a tiny ViT's step is several times faster on one than on two busy cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_a_tiny_mae_run_learns_resumes_exactly_embeds_and_draws_its_reconstructions(tmp_path, signal_at, one_thread):
    full = _settings(tmp_path / "full")
    pretrain(full)
    losses = [m["loss"] for m in RunDir(full.out).read_metrics()]
    assert losses[-1] < losses[0] and all(math.isfinite(v) for v in losses), losses
    state = load_file(str(full.out / "last.safetensors"))
    assert any(k.startswith("model.decoder.") for k in state)  # the checkpoint keeps the decoder
    assert json.loads((full.out / "config.json").read_text())["lr"] == 2e-3

    part = _settings(tmp_path / "part")
    _stopped_and_resumed_equals(full, part, losses, signal_at)

    shown = visualize(VisualizeSettings(run=[full.out], kind=["reconstructions"], queries=3, device="cpu",
                                        out=tmp_path / "rec.png"))  # fmt: skip
    facts = shown["figures"]["reconstructions"]
    assert (tmp_path / "rec.png").stat().st_size > 1000 and facts["images"] == 3 and facts["masked"] == 0.75
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"method": "simclr"}))
    with pytest.raises(InputError, match="reconstructions needs an MAE run"):
        visualize(VisualizeSettings(run=[other], kind=["reconstructions"], out=tmp_path / "no.png"))

    encoder = load_encoder(full.out / "encoder.safetensors")
    assert encoder.arch == "vit_tiny" and encoder.feature_dim == 192
    r = run_crlf("extract", "--ckpt", full.out / "encoder.safetensors", "--data", "digits", "--limit", 12,
                 "--device", "cpu", "--out", tmp_path / "e.npy")  # fmt: skip
    assert r.returncode == 0, r.stderr
    rows = np.load(tmp_path / "e.npy")
    assert rows.shape == (12, 192) and np.isfinite(rows).all() and rows.std(0).mean() > 0


def test_mae_takes_the_recipes_optimizer_and_refuses_a_cnn(tmp_path):
    r = run_crlf("pretrain", "--method", "mae", "--arch", "vit_small", "--batch-size", 256, "--print-config")
    assert r.returncode == 0, r.stderr
    assert 'optimizer = "adamw"' in r.stdout and "lr = 0.00015" in r.stdout and "mask_ratio = 0.75" in r.stdout
    r = run_crlf("pretrain", "--method", "mae", "--arch", "resnet18", "--data", "digits", "--limit", 16,
                 "--image-size", 8, "--batch-size", 8, "--epochs", 1, "--device", "cpu", "--out", tmp_path / "cnn")
    assert r.returncode == 2 and "--method mae trains ViTs only" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()[-1]) < 200 and not (tmp_path / "cnn").exists()


# ---- ibot: DINO on the class tokens + the masked-patch loss ---------------------------------------------------------


def test_the_masked_patch_loss_is_the_written_out_formula():
    g = torch.Generator().manual_seed(0)
    student = [torch.randn(2, 3, 4, generator=g, dtype=torch.float64) for _ in range(2)]
    teacher = [torch.randn(2, 3, 4, generator=g, dtype=torch.float64) for _ in range(2)]
    center = torch.randn(1, 4, generator=g, dtype=torch.float64)
    masks = [torch.tensor([[True, False, True], [False, False, False]]), torch.tensor([[False, True, False]] * 2)]
    ts, tt = 0.1, 0.05

    def softmax(row):
        e = [math.exp(v) for v in row]
        return [v / sum(e) for v in e]

    expected = []
    for i in range(2):
        per_crop = []
        for v in range(2):
            terms = []
            for j in range(3):
                if masks[v][i, j]:
                    q = softmax([(float(teacher[v][i, j, k]) - float(center[0, k])) / tt for k in range(4)])
                    p = softmax([float(student[v][i, j, k]) / ts for k in range(4)])
                    terms.append(-sum(q[k] * math.log(p[k]) for k in range(4)))
            per_crop.append(sum(terms) / max(1, len(terms)))  # an image with no masked patch adds 0
        expected.append(sum(per_crop) / 2)
    per_image = masked_patch_loss(student, teacher, masks, center, ts, tt, reduction="none")
    assert per_image.tolist() == pytest.approx(expected, rel=1e-9)
    assert float(masked_patch_loss(student, teacher, masks, center, ts, tt)) == pytest.approx(sum(expected) / 2)
    moved = [t.clone() for t in teacher]
    moved[0][0, 1] += 5.0  # a patch the student saw: no change
    assert torch.equal(masked_patch_loss(student, moved, masks, center, ts, tt, reduction="none"), per_image)


def test_ibot_masks_the_students_global_crops_only_and_repeats_its_masks_per_seed():
    method = IBOT(tiny_vit(), IBOTConfig(head_hidden=16, head_out=8, prototypes=10, local_crops=1, local_size=8))
    views = [torch.randn(3, 3, 16, 16), torch.randn(3, 3, 16, 16), torch.randn(3, 3, 8, 8)]
    method.set_generator(torch.Generator().manual_seed(4))
    out = method.embed(views)
    assert len(out) == 3 + 8 and out[3].shape == (3, 16, 10) and out[-1].shape == (3, 16)
    assert all(int(m.sum(1).min()) == int(m.sum(1).max()) == 5 for m in out[-2:])  # int(16 x 0.7) = 11 kept
    method.set_generator(torch.Generator().manual_seed(4))
    assert all(torch.equal(a, b) for a, b in zip(out[-2:], method.embed(views)[-2:], strict=True))
    with torch.no_grad():
        method.mask_token.add_(1.0)  # the student's patches change, the teacher's do not
    method.set_generator(torch.Generator().manual_seed(4))
    again = method.embed(views)
    assert not torch.allclose(again[3], out[3]) and torch.equal(again[7], out[7])


def _ibot(out, **overrides) -> PretrainSettings:
    values = dict(method="ibot", arch="vit_tiny", data="digits", limit=16, image_size=16, batch_size=8, epochs=2,
                  head_hidden=32, head_out=16, prototypes=32, local_crops=1, local_size=8, lr=2e-3, warmup_epochs=0,
                  device="cpu", out=out)  # fmt: skip
    return PretrainSettings(**{**values, **overrides})


def test_a_tiny_ibot_run_learns_and_resumes_exactly(tmp_path, signal_at, one_thread):
    full = _ibot(tmp_path / "full")
    pretrain(full)
    losses = [m["loss"] for m in RunDir(full.out).read_metrics()]
    assert losses[-1] < losses[0] and all(math.isfinite(v) for v in losses), losses
    state = load_file(str(full.out / "last.safetensors"))
    assert "model.mask_token" in state and float(state["model.patch_center"].abs().sum()) > 0  # the patch centre moved

    part = _ibot(tmp_path / "part")
    _stopped_and_resumed_equals(full, part, losses, signal_at)


def test_ibot_takes_its_recipe_and_refuses_a_cnn_and_micro_batch(tmp_path):
    r = run_crlf("pretrain", "--method", "ibot", "--arch", "vit_small", "--print-config")
    assert r.returncode == 0, r.stderr
    assert 'optimizer = "adamw"' in r.stdout and "mask_ratio = 0.3" in r.stdout and "patch_weight = 1.0" in r.stdout
    common = ("--data", "digits", "--limit", 16, "--image-size", 8, "--batch-size", 8, "--epochs", 1, "--device", "cpu")
    r = run_crlf("pretrain", "--method", "ibot", "--arch", "resnet18", *common, "--out", tmp_path / "cnn")
    assert r.returncode == 2 and "--method ibot trains ViTs only" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()[-1]) < 200 and not (tmp_path / "cnn").exists()
    r = run_crlf("pretrain", "--method", "ibot", "--arch", "vit_tiny", *common, "--micro-batch", 4,
                 "--out", tmp_path / "mb")  # fmt: skip
    assert r.returncode == 2 and "--micro-batch" in r.stderr and "Traceback" not in r.stderr
