"""The event store: what users did (viewed, rated, bought an item), kept in SQLite or PostgreSQL.

    open_store("sqlite:events.db")                    # a file; WAL, no server, no setup
    open_store("postgresql://USER@HOST/DB")           # a real server: many replicas write and read one store

Both backends hold the same schema, created and upgraded by the versioned MIGRATIONS on open (a `schema_version`
table records the last applied; concurrent openers serialise on a lock, so two replicas starting together
migrate once). Ingestion is idempotent by `event_id`: INSERT ... ON CONFLICT DO NOTHING, so a client that
retries after a lost answer stores nothing twice, and the answer tells stored from duplicate. Reads of one
user's latest events go through the covering index on (user_id, ts, seq, item).

`EventStore` is synchronous and thread-safe: each thread keeps its own connection (sqlite3 and psycopg
connections are not shared between threads). The server calls it through `AsyncEventStore`, never on its event
loop: a write that waits for SQLite's lock or PostgreSQL's network must not stall the other requests. There,
calls that arrive together are served together (`Gatherer`), each kind by one thread of its own:
- writes by group commit: the events of every POST waiting are stored in one transaction, and each request is
  answered once that transaction has committed (so an acknowledged event is durable, as before). One writer
  thread also means no two of this server's writes ever wait for each other's lock;
- history reads for every user waiting in one call (`latest_many`: one query on PostgreSQL), instead of one
  thread hand-off and one wake-up per request.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from pydantic import BaseModel, ConfigDict, Field, field_validator

from .errors import ConfigError

MAX_ID_CHARS = 256  # event, user and item ids; longer is not an id
BUSY_TIMEOUT_MS = 30_000  # SQLite: how long a writer waits for another process's write lock before failing
PG_LOCK_KEY = 0x6D6F64656C  # pg_advisory_xact_lock key of the migrations ("model")
DEADLOCK_ATTEMPTS = 3  # PostgreSQL: a write transaction aborted as a deadlock is run again, up to this many times

# The schema, one migration per version, in order; never edit an applied one, append. `{serial}` is the
# auto-increment primary key of each dialect: it orders events that share a timestamp by arrival.
MIGRATIONS = [
    ["CREATE TABLE events (seq {serial} PRIMARY KEY, event_id TEXT NOT NULL UNIQUE, user_id TEXT NOT NULL, "
     "item TEXT NOT NULL, type TEXT NOT NULL, ts DOUBLE PRECISION NOT NULL, received_at DOUBLE PRECISION NOT NULL)",
     "CREATE INDEX events_user_ts ON events (user_id, ts)"],
    # A covering index for the latest-N read: the items come from the index itself, not from a table lookup per
    # row (SQLite, 50 of a user's events among ml-100k's 100,000: 16 us instead of 90). It replaces the first.
    ["CREATE INDEX events_user_recent ON events (user_id, ts, seq, item)", "DROP INDEX events_user_ts"],
]


class Event(BaseModel):
    """One interaction, as POST /v1/events takes it."""
    model_config = ConfigDict(extra="forbid")

    event_id: str = Field(min_length=1, max_length=MAX_ID_CHARS, description="The client's unique id: an event "
                          "sent twice (a retry) is stored once.")
    user: str | int = Field(description="The user's id.")
    item: str | int = Field(description="The item's id, as in the model's catalogue.")
    type: str = Field("interaction", min_length=1, max_length=64, description="view, click, rating, purchase, ...")
    ts: float | None = Field(None, ge=0, allow_inf_nan=False, description="Unix time in seconds; default: arrival.")

    @field_validator("user", "item")
    @classmethod
    def short_id(cls, value: str | int) -> str:
        value = str(value)
        if not value or len(value) > MAX_ID_CHARS:
            raise ValueError(f"must be 1 to {MAX_ID_CHARS} characters")
        return cls.no_nul(value)

    @field_validator("event_id", "type")
    @classmethod
    def no_nul(cls, value: str) -> str:
        # PostgreSQL's text cannot hold NUL: refused here on every backend, so both stores accept the same events.
        if "\x00" in value:
            raise ValueError("must not contain the NUL character (\\u0000)")
        return value


@dataclass(frozen=True)
class Dialect:
    name: str
    serial: str  # the auto-increment key type
    placeholder: str  # DB-API parameter marker


SQLITE = Dialect("sqlite", "INTEGER", "?")  # INTEGER PRIMARY KEY is the rowid: increasing, no AUTOINCREMENT table
POSTGRES = Dialect("postgresql", "BIGSERIAL", "%s")


def parse_url(url: str) -> tuple[Dialect, str]:
    kind, sep, rest = url.partition(":")
    if kind == "sqlite" and sep and rest:
        return SQLITE, rest
    if kind in ("postgresql", "postgres") and rest.startswith("//"):
        return POSTGRES, url
    raise ConfigError(f"--events: {url!r} is not an event store URL; use sqlite:PATH (e.g. sqlite:events.db) or "
                      "postgresql://USER@HOST/DB")


class EventStore:
    """A store behind a URL; see the module's docstring."""

    def __init__(self, url: str):
        self.url = url
        self.dialect, self.target = parse_url(url)
        self.local = threading.local()
        self.connections: list = []
        self.lock = threading.Lock()
        if self.dialect is POSTGRES:
            try:
                import psycopg  # noqa: F401
            except ImportError:
                raise ConfigError("--events: a PostgreSQL store needs psycopg; pip install 'modelworks[postgres]'"
                                  ) from None
        else:
            Path(self.target).parent.mkdir(parents=True, exist_ok=True)
        self.migrate()

    # ------------------------------------------------------------------------------------------ connections

    def connection(self):
        conn = getattr(self.local, "conn", None)
        if conn is None:
            conn = self.connect()
            self.local.conn = conn
            with self.lock:
                self.connections.append(conn)
        return conn

    def connect(self):
        if self.dialect is SQLITE:
            # isolation_level=None: transactions are explicit (BEGIN IMMEDIATE takes the write lock up front, so two
            # writers never deadlock upgrading a read lock); check_same_thread off for close() from another thread.
            conn = sqlite3.connect(self.target, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None,
                                   check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")  # readers never wait for the writer
            # NORMAL under WAL: a commit survives the process crashing; only a power loss may undo the last ones.
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            return conn
        import psycopg

        try:
            return psycopg.connect(self.target, autocommit=True)
        except psycopg.OperationalError as exc:
            raise ConfigError(f"--events: cannot connect to {self.url} ({str(exc).strip().splitlines()[0]}); is the "
                              "server running, and does the database exist?") from None

    def transaction(self):
        """A write transaction on this thread's connection, as a context manager yielding a cursor."""
        return _Transaction(self.connection(), self.dialect)

    def close(self) -> None:
        with self.lock:
            connections, self.connections = self.connections, []
        for conn in connections:
            try:
                conn.close()
            except Exception:  # a connection of a thread that is gone: nothing left to release
                pass
        self.local = threading.local()

    # ------------------------------------------------------------------------------------------ schema

    def migrate(self) -> int:
        """Apply the migrations this store lacks, under a lock; returns the schema version."""
        with self.transaction() as cur:
            if self.dialect is POSTGRES:
                cur.execute("SELECT pg_advisory_xact_lock(%s)", (PG_LOCK_KEY,))
            cur.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL, "
                        "applied_at DOUBLE PRECISION NOT NULL)")
            cur.execute("SELECT MAX(version) FROM schema_version")
            current = cur.fetchone()[0] or 0
            if current > len(MIGRATIONS):
                raise ConfigError(f"--events: {self.url} has schema version {current}, newer than this modelworks "
                                  f"knows ({len(MIGRATIONS)}); upgrade modelworks")
            for version, statements in enumerate(MIGRATIONS[current:], start=current + 1):
                for statement in statements:
                    cur.execute(statement.format(serial=self.dialect.serial))
                cur.execute(self.sql("INSERT INTO schema_version (version, applied_at) VALUES (?, ?)"),
                            (version, time.time()))
        return len(MIGRATIONS)

    def schema_version(self) -> int:
        with self.transaction() as cur:
            cur.execute("SELECT MAX(version) FROM schema_version")
            return cur.fetchone()[0] or 0

    def sql(self, query: str) -> str:
        return query.replace("?", self.dialect.placeholder)

    # ------------------------------------------------------------------------------------------ events

    def add(self, events: list[Event]) -> int:
        """Store the events not stored before (by event_id), in one transaction; returns how many were new."""
        return sum(sum(flags) for flags in self.add_groups([events]))

    def add_groups(self, groups: list[list[Event]]) -> list[list[bool]]:
        """Store several requests' events in ONE transaction (group commit); for each event, whether it was new
        (False: its event_id was stored before, a retry). Nothing is stored if the transaction fails."""
        attempt = 1
        while True:
            try:
                return self._add_groups_once(groups)
            except Exception as exc:
                # PostgreSQL: writers inserting overlapping event_ids in different orders can wait on each other in
                # a cycle; the server aborts one (40P01), and running it again is safe (idempotent, rolled back).
                if getattr(exc, "sqlstate", None) != "40P01" or attempt >= DEADLOCK_ATTEMPTS:
                    raise
                attempt += 1

    def _add_groups_once(self, groups: list[list[Event]]) -> list[list[bool]]:
        now = time.time()
        query = self.sql("INSERT INTO events (event_id, user_id, item, type, ts, received_at) VALUES (?, ?, ?, ?, ?, ?) "
                         "ON CONFLICT (event_id) DO NOTHING")
        stored: list[list[bool]] = []
        with self.transaction() as cur:
            for events in groups:
                rows = [(e.event_id, str(e.user), str(e.item), e.type, e.ts if e.ts is not None else now, now)
                        for e in events]
                if not rows:
                    stored.append([])
                    continue
                if len(rows) == 1:
                    cur.execute(query, rows[0])
                    stored.append([cur.rowcount == 1])
                    continue
                # Both drivers sum the rows of an executemany, which tells which events were new only when all or
                # none were; a mix (a partial retry) is undone and inserted event by event.
                cur.execute("SAVEPOINT mixed")
                cur.executemany(query, rows)
                if cur.rowcount in (0, len(rows)):
                    stored.append([cur.rowcount == len(rows)] * len(rows))
                else:
                    cur.execute("ROLLBACK TO SAVEPOINT mixed")
                    flags = []
                    for row in rows:
                        cur.execute(query, row)
                        flags.append(cur.rowcount == 1)
                    stored.append(flags)
                cur.execute("RELEASE SAVEPOINT mixed")
        return stored

    def latest(self, user: str, n: int) -> list[str]:
        """The user's `n` most recent items, oldest first."""
        if n <= 0:
            return []
        cur = self.connection().cursor()
        try:
            cur.execute(self.sql("SELECT item FROM events WHERE user_id = ? ORDER BY ts DESC, seq DESC LIMIT ?"),
                        (str(user), int(n)))
            return [row[0] for row in reversed(cur.fetchall())]
        finally:
            cur.close()

    def latest_many(self, users: list[str], n: int) -> dict[str, list[str]]:
        """Each user's `n` most recent items, oldest first (a user with no events maps to [])."""
        users = list(dict.fromkeys(str(u) for u in users))
        if n <= 0 or not users:
            return {user: [] for user in users}
        if self.dialect is SQLITE:
            return self._latest_many_sqlite(users, n)
        # PostgreSQL: one round trip for every user, the same index-ordered LIMIT scan for each, joined laterally.
        found: dict[str, list[tuple[float, int, str]]] = {user: [] for user in users}
        cur = self.connection().cursor()
        try:
            cur.execute("SELECT u.user_id, e.item, e.ts, e.seq FROM unnest(%s::text[]) AS u(user_id) CROSS JOIN "
                        "LATERAL (SELECT item, ts, seq FROM events WHERE events.user_id = u.user_id "
                        "ORDER BY ts DESC, seq DESC LIMIT %s) AS e", (users, int(n)))
            for user, item, ts, seq in cur.fetchall():
                found[user].append((ts, seq, item))
        finally:
            cur.close()
        # The join promises no order; each user's rows (at most n) are sorted here.
        return {user: [item for _, _, item in sorted(rows)] for user, rows in found.items()}

    def _latest_many_sqlite(self, users: list[str], n: int) -> dict[str, list[str]]:
        """One statement answering in ONE row: the same indexed LIMIT scan per user, each user's items gathered into
        a JSON array (newest first: the aggregate keeps the order of a subquery it cannot be merged with, one that
        has a LIMIT), all users' arrays into one. Why one row: Python's sqlite3 releases the GIL around every step
        of a statement, and in a busy server each step then waits for the GIL again (up to the interpreter's switch
        interval). A statement per user, or a row per item, paid that wait 32 or 1,600 times per batch; this pays
        it once (measured beside a busy thread: 150 against 840 to 3,600 us a user)."""
        cur = self.connection().cursor()
        try:
            cur.execute("SELECT json_group_array(json_array(u.value, json((SELECT json_group_array(item) FROM "
                        "(SELECT item FROM events WHERE user_id = u.value ORDER BY ts DESC, seq DESC LIMIT ?))))) "
                        "FROM json_each(?) AS u", (int(n), json.dumps(users)))
            (text,) = cur.fetchone()
        finally:
            cur.close()
        return {user: items[::-1] for user, items in json.loads(text)}

    def count(self) -> int:
        cur = self.connection().cursor()
        try:
            cur.execute("SELECT COUNT(*) FROM events")
            return int(cur.fetchone()[0])
        finally:
            cur.close()

    def iter_events(self, batch: int = 10_000) -> Iterator[tuple[str, str, float]]:
        """(user, item, ts) of every event, by time (arrival order within a timestamp)."""
        cur = self.connection().cursor()
        try:
            cur.execute("SELECT user_id, item, ts FROM events ORDER BY ts, seq")
            while rows := cur.fetchmany(batch):
                yield from ((u, i, float(t)) for u, i, t in rows)
        finally:
            cur.close()


