"""Classification benchmarks: training throughput by numeric format and time-to-accuracy on real Fashion-MNIST.

    python bench/classification.py                    # throughput table + fashion-mnist recipe, 3 seeds
    python bench/classification.py --long             # also the fashion-mnist-long recipe, 3 seeds
    python bench/classification.py --skip-recipes     # throughput only
    python bench/classification.py --device cuda      # the same on a GPU (bench/gpu.sh)

Throughput: optimizer steps on one fixed batch of 128 (data cost excluded), for ResNet-18 (3x32x32, CIFAR's
shape) and the fast net (1x28x28), in fp32 vs bf16 autocast, NCHW vs channels_last, eager vs torch.compile;
all rows come from one run so their ratios are comparable (with the engine's malloc tuning, which a separate
table turns on and off in fresh processes). Time-to-accuracy: each recipe runs end to end as a
user runs it (`modelworks train`), wall clock from process start to the final test evaluation. Writes
bench/results/classification.json. Run nothing else meanwhile: the figures are wall-clock.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from modelworks.engine.memory import keep_freed_memory
from modelworks.tasks.classification.models import build_classifier

ROOT = Path(__file__).resolve().parent.parent


def measure_throughput(model_name: str, shape: tuple[int, int, int], widths, device: torch.device, bf16: bool,
                       channels_last: bool, compiled: bool, batch: int, steps: int) -> float:
    torch.manual_seed(0)
    model = build_classifier(model_name, 10, shape[0], widths).to(device)
    x = torch.randn(batch, *shape, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    run = torch.compile(model) if compiled else model
    dtype = torch.bfloat16 if bf16 else torch.float32

    def one_step():
        with torch.autocast(device.type, dtype=dtype, enabled=bf16):
            loss = F.cross_entropy(run(x).float(), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(3):  # warm-up: oneDNN primitive creation, compilation
        one_step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    tic = time.perf_counter()
    for _ in range(steps):
        one_step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - tic)


def throughput_table(device: torch.device, skip_compile: bool, batch: int, compile_bf16_only: bool = False
                     ) -> list[dict]:
    rows = []
    if device.type == "cpu":
        keep_freed_memory()  # as the engine does for every CPU run
    models = [("resnet18", (3, 32, 32), (), 4 if device.type == "cpu" else 50),
              ("fastnet", (1, 28, 28), (16, 32, 64, 128), 20 if device.type == "cpu" else 200)]
    compiles = [False] if skip_compile else [False, True]
    for (name, shape, widths, steps), compiled, bf16, channels_last in itertools.product(
            models, compiles, [False, True], [False, True]):
        if compiled and compile_bf16_only and not bf16:
            continue
        ips = measure_throughput(name, shape, widths, device, bf16, channels_last, compiled, batch, steps)
        row = {"model": name, "precision": "bf16" if bf16 else "fp32",
               "memory_format": "channels_last" if channels_last else "NCHW",
               "mode": "compiled" if compiled else "eager", "batch": batch, "images_per_s": round(ips, 1)}
        rows.append(row)
        print(f"  {name:<9} {row['precision']:<5} {row['memory_format']:<13} {row['mode']:<8} {ips:9.1f} img/s",
              flush=True)
    for name in ("resnet18", "fastnet"):
        base = next(r for r in rows if r["model"] == name and r["precision"] == "fp32"
                    and r["memory_format"] == "NCHW" and r["mode"] == "eager")
        for r in rows:
            if r["model"] == name:
                r["speedup_vs_fp32_nchw_eager"] = round(r["images_per_s"] / base["images_per_s"], 2)
    return rows


ALLOCATOR_CHILD = """
import sys, time, torch, torch.nn.functional as F
from modelworks.engine.memory import keep_freed_memory
from modelworks.tasks.classification.models import build_classifier
if sys.argv[1] == "tuned":
    assert keep_freed_memory()
torch.manual_seed(0)
model = build_classifier("fastnet", 10, 1, (16, 32, 64, 128)).to(memory_format=torch.channels_last)
opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
x = torch.randn(512, 1, 28, 28).contiguous(memory_format=torch.channels_last)
y = torch.randint(0, 10, (512,))
def step():
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = F.cross_entropy(model(x).float(), y)
    loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
for _ in range(5):
    step()
tic = time.perf_counter()
for _ in range(30):
    step()
