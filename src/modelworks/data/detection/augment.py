"""Box-aware augmentation of whole detection batches on the training device, each image with its own parameters.

Geometry is one affine map per image (zoom about a random point, translation, horizontal flip), applied to the
pixels with grid_sample and to the boxes exactly: an axis-aligned map sends a box's corners to the new box's
corners. Boxes are then clipped to the image; a box that keeps less than `min_visible` of its area, or
becomes thinner than 2 pixels, loses its label (-1, like padding). Mosaic (Bochkovskiy et al., YOLOv4) tiles
four images of the batch 2 x 2 and cuts an image-sized window around a random point near the middle; the window
and the zoom are one affine map, and each tile is resampled straight into the output (four resamplings of an
image's size, no tiling built). Colour jitter reuses
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


def _affine_grid(scale: torch.Tensor, shift: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """grid_sample's grid for: output pixel p shows input pixel (p - shift) / scale (continuous pixel coordinates,
    align_corners=False). scale [B]; shift [B, 2] in pixels (x, y); shape (B, C, H, W) of input and output."""
    B, C, H, W = shape
    size = torch.tensor([W, H], device=shift.device, dtype=shift.dtype)
    # In normalised coordinates n = 2p / size - 1: n_in = n_out / s + (1 - 2 shift / size) / s - 1.
    theta = torch.zeros(B, 2, 3, device=shift.device, dtype=shift.dtype)
    theta[:, 0, 0] = theta[:, 1, 1] = 1 / scale
    theta[:, :, 2] = (1 - 2 * shift / size) / scale[:, None] - 1
    return F.affine_grid(theta, [B, C, H, W], align_corners=False)


def _sample(x: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def affine_images(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, fill: float) -> torch.Tensor:
    """Output pixel p shows input pixel (p - shift) / scale; `fill` outside the input.
    x: float [B, C, H, W]; scale [B]; shift [B, 2] in pixels (x, y)."""
    return _sample(x - fill, _affine_grid(scale, shift, x.shape)) + fill


def clip_boxes(boxes: torch.Tensor, labels: torch.Tensor, areas_before: torch.Tensor, H: int, W: int,
               min_visible: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Clip xyxy boxes [B, M, 4] to the image; drop (label -1) those mostly outside or thinner than 2 px."""
    boxes = torch.stack([boxes[..., 0].clamp(0, W), boxes[..., 1].clamp(0, H),
                         boxes[..., 2].clamp(0, W), boxes[..., 3].clamp(0, H)], -1)
    wh = boxes[..., 2:] - boxes[..., :2]
    visible = wh.prod(-1) >= min_visible * areas_before
    keep = (labels >= 0) & visible & (wh > 2).all(-1)
    return boxes * keep[..., None], torch.where(keep, labels, -1)


QUADRANTS = ((0, 0), (1, 0), (0, 1), (1, 1))  # tile q of a mosaic (x, y) shows batch image b + q


def mosaic_layout(boxes: torch.Tensor, labels: torch.Tensor, p: float, scale: float, H: int, W: int,
                  g: torch.Generator):
    """Where mosaic puts things. Each image, with probability p (`use`), becomes a 2 x 2 tiling of itself and the
    next three images of the batch, each resized by `scale`; an H x W window of the tiling, centred on a random
    point of its middle half, is the new image (each tile shows its part nearest that point). Returns the boxes
    [B, 4M, 4] and labels [B, 4M] in tiling pixels (the unused keep theirs, padded), where each window starts in
    its tiling [B, 2] (the origin for the unused), and `use` [B]."""
    B, M = labels.shape
    device = boxes.device
    use = torch.rand(B, generator=g, device=device) < p
    tile = (scale * W, scale * H)
    mosaic_boxes = torch.cat([boxes[(torch.arange(B, device=device) + q) % B] * scale
                              + torch.tensor([qx * tile[0], qy * tile[1]] * 2, device=device, dtype=boxes.dtype)
                              for q, (qx, qy) in enumerate(QUADRANTS)], 1)
    mosaic_labels = torch.cat([labels[(torch.arange(B, device=device) + q) % B] for q in range(4)], 1)
    boxes = torch.where(use[:, None, None], mosaic_boxes, torch.cat([boxes, boxes.new_zeros(B, 3 * M, 4)], 1))
    labels = torch.where(use[:, None], mosaic_labels, torch.cat([labels, labels.new_full((B, 3 * M), -1)], 1))
    centre = torch.stack([_uniform(B, 0.5 * tile[0], 1.5 * tile[0], g, device),
                          _uniform(B, 0.5 * tile[1], 1.5 * tile[1], g, device)], 1)
    origin = (centre - torch.tensor([W / 2, H / 2], device=device)) * use[:, None]
    return boxes, labels, origin, use


