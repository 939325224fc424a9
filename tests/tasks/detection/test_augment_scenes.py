"""Box-aware augmentation keeps every box on its object; fmnist-scenes are deterministic and exact."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from modelworks.data.detection.augment import DetectionAugmentConfig, augment_detection_batch
from modelworks.data.detection.dataset import FILL
from modelworks.data.detection.scenes import SceneConfig, compose_scenes, ensure_scenes
from modelworks.data.synthetic import write_fashion_mnist


def squares_batch(B: int = 8, size: int = 64):
    """Dark images with one bright square each (its exact box), plus a padding slot."""
    g = torch.Generator().manual_seed(0)
    x = torch.zeros(B, 3, size, size)
    boxes = torch.zeros(B, 2, 4)
    labels = torch.tensor([[1, -1]] * B)
    for b in range(B):
        x1, y1 = torch.randint(8, 30, (2,), generator=g).tolist()
        w, h = torch.randint(12, 24, (2,), generator=g).tolist()
        x[b, :, y1:y1 + h, x1:x1 + w] = 1.0
        boxes[b, 0] = torch.tensor([x1, y1, x1 + w, y1 + h], dtype=torch.float32)
    return x, boxes, labels


def bright_extent(image: torch.Tensor) -> torch.Tensor:
    """Tight box of the pixels brighter than halfway between the fill grey and white."""
    rows, cols = (image[0] > (1 + FILL / 255) / 2).nonzero(as_tuple=True)
    return torch.tensor([cols.min(), rows.min(), cols.max() + 1, rows.max() + 1], dtype=torch.float32)


@pytest.mark.parametrize("cfg", [
    DetectionAugmentConfig(hflip=True, scale=(1.0, 1.0), translate=0.0),
    DetectionAugmentConfig(hflip=True, scale=(0.6, 1.4), translate=0.2, min_visible=0.99),
    DetectionAugmentConfig(hflip=False, scale=(1.0, 1.0), translate=0.0, mosaic=1.0, min_visible=0.99),
    DetectionAugmentConfig(hflip=True, scale=(0.7, 1.3), translate=0.1, mosaic=1.0, mosaic_scale=1.0,
                           min_visible=0.99),
    DetectionAugmentConfig(hflip=False, scale=(0.8, 1.2), translate=0.1, mosaic=0.5, mosaic_scale=0.75,
                           min_visible=0.99),
], ids=["flip", "zoom-shift", "mosaic", "mosaic-full-scale-zoom", "mosaic-some"])
def test_boxes_follow_their_objects(cfg):
    x, boxes, labels = squares_batch()
    g = torch.Generator().manual_seed(1)
    out, out_boxes, out_labels = augment_detection_batch(x, boxes, labels, cfg, g)
    assert out.shape == x.shape and out_boxes.shape[:2] == out_labels.shape
    kept = 0
    for b in range(len(out)):
        for box in out_boxes[b][out_labels[b] >= 0]:
            region = out[b:b + 1, :, int(box[1]):int(box[3]), int(box[0]):int(box[2])][0]
            extent = bright_extent(region) + torch.tensor([box[0], box[1], box[0], box[1]]).floor()
            torch.testing.assert_close(extent, box, atol=1.5, rtol=0)  # bilinear resampling blurs edges by < 1 px
            kept += 1
    assert kept >= len(out) * 0.5


@pytest.mark.parametrize("mosaic_scale", [0.5, 1.0])
def test_mosaic_brings_in_objects_of_other_images(mosaic_scale):
    x, boxes, labels = squares_batch()  # one square per image
    cfg = DetectionAugmentConfig(hflip=False, scale=(1.0, 1.0), translate=0.0, mosaic=1.0,
                                 mosaic_scale=mosaic_scale, min_visible=0.5)
    _, out_boxes, out_labels = augment_detection_batch(x, boxes, labels, cfg, torch.Generator().manual_seed(2))
    per_image = (out_labels >= 0).sum(1)
    assert out_labels.shape[1] == 4 * labels.shape[1] and per_image.max() >= 2
    if mosaic_scale == 0.5:  # the four fit in the canvas: a window off its middle still shows two or more
        assert per_image.min() >= 2


def test_mosaic_closes_for_the_last_part_of_training():
    x, boxes, labels = squares_batch()
    cfg = DetectionAugmentConfig(mosaic=1.0, close_mosaic=0.25)
    early = augment_detection_batch(x, boxes, labels, cfg, torch.Generator().manual_seed(0), progress=0.74)
    late = augment_detection_batch(x, boxes, labels, cfg, torch.Generator().manual_seed(0), progress=0.75)
    assert early[2].shape[1] == 4 * labels.shape[1] and late[2].shape[1] == labels.shape[1]
    assert (late[2] >= 0).sum() >= len(x) // 2  # whole images: most single squares survive the zoom


def test_augmentation_is_a_function_of_the_generator():
    x, boxes, labels = squares_batch()
    cfg = DetectionAugmentConfig(mosaic=0.5, brightness=0.2, contrast=0.2, saturation=0.2)
    first = augment_detection_batch(x, boxes, labels, cfg, torch.Generator().manual_seed(7))
    again = augment_detection_batch(x, boxes, labels, cfg, torch.Generator().manual_seed(7))
    for a, b in zip(first, again):
        assert torch.equal(a, b)


def test_boxes_pushed_out_of_the_image_lose_their_label():
    x, boxes, labels = squares_batch(B=1)
    x[:] = 0
    boxes[0, 0] = torch.tensor([0.0, 0.0, 10.0, 10.0])  # top-left corner
    cfg = DetectionAugmentConfig(hflip=False, scale=(1.0, 1.0), translate=0.0)
    shifted = augment_detection_batch(x, boxes, labels, DetectionAugmentConfig(hflip=False, scale=(2.0, 2.0),
                                                                               translate=0.0),
                                      torch.Generator().manual_seed(0))
    assert (shifted[2] == -1).all() and shifted[1].eq(0).all()  # zoomed about the centre: the corner leaves
    same = augment_detection_batch(x, boxes, labels, cfg, torch.Generator().manual_seed(0))
    assert torch.equal(same[1], boxes)


def test_scenes_are_deterministic_exact_and_limited_in_overlap(tmp_path, capsys):
    fashion = write_fashion_mnist(tmp_path / "fm", n_train=120, n_test=30)
    cfg = SceneConfig(train=12, val=4, test=2, image_size=64, objects=(2, 4), object_size=(16, 30), max_overlap=0.1)
    first = ensure_scenes(tmp_path / "a", cfg, fashion)
    progress = capsys.readouterr().err  # a progress bar per split while generating: it takes ~20 s at full size
    assert all(f"fmnist-scenes {split} (generated once)" in progress for split in ("train", "val", "test"))
    assert "12/12" in progress and "4/4" in progress
    second = ensure_scenes(tmp_path / "b", cfg, fashion)
    for split in ("train", "val", "test"):
        a = json.loads((first / "annotations" / f"instances_{split}.json").read_text())
        b = json.loads((second / "annotations" / f"instances_{split}.json").read_text())
        assert a == b and len(a["images"]) == getattr(cfg, split)
    assert (first / "images" / "train" / "000003.png").read_bytes() == (second / "images" / "train" / "000003.png").read_bytes()
    items = np.zeros((1, 28, 28), np.uint8)
    items[0, 5:20, 8:14] = 255  # one known item: its visible pixels span rows 5-19, columns 8-13 of 28
    for image, boxes, labels in compose_scenes(items, np.array([3]), 5, cfg, seed=0):
        assert (labels == 3).all() and 2 <= len(boxes) <= 4
        for box in boxes:
            w, h = box[2] - box[0], box[3] - box[1]
            assert 0.15 < w / h < 0.7  # the item's 6:15 shape, scaled
        from torchvision.ops import box_iou
        iou = box_iou(torch.from_numpy(boxes), torch.from_numpy(boxes)).fill_diagonal_(0)
        assert iou.max() <= 0.1 + 1e-6


def test_letterbox_keeps_the_aspect_and_pads_below_and_right():
    from modelworks.data.detection.dataset import letterbox

    image = torch.full((3, 30, 60), 200, dtype=torch.uint8)
    canvas, scale = letterbox(image, 64)
    assert scale == pytest.approx(64 / 60) and canvas.shape == (3, 64, 64)
    assert (canvas[:, :32] == 200).all() and (canvas[:, 32:] == FILL).all()
