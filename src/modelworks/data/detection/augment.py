"""Box-aware augmentation of whole detection batches on the training device, each image with its own parameters.

Geometry is one affine map per image (zoom about a random point, translation, horizontal flip), applied to the
pixels with grid_sample and to the boxes exactly: an axis-aligned map sends a box's corners to the new box's
corners. Boxes are then clipped to the image; a box that keeps less than `min_visible` of its area, or
becomes thinner than 2 pixels, loses its label (-1, like padding). Mosaic (Bochkovskiy et al., YOLOv4) tiles
four images of the batch 2 x 2 and cuts an image-sized window around a random point near the middle; the window
and the zoom are one affine map, so a mosaic costs one resampling like any other image. Colour jitter reuses
the classification augmentation. All randomness comes from the step's generator, so resumed runs repeat it.
"""

from __future__ import annotations

import math
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
    # Each image's scale in a mosaic: 0.5 fits the four whole (objects shrink by half); 1.0 is YOLOv8's (objects
    # keep their size; the window shows the parts of the four nearest its centre).
    mosaic_scale: float = 0.5
    # Mosaic stops for this last fraction of training (YOLOv8's close_mosaic): the model ends on whole images
    # like the ones it is evaluated on.
    close_mosaic: float = 0.0
    brightness: float = 0.0  # colour jitter factors drawn from [1 - x, 1 + x]
    contrast: float = 0.0
    saturation: float = 0.0
    min_visible: float = 0.4  # fraction of a box's area that must stay inside the image to keep the box

    def __post_init__(self):
        if not 0 < self.scale[0] <= self.scale[1]:
            raise ValueError(f"data.augment.scale: expected [low, high] with 0 < low <= high (got {self.scale})")
        if not 0 <= self.mosaic <= 1:
            raise ValueError(f"data.augment.mosaic: a probability in [0, 1] (got {self.mosaic})")
        if not 0.5 <= self.mosaic_scale <= 1:
            raise ValueError(f"data.augment.mosaic_scale: expected a scale in [0.5, 1] (got {self.mosaic_scale})")
        if not 0 <= self.close_mosaic <= 1:
            raise ValueError(f"data.augment.close_mosaic: a fraction of training in [0, 1] (got {self.close_mosaic})")


def _uniform(n: int, low: float, high: float, g: torch.Generator, device) -> torch.Tensor:
    return torch.rand(n, generator=g, device=device) * (high - low) + low


def affine_images(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, fill: float,
                  out_size: tuple[int, int] | None = None) -> torch.Tensor:
    """Output pixel p shows input pixel (p - shift) / scale (continuous pixel coordinates, align_corners=False).
    x: float [B, C, H, W]; scale [B]; shift [B, 2] in pixels (x, y); out_size (H, W), default the input's."""
    B, C, H, W = x.shape
    out_h, out_w = out_size or (H, W)
    size_in = torch.tensor([W, H], device=x.device, dtype=x.dtype)
    size_out = torch.tensor([out_w, out_h], device=x.device, dtype=x.dtype)
    # Normalised coordinates n = 2p / size - 1 on each side: n_in = n_out * size_out / (s size_in)
    # + (size_out - 2 shift) / (s size_in) - 1.
    ratio = size_out / (scale[:, None] * size_in)  # B, 2
    theta = torch.zeros(B, 2, 3, device=x.device, dtype=x.dtype)
    theta[:, 0, 0], theta[:, 1, 1] = ratio[:, 0], ratio[:, 1]
    theta[:, :, 2] = (size_out - 2 * shift) / (scale[:, None] * size_in) - 1
    grid = F.affine_grid(theta, [B, C, out_h, out_w], align_corners=False)
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


