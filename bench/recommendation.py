"""Recommendation on MovieLens: most-popular, EASE, SASRec and two-tower (ours), and `implicit`'s ALS and BPR, side
by side under one protocol (leave-last-out by time, full ranking over all items, seen items masked), several seeds,
with paired per-user comparisons; and faiss retrieval on a synthetic catalogue of 1M items.

    python bench/recommendation.py [--movielens ../shared/data/movielens] [--datasets ml-100k ml-latest-small]
                                   [--seeds 0 1 2] [--skip-implicit] [--no-faiss]
    python bench/recommendation.py --faiss-only [--faiss-items 1000000]

Ours run through the engine exactly as `modelworks train recommendation --recipe ease|sasrec|two-tower` does (in
process); ALS/BPR run in a separate virtual environment (--implicit-python, default
~/.cache/modelworks-bench-venv), as `implicit` is no dependency of modelworks. EASE's lambda is chosen per
dataset on the validation split from --ease-l2. Paired comparisons: per test user, each model's NDCG@10 averaged
over seeds; the difference against a baseline, its mean, standard error and paired t. Writes
bench/results/recommendation.json. Run alone (the times are wall clock): `flock LOCKFILE python bench/...`.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from modelworks import config as config_mod
from modelworks.engine.loop import evaluate_run, fit, load_for_evaluation
from modelworks.tasks.recommendation import data as rec_data
from modelworks.tasks.recommendation.metrics import mask_seen, target_ranks
from modelworks.tasks.recommendation.task import RecommendationTask
from machine import cpu_name  # bench/machine.py: bench/ is on sys.path when a script runs

ROOT = Path(__file__).resolve().parent.parent
# SASRec on ml-latest-small (9.7k items, median history 70): the full softmax took ~0.7 s a step here, a sampled one
# over 2,048 items ~0.2 s; windows over whole histories; more dropout and patience than ml-100k's recipe (seed 0,
# 180 s, test NDCG@10: dropout 0.2 0.040, 0.3 0.050; 4,096 negatives 0.040). docs/recommendation.md.
SMALL_SASREC = ["model.negatives=2048", "model.train_windows=all", "model.dropout=0.3", "train.time_budget_s=180",
                "train.early_stop.patience=10"]
ISSUE_TABLE = {"ml-100k": {"most-popular": 0.025, "als": 0.040, "bpr": 0.045, "ease": 0.041, "sasrec": 0.062},
               "ml-latest-small": {"als": 0.033, "ease": 0.041}}  # NDCG@10
METRICS = ("ndcg@10", "hr@10", "mrr", "coverage@10", "popularity@10")


# ---------------------------------------------------------------------------------------------- our models


def per_user_ndcg(task: RecommendationTask, model, max_len: int) -> np.ndarray:
    """NDCG@10 of each test user (in user order), the metric's per-user terms, for paired comparisons."""
    _, test = rec_data.evaluation_splits(task.split, max_len)
    out = []
    with torch.no_grad():
        for start in range(0, len(test), 1024):
            history, target, seen = test.get_batch(torch.arange(start, min(start + 1024, len(test))))
            rank = target_ranks(mask_seen(model(history).float(), seen), target).double()
            out.append(torch.where(rank < 10, 1 / torch.log2(rank + 2), torch.zeros_like(rank)).numpy())
    return np.concatenate(out)


def run_ours(recipe: str, data: str, seed: int, out: Path, overrides: list[str]) -> dict:
    cfg = config_mod.resolve(RecommendationTask, recipe, [f"train.seed={seed}", "train.device=cpu", *overrides],
                             f"movielens:{data}")
    run_dir = out / f"{recipe}-{seed}-{len(list(out.iterdir()))}"
    task = RecommendationTask(cfg)
    tic = time.perf_counter()
    result = fit(task, cfg, run_dir)
    fit_s = time.perf_counter() - tic
    metrics = evaluate_run(task, cfg, run_dir, "test")
    model = load_for_evaluation(task, run_dir, torch.device("cpu"), cfg).eval()
    row = {"fit_s": fit_s, "step": result.step, "val_ndcg@10": result.best.get("val/ndcg@10"),
           **{k.split("/", 1)[1]: v for k, v in metrics.items() if k.startswith("test/")}}
    row["per_user"] = per_user_ndcg(task, model, cfg.model.max_len)
    assert abs(row["per_user"].mean() - row["ndcg@10"]) < 1e-6, "per-user NDCG disagrees with the metric"
    return row


