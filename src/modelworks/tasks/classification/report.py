"""Classification metrics (torchmetrics, so they are reduced across DDP ranks) and the evaluation plots."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.classification import (MulticlassAccuracy, MulticlassCalibrationError,
                                         MulticlassConfusionMatrix)


class ClassificationMetrics:
    """Top-1/top-5 accuracy, per-class accuracy, confusion matrix, expected calibration error and the loss."""

    def __init__(self, num_classes: int, device: torch.device):
        top_k = min(5, num_classes)
        self.metrics = MetricCollection({
            "acc1": MulticlassAccuracy(num_classes, top_k=1, average="micro"),
            f"acc{top_k}": MulticlassAccuracy(num_classes, top_k=top_k, average="micro"),
            "per_class_acc": MulticlassAccuracy(num_classes, average="none"),
            "confusion": MulticlassConfusionMatrix(num_classes),
            "ece": MulticlassCalibrationError(num_classes, n_bins=15, norm="l1"),
        }).to(device)
        self.loss = MeanMetric().to(device)

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        self.metrics.update(logits, labels)
        self.loss.update(F.cross_entropy(logits, labels, reduction="none"))

    def compute(self) -> dict:
        out = {k: (v.item() if v.ndim == 0 else v.cpu()) for k, v in self.metrics.compute().items()}
        out["loss"] = self.loss.compute().item()
        return out


class WorstErrors:
    """The misclassified images the model was most confident about (largest loss), kept as it streams, with the
    probability the model gave its wrong answer."""

    def __init__(self, keep: int):
        self.keep = keep
        self.images = self.losses = self.labels = self.predictions = self.probabilities = None

    def update(self, x: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> None:
        loss = F.cross_entropy(logits, y, reduction="none")
        wrong = logits.argmax(1) != y
        if not wrong.any():
            return
        probability, prediction = logits[wrong].float().softmax(1).max(1)
        parts = [x[wrong].float().cpu(), loss[wrong].cpu(), y[wrong].cpu(), prediction.cpu(), probability.cpu()]
        if self.images is not None:
            parts = [torch.cat([old, new]) for old, new in
                     zip([self.images, self.losses, self.labels, self.predictions, self.probabilities], parts)]
        order = parts[1].argsort(descending=True)[: self.keep]
        self.images, self.losses, self.labels, self.predictions, self.probabilities = (p[order] for p in parts)


def describe_error(classes: list[str], label: int, prediction: int, probability: float, loss: float) -> str:
    """One error's title in the worst-errors grid: the true class, the answer with its probability, the loss."""
    return f"true {classes[label]}\npred {classes[prediction]} {probability:.0%}\nloss {loss:.1f}"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers
    import matplotlib.pyplot as plt

    return plt


def plot_confusion_matrix(confusion: torch.Tensor, classes: list[str], path: Path) -> None:
    plt = _pyplot()
    counts = confusion.float()
    rates = counts / counts.sum(1, keepdim=True).clamp(min=1)
    n = len(classes)
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * n, 0.8 + 0.6 * n))
    ax.imshow(rates.numpy(), cmap="Blues", vmin=0, vmax=1)
    for i in range(n):
        for j in range(n):
            if counts[i, j] > 0:
                ax.text(j, i, int(counts[i, j]), ha="center", va="center", fontsize=7,
                        color="white" if rates[i, j] > 0.5 else "black")
    ax.set_xticks(range(n), classes, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(n), classes, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("confusion matrix (counts; colour = row rate)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_worst_errors(worst: WorstErrors, classes: list[str], mean: torch.Tensor, std: torch.Tensor,
                      path: Path) -> None:
    plt = _pyplot()
    if worst is None or worst.images is None:
        fig, ax = plt.subplots(figsize=(4, 1))
        ax.axis("off")
        ax.text(0.5, 0.5, "no errors", ha="center", va="center")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return
    images = (worst.images * std + mean).clamp(0, 1)  # back from normalised to [0, 1]
    cols = 8
    rows = (len(images) + cols - 1) // cols
    height = rows * 2.0 + 0.9  # inches: each row's three-line titles, plus the figure title
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.6, height), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, label, pred, probability, loss in zip(axes.flat, images, worst.labels, worst.predictions,
                                                         worst.probabilities, worst.losses):
        if image.shape[0] == 1:
            ax.imshow(image[0].numpy(), cmap="gray", vmin=0, vmax=1)
        else:
            ax.imshow(image.permute(1, 2, 0).numpy())
        ax.set_title(describe_error(classes, int(label), int(pred), float(probability), float(loss)), fontsize=7)
    fig.suptitle("most confident errors (the answer's probability)")
    fig.subplots_adjust(left=0.02, right=0.98, bottom=0.02, top=1 - 0.95 / height, hspace=0.6, wspace=0.15)
    fig.savefig(path, dpi=110)
    plt.close(fig)
