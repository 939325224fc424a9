"""A decoder-only transformer (GPT: Radford et al. 2018/2019) with the choices of the nanoGPT speed-run records.

Pre-norm blocks; RMSNorm (Zhang & Sennrich 2019) or LayerNorm; rotary positions (Su et al. 2021, RoFormer) or
learned ones (GPT-2); attention through `F.scaled_dot_product_attention`; optional QK-norm (Dehghani et al.
2023); ReLU² (So et al. 2021, Primer) or GELU MLP; zero-initialised output projections (modded-nanoGPT); optional
tied input/output embeddings (Press & Wolf 2017). An optional cross-attention per block attends to a memory
sequence (image features for captioning). Without its LM head (`lm_head=False`) it is a causal sequence encoder
(SASRec scores its states against the item table itself).

Inference with a KV cache: `forward(tokens, positions, mask, past)` returns logits and the keys/values of the
new tokens, so a caller can keep a cache per sequence and batch sequences of different lengths together:
`positions` holds each row's own positions and `mask` marks the real (not padding) entries of past + new keys.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class DecoderConfig:
    vocab_size: int
    context: int = 256  # longest sequence the model is trained on (learned positions cannot go past it)
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    norm: Literal["rmsnorm", "layernorm"] = "rmsnorm"
    positions: Literal["rope", "learned"] = "rope"
    mlp: Literal["relu2", "gelu"] = "relu2"
    mlp_ratio: int = 4
    qk_norm: bool = True
    tie_embeddings: bool = False
    zero_init_proj: bool = True
    bias: bool = False
    dropout: float = 0.0
    rope_base: float = 10000.0
    logit_softcap: float = 0.0  # 0: off; else logits = c * tanh(logits / c) (Gemma 2, modded-nanoGPT)
    cross_attention: bool = False  # captioning: each block also attends to a memory sequence
    lm_head: bool = True  # False: forward returns the final normed states [B, T, C], for a caller that scores
    # them against its own table (SASRec: the item embeddings, which are also this model's input embeddings)
    embed_scale: bool = False  # multiply input embeddings by sqrt(n_embd) (Vaswani et al. 2017; SASRec does)


def make_norm(kind: str, dim: int, bias: bool) -> nn.Module:
    if kind == "layernorm":
        return nn.LayerNorm(dim, bias=bias)
    return nn.RMSNorm(dim)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding on the last axis, half-split form (GPT-NeoX). x: [B, H, T, D]; cos/sin: [B, 1, T, D/2]."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).type_as(x)


@dataclass
class Rope:
    """The rotary angles of one forward call: cos/sin [B, 1, T, D/2] for each position, or, while exporting with
    fused ONNX operators, the whole tables [context, D/2] and the positions [B, T] that ONNX's RotaryEmbedding
    (opset 23) gathers them by: one operator per rotation instead of eight (split, four products, two sums,
    concat), the same arithmetic."""

    cos: torch.Tensor
    sin: torch.Tensor
    positions: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor, num_heads: int = 0) -> torch.Tensor:
        """x [B, H, T, D]; or, fused only, [B, T, H * D] with `num_heads`."""
        if self.positions is not None:
            return torch.onnx.ops.rotary_embedding(x, self.cos, self.sin, self.positions, num_heads=num_heads)
        return rotate(x, self.cos, self.sin)


# Longest sequence trained with causal_attention_in_blocks (compiled, on a CPU). It keeps the attention weights
# for the backward pass, about B * H * T^2 / 2 floats per layer, where the fused kernel keeps O(B * H * T): at
# T 1024 (the 124M recipe) that is gigabytes.
BLOCKED_ATTENTION_MAX_T = 512


def causal_attention_in_blocks(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0,
                               block: int = 128) -> torch.Tensor:
    """Causal self-attention [B, H, T, D] as plain matrix products, one block of `block` queries at a time, each
    against the keys up to its end: what torch.compile makes fastest on a CPU. PyTorch's fused CPU kernel for
    causal attention ran fwd+bwd at ~0.07 TFLOP/s here, a fifth of a bf16 matrix product (~0.36); compiled, this ran a
    layer of the 10.7M shape (B 16, T 256) in 36 against 63-71 ms (AMD EPYC, 2 cores), the blocks skipping a
    quarter of the score matrix above the diagonal. Scores and softmax in fp32, as the fused kernel computes them."""
    T, D = q.shape[-2], q.shape[-1]
    precision = torch.promote_types(q.dtype, torch.float32)  # bf16 products, fp32 (or finer) softmax
    outputs = []
    for start in range(0, T, block):
        end = min(start + block, T)
        scores = (q[:, :, start:end] @ k[:, :, :end].transpose(-1, -2)).to(precision) * D ** -0.5
        visible = torch.ones(end - start, end, dtype=torch.bool, device=q.device).tril(diagonal=start)
        weights = scores.masked_fill(~visible, float("-inf")).softmax(dim=-1)
        if dropout_p > 0:
            weights = F.dropout(weights, dropout_p)
        outputs.append(weights.to(v.dtype) @ v[:, :, :end])
    return torch.cat(outputs, dim=2)


class Attention(nn.Module):
    def __init__(self, cfg: DecoderConfig, cross: bool = False):
        super().__init__()
        if cfg.n_embd % cfg.n_head:
            raise ValueError(f"model.n_embd: {cfg.n_embd} must be divisible by model.n_head={cfg.n_head}")
        self.n_head, self.head_dim, self.cross = cfg.n_head, cfg.n_embd // cfg.n_head, cross
        if cross:  # queries from the text, keys and values from the memory
            self.q = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
            self.kv = nn.Linear(cfg.n_embd, 2 * cfg.n_embd, bias=cfg.bias)
        else:  # one matrix product for all three: on a CPU, small models are bound by the number of ops
            self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.qk_norm = cfg.qk_norm
        if cfg.qk_norm:
            self.q_norm, self.k_norm = nn.RMSNorm(self.head_dim), nn.RMSNorm(self.head_dim)
        self.dropout = cfg.dropout

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        return x.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # [B, H, T, D]

    def forward(self, x, rope, past_k=None, past_v=None, mask=None, fused_onnx=False, last_only=False):
        """x: [B, T, C]. Returns the output and this call's own keys/values [B, H, T, D] (for the cache).
        last_only: the output of the last position alone, [B, 1, C] (keys and values still of every position)."""
        if fused_onnx and past_k is not None and not self.qk_norm and torch.onnx.is_in_onnx_export():
            return self.forward_fused(x, rope, past_k, past_v, mask, last_only)
        q, k, v = (self.split_heads(t) for t in self.qkv(x).chunk(3, dim=-1))
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = rope(q), rope(k)
        new_k, new_v = k, v
        if past_k is not None:
            k, v = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)
        dropout = self.dropout if self.training else 0.0
        if last_only:  # the last query sees every key: causality needs no mask, padding keeps its own
            mask = mask[:, :, -1:] if mask is not None else None
            y = F.scaled_dot_product_attention(q[:, :, -1:], k, v, attn_mask=mask, dropout_p=dropout)
        elif (mask is None and q.device.type == "cpu" and q.shape[-2] <= BLOCKED_ATTENTION_MAX_T
              and torch.compiler.is_compiling()):
            y = causal_attention_in_blocks(q, k, v, dropout)
        elif mask is None:  # training and un-padded prefill: the fused causal kernel
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        B, H, T, D = y.shape
        return self.proj(y.transpose(1, 2).reshape(B, T, H * D)), new_k, new_v

    def forward_fused(self, x, rope, past_k, past_v, mask, last_only=False):
        """`forward` with a cache, as ONNX opset 23 operators: the rotation and attention read [B, T, H * D]
        directly (no reshape and transpose of q, k, v and of the output), and the attention appends the new keys/
        values to the past itself (`present`), of which the new ones are the last T."""
        T = x.shape[1]
        q, k, v = self.qkv(x).chunk(3, dim=-1)  # [B, T, C] each
        if rope is not None:
            q, k = rope(q, self.n_head), rope(k, self.n_head)
        if last_only:
            q, mask = q[:, -1:], mask[:, :, -1:]
        y, present_k, present_v, _ = torch.onnx.ops.attention(q, k, v, mask, past_k, past_v, q_num_heads=self.n_head,
                                                              kv_num_heads=self.n_head)
        return self.proj(y), present_k[:, :, -T:], present_v[:, :, -T:]

    def forward_step(self, x, rope, past_k, past_v, positions):
        """One new token per row into a cache of fixed capacity. x [B, 1, C]; past_k/past_v [B, H, capacity, D],
        row b's keys/values in its first positions[b] entries; positions [B, 1]. Returns the output and present_k/
        present_v: the past with the new key/value at index positions[b] and zeros after it.

        Exported to ONNX (head size a multiple of 8), the attention is ONNX Runtime's GroupQueryAttention
        (com.microsoft): given `present` bound to the past's own buffer, it writes the one new entry in place and
        reads each row only up to its own length, so a decode step copies nothing of the cache (opset 23's
        Attention appends into a new `present`, and the past must first be gathered and split: three copies).
        Without QK-norm it takes q, k and v packed and applies the rotary embedding itself."""
        B, H, D = x.shape[0], self.n_head, self.head_dim
        gqa = torch.onnx.is_in_onnx_export() and D % 8 == 0  # GroupQueryAttention's CPU kernel needs D % 8 == 0
        # Packed: the kernel splits q/k/v and rotates q and k itself (do_rotary, half-split like `rotate`, at each
        # row's length), 3 nodes a layer fewer; a decode step at batch 1 is bound by per-node overhead.
        packed = gqa and not self.qk_norm and rope is not None and rope.positions is not None
        if packed:
            qkv, rotary = [self.qkv(x), None, None], [rope.cos, rope.sin]
            attrs = {"do_rotary": 1, "rotary_interleaved": 0}
        else:
            q, k, v = self.qkv(x).chunk(3, dim=-1)  # [B, 1, H * D] each
            if self.qk_norm:
                q, k = (norm(t.view(B, 1, H, D)).view(B, 1, H * D)
                        for norm, t in ((self.q_norm, q), (self.k_norm, k)))
            if rope is not None and rope.positions is not None:  # exporting: the fused rotation reads [B, 1, H * D]
                q, k = rope(q, H), rope(k, H)
            elif rope is not None:
                q, k = (rope(self.split_heads(t)).transpose(1, 2).reshape(B, 1, H * D) for t in (q, k))
            qkv, rotary, attrs = [q, k, v], [], {}
        if gqa:
            lengths, total = positions[:, 0].to(torch.int32), (positions.max() + 1).to(torch.int32)
            y, present_k, present_v = torch.onnx.ops.symbolic_multi_out(
                "com.microsoft::GroupQueryAttention", [*qkv, past_k, past_v, lengths, total, *rotary],
                {"num_heads": H, "kv_num_heads": H, **attrs}, dtypes=[x.dtype] * 3,
                shapes=[(B, 1, H * D), past_k.shape, past_v.shape], version=1)
            return self.proj(y), present_k, present_v
        index = torch.arange(past_k.shape[2], device=x.device)
        here = (index == positions).view(B, 1, -1, 1)  # [B, 1, capacity, 1]
        kept = (index < positions).view(B, 1, -1, 1)
        present_k = torch.where(here, self.split_heads(k), torch.where(kept, past_k, 0.0))
        present_v = torch.where(here, self.split_heads(v), torch.where(kept, past_v, 0.0))
        y = F.scaled_dot_product_attention(self.split_heads(q), present_k, present_v,
                                           attn_mask=(index <= positions).view(B, 1, 1, -1))
        return self.proj(y.transpose(1, 2).reshape(B, 1, H * D)), present_k, present_v

    def memory_kv(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-attention keys and values [B, H, S, D] of memory [B, S, C]: computed once per image when decoding
        step by step (`Decoder.memory_cache`)."""
        k, v = (self.split_heads(t) for t in self.kv(memory).chunk(2, dim=-1))
        return (self.k_norm(k) if self.qk_norm else k), v

    def attend_memory(self, x: torch.Tensor, memory: torch.Tensor | None,
                      kv: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Cross-attention: queries from x [B, T, C], keys and values from memory [B, S, C] (or precomputed `kv`);
        no mask. With `keep_weights` set, the attention weights [B, H, T, S] are kept in `weights` (attention maps)."""
        q = self.split_heads(self.q(x))
        k, v = kv if kv is not None else self.memory_kv(memory)
        if self.qk_norm:
            q = self.q_norm(q)
        if getattr(self, "keep_weights", False):
            self.weights = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(self.head_dim), dim=-1)
        y = F.scaled_dot_product_attention(q, k, v)
        B, H, T, D = y.shape
        return self.proj(y.transpose(1, 2).reshape(B, T, H * D))


class MLP(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.up = nn.Linear(cfg.n_embd, cfg.mlp_ratio * cfg.n_embd, bias=cfg.bias)
        self.proj = nn.Linear(cfg.mlp_ratio * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.kind = cfg.mlp

    def forward(self, x):
        h = self.up(x)
        h = F.relu(h).square() if self.kind == "relu2" else F.gelu(h, approximate="tanh")
        return self.proj(h)


class Block(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.norm1 = make_norm(cfg.norm, cfg.n_embd, cfg.bias)
        self.attn = Attention(cfg)
        self.cross = None
        if cfg.cross_attention:
            self.norm_cross = make_norm(cfg.norm, cfg.n_embd, cfg.bias)
            self.cross = Attention(cfg, cross=True)
        self.norm2 = make_norm(cfg.norm, cfg.n_embd, cfg.bias)
        self.mlp = MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, rope, past_k=None, past_v=None, mask=None, memory=None, memory_kv=None, fused_onnx=False,
                last_only=False):
        a, k, v = self.attn(self.norm1(x), rope, past_k, past_v, mask, fused_onnx, last_only)
        x = (x[:, -1:] if last_only else x) + self.drop(a)
        if self.cross is not None and (memory is not None or memory_kv is not None):
            x = x + self.drop(self.cross.attend_memory(self.norm_cross(x), memory, memory_kv))
        x = x + self.drop(self.mlp(self.norm2(x)))
        return x, k, v


    def forward_step(self, x, rope, past_k, past_v, positions):
        """`forward` for one token per row into a fixed-capacity cache (Attention.forward_step); no memory."""
        a, k, v = self.attn.forward_step(self.norm1(x), rope, past_k, past_v, positions)
        x = x + a
        return x + self.mlp(self.norm2(x)), k, v


class Decoder(nn.Module):
    """GPT. `forward(tokens)` -> logits [B, T, V] for training; with `positions`/`mask`/`past` it runs one
    prefill or decode step of cached inference (see the module docstring)."""

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.pos_embed = nn.Embedding(cfg.context, cfg.n_embd) if cfg.positions == "learned" else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = make_norm(cfg.norm, cfg.n_embd, cfg.bias)
        self.head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False) if cfg.lm_head else None
        head_dim = cfg.n_embd // cfg.n_head
        inv_freq = 1.0 / (cfg.rope_base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        # The angles of every position the model knows, for the fused ONNX rotation (`Rope`); computed as `rope`
        # computes them, so both give the same numbers.
        freqs = torch.arange(cfg.context, dtype=torch.float32).unsqueeze(-1) * inv_freq  # [context, D/2]
        self.register_buffer("rope_cos", freqs.cos(), persistent=False)
        self.register_buffer("rope_sin", freqs.sin(), persistent=False)
        self.init_weights()
        if cfg.tie_embeddings and self.head is not None:
            self.head.weight = self.embed.weight

    def init_weights(self) -> None:
        # GPT-2's scheme: N(0, 0.02), residual projections scaled by 1/sqrt(2 * n_layer), or zero (modded-nanoGPT:
        # each block starts as the identity, which trains faster at this scale).
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=0.02)
        for name, p in self.named_parameters():
            if name.endswith("proj.weight"):
                if self.cfg.zero_init_proj:
                    nn.init.zeros_(p)
                else:
                    nn.init.normal_(p, std=0.02 / math.sqrt(2 * self.cfg.n_layer))

    def shard_units(self) -> list[nn.Module]:
        """The blocks: under train.distributed.strategy=fsdp2 each is sharded as a unit of its own, so one block's
        parameters at a time are gathered whole."""
        return list(self.blocks)

    def no_muon_parameters(self) -> list[nn.Parameter]:
        """The output layer: optimised by AdamW under optim.name=muon, as in modded-nanoGPT."""
        return [self.head.weight] if self.head is not None else []

    def rope(self, positions: torch.Tensor, fused_onnx: bool = False) -> Rope | None:
        if self.pos_embed is not None:
            return None
        if fused_onnx and torch.onnx.is_in_onnx_export():
            return Rope(self.rope_cos, self.rope_sin, positions)
        freqs = positions.float().unsqueeze(-1) * self.inv_freq  # [B, T, D/2]
        return Rope(freqs.cos().unsqueeze(1), freqs.sin().unsqueeze(1))  # [B, 1, T, D/2]

    def embed_tokens(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Token embeddings [B, T, C] (scaled when cfg.embed_scale), plus learned positions if the model has them."""
        x = self.embed(tokens)
        if self.cfg.embed_scale:
            x = x * self.cfg.n_embd ** 0.5
        if self.pos_embed is not None:
            x = x + self.pos_embed(positions)
        return x

    def output(self, x: torch.Tensor) -> torch.Tensor:
        """The final norm, then the LM head (soft-capped when cfg.logit_softcap) if the model has one."""
        x = self.norm(x)
        if self.head is None:
            return x
        x = self.head(x)
        if self.cfg.logit_softcap > 0:
            x = self.cfg.logit_softcap * torch.tanh(x / self.cfg.logit_softcap)
        return x

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                past: torch.Tensor | None = None, memory: torch.Tensor | None = None, return_cache: bool = False,
                memory_kv: torch.Tensor | None = None, fused_onnx: bool = False, last_only: bool = False):
        """tokens [B, T] -> logits [B, T, V]; with `return_cache`, also the new keys/values [L, 2, B, H, T, D].

        positions [B, T]: each token's position (default 0..T-1). past [L, 2, B, H, S, D]: cached keys/values.
        mask [B, S + T] bool: True for real keys, False for padding (None: no padding, plain causal).
        memory [B, M, C]: what cross-attention attends to; or memory_kv [L, 2, B, H, M, D], its keys/values from
        `memory_cache` (computed once per image rather than at every decoding step). fused_onnx: while exporting to
        ONNX, use opset 23's fused operators (export the graph with Graph.onnx_opset=23); no effect otherwise.
        last_only: logits of the last position alone, [B, 1, V], for inference that reads only those (a prefill, a
        next-item score): the last block then computes one query, one attention row and one MLP row per sequence
        rather than T (its keys and values, and every earlier block, still cover every position)."""
        B, T = tokens.shape
        if positions is None:
            positions = torch.arange(T, device=tokens.device).expand(B, T)
        x = self.drop(self.embed_tokens(tokens, positions))
        rope = self.rope(positions, fused_onnx)
        attn_mask = None
        if mask is not None or past is not None:
            attn_mask = self.attention_mask(tokens, mask, past)
        keys, values = [], []
        # [L * 2, B, H, S, D]: an exported graph then cuts the cache into keys and values in one Split (one copy),
        # where indexing [L, 2, ...] by layer and then by key/value split it twice.
        flat_past = past.flatten(0, 1) if past is not None else None
        for i, block in enumerate(self.blocks):
            past_k = flat_past[2 * i] if past is not None else None
            past_v = flat_past[2 * i + 1] if past is not None else None
            cross_kv = (memory_kv[i, 0], memory_kv[i, 1]) if memory_kv is not None else None
            x, k, v = block(x, rope, past_k, past_v, attn_mask, memory, cross_kv, fused_onnx,
                            last_only and i == len(self.blocks) - 1)
            keys.append(k)
            values.append(v)
        logits = self.output(x)
        if not return_cache:
            return logits
        return logits, torch.stack([torch.stack(keys), torch.stack(values)], dim=1)  # [L, 2, B, H, T, D]

    def forward_step(self, tokens: torch.Tensor, positions: torch.Tensor, caches: list[torch.Tensor]):
        """One decoding step into caches of fixed capacity (inference, no cross-attention): tokens/positions
        [B, 1] (positions[b]: row b's keys/values so far, where its new one goes); caches: each layer's keys then
        values, [B, H, capacity, D]. Returns logits [B, V] and the caches with the new entries (see
        Attention.forward_step; in ONNX Runtime they are written in place when bound to the same buffers)."""
        if any(block.cross is not None for block in self.blocks):
            raise ValueError("forward_step: a decoder with cross-attention decodes through forward(memory_kv=...)")
        x = self.embed_tokens(tokens, positions)
        rope = self.rope(positions, fused_onnx=True)
        presents = []
        for i, block in enumerate(self.blocks):
            x, k, v = block.forward_step(x, rope, caches[2 * i], caches[2 * i + 1], positions)
            presents += [k, v]
        return self.output(x)[:, -1].float(), presents

    def memory_cache(self, memory: torch.Tensor) -> torch.Tensor:
        """Every block's cross-attention keys/values of memory [B, M, C]: [L, 2, B, H, M, D]."""
        return torch.stack([torch.stack(block.cross.memory_kv(memory)) for block in self.blocks])

    @staticmethod
    def attention_mask(tokens: torch.Tensor, mask: torch.Tensor | None, past: torch.Tensor | None) -> torch.Tensor:
        """[B, 1, T, S + T] bool: causal over past + new keys, padding keys hidden. A padding query (left
        padding of a short prompt) would see no key at all, which makes softmax NaN: it sees itself."""
        B, T = tokens.shape
        S = past.shape[-2] if past is not None else 0
        query = torch.arange(T, device=tokens.device).unsqueeze(1) + S  # [T, 1]
        key = torch.arange(S + T, device=tokens.device).unsqueeze(0)  # [1, S + T]
        allowed = (key <= query).unsqueeze(0)  # [1, T, S + T]
        if mask is not None:
            allowed = allowed & mask.bool().unsqueeze(1)
            allowed = allowed | (key == query).unsqueeze(0)
        return allowed.unsqueeze(1)  # [B, 1, T, S + T]


SIZES = {  # model.size presets: (n_layer, n_head, n_embd), about this many parameters with a 65-char vocabulary
    "0.8M": (4, 4, 128),
    "3M": (6, 6, 192),
    "10M": (6, 6, 384),
    "30M": (8, 8, 512),
    "124M": (12, 12, 768),  # GPT-2 small (with its 50k vocabulary)
}
