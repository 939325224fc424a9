"""`fmnist-scenes`: an offline detection data set composed of real Fashion-MNIST items, written as COCO.

Each scene is a textured background (smooth colour noise plus grain) with a few Fashion-MNIST items pasted at
random scale and position, each tinted with its own colour and blended by its own intensity as alpha, so items
keep their real shapes. Boxes are exact: the tight box of the item's visible pixels. Overlap is limited by
rejection sampling (IoU with every earlier item below `max_overlap`). Items of the train, val and test scenes
come from disjoint pools (Fashion-MNIST train images 0-49,999, 50,000-59,999, and its test set), so no item is
seen in training and evaluation. Everything follows from `seed`: the same settings give the same files.

The scenes are written once as a real COCO data set (images/<split>/*.png, annotations/instances_<split>.json)
and then read through the COCO path like any other data set.
"""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..images import FASHION_MNIST_CLASSES, load_fashion_mnist
from .writers import write_coco


@dataclass
class SceneConfig:
    train: int = 3000  # scenes per split
    val: int = 500
    test: int = 500
    image_size: int = 160  # square scenes, pixels
    objects: tuple[int, int] = (2, 6)  # items per scene, inclusive range
    object_size: tuple[int, int] = (24, 72)  # side of the pasted 28x28 item after scaling, pixels
    max_overlap: float = 0.2  # IoU allowed between two items' boxes
    seed: int = 0

    def __post_init__(self):
        if min(self.train, self.val) < 1 or self.test < 0:
            raise ValueError(f"data.scenes: train and val need at least one scene (got {self.train}, {self.val})")
        if not 1 <= self.objects[0] <= self.objects[1]:
            raise ValueError(f"data.scenes.objects: expected [min, max] with 1 <= min <= max (got {self.objects})")
        if not 8 <= self.object_size[0] <= self.object_size[1] <= self.image_size:
            raise ValueError(f"data.scenes.object_size: expected [min, max] with 8 <= min <= max <= image_size "
                             f"(got {self.object_size})")


def scene_folder(root: Path, cfg: SceneConfig) -> Path:
    """Where scenes with these settings live: the name encodes every setting, so a change regenerates."""
    o, s = cfg.objects, cfg.object_size
    return root / (f"fmnist-scenes-{cfg.image_size}px-{cfg.train}-{cfg.val}-{cfg.test}-o{o[0]}-{o[1]}"
                   f"-s{s[0]}-{s[1]}-ov{cfg.max_overlap:g}-seed{cfg.seed}")


def ensure_scenes(root: Path, cfg: SceneConfig, fashion_root: Path | None = None) -> Path:
    """The scene folder under `root`, generated first if it is not complete. Fashion-MNIST is looked for in
    `fashion_root` (default `root`) and the usual places (see data.images.load_fashion_mnist)."""
    folder = scene_folder(root, cfg)
    if (folder / "settings.json").is_file():
        return folder
    fashion_root = fashion_root or root
    train = load_fashion_mnist(fashion_root, "train", download=False)
    test = load_fashion_mnist(fashion_root, "test", download=False)
    pools = {"train": (train.images[:50_000], train.labels[:50_000]),
             "val": (train.images[50_000:], train.labels[50_000:]),
             "test": (test.images, test.labels)}
    if len(train.labels) <= 50_000:  # a small (test) copy of Fashion-MNIST: split its train set 5:1 instead
        cut = len(train.labels) * 5 // 6
        pools["train"] = (train.images[:cut], train.labels[:cut])
        pools["val"] = (train.images[cut:], train.labels[cut:])
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    for k, split in enumerate(("train", "val", "test")):
        count = getattr(cfg, split)
        if count == 0:
            continue
        images, labels = pools[split]
        samples = compose_scenes(images[:, 0].numpy(), labels.numpy(), count, cfg, seed=cfg.seed * 3 + k)
        # Generating the default set takes about 20 s, once: show it rather than seem to hang.
        samples = tqdm(samples, total=count, desc=f"fmnist-scenes {split} (generated once)", unit="scene",
                       file=sys.stderr, mininterval=0.5, dynamic_ncols=True)
        write_coco(partial / "annotations" / f"instances_{split}.json", partial / "images" / split, samples,
                   FASHION_MNIST_CLASSES)
    (partial / "settings.json").write_text(json.dumps(asdict(cfg)))
    shutil.rmtree(folder, ignore_errors=True)
    partial.rename(folder)  # complete or absent: an interrupted generation leaves only the .partial folder
    return folder


def background(size: int, rng: np.random.Generator) -> np.ndarray:
    """Smooth colour noise (a 5x5 random grid upsampled bicubically) plus fine grain, uint8 [size, size, 3]."""
    coarse = torch.from_numpy(rng.uniform(0, 1, (1, 3, 5, 5)).astype(np.float32))
    smooth = F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)[0].permute(1, 2, 0)
    base = rng.uniform(20, 110) + rng.uniform(20, 90) * smooth.numpy()  # dim enough that bright items stand out
    grain = rng.normal(0, 8, (size, size, 1))
    return np.clip(base + grain, 0, 255).astype(np.uint8)


def _resize_item(item: np.ndarray, side: int) -> np.ndarray:
    x = torch.from_numpy(item.astype(np.float32))[None, None]
    return F.interpolate(x, size=(side, side), mode="bilinear", align_corners=False, antialias=True)[0, 0].numpy()


def _iou(box: np.ndarray, others: np.ndarray) -> np.ndarray:
    if len(others) == 0:
        return np.zeros(0)
    lt = np.maximum(box[:2], others[:, :2])
    rb = np.minimum(box[2:], others[:, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=1)
    area = lambda b: (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])  # noqa: E731
    return inter / (area(box) + area(others) - inter)


def compose_scenes(items: np.ndarray, item_labels: np.ndarray, count: int, cfg: SceneConfig, seed: int):
    """`count` scenes as (image uint8 [S, S, 3], boxes float32 [N, 4] xyxy, labels int64 [N]) from items
    uint8 [M, 28, 28]. Deterministic in `seed`."""
    rng = np.random.default_rng(seed)
    size = cfg.image_size
    for _ in range(count):
        canvas = background(size, rng).astype(np.float32)
        boxes, labels = [], []
        for _ in range(int(rng.integers(cfg.objects[0], cfg.objects[1] + 1))):
            for _attempt in range(20):
                k = int(rng.integers(len(items)))
                side = int(rng.integers(cfg.object_size[0], cfg.object_size[1] + 1))
                alpha = _resize_item(items[k], side) / 255.0
                rows, cols = np.nonzero(alpha > 0.1)  # the item's visible pixels
                if len(rows) == 0:
                    break
                x0, y0 = (int(v) for v in rng.integers(0, size - side + 1, 2))
                box = np.array([x0 + cols.min(), y0 + rows.min(), x0 + cols.max() + 1, y0 + rows.max() + 1],
                               dtype=np.float32)
                if (_iou(box, np.array(boxes).reshape(-1, 4)) <= cfg.max_overlap).all():
                    colour = rng.uniform(120, 255, 3)  # bright tints on the dim backgrounds
                    colour[rng.integers(3)] = rng.uniform(0, 255)
                    a = alpha[..., None]
                    patch = canvas[y0:y0 + side, x0:x0 + side]
                    canvas[y0:y0 + side, x0:x0 + side] = patch * (1 - a) + colour * a
                    boxes.append(box)
                    labels.append(int(item_labels[k]))
                    break
        yield (np.clip(canvas, 0, 255).astype(np.uint8), np.array(boxes, dtype=np.float32).reshape(-1, 4),
               np.array(labels, dtype=np.int64))
