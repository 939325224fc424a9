"""The task-aligned assigner on hand-built cases, and the two detection losses on known targets."""

from __future__ import annotations

import math

import torch

from modelworks.tasks.detection.boxes import anchor_points
from modelworks.tasks.detection.loss import TaskAlignedAssigner, YOLOv1Loss, distribution_focal_loss

# A 4 x 4 grid of points at stride 8 (32-pixel image): centres 4, 12, 20, 28 on each axis.
POINTS, _ = anchor_points(32, (8,))


def assign(pred_boxes, gt_boxes, gt_labels, top_k=10, scores=None, num_classes=2):
    A = len(POINTS)
    scores = torch.full((1, A, num_classes), 0.5) if scores is None else scores
    return TaskAlignedAssigner(top_k=top_k)(scores, pred_boxes[None], POINTS, gt_boxes[None], gt_labels[None])


def test_only_points_inside_an_object_are_assigned_with_its_box_and_class():
    gt = torch.tensor([[0.0, 0.0, 16.0, 16.0]])  # holds the points (4, 4), (12, 4), (4, 12), (12, 12)
    pred = gt.expand(16, 4).clone()  # every point predicts the object's box exactly
    boxes, scores, positive = assign(pred, gt, torch.tensor([1]))
    inside = [0, 1, 4, 5]
    assert positive[0].nonzero().squeeze(1).tolist() == inside
    assert (boxes[0, inside] == gt).all()
    # Perfect IoU: every positive's target is IoU 1 on class 1, 0 on class 0; negatives are all zero.
    torch.testing.assert_close(scores[0, inside], torch.tensor([[0.0, 1.0]]).expand(4, 2))
    assert scores[0, ~positive[0]].eq(0).all()


def test_top_k_keeps_the_best_aligned_points():
    gt = torch.tensor([[0.0, 0.0, 32.0, 32.0]])  # all 16 points inside
    pred = torch.zeros(16, 4) + torch.tensor([0.0, 0.0, 8.0, 8.0])  # poor boxes ...
    pred[[3, 9]] = gt  # ... except two exact ones
    _, scores, positive = assign(pred, gt, torch.tensor([0]), top_k=2)
    assert positive[0].nonzero().squeeze(1).tolist() == [3, 9]


def test_a_point_claimed_by_two_objects_goes_to_the_one_it_overlaps_most():
    big = torch.tensor([0.0, 0.0, 32.0, 32.0])
    small = torch.tensor([8.0, 8.0, 16.0, 16.0])  # holds point (12, 12) only: index 5
    pred = big.expand(16, 4).clone()
    pred[5] = small  # point 5 predicts the small object exactly
    boxes, scores, positive = assign(pred, torch.stack([big, small]), torch.tensor([0, 1]), top_k=16)
    assert positive[0].all()
    assert (boxes[0, 5] == small).all() and scores[0, 5, 1] > 0 and scores[0, 5, 0] == 0


def test_an_object_between_the_points_gets_its_nearest_point():
    thin = torch.tensor([[14.0, 2.0, 19.5, 22.0]])  # 5.5 px wide: no point (x = 4, 12, 20, 28) inside
    boxes, _, positive = assign(thin.expand(16, 4).clone(), thin, torch.tensor([0]))
    assert positive[0].nonzero().squeeze(1).tolist() == [6]  # (20, 12): nearest to the centre (16.75, 12)
    assert (boxes[0, 6] == thin).all()


def test_padding_and_empty_targets_assign_nothing():
    pred = torch.zeros(16, 4)
    for gt, labels in ((torch.zeros(0, 4), torch.zeros(0, dtype=torch.long)),
                       (torch.tensor([[0.0, 0.0, 32.0, 32.0]]), torch.tensor([-1]))):
        _, scores, positive = assign(pred, gt, labels)
        assert not positive.any() and scores.eq(0).all()


def test_distribution_focal_loss_is_smallest_for_the_two_neighbouring_bins():
    target = torch.tensor([[2.25] * 4])
    exact = torch.full((1, 4, 8), -20.0)
    exact[..., 2], exact[..., 3] = math.log(0.75), math.log(0.25)  # the ideal split of 2.25 between bins 2, 3
    wrong = torch.zeros(1, 4, 8)
    assert distribution_focal_loss(exact, target) < distribution_focal_loss(wrong, target)


def yolov1_raw_for(boxes: torch.Tensor, labels: torch.Tensor, S: int, K: int, C: int, image: float):
    """Raw head output whose first box in each object's cell predicts that object exactly, confidently."""
    raw = torch.full((1, S, S, K, 5 + C), -8.0)  # everything else: confidence ~0
    logit = lambda p: math.log(p / (1 - p))  # noqa: E731
    for box, label in zip(boxes / image, labels):
        cx, cy = float(box[0] + box[2]) / 2, float(box[1] + box[3]) / 2
        col, row = int(cx * S), int(cy * S)
        w, h = float(box[2] - box[0]), float(box[3] - box[1])
        raw[0, row, col, 0, :4] = torch.tensor([logit(cx * S - col), logit(cy * S - row), logit(w ** 0.5),
                                                logit(h ** 0.5)])
        raw[0, row, col, 0, 4] = 8.0
        raw[0, row, col, 0, 5 + int(label)] = 10.0
    return raw


def test_yolov1_loss_is_near_zero_for_an_exact_prediction_and_grows_when_moved():
    boxes = torch.tensor([[10.0, 20.0, 50.0, 70.0], [80.0, 60.0, 110.0, 100.0]])
    labels = torch.tensor([2, 0])
    loss_fn = YOLOv1Loss(image_size=112)
    raw = yolov1_raw_for(boxes, labels, S=7, K=2, C=3, image=112)
    loss, parts = loss_fn(raw, boxes[None], labels[None])
    assert loss < 0.01, parts
    shifted = raw.clone()
    shifted[..., 0] += 1.0  # every box's centre moves
    assert loss_fn(shifted, boxes[None], labels[None])[1]["box"] > 100 * parts["box"] + 0.01


def test_yolov1_cell_with_two_objects_is_given_to_the_larger():
    big = torch.tensor([[0.0, 0.0, 30.0, 30.0]])
    small = torch.tensor([[12.0, 12.0, 18.0, 18.0]])  # same centre cell as big
    loss_fn = YOLOv1Loss(image_size=70)
    raw = yolov1_raw_for(big, torch.tensor([1]), S=7, K=2, C=2, image=70)
    both = torch.cat([small, big])[None]
    loss, parts = loss_fn(raw, both, torch.tensor([[0, 1]]))
    assert parts["box"] < 1e-3 and parts["cls"] < 1e-3  # the big object is the target; the raw predicts it