def run_implicit(python: str, data: str, seeds: list[int]) -> dict:
    task = RecommendationTask(config_mod.resolve(RecommendationTask, "ease", [], f"movielens:{data}"))
    task.load_split()
    split = task.split
    users = [u for u, t in enumerate(split.test) if t]
    record = {"n_items": split.n_items, "seeds": seeds,
              # test history = train + validation item (as ours): ALS/BPR are fitted on train + validation too
              "train": [[i - 1 for i in s] + ([split.val[u] - 1] if split.val[u] else [])
                        for u, s in enumerate(split.train)],
              "test_users": users, "test_target": [split.test[u] - 1 for u in users],
              "test_seen": [[i - 1 for i in split.train[u] + [split.val[u]]] for u in users]}
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(record, f)
    result = subprocess.run([python, str(ROOT / "bench" / "recommendation_implicit.py"), f.name],
                            capture_output=True, text=True)
    if result.returncode:
        return {"error": result.stderr.strip().splitlines()[-1] if result.stderr else "failed"}
    return json.loads(result.stdout)


def summarise(runs: list[dict]) -> dict:
    """Mean and std over seeds of each metric; per-user NDCG averaged over seeds."""
    row = {}
    for key in (*METRICS, "fit_s", "step", "val_ndcg@10"):
        values = [r[key] for r in runs if r.get(key) is not None]
        if values:
            row[key] = statistics.mean(values)
            row[f"{key} std"] = statistics.stdev(values) if len(values) > 1 else 0.0
    row["ndcg@10 per seed"] = [r["ndcg@10"] for r in runs]
    row["per_user"] = np.mean([np.asarray(r["per_user"]) for r in runs], axis=0)
    return row


def paired(a: np.ndarray, b: np.ndarray) -> dict:
    """Per-user NDCG@10 differences a - b: mean, standard error, paired t, 95% interval (normal)."""
    d = np.asarray(a) - np.asarray(b)
    se = d.std(ddof=1) / math.sqrt(len(d))
    return {"mean_diff": float(d.mean()), "se": float(se), "t": float(d.mean() / se) if se else float("inf"),
            "ci95": [float(d.mean() - 1.96 * se), float(d.mean() + 1.96 * se)],
            "ratio": float(np.mean(a) / np.mean(b)) if np.mean(b) else float("inf"), "users": len(d)}


def bench_dataset(name: str, folder: Path, models: list[str], args, out: Path) -> dict:
    data = str(folder)
    rows: dict[str, dict] = {}
    if "most-popular" in models:
        rows["most-popular"] = summarise([run_ours("ease", data, 0, out, ["model.name=most-popular"])])
    if "ease" in models:
        grid = args.ease_l2 if name == "ml-100k" else args.small_ease_l2
        tried = {l2: run_ours("ease", data, 0, out, [f"model.l2={l2}"]) for l2 in grid}
        best = max(tried, key=lambda l2: tried[l2]["val_ndcg@10"])
        rows["ease"] = {**summarise([tried[best]]), "l2": best,
                        "val_ndcg@10 by l2": {str(l2): r["val_ndcg@10"] for l2, r in tried.items()}}
    sasrec_sets = args.sasrec + (args.small_sasrec if name != "ml-100k" else [])
    for model, extra in (("sasrec", sasrec_sets), ("two-tower", args.two_tower)):
        if model in models:
            seeds = args.small_sasrec_seeds if model == "sasrec" and name != "ml-100k" else args.seeds
            rows[model] = summarise([run_ours(model, data, seed, out, extra) for seed in seeds])
    if not args.skip_implicit and ("als" in models or "bpr" in models):
        found = run_implicit(args.implicit_python, data, args.seeds)
        if "error" in found:
            rows["implicit"] = found
        else:
            for model in ("als", "bpr"):
                rows[model] = summarise(found[model])
            rows["implicit_version"] = found["implicit"]
    comparisons = {}
    for ours in ("sasrec", "two-tower", "ease"):
        for baseline in ("als", "ease", "bpr"):
            if ours != baseline and ours in rows and baseline in rows and "per_user" in rows.get(baseline, {}):
                comparisons[f"{ours} vs {baseline}"] = paired(rows[ours]["per_user"], rows[baseline]["per_user"])
    return {"models": rows, "paired": comparisons}


