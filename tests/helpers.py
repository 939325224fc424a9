"""Helpers shared by the tests: tiny run configurations and real `modelworks` processes.

Importable from any test module because pytest puts tests/ on sys.path (it holds the root conftest.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

from modelworks import config as config_mod
from modelworks.tasks.classification.task import ClassificationTask

PYTHON = sys.executable
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
REAL_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
SRC = Path(__file__).resolve().parents[1] / "src" / "modelworks"


def set_dotted(raw: dict, dotted: str, value) -> None:
    node = raw
    *parents, leaf = dotted.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value


def tiny_raw(tmp_path: Path, **overrides) -> dict:
    """ClassificationTask.tiny() as a raw config mapping, with the run written under `tmp_path`.

    Override keys are dotted paths; `__` may stand for `.` so plain keyword names work too
    (`train__epochs=3` is `train.epochs=3`)."""
    raw = ClassificationTask.tiny(tmp_path / "data")
    raw["task"] = ClassificationTask.name
    raw["output_dir"] = str(tmp_path / "runs")
    raw["name"] = "tiny"
    set_dotted(raw, "train.device", "cpu")
    for key, value in overrides.items():
        set_dotted(raw, key.replace("__", "."), value)
    return raw


def tiny_detection_raw(tmp_path: Path, **model) -> dict:
    """DetectionTask.tiny() as a raw config mapping (CPU, fp32), the run written under `tmp_path`; `model`
    overrides model fields (e.g. name="yolov1")."""
    from modelworks.tasks.detection.task import DetectionTask  # detection's imports only where it is used

    raw = DetectionTask.tiny(tmp_path / "data")
    raw["task"] = DetectionTask.name
    raw["output_dir"] = str(tmp_path / "runs")
    raw["name"] = "tiny-detection"
    raw["model"].update(model)
    raw["train"].update(device="cpu", precision="fp32", test_at_end=False)
    return raw


def detection_samples(n: int, seed: int = 0, width: int = 48, height: int = 40):
    """Detection samples (image uint8 [H, W, 3], boxes xyxy [N, 4], labels in 0-2 [N]): random images with 1-3
    integer boxes each (VOC stores integers)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        image = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
        k = int(rng.integers(1, 4))
        x1, y1 = rng.integers(0, width // 2, k), rng.integers(0, height // 2, k)
        x2, y2 = x1 + rng.integers(4, width // 2, k), y1 + rng.integers(4, height // 2, k)
        out.append((image, np.stack([x1, y1, x2, y2], 1).astype(np.float32), rng.integers(0, 3, k)))
    return out


def write_labelling_tool_voc(root: Path, data, classes, layout: str) -> Path:
    """The VOC XML of `write_voc`, laid out as labelling tools write it, without ImageSets/Main split files:
    "lower" annotations/ + images/ (LabelImg, CVAT, Roboflow), "mixed" the same in other cases, "beside" each
    XML file next to its image in one folder."""
    import shutil

    from modelworks.data.detection.writers import write_voc

    devkit = write_voc(root / "devkit", {"train": data}, classes)
    names = {"lower": ("annotations", "images"), "mixed": ("ANNOTATIONS", "Images"), "beside": ("", "")}[layout]
    out = root / f"voc-{layout}"
    shutil.copytree(devkit / "Annotations", out / names[0], dirs_exist_ok=True)
    shutil.copytree(devkit / "JPEGImages", out / names[1], dirs_exist_ok=True)
    shutil.rmtree(devkit)
    return out


def build_tiny_cfg(tmp_path: Path, **overrides) -> config_mod.RunConfig:
    """A validated RunConfig for a seconds-scale classification run on generated Fashion-MNIST files."""
    return config_mod.load_config(ClassificationTask, tiny_raw(tmp_path, **overrides))


def tiny_cli_args(tmp_path: Path, name: str, **overrides) -> list[str]:
    """`train classification ...` arguments equivalent to tiny_raw(tmp_path, **overrides), as --set flags."""
    raw = tiny_raw(tmp_path, **overrides)
    raw.pop("task")
    raw["name"] = name
    args = ["train", ClassificationTask.name]
    for key, value in flatten(raw):
        # JSON is valid YAML, so every value (lists, bools, paths) round-trips through --set's YAML parsing.
        args += ["--set", f"{key}={json.dumps(value)}"]
    return args


def flatten(raw: dict, prefix: str = ""):
    for key, value in raw.items():
        if isinstance(value, dict):
            yield from flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def cli_env() -> dict:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    env["MPLBACKEND"] = "Agg"
    env.pop("WORLD_SIZE", None)
    env.pop("RANK", None)
    env.pop("LOCAL_RANK", None)
    return env


def run_cli(args: list[str], timeout_s: float = 180, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`python -m modelworks ARGS` as a real process."""
    return subprocess.run([PYTHON, "-m", "modelworks", *args], capture_output=True, text=True, timeout=timeout_s,
                          env=cli_env(), cwd=cwd)


def start_cli(args: list[str], cwd: Path | None = None) -> subprocess.Popen:
    return subprocess.Popen([PYTHON, "-m", "modelworks", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=cli_env(), cwd=cwd)


def copy_package_as_version(package: Path, out: Path, version: str) -> Path:
    """A copy of a package under another version (the manifest is not covered by the checksums, its files are)."""
    import shutil

    shutil.copytree(package, out)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["version"] = version
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def png_bytes(pixels) -> bytes:
    """PNG file content of a uint8 array [H, W] (grayscale) or [H, W, 3] (RGB)."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def fashion_test_images(folder: Path, n: int = 8):
    """(uint8 images [n, 28, 28], labels [n]) of the generated Fashion-MNIST test split in `folder`."""
    from modelworks.data.images import load_fashion_mnist

    arrays = load_fashion_mnist(folder, "test", download=False)
    return arrays.images[:n, 0].numpy(), arrays.labels[:n].numpy()


# ---------------------------------------------------------------------------------------------- hostile files


def png_bomb(width: int, height: int) -> bytes:
    """A valid 8-bit grayscale PNG of `width` x `height` zero pixels: a few hundred KB that decodes to
    width x height bytes (20000 x 20000: 400 MB). Rows are streamed through zlib, never held whole."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    compressor = zlib.compressobj(9)
    row = b"\x00" * (width + 1)  # filter byte 0, then the row
    idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def gif_canvas_bomb(width: int, height: int) -> bytes:
    """A GIF of a few dozen bytes whose logical screen is `width` x `height` (one 1x1 frame): decoders that size
    their output by the screen allocate width x height x 3 bytes for nothing."""
    import struct

    screen = b"GIF89a" + struct.pack("<HH", width, height) + b"\x80\x00\x00" + b"\x00\x00\x00\xff\xff\xff"
    frame = b"\x2c" + struct.pack("<HHHH", 0, 0, 1, 1) + b"\x00" + b"\x02\x02\x44\x01\x00"
    return screen + frame + b"\x3b"


def gif_frames(n: int, size: int = 8) -> bytes:
    """An animated GIF of `n` frames of `size` x `size` pixels."""
    import io

    from PIL import Image

    frames = [Image.new("RGB", (size, size), (i * 60 % 256, 0, 0)) for i in range(n)]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:])
    return buffer.getvalue()


def image_file(pixels, format: str) -> bytes:
    """`pixels` (uint8 [H, W] or [H, W, 3]) saved in `format` (PNG, GIF, WEBP, JPEG)."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=format, **({"lossless": True} if format == "WEBP" else {}))
    return buffer.getvalue()


DDP_EVAL_WORKER = Path(__file__).parent / "engine" / "ddp_eval_worker.py"


def evaluate_in_one_and_two_processes(raw_config: dict, folder: Path, steps: int) -> dict[str, dict]:
    """Run tests/engine/ddp_eval_worker.py on `raw_config` once alone and once under torchrun with 2 gloo ranks:
    {"one": metrics, "two": metrics}, each with the "world" it ran in. The data must exist before (each process
    reads it)."""
    (folder / "config.json").write_text(json.dumps(raw_config))
    env = cli_env()
    env["OMP_NUM_THREADS"] = "1"  # two ranks share the cores
    runs = {"one": [PYTHON, str(DDP_EVAL_WORKER)],
            "two": [TORCHRUN, "--standalone", "--nproc-per-node", "2", str(DDP_EVAL_WORKER)]}
    results = {}
    for name, command in runs.items():
        out = folder / f"{name}.json"
        proc = subprocess.run([*command, str(folder / "config.json"), str(out), str(steps)], capture_output=True,
                              text=True, env=env, timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
        results[name] = json.loads(out.read_text())
    assert (results["one"]["world"], results["two"]["world"]) == (1, 2)
    return results


async def with_apps(apps, body):
    """Run `body(*clients)` against each ASGI app with its lifespan (what opens at startup opens, and closes
    after), through httpx's in-process transport."""
    import httpx

    async with contextlib.AsyncExitStack() as stack:
        clients = []
        for app in apps:
            await stack.enter_async_context(app.router.lifespan_context(app))
            clients.append(await stack.enter_async_context(httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://test", timeout=30)))
        return await body(*clients)
