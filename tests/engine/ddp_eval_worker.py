"""Run under torchrun (and once without it) by the tests that check a task's metrics under DDP: train the task's
tiny model a few steps the same way in every process, then evaluate the validation split through the engine,
each rank on its shard. `python ddp_eval_worker.py CONFIG_JSON OUT_JSON STEPS` (the config names the task)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from modelworks.config import load_config
from modelworks.engine import distributed
from modelworks.engine.batches import fetch
from modelworks.engine.loop import evaluate_split
from modelworks.engine.precision import choose_precision
from modelworks.registry import get_task

CPU = torch.device("cpu")


def main(raw_config: Path, out: Path, steps: int) -> None:
    distributed_run = int(os.environ.get("WORLD_SIZE", "1")) > 1
    distributed.init("cpu")
    raw = json.loads(raw_config.read_text())
    task_class = get_task(raw["task"])
    cfg = load_config(task_class, raw)
    task = task_class(cfg)
    splits = task.datasets(CPU)
    torch.manual_seed(0)
    model = task.build_model().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    (raw_batch,) = fetch(splits.train, iter([torch.arange(32)]), CPU, 0, splits.collate_fn)
    batch = task.prepare_batch(raw_batch, None)
    for _ in range(steps):  # no DDP: every process takes identical steps, so the models are identical
        task.step(model, batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    with torch.no_grad():  # BatchNorm statistics lag a few quick steps: recompute them on the batch, exactly
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.reset_running_stats()
                module.momentum = None
        task.step(model, batch)
    metrics = evaluate_split(task, model, splits.val, splits.collate_fn, cfg, CPU, choose_precision("fp32", CPU), "val")
    if distributed.is_main():
        out.write_text(json.dumps({**metrics, "world": distributed.world_size()}))
    distributed.shutdown()
    if distributed_run:
        # Known, not yet understood: after a captioning evaluation under gloo (all_gather_object of the captions),
        # about 1 run in 5 aborts in the interpreter's teardown ("terminate called without an active exception",
        # SIGABRT), after the metrics above were computed and written. Leave without the teardown so this test
        # checks the metrics; the abort itself is recorded as an open bug in the session notes.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]))
