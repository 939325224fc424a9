"""Box-aware augmentation of whole detection batches on the training device, each image with its own parameters.

Geometry is one affine map per image (zoom about a random point, translation, horizontal flip), applied to the
pixels with grid_sample and to the boxes exactly: an axis-aligned map sends a box's corners to the new box's
corners. Boxes are then clipped to the image; a box that keeps less than `min_visible` of its area, or
becomes thinner than 2 pixels, loses its label (-1, like padding). Mosaic (Bochkovskiy et al., YOLOv4) puts
four images of the batch in the quadrants around a random centre, each at half scale. Colour jitter reuses
the classification augmentation. All randomness comes from the step's generator, so resumed runs repeat it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..augment import color_jitter
from .dataset import FILL


@dataclass
class DetectionAugmentConfig:
    hflip: bool = True  # horizontal flip with probability 0.5
    scale: tuple[float, float] = (0.5, 1.5)  # zoom factor range; [1, 1] disables
    translate: float = 0.1  # shift by up to this fraction of the image size, each axis
    mosaic: float = 0.0  # probability that an image is replaced by a 2x2 mosaic of four batch images
    brightness: float = 0.0  # colour jitter factors drawn from [1 - x, 1 + x]
    contrast: float = 0.0
    saturation: float = 0.0
    min_visible: float = 0.4  # fraction of a box's area that must stay inside the image to keep the box

    def __post_init__(self):
        if not 0 < self.scale[0] <= self.scale[1]:
            raise ValueError(f"data.augment.scale: expected [low, high] with 0 < low <= high (got {self.scale})")
        if not 0 <= self.mosaic <= 1:
            raise ValueError(f"data.augment.mosaic: a probability in [0, 1] (got {self.mosaic})")


def _uniform(n: int, low: float, high: float, g: torch.Generator, device) -> torch.Tensor:
    return torch.rand(n, generator=g, device=device) * (high - low) + low


def affine_images(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, fill: float) -> torch.Tensor:
    """Output pixel p shows input pixel (p - shift) / scale (continuous pixel coordinates, align_corners=False).
    x: float [B, C, H, W]; scale [B]; shift [B, 2] in pixels (x, y)."""
    B, C, H, W = x.shape
    size = torch.tensor([W, H], device=x.device, dtype=x.dtype)
    # In normalised coordinates n = 2p / size - 1: n_in = n_out / s + (1 - 2 shift / size) / s - 1.
    offset = (1 - 2 * shift / size) / scale[:, None] - 1  # B, 2
    theta = torch.zeros(B, 2, 3, device=x.device, dtype=x.dtype)
    theta[:, 0, 0] = theta[:, 1, 1] = 1 / scale
    theta[:, :, 2] = offset
    grid = F.affine_grid(theta, [B, C, H, W], align_corners=False)
    return F.grid_sample(x - fill, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + fill


def clip_boxes(boxes: torch.Tensor, labels: torch.Tensor, areas_before: torch.Tensor, H: int, W: int,
               min_visible: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Clip xyxy boxes [B, M, 4] to the image; drop (label -1) those mostly outside or thinner than 2 px."""
    boxes = torch.stack([boxes[..., 0].clamp(0, W), boxes[..., 1].clamp(0, H),
                         boxes[..., 2].clamp(0, W), boxes[..., 3].clamp(0, H)], -1)
    wh = boxes[..., 2:] - boxes[..., :2]
    visible = wh.prod(-1) >= min_visible * areas_before
    keep = (labels >= 0) & visible & (wh > 2).all(-1)
    return boxes * keep[..., None], torch.where(keep, labels, -1)


