"""Project 3: text generation. A GPT (models/transformer.py) trained on a text corpus, character or byte-level
BPE tokens, evaluated in loss, perplexity and bits per character, sampled with a KV cache, and exported as two
graphs: `prefill` (a batch of left-padded prompts -> last logits and their keys/values) and `decode` (one token
per sequence with the cache as input -> logits and the new keys/values)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ...data import text as text_data
from ...errors import DataError
from ...files import write_text_atomic
from ...models.transformer import SIZES, Decoder, DecoderConfig
from ..base import Graph, Splits, StepOutput, Task
from .predictor import TOKENIZER_FILE, CompletionRequest, TextGenerator, cache_names

DEFAULT_SOURCE = "text:../shared/data/tinyshakespeare/input.txt"


@dataclass
class LanguageModelConfig:
    size: Literal["custom", "0.8M", "3M", "10M", "30M", "124M"] = "0.8M"  # n_layer/n_head/n_embd preset
    n_layer: int = 0  # 0: from `size`
    n_head: int = 0
    n_embd: int = 0
    context: int = 256  # tokens per training window, and the longest context at inference
    norm: Literal["rmsnorm", "layernorm"] = "rmsnorm"
    positions: Literal["rope", "learned"] = "rope"
    mlp: Literal["relu2", "gelu"] = "relu2"
    qk_norm: bool = True
    tie_embeddings: bool = False
    zero_init_proj: bool = True
    bias: bool = False
    dropout: float = 0.0
    logit_softcap: float = 0.0  # 0: off
    samples_every_eval: int = 1  # text samples written at each evaluation (run dir and TensorBoard); 0: none
    sample_tokens: int = 200  # length of each sample

    def __post_init__(self):
        if self.size == "custom" and not (self.n_layer and self.n_head and self.n_embd):
            raise ValueError("model.size: 'custom' needs model.n_layer, model.n_head and model.n_embd")
        if self.context < 2:
            raise ValueError(f"model.context: must be >= 2 (got {self.context})")

    def shape(self) -> tuple[int, int, int]:
        preset = SIZES.get(self.size, (0, 0, 0))
        n_layer, n_head, n_embd = (self.n_layer or preset[0], self.n_head or preset[1], self.n_embd or preset[2])
        if n_embd % n_head or (n_embd // n_head) % 2:
            raise ValueError(f"model.n_embd: {n_embd} must divide into model.n_head={n_head} heads of an even width")
        return n_layer, n_head, n_embd


@dataclass
class TokenizerConfig:
    kind: Literal["char", "bpe"] = "char"
    vocab_size: int = 2048  # bpe only: merges are learned until the vocabulary has this many tokens


@dataclass
class LanguageModelDataConfig:
    source: str = DEFAULT_SOURCE  # text:PATH, a .txt file, a folder of .txt files or a .jsonl with "text"
    val_fraction: float = 0.1  # the last part of the text (nanoGPT's split for tiny-shakespeare)
    cache_dir: str = "data/cache/text"  # encoded token arrays and trained tokenizers, keyed by content hash
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)

    def __post_init__(self):
        if not self.source.startswith("text:") or len(self.source) == 5:
            raise ValueError(f"data.source: {self.source!r} is not a text source; use text:PATH (a .txt file, a "
                             "folder of .txt files, or a .jsonl file with a \"text\" field)")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"data.val_fraction: must be in (0, 1) (got {self.val_fraction})")


class Prefill(nn.Module):
    """Prompts, left-padded: tokens/positions/mask [B, T] -> logits at the last position [B, V], keys/values
    [L, 2, B, H, T, D]."""

    def __init__(self, model: Decoder):
        super().__init__()
        self.model = model

    def forward(self, tokens, positions, mask):
        # last_only: the last block's queries, attention and MLP for the last position alone (its keys and values
        # for every position): with 16 streams re-filling their windows, prefills were a third of the graph time.
        logits, kv = self.model(tokens, positions, mask, return_cache=True, fused_onnx=True, last_only=True)
        return logits[:, -1].float(), kv


class Decode(nn.Module):
    """One token per sequence into a cache of fixed capacity: tokens/positions [B, 1] (positions[b]: the row's
    keys/values so far), then each layer's past keys and values [B, H, capacity, D] -> logits [B, V], then each
    layer's present keys and values (the past with the new entry at positions[b]). The exported graph's attention
    is ONNX Runtime's GroupQueryAttention: the predictor binds each present to its past's buffer (its own per-slot
    cache), and the step writes one entry per row in place instead of copying the cache three times."""

    def __init__(self, model: Decoder):
        super().__init__()
        self.model = model

    def forward(self, tokens, positions, *caches):
        logits, presents = self.model.forward_step(tokens, positions, list(caches))
        return (logits, *presents)


class LanguageModelTask(Task):
    name = "language_model"
    monitor = ("val/loss", "min")
    ModelConfig = LanguageModelConfig
    DataConfig = LanguageModelDataConfig
    config_aliases = {"tokenizer": "data.tokenizer"}  # the issue's `--set tokenizer.kind=bpe`
    int8_method = "dynamic"  # weights int8, activations quantized per call: what suits matmul-bound transformers

    def __init__(self, cfg):
        super().__init__(cfg)
        self.tokenizer = None
        self.vocab_size = 0  # from the tokenizer, or from a package's spec (adopt_spec)
        self.tokens_per_char = 1.0  # of the validation text: nats/token -> bits per character

    # ------------------------------------------------------------------------------------------ data

    def source_path(self) -> Path:
        path = Path(self.cfg.data.source[len("text:"):])
        if not path.exists() and self.cfg.data.source == DEFAULT_SOURCE:
            raise DataError(f"data.source: {path} does not exist. The recipes read tiny-shakespeare from "
                            "../shared/data/tinyshakespeare/input.txt (karpathy/char-rnn's input.txt, 1,115,394 "
                            "bytes); put it there, or train on your own text with --data text:PATH")
        return path

    def datasets(self, device: torch.device) -> Splits:
        data = self.cfg.data
        path = self.source_path()
        documents = text_data.read_documents(path)
        train_docs, val_docs = text_data.split_documents(documents, data.val_fraction)
        if not val_docs:
            raise DataError(f"{path}: too little text to hold out data.val_fraction={data.val_fraction}")
        cache_dir = Path(data.cache_dir) if data.cache_dir else None
        self.tokenizer = self.cached_tokenizer(cache_dir, train_docs)
        self.vocab_size = self.tokenizer.vocab_size
        train = text_data.cached_encoding(cache_dir, self.tokenizer, train_docs)
        val = self.encode_validation(cache_dir, val_docs)
        val_chars = sum(len(d) for d in val_docs)
        self.tokens_per_char = len(val) / max(val_chars, 1)
        context = self.cfg.model.context
        notes = [f"text {path}: {len(documents)} document(s); {self.tokenizer.kind} tokenizer, vocabulary "
                 f"{self.tokenizer.vocab_size}; train {len(train):,} tokens, val {len(val):,} tokens "
                 f"({val_chars:,} characters)"]
        return Splits(train=text_data.RandomWindows(train, context, device),
                      val=text_data.StridedWindows(val, context, device), notes=notes)

    def cached_tokenizer(self, cache_dir: Path | None, documents: list[str]):
        """Train the tokenizer on the training split, or reuse the one trained on the same text and settings."""
        import hashlib

        t = self.cfg.data.tokenizer
        digest = hashlib.sha256(f"{t.kind}:{t.vocab_size}".encode())
        for doc in documents:
            digest.update(hashlib.sha256(doc.encode()).digest())
        path = cache_dir / f"tokenizer-{digest.hexdigest()[:20]}.json" if cache_dir else None
        if path is not None and path.is_file():
            tokenizer = text_data.tokenizer_from_json(path.read_text())
        else:
            tokenizer = text_data.train_tokenizer(t.kind, documents, t.vocab_size)
            if path is not None:  # atomic: every rank of a run may write it while another already reads it
                write_text_atomic(path, tokenizer.to_json())
        # The run keeps its own copy, readable without the cache or the data (the package ships another).
        run_dir = Path(self.cfg.output_dir) / self.cfg.task / self.cfg.name
        if self.cfg.name and run_dir.is_dir():
            write_text_atomic(run_dir / TOKENIZER_FILE, tokenizer.to_json())
        return tokenizer

    def encode_validation(self, cache_dir, val_docs):
        if self.tokenizer.kind == "char":  # characters never seen in training: refused, named
            known = set(self.tokenizer.chars)
            unknown = sorted({c for doc in val_docs for c in doc} - known)
            if unknown:
                raise DataError(f"{self.cfg.data.source}: the validation part holds characters the training part "
                                f"does not ({''.join(unknown)[:40]!r}); a character model cannot encode them. Use "
                                "--set tokenizer.kind=bpe, or another data.val_fraction")
        return text_data.cached_encoding(cache_dir, self.tokenizer, val_docs)

    # ------------------------------------------------------------------------------------------ model

    def decoder_config(self) -> DecoderConfig:
        m = self.cfg.model
        n_layer, n_head, n_embd = m.shape()
        if not self.vocab_size:  # the tokenizer decides it: read (or train) it from the data, as datasets() does
            self.datasets(torch.device("cpu"))
        return DecoderConfig(vocab_size=self.vocab_size, context=m.context, n_layer=n_layer,
                             n_head=n_head, n_embd=n_embd, norm=m.norm, positions=m.positions, mlp=m.mlp,
                             qk_norm=m.qk_norm, tie_embeddings=m.tie_embeddings, zero_init_proj=m.zero_init_proj,
                             bias=m.bias, dropout=m.dropout, logit_softcap=m.logit_softcap)

    def build_model(self) -> nn.Module:
        return Decoder(self.decoder_config())

    def step(self, model: nn.Module, batch) -> StepOutput:
        x, y = batch
        logits = model(x)
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        return StepOutput(loss, {}, len(x))

    # ------------------------------------------------------------------------------------------ evaluation

    def evaluate(self, model: nn.Module, batches: Iterable, report_dir: Path | None = None) -> dict[str, float]:
        from torchmetrics.aggregation import SumMetric

        nats = tokens = None
        for x, y in batches:
            if nats is None:
                nats, tokens = SumMetric().to(x.device), SumMetric().to(x.device)
            logits = model(x).float()
            nats.update(F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum").double())
            tokens.update(torch.tensor(float(y.numel()), device=x.device, dtype=torch.float64))
        if nats is None:
            raise DataError("evaluate: the split has no windows on this rank; use a smaller world size")
        loss = (nats.compute() / tokens.compute()).item()
        metrics = {"loss": loss, "ppl": math.exp(min(loss, 50.0)),
                   "bpc": loss * self.tokens_per_char / math.log(2), "tokens": tokens.compute().item()}
        if report_dir is not None:
            samples = self.samples(model)
            (report_dir / "samples.txt").write_text("\n\n".join(f"--- {k}\n{v}" for k, v in samples.items()))
            plot_loss_curves(report_dir.parent / "metrics.jsonl", report_dir / "loss_curves.png")
        return metrics

    def samples(self, model: nn.Module) -> dict[str, str]:
        """Text the model writes from a few prompts (greedy and sampled), for the run's record at each evaluation."""
        m = self.cfg.model
        if not m.samples_every_eval or self.tokenizer is None:
            return {}
        generator = self.predictor()
        run = eager_runner(model)
        # A new line, as a text begins; a character model that never saw one starts from its first character.
        prompt = "\n" if self.tokenizer.kind == "bpe" or "\n" in self.tokenizer.index else self.tokenizer.chars[0]
        requests = {"greedy": CompletionRequest(prompt=prompt, max_tokens=m.sample_tokens, temperature=0.0),
                    "t=0.8": CompletionRequest(prompt=prompt, max_tokens=m.sample_tokens, temperature=0.8, top_k=50,
                                               seed=0)}
        was_training = model.training
        model.eval()
        with torch.no_grad(), torch.autocast(next(model.parameters()).device.type, enabled=False):
            responses = generator.predict([generator.parse(r) for r in requests.values()], run)
        model.train(was_training)
        return {name: prompt + r.text for name, r in zip(requests, responses)}

    # ------------------------------------------------------------------------------------------ export

    def example_inputs(self) -> tuple[torch.Tensor, ...]:
        return (torch.zeros(2, min(8, self.cfg.model.context), dtype=torch.long),)

    def export_graphs(self, model: nn.Module) -> dict[str, Graph]:
        return decoder_graphs(model)

    def graph_batch_inputs(self, batch, graph: str, previous: dict) -> tuple[torch.Tensor, ...]:
        """Validation windows: the prefill graph reads all but the last token; decode continues each window by
        its last token from the prefill's cache."""
        x, _ = batch
        B, T = x.shape
        if graph == "prefill":
            prompt = x[:, :-1] if T > 1 else x
            return prompt, torch.arange(prompt.shape[1]).expand_as(prompt).contiguous(), torch.ones_like(prompt,
                                                                                                        dtype=torch.bool)
        past = previous["prefill"][1]  # [L, 2, B, H, S, D]; each layer's keys and values, with room for one more
        S = past.shape[4]
        caches = F.pad(past, (0, 0, 0, 1)).flatten(0, 1)
        return (x[:, -1:], torch.full((B, 1), S, dtype=torch.long), *caches)

    def score_graph_outputs(self, graph: str, outputs, reference, batch) -> dict[str, torch.Tensor]:
        """agreement: the same next token (argmax) as eager; nll: the true next token's loss (decode graph)."""
        predicted = outputs[0].argmax(-1)
        scores = {"agreement": (predicted == reference[0].argmax(-1)).float()}
        target = batch[1][:, -2] if graph == "prefill" else batch[1][:, -1]
        scores["nll"] = F.cross_entropy(outputs[0].float(), target, reduction="none")
        return scores

    # ------------------------------------------------------------------------------------------ inference

    predictor_class = TextGenerator

    def predictor(self) -> TextGenerator:
        n_layer = self.cfg.model.shape()[0]
        graphs = {"prefill": {"inputs": [{"name": "tokens", "dtype": "int64"}, {"name": "positions", "dtype": "int64"},
                                         {"name": "mask", "dtype": "bool"}], "outputs": ["logits", "kv"]},
                  "decode": {"inputs": [{"name": "tokens", "dtype": "int64"}, {"name": "positions", "dtype": "int64"},
                                        *[{"name": name, "dtype": "float32"}
                                          for name in cache_names(n_layer, "past")]],
                             "outputs": ["logits", *cache_names(n_layer, "present")]}}
        return TextGenerator(TextGenerator.build_spec(self.tokenizer, self.cfg.model.context, graphs), self.tokenizer)

    @classmethod
    def load_predictor(cls, spec: dict, folder: Path | None = None) -> TextGenerator:
        return TextGenerator(spec, folder=folder)

    def adopt_spec(self, spec: dict) -> None:
        self.vocab_size = int(spec["vocab_size"])

    @classmethod
    def tiny(cls, folder: Path) -> dict:
        """Seconds-scale training on a generated text file (a few thousand characters of simple verse)."""
        folder.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(0)
        words = ["the", "king", "queen", "speaks", "to", "a", "lord", "and", "his", "love", "is", "fair", "night"]
        lines = [" ".join(rng.choice(words, size=6)) + "." for _ in range(400)]
        (folder / "input.txt").write_text("\n".join(lines) + "\n")
        return {"data": {"source": f"text:{folder / 'input.txt'}", "cache_dir": str(folder / "cache")},
                "model": {"size": "custom", "n_layer": 2, "n_head": 2, "n_embd": 32, "context": 32,
                          "sample_tokens": 16},
                "train": {"epochs": 0.05, "batch_size": 32, "eval_batch_size": 64, "log_every_steps": 5}}


