"""--init: a backbone that starts from weights (a crlf encoder or run, torchvision- or timm-named files, restricted
pickles), the one-line errors of what does not fit, and --freeze-epochs (the heads first)."""

import json
import os

import pytest
import torch
from inprocess import run_crlf
from safetensors.torch import load_file, save_file

from crlf import PretrainSettings, embed, load_encoder, pretrain
from crlf.commands.pretrain import resolve, train_config
from crlf.engine import backbones, distributed, train, weights
from crlf.errors import InputError


def _hub_cache(tmp_path, monkeypatch, name: str, state: dict) -> None:
    """A Hugging Face cache holding timm/NAME's model.safetensors, laid out as huggingface_hub writes one
    (refs/main -> snapshots/<commit>/), and HF_HUB_CACHE pointing at it."""
    repo = tmp_path / "hub" / f"models--timm--{name}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123abcd")
    (repo / "snapshots" / "0123abcd").mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(repo / "snapshots/0123abcd/model.safetensors"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))


def _setup(**values):
    """The run's setup as pretrain builds it (data, backbone with its --init weights, method), without training."""
    s = PretrainSettings(data="digits", limit=32, image_size=8, batch_size=16, head_hidden=16, head_out=8,
                         device="cpu", **values)  # fmt: skip
    return train._build(train_config(resolve(s)), distributed.World(device=torch.device("cpu")))


def test_init_from_a_crlf_encoder_or_run_starts_from_its_exact_weights(reference_run):
    encoder = load_encoder(reference_run.path / "encoder.safetensors")
    run = reference_run.path
    for source in (run / "encoder.safetensors", run, run / "last.safetensors"):
        setup = _setup(init=str(source))
        mine = setup.model.backbone.state_dict()
        assert all(torch.equal(mine[k], v) for k, v in encoder.backbone.state_dict().items()), source
        x = torch.rand(4, 3, 8, 8)
        with torch.no_grad():
            assert torch.equal(setup.model.backbone.eval()(x), encoder.backbone(x))  # epoch-0 features
        assert setup.init["sha256"] and setup.init["loaded"] == len(mine)
    random = _setup()
    assert not torch.equal(random.model.backbone.conv1.weight, encoder.backbone.conv1.weight)


def test_init_from_a_torchvision_file_loads_trains_and_is_recorded(tmp_path):
    from torchvision.models import resnet18

    torch.manual_seed(1)
    reference = resnet18(weights=None)
    path = tmp_path / "resnet18.safetensors"
    save_file(reference.state_dict(), str(path))  # torchvision's names, its classifier (fc) included
    out = tmp_path / "run"
    pretrain(PretrainSettings(data="digits", limit=32, image_size=32, batch_size=16, epochs=1, head_hidden=16,
                              head_out=8, device="cpu", stem="imagenet", init=str(path), out=out))  # fmt: skip
    config = json.loads((out / "config.json").read_text())
    assert config["init"] == str(path) and config["resolved"]["init"]["skipped"] == 2  # fc.weight, fc.bias
    assert config["resolved"]["init"]["sha256"] == weights.read(path)[2]
    emb = embed(out / "encoder.safetensors", data="digits", limit=8, image_size=32, device="cpu")  # extract records it
    assert emb.provenance["init"] == {"source": str(path), "sha256": weights.read(path)[2]}
    with pytest.raises(InputError, match=r"7x7 stem, use --stem imagenet"):
        _setup(init=str(path), stem="cifar")
    with pytest.raises(InputError, match=r"does not fit --arch resnet34: missing layer1\.2\."):
        _setup(init=str(path), arch="resnet34", stem="imagenet")
    from crlf.engine.methods import Distill, DistillConfig

    student = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    method = Distill(student, DistillConfig(teacher=str(path), teacher_arch="resnet18"), 6)  # public weights
    assert method.teacher_dim == 512 and torch.equal(method._teacher[0].backbone.conv1.weight, reference.conv1.weight)
    with pytest.raises(InputError, match="is not a crlf checkpoint .* the file with --teacher-arch ARCH"):
        Distill(student, DistillConfig(teacher=str(path)), 6)


