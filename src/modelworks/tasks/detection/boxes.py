"""Box arithmetic for the detectors: element-wise IoU and CIoU, anchor points, distance encodings, NMS, and
one-to-one matching of two detection sets.

Boxes are (x1, y1, x2, y2) in pixels throughout. Pairwise IoU and NMS are torchvision.ops' (box_iou,
batched_nms); the element-wise forms below are what the losses and the assigner need, and the tests check
them against torchvision's pairwise versions.
"""

from __future__ import annotations

import math

import torch
from torchvision.ops import batched_nms, box_iou


def box_area(boxes: torch.Tensor) -> torch.Tensor:
    return (boxes[..., 2] - boxes[..., 0]).clamp(min=0) * (boxes[..., 3] - boxes[..., 1]).clamp(min=0)


def elementwise_iou(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """IoU of a[..., i] with b[..., i] (broadcasting), [...]."""
    lt = torch.maximum(a[..., :2], b[..., :2])
    rb = torch.minimum(a[..., 2:], b[..., 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    return inter / (box_area(a) + box_area(b) - inter + eps)


def elementwise_ciou(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Complete IoU (Zheng et al., 2020): IoU minus the normalised centre distance and an aspect-ratio term."""
    iou = elementwise_iou(a, b, eps)
    enclose_wh = torch.maximum(a[..., 2:], b[..., 2:]) - torch.minimum(a[..., :2], b[..., :2])
    diagonal2 = enclose_wh.pow(2).sum(-1) + eps
    centre2 = ((a[..., :2] + a[..., 2:]) - (b[..., :2] + b[..., 2:])).pow(2).sum(-1) / 4
    wa, ha = a[..., 2] - a[..., 0], (a[..., 3] - a[..., 1]).clamp(min=eps)
    wb, hb = b[..., 2] - b[..., 0], (b[..., 3] - b[..., 1]).clamp(min=eps)
    v = (4 / math.pi ** 2) * (torch.atan(wb / hb) - torch.atan(wa / ha)).pow(2)
    with torch.no_grad():
        alpha = v / (v - iou + (1 + eps))
    return iou - centre2 / diagonal2 - alpha * v


def anchor_points(image_size: int, strides: tuple[int, ...], device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Cell centres of every level, concatenated level by level in row-major order: points [A, 2] (x, y) in
    pixels and strides [A, 1]. A stride-s level of a size-S input has ceil(S / s) cells per side, as the
    padded stride-2 convolutions produce."""
    points, stride_list = [], []
    for s in strides:
        n = math.ceil(image_size / s)
        centres = (torch.arange(n, device=device, dtype=torch.float32) + 0.5) * s
        y, x = torch.meshgrid(centres, centres, indexing="ij")
        points.append(torch.stack([x.reshape(-1), y.reshape(-1)], -1))
        stride_list.append(torch.full((n * n, 1), float(s), device=device))
    return torch.cat(points), torch.cat(stride_list)


def distances_to_boxes(points: torch.Tensor, ltrb: torch.Tensor) -> torch.Tensor:
    """(left, top, right, bottom) distances from each point -> xyxy boxes."""
    return torch.cat([points - ltrb[..., :2], points + ltrb[..., 2:]], -1)


def boxes_to_distances(points: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    return torch.cat([points - boxes[..., :2], boxes[..., 2:] - points], -1)


def postprocess(predictions: torch.Tensor, score_threshold: float, iou_threshold: float, max_detections: int
                ) -> list[dict[str, torch.Tensor]]:
    """Decoded predictions [B, N, 4 + C] (xyxy pixels, class scores) -> per image {boxes, scores, labels}.
    Each box keeps its best class (one label per box, as single-label detectors are evaluated), then
    class-aware NMS, then the `max_detections` highest scores."""
    results = []
    for prediction in predictions.float():
        scores, labels = prediction[:, 4:].max(-1)
        keep = scores > score_threshold
        boxes, scores, labels = prediction[keep, :4], scores[keep], labels[keep]
        keep = batched_nms(boxes, scores, labels, iou_threshold)[:max_detections]
        results.append({"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]})
    return results


def match_detections(boxes: torch.Tensor, labels: torch.Tensor, other_boxes: torch.Tensor,
                     other_labels: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Which of `boxes` (in order, e.g. by score) find a partner in `other_boxes` of the same label with IoU
    >= iou_threshold, each partner used once (greedy, the way COCO matches detections to ground truth): bool [N]."""
    matched = torch.zeros(len(boxes), dtype=torch.bool)
    if not len(boxes) or not len(other_boxes):
        return matched
    iou = box_iou(boxes.float(), other_boxes.float())
    iou[labels[:, None] != other_labels[None, :]] = -1
    taken = torch.zeros(len(other_boxes), dtype=torch.bool, device=iou.device)
    for i, row in enumerate(iou):
        row = row.masked_fill(taken, -1)
        j = int(row.argmax())
        if row[j] >= iou_threshold:
            taken[j] = True
            matched[i] = True
    return matched


def count_matches(boxes: torch.Tensor, labels: torch.Tensor, other_boxes: torch.Tensor, other_labels: torch.Tensor,
                  iou_threshold: float) -> int:
    """How many of `boxes` find a partner in `other_boxes` (see match_detections)."""
    return int(match_detections(boxes, labels, other_boxes, other_labels, iou_threshold).sum())