def mosaic_canvas(x: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor, p: float, scale: float,
                  g: torch.Generator):
    """Each image, with probability p, becomes a 2 x 2 canvas of itself and the next three images of the batch,
    each resized by `scale`; the others sit in the top-left corner of an equally large grey canvas. Returns the
    canvases [B, C, 2sH, 2sW], their boxes [B, 4M, 4] (canvas pixels) and labels [B, 4M], and where the H x W
    output window starts in each canvas [B, 2]: centred on a random point of the canvas's middle half for a
    mosaic (so each quadrant shows the part of its image nearest that point), at the origin otherwise."""
    B, C, H, W = x.shape
    device = x.device
    h, w = math.ceil(scale * H), math.ceil(scale * W)  # ceil: two tiles always cover an odd-sized image
    tiles = x if (h, w) == (H, W) else F.interpolate(x, size=(h, w), mode="bilinear", antialias=True,
                                                     align_corners=False)
    nxt = [(torch.arange(B, device=device) + q) % B for q in range(4)]  # quadrant q shows image b + q
    mosaics = torch.cat([torch.cat([tiles, tiles[nxt[1]]], -1), torch.cat([tiles[nxt[2]], tiles[nxt[3]]], -1)], -2)
    plain = torch.full_like(mosaics, FILL / 255)
    plain[..., :H, :W] = x
    use = torch.rand(B, generator=g, device=device) < p
    canvas = torch.where(use[:, None, None, None], mosaics, plain)

    resize = torch.tensor([w / W, h / H] * 2, device=device, dtype=boxes.dtype)
    offsets = [torch.tensor([qx * w, qy * h] * 2, device=device, dtype=boxes.dtype)
               for qx, qy in ((0, 0), (1, 0), (0, 1), (1, 1))]
    M = boxes.shape[1]
    mosaic_boxes = torch.cat([boxes[nxt[q]] * resize + offsets[q] for q in range(4)], 1)
    mosaic_labels = torch.cat([labels[nxt[q]] for q in range(4)], 1)
    boxes = torch.where(use[:, None, None], mosaic_boxes, torch.cat([boxes, boxes.new_zeros(B, 3 * M, 4)], 1))
    labels = torch.where(use[:, None], mosaic_labels, torch.cat([labels, labels.new_full((B, 3 * M), -1)], 1))

    centre = torch.stack([_uniform(B, 0.5 * w, 1.5 * w, g, device), _uniform(B, 0.5 * h, 1.5 * h, g, device)], 1)
    origin = (centre - torch.tensor([W / 2, H / 2], device=device)) * use[:, None]
    return canvas, boxes, labels, origin


def augment_detection_batch(x: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor,
                            cfg: DetectionAugmentConfig, g: torch.Generator, progress: float = 0.0):
    """x: float images in [0, 1] [B, C, H, W]; boxes xyxy pixels [B, M, 4]; labels [B, M] (-1 padding).
    `progress`: the fraction of training done (mosaic stops past 1 - close_mosaic). Returns the augmented
    triple; the number of box slots M may grow (mosaic) and dropped boxes get label -1."""
    B, C, H, W = x.shape
    device = x.device
    source, origin = x, torch.zeros(B, 2, device=device)
    use_mosaic = cfg.mosaic > 0 and progress < 1 - cfg.close_mosaic
    if use_mosaic:
        source, boxes, labels, origin = mosaic_canvas(x, boxes, labels, cfg.mosaic, cfg.mosaic_scale, g)
    if use_mosaic or cfg.scale != (1.0, 1.0) or cfg.translate > 0:
        # One resampling for the mosaic window and the zoom: output p = s (q - origin) + shift for a source
        # pixel q, the zoom about the window's centre and the shift drawn here.
        s = _uniform(B, cfg.scale[0], cfg.scale[1], g, device)
        size = torch.tensor([W, H], device=device, dtype=x.dtype)
        jitter = (torch.rand(B, 2, generator=g, device=device) * 2 - 1) * cfg.translate * size
        shift = (1 - s[:, None]) * size / 2 + jitter - s[:, None] * origin
        x = affine_images(source, s, shift, FILL / 255, (H, W))
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
