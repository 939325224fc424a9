"""The model package: the unit that is deployed. A directory holding

    manifest.json          task, name, version, created, source run and config, the predictor's spec (input
                           shapes, labels, preprocessing), evaluation metrics, export checks, sha256 of every file
    weights.safetensors    the trained weights (the eager runtime rebuilds the model from the config)
    model.torchscript.pt   TorchScript (traced)
    model.onnx             ONNX, dynamic batch axis
    model.int8.onnx        optional: int8, static post-training quantization

Opening a package refuses any symbolic link in it and verifies every file's size and sha256 before anything is
loaded, and nothing in it is loaded with Python's pickle: weights are safetensors, graphs are ONNX protobuf or
TorchScript archives. The manifest itself is not signed: it guards against corruption and accidental edits of
the files, not against someone who can rewrite the manifest too.

A package's name and version travel as URL segments and HTTP header values when it is served, so both are
limited to NAME_PATTERN, checked when a package is exported and again when one is opened.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ..engine.checkpoint import sha256_file
from ..errors import PackageError

try:
    import fcntl
except ImportError:  # Windows: no flock, so work folders are not locked and stale ones are left for the user
    fcntl = None

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
# The file each runtime loads. "eager" rebuilds the model from the config and loads the safetensors weights.
RUNTIME_FILES = {"eager": "weights.safetensors", "torchscript": "model.torchscript.pt", "onnx": "model.onnx",
                 "int8": "model.int8.onnx"}
# A package of several graphs (a language model's prefill and decode) holds one file per graph and runtime:
# `<graph>.onnx`, `<graph>.torchscript.pt`, `<graph>.int8.onnx`; the weights stay one file. The default graph
# keeps the names above, so single-graph packages are unchanged.
DEFAULT_GRAPH = "model"
GRAPH_SUFFIXES = {"torchscript": ".torchscript.pt", "onnx": ".onnx", "int8": ".int8.onnx"}
REQUIRED_KEYS = ("format_version", "task", "name", "version", "created", "config", "predictor", "files")
# Package names and versions: safe as a URL path segment, an HTTP header value and a file name, on every
# platform. \Z, not $: `$` also matches before a final newline, which would let "v1\n" through.
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
NAME_RULE = "1-64 letters, digits, '.', '_' and '-', starting with a letter or digit"


@dataclass
class Package:
    path: Path
    manifest: dict

    @property
    def task(self) -> str:
        return self.manifest["task"]

    @property
    def name(self) -> str:
        return self.manifest["name"]

    @property
    def version(self) -> str:
        return self.manifest["version"]

    @property
    def graphs(self) -> list[str]:
        """The graphs the package holds, in the order they were exported (one, "model", for most tasks)."""
        return list(self.manifest.get("graphs") or [DEFAULT_GRAPH])

    def runtimes(self) -> list[str]:
        first = self.graphs[0]
        return [name for name in RUNTIME_FILES if graph_file(name, first) in self.manifest["files"]]

    def file_for(self, runtime: str, graph: str | None = None) -> Path:
        if runtime not in RUNTIME_FILES:
            raise PackageError(f"--runtime: {runtime!r} is not a runtime; choose one of {', '.join(RUNTIME_FILES)}")
        name = graph_file(runtime, graph or self.graphs[0])
        if name not in self.manifest["files"]:
            hint = " (export it with --quantize int8)" if runtime == "int8" else " (export it with --format all)"
            raise PackageError(f"{self.path}: the package has no {runtime} model {name}{hint}; it has: "
                               f"{', '.join(self.runtimes())}")
        return self.path / name


def graph_file(runtime: str, graph: str = DEFAULT_GRAPH) -> str:
    """The package file of one graph in one runtime (the eager runtime's weights serve every graph)."""
    if runtime == "eager" or graph == DEFAULT_GRAPH:
        return RUNTIME_FILES[runtime]
    return graph + GRAPH_SUFFIXES[runtime]


def check_identifier(where: str, value, what: str = "name", fix: str = "use") -> str:
    """`value` when it is a valid package name or version (NAME_PATTERN), else PackageError.

    The message reads `<where>: <value> is not a valid <what>; <fix> <the rule>`."""
    if isinstance(value, str) and NAME_PATTERN.match(value):
        return value
    raise PackageError(f"{where}: {value!r} is not a valid {what}; {fix} {NAME_RULE}")


def file_entries(folder: Path) -> dict[str, dict]:
    """sha256 and size of every file in the package folder except the manifest."""
    return {path.name: {"sha256": sha256_file(path), "bytes": path.stat().st_size}
            for path in sorted(folder.iterdir()) if path.is_file() and path.name != MANIFEST}


def write_manifest(folder: Path, manifest: dict) -> dict:
    """Complete the manifest with the checksums of the files now in `folder` and write it."""
    manifest = {"format_version": FORMAT_VERSION, **manifest, "files": file_entries(folder)}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


# Work folders beside a package: `.NAME.tmp-XXXXXXXX` stages an export, `.NAME.old-XXXXXXXX` holds the package
# that --force replaces until it is deleted (XXXXXXXX: tempfile.mkdtemp's eight random characters). A killed
# export leaves them behind. The process using one holds an exclusive flock on the folder, which the kernel
# releases however the process ends: a folder that can be locked belongs to no live export and may go, while a
# concurrent export's (even one running for hours) stays. A pid file could not tell a reused pid from the
# original, nor be kept out of the package; an age limit alone would delete a slow export's staging. The age
# guard below only covers the moment between mkdtemp and flock, when a new folder is not locked yet.
WORK_FOLDER_MIN_AGE_S = 60


def work_folder_pattern(target: Path) -> re.Pattern:
    return re.compile(re.escape(f".{target.name}.") + r"(tmp|old)-[a-z0-9_]{8}")


@contextmanager
def work_folder(target: Path, kind: str) -> Iterator[Path]:
    """A new hidden folder `.NAME.<kind>-*` beside `target`, locked while in use and removed afterwards."""
    folder = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.{kind}-"))
    fd = os.open(folder, os.O_RDONLY)
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)  # gone already once a staged package is published
        os.close(fd)  # after the removal: the lock guards the folder until it is gone


