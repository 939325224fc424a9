"""One rank of the language model's data-parallel tests:
`torchrun --nproc-per-node 2 lm_distributed_worker.py CONFIG_JSON RUN_DIR` (the config names its strategy)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from modelworks.config import load_config
from modelworks.engine import distributed
from modelworks.engine.loop import fit
from modelworks.tasks.language_model.task import LanguageModelTask

if __name__ == "__main__":
    raw, run_dir = json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2])
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg = load_config(LanguageModelTask, raw)
    result = fit(LanguageModelTask(cfg), cfg, run_dir)
    print(f"rank {distributed.rank()} of {distributed.world_size()}: {result.status} at step {result.step}", flush=True)
    distributed.shutdown()