class _Transaction:
    def __init__(self, conn, dialect: Dialect):
        self.conn, self.dialect = conn, dialect

    def __enter__(self):
        if self.dialect is SQLITE:
            self.conn.execute("BEGIN IMMEDIATE")
            self.cur = self.conn.cursor()
        else:
            self.tx = self.conn.transaction()
            self.tx.__enter__()
            self.cur = self.conn.cursor()
        return self.cur

    def __exit__(self, kind, exc, traceback):
        self.cur.close()
        if self.dialect is SQLITE:
            self.conn.execute("COMMIT" if kind is None else "ROLLBACK")
            return False
        return self.tx.__exit__(kind, exc, traceback)


def open_store(url: str) -> EventStore:
    return EventStore(url)


class Gatherer:
    """Calls that arrive together, served by one call: a thread of its own takes every call waiting, passes their
    arguments to `serve(list) -> list of results` (one each, in order) and answers each caller's future, in one
    hand-off to the event loop per round. While it serves one round the next gathers: under load the rounds grow,
    and a lone call is served at once (no timer: nothing waits for company)."""

    def __init__(self, serve: Callable[[list], list], name: str):
        self.serve = serve
        self.name = name
        self.waiting: list[tuple[object, asyncio.Future]] = []
        self.ready = threading.Condition()
        self.stopping = False
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.thread = threading.Thread(target=self._work, name=self.name, daemon=True)
        self.thread.start()

    def __call__(self, argument) -> asyncio.Future:
        future = self.loop.create_future()
        with self.ready:
            self.waiting.append((argument, future))
            self.ready.notify()
        return future

    def _work(self) -> None:
        while True:
            with self.ready:
                while not self.waiting and not self.stopping:
                    self.ready.wait()
                if not self.waiting:
                    return
                round_, self.waiting = self.waiting, []
            try:
                results = self.serve([argument for argument, _ in round_])
            except Exception as exc:  # answered to every caller of the round; the thread serves the next
                results = [exc] * len(round_)
            try:
                self.loop.call_soon_threadsafe(self._answer, [future for _, future in round_], results)
            except RuntimeError:  # the event loop is closed: nobody is left to answer
                return

    @staticmethod
    def _answer(futures: list[asyncio.Future], results: list) -> None:
        for future, result in zip(futures, results):
            if future.done():  # the caller gave up (cancelled)
                continue
            if isinstance(result, Exception):
                future.set_exception(result)
            else:
                future.set_result(result)

    async def stop(self) -> None:
        with self.ready:
            self.stopping = True
            self.ready.notify_all()
        if self.thread is not None:
            await asyncio.to_thread(self.thread.join)


