"""The event store on SQLite and on a real PostgreSQL (MODELWORKS_TEST_POSTGRES, started by .ci/start-postgres;
skipped when unset): migrations, idempotent ingestion, exact counts under concurrent writer processes, latest-N
reads, and bad URLs."""

from __future__ import annotations

import multiprocessing
import os
import sqlite3
import uuid

import pytest

from modelworks.errors import ConfigError
from modelworks.events import MIGRATIONS, Event, EventStore

POSTGRES_ENV = "MODELWORKS_TEST_POSTGRES"


def fresh_postgres_url() -> str:
    """A new database on the test server, so each test starts from an empty store."""
    import psycopg

    base = os.environ[POSTGRES_ENV]
    name = f"mw_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(base, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return base.rsplit("/", 1)[0] + "/" + name


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:{tmp_path / 'events.db'}"
    if not os.environ.get(POSTGRES_ENV):
        pytest.skip(f"{POSTGRES_ENV} is unset (export it from .ci/start-postgres)")
    return fresh_postgres_url()


def events(prefix: str, n: int, user: str = "u", start_ts: float = 0.0) -> list[Event]:
    return [Event(event_id=f"{prefix}-{i}", user=user, item=str(i), type="view", ts=start_ts + i) for i in range(n)]


def test_migrations_run_once_and_record_the_schema_version(store_url):
    first = EventStore(store_url)
    assert first.schema_version() == len(MIGRATIONS) == 2
    first.close()
    again = EventStore(store_url)  # a second open (a replica, a restart) applies nothing
    assert again.schema_version() == 2
    with again.transaction() as cur:
        cur.execute("SELECT COUNT(*) FROM schema_version")
        assert cur.fetchone()[0] == 2
    again.close()


def test_ingestion_is_idempotent_by_event_id_and_latest_reads_the_newest(store_url):
    store = EventStore(store_url)
    assert store.add(events("a", 5)) == 5
    assert store.add(events("a", 5)) == 0  # a retry: acknowledged, stored once
    mixed = events("a", 2) + [Event(event_id="b-0", user="u", item="9", ts=10.0),
                              Event(event_id="c-0", user="other", item="7", ts=11.0)]
    assert store.add(mixed) == 2
    assert store.count() == 7
    assert store.latest("u", 3) == ["3", "4", "9"]  # oldest first, the newest three
    assert store.latest("u", 100) == ["0", "1", "2", "3", "4", "9"]
    assert store.latest("nobody", 5) == [] and store.latest("u", 0) == []
    # Same timestamp: arrival order decides.
    store.add([Event(event_id="t-1", user="tie", item="x", ts=5.0), Event(event_id="t-2", user="tie", item="y", ts=5.0)])
    assert store.latest("tie", 2) == ["x", "y"]
    assert [e[:2] for e in store.iter_events()][:2] == [("u", "0"), ("u", "1")]
    store.close()


def write_events(url: str, writer: int, n: int, batch: int, barrier) -> int:
    store = EventStore(url)
    barrier.wait()
    stored = 0
    for start in range(0, n, batch):
        chunk = [Event(event_id=f"w{writer}-{i}", user=f"user{i % 7}", item=str(i % 13), ts=float(i))
                 for i in range(start, min(n, start + batch))]
        # Each writer also resends the previous writer's first events: duplicates racing with their originals.
        chunk += [Event(event_id=f"w{(writer - 1) % 4}-{i}", user=f"user{i % 7}", item=str(i % 13), ts=float(i))
                  for i in range(start, min(start + 3, n))]
        stored += store.add(chunk)
    store.close()
    return stored


def test_concurrent_writer_processes_lose_nothing_and_store_nothing_twice(store_url):
    EventStore(store_url).close()  # migrated once; the writers then only open it
    n, writers = 300, 4
    context = multiprocessing.get_context("spawn")
    with context.Manager() as manager:
        barrier = manager.Barrier(writers)
        with context.Pool(writers) as pool:
            stored = pool.starmap(write_events, [(store_url, w, n, 1 + 7 * w, barrier) for w in range(writers)])
    store = EventStore(store_url)
    assert store.count() == n * writers == sum(stored)  # every event once: none lost, no duplicate stored
    assert len({(u, i, t) for u, i, t in store.iter_events()}) <= n * writers
    store.close()


def test_sqlite_store_is_in_wal_mode_with_the_covering_user_index(tmp_path):
    EventStore(f"sqlite:{tmp_path / 'nested' / 'events.db'}").close()
    conn = sqlite3.connect(tmp_path / "nested" / "events.db")
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    plan = " ".join(str(row) for row in conn.execute(
        "EXPLAIN QUERY PLAN SELECT item FROM events WHERE user_id = 'u' ORDER BY ts DESC, seq DESC LIMIT 5"))
    assert "COVERING INDEX events_user_recent" in plan


@pytest.mark.parametrize("url", ["events.db", "sqlite:", "mysql://x/y", "postgresql:nohost"])
def test_a_bad_url_names_the_accepted_forms(url):
    with pytest.raises(ConfigError, match=r"--events: .* use sqlite:PATH .* postgresql://USER@HOST/DB"):
        EventStore(url)


