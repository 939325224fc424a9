"""Project 5: image captioning. A convolutional grid encoder and a transformer decoder with cross-attention
(model.py), trained with teacher forcing and label smoothing on fmnist-captions (generated from real Fashion-MNIST
items), COCO captions or Flickr8k/30k; decoded greedily, by beam search or by sampling with a KV cache; scored by
pycocoevalcap (BLEU, METEOR, ROUGE-L, CIDEr-D), on seen and unseen class-colour combinations apart; exported as two
graphs, `encode` (once per image) and `decode` (once per token)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ...data.captioning import formats
from ...data.captioning.scenes import CaptionSceneConfig, ensure_caption_scenes
from ...data.captioning.words import normalise, train_caption_tokenizer
from ...data.image_files import default_max_pixels
from ...engine import distributed
from ...errors import ConfigError, DataError
from ...files import write_text_atomic
from ...models.transformer import DecoderConfig
from ..base import Graph, Splits, StepOutput, Task
from .model import Captioner, DecodeGraph, EncodeGraph
from .predictor import TOKENIZER_FILE, CaptionPredictor, eager_runner

SOURCES = "fmnist-captions, coco-captions:ANNOTATIONS.json:IMAGES_DIR or flickr:CAPTIONS.txt:IMAGES_DIR"
IGNORE = -100  # target of padding positions: no loss


@dataclass
class CaptionModelConfig:
    widths: tuple[int, ...] = (32, 64, 128, 192)  # encoder (FastNet's trunk): stem width, then one per stage
    strided_stages: int = 3  # stages that downsample by a stride-2 conv (cheaper on a CPU than conv + max-pool)
    n_layer: int = 2  # decoder blocks
    n_head: int = 4
    n_embd: int = 128
    mlp: Literal["relu2", "gelu"] = "gelu"
    dropout: float = 0.1
    max_length: int = 24  # tokens per caption, the end token included; longer references are cut
    label_smoothing: float = 0.1  # Szegedy et al. 2016; as in the transformer captioners (e.g. Cornia et al.)
    objective: Literal["xe", "scst"] = "xe"  # xe: cross-entropy (teacher forcing); scst: self-critical
    # fine-tuning on CIDEr-D (needs train.init_from, a model trained with xe first): self_critical.py
    scst_samples: int = 5  # captions drawn per image under scst; each one's baseline is the others' mean reward
    beam: int = 3  # the test report's and the package's default beam width
    length_penalty: float = 0.6  # GNMT's alpha for beam search (the package's default)

    def __post_init__(self):
        if len(self.widths) < 2:
            raise ValueError(f"model.widths: a stem width and at least one stage width (got {list(self.widths)})")
        if self.n_embd % self.n_head or (self.n_embd // self.n_head) % 2:
            raise ValueError(f"model.n_embd: {self.n_embd} must divide into model.n_head={self.n_head} heads of an "
                             "even width")
        if not 2 <= self.max_length <= 512:
            raise ValueError(f"model.max_length: must be in [2, 512] (got {self.max_length})")
        if not 1 <= self.beam <= 8:
            raise ValueError(f"model.beam: must be in [1, 8] (got {self.beam})")
        if not 2 <= self.scst_samples <= 32:
            raise ValueError(f"model.scst_samples: must be in [2, 32] (got {self.scst_samples}): the baseline of "
                             "each sample is the mean reward of the image's other samples")


@dataclass
class CaptionTokenizerConfig:
    kind: Literal["word", "bpe"] = "word"
    min_count: int = 5  # word: rarer words become <unk> (neuraltalk's threshold)
    vocab_size: int = 1000  # bpe: merges are learned until the vocabulary has this many tokens


@dataclass
class CaptionDataConfig:
    source: str = "fmnist-captions"  # or coco-captions:ANNOTATIONS.json:IMAGES_DIR, flickr:CAPTIONS.txt:IMAGES_DIR
    root: str = "data"  # fmnist-captions: where Fashion-MNIST is looked for and the data set is written
    image_size: int = 64  # images are resized to this square (pixels; a multiple of 2^stages)
    val_fraction: float = 0.05  # held out when the source has no splits
    test_fraction: float = 0.05
    split_seed: int = 0
    references: int = 5  # references kept per image (training draws one per step; metrics use all)
    scenes: CaptionSceneConfig = field(default_factory=CaptionSceneConfig)  # fmnist-captions only
    tokenizer: CaptionTokenizerConfig = field(default_factory=CaptionTokenizerConfig)

    def __post_init__(self):
        kind, _, rest = self.source.partition(":")
        if kind not in ("fmnist-captions", "coco-captions", "flickr") or (kind == "fmnist-captions") == bool(rest):
            raise ValueError(f"data.source: {self.source!r} is not a captioning data source; use {SOURCES}")
        if kind != "fmnist-captions" and len(rest.split(":")) != 2:
            raise ValueError(f"data.source: {self.source!r}: expected {kind}:FILE:IMAGES_DIR")
        if not 0 < self.val_fraction < 1 or not 0 <= self.test_fraction < 1 or \
                self.val_fraction + self.test_fraction >= 1:
            raise ValueError(f"data.val_fraction, data.test_fraction: must leave training images (got "
                             f"{self.val_fraction}, {self.test_fraction})")
        if self.references < 1:
            raise ValueError(f"data.references: must be >= 1 (got {self.references})")


class CaptionSet:
    """A split in memory: uint8 images [N, 3, S, S], reference tokens [N, R, T] (the end token after each
    caption, -1 beyond), the reference count of each image, and each image's id (unique across splits)."""

    def __init__(self, images: torch.Tensor, references: torch.Tensor, counts: torch.Tensor, ids: torch.Tensor,
                 device: torch.device):
        self.images, self.references = images.to(device), references.to(device)
        self.counts, self.ids = counts.to(device), ids.to(device)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int):
        return self.images[i], self.references[i], self.counts[i], self.ids[i]

    def get_batch(self, indices: torch.Tensor):
        indices = indices.to(self.ids.device)
        return self.images[indices], self.references[indices], self.counts[indices], self.ids[indices]


