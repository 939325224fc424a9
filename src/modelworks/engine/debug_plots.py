"""The pictures of `modelworks debug`: the overfitting curve, the augmentation grid, the gradient-flow map."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from .debug import NO_GRADIENT, GradientReport, OverfitResult


def pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers
    import matplotlib.pyplot as plt

    return plt


def label_font() -> Path | None:
    """matplotlib's bundled DejaVu Sans: legible headers (PIL's default bitmap font is tiny)."""
    import matplotlib

    path = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
    return path if path.is_file() else None


def plot_overfit(result: OverfitResult, path: Path, title: str) -> None:
    """The loss per step on a log scale, the target line, and the verdict in the title."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    losses = np.array(result.losses, dtype=float)
    ax.plot(np.arange(1, len(losses) + 1), np.where(losses > 0, losses, np.nan), color="#4363d8", label="loss")
    ax.axhline(result.target_ratio * losses[0], color="#3cb44b" if result.passed else "#e6194b", linestyle="--",
               label=f"target: {100 * result.target_ratio:g}% of the first loss")
    if np.isfinite(losses).all() and (losses > 0).all():
        ax.set_yscale("log")
    ax.set_xlabel("step (one fixed batch)")
    ax.set_ylabel("training loss")
    ax.set_title(f"{title}: {'PASS' if result.passed else 'FAIL'}", color="black" if result.passed else "#e6194b")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def save_view_grid(rows: list[list[torch.Tensor]], path: Path, headers: list[str], min_side: int = 128) -> None:
    """One row per sample, one column per view; small images are enlarged (nearest pixel, by a whole factor)
    to `min_side`, and each column gets its header."""
    from PIL import Image, ImageDraw, ImageFont
    from torchvision.utils import make_grid

    images = [image for row in rows for image in row]
    side = max(max(image.shape[-2:]) for image in images)
    factor = max(1, math.ceil(min_side / side))
    height = max(image.shape[-2] for image in images) * factor
    width = max(image.shape[-1] for image in images) * factor
    padded = []
    for image in images:
        image = image.repeat_interleave(factor, -2).repeat_interleave(factor, -1)
        padded.append(torch.nn.functional.pad(image, (0, width - image.shape[-1], 0, height - image.shape[-2])))
    padding = 4
    grid = make_grid(padded, nrow=len(rows[0]), padding=padding, pad_value=255)
    band = 22
    picture = Image.new("RGB", (grid.shape[-1], grid.shape[-2] + band), "white")
    picture.paste(Image.fromarray(grid.permute(1, 2, 0).numpy()), (0, band))
    draw = ImageDraw.Draw(picture)
    font = ImageFont.truetype(str(label_font()), 13) if label_font() else ImageFont.load_default()
    for column, header in enumerate(headers):
        draw.text((padding + column * (width + padding) + 2, 3), header, fill="black", font=font)
    picture.save(path)


def plot_gradient_flow(report: GradientReport, path: Path, title: str) -> None:
    """Left: log10 of each parameter's gradient RMS per step (white: no gradient). Right: its median gradient
    norm / weight norm. Flagged parameters are named in red."""
    plt = pyplot()
    params = report.parameters
    grid = np.full((len(params), report.steps), np.nan)
    for row, p in enumerate(params):
        norms = np.array(p.grad_norms, dtype=float)
        got = (norms != NO_GRADIENT) & np.isfinite(norms) & (norms > 0)
        grid[row, got] = np.log10(norms[got] / math.sqrt(p.numel))
    height = max(4.0, 0.16 * len(params) + 1.5)
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, height), sharey=True,
                                      gridspec_kw={"width_ratios": [3, 1]})
    shown = left.imshow(grid, aspect="auto", interpolation="nearest", cmap="viridis")
    fig.colorbar(shown, ax=left, label="log10 gradient RMS", fraction=0.03, pad=0.01)
    left.set_xlabel("step")
    left.set_yticks(range(len(params)))
    left.set_yticklabels([p.name for p in params], fontsize=6)
    for label, p in zip(left.get_yticklabels(), params):
        if p.flags:
            label.set_color("#e6194b")
    ratios = [p.typical_ratio() for p in params]
    right.barh(range(len(params)), [r if r > 0 else np.nan for r in ratios],
               color=["#e6194b" if p.flags else "#4363d8" for p in params])
    if any(r > 0 for r in ratios):
        right.set_xscale("log")
    right.set_xlabel("median gradient norm / weight norm")
    fig.suptitle(f"{title}: {len(report.flagged)} of {len(params)} parameters flagged")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
