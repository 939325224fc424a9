"""Model packages: what export writes and checks, checksum refusal, runtimes agreeing, preprocessing parity."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from helpers import fashion_test_images, png_bytes
from modelworks.errors import InputError, PackageError
from modelworks.export.package import read_package
from modelworks.export.runtime import load_weights
from modelworks.inference import export_run, open_model


def data_root(run_dir: Path) -> Path:
    return Path(yaml.safe_load((run_dir / "config.yaml").read_text())["data"]["root"])


def test_manifest_describes_the_package(tiny_package, tiny_run_dir):
    manifest = read_package(tiny_package).manifest
    assert (manifest["task"], manifest["name"], manifest["version"]) == ("classification", "tiny", "v1")
    assert manifest["source"]["run_dir"] == str(tiny_run_dir.resolve())
    assert set(manifest["files"]) == {"weights.safetensors", "model.torchscript.pt", "model.onnx", "model.int8.onnx"}
    assert all(len(entry["sha256"]) == 64 and entry["bytes"] > 0 for entry in manifest["files"].values())
    spec = manifest["predictor"]
    assert spec["inputs"] == [{"name": "images", "shape": ["batch", 1, 28, 28], "dtype": "float32"}]
    assert len(spec["labels"]) == 10 and spec["preprocessing"]["mean"] == pytest.approx([0.286])
    checks = manifest["metrics"]["export"]
    # Export refuses beyond atol 1e-3 and agreement 0.999, so these bounds are ours, well inside its gate: the
    # rebuilt eager model is bit-identical, the traced graphs within float rounding.
    assert checks["eager"]["max_abs_diff"] == 0.0
    for runtime in ("eager", "torchscript", "onnx"):
        assert checks[runtime]["max_abs_diff"] < 1e-4 and checks[runtime]["agreement"] == 1.0
    assert checks["onnx"]["acc1"] > 0.9  # the tiny run learned its classes
    int8 = manifest["int8"]
    assert int8["drop"]["acc1"] == pytest.approx(checks["onnx"]["acc1"] - checks["int8"]["acc1"])
    # int8 is not refused, only measured: a broken quantization (wrong scales, no calibration) loses far more.
    assert int8["drop"]["acc1"] <= 0.03 and int8["agreement_with_eager"] >= 0.95
    assert set(int8["speedup"]) == {"1", "32"}
    for size, speedup in int8["speedup"].items():
        seconds = int8["median_seconds"][size]
        assert 0 < seconds["fp32"] < 1 and 0 < seconds["int8"] < 1
        assert speedup == pytest.approx(seconds["fp32"] / seconds["int8"])
    assert int8["calibration_samples"] >= 128


def test_onnx_model_has_a_dynamic_batch_axis(tiny_package):
    import onnxruntime as ort

    session = ort.InferenceSession(str(tiny_package / "model.onnx"), providers=["CPUExecutionProvider"])
    (model_input,) = session.get_inputs()
    assert isinstance(model_input.shape[0], str) and model_input.shape[1:] == [1, 28, 28]
    for batch in (1, 5):
        (logits,) = session.run(None, {"images": np.zeros((batch, 1, 28, 28), np.float32)})
        assert logits.shape == (batch, 10)


@pytest.fixture
def package_copy(tiny_package, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_package, tmp_path / "package"))


def test_a_modified_file_is_refused_by_name(package_copy):
    data = bytearray((package_copy / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (package_copy / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(PackageError, match=r"model\.onnx: checksum mismatch .*modified after export"):
        read_package(package_copy)


def test_a_truncated_file_is_refused_by_name(package_copy):
    weights = package_copy / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(PackageError, match=r"weights\.safetensors: 100 bytes, the manifest says \d+: .*truncated"):
        open_model(package_copy, "eager")


def test_a_missing_file_is_refused_by_name(package_copy):
    (package_copy / "model.torchscript.pt").unlink()
    with pytest.raises(PackageError, match=r"model\.torchscript\.pt: missing from the package"):
        read_package(package_copy)


def test_a_broken_manifest_is_refused(package_copy, tmp_path):
    manifest = package_copy / "manifest.json"
    original = json.loads(manifest.read_text())
    manifest.write_text("{not json")
    with pytest.raises(PackageError, match=r"manifest\.json: not valid JSON"):
        read_package(package_copy)
    escaping = {**original, "files": {**original["files"], "../secret": {"sha256": "0" * 64, "bytes": 1}}}
    manifest.write_text(json.dumps(escaping))
    with pytest.raises(PackageError, match=r"file entry '\.\./secret' is not a plain file name"):
        read_package(package_copy)
    with pytest.raises(PackageError, match=r"not a model package \(no manifest\.json\)"):
        read_package(tmp_path)


def test_a_missing_runtime_says_how_to_get_it(tiny_run_dir, tmp_path):
    out, _ = export_run(tiny_run_dir, tmp_path / "onnx-only", {"formats": ("onnx",)}, log=lambda line: None)
    with pytest.raises(PackageError, match=r"no int8 model model\.int8\.onnx \(export it with --quantize int8\)"):
        open_model(out, "int8")


class DiffersWhenExported(nn.Module):
    """The classifier's graph, changed only while TorchScript traces it or ONNX exports it: the written files
    really disagree with eager PyTorch, which the comparison alone can see. `shift` adds to every logit (the
    answers stay the same), `swap` trades classes 0 and 1 (the answers change for those samples)."""

    def __init__(self, inner: nn.Module, shift: float = 0.0, swap: bool = False):
        super().__init__()
        self.inner, self.shift, self.swap = inner, shift, swap

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.inner(x)
        if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
            logits = logits + self.shift
            if self.swap:
                logits = torch.cat([logits[:, 1:2], logits[:, 0:1], logits[:, 2:]], 1)
        return logits


@pytest.fixture
def exported_graph_differs(monkeypatch):
    """`exported_graph_differs(**kwargs)`: ClassificationTask exports DiffersWhenExported(graph, **kwargs)."""
    from modelworks.tasks.classification.task import ClassificationTask

    original = ClassificationTask.export_module

    def differs(**kwargs):
        monkeypatch.setattr(ClassificationTask, "export_module",
                            lambda self, model: DiffersWhenExported(original(self, model), **kwargs))
    return differs


def test_export_refuses_a_graph_whose_outputs_differ_and_writes_nothing(tiny_run_dir, tmp_path,
                                                                         exported_graph_differs):
    exported_graph_differs(shift=0.01)  # 10x the default tolerance, the same answers
    with pytest.raises(PackageError, match=r"(?s)export refused: a format disagrees with eager PyTorch .*"
                                           r"torchscript: max_abs_diff 1\.00e-02, agreement 1\.0000.*onnx: "
                                           r"max_abs_diff 1\.00e-02, .*Nothing was written"):
        export_run(tiny_run_dir, tmp_path / "refused", {}, log=lambda line: None)
    assert not (tmp_path / "refused").exists()
    assert not list(tmp_path.glob(".refused*"))  # no staging folder left behind
    # A looser --atol accepts the same graph, and the manifest records what was measured.
    out, manifest = export_run(tiny_run_dir, tmp_path / "loose", {"formats": ("onnx",), "atol": 0.02},
                               log=lambda line: None)
    assert manifest["metrics"]["export"]["onnx"]["max_abs_diff"] == pytest.approx(0.01, abs=1e-4)
    assert manifest["checks"] == {"atol": 0.02, "min_agreement": 0.999, "passed": ["eager", "onnx"]}


def test_min_agreement_refuses_a_graph_that_changes_answers(tiny_run_dir, tmp_path, exported_graph_differs,
                                                            capsys):
    from modelworks.cli import main

    exported_graph_differs(swap=True)
    args = ["export", str(tiny_run_dir), "--format", "onnx", "--atol", "1000"]
    assert main([*args, "--out", str(tmp_path / "refused")]) == 2
    error = capsys.readouterr().err
    assert "export refused" in error and "onnx: max_abs_diff" in error, error
    # About a fifth of the validation samples are of class 0 or 1, whose answers the swap changes.
    agreement = float(re.search(r"onnx: max_abs_diff \S+, agreement ([0-9.]+)", error).group(1))
    assert 0.6 < agreement < 0.95
    assert not (tmp_path / "refused").exists()
    # --min-agreement below what was measured accepts it; the manifest keeps the measured agreement.
    assert main([*args, "--out", str(tmp_path / "accepted"), "--min-agreement", f"{agreement - 0.01:.4f}"]) == 0
    manifest = read_package(tmp_path / "accepted").manifest
    assert manifest["metrics"]["export"]["onnx"]["agreement"] == pytest.approx(agreement, abs=1e-4)
    assert manifest["checks"]["min_agreement"] == pytest.approx(agreement - 0.01, abs=1e-4)


def test_the_test_time_augmentation_graph_exports_and_every_runtime_serves_it(tiny_run_dir, tmp_path):
    """The default recipe serves a flip_shift TTA graph (four views, logits averaged); export it and check each
    runtime against the eager TTA module, and that the graph is not the plain classifier."""
    from modelworks import config as config_mod
    from modelworks.engine import rundir
    from modelworks.engine.loop import load_for_evaluation
    from modelworks.tasks.classification.task import ClassificationTask, TTAClassifier

    out, manifest = export_run(tiny_run_dir, tmp_path / "tta", {"formats": ("torchscript", "onnx")},
                               overrides=["model.tta=flip_shift"], log=lambda line: None)
    assert manifest["predictor"]["test_time_augmentation"] == "flip_shift"
    cfg = config_mod.load_config(ClassificationTask, rundir.read_config_dict(tiny_run_dir))
    cfg.train.device = "cpu"
    task = ClassificationTask(cfg)
    task.datasets(torch.device("cpu"))
    model = load_for_evaluation(task, tiny_run_dir, torch.device("cpu"), cfg, "best").float().eval()
    images, _ = fashion_test_images(data_root(tiny_run_dir), n=16)
    predictor = open_model(out, "eager").predictor
    x = torch.from_numpy(predictor.collate([predictor.parse(predictor.Request(), png_bytes(i)) for i in images])
                         ["images"])
    with torch.no_grad():
        want = TTAClassifier(model, "flip_shift")(x).softmax(1)
        plain = model(x).float().softmax(1)
    assert (want - plain).abs().max() > 1e-3  # the views change the answer: a graph without them would show
    for runtime in ("eager", "torchscript", "onnx"):
        served = open_model(out, runtime)
        responses = served.predict([served.predictor.parse(served.predictor.Request(top_k=10), png_bytes(i))
                                    for i in images])
        for response, probabilities in zip(responses, want):
            for entry in response.top_k:
                assert entry.probability == pytest.approx(probabilities[entry.index].item(), abs=1e-5), runtime


def test_every_runtime_gives_the_same_answers(tiny_package, tiny_run_dir):
    images, labels = fashion_test_images(data_root(tiny_run_dir))
    answers = {}
    for runtime in ("eager", "torchscript", "onnx", "int8"):
        model = open_model(tiny_package, runtime)
        request = model.predictor.Request(top_k=3)
        items = [model.predictor.parse(request, png_bytes(image)) for image in images]
        answers[runtime] = model.predict(items)
    reference = answers["eager"]
    assert [r.top_k[0].index for r in reference] == labels.tolist()  # the tiny model knows its classes
    for runtime in ("torchscript", "onnx"):
        for got, want in zip(answers[runtime], reference):
            assert got.label == want.label and got.probability == pytest.approx(want.probability, abs=1e-5)
    assert [r.label for r in answers["int8"]] == [r.label for r in reference]


def test_serving_preprocessing_matches_training(tiny_run_dir):
    """The predictor turns a PNG into exactly the tensor training's prepare_batch makes from the same pixels."""
    from modelworks import config as config_mod
    from modelworks.engine import rundir
    from modelworks.tasks.classification.task import ClassificationTask

    cfg = config_mod.load_config(ClassificationTask, rundir.read_config_dict(tiny_run_dir))
    cfg.train.channels_last = False
    task = ClassificationTask(cfg)
    task.datasets(torch.device("cpu"))
    predictor = task.predictor()
    images, labels = fashion_test_images(data_root(tiny_run_dir), n=4)
    trained_on, _ = task.prepare_batch((torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels)), None)
    served = predictor.collate([predictor.parse(predictor.Request(), png_bytes(image)) for image in images])
    assert np.array_equal(served["images"], trained_on.numpy())