def test_layer_decay_scales_a_vits_blocks_lr_from_the_top_and_refuses_a_cnn(tmp_path):
    from crlf.engine.optim import layer_scales

    out = tmp_path / "run"
    pretrain(PretrainSettings(data="digits", limit=32, image_size=8, batch_size=16, epochs=1, head_hidden=16,
                              head_out=8, device="cpu", arch="vit_tiny", layer_decay=0.5, out=out))  # fmt: skip
    setup = _setup(arch="vit_tiny", layer_decay=0.5)
    scales = layer_scales(setup.model, 0.5)
    layers = "backbone.encoder.layers.encoder_layer_"
    assert scales[layers + "11.mlp.0.weight"] == 0.5 and scales[layers + "0.mlp.0.weight"] == 0.5**12
    assert scales["backbone.conv_proj.weight"] == 0.5**13 and scales["backbone.encoder.ln.weight"] == 1.0
    assert not any(n in scales for n, _ in setup.model.named_parameters() if not n.startswith("backbone."))
    from safetensors import safe_open

    with safe_open(str(out / "last.safetensors"), "pt") as f:  # the lrs the loop set at the last step
        groups = json.loads(f.metadata()["param_groups"])
    assert len(groups) == 28 and groups[-1].get("lr_scale") is None and groups[-1]["lr"] > 0
    for g in groups:
        assert g["lr"] == pytest.approx(g.get("lr_scale", 1.0) * groups[-1]["lr"], rel=1e-9)
    with pytest.raises(InputError, match="--layer-decay is for ViT backbones"):
        _setup(layer_decay=0.9)


def test_init_from_a_timm_named_file_and_a_vit_at_another_image_size(tmp_path, monkeypatch):
    timm = pytest.importorskip("timm")
    net = timm.create_model("resnet10t", pretrained=False)
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    setup = _setup(arch="timm:resnet10t", init=str(path))
    mine = setup.model.backbone.state_dict()
    assert torch.equal(mine["conv1.0.weight"], net.state_dict()["conv1.0.weight"])
    with pytest.raises(InputError, match="look like timm weights|does not fit"):
        _setup(init=str(path))
    _hub_cache(tmp_path, monkeypatch, "resnet10t", net.state_dict())  # timm:NAME from the local cache
    cached = _setup(arch="timm:resnet10t", init="timm:resnet10t")
    assert torch.equal(cached.model.backbone.state_dict()["conv1.0.weight"], net.state_dict()["conv1.0.weight"])
    assert cached.init["path"].endswith("snapshots/0123abcd/model.safetensors")
    vit16 = backbones.build(backbones.spec_for("vit_tiny", 16))
    vpath = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in vit16.state_dict().items()}, str(vpath))
    vit32 = backbones.build(spec := backbones.spec_for("vit_tiny", 32))
    weights.load_into(vit32, str(vpath), spec)  # position embeddings of 16 tokens + 1 resized to 64 + 1
    assert vit32.encoder.pos_embedding.shape[1] == 65 and torch.equal(vit32.conv_proj.weight, vit16.conv_proj.weight)


class _Code:
    def __reduce__(self):
        return os.system, ("touch pwned",)


