"""Detection benchmark: our detectors side by side with ultralytics YOLOv8n, same data, same machine, same budget.

    python bench/detection.py                        # fmnist-scenes rows (ours, yolov1, YOLOv8n) + BCCD rows
    python bench/detection.py --skip-peer            # our rows only
    python bench/detection.py --skip-bccd --budget-s 300
    python bench/detection.py --device cuda          # the GPU variant (both sides on the GPU)

Rows: each trains within the same wall budget (default 600 s) on the same split and is scored by COCO
mAP@[.5:.95] and mAP@.5 on the same validation images (fmnist-scenes: its val split, 500 scenes of 160x160;
BCCD: its test split, 72 images), plus training images/s and end-to-end inference ms/image at batch 1 on the
split's first 50 files (ours: the exported ONNX package, file bytes to boxes, as `modelworks predict` runs it;
the peer: `model.predict(path)`).
Ours run as a user runs them (`modelworks train` then `modelworks evaluate --split val|test`); the recipe's
epochs are scaled to the budget from a short timed probe, so the row stops inside it. The peer is trained from
`yolov8n.yaml` (no pretrained weights) with its time budget (`time=` hours), fully offline (YOLO_OFFLINE=1,
absolute paths in its data.yaml), pinned to the same thread count as ours (it would pick cpu_count - 1), in
its own virtual environment (bench/results/peer-venv, created with `pip install ultralytics` when missing).
The peer's data are the same images: a YOLO-format tree of symlinks and label files written from our readers.
Writes bench/results/detection.json and prints a table. Run nothing else meanwhile: the figures are wall-clock.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
TIMING_IMAGES = 50  # both sides time batch-1 inference on the first 50 files of the evaluated split
BCCD = ROOT.parent / "shared" / "data" / "bccd"
sys.path.insert(0, str(ROOT / "src"))

from modelworks.data.detection import formats  # noqa: E402
from modelworks.data.detection.scenes import SceneConfig, ensure_scenes  # noqa: E402


def yolo_tree(splits: dict[str, formats.DetectionSet], folder: Path) -> Path:
    """The same images as a YOLO data set (symlinks + normalised label files) with an absolute data.yaml."""
    import yaml

    folder = folder.resolve()
    for split, data in splits.items():
        (folder / "images" / split).mkdir(parents=True, exist_ok=True)
        (folder / "labels" / split).mkdir(parents=True, exist_ok=True)
        for i, record in enumerate(data.records):
            link = folder / "images" / split / f"{i:06d}{record.image.suffix}"
            if not link.exists():
                link.symlink_to(record.image.resolve())
            lines = [f"{int(c)} {(b[0] + b[2]) / 2 / record.width:.6f} {(b[1] + b[3]) / 2 / record.height:.6f} "
                     f"{(b[2] - b[0]) / record.width:.6f} {(b[3] - b[1]) / record.height:.6f}\n"
                     for b, c in zip(record.boxes, record.labels)]
            (folder / "labels" / split / f"{i:06d}.txt").write_text("".join(lines))
    names = next(iter(splits.values())).classes
    spec = {"path": str(folder), **{s: f"images/{s}" for s in splits}, "names": {i: n for i, n in enumerate(names)}}
    (folder / "data.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    return folder / "data.yaml"


def timing_files(split: formats.DetectionSet) -> list[Path]:
    """The files both sides time: the first TIMING_IMAGES of the split, in the order yolo_tree numbers them."""
    return [record.image for record in split.records[:TIMING_IMAGES]]


# ---------------------------------------------------------------------------------------------- our rows


def modelworks(args: list[str], threads: int, timeout_s: float) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": str(threads), "MPLBACKEND": "Agg",
           "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "modelworks", *args], capture_output=True, text=True, env=env,
                          timeout=timeout_s, cwd=ROOT)


def probe_images_per_s(recipe: str, overrides: list[str], device: str, threads: int, name: str,
                       train_images: int) -> float:
    """Training images/s of a recipe, from a short run of about 12 steps."""
    from modelworks.config import read_recipe

    batch = int(read_recipe("detection", recipe).get("train", {}).get("batch_size", 128))
    args = ["train", "detection", "--recipe", recipe, "--name", name, *sum((["--set", o] for o in overrides), []),
            "--set", f"train.epochs={12 * batch / train_images:.5f}", "--set", "train.test_at_end=false",
            "--set", f"train.device={device}", "--set", "output_dir=bench/results/runs",
            "--set", "train.log_every_steps=4"]
    proc = modelworks(args, threads, 1800)
    if proc.returncode:
        raise SystemExit(f"probe of {recipe} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (RESULTS / "runs" / "detection" / name / "metrics.jsonl").read_text().splitlines()]
    rates = [r["train/samples_per_s"] for r in rows if "train/samples_per_s" in r][1:]  # the first holds warm-up
    return sum(rates) / len(rates)


def package_ms_per_image(package: Path, images: list[Path], threads: int) -> float:
    """End-to-end milliseconds per image at batch 1 the way `modelworks predict` and `serve` answer: file bytes
    -> decode, letterbox -> ONNX Runtime -> decode, NMS -> boxes in the image's pixels; after one warm-up."""
    from modelworks.inference import open_model

    model = open_model(package, "onnx", threads)
    request = model.predictor.Request()

    def answer(path: Path):
        return model.predict([model.predictor.parse(request, path.read_bytes())])

    answer(images[0])
    tic = time.perf_counter()
    for path in images:
        answer(path)
    return 1000 * (time.perf_counter() - tic) / len(images)


