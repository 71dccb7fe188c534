"""Backbones, stems and projection heads."""

import pytest
import torch
from torch import nn
from torchvision import models

from crlf import PretrainSettings
from crlf.engine import methods
from crlf.engine.loss import nt_xent
from crlf.engine.model import build_backbone, build_head, feature_dim, resolve_stem


@pytest.mark.parametrize("size,stem", [(8, "cifar"), (32, "cifar"), (64, "cifar"), (65, "imagenet"), (96, "imagenet")])
def test_auto_stem(size, stem):
    assert resolve_stem("auto", size) == stem
    assert resolve_stem("imagenet", 32) == "imagenet"


def test_cifar_stem_keeps_resolution():
    net = build_backbone("resnet18", "cifar")
    assert net.conv1.kernel_size == (3, 3) and net.conv1.stride == (1, 1)
    assert isinstance(net.maxpool, nn.Identity)
    feats = net.layer1(net.maxpool(net.relu(net.bn1(net.conv1(torch.randn(2, 3, 32, 32))))))
    assert feats.shape[-1] == 32  # no downsampling before layer2


@pytest.mark.parametrize("arch", ["resnet18", "resnet34", "resnet50"])
def test_feature_dims_and_torchvision_keys(arch):
    net = build_backbone(arch, "imagenet")
    out = net.eval()(torch.randn(1, 3, 64, 64))
    assert out.shape == (1, feature_dim(arch))
    # the keys load into a plain torchvision model of the same architecture (minus its classifier)
    plain = getattr(models, arch)(weights=None)
    missing, unexpected = plain.load_state_dict(net.state_dict(), strict=False)
    assert set(missing) == {"fc.weight", "fc.bias"} and not unexpected


def test_unknown_arch_and_stem():
    with pytest.raises(ValueError, match="unknown architecture"):
        build_backbone("vgg", "cifar")
    with pytest.raises(ValueError, match="unknown stem"):
        build_backbone("resnet18", "tiny")


def test_head_shapes_and_dropout():
    seed = build_head(512, 256, 64, layers=2, dropout=0.1)
    assert [type(m).__name__ for m in seed] == ["Linear", "BatchNorm1d", "ReLU", "Dropout", "Linear"]
    assert seed(torch.randn(4, 512)).shape == (4, 64)
    deep = build_head(512, 2048, 128, layers=3)
    assert sum(isinstance(m, nn.Linear) for m in deep) == 3
    assert build_head(512, 2048, 128, layers=1)(torch.randn(2, 512)).shape == (2, 128)


def test_simclr_forward_is_the_loss_of_its_projections():
    model = methods.build(PretrainSettings(head_hidden=32, head_out=16), build_backbone("resnet18", "cifar"), 512)
    x1, x2 = torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16)
    z = model.head(model.backbone(torch.cat([x1, x2])))
    assert z.shape == (8, 16) and torch.allclose(model([x1, x2]), nt_xent(z[:4], z[4:], 0.2))
