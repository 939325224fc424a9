"""The language_model task through the engine: training, exact resume, evaluation, export, the CLI's generate."""

from __future__ import annotations

import json
import math
import os
import signal
from pathlib import Path

import pytest
import torch

from modelworks.config import load_config
from modelworks.engine import checkpoint
from modelworks.engine.loop import fit
from modelworks.errors import DataError
from modelworks.tasks.language_model.task import LanguageModelTask


def tiny_cfg(tmp_path: Path, **overrides):
    raw = LanguageModelTask.tiny(tmp_path / "data")
    raw.update(task="language_model", output_dir=str(tmp_path / "runs"), name="tiny")
    raw["train"].update(device="cpu", precision="fp32", deterministic=True)
    for dotted, value in overrides.items():
        node = raw
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return load_config(LanguageModelTask, raw)


def run_dir_of(cfg) -> Path:
    path = Path(cfg.output_dir) / cfg.task / cfg.name
    path.mkdir(parents=True, exist_ok=True)
    return path


class SelfInterrupting(LanguageModelTask):
    interrupt_at = 0

    def step(self, model, batch):
        self.calls = getattr(self, "calls", 0) + 1
        if self.calls == self.interrupt_at:
            os.kill(os.getpid(), signal.SIGTERM)
        return super().step(model, batch)


def test_an_interrupted_and_resumed_run_matches_the_uninterrupted_one(tmp_path):
    """Random windows come from (seed, step): a resumed run draws exactly the batches the uninterrupted one did."""
    overrides = {"train.steps": 12, "train.eval_every_steps": 6, "train.batch_size": 8}
    full_cfg = tiny_cfg(tmp_path / "full", **overrides)
    fit(LanguageModelTask(full_cfg), full_cfg, run_dir_of(full_cfg))
    cfg = tiny_cfg(tmp_path / "split", **overrides)
    run_dir = run_dir_of(cfg)
    task = SelfInterrupting(cfg)
    task.interrupt_at = 5
    assert fit(task, cfg, run_dir).status == "interrupted"
    resumed = fit(LanguageModelTask(cfg), cfg, run_dir, resume=True)
    assert (resumed.status, resumed.step) == ("finished", 12)
    expected = checkpoint.load(run_dir_of(full_cfg) / "checkpoints" / "last.pt")["model"]
    got = checkpoint.load(run_dir / "checkpoints" / "last.pt")["model"]
    for key in expected:
        assert torch.equal(got[key], expected[key]), key
    samples = sorted((run_dir / "samples").glob("step-*.txt"))
    assert [p.name for p in samples] == ["step-0000006.txt", "step-0000012.txt"]
    assert "--- greedy" in samples[-1].read_text()
    assert (run_dir / "tokenizer.json").is_file()


def test_training_lowers_validation_loss_and_reports_bits_per_character(tmp_path):
    cfg = tiny_cfg(tmp_path, **{"train.steps": 60, "train.eval_every_steps": 60, "optim.lr": 0.01,
                                "optim.schedule": "cosine", "optim.warmup_fraction": 0.1})
    task = LanguageModelTask(cfg)
    result = fit(task, cfg, run_dir_of(cfg))
    loss = result.best["val/loss"]
    assert loss < math.log(task.vocab_size) - 0.8  # well below a uniform guess
    # char tokens: one token per character, so bits per character is the loss in bits
    assert result.best["val/bpc"] == pytest.approx(loss / math.log(2), rel=1e-6)
    assert result.best["val/ppl"] == pytest.approx(math.exp(loss), rel=1e-6)
    # `modelworks evaluate RUN`: no test split, so the validation split, with samples and the loss curves
    from modelworks.engine.loop import evaluate_run

    metrics = evaluate_run(LanguageModelTask(cfg), cfg, result.run_dir, "test", fallback_to_val=True)
    assert metrics["val/loss"] == pytest.approx(loss, rel=1e-5)
    report = result.run_dir / "evaluation"
    assert (report / "loss_curves.png").stat().st_size > 1000
    assert "--- greedy" in (report / "samples.txt").read_text()