def our_row(label: str, recipe: str, overrides: list[str], budget_s: float, device: str, threads: int,
            eval_split: str, train_images: int, timing_images: list[Path]) -> dict:
    """Train within the budget (epochs scaled from a probe of the recipe's speed), evaluate, export the ONNX
    package and time it end to end on `timing_images` (the files the peer's row times)."""
    name = f"bench-{label}-{time.strftime('%Y%m%d-%H%M%S')}"
    rate = probe_images_per_s(recipe, overrides, device, threads, f"probe-{name}", train_images)
    # Leave ~10% of the budget for start-up, validation passes and checkpoints.
    epochs_override = ["--set", f"train.epochs={max(0.5, round(0.9 * budget_s * rate / train_images, 2))}"]
    args = ["train", "detection", "--recipe", recipe, "--name", name, *sum((["--set", o] for o in overrides), []),
            *epochs_override, "--set", "train.test_at_end=false", "--set", f"train.device={device}",
            "--set", "output_dir=bench/results/runs"]
    tic = time.perf_counter()
    proc = modelworks(args, threads, budget_s * 3)
    train_s = time.perf_counter() - tic
    if proc.returncode:
        return {"row": label, "error": (proc.stdout + proc.stderr)[-2000:]}
    run = RESULTS / "runs" / "detection" / name
    proc = modelworks(["evaluate", str(run), "--split", eval_split, "--set", f"train.device={device}"], threads, 1200)
    if proc.returncode:
        return {"row": label, "error": (proc.stdout + proc.stderr)[-2000:]}
    metrics = json.loads((run / "evaluation" / f"{eval_split}.json").read_text())
    proc = modelworks(["export", str(run), "--format", "onnx", "--force"], threads, 1200)
    if proc.returncode:
        return {"row": label, "error": (proc.stdout + proc.stderr)[-2000:]}
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rates = [r["train/samples_per_s"] for r in rows if "train/samples_per_s" in r][1:]
    return {"row": label, "map": metrics[f"{eval_split}/map"], "map50": metrics[f"{eval_split}/map50"],
            "train_s": round(train_s, 1), "train_images_per_s": round(sum(rates) / max(len(rates), 1), 1),
            "ms_per_image_batch1": round(package_ms_per_image(run / "package", timing_images, threads), 2),
            # evaluate's own figure: eager PyTorch on an already-decoded tensor, for reference
            "ms_per_image_batch1_eager": round(metrics[f"{eval_split}/ms_per_image_batch1_model"], 2), "run": str(run)}


