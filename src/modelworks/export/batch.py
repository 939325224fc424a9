"""Offline batch inference (`modelworks predict`): files, folders or globs through a package, to JSONL or CSV.

A file that cannot be used (unreadable, undecodable, wrong size) is reported on stderr, written to the output
with its error, and skipped; the rest of its batch and of the run go on. With `--save-images DIR`, each answer
is also drawn on its input by the predictor's `render` (detection: the boxes) and written to DIR as PNG.
"""

from __future__ import annotations

import csv
import glob
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from ..errors import ConfigError, InputError
from .runtime import InferenceModel


@dataclass
class BatchResult:
    predicted: int
    skipped: int
    out: Path | None
    saved: int = 0  # images written by --save-images


def expand_inputs(inputs: list[str], suffixes: tuple[str, ...]) -> Iterator[tuple[str, str | None]]:
    """(path, problem) for every input: files as given, folders searched recursively for `suffixes`, glob
    patterns (quoted, so the shell left them alone) expanded. A name that matches nothing comes back with its
    problem so it is reported like a bad file."""
    for entry in inputs:
        path = Path(entry)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in suffixes)
            if not found:
                yield entry, f"folder has no {', '.join(suffixes)} files"
            yield from ((str(p), None) for p in found)
        elif path.is_file():
            yield entry, None
        elif glob.has_magic(entry):
            matches = sorted(glob.glob(entry, recursive=True))
            if not matches:
                yield entry, "the pattern matches no file"
            yield from ((m, None) for m in matches if Path(m).is_file())
        else:
            yield entry, "no such file or folder"


def flatten(value, prefix: str = "") -> dict:
    """A response as flat CSV columns: nested fields joined by '.', list items by their index."""
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            out.update(flatten(item, f"{prefix}{key}."))
        return out
    if isinstance(value, list):
        out = {}
        for i, item in enumerate(value):
            out.update(flatten(item, f"{prefix}{i}."))
        return out
    return {prefix[:-1]: value}


class Writer:
    """JSONL streams each line as it is ready; CSV needs every column first, so it writes at the end."""

    def __init__(self, out: Path | None):
        self.out = out
        self.kind = "csv" if out is not None and out.suffix.lower() == ".csv" else "jsonl"
        if out is not None and out.suffix.lower() not in (".csv", ".jsonl", ".json"):
            raise ConfigError(f"--out: {out} must end in .jsonl or .csv")
        self.rows: list[dict] = []
        self.file = None
        if self.kind == "jsonl":
            self.file = open(out, "w") if out is not None else sys.stdout

    def write(self, path: str, prediction: dict | None, error: str | None) -> None:
        row = {"path": path, **({"prediction": prediction} if prediction is not None else {"error": error})}
        if self.kind == "jsonl":
            self.file.write(json.dumps(row) + "\n")
        else:
            self.rows.append({"path": path, **flatten(prediction or {}), "error": error or ""})

    def close(self) -> None:
        if self.kind == "jsonl":
            if self.file is not sys.stdout:
                self.file.close()
            return
        columns = list(dict.fromkeys(key for row in self.rows for key in row))
        columns.remove("error")
        with open(self.out, "w", newline="") as f:
            writer = csv.DictWriter(f, [*columns, "error"])
            writer.writeheader()
            writer.writerows(self.rows)


class ImageSaver:
    """`--save-images DIR`: each answer drawn on its input file, written as DIR/<file name>.png (a name seen
    before in the run gets -2, -3, ...: inputs from several folders may share names)."""

    def __init__(self, folder: Path, predictor, task: str):
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"--save-images: cannot create the folder {folder} ({exc.strerror or exc})") from None
        self.folder, self.predictor, self.task = folder, predictor, task
        self.names: set[str] = set()
        self.saved = 0
        self.drawing = True

    def save(self, path: str, file: bytes, response) -> None:
        if not self.drawing:
            return
        image = self.predictor.render(file, response)
        if image is None:
            self.drawing = False
            from tqdm import tqdm
            tqdm.write(f"--save-images: a {self.task} model has nothing to draw on its inputs; no images are "
                       "written (the predictions are)", file=sys.stderr)
            return
        from PIL import Image

        stem, name, n = Path(path).stem, f"{Path(path).stem}.png", 1
        while name in self.names:
            n += 1
            name = f"{stem}-{n}.png"
        self.names.add(name)
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(self.folder / name, format="PNG")
        self.saved += 1


