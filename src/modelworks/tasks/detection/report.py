"""Detection metrics with pycocotools (the reference COCO evaluation) and the evaluation plots.

`DetectionRecorder` collects ground truth and detections in original-image pixels as batches stream; under DDP
each rank holds its shard and `gather` brings them all to every rank, so every rank computes the same numbers
(early stopping and the best checkpoint then agree). `coco_metrics` scores them: mAP@[.5:.95], mAP@.5,
mAP@.75, mAP for small/medium/large objects (only the sizes the ground truth has), AR@100, and per-class AP. `score_calibration` measures whether a
detection's score means what it says: the precision of the detections in each score bin (matched to ground truth
at IoU 0.5), and its ECE-like summary, the detection ECE of Kueppers et al. 2020 ("Multivariate Confidence
Calibration for Object Detection"). The served top score is the server's drift signal: this says how far it can
be read as a probability of being right.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np
import torch

from ...engine import distributed
from ...errors import ModelworksError
from ..calibration import ReliabilityBins
from .boxes import match_detections


class DetectionRecorder:
    def __init__(self):
        self.ground_truth: list[tuple[int, np.ndarray, np.ndarray]] = []  # (image id, boxes [N, 4], labels [N])
        self.detections: list[tuple[int, np.ndarray, np.ndarray, np.ndarray]] = []  # (+ scores)

    def update(self, batch: dict, results: list[dict]) -> None:
        scales = batch["scales"].float().cpu()
        for i, result in enumerate(results):
            image_id = int(batch["image_ids"][i])
            keep = batch["labels"][i] >= 0
            self.ground_truth.append((image_id, (batch["boxes"][i][keep].float().cpu() / scales[i]).numpy(),
                                      batch["labels"][i][keep].cpu().numpy()))
            self.detections.append((image_id, (result["boxes"].float().cpu() / scales[i]).numpy(),
                                    result["scores"].float().cpu().numpy(), result["labels"].cpu().numpy()))

    def gather(self) -> None:
        """Every rank's records on every rank (object all-gather: the lists are small next to the images)."""
        if distributed.world_size() == 1:
            return
        import torch.distributed as dist

        everything = [None] * distributed.world_size()
        dist.all_gather_object(everything, (self.ground_truth, self.detections))
        self.ground_truth = [g for part in everything for g in part[0]]
        self.detections = [d for part in everything for d in part[1]]


def coco_metrics(recorder: DetectionRecorder, classes: list[str]) -> tuple[dict[str, float], dict, np.ndarray]:
    """(summary metrics, per-class AP@[.5:.95], COCOeval precision array [T, R, K, area, maxDets])."""
    try:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError:
        raise ModelworksError("detection metrics need pycocotools: pip install pycocotools") from None
    images, annotations, detections = [], [], []
    for image_id, boxes, labels in recorder.ground_truth:
        images.append({"id": image_id})
        for box, label in zip(boxes, labels):
            w, h = float(box[2] - box[0]), float(box[3] - box[1])
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": int(label),
                                "bbox": [float(box[0]), float(box[1]), w, h], "area": w * h, "iscrowd": 0})
    for image_id, boxes, scores, labels in recorder.detections:
        for box, score, label in zip(boxes, scores, labels):
            detections.append({"image_id": image_id, "category_id": int(label), "score": float(score),
                               "bbox": [float(box[0]), float(box[1]), float(box[2] - box[0]),
                                        float(box[3] - box[1])]})
    names = ["map", "map50", "map75", "map_small", "map_medium", "map_large", "mar1", "mar10", "mar100",
             "mar_small", "mar_medium", "mar_large"]
    T, R, K = 10, 101, len(classes)
    if not detections or not annotations:
        # COCO's area ranges: small below 32^2 pixels, medium to 96^2, large above.
        sizes = {"small": (0, 32 ** 2), "medium": (32 ** 2, 96 ** 2), "large": (96 ** 2, float("inf"))}
        present = {size for a in annotations for size, (low, high) in sizes.items() if low <= a["area"] < high}
        return ({name: 0.0 for name in names if name.split("_")[-1] not in sizes or name.split("_")[-1] in present},
                {name: 0.0 for name in classes}, -np.ones((T, R, K, 4, 3)))
    truth = COCO()
    truth.dataset = {"images": images, "annotations": annotations,
                     "categories": [{"id": k, "name": name} for k, name in enumerate(classes)]}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress and table
        truth.createIndex()
        evaluation = COCOeval(truth, truth.loadRes(detections), "bbox")
        evaluation.params.catIds = list(range(K))
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    # -1 marks "no ground truth in this range": a size range with no objects (e.g. no large ones) has no score,
    # so it is left out rather than shown as a failing 0; overall scores stay (0 when nothing could be matched).
    summary = {name: max(float(v), 0.0) for name, v in zip(names, evaluation.stats)
               if v >= 0 or not name.endswith(("_small", "_medium", "_large"))}
    precision = evaluation.eval["precision"]  # T, R, K, area ranges, max detections (1, 10, 100)
    per_class = {}
    for k, name in enumerate(classes):
        p = precision[:, :, k, 0, -1]
        per_class[name] = float(p[p > -1].mean()) if (p > -1).any() else 0.0
    return summary, per_class, precision