def test_bits_per_character_compares_across_tokenizers(tmp_path):
    cfg = tiny_cfg(tmp_path, **{"data.tokenizer.kind": "bpe", "data.tokenizer.vocab_size": 300})
    task = LanguageModelTask(cfg)
    task.datasets(torch.device("cpu"))
    assert task.tokenizer.kind == "bpe" and task.tokens_per_char < 0.6
    model = task.build_model().eval()
    from modelworks.engine.batches import eval_indices, fetch

    splits = task.datasets(torch.device("cpu"))
    with torch.no_grad():
        metrics = task.evaluate(model, fetch(splits.val, eval_indices(len(splits.val), 64, 0, 1),
                                             torch.device("cpu")))
    assert metrics["bpc"] == pytest.approx(metrics["loss"] * task.tokens_per_char / math.log(2))


def test_the_default_data_missing_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # ../shared/data/tinyshakespeare is not there
    cfg = load_config(LanguageModelTask, {"task": "language_model"})
    with pytest.raises(DataError, match=r"tinyshakespeare/input\.txt does not exist\. The recipes read"):
        LanguageModelTask(cfg).datasets(torch.device("cpu"))


def test_tied_embeddings_survive_the_package_and_both_graphs_match_eager(tmp_path):
    """Export with tied input/output embeddings (safetensors stores the shared tensor once), TorchScript and ONNX
    prefill and decode checked on the validation split, int8 by dynamic quantization; the package generates the
    eager text through every runtime."""
    from modelworks.engine.batches import eval_indices, fetch
    from modelworks.export.build import ExportOptions, build_package
    from modelworks.inference import open_model

    cfg = tiny_cfg(tmp_path, **{"model.tie_embeddings": True})
    task = LanguageModelTask(cfg)
    splits = task.datasets(torch.device("cpu"))
    torch.manual_seed(0)
    model = task.build_model().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    assert model.head.weight is model.embed.weight
    val = lambda: fetch(splits.val, eval_indices(len(splits.val), 16, 0, 1), torch.device("cpu"))  # noqa: E731
    manifest = build_package(task, model, val, iter(()), tmp_path / "package",
                             ExportOptions("m", "1", quantize="int8"), source={}, metrics={},
                             config=json.loads(json.dumps(__import__("modelworks.config", fromlist=["to_dict"])
                                                          .to_dict(cfg))), log=lambda line: None)
    assert manifest["graphs"] == ["prefill", "decode"]
    assert manifest["checks"]["passed"] == ["eager", "torchscript", "onnx", "int8"]
    assert {"prefill.onnx", "decode.onnx", "prefill.int8.onnx", "tokenizer.json"} <= set(manifest["files"])
    assert manifest["int8"]["method"].startswith("dynamic")
    export = manifest["metrics"]["export"]
    assert export["onnx"]["max_abs_diff"] < 1e-4 and export["onnx"]["decode/agreement"] == 1.0
    gen = task.predictor()
    from modelworks.tasks.language_model.task import eager_runner

    request = gen.Request(prompt="the king", max_tokens=12, temperature=0.0)
    with torch.no_grad():
        expected = gen.predict([gen.parse(request)], eager_runner(model))[0].text
    for runtime in ("eager", "torchscript", "onnx"):
        served = open_model(tmp_path / "package", runtime)
        assert served.predict([served.predictor.parse(request)])[0].text == expected, runtime


def test_generate_streams_from_a_run_directory(tmp_path, capsys, monkeypatch):
    from modelworks.cli import main

    cfg = tiny_cfg(tmp_path, **{"train.steps": 4, "train.eval_every_steps": 4})
    run_dir = run_dir_of(cfg)
    (run_dir / "config.yaml").write_text(__import__("yaml").safe_dump(
        __import__("modelworks.config", fromlist=["to_dict"]).to_dict(cfg)))
    fit(LanguageModelTask(cfg), cfg, run_dir)
    capsys.readouterr()
    assert main(["generate", str(run_dir), "--prompt", "the", "--max-new-tokens", "7", "--temperature", "0"]) == 0
    out = capsys.readouterr()
    assert out.out.startswith("the") and len(out.out.rstrip("\n")) == 3 + 7
    assert "[7 tokens, finish_reason length]" in out.err
    assert main(["generate", str(run_dir), "--prompt", "QQ", "--max-new-tokens", "7"]) == 2
    assert "prompt: characters 'Q' are not in this character model's vocabulary" in capsys.readouterr().err