def predict_files(model: InferenceModel, inputs: list[str], out: Path | None, batch_size: int,
                  options: dict | None = None, progress: bool = True, save_images: Path | None = None
                  ) -> BatchResult:
    predictor = model.predictor
    if batch_size < 1:
        raise ConfigError(f"--batch-size: must be >= 1 (got {batch_size})")
    if predictor.file_field is None:  # inputs are not files (a user's history, a prompt): JSON lines of requests
        if save_images is not None:
            raise ConfigError(f"--save-images: a {model.package.task} model takes no images to draw on")
        return predict_requests(model, inputs, out, batch_size, options, progress)
    try:
        request = predictor.Request.model_validate(options or {})
    except Exception as exc:  # pydantic's ValidationError: an --option with a wrong name or value
        raise ConfigError(f"--option: {exc}") from None
    files = list(expand_inputs(inputs, predictor.file_suffixes))
    writer = Writer(out)
    saver = ImageSaver(Path(save_images), predictor, model.package.task) if save_images is not None else None
    predicted = skipped = 0

    from tqdm import tqdm
    bar = tqdm(total=len(files), unit="file", disable=not progress, file=sys.stderr, dynamic_ncols=True)

    def skip(path: str, problem: str) -> None:
        nonlocal skipped
        skipped += 1
        tqdm.write(f"skipped {path}: {problem}", file=sys.stderr)
        writer.write(path, None, problem)

    try:
        for start in range(0, len(files), batch_size):
            paths, items, contents = [], [], []
            for path, problem in files[start:start + batch_size]:
                if problem is None:
                    try:
                        content = Path(path).read_bytes()
                        items.append(predictor.parse(request, content))
                        paths.append(path)
                        contents.append(content if saver is not None else None)
                        continue
                    except InputError as exc:
                        problem = str(exc)
                    except OSError as exc:
                        problem = f"cannot be read ({exc.strerror or exc})"
                skip(path, problem)
            if items:
                for path, content, response in zip(paths, contents, model.predict(items)):
                    writer.write(path, response.model_dump(), None)
                    if saver is not None:
                        saver.save(path, content, response)
                predicted += len(items)
            bar.update(min(batch_size, len(files) - start))
    finally:
        bar.close()
        writer.close()
    return BatchResult(predicted, skipped, out, saver.saved if saver is not None else 0)


def read_requests(inputs: list[str], options: dict | None) -> Iterator[tuple[str, dict | None, str | None]]:
    """(where, request body, problem) for every line of the JSONL files: `FILE:LINE`, the line's JSON object with
    the --option values as defaults under it, or why the line cannot be used."""
    for path, problem in expand_inputs(inputs, (".jsonl", ".json")):
        if problem is not None:
            yield path, None, problem
            continue
        try:
            lines = Path(path).read_text().splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            yield path, None, f"cannot be read ({getattr(exc, 'strerror', None) or exc})"
            continue
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                body = json.loads(line)
            except json.JSONDecodeError as exc:
                yield where, None, f"not valid JSON ({exc.msg} at column {exc.colno}); one request object a line"
                continue
            if not isinstance(body, dict):
                yield where, None, f"a JSON {type(body).__name__}, not a request object"
                continue
            yield where, {**(options or {}), **body}, None


def predict_requests(model: InferenceModel, inputs: list[str], out: Path | None, batch_size: int,
                     options: dict | None = None, progress: bool = True) -> BatchResult:
    """`modelworks predict PACKAGE requests.jsonl` for a model whose inputs are not files: each line is one
    request as the server takes it (a JSON object); each answer is written with `path` = FILE:LINE. A line that
    fails validation or parsing is reported and skipped, as a bad file is."""
    predictor = model.predictor
    writer = Writer(out)
    predicted = skipped = 0
    pending: list[tuple[str, object]] = []

    from pydantic import ValidationError
    from tqdm import tqdm

    def skip(where: str, problem: str) -> None:
        nonlocal skipped
        skipped += 1
        tqdm.write(f"skipped {where}: {problem}", file=sys.stderr)
        writer.write(where, None, problem)

    def flush() -> None:
        nonlocal predicted
        if pending:
            for (where, _), response in zip(pending, model.predict([item for _, item in pending])):
                writer.write(where, response.model_dump(), None)
            predicted += len(pending)
            pending.clear()

    try:
        for where, body, problem in read_requests(inputs, options):
            if problem is None:
                try:
                    pending.append((where, predictor.parse(predictor.Request.model_validate(body), None)))
                except ValidationError as exc:
                    problem = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'request'}: {e['msg']}"
                                        for e in exc.errors())
                except InputError as exc:
                    problem = str(exc)
            if problem is not None:
                flush()  # answers come out in the order of the lines
                skip(where, problem)
            if len(pending) >= batch_size:
                flush()
        flush()
    finally:
        writer.close()
    return BatchResult(predicted, skipped, out)
