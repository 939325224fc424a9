"""Data parallelism with 2 gloo processes under torchrun: 2 ranks x 16 train exactly like 1 process x 32, and the
CLI runs under torchrun with rank 0 alone writing the run directory."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

from helpers import TORCHRUN, cli_env, tiny_cli_args
from linear_task import LinearTask, linear_cfg
from modelworks.config import load_config
from modelworks.engine import checkpoint, rundir
from modelworks.engine.loop import evaluate_split, fit, load_for_evaluation
from modelworks.engine.precision import choose_precision
from modelworks.tasks.classification.task import ClassificationTask

pytestmark = pytest.mark.ddp
WORKER = Path(__file__).with_name("ddp_worker.py")


def torchrun(args: list[str], timeout_s: float = 240) -> subprocess.CompletedProcess:
    """Two CPU processes on one machine; --standalone picks a free rendezvous port itself."""
    env = cli_env()
    env["OMP_NUM_THREADS"] = "1"  # two ranks share the cores
    return subprocess.run([TORCHRUN, "--standalone", "--nproc-per-node", "2", *args], capture_output=True, text=True,
                          timeout=timeout_s, env=env)


def test_two_ranks_match_one_process_on_the_same_global_batch(tmp_path):
    result = torchrun([str(WORKER), str(tmp_path / "ddp")])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "rank 0 of 2: finished at step 16" in result.stdout
    assert "rank 1 of 2: finished at step 16" in result.stdout

    cfg = linear_cfg(tmp_path / "single")
    run_dir = tmp_path / "single" / "linear"
    run_dir.mkdir(parents=True)
    fit(LinearTask(cfg), cfg, run_dir)

    ddp = checkpoint.load(tmp_path / "ddp" / "linear" / "checkpoints" / "last.pt")
    single = checkpoint.load(run_dir / "checkpoints" / "last.pt")
    assert ddp["step"] == single["step"] == 16  # 256 samples / 32 per global batch x 2 epochs
    for key in single["model"]:
        torch.testing.assert_close(ddp["model"][key], single["model"][key], atol=1e-5, rtol=0)
    torch.manual_seed(cfg.train.seed)
    initial = LinearTask(cfg).build_model().state_dict()
    assert (single["model"]["weight"] - initial["weight"]).abs().max() > 0.1  # it trained: equality means something
    ddp_val = json.loads((tmp_path / "ddp" / "linear" / "summary.json").read_text())["best"]["val/loss"]
    single_val = json.loads((run_dir / "summary.json").read_text())["best"]["val/loss"]
    assert ddp_val == pytest.approx(single_val, rel=1e-5)  # evaluation reduced over both shards

    # Each step, the ranks trained on different halves of the global batch: in each epoch (8 steps of 16 per
    # rank) they saw disjoint samples that together make the whole training split.
    seen = [torch.load(tmp_path / "ddp" / f"seen-rank{rank}.pt") for rank in (0, 1)]
    assert [len(s) for s in seen] == [256, 256]  # 2 epochs x 8 steps x 16
    train_targets = set(LinearTask(cfg).datasets(torch.device("cpu")).train.y.tolist())
    for epoch in (0, 1):
        shards = [set(s[epoch * 128:(epoch + 1) * 128].tolist()) for s in seen]
        assert len(shards[0]) == len(shards[1]) == 128 and not shards[0] & shards[1]
        assert shards[0] | shards[1] == train_targets


def test_cli_under_torchrun(tmp_path):
    # fp32, so the single-process evaluation below can be compared to the last digit
    args = tiny_cli_args(tmp_path, "ddp", **{"train.epochs": 1, "train.precision": "fp32"})
    result = torchrun(["-m", "modelworks", *args])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "device cpu x2" in result.stdout
    runs = tmp_path / "runs" / "classification"
    assert [p.name for p in runs.iterdir()] == ["ddp"]
    run_dir = runs / "ddp"
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["best.pt", "last.pt"]
    assert checkpoint.load(run_dir / "checkpoints" / "last.pt")["step"] == 7
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines if "val/acc1" in line] == [7]  # logged once, by rank 0
    train_steps = [line["step"] for line in lines if "train/loss" in line]
    assert train_steps == sorted(set(train_steps))
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "finished"
    assert "test/acc1" in json.loads((run_dir / "evaluation" / "test.json").read_text())
    assert result.stdout.count("run finished at step 7") == 1  # rank 0 alone reports

    # The validation metrics were computed on two strided shards (26 + 25 samples) and reduced by torchmetrics
    # across the ranks: one process over the whole split must give the same numbers.
    (logged,) = [line for line in lines if "val/acc1" in line]
    cfg = load_config(ClassificationTask, rundir.read_config_dict(run_dir))
    task = ClassificationTask(cfg)
    cpu = torch.device("cpu")
    splits = task.datasets(cpu)
    model = load_for_evaluation(task, run_dir, cpu, cfg, "last")
    single = evaluate_split(task, model, splits.val, splits.collate_fn, cfg, cpu,
                            choose_precision(cfg.train.precision, cpu), "val")
    assert len(splits.val) % 2 == 1  # unequal shards: a mean of the two ranks' means would differ
    assert single["val/acc1"] == logged["val/acc1"]
    assert logged["val/acc5"] == single["val/acc5"]
    assert logged["val/loss"] == pytest.approx(single["val/loss"], rel=1e-5)
    assert logged["val/ece"] == pytest.approx(single["val/ece"], rel=1e-3)  # float32 sums per confidence bin
