"""Serving throughput of this checkout against another source tree, side by side: the cost of a server change.

    python bench/serve_ab.py --package PACKAGE --other-src ../old-checkout/src [--rounds 3] [--duration-s 5]

Both servers are real `modelworks serve` processes (bench/serve.py's Server and closed-loop clients, batching
on, ONNX Runtime) on the same package, started in turn: other, this, other, this, ... so that the machine's drift
falls on both alike. Each round measures 8 and 32 clients; the table gives the medians and the ratio. Writes
bench/results/serve_ab.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import serve as bench  # noqa: E402  (bench/serve.py: Server, encode_requests, run_levels)

CLIENTS = (8, 32)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--package", required=True)
    parser.add_argument("--other-src", required=True, help="the src/ folder of the other checkout")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration-s", type=float, default=5.0)
    parser.add_argument("--out", default=str(bench.ROOT / "bench" / "results" / "serve_ab.json"))
    args = parser.parse_args()

    from modelworks.export.package import read_package

    package = read_package(args.package)
    requests = bench.encode_requests(package.manifest, package.name)
    roots = {"other": Path(args.other_src).resolve().parent, "this": bench.ROOT}
    results = {side: {clients: [] for clients in CLIENTS} for side in roots}
    for round_ in range(args.rounds):
        for side, root in roots.items():
            bench.ROOT = root  # Server puts ROOT/src first on the server process's PYTHONPATH
            server = bench.Server(Path(args.package), "onnx", 32, 2.0, 256, None)
            try:
                for clients in CLIENTS:
                    row = bench.run_levels(server, requests, (clients,), args.duration_s, 1.0)[0]
                    results[side][clients].append({"rps": row["throughput_rps"], "p99_ms": row["p99_ms"]})
            finally:
                server.stop()
    print("\n| clients | other: req/s (median) | this: req/s (median) | this / other | p99 ms other | p99 ms this |")
    print("|---|---|---|---|---|---|")
    summary = {}
    for clients in CLIENTS:
        median = {side: statistics.median(r["rps"] for r in results[side][clients]) for side in roots}
        p99 = {side: statistics.median(r["p99_ms"] for r in results[side][clients]) for side in roots}
        summary[clients] = {"other_rps": median["other"], "this_rps": median["this"],
                            "ratio": median["this"] / median["other"], "other_p99_ms": p99["other"],
                            "this_p99_ms": p99["this"]}
        print(f"| {clients} | {median['other']:.0f} | {median['this']:.0f} | {median['this'] / median['other']:.3f} "
              f"| {p99['other']:.1f} | {p99['this']:.1f} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"package": args.package, "other_src": args.other_src, "rounds": results,
                               "summary": summary, "command": " ".join(["python", *sys.argv])}, indent=2) + "\n")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