def test_a_pickle_with_code_and_other_bad_sources_are_one_line_and_exit_2(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save({"conv1.weight": _Code()}, tmp_path / "evil.pth")
    common = ["pretrain", "--data", "digits", "--limit", 32, "--image-size", 8, "--batch-size", 16, "--epochs", 1,
              "--device", "cpu", "--out", tmp_path / "run"]  # fmt: skip
    cases = [("evil.pth", "restricted unpickler refused it"), ("missing.safetensors", "does not exist"),
             ("notes.txt", "expected a .safetensors"), ("timm:resnet10t", "no weights in the local Hugging Face cache")]
    (tmp_path / "notes.txt").write_text("x")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    for source, message in cases:
        r = run_crlf(*common, "--init", source)
        assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, (source, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "run").exists()


def test_freeze_epochs_trains_the_heads_alone_then_everything(tmp_path, reference_run):
    out = tmp_path / "run"
    pretrain(reference_run.settings(out, epochs=2, init=str(reference_run.path), freeze_epochs=1))
    start = load_file(str(reference_run.path / "encoder.safetensors"))
    first = load_file(str(out / "checkpoints" / "epoch-0001.safetensors"))
    second = load_file(str(out / "checkpoints" / "epoch-0002.safetensors"))
    params = [k for k in start if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert all(torch.equal(first[f"model.backbone.{k}"], start[k]) for k in params)  # frozen in epoch 1
    assert not all(torch.equal(second[f"model.backbone.{k}"], start[k]) for k in params)  # trained in epoch 2
    assert not torch.equal(first["model.head.0.weight"], second["model.head.0.weight"])


# ---- --method distill: a frozen teacher, a projected student ------------------------------------------------------


def test_distill_resumes_bit_for_bit_and_refuses_a_changed_teacher(tmp_path, reference_run, signal_at):
    import shutil
    import signal

    from crlf.errors import Interrupted

    teacher = tmp_path / "teacher.safetensors"
    shutil.copy(reference_run.path / "encoder.safetensors", teacher)
    values = dict(method="distill", teacher=str(teacher), epochs=2)
    pretrain(reference_run.settings(tmp_path / "ref", **values))
    config = json.loads((tmp_path / "ref" / "config.json").read_text())
    assert config["teacher"] == str(teacher) and config["optimizer"] == "lars"
    losses = [json.loads(line)["loss"] for line in (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()]
    assert 0 <= losses[1] < losses[0] <= 4  # 2 - 2 cos, falling: the student's projection moves to the teacher
    state = load_file(str(tmp_path / "ref" / "last.safetensors"))
    assert "model.teacher_sha256" in state and not any(k.startswith("model._teacher") for k in state)
    with pytest.raises(Interrupted):
        pretrain(reference_run.settings(tmp_path / "run", **values), signal_at(2, 2, signal.SIGTERM))
    pretrain(reference_run.settings(tmp_path / "run", **values), resume=True)
    resumed = load_file(str(tmp_path / "run" / "last.safetensors"))
    assert resumed.keys() == state.keys() and all(torch.equal(resumed[k], state[k]) for k in state)
    with pytest.raises(Interrupted):
        pretrain(reference_run.settings(tmp_path / "changed", **values), signal_at(1, 2, signal.SIGTERM))
    shutil.copy(tmp_path / "ref" / "encoder.safetensors", teacher)  # another encoder under the same name
    with pytest.raises(InputError, match="teacher .* is not the file this run started with"):
        pretrain(reference_run.settings(tmp_path / "changed", **values), resume=True)
    with pytest.raises(InputError, match="--method distill needs --teacher"):
        pretrain(reference_run.settings(tmp_path / "none", method="distill"))


# ---- the evaluations take public weights as they are ----------------------------------------------------------------


def test_extract_takes_timm_name_or_a_weights_file_with_arch_and_equals_the_librarys_forward(tmp_path, monkeypatch):
    import numpy as np

    timm = pytest.importorskip("timm")
    from torchvision.models import resnet18

    torch.manual_seed(0)
    net = timm.create_model("resnet10t", pretrained=False, num_classes=0).eval()
    _hub_cache(tmp_path, monkeypatch, "resnet10t", net.state_dict())
    images = torch.randint(0, 256, (6, 32, 32, 3), dtype=torch.uint8)
    np.save(tmp_path / "x.npy", images.numpy())
    data = ["--data", "npy", "--data-dir", tmp_path / "x.npy", "--image-size", 32, "--device", "cpu"]
    r = run_crlf("extract", "--ckpt", "timm:resnet10t", *data, "--out", tmp_path / "timm.npy")
    assert r.returncode == 0, r.stderr
    ours = torch.from_numpy(np.load(tmp_path / "timm.npy"))
    cfg = net.pretrained_cfg
    mean, std = torch.tensor(cfg["mean"]).view(1, 3, 1, 1), torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        theirs = net((images.permute(0, 3, 1, 2).float() / 255 - mean) / std)
    assert torch.allclose(ours, theirs, atol=1e-4, rtol=1e-4)
    tv = resnet18(weights=None).eval()
    save_file(tv.state_dict(), str(tmp_path / "tv.safetensors"))
    r = run_crlf("extract", "--ckpt", tmp_path / "tv.safetensors", "--arch", "resnet18", *data, "--out",
                 tmp_path / "tv.npy")  # fmt: skip
    assert r.returncode == 0, r.stderr
    tv.fc = torch.nn.Identity()
    imagenet = torch.tensor(weights.IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(weights.IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = tv((images.permute(0, 3, 1, 2).float() / 255 - imagenet[0]) / imagenet[1])
    assert torch.allclose(torch.from_numpy(np.load(tmp_path / "tv.npy")), expected, atol=1e-4, rtol=1e-4)
    r = run_crlf("extract", "--ckpt", tmp_path / "tv.safetensors", *data, "--out", tmp_path / "no.npy")
    assert r.returncode == 2 and "the file with --arch" in r.stderr and not (tmp_path / "no.npy").exists()


def test_distill_from_a_public_timm_teacher_at_its_own_size(tmp_path, monkeypatch):
    timm = pytest.importorskip("timm")
    from crlf.engine.methods import Distill, DistillConfig

    torch.manual_seed(0)
    net = timm.create_model("resnet10t", pretrained=False, num_classes=0)
    _hub_cache(tmp_path, monkeypatch, "resnet10t", net.state_dict())
    student = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    method = Distill(student, DistillConfig(teacher="timm:resnet10t"), 6)
    assert method.teacher_dim == net.num_features and method._teacher[0].image_size == 224
    views = [torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)]
    loss = method(views)
    loss.backward()
    assert 0 <= float(loss.detach()) <= 4 and student[0].weight.grad is not None
    assert not any(k.startswith("_teacher") for k in method.state_dict())


def test_distill_with_a_self_supervised_term_adds_its_weight_times_nt_xent(tmp_path):
    from torch import nn

    from crlf.engine.encoder import Encoder
    from crlf.engine.loss import nt_xent, regression_loss
    from crlf.engine.methods import Distill, DistillConfig

    torch.manual_seed(0)
    spec = backbones.spec_for("vit_tiny", 8)
    Encoder(backbones.build(spec), spec, [0.5] * 3, [0.25] * 3).save(tmp_path / "encoder.safetensors")
    student = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    method = Distill(student, DistillConfig(teacher=str(tmp_path), ssl_weight=0.5), 6)  # the run directory form
    views = [torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    loss = method(views)
    with torch.no_grad():
        x = torch.cat(views)
        features = method.backbone(x)
        z1, z2 = method.ssl_head(features).chunk(2)
        expected = regression_loss(method.head(features), method.teacher_features(x)) + 0.5 * nt_xent(z1, z2, 0.2)
    assert torch.allclose(loss.detach(), expected, atol=1e-5)
    loss.backward()
    assert method.ssl_head[0].weight.grad is not None and method.head.weight.grad is not None
    plain = Distill(student, DistillConfig(teacher=str(tmp_path)), 6)
    assert plain.ssl_head is None and not any(k.startswith("ssl_head") for k in plain.state_dict())


def test_distill_teacher_queue_is_lightly_trains_v1_kl_against_the_queue_the_batch_joined(tmp_path):
    import torch.nn.functional as F
    from torch import nn

    from crlf.engine.encoder import Encoder
    from crlf.engine.methods import Distill, DistillConfig

    torch.manual_seed(0)
    spec = backbones.spec_for("vit_tiny", 8)
    Encoder(backbones.build(spec), spec, [0.5] * 3, [0.25] * 3).save(tmp_path / "encoder.safetensors")
    student = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    method = Distill(student, DistillConfig(teacher=str(tmp_path), teacher_queue=12), 6)
    before = method.queue.bank[0].clone()
    views = [torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    loss = method(views)
    with torch.no_grad():
        x = torch.cat(views)
        t = F.normalize(method.teacher_features(x), dim=1)
        p = F.normalize(method.head(method.backbone(x)), dim=1)
        queue = torch.cat([t, before[8:]])  # the 8 rows of this batch over the oldest ones
        target = F.softmax(t @ queue.T / 0.07, dim=1)
        expected = (target * (target.log() - F.log_softmax(p @ queue.T / 0.07, dim=1))).sum(1).mean()
    assert torch.allclose(method.queue.bank[0], queue) and int(method.queue.ptr) == 8
    assert float(loss) == pytest.approx(float(expected), rel=1e-5) and float(loss) > 0
    loss.backward()
    assert method.head.weight.grad is not None and "queue.bank" in method.state_dict()


def test_a_distilled_students_features_move_towards_the_teachers_on_held_out_images(tmp_path, reference_run):
    import torch.nn.functional as F
    from safetensors.torch import load_file
    from sklearn.datasets import load_digits

    values = dict(method="distill", teacher=str(reference_run.path), optimizer="adamw", lr=2e-3, head_hidden=None,
                  head_out=None, head_dropout=None)  # fmt: skip
    settings = reference_run.settings(tmp_path / "run", **values)
    pretrain(settings)
    model = train._build(train_config(resolve(settings)), distributed.World(device=torch.device("cpu"))).model
    images = torch.from_numpy(load_digits().images[-200:] * 255 / 16).round().float()[:, None].expand(-1, 3, -1, -1)

    def similarity() -> float:  # of the student's projection and the teacher's features, images it never saw
        with torch.no_grad():
            x = (images / 255 - model.input_mean) / model.input_std
            return float(F.cosine_similarity(model.head(model.backbone.eval()(x)), model.teacher_features(x)).mean())

    before = similarity()  # the run's start: the same seed builds the same student
    state = load_file(str(tmp_path / "run" / "last.safetensors"))
    model.load_state_dict({k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")})
    after = similarity()
    assert abs(before) < 0.2 and after > 0.6, (before, after)  # measured: -0.01 -> 0.94