def mosaic(x: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor, p: float, min_visible: float,
           g: torch.Generator):
    """Replace each image, with probability p, by a mosaic of itself and the next three images of the batch,
    each at half scale in one quadrant around a centre drawn from the middle half of the canvas."""
    B, C, H, W = x.shape
    device = x.device
    use = torch.rand(B, generator=g, device=device) < p
    centre = torch.stack([_uniform(B, 0.25 * W, 0.75 * W, g, device), _uniform(B, 0.25 * H, 0.75 * H, g, device)], 1)
    out = torch.full_like(x, FILL / 255)
    all_boxes, all_labels = [], []
    half = torch.full((B,), 0.5, device=device)
    size = torch.tensor([W, H], device=device, dtype=x.dtype)
    for q, (qx, qy) in enumerate(((0, 0), (1, 0), (0, 1), (1, 1))):
        source = (torch.arange(B, device=device) + q) % B
        # Quadrant q's image ends at the centre on its inner sides: top-left image's bottom-right corner sits
        # on the centre, and so on.
        corner = torch.tensor([qx, qy], device=device, dtype=x.dtype)
        shift = centre - (1 - corner) * size * 0.5  # B, 2: where the half-size image's origin lands
        placed = affine_images(x[source], half, shift, FILL / 255)
        lo = torch.where(corner.bool(), centre, torch.zeros_like(centre))  # B, 2: the quadrant's extent
        hi = torch.where(corner.bool(), size.expand(B, 2), centre)
        cols = torch.arange(W, device=device) + 0.5
        rows = torch.arange(H, device=device) + 0.5
        inside = (((cols >= lo[:, :1]) & (cols < hi[:, :1]))[:, None, :]
                  & ((rows >= lo[:, 1:]) & (rows < hi[:, 1:]))[:, :, None])  # B, H, W
        out = torch.where(inside[:, None], placed, out)
        b = boxes[source] * 0.5 + shift.repeat(1, 2)[:, None, :]
        clipped = torch.stack([torch.maximum(b[..., 0], lo[:, None, 0]), torch.maximum(b[..., 1], lo[:, None, 1]),
                               torch.minimum(b[..., 2], hi[:, None, 0]), torch.minimum(b[..., 3], hi[:, None, 1])], -1)
        area = (b[..., 2:] - b[..., :2]).prod(-1)
        wh = clipped[..., 2:] - clipped[..., :2]
        keep = (labels[source] >= 0) & (wh > 2).all(-1) & (wh.clamp(min=0).prod(-1) >= min_visible * area)
        all_boxes.append(clipped * keep[..., None])
        all_labels.append(torch.where(keep, labels[source], -1))
    mixed_boxes, mixed_labels = torch.cat(all_boxes, 1), torch.cat(all_labels, 1)  # B, 4M
    M = boxes.shape[1]
    pad = torch.full((B, 3 * M), -1, dtype=labels.dtype, device=device)
    x = torch.where(use[:, None, None, None], out, x)
    boxes = torch.where(use[:, None, None], mixed_boxes, torch.cat([boxes, torch.zeros_like(mixed_boxes[:, M:])], 1))
    labels = torch.where(use[:, None], mixed_labels, torch.cat([labels, pad], 1))
    return x, boxes, labels


def augment_detection_batch(x: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor,
                            cfg: DetectionAugmentConfig, g: torch.Generator):
    """x: float images in [0, 1] [B, C, H, W]; boxes xyxy pixels [B, M, 4]; labels [B, M] (-1 padding).
    Returns the augmented triple; the number of box slots M may grow (mosaic) and dropped boxes get label -1."""
    B, C, H, W = x.shape
    device = x.device
    if cfg.mosaic > 0:
        x, boxes, labels = mosaic(x, boxes, labels, cfg.mosaic, cfg.min_visible, g)
    if cfg.scale != (1.0, 1.0) or cfg.translate > 0:
        s = _uniform(B, cfg.scale[0], cfg.scale[1], g, device)
        size = torch.tensor([W, H], device=device, dtype=x.dtype)
        jitter = (torch.rand(B, 2, generator=g, device=device) * 2 - 1) * cfg.translate * size
        shift = (1 - s[:, None]) * size / 2 + jitter  # zoom about the centre, then shift
        x = affine_images(x, s, shift, FILL / 255)
        areas = (boxes[..., 2:] - boxes[..., :2]).prod(-1) * s[:, None] ** 2
        boxes = boxes * s[:, None, None] + shift.repeat(1, 2)[:, None, :]
        boxes, labels = clip_boxes(boxes, labels, areas, H, W, cfg.min_visible)
    if cfg.hflip:
        flip = torch.rand(B, generator=g, device=device) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        flipped = torch.stack([W - boxes[..., 2], boxes[..., 1], W - boxes[..., 0], boxes[..., 3]], -1)
        boxes = torch.where(flip[:, None, None] & (labels[..., None] >= 0), flipped, boxes)
    if cfg.brightness or cfg.contrast or cfg.saturation:
        x = color_jitter(x, cfg.brightness, cfg.contrast, cfg.saturation, g)
    return x, boxes, labels
