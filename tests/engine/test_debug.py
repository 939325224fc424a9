"""`modelworks debug` on small real models with a known fault: the checks must find each fault and stay quiet on
the healthy model. Also activation statistics and hyperparameters, read back from TensorBoard's event files.

The contract tests run the same commands on every registered task; these pin what the commands conclude.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest
import torch
from torch import nn

from linear_task import LinearDataConfig, LinearTask
from modelworks.config import load_config
from modelworks.engine import debug


@dataclass
class BranchModelConfig:
    kind: Literal["healthy", "detached", "frozen", "dead", "sigmoid_stack"] = "healthy"
    features: int = 8


class TwoBranches(nn.Module):
    """A trunk feeding two branches whose outputs are summed; `kind` breaks branch_b the way real bugs do."""

    def __init__(self, kind: str, features: int):
        super().__init__()
        self.kind = kind
        self.trunk = nn.Linear(features, 16)
        self.branch_a = nn.Sequential(nn.ReLU(), nn.Linear(16, 1))
        self.branch_b = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 1))
        if kind == "frozen":
            self.branch_b.requires_grad_(False)
        if kind == "dead":  # every unit of the ReLU below it is negative: dead, so its inputs get no gradient
            nn.init.constant_(self.branch_b[0].bias, -1e3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.trunk(x)
        b = self.branch_b(h)
        if self.kind == "detached":  # the classic bug: a branch cut from the graph trains nothing
            b = b.detach()
        return self.branch_a(h) + b


def sigmoid_stack(features: int, depth: int = 16) -> nn.Module:
    """Each sigmoid scales the gradient by at most 1/4: after 16 the first layers hardly learn (Hochreiter 1991)."""
    layers = []
    for _ in range(depth):
        layers += [nn.Linear(features, features), nn.Sigmoid()]
    return nn.Sequential(*layers, nn.Linear(features, 1))


class BranchTask(LinearTask):
    name = "branches"
    ModelConfig = BranchModelConfig
    DataConfig = LinearDataConfig

    def build_model(self) -> nn.Module:
        m = self.cfg.model
        return sigmoid_stack(m.features) if m.kind == "sigmoid_stack" else TwoBranches(m.kind, m.features)


def branch_task(tmp_path: Path, kind: str = "healthy", **train) -> BranchTask:
    raw = {"task": "branches", "name": "branches", "output_dir": str(tmp_path), "model": {"kind": kind},
           "optim": {"name": "adamw", "lr": 0.01, "schedule": "constant", "warmup_fraction": 0.0},
           "train": {"epochs": 1, "batch_size": 32, "device": "cpu", "precision": "fp32", **train}}
    return BranchTask(load_config(BranchTask, raw))


def flags_of(report: debug.GradientReport) -> dict[str, list[str]]:
    return {p.name: p.flags for p in report.parameters if p.flags}


def test_gradients_flag_nothing_on_a_healthy_model(tmp_path):
    task = branch_task(tmp_path)
    report = debug.gradient_flow(task, task.cfg, steps=5)
    assert [p.name for p in report.parameters] == [name for name, _ in task.build_model().named_parameters()]
    assert all(len(p.grad_norms) == 5 and all(g > 0 for g in p.grad_norms) for p in report.parameters)
    assert flags_of(report) == {}


def test_gradients_flag_a_detached_branch(tmp_path):
    task = branch_task(tmp_path, "detached")
    flags = flags_of(debug.gradient_flow(task, task.cfg, steps=5))
    assert sorted(flags) == ["branch_b.0.bias", "branch_b.0.weight", "branch_b.2.bias", "branch_b.2.weight"]
    assert all(f == ["no gradient: the loss does not reach it (a detached, unused or disconnected branch)"]
               for f in flags.values())


def test_gradients_flag_a_frozen_branch(tmp_path):
    task = branch_task(tmp_path, "frozen")
    flags = flags_of(debug.gradient_flow(task, task.cfg, steps=3))
    assert sorted(flags) == ["branch_b.0.bias", "branch_b.0.weight", "branch_b.2.bias", "branch_b.2.weight"]
    assert all(f[0].startswith("frozen") for f in flags.values())


def test_gradients_flag_the_inputs_of_dead_relus(tmp_path):
    task = branch_task(tmp_path, "dead")
    flags = flags_of(debug.gradient_flow(task, task.cfg, steps=3))
    # The last layer's bias still learns: only what feeds or reads the dead units is stuck.
    assert sorted(flags) == ["branch_b.0.bias", "branch_b.0.weight", "branch_b.2.weight"]
    assert all(f[0].startswith("zero gradient on every step") for f in flags.values())


def test_gradients_flag_vanishing_layers_of_a_sigmoid_stack(tmp_path):
    task = branch_task(tmp_path, "sigmoid_stack")
    report = debug.gradient_flow(task, task.cfg, steps=3)
    flags = flags_of(report)
    assert "0.weight" in flags and flags["0.weight"][0].startswith("vanishing")
    assert "32.weight" not in flags  # the output layer learns
    assert not any(f[0].startswith("exploding") for f in flags.values())


def test_gradient_flags_name_non_finite_and_exploding_gradients():
    params = [debug.ParameterFlow(f"p{i}", (4,), [1.0, 0.9, 0.8, 0.9], [1.0] * 4) for i in range(5)]
    params.append(debug.ParameterFlow("nan", (4,), [1.0, float("nan"), 1.0, 1.0], [1.0] * 4))
    params.append(debug.ParameterFlow("growing", (4,), [1.0, 1.0, 30.0, 500.0], [1.0] * 4))
    params.append(debug.ParameterFlow("tiny", (4,), [1e-4, 1e-4, 1e-4, 1e-4], [1.0] * 4))
    debug.flag_parameters(params)
    flags = {p.name: p.flags for p in params if p.flags}
    assert flags == {"nan": ["non-finite gradient from step 1"],
                     "growing": ["exploding: gradient norm grew 5.0e+02x from the first to the last quarter of "
                                 "the steps"],
                     "tiny": ["vanishing: gradient 9.0e+03x smaller than the median parameter's"]}


def test_gradient_table_and_picture(tmp_path):
    from modelworks.engine.debug_plots import plot_gradient_flow

    task = branch_task(tmp_path, "detached")
    report = debug.gradient_flow(task, task.cfg, steps=3)
    table = debug.gradient_table(report).splitlines()
    assert table[0].split()[:2] == ["parameter", "shape"]
    assert len(table) == 1 + len(report.parameters)
    assert table[-1].startswith("branch_b.2.bias") and table[-1].endswith("disconnected branch)")
    plot_gradient_flow(report, tmp_path / "gradients.png", "branches")
    assert (tmp_path / "gradients.png").stat().st_size > 10_000


def test_overfit_passes_when_the_model_can_learn_and_fails_when_it_cannot(tmp_path):
    task = branch_task(tmp_path)
    result = debug.overfit_batch(task, task.cfg, steps=150)
    assert result.passed, result.verdict()
    assert result.losses[-1] < 0.05 * result.losses[0]
    task.cfg.optim.lr = 0.0  # the config refuses 0; set after validation, as a model that cannot learn
    stuck = debug.overfit_batch(task, task.cfg, steps=20)
    assert not stuck.passed
    assert stuck.losses == [stuck.losses[0]] * 20
    assert stuck.verdict().startswith("FAIL: the loss went from") and "optim.lr=0" in stuck.verdict()


def test_overfit_fails_when_the_loss_diverges(tmp_path):
    task = branch_task(tmp_path)
    task.cfg.data.fault, task.cfg.data.fault_at_step = "nan_loss", 3
    result = debug.overfit_batch(task, task.cfg, steps=5)
    assert not result.passed and "nan" in result.verdict()


def test_overfit_refuses_bad_options(tmp_path):
    from modelworks.errors import ConfigError

    task = branch_task(tmp_path)
    with pytest.raises(ConfigError, match=r"--batch-size: must be between 1 and the training split's 256 samples"):
        debug.overfit_batch(task, task.cfg, batch_size=1000)
    with pytest.raises(ConfigError, match=r"--target: must be a fraction of the first loss in \(0, 1\)"):
        debug.overfit_batch(task, task.cfg, target=1.5)
    with pytest.raises(ConfigError, match=r"--steps: must be >= 1 \(got 0\)"):
        debug.gradient_flow(task, task.cfg, steps=0)


def test_augment_says_when_a_task_has_nothing_to_draw(tmp_path):
    task = branch_task(tmp_path)
    assert debug.augmented_views(task, task.cfg) is None


# ---------------------------------------------------------------------------------------------- TensorBoard


def event_data(run_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "histograms": 0})
    events.Reload()
    return events


def read_hparams(events) -> tuple[dict, list[str]]:
    """The hyperparameters and metric tags the HPARAMS plugin finds in a run's event files."""
    from tensorboard.plugins.hparams import plugin_data_pb2

    content = events.PluginTagToContent("hparams")
    session = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"])
    values = {}
    for key, value in session.session_start_info.hparams.items():
        kind = value.WhichOneof("kind")
        values[key] = getattr(value, kind)
    return values, [m.name.tag for m in experiment.experiment.metric_infos]