def remove_stale_work_folders(target: Path) -> list[Path]:
    """Remove the work folders of `target` that earlier exports left when they were killed; return them."""
    if fcntl is None or not target.parent.is_dir():
        return []
    pattern, removed = work_folder_pattern(target), []
    for folder in sorted(target.parent.iterdir()):
        if not pattern.fullmatch(folder.name) or folder.is_symlink() or not folder.is_dir():
            continue
        try:
            if time.time() - folder.stat().st_mtime < WORK_FOLDER_MIN_AGE_S:
                continue
            fd = os.open(folder, os.O_RDONLY)
        except OSError:  # removed meanwhile by its own export or another cleaner
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # a live export holds it
            os.close(fd)
            continue
        try:
            shutil.rmtree(folder, ignore_errors=True)
            if not folder.exists():
                removed.append(folder)
        finally:
            os.close(fd)
    return removed


def publish(staging: Path, target: Path, overwrite: bool) -> None:
    """Move a finished package into place in one rename, so no reader ever sees half a package."""
    if target.exists():
        if not overwrite:
            raise PackageError(f"--out: {target} already exists; choose another folder or pass --force to "
                               "replace it")
        with work_folder(target, "old") as old:
            os.replace(target, old / target.name)
            os.replace(staging, target)
    else:
        os.replace(staging, target)


def read_package(path: Path | str) -> Package:
    """Open a package, verifying every file against the manifest; PackageError names the first bad file."""
    path = Path(path)
    manifest_path = path / MANIFEST
    if not path.is_dir():
        raise PackageError(f"{path}: no such package directory; create one with `modelworks export RUN_DIR`")
    # A link inside could lead anywhere on the machine, and the checksum of its target says nothing about where
    # that is: a package holds plain files only. The folder itself may be a link (e.g. current -> v3).
    for entry in sorted(path.iterdir()):
        if entry.is_symlink():
            raise PackageError(f"{entry}: a symbolic link (to {os.readlink(entry)}); a package holds plain files "
                               "only: replace the link with a copy of the file, or export the package again")
    if not manifest_path.is_file():
        raise PackageError(f"{path}: not a model package (no {MANIFEST}); create one with "
                           "`modelworks export RUN_DIR`")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PackageError(f"{manifest_path}: not valid JSON ({exc}); the manifest is corrupt, export the "
                           "package again") from None
    if not isinstance(manifest, dict):
        raise PackageError(f"{manifest_path}: expected a JSON object (got {type(manifest).__name__})")
    missing = [key for key in REQUIRED_KEYS if key not in manifest]
    if missing:
        raise PackageError(f"{manifest_path}: missing {', '.join(missing)}; not a modelworks package manifest")
    if manifest["format_version"] != FORMAT_VERSION:
        raise PackageError(f"{manifest_path}: package format {manifest['format_version']!r}, this modelworks "
                           f"reads format {FORMAT_VERSION}; export the run again with this version")
    for key in ("name", "version"):
        check_identifier(str(manifest_path), manifest[key], key, fix=f"export the package again with a --{key} of")
    for name, entry in manifest["files"].items():
        # A manifest names files inside the package only: no path may reach outside it.
        if Path(name).name != name or name in (".", "..", MANIFEST):
            raise PackageError(f"{manifest_path}: file entry {name!r} is not a plain file name in the package")
        file = path / name
        if not file.is_file():
            raise PackageError(f"{file}: missing from the package (listed in {MANIFEST}); restore it or export "
                               "the package again")
        size = file.stat().st_size
        if size != entry["bytes"]:
            raise PackageError(f"{file}: {size} bytes, the manifest says {entry['bytes']}: the file is truncated "
                               "or was replaced; restore it or export the package again")
        digest = sha256_file(file)
        if digest != entry["sha256"]:
            raise PackageError(f"{file}: checksum mismatch (sha256 {digest[:16]}..., the manifest says "
                               f"{entry['sha256'][:16]}...): the file was modified after export; restore it or "
                               "export the package again")
    return Package(path, manifest)
