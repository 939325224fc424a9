"""Serving benchmark: closed-loop load on loopback against `modelworks serve`, batching on and off.

    python bench/serve.py --package runs/classification/NAME/package [--duration-s 10]

For each server configuration a real `modelworks serve` process is started on 127.0.0.1 (ONNX Runtime; its JSON
request log goes to /dev/null, so it is formatted as in production but not stored), and N clients each send
one request, wait for the answer, and send the next, for a fixed time: 1, 8, 32 and 64 clients. Batching is
compared with the same server at batch size 1 twice: with the same runtime threads, and with one thread, which
a batch of one often runs faster on (a small graph gains little from a second thread); the speed-up is taken
against the faster of the two. Requests are
the JSON API with base64 PNGs of real Fashion-MNIST test images (when installed; generated images otherwise),
encoded once before the clock starts.

The load generator shares the machine's cores with the server, so it is kept light: one process, one asyncio
loop, raw HTTP/1.1 keep-alive connections, pre-encoded requests, and only the status line and Content-Length
parsed. What it costs the server is included in the figures.

Then: past saturation (a server with a small queue bound, many more clients than it holds) every request must
come back 200 or 503 with Retry-After, never a timeout or a dropped connection, the server's 200 count must
match the clients', and the server must still be healthy; int8 vs fp32 ONNX at 32 clients side by side, with
the accuracy drop and the graph-level speed-up the export measured. Prints tables, writes
bench/results/serve.json.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

CLIENTS = (1, 8, 32, 64)
SINGLE_THREAD = "no batching (batch size 1), 1 runtime thread"


# ---------------------------------------------------------------------------------------------- requests


def test_images(n: int, channels: int, size: int) -> list[np.ndarray]:
    """Real Fashion-MNIST test images when the model is a 28x28 grayscale one and the data is installed."""
    if (channels, size) == (1, 28):
        try:
            from modelworks.data.images import load_fashion_mnist
            images = load_fashion_mnist(ROOT / "data", "test", download=False).images[:n, 0].numpy()
            return list(images)
        except Exception as exc:  # DataError when absent: the bench still runs on generated images
            print(f"(Fashion-MNIST not found: {exc.__class__.__name__}; using generated images)")
    rng = np.random.default_rng(0)
    shape = (size, size) if channels == 1 else (size, size, channels)
    return [rng.integers(0, 256, shape, np.uint8) for _ in range(n)]


def encode_requests(manifest: dict, model_name: str, n: int = 64) -> list[bytes]:
    from PIL import Image

    pre = manifest["predictor"]["preprocessing"]
    requests = []
    for pixels in test_images(n, pre["channels"], pre["height"]):
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        body = json.dumps({"image": base64.b64encode(buffer.getvalue()).decode(), "top_k": 5}).encode()
        head = (f"POST /v1/models/{model_name}/predict HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
        requests.append(head + body)
    return requests


# ---------------------------------------------------------------------------------------------- load generator


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            key, value = line.split(":", 1)
            headers[key.strip().lower()] = value.strip()
    await reader.readexactly(int(headers.get("content-length", "0")))
    return status, headers


async def client(port: int, requests: list[bytes], offset: int, start_at: float, stop_at: float,
                 results: list, errors: list) -> None:
    loop = asyncio.get_running_loop()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError as exc:
        errors.append(f"connect: {exc}")
        return
    i = offset
    try:
        while True:
            now = loop.time()
            if now >= stop_at:
                break
            tic = time.perf_counter()
            writer.write(requests[i % len(requests)])
            i += 1
            try:
                # asyncio.timeout, not wait_for: wait_for wraps each read in a task of its own (Python 3.11), which
                # cost the load generator CPU that the server on the same cores then lacked.
                async with asyncio.timeout(30):
                    status, headers = await read_response(reader)
            except (asyncio.IncompleteReadError, ConnectionError, TimeoutError) as exc:
                errors.append(f"{type(exc).__name__}")
                break
            if now >= start_at:  # the first moments warm the connections up and are not counted
                results.append((time.perf_counter() - tic, status, headers.get("retry-after")))
    finally:
        writer.close()


async def closed_loop(port: int, requests: list[bytes], clients: int, duration_s: float, warmup_s: float) -> dict:
    loop = asyncio.get_running_loop()
    start_at = loop.time() + warmup_s
    stop_at = start_at + duration_s
    results, errors = [], []
    await asyncio.gather(*(client(port, requests, k, start_at, stop_at, results, errors) for k in range(clients)))
    latencies = np.array([r[0] for r in results if r[1] == 200]) * 1000
    statuses: dict[str, int] = {}
    for _, status, _ in results:
        statuses[str(status)] = statuses.get(str(status), 0) + 1
    ok = int((np.array([r[1] for r in results]) == 200).sum()) if results else 0
    retry_after_ok = all(r[2] is not None for r in results if r[1] == 503)
    percentile = lambda q: float(np.percentile(latencies, q)) if len(latencies) else float("nan")  # noqa: E731
    return {"clients": clients, "duration_s": duration_s, "requests": len(results), "ok": ok,
            "throughput_rps": ok / duration_s, "p50_ms": percentile(50), "p95_ms": percentile(95),
            "p99_ms": percentile(99), "statuses": statuses, "connection_errors": errors,
            "errors": len(results) - ok + len(errors), "retry_after_on_every_503": retry_after_ok}


# ---------------------------------------------------------------------------------------------- server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, package: Path, runtime: str, max_batch_size: int, max_wait_ms: float, max_queue: int,
                 threads: int | None, extra: list[str] | None = None):
        self.port = free_port()
        args = [sys.executable, "-m", "modelworks", "serve", str(package), "--port", str(self.port),
                "--runtime", runtime, "--max-batch-size", str(max_batch_size), "--max-wait-ms", str(max_wait_ms),
                "--max-queue", str(max_queue)]
        if threads:
            args += ["--threads", str(threads)]
        args += extra or []
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
        env.pop("MODELWORKS_ADMIN_TOKEN", None)
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        self.wait_ready()

    def get(self, path: str) -> tuple[int, str]:
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        return int(head.split(b" ", 2)[1]), body.decode()

    def wait_ready(self, timeout_s: float = 120) -> None:
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(f"the server exited with {self.process.returncode} before it was ready")
            try:
                if self.get("/readyz")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise SystemExit("the server did not become ready")

    def ok_count(self) -> int:
        _, text = self.get("/metrics")
        return int(sum(float(m) for m in re.findall(r'modelworks_requests_total\{[^}]*status="200"[^}]*\} (\S+)',
                                                    text)))

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=60)


# ---------------------------------------------------------------------------------------------- the runs


def run_levels(server: Server, requests: list[bytes], levels, duration_s: float, warmup_s: float) -> list[dict]:
    rows = []
    for clients in levels:
        row = asyncio.run(closed_loop(server.port, requests, clients, duration_s, warmup_s))
        rows.append(row)
        print(f"    {clients:>3} clients: {row['throughput_rps']:8.1f} req/s  p50 {row['p50_ms']:6.2f} ms  "
              f"p99 {row['p99_ms']:7.2f} ms  errors {row['errors']}", flush=True)
    return rows


def graph_table(package_dir: Path, manifest: dict, repeats: int = 200) -> list[dict]:
    """The exported graph alone (ONNX Runtime, no server): median ms per image at batch 1 and 32, on 1 and 2
    threads. It bounds what batching can gain: a batching server cannot beat 1 / (batched ms per image)."""
    import onnxruntime as ort

    spec = manifest["predictor"]["inputs"][0]
    shape = [d for d in spec["shape"][1:]]
    rows = []
    for threads in (1, 2):
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        session = ort.InferenceSession(str(package_dir / "model.onnx"), options, providers=["CPUExecutionProvider"])
        for batch in (1, 32):
            x = np.random.default_rng(0).standard_normal([batch, *shape]).astype(np.float32)
            for _ in range(20):
                session.run(None, {spec["name"]: x})
            times = []
            for _ in range(repeats if batch == 1 else repeats // 8):
                tic = time.perf_counter()
                session.run(None, {spec["name"]: x})
                times.append((time.perf_counter() - tic) * 1000 / batch)
            rows.append({"threads": threads, "batch": batch, "ms_per_image": round(float(np.median(times)), 3)})
            print(f"  graph alone, {threads} thread(s), batch {batch:>2}: {rows[-1]['ms_per_image']:.3f} ms/image",
                  flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--package", required=True, help="a model package (modelworks export RUN --quantize int8)")
    parser.add_argument("--duration-s", type=float, default=10.0, help="measured time per concurrency level")
    parser.add_argument("--warmup-s", type=float, default=1.0)
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--max-wait-ms", type=float, default=2.0)
    parser.add_argument("--threads", type=int, help="runtime threads in the server (default: all)")
    parser.add_argument("--overload-clients", type=int, default=256)
    parser.add_argument("--overload-queue", type=int, default=16)
    parser.add_argument("--graph-only", action="store_true", help="only time the exported graph alone, no server")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "serve.json"))
    args = parser.parse_args()

    from modelworks.export.package import read_package

    package = read_package(args.package)
    manifest = package.manifest
    requests = encode_requests(manifest, package.name)
    results = {"package": str(args.package), "model": package.name, "version": package.version,
               "duration_s": args.duration_s, "cpu_count": os.cpu_count(), "configs": {}}
    print("the exported graph alone (ONNX Runtime, median):", flush=True)
    results["graph"] = graph_table(Path(args.package), manifest)
    if args.graph_only:
        return 0

    configs = {"batching": ("onnx", args.max_batch_size, args.max_wait_ms, args.threads),
               "no batching (batch size 1)": ("onnx", 1, 0.0, args.threads)}
    if args.threads != 1:
        configs[SINGLE_THREAD] = ("onnx", 1, 0.0, 1)
    for label, (runtime, max_batch, max_wait, threads) in configs.items():
        print(f"\n{label}: runtime {runtime}, max_batch_size {max_batch}, max_wait_ms {max_wait}, threads "
              f"{threads or 'all'}", flush=True)
        server = Server(Path(args.package), runtime, max_batch, max_wait, 256, threads)
        try:
            results["configs"][label] = run_levels(server, requests, CLIENTS, args.duration_s, args.warmup_s)
        finally:
            server.stop()

    int8 = "int8" in package.runtimes()
    if int8:
        print(f"\nint8 with batching at 32 clients", flush=True)
        server = Server(Path(args.package), "int8", args.max_batch_size, args.max_wait_ms, 256, args.threads)
        try:
            results["configs"]["batching, int8"] = run_levels(server, requests, (32,), args.duration_s, args.warmup_s)
        finally:
            server.stop()

    print(f"\npast saturation: {args.overload_clients} clients, queue bound {args.overload_queue}", flush=True)
    server = Server(Path(args.package), "onnx", args.max_batch_size, args.max_wait_ms, args.overload_queue,
                    args.threads)
    try:
        before = server.ok_count()
        overload = asyncio.run(closed_loop(server.port, requests, args.overload_clients, args.duration_s, 0.0))
        server_ok = server.ok_count() - before
        healthy = server.get("/healthz")[0] == 200 and server.get("/readyz")[0] == 200
    finally:
        exit_code = server.stop()
    overload.update(server_ok=server_ok, healthy_after=healthy, exit_code=exit_code,
                    only_200_and_503=set(overload["statuses"]) <= {"200", "503"} and not overload["connection_errors"])
    results["overload"] = overload
    print(f"    statuses {overload['statuses']}, connection errors {len(overload['connection_errors'])}, "
          f"server counted {server_ok} answered (clients {overload['ok']}), healthy after: {healthy}, "
          f"exit code {exit_code}")

    report(results, manifest, int8)
    results["command"] = " ".join(["python", *sys.argv])
    results["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {out}")
    return 0


def report(results: dict, manifest: dict, int8: bool) -> None:
    batched = {r["clients"]: r for r in results["configs"]["batching"]}
    single = {r["clients"]: r for r in results["configs"]["no batching (batch size 1)"]}
    one_thread = {r["clients"]: r for r in results["configs"].get(SINGLE_THREAD, [])}
    rps = lambda row: max(row["throughput_rps"], 1e-9)  # noqa: E731
    best_single = {c: max([single[c], *([one_thread[c]] if one_thread else [])], key=rps) for c in CLIENTS}
    print("\n| clients | batching: req/s | p50 ms | p95 ms | p99 ms | errors | batch size 1: req/s | p50 ms | p99 ms "
          "| errors |" + (" batch size 1, 1 thread: req/s | p50 ms | p99 ms | errors |" if one_thread else "")
          + " speed-up (same threads) | speed-up (best batch size 1) |")
    print("|---" * (12 + 4 * bool(one_thread)) + "|")
    for clients in CLIENTS:
        b, s = batched[clients], single[clients]
        row = (f"| {clients} | {b['throughput_rps']:.0f} | {b['p50_ms']:.1f} | {b['p95_ms']:.1f} | {b['p99_ms']:.1f} "
               f"| {b['errors']} | {s['throughput_rps']:.0f} | {s['p50_ms']:.1f} | {s['p99_ms']:.1f} | {s['errors']} |")
        if one_thread:
            t = one_thread[clients]
            row += f" {t['throughput_rps']:.0f} | {t['p50_ms']:.1f} | {t['p99_ms']:.1f} | {t['errors']} |"
        print(row + f" {rps(b) / rps(s):.2f}x | {rps(b) / rps(best_single[clients]):.2f}x |")
    ratio = rps(batched[32]) / rps(best_single[32])
    results["speedup_at_32_clients"] = {"same_threads": rps(batched[32]) / rps(single[32]), "best_batch_size_1": ratio}
    below = [r for config in results["configs"].values() for r in config if r["clients"] in CLIENTS]
    overload = results["overload"]
    targets = {
        "batching >= 3x batch-size-1 throughput at 32 clients (the faster batch-size-1 server)": (
            ratio >= 3, f"{ratio:.2f}x"),
        "p99 <= 50 ms at 8 clients (batching)": (batched[8]["p99_ms"] <= 50, f"{batched[8]['p99_ms']:.1f} ms"),
        "zero errors below saturation (1-64 clients, queue 256)": (sum(r["errors"] for r in below) == 0,
                                                                   f"{sum(r['errors'] for r in below)} errors"),
        "past saturation: only 200 or 503 + Retry-After, no lost request, server healthy": (
            overload["only_200_and_503"] and overload["retry_after_on_every_503"] and overload["healthy_after"]
            and overload["server_ok"] == overload["ok"] and overload["exit_code"] in (0, -signal.SIGTERM),
            f"{overload['statuses']}, server/clients 200s {overload['server_ok']}/{overload['ok']}"),
    }
    results["targets"] = {name: {"met": met, "value": value} for name, (met, value) in targets.items()}
    print()
    for name, (met, value) in targets.items():
        print(f"  {'MET ' if met else 'NOT '} {name}: {value}")
    if int8:
        q = manifest["int8"]
        fp32_acc = manifest["metrics"]["export"]["onnx"].get("acc1")
        int8_acc = manifest["metrics"]["export"]["int8"].get("acc1")
        served = results["configs"]["batching, int8"][0]
        print("\n| ONNX model | val acc1 | graph time batch 1 | graph time batch 32 | served req/s at 32 clients |")
        print("|---|---|---|---|---|")
        t = q["median_seconds"]
        print(f"| fp32 | {fp32_acc * 100:.2f}% | {t['1']['fp32'] * 1000:.3f} ms | {t['32']['fp32'] * 1000:.2f} ms | "
              f"{batched[32]['throughput_rps']:.0f} |")
        print(f"| int8 | {int8_acc * 100:.2f}% ({-q['drop']['acc1'] * 100:+.2f}) | {t['1']['int8'] * 1000:.3f} ms "
              f"({q['speedup']['1']:.2f}x) | {t['32']['int8'] * 1000:.2f} ms ({q['speedup']['32']:.2f}x) | "
              f"{served['throughput_rps']:.0f} ({served['throughput_rps'] / batched[32]['throughput_rps']:.2f}x) |")
        results["int8"] = {"fp32_val_acc1": fp32_acc, "int8_val_acc1": int8_acc, "graph_speedup": q["speedup"],
                           "served_rps_32": served["throughput_rps"]}


if __name__ == "__main__":
    raise SystemExit(main())
