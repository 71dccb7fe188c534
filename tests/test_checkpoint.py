"""Safetensors checkpoints: round trips, metadata, atomic writes, and clear errors for bad files."""

import json
import shutil

import pytest
import torch
from conftest import copy_run
from safetensors.torch import save_file
from torchvision import models

from crlf import load_encoder
from crlf.engine import backbones, methods
from crlf.engine.checkpoint import (
    atomic_write,
    digest,
    load_state,
    read_tensors,
    save_state,
    save_tensors,
    state_tensors,
)
from crlf.engine.encoder import Encoder
from crlf.engine.optim import build_optimizer
from crlf.errors import InputError


def build_backbone(arch, stem):
    return backbones.build(backbones.spec_for(arch, 32, stem))


def encoder(net, arch="resnet18", stem="cifar"):
    """An Encoder of `net` as pretrain writes it (32 px, fixed normalisation, epoch 1)."""
    spec = backbones.spec_for(arch, 32, stem)
    return Encoder(net, spec, [0.5, 0.4, 0.3], [0.2, 0.2, 0.2], 1, {"arch": arch, "epochs": 1})


def save_encoder(path, net, arch="resnet18", stem="cifar"):
    encoder(net, arch, stem).save(path)


def meta(arch="resnet18", stem="cifar"):
    return encoder(None, arch, stem).metadata()


def test_encoder_round_trip(tmp_path):
    torch.manual_seed(0)
    net = build_backbone("resnet18", "cifar").eval()
    path = tmp_path / "enc.safetensors"
    save_encoder(path, net)
    loaded = load_encoder(path)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(loaded.backbone(x), net(x))
    assert not loaded.backbone.training
    assert loaded.arch == "resnet18" and loaded.spec.stem == "cifar" and loaded.image_size == 32
    assert loaded.mean == [0.5, 0.4, 0.3] and loaded.config["epochs"] == 1 and loaded.epoch == 1
    assert loaded.sha256 and loaded.feature_dim == 512


def test_encoder_weights_load_into_plain_torchvision(tmp_path):
    net = build_backbone("resnet18", "imagenet")
    path = tmp_path / "enc.safetensors"
    save_encoder(path, net, stem="imagenet")
    tensors, metadata = read_tensors(path)
    plain = models.resnet18(weights=None)
    missing, unexpected = plain.load_state_dict(tensors, strict=False)
    assert set(missing) == {"fc.weight", "fc.bias"} and not unexpected
    assert metadata["format"] == "crlf-encoder" and json.loads(metadata["std"]) == [0.2, 0.2, 0.2]


