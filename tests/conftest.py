"""Shared fixtures: tiny data sets written in the real formats and tiny run configurations.

Everything here builds real components (real IDX files, real configs); nothing is mocked. Plain helpers
(CLI runners, config builders) live in helpers.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from helpers import build_tiny_cfg, tiny_detection_raw
from modelworks.data.synthetic import write_fashion_mnist


@pytest.fixture(autouse=True)
def _restore_torch_global_state():
    """fit() seeds torch and may switch on deterministic algorithms; keep that from leaking between tests."""
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    rng = torch.get_rng_state()
    benchmark = torch.backends.cudnn.benchmark
    yield
    torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
    torch.set_rng_state(rng)
    torch.backends.cudnn.benchmark = benchmark


@pytest.fixture
def fmnist_dir(tmp_path: Path) -> Path:
    """A folder holding the four gzipped Fashion-MNIST IDX files (512 train, 256 test images)."""
    return write_fashion_mnist(tmp_path / "fashion-mnist-data", n_train=512, n_test=256)


@pytest.fixture
def tiny_cfg():
    """`tiny_cfg(tmp_path, **overrides)` -> RunConfig (see build_tiny_cfg)."""
    return build_tiny_cfg


# ---------------------------------------------------------------------------------------------- packages
# One tiny trained run and its exported package (all formats, int8 included) for the whole session: the
# export, predict and serve tests share them rather than each training and exporting its own.


@pytest.fixture(scope="session")
def tiny_run_dir(tmp_path_factory) -> Path:
    """A classification run that learned the generated classes (validation accuracy ~1.0) in ~10 s."""
    from modelworks.engine import rundir
    from modelworks.engine.loop import fit
    from modelworks.tasks.classification.task import ClassificationTask

    root = tmp_path_factory.mktemp("tiny-run")
    cfg = build_tiny_cfg(root, train__epochs=5, optim__lr=0.01, train__test_at_end=False, name="tiny-v1")
    run_dir = rundir.new_run_dir(cfg)
    rundir.write_run_files(run_dir, cfg, ["modelworks", "train", "classification"])
    deterministic = torch.are_deterministic_algorithms_enabled()
    fit(ClassificationTask(cfg), cfg, run_dir)
    torch.use_deterministic_algorithms(deterministic)
    return run_dir


@pytest.fixture(scope="session")
def tiny_package(tiny_run_dir, tmp_path_factory) -> Path:
    """The tiny run exported with every format and int8 (named "tiny", version "v1")."""
    from modelworks.inference import export_run

    out = tmp_path_factory.mktemp("packages") / "tiny-v1"
    export_run(tiny_run_dir, out, {"name": "tiny", "version": "v1", "quantize": "int8", "calibration_samples": 128,
                                   "timing_repeats": 3}, log=lambda line: None)
    return out


@pytest.fixture(scope="session")
def tiny_detection_package(tmp_path_factory) -> Path:
    """DetectionTask.tiny() trained for its seconds-scale run and exported with TorchScript and ONNX (named
    "boxes", version "v1"), in ~8 s. Two epochs teach it little: it serves the interface tests, which ask for
    every box (score_threshold 0), not for good ones."""
    from modelworks import config as config_mod
    from modelworks.engine import rundir
    from modelworks.engine.loop import fit
    from modelworks.inference import export_run
    from modelworks.tasks.detection.task import DetectionTask

    root = tmp_path_factory.mktemp("tiny-detection")
    cfg = config_mod.load_config(DetectionTask, tiny_detection_raw(root))
    run_dir = rundir.new_run_dir(cfg)
    rundir.write_run_files(run_dir, cfg, ["modelworks", "train", "detection"])
    deterministic = torch.are_deterministic_algorithms_enabled()
    fit(DetectionTask(cfg), cfg, run_dir)
    torch.use_deterministic_algorithms(deterministic)
    out = root / "package"
    export_run(run_dir, out, {"name": "boxes", "version": "v1"}, log=lambda line: None)
    return out


@pytest.fixture(scope="session")
def tiny_rec_package(tmp_path_factory) -> Path:
    """An EASE recommender (closed form: no training steps) on an ml-100k-format fixture of 40 users walking 20
    items in order, exported as a package with version 1; its run directory is the package's source run."""
    from modelworks.cli import main
    from modelworks.tasks.recommendation.data import write_ml100k

    root = tmp_path_factory.mktemp("rec")
    write_ml100k(root / "ml-100k", n_users=40, n_items=20, seed=3)
    assert main(["train", "recommendation", "--recipe", "ease", "--data", f"movielens:{root / 'ml-100k'}",
                 "--name", "ease", "--set", f"output_dir={root / 'runs'}", "--set", "model.max_len=8",
                 "--set", "model.l2=5"]) == 0
    package = root / "package"
    assert main(["export", str(root / "runs" / "recommendation" / "ease"), "--out", str(package),
                 "--version", "1", "--format", "onnx"]) == 0
    return package
