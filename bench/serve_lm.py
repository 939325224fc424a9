"""Streaming text serving: 1 vs 16 concurrent streaming clients against `modelworks serve` on a language model
package (continuous batching), then a burst past the queue bound.

    python bench/serve_lm.py runs/language_model/NAME/package [--requests 8] [--max-tokens 200]

Reports aggregate generated tokens/s at 1 and 16 clients and their ratio (target >= 5x), p50/p99 time to first
token (target p99 <= 100 ms at 16 clients), errors below the queue bound (target 0), and 503s past it; writes
bench/results/serve_lm.json. Each client sends its requests one after another, streamed, and reads every event.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
from machine import cpu_name  # bench/machine.py: bench/ is on sys.path when a script runs

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(package: str, port: int, *flags: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    process = subprocess.Popen([sys.executable, "-m", "modelworks", "serve", package, "--port", str(port),
                                "--log-level", "warning", *flags], env=env)
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    process.kill()
    raise RuntimeError("the server did not become ready")


async def one_stream(client: httpx.AsyncClient, url: str, prompt: str, max_tokens: int) -> dict:
    started = time.perf_counter()
    first = None
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.8, "stream": True,
            "stream_options": {"include_usage": True}}
    async with client.stream("POST", url, json=body) as response:
        if response.status_code != 200:
            await response.aread()
            return {"status": response.status_code}
        tokens = 0
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            if "error" in event:
                return {"status": 500}
            if first is None and event["choices"]:
                first = time.perf_counter()
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
    return {"status": 200, "ttft_s": first - started, "tokens": tokens}


async def run_clients(url: str, clients: int, requests: int, prompt: str, max_tokens: int) -> dict:
    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=clients + 4)) as client:
        async def worker():
            return [await one_stream(client, url, prompt, max_tokens) for _ in range(requests)]

        tic = time.perf_counter()
        results = [r for rs in await asyncio.gather(*(worker() for _ in range(clients))) for r in rs]
        seconds = time.perf_counter() - tic
    ok = [r for r in results if r["status"] == 200]
    ttft = np.array([r["ttft_s"] for r in ok]) * 1000
    tokens = sum(r["tokens"] for r in ok)
    return {"clients": clients, "requests": len(results), "errors": len(results) - len(ok),
            "tokens": tokens, "seconds": round(seconds, 3), "tokens_per_s": round(tokens / seconds, 1),
            "ttft_p50_ms": round(float(np.percentile(ttft, 50)), 1) if len(ttft) else None,
            "ttft_p99_ms": round(float(np.percentile(ttft, 99)), 1) if len(ttft) else None}


async def burst(url: str, clients: int, prompt: str, max_tokens: int) -> dict:
    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=clients + 4)) as client:
        results = await asyncio.gather(*(one_stream(client, url, prompt, max_tokens) for _ in range(clients)))
    statuses = [r["status"] for r in results]
    return {"clients": clients, "ok": statuses.count(200), "503": statuses.count(503),
            "other": len(statuses) - statuses.count(200) - statuses.count(503)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("package")
    parser.add_argument("--requests", type=int, default=8, help="streamed requests per client")
    parser.add_argument("--max-tokens", type=int, default=200)
    parser.add_argument("--prompt", default="ROMEO:")
    parser.add_argument("--runtime", default="onnx")
    args = parser.parse_args()

    port = free_port()
    url = f"http://127.0.0.1:{port}/v1/completions"
    server = start_server(args.package, port, "--runtime", args.runtime, "--max-running", "32", "--max-queue", "64")
    try:
        asyncio.run(run_clients(url, 2, 1, args.prompt, 20))  # warm-up
        rows = [asyncio.run(run_clients(url, c, args.requests, args.prompt, args.max_tokens)) for c in (1, 16)]
    finally:
        server.terminate()
        server.wait(60)
    port = free_port()
    url = f"http://127.0.0.1:{port}/v1/completions"
    server = start_server(args.package, port, "--runtime", args.runtime, "--max-running", "4", "--max-queue", "4")
    try:
        overload = asyncio.run(burst(url, 32, args.prompt, args.max_tokens))
    finally:
        server.terminate()
        server.wait(60)

    ratio = rows[1]["tokens_per_s"] / rows[0]["tokens_per_s"]
    print(f"{'clients':>8} {'requests':>9} {'errors':>7} {'tokens/s':>9} {'TTFT p50 ms':>12} {'TTFT p99 ms':>12}")
    for row in rows:
        print(f"{row['clients']:>8} {row['requests']:>9} {row['errors']:>7} {row['tokens_per_s']:>9} "
              f"{row['ttft_p50_ms']:>12} {row['ttft_p99_ms']:>12}")
    print(f"aggregate tokens/s, 16 vs 1 clients: {ratio:.2f}x (target >= 5x); p99 TTFT at 16: "
          f"{rows[1]['ttft_p99_ms']} ms (target <= 100)")
    print(f"burst of {overload['clients']} past --max-running 4 --max-queue 4: {overload['ok']} answered, "
          f"{overload['503']} refused 503, {overload['other']} other")
    result = {"command": " ".join(["python", "bench/serve_lm.py", *sys.argv[1:]]), "cpu": cpu_name(),
              "date": time.strftime("%Y-%m-%d"), "package": args.package, "max_tokens": args.max_tokens,
              "rows": rows, "ratio_16_vs_1": round(ratio, 2), "overload": overload}
    out = ROOT / "bench" / "results" / "serve_lm.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"-> {out}")


if __name__ == "__main__":
    main()