def fit_classification(tmp_path: Path, tiny_cfg, **overrides) -> Path:
    from modelworks.engine import rundir
    from modelworks.engine.loop import fit
    from modelworks.tasks.classification.task import ClassificationTask

    cfg = tiny_cfg(tmp_path, train__epochs=1, train__test_at_end=False, train__precision="fp32", **overrides)
    run_dir = rundir.new_run_dir(cfg)
    fit(ClassificationTask(cfg), cfg, run_dir)
    return run_dir


def test_activation_statistics_reach_tensorboard_on_sampled_steps(tmp_path, tiny_cfg):
    run_dir = fit_classification(tmp_path, tiny_cfg, train__debug__activations=True, train__debug__every_steps=3)
    events = event_data(run_dir)
    tags = events.Tags()["scalars"]
    layers = sorted(tag.split("/", 1)[1] for tag in tags if tag.startswith("activation_zeros/"))
    assert "features.2" in layers and "fc" in layers  # fastnet's first ReLU and its classifier
    assert [e.step for e in events.Scalars("activation_mean/fc")] == [3, 6]  # 7 steps, one in 3 sampled
    relu_zeros = [e.value for e in events.Scalars("activation_zeros/features.2")]
    assert all(0 < z < 1 for z in relu_zeros)  # a live ReLU: some units off, not all
    assert all(e.value == 0 for e in events.Scalars("activation_zeros/features.0"))  # a conv's output is not 0
    assert all(e.value > 0 for e in events.Scalars("activation_std/fc"))
    histograms = events.Tags()["histograms"]
    assert "activations/features.2" in histograms
    assert [e.step for e in events.Histograms("activations/fc")] == [7]  # the one evaluation, at the end


