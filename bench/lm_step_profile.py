"""The language-model predictor's step, timed by parts, outside the server: B sequences of the serving bench's
requests ("ROMEO:", 200 tokens, temperature 0.8) stepped together, a finished one replaced at once.

    python bench/lm_step_profile.py runs/language_model/NAME/package --batch 16 --threads 1
    python bench/lm_step_profile.py runs/language_model/NAME/package --batch 1,16 --threads 1 [--busy]

Prints ms per step and tokens/s, then the time per step in prefill, decode (graph call included), the batched
draw and the per-token text, and in each graph call alone. With several batch sizes, they alternate for
`--rounds` rounds (each of `--steps` steps) and the median round of each counts; the last line is the tokens/s
ratio of the last size to the first: what the serving bench's 16-vs-1 ratio would be with no server, no client and
nothing else on the CPU. `--busy` keeps a second process spinning in plain Python meanwhile (one busy core, as the
server's event loop and the measuring client make it), to see how much this machine's cores slow each other.
Run it under the CPU lock.
"""

from __future__ import annotations

import argparse
import collections
import subprocess
import sys
import time

from modelworks.inference import open_model
from modelworks.tasks.language_model.predictor import CompletionRequest
from machine import cpu_name  # bench/machine.py: bench/ is on sys.path when a script runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("package")
    parser.add_argument("--batch", default="16", help="batch size, or several separated by commas (alternated)")
    parser.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (default: all)")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--rounds", type=int, default=5, help="rounds per batch size when there are several")
    parser.add_argument("--busy", action="store_true", help="a plain-Python spinning process on the side")
    args = parser.parse_args()
    batches = [int(b) for b in args.batch.split(",")]

    model = open_model(args.package, "onnx", args.threads)
    predictor, run = model.predictor, model.runner
    seconds: dict[str, float] = collections.defaultdict(float)

    def timed(name, function):
        def wrapper(*a, **k):
            tic = time.perf_counter()
            try:
                return function(*a, **k)
            finally:
                seconds[name] += time.perf_counter() - tic
        return wrapper

    for part in ("prefill", "decode", "choose", "advance"):
        setattr(predictor, part, timed(part, getattr(predictor, part)))
    graph = lambda inputs, graph=None, **kw: timed(f"graph {graph}", run)(inputs, graph, **kw)  # noqa: E731
    request = CompletionRequest(prompt="ROMEO:", max_tokens=200, temperature=0.8)

    def measure(batch: int, steps: int) -> tuple[float, float, dict[str, float]]:
        """(ms per step, tokens/s, {part: ms per step}) of `steps` steps at `batch` sequences."""
        sequences = [predictor.start(predictor.parse(request)) for _ in range(batch)]
        seconds.clear()
        tokens, tic = 0, time.perf_counter()
        for _ in range(steps):
            tokens += sum(d.token is not None for d in predictor.step(sequences, graph))
            sequences = [s if not s.finished else predictor.start(predictor.parse(request)) for s in sequences]
        wall = time.perf_counter() - tic
        return wall / steps * 1e3, tokens / wall, {k: v / steps * 1e3 for k, v in seconds.items()}

    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if args.busy else None
    try:
        for batch in batches:
            measure(batch, 50)  # warm-up: each batch shape once
        rounds: dict[int, list] = {batch: [] for batch in batches}
        for r in range(args.rounds if len(batches) > 1 else 1):
            for batch in batches if r % 2 == 0 else batches[::-1]:
                rounds[batch].append(measure(batch, args.steps))
    finally:
        if spinner is not None:
            spinner.kill()
    print(f"{cpu_name()}, {time.strftime('%Y-%m-%d %H:%M')}; threads {args.threads or 'all'}"
          f"{', a busy process beside it' if args.busy else ''}")
    median = {}
    for batch, results in rounds.items():
        ms, rate, parts = sorted(results, key=lambda row: row[1])[len(results) // 2]  # the median round
        median[batch] = rate
        print(f"batch {batch}: {ms:.3f} ms per step, {rate:,.0f} tokens/s"
              f"{' (rounds: ' + ', '.join(f'{row[1]:,.0f}' for row in results) + ')' if len(results) > 1 else ''}")
        for name, value in parts.items():
            print(f"  {name:<14} {value:.3f} ms per step")
    if len(batches) > 1:
        print(f"tokens/s at batch {batches[-1]} / batch {batches[0]}: {median[batches[-1]] / median[batches[0]]:.2f}x")


if __name__ == "__main__":
    main()
