"""The decompression bombs of issue 10, one at a time against an otherwise idle `modelworks serve`: how long each
takes to be refused and what it costs the server's memory.

    python bench/bombs.py --package runs/classification/NAME/package [--repeats 10] [--lock FILE]

The bombs are bench/soak.py's: a PNG of --bomb-side squared zero pixels (3.5 MB for 60000x60000, sent as a
multipart upload), a 35-byte GIF with a 20000x20000 screen, and a GIF of 1000 frames. Each is sent --repeats
times, one after another, on a new connection, with resize=true. Time runs from the first byte sent to the
answer; the memory is the server's peak resident set (VmHWM, reset before each request through
/proc/PID/clear_refs, which needs root or the same user) minus its resident set before. The soak measures the
same bombs under load, mixed with other traffic. Writes bench/results/bombs.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import soak  # noqa: E402  (bench/soak.py: the bombs, the server process, one exchange)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--package", required=True)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--bomb-side", type=int, default=60000)
    parser.add_argument("--lock", metavar="FILE", help="hold an flock on FILE while measuring")
    parser.add_argument("--out", default=str(soak.ROOT / "bench" / "results" / "bombs.json"))
    args = parser.parse_args()

    from modelworks.export.package import read_package

    package = read_package(args.package)
    _, kinds, _ = soak.build_kinds(package.name, package.manifest, args.bomb_side)
    bombs = [kind for kind in kinds if kind.heavy]
    results = {}
    with soak.held(args.lock):
        server = soak.Server(Path(args.package), "onnx", "unused-token")
        try:
            server.wait_ready()
            clear_refs = Path(f"/proc/{server.process.pid}/clear_refs")
            for kind in bombs:
                rows = []
                for _ in range(args.repeats):
                    rss_before, _ = server.memory_mb()
                    clear_refs.write_text("5")
                    outcome = asyncio.run(soak.exchange(server.port, kind.parts, timeout_s=120))
                    _, peak = server.memory_mb()
                    rows.append({"ms": outcome.ms, "status": outcome.status, "error": outcome.error,
                                 "extra_peak_mb": peak - rss_before})
                results[kind.name] = {
                    "statuses": sorted({str(r["status"] or r["error"]) for r in rows}),
                    "median_ms": statistics.median(r["ms"] for r in rows), "max_ms": max(r["ms"] for r in rows),
                    "max_extra_peak_mb": max(r["extra_peak_mb"] for r in rows), "rows": rows}
            healthy = server.get("/healthz") == 200 and server.get("/readyz") == 200
        finally:
            exit_code = server.stop()
    print("\n| bomb | statuses | median ms | max ms | largest extra peak RSS MB |")
    print("|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {', '.join(r['statuses'])} | {r['median_ms']:.1f} | {r['max_ms']:.1f} | "
              f"{r['max_extra_peak_mb']:.1f} |")
    print(f"\nhealthy after: {healthy}; exit code {exit_code}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"package": args.package, "repeats": args.repeats, "bombs": results,
                               "healthy_after": healthy, "command": " ".join(["python", *sys.argv])}, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
