"""Convolutional networks shared by the image tasks: classification's classifiers and captioning's grid encoder.

- `resnet18` / `resnet34`: He et al., "Deep Residual Learning for Image Recognition" (2015), basic blocks,
  with the CIFAR stem the seed uses (one 3x3 conv, stride 1, no max-pool) and He (fan-out) initialisation.
  ResNet-18 for 10 classes: 11.17M parameters.
- `fastnet`: a small VGG-style net in the spirit of Keller Jordan's airbench (CIFAR-10 94% in seconds on a
  GPU): conv-pool-BN-activation blocks, no residuals, a plain conv stem (no frozen whitening layer),
  and a scaled linear head. Built for a CPU-second budget on small images: ReLU rather than airbench's GELU,
  which in our tuning runs was slower per step on a CPU for no accuracy gain (`--set model.activation=gelu`).
"""

from __future__ import annotations

from torch import nn
import torch


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus the identity (or a 1x1 projection when the shape changes), then ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                                          nn.BatchNorm2d(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self, blocks_per_stage: list[int], num_classes: int, in_channels: int = 3):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64),
                                  nn.ReLU(inplace=True))
        stages, channels = [], 64
        for i, (width, blocks) in enumerate(zip([64, 128, 256, 512], blocks_per_stage)):
            stride = 1 if i == 0 else 2
            stage = [BasicBlock(channels, width, stride)] + [BasicBlock(width, width) for _ in range(blocks - 1)]
            stages.append(nn.Sequential(*stage))
            channels = width
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))  # B, 512, H/8, W/8
        return self.fc(torch.flatten(self.pool(x), 1))  # B, num_classes


ACTIVATIONS = {"relu": lambda: nn.ReLU(inplace=True), "gelu": nn.GELU}


def conv_bn(in_channels: int, out_channels: int, activation: str) -> list[nn.Module]:
    return [nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels),
            ACTIVATIONS[activation]()]


def fastnet_features(in_channels: int, widths: tuple[int, ...], activation: str = "relu", strided_stages: int = 0,
                     pool_first_stages: int = 0) -> nn.Sequential:
    """FastNet's convolutional trunk: images [B, C, H, W] -> a feature grid [B, widths[-1], H / 2^k, W / 2^k]
    (k = stages). Classification pools it to a vector; captioning attends over it as a grid."""
    stem, *stage_widths = widths
    layers: list[nn.Module] = conv_bn(in_channels, stem, activation)
    channels = stem
    for i, width in enumerate(stage_widths):
        if i < pool_first_stages:
            # Pool the narrower input instead of the conv's output: the conv runs at a quarter of the pixels
            # and the max-pool moves half the bytes. Cheapest at full resolution, where both costs peak.
            reduce = [nn.MaxPool2d(2), nn.Conv2d(channels, width, 3, padding=1, bias=False)]
        elif i < strided_stages:
            # A stride-2 conv computes only the outputs that pooling would keep: 4x fewer FLOPs and no
            # max-pool backward, which on a CPU costs more than the conv itself at full resolution.
            reduce = [nn.Conv2d(channels, width, 3, stride=2, padding=1, bias=False)]
        else:
            reduce = [nn.Conv2d(channels, width, 3, padding=1, bias=False), nn.MaxPool2d(2)]
        layers += [*reduce, nn.BatchNorm2d(width), ACTIVATIONS[activation](), *conv_bn(width, width, activation)]
        channels = width
    return nn.Sequential(*layers)


class FastNet(nn.Module):
    """Stem conv, then one stage per width: [conv, max-pool 2x2, BN, act, conv-BN-act]; global max-pool; linear.

    Max-pooling right after the first conv of a stage (airbench's order) does the expensive second conv at a
    quarter of the resolution. The logits are scaled down (airbench uses 1/9) which acts like a temperature and
    lets the network train at a high learning rate without label smoothing fighting the scale.
    """

    def __init__(self, num_classes: int, in_channels: int = 1, widths: tuple[int, ...] = (16, 32, 64, 128),
                 activation: str = "relu", strided_stages: int = 0, logit_scale: float = 1 / 9,
                 pool_first_stages: int = 0):
        super().__init__()
        if strided_stages and pool_first_stages:
            raise ValueError("fastnet: choose strided_stages or pool_first_stages, not both")
        self.features = fastnet_features(in_channels, widths, activation, strided_stages, pool_first_stages)
        channels = widths[-1]
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.fc = nn.Linear(channels, num_classes, bias=False)
        self.logit_scale = logit_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.features(x)).flatten(1)  # B, C
        return self.fc(x) * self.logit_scale