def test_predictor_refuses_inputs_with_the_expected_shape_in_the_message(tiny_package):
    predictor = open_model(tiny_package, "onnx").predictor
    request = predictor.Request()
    rgb = np.zeros((28, 28, 3), np.uint8)
    with pytest.raises(InputError, match=r"image: the model takes 28x28 grayscale \(1 channel\) images, as it was "
                                         r"trained \(got 28x28 with 3 channels\); .*resize=true"):
        predictor.parse(request, png_bytes(rgb))
    with pytest.raises(InputError, match=r"got 64x32 with 1 channel\)"):
        predictor.parse(request, png_bytes(np.zeros((64, 32), np.uint8)))
    with pytest.raises(InputError, match=r"image: empty file"):
        predictor.parse(request, b"")
    with pytest.raises(InputError, match=r"image: cannot be decoded as PNG, JPEG, GIF or WebP"):
        predictor.parse(request, b"GIF89a but not really")
    with pytest.raises(InputError, match=r"top_k: at most 10, the number of classes \(got 11\)"):
        predictor.parse(predictor.Request(top_k=11), png_bytes(np.zeros((28, 28), np.uint8)))
    with pytest.raises(InputError, match=r"image: missing"):
        predictor.parse(request)
    # Asked for, resizing and colour conversion are done the way an ImageFolder model was trained.
    x, _ = predictor.parse(predictor.Request(resize=True), png_bytes(np.full((64, 48, 3), 200, np.uint8)))
    assert tuple(x.shape) == (1, 28, 28)


