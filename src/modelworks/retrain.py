"""`modelworks retrain PACKAGE --events URL [--promote --server URL]`: a new version from the event store.

1. The store's events are written to RUN_DIR/events.csv (user,item,timestamp).
2. The package's own resolved config (kept in its manifest) trains a new run on the recorded training data plus
   those events (`Task.retrain_overrides`; the events alone when the recorded data is no longer there).
3. The new run is exported as a package of the same model name and a new version, in the same formats.
4. Both the serving package and the new one are scored on the newest events (`Task.evaluate_on_events`:
   recommendation holds out each user's newest event, leave-last-out).
5. With --promote, a new version that is not worse by the task's monitor metric is loaded into the running
   server through its admin API (warmed up before it takes traffic) and promoted: the existing hot swap, so
   requests in flight are answered and none is dropped. A worse one is left unpromoted, and the command says why.
"""

from __future__ import annotations

import csv
import json
import os
import time
import urllib.error
import urllib.request
from pathlib import Path

from . import config as config_mod
from .errors import ConfigError, ModelworksError
from .events import EventStore
from .registry import get_task

ADMIN_TOKEN_ENV = "MODELWORKS_ADMIN_TOKEN"  # the server's; the admin API needs it as a bearer token


def export_events(store: EventStore, path: Path) -> list[tuple[str, str, float]]:
    """Every event of the store, in time order, into a CSV the task's data reader takes; also returned."""
    events = list(store.iter_events())
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["user", "item", "timestamp"])
        writer.writerows(events)
    return events


def read_manifest(package: Path) -> dict:
    path = package / "manifest.json"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"PACKAGE: {path} cannot be read ({exc}); name a package folder from modelworks export"
                          ) from None


def train_new_version(manifest: dict, events_file: Path, run_dir: Path, log=print) -> Path:
    """Train with the package's recipe on its data plus the events; returns the run directory."""
    from .engine import rundir
    from .engine.loop import fit

    task_cls = get_task(manifest["task"])
    raw = json.loads(json.dumps(manifest["config"]))  # a copy
    overrides = task_cls(config_mod.load_config(task_cls, raw)).retrain_overrides(events_file)
    if not overrides:
        raise ConfigError(f"retrain: the {manifest['task']} task cannot learn from events (it has no "
                          "retrain_overrides)")
    for assignment in [*overrides, f"output_dir={run_dir.parent.parent}", f"name={run_dir.name}"]:
        config_mod.apply_override(raw, assignment)
    cfg = config_mod.load_config(task_cls, raw)
    log(f"training {run_dir} with the package's config and {', '.join(overrides)}")
    rundir.write_run_files(run_dir, cfg, ["modelworks", "retrain"])
    result = fit(task_cls(cfg), cfg, run_dir)
    if result.status != "finished":
        raise ModelworksError(f"retrain: the run {run_dir} ended {result.status}; nothing was exported")
    return run_dir


def score(package: Path, task_cls, events: list, runtime: str) -> dict[str, float] | None:
    from .inference import open_model

    return task_cls.evaluate_on_events(open_model(package, runtime), events)


def admin_call(server: str, method: str, path: str, body: dict, token: str, timeout_s: float = 120) -> dict:
    request = urllib.request.Request(server.rstrip("/") + path, method=method, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode("utf-8", "replace")[:500]
        raise ModelworksError(f"--server: {method} {path} answered {exc.code}: {detail}") from None
    except urllib.error.URLError as exc:
        raise ModelworksError(f"--server: {server} cannot be reached ({exc.reason}); is the server running?") from None


def promote(server: str, name: str, package: Path, version: str) -> None:
    """Load the package as a version of `name` with no traffic (warmed up by the server), then move all traffic to
    it; the serving version stays loaded for rollback (POST /v1/admin/models/NAME/rollback)."""
    token = os.environ.get(ADMIN_TOKEN_ENV, "")
    if not token:
        raise ConfigError(f"--promote: set {ADMIN_TOKEN_ENV} to the server's admin token")
    admin_call(server, "POST", f"/v1/admin/models/{name}/versions", {"package": str(package.resolve()),
                                                                     "weight": 0.0}, token)
    admin_call(server, "POST", f"/v1/admin/models/{name}/promote", {"version": version}, token)


def run_retrain(package: Path, events_url: str, out: Path | None, version: str | None, promote_to: str | None,
                runtime: str = "onnx", name: str | None = None, log=print) -> int:
    from .inference import export_run

    manifest = read_manifest(package)
    task_cls = get_task(manifest["task"])
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    version = version or f"r{stamp}"
    if version == manifest["version"]:
        raise ConfigError(f"--version: {version!r} is the serving package's version; choose another")
    runs = Path(out) if out else Path(manifest["config"].get("output_dir", "runs"))
    run_dir = runs / manifest["task"] / f"{manifest['name']}-retrain-{stamp}"

    store = EventStore(events_url)
    try:
        events = export_events(store, run_dir / "events.csv")
    finally:
        store.close()
    if not events:
        raise ConfigError(f"--events: {events_url} holds no events; nothing to retrain on")
    log(f"{len(events)} events from {events_url} -> {run_dir / 'events.csv'}")
    train_new_version(manifest, run_dir / "events.csv", run_dir, log)
    formats = tuple(f for f in ("torchscript", "onnx") if f in manifest.get("checks", {}).get("passed", [])) or \
        ("torchscript", "onnx")
    new_package, _ = export_run(run_dir, run_dir / "package", {"formats": formats, "name": manifest["name"],
                                                               "version": version}, log=log)

    key, mode = task_cls.monitor[0].split("/", 1)[1], task_cls.monitor[1]
    old, new = score(package, task_cls, events, runtime), score(new_package, task_cls, events, runtime)
    if old is None or new is None:
        log(f"retrain: the {manifest['task']} task cannot score versions on events; the new package is "
            f"{new_package}, not promoted")
        return 1
    log(f"\non the newest events (each user's last, leave-last-out): {int(new.get('users', 0))} users")
    for label, metrics in ((f"serving {manifest['version']}", old), (f"new {version}", new)):
        log(f"  {label:<24} " + "  ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k != "users"))
    not_worse = new[key] >= old[key] if mode == "max" else new[key] <= old[key]
    (run_dir / "retrain.json").write_text(json.dumps({"serving": manifest["version"], "new": version, "events":
                                                      len(events), "metric": key, "serving_metrics": old,
                                                      "new_metrics": new, "not_worse": not_worse}, indent=2) + "\n")
    if not not_worse:
        log(f"not promoted: {key} {new[key]:.4f} is worse than the serving version's {old[key]:.4f}; the package is "
            f"{new_package}")
        return 2
    if promote_to is None:
        log(f"not worse by {key}; promote it with --promote --server URL, or serve {new_package}")
        return 0
    promote(promote_to, name or manifest["name"], new_package, version)
    log(f"promoted: {promote_to} now serves {name or manifest['name']} version {version} (the previous version "
        "stays loaded for rollback)")
    return 0