class AsyncEventStore:
    """An EventStore called from a server's event loop, never blocking it: writes by group commit and history reads
    by one query per round, each in a thread of its own (Gatherer); opening and closing in a small pool."""

    def __init__(self, url: str, threads: int = 2):
        self.url = url
        self.threads = threads
        self.store: EventStore | None = None
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="events")
        self.writer = Gatherer(self._write, "events-writer")
        self.reader = Gatherer(self._read, "events-reader")

    async def open(self) -> None:
        self.store = await self.call(EventStore, self.url)
        self.writer.start()
        self.reader.start()

    async def call(self, function, *args):
        return await asyncio.get_running_loop().run_in_executor(self.pool, function, *args)

    async def add(self, events: list[Event]) -> list[bool]:
        """Store the events not stored before; for each, whether it was new. Answered once committed."""
        return await self.writer(events)

    async def latest(self, user: str, n: int) -> list[str]:
        return await self.reader((str(user), n))

    def _write(self, groups: list[list[Event]]) -> list:
        try:
            return self.store.add_groups(groups)
        except Exception:
            if len(groups) == 1:
                raise
        # One request's events can fail the transaction of all (something validation cannot see, such as a text the
        # database refuses): each request is then stored alone, so the failure stays with the request causing it.
        results = []
        for events in groups:
            try:
                results.extend(self.store.add_groups([events]))
            except Exception as exc:
                results.append(exc)
        return results

    def _read(self, requests: list[tuple[str, int]]) -> list[list[str]]:
        n = max(length for _, length in requests)
        histories = self.store.latest_many([user for user, _ in requests], n)
        return [histories[user][-length:] if length > 0 else [] for user, length in requests]

    async def close(self) -> None:
        await self.writer.stop()
        await self.reader.stop()
        if self.store is not None:
            await self.call(self.store.close)
        self.pool.shutdown(wait=True)
