"""The contract between a task and the rest of modelworks (engine, export, serving).

The engine never branches on a task: everything task-specific (data, model, loss, metrics, the exported graph)
comes through the methods below. Export and serving never branch on a task either: they get the graph from
`export_module`, check it with `graph_inputs` / `score_outputs`, and answer requests through the task's
`Predictor`, which is rebuilt from the JSON spec stored in a model package.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterable, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

if TYPE_CHECKING:
    from pydantic import BaseModel

# Runs an exported graph: named input arrays (batch first) -> output arrays in the graph's output order. The
# same predictor is driven by eager PyTorch, TorchScript or ONNX Runtime through this one signature. A package
# of several graphs is called with the graph's name: `run(inputs, graph="decode")`; without one, the first graph.
GraphRunner = Callable[..., Sequence[np.ndarray]]

DEFAULT_GRAPH = "model"  # the one graph of a task that does not override `export_graphs`


@dataclass
class Graph:
    """One exported graph: a tensor-in, tensor-out module, example inputs to trace it with, its input and output
    names, and the axes of each input that vary between calls (input name -> {axis: name}); inputs not listed
    vary along their first (batch) axis only."""

    module: nn.Module
    example_inputs: tuple[torch.Tensor, ...]
    input_names: list[str]
    output_names: list[str]
    dynamic_axes: dict[str, dict[int, str]] = field(default_factory=dict)
    # ONNX opset to export at (None: the exporter's default). A graph that uses newer fused operators (opset 23's
    # RMSNormalization, Attention, RotaryEmbedding: one ONNX Runtime kernel each instead of a handful of small
    # ops) asks for the opset that has them.
    onnx_opset: int | None = None


@dataclass
class StepOutput:
    loss: torch.Tensor  # scalar to backpropagate (mean over the micro-batch)
    logs: dict[str, torch.Tensor]  # detached named scalars, e.g. a detector's box/obj/cls parts
    n: int  # samples in the micro-batch, for correctly weighted averages


@dataclass
class Splits:
    train: Dataset
    val: Dataset
    test: Dataset | None = None
    collate_fn: Callable | None = None  # for data sets served through a DataLoader
    notes: list[str] = field(default_factory=list)  # what the data decided that the config did not say (class
    # names found in the annotations, held-out splits): the engine logs them, so nothing is decided silently


class Predictor:
    """Pre- and post-processing around one task's exported graph, independent of the runtime that runs it.

    Serving and `modelworks predict` drive every task the same way:

        item = predictor.parse(request, file)        # validate and decode one input; InputError if unusable
        responses = predictor.predict(items, run)    # answer a batch of items, calling the graph through `run`

    `predict` defaults to one graph call (`collate` -> `run` -> `postprocess`). Work the graph leaves out goes
    here: non-maximum suppression or top-k retrieval in `postprocess`; a task whose inference is a loop
    (sampling, beam search, denoising steps) overrides `predict` and calls `run` as often as it needs.

    Everything a predictor needs (input shapes, labels, normalisation, vocabulary) is in `spec`, a JSON-able
    dict written into the model package's manifest, so a package is served without the training data.
    """

    Request: ClassVar[type[BaseModel]]  # one request's JSON body: the typed model in the OpenAPI docs
    Response: ClassVar[type[BaseModel]]  # one answer
    # The request field a raw file fills: a multipart upload, or a file given to `modelworks predict`.
    # None for tasks whose inputs are not files (a prompt, a user id).
    file_field: ClassVar[str | None] = None
    file_suffixes: ClassVar[tuple[str, ...]] = ()  # files `modelworks predict` picks from a folder
    # The largest image (width x height) `parse` decodes, checked in the file's header before decoding; None for
    # predictors that take no images. Image predictors set a default from their input size in __init__;
    # `modelworks serve/predict --max-image-pixels` overrides it (see `limit_inputs`).
    max_image_pixels: int | None = None

    def __init__(self, spec: dict):
        self.spec = spec

    def limit_inputs(self, max_image_pixels: int | None = None) -> None:
        """Apply a server's or a command's input limits; a limit the predictor has no use for is ignored."""
        if max_image_pixels is not None and self.max_image_pixels is not None:
            self.max_image_pixels = int(max_image_pixels)

    @property
    def limits(self) -> dict:
        """The input limits in force, as GET /v1/models reports them."""
        return {"max_image_pixels": self.max_image_pixels} if self.max_image_pixels is not None else {}

    @property
    def input_names(self) -> list[str]:
        """The graph's inputs, in `export_module`'s argument order (spec["inputs"]: name, shape, dtype)."""
        return [entry["name"] for entry in self.spec["inputs"]]

    @property
    def output_names(self) -> list[str]:
        return list(self.spec["outputs"])

    def example_request(self) -> tuple[BaseModel, bytes | None]:
        """A valid request (and file, for file-based tasks): used for warm-up and by the contract tests."""
        raise NotImplementedError

    def parse(self, request: BaseModel, file: bytes | None = None) -> Any:
        """Validate and decode one request into an item ready to batch. `file`, when given, is the raw content
        of `file_field` (an upload or a file on disk). Raise InputError naming the field and the fix."""
        raise NotImplementedError

    # How many leading bytes of the file `screen_file` may look at; 0: no screening (the default).
    screen_bytes: ClassVar[int] = 0

    def screen_file(self, prefix: bytes) -> bool:
        """Judge a file by its first bytes while the rest of the request is still arriving: the server refuses it
        without reading the rest (a decompression bomb states its size in its header). Raise InputError (e.g.
        InputTooLarge) to refuse; return True once the prefix settles that the file passes, False while more bytes
        could change the verdict. `parse` must still check everything: a body that arrives in one piece is not
        screened."""
        return True

    def parse_inline(self, request: BaseModel, file: bytes | None = None) -> Any | None:
        """`parse`, when it is cheap for this request (a small file: tens of microseconds), else None. The server
        calls this on its event loop and, on None, runs `parse` in its decode pool: a handoff costs more than
        decoding a thumbnail, and a large file must not stall the loop. Default: never inline."""
        return None

    def collate(self, items: list) -> dict[str, np.ndarray]:
        """Stack items into the graph's named inputs."""
        raise NotImplementedError

    def postprocess(self, outputs: Sequence[np.ndarray], items: list) -> list[BaseModel]:
        """Graph outputs for a batch -> one Response per item."""
        raise NotImplementedError

    def predict(self, items: list, run: GraphRunner) -> list[BaseModel]:
        return self.postprocess(run(self.collate(items)), items)

    def graph_names(self, graph: str | None = None) -> tuple[list[str], list[str]]:
        """Input and output names of one graph: spec["graphs"][graph] for a task with several, else the
        spec's own inputs/outputs."""
        graphs = self.spec.get("graphs")
        if graphs and graph is not None:
            entry = graphs[graph]
            return [i["name"] for i in entry["inputs"]], list(entry["outputs"])
        return self.input_names, self.output_names

    # ---- live history (`modelworks serve --events URL`): a predictor that answers from what a user did reads the
    # user's latest events from the server's event store at request time, with no retraining in between.
    # How many of a user's latest events the predictor reads per request; 0 (the default): it reads none.
    history_length: int = 0

    def history_user(self, request: BaseModel) -> str | None:
        """The user whose latest events this request should be answered from, or None (the request brings its own
        history, or names no user). Only asked when `history_length` > 0 and the server has an event store."""
        return None

    def with_history(self, request: BaseModel, items: list[str]) -> BaseModel:
        """The request with the user's latest items from the store (oldest first, up to `history_length`) filled
        in. Items the predictor does not know (stored before a catalogue changed) are its to drop."""
        return request

    def unknown_items(self, items: list[str]) -> list[str]:
        """The items of incoming events this predictor does not know: POST /v1/events refuses them (422), so the
        store holds only what a served model can read."""
        return []

    # ---- A/B by user and online metrics (serve/online.py): who a request is for, and what its answer shows them.
    def subject(self, request: BaseModel) -> str | None:
        """The id of the user this request is for, or None. Without an X-Caller-Id header, A/B assignment is sticky
        by it (a user stays on one version), and answers that show that user items are recorded for the online
        hit rate."""
        return None

    def shown_items(self, response: BaseModel) -> list[str]:
        """The item ids the answer shows its subject (recommendation: the list); an event of that user for one of
        them soon after counts as a hit for the version that answered. []: nothing to count."""
        return []

    # GET routes of the predictor's own, by name: GET /v1/models/{model}/{route}?... validates its query string
    # into the model given here and answers `request_from_query(route, query)` through the predict path (batching,
    # A/B, live history). E.g. recommendation's {"recommend": RecommendQuery}.
    query_routes: ClassVar[dict[str, type[BaseModel]]] = {}

    def request_from_query(self, route: str, query: BaseModel) -> BaseModel:
        """A query of one of `query_routes` as this predictor's Request."""
        raise NotImplementedError

    def files(self) -> dict[str, bytes]:
        """Files the predictor needs beside its spec (a tokenizer, an item catalogue): written into the package,
        checksummed with the rest, and read back by `Task.load_predictor(spec, folder)`. Plain data, never pickle."""
        return {}

    def confidence(self, response: BaseModel) -> float | None:
        """A number in [0, 1] whose distribution the server tracks per model version, so that a drift in the
        inputs shows up on a dashboard (classification: the top-1 probability). None: not tracked."""
        return None

    def render(self, file: bytes, response: BaseModel) -> torch.Tensor | None:
        """The input file with its answer drawn on it, uint8 [3, H, W] (detection: the boxes), for
        `modelworks predict --save-images`. None: the task has nothing to draw."""
        return None


