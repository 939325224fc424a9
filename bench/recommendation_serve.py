"""Live recommendation serving on ml-100k, in one run on one CPU: event ingestion into the SQLite event store, and
GET /recommend at 32 concurrent clients with each user's history read live from that store, against a plain
FastAPI + uvicorn server returning ALS scores from memory (bench/recommendation_plain_server.py).

    flock LOCKFILE python bench/recommendation_serve.py [--data ../shared/data/movielens/ml-100k]

1. A SASRec (the sasrec recipe, max_len 50) trains for --train-s seconds and is exported (ONNX): its quality is
   not measured here (bench/recommendation.py does), only its serving cost.
2. `modelworks serve PACKAGE --events sqlite:...`: all 100,000 ml-100k ratings are posted to /v1/events, in
   batches of 100 from 8 clients, then single events from 32 clients; the store must then hold every event once
   (re-posting a slice stores nothing).
3. /recommend?user=U&k=10&exclude=seen for random users, 32 closed-loop clients: the server reads each user's
   latest 50 events from SQLite, runs the graph in dynamic batches and masks what was seen.
4. The same load against the plain server (implicit's ALS, trained in the bench venv
   ~/.cache/modelworks-bench-venv; its factors are served by FastAPI in this Python).
Steps 3 and 4 (and ours with --no-hot-routes under --full-stack, and with each --variant's flags) alternate: one
warm-up round each, then --rounds rounds, the order reversed every other round; the table shows each server's median
round, and the ratio is that of the medians. Prints a table and writes bench/results/recommendation_serve.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

from serve import Server, closed_loop, free_port, read_response  # noqa: E402  bench/serve.py's load generator

BENCH_VENV = Path(os.environ.get("MODELWORKS_BENCH_VENV", Path.home() / ".cache" / "modelworks-bench-venv"))
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "movielens" / "ml-100k"

ALS_SCRIPT = """
import sys, numpy as np, scipy.sparse as sp
from implicit.als import AlternatingLeastSquares
rows = [line.split("\\t") for line in open(sys.argv[1] + "/u.data")]
users = sorted({r[0] for r in rows}, key=int); items = sorted({r[1] for r in rows}, key=int)
u_of = {u: i for i, u in enumerate(users)}; i_of = {x: i for i, x in enumerate(items)}
m = sp.csr_matrix((np.ones(len(rows), np.float32), ([u_of[r[0]] for r in rows], [i_of[r[1]] for r in rows])),
                  shape=(len(users), len(items)))
model = AlternatingLeastSquares(factors=64, iterations=15, random_state=0)
model.fit(m, show_progress=False)
np.savez(sys.argv[2], user_factors=np.asarray(model.user_factors), item_factors=np.asarray(model.item_factors),
         user_ids=np.array(users), item_ids=np.array(items), seen=m.indices, seen_offsets=m.indptr)
