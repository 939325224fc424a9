"""`modelworks export` and `modelworks predict` as real processes: files, folders, globs, bad files, JSONL/CSV."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import yaml

from helpers import fashion_test_images, png_bytes, run_cli


def test_export_cli_prints_the_checks_and_writes_the_package(tiny_run_dir, tmp_path):
    out = tmp_path / "pkg"
    result = run_cli(["export", str(tiny_run_dir), "--out", str(out), "--format", "onnx", "--version", "cli"])
    assert result.returncode == 0, result.stderr
    assert "onnx         max_abs_diff" in result.stdout and f"package {out}" in result.stdout
    again = run_cli(["export", str(tiny_run_dir), "--out", str(out), "--format", "onnx"])
    assert again.returncode == 2 and "already exists; choose another folder or pass --force" in again.stderr


def test_predict_over_files_folders_and_globs_skips_bad_files(tiny_package, tiny_run_dir, tmp_path):
    root = Path(yaml.safe_load((tiny_run_dir / "config.yaml").read_text())["data"]["root"])
    images, labels = fashion_test_images(root, n=6)
    folder = tmp_path / "images"
    (folder / "nested").mkdir(parents=True)
    for i, image in enumerate(images[:4]):
        (folder / ("nested" if i % 2 else "") / f"{i}.png").write_bytes(png_bytes(image))
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (folder / "big.png").write_bytes(png_bytes(np.zeros((40, 40), np.uint8)))
    (folder / "notes.txt").write_text("not an image, and not picked from a folder")
    loose = tmp_path / "loose"
    loose.mkdir()
    for i, image in enumerate(images[4:], start=4):
        (loose / f"{i}.png").write_bytes(png_bytes(image))

    out = tmp_path / "predictions.jsonl"
    result = run_cli(["predict", str(tiny_package), str(folder), str(loose / "*.png"), str(tmp_path / "nope.png"),
                      "--batch-size", "3", "--runtime", "onnx", "--out", str(out)])
    assert result.returncode == 1, result.stderr  # some inputs were skipped; the rest are written
    assert "6 predicted, 3 skipped (onnx)" in result.stderr
    assert "skipped " + str(folder / "broken.png") + ": image: cannot be decoded" in result.stderr
    assert "skipped " + str(folder / "big.png") + ": image: the model takes 28x28 grayscale" in result.stderr
    assert "nope.png: no such file or folder" in result.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    predicted = {Path(r["path"]).name: r["prediction"] for r in rows if "prediction" in r}
    assert len(predicted) == 6 and sum("error" in r for r in rows) == 3
    label_names = yaml.safe_load("[T-shirt/top, Trouser, Pullover, Dress, Coat, Sandal, Shirt, Sneaker, Bag, "
                                 "Ankle boot]")
    for i, label in enumerate(labels):
        assert predicted[f"{i}.png"]["label"] == label_names[label]
        assert len(predicted[f"{i}.png"]["top_k"]) == 5

    csv_out = tmp_path / "predictions.csv"
    result = run_cli(["predict", str(tiny_package), *[str(p) for p in sorted(loose.glob("*.png"))],
                      "--runtime", "int8", "--option", "top_k=2", "--out", str(csv_out)])
    assert result.returncode == 0, result.stderr
    with open(csv_out) as f:
        table = list(csv.DictReader(f))
    assert [Path(r["path"]).name for r in table] == ["4.png", "5.png"]
    assert {"label", "probability", "top_k.0.label", "top_k.1.probability", "error"} <= set(table[0])
    assert "top_k.2.label" not in table[0]


def test_save_images_says_when_the_task_has_nothing_to_draw(tiny_package, tiny_run_dir, tmp_path, capsys):
    from modelworks.export.batch import predict_files
    from modelworks.inference import open_model

    root = Path(yaml.safe_load((tiny_run_dir / "config.yaml").read_text())["data"]["root"])
    images, _ = fashion_test_images(root, n=2)
    paths = []
    for i, image in enumerate(images):
        paths.append(tmp_path / f"{i}.png")
        paths[-1].write_bytes(png_bytes(image))
    result = predict_files(open_model(tiny_package, "onnx"), [str(p) for p in paths], tmp_path / "out.jsonl", 8,
                           progress=False, save_images=tmp_path / "drawn")
    assert (result.predicted, result.skipped, result.saved) == (2, 0, 0)
    err = capsys.readouterr().err
    assert err.count("--save-images: a classification model has nothing to draw on its inputs; no images are "
                     "written (the predictions are)") == 1
    assert not list((tmp_path / "drawn").iterdir())
