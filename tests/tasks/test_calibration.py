"""Temperature scaling and reliability bins (tasks/calibration.py): a known temperature recovered, the ECE of a
hand-computed example, torchmetrics' ECE matched."""

from __future__ import annotations

import pytest
import torch
from torchmetrics.classification import MulticlassCalibrationError

from modelworks.tasks.calibration import ReliabilityBins, fit_temperature, plot_reliability


@pytest.mark.parametrize("temperature", [0.5, 2.5])
def test_fit_temperature_recovers_the_temperature_that_generated_the_labels(temperature):
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(20000, 10, generator=generator) * 3
    labels = torch.multinomial((logits / temperature).softmax(1), 1, generator=generator).squeeze(1)
    assert fit_temperature(logits, labels) == pytest.approx(temperature, rel=0.05)


def test_fit_temperature_stays_finite_on_a_perfectly_separated_split():
    logits = torch.randn(100, 4, generator=torch.Generator().manual_seed(1))
    assert fit_temperature(logits, logits.argmax(1)) == pytest.approx(0.05)  # the lower bound, not 0 or NaN


def two_class_logits(confidences: list[float]) -> torch.Tensor:
    """Logits whose softmax is [p, 1 - p]: class 0 predicted with confidence p."""
    p = torch.tensor(confidences, dtype=torch.float64)
    return torch.stack([p.log(), (1 - p).log()], 1).float()


def test_ece_of_a_hand_computed_example():
    # 15 bins of width 1/15: 0.9 -> bin 13 (one right, one wrong: accuracy 0.5, gap 0.4), 0.65 -> bin 9
    # (right: gap 0.35), 0.70 and 0.72 -> bin 10 (one right: accuracy 0.5, mean confidence 0.71, gap 0.21).
    # ECE = 2/5 * 0.4 + 1/5 * 0.35 + 2/5 * 0.21 = 0.314
    logits = two_class_logits([0.9, 0.9, 0.65, 0.7, 0.72])
    labels = torch.tensor([0, 1, 0, 0, 1])
    bins = ReliabilityBins()
    bins.update_logits(logits, labels)
    assert bins.ece() == pytest.approx(0.314, abs=1e-6)
    assert MulticlassCalibrationError(2, n_bins=15, norm="l1")(logits, labels).item() == pytest.approx(0.314, abs=1e-6)
    table = bins.table()
    assert [table["count"][i] for i in (9, 10, 13)] == [1, 2, 2] and sum(table["count"]) == 5
    assert table["accuracy"][10] == 0.5 and table["confidence"][10] == pytest.approx(0.71)
    assert table["accuracy"][0] is None and table["confidence"][0] is None  # an empty bin: null in the JSON


def test_reliability_bins_match_torchmetrics_streamed_over_batches(tmp_path):
    generator = torch.Generator().manual_seed(2)
    logits = torch.randn(3000, 10, generator=generator) * 2
    labels = torch.randint(0, 10, (3000,), generator=generator)
    bins, metric = ReliabilityBins(), MulticlassCalibrationError(10, n_bins=15, norm="l1")
    for part in range(3):
        chunk = slice(part * 1000, (part + 1) * 1000)
        bins.update_logits(logits[chunk], labels[chunk])
        metric.update(logits[chunk], labels[chunk])
    assert bins.ece() == pytest.approx(metric.compute().item(), abs=1e-5)
    plot_reliability([("example", bins)], tmp_path / "reliability.png")
    assert (tmp_path / "reliability.png").stat().st_size > 1000
