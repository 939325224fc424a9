"""The detectors: the seed's YOLOv1, corrected, and an anchor-free one-stage detector in the style of YOLOv8.

Every model returns its raw head output from `forward`: that is what the loss needs and what is exported. A
separate decoder module turns it into [B, N, 4 + C] boxes (xyxy pixels of the input) and class scores; the
decoder and NMS run outside the exported graph.

`yolov1` follows Redmon et al., "You Only Look Once" (2016) as the seed lays it out: an S x S grid, B boxes per
cell, each box with (x, y, w, h, confidence) and its own class logits (the seed's layout). Unlike the seed,
the head's outputs are parametrised so every box is valid: the centre is a sigmoid offset inside its cell, and
sqrt(w), sqrt(h) are sigmoids of the image size (the paper regresses square roots). The backbone is a plain
conv stack; an adaptive pool makes the grid S x S whatever the input size (the seed's stack gives 28 x 28
cells at 448 pixels, not the 7 x 7 it documents).

`anchor-free` follows the YOLOv8 design (Jocher et al., ultralytics, 2023), which combines FCOS's anchor-free
points (Tian et al., 2019), a CSP backbone with C2f blocks and SPPF, a PAN neck (Liu et al., 2018) at strides
8/16/32, decoupled classification and box branches (YOLOX, Ge et al., 2021), and box edges predicted as
distributions over `reg_max` bins (Generalized Focal Loss, Li et al., 2020). Written here from the papers.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from .boxes import anchor_points, distances_to_boxes

# (widths of stem, stage 1..4, C2f depth unit) per size: `n` and `s` are YOLOv8n/s's widths and depths.
# `t` is a toy size for tests and seconds-scale runs.
SIZES = {"t": ((8, 16, 32, 64, 128), 1), "n": ((16, 32, 64, 128, 256), 1), "s": ((32, 64, 128, 256, 512), 1),
         "m": ((48, 96, 192, 384, 576), 2)}


class ConvBNAct(nn.Sequential):
    def __init__(self, c_in: int, c_out: int, k: int = 1, s: int = 1, act: type = nn.SiLU):
        super().__init__(nn.Conv2d(c_in, c_out, k, s, k // 2, bias=False),
                         nn.BatchNorm2d(c_out, eps=1e-3, momentum=0.03), act())


class Bottleneck(nn.Module):
    def __init__(self, c: int, shortcut: bool):
        super().__init__()
        self.cv1, self.cv2 = ConvBNAct(c, c, 3), ConvBNAct(c, c, 3)
        self.shortcut = shortcut

    def forward(self, x):
        y = self.cv2(self.cv1(x))
        return x + y if self.shortcut else y


class C2f(nn.Module):
    """CSP block with two convolutions: split the features, run n bottlenecks on one half, concatenate every
    intermediate output, fuse with a 1x1 conv."""

    def __init__(self, c_in: int, c_out: int, n: int, shortcut: bool):
        super().__init__()
        self.c = c_out // 2
        self.cv1 = ConvBNAct(c_in, 2 * self.c)
        self.blocks = nn.ModuleList(Bottleneck(self.c, shortcut) for _ in range(n))
        self.cv2 = ConvBNAct((2 + n) * self.c, c_out)

    def forward(self, x):
        parts = list(self.cv1(x).chunk(2, 1))
        for block in self.blocks:
            parts.append(block(parts[-1]))
        return self.cv2(torch.cat(parts, 1))


class SPPF(nn.Module):
    """Spatial pyramid pooling, fast: three chained 5x5 max-pools see 5, 9 and 13 pixel windows."""

    def __init__(self, c: int):
        super().__init__()
        self.cv1, self.cv2 = ConvBNAct(c, c // 2), ConvBNAct(c * 2, c)
        self.pool = nn.MaxPool2d(5, 1, 2)

    def forward(self, x):
        y = [self.cv1(x)]
        for _ in range(3):
            y.append(self.pool(y[-1]))
        return self.cv2(torch.cat(y, 1))


class AnchorFreeDetector(nn.Module):
    """Backbone -> PAN neck -> per-level decoupled heads. forward: images [B, 3, S, S] -> raw [B, A, 4R + C],
    A = anchor points over strides 8/16/32, R = reg_max distance bins per box edge, C = classes."""

    strides = (8, 16, 32)

    def __init__(self, num_classes: int, size: str = "n", reg_max: int = 16, image_size: int = 640):
        super().__init__()
        (c0, c1, c2, c3, c4), d = SIZES[size]
        self.num_classes, self.reg_max = num_classes, reg_max
        self.stem = nn.Sequential(ConvBNAct(3, c0, 3, 2), ConvBNAct(c0, c1, 3, 2), C2f(c1, c1, d, True))
        self.stage3 = nn.Sequential(ConvBNAct(c1, c2, 3, 2), C2f(c2, c2, 2 * d, True))  # stride 8
        self.stage4 = nn.Sequential(ConvBNAct(c2, c3, 3, 2), C2f(c3, c3, 2 * d, True))  # stride 16
        self.stage5 = nn.Sequential(ConvBNAct(c3, c4, 3, 2), C2f(c4, c4, d, True), SPPF(c4))  # stride 32
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.top_down4 = C2f(c4 + c3, c3, d, False)
        self.top_down3 = C2f(c3 + c2, c2, d, False)
        self.down3 = ConvBNAct(c2, c2, 3, 2)
        self.bottom_up4 = C2f(c2 + c3, c3, d, False)
        self.down4 = ConvBNAct(c3, c3, 3, 2)
        self.bottom_up5 = C2f(c3 + c4, c4, d, False)
        box_width, cls_width = max(16, c2 // 4, 4 * reg_max), max(c2, min(num_classes, 100))
        self.box_heads = nn.ModuleList(
            nn.Sequential(ConvBNAct(c, box_width, 3), ConvBNAct(box_width, box_width, 3),
                          nn.Conv2d(box_width, 4 * reg_max, 1)) for c in (c2, c3, c4))
        self.cls_heads = nn.ModuleList(
            nn.Sequential(ConvBNAct(c, cls_width, 3), ConvBNAct(cls_width, cls_width, 3),
                          nn.Conv2d(cls_width, num_classes, 1)) for c in (c2, c3, c4))
        for box_head, cls_head, s in zip(self.box_heads, self.cls_heads, self.strides):
            nn.init.constant_(box_head[-1].bias, 1.0)
            # Start from a small prior: about 5 objects per image spread over this level's cells.
            prior = 5 / num_classes / (image_size / s) ** 2
            nn.init.constant_(cls_head[-1].bias, math.log(prior / (1 - prior)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p3 = self.stage3(self.stem(x))
        p4 = self.stage4(p3)
        p5 = self.stage5(p4)
        t4 = self.top_down4(torch.cat([self.up(p5), p4], 1))
        n3 = self.top_down3(torch.cat([self.up(t4), p3], 1))
        n4 = self.bottom_up4(torch.cat([self.down3(n3), t4], 1))
        n5 = self.bottom_up5(torch.cat([self.down4(n4), p5], 1))
        outputs = []
        for feature, box_head, cls_head in zip((n3, n4, n5), self.box_heads, self.cls_heads):
            y = torch.cat([box_head(feature), cls_head(feature)], 1)  # B, 4R + C, h, w
            outputs.append(y.flatten(2))  # B, 4R + C, h * w
        return torch.cat(outputs, 2).transpose(1, 2)  # B, A, 4R + C


class AnchorFreeDecoder(nn.Module):
    """Raw [B, A, 4R + C] -> [B, A, 4 + C]: each edge distance is the expectation of its bin distribution (in
    strides), boxes xyxy pixels, class scores sigmoid."""

    def __init__(self, num_classes: int, reg_max: int, image_size: int, strides: tuple[int, ...]):
        super().__init__()
        self.num_classes, self.reg_max = num_classes, reg_max
        points, stride = anchor_points(image_size, strides)
        self.register_buffer("points", points, persistent=False)
        self.register_buffer("stride", stride, persistent=False)
        self.register_buffer("bins", torch.arange(reg_max, dtype=torch.float32), persistent=False)

    def distances(self, raw: torch.Tensor) -> torch.Tensor:
        """Edge distances in strides, [B, A, 4], from the bin logits of raw."""
        B, A, _ = raw.shape
        logits = raw[..., :4 * self.reg_max].float().reshape(B, A, 4, self.reg_max)
        return logits.softmax(-1) @ self.bins

    def forward(self, raw: torch.Tensor) -> torch.Tensor:
        boxes = distances_to_boxes(self.points, self.distances(raw) * self.stride)
        return torch.cat([boxes, raw[..., 4 * self.reg_max:].float().sigmoid()], -1)


class YOLOv1(nn.Module):
    """A conv backbone to stride 32, pooled to an S x S grid, and the seed's head:
    images [B, 3, H, W] -> raw [B, S, S, boxes, 5 + C] (tx, ty, tw, th, confidence, class logits)."""

    def __init__(self, num_classes: int, grid: int = 7, boxes_per_cell: int = 2,
                 widths: tuple[int, ...] = (32, 64, 128, 256, 512), head_width: int = 512):
        super().__init__()
        self.num_classes, self.grid, self.boxes_per_cell = num_classes, grid, boxes_per_cell
        act = lambda: nn.LeakyReLU(0.1)  # noqa: E731  (the paper's activation)
        layers, c_in = [], 3
        for c in widths:  # each stage halves the resolution: five stages reach stride 32
            layers += [ConvBNAct(c_in, c, 3, 2, act), ConvBNAct(c, c, 3, 1, act)]
            c_in = c
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(grid))
        self.head = nn.Sequential(ConvBNAct(c_in, head_width, 3, 1, act),
                                  nn.Conv2d(head_width, boxes_per_cell * (5 + num_classes), 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.head(self.features(x))  # B, boxes * (5 + C), S, S
        B, _, S, _ = y.shape
        return y.permute(0, 2, 3, 1).reshape(B, S, S, self.boxes_per_cell, 5 + self.num_classes)


class YOLOv1Decoder(nn.Module):
    """Raw [B, S, S, boxes, 5 + C] -> [B, S * S * boxes, 4 + C]: centre = (cell + sigmoid) / S, size =
    sigmoid^2 of the image, score of class c = sigmoid(confidence) * softmax(class logits)_c."""

    def __init__(self, image_size: int):
        super().__init__()
        self.image_size = image_size

    def forward(self, raw: torch.Tensor) -> torch.Tensor:
        raw = raw.float()
        B, S, _, K, _ = raw.shape
        cells = torch.arange(S, device=raw.device, dtype=raw.dtype)
        offset = torch.stack(torch.meshgrid(cells, cells, indexing="xy"), -1)[:, :, None, :]  # S, S, 1, 2 (x, y)
        centre = (offset + raw[..., :2].sigmoid()) / S
        size = raw[..., 2:4].sigmoid().pow(2)
        boxes = torch.cat([centre - size / 2, centre + size / 2], -1) * self.image_size
        scores = raw[..., 4:5].sigmoid() * raw[..., 5:].softmax(-1)
        return torch.cat([boxes, scores], -1).reshape(B, S * S * K, -1)


def build_decoder(name: str, num_classes: int, image_size: int, reg_max: int = 16,
                  strides: tuple[int, ...] = AnchorFreeDetector.strides) -> nn.Module:
    """The decoder of a model's raw head output (evaluation's and the predictor's, so both decode alike)."""
    if name == "yolov1":
        return YOLOv1Decoder(image_size)
    return AnchorFreeDecoder(num_classes, reg_max, image_size, tuple(strides))


def fuse_for_inference(model: nn.Module) -> nn.Module:
    """An evaluation-mode copy with every Conv + BatchNorm pair folded into one convolution: the same function
    (to float rounding), one kernel fewer per layer, which matters most at batch 1 on a CPU."""
    fused = copy.deepcopy(model).eval()
    for module in fused.modules():
        if isinstance(module, ConvBNAct) and isinstance(module[1], nn.BatchNorm2d):
            module[0] = fuse_conv_bn_eval(module[0], module[1])
            module[1] = nn.Identity()
    return fused
