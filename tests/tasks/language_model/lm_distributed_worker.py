"""One rank of the language model's data-parallel tests:
`torchrun --nproc-per-node 2 lm_distributed_worker.py CONFIG_JSON RUN_DIR [--interrupt-at N | --resume]`
(the config names its strategy). --interrupt-at sends this process SIGINT during training step N, as Ctrl-C
would; --resume continues the run from its checkpoints/last.pt."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

from torch.distributed.elastic.multiprocessing.errors import record

from modelworks.config import load_config
from modelworks.engine import distributed
from modelworks.engine.loop import fit
from modelworks.tasks.language_model.task import LanguageModelTask


class InterruptedTask(LanguageModelTask):
    interrupt_at = 0

    def __init__(self, cfg):
        super().__init__(cfg)
        self.steps_taken = 0

    def step(self, model, batch):
        self.steps_taken += 1
        if self.steps_taken == self.interrupt_at:
            os.kill(os.getpid(), signal.SIGINT)
        return super().step(model, batch)


@record  # a rank that fails puts its traceback in torchrun's summary, which the test shows
def main() -> None:
    raw, run_dir, extra = json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2]), sys.argv[3:]
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg = load_config(LanguageModelTask, raw)
    task = LanguageModelTask(cfg)
    if extra[:1] == ["--interrupt-at"]:
        InterruptedTask.interrupt_at = int(extra[1])
        task = InterruptedTask(cfg)
    result = fit(task, cfg, run_dir, resume=extra == ["--resume"])
    print(f"rank {distributed.rank()} of {distributed.world_size()}: {result.status} at step {result.step}", flush=True)
    distributed.shutdown()


if __name__ == "__main__":
    main()
