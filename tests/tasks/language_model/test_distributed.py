"""The language model under torchrun with 2 gloo processes, as DDP and as FSDP2 (fully_shard): each trains exactly
like one process on the same global batch, and its checkpoint holds the whole, unsharded model."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

from helpers import TORCHRUN, cli_env
from modelworks.config import load_config
from modelworks.engine import checkpoint
from modelworks.engine.loop import fit
from modelworks.tasks.language_model.task import LanguageModelTask

pytestmark = pytest.mark.ddp
WORKER = Path(__file__).with_name("lm_distributed_worker.py")


def raw_config(tmp_path: Path, strategy: str) -> dict:
    raw = LanguageModelTask.tiny(tmp_path / "data")
    raw.update(task="language_model", output_dir=str(tmp_path / "runs"), name=strategy)
    raw["optim"] = {"name": "adamw", "lr": 3e-3, "schedule": "cosine", "warmup_fraction": 0.0,
                    "max_grad_norm": 0.5}  # clipped: the global norm is reduced over the ranks' shards
    raw["train"].update(device="cpu", precision="fp32", deterministic=True, steps=6, batch_size=16,
                        eval_every_steps=3, log_every_steps=3, test_at_end=False,
                        distributed={"strategy": strategy})
    return raw


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The reference: one process, the same global batch of 16."""
    tmp_path = tmp_path_factory.mktemp("single")
    cfg = load_config(LanguageModelTask, raw_config(tmp_path, "ddp"))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    fit(LanguageModelTask(cfg), cfg, run_dir)
    return run_dir


def torchrun(config: Path, run_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    env = cli_env()
    env["OMP_NUM_THREADS"] = "1"  # two ranks share the cores
    result = subprocess.run([TORCHRUN, "--standalone", "--nproc-per-node", "2", str(WORKER), str(config),
                             str(run_dir), *extra], capture_output=True, text=True, timeout=240, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-12000:]
    return result


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_two_ranks_train_the_language_model_like_one_process(tmp_path, single, strategy):
    config = tmp_path / "config.json"
    config.write_text(json.dumps(raw_config(tmp_path, strategy)))
    result = torchrun(config, tmp_path / "run")
    assert "rank 0 of 2: finished at step 6" in result.stdout and "rank 1 of 2: finished at step 6" in result.stdout
    assert "device cpu x2" in result.stdout

    ours = checkpoint.load(tmp_path / "run" / "checkpoints" / "last.pt")
    reference = checkpoint.load(single / "checkpoints" / "last.pt")
    assert ours["step"] == reference["step"] == 6
    assert ours["model"].keys() == reference["model"].keys()  # whole tensors under the model's own names
    for key, value in reference["model"].items():
        assert not isinstance(ours["model"][key], torch.distributed.tensor.DTensor)
        torch.testing.assert_close(ours["model"][key], value, atol=2e-5, rtol=0)
    initial = LanguageModelTask(load_config(LanguageModelTask, raw_config(tmp_path, strategy)))
    torch.manual_seed(0)
    start = initial.build_model().state_dict()
    assert (reference["model"]["embed.weight"] - start["embed.weight"]).abs().max() > 1e-3  # it trained

    # Evaluated twice (steps 3 and 6) over both ranks' shards of the validation split, and equal to one process
    def val_losses(run_dir):
        lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        return [(line["step"], line["val/loss"]) for line in lines if "val/loss" in line]

    (ours_3, ours_6), (ref_3, ref_6) = val_losses(tmp_path / "run"), val_losses(single)
    assert [ours_3[0], ours_6[0]] == [3, 6]
    assert ours_6[1] == pytest.approx(ref_6[1], rel=1e-5) and ours_3[1] == pytest.approx(ref_3[1], rel=1e-5)
    assert ours_6[1] < ref_3[1]  # and it learned between the two


def test_a_sharded_run_interrupted_and_resumed_matches_the_uninterrupted_one(tmp_path, single):
    """Under fsdp2 the checkpoint holds whole tensors and name-keyed optimizer state; resuming loads them back into
    the shards (distributed.load_full_state), and the run ends where one process without a break ends."""
    config = tmp_path / "config.json"
    config.write_text(json.dumps(raw_config(tmp_path, "fsdp2")))
    result = torchrun(config, tmp_path / "run", "--interrupt-at", "4")
    assert "rank 0 of 2: interrupted at step 4" in result.stdout
    assert checkpoint.load(tmp_path / "run" / "checkpoints" / "last.pt")["step"] == 4
    result = torchrun(config, tmp_path / "run", "--resume")
    assert "rank 0 of 2: finished at step 6" in result.stdout
    resumed = checkpoint.load(tmp_path / "run" / "checkpoints" / "last.pt")
    reference = checkpoint.load(single / "checkpoints" / "last.pt")
    for key, value in reference["model"].items():
        torch.testing.assert_close(resumed["model"][key], value, atol=2e-5, rtol=0)
