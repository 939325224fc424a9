"""`modelworks retrain`: a new version trained on the event store's events, scored against the serving version on
the newest events, and promoted into a running server (a real process) while a client keeps requesting: no
request is dropped."""

from __future__ import annotations

import json
import random
import threading

import httpx

from modelworks.cli import main
from modelworks.events import Event, EventStore
from test_server_process import ServerProcess

TOKEN = "retrain-test-token"


def write_grouped_events(url: str, n_users: int = 40, seed: int = 0) -> None:
    """Users who each see 6 items of one half of the catalogue (odd or even ids), in random order: co-occurrence
    the serving model (trained on walks through consecutive items) has not seen, which a retrained one learns."""
    rng = random.Random(seed)
    events = []
    for user in range(n_users):
        pool = [str(i) for i in range(1 + user % 2, 21, 2)]
        for position, item in enumerate(rng.sample(pool, 6)):
            events.append(Event(event_id=f"g{user}-{position}", user=f"e{user}", item=item, ts=1e9 + position))
    store = EventStore(url)
    store.add(events)
    store.close()


def test_retrain_and_promote_under_load_drop_no_request(tiny_rec_package, tmp_path, monkeypatch):
    url = f"sqlite:{tmp_path / 'events.db'}"
    write_grouped_events(url)
    monkeypatch.setenv("MODELWORKS_ADMIN_TOKEN", TOKEN)
    server = ServerProcess(tiny_rec_package, "--events", url, "--threads", "1")
    answers, stop = [], threading.Event()

    def keep_requesting():
        with httpx.Client(base_url=server.url, timeout=30) as client:
            while not stop.is_set():
                try:
                    response = client.get("/v1/models/ease/recommend", params={"user": "e1", "k": 5,
                                                                               "exclude": "seen"})
                    answers.append((response.status_code, response.headers.get("x-model-version")))
                except httpx.HTTPError as exc:
                    answers.append((type(exc).__name__, None))

    client = threading.Thread(target=keep_requesting)
    client.start()
    try:
        code = main(["retrain", str(tiny_rec_package), "--events", url, "--out", str(tmp_path / "runs"),
                     "--version", "2", "--promote", "--server", server.url])
        after_promotion = len(answers)
        while len(answers) < after_promotion + 20:  # the client keeps going on the new version
            threading.Event().wait(0.05)
    finally:
        stop.set()
        client.join(timeout=30)
        server.stop()
    assert code == 0
    statuses = {status for status, _ in answers}
    assert statuses == {200}, [a for a in answers if a[0] != 200][:5]  # not one request dropped or failed
    versions = [version for _, version in answers]
    assert versions[0] == "1" and versions[-1] == "2" and len(answers) > 40
    record = json.loads(next((tmp_path / "runs" / "recommendation").glob("ease-retrain-*/retrain.json")).read_text())
    assert record["events"] == 240 and record["not_worse"] is True
    assert record["new_metrics"]["ndcg@10"] > record["serving_metrics"]["ndcg@10"]  # it learned the events
    assert record["new_metrics"]["users"] == 40


def test_retrain_without_events_or_with_a_bad_url_says_so(tiny_rec_package, tmp_path, capsys):
    assert main(["retrain", str(tiny_rec_package), "--events", f"sqlite:{tmp_path / 'empty.db'}"]) == 2
    assert "holds no events; nothing to retrain on" in capsys.readouterr().err
    assert main(["retrain", str(tiny_rec_package), "--events", "mysql://x"]) == 2
    assert "is not an event store URL" in capsys.readouterr().err