def test_dead_relus_show_as_all_zeros(tmp_path):
    from modelworks.engine import rundir
    from modelworks.engine.loop import fit

    task = branch_task(tmp_path, "dead", **{"debug": {"activations": True, "every_steps": 1}, "log_every_steps": 1})
    run_dir = rundir.new_run_dir(task.cfg)
    fit(task, task.cfg, run_dir)
    events = event_data(run_dir)
    assert {e.value for e in events.Scalars("activation_zeros/branch_b.1")} == {1.0}
    assert max(e.value for e in events.Scalars("activation_zeros/branch_a.0")) < 1.0


def test_activation_statistics_are_off_by_default_and_hparams_are_always_written(tmp_path, tiny_cfg):
    run_dir = fit_classification(tmp_path, tiny_cfg, optim__lr=0.003)
    events = event_data(run_dir)
    assert not [tag for tag in events.Tags()["scalars"] if tag.startswith("activation")]
    assert events.Tags()["histograms"] == []
    hparams, metrics = read_hparams(events)
    assert hparams["optim.lr"] == pytest.approx(0.003)
    assert hparams["model.widths"] == "[8, 16, 16, 32]" and hparams["train.debug.activations"] == "false"
    assert "best/val/acc1" in metrics and "val/acc1" in metrics
    # The metric the view shows is the run's scalar of that tag: the best validation accuracy is there.
    best = events.Scalars("best/val/acc1")
    assert len(best) == 1 and best[0].value == pytest.approx(max(e.value for e in events.Scalars("val/acc1")))