def test_an_unreachable_postgresql_is_a_clear_error():
    pytest.importorskip("psycopg")
    with pytest.raises(ConfigError, match="cannot connect to postgresql://nobody@127.0.0.1:1/x"):
        EventStore("postgresql://nobody@127.0.0.1:1/x?connect_timeout=2")


@pytest.mark.parametrize("body, where", [
    ({"user": 1, "item": 2}, "event_id"), ({"event_id": "", "user": 1, "item": 2}, "event_id"),
    ({"event_id": "e", "user": "", "item": 2}, "user"), ({"event_id": "e", "user": 1, "item": 2, "ts": -1}, "ts"),
    ({"event_id": "e", "user": 1, "item": 2, "colour": "red"}, "colour"),
    ({"event_id": "e", "user": "a\x00b", "item": 2}, "user"), ({"event_id": "e\x00", "user": 1, "item": 2}, "event_id")])
def test_malformed_events_are_refused_naming_the_field(body, where):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=where):
        Event.model_validate(body)


def test_latest_many_reads_every_users_history_in_one_query_as_latest_does(store_url):
    store = EventStore(store_url)
    store.add(events("a", 6, user="u") + events("b", 3, user="v", start_ts=100.0)
              + [Event(event_id="t-1", user="tie", item="x", ts=5.0), Event(event_id="t-2", user="tie", item="y", ts=5.0)])
    users = ["u", "v", "nobody", "tie", "u"]  # a user twice in one round, and one with no events
    many = store.latest_many(users, 4)
    assert many == {user: store.latest(user, 4) for user in users}
    assert many["u"] == ["2", "3", "4", "5"] and many["nobody"] == [] and many["tie"] == ["x", "y"]
    assert store.latest_many(users, 0) == {"u": [], "v": [], "nobody": [], "tie": []}
    # Many users in one round.
    crowd = [f"c{i}" for i in range(450)]
    store.add([Event(event_id=f"c-{i}", user=user, item=str(i), ts=float(i)) for i, user in enumerate(crowd)])
    assert store.latest_many(crowd, 3) == {user: [str(i)] for i, user in enumerate(crowd)}
    # Ids that a text format could mangle (SQLite reads every user's items as one JSON text) come back as stored;
    # the newest first by time whatever the arrival order.
    odd = ['a "quoted", item', "naïve\u2028line", "back\\slash", "[1]", "\x1f", "null"]
    store.add([Event(event_id=f"o-{i}", user='odd "user"', item=item, ts=10.0 - i) for i, item in enumerate(odd)])
    assert store.latest_many(['odd "user"', "u"], 10) == {'odd "user"': odd[::-1], "u": store.latest("u", 10)}
    store.close()


def test_add_groups_commits_several_requests_in_one_transaction_and_tells_new_from_retried(store_url):
    store = EventStore(store_url)
    store.add(events("old", 2))
    # A new request, a partial retry (one stored before, one new) and a pure retry, in one transaction.
    flags = store.add_groups([events("new", 3), events("old", 1) + [Event(event_id="old-9", user="u", item="9")],
                              events("old", 2), [], [Event(event_id="one", user="w", item="1")]])
    assert flags == [[True, True, True], [False, True], [False, False], [], [True]]
    assert store.count() == 2 + 3 + 1 + 1
    store.close()


def test_group_commit_serves_concurrent_writers_in_few_transactions_answering_after_commit(store_url):
    import asyncio

    from modelworks.events import AsyncEventStore

    async def scenario():
        store = AsyncEventStore(store_url)
        await store.open()
        rounds = []
        serve = store.writer.serve
        store.writer.serve = lambda groups: rounds.append(len(groups)) or serve(groups)
        single = [[Event(event_id=f"s{i}", user=f"u{i % 5}", item=str(i))] for i in range(60)]
        answers = await asyncio.gather(*(store.add(group) for group in single), store.add(single[0]))
        assert answers == [[True]] * 60 + [[False]]  # the retry of s0 in the same burst: stored once
        assert sum(rounds) == 61 and len(rounds) < 61 / 2  # events that arrive together share a transaction
        # Answered after the commit: another connection sees every acknowledged event.
        other = EventStore(store_url)
        assert other.count() == 60
        assert await asyncio.gather(store.latest("u1", 2), store.latest("u2", 50), store.latest("nobody", 3)) == [
            ["51", "56"], [str(i) for i in range(2, 60, 5)], []]
        other.close()
        await store.close()

    asyncio.run(scenario())


def test_a_store_of_schema_1_is_upgraded_on_open_keeping_its_events(store_url, monkeypatch):
    import modelworks.events as events_module

    monkeypatch.setattr(events_module, "MIGRATIONS", MIGRATIONS[:1])
    old = EventStore(store_url)
    old.add(events("a", 4))
    assert old.schema_version() == 1
    old.close()
    monkeypatch.setattr(events_module, "MIGRATIONS", MIGRATIONS)
    store = EventStore(store_url)  # migration 2: the covering index replaces (user_id, ts)
    assert store.schema_version() == 2 and store.latest("u", 2) == ["2", "3"] and store.count() == 4
    store.close()
