"""Captioning's pictures: a grid of test images with the generated caption and the references, and the
cross-attention of the last decoder block over the image grid for each generated word (as in Xu et al. 2015)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


def plot_caption_grid(samples: list[tuple[np.ndarray, str, list[str]]], out: Path, columns: int = 4,
                      references: int = 2) -> None:
    """samples: (image float [3, S, S] in [0, 1], generated caption, references)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not samples:
        return
    rows = (len(samples) + columns - 1) // columns
    # Each cell is an image row and a text row of its own, so wrapped captions never run into the next image.
    fig, axes = plt.subplots(2 * rows, columns, figsize=(3.2 * columns, 4.4 * rows), squeeze=False,
                             gridspec_kw={"height_ratios": [3.2, 1.2] * rows, "hspace": 0.05, "wspace": 0.08})
    for ax in axes.ravel():
        ax.axis("off")
    for index, (image, caption, refs) in enumerate(samples):
        row, column = divmod(index, columns)
        image_ax, text_ax = axes[2 * row, column], axes[2 * row + 1, column]
        image_ax.imshow(np.clip(image.transpose(1, 2, 0), 0, 1), interpolation="nearest")
        generated = "\n".join(textwrap.wrap(caption, 38)[:3])
        text_ax.text(0, 1, generated, transform=text_ax.transAxes, fontsize=8, color="#14532d", va="top",
                     ha="left", fontweight="bold")
        ref_text = "\n".join(textwrap.shorten(r, 48) for r in refs[:references])
        text_ax.text(0, 0.42, ref_text, transform=text_ax.transAxes, fontsize=6.5, color="#555", va="top",
                     ha="left")
    fig.subplots_adjust(left=0.01, right=0.99, top=0.99, bottom=0.01)
    fig.savefig(out, dpi=80)
    plt.close(fig)


@torch.no_grad()
def attention_maps(model, predictor, image: np.ndarray) -> tuple[list[str], np.ndarray]:
    """The greedy caption's words and, for each, the last block's cross-attention over the image's grid averaged
    over heads: [T, g, g]."""
    from .predictor import eager_runner

    (response,) = predictor.predict([predictor.item_for(image, beam=1)], eager_runner(model))
    tokens = predictor.tokenizer.encode(response.captions[0].text)
    cross = model.decoder.blocks[-1].cross
    cross.keep_weights = True
    try:
        device = next(model.parameters()).device
        inputs = torch.tensor([[predictor.eot] + tokens], device=device)
        model(torch.from_numpy(image)[None].to(device), inputs)
        weights = cross.weights[0].mean(0)[1:].float().cpu()  # [T, M]: attention while choosing each next word
    finally:
        cross.keep_weights = False
        cross.weights = None
    side = int(round(weights.shape[-1] ** 0.5))
    words = [predictor.tokenizer.decode([t]) for t in tokens]
    return words, weights[:len(words)].reshape(-1, side, side).numpy()


def plot_attention(model, predictor, images: list[np.ndarray], out: Path, words_shown: int = 7) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not images:
        return
    fig, axes = plt.subplots(len(images), words_shown + 1, figsize=(1.6 * (words_shown + 1), 1.8 * len(images)),
                             squeeze=False)
    for row, image in zip(axes, images):
        words, maps = attention_maps(model, predictor, image)
        picture = np.clip(image.transpose(1, 2, 0), 0, 1)
        for ax in row:
            ax.axis("off")
        row[0].imshow(picture)
        row[0].set_title("image", fontsize=8)
        S = image.shape[-1]
        for ax, word, grid in zip(row[1:], words, maps):
            heat = F.interpolate(torch.from_numpy(grid)[None, None], size=(S, S), mode="bilinear",
                                 align_corners=False)[0, 0].numpy()
            ax.imshow(picture)
            ax.imshow(heat, cmap="magma", alpha=0.6)
            ax.set_title(word, fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=80)
    plt.close(fig)
