"""Losses and label assignment for the two detectors. Everything here runs in fp32, whatever the autocast.

Targets arrive padded: boxes [B, M, 4] xyxy pixels of the input, labels [B, M] with -1 for padding.

Anchor-free (YOLOv8-style): the task-aligned assigner of TOOD (Feng et al., 2021) picks, for each object, the
`top_k` anchor points inside it (an object so thin that no point falls inside gets its nearest point) with the highest alignment score^alpha * IoU^beta (an anchor claimed by two
objects goes to the one it overlaps most), and gives each positive a soft class target: its alignment
normalised so that each object's best anchor gets that anchor's IoU. The classification loss is BCE against
these IoU-aware targets (quality-aware, like varifocal loss without the focal weighting); boxes get a CIoU loss
and the distribution focal loss of GFL (Li et al., 2020), both weighted by the targets. Sums are normalised by
the total target score, so the loss does not scale with batch size or object count.

YOLOv1 (Redmon et al., 2016) with the seed's weights (lambda_coord 5, lambda_noobj 0.5), corrected: the cell
holding an object's centre is responsible for it (the largest object when several share a cell), and of its
boxes the one with the highest IoU in image coordinates; the confidence target is that (detached) IoU, and
every other box (in any cell) learns confidence 0; coordinates are regressed as the cell offset and the square
root of the size; classes use cross-entropy on the responsible box rather than the seed's MSE on logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .boxes import boxes_to_distances, distances_to_boxes, elementwise_ciou, elementwise_iou


class TaskAlignedAssigner:
    def __init__(self, top_k: int = 10, alpha: float = 0.5, beta: float = 6.0, eps: float = 1e-9):
        self.top_k, self.alpha, self.beta, self.eps = top_k, alpha, beta, eps

    @torch.no_grad()
    def __call__(self, scores: torch.Tensor, pred_boxes: torch.Tensor, points: torch.Tensor,
                 gt_boxes: torch.Tensor, gt_labels: torch.Tensor):
        """scores [B, A, C] probabilities, pred_boxes [B, A, 4], points [A, 2], gt_boxes [B, M, 4], gt_labels
        [B, M] (-1 padding) -> target_boxes [B, A, 4], target_scores [B, A, C], positive mask [B, A]."""
        B, A, C = scores.shape
        M = gt_boxes.shape[1]
        valid = gt_labels >= 0  # B, M
        if M == 0 or not valid.any():
            return pred_boxes.new_zeros(B, A, 4), scores.new_zeros(B, A, C), torch.zeros(B, A, dtype=torch.bool,
                                                                                          device=scores.device)
        # Anchor points strictly inside each object's box.
        x, y = points[:, 0], points[:, 1]  # A
        g = gt_boxes[:, :, None, :]  # B, M, 1, 4
        edge = torch.stack([x - g[..., 0], y - g[..., 1], g[..., 2] - x, g[..., 3] - y], -1)  # B, M, A, 4
        inside = (edge.amin(-1) > self.eps) & valid[..., None]  # B, M, A
        # An object thinner than the finest stride can fall between the points; it gets its nearest point.
        centre = (gt_boxes[..., :2] + gt_boxes[..., 2:]) / 2  # B, M, 2
        nearest = (centre[:, :, None] - points).pow(2).sum(-1).argmin(-1)  # B, M
        stranded = valid & ~inside.any(-1)
        inside = inside | (F.one_hot(nearest, A).bool() & stranded[..., None])
        iou = elementwise_iou(g, pred_boxes[:, None]).clamp(min=0) * inside  # B, M, A
        label_index = gt_labels.clamp(min=0)[..., None].expand(B, M, A)
        class_score = scores.transpose(1, 2).gather(1, label_index)  # B, M, A
        align = class_score.pow(self.alpha) * iou.pow(self.beta) * inside
        top = align.topk(min(self.top_k, A), dim=-1).indices  # B, M, k
        chosen = torch.zeros_like(inside).scatter_(-1, top, True) & inside  # B, M, A
        # An anchor chosen by several objects keeps the one it overlaps most.
        several = chosen.sum(1, keepdim=True) > 1  # B, 1, A
        best = F.one_hot(iou.argmax(1), M).transpose(1, 2).bool()  # B, M, A
        chosen = torch.where(several, best & inside, chosen)
        positive = chosen.any(1)  # B, A
        gt_index = chosen.float().argmax(1)  # B, A
        target_boxes = gt_boxes.gather(1, gt_index[..., None].expand(B, A, 4))
        target_labels = gt_labels.gather(1, gt_index).clamp(min=0)
        align = align * chosen
        normalised = align * (iou * chosen).amax(-1, keepdim=True) / (align.amax(-1, keepdim=True) + self.eps)
        quality = normalised.amax(1) * positive  # B, A
        target_scores = F.one_hot(target_labels, C).float() * quality[..., None]
        return target_boxes, target_scores, positive


def distribution_focal_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """GFL's DFL: cross-entropy towards the two bins around a continuous target, weighted by closeness.
    logits [N, 4, R], target [N, 4] in bins (clamped to [0, R - 1)) -> [N] (mean over the 4 edges)."""
    R = logits.shape[-1]
    target = target.clamp(0, R - 1 - 0.01)
    left = target.long()
    w_left = (left + 1) - target
    ce = lambda idx: F.cross_entropy(logits.reshape(-1, R), idx.reshape(-1), reduction="none").view_as(target)  # noqa: E731
    return (ce(left) * w_left + ce(left + 1) * (1 - w_left)).mean(-1)


class AnchorFreeLoss(nn.Module):
    def __init__(self, decoder: nn.Module, box_gain: float = 7.5, cls_gain: float = 0.5, dfl_gain: float = 1.5,
                 assigner: TaskAlignedAssigner | None = None):
        super().__init__()
        self.decoder = decoder
        self.box_gain, self.cls_gain, self.dfl_gain = box_gain, cls_gain, dfl_gain
        self.assigner = assigner or TaskAlignedAssigner()

    def forward(self, raw: torch.Tensor, gt_boxes: torch.Tensor, gt_labels: torch.Tensor):
        raw = raw.float()
        d = self.decoder
        B, A, _ = raw.shape
        R = d.reg_max
        cls_logits = raw[..., 4 * R:]
        pred_boxes = distances_to_boxes(d.points, d.distances(raw) * d.stride)  # B, A, 4 pixels
        target_boxes, target_scores, positive = self.assigner(
            cls_logits.detach().sigmoid(), pred_boxes.detach(), d.points, gt_boxes.float(), gt_labels)
        total = target_scores.sum().clamp(min=1)
        loss_cls = F.binary_cross_entropy_with_logits(cls_logits, target_scores, reduction="sum") / total
        if positive.any():
            weight = target_scores.sum(-1)[positive]  # P
            loss_box = ((1 - elementwise_ciou(pred_boxes[positive], target_boxes[positive])) * weight).sum() / total
            stride = d.stride.expand(B, A, 1)[positive]
            points = d.points.expand(B, A, 2)[positive]
            target_bins = boxes_to_distances(points, target_boxes[positive]) / stride
            bin_logits = raw[..., :4 * R].reshape(B, A, 4, R)[positive]
            loss_dfl = (distribution_focal_loss(bin_logits, target_bins) * weight).sum() / total
        else:
            loss_box = loss_dfl = raw.sum() * 0  # keeps the graph connected for DDP
        loss = self.box_gain * loss_box + self.cls_gain * loss_cls + self.dfl_gain * loss_dfl
        return loss, {"box": loss_box.detach(), "cls": loss_cls.detach(), "dfl": loss_dfl.detach()}


class YOLOv1Loss(nn.Module):
    def __init__(self, image_size: int, lambda_coord: float = 5.0, lambda_noobj: float = 0.5):
        super().__init__()
        self.image_size, self.lambda_coord, self.lambda_noobj = image_size, lambda_coord, lambda_noobj

    def forward(self, raw: torch.Tensor, gt_boxes: torch.Tensor, gt_labels: torch.Tensor):
        raw = raw.float()
        B, S, _, K, _ = raw.shape
        M = gt_boxes.shape[1]
        gt = gt_boxes.float() / self.image_size  # B, M, 4 in [0, 1]
        valid = gt_labels >= 0
        centre = (gt[..., :2] + gt[..., 2:]) / 2
        size = (gt[..., 2:] - gt[..., :2]).clamp(min=0)
        cell = (centre * S).floor().clamp(0, S - 1).long()  # B, M, 2 (col, row)
        cell_index = cell[..., 1] * S + cell[..., 0]  # B, M
        # One object per cell, the largest: a deterministic integer key (area rank, then object index) per cell.
        area_rank = size.prod(-1).argsort(1).argsort(1)  # B, M
        key = torch.where(valid, area_rank * M + torch.arange(M, device=raw.device) + 1, 0)
        winner = torch.zeros(B, S * S, dtype=torch.long, device=raw.device).scatter_reduce(
            1, cell_index, key, reduce="amax")  # B, S*S: 0 = no object, else key
        has_object = winner > 0
        owner = ((winner - 1) % M).clamp(min=0)  # B, S*S: index of the responsible object
        take = lambda t: t.gather(1, owner[..., None].expand(-1, -1, t.shape[-1]))  # noqa: E731
        t_centre, t_size = take(centre), take(size)  # B, S*S, 2
        t_label = gt_labels.gather(1, owner)  # B, S*S

        pred = raw.reshape(B, S * S, K, -1)
        cells = torch.arange(S, device=raw.device, dtype=torch.float32)
        offset = torch.stack(torch.meshgrid(cells, cells, indexing="xy"), -1).reshape(S * S, 1, 2)
        p_centre = (offset + pred[..., :2].sigmoid()) / S  # B, S*S, K, 2
        p_sqrt = pred[..., 2:4].sigmoid()  # sqrt of the size
        with torch.no_grad():
            p_box = torch.cat([p_centre - p_sqrt ** 2 / 2, p_centre + p_sqrt ** 2 / 2], -1)
            t_box = torch.cat([t_centre - t_size / 2, t_centre + t_size / 2], -1)[:, :, None]
            iou = elementwise_iou(p_box, t_box)  # B, S*S, K
        responsible = F.one_hot(iou.argmax(-1), K).bool() & has_object[..., None]  # B, S*S, K

        t_offset = t_centre * S - offset[:, 0]  # B, S*S, 2: the centre's position inside its cell, in [0, 1)
        r = responsible
        loss_xy = (pred[..., :2].sigmoid() - t_offset[:, :, None]).pow(2).sum(-1)[r].sum()
        loss_wh = (p_sqrt - t_size.sqrt()[:, :, None]).pow(2).sum(-1)[r].sum()
        confidence = pred[..., 4].sigmoid()
        loss_obj = (confidence - iou).pow(2)[r].sum()
        loss_noobj = confidence.pow(2)[~r].sum()
        loss_cls = F.cross_entropy(pred[..., 5:][r], t_label[..., None].expand(-1, -1, K)[r], reduction="sum")
        parts = {"box": self.lambda_coord * (loss_xy + loss_wh) / B, "obj": loss_obj / B,
                 "noobj": self.lambda_noobj * loss_noobj / B, "cls": loss_cls / B}
        loss = sum(parts.values())
        return loss, {k: v.detach() for k, v in parts.items()}
