"""Detection samples for training: decoded, letterboxed to a square, and batched with padded targets.

An image is scaled by one factor so its longer side is `image_size` and placed at the top-left of a square
canvas filled with grey; boxes are scaled by the same factor. Mapping back to the original image is a single
division (no offset), which `evaluate` uses to score in original pixels.

A batch is a dict of tensors, so the engine can move and split it like any other:
    images    uint8 [B, 3, S, S]
    boxes     float32 [B, M, 4]  xyxy pixels in the letterboxed frame; rows past an image's objects are zero
    labels    int64 [B, M]       -1 marks padding
    image_ids int64 [B]          position of the image in its split
    scales    float32 [B]        letterbox factor (input pixels per original pixel)
Splits that fit in `cache_limit_mb` are decoded once and held on the device (`get_batch`), so training skips
the DataLoader; larger ones are decoded per batch in DataLoader workers.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ...errors import DataError, InputError
from ..image_files import default_max_pixels, read_image
from .formats import DetectionSet

FILL = 114  # letterbox and augmentation fill, the grey YOLO implementations use


def letterbox(image: torch.Tensor, size: int) -> tuple[torch.Tensor, float]:
    """uint8 [3, H, W] -> uint8 [3, size, size] scaled to fit at the top-left, and the scale factor."""
    _, H, W = image.shape
    scale = size / max(H, W)
    # At least one pixel: a 1000x1 strip must not vanish into an empty resize.
    h, w = max(1, min(size, round(H * scale))), max(1, min(size, round(W * scale)))
    if (h, w) != (H, W):
        image = F.interpolate(image[None].float(), size=(h, w), mode="bilinear", align_corners=False,
                              antialias=True)[0].round().clamp(0, 255).to(torch.uint8)
    canvas = torch.full((3, size, size), FILL, dtype=torch.uint8)
    canvas[:, :h, :w] = image
    return canvas, scale


class DetectionImages(Dataset):
    """One split: `__getitem__` decodes and letterboxes an image and returns (image, boxes, labels, id, scale)."""

    def __init__(self, data: DetectionSet, image_size: int):
        self.data = data
        self.image_size = image_size
        self.classes = data.classes

    def __len__(self) -> int:
        return len(self.data.records)

    def __getitem__(self, i: int):
        record = self.data.records[i]
        try:  # the serving predictor's decoder and pixel limit
            image = read_image(record.image, 3, default_max_pixels(self.image_size ** 2), where=str(record.image),
                               field=None, fix="remove or replace the file")
        except InputError as exc:
            raise DataError(str(exc)) from None
        if tuple(image.shape[1:]) != (record.height, record.width):
            raise DataError(f"{record.image}: is {image.shape[2]}x{image.shape[1]} but its annotation says "
                            f"{record.width}x{record.height}; the boxes would not match the image")
        image, scale = letterbox(image, self.image_size)
        boxes = torch.from_numpy(record.boxes) * scale
        return image, boxes, torch.from_numpy(record.labels), i, scale


def collate(samples) -> dict[str, torch.Tensor]:
    """Stack images and pad each image's boxes to the batch's largest object count (labels -1 as padding)."""
    B = len(samples)
    M = max([len(s[2]) for s in samples] + [1])
    boxes = torch.zeros(B, M, 4)
    labels = torch.full((B, M), -1, dtype=torch.int64)
    for b, (_, box, label, _, _) in enumerate(samples):
        boxes[b, :len(label)] = box
        labels[b, :len(label)] = label
    return {"images": torch.stack([s[0] for s in samples]), "boxes": boxes, "labels": labels,
            "image_ids": torch.tensor([s[3] for s in samples], dtype=torch.int64),
            "scales": torch.tensor([s[4] for s in samples], dtype=torch.float32)}


class CachedDetectionImages(Dataset):
    """A whole split decoded once and held on `device`; `get_batch` is one index operation per tensor."""

    def __init__(self, source: DetectionImages, device: torch.device | str = "cpu"):
        self.classes = source.classes
        self.data = source.data
        batch = collate([source[i] for i in range(len(source))])
        self.tensors = {k: v.to(device) for k, v in batch.items()}

    def __len__(self) -> int:
        return len(self.tensors["image_ids"])

    def __getitem__(self, i: int):
        t = self.tensors
        keep = t["labels"][i] >= 0
        return t["images"][i], t["boxes"][i][keep], t["labels"][i][keep], int(t["image_ids"][i]), float(t["scales"][i])

    def get_batch(self, indices: torch.Tensor) -> dict[str, torch.Tensor]:
        indices = indices.to(self.tensors["images"].device)
        batch = {k: v[indices] for k, v in self.tensors.items()}
        M = max(int((batch["labels"] >= 0).sum(1).max()) if len(indices) else 0, 1)  # trim padding to this batch
        batch["boxes"], batch["labels"] = batch["boxes"][:, :M], batch["labels"][:, :M]
        return batch


def build_split(data: DetectionSet, image_size: int, device: torch.device, cache_limit_mb: int) -> Dataset:
    """Held on the device when the decoded images fit in `cache_limit_mb`, else decoded per batch."""
    source = DetectionImages(data, image_size)
    if len(source) * 3 * image_size ** 2 <= cache_limit_mb * 2 ** 20:
        return CachedDetectionImages(source, device)
    return source