class Task:
    """Subclass once per project; override what the project needs."""

    name: ClassVar[str]
    monitor: ClassVar[tuple[str, str]]  # ("val/acc1", "max"): best checkpoint and early stopping
    ModelConfig: ClassVar[type]
    DataConfig: ClassVar[type]
    uses_channels_last: ClassVar[bool] = False  # conv nets run faster in NHWC on CPU (oneDNN) and GPU
    # `modelworks debug overfit`: the fraction of its first value the loss must fall to on one fixed batch. A loss
    # with an irreducible part (soft targets, whose entropy stays) sets a higher one and says why.
    overfit_target: ClassVar[float] = 0.05
    # `--set` overrides `debug overfit` applies before the user's own: regularisers that put a floor under the
    # loss (classification's label smoothing), so a model that fits its batch shows a loss near zero.
    overfit_overrides: ClassVar[tuple[str, ...]] = ()
    # Short top-level names for nested config sections ({"tokenizer": "data.tokenizer"}): `--set tokenizer.kind=bpe`
    # and a recipe's `tokenizer:` section mean `data.tokenizer.kind`; config.merge_aliases resolves them.
    config_aliases: ClassVar[dict[str, str]] = {}

    def __init__(self, cfg):
        self.cfg = cfg

    def datasets(self, device: torch.device) -> Splits:
        """Train/val/test splits; in-memory sets may live on `device` and offer `get_batch(indices)`."""
        raise NotImplementedError

    def build_model(self) -> nn.Module:
        raise NotImplementedError

    def trains_in_closed_form(self) -> bool:
        """True when the configured model is solved rather than trained by steps (EASE's ridge regression): the
        engine then calls `fit_closed_form` once instead of running the step loop, and evaluates, checkpoints and
        reports as for any run (engine/closed_form.py)."""
        return False

    def fit_closed_form(self, model: nn.Module, splits: Splits) -> dict[str, float] | None:
        """Set `model`'s weights from the training split in one solve; return named values to log, or None."""
        raise NotImplementedError

    def prepare_batch(self, batch: Any, augment: torch.Generator | None, progress: float = 0.0) -> Any:
        """Turn a raw device batch into model inputs; augment it when a generator is given (training).
        `progress`: the fraction of training done at this step, for augmentation that changes over the run
        (detection turns mosaic off for the last part)."""
        return batch

    def draw_batch(self, batch: Any) -> list[torch.Tensor] | None:
        """A prepared batch as pictures, uint8 [3, H, W] each, the targets drawn on them where they are spatial
        (detection: the boxes), for `modelworks debug augment`. None (the default): nothing to draw (text, ids)."""
        return None

    def step(self, model: nn.Module, batch: Any) -> StepOutput:
        raise NotImplementedError

    def evaluate(self, model: nn.Module, batches: Iterable[Any], report_dir: Path | None = None) -> dict[str, float]:
        """Metrics over prepared batches, keys without the split prefix (the engine adds `val/` or `test/`).
        With `report_dir`, also write the task's plots there. Must be correct under DDP (each rank sees a shard)."""
        raise NotImplementedError

    def calibrate(self, model: nn.Module, batches: Iterable[Any]) -> dict | None:
        """Post-hoc calibration, fitted after training on prepared validation batches of the whole split (rank 0
        alone), e.g. classification's temperature (Guo et al. 2017). Returns JSON-able values, keys without the
        split prefix, which the engine keeps in RUN_DIR/calibration.json and gives back through
        `adopt_calibration` before evaluation and export. None (the default): nothing to calibrate."""
        return None

    def adopt_calibration(self, calibration: dict | None) -> str | None:
        """Use what `calibrate` returned (None: the run has none) in `evaluate`, `export_module` and
        `predictor`. Returns a note for the user when the calibration is missing or does not apply."""
        return None

    def describe(self, model: nn.Module) -> str:
        """One line for the start of a run: model name and size."""
        params = sum(p.numel() for p in model.parameters())
        return f"{type(model).__name__}: {params / 1e6:.2f}M parameters"

    def export_module(self, model: nn.Module) -> nn.Module:
        """A tensor-in, tensor-out module for TorchScript/ONNX; loops such as NMS or sampling stay outside."""
        return model

    def example_inputs(self) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError

    # How `modelworks export --quantize int8` quantizes this task's graphs: "static" (activation ranges calibrated
    # on training batches: conv nets) or "dynamic" (weights int8, activations quantized per call: transformers).
    int8_method: ClassVar[str] = "static"

    def export_graphs(self, model: nn.Module) -> dict[str, Graph]:
        """The graphs a package holds, by name, in the order export checks them. Default: one graph,
        `export_module(model)` with `example_inputs()` and the predictor's input/output names, batch axis
        dynamic. A task whose inference is a loop may export several (a language model's prefill and decode)."""
        predictor = self.predictor()
        return {DEFAULT_GRAPH: Graph(self.export_module(model), self.example_inputs(), predictor.input_names,
                                     predictor.output_names)}

    def graph_batch_inputs(self, batch: Any, graph: str, previous: dict[str, tuple[torch.Tensor, ...]]
                           ) -> tuple[torch.Tensor, ...]:
        """A graph's inputs for a prepared validation batch. `previous` holds the eager outputs of the graphs
        checked before it on the same batch (decode reads the cache prefill made). Default: `graph_inputs`."""
        return self.graph_inputs(batch)

    def score_graph_outputs(self, graph: str, outputs: tuple[torch.Tensor, ...], reference: tuple[torch.Tensor, ...],
                            batch: Any) -> dict[str, torch.Tensor]:
        """`score_outputs` for one of several graphs. Default: `score_outputs`."""
        return self.score_outputs(outputs, reference, batch)

    def samples(self, model: nn.Module) -> dict[str, str]:
        """Text to record at each evaluation (a language model's samples), by name: the engine writes it into
        the run directory and TensorBoard. Default: nothing."""
        return {}

    # ------------------------------------------------------------------------------------------ inference

    def retrain_overrides(self, events_file: Path) -> list[str]:
        """`--set` overrides under which this run's config trains on its recorded data plus the events of
        `events_file` (a CSV with the header user,item,timestamp: the event store's content), for
        `modelworks retrain`. Empty (the default): the task cannot learn from events, and retrain says so."""
        return []

    @classmethod
    def evaluate_on_events(cls, model: Any, events: list[tuple[str, str, float]]) -> dict[str, float] | None:
        """A served model's (export.runtime.InferenceModel) quality on the newest events, (user, item, ts) in time
        order: `modelworks retrain` compares the new version with the serving one by it, under the key of
        `monitor` (without its split). None (the default): the task cannot judge, and retrain will not promote."""
        return None

    predictor_class: ClassVar[type[Predictor]]

    def predictor(self) -> Predictor:
        """The predictor for this task's model as configured. Called after `datasets()`, which learns what the
        data decides (e.g. class names), so the spec is complete."""
        raise NotImplementedError

    @classmethod
    def load_predictor(cls, spec: dict, folder: Path | None = None) -> Predictor:
        """The predictor of an exported model, from the spec its package stores (and the files of
        `Predictor.files()` in the package `folder`)."""
        return cls.predictor_class(spec)

    def adopt_spec(self, spec: dict) -> None:
        """Take back what the task learned from its data (e.g. class names) from a package's predictor spec, so
        `build_model()` works where the training data is absent (the eager runtime of a served package)."""

    def graph_inputs(self, batch: Any) -> tuple[torch.Tensor, ...]:
        """The exported graph's inputs for a prepared batch: export runs every format on the validation split."""
        raise NotImplementedError

    def score_outputs(self, outputs: tuple[torch.Tensor, ...], reference: tuple[torch.Tensor, ...], batch: Any
                      ) -> dict[str, torch.Tensor]:
        """Per-sample scores of one format's graph outputs on a prepared batch, averaged by export over the
        validation split. Must hold "agreement": 1 where the outputs give the same answer as the eager
        `reference` (classification: the same top-1 class); other keys are the task's quality metrics on the
        batch's targets (classification: "acc1"), reported per format and as the int8 model's drop."""
        raise NotImplementedError

    @classmethod
    def tiny(cls, folder: Path) -> dict:
        """Overrides for a seconds-scale run on data generated into `folder` in the real format (contract tests)."""
        raise NotImplementedError
