"""The captioner: a convolutional grid encoder, then a transformer decoder that cross-attends to the grid.

The encoder is FastNet's trunk (models/convnets.py, shared with classification): images [B, 3, S, S] -> a feature
grid [B, C, S/8, S/8] -> one memory vector per cell, projected to the decoder's width, plus a learned embedding
of the cell's place (without it cross-attention could not tell left from right). The decoder is the language
model's transformer (models/transformer.py) with a cross-attention per block, as in "Show, Attend and Tell"
(Xu et al. 2015) with the transformer of Vaswani et al. 2017 in place of the LSTM.

Inference runs as two graphs: `encode` (images -> every block's cross-attention keys/values, once per image) and
`decode` (one token per sequence, the self-attention cache and the image's keys/values as inputs -> logits and the
new keys/values).
"""

from __future__ import annotations

import torch
from torch import nn

from ...models.convnets import fastnet_features
from ...models.transformer import Decoder, DecoderConfig

PIXEL_MEAN, PIXEL_STD = 0.5, 0.25  # images come in [0, 1]; centred so the first conv sees a zero-mean input


class Captioner(nn.Module):
    def __init__(self, decoder: DecoderConfig, image_size: int, widths: tuple[int, ...], strided_stages: int):
        super().__init__()
        stages = len(widths) - 1
        if image_size % (1 << stages):
            raise ValueError(f"data.image_size: {image_size} must divide by 2^{stages} (the encoder's stages)")
        self.encoder = fastnet_features(3, tuple(widths), "relu", strided_stages)
        cells = (image_size >> stages) ** 2
        self.project = nn.Linear(widths[-1], decoder.n_embd)
        self.cell_embed = nn.Parameter(torch.zeros(1, cells, decoder.n_embd))
        nn.init.normal_(self.cell_embed, std=0.02)
        self.decoder = Decoder(decoder)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images float [B, 3, S, S] in [0, 1] -> memory [B, M, C] (M grid cells)."""
        grid = self.encoder((images - PIXEL_MEAN) / PIXEL_STD)  # [B, C', S/8, S/8]
        return self.project(grid.flatten(2).transpose(1, 2)) + self.cell_embed  # [B, M, C]

    def forward(self, images: torch.Tensor, tokens: torch.Tensor, captions_per_image: int = 1) -> torch.Tensor:
        """Teacher forcing: images [B, 3, S, S], tokens [B * captions_per_image, T] (start token first; an image's
        captions next to each other) -> logits [B * captions_per_image, T, V]. Each image is encoded once."""
        memory = self.encode(images)
        if captions_per_image > 1:
            memory = memory.repeat_interleave(captions_per_image, dim=0)
        return self.decoder(tokens, memory=memory)

    def no_muon_parameters(self) -> list[nn.Parameter]:
        return self.decoder.no_muon_parameters()


class EncodeGraph(nn.Module):
    """images [B, 3, S, S] -> memory_kv [L, 2, B, H, M, D]."""

    def __init__(self, model: Captioner):
        super().__init__()
        self.model = model

    def forward(self, images):
        return self.model.decoder.memory_cache(self.model.encode(images))


class DecodeGraph(nn.Module):
    """One token per sequence: tokens [B, 1], positions [B, 1], mask [B, S + 1], past [L, 2, B, H, S, D],
    memory_kv [L, 2, B, H, M, D] -> log-probabilities [B, V] and the token's keys/values [L, 2, B, H, 1, D]."""

    def __init__(self, model: Captioner):
        super().__init__()
        self.decoder = model.decoder

    def forward(self, tokens, positions, mask, past, memory_kv):
        logits, kv = self.decoder(tokens, positions, mask, past, return_cache=True, memory_kv=memory_kv)
        return torch.log_softmax(logits[:, -1].float(), dim=-1), kv