class CaptioningTask(Task):
    name = "captioning"
    monitor = ("val/cider", "max")
    ModelConfig = CaptionModelConfig
    DataConfig = CaptionDataConfig
    uses_channels_last = False  # the encoder is a small part of the step: NHWC conversions would cost more
    int8_method = "dynamic"  # the decoder's matrix products dominate the per-token cost
    overfit_overrides = ("model.label_smoothing=0", "model.dropout=0")

    def __init__(self, cfg):
        super().__init__(cfg)
        self.train_ids: list[int] = []
        self.cider_corpus = None  # (document frequencies, log N) of the training references, for scst's reward
        self.tokenizer = None
        self.vocab_size = 0
        self.captions: dict[int, list[str]] = {}  # image id -> its references (all splits): what metrics score
        self.combination: dict[int, str] = {}  # image id -> seen | unseen (fmnist-captions)

    # ------------------------------------------------------------------------------------------ data

    def read_splits(self) -> tuple[dict[str, list[formats.CaptionedImage]], list[str]]:
        data = self.cfg.data
        if data.source == "fmnist-captions":
            root = Path(data.root)
            scenes = data.scenes
            if scenes.image_size != data.image_size:
                raise DataError(f"data.scenes.image_size: {scenes.image_size} differs from data.image_size="
                                f"{data.image_size}; set both to the same size")
            folder = ensure_caption_scenes(root, scenes)
            splits = {s: formats.read_coco_captions(folder / "annotations" / f"captions_{s}.json", folder / "images" / s)
                      for s in formats.SPLITS if getattr(scenes, s) > 0}
            splits.setdefault("test", [])
            return splits, [f"fmnist-captions {folder}: train {len(splits['train'])}, val {len(splits['val'])}, test "
                            f"{len(splits['test'])} scenes (test: half with class-colour pairs never in training)"]
        return formats.read_caption_source(data.source, data.val_fraction, data.test_fraction, data.split_seed)

    def datasets(self, device: torch.device) -> Splits:
        data, m = self.cfg.data, self.cfg.model
        if m.objective == "scst" and not self.cfg.train.init_from:  # (a recipe cannot name the user's run)
            raise ConfigError("model.objective=scst fine-tunes a trained captioner: set train.init_from to the run "
                              "directory of one trained with model.objective=xe (e.g. the fmnist-captions recipe)")
        splits, notes = self.read_splits()
        self.tokenizer = train_caption_tokenizer(
            data.tokenizer.kind, [c for im in splits["train"] for c in im.captions[:data.references]],
            data.tokenizer.min_count, data.tokenizer.vocab_size)
        self.vocab_size = self.tokenizer.vocab_size
        self.save_tokenizer()
        sets, cut = {}, 0
        for k, split in enumerate(formats.SPLITS):
            images = splits[split]
            if not images:
                continue
            ids = torch.arange(len(images)) + k * 10_000_000
            if split == "train":
                self.train_ids = ids.tolist()
            refs = torch.full((len(images), data.references, m.max_length), -1, dtype=torch.long)
            counts = torch.zeros(len(images), dtype=torch.long)
            for i, (image_id, image) in enumerate(zip(ids.tolist(), images)):
                self.captions[image_id] = image.captions
                if "combination" in image.info:
                    self.combination[image_id] = image.info["combination"]
                kept = image.captions[:data.references]
                counts[i] = len(kept)
                for r, caption in enumerate(kept):
                    tokens = self.tokenizer.encode(normalise(caption))[:m.max_length - 1] + [self.tokenizer.eot_id]
                    cut += len(self.tokenizer.encode(normalise(caption))) > m.max_length - 1
                    refs[i, r, :len(tokens)] = torch.tensor(tokens)
            pixels = formats.load_images(images, data.image_size, default_max_pixels(data.image_size ** 2) * 64)
            sets[split] = CaptionSet(pixels, refs, counts, ids, device)
        notes.append(f"{self.tokenizer.kind} tokenizer: vocabulary {self.vocab_size}" +
                     (f"; {cut} reference(s) longer than model.max_length={m.max_length} were cut" if cut else ""))
        return Splits(train=sets["train"], val=sets["val"], test=sets.get("test"), notes=notes)

    def save_tokenizer(self) -> None:
        """The run keeps its own copy of the tokenizer, readable without the data (the package ships another)."""
        run_dir = Path(self.cfg.output_dir) / self.cfg.task / self.cfg.name
        if self.cfg.name and run_dir.is_dir():
            write_text_atomic(run_dir / TOKENIZER_FILE, self.tokenizer.to_json())

    def prepare_batch(self, batch, augment: torch.Generator | None, progress: float = 0.0):
        """Images to [0, 1]; one reference per image (a random one in training, the first in evaluation) as
        decoder inputs (start token, then the caption) and targets (the caption, then the end token)."""
        images, references, counts, ids = batch
        B = len(ids)
        if augment is not None:
            pick = (torch.rand(B, generator=augment, device=augment.device).to(counts.device) * counts).long()
        else:
            pick = torch.zeros(B, dtype=torch.long, device=counts.device)
        tokens = references[torch.arange(B, device=counts.device), pick.clamp(max=references.shape[1] - 1)]
        eot = self.tokenizer.eot_id if self.tokenizer is not None else 0
        inputs = torch.cat([torch.full((B, 1), eot, dtype=torch.long, device=tokens.device), tokens[:, :-1]], dim=1)
        inputs = inputs.masked_fill(inputs < 0, eot)
        targets = tokens.masked_fill(tokens < 0, IGNORE)
        return {"images": images.float() / 255.0, "inputs": inputs, "targets": targets, "ids": ids}

    # ------------------------------------------------------------------------------------------ model

    def decoder_config(self) -> DecoderConfig:
        m = self.cfg.model
        if not self.vocab_size:
            self.datasets(torch.device("cpu"))
        return DecoderConfig(vocab_size=self.vocab_size, context=m.max_length + 1, n_layer=m.n_layer, n_head=m.n_head,
                             n_embd=m.n_embd, mlp=m.mlp, dropout=m.dropout, positions="learned",
                             cross_attention=True)

    def build_model(self) -> nn.Module:
        m = self.cfg.model
        return Captioner(self.decoder_config(), self.cfg.data.image_size, m.widths, m.strided_stages)

    def step(self, model: nn.Module, batch) -> StepOutput:
        if self.cfg.model.objective == "scst" and model.training:
            return self.self_critical_step(model, batch)
        logits = model(batch["images"], batch["inputs"])
        loss = F.cross_entropy(logits.float().flatten(0, 1), batch["targets"].flatten(), ignore_index=IGNORE,
                               label_smoothing=self.cfg.model.label_smoothing)
        return StepOutput(loss, {}, len(batch["ids"]))

    def self_critical_step(self, model: nn.Module, batch) -> StepOutput:
        """REINFORCE with CIDEr-D as the reward (self_critical.py): K sampled captions per image, each one's
        advantage its reward over the mean of the image's other samples."""
        from .self_critical import (CorpusCiderD, leave_one_out_advantage, sample_captions, sequence_log_probs,
                                    teacher_inputs)

        m, eot = self.cfg.model, self.tokenizer.eot_id
        if self.cider_corpus is None:
            self.cider_corpus = CorpusCiderD.corpus_statistics([[normalise(c) for c in self.captions[i]]
                                                                for i in self.train_ids])
        core = getattr(model, "module", model)  # DDP's wrapped module: sampling needs no gradient sync
        core = getattr(core, "_orig_mod", core)  # torch.compile's original module
        images, K = batch["images"], m.scst_samples
        with torch.no_grad():
            memory = core.encode(images).repeat_interleave(K, dim=0)
            samples = sample_captions(core.decoder, memory, m.max_length, eot)
        captions = [self.tokenizer.decode([t for t in row if t >= 0]) for row in samples.tolist()]
        per_image = [[normalise(c) for c in self.captions[i]] for i in batch["ids"].tolist()]
        references = [refs for refs in per_image for _ in range(K)]  # normalised once, shared by the K samples
        rewards = torch.as_tensor(CorpusCiderD(*self.cider_corpus).scores(captions, references),
                                  dtype=torch.float32, device=images.device).view(-1, K)
        logits = model(images, teacher_inputs(samples, eot), captions_per_image=K)
        advantage = leave_one_out_advantage(rewards).flatten()
        loss = -(advantage * sequence_log_probs(logits, samples)).mean()
        return StepOutput(loss, {"cider_reward": rewards.mean().detach()}, len(batch["ids"]))

    # ------------------------------------------------------------------------------------------ evaluation

    def evaluate(self, model: nn.Module, batches: Iterable, report_dir: Path | None = None) -> dict[str, float]:
        """Teacher-forced loss, then captions decoded through the predictor (greedy in validation, beam search
        `model.beam` in the final report) and scored over the whole split (gathered across ranks)."""
        from torchmetrics.aggregation import SumMetric

        nats = tokens = None
        captions: dict[int, str] = {}
        predictor = self.predictor()
        run = eager_runner(model)
        beam = self.cfg.model.beam if report_dir is not None else 1
        shown = []
        for batch in batches:
            if nats is None:
                device = batch["ids"].device
                nats, tokens = SumMetric().to(device), SumMetric().to(device)
            with torch.autocast(batch["ids"].device.type, enabled=False):
                logits = model(batch["images"], batch["inputs"]).float()
                nats.update(F.cross_entropy(logits.flatten(0, 1), batch["targets"].flatten(), ignore_index=IGNORE,
                                            reduction="sum").double())
                tokens.update((batch["targets"] != IGNORE).sum().double())
                images = batch["images"].float().cpu().numpy()
                items = [predictor.item_for(image, beam) for image in images]
                texts = self.decode_items(predictor, items, run, beam)
            for image_id, text in zip(batch["ids"].tolist(), texts):
                captions[image_id] = text
            if report_dir is not None and len(shown) < 16:
                shown += list(zip(batch["ids"].tolist(), images, texts))[:16 - len(shown)]
        if nats is None:
            raise DataError("evaluate: the split has no images on this rank; use a smaller world size")
        metrics = {"loss": (nats.compute() / tokens.compute()).item()}
        merged: dict[int, str] = {}
        for part in distributed.gather_objects(captions):
            merged.update(part)
        scores = None
        if distributed.is_main():
            scores, notes = self.score(merged, full=report_dir is not None)
            if report_dir is not None:
                self.write_report(model, predictor, run, merged, shown, scores, notes, report_dir)
        scores = distributed.broadcast_object(scores)
        return {**metrics, **scores}

    @staticmethod
    def decode_items(predictor: CaptionPredictor, items: list, run, beam: int) -> list[str]:
        if beam > 1:
            return [r.captions[0].text for r in predictor.predict(items, run)]
        sequences = [predictor.start(item) for item in items]  # greedy: all images in one batch per step
        while not all(s.finished for s in sequences):
            predictor.step(sequences, run)
        return [predictor.tokenizer.decode(s.generated) for s in sequences]

    def score(self, captions: dict[int, str], full: bool) -> tuple[dict[str, float], list[str]]:
        """Scores over all images, and over the seen and unseen combinations apart when the data marks them."""
        from .metrics import caption_scores

        references = {i: self.captions[i] for i in captions}
        scores, notes = caption_scores(references, captions, full)
        groups = {g: [i for i in captions if self.combination.get(i) == g] for g in ("seen", "unseen")}
        if all(groups.values()):  # (validation holds seen pairs only: no split to report there)
            for group, ids in groups.items():
                part, _ = caption_scores({i: references[i] for i in ids}, {i: captions[i] for i in ids}, full)
                scores.update({f"{k}_{group}": v for k, v in part.items() if k in ("bleu4", "cider", "meteor")})
        return scores, notes

    def write_report(self, model, predictor, run, captions, shown, scores, notes, report_dir: Path) -> None:
        import json

        from .report import plot_attention, plot_caption_grid

        (report_dir / "captions.json").write_text(json.dumps(
            [{"image_id": i, "caption": c, "references": self.captions[i],
              **({"combination": self.combination[i]} if i in self.combination else {})}
             for i, c in sorted(captions.items())], indent=1))
        plot_caption_grid([(image, text, self.captions[i]) for i, image, text in shown],
                          report_dir / "captions.png")
        plot_attention(model, predictor, [image for _, image, _ in shown[:4]], report_dir / "attention.png")
        if notes:
            (report_dir / "metrics_notes.txt").write_text("\n".join(notes) + "\n")

    # ------------------------------------------------------------------------------------------ export

    def example_inputs(self) -> tuple[torch.Tensor, ...]:
        """The whole model's inputs (teacher forcing): images and caption tokens. Export uses the two graphs."""
        S = self.cfg.data.image_size
        return torch.zeros(2, 3, S, S), torch.zeros(2, 4, dtype=torch.long)

    def decode_example(self, model: Captioner, B: int = 2, S: int = 3):
        cfg = model.decoder.cfg
        H, D = cfg.n_head, cfg.n_embd // cfg.n_head
        with torch.no_grad():
            memory_kv = EncodeGraph(model)(torch.rand(B, 3, self.cfg.data.image_size, self.cfg.data.image_size))
        return (torch.zeros(B, 1, dtype=torch.long), torch.full((B, 1), S, dtype=torch.long),
                torch.ones(B, S + 1, dtype=torch.bool), torch.zeros(cfg.n_layer, 2, B, H, S, D), memory_kv)

    def export_graphs(self, model: nn.Module) -> dict[str, Graph]:
        model = model.eval()
        batch = "batch"
        return {
            "encode": Graph(EncodeGraph(model), self.example_inputs()[:1], ["images"], ["memory_kv"],
                            {"images": {0: batch}}),
            "decode": Graph(DecodeGraph(model), self.decode_example(model),
                            ["tokens", "positions", "mask", "past", "memory_kv"], ["log_probs", "kv"],
                            {"tokens": {0: batch}, "positions": {0: batch}, "mask": {0: batch, 1: "cache_plus_one"},
                             "past": {2: batch, 4: "cache"}, "memory_kv": {2: batch}}),
        }

    def graph_batch_inputs(self, batch, graph: str, previous: dict) -> tuple[torch.Tensor, ...]:
        """encode: the images. decode: the start token of each caption with the images' keys/values from encode."""
        images = batch["images"].float().cpu()
        if graph == "encode":
            return (images,)
        memory_kv = previous["encode"][0]
        B = len(images)
        L, two, _, H, _, D = memory_kv.shape
        # The first step, as the predictor runs it: a one-entry placeholder cache, masked out.
        mask = torch.tensor([[False, True]]).expand(B, 2).contiguous()
        return (batch["inputs"][:, :1].cpu(), torch.zeros(B, 1, dtype=torch.long), mask,
                torch.zeros(L, two, B, H, 1, D), memory_kv)

    def score_graph_outputs(self, graph: str, outputs, reference, batch) -> dict[str, torch.Tensor]:
        """encode: agreement is the keys/values within 1e-3 of eager; decode: the same next token (argmax) as
        eager, and the true next token's loss."""
        if graph == "encode":
            close = (outputs[0] - reference[0]).abs().flatten(3).amax(dim=(0, 1, 3)) <= 1e-3  # per image
            return {"agreement": close.float()}
        predicted = outputs[0].argmax(-1)
        target = batch["targets"][:, 0].cpu()
        nll = F.nll_loss(outputs[0].float(), target.clamp(min=0), reduction="none")
        return {"agreement": (predicted == reference[0].argmax(-1)).float(), "nll": nll}

    # ------------------------------------------------------------------------------------------ inference

    predictor_class = CaptionPredictor

    def predictor(self) -> CaptionPredictor:
        m = self.cfg.model
        S = self.cfg.data.image_size
        graphs = {"encode": {"inputs": [{"name": "images", "shape": ["batch", 3, S, S], "dtype": "float32"}],
                             "outputs": ["memory_kv"]},
                  "decode": {"inputs": [{"name": "tokens", "dtype": "int64"}, {"name": "positions", "dtype": "int64"},
                                        {"name": "mask", "dtype": "bool"}, {"name": "past", "dtype": "float32"},
                                        {"name": "memory_kv", "dtype": "float32"}],
                             "outputs": ["log_probs", "kv"]}}
        spec = CaptionPredictor.build_spec(self.tokenizer, S, m.n_embd // m.n_head, m.max_length, m.beam,
                                           m.length_penalty, graphs)
        return CaptionPredictor(spec, self.tokenizer)

    @classmethod
    def load_predictor(cls, spec: dict, folder: Path | None = None) -> CaptionPredictor:
        return CaptionPredictor(spec, folder=folder)

    def adopt_spec(self, spec: dict) -> None:
        self.vocab_size = int(spec["vocab_size"])

    @classmethod
    def tiny(cls, folder: Path) -> dict:
        """Seconds-scale training on a few fmnist-captions scenes (32 pixels) from generated Fashion-MNIST files."""
        from ...data.synthetic import write_fashion_mnist

        write_fashion_mnist(folder, n_train=300, n_test=60)
        return {"data": {"source": "fmnist-captions", "root": str(folder), "image_size": 32, "references": 3,
                         "scenes": {"train": 48, "val": 16, "test": 8, "image_size": 32},
                         "tokenizer": {"min_count": 1}},
                "model": {"widths": [8, 16, 16, 16], "n_layer": 1, "n_head": 2, "n_embd": 32, "max_length": 20,
                          "beam": 2, "dropout": 0.0},
                "train": {"epochs": 2, "batch_size": 16, "eval_batch_size": 16, "log_every_steps": 2}}

