"""Diffusion benchmark, one run, side by side on Fashion-MNIST padded to 32x32 (2-core CPU by default):

    python bench/diffusion.py                  # 8 + 8 minutes of training, then sampling and FID (~25 minutes)
    python bench/diffusion.py --minutes 1      # a quick check of the whole path (below 1 minute, our time budget
                                               # does not cover the engine's speed probe)
    python bench/diffusion.py --recipe fashion-mnist-long --minutes 60 --skip-peer   # the 60-minute recipe

Peer: `diffusers` UNet2DModel (3.94M parameters: blocks 32/64/128, two layers each, attention at the lowest
resolution) with its DDPMScheduler (linear betas, eps prediction), fp32, AdamW 1e-3, batch 128, trained for the
same minutes on the same training split, sampled by DDIMScheduler in 50 steps. diffusers is installed into the
bench's own folder, not the package's dependencies:

    .venv/bin/pip install --no-deps --target ~/.cache/modelworks-bench-diffusers diffusers

(`--peer-path` names that folder; it goes on the peer worker's PYTHONPATH only.) Ours: the `fashion-mnist` recipe
(xs UNet, v-prediction on the cosine schedule, min-SNR loss weighting, bf16, power-function EMA) under
`train.time_budget_s`, sampled by DPM-Solver++(2M) in 20 steps; the run's time budget (its probe, its re-plan and
the seconds it trained) is recorded beside the figures. Both are scored by the same code (tasks/diffusion/metrics.py): Inception FID and KID of 500 samples
against the first 1,000 test images, the floor of that measurement (500 other test images against the same 1,000),
FID in the metric classifier's feature space, and the class histogram of unconditional samples.

Writes bench/results/diffusion.json and docs/images/diffusion-samples.png. Run it alone (`flock LOCKFILE ...`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from machine import cpu_name  # bench/machine.py: bench/ is on sys.path when a script runs

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PEER_PATH = Path.home() / ".cache" / "modelworks-bench-diffusers"


def load_task(recipe: str, overrides: list[str]):
    from modelworks import config as config_mod
    from modelworks.tasks.diffusion.task import DiffusionTask

    cfg = config_mod.resolve(DiffusionTask, recipe, overrides, None)
    return DiffusionTask(cfg), cfg


# ---------------------------------------------------------------------------------------------- the peer


def peer_worker(minutes: float, samples: int, out: Path) -> None:
    """Runs in its own process with diffusers on the path: trains, samples, writes uint8 samples and figures."""
    from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    task, _ = load_task("fashion-mnist", [])
    splits = task.datasets(torch.device("cpu"))
    images = splits.train.images
    model = UNet2DModel(sample_size=32, in_channels=1, out_channels=1, layers_per_block=2,
                        block_out_channels=(32, 64, 128), down_block_types=("DownBlock2D", "DownBlock2D",
                                                                            "AttnDownBlock2D"),
                        up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"), norm_num_groups=8)
    params = sum(p.numel() for p in model.parameters())
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batch_size, seen, steps = 128, 0, 0
    generator = torch.Generator().manual_seed(0)
    tic = time.perf_counter()
    while time.perf_counter() - tic < minutes * 60:
        idx = torch.randint(0, len(images), (batch_size,), generator=generator)
        x0 = task.to_model_range(images[idx])
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.randint(0, 1000, (batch_size,), generator=generator)
        loss = torch.nn.functional.mse_loss(model(scheduler.add_noise(x0, noise, t), t).sample, noise)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seen, steps = seen + batch_size, steps + 1
    train_s = time.perf_counter() - tic
    model.eval()
    ddim = DDIMScheduler.from_config(scheduler.config)
    ddim.set_timesteps(50)
    tic = time.perf_counter()
    chunks = []
    with torch.no_grad():
        for start in range(0, samples, 100):
            x = torch.randn((min(100, samples - start), 1, 32, 32), generator=torch.Generator().manual_seed(start))
            for t in ddim.timesteps:
                x = ddim.step(model(x, t).sample, t, x).prev_sample
            chunks.append(((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8))
    sample_s = time.perf_counter() - tic
    torch.save({"samples": torch.cat(chunks), "params": params, "train_s": train_s, "steps": steps,
                "images_per_s": seen / train_s, "sample_s": sample_s, "final_loss": float(loss)}, out)


def run_peer(minutes: float, samples: int, peer_path: Path, folder: Path) -> dict:
    out = folder / "peer.pt"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(peer_path), str(ROOT / "src"),
                                                        os.environ.get("PYTHONPATH", "")])}
    subprocess.run([sys.executable, __file__, "--peer-worker", str(out), "--minutes", str(minutes),
                    "--samples", str(samples)], env=env, check=True)
    return torch.load(out, weights_only=False)


# ---------------------------------------------------------------------------------------------- ours


def run_ours(recipe: str, minutes: float, samples: int, folder: Path, device: str = "cpu",
             overrides: tuple[str, ...] = ()) -> tuple[dict, object, torch.Tensor, torch.Tensor]:
    from modelworks.engine.loop import fit, load_for_evaluation
    from modelworks.tasks.diffusion.metrics import sample_model

    task, cfg = load_task(recipe, [f"train.time_budget_s={minutes * 60}", f"output_dir={folder}",
                                   "name=ours", "train.test_at_end=false", f"train.device={device}",
                                   *overrides])
    tic = time.perf_counter()
    result = fit(task, cfg, folder / "diffusion" / "ours")
    fit_s = time.perf_counter() - tic
    rates = [json.loads(line).get("train/samples_per_s") for line in
             (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    rates = [r for r in rates if r is not None]
    model = load_for_evaluation(task, result.run_dir, torch.device(device), cfg)
    kind = torch.device(device).type
    tic = time.perf_counter()
    with torch.no_grad(), torch.autocast(kind, torch.bfloat16):
        unconditional = sample_model(task, model, samples, [None], 0.0, seed=0).cpu()
    sample_s = time.perf_counter() - tic
    with torch.no_grad(), torch.autocast(kind, torch.bfloat16):
        conditional = sample_model(task, model, samples, list(range(task.num_classes)), cfg.model.guidance,
                                   seed=10_000_000).cpu()
    figures = {"params": sum(p.numel() for p in model.parameters()), "fit_s": fit_s, "steps": result.step,
               "images_per_s": float(np.mean(rates[1:] if len(rates) > 1 else rates)), "sample_s": sample_s,
               "best_val_loss": result.best.get("val/loss"), "sampler": cfg.model.sampler,
               "steps_per_sample": cfg.model.sample_steps, "guidance": cfg.model.guidance,
               "time_budget": json.loads((result.run_dir / "summary.json").read_text()).get("time_budget")}
    return figures, task, unconditional, conditional


# ---------------------------------------------------------------------------------------------- scoring


def score(task, samples_uint8: torch.Tensor, reals: torch.Tensor, inception, classifier, ref) -> dict:
    from modelworks.tasks.diffusion import metrics as M

    f = inception(samples_uint8)
    fid = M.frechet_distance(*M.feature_statistics(f), ref["mu"], ref["sigma"])
    kid, _ = M.kernel_inception_distance(f, ref["features"])
    features, predicted = M.classify(classifier, samples_uint8.float() / 127.5 - 1)
    histogram = np.bincount(predicted, minlength=task.num_classes) / len(predicted)
    return {"fid": fid, "kid_x1000": 1000 * kid,
            "fid_classifier": M.frechet_distance(*M.feature_statistics(features), ref["mu_c"], ref["sigma_c"]),
            "classes_present": int((histogram > 0).sum()), "class_max_share": float(histogram.max()),
            "class_histogram": histogram.round(4).tolist()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=8.0, help="training minutes for each model")
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument("--reference", type=int, default=1000)
    parser.add_argument("--recipe", default="fashion-mnist")
    parser.add_argument("--skip-peer", action="store_true")
    parser.add_argument("--device", default="cpu", help="for ours (the peer is the CPU measurement)")
    parser.add_argument("--recipe-set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a value of our recipe, e.g. model.size=s (repeatable)")
    parser.add_argument("--peer-path", default=str(DEFAULT_PEER_PATH))
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "diffusion.json"))
    parser.add_argument("--grid", default=str(ROOT / "docs" / "images" / "diffusion-samples.png"))
    parser.add_argument("--peer-worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peer_worker:
        peer_worker(args.minutes, args.samples, Path(args.peer_worker))
        return
    from modelworks.engine.memory import keep_freed_memory
    from modelworks.tasks.diffusion import metrics as M

    keep_freed_memory()
    results = {"cpu": cpu_name(), "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d"),
               "torch": torch.__version__, "minutes": args.minutes, "samples": args.samples,
               "reference": args.reference, "command": " ".join(["python", "bench/diffusion.py", *sys.argv[1:]])}
    print(f"{results['cpu']}, {results['threads']} threads, {results['date']}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        peer = None if args.skip_peer else run_peer(args.minutes, args.samples, Path(args.peer_path), folder)
        ours, task, unconditional, conditional = run_ours(args.recipe, args.minutes, args.samples, folder,
                                                          args.device, tuple(args.recipe_set))

    test = task.datasets(torch.device("cpu")).test
    reals = M.to_uint8(task.to_model_range(test.images[:args.reference]))
    floor_images = M.to_uint8(task.to_model_range(test.images[args.reference:args.reference + args.samples]))
    inception = M.InceptionFeatures(args.device)
    classifier = M.metric_classifier(task)
    real_features = inception(reals)
    class_features, _ = M.classify(classifier, reals.float() / 127.5 - 1)
    ref = dict(zip(("mu", "sigma"), M.feature_statistics(real_features)), features=real_features,
               **dict(zip(("mu_c", "sigma_c"), M.feature_statistics(class_features))))
    results["floor"] = score(task, floor_images, reals, inception, classifier, ref)
    results["ours"] = {**ours, "unconditional": score(task, M.to_uint8(unconditional), reals, inception, classifier,
                                                      ref),
                       "conditional": score(task, M.to_uint8(conditional), reals, inception, classifier, ref)}
    if peer is not None:
        samples = peer.pop("samples")
        results["peer"] = {**peer, "sampler": "ddim", "steps_per_sample": 50,
                           "unconditional": score(task, samples, reals, inception, classifier, ref)}
    u = results["ours"]["unconditional"]
    results["targets"] = {
        "fid<=80": u["fid"] <= 80, "kid_x1000<=50": u["kid_x1000"] <= 50,
        "10 classes, none above 25%": u["classes_present"] == 10 and u["class_max_share"] <= 0.25,
        "evaluations per sample <= 20": ours["steps_per_sample"] <= 20}
    if peer is not None:
        results["targets"][">=3x peer images/s at equal or better FID"] = (
            ours["images_per_s"] >= 3 * results["peer"]["images_per_s"]
            and u["fid"] <= results["peer"]["unconditional"]["fid"])
    print_table(results)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    write_grid(task, conditional, Path(args.grid))


def print_table(results: dict) -> None:
    rows = [("real vs real (floor)", results["floor"], None)]
    if "peer" in results:
        rows.append((f"peer: diffusers UNet2DModel, DDIM 50", results["peer"]["unconditional"], results["peer"]))
    rows.append((f"ours unconditional, DPM-Solver++ 20", results["ours"]["unconditional"], results["ours"]))
    rows.append((f"ours class-conditional, guidance", results["ours"]["conditional"], results["ours"]))
    print(f"\n{'':40} {'FID':>7} {'KIDx1000':>9} {'FIDclf':>8} {'classes':>7} {'max%':>6} {'img/s':>7} "
          f"{'params':>7}")
    for name, s, model in rows:
        extra = f"{model['images_per_s']:7.0f} {model['params'] / 1e6:6.2f}M" if model else ""
        print(f"{name:40} {s['fid']:7.1f} {s['kid_x1000']:9.1f} {s['fid_classifier']:8.2f} {s['classes_present']:7d} "
              f"{100 * s['class_max_share']:6.1f} {extra}")
    print("targets:", json.dumps(results["targets"]))


def write_grid(task, conditional: torch.Tensor, out: Path) -> None:
    """Ten samples of each class, a row per class, the padding cut off: a small PNG for the README."""
    from torchvision.utils import save_image

    n = task.num_classes
    order = [i for c in range(n) for i in range(c, len(conditional), n)[:10]]
    pad = (task.image_size - task.source_size) // 2
    images = conditional[order][..., pad:task.image_size - pad, pad:task.image_size - pad]
    out.parent.mkdir(parents=True, exist_ok=True)
    save_image((images + 1) / 2, out, nrow=10, padding=1)


if __name__ == "__main__":
    main()
