"""Box maths against torchvision's references: IoU, CIoU, NMS, and the anchor-point layout."""

from __future__ import annotations

import torch
from torchvision.ops import box_iou, complete_box_iou

from modelworks.tasks.detection.boxes import (anchor_points, boxes_to_distances, distances_to_boxes,
                                              elementwise_ciou, elementwise_iou, postprocess)


def random_boxes(n: int, seed: int, size: float = 100.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * size
    wh = torch.rand(n, 2, generator=g) * size / 2 + 1
    return torch.cat([xy, xy + wh], 1)


def test_elementwise_iou_matches_torchvision_pairwise_diagonal():
    a, b = random_boxes(200, 0), random_boxes(200, 1)
    torch.testing.assert_close(elementwise_iou(a, b), box_iou(a, b).diagonal(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(elementwise_iou(a, a), torch.ones(200), atol=1e-6, rtol=0)


def test_elementwise_ciou_matches_torchvision():
    a, b = random_boxes(200, 2), random_boxes(200, 3)
    torch.testing.assert_close(elementwise_ciou(a, b), complete_box_iou(a, b).diagonal(), atol=1e-5, rtol=1e-4)


def test_distance_encoding_round_trips():
    points = torch.tensor([[10.0, 10.0], [50.0, 40.0]])
    boxes = torch.tensor([[0.0, 5.0, 20.0, 30.0], [30.0, 20.0, 90.0, 41.0]])
    torch.testing.assert_close(distances_to_boxes(points, boxes_to_distances(points, boxes)), boxes)


def test_anchor_points_cover_each_level_row_major():
    points, strides = anchor_points(64, (8, 16, 32))
    assert points.shape == (64 + 16 + 4, 2) and strides.shape == (84, 1)
    torch.testing.assert_close(points[:2], torch.tensor([[4.0, 4.0], [12.0, 4.0]]))  # x runs fastest
    torch.testing.assert_close(points[64], torch.tensor([8.0, 8.0]))
    torch.testing.assert_close(points[-1], torch.tensor([48.0, 48.0]))
    assert strides[:64].eq(8).all() and strides[-4:].eq(32).all()


def greedy_nms(boxes, scores, labels, threshold):
    """The seed's algorithm, per class: sort by score, keep a box unless it overlaps a kept one too much."""
    kept = []
    for i in scores.argsort(descending=True).tolist():
        if all(labels[j] != labels[i] or box_iou(boxes[i:i + 1], boxes[j:j + 1]).item() <= threshold for j in kept):
            kept.append(i)
    return kept


def test_postprocess_equals_a_reference_greedy_nms():
    boxes = random_boxes(60, 4, size=50.0)  # crowded: many overlaps
    g = torch.Generator().manual_seed(5)
    scores = torch.rand(60, 3, generator=g)
    prediction = torch.cat([boxes, scores], 1)[None]
    (result,) = postprocess(prediction, score_threshold=0.2, iou_threshold=0.5, max_detections=100)
    best, labels = scores.max(1)
    keep = best > 0.2
    idx = keep.nonzero().squeeze(1)
    expected = idx[greedy_nms(boxes[keep], best[keep], labels[keep], 0.5)]
    assert sorted(expected.tolist()) == sorted(
        [int((boxes == b).all(1).nonzero()) for b in result["boxes"]])
    assert result["scores"].diff().le(0).all()  # highest first
    (limited,) = postprocess(prediction, 0.2, 0.5, max_detections=3)
    torch.testing.assert_close(limited["scores"], result["scores"][:3])
