"""One rank of the data-parallel parity test: `torchrun --nproc-per-node 2 ddp_worker.py OUTPUT_DIR`.

torchrun's environment (RANK, WORLD_SIZE, ...) is all fit() needs; the run lands in OUTPUT_DIR/linear.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from linear_task import LinearTask, linear_cfg
from modelworks.engine import distributed
from modelworks.engine.loop import fit

if __name__ == "__main__":
    output_dir = Path(sys.argv[1])
    cfg = linear_cfg(output_dir)
    run_dir = output_dir / "linear"
    run_dir.mkdir(parents=True, exist_ok=True)
    task = LinearTask(cfg)
    result = fit(task, cfg, run_dir)
    # The training targets this rank saw, in order: the test checks that the ranks' shards differ.
    torch.save(torch.cat(task.seen_targets), output_dir / f"seen-rank{distributed.rank()}.pt")
    print(f"rank {distributed.rank()} of {distributed.world_size()}: {result.status} at step {result.step}",
          flush=True)
    distributed.shutdown()