print((time.perf_counter() - tic) / 30 * 1000)
"""


def allocator_table() -> list[dict]:
    """The glibc malloc tuning (engine/memory.py) on and off, in fresh processes (it cannot be undone in one),
    alternated twice: fastnet training step at batch 512, bf16, channels_last."""
    rows = []
    for mode in ("default", "tuned", "default", "tuned"):
        out = subprocess.run([sys.executable, "-c", ALLOCATOR_CHILD, mode], capture_output=True, text=True,
                             check=True)
        rows.append({"malloc": mode, "ms_per_step": round(float(out.stdout.split()[-1]), 1)})
        print(f"  fastnet batch 512 step, malloc {mode:<7}: {rows[-1]['ms_per_step']:.1f} ms", flush=True)
    return rows


def run_recipe(recipe: str, seed: int, out: Path, extra: list[str], lock: str | None = None) -> dict:
    """`modelworks train` as a user runs it; wall clock covers data loading, training and the test report.
    With `lock`, the run holds an exclusive flock on that file, so other heavy work that takes the same lock
    waits between runs instead of stealing the 2 cores from a timed one."""
    name = f"{recipe}-seed{seed}"
    cmd = [sys.executable, "-m", "modelworks", "train", "classification", "--recipe", recipe, "--name", name,
           "--set", f"train.seed={seed}", "--set", f"output_dir={out}", *extra]
    with contextlib.ExitStack() as held:
        if lock:
            handle = held.enter_context(open(lock, "a"))
            fcntl.flock(handle, fcntl.LOCK_EX)
        tic = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        seconds = time.perf_counter() - tic
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    test = json.loads((out / "classification" / name / "evaluation" / "test.json").read_text())
    summary = json.loads((out / "classification" / name / "summary.json").read_text())
    return {"recipe": recipe, "seed": seed, "seconds": round(seconds, 1), "test_acc1": test["test/acc1"],
            "val_acc1": summary["best"].get("val/acc1"), "steps": summary["step"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--long", action="store_true", help="also time the fashion-mnist-long recipe")
    parser.add_argument("--recipes", nargs="+", metavar="RECIPE",
                        help="time these recipes instead (default: fashion-mnist, plus fashion-mnist-long with --long)")
    parser.add_argument("--skip-recipes", action="store_true")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--skip-compile", action="store_true", help="leave out the torch.compile rows")
    parser.add_argument("--compile-bf16-only", action="store_true",
                        help="compile only the bf16 rows (compilation dominates a short GPU lease)")
    parser.add_argument("--recipe-set", action="append", default=[], metavar="KEY=VALUE",
                        help="extra --set for the recipe runs (e.g. train.device=cuda)")
    parser.add_argument("--lock", metavar="FILE",
                        help="hold an exclusive flock on FILE during each timed run (share the machine politely)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "classification.json"))
    args = parser.parse_args()
    device = torch.device(args.device)
    result = {"device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
              "cpu_count": os.cpu_count(), "date": time.strftime("%Y-%m-%d %H:%M")}

    if not args.skip_throughput:
        print(f"training throughput, batch {args.batch}, {device}:", flush=True)
        result["throughput"] = throughput_table(device, args.skip_compile, args.batch, args.compile_bf16_only)
        r18 = {(r["precision"], r["memory_format"], r["mode"]): r["images_per_s"]
               for r in result["throughput"] if r["model"] == "resnet18"}
        ratio = r18[("bf16", "channels_last", "eager")] / r18[("fp32", "NCHW", "eager")]
        result["resnet18_bf16_channels_last_over_fp32_nchw"] = round(ratio, 2)
        print(f"ResNet-18 bf16+channels_last / fp32 NCHW (eager): {ratio:.2f}x", flush=True)

    if device.type == "cpu" and not args.skip_throughput:
        print("CPU allocator (engine/memory.py):", flush=True)
        result["allocator"] = allocator_table()
        best = {m: min(r["ms_per_step"] for r in result["allocator"] if r["malloc"] == m) for m in ("default", "tuned")}
        result["allocator_best_ms"] = best
        result["allocator_speedup"] = round(best["default"] / best["tuned"], 2)
        print(f"kept-freed-memory speed-up (best of 2 each): {result['allocator_speedup']:.2f}x", flush=True)

    if not args.skip_recipes:
        recipes = args.recipes or ["fashion-mnist"] + (["fashion-mnist-long"] if args.long else [])
        extra = [arg for kv in args.recipe_set for arg in ("--set", kv)]
        result["recipes"] = []
        with tempfile.TemporaryDirectory(prefix="mw-bench-") as tmp:
            for recipe in recipes:
                runs = []
                for seed in args.seeds:
                    run = run_recipe(recipe, seed, Path(tmp), extra, args.lock)
                    runs.append(run)
                    print(f"  {recipe:<20} seed {seed}: test acc {run['test_acc1']:.4f} in {run['seconds']:.1f} s",
                          flush=True)
                accs, secs = [r["test_acc1"] for r in runs], [r["seconds"] for r in runs]
                result["recipes"].append({"recipe": recipe, "runs": runs,
                                          "mean_test_acc1": round(statistics.mean(accs), 4),
                                          "min_test_acc1": round(min(accs), 4),
                                          "mean_seconds": round(statistics.mean(secs), 1),
                                          "max_seconds": round(max(secs), 1)})

    print("\n| benchmark | value |\n|---|---|")
    for row in result.get("throughput", []):
        print(f"| {row['model']} {row['precision']} {row['memory_format']} {row['mode']} | "
              f"{row['images_per_s']} img/s ({row['speedup_vs_fp32_nchw_eager']}x) |")
    if "allocator" in result:
        best = result["allocator_best_ms"]
        print(f"| fastnet step, batch 512: glibc malloc default / kept freed memory | {best['default']} / "
              f"{best['tuned']} ms ({result['allocator_speedup']}x) |")
    for rec in result.get("recipes", []):
        print(f"| {rec['recipe']} (seeds {args.seeds}) | test acc mean {rec['mean_test_acc1']:.4f} "
              f"(min {rec['min_test_acc1']:.4f}), mean {rec['mean_seconds']} s (max {rec['max_seconds']} s) |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
