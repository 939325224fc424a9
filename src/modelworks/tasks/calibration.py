"""Temperature scaling (Guo et al. 2017, "On Calibration of Modern Neural Networks") and reliability bins.

One scalar T > 0 divides the logits: softmax(z / T) keeps the arg-max (accuracy is unchanged by construction) and
makes the top probability mean what it says. T is fitted after training by minimising the negative log-likelihood
of the validation split's logits, those of the model as served (with its test-time augmentation). The bins serve
both classification (top-1 probability vs accuracy) and detection (score vs precision at IoU 0.5).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

ECE_BINS = 15  # equal-width confidence bins, as Guo et al. and torchmetrics' MulticlassCalibrationError


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, bounds: tuple[float, float] = (0.05, 20.0),
                    iterations: int = 60) -> float:
    """The T minimising NLL(softmax(logits / T), labels): a golden-section search over log T within `bounds`.
    The NLL is convex in 1/T (a log-sum-exp of linear functions minus a linear one), so unimodal in log T and the
    search cannot miss the minimum; unlike L-BFGS it needs no gradient and stays finite when the split is
    perfectly separated (the minimum then lies at the lower bound). 60 steps narrow log T to ~1e-12."""
    logits = logits.detach().double()
    labels = labels.detach()

    def nll(log_t: float) -> float:
        return F.cross_entropy(logits / math.exp(log_t), labels).item()

    ratio = (math.sqrt(5) - 1) / 2
    low, high = math.log(bounds[0]), math.log(bounds[1])
    a, b = high - ratio * (high - low), low + ratio * (high - low)
    f_a, f_b = nll(a), nll(b)
    for _ in range(iterations):
        if f_a <= f_b:
            high, b, f_b = b, a, f_a
            a = high - ratio * (high - low)
            f_a = nll(a)
        else:
            low, a, f_a = a, b, f_b
            b = low + ratio * (high - low)
            f_b = nll(b)
    return math.exp((low + high) / 2)


class ReliabilityBins:
    """Count, mean top-1 confidence and accuracy per equal-width confidence bin: a reliability diagram's data.
    A confidence of exactly 1 falls in the last bin."""

    def __init__(self, n_bins: int = ECE_BINS):
        self.n_bins = n_bins
        self.counts = torch.zeros(n_bins, dtype=torch.float64)
        self.confidence_sums = torch.zeros(n_bins, dtype=torch.float64)
        self.correct_sums = torch.zeros(n_bins, dtype=torch.float64)

    def update(self, confidences: torch.Tensor, correct: torch.Tensor) -> None:
        confidences = confidences.detach().double().cpu()
        index = (confidences * self.n_bins).floor().long().clamp(0, self.n_bins - 1)
        self.counts += torch.bincount(index, minlength=self.n_bins).double()
        self.confidence_sums += torch.bincount(index, confidences, minlength=self.n_bins)
        self.correct_sums += torch.bincount(index, correct.detach().double().cpu(), minlength=self.n_bins)

    def update_logits(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        confidence, predicted = logits.float().softmax(1).max(1)
        self.update(confidence, predicted == labels)

    def table(self) -> dict[str, list]:
        """Per bin, JSON-ready: its lower edge, sample count, mean confidence and accuracy (None for an empty bin)."""
        def per_bin(sums: torch.Tensor) -> list[float | None]:
            return [float(total / n) if n else None for total, n in zip(sums.tolist(), self.counts.tolist())]

        return {"bin_lower": [i / self.n_bins for i in range(self.n_bins)], "count": self.counts.tolist(),
                "confidence": per_bin(self.confidence_sums), "accuracy": per_bin(self.correct_sums)}

    def ece(self) -> float:
        """sum over bins of (share of samples) x |accuracy - mean confidence|."""
        total = self.counts.sum()
        if total == 0:
            return float("nan")
        return float((self.correct_sums - self.confidence_sums).abs().sum() / total)


def plot_reliability(panels: list[tuple[str, ReliabilityBins]], path, xlabel: str = "confidence (top-1 probability)",
                     ylabel: str = "accuracy") -> None:
    """One reliability diagram per (title, bins), side by side: bars at each bin's observed rate, the diagonal
    where a calibrated model's bars end, the gap to its mean confidence shaded, and the share of samples below."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(panels), figsize=(4.2 * len(panels), 5.2), squeeze=False,
                             gridspec_kw={"height_ratios": [3, 1]}, sharex=True)
    for column, (title, bins) in enumerate(panels):
        top, bottom = axes[0, column], axes[1, column]
        width = 1.0 / bins.n_bins
        lower = [i * width for i in range(bins.n_bins)]
        filled = bins.counts > 0
        rate = torch.where(filled, bins.correct_sums / bins.counts.clamp(min=1), torch.zeros(()))
        confidence = torch.where(filled, bins.confidence_sums / bins.counts.clamp(min=1), torch.zeros(()))
        top.bar(lower, rate.tolist(), width=width, align="edge", color="#4c72b0", edgecolor="white", label=ylabel)
        gap_bottom = torch.minimum(rate, confidence)
        top.bar(lower, (rate - confidence).abs().where(filled, torch.zeros(())).tolist(), bottom=gap_bottom.tolist(),
                width=width, align="edge", fill=False, hatch="///", edgecolor="#dd8452", linewidth=0,
                label="gap to mean confidence")
        top.plot([0, 1], [0, 1], "k--", linewidth=1, label="calibrated")
        top.set_xlim(0, 1)
        top.set_ylim(0, 1)
        top.set_title(f"{title}\nECE {bins.ece():.3f} ({bins.n_bins} bins, {int(bins.counts.sum())} samples)",
                      fontsize=9)
        top.set_ylabel(ylabel)
        top.legend(loc="upper left", fontsize=7)
        share = (bins.counts / bins.counts.sum().clamp(min=1)).tolist()
        bottom.bar(lower, share, width=width, align="edge", color="#8c8c8c", edgecolor="white")
        bottom.set_ylabel("share")
        bottom.set_xlabel(xlabel)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
