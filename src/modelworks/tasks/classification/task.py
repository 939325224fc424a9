"""Project 1: image classification (Fashion-MNIST, CIFAR-10, any ImageFolder tree)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassCalibrationError

from ...data import images as image_data
from ...errors import DataError
from ...data.augment import AugmentConfig, augment_batch
from ..base import Splits, StepOutput, Task
from ..calibration import ECE_BINS, ReliabilityBins, fit_temperature, plot_reliability
from .models import build_classifier
from .predictor import ImageClassifierPredictor
from . import report

# Per-channel statistics of each training set (the seed's CIFAR-10 values; Fashion-MNIST's computed on its
# 60,000 training images). ImageFolder trees use 0.5, the midpoint, as they are unknown in advance.
NORMALISATION = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "fashion-mnist": ((0.2860,), (0.3530,)),
}


@dataclass
class ClassificationModelConfig:
    name: Literal["fastnet", "resnet18", "resnet34"] = "fastnet"
    widths: tuple[int, ...] = (16, 32, 64, 128)  # fastnet: stem width, then one width per stage
    activation: Literal["relu", "gelu"] = "relu"  # fastnet only
    strided_stages: int = 0  # fastnet only: the first N stages downsample by a stride-2 conv, not conv + max-pool
    pool_first_stages: int = 0  # fastnet only: the first N stages max-pool before their first conv, not after
    label_smoothing: float = 0.0  # cross-entropy target smoothing (the seed uses 0.1)
    tta: Literal["none", "flip", "flip_shift"] = "none"  # test-time augmentation: average the logits of the
    # image and its mirror (flip), plus both shifted by one pixel diagonally (flip_shift: 4 views)


@dataclass
class ClassificationDataConfig:
    source: str = "fashion-mnist"  # fashion-mnist | cifar10 | imagefolder:PATH
    root: str = "data"  # where downloads go and data sets are looked for
    download: bool = False  # fetch missing files (checksummed) instead of failing
    val_fraction: float = 0.1  # held out of the training set for model selection
    split_seed: int = 0  # the validation split's own seed: fixed across training seeds
    image_size: int = 32  # ImageFolder only: images are resized to this square size
    channels: int = 3  # ImageFolder only: 3 (RGB) or 1 (grayscale)
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def __post_init__(self):
        image_data.check_image_source(self.source, self.val_fraction, self.channels)


def shift_image(x: torch.Tensor, pixels: int) -> torch.Tensor:
    """Translate by `pixels` down and right (negative: up and left), filling with zeros (the data-set mean)."""
    p = abs(pixels)
    padded = F.pad(x, (p, p, p, p))
    H, W = x.shape[-2:]
    start = 0 if pixels > 0 else 2 * p
    return padded[..., start:start + H, start:start + W]


class TTAClassifier(nn.Module):
    """A classifier with its test-time augmentation: the mean logits over the views `tta` names, divided by the
    calibration temperature. The same module computes evaluation's logits and is the exported graph, so every
    runtime serves the evaluated model and its calibrated probabilities."""

    def __init__(self, model: nn.Module, tta: str, temperature: float = 1.0):
        super().__init__()
        self.model = model
        self.tta = tta
        self.temperature = float(temperature)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tta == "none":
            logits = self.model(x).float()
        else:
            views = [x, x.flip(-1)]
            if self.tta == "flip_shift":
                views += [shift_image(views[0], 1), shift_image(views[1], -1)]
            logits = torch.stack([self.model(v).float() for v in views]).mean(0)
        if self.temperature != 1.0:  # an uncalibrated model exports the same graph as before calibration existed
            logits = logits / self.temperature
        return logits


class ClassificationTask(Task):
    name = "classification"
    monitor = ("val/acc1", "max")
    ModelConfig = ClassificationModelConfig
    DataConfig = ClassificationDataConfig
    uses_channels_last = True
    # Label smoothing's target keeps its entropy: at 0.2 over 10 classes a perfect fit still costs 0.87.
    overfit_overrides = ("model.label_smoothing=0",)

    def __init__(self, cfg):
        super().__init__(cfg)
        data = cfg.data
        self.kind = data.source.split(":", 1)[0]
        self.channels = {"fashion-mnist": 1, "cifar10": 3}.get(self.kind, data.channels)
        self.image_size = {"fashion-mnist": 28, "cifar10": 32}.get(self.kind, data.image_size)
        mean, std = NORMALISATION.get(self.kind, ((0.5,) * self.channels, (0.5,) * self.channels))
        self.mean = torch.tensor(mean).view(1, -1, 1, 1)
        self.std = torch.tensor(std).view(1, -1, 1, 1)
        self.classes: list[str] = []
        # Temperature scaling (tasks/calibration.py): 1 until `adopt_calibration` gives the run's fitted value.
        self.temperature = 1.0
        self.calibrated = False

    # ------------------------------------------------------------------------------------------ data

    def datasets(self, device: torch.device) -> Splits:
        data = self.cfg.data
        root = Path(data.root)
        if self.kind == "imagefolder":
            return self._image_folder_splits(Path(data.source.split(":", 1)[1]))
        loader = image_data.load_fashion_mnist if self.kind == "fashion-mnist" else image_data.load_cifar10
        train_all = loader(root, "train", data.download)
        test = loader(root, "test", data.download)
        self.classes = train_all.classes
        train_idx, val_idx = image_data.split_indices(len(train_all.labels), data.val_fraction, data.split_seed)
        return Splits(
            train=image_data.InMemoryImages(train_all.images[train_idx], train_all.labels[train_idx], device),
            val=image_data.InMemoryImages(train_all.images[val_idx], train_all.labels[val_idx], device),
            test=image_data.InMemoryImages(test.images, test.labels, device),
        )

    def _image_folder_splits(self, folder: Path) -> Splits:
        """ROOT/train + ROOT/val|test when the tree has them; otherwise ROOT itself, split train/val."""
        data = self.cfg.data
        make = lambda samples: image_data.ImageFolderFiles(samples, self.image_size, self.channels)  # noqa: E731
        if (folder / "train").is_dir():
            train, self.classes = image_data.scan_image_folder(folder / "train")
            held_out = {name: image_data.scan_image_folder(folder / name, self.classes)[0]
                        for name in ("val", "test") if (folder / name).is_dir()}
            if "val" not in held_out:
                train_idx, val_idx = image_data.split_indices(len(train), data.val_fraction, data.split_seed)
                held_out["val"] = [train[i] for i in val_idx]
                train = [train[i] for i in train_idx]
            return Splits(make(train), make(held_out["val"]), make(held_out["test"]) if "test" in held_out else None)
        samples, self.classes = image_data.scan_image_folder(folder)
        train_idx, val_idx = image_data.split_indices(len(samples), data.val_fraction, data.split_seed)
        return Splits(make([samples[i] for i in train_idx]), make([samples[i] for i in val_idx]))

    def prepare_batch(self, batch, augment: torch.Generator | None, progress: float = 0.0):
        images, labels = batch
        if self.mean.device != images.device:
            self.mean, self.std = self.mean.to(images.device), self.std.to(images.device)
        x = augment_batch(images, self.cfg.data.augment, self.mean, self.std, augment)
        if self.cfg.train.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, labels

    def draw_batch(self, batch) -> list[torch.Tensor]:
        """The images as the model sees them, normalisation undone."""
        x = batch[0].float() * self.std.to(batch[0].device) + self.mean.to(batch[0].device)
        pixels = (x.clamp(0, 1) * 255).round().to(torch.uint8).cpu().contiguous()
        return [image.expand(3, -1, -1) for image in pixels]

    # ------------------------------------------------------------------------------------------ model

    def build_model(self) -> nn.Module:
        m = self.cfg.model
        return build_classifier(m.name, self.num_classes, self.channels, m.widths, m.activation, m.strided_stages,
                                pool_first_stages=m.pool_first_stages)

    @property
    def num_classes(self) -> int:
        if self.classes:
            return len(self.classes)
        if self.kind in ("fashion-mnist", "cifar10"):
            return 10
        return len(image_data.scan_image_folder(self._train_folder())[1])

    def _train_folder(self) -> Path:
        folder = Path(self.cfg.data.source.split(":", 1)[1])
        return folder / "train" if (folder / "train").is_dir() else folder

    def step(self, model: nn.Module, batch) -> StepOutput:
        x, y = batch
        logits = model(x).float()
        loss = F.cross_entropy(logits, y, label_smoothing=self.cfg.model.label_smoothing)
        acc = (logits.argmax(1) == y).float().mean()
        return StepOutput(loss, {"acc1": acc.detach()}, len(y))

    def logits(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The uncalibrated logits of the model as served (with its test-time augmentation)."""
        return TTAClassifier(model, self.cfg.model.tta)(x)

    # ------------------------------------------------------------------------------------------ calibration

    def calibrate(self, model: nn.Module, batches: Iterable) -> dict:
        """Fit the temperature on the validation split's served logits (Guo et al. 2017)."""
        logits, labels = [], []
        for x, y in batches:
            logits.append(self.logits(model, x).float())
            labels.append(y)
        logits, labels = torch.cat(logits), torch.cat(labels)
        with torch.autocast(logits.device.type, enabled=False):
            temperature = fit_temperature(logits, labels)
            ece = MulticlassCalibrationError(self.num_classes, n_bins=ECE_BINS, norm="l1").to(logits.device)
            return {"temperature": temperature, "tta": self.cfg.model.tta, "samples": len(labels),
                    "ece_uncalibrated": ece(logits.softmax(1), labels).item(),
                    "ece": ece((logits / temperature).softmax(1), labels).item(),
                    "nll_uncalibrated": F.cross_entropy(logits, labels).item(),
                    "nll": F.cross_entropy(logits / temperature, labels).item()}

    def adopt_calibration(self, calibration: dict | None) -> str | None:
        self.temperature, self.calibrated = 1.0, False
        if calibration is None:
            return "no calibration: probabilities are the model's raw softmax (temperature 1)"
        if calibration["tta"] != self.cfg.model.tta:
            return (f"the temperature {calibration['temperature']:.4f} was fitted with model.tta="
                    f"{calibration['tta']}, not {self.cfg.model.tta}: not used (temperature 1); fit one for this "
                    "setting with `modelworks calibrate RUN_DIR --set model.tta=...`")
        self.temperature, self.calibrated = float(calibration["temperature"]), True
        return None

    # ------------------------------------------------------------------------------------------ evaluation

    def evaluate(self, model: nn.Module, batches: Iterable, report_dir: Path | None = None) -> dict[str, float]:
        metrics = uncalibrated = None
        worst = report.WorstErrors(keep=32) if report_dir is not None else None
        bins = (ReliabilityBins(), ReliabilityBins()) if report_dir is not None else None  # uncalibrated, served
        for x, y in batches:
            raw = self.logits(model, x)
            logits = raw / self.temperature  # the served logits: what every metric below scores
            if metrics is None:  # on the batches' device, known only once the first one arrives
                metrics = report.ClassificationMetrics(self.num_classes, device=logits.device)
                if self.calibrated:
                    uncalibrated = MulticlassCalibrationError(self.num_classes, n_bins=ECE_BINS,
                                                              norm="l1").to(logits.device)
            metrics.update(logits, y)
            if uncalibrated is not None:
                uncalibrated.update(raw.softmax(1), y)  # probabilities: logits all in [0, 1] would pass as such
            if worst is not None:
                worst.update(x, logits, y)
            if bins is not None:
                bins[0].update_logits(raw, y)
                bins[1].update_logits(logits, y)
        if metrics is None:
            raise DataError("evaluate: the split has no samples on this rank; use a smaller world size")
        results = metrics.compute()
        summary = {k: v for k, v in results.items() if not isinstance(v, torch.Tensor)}
        if uncalibrated is not None:
            summary["ece_uncalibrated"] = uncalibrated.compute().item()
        if report_dir is None:
            return summary
        classes = self.classes or [str(i) for i in range(self.num_classes)]
        per_class = results["per_class_acc"].tolist()
        summary.update({f"acc1/{name}": acc for name, acc in zip(classes, per_class)})
        report.plot_confusion_matrix(results["confusion"], classes, report_dir / "confusion_matrix.png")
        mean, std = self.mean.cpu(), self.std.cpu()
        report.plot_worst_errors(worst, classes, mean, std, report_dir / "worst_errors.png")
        (report_dir / "confusion_matrix.json").write_text(json.dumps(results["confusion"].tolist()))
        panels = [("uncalibrated softmax", bins[0])]
        if self.calibrated:
            panels.append((f"calibrated: temperature {self.temperature:.3f} (served)", bins[1]))
        plot_reliability(panels, report_dir / "reliability.png")
        (report_dir / "reliability.json").write_text(json.dumps(
            {"temperature": self.temperature, "uncalibrated": bins[0].table(), "served": bins[1].table()}))
        return summary

    # ------------------------------------------------------------------------------------------ export

    def export_module(self, model: nn.Module) -> nn.Module:
        return TTAClassifier(model, self.cfg.model.tta, self.temperature)

    def example_inputs(self) -> tuple[torch.Tensor, ...]:
        return (torch.zeros(1, self.channels, self.image_size, self.image_size),)

    # ------------------------------------------------------------------------------------------ inference

    predictor_class = ImageClassifierPredictor

    def predictor(self) -> ImageClassifierPredictor:
        labels = self.classes or [str(i) for i in range(self.num_classes)]
        spec = ImageClassifierPredictor.build_spec(
            self.channels, self.image_size, self.image_size, self.mean.flatten().tolist(),
            self.std.flatten().tolist(), labels, resize=self.kind == "imagefolder", tta=self.cfg.model.tta,
            temperature=self.temperature if self.calibrated else None)
        return ImageClassifierPredictor(spec)

    def adopt_spec(self, spec: dict) -> None:
        self.classes = list(spec["labels"])
        # A package from before calibration existed has no "calibration": its graph divides by nothing.
        temperature = spec.get("calibration", {}).get("temperature")
        self.temperature, self.calibrated = (1.0, False) if temperature is None else (float(temperature), True)

    def graph_inputs(self, batch) -> tuple[torch.Tensor, ...]:
        return (batch[0],)

    def score_outputs(self, outputs, reference, batch) -> dict[str, torch.Tensor]:
        predicted = outputs[0].argmax(1)
        return {"agreement": (predicted == reference[0].argmax(1)).float(),
                "acc1": (predicted == batch[1].to(predicted.device)).float()}

    @classmethod
    def tiny(cls, folder: Path) -> dict:
        """Seconds-scale training on a small Fashion-MNIST-format set written into `folder`."""
        from ...data.synthetic import write_fashion_mnist

        write_fashion_mnist(folder, n_train=512, n_test=256)
        return {"data": {"source": "fashion-mnist", "root": str(folder)},
                "model": {"name": "fastnet", "widths": [8, 16, 16, 32]},
                "train": {"epochs": 2, "batch_size": 64, "eval_batch_size": 128, "log_every_steps": 5}}
