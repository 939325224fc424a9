"""Serving-side image generation: a request (class, n, steps, guidance, seed, sampler) -> PNG images.

No input file: `parse` checks the request against the model's classes and bounds; `predict` runs the sampling
loop (samplers.py) around the exported denoiser graph through whatever runtime serves it. The items of one batch
(concurrent requests) are advanced together, one graph call per denoising step for all of them. A request's
images depend only on the request (its own seeded generator), not on what it was batched with.
"""

from __future__ import annotations

import base64
import difflib
import io
from dataclasses import dataclass
from typing import Callable, Literal, Sequence

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from ...errors import InputError
from ..base import GraphRunner, Predictor
from .noise import NoiseProcess
from .samplers import SamplingRun, drive

MAX_IMAGES = 16  # per request: a request's samples share its graph calls, so n bounds its cost (and the body)
MAX_STEPS = 200
MAX_GUIDANCE = 20.0


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)

    label: str | None = Field(None, alias="class", description="The class to generate (GET /v1/models: labels); "
                                                               "absent or null: unconditional samples.")
    n: int = Field(1, ge=1, le=MAX_IMAGES, description="How many images.")
    steps: int | None = Field(None, ge=1, le=MAX_STEPS, description="Denoising steps, one network evaluation each "
                                                                    "(default: the model's, 20).")
    guidance: float | None = Field(None, ge=0, le=MAX_GUIDANCE,
                                   description="Classifier-free guidance weight w: (1 + w) conditional - w "
                                               "unconditional; 0: plain conditional (default: the model's).")
    seed: int = Field(0, ge=0, le=2 ** 63 - 1, description="The same request with the same seed gives the same "
                                                         "images.")
    sampler: Literal["ddpm", "ddim", "dpm-solver"] | None = Field(None, description="default: the model's")
    eta: float = Field(0.0, ge=0, le=1, description="DDIM only: 0 deterministic, 1 as DDPM.")


class GeneratedImages(BaseModel):
    images: list[str] = Field(description="PNG files, base64-encoded, one per image.")
    label: str | None = Field(description="The class generated; null: unconditional.")
    width: int
    height: int
    seed: int
    steps: int
    sampler: str
    guidance: float


@dataclass
class Generation:
    """One parsed request: what `SamplingRun` needs, the class resolved to its index."""

    label: str | None
    index: int | None
    n: int
    steps: int
    guidance: float
    seed: int
    sampler: str
    eta: float


def encode_png(image: np.ndarray) -> bytes:
    """uint8 [C, H, W] -> PNG bytes."""
    from PIL import Image

    buffer = io.BytesIO()
    pixels = image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


class ImageGenerator(Predictor):
    Request = GenerateRequest
    Response = GeneratedImages
    generates = "images"  # what the server reports (GET /v1/models) and the demo page shows

    def __init__(self, spec: dict):
        super().__init__(spec)
        self.labels: list[str] = list(spec["labels"])
        image = spec["image"]
        self.channels, self.size, self.crop = int(image["channels"]), int(image["size"]), int(image["crop"])
        self.process = NoiseProcess(spec["noise"]["schedule"], spec["noise"]["parametrisation"])
        self.defaults = dict(spec["defaults"])

    @staticmethod
    def build_spec(channels: int, size: int, labels: list[str], noise: dict, crop: int, defaults: dict) -> dict:
        return {
            "inputs": [{"name": "x_t", "shape": ["batch", channels, size, size], "dtype": "float32"},
                       {"name": "t", "shape": ["batch"], "dtype": "float32"},
                       {"name": "y", "shape": ["batch"], "dtype": "int64"}],
            "outputs": ["prediction"],
            "labels": list(labels),
            "generates": "images",
            "image": {"channels": channels, "size": size, "crop": crop, "range": "[-1, 1] <-> 0..255",
                      "null_class": len(labels)},
            "noise": noise,
            "defaults": defaults,
            "postprocessing": {"sampler": "outside the graph (tasks/diffusion/samplers.py); PNG answers, the "
                                          f"padding of {crop} pixels cut off"},
        }

    # ------------------------------------------------------------------------------------------ requests

    def example_request(self) -> tuple[GenerateRequest, None]:
        """Small on purpose: the server warms up with it (and its largest batch of it)."""
        return GenerateRequest(label=self.labels[0], n=1, steps=2, guidance=0.0, seed=0), None

    def parse(self, request: GenerateRequest, file: bytes | None = None) -> Generation:
        index = None
        if request.label is not None:
            if request.label not in self.labels:
                near = difflib.get_close_matches(request.label, self.labels, n=1)
                hint = f"; did you mean {near[0]!r}?" if near else ""
                raise InputError(f"class: {request.label!r} is not one of the model's classes{hint} Classes: "
                                 f"{', '.join(self.labels)}", "class")
            index = self.labels.index(request.label)
        return Generation(request.label, index, request.n, request.steps or int(self.defaults["steps"]),
                          float(self.defaults["guidance"] if request.guidance is None else request.guidance),
                          request.seed, request.sampler or self.defaults["sampler"], request.eta)

    def parse_inline(self, request: GenerateRequest, file: bytes | None = None) -> Generation:
        return self.parse(request, file)  # no file to decode: cheaper than a handoff to the decode pool

    # ------------------------------------------------------------------------------------------ sampling

    def start_run(self, item: Generation) -> SamplingRun:
        return SamplingRun(self.process, (self.channels, self.size, self.size), item.n, item.index,
                           len(self.labels), item.sampler, item.steps, item.guidance, item.eta, item.seed,
                           grid=self.defaults.get("grid", "time"))  # packages exported before the grid: time

    def generate_images(self, items: list[Generation], run: GraphRunner,
                        on_step: Callable[[], None] | None = None) -> list[torch.Tensor]:
        """uint8 [n, C, h, w] per item (padding cut off), all items sampled together."""
        runs = [self.start_run(item) for item in items]

        def denoise(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            (out,) = run({"x_t": x.numpy(), "t": t.numpy(), "y": y.numpy()})[:1]
            return torch.from_numpy(np.asarray(out, dtype=np.float32))

        drive(runs, denoise, on_step)
        c = self.crop
        return [r.images()[..., c:self.size - c, c:self.size - c] for r in runs]

    def predict(self, items: list[Generation], run: GraphRunner) -> list[GeneratedImages]:
        responses = []
        for item, images in zip(items, self.generate_images(items, run)):
            pngs = [base64.b64encode(encode_png(image.numpy())).decode("ascii") for image in images]
            responses.append(GeneratedImages(images=pngs, label=item.label, width=images.shape[-1],
                                             height=images.shape[-2], seed=item.seed, steps=item.steps,
                                             sampler=item.sampler, guidance=item.guidance))
        return responses

    def media(self, response: GeneratedImages) -> tuple[bytes, str] | None:
        """The answer as a file when a client asks for one (Accept: image/png): only for a single image."""
        if len(response.images) != 1:
            return None
        return base64.b64decode(response.images[0]), "image/png"

    def collate(self, items: list) -> dict[str, np.ndarray]:
        raise NotImplementedError("image generation calls its graph once per step, from `predict`")

    def postprocess(self, outputs: Sequence[np.ndarray], items: list) -> list:
        raise NotImplementedError("image generation answers from `predict`")
