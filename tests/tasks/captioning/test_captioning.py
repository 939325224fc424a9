"""Captioning: beam search (beam 1 is greedy, scores sorted, the length penalty's effect), cached decoding equal to
uncached, metrics on hand-built cases, export parity of the encode and decode graphs, served requests (whole and
streamed) and every bad input, with the server still serving after them."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
import torch

from modelworks.config import load_config, to_dict
from modelworks.models.decoding import beam_search, length_penalty
from modelworks.tasks.captioning.metrics import caption_scores
from modelworks.tasks.captioning.predictor import CaptionRequest, Row, decode_rows, eager_runner
from modelworks.tasks.captioning.task import CaptioningTask

CPU = torch.device("cpu")

# ---------------------------------------------------------------------------------------------- beam search

END = 0


def markov(table: dict[int, list[float]]):
    """A decoder whose next-token distribution depends on the last token only: step(tokens, parents)."""
    log_table = {k: np.log(np.asarray(v, np.float64)) for k, v in table.items()}
    calls = []

    def step(tokens, parents):
        calls.append((tokens.copy(), None if parents is None else parents.copy()))
        return np.stack([log_table[int(t)] for t in tokens])
    return step, calls


# start (END as input): end or "a" equally; after a: mostly b; after b: mostly end
TABLE = {0: [0.5, 0.5 - 1e-3, 1e-3], 1: [0.2, 1e-3, 0.8 - 1e-3], 2: [0.8, 0.1, 0.1]}


def greedy(step, max_length):
    tokens, last = [], np.array([END])
    for _ in range(max_length):
        token = int(np.argmax(step(last, None)[0]))
        if token == END:
            break
        tokens.append(token)
        last = np.array([token])
    return tokens


@pytest.mark.parametrize("table", [TABLE, {0: [0.1, 0.6, 0.3], 1: [0.3, 0.2, 0.5], 2: [0.45, 0.5, 0.05]}])
def test_beam_one_is_greedy(table):
    step, _ = markov(table)
    (best,) = beam_search(step, END, beam=1, max_length=12)
    assert best.tokens == greedy(markov(table)[0], 12)


def test_beam_returns_n_best_sorted_and_the_length_penalty_favours_longer():
    step, calls = markov(TABLE)
    hypotheses = beam_search(step, END, beam=3, max_length=8, n=3)
    scores = [h.score for h in hypotheses]
    assert scores == sorted(scores, reverse=True) and len(hypotheses) == 3
    assert hypotheses[0].tokens == [] and hypotheses[0].log_prob == pytest.approx(np.log(0.5))  # alpha 0: shortest
    assert hypotheses[1].tokens == [1, 2]
    assert hypotheses[1].log_prob == pytest.approx(np.log(0.5 - 1e-3) + np.log(0.8 - 1e-3) + np.log(0.8))
    # GNMT's penalty divides by ((5 + |Y|) / 6)^alpha: with alpha 2, "a b <end>" outranks "<end>"
    long_best = beam_search(markov(TABLE)[0], END, beam=3, max_length=8, alpha=2.0)[0]
    assert long_best.tokens == [1, 2]
    assert long_best.score == pytest.approx(long_best.log_prob / length_penalty(3, 2.0))
    # parents let the caller reorder its cache: every call after the first names a live row of the one before
    assert calls[0][1] is None and all(len(p) == len(t) for t, p in calls[1:])


def test_beam_cut_at_max_length_is_marked():
    step, _ = markov({0: [0.01, 0.98, 0.01], 1: [0.01, 0.98, 0.01], 2: [0.5, 0.25, 0.25]})
    best = beam_search(step, END, beam=2, max_length=4)[0]
    assert best.tokens == [1, 1, 1, 1] and not best.finished
    with pytest.raises(ValueError, match="n: must be between 1 and beam=2"):
        beam_search(step, END, beam=2, max_length=4, n=3)


# ---------------------------------------------------------------------------------------------- metrics


def test_metrics_on_hand_built_cases():
    refs = {1: ["a small red bag on the left"], 2: ["two large blue coats at the top"],
            3: ["a green sneaker left of a white boot"]}
    perfect, _ = caption_scores(refs, {i: r[0] for i, r in refs.items()})
    assert perfect["bleu4"] == pytest.approx(1.0, abs=1e-6) and perfect["rouge_l"] == pytest.approx(1.0)
    assert perfect["cider"] == pytest.approx(10.0, abs=1e-6)  # CIDEr-D's x10 scale, identical captions
    close, _ = caption_scores(refs, {1: "a small red bag on the right", 2: "two large blue coats at the top",
                                     3: "a green sneaker left of a white boot"})
    wrong, _ = caption_scores(refs, {1: "zebra", 2: "zebra", 3: "zebra"})
    assert perfect["cider"] > close["cider"] > wrong["cider"] == 0.0
    assert wrong["bleu1"] < 1e-6
    # captions are compared normalised (lower case), as the model is trained
    shouted, _ = caption_scores(refs, {i: r[0].upper() for i, r in refs.items()})
    assert shouted == perfect


# ---------------------------------------------------------------------------------------------- the model


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """CaptioningTask.tiny()'s model, fitted to its training scenes for a few hundred steps (a few seconds), so
    that decoding makes real choices; and its package (TorchScript and ONNX, both graphs checked)."""
    from modelworks.engine.batches import eval_indices, fetch
    from modelworks.export.build import ExportOptions, build_package

    root = tmp_path_factory.mktemp("captioning")
    raw = CaptioningTask.tiny(root / "data")
    raw.update(task="captioning", output_dir=str(root / "runs"), name="tiny")
    raw["train"].update(device="cpu", precision="fp32")
    cfg = load_config(CaptioningTask, raw)
    task = CaptioningTask(cfg)
    splits = task.datasets(CPU)
    torch.manual_seed(0)
    model = task.build_model()
    optimizer = torch.optim.AdamW(model.parameters(), 3e-3)
    (raw_batch,) = fetch(splits.train, iter([torch.arange(len(splits.train))]), CPU, 0, None)
    generator = torch.Generator().manual_seed(0)
    for _ in range(150):
        loss = task.step(model, task.prepare_batch(raw_batch, generator)).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    val = lambda: fetch(splits.val, eval_indices(len(splits.val), 8, 0, 1), CPU)  # noqa: E731
    manifest = build_package(task, model, (task.prepare_batch(b, None) for b in val()), iter(()), root / "package",
                             ExportOptions("captions", "v1"), source={}, metrics={},
                             config=json.loads(json.dumps(to_dict(cfg))), log=lambda line: None)
    assert manifest["checks"]["passed"] == ["eager", "torchscript", "onnx"]
    images = splits.test.images.float().div(255).numpy()
    return task, model, root / "package", images


def png(image: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray((image.transpose(1, 2, 0) * 255).round().astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


@torch.no_grad()
def test_cached_decoding_equals_uncached(trained):
    task, model, _, images = trained
    predictor = task.predictor()
    run = eager_runner(model)
    image = images[:1]
    # teacher forcing on a fixed token sequence: the full forward's log-probabilities at every position ...
    tokens = [predictor.eot] + task.tokenizer.encode("a small red bag on the left")
    full = torch.log_softmax(model(torch.from_numpy(image), torch.tensor([tokens])), -1)[0].numpy()
    # ... equal those of one cached step at a time, the image's keys/values computed once
    memory = predictor.encode([predictor.item_for(image[0])], run)[0]
    rows = [Row.start(memory, predictor.head_dim)]
    for t, token in enumerate(tokens):
        log_probs, rows = decode_rows(rows, [token], run)
        np.testing.assert_allclose(log_probs[0], full[t], atol=1e-4)
    # and greedy decoding through the cache writes what re-running the whole prefix each step writes
    (response,) = predictor.predict([predictor.item_for(image[0], beam=1)], run)
    ids = [predictor.eot]
    for _ in range(task.cfg.model.max_length):
        token = int(model(torch.from_numpy(image), torch.tensor([ids]))[0, -1].argmax())
        if token == predictor.eot:
            break
        ids.append(token)
    assert response.captions[0].text == task.tokenizer.decode(ids[1:])
    assert response.captions[0].text  # a trained model says something


@torch.no_grad()
def test_rows_of_different_lengths_share_a_call(trained):
    """Left-padded caches with masked padding give each row what it gets alone (continuous batching)."""
    task, model, _, images = trained
    predictor = task.predictor()
    run = eager_runner(model)
    memories = predictor.encode([predictor.item_for(im) for im in images[:2]], run)
    long_row = Row.start(memories[0], predictor.head_dim)
    for token in [predictor.eot, 3, 4]:
        _, (long_row,) = decode_rows([long_row], [token], run)
    short_row = Row.start(memories[1], predictor.head_dim)
    alone_long, _ = decode_rows([long_row], [5], run)
    alone_short, _ = decode_rows([short_row], [predictor.eot], run)
    together, _ = decode_rows([long_row, short_row], [5, predictor.eot], run)
    np.testing.assert_allclose(together[0], alone_long[0], atol=1e-5)
    np.testing.assert_allclose(together[1], alone_short[0], atol=1e-5)


# ---------------------------------------------------------------------------------------------- export


def test_both_exported_graphs_match_eager_and_caption_alike(trained):
    from modelworks.inference import open_model

    task, model, package, images = trained
    eager = eager_runner(model)
    request = CaptionRequest(beam=3, n=2)
    captions = {}
    for runtime in ("torchscript", "onnx"):
        served = open_model(package, runtime)
        predictor = served.predictor
        items = [predictor.parse(request, png(im)) for im in images[:4]]
        # encode: the cross-attention keys/values of every block
        got = served.runner({"images": np.stack([i.image for i in items])}, graph="encode")[0]
        want = eager({"images": np.stack([i.image for i in items])}, graph="encode")[0]
        np.testing.assert_allclose(got, want, atol=1e-4)
        # decode: three steps, the cache growing (the dynamic cache axis), rows reordered as beam search does
        rows_a = rows_b = [Row.start(got[:, :, b], predictor.head_dim) for b in range(2)]
        for tokens in ([predictor.eot] * 2, [3, 4], [5, 6]):
            a, rows_a = decode_rows(rows_a, tokens, served.runner)
            b, rows_b = decode_rows(rows_b, tokens, eager)
            np.testing.assert_allclose(a, b, atol=1e-4)
            rows_a, rows_b = rows_a[::-1], rows_b[::-1]
        captions[runtime] = [[c.text for c in r.captions] for r in predictor.predict(items, served.runner)]
    eager_captions = [[c.text for c in r.captions] for r in task.predictor().predict(items, eager)]
    assert captions["onnx"] == captions["torchscript"] == eager_captions
    assert all(len(c) == 2 for c in eager_captions)


# ---------------------------------------------------------------------------------------------- serving


@pytest.fixture(scope="module")
def client(trained):
    from fastapi.testclient import TestClient

    from modelworks.inference import open_model
    from modelworks.serve.app import ServeSettings, create_app

    app = create_app([open_model(trained[2], "onnx")], None, ServeSettings(admin_token=""))
    with TestClient(app) as test_client:
        yield test_client


def test_a_served_caption_upload_and_base64(client, trained):
    task, model, _, images = trained
    upload = client.post("/v1/models/captions/predict", files={"image": ("x.png", png(images[0]), "image/png")},
                         data={"beam": "3", "n": "3"})
    assert upload.status_code == 200, upload.text
    captions = upload.json()["prediction"]["captions"]
    assert len(captions) == 3 and [c["score"] for c in captions] == sorted((c["score"] for c in captions),
                                                                           reverse=True)
    eager = task.predictor().predict([task.predictor().item_for(images[0], beam=3)], eager_runner(model))[0]
    assert captions[0]["text"] == eager.captions[0].text
    as_json = client.post("/v1/models/captions/predict",
                          json={"image": base64.b64encode(png(images[0])).decode(), "beam": 3})
    assert as_json.json()["prediction"]["captions"][0]["text"] == captions[0]["text"]
    described = client.get("/v1/models/captions").json()
    assert described["streams"] and described["limits"]["beam"] == 8


def test_the_greedy_caption_streams_token_by_token(client, trained):
    task, model, _, images = trained
    body = {"prompt": "", "image": base64.b64encode(png(images[1])).decode(), "stream": True}
    response = client.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    chunks = [json.loads(line[6:]) for line in response.text.splitlines()
              if line.startswith("data: ") and line != "data: [DONE]"]
    text = "".join(choice["text"] for chunk in chunks for choice in chunk["choices"])
    greedy = task.predictor().predict([task.predictor().item_for(images[1], beam=1)], eager_runner(model))[0]
    assert text == greedy.captions[0].text and len([c for c in chunks if c["choices"][0]["text"]]) > 1
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    whole = client.post("/v1/completions", json={**body, "stream": False}).json()
    assert whole["choices"][0]["text"] == text


BAD = [
    ({"image": base64.b64encode(b"not an image").decode()}, 422, "image", r"image: cannot be decoded as PNG"),
    ({}, 422, "image", r"image: missing"),
    ({"beam": 0}, 422, "beam", r"beam: must be between 1 and 8 \(got 0\)"),
    ({"beam": 9}, 422, "beam", r"beam: must be between 1 and 8 \(got 9\)"),
    ({"max_length": 0}, 422, "max_length", r"max_length: must be between 1 and the model's 20 \(got 0\)"),
    ({"max_length": 21}, 422, "max_length", r"max_length: must be between 1 and the model's 20 \(got 21\)"),
    ({"beam": 2, "n": 3}, 422, "n", r"n: must be between 1 and the beam width 2 \(got 3\)"),
    ({"n": 0}, 422, "n", r"n: must be between 1"),
    ({"temperature": 1.0, "n": 9}, 422, "n", r"n: must be between 1 and 8 samples \(got 9\)"),
    ({"length_penalty": -1.0}, 422, "length_penalty", r"length_penalty: must be between 0 and 5"),
    ({"beam": "3"}, 422, "beam", r"beam"),
    ({"colour": "red"}, 422, "colour", r"colour: unknown field"),
]


@pytest.mark.parametrize("fields, status, field, message", BAD)
def test_bad_inputs_are_refused_by_name_and_the_server_keeps_serving(client, trained, fields, status, field, message):
    import re

    good = base64.b64encode(png(trained[3][0])).decode()
    body = {"image": good, **fields} if fields else {}
    response = client.post("/v1/models/captions/predict", json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert re.search(message, error["message"]), error["message"]
    assert field in error["message"]
    assert client.post("/v1/models/captions/predict", json={"image": good}).status_code == 200
