"""What `--set train.debug.activations=true` costs: the same short training with activation statistics off, on
at the default sampling (one step in 100) and on at every step (the worst case), side by side in one run.

    flock LOCKFILE python bench/debug_overhead.py            # classification and detection, ~7 minutes on 2 cores
    python bench/debug_overhead.py --tasks classification --rounds 1

Each task trains its shipped recipe for a few hundred images' worth of steps (`fit` in this process, one
validation at the end, where the activation histograms are drawn), in the order off, on, every, every, on, off
per round, so the machine's drift falls on every setting alike. Reported: the wall clock of `fit` (data loading,
training and the validation together) and the training throughput the run logged (images/s between log
points, median), each as a ratio to "off". Writes bench/results/debug_overhead.json. Run it alone: the figures
are wall-clock.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from modelworks import config as config_mod
from modelworks.engine import rundir
from modelworks.engine.loop import fit
from modelworks.registry import get_task
from machine import cpu_name  # bench/machine.py: bench/ is on sys.path when a script runs

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = {  # name -> overrides
    "off": [],
    "on (every 100 steps)": ["train.debug.activations=true", "train.debug.every_steps=100"],
    "on (every step)": ["train.debug.activations=true", "train.debug.every_steps=1"],
}
RUNS = {  # task -> (recipe, overrides that make it short: training steps, one validation at the end)
    "classification": ("fashion-mnist", ["train.epochs=2", "train.eval_every_steps=0", "train.log_every_steps=20"]),
    "detection": ("fmnist-scenes", ["train.epochs=0.5", "train.eval_every_steps=0", "train.log_every_steps=10",
                                    "train.ema.enabled=false"]),
}


def train_once(task_name: str, setting: str, folder: Path) -> dict:
    recipe, short = RUNS[task_name]
    task_cls = get_task(task_name)
    cfg = config_mod.resolve(task_cls, recipe, [*short, *SETTINGS[setting], f"output_dir={folder}",
                                                "train.test_at_end=false"])
    cfg.name = f"{setting.split()[0]}-{time.time_ns()}"
    run_dir = rundir.new_run_dir(cfg)
    rundir.write_run_files(run_dir, cfg, ["bench/debug_overhead.py"])
    deterministic = torch.are_deterministic_algorithms_enabled()
    tic = time.perf_counter()
    result = fit(task_cls(cfg), cfg, run_dir)
    seconds = time.perf_counter() - tic
    torch.use_deterministic_algorithms(deterministic)
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    throughput = [line["train/samples_per_s"] for line in lines if "train/samples_per_s" in line]
    return {"seconds": seconds, "steps": result.step, "images_per_s": statistics.median(throughput)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=list(RUNS), choices=list(RUNS))
    parser.add_argument("--rounds", type=int, default=1, help="each round runs every setting twice")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "debug_overhead.json"))
    args = parser.parse_args()

    order = list(SETTINGS) + list(reversed(SETTINGS))
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for task_name in args.tasks:
            train_once(task_name, "off", Path(folder))  # warm-up: data decoding and caches, oneDNN primitives
            runs = {setting: [] for setting in SETTINGS}
            for _ in range(args.rounds):
                for setting in order:
                    runs[setting].append(train_once(task_name, setting, Path(folder)))
                    print(f"{task_name} {setting}: {runs[setting][-1]}", flush=True)
            base = runs["off"]
            base_s = statistics.median(r["seconds"] for r in base)
            base_ips = statistics.median(r["images_per_s"] for r in base)
            for setting, results in runs.items():
                seconds = statistics.median(r["seconds"] for r in results)
                images_per_s = statistics.median(r["images_per_s"] for r in results)
                rows.append({"task": task_name, "recipe": RUNS[task_name][0], "setting": setting,
                             "steps": results[0]["steps"], "runs": len(results), "fit_s": round(seconds, 2),
                             "fit_ratio": round(seconds / base_s, 3), "images_per_s": round(images_per_s, 1),
                             "throughput_ratio": round(images_per_s / base_ips, 3),
                             "each_fit_s": [round(r["seconds"], 2) for r in results]})

    print(f"\nactivation statistics overhead ({cpu_name()}, torch {torch.__version__}, "
          f"{datetime.date.today().isoformat()})")
    print(f"{'task':<15} {'setting':<22} {'steps':>5} {'fit s':>7} {'ratio':>6} {'images/s':>9} {'ratio':>6}")
    for r in rows:
        print(f"{r['task']:<15} {r['setting']:<22} {r['steps']:>5} {r['fit_s']:>7.2f} {r['fit_ratio']:>6.3f} "
              f"{r['images_per_s']:>9.1f} {r['throughput_ratio']:>6.3f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"cpu": cpu_name(), "torch": torch.__version__,
                               "date": datetime.date.today().isoformat(), "rows": rows}, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
