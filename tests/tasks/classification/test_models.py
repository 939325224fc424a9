"""Classification networks: parameter counts that match the papers' and the seed's, and output shapes."""

from __future__ import annotations

import pytest
import torch

from modelworks.tasks.classification.models import FastNet, ResNet, build_classifier


def count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_resnet18_for_10_classes_has_11_17m_parameters():
    n = count(build_classifier("resnet18", 10, 3, (8,)))
    assert round(n / 1e6, 2) == 11.17
    assert n == 11_173_962  # torchvision's resnet18 minus its 7x7 stem (and 1000-class head), plus a 3x3 stem


def test_resnet34_for_10_classes_has_21_28m_parameters():
    n = count(build_classifier("resnet34", 10, 3, (8,)))
    assert round(n / 1e6, 2) == 21.28


def test_stem_follows_input_channels():
    rgb, gray = build_classifier("resnet18", 10, 3, (8,)), build_classifier("resnet18", 10, 1, (8,))
    assert count(rgb) - count(gray) == 2 * 64 * 3 * 3  # two input channels fewer in the 3x3 stem conv


@pytest.mark.parametrize("name", ["resnet18", "fastnet"])
@pytest.mark.parametrize("channels, size", [(1, 28), (3, 32)])
def test_output_shape(name, channels, size):
    model = build_classifier(name, 7, channels, (8, 16, 16, 32)).eval()
    with torch.no_grad():
        logits = model(torch.randn(2, channels, size, size))
    assert logits.shape == (2, 7)
    assert torch.isfinite(logits).all()


def test_resnet_uses_the_cifar_stem():
    model = build_classifier("resnet18", 10, 3, (8,))
    assert isinstance(model, ResNet)
    conv = model.stem[0]
    assert conv.kernel_size == (3, 3) and conv.stride == (1, 1)
    assert not any(isinstance(m, torch.nn.MaxPool2d) for m in model.modules())


def test_fastnet_widths_set_the_layers():
    model = build_classifier("fastnet", 10, 1, (8, 16, 16, 32))
    assert isinstance(model, FastNet)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [8, 16, 16, 16, 16, 32, 32]
    assert model.fc.in_features == 32 and model.fc.out_features == 10


def test_models_work_in_channels_last():
    model = build_classifier("fastnet", 10, 3, (8, 16, 16, 32)).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        got = model.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("activation, kind", [("relu", torch.nn.ReLU), ("gelu", torch.nn.GELU)])
def test_fastnet_activation_is_configurable(activation, kind):
    model = build_classifier("fastnet", 10, 1, (8, 16, 16, 32), activation)
    acts = [m for m in model.modules() if isinstance(m, (torch.nn.ReLU, torch.nn.GELU))]
    assert len(acts) == 7 and all(isinstance(m, kind) for m in acts)


def test_fastnet_strided_stages_replace_the_first_pools_and_keep_the_output():
    pooled = build_classifier("fastnet", 10, 1, (8, 16, 16, 32), "relu", strided_stages=0)
    strided = build_classifier("fastnet", 10, 1, (8, 16, 16, 32), "relu", strided_stages=2)
    assert sum(isinstance(m, torch.nn.MaxPool2d) for m in pooled.modules()) == 3
    assert sum(isinstance(m, torch.nn.MaxPool2d) for m in strided.modules()) == 1
    strides = [m.stride for m in strided.modules() if isinstance(m, torch.nn.Conv2d)]
    assert strides == [(1, 1), (2, 2), (1, 1), (2, 2), (1, 1), (1, 1), (1, 1)]  # stem, then 2 conv per stage
    x = torch.randn(2, 1, 28, 28)
    assert strided(x).shape == pooled(x).shape == (2, 10)


def test_fastnet_pool_first_stages_move_the_pool_before_the_conv():
    model = build_classifier("fastnet", 10, 1, (8, 16, 16, 32), "relu", pool_first_stages=1)
    first_stage = list(model.features)[3:5]  # after the stem's conv, BN, activation
    assert isinstance(first_stage[0], torch.nn.MaxPool2d) and isinstance(first_stage[1], torch.nn.Conv2d)
    assert sum(isinstance(m, torch.nn.MaxPool2d) for m in model.modules()) == 3
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    with pytest.raises(ValueError, match="not both"):
        build_classifier("fastnet", 10, 1, (8, 16, 16, 32), "relu", strided_stages=1, pool_first_stages=1)