def print_dataset(name: str, result: dict, seeds: list[int]) -> None:
    print(f"\n{name}: leave-last-out, full ranking; mean ± std over seeds {seeds} ({cpu_name()}, "
          f"{time.strftime('%Y-%m-%d')})")
    print(f"{'model':<14}{'NDCG@10':>17}{'HR@10':>9}{'MRR':>8}{'cover':>8}{'pop':>8}{'fit s':>8}{'issue':>8}")
    for model, row in result["models"].items():
        if not isinstance(row, dict):
            continue
        if "error" in row:
            print(f"{model:<14} {row['error']}")
            continue
        issue = ISSUE_TABLE.get(name, {}).get(model, float("nan"))
        print(f"{model:<14}{row['ndcg@10']:>9.4f} ± {row['ndcg@10 std']:.4f}{row['hr@10']:>9.4f}{row['mrr']:>8.4f}"
              f"{row.get('coverage@10', float('nan')):>8.3f}{row.get('popularity@10', float('nan')):>8.3f}"
              f"{row['fit_s']:>8.1f}{issue:>8.3f}")
    for pair, c in result["paired"].items():
        print(f"  {pair:<22} diff {c['mean_diff']:+.4f} ± {c['se']:.4f} (SE), t {c['t']:.2f}, 95% CI "
              f"[{c['ci95'][0]:+.4f}, {c['ci95'][1]:+.4f}], ratio {c['ratio']:.2f}x, {c['users']} users")


# ---------------------------------------------------------------------------------------------- faiss