# ---------------------------------------------------------------------------------------------- names, versions


@pytest.mark.parametrize("value", ["v1", "tiny", "1.0.0", "a_b-c.D", "9", "A" * 64])
def test_check_identifier_accepts_the_documented_set(value):
    from modelworks.export.package import NAME_PATTERN, check_identifier

    assert check_identifier("--version", value) == value and NAME_PATTERN.match(value)


@pytest.mark.parametrize("value", ["", "-v1", ".hidden", "_x", "v-日本", "v 1", "a/b", "v1\n", "v1\r\nX-Evil: 1",
                                   "A" * 65, "٣", 3, None])
def test_check_identifier_refuses_everything_else(value):
    from modelworks.export.package import check_identifier

    with pytest.raises(PackageError, match=rf"^--version: {re.escape(repr(value))} is not a valid version; use 1-64 "
                                           r"letters, digits, '\.', '_' and '-', starting with a letter or digit$"):
        check_identifier("--version", value, "version")


def test_export_refuses_an_invalid_version_and_writes_nothing(tiny_run_dir, tmp_path):
    with pytest.raises(PackageError, match=r"^--version: 'v-日本' is not a valid version; use 1-64 letters"):
        export_run(tiny_run_dir, tmp_path / "pkg", {"version": "v-日本"}, log=lambda line: None)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("key", ["name", "version"])