def score_calibration(recorder: DetectionRecorder, min_score: float, iou_threshold: float = 0.5
                      ) -> tuple[dict[str, float], ReliabilityBins]:
    """Detection ECE over the detections scoring at least `min_score` (those a request is served by default):
    per image, detections by descending score are matched greedily to same-class ground truth at
    `iou_threshold`; then over 15 equal-width score bins, sum of (share of detections) x |precision - mean score|.
    Returns ({"score_ece", "score_precision", "score_mean", "score_detections"}, the bins for the diagram)."""
    truth = {image_id: (boxes, labels) for image_id, boxes, labels in recorder.ground_truth}
    bins = ReliabilityBins()
    for image_id, boxes, scores, labels in recorder.detections:
        keep = scores >= min_score
        order = np.argsort(-scores[keep], kind="stable")
        boxes, scores, labels = boxes[keep][order], scores[keep][order], labels[keep][order]
        gt_boxes, gt_labels = truth.get(image_id, (np.zeros((0, 4), np.float32), np.zeros(0, np.int64)))
        matched = match_detections(torch.as_tensor(boxes).reshape(-1, 4), torch.as_tensor(labels).long(),
                                   torch.as_tensor(gt_boxes).reshape(-1, 4), torch.as_tensor(gt_labels).long(),
                                   iou_threshold)
        bins.update(torch.as_tensor(scores, dtype=torch.float64), matched)
    n = float(bins.counts.sum())
    summary = {"score_ece": bins.ece() if n else float("nan"),
               "score_precision": float(bins.correct_sums.sum()) / n if n else float("nan"),
               "score_mean": float(bins.confidence_sums.sum()) / n if n else float("nan"),
               "score_detections": n}
    return summary, bins


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers
    import matplotlib.pyplot as plt

    return plt


def plot_precision_recall(precision: np.ndarray, classes: list[str], path: Path) -> None:
    """Precision against recall at IoU 0.5, one curve per class and their mean (COCO's 101 recall points)."""
    plt = _pyplot()
    recall = np.linspace(0, 1, precision.shape[1])
    fig, ax = plt.subplots(figsize=(7, 5.5))
    curves = []
    for k, name in enumerate(classes):
        p = precision[0, :, k, 0, -1]
        if (p > -1).any():
            p = np.where(p > -1, p, 0)
            curves.append(p)
            ax.plot(recall, p, linewidth=1, alpha=0.8, label=f"{name} ({p.mean():.3f})")
    if curves:
        mean = np.mean(curves, 0)
        ax.plot(recall, mean, color="black", linewidth=2.5, label=f"mean, AP@.5 = {mean.mean():.3f}")
        p75 = np.where(precision[5, :, :, 0, -1] > -1, precision[5, :, :, 0, -1], 0).mean(-1)
        ax.plot(recall, p75, color="black", linewidth=1.5, linestyle="--", label=f"mean at IoU .75 ({p75.mean():.3f})")
    ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02),
           title="Precision-recall at IoU 0.5 (per class: AP@.5)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