def decoder_graphs(model: Decoder) -> dict[str, Graph]:
    """The package's prefill and decode graphs of `model`."""
    model = model.eval()
    cfg = model.cfg
    H, D = cfg.n_head, cfg.n_embd // cfg.n_head
    B, T, S = 2, min(4, cfg.context), 3
    tokens = torch.zeros(B, T, dtype=torch.long)
    positions = torch.arange(T).expand(B, T).contiguous()
    mask = torch.ones(B, T, dtype=torch.bool)
    batch, length, cache = "batch", "length", "cache"
    # Opset 23 for its fused RMSNormalization, Attention and RotaryEmbedding (Decoder's fused_onnx): the decode
    # graph of the 0.8M model falls from 318 nodes to ~140, and a decode step is bound by per-node overhead. The
    # decode graph's attention is ONNX Runtime's GroupQueryAttention instead (Decode), which updates the cache in
    # place; its caches have room for S + 1 entries at export (any capacity at run time).
    return {
        "prefill": Graph(Prefill(model), (tokens, positions, mask), ["tokens", "positions", "mask"],
                         ["logits", "kv"], {"tokens": {0: batch, 1: length}, "positions": {0: batch, 1: length},
                                           "mask": {0: batch, 1: length}}, onnx_opset=23),
        "decode": Graph(Decode(model), (tokens[:, :1], positions[:, :1] + S,
                                        *[torch.zeros(B, H, S + 1, D) for _ in range(2 * cfg.n_layer)]),
                        ["tokens", "positions", *cache_names(cfg.n_layer, "past")],
                        ["logits", *cache_names(cfg.n_layer, "present")],
                        {"tokens": {0: batch}, "positions": {0: batch},
                         **{name: {0: batch, 2: cache} for name in cache_names(cfg.n_layer, "past")}},
                        onnx_opset=23),
    }


