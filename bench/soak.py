"""Soak benchmark: a real `modelworks serve` under good, bad and hostile traffic for minutes, admin actions between.

    python bench/soak.py --package runs/classification/NAME/package [--duration-s 600] [--clients 32]

A classification package is served by a real `modelworks serve` process on 127.0.0.1 (a free port, ONNX Runtime,
the admin API on with a random MODELWORKS_ADMIN_TOKEN, the JSON log read and tallied by level). Then, after a
few seconds of warm-up that are not counted:

- baseline (--baseline-s): the good traffic alone, on keep-alive connections, JSON base64 and multipart uploads
  in turn, at a fixed rate: --good-load (default half) of the capacity the warm-up measured in a closed loop.
  Each request's latency runs from when it was due, so a server that stalls for seconds is charged for every
  request it kept waiting (a closed loop would only see the one in flight per client: coordinated omission);
- attack (--duration-s): the same good clients, plus attackers sending bad and hostile requests at --attack-rps
  in all, each on a connection of its own, plus an admin client acting every --admin-interval-s.

Of --clients, a quarter are attackers and the rest carry the good traffic, the same in both phases, so the
good requests' latencies compare like with like: the attack phase may only add what the hostile traffic costs.

Bad requests: malformed JSON, an unknown field, top_k true, undecodable bytes, an image of the wrong size, an
unknown model. Hostile ones: a PNG declaring --bomb-side squared pixels of zeros (the zlib stream written by
hand: about 3.5 MB for 60000x60000, sent as a multipart upload to fit the 4 MB body limit), a 35-byte GIF whose
logical screen is 20000x20000, a GIF of 1000 frames, a 1 MB X-Caller-Id header, stalled uploads (headers with a
Content-Length, half the body, then silence, until the server ends it or --stall-s passes), a Content-Length of
64 MB, and a 5 MB chunked body. The heavy ones (bombs, GIFs) go one at a time, at most one per
--heavy-interval-s, so that a server that does decode them takes no more than one decode's memory (a 60000x60000
bomb is 3.6 GB). Admin actions cycle: load a copy of the package as a second version, split, promote, rollback,
unload, and bad input (NaN and negative weights, an infinite load weight, unloading the version with the
traffic or the only version), each bad one followed by a repair. After the attack, with the traffic stopped:
the server's health, the last version attacked (a NaN split and its unload), then, if it still predicts, a PNG
with one flipped byte in its pixel data (once, last: a decoder that crashes takes the process with it).

Reported (printed, and written to bench/results/soak.json): requests by kind and status; p50/p99 of the good
requests in each phase and their ratio (target: attack p99 within 2x of baseline p99); time to answer each
hostile kind (target: bombs refused within 100 ms); the server's RSS over time (start, max, end, slope, the
growth of its floor) and after each unload of the second version, the same state each time (target: flat, a
slope <= 1 MB/min), after --settle-cycles load/unload cycles before the warm-up; CPU time per phase; admin outcomes; and everything unexpected (5xx,
connection errors, accepted bad input, unanswered requests, error log lines). The load generator shares the
machine with the server (one process, one asyncio loop, raw HTTP/1.1, pre-encoded requests), as in
bench/serve.py.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import fcntl
import io
import json
import os
import random
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from array import array
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

RESPONSE_TIMEOUT_S = 30.0  # a good request unanswered this long counts as an error
MAX_REQUESTS_PER_CLIENT = 10_000_000  # every loop is bounded in count as well as in time
MAX_CONSECUTIVE_ERRORS = 1000
PHASES = ("baseline", "attack")


# ---------------------------------------------------------------------------------------------- payloads


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bomb(side: int) -> bytes:
    """A valid 8-bit grayscale PNG of side x side zero pixels, built without ever holding them.

    The raw image data (a filter byte and `side` zero pixels per row) is all zeros, so the deflate stream is one
    block compressed once and repeated: after a full flush the compressor starts afresh, so each further 16 MB of
    zeros compresses to the same bytes. The zlib wrapper is written by hand; the Adler-32 of n zeros is
    (n mod 65521) << 16 | 1. About 3.5 MB for 60000 x 60000 (3.6 GB of pixels)."""
    total = side * (side + 1)
    block = 16 << 20
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)  # raw deflate
    repeated = compressor.compress(bytes(block)) + compressor.flush(zlib.Z_FULL_FLUSH)
    blocks, rest = divmod(total, block)
    tail = compressor.compress(bytes(rest)) + compressor.flush()
    deflate = repeated * blocks + tail
    adler = ((total % 65521) << 16) | 1
    idat = b"\x78\xda" + deflate + struct.pack(">I", adler)
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)  # 8-bit grayscale, no interlace
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def gif(screen: int, frames: int) -> bytes:
    """A GIF89a whose logical screen is screen x screen, with `frames` frames of one pixel each: 35 bytes for
    one frame, whatever the screen; a decoder that paints every frame on the screen allocates frames x screen^2
    x 3 bytes."""
    head = b"GIF89a" + struct.pack("<HHBBB", screen, screen, 0, 0, 0)  # no global colour table
    frame = (b"\x2c" + struct.pack("<HHHHB", 0, 0, 1, 1, 0x80) + b"\x00\x00\x00\xff\xff\xff"  # 1x1, 2 colours
             + b"\x02" + b"\x02\x44\x01\x00")  # LZW minimum code size 2; clear, pixel 0, end; block end
    return head + frame * frames + b"\x3b"


def png(pixels: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def http(method: str, path: str, body: bytes = b"", content_type: str | None = "application/json",
         headers: dict[str, str] | None = None, close: bool = True, length: int | None = None) -> bytes:
    """An HTTP/1.1 request's bytes; `length` declares a Content-Length other than the body's."""
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1"]
    if content_type:
        lines.append(f"Content-Type: {content_type}")
    chunked = "Transfer-Encoding" in (headers or {})
    if not chunked and (body or length is not None or method in ("POST", "PUT", "DELETE")):
        lines.append(f"Content-Length: {len(body) if length is None else length}")
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def multipart(fields: dict[str, str], file_field: str, file: bytes) -> tuple[bytes, str]:
    boundary = "soak" + secrets.token_hex(8)
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
             for name, value in fields.items()]
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{file_field}"; filename="upload"\r\n'
                 f"Content-Type: application/octet-stream\r\n\r\n".encode() + file + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


@dataclass
class Kind:
    """One kind of bad or hostile request: how to send it and what a good server answers."""

    name: str
    parts: list[bytes]  # written in order; a stalled upload stops after them
    weight: int = 2
    heavy: bool = False  # a decompression bomb: one at a time, at most one per --heavy-interval-s
    stall: bool = False  # hold the connection open after the parts, waiting for the server to end it
    cut_ok: bool = False  # a server may also answer 413 and close while the body is still coming (a reset here)


def build_kinds(model: str, manifest: dict, bomb_side: int) -> tuple[list[bytes], list[Kind], list[bytes]]:
    """The good requests (JSON and multipart, keep-alive), the bad and hostile kinds, and a damaged PNG upload,
    all encoded up front."""
    pre = manifest["predictor"]["preprocessing"]
    channels, height, width = int(pre["channels"]), int(pre["height"]), int(pre["width"])
    rng = np.random.default_rng(0)

    def image(h: int, w: int) -> bytes:
        return png(rng.integers(0, 256, (h, w) if channels == 1 else (h, w, channels), np.uint8))

    predict = f"/v1/models/{model}/predict"
    good = []
    for i in range(32):
        file = image(height, width)
        if i % 2 == 0:
            body = json.dumps({"image": base64.b64encode(file).decode(), "top_k": 5}).encode()
            good.append(http("POST", predict, body, close=False))
        else:
            body, content_type = multipart({"top_k": "5"}, "image", file)
            good.append(http("POST", predict, body, content_type, close=False))
    good_file = image(height, width)
    good_json = json.dumps({"image": base64.b64encode(good_file).decode()}).encode()

    def upload(file: bytes) -> list[bytes]:
        body, content_type = multipart({}, "image", file)
        return [http("POST", predict, body, content_type)]

    half = json.dumps({"image": base64.b64encode(image(height, width)).decode()}).encode()
    chunk = b"A" * 65536
    chunked = http("POST", predict, headers={"Transfer-Encoding": "chunked"})
    kinds = [
        Kind("bad: malformed JSON", [http("POST", predict, b'{"image": ')]),
        Kind("bad: unknown field", [http("POST", predict, good_json.replace(b'"image"', b'"imgae"'))]),
        Kind("bad: top_k true", [http("POST", predict, good_json[:-1] + b', "top_k": true}')]),
        Kind("bad: undecodable bytes", upload(rng.bytes(2000))),
        Kind("bad: wrong-size image", [http("POST", predict, json.dumps(
            {"image": base64.b64encode(image(height + 4, width + 4)).decode()}).encode())]),
        Kind("bad: unknown model", [http("POST", "/v1/models/no-such-model/predict", good_json)]),
        Kind(f"bomb: PNG {bomb_side}x{bomb_side}", upload(png_bomb(bomb_side)), weight=1, heavy=True),
        Kind("bomb: GIF with a 20000x20000 screen", upload(gif(20000, 1)), weight=1, heavy=True),
        Kind("bomb: GIF of 1000 frames", upload(gif(256, 1000)), weight=1, heavy=True),
        Kind("huge header: 1 MB X-Caller-Id", [http("POST", predict, good_json,
                                                    headers={"X-Caller-Id": "c" * (1 << 20)})], weight=1),
        Kind("stalled upload: half the body", [http("POST", predict, half[:len(half) // 2], length=len(half))],
             weight=1, stall=True),
        Kind("oversized: Content-Length 64 MB", [http("POST", predict, chunk, length=64 << 20)], weight=1,
             stall=True, cut_ok=True),
        Kind("oversized: 5 MB chunked", [chunked, *(b"10000\r\n" + chunk + b"\r\n" for _ in range(80)),
                                         b"0\r\n\r\n"], weight=1, cut_ok=True),
    ]
    return good, kinds, upload(damaged_png(good_file))


def damaged_png(data: bytes) -> bytes:
    """A PNG with one byte of its compressed pixel data flipped (its chunk CRC made right): what a flaky disk or
    network makes of a good upload. torchvision 0.29's PNG decoder crashes the process on it (libpng's error
    inside the row loop), so it is sent once, after the attack, not in the mix."""
    length = struct.unpack(">I", data[33:37])[0]  # the first chunk after IHDR is the IDAT
    damaged = bytearray(data)
    damaged[41 + length // 2] ^= 0xFF
    damaged[41 + length:45 + length] = struct.pack(">I", zlib.crc32(bytes(damaged[37:41 + length])))
    return bytes(damaged)


def copy_package_as_version(package: Path, out: Path, version: str) -> Path:
    """A copy of a package under another version (the manifest is not covered by the checksums, its files are)."""
    shutil.copytree(package, out)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["version"] = version
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


# ---------------------------------------------------------------------------------------------- HTTP


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            key, value = line.split(":", 1)
            headers[key.strip().lower()] = value.strip()
    if "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    elif "chunked" in headers.get("transfer-encoding", "").lower():
        body = b""
        for _ in range(10_000):
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            body += (await reader.readexactly(size + 2))[:-2]
            if size == 0:
                break
    else:
        body = await reader.read(1 << 20)  # until the server closes
    return status, headers, body


@dataclass
class Outcome:
    ms: float
    status: int | None = None
    error: str | None = None
    body: bytes = b""


async def exchange(port: int, parts: list[bytes], timeout_s: float, hold_s: float = 0.0) -> Outcome:
    """Send `parts` on a new connection and wait for the answer, reading while still sending (a server may answer
    early, e.g. 413, and close). With `hold_s`, the connection then stays open, silent, until answered."""
    tic = time.perf_counter()
    elapsed = lambda: (time.perf_counter() - tic) * 1000  # noqa: E731
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 5)
    except (OSError, TimeoutError) as exc:
        return Outcome(elapsed(), error=f"connect: {type(exc).__name__}")

    async def send():
        for part in parts:
            writer.write(part)
            await writer.drain()
        if hold_s:
            await asyncio.sleep(hold_s)

    sender = asyncio.create_task(send())
    try:
        status, _, body = await asyncio.wait_for(read_response(reader), timeout_s)
        return Outcome(elapsed(), status, body=body[:400])
    except asyncio.IncompleteReadError:
        return Outcome(elapsed(), error="closed by the server without an answer")
    except ConnectionError as exc:
        return Outcome(elapsed(), error=f"connection: {type(exc).__name__}")
    except TimeoutError:
        return Outcome(elapsed(), error=f"no answer within {timeout_s:g} s")
    finally:
        sender.cancel()
        await asyncio.gather(sender, return_exceptions=True)
        writer.close()


# ---------------------------------------------------------------------------------------------- tallies


@dataclass
class Tally:
    """Outcomes of one kind of request in one phase."""

    ms: array = field(default_factory=lambda: array("d"))
    statuses: Counter = field(default_factory=Counter)
    errors: Counter = field(default_factory=Counter)
    examples: dict = field(default_factory=dict)  # first answer body per status or error

    def add(self, outcome: Outcome) -> None:
        self.ms.append(outcome.ms)
        key = str(outcome.status) if outcome.status is not None else outcome.error
        (self.statuses if outcome.status is not None else self.errors)[key] += 1
        if key not in self.examples and len(self.examples) < 8:
            self.examples[key] = outcome.body.decode("utf-8", "replace")[:300]

    def summary(self, seconds: float | None = None) -> dict:
        ms = np.frombuffer(self.ms, dtype=np.float64)
        stat = lambda f: round(float(f(ms)), 2) if len(ms) else None  # noqa: E731
        ok = self.statuses.get("200", 0)
        return {"requests": len(self.ms), "statuses": dict(self.statuses), "errors": dict(self.errors),
                "ok_per_s": round(ok / seconds, 1) if seconds else None, "p50_ms": stat(lambda x: np.percentile(x, 50)),
                "p99_ms": stat(lambda x: np.percentile(x, 99)), "max_ms": stat(np.max), "examples": self.examples}


class Clock:
    """Which phase a moment belongs to: warm-up, baseline, attack, or after."""

    def __init__(self, warmup_s: float, baseline_s: float, duration_s: float):
        self.start = time.perf_counter()
        self.baseline_at = self.start + warmup_s
        self.attack_at = self.baseline_at + baseline_s
        self.stop_at = self.attack_at + duration_s

    def phase(self, t: float | None = None) -> str:
        t = time.perf_counter() if t is None else t
        return ("warmup" if t < self.baseline_at else "baseline" if t < self.attack_at else
                "attack" if t < self.stop_at else "after")

    async def sleep_until(self, t: float) -> None:
        await asyncio.sleep(max(0.0, t - time.perf_counter()))


# ---------------------------------------------------------------------------------------------- the server


class LogWatch:
    """Reads the server's JSON log (stderr) on a thread: counts lines by level, keeps the first warnings and
    errors, and counts request lines answered 5xx, so nothing needs storing."""

    def __init__(self, stream):
        self.levels: Counter = Counter()
        self.messages: Counter = Counter()  # warning and error lines by message
        self.first: list[str] = []
        self.server_errors: Counter = Counter()  # request lines with a 5xx, by path and error code
        self.thread = threading.Thread(target=self.read, args=(stream,), daemon=True)
        self.thread.start()

    def read(self, stream) -> None:
        for line in stream:
            if not line.startswith("{"):
                self.levels["not json"] += 1
                if len(self.first) < 20:
                    self.first.append(line.rstrip()[:500])
                continue
            level = line[line.find('"level": "') + 10:].split('"', 1)[0] if '"level": "' in line else "?"
            self.levels[level] += 1
            if level in ("warning", "error", "critical") or '"status": 5' in line:
                try:
                    entry = json.loads(line)
                except ValueError:
                    continue
                if level in ("warning", "error", "critical"):
                    reason = str(entry.get("error") or "").strip().splitlines()
                    # our "unhandled error" lines name the exception; uvicorn's carry a whole traceback
                    detail = f" ({reason[0][:80]})" if reason and entry.get("message") == "unhandled error" else ""
                    self.messages[f"{level}: {str(entry.get('message')).strip()}{detail}"] += 1
                    if len(self.first) < 20:
                        self.first.append(line.rstrip()[:500])
                if str(entry.get("status", "")).startswith("5"):
                    self.server_errors[f"{entry.get('path')} {entry.get('status')} {entry.get('error')}"] += 1


class Server:
    def __init__(self, package: Path, runtime: str, token: str):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""),
               "MODELWORKS_ADMIN_TOKEN": token, "PYTHONUNBUFFERED": "1"}
        args = [sys.executable, "-m", "modelworks", "serve", str(package), "--host", "127.0.0.1", "--port",
                str(self.port), "--runtime", runtime]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                        env=env)
        self.log = LogWatch(self.process.stderr)
        self.clock_ticks = os.sysconf("SC_CLK_TCK")

    def get(self, path: str) -> int:
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
            return int(s.recv(64).split(b" ", 2)[1])

    def wait_ready(self, timeout_s: float = 120) -> None:
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(f"the server exited with {self.process.returncode} before it was ready: "
                                 f"{self.log.first[-3:]}")
            with contextlib.suppress(OSError, ValueError, IndexError):
                if self.get("/readyz") == 200:
                    return
            time.sleep(0.2)
        raise SystemExit("the server did not become ready")

    def memory_mb(self) -> tuple[float, float]:
        """(VmRSS, VmHWM) in MB: resident now and at its peak."""
        fields = {}
        with open(f"/proc/{self.process.pid}/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    key, value = line.split(":", 1)
                    fields[key] = int(value.split()[0]) / 1024
        return fields["VmRSS"], fields["VmHWM"]

    def cpu_s(self) -> float:
        with open(f"/proc/{self.process.pid}/stat") as f:
            stat = f.read().rsplit(")", 1)[1].split()
        return (int(stat[11]) + int(stat[12])) / self.clock_ticks  # utime + stime

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait()
        self.log.thread.join(timeout=10)
        return code


def settle_memory(server: Server, model: str, token: str, v2_package: Path, v2: str, cycles: int) -> list[float]:
    """Load and unload `v2_package` `cycles` times with no traffic; the server's RSS (MB) after each unload.

    Loading and unloading a version grows the resident set over the first few dozen cycles (glibc's heaps and
    ONNX Runtime's threads reach their working size: +20 MB over 40 cycles here) and then stays flat (110 more
    cycles within 2 MB). Done before the measured phases, so that the attack's floor-growth check sees a leak,
    not that one-time growth."""
    def admin(method: str, path: str, body: str = "") -> int:
        payload = http(method, f"/v1/admin/models/{model}/{path}", body.encode(),
                       headers={"Authorization": f"Bearer {token}"})
        with socket.create_connection(("127.0.0.1", server.port), timeout=RESPONSE_TIMEOUT_S) as s:
            s.sendall(payload)
            return int(s.recv(64).split(b" ", 2)[1])

    rss = []
    for _ in range(cycles):
        loaded = admin("POST", "versions", json.dumps({"package": str(v2_package), "weight": 0}))
        unloaded = admin("DELETE", f"versions/{v2}")
        if (loaded, unloaded) != (200, 200):
            raise SystemExit(f"settling: load answered {loaded}, unload {unloaded}; expected 200 and 200")
        time.sleep(0.2)  # the unload drains, then hands memory back
        rss.append(round(server.memory_mb()[0], 1))
    return rss


# ---------------------------------------------------------------------------------------------- the load


@dataclass
class Soak:
    server: Server
    clock: Clock
    good: list[bytes]
    kinds: list[Kind]
    damaged: list[bytes]  # sent once, after the attack
    token: str
    model: str
    versions: tuple[str, str]  # the package's version and its copy's
    v2_package: Path
    attack_rps: float
    admin_interval_s: float
    heavy_interval_s: float
    stall_s: float
    max_stalled: int
    rss_interval_s: float
    seed: int
    tallies: dict = field(default_factory=dict)  # (phase, kind) -> Tally
    admin: list = field(default_factory=list)
    after_unload: list = field(default_factory=list)  # (s since start, RSS MB) once each second version is unloaded
    samples: list = field(default_factory=list)  # (s since start, phase, rss MB, hwm MB, cpu s)
    notes: list = field(default_factory=list)
    health_after: dict = field(default_factory=dict)
    damaged_file: dict = field(default_factory=dict)
    last_version: dict = field(default_factory=dict)
    next_heavy_at: float = 0.0
    good_load: float = 0.5  # of the capacity measured in the warm-up
    good_rps: float | None = None  # or this, given
    capacity_rps: float | None = None
    warmup_ok: int = 0
    behind: int = 0  # good requests due before the end but never sent: the server kept the clients waiting
    rate_set: asyncio.Event = field(default_factory=asyncio.Event)

    def kind(self, name: str) -> Kind:
        return next(kind for kind in self.kinds if kind.name == name)

    def tally(self, phase: str, kind: str) -> Tally:
        return self.tallies.setdefault((phase, kind), Tally())

    async def good_client(self, k: int, clients: int) -> None:
        """One keep-alive connection: closed loop through the warm-up (to measure capacity), then requests due at
        a fixed rate. A request's latency runs from when it was due, not from when it could be sent, so a server
        that stalls is charged for every request it kept waiting, not only the one in flight (the coordinated
        omission a closed loop suffers: there, a 15 s stall costs each client one slow request and hides in p99)."""
        connection: list = []  # [reader, writer] while open
        errors, i = 0, 0
        while time.perf_counter() < self.clock.baseline_at and i < MAX_REQUESTS_PER_CLIENT:
            start = time.perf_counter()
            outcome = await self.send_good(connection, k + i)
            errors = errors + 1 if outcome.error else 0
            if errors >= MAX_CONSECUTIVE_ERRORS:
                return
            if outcome.status == 200 and start >= self.clock.start + 1.0:
                self.warmup_ok += 1
            i += 1
        await self.rate_set.wait()
        interval = clients / self.good_rps
        due = self.clock.baseline_at + interval * k / clients
        for i in range(MAX_REQUESTS_PER_CLIENT):
            if due >= self.clock.stop_at or errors >= MAX_CONSECUTIVE_ERRORS:
                break
            await self.clock.sleep_until(due)
            outcome = await self.send_good(connection, k + i)
            outcome.ms = (time.perf_counter() - due) * 1000
            errors = errors + 1 if outcome.error else 0
            kind = "good: JSON" if (k + i) % 2 == 0 else "good: multipart"
            self.tally(self.clock.phase(due), kind).add(outcome)
            due += interval
        self.behind += max(0, int((self.clock.stop_at - due) / interval))  # due, never sent
        if connection:
            connection[1].close()

    async def send_good(self, connection: list, i: int) -> Outcome:
        """One good request (JSON and multipart in turn) on the keep-alive connection, reconnecting as needed."""
        start = time.perf_counter()
        try:
            if not connection:
                connection[:] = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", self.server.port), 5)
            reader, writer = connection
            writer.write(self.good[i % len(self.good)])
            status, headers, body = await asyncio.wait_for(read_response(reader), RESPONSE_TIMEOUT_S)
            if headers.get("connection", "").lower() == "close":
                writer.close()
                connection.clear()
            return Outcome((time.perf_counter() - start) * 1000, status, body=body if status != 200 else b"")
        except (OSError, asyncio.IncompleteReadError, TimeoutError) as exc:
            if connection:
                connection[1].close()
                connection.clear()
            await asyncio.sleep(0.05)
            return Outcome((time.perf_counter() - start) * 1000, error=f"{type(exc).__name__}")

    async def set_rate(self, clients: int) -> None:
        """At the end of the warm-up: the good traffic's rate, --good-load of what the closed loop achieved."""
        await self.clock.sleep_until(self.clock.baseline_at)
        self.capacity_rps = self.warmup_ok / max(1e-9, self.clock.baseline_at - self.clock.start - 1.0)
        self.good_rps = self.good_rps or max(float(clients), self.good_load * self.capacity_rps)
        print(f"capacity in the warm-up (closed loop): {self.capacity_rps:.0f} answers/s; good traffic at "
              f"{self.good_rps:.0f} requests/s", flush=True)
        self.rate_set.set()

    async def attacker(self, k: int, slots: asyncio.Queue, heavy: asyncio.Lock, stalled: set) -> None:
        """Takes a slot (the attack rate) and sends one bad or hostile request; a stalled upload is left to run
        in the background (at most --max-stalled at once), so the rate holds."""
        rng = random.Random(self.seed * 1000 + k)
        names = [kind for kind in self.kinds for _ in range(kind.weight)]
        for _ in range(MAX_REQUESTS_PER_CLIENT):
            start = await slots.get()
            if start is None:
                break
            kind = rng.choice(names)
            if kind.heavy and (heavy.locked() or time.perf_counter() < self.next_heavy_at):
                kind = rng.choice([n for n in names if not n.heavy and not n.stall])
            if kind.stall and len(stalled) >= self.max_stalled:
                kind = rng.choice([n for n in names if not n.heavy and not n.stall])
            if kind.stall:
                task = asyncio.create_task(self.send(kind, start))
                stalled.add(task)
                task.add_done_callback(stalled.discard)
            elif kind.heavy:
                async with heavy:
                    self.next_heavy_at = time.perf_counter() + self.heavy_interval_s
                    await self.send(kind, start)
            else:
                await self.send(kind, start)

    async def send(self, kind: Kind, start: float) -> None:
        hold = self.stall_s if kind.stall else 0.0
        outcome = await exchange(self.server.port, kind.parts, self.stall_s if kind.stall else RESPONSE_TIMEOUT_S,
                                 hold)
        self.tally(self.clock.phase(start), kind.name).add(outcome)

    async def pace(self, slots: asyncio.Queue, attackers: int) -> None:
        """One slot every 1/attack_rps seconds through the attack phase; slots no attacker is free to take are
        dropped (the rate is a ceiling), then one None per attacker to stop."""
        await self.clock.sleep_until(self.clock.attack_at)
        interval = 1.0 / self.attack_rps
        t = self.clock.attack_at
        for _ in range(int(self.attack_rps * (self.clock.stop_at - self.clock.attack_at)) + 1):
            if t >= self.clock.stop_at:
                break
            await self.clock.sleep_until(t)
            if slots.qsize() < attackers:
                slots.put_nowait(time.perf_counter())
            t += interval
        while not slots.empty():
            slots.get_nowait()
        for _ in range(attackers):
            slots.put_nowait(None)

    # ------------------------------------------------------------------------------------------ admin

    async def admin_request(self, method: str, path: str, body: str | None) -> Outcome:
        payload = http(method, f"/v1/admin/models/{self.model}/{path}", (body or "").encode(),
                       headers={"Authorization": f"Bearer {self.token}"})
        return await exchange(self.server.port, [payload], RESPONSE_TIMEOUT_S)

    def admin_cycle(self) -> list[tuple]:
        """(name, method, path, JSON text, expected class, repair steps run at once after it). A bad step's
        repair follows it without a pause, so that what it broke shows in the probes, not in minutes of traffic."""
        v1, v2 = self.versions
        package = json.dumps(str(self.v2_package))
        repair = [("repair: promote v1", "POST", "promote", f'{{"version": "{v1}"}}', "2xx", [])]
        return [
            ("load v2 with no traffic", "POST", "versions", f'{{"package": {package}, "weight": 0}}', "2xx", []),
            ("split 90/10", "PUT", "split", f'{{"weights": {{"{v1}": 90, "{v2}": 10}}}}', "2xx", []),
            ("promote v2", "POST", "promote", f'{{"version": "{v2}"}}', "2xx", []),
            ("rollback", "POST", "rollback", None, "2xx", []),
            ("bad: split NaN", "PUT", "split", f'{{"weights": {{"{v1}": NaN}}}}', "4xx", repair),
            ("bad: split negative", "PUT", "split", f'{{"weights": {{"{v1}": -1, "{v2}": 2}}}}', "4xx", repair),
            ("bad: unload the version with the traffic", "DELETE", f"versions/{v1}", None, "4xx", []),
            ("bad: load v2 with weight Infinity", "POST", "versions",
             f'{{"package": {package}, "weight": Infinity}}', "4xx", repair),
            ("unload v2", "DELETE", f"versions/{v2}", None, "2xx", []),
            ("bad: unload the only version", "DELETE", f"versions/{v1}", None, "4xx", []),
        ]

    async def probe(self) -> dict:
        """/readyz, /v1/models and a good prediction: what an admin step left behind."""
        probes = {}
        for name, payload in (("/readyz", http("GET", "/readyz", content_type=None)),
                              ("/v1/models", http("GET", "/v1/models", content_type=None)),
                              ("predict", self.good[0].replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n", 1))):
            answer = await exchange(self.server.port, [payload], RESPONSE_TIMEOUT_S)
            probes[name] = answer.status or answer.error
        return probes

    async def run_admin(self, steps: list, when: str, pause_s: float = 0.0) -> None:
        for name, method, path, body, expect, repairs in steps:
            if time.perf_counter() >= self.clock.stop_at and when == "attack":
                return
            outcome = await self.admin_request(method, path, body)
            got = str(outcome.status) if outcome.status is not None else outcome.error
            if name == "unload v2" and outcome.status == 200:
                await asyncio.sleep(0.5)  # its drain, then malloc_trim
                self.after_unload.append((round(time.perf_counter() - self.clock.start, 2),
                                          round(self.server.memory_mb()[0], 1)))
            self.admin.append({"when": when, "step": name, "status": got, "expected": expect,
                               "as_expected": outcome.status is not None and f"{outcome.status // 100}xx" == expect,
                               "ms": round(outcome.ms, 2), "after": await self.probe(),
                               "body": outcome.body.decode("utf-8", "replace")[:200]})
            await self.run_admin(repairs, when)
            await asyncio.sleep(pause_s)

    async def admin_worker(self) -> None:
        await self.clock.sleep_until(self.clock.attack_at + min(1.0, self.admin_interval_s))
        cycle = self.admin_cycle()
        for _ in range(100_000):
            if time.perf_counter() >= self.clock.stop_at:
                break
            await self.run_admin(cycle, "attack", self.admin_interval_s)

    # ------------------------------------------------------------------------------------------ memory

    async def sampler(self) -> None:
        for _ in range(10_000_000):
            now = time.perf_counter()
            if now >= self.clock.stop_at:
                break
            try:
                rss, hwm = self.server.memory_mb()
                cpu = self.server.cpu_s()
            except (OSError, KeyError):
                self.notes.append(f"{now - self.clock.start:.1f} s: the server process is gone")
                break
            self.samples.append((round(now - self.clock.start, 2), self.clock.phase(now), round(rss, 1),
                                 round(hwm, 1), round(cpu, 2)))
            await asyncio.sleep(self.rss_interval_s)

    # ------------------------------------------------------------------------------------------ the run

    async def run(self, clients: int, attackers: int) -> None:
        slots: asyncio.Queue = asyncio.Queue()
        heavy, stalled = asyncio.Lock(), set()
        tasks = [asyncio.create_task(self.good_client(k, clients - attackers)) for k in range(clients - attackers)]
        tasks.append(asyncio.create_task(self.set_rate(clients - attackers)))
        tasks += [asyncio.create_task(self.attacker(k, slots, heavy, stalled)) for k in range(attackers)]
        tasks += [asyncio.create_task(self.pace(slots, attackers)), asyncio.create_task(self.admin_worker()),
                  asyncio.create_task(self.sampler())]
        await asyncio.gather(*tasks)
        if stalled:  # each ends by itself within --stall-s
            await asyncio.wait(list(stalled), timeout=self.stall_s + 5)
        await self.final_checks()

    async def final_checks(self) -> None:
        """With the traffic stopped: is the server still serving; back to v1 alone, does it keep its last version
        through a NaN split and an unload; and, if it still predicts, does it survive a damaged PNG (last: on a
        decoder that crashes, it takes the process with it)?"""
        self.health_after = await self.probe()
        self.health_after["/healthz"] = (await exchange(self.server.port, [http("GET", "/healthz", content_type=None)],
                                                        10)).status
        v1, v2 = self.versions
        for method, path, body in (("POST", "promote", f'{{"version": "{v1}"}}'), ("DELETE", f"versions/{v2}", None)):
            await self.admin_request(method, path, body)  # v1 alone again (a 404 if v2 is not loaded)
        await self.run_admin([("bad: split NaN", "PUT", "split", f'{{"weights": {{"{v1}": NaN}}}}', "4xx", []),
                              ("bad: unload the last version", "DELETE", f"versions/{v1}", None, "4xx", [])],
                             "after")
        readyz = await exchange(self.server.port, [http("GET", "/readyz", content_type=None)], 10)
        self.last_version = {**self.admin[-1]["after"], "readyz_body": readyz.body.decode("utf-8", "replace")[:200]}
        if self.last_version["predict"] != 200:
            self.damaged_file = {"skipped": "the server no longer predicts, so no file reaches the decoder"}
            return
        outcome = await exchange(self.server.port, self.damaged, RESPONSE_TIMEOUT_S)
        await asyncio.sleep(1.0)
        self.damaged_file = {"status": outcome.status or outcome.error, "server_exit_code": self.server.process.poll(),
                             "body": outcome.body.decode("utf-8", "replace")[:200]}


# ---------------------------------------------------------------------------------------------- report


def floor_growth_mb_per_min(samples: list) -> float | None:
    """How fast the server's resident memory grows underneath the transients: the lowest RSS in the last quarter
    of the samples less the lowest in the first quarter, per minute between the quarters' middles. A bomb's
    gigabytes, given back after its request, do not count; a leak raises the floor."""
    if len(samples) < 8:
        return None
    quarter = len(samples) // 4
    first, last = samples[:quarter], samples[-quarter:]
    minutes = ((last[0][0] + last[-1][0]) - (first[0][0] + first[-1][0])) / 2 / 60
    return round((min(s[2] for s in last) - min(s[2] for s in first)) / max(minutes, 1e-9), 3)


def report(soak: Soak, args, clients: int, attackers: int, exit_code: int) -> dict:
    seconds = {"baseline": args.baseline_s, "attack": args.duration_s}
    good = {}
    for phase in PHASES:
        merged = Tally()
        for (p, kind), tally in soak.tallies.items():
            if p == phase and kind.startswith("good"):
                merged.ms.extend(tally.ms)
                merged.statuses.update(tally.statuses)
                merged.errors.update(tally.errors)
                for key, value in tally.examples.items():
                    merged.examples.setdefault(key, value)
        good[phase] = merged.summary(seconds[phase])
    ratio = good["attack"]["p99_ms"] / good["baseline"]["p99_ms"] if good["baseline"]["p99_ms"] else None
    kinds = {name: tally.summary() for (phase, name), tally in sorted(soak.tallies.items(), key=lambda x: x[0][1])
             if phase == "attack" and not name.startswith("good")}

    attack_samples = [s for s in soak.samples if s[1] == "attack"]
    all_samples = [s for s in soak.samples if s[1] in PHASES]
    cpu = {}
    for phase in PHASES:
        phase_samples = [s for s in soak.samples if s[1] == phase]
        if len(phase_samples) >= 2:
            span = phase_samples[-1][0] - phase_samples[0][0]
            cpu[phase] = {"cpu_s": round(phase_samples[-1][4] - phase_samples[0][4], 1),
                          "cpu_percent": round(100 * (phase_samples[-1][4] - phase_samples[0][4]) / max(span, 1e-9))}
    rss = {"start_mb": all_samples[0][2] if all_samples else None,
           "max_mb": max(s[2] for s in all_samples) if all_samples else None,
           "end_mb": all_samples[-1][2] if all_samples else None,
           "hwm_mb": max(s[3] for s in all_samples) if all_samples else None,
           "attack_floor_growth_mb_per_min": floor_growth_mb_per_min(attack_samples),
           "attack_slope_mb_per_min": round(float(np.polyfit([s[0] / 60 for s in attack_samples],
                                                             [s[2] for s in attack_samples], 1)[0]), 3)
           if len(attack_samples) >= 3 else None,
           # The same state each time (one version loaded, the other just unloaded): a leak shows as a slope here,
           # free of the transients (a version loaded, a bomb's buffers) that move the floor of the raw samples.
           "after_unload_mb": soak.after_unload,
           "after_unload_slope_mb_per_min": round(float(np.polyfit([t / 60 for t, _ in soak.after_unload],
                                                                   [m for _, m in soak.after_unload], 1)[0]), 3)
           if len(soak.after_unload) >= 3 else None,
           "samples": soak.samples}

    unexpected = list(soak.notes)
    for phase in PHASES:
        bad = {k: v for k, v in good[phase]["statuses"].items() if k != "200"}
        if bad or good[phase]["errors"]:
            unexpected.append(f"good requests, {phase}: non-200 {bad}, connection errors {good[phase]['errors']}")
    for name, summary in kinds.items():
        five = {k: v for k, v in summary["statuses"].items() if k.startswith("5")}
        accepted = {k: v for k, v in summary["statuses"].items() if k.startswith("2")}
        if five:
            unexpected.append(f"{name}: 5xx {five}")
        if accepted:
            unexpected.append(f"{name}: accepted {accepted}")
        cut_ok = soak.kind(name).cut_ok
        lost = {k: v for k, v in summary["errors"].items()
                if not k.startswith("closed by the server") and not (cut_ok and k.startswith("connection:"))}
        if lost:
            unexpected.append(f"{name}: {lost}")
    for step in soak.admin:
        if not step["as_expected"]:
            unexpected.append(f"admin ({step['when']}) {step['step']}: {step['status']} (expected {step['expected']})"
                              f", then {step['after']}")
    if soak.behind:
        unexpected.append(f"good requests due but never sent (the server kept every good connection busy): "
                          f"{soak.behind}")
    if soak.server.log.server_errors:
        unexpected.append(f"server log, requests answered 5xx: {dict(soak.server.log.server_errors)}")
    errors_logged = {k: v for k, v in soak.server.log.messages.items() if not k.startswith("warning")}
    if errors_logged:
        unexpected.append(f"server log errors: {errors_logged}")
    if any(v != 200 for v in soak.health_after.values()):
        unexpected.append(f"after the soak: {soak.health_after}")
    if "skipped" in soak.damaged_file or soak.damaged_file.get("server_exit_code") is not None or \
            not (isinstance(soak.damaged_file.get("status"), int) and 400 <= soak.damaged_file["status"] < 500):
        unexpected.append(f"a PNG with one flipped byte in its pixel data: {soak.damaged_file}")
    if soak.last_version.get("predict") != 200:
        unexpected.append(f"after a NaN split and an unload of the last version: {soak.last_version}")
    if exit_code not in (0, -signal.SIGTERM):
        unexpected.append(f"server exit code {exit_code}")

    bombs = {name: s for name, s in kinds.items() if name.startswith("bomb")}
    stalls = kinds.get("stalled upload: half the body", {"errors": {}, "statuses": {}})
    targets = {
        "good requests: attack p99 within 2x of baseline p99": (
            ratio is not None and ratio <= 2, f"{good['attack']['p99_ms']} / {good['baseline']['p99_ms']} ms = "
                                              f"{ratio:.2f}x" if ratio else "n/a"),
        "bombs refused (4xx) within 100 ms": (
            bool(bombs) and all(s["max_ms"] <= 100 and set(s["statuses"]) and all(k.startswith("4") for k in
                                s["statuses"]) and not s["errors"] for s in bombs.values()),
            "; ".join(f"{n}: max {s['max_ms']} ms {s['statuses']}{s['errors'] or ''}" for n, s in bombs.items())),
        f"stalled uploads ended by the server within --stall-s ({args.stall_s:g} s)": (
            not any(k.startswith("no answer") for k in stalls["errors"]),
            f"{stalls['statuses']} {stalls['errors']}"),
        "server RSS flat during the attack (after each unload: slope <= 1 MB/min)": (
            rss["after_unload_slope_mb_per_min"] is not None and rss["after_unload_slope_mb_per_min"] <= 1.0,
            f"{rss['after_unload_slope_mb_per_min']} MB/min over {len(rss['after_unload_mb'])} unloads "
            f"({', '.join(str(m) for _, m in rss['after_unload_mb'])} MB); all samples: slope "
            f"{rss['attack_slope_mb_per_min']} MB/min, floor growth {rss['attack_floor_growth_mb_per_min']} MB/min, "
            f"start {rss['start_mb']}, max {rss['max_mb']}, end {rss['end_mb']} MB, peak (VmHWM) {rss['hwm_mb']} MB"),
        "nothing unexpected (5xx, connection errors, accepted bad input, unanswered requests, error logs)": (
            not unexpected, f"{len(unexpected)} findings"),
    }
    return {"package": str(args.package), "model": soak.model, "versions": soak.versions, "clients": clients,
            "capacity_rps": round(soak.capacity_rps or 0, 1), "good_rps": round(soak.good_rps or 0, 1),
            "good_never_sent": soak.behind,
            "good_clients": clients - attackers, "attackers": attackers, "baseline_s": args.baseline_s,
            "duration_s": args.duration_s, "attack_rps": args.attack_rps, "bomb_side": args.bomb_side,
            "stall_s": args.stall_s, "cpu_count": os.cpu_count(), "good": good, "p99_ratio": ratio, "kinds": kinds,
            "admin": soak.admin, "health_after": soak.health_after, "damaged_file": soak.damaged_file,
            "last_version": soak.last_version,
            "rss": rss, "server_cpu": cpu, "server_log": {"levels": dict(soak.server.log.levels),
                                                          "messages": dict(soak.server.log.messages),
                                                          "first": soak.server.log.first},
            "exit_code": exit_code, "unexpected": unexpected,
            "targets": {name: {"met": met, "value": value} for name, (met, value) in targets.items()}}


def print_report(results: dict) -> None:
    print(f"\ngood traffic: {results['good_rps']} requests/s, due at a fixed rate on {results['good_clients']} "
          f"connections (capacity in the warm-up: {results['capacity_rps']}/s); latency from when each was due")
    print("\n| good requests | requests | 200/s | p50 ms | p99 ms | max ms | other statuses | errors |")
    print("|---|---|---|---|---|---|---|---|")
    for phase, s in results["good"].items():
        other = {k: v for k, v in s["statuses"].items() if k != "200"}
        print(f"| {phase} | {s['requests']} | {s['ok_per_s']} | {s['p50_ms']} | {s['p99_ms']} | {s['max_ms']} | "
              f"{other or ''} | {s['errors'] or ''} |")
    ratio = results["p99_ratio"]
    print(f"\np99 attack / baseline: {ratio:.2f}x" if ratio else "\np99 attack / baseline: n/a")
    print("\n| bad or hostile request (attack phase) | sent | statuses | no answer | p50 ms | p99 ms | max ms |")
    print("|---|---|---|---|---|---|---|")
    for name, s in results["kinds"].items():
        print(f"| {name} | {s['requests']} | {s['statuses']} | {s['errors'] or ''} | {s['p50_ms']} | {s['p99_ms']} | "
              f"{s['max_ms']} |")
    steps: dict[tuple, list] = {}
    for step in results["admin"]:
        steps.setdefault((step["when"], step["step"], step["expected"]), []).append(step)
    print("\n| admin step | when | times | statuses | expected | max ms | then /readyz, /v1/models, predict |")
    print("|---|---|---|---|---|---|---|")
    for (when, name, expected), runs in steps.items():
        statuses = dict(Counter(r["status"] for r in runs))
        after = dict(Counter(", ".join(str(v) for v in r["after"].values()) for r in runs))
        print(f"| {name} | {when} | {len(runs)} | {statuses} | {expected} | {max(r['ms'] for r in runs)} | {after} |")
    rss = results["rss"]
    print(f"\nserver RSS: start {rss['start_mb']} MB, max {rss['max_mb']} MB, end {rss['end_mb']} MB, peak (VmHWM) "
          f"{rss['hwm_mb']} MB, attack slope {rss['attack_slope_mb_per_min']} MB/min (floor growth: "
          f"{rss['attack_floor_growth_mb_per_min']}); CPU {results['server_cpu']}")
    print(f"after the soak: {results['health_after']}; the last version after a NaN split and its unload: "
          f"{results['last_version']}; then a PNG with one flipped data byte: {results['damaged_file']}")
    print(f"server log lines by level: {results['server_log']['levels']}")
    if results["unexpected"]:
        print("\nunexpected:")
        for line in results["unexpected"]:
            print(f"  - {line[:400]}")
    print()
    for name, target in results["targets"].items():
        print(f"  {'MET ' if target['met'] else 'NOT '} {name}: {target['value']}")


# ---------------------------------------------------------------------------------------------- main


@contextlib.contextmanager
def held(lock: str | None):
    """An exclusive flock on `lock` for the duration (nothing without one)."""
    if not lock:
        yield
        return
    with open(lock, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--package", required=True, help="a classification package (modelworks export RUN)")
    parser.add_argument("--duration-s", type=float, default=600.0, help="the attack phase")
    parser.add_argument("--baseline-s", type=float, default=60.0, help="good traffic alone, before the attack")
    parser.add_argument("--warmup-s", type=float, default=5.0,
                        help="closed-loop good traffic first, not counted: it measures the server's capacity")
    parser.add_argument("--good-load", type=float, default=0.5,
                        help="the good traffic's rate as a fraction of the capacity measured in the warm-up")
    parser.add_argument("--good-rps", type=float, help="the good traffic's rate in requests/s (instead of --good-load)")
    parser.add_argument("--clients", type=int, default=32,
                        help="connections: a quarter attack, the rest carry the good traffic")
    parser.add_argument("--attack-rps", type=float, default=20.0, help="bad and hostile requests per second, all "
                                                                       "attackers together (a ceiling)")
    parser.add_argument("--admin-interval-s", type=float, default=5.0, help="seconds between admin actions")
    parser.add_argument("--bomb-side", type=int, default=60000, help="the PNG bomb's width and height in pixels")
    parser.add_argument("--heavy-interval-s", type=float, default=5.0,
                        help="at most one bomb or big GIF per this many seconds, and never two at once")
    parser.add_argument("--stall-s", type=float, default=20.0, help="how long a stalled upload waits for the "
                                                                    "server to end it before giving up")
    parser.add_argument("--max-stalled", type=int, default=8, help="stalled uploads open at once")
    parser.add_argument("--rss-interval-s", type=float, default=1.0)
    parser.add_argument("--settle-cycles", type=int, default=40,
                        help="load and unload the second version this many times before the warm-up: the allocator's "
                             "one-time growth over the first cycles (about 20 MB over 40, then flat) is not a leak")
    parser.add_argument("--runtime", default="onnx", choices=["eager", "torchscript", "onnx", "int8"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lock", metavar="FILE",
                        help="hold an exclusive flock on FILE during the timed run, so other heavy work sharing the "
                             "machine (and taking the same lock) waits instead of skewing it")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "soak.json"))
    args = parser.parse_args()
    if args.clients < 2:
        parser.error("--clients: at least 2 (one good client and one attacker)")

    from modelworks.export.package import read_package

    package = read_package(args.package)
    if package.task != "classification":
        raise SystemExit(f"--package: a classification package is needed (got a {package.task!r} one)")
    attackers = max(1, args.clients // 4)
    print(f"building requests (PNG bomb {args.bomb_side}x{args.bomb_side}) ...", flush=True)
    good, kinds, damaged = build_kinds(package.name, package.manifest, args.bomb_side)
    for kind in kinds:
        if kind.heavy:
            print(f"  {kind.name}: {sum(len(p) for p in kind.parts) / 1e6:.2f} MB as sent")
    token = secrets.token_hex(16)
    v1 = package.version
    v2 = f"{v1}-soak"
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp, held(args.lock):
        v2_package = copy_package_as_version(Path(args.package), Path(tmp) / "v2", v2)
        server = Server(Path(args.package), args.runtime, token)
        exit_code = None
        try:
            server.wait_ready()
            print(f"server ready on 127.0.0.1:{server.port} (pid {server.process.pid}); {args.clients - attackers} "
                  f"good clients, {attackers} attackers; warm-up {args.warmup_s:g} s, baseline {args.baseline_s:g} s, "
                  f"attack {args.duration_s:g} s", flush=True)
            settle = settle_memory(server, package.name, token, v2_package, v2, args.settle_cycles)
            if settle:
                print(f"settling: {len(settle)} load/unload cycles of {v2}, server RSS {settle[0]} -> {settle[-1]} MB "
                      f"(max {max(settle)})", flush=True)
            clock = Clock(args.warmup_s, args.baseline_s, args.duration_s)
            soak = Soak(server, clock, good, kinds, damaged, token, package.name, (v1, v2), v2_package, args.attack_rps,
                        args.admin_interval_s, args.heavy_interval_s, args.stall_s, args.max_stalled,
                        args.rss_interval_s, args.seed, good_load=args.good_load, good_rps=args.good_rps)
            asyncio.run(soak.run(args.clients, attackers))
        finally:
            exit_code = server.stop()
    results = report(soak, args, args.clients, attackers, exit_code)
    results["rss"]["settle_cycles_mb"] = settle
    print_report(results)
    results["command"] = " ".join(["python", *sys.argv])
    results["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