def synthetic_catalogue(n: int, dim: int, queries: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Unit item vectors and user queries drawn around 4096 shared centres: learned embeddings cluster (genres,
    tastes), unlike isotropic noise, on which no index beats a scan."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(4096, dim)).astype(np.float32)

    def draw(count: int) -> np.ndarray:
        x = centres[rng.integers(0, len(centres), count)] + 0.6 * rng.normal(size=(count, dim)).astype(np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    return draw(n), draw(queries)


def per_query_ms(index, queries: np.ndarray, k: int) -> np.ndarray:
    from modelworks.tasks.recommendation.retrieval import search

    times = []
    for q in queries:
        tic = time.perf_counter()
        search(index, q[None], k)
        times.append((time.perf_counter() - tic) * 1000)
    return np.asarray(times)


def bench_faiss(n_items: int, dim: int, n_queries: int, nprobes: list[int], hnsw: bool) -> dict:
    import faiss

    from modelworks.tasks.recommendation.retrieval import build_index, recall_at_k, search

    items, queries = synthetic_catalogue(n_items, dim, n_queries)
    faiss.omp_set_num_threads(1)  # one query per call on one thread: the serving case (threads serve requests)
    flat = build_index(items, "flat")
    _, exact = search(flat, queries, 10)
    result = {"items": n_items, "dim": dim, "queries": n_queries, "threads": 1, "k": 10}
    timed = queries[:200]
    exact_ms = per_query_ms(flat, timed, 10)
    result["exact"] = {"p50_ms": float(np.percentile(exact_ms, 50)), "p99_ms": float(np.percentile(exact_ms, 99))}
    faiss.omp_set_num_threads(torch.get_num_threads())  # the build (k-means) uses every core
    tic = time.perf_counter()
    ivf = build_index(items, "ivf")
    build_s = time.perf_counter() - tic
    faiss.omp_set_num_threads(1)
    result["ivf"] = {"nlist": ivf.nlist, "build_s": build_s, "by_nprobe": {}}
    for nprobe in nprobes:
        ivf.nprobe = nprobe
        _, found = search(ivf, queries, 10)
        ms = per_query_ms(ivf, timed, 10)
        result["ivf"]["by_nprobe"][str(nprobe)] = {
            "recall@10": recall_at_k(found, exact), "p50_ms": float(np.percentile(ms, 50)),
            "p99_ms": float(np.percentile(ms, 99))}
    if hnsw:
        faiss.omp_set_num_threads(torch.get_num_threads())
        tic = time.perf_counter()
        graph = build_index(items, "hnsw")
        result["hnsw"] = {"build_s": time.perf_counter() - tic, "by_ef": {}}
        faiss.omp_set_num_threads(1)
        for ef in (64, 128, 256):
            graph.hnsw.efSearch = ef
            _, found = search(graph, queries, 10)
            ms = per_query_ms(graph, timed, 10)
            result["hnsw"]["by_ef"][str(ef)] = {"recall@10": recall_at_k(found, exact),
                                               "p50_ms": float(np.percentile(ms, 50)),
                                               "p99_ms": float(np.percentile(ms, 99))}
    return result


def print_faiss(r: dict) -> None:
    print(f"\nfaiss retrieval, {r['items']:,} synthetic items x {r['dim']} dims, {r['queries']} queries, top-{r['k']}, "
          f"one query per call on {r['threads']} thread ({cpu_name()}, {time.strftime('%Y-%m-%d')})")
    print(f"  exact (IndexFlatIP): p50 {r['exact']['p50_ms']:.2f} ms, p99 {r['exact']['p99_ms']:.2f} ms")
    print(f"  IVF-Flat, {r['ivf']['nlist']} cells, built in {r['ivf']['build_s']:.1f} s:")
    for nprobe, row in r["ivf"]["by_nprobe"].items():
        print(f"    nprobe {nprobe:>4}: recall@10 {row['recall@10']:.4f}, p50 {row['p50_ms']:.3f} ms, "
              f"p99 {row['p99_ms']:.3f} ms ({r['exact']['p50_ms'] / row['p50_ms']:.0f}x faster at p50)")
    if "hnsw" in r:
        print(f"  HNSW (M 32), built in {r['hnsw']['build_s']:.1f} s:")
        for ef, row in r["hnsw"]["by_ef"].items():
            print(f"    efSearch {ef:>4}: recall@10 {row['recall@10']:.4f}, p50 {row['p50_ms']:.3f} ms, "
                  f"p99 {row['p99_ms']:.3f} ms")


# ---------------------------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--movielens", default=str(ROOT.parent / "shared" / "data" / "movielens"),
                        help="the folder holding ml-100k/ and ml-latest-small/")
    parser.add_argument("--datasets", nargs="+", default=["ml-100k", "ml-latest-small"])
    parser.add_argument("--models", nargs="+", default=["most-popular", "ease", "sasrec", "two-tower", "als", "bpr"])
    parser.add_argument("--small-models", nargs="+", default=None,
                        help="models for ml-latest-small (default: --models); fewer keep the run short")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--small-sasrec-seeds", type=int, nargs="+", default=[0, 1, 2],
                        help="SASRec's seeds on ml-latest-small (3 minutes each)")
    parser.add_argument("--ease-l2", type=float, nargs="+", default=[50, 100, 200, 500])
    parser.add_argument("--small-ease-l2", type=float, nargs="+", default=[200, 500],
                        help="EASE's lambdas on ml-latest-small (each solve of its 9.7k items takes ~40 s)")
    parser.add_argument("--skip-implicit", action="store_true")
    parser.add_argument("--implicit-python", default=str(Path.home() / ".cache" / "modelworks-bench-venv" / "bin" / "python"))
    parser.add_argument("--sasrec", nargs="*", default=[], help="--set overrides for the SASRec runs")
    parser.add_argument("--small-sasrec", nargs="*", default=SMALL_SASREC,
                        help="further --set overrides for SASRec on the datasets other than ml-100k")
    parser.add_argument("--two-tower", nargs="*", default=[], help="--set overrides for the two-tower runs")
    parser.add_argument("--no-faiss", action="store_true")
    parser.add_argument("--faiss-only", action="store_true")
    parser.add_argument("--faiss-items", type=int, default=1_000_000)
    parser.add_argument("--faiss-nprobe", type=int, nargs="+", default=[16, 32, 64, 128, 256])
    parser.add_argument("--hnsw", action="store_true", help="also an HNSW index (minutes to build at 1M items)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "recommendation.json"))
    args = parser.parse_args()
    result = {"cpu": cpu_name(), "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "seeds": args.seeds,
              "sasrec_overrides": args.sasrec, "small_sasrec_overrides": args.small_sasrec,
              "two_tower_overrides": args.two_tower, "issue_ndcg@10": ISSUE_TABLE, "datasets": {}}
    if not args.faiss_only:
        with tempfile.TemporaryDirectory() as tmp:
            for name in args.datasets:
                models = args.small_models if name != "ml-100k" and args.small_models else args.models
                result["datasets"][name] = bench_dataset(name, Path(args.movielens) / name, models, args, Path(tmp))
                print_dataset(name, result["datasets"][name], args.seeds)
    if not args.no_faiss:
        result["faiss"] = bench_faiss(args.faiss_items, 64, 1000, args.faiss_nprobe, args.hnsw)
        print_faiss(result["faiss"])
    for dataset in result["datasets"].values():
        for row in dataset["models"].values():
            if isinstance(row, dict):
                row.pop("per_user", None)
    path = Path(args.out)
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    print(f"-> {path}")


if __name__ == "__main__":
    main()
