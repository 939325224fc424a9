"""The detection task end to end on small data: every data source through Task.datasets, config errors, and one
batch overfit to near-perfect mAP (what the contract's loss checks cannot see)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from modelworks.config import load_config
from modelworks.data.detection.writers import write_coco, write_voc, write_yolo
from modelworks.engine.batches import fetch
from modelworks.errors import ConfigError
from modelworks.tasks.detection.task import DetectionTask

CPU = torch.device("cpu")
CLASSES = ["box", "bar"]


def shapes(n: int, seed: int, size: int = 64):
    """Grey images with bright rectangles: 'box' is square-ish, 'bar' tall and narrow (wider than the finest
    stride, 8 px: thinner objects get a single anchor point and learn far more slowly). Learnable in seconds."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        image = np.full((size, size, 3), 40, np.uint8)
        boxes, labels = [], []
        for k in range(int(rng.integers(1, 3))):
            label = int(rng.integers(2))
            w, h = (int(rng.integers(14, 22)),) * 2 if label == 0 else (10, int(rng.integers(24, 32)))
            x0 = int(rng.integers(0, size // 2 - w)) + (size // 2) * k
            y0 = int(rng.integers(0, size - h))
            image[y0:y0 + h, x0:x0 + w] = (220, 200, 60) if label == 0 else (60, 200, 220)
            boxes.append([x0, y0, x0 + w, y0 + h])
            labels.append(label)
        out.append((image, np.array(boxes, np.float32), np.array(labels)))
    return out


def task_for(source: str, data: dict | None = None, **model) -> DetectionTask:
    raw = {"task": "detection", "data": {"source": source, "image_size": 64, **(data or {})},
           "model": {"name": "anchor-free", "size": "t", "reg_max": 8, **model},
           "train": {"device": "cpu", "precision": "fp32", "channels_last": False}}
    return DetectionTask(load_config(DetectionTask, raw))


def check_splits(task: DetectionTask, train: int, val: int, test: int | None):
    splits = task.datasets(CPU)
    assert task.class_names() == CLASSES
    assert (len(splits.train), len(splits.val)) == (train, val)
    assert (len(splits.test) if splits.test is not None else None) == test
    (batch,) = fetch(splits.train, iter([torch.arange(4)]), CPU, 0, splits.collate_fn)
    assert batch["images"].shape == (4, 3, 64, 64) and batch["images"].dtype == torch.uint8
    assert batch["boxes"].shape[:2] == batch["labels"].shape and (batch["labels"] >= 0).any()


def test_voc_source(tmp_path):
    write_voc(tmp_path, {"train": shapes(6, 0), "val": shapes(2, 1), "test": shapes(3, 2)}, CLASSES, suffix=".png")
    check_splits(task_for(f"voc:{tmp_path}", data={"classes": CLASSES}), 6, 2, 3)
    assert task_for(f"voc:{tmp_path}").class_names() == sorted(CLASSES)  # without data.classes: found, sorted


def test_coco_source_with_split_placeholder_and_without(tmp_path):
    for split, n in (("train", 8), ("val", 2)):
        write_coco(tmp_path / f"instances_{split}.json", tmp_path / split, shapes(n, n), CLASSES)
    check_splits(task_for(f"coco:{tmp_path}/instances_{{split}}.json:{tmp_path}/{{split}}"), 8, 2, None)
    check_splits(task_for(f"coco:{tmp_path}/instances_train.json:{tmp_path}/train"), 7, 1, None)  # 10% held out


def test_yolo_source(tmp_path):
    data_yaml = write_yolo(tmp_path, {"train": shapes(5, 0), "val": shapes(3, 1)}, CLASSES)
    check_splits(task_for(f"yolo:{data_yaml}"), 5, 3, None)


@pytest.mark.parametrize("source, message", [
    ("imagefolder:x", "data.source: 'imagefolder:x' is not a detection data source"),
    ("coco:only.json", "a COCO source names its annotation file and image folder"),
    ("voc", "is not a detection data source"),
])
def test_bad_sources_are_config_errors(source, message):
    with pytest.raises(ConfigError, match=message):
        task_for(source)


def test_yolov1_grid_must_fit_the_image_size():
    with pytest.raises(ConfigError, match="model.grid: yolov1's 7x7 grid must divide the 2x2 stride-32 feature map"):
        task_for("fmnist-scenes", name="yolov1", grid=7)


@pytest.mark.parametrize("name", ["anchor-free", "yolov1"])
def test_one_batch_overfits_to_near_perfect_map(name, tmp_path):
    write_coco(tmp_path / "instances_train.json", tmp_path / "train", shapes(8, 0), CLASSES)
    source = f"coco:{tmp_path}/instances_train.json:{tmp_path}/train"
    extra = {"grid": 2, "widths": [16, 16, 32, 32, 64], "head_width": 64, "boxes_per_cell": 2} if name == "yolov1" else {}
    task = task_for(source, name=name, **extra)
    splits = task.datasets(CPU)
    (raw,) = fetch(splits.train, iter([torch.arange(len(splits.train))]), CPU, 0, splits.collate_fn)
    batch = task.prepare_batch(raw, None)
    torch.manual_seed(0)
    model = task.build_model().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0)
    for _ in range(150 if name == "anchor-free" else 250):
        task.step(model, batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    with torch.no_grad():
        # BatchNorm's running statistics lag a few hundred fast steps (momentum 0.03): recompute them exactly
        # on the batch, so evaluation mode sees what training saw.
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.reset_running_stats()
                module.momentum = None  # a cumulative average: one pass gives the batch's exact statistics
        model(batch["images"])
        report_dir = tmp_path / "report"
        report_dir.mkdir()
        metrics = task.evaluate(model.eval(), [batch], report_dir)
    assert metrics["map50"] > 0.95, metrics
    # The report's score calibration: served detections of a model that found every object are mostly right.
    assert metrics["score_detections"] >= 8 and metrics["score_precision"] > 0.5, metrics
    assert 0 <= metrics["score_ece"] <= 1
    assert (report_dir / "score_reliability.png").stat().st_size > 1000
    table = json.loads((report_dir / "score_reliability.json").read_text())
    assert sum(table["count"]) == metrics["score_detections"] and table["min_score"] == 0.25


def test_uncached_split_batches_equal_cached_ones(tmp_path):
    write_coco(tmp_path / "instances_train.json", tmp_path / "train", shapes(10, 3, size=48), CLASSES)
    source = f"coco:{tmp_path}/instances_train.json:{tmp_path}/train"
    batches = []
    for limit in (2048, 0):  # held in memory, then decoded per batch through a DataLoader
        splits = task_for(source, data={"cache_limit_mb": limit}).datasets(CPU)
        assert hasattr(splits.train, "get_batch") == (limit > 0)
        (batch,) = fetch(splits.train, iter([torch.tensor([4, 0, 2])]), CPU, 0, splits.collate_fn)
        batches.append(batch)
    for key in batches[0]:
        assert torch.equal(batches[0][key], batches[1][key]), key
    assert batches[0]["images"].shape == (3, 3, 64, 64)  # 48-pixel images scaled up into 64
    torch.testing.assert_close(batches[0]["scales"], torch.full((3,), 64 / 48))


def test_draw_batch_draws_each_box_where_the_loss_sees_it(tmp_path):
    """`modelworks debug augment` draws the boxes after augmentation: a box flipped with its image is drawn at
    its new place, and padding slots (label -1) are not drawn."""
    from helpers import tiny_detection_raw
    from modelworks.tasks.detection.report import PALETTE

    task = DetectionTask(load_config(DetectionTask, tiny_detection_raw(tmp_path)))
    boxes = torch.tensor([[[8.0, 16.0, 24.0, 48.0], [0, 0, 64, 64]]])
    batch = {"images": torch.zeros(1, 3, 64, 64), "boxes": boxes, "labels": torch.tensor([[2, -1]])}
    (drawn,) = task.draw_batch(batch, min_side=64)
    colour = torch.tensor([int(PALETTE[2][i:i + 2], 16) for i in (1, 3, 5)], dtype=torch.uint8)
    assert drawn.shape == (3, 64, 64) and drawn.dtype == torch.uint8
    assert torch.equal(drawn[:, 40, 8], colour)  # the box's left edge
    assert torch.equal(drawn[:, 40, 40], torch.zeros(3, dtype=torch.uint8))  # outside it: the image
    assert torch.equal(drawn[:, 63, 63], torch.zeros(3, dtype=torch.uint8))  # the padding slot's frame: not drawn
    flipped = {**batch, "images": batch["images"].flip(-1), "boxes": torch.tensor([[[40.0, 16.0, 56.0, 48.0]]]),
               "labels": torch.tensor([[2]])}
    (moved,) = task.draw_batch(flipped, min_side=128)  # enlarged 2x, boxes with it
    assert moved.shape == (3, 128, 128)
    assert torch.equal(moved[:, 80, 112], colour) and torch.equal(moved[:, 80, 16], torch.zeros(3, dtype=torch.uint8))
