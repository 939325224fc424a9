"""Recommendation through the engine and the CLI: metrics by hand, EASE's closed form via `modelworks train`,
export parity, `modelworks predict` over JSONL requests, and bad requests."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from helpers import run_cli
from modelworks.errors import InputError
from modelworks.tasks.recommendation import data as rec_data
from modelworks.tasks.recommendation.metrics import RankingMetrics, mask_seen, ndcg_of_rank, target_ranks
from modelworks.tasks.recommendation.models import EASE


def test_metrics_match_hand_computed_values():
    # 5 items (columns = items 1..5). User 0: target item 3, item 1 seen -> ranked below item 5 only: rank 1.
    # User 1: target item 2, scores all tied -> pessimistic: rank 4 (every other item counts above it).
    scores = torch.tensor([[9.0, 1.0, 5.0, 0.0, 7.0], [1.0, 1.0, 1.0, 1.0, 1.0]])
    target, seen = torch.tensor([3, 2]), torch.tensor([[1, 0], [0, 0]])
    masked = mask_seen(scores, seen)
    assert masked[0, 0] == float("-inf") and masked[1].isfinite().all()
    assert target_ranks(masked, target).tolist() == [1, 4]
    metrics = RankingMetrics(torch.tensor([4.0, 3.0, 2.0, 1.0, 0.0]), n_users=4)
    metrics.update(scores, target, seen)
    got = metrics.compute()
    assert got["hr@10"] == 1.0
    assert got["ndcg@10"] == pytest.approx((1 / math.log2(3) + 1 / math.log2(6)) / 2)
    assert got["mrr"] == pytest.approx((1 / 2 + 1 / 5) / 2)
    assert got["coverage@10"] == 1.0 and ndcg_of_rank(10) == 0.0
    # top-10 of 5 items holds all items but the seen one (user 0) and all 5 (user 1): popularity means / 4 users
    assert got["popularity@10"] == pytest.approx(((3 + 2 + 1 + 0) / 4 + 10 / 5) / 2 / 4)


def test_ease_closed_form_is_steck_2019():
    rng = np.random.default_rng(0)
    x = (rng.random((40, 7)) < 0.4).astype(np.float64)
    model = EASE(7)
    model.fit(torch.tensor(x), l2=2.0)
    # Reference: B = argmin ||X - XB||^2 + l2 ||B||^2 s.t. diag(B) = 0, column by column with numpy.
    reference = np.zeros((7, 7))
    for j in range(7):
        others = [i for i in range(7) if i != j]
        a = x[:, others]
        reference[others, j] = np.linalg.solve(a.T @ a + 2.0 * np.eye(6), a.T @ x[:, j])
    np.testing.assert_allclose(model.weight.detach().numpy(), reference, atol=1e-5)


@pytest.fixture(scope="module")
def ease_run(tmp_path_factory):
    """`modelworks train recommendation --recipe ease` on an ml-100k-format fixture, then exported."""
    root = tmp_path_factory.mktemp("ease")
    rec_data.write_ml100k(root / "ml-100k", n_users=60, n_items=25, seed=2)
    result = run_cli(["train", "recommendation", "--recipe", "ease", "--data", f"movielens:{root / 'ml-100k'}",
                      "--name", "ease", "--set", f"output_dir={root / 'runs'}", "--set", "model.max_len=16",
                      "--set", "model.l2=5"])
    assert result.returncode == 0, result.stderr
    run_dir = root / "runs" / "recommendation" / "ease"
    exported = run_cli(["export", str(run_dir), "--out", str(root / "package"), "--version", "1"])
    assert exported.returncode == 0, exported.stderr
    return root, run_dir, result


def test_ease_trains_in_closed_form_through_the_engine(ease_run):
    _, run_dir, result = ease_run
    assert "closed form (no optimizer steps)" in result.stdout
    assert (run_dir / "checkpoints" / "best.pt").is_file() and (run_dir / "checkpoints" / "last.pt").is_file()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["step"] == 1 and "closed_form" in summary
    test = json.loads((run_dir / "evaluation" / "test.json").read_text())
    # The fixture's users walk items in order: EASE learns "next to what you saw", far above chance (10/25).
    assert test["test/hr@10"] > 0.6 and 0 < test["test/ndcg@10"] <= test["test/hr@10"]
    assert summary["best"]["val/ndcg@10"] > 0.3


def test_the_package_ships_the_catalogue_and_every_format_agrees(ease_run):
    root, _, _ = ease_run
    manifest = json.loads((root / "package" / "manifest.json").read_text())
    assert "items.json" in manifest["files"] and manifest["checks"]["passed"] == ["eager", "torchscript", "onnx"]
    catalogue = json.loads((root / "package" / "items.json").read_text())
    assert len(catalogue["ids"]) == 25 and catalogue["titles"]["1"] == "Movie 1 (1995)"
    assert manifest["metrics"]["export"]["onnx"]["max_abs_diff"] < 1e-4


def test_predict_answers_jsonl_requests_and_reports_bad_lines(ease_run, tmp_path):
    root, _, _ = ease_run
    requests = tmp_path / "users.jsonl"
    lines = [{"user": "a", "history": ["3", "4", "5"], "k": 5},
             {"user": "b", "history": [3, 4, 5], "k": 5, "exclude": ["6"]},
             {"user": "cold"},
             {"user": "c", "history": ["3", "999", "nope"]},
             {"user": "d", "history": ["3"], "k": 26},
             "not an object"]
    requests.write_text("\n".join(json.dumps(line) for line in lines) + "\n{broken\n")
    out = tmp_path / "out.jsonl"
    result = run_cli(["predict", str(root / "package"), str(requests), "--out", str(out), "--batch-size", "2"])
    assert result.returncode == 1, result.stderr  # bad lines were skipped
    assert "3 predicted, 4 skipped" in result.stderr
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert [row["path"].rsplit(":", 1)[1] for row in written] == [str(i) for i in range(1, 8)]  # in line order
    rows = {row["path"].rsplit(":", 1)[1]: row for row in written}
    first, second, cold = rows["1"]["prediction"], rows["2"]["prediction"], rows["3"]["prediction"]
    ids = [item["item"] for item in first["items"]]
    assert len(ids) == 5 and not {"3", "4", "5"} & set(ids) and first["fallback"] is None
    assert ids[0] == "6"  # the walk's next item
    assert "6" not in [item["item"] for item in second["items"]] and second["items"][0]["item"] == ids[1]
    assert cold["fallback"] == "popularity" and len(cold["items"]) == 10 and cold["history_used"] == 0
    assert "history: 2 items not in the model's catalogue: '999', 'nope'" in rows["4"]["error"]
    assert "k: at most 25" in rows["5"]["error"]
    assert "not a request object" in rows["6"]["error"] and "not valid JSON" in rows["7"]["error"]


def test_predictor_refuses_unknown_items_and_a_k_beyond_the_catalogue(tmp_path):
    from modelworks.config import load_config
    from modelworks.tasks.recommendation.task import RecommendationTask

    raw = RecommendationTask.tiny(tmp_path)
    raw["task"] = "recommendation"
    task = RecommendationTask(load_config(RecommendationTask, raw))
    task.datasets(torch.device("cpu"))
    predictor = task.predictor()
    request = predictor.Request
    with pytest.raises(InputError, match=r"exclude: 1 item not in the model's catalogue: 'x'"):
        predictor.parse(request(history=["1"], exclude=["x"]))
    with pytest.raises(InputError, match=r"k: at most 30 \(the catalogue has 30 items"):
        predictor.parse(request(history=["1"], k=31))
    item = predictor.parse(request(history=[str(i) for i in range(1, 21)]))
    assert item["used"] == 12 and item["history"].tolist() == list(range(9, 21))  # the most recent max_len
    assert item["hide"] == list(range(1, 21))  # but every history item is hidden from the answer
