"""Short tuning runs for the diffusion recipe: train one variant for a few minutes (kept in --runs), then score
sampling variants of it (time grid, guidance, EMA or raw weights) with the bench's measurement (Inception FID and
KID x1000 of 500 samples against the first 1,000 test images, the class histogram of unconditional samples).

    python bench/diffusion_tune.py train NAME --minutes 2 [--set KEY=VALUE ...] [--runs FOLDER]
    python bench/diffusion_tune.py score NAME [--grid time,log-snr] [--guidance 1,2] [--raw] [--runs FOLDER]

Run both under `flock LOCKFILE`. Figures are for comparing variants in the same session, not the headline (the
headline is `bench/diffusion.py`).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

import diffusion as bench  # bench/diffusion.py

RUNS = Path(__file__).resolve().parents[1] / "runs" / "diffusion-tune"  # --runs; the repo's runs/ is git-ignored


def train(runs: Path, name: str, minutes: float, overrides: list[str]) -> None:
    from modelworks.engine.loop import fit

    task, cfg = bench.load_task("fashion-mnist", [f"train.time_budget_s={minutes * 60}", f"output_dir={runs}",
                                                  f"name={name}", "train.test_at_end=false", *overrides])
    result = fit(task, cfg, runs / "diffusion" / name)
    (runs / "diffusion" / name / "overrides.json").write_text(json.dumps(overrides))
    print(json.dumps({"name": name, "steps": result.step, "best": result.best}))


def score(runs: Path, name: str, grids: list[str], guidances: list[float], raw: bool, steps: int, samples: int,
          use_inception: bool, combos: list[str]) -> None:
    from modelworks.engine import checkpoint
    from modelworks.engine.loop import load_for_evaluation
    from modelworks.tasks.diffusion import metrics as M
    from modelworks.tasks.diffusion.samplers import SamplingRun, drive, torch_denoiser

    run_dir = runs / "diffusion" / name
    overrides = json.loads((run_dir / "overrides.json").read_text())
    task, cfg = bench.load_task("fashion-mnist", [f"output_dir={runs}", f"name={name}", *overrides])
    model = load_for_evaluation(task, run_dir, torch.device("cpu"), cfg, "last")
    models = {"ema": model}
    if raw:
        from modelworks.engine.loop import prepare_model
        plain = prepare_model(task, torch.device("cpu"), cfg)
        plain.load_state_dict(checkpoint.load(run_dir / "checkpoints" / "last.pt", torch.device("cpu"))["model"])
        models["raw"] = plain.eval()
    test = task.datasets(torch.device("cpu")).test
    reals = M.to_uint8(task.to_model_range(test.images[:1000]))
    inception = M.InceptionFeatures() if use_inception else None
    classifier = M.metric_classifier(task)
    real_features = inception(reals) if use_inception else None
    mu, sigma = M.feature_statistics(real_features) if use_inception else (None, None)
    class_features, _ = M.classify(classifier, reals.float() / 127.5 - 1)
    mu_c, sigma_c = M.feature_statistics(class_features)
    shape = (task.channels, task.image_size, task.image_size)

    def sample(net, labels, guidance, grid, seed):
        samplings = [SamplingRun(task.process, shape, 1, labels[i % len(labels)], task.num_classes, "dpm-solver", steps,
                            guidance, seed=seed + i, grid=grid) for i in range(samples)]
        with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
            drive(samplings, torch_denoiser(net, 512))
        return M.to_uint8(torch.cat([r.x for r in samplings]))

    def measure(images):
        features, predicted = M.classify(classifier, images.float() / 127.5 - 1)
        histogram = np.bincount(predicted, minlength=task.num_classes) / len(predicted)
        out = {"fid_clf": round(M.frechet_distance(*M.feature_statistics(features), mu_c, sigma_c), 2),
               "classes": int((histogram > 0).sum()), "max_share": round(float(histogram.max()), 3)}
        if use_inception:
            f = inception(images)
            out["fid"] = round(M.frechet_distance(*M.feature_statistics(f), mu, sigma), 1)
            out["kid"] = round(1000 * M.kernel_inception_distance(f, real_features)[0], 1)
        return out

    pairs = [c.split(":") for c in combos] if combos else [(w, g) for w in models for g in grids]
    for which, grid in pairs:
        net = models[which]
        tic = time.perf_counter()
        row = {"run": name, "weights": which, "grid": grid, "steps": steps,
               "unconditional": measure(sample(net, [None], 0.0, grid, 0))}
        for g in guidances:
            row[f"conditional_w{g:g}"] = measure(sample(net, list(range(task.num_classes)), g, grid, 10_000_000))
        row["seconds"] = round(time.perf_counter() - tic)
        print(json.dumps(row), flush=True)
        with open(runs / "scores.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["train", "score"])
    parser.add_argument("name")
    parser.add_argument("--minutes", type=float, default=2.0)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--grid", default="time")
    parser.add_argument("--guidance", default="1")
    parser.add_argument("--raw", action="store_true", help="also score the raw (not averaged) weights")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument("--inception", action="store_true", help="also Inception FID/KID (slow on a CPU)")
    parser.add_argument("--combos", default="", help="WEIGHTS:GRID pairs, e.g. ema:time,raw:karras")
    parser.add_argument("--runs", type=Path, default=RUNS, help=f"where the variants are kept (default {RUNS})")
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.what == "train":
        train(args.runs, args.name, args.minutes, args.set)
    else:
        score(args.runs, args.name, args.grid.split(","), [float(g) for g in args.guidance.split(",")], args.raw,
              args.steps, args.samples, args.inception, [c for c in args.combos.split(",") if c])


if __name__ == "__main__":
    main()
