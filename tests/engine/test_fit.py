"""fit() end to end in process: the run directory, exact resume from an interruption, early stopping, the NaN
guard, and gradient accumulation."""

from __future__ import annotations

import json
import math
import os
import signal
from pathlib import Path

import pytest
import torch

from linear_task import LinearTask, linear_cfg
from modelworks.engine import checkpoint
from modelworks.engine.loop import evaluate_run, fit
from modelworks.errors import CheckpointError, TrainingDiverged
from modelworks.tasks.classification.task import ClassificationTask


def run_dir_of(cfg) -> Path:
    """<output_dir>/<task>/<name>, created as the CLI creates it before calling fit()."""
    run_dir = Path(cfg.output_dir) / cfg.task / cfg.name
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs"


# ---------------------------------------------------------------------------------------------- run directory


def test_fit_writes_metrics_checkpoints_and_summary(tmp_path, tiny_cfg):
    cfg = tiny_cfg(tmp_path, **{"optim.lr": 0.01})
    run_dir = run_dir_of(cfg)
    result = fit(ClassificationTask(cfg), cfg, run_dir)
    steps_per_epoch = 461 // 64  # 512 images, 10% held out for validation
    assert (result.status, result.step) == ("finished", 2 * steps_per_epoch)
    lines = jsonl(run_dir / "metrics.jsonl")
    train_lines = [line for line in lines if "train/loss" in line]
    val_lines = [line for line in lines if "val/acc1" in line]
    assert [line["step"] for line in train_lines] == [5, 10, 14]  # log_every_steps=5, and the last step
    assert [line["step"] for line in val_lines] == [7, 14]  # once per epoch
    assert all(math.isfinite(line["train/loss"]) for line in train_lines)
    assert {"train/acc1", "train/lr", "train/samples_per_s"} <= set(train_lines[0])
    # The gradient norm is logged although nothing clips (optim.max_grad_norm 0): every task's curve has it.
    assert cfg.optim.max_grad_norm == 0
    assert all(math.isfinite(line["train/grad_norm"]) and line["train/grad_norm"] > 0 for line in train_lines)
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["step"] == summary["total_steps"] == 14
    last = checkpoint.load(run_dir / "checkpoints" / "last.pt")
    best = checkpoint.load(run_dir / "checkpoints" / "best.pt")
    assert last["step"] == 14
    assert best["step"] == summary["best"]["step"] == result.best["step"]
    assert best["best_metrics"]["val/acc1"] == max(line["val/acc1"] for line in val_lines)


def test_evaluate_run_writes_the_test_report(tmp_path, tiny_cfg):
    cfg = tiny_cfg(tmp_path, **{"optim.lr": 0.01})
    run_dir = run_dir_of(cfg)
    fit(ClassificationTask(cfg), cfg, run_dir)
    metrics = evaluate_run(ClassificationTask(cfg), cfg, run_dir)
    assert {"test/acc1", "test/acc5", "test/loss", "test/seconds"} <= set(metrics)
    saved = json.loads((run_dir / "evaluation" / "test.json").read_text())
    assert saved == pytest.approx(metrics)
    assert (run_dir / "evaluation" / "confusion_matrix.png").is_file()
    assert (run_dir / "evaluation" / "worst_errors.png").is_file()


# ---------------------------------------------------------------------------------------------- exact resume


class SelfInterruptingTask(ClassificationTask):
    """Sends its own process SIGTERM during training step `interrupt_at` (0: never): the loop's real signal path,
    at an exact step, so the interruption is reproducible. `calls` counts the training steps it ran."""

    interrupt_at = 0

    def step(self, model, batch):
        self.calls = getattr(self, "calls", 0) + 1
        if self.calls == self.interrupt_at:
            os.kill(os.getpid(), signal.SIGTERM)
        return super().step(model, batch)


def test_interrupted_and_resumed_run_matches_the_uninterrupted_one_bit_for_bit(tmp_path, tiny_cfg, capsys):
    overrides = {"train.deterministic": True, "train.epochs": 3, "optim.lr": 0.01, "train.ema.enabled": True,
                 "train.ema.warmup_steps": 5, "data.augment.crop_padding": 2, "data.augment.hflip": True,
                 "data.augment.erasing_p": 0.5}
    full_cfg = tiny_cfg(tmp_path / "full", **overrides)
    full = fit(ClassificationTask(full_cfg), full_cfg, run_dir_of(full_cfg))

    cfg = tiny_cfg(tmp_path / "split", **overrides)
    run_dir = run_dir_of(cfg)
    task = SelfInterruptingTask(cfg)
    task.interrupt_at = 10  # epoch 2, batch 3 of 7: mid-epoch
    stopped = fit(task, cfg, run_dir)
    assert (stopped.status, stopped.step) == ("interrupted", 10)
    assert checkpoint.load(run_dir / "checkpoints" / "last.pt")["step"] == 10
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "interrupted"

    capsys.readouterr()
    resuming = SelfInterruptingTask(cfg)
    resumed = fit(resuming, cfg, run_dir, resume=True)
    assert (resumed.status, resumed.step) == ("finished", full.step) == ("finished", 21)
    # It started at the saved step: a resume that ignored the checkpoint and trained from step 0 would end with
    # the same bits (the run is deterministic), but would have run all 21 steps and logged the first ten again.
    assert resuming.calls == 21 - 10
    train_steps = [line["step"] for line in jsonl(run_dir / "metrics.jsonl") if "train/loss" in line]
    assert train_steps == sorted(set(train_steps)) and train_steps[0] == 5
    assert "resumed at step 10 (epoch 1.43)" in capsys.readouterr().out
    expected = checkpoint.load(run_dir_of(full_cfg) / "checkpoints" / "last.pt")
    got = checkpoint.load(run_dir / "checkpoints" / "last.pt")
    assert_same_tensors(got["model"], expected["model"])
    assert_same_tensors(got["ema"]["module"], expected["ema"]["module"])
    assert got["early_stop"] == expected["early_stop"]
    assert resumed.best == full.best


