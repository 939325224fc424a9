"""Recommendation on MovieLens-100K: most-popular, EASE and SASRec (ours), and `implicit`'s ALS and BPR, side by side
under one protocol (leave-last-out by time, full ranking over all items, seen items masked).

    python bench/recommendation.py --data ../shared/data/movielens/ml-100k [--seeds 0 1 2] [--skip-implicit]

Ours run through the engine exactly as `modelworks train recommendation --recipe ease|sasrec` does (in process);
ALS/BPR run in a separate virtual environment (--implicit-python, default /root/.cache/modelworks-bench-venv), as
`implicit` is no dependency of modelworks. Writes bench/results/recommendation.json. Run alone (the times are
wall clock): `flock LOCKFILE python bench/recommendation.py ...`.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from modelworks import config as config_mod
from modelworks.engine.loop import evaluate_run, fit
from modelworks.tasks.recommendation.task import RecommendationTask

ROOT = Path(__file__).resolve().parent.parent
ISSUE_TABLE = {"most-popular": 0.025, "als": 0.040, "bpr": 0.045, "ease": 0.041, "sasrec": 0.062}  # NDCG@10


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def run_ours(recipe: str, data: str, seed: int, out: Path, overrides: list[str]) -> dict:
    cfg = config_mod.resolve(RecommendationTask, recipe, [f"train.seed={seed}", "train.device=cpu", *overrides],
                             f"movielens:{data}")
    run_dir = out / f"{recipe}-{seed}"
    task = RecommendationTask(cfg)
    tic = time.perf_counter()
    fit(task, cfg, run_dir)
    fit_s = time.perf_counter() - tic
    metrics = evaluate_run(task, cfg, run_dir, "test")
    return {"fit_s": fit_s, **{k.split("/", 1)[1]: v for k, v in metrics.items() if k.startswith("test/")}}


def run_implicit(python: str, data: str) -> dict:
    task = RecommendationTask(config_mod.resolve(RecommendationTask, "ease", [], f"movielens:{data}"))
    task.load_split()
    split = task.split
    users = [u for u, t in enumerate(split.test) if t]
    record = {"n_items": split.n_items, "train": [[i - 1 for i in s] for s in split.train],
              # test history = train + validation item (as ours): ALS/BPR are fitted on train + validation too
              "test_users": users, "test_target": [split.test[u] - 1 for u in users],
              "test_seen": [[i - 1 for i in split.train[u] + [split.val[u]]] for u in users]}
    record["train"] = [s + ([split.val[u] - 1] if split.val[u] else []) for u, s in enumerate(record["train"])]
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(record, f)
    result = subprocess.run([python, str(ROOT / "bench" / "recommendation_implicit.py"), f.name],
                            capture_output=True, text=True)
    if result.returncode:
        return {"error": result.stderr.strip().splitlines()[-1] if result.stderr else "failed"}
    return json.loads(result.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "movielens" / "ml-100k"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--skip-implicit", action="store_true")
    parser.add_argument("--implicit-python", default="/root/.cache/modelworks-bench-venv/bin/python")
    parser.add_argument("--sasrec", nargs="*", default=[], help="--set overrides for the SASRec runs")
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        rows["most-popular"] = run_ours("ease", args.data, 0, out, ["model.name=most-popular"])
        rows["ease"] = run_ours("ease", args.data, 0, out, [])
        runs = [run_ours("sasrec", args.data, seed, out, args.sasrec) for seed in args.seeds]
        rows["sasrec"] = {k: statistics.mean(r[k] for r in runs) for k in runs[0]}
        rows["sasrec"]["ndcg@10 per seed"] = [r["ndcg@10"] for r in runs]
    if not args.skip_implicit:
        found = run_implicit(args.implicit_python, args.data)
        if "error" in found:
            rows["implicit"] = found
        else:
            rows["als"], rows["bpr"] = found["als"], found["bpr"]
            version = found["implicit"]
    print(f"\nMovieLens-100K, leave-last-out, full ranking ({cpu_name()}, {time.strftime('%Y-%m-%d')})")
    print(f"{'model':<14}{'NDCG@10':>9}{'HR@10':>8}{'MRR':>8}{'cover':>8}{'pop':>8}{'fit s':>8}{'issue':>8}")
    for name, row in rows.items():
        if "error" in row:
            print(f"{name:<14} {row['error']}")
            continue
        print(f"{name:<14}{row['ndcg@10']:>9.4f}{row['hr@10']:>8.4f}{row['mrr']:>8.4f}"
              f"{row.get('coverage@10', float('nan')):>8.3f}{row.get('popularity@10', float('nan')):>8.3f}"
              f"{row['fit_s']:>8.1f}{ISSUE_TABLE.get(name, float('nan')):>8.3f}")
    result = {"cpu": cpu_name(), "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
              "seeds": args.seeds, "sasrec_overrides": args.sasrec, "issue_ndcg@10": ISSUE_TABLE, "models": rows}
    if "als" in rows:
        result["implicit"] = version
    path = ROOT / "bench" / "results" / "recommendation.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    print(f"-> {path}")


if __name__ == "__main__":
    main()