def test_truncated_file_is_a_clear_error(tmp_path):
    path = tmp_path / "enc.safetensors"
    save_encoder(path, build_backbone("resnet18", "cifar"))
    data = path.read_bytes()
    for cut in (10, len(data) // 2, len(data) - 1):
        path.write_bytes(data[:cut])
        with pytest.raises(InputError, match="not a readable safetensors file"):
            load_encoder(path)


def test_checksum_refuses_a_flipped_byte_in_a_tensor_and_a_changed_metadata_value(tmp_path):
    """Both damaged files are still valid safetensors files: only the sha256 in the metadata can tell."""
    torch.manual_seed(0)
    path = tmp_path / "enc.safetensors"
    save_encoder(path, build_backbone("resnet18", "cifar"))
    good = path.read_bytes()
    end = 8 + int.from_bytes(good[:8], "little")
    header = json.loads(good[8:end])
    start = end + header["conv1.weight"]["data_offsets"][0]
    bad = bytearray(good)
    bad[start + 13] ^= 0x04  # one bit of one weight
    path.write_bytes(bytes(bad))
    for reader in (read_tensors, load_encoder):
        with pytest.raises(InputError, match="is damaged"):
            reader(path)
    assert header["__metadata__"]["image_size"] == "32"
    forged = good[8:end].replace(b'"image_size":"32"', b'"image_size":"64"')  # same length, still valid JSON
    assert forged != good[8:end] and json.loads(forged)["__metadata__"]["image_size"] == "64"
    path.write_bytes(good[:8] + forged + good[end:])
    with pytest.raises(InputError, match="is damaged"):
        read_tensors(path)
    path.write_bytes(good)
    read_tensors(path)  # the untouched bytes read fine


def test_digest_is_stable_and_covers_names_dtypes_shapes_values_and_metadata(tmp_path):
    t = {"a": torch.arange(6, dtype=torch.float32), "b": torch.ones(2, 2)}
    m = {"format": "x", "epoch": "1"}
    d = digest(t, m)
    assert d == digest({"b": t["b"].clone(), "a": t["a"].clone()}, {"epoch": "1", "format": "x"})  # order-free
    assert d == digest(t, {**m, "sha256": "anything"})  # the checksum does not cover itself
    changed = t["a"].clone()
    changed[3] = torch.nextafter(changed[3], torch.tensor(10.0))  # one ulp
    for other in (
        {"a": t["a"].reshape(2, 3), "b": t["b"]},  # shape, same bytes
        {"a": t["a"].view(torch.int32), "b": t["b"]},  # dtype, same bytes
        {"c": t["a"], "b": t["b"]},  # name
        {"a": changed, "b": t["b"]},  # value
    ):
        assert digest(other, m) != d
    assert digest(t, {**m, "epoch": "2"}) != d and digest(t, {**m, "extra": ""}) != d
    save_tensors(tmp_path / "one.safetensors", t, m)  # saving twice: the same contents, the same digest
    save_tensors(tmp_path / "two.safetensors", {k: v.clone() for k, v in t.items()}, dict(m))
    (t1, m1), (t2, m2) = read_tensors(tmp_path / "one.safetensors"), read_tensors(tmp_path / "two.safetensors")
    assert m1 == m2 and m1["sha256"] == digest(t1, m1) == digest(t2, m2) == digest(t, m1)
    assert t1.keys() == t2.keys() == t.keys() and all(torch.equal(t1[k], t[k]) for k in t)
    assert m1["format"] == "x" and m1["crlf_version"]


def test_foreign_and_missing_files(tmp_path):
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    with pytest.raises(InputError, match="not a crlf checkpoint"):
        load_encoder(foreign)
    with pytest.raises(InputError, match="does not exist"):
        load_encoder(tmp_path / "nope.safetensors")
    text = tmp_path / "notes.safetensors"
    text.write_text("hello")
    with pytest.raises(InputError, match="not a readable"):
        load_encoder(text)


def test_mismatched_architecture(tmp_path):
    path = tmp_path / "enc.safetensors"
    encoder(build_backbone("resnet34", "cifar")).save(path)  # metadata lies
    with pytest.raises(InputError, match="does not match a resnet18"):
        load_encoder(path)


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    path = tmp_path / "f.bin"
    atomic_write(path, lambda f: f.write(b"old"))

    def broken(f):
        f.write(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        atomic_write(path, broken)
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]  # no temp file left behind


@pytest.mark.parametrize("optimizer", ["sgd", "lars", "adam"])
def test_state_round_trip_continues_identically(tmp_path, optimizer):
    def make():
        torch.manual_seed(0)
        config = methods.SimCLRConfig(head_hidden=16, head_out=8)
        model = methods.SimCLR(build_backbone("resnet18", "cifar"), config, 512)
        return model, build_optimizer(model, optimizer, 0.01, 1e-4)

    def step(model, opt, seed):
        torch.manual_seed(seed)
        loss = model.head(model.backbone(torch.randn(4, 3, 8, 8))).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    model, opt = make()
    step(model, opt, 1)
    rng = {"torch": torch.get_rng_state()}
    save_state(tmp_path / "last.safetensors", model, opt, meta(), {"epoch": 1, "plateau": {}}, rng)
    step(model, opt, 2)

    model2, opt2 = make()
    progress, rng2 = load_state(tmp_path / "last.safetensors", model2, opt2)
    assert progress["epoch"] == 1 and torch.equal(rng2["torch"], rng["torch"])
    step(model2, opt2, 2)
    for a, b in zip(model.state_dict().values(), model2.state_dict().values()):
        assert torch.equal(a, b)
    # the backbone of a training state loads as an encoder too
    enc = load_encoder(tmp_path / "last.safetensors")
    saved, _ = read_tensors(tmp_path / "last.safetensors")
    assert torch.equal(enc.backbone.conv1.weight, saved["model.backbone.conv1.weight"])


@pytest.mark.parametrize(
    "change,fragment",
    [
        (lambda g, p: g[0].update(fused=True), "optimizer setting fused"),
        (lambda g, p: g[0].update(foreach=True), "optimizer setting foreach"),
        (lambda g, p: g[0].update(lr="0.1"), "optimizer setting lr"),
        (lambda g, p: g[0].update(betas=[0.9]), "optimizer setting betas"),
        (lambda g, p: g[0].update(extra=1), "optimizer settings ['extra'] differ"),
        (lambda g, p: g.append(dict(g[0])), "param groups expected"),
        (lambda g, p: p.update(epoch="1"), "has no epoch count"),
    ],
)
def test_a_crafted_state_cannot_set_the_optimizers_flags_or_types(tmp_path, change, fragment):
    torch.manual_seed(0)
    model = methods.SimCLR(build_backbone("resnet18", "cifar"), methods.SimCLRConfig(head_hidden=16, head_out=8), 512)
    opt = build_optimizer(model, "adamw", 0.01, 1e-4)
    tensors, metadata = state_tensors(model, opt, meta(), {"epoch": 1, "plateau": {}})
    groups, progress = json.loads(metadata["param_groups"]), json.loads(metadata["progress"])
    change(groups, progress)
    metadata.update(param_groups=json.dumps(groups), progress=json.dumps(progress))
    save_tensors(tmp_path / "last.safetensors", tensors, metadata)  # a valid checksum over the crafted values
    with pytest.raises(InputError) as info:
        load_state(tmp_path / "last.safetensors", model, opt)
    assert fragment in str(info.value) and "\n" not in str(info.value)
    assert opt.param_groups[0]["fused"] is None and opt.param_groups[0]["lr"] == 0.01  # untouched


@pytest.mark.parametrize(
    "key,value,fragment",
    [
        ("arch", "vgg16", "unknown arch 'vgg16'"),
        ("stem", "tiny", "unknown stem 'tiny'"),
        ("image_size", "0", "image_size 0 outside 1..4096"),
        ("image_size", "-32", "image_size -32"),
        ("image_size", "100000000", "image_size 100000000"),
        ("feature_dim", "0", "feature_dim 0"),
        ("patch_size", "3", "patch size 3 does not tile 32 px"),
        ("backbone", '{"arch": "resnet18"}', "missing"),
        ("backbone", '{"arch": "resnet18", "image_size": 32, "feature_dim": 512, "stem": "cifar", "x": 1}', "known"),
        ("mean", "[0.5, 0.5]", "mean must be a list of 3 finite numbers"),
        ("mean", '"abc"', "mean must be a list of 3"),
        ("std", "[NaN, 0.2, 0.2]", "std must be a list of 3 finite numbers"),
        ("std", "[0.2, 0.0, 0.2]", "std must be positive"),
        ("std", "[0.2, true, 0.2]", "std must be a list of 3"),
        ("epoch", "-1", "negative epoch"),
    ],
)
def test_crafted_metadata_with_a_valid_checksum_is_an_input_error(tmp_path, key, value, fragment):
    path = tmp_path / "enc.safetensors"
    crafted = meta("vit_tiny") if key == "patch_size" else meta()
    spec = json.loads(crafted["backbone"])
    if key in spec:  # the spec says it; the copy beside it for older readers agrees (else that alone is refused)
        spec[key] = json.loads(value) if value[0] in "-0123456789" else value
        crafted.update(backbone=json.dumps(spec), **({key: value} if key in crafted else {}))
    else:
        crafted[key] = value
    save_tensors(path, {"conv1.weight": torch.zeros(1)}, {"format": "crlf-encoder", **crafted})
    read_tensors(path)  # the checksum is valid: only the values are wrong
    with pytest.raises(InputError) as info:
        load_encoder(path)
    assert fragment in str(info.value) and "re-create it" in str(info.value) and "\n" not in str(info.value)


def test_crafted_metadata_exits_2_from_the_cli(tmp_path):
    import logging

    from typer.testing import CliRunner

    from crlf.cli import app

    path = tmp_path / "enc.safetensors"
    save_tensors(path, {"conv1.weight": torch.zeros(1)}, {"format": "crlf-encoder", **meta(), "image_size": "0"})
    logger = logging.getLogger("crlf")
    saved = (list(logger.handlers), logger.propagate, logger.level)
    try:
        args = ["extract", "--ckpt", str(path), "--data", "digits", "--out", str(tmp_path / "e.npy")]
        r = CliRunner().invoke(app, args)
    finally:  # the CLI stops the crlf logger propagating, which would hide later tests' records from caplog
        logger.handlers[:], logger.propagate, logger.level = saved
    assert r.exit_code == 2 and "image_size '0'" in r.stderr and "unexpected" not in r.stderr


def _crafted_timm(path, arch, kwargs=None):
    """An encoder file whose (validly checksummed) spec names a timm backbone of the crafter's choosing."""
    spec = {"arch": arch, "image_size": 32, "feature_dim": 512, "kwargs": kwargs or {}}
    meta = {"format": "crlf-encoder", "arch": arch, "backbone": json.dumps(spec), "image_size": "32",
            "feature_dim": "512", "mean": "[0.5, 0.5, 0.5]", "std": "[0.2, 0.2, 0.2]", "epoch": "1", "config": "{}"}
    save_tensors(path, {"conv1.weight": torch.zeros(1)}, meta)


@pytest.fixture
def no_network(monkeypatch):
    """Every name lookup or connection attempt is recorded and fails: the list must stay empty."""
    import socket

    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("the network is off in this test")

    for name in ("getaddrinfo", "create_connection"):
        monkeypatch.setattr(socket, name, refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    return attempts


@pytest.mark.parametrize(
    "arch,kwargs,fragment",
    [
        ("timm:hf-hub:timm/resnet18.a1_in1k", {}, "not a plain timm model name"),
        ("timm:local-dir:/tmp/x", {}, "not a plain timm model name"),
        ("timm:../../etc", {}, "not a plain timm model name"),
        ("timm:.hidden", {}, "not a plain timm model name"),
        ("timm:no_such_model_xyz", {}, "has no model 'no_such_model_xyz'"),
        ("timm:resnet18", {"pretrained": True}, "unexpected timm arguments"),
        ("timm:resnet18", {"checkpoint_path": "/tmp/x.pth"}, "unexpected timm arguments"),
        ("timm:resnet18", {"pretrained_cfg_overlay": {"file": "/tmp/x"}}, "unexpected timm arguments"),
        ("timm:test_vit", {"img_size": True}, "unexpected timm arguments"),
        ("timm:test_vit", {"img_size": 99999}, "img_size 99999 is not the image_size 32"),
        ("resnet18", {"img_size": 32}, "unexpected resnet arguments"),
    ],
)
def test_a_crafted_timm_spec_reaches_no_hub_path_or_argument(tmp_path, no_network, arch, kwargs, fragment):
    pytest.importorskip("timm")
    path = tmp_path / "enc.safetensors"
    _crafted_timm(path, arch, kwargs)
    with pytest.raises(InputError) as info:
        load_encoder(path)
    assert fragment in str(info.value) and "\n" not in str(info.value) and not no_network


def test_a_crafted_timm_spec_exits_2_from_the_cli_without_the_network(tmp_path, no_network):
    from inprocess import run_crlf

    pytest.importorskip("timm")
    path = tmp_path / "enc.safetensors"
    _crafted_timm(path, "timm:hf-hub:timm/resnet18.a1_in1k")
    r = run_crlf("extract", "--ckpt", path, "--data", "digits", "--out", tmp_path / "e.npy")
    assert r.returncode == 2 and "not a plain timm model name" in r.stderr and not no_network
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "e.npy").exists()


def test_background_writes_in_order_and_raises_the_error_in_the_callers_thread(tmp_path):
    from crlf.engine.files import Background

    done, writer = [], Background()
    writer.submit(lambda: done.append(1))
    writer.submit(lambda: done.append(2))  # waits for the first
    writer.wait()
    assert done == [1, 2]

    def full():
        raise OSError(28, "No space left on device")

    writer.submit(full)
    with pytest.raises(OSError, match="No space"):
        writer.submit(lambda: done.append(3))  # the previous error surfaces before new work starts
    writer.wait()  # raised once only
    assert done == [1, 2]


def test_state_tensors_are_copies_that_training_cannot_change(tmp_path):
    torch.manual_seed(0)
    model = methods.SimCLR(build_backbone("resnet18", "cifar"), methods.SimCLRConfig(head_hidden=16, head_out=8), 512)
    opt = build_optimizer(model, "sgd", 0.01, 1e-4)
    model.head(model.backbone(torch.randn(4, 3, 8, 8))).pow(2).mean().backward()
    opt.step()
    tensors, metadata = state_tensors(model, opt, meta(), {"epoch": 1})
    before = {k: v.clone() for k, v in tensors.items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
        for state in opt.state.values():
            state["momentum_buffer"].mul_(2)
    assert all(torch.equal(tensors[k], before[k]) for k in tensors)
    save_tensors(tmp_path / "s.safetensors", tensors, metadata)
    model2 = methods.SimCLR(build_backbone("resnet18", "cifar"), methods.SimCLRConfig(head_hidden=16, head_out=8), 512)
    opt2 = build_optimizer(model2, "sgd", 0.01, 1e-4)
    assert load_state(tmp_path / "s.safetensors", model2, opt2)[0] == {"epoch": 1}
    assert torch.equal(model2.backbone.conv1.weight, before["model.backbone.conv1.weight"])


@pytest.mark.parametrize("crafted", ["float rng", "short rng", "plateau"])
def test_crafted_generator_or_schedule_states_are_an_input_error(tmp_path, reference_run, crafted):
    """A state file (checksum recomputed) whose random generator states are not byte vectors of the right size, or
    whose plateau schedule has other fields, is refused with one line instead of torch's raw error or a TypeError in
    the middle of the resume."""
    from crlf import pretrain

    run = tmp_path / "run"
    copy_run(reference_run.path, run, ignore=shutil.ignore_patterns("checkpoints"))  # no snapshot to fall to
    tensors, metadata = read_tensors(run / "last.safetensors")
    bad = {"float rng": torch.zeros(5056), "short rng": torch.zeros(10, dtype=torch.uint8)}.get(crafted)
    rng = torch.get_rng_state()
    tensors = {**tensors, "rng.torch": rng if bad is None else bad, "rng.augment": rng.clone()}
    progress = {**json.loads(metadata["progress"]), "epoch": 2, "step": 1, "loss_sum": 1.0, "seconds": 1.0}
    if crafted == "plateau":
        progress["plateau"] = {**progress["plateau"], "verbose": True}
    metadata = {k: v for k, v in metadata.items() if k != "sha256"}
    save_tensors(run / "last.safetensors", tensors, {**metadata, "progress": json.dumps(progress)})
    with pytest.raises(InputError) as info:
        pretrain(reference_run.settings(run), resume=True)
    assert ("plateau" if crafted == "plateau" else "random generator") in str(info.value)
    assert "\n" not in str(info.value)