def test_resume_with_a_different_length_is_refused(tmp_path, tiny_cfg):
    cfg = tiny_cfg(tmp_path, **{"train.epochs": 1})
    run_dir = run_dir_of(cfg)
    fit(ClassificationTask(cfg), cfg, run_dir)
    longer = tiny_cfg(tmp_path, **{"train.epochs": 2})
    with pytest.raises(CheckpointError, match=r"last\.pt: saved for 7 total steps but the configuration now gives "
                                              r"14; resume with the run's own config"):
        fit(ClassificationTask(longer), longer, run_dir, resume=True)


def test_resume_without_a_checkpoint_is_refused(tmp_path, tiny_cfg):
    cfg = tiny_cfg(tmp_path)
    with pytest.raises(CheckpointError, match=r"last\.pt: checkpoint not found"):
        fit(ClassificationTask(cfg), cfg, run_dir_of(cfg), resume=True)


# ---------------------------------------------------------------------------------------------- early stopping


def test_early_stopping_stops_after_patience_evaluations_without_improvement(tmp_path, tiny_cfg):
    cfg = tiny_cfg(tmp_path, **{"train.early_stop.patience": 1, "train.early_stop.min_delta": 10.0,
                                "train.eval_every_steps": 2})
    run_dir = run_dir_of(cfg)
    result = fit(ClassificationTask(cfg), cfg, run_dir)
    # The first evaluation always improves on nothing; the second cannot improve by 10: stop at step 4 of 14.
    assert (result.status, result.step) == ("early_stopped", 4)
    assert [line["step"] for line in jsonl(run_dir / "metrics.jsonl") if "val/acc1" in line] == [2, 4]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["status"], summary["step"], summary["best"]["step"]) == ("early_stopped", 4, 2)
    assert checkpoint.load(run_dir / "checkpoints" / "best.pt")["step"] == 2
    assert checkpoint.load(run_dir / "checkpoints" / "last.pt")["step"] == 4


def test_without_patience_the_run_is_not_stopped(tmp_path, tiny_cfg):
    cfg = tiny_cfg(tmp_path, **{"train.early_stop.min_delta": 10.0, "train.eval_every_steps": 2})
    assert fit(ClassificationTask(cfg), cfg, run_dir_of(cfg)).status == "finished"


# ---------------------------------------------------------------------------------------------- NaN guard


def test_nan_loss_raises_and_keeps_the_last_good_checkpoint(tmp_path):
    cfg = linear_cfg(tmp_path, data={"fault": "nan_loss", "fault_at_step": 4},
                     train={"checkpoint_every_steps": 2})
    run_dir = run_dir_of(cfg)
    with pytest.raises(TrainingDiverged, match=r"training loss became nan between steps 2 and 4; stopped\. The last "
                                               r"good checkpoint is kept in .*checkpoints\. Lower optim\.lr"):
        fit(LinearTask(cfg), cfg, run_dir)
    last = checkpoint.load(run_dir / "checkpoints" / "last.pt")
    assert last["step"] == 2
    assert all(torch.isfinite(t).all() for t in last["model"].values())


def test_nan_gradients_never_reach_a_checkpoint(tmp_path):
    cfg = linear_cfg(tmp_path, data={"fault": "nan_grad", "fault_at_step": 4},
                     train={"checkpoint_every_steps": 2})
    run_dir = run_dir_of(cfg)
    with pytest.raises(TrainingDiverged):
        fit(LinearTask(cfg), cfg, run_dir)
    last = checkpoint.load(run_dir / "checkpoints" / "last.pt")
    assert all(torch.isfinite(t).all() for t in last["model"].values()), f"step {last['step']} holds NaN weights"


# ---------------------------------------------------------------------------------------------- accumulation


def test_gradient_accumulation_matches_the_full_batch(tmp_path):
    whole = linear_cfg(tmp_path / "a", optim={"name": "sgd", "lr": 0.05, "nesterov": False})
    split = linear_cfg(tmp_path / "b", optim={"name": "sgd", "lr": 0.05, "nesterov": False, "accumulate_steps": 4})
    fit(LinearTask(whole), whole, run_dir_of(whole))
    fit(LinearTask(split), split, run_dir_of(split))
    a = checkpoint.load(run_dir_of(whole) / "checkpoints" / "last.pt")["model"]
    b = checkpoint.load(run_dir_of(split) / "checkpoints" / "last.pt")["model"]
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-5, rtol=1e-5)
    torch.manual_seed(whole.train.seed)  # fit() seeds before building the model
    initial = LinearTask(whole).build_model().state_dict()
    assert not torch.allclose(a["weight"], initial["weight"])  # it trained


def test_a_batch_larger_than_the_training_split_is_fitted_to_it_and_says_so():
    from modelworks.engine.loop import batch_size_for
    from modelworks.errors import ConfigError

    assert batch_size_for(128, 5000, 1) == (128, None)
    size, note = batch_size_for(128, 22, 1)
    assert size == 16 and "more than the 22 training samples: training with batches of 16" in note
    assert batch_size_for(128, 22, 4)[0] == 16 and batch_size_for(96, 50, 3)[0] == 30  # a multiple of the unit
    with pytest.raises(ConfigError, match="has 3 samples, fewer than one batch of 4"):
        batch_size_for(128, 3, 4)