def mosaic_images(x: torch.Tensor, use: torch.Tensor, scale: float, zoom: torch.Tensor, shift: torch.Tensor,
                  fill: float) -> torch.Tensor:
    """The images of `mosaic_layout` under the map output p = zoom * t + shift of tiling pixels t (shift already
    holds the window's origin), without building the tiling: each tile is resampled straight into the output,
    zero (relative to `fill`) outside itself, and the four are summed, since tiles do not overlap. Unused images
    are only zoomed and shifted."""
    B = len(x)
    tile_zoom = zoom * torch.where(use, scale, 1.0)  # output pixels per source pixel
    source = x - fill
    grid = _affine_grid(tile_zoom, shift, x.shape)
    out = _sample(source, grid)  # tile 0: the image itself
    for q, (qx, qy) in enumerate(QUADRANTS[1:], start=1):
        # Tile q's map is tile 0's moved by the tile's origin, (qx, qy) tiles: 2 (qx, qy) in normalised source
        # coordinates (an image spans [-1, 1]). Unused images sample outside [-1, 1], which gives zero.
        step = torch.tensor([2.0 * qx, 2.0 * qy], device=x.device, dtype=x.dtype)
        tile_grid = torch.where(use[:, None, None, None], grid - step, 2.0)
        out = out + _sample(source[(torch.arange(B, device=x.device) + q) % B], tile_grid)
    return out + fill


def augment_detection_batch(x: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor,
                            cfg: DetectionAugmentConfig, g: torch.Generator, progress: float = 0.0):
    """x: float images in [0, 1] [B, C, H, W]; boxes xyxy pixels [B, M, 4]; labels [B, M] (-1 padding).
    `progress`: the fraction of training done (mosaic stops past 1 - close_mosaic). Returns the augmented
    triple; the number of box slots M may grow (mosaic) and dropped boxes get label -1."""
    B, C, H, W = x.shape
    device = x.device
    origin = torch.zeros(B, 2, device=device)
    use_mosaic = cfg.mosaic > 0 and progress < 1 - cfg.close_mosaic
    if use_mosaic:
        boxes, labels, origin, use = mosaic_layout(boxes, labels, cfg.mosaic, cfg.mosaic_scale, H, W, g)
    if use_mosaic or cfg.scale != (1.0, 1.0) or cfg.translate > 0:
        # One map for the mosaic window and the zoom: output p = s (t - origin) + shift for a tiling pixel t
        # (an image pixel without mosaic), the zoom about the window's centre and the shift drawn here.
        s = _uniform(B, cfg.scale[0], cfg.scale[1], g, device)
        size = torch.tensor([W, H], device=device, dtype=x.dtype)
        jitter = (torch.rand(B, 2, generator=g, device=device) * 2 - 1) * cfg.translate * size
        shift = (1 - s[:, None]) * size / 2 + jitter - s[:, None] * origin
        x = (mosaic_images(x, use, cfg.mosaic_scale, s, shift, FILL / 255) if use_mosaic else
             affine_images(x, s, shift, FILL / 255))
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