"""


def post(path: str, body: bytes) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def get(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()


async def send_all(port: int, requests: list[bytes], clients: int) -> dict:
    """Each request exactly once, from `clients` keep-alive connections; statuses counted."""
    queue = list(reversed(requests))
    statuses: dict[int, int] = {}

    async def worker():
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        while queue:
            writer.write(queue.pop())
            status, _ = await read_response(reader)
            statuses[status] = statuses.get(status, 0) + 1
        writer.close()

    tic = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(clients)))
    return {"seconds": time.perf_counter() - tic, "statuses": statuses}


def run(coroutine):
    """asyncio.run on uvloop when installed (it is, with uvicorn[standard]): the load generator shares the cores with
    the server it measures, so it should cost as little as it can; both servers face the same generator."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coroutine)
    return uvloop.run(coroutine)


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process, all its threads (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(port: int, pid: int, requests: list[bytes], args) -> dict:
    """closed_loop's figures, plus the load generator's and the server's CPU time per answered request."""
    before, server_before = resource.getrusage(resource.RUSAGE_SELF), process_cpu_s(pid)
    row = run(closed_loop(port, requests, args.clients, args.duration_s, args.warmup_s))
    after, server_after = resource.getrusage(resource.RUSAGE_SELF), process_cpu_s(pid)
    cpu_s = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    counted = max(1, row["requests"]) * (args.duration_s + args.warmup_s) / args.duration_s  # warm-up included
    row["generator_cpu_us_per_request"] = cpu_s / counted * 1e6
    row["server_cpu_us_per_request"] = (server_after - server_before) / counted * 1e6
    return row


def read_ratings(folder: Path) -> list[tuple[str, str, float]]:
    return [(u, i, float(t)) for u, i, _, t in (line.split("\t") for line in (folder / "u.data").read_text().splitlines())]


def train_package(data: Path, work: Path, train_s: float) -> Path:
    from modelworks.cli import main

    assert main(["train", "recommendation", "--recipe", "sasrec", "--data", f"movielens:{data}", "--name", "live",
                 "--set", f"output_dir={work / 'runs'}", "--set", f"train.time_budget_s={train_s}",
                 "--set", "train.test_at_end=false"]) == 0
    package = work / "package"
    assert main(["export", str(work / "runs" / "recommendation" / "live"), "--out", str(package), "--version", "1",
                 "--format", "onnx"]) == 0
    return package


def start_plain_server(data: Path, work: Path) -> tuple[subprocess.Popen, int]:
    """The baseline: implicit's ALS (trained in the bench venv) served from memory; (process, port) once it answers."""
    factors = work / "als.npz"
    subprocess.run([str(BENCH_VENV / "bin" / "python"), "-c", ALS_SCRIPT, str(data), str(factors)], check=True)
    port = free_port()
    plain = subprocess.Popen([sys.executable, str(ROOT / "bench" / "recommendation_plain_server.py"), str(factors),
                              "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/recommend?user=1&k=10", timeout=2)
            return plain, port
        except OSError:
            if time.time() > deadline:
                plain.terminate()
                raise SystemExit("the plain server did not start")
            time.sleep(0.2)


MEDIANS = ("throughput_rps", "p50_ms", "p95_ms", "p99_ms", "generator_cpu_us_per_request",
           "server_cpu_us_per_request")


def alternate(servers: dict[str, tuple[int, int, list[bytes]]], args) -> dict[str, dict]:
    """Each server (label: (port, pid, requests)) under the same load in alternating rounds, the order reversed every
    other round, after one warm-up round each; per server its rounds and their medians. Why rounds: this machine's
    speed drifts by up to 2x within the hour, so servers measured one after the other compare their time slots as
    much as themselves."""
    labels = list(servers)
    for label in labels:
        measure(*servers[label], args)  # warm-up: first batch shapes, caches, connections
    rounds: dict[str, list[dict]] = {label: [] for label in labels}
    for r in range(args.rounds):
        for label in labels if r % 2 == 0 else labels[::-1]:
            rounds[label].append(measure(*servers[label], args))
            row = rounds[label][-1]
            print(f"  round {r + 1}: {label:<12} {row['throughput_rps']:>8.1f} req/s, p99 {row['p99_ms']:.1f} ms",
                  flush=True)
    summary = {}
    for label, rows in rounds.items():
        summary[label] = {key: statistics.median(row[key] for row in rows) for key in MEDIANS}
        summary[label]["errors"] = sum(row["errors"] for row in rows)
        summary[label]["statuses"] = {code: sum(row["statuses"].get(code, 0) for row in rows)
                                      for code in sorted({code for row in rows for code in row["statuses"]})}
        summary[label]["rounds"] = rows
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--train-s", type=float, default=20.0)
    parser.add_argument("--package", help="serve this exported package instead of training one (its model must be "
                        "named 'live', as the bench's training names it)")
    parser.add_argument("--skip-plain", action="store_true", help="measure ours only (profiling; no ratio)")
    parser.add_argument("--full-stack", action="store_true", help="also measure ours with --no-hot-routes (the "
                        "query route through the framework's whole middleware stack), same store, same run")
    parser.add_argument("--variant", action="append", default=[], metavar="FLAGS",
                        help='also measure ours started with these extra `modelworks serve` flags, in the same '
                        'alternating rounds (repeatable), e.g. --variant "--threads 2"')
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds per server (medians reported)")
    parser.add_argument("--duration-s", type=float, default=6.0, help="measured seconds per round")
    parser.add_argument("--warmup-s", type=float, default=1.0, help="unmeasured seconds at the start of a round")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "recommendation_serve.json"))
    args = parser.parse_args()
    data = Path(args.data)
    if not (data / "u.data").is_file():
        raise SystemExit(f"--data: {data} has no u.data; give the ml-100k folder")
    cpu = next((line.split(":", 1)[1].strip() for line in subprocess.run(["lscpu"], capture_output=True, text=True)
                .stdout.splitlines() if line.startswith("Model name")), platform.processor())
    work = Path(tempfile.mkdtemp(prefix="rec-serve-"))
    ratings = read_ratings(data)
    users = sorted({u for u, _, _ in ratings})
    rng = random.Random(0)
    results: dict = {"cpu": cpu, "cores": os.cpu_count(), "date": time.strftime("%Y-%m-%d"), "clients": args.clients}

    package = Path(args.package) if args.package else train_package(data, work, args.train_s)
    store_url = f"sqlite:{work / 'events.db'}"
    ours = Server(package, "onnx", 32, 2.0, 256, None, extra=["--events", store_url])
    full = plain = None
    variants: list[Server] = []
    try:
        # Ingestion: batches, then single events; every event is stored once.
        bodies = [json.dumps([{"event_id": f"r{n}", "user": u, "item": i, "type": "rating", "ts": t}
                              for n, (u, i, t) in enumerate(ratings[s:s + 100], start=s)]).encode()
                  for s in range(0, len(ratings), 100)]
        batched = run(send_all(ours.port, [post("/v1/events", b) for b in bodies], 8))
        singles = [post("/v1/events", json.dumps({"event_id": f"s{n}", "user": f"new{n % 50}", "item": "50",
                                                    "ts": 2e9 + n}).encode()) for n in range(4000)]
        single = run(send_all(ours.port, singles, args.clients))
        again = run(send_all(ours.port, [post("/v1/events", b) for b in bodies[:50]], 8))  # duplicates
        from modelworks.events import EventStore

        store = EventStore(store_url)
        stored = store.count()
        store.close()
        results["ingestion"] = {
            "batched": {"events": len(ratings), "batch": 100, "clients": 8, "seconds": batched["seconds"],
                        "events_per_s": len(ratings) / batched["seconds"], "statuses": batched["statuses"]},
            "single": {"events": len(singles), "clients": args.clients, "seconds": single["seconds"],
                       "events_per_s": len(singles) / single["seconds"], "statuses": single["statuses"]},
            "reposted_duplicates": 5000, "stored": stored, "expected": len(ratings) + len(singles),
            "no_loss": stored == len(ratings) + len(singles) and again["statuses"] == {200: 50}}
        print(f"ingestion: {results['ingestion']['batched']['events_per_s']:.0f} events/s in batches of 100, "
              f"{results['ingestion']['single']['events_per_s']:.0f} events/s one per request; stored {stored} of "
              f"{len(ratings) + len(singles)} (no loss: {results['ingestion']['no_loss']})", flush=True)
        requests = [get(f"/v1/models/live/recommend?user={rng.choice(users)}&k=10&exclude=seen") for _ in range(2000)]
        servers = {"ours": (ours.port, ours.process.pid, requests)}
        if args.full_stack:
            full = Server(package, "onnx", 32, 2.0, 256, None, extra=["--events", store_url, "--no-hot-routes"])
            servers["ours_full_stack"] = (full.port, full.process.pid, requests)
        for flags in args.variant:
            variants.append(Server(package, "onnx", 32, 2.0, 256, None,
                                   extra=["--events", store_url, *shlex.split(flags)]))
            servers[f"ours {flags}"] = (variants[-1].port, variants[-1].process.pid, requests)
        if not args.skip_plain:
            plain, plain_port = start_plain_server(data, work)
            servers["plain_als"] = (plain_port, plain.pid,
                                    [get(f"/recommend?user={rng.choice(users)}&k=10") for _ in range(2000)])
        print(f"/recommend, {args.clients} clients: {args.rounds} alternating rounds of {args.duration_s:.0f} s",
              flush=True)
        results.update(alternate(servers, args))
    finally:
        ours.stop()
        for server in ([full] if full is not None else []) + variants:
            server.stop()
        if plain is not None:
            plain.terminate()
            plain.wait(timeout=30)

    ours_row, plain_row = results["ours"], results.get("plain_als")
    print(f"\n{cpu}, {os.cpu_count()} cores, {results['date']}; {args.clients} clients; median of {args.rounds} "
          f"rounds of {args.duration_s:.0f} s")
    print(f"{'server':<44} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7} {'client us/req':>13} "
          f"{'server us/req':>13}")
    for label, row in (("ours: SASRec, live history from SQLite", ours_row),
                       ("ours, through the whole middleware stack", results.get("ours_full_stack")),
                       *((f"ours {flags}", results.get(f"ours {flags}")) for flags in args.variant),
                       ("plain FastAPI + uvicorn, ALS from memory", plain_row)):
        if row is not None:
            print(f"{label:<44} {row['throughput_rps']:>8.1f} {row['p50_ms']:>8.2f} {row['p99_ms']:>8.2f} "
                  f"{row['errors']:>7} {row['generator_cpu_us_per_request']:>13.0f} "
                  f"{row['server_cpu_us_per_request']:>13.0f}")
    if plain_row is not None:
        results["ratio_rps"] = ours_row["throughput_rps"] / plain_row["throughput_rps"]
        results["ratio_rps_per_round"] = [o["throughput_rps"] / b["throughput_rps"]
                                          for o, b in zip(ours_row["rounds"], plain_row["rounds"])]
        results["targets"] = {"events_per_s>=2000": results["ingestion"]["single"]["events_per_s"] >= 2000,
                              "rps>=1.2x_plain": results["ratio_rps"] >= 1.2, "p99<=15ms": ours_row["p99_ms"] <= 15}
        print(f"ratio of the medians {results['ratio_rps']:.2f}x (per round: "
              f"{', '.join(f'{r:.2f}x' for r in results['ratio_rps_per_round'])}); targets: {results['targets']}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
