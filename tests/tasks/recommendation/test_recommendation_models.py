"""The recommendation models: SASRec on the shared decoder, the two-tower model's logQ-corrected sampled softmax,
its training through the engine and its faiss retrieval against exact search."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers import run_cli
from modelworks.models.transformer import Decoder
from modelworks.tasks.recommendation import data as rec_data
from modelworks.tasks.recommendation.models import SASRec, sampled_cross_entropy
from modelworks.tasks.recommendation.two_tower import sampled_softmax_loss

faiss = pytest.importorskip("faiss")
from modelworks.tasks.recommendation.retrieval import build_index, recall_at_k, search  # noqa: E402


def test_sasrec_is_the_shared_decoder_and_left_padding_changes_nothing():
    torch.manual_seed(0)
    model = SASRec(n_items=20, max_len=8, dim=16, layers=2, heads=2, dropout=0.0).eval()
    assert isinstance(model.decoder, Decoder) and model.decoder.head is None
    history = torch.tensor([[3, 7, 1, 12]])
    padded = torch.cat([torch.zeros(1, 4, dtype=torch.long), history], 1)
    with torch.no_grad():
        # Reference: the decoder's plain causal path (no mask, positions 0..T-1) on the bare history, scored
        # against the item table by hand.
        reference = model.decoder(history)[:, -1] @ model.decoder.embed.weight[1:].T
        torch.testing.assert_close(model(padded), reference, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model(history), reference, atol=1e-5, rtol=1e-5)
    # Training reads every real position: a loss that a step lowers.
    targets = torch.cat([padded[:, 1:], torch.tensor([[5]])], 1)
    optimizer = torch.optim.AdamW(model.train().parameters(), lr=0.01)
    losses = []
    for _ in range(5):
        loss = model(padded, targets)
        optimizer.zero_grad(), loss.backward(), optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_sampled_cross_entropy_estimates_the_full_softmax_and_masks_the_target():
    torch.manual_seed(0)
    h, items = torch.randn(6, 8), torch.randn(40, 8)
    target = torch.tensor([0, 5, 5, 17, 39, 2])
    full = F.cross_entropy(h @ items.T, target)
    # Many draws: the corrected normaliser converges to the full one (a k-way softmax without the n / k
    # correction would be far lower).
    torch.manual_seed(1)
    many = sampled_cross_entropy(h, items, target, 200_000)
    assert many.item() == pytest.approx(full.item(), rel=0.02)
    # A drawn copy of a row's target is masked, never a negative against itself: the loss is the full softmax
    # over the other drawn items, here exactly {target, one other item}.
    torch.manual_seed(2)
    drawn = torch.randint(0, 40, (2,))
    torch.manual_seed(2)
    row_h, row_target = h[:1], drawn[:1].clone()
    got = sampled_cross_entropy(row_h, items, row_target, 2)
    other = drawn[1]
    logits = torch.stack([row_h[0] @ items[row_target[0]], row_h[0] @ items[other] + math.log(40 / 2)])
    if other == row_target[0]:
        expected = torch.tensor(0.0)
    else:
        expected = -F.log_softmax(logits, 0)[0]
    assert got.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-6)
    # Through the model: `negatives` switches the training loss, and a few steps lower it.
    model = SASRec(n_items=40, max_len=8, dim=16, layers=1, heads=2, dropout=0.0, negatives=8)
    history = torch.tensor([[0, 0, 3, 7, 1, 12, 9, 4]])
    targets = torch.tensor([[0, 3, 7, 1, 12, 9, 4, 30]])
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.02)
    losses = []
    for step in range(30):
        torch.manual_seed(step)
        loss = model(history, targets)
        optimizer.zero_grad(), loss.backward(), optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) < sum(losses[:5])


def test_logq_correction_on_a_hand_case():
    # Two users, three items; user 0's positive is item 2, user 1's is item 0 (item 1 is no one's: not a candidate).
    users = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    items = torch.tensor([[0.0, 1.0], [1.0, 1.0], [1.0, 0.0]])
    q = torch.tensor([0.5, 0.3, 0.2])
    loss = sampled_softmax_loss(users, items, torch.tensor([2, 0]), q.log(), temperature=0.5)
    # candidates (sorted distinct positives): items 0 and 2. Logits = u.v / 0.5 - log q.
    row0 = torch.tensor([0 / 0.5 - math.log(0.5), 1 / 0.5 - math.log(0.2)])  # label: item 2 (column 1)
    row1 = torch.tensor([1 / 0.5 - math.log(0.5), 0 / 0.5 - math.log(0.2)])  # label: item 0 (column 0)
    expected = (-F.log_softmax(row0, 0)[1] - F.log_softmax(row1, 0)[0]) / 2
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    # A uniform q is a constant shift (no correction); the skewed q changes the loss.
    plain = sampled_softmax_loss(users, items, torch.tensor([2, 0]), torch.zeros(3), 0.5)
    uniform = sampled_softmax_loss(users, items, torch.tensor([2, 0]), torch.full((3,), math.log(1 / 3)), 0.5)
    assert uniform.item() == pytest.approx(plain.item()) and abs(loss.item() - plain.item()) > 0.01


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_indexes_agree_with_exact_search_on_a_tiny_catalogue(kind):
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(500, 8)).astype(np.float32)
    queries = rng.normal(size=(20, 8)).astype(np.float32)
    exact = np.argsort(-(queries @ vectors.T), axis=1)[:, :10]
    # Every cell probed (nprobe = nlist) / a wide beam: the approximate index must find the exact top-10.
    index = build_index(vectors, kind, nlist=8, nprobe=8, ef_search=500)
    _, found = search(index, queries, 10)
    assert recall_at_k(found, exact) == 1.0
    _, flat = search(build_index(vectors, "flat"), queries, 10)
    np.testing.assert_array_equal(flat, exact)


@pytest.fixture(scope="module")
def two_tower_run(tmp_path_factory):
    """`modelworks train recommendation --recipe two-tower` for a few steps on an ml-100k-format fixture, exported."""
    root = tmp_path_factory.mktemp("two-tower")
    rec_data.write_ml100k(root / "ml-100k", n_users=60, n_items=25, seed=2)
    result = run_cli(["train", "recommendation", "--recipe", "two-tower", "--data", f"movielens:{root / 'ml-100k'}",
                      "--name", "tt", "--set", f"output_dir={root / 'runs'}", "--set", "model.max_len=12",
                      "--set", "model.dim=16", "--set", "train.time_budget_s=0", "--set", "train.steps=40",
                      "--set", "train.batch_size=32", "--set", "train.eval_every_steps=20", "--set", "optim.lr=0.01",
                      "--set", "train.log_every_steps=5"])
    assert result.returncode == 0, result.stderr
    run_dir = root / "runs" / "recommendation" / "tt"
    exported = run_cli(["export", str(run_dir), "--out", str(root / "package"), "--version", "1"])
    assert exported.returncode == 0, exported.stderr
    return root, run_dir


def test_two_tower_trains_through_the_engine(two_tower_run):
    _, run_dir = two_tower_run
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["step"] == 40
    losses = [json.loads(line)["train/loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
              if "train/loss" in line]
    assert losses[-1] < losses[0]
    test = json.loads((run_dir / "evaluation" / "test.json").read_text())
    assert test["test/hr@10"] > 0.6  # the fixture's users walk items in order; chance is 10/25


def test_two_tower_package_retrieves_through_faiss_as_exact_search_ranks(two_tower_run):
    from modelworks.inference import open_model

    root, _ = two_tower_run
    manifest = json.loads((root / "package" / "manifest.json").read_text())
    assert {"items.json", "item_vectors.npy"} <= set(manifest["files"])
    assert manifest["checks"]["passed"] == ["eager", "torchscript", "onnx"]
    model = open_model(root / "package", "onnx")
    predictor = model.predictor
    vectors = np.load(root / "package" / "item_vectors.npy", allow_pickle=False)
    assert vectors.shape == (25, 16) and predictor.ann_index.ntotal == 25
    history = ["3", "4", "5", "9"]
    item = predictor.parse(predictor.Request(user="u", history=history, k=5), None)
    (answer,) = predictor.predict([item], model.runner)
    # Exact: every item scored by the user vector, history hidden, top 5.
    (user,) = model.runner(predictor.collate([item]))[:1]
    scores = vectors.astype(np.float64) @ user[0].astype(np.float64)
    order = [predictor.ids[j] for j in np.argsort(-scores) if predictor.ids[j] not in history][:5]
    assert [i.item for i in answer.items] == order
    assert answer.items[0].score == pytest.approx(scores[predictor.ids.index(order[0])] / 0.05, rel=1e-5)


def test_evaluate_reports_every_ranking_metric(two_tower_run):
    _, run_dir = two_tower_run
    result = run_cli(["evaluate", str(run_dir)])
    assert result.returncode == 0, result.stderr
    for metric in ("test/hr@10", "test/ndcg@10", "test/mrr", "test/coverage@10", "test/popularity@10"):
        assert metric in result.stdout, (metric, result.stdout)
    saved = json.loads((run_dir / "evaluation" / "test.json").read_text())
    assert 0 < saved["test/coverage@10"] <= 1 and 0 < saved["test/popularity@10"] <= 1
