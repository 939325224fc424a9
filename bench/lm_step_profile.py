"""The language-model predictor's step, timed by parts, outside the server: B sequences of the serving bench's
requests ("ROMEO:", 200 tokens, temperature 0.8) stepped together, a finished one replaced at once.

    python bench/lm_step_profile.py runs/language_model/NAME/package --batch 16 --threads 1

Prints ms per step and tokens/s, then the time per step in prefill, decode (graph call included), the batched
draw and the per-token text, and in each graph call alone. Run it under the CPU lock.
"""

from __future__ import annotations

import argparse
import collections
import time

from modelworks.inference import open_model
from modelworks.tasks.language_model.predictor import CompletionRequest
from machine import cpu_name  # bench/machine.py: bench/ is on sys.path when a script runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("package")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (default: all)")
    parser.add_argument("--steps", type=int, default=600)
    args = parser.parse_args()

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
    sequences = [predictor.start(predictor.parse(request)) for _ in range(args.batch)]

    def steps(n: int) -> int:
        nonlocal sequences
        tokens = 0
        for _ in range(n):
            tokens += sum(d.token is not None for d in predictor.step(sequences, graph))
            sequences = [s if not s.finished else predictor.start(predictor.parse(request)) for s in sequences]
        return tokens

    steps(50)  # warm-up
    seconds.clear()
    tic = time.perf_counter()
    tokens = steps(args.steps)
    wall = time.perf_counter() - tic
    print(f"{cpu_name()}, {time.strftime('%Y-%m-%d %H:%M')}; batch {args.batch}, threads {args.threads or 'all'}: "
          f"{wall / args.steps * 1e3:.3f} ms per step, {tokens / wall:,.0f} tokens/s")
    for name, value in seconds.items():
        print(f"  {name:<14} {value / args.steps * 1e3:.3f} ms per step")


if __name__ == "__main__":
    main()
