"""`modelworks sample`: images from any model whose predictor generates them (the `generate_images` hook), as one
grid PNG. The command knows no task: it asks the predictor for the hook and drives it with a progress bar."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from .errors import ConfigError, InputError


def run_sample(args: argparse.Namespace) -> int:
    from pydantic import ValidationError
    from tqdm import tqdm

    from .cli import open_generator

    path = Path(args.model)
    if not path.is_dir():
        raise ConfigError(f"{path}: no such run directory or package")
    if args.n < 1:
        raise ConfigError(f"--n: must be >= 1 (got {args.n})")
    predictor, run = open_generator(path, args.runtime, args.checkpoint, args.threads)
    if not callable(getattr(predictor, "generate_images", None)):
        raise ConfigError(f"{path}: a {type(predictor).__name__} does not generate images; use `modelworks "
                          "predict` or `generate`")
    fields = {"class": args.label, "seed": args.seed, "eta": args.eta}
    fields.update({k: v for k, v in (("sampler", args.sampler), ("steps", args.steps), ("guidance", args.guidance))
                   if v is not None})
    # One request per image, seeds seed, seed + 1, ...: each image is the one a server request with that seed
    # and n=1 answers; they are sampled together, one graph call per step for all.
    try:
        items = [predictor.parse(predictor.Request.model_validate({**fields, "seed": args.seed + i}))
                 for i in range(args.n)]
    except ValidationError as exc:
        raise ConfigError("sample: " + "; ".join(f"--{'.'.join(map(str, e['loc']))}: {e['msg']}"
                                                  for e in exc.errors())) from None
    except InputError as exc:
        raise ConfigError(f"--{exc}") from None
    steps = max(item.steps for item in items)
    with tqdm(total=steps, unit="step", file=sys.stderr, dynamic_ncols=True, desc="denoising") as bar:
        images = predictor.generate_images(items, run, on_step=lambda: bar.update(1))
    write_grid([image for batch in images for image in batch], Path(args.out))
    print(f"{args.n} images -> {args.out}", file=sys.stderr)
    return 0


def write_grid(images: list, out: Path) -> None:
    """uint8 [C, H, W] images as one PNG grid, as square as the count allows."""
    import torch
    from PIL import Image
    from torchvision.utils import make_grid

    columns = math.ceil(math.sqrt(len(images)))
    grid = make_grid(torch.stack(images), nrow=columns, padding=2, pad_value=255)  # [3, H, W] uint8
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid.permute(1, 2, 0).numpy()).save(out)