def test_a_manifest_with_an_invalid_name_or_version_is_refused(package_copy, key):
    manifest = package_copy / "manifest.json"
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), key: "v-日本"}))
    with pytest.raises(PackageError, match=rf"^{re.escape(str(manifest))}: 'v-日本' is not a valid {key}; export the "
                                           rf"package again with a --{key} of 1-64 letters, digits"):
        read_package(package_copy)


# ---------------------------------------------------------------------------------------------- symbolic links


def test_a_listed_file_that_is_a_symlink_is_refused_even_with_the_right_checksum(package_copy, tmp_path):
    outside = tmp_path / "elsewhere.onnx"
    (package_copy / "model.onnx").rename(outside)
    (package_copy / "model.onnx").symlink_to(outside)  # same bytes: the checksum alone would pass it
    with pytest.raises(PackageError, match=rf"^{re.escape(str(package_copy / 'model.onnx'))}: a symbolic link \(to "
                                           rf"{re.escape(str(outside))}\); a package holds plain files only"):
        read_package(package_copy)


def test_an_unlisted_symlink_is_refused(package_copy):
    (package_copy / "notes").symlink_to("/etc/passwd")
    with pytest.raises(PackageError, match=rf"^{re.escape(str(package_copy / 'notes'))}: a symbolic link \(to "
                                           r"/etc/passwd\)"):
        read_package(package_copy)