def eager_runner(model: nn.Module):
    """The prefill and decode graphs of `model` in eager PyTorch, called as a predictor calls a package's graphs."""
    from ...export.runtime import GraphSet, TorchRunner

    return GraphSet({"prefill": TorchRunner(Prefill(model), ["tokens", "positions", "mask"]),
                     "decode": TorchRunner(Decode(model), ["tokens", "positions",
                                                           *cache_names(model.cfg.n_layer, "past")])})


@torch.no_grad()
def generate_uncached(model: nn.Module, prompt: list[int], max_new_tokens: int) -> list[int]:
    """Greedy decoding that runs the whole context again for every token (nanoGPT's sampler): the reference the
    cached path must match, and the baseline of the generation benchmark."""
    context = model.cfg.context
    device = next(model.parameters()).device
    ids = torch.tensor([prompt], device=device)
    for _ in range(max_new_tokens):
        logits = model(ids[:, -context:])[:, -1]
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    return ids[0, len(prompt):].tolist()


def plot_loss_curves(metrics_path: Path, out: Path) -> None:
    """train/loss and val/loss against the step, from the run's metrics.jsonl."""
    if not metrics_path.is_file():
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves: dict[str, list[tuple[int, float]]] = {"train/loss": [], "val/loss": []}
    for line in metrics_path.read_text().splitlines():
        record = json.loads(line)
        for key in curves:
            if key in record:
                curves[key].append((record["step"], record[key]))
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, points in curves.items():
        if points:
            ax.plot(*zip(*points), label=key, marker="o" if key.startswith("val") else None, markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per token)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