# ---------------------------------------------------------------------------------------------- the peer


PEER_SCRIPT = textwrap.dedent("""
    import json, sys, time, glob
    import torch
    from ultralytics import YOLO
    data, imgsz, budget_s, threads, device, split, out, timing_images = sys.argv[1:9]
    threads, budget_s, imgsz, timing_images = int(threads), float(budget_s), int(imgsz), int(timing_images)
    torch.set_num_threads(threads)
    # ultralytics resets torch to its NUM_THREADS (cpu_count - 1) in every select_device call (training,
    # validation, prediction): give it our count instead.
    import ultralytics.utils.torch_utils
    ultralytics.utils.torch_utils.NUM_THREADS = threads
    model = YOLO("yolov8n.yaml")
    seen = {"images": 0, "seconds": 0.0}
    def on_epoch_start(trainer):
        seen["tic"] = time.perf_counter()
    def on_epoch_end(trainer):
        seen["seconds"] += time.perf_counter() - seen["tic"]
        seen["images"] += len(trainer.train_loader.dataset)
    model.add_callback("on_train_epoch_start", on_epoch_start)
    model.add_callback("on_train_epoch_end", on_epoch_end)
    tic = time.perf_counter()
    model.train(data=data, imgsz=imgsz, epochs=1000, time=budget_s / 3600, device=device, workers=2, batch=32,
                pretrained=False, amp=device != "cpu", plots=False, project=out, name="train", exist_ok=True,
                verbose=False)
    train_s = time.perf_counter() - tic
    metrics = model.val(data=data, imgsz=imgsz, split=split, batch=32, device=device, plots=False, verbose=False)
    spec = __import__("yaml").safe_load(open(data))
    images = sorted(glob.glob(f"{spec['path']}/images/{split}/*"))[:timing_images]
    model.predict(images[0], imgsz=imgsz, device=device, verbose=False)  # warm-up
    tic = time.perf_counter()
    for path in images:
        model.predict(path, imgsz=imgsz, device=device, verbose=False)
    ms = 1000 * (time.perf_counter() - tic) / len(images)
    json.dump({"map": float(metrics.box.map), "map50": float(metrics.box.map50), "train_s": train_s,
               "train_images_per_s": seen["images"] / max(seen["seconds"], 1e-9), "ms_per_image_batch1": ms,
               "threads_at_end": torch.get_num_threads()}, open(f"{out}/peer.json", "w"))
""")


def peer_python() -> Path:
    venv = RESULTS / "peer-venv"
    python = venv / "bin" / "python"
    if not python.exists():
        # Its own environment (so our venv stays clean), reusing the installed torch/torchvision.
        subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    if subprocess.run([str(python), "-c", "import ultralytics"], capture_output=True).returncode:
        subprocess.run([str(python), "-m", "pip", "install", "-q", "ultralytics"], check=True)
    return python


def peer_row(label: str, data_yaml: Path, imgsz: int, budget_s: float, device: str, threads: int, split: str) -> dict:
    out = (RESULTS / "peer" / label).resolve()
    out.mkdir(parents=True, exist_ok=True)
    script = out / "peer.py"
    script.write_text(PEER_SCRIPT)
    env = {**os.environ, "YOLO_OFFLINE": "1", "OMP_NUM_THREADS": str(threads), "YOLO_CONFIG_DIR": str(out)}
    proc = subprocess.run([str(peer_python()), str(script), str(data_yaml), str(imgsz), str(budget_s), str(threads),
                           device if device != "cuda" else "0", split, str(out), str(TIMING_IMAGES)],
                          capture_output=True, text=True,
                          env=env, timeout=budget_s * 3, cwd=out)
    if proc.returncode or not (out / "peer.json").exists():
        return {"row": label, "error": (proc.stdout + proc.stderr)[-2000:]}
    result = json.loads((out / "peer.json").read_text())
    return {"row": label, **{k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()}}