def test_the_package_folder_itself_may_be_a_symlink(tiny_package, tmp_path):
    (tmp_path / "current").symlink_to(tiny_package)
    assert read_package(tmp_path / "current").version == "v1"


# ---------------------------------------------------------------------------------------------- staging folders


def test_an_export_removes_only_the_stale_staging_folders_of_its_output(tiny_run_dir, tmp_path):
    import fcntl
    import os
    import time

    def folder(name: str, age_s: float = 3600) -> Path:
        path = tmp_path / name
        path.mkdir()
        (path / "weights.safetensors").write_bytes(b"half written")
        os.utime(path, (time.time() - age_s, time.time() - age_s))
        return path

    stale = [folder(".pkg.tmp-k1ll3d_x"), folder(".pkg.old-k1ll3d_y")]  # left by exports killed an hour ago
    kept = [folder(".pkg.tmp-y0ung123", age_s=0),  # may be a new export that has not locked it yet
            folder(".other.tmp-k1ll3d_x"), folder(".pkg.tmp-x.tmp-k1ll3d_x"),  # other outputs' folders
            folder(".pkg.tmp-l1ve1234")]  # a live export's: it holds the lock
    live = os.open(kept[-1], os.O_RDONLY)
    fcntl.flock(live, fcntl.LOCK_EX)
    lines = []
    try:
        export_run(tiny_run_dir, tmp_path / "pkg", {"formats": ("onnx",)}, log=lines.append)
    finally:
        os.close(live)
    assert [path for path in stale if path.exists()] == []
    assert [path for path in kept if not path.exists()] == []
    assert {line for line in lines if "removed" in line} == {
        f"  removed {path.name}, left by an export of {tmp_path / 'pkg'} that did not finish" for path in stale}
    # The live export's folder goes once its lock is released (the process ended); replacing the package
    # (--force) goes through a `.pkg.old-*` folder of its own and leaves none behind.
    export_run(tiny_run_dir, tmp_path / "pkg", {"formats": ("onnx",), "overwrite": True}, log=lambda line: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["pkg", *(path.name for path in kept[:-1])])
    assert read_package(tmp_path / "pkg").version == tiny_run_dir.name


def test_tied_weights_survive_safetensors(tmp_path):
    """save_model stores a shared tensor once; load_weights_into gives it back to both names, strictly, and still
    refuses weights that do not fit."""
    from safetensors.torch import save_model

    from modelworks.errors import PackageError
    from modelworks.export.runtime import load_weights_into

    def tied():
        model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 10, bias=False))
        model[1].weight = model[0].weight
        return model

    torch.manual_seed(0)
    model = tied()
    save_model(model, str(tmp_path / "w.safetensors"))
    with pytest.raises(RuntimeError, match="Missing key"):  # the plain strict load the package used to do
        tied().load_state_dict(load_weights(tmp_path / "w.safetensors"))
    rebuilt = load_weights_into(tied(), tmp_path / "w.safetensors")
    assert rebuilt[1].weight is rebuilt[0].weight and torch.equal(rebuilt[0].weight, model[0].weight)
    with pytest.raises(PackageError, match=r"w\.safetensors: the weights do not fit the model"):
        load_weights_into(torch.nn.Sequential(torch.nn.Embedding(11, 4), torch.nn.Linear(4, 11, bias=False)),
                          tmp_path / "w.safetensors")
