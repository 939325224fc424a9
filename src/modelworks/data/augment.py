"""Image augmentation on whole batches on the training device, each image with its own random parameters.

The seed augments one PIL image at a time in DataLoader workers, which is the bottleneck of its training on a
CPU. Here a batch of uint8 images [B, C, H, W] is augmented by a few tensor operations, drawing every random
number from the step's generator so a resumed run repeats them exactly. torchvision.transforms.v2 would apply
one set of parameters to the whole batch, which is why these per-sample versions exist.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class AugmentConfig:
    crop_padding: int = 0  # random crop after zero-padding by this many pixels; 0 disables
    hflip: bool = False  # horizontal flip with probability 0.5
    brightness: float = 0.0  # colour jitter: factors drawn from [1 - x, 1 + x]
    contrast: float = 0.0
    saturation: float = 0.0  # ignored for single-channel images
    rotation_deg: float = 0.0  # random rotation in [-x, x] degrees
    erasing_p: float = 0.0  # random erasing (cutout) probability per image
    erasing_scale: tuple[float, float] = (0.02, 0.33)  # erased area as a fraction of the image


def _uniform(n: int, low: float, high: float, g: torch.Generator, device) -> torch.Tensor:
    return torch.rand(n, generator=g, device=device) * (high - low) + low


def random_crop(x: torch.Tensor, padding: int, g: torch.Generator) -> torch.Tensor:
    """Zero-pad by `padding` (torchvision's RandomCrop default) and cut each image at its own random offset."""
    B, C, H, W = x.shape
    padded = F.pad(x, (padding,) * 4)  # B, C, H + 2p, W + 2p
    dy = torch.randint(0, 2 * padding + 1, (B,), generator=g, device=x.device)
    dx = torch.randint(0, 2 * padding + 1, (B,), generator=g, device=x.device)
    rows = (dy[:, None] + torch.arange(H, device=x.device))[:, None, :, None]  # B, 1, H, 1
    cols = (dx[:, None] + torch.arange(W, device=x.device))[:, None, None, :]  # B, 1, 1, W
    out = padded.gather(2, rows.expand(B, C, H, W + 2 * padding))  # B, C, H, W + 2p
    return out.gather(3, cols.expand(B, C, H, W))


def random_hflip(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    flip = torch.rand(x.shape[0], generator=g, device=x.device) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def color_jitter(x: torch.Tensor, brightness: float, contrast: float, saturation: float, g: torch.Generator
                 ) -> torch.Tensor:
    """x: float images in [0, 1]. Same factor ranges as torchvision's ColorJitter, applied in its order."""
    B = x.shape[0]
    view = (B, 1, 1, 1)
    if brightness:
        x = x * _uniform(B, 1 - brightness, 1 + brightness, g, x.device).view(view)
    if contrast:
        gray = x.mean(dim=1, keepdim=True) if x.shape[1] == 1 else _grayscale(x)
        mean = gray.mean(dim=(1, 2, 3), keepdim=True)
        x = mean + (x - mean) * _uniform(B, 1 - contrast, 1 + contrast, g, x.device).view(view)
    if saturation and x.shape[1] == 3:
        gray = _grayscale(x)
        x = gray + (x - gray) * _uniform(B, 1 - saturation, 1 + saturation, g, x.device).view(view)
    return x.clamp(0, 1)


def _grayscale(x: torch.Tensor) -> torch.Tensor:
    r, gch, b = x.unbind(1)
    return (0.299 * r + 0.587 * gch + 0.114 * b).unsqueeze(1)


def random_rotation(x: torch.Tensor, max_degrees: float, g: torch.Generator) -> torch.Tensor:
    """Rotate each image by its own angle about the centre; corners filled with 0 like torchvision's."""
    B = x.shape[0]
    angle = _uniform(B, -max_degrees, max_degrees, g, x.device) * (math.pi / 180)
    cos, sin = angle.cos(), angle.sin()
    zero = torch.zeros_like(cos)
    theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)  # B, 2, 3
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def random_erasing(x: torch.Tensor, p: float, scale: tuple[float, float], g: torch.Generator) -> torch.Tensor:
    """Zero a random rectangle (area fraction in `scale`, aspect ratio in [0.3, 3.3]) in a fraction p of images.
    Applied after normalisation, so 0 is the data-set mean, as in torchvision's RandomErasing(value=0)."""
    B, _, H, W = x.shape
    area = _uniform(B, scale[0], scale[1], g, x.device) * H * W
    log_ratio = _uniform(B, math.log(0.3), math.log(3.3), g, x.device)
    h = (area * log_ratio.exp()).sqrt().round().clamp(1, H)
    w = (area / log_ratio.exp()).sqrt().round().clamp(1, W)
    top = (torch.rand(B, generator=g, device=x.device) * (H - h + 1)).floor()
    left = (torch.rand(B, generator=g, device=x.device) * (W - w + 1)).floor()
    apply = torch.rand(B, generator=g, device=x.device) < p
    ys = torch.arange(H, device=x.device)[None, :]
    xs = torch.arange(W, device=x.device)[None, :]
    in_rows = (ys >= top[:, None]) & (ys < (top + h)[:, None])  # B, H
    in_cols = (xs >= left[:, None]) & (xs < (left + w)[:, None])  # B, W
    mask = in_rows[:, :, None] & in_cols[:, None, :] & apply[:, None, None]  # B, H, W
    return x.masked_fill(mask[:, None], 0.0)


def augment_batch(images: torch.Tensor, cfg: AugmentConfig, mean: torch.Tensor, std: torch.Tensor,
                  g: torch.Generator | None) -> torch.Tensor:
    """uint8 [B, C, H, W] -> normalised float; augmented per `cfg` when a generator is given."""
    x = images
    if g is not None and cfg.crop_padding:
        x = random_crop(x, cfg.crop_padding, g)
    if g is not None and cfg.hflip:
        x = random_hflip(x, g)
    x = x.float().div_(255)
    if g is not None and (cfg.brightness or cfg.contrast or cfg.saturation):
        x = color_jitter(x, cfg.brightness, cfg.contrast, cfg.saturation, g)
    if g is not None and cfg.rotation_deg:
        x = random_rotation(x, cfg.rotation_deg, g)
    x = (x - mean) / std
    if g is not None and cfg.erasing_p:
        x = random_erasing(x, cfg.erasing_p, cfg.erasing_scale, g)
    return x