# ---------------------------------------------------------------------------------------------- main


@contextlib.contextmanager
def held(lock: str | None):
    """An exclusive flock on `lock` for the duration (nothing without one)."""
    if not lock:
        yield
        return
    with open(lock, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def print_table(rows: list[dict]) -> None:
    print(f"\n{'row':<34} {'mAP@[.5:.95]':>12} {'mAP@.5':>8} {'train s':>8} {'train img/s':>11} {'ms/img b1':>10}")
    for r in rows:
        if "error" in r:
            print(f"{r['row']:<34} failed: {r['error'][-300:]}")
            continue
        print(f"{r['row']:<34} {r['map']:>12.3f} {r['map50']:>8.3f} {r['train_s']:>8.0f} "
              f"{r['train_images_per_s']:>11.1f} {r['ms_per_image_batch1']:>10.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget-s", type=float, default=600.0, help="training wall budget per row")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--skip-peer", action="store_true")
    parser.add_argument("--skip-bccd", action="store_true")
    parser.add_argument("--skip-yolov1", action="store_true")
    parser.add_argument("--lock", metavar="FILE",
                        help="hold an exclusive flock on FILE during each row, so other heavy work sharing the "
                             "machine (and taking the same lock) waits between rows instead of skewing them")
    parser.add_argument("--out", default=str(RESULTS / "detection.json"))
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    import torch

    torch.set_num_threads(args.threads)
    rows = []
    scenes = ensure_scenes(ROOT / "data", SceneConfig())
    scene_splits = {s: formats.read_coco(scenes / "annotations" / f"instances_{s}.json", scenes / "images" / s)
                    for s in ("train", "val")}
    plans = [("ours anchor-free-n, fmnist-scenes", "fmnist-scenes", [])]
    if not args.skip_yolov1:
        plans.append(("ours yolov1 (seed), fmnist-scenes", "fmnist-scenes",
                      ["model.name=yolov1", "model.grid=5", "model.widths=[32,64,128,256,512]",
                       "model.head_width=512", "train.ema.enabled=false", "optim.lr=0.001"]))
    for label, recipe, overrides in plans:
        with held(args.lock):
            rows.append(our_row(label.split(",")[0].replace(" ", "-").replace("(", "").replace(")", ""), recipe,
                                overrides, args.budget_s, args.device, args.threads, "val",
                                len(scene_splits["train"]), timing_files(scene_splits["val"])))
        rows[-1]["row"] = label
        print_table(rows[-1:])
    if not args.skip_peer:
        data_yaml = yolo_tree(scene_splits, RESULTS / "yolo-fmnist-scenes")
        with held(args.lock):
            rows.append(peer_row("peer-yolov8n-fmnist-scenes", data_yaml, 160, args.budget_s, args.device,
                                 args.threads, "val"))
        rows[-1]["row"] = "ultralytics YOLOv8n, fmnist-scenes"
        print_table(rows[-1:])
    if not args.skip_bccd and BCCD.is_dir():
        bccd = {s: formats.read_voc(BCCD, s, ["RBC", "WBC", "Platelets"]) for s in ("train", "val", "test")}
        with held(args.lock):
            rows.append(our_row("bccd", "bccd", [f"data.source=voc:{BCCD}"], args.budget_s, args.device,
                                args.threads, "test", len(bccd["train"].records), timing_files(bccd["test"])))
        rows[-1]["row"] = "ours anchor-free-n, BCCD (test)"
        print_table(rows[-1:])
        if not args.skip_peer:
            data_yaml = yolo_tree(bccd, RESULTS / "yolo-bccd")
            with held(args.lock):
                rows.append(peer_row("peer-yolov8n-bccd", data_yaml, 320, args.budget_s, args.device,
                                     args.threads, "test"))
            rows[-1]["row"] = "ultralytics YOLOv8n, BCCD (test)"
            print_table(rows[-1:])
    print_table(rows)
    meta = {"budget_s": args.budget_s, "device": args.device, "threads": args.threads, "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M")}
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