PALETTE = ["#e6194b", "#3cb44b", "#ffe119", "#4363d8", "#f58231", "#911eb4", "#46f0f0", "#f032e6", "#bcf60c",
           "#fabebe", "#008080", "#e6beff", "#9a6324", "#fffac8", "#800000", "#aaffc3", "#808000", "#ffd8b1",
           "#000075", "#808080"]


def label_font() -> str | None:
    """matplotlib's bundled DejaVu Sans, so labels have a legible size (PIL's default bitmap font is tiny)."""
    import matplotlib

    path = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
    return str(path) if path.is_file() else None


def draw_labelled_boxes(image: torch.Tensor, boxes, names: list[str], colours: list[str], width: int,
                        font_size: int, below: bool = False) -> torch.Tensor:
    """Boxes on a uint8 [3, H, W] image, each name on a filled band of the box's colour (legible on any
    background, as on the demo page): above the box's top edge, or under its bottom edge with `below` (ground
    truth, so it never hides the detection's label on a matched box). Bands are kept inside the image."""
    from PIL import Image, ImageColor, ImageDraw, ImageFont

    picture = Image.fromarray(image.permute(1, 2, 0).contiguous().numpy())
    draw = ImageDraw.Draw(picture)
    path = label_font()
    font = ImageFont.truetype(path, font_size) if path else ImageFont.load_default()
    W, H = picture.size
    for box, name, colour in zip(np.asarray(boxes, dtype=np.float32).reshape(-1, 4), names, colours):
        x1, y1, x2, y2 = (float(v) for v in box)
        draw.rectangle([x1, y1, x2, y2], outline=colour, width=width)
        if not name:
            continue
        left, top, right, bottom = draw.textbbox((0, 0), name, font=font)
        w, h = right - left + 4, bottom - top + 4
        x = min(max(0.0, x1), max(0.0, W - w))
        y = min(y2, H - h) if below else max(0.0, y1 - h)
        draw.rectangle([x, y, x + w, y + h], fill=colour)
        r, g, b = ImageColor.getrgb(colour)[:3]
        ink = "black" if 0.299 * r + 0.587 * g + 0.114 * b > 140 else "white"
        draw.text((x + 2 - left, y + 2 - top), name, fill=ink, font=font)
    return torch.from_numpy(np.asarray(picture).copy()).permute(2, 0, 1)


def plot_predictions(images: list[torch.Tensor], truths: list[tuple], results: list[dict], classes: list[str],
                     path: Path, min_score: float = 0.3, min_side: int = 400, columns: int = 4) -> None:
    """A grid of images with ground truth (white, its class under the box) and the detections scoring at least
    `min_score` (class colour, name and score above the box; the metrics use every detection, the picture only
    the confident ones). Labels sit on filled bands; small images are enlarged first so they stay legible."""
    from torchvision.utils import make_grid, save_image

    drawn = []
    for image, (boxes, labels), result in zip(images, truths, results):
        factor = max(1, int(np.ceil(min_side / max(image.shape[-2:]))))
        image = image.repeat_interleave(factor, -2).repeat_interleave(factor, -1)
        image = draw_labelled_boxes(image, (boxes * factor).numpy(), [classes[int(c)] for c in labels],
                                    ["white"] * len(labels), width=1, font_size=11, below=True)
        confident = result["scores"] >= min_score
        result = {k: v[confident] for k, v in result.items()}
        if len(result["labels"]):
            names = [f"{classes[int(c)]} {s:.2f}" for c, s in zip(result["labels"], result["scores"])]
            colours = [PALETTE[int(c) % len(PALETTE)] for c in result["labels"]]
            image = draw_labelled_boxes(image, (result["boxes"] * factor).numpy(), names, colours, width=2,
                                        font_size=13)
        drawn.append(image)
    size = max(max(d.shape[-2:]) for d in drawn)
    padded = [torch.nn.functional.pad(d, (0, size - d.shape[-1], 0, size - d.shape[-2])) for d in drawn]
    save_image(make_grid([d.float() / 255 for d in padded], nrow=columns, padding=4), path)
