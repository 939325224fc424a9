"""Classification networks: the ResNets and FastNet live in models/convnets.py (captioning's encoder shares FastNet's
trunk); this module picks one by name."""

from __future__ import annotations

from torch import nn

from ...models.convnets import FastNet, ResNet

__all__ = ["FastNet", "ResNet", "build_classifier"]


def build_classifier(name: str, num_classes: int, in_channels: int, widths: tuple[int, ...] = (16, 32, 64, 128),
                     activation: str = "relu", strided_stages: int = 0, pool_first_stages: int = 0) -> nn.Module:
    if name == "resnet18":
        return ResNet([2, 2, 2, 2], num_classes, in_channels)
    if name == "resnet34":
        return ResNet([3, 4, 6, 3], num_classes, in_channels)
    return FastNet(num_classes, in_channels, widths, activation, strided_stages, pool_first_stages=pool_first_stages)
