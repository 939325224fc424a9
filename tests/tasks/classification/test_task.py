"""ClassificationTask details the contract tests cannot see: ImageFolder split layouts, normalisation, TTA, the
evaluation report."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import build_tiny_cfg
from modelworks.config import load_config
from modelworks.data.synthetic import write_image_folder
from modelworks.engine.batches import eval_indices, fetch
from modelworks.tasks.classification.task import NORMALISATION, ClassificationTask

CPU = torch.device("cpu")
CLASSES = ["ant", "bee", "cow"]


def image_folder_task(source: str, **train) -> ClassificationTask:
    raw = {"task": "classification", "data": {"source": source, "image_size": 16, "val_fraction": 0.25},
           "model": {"widths": [8, 16, 16, 32]}, "train": {"device": "cpu", **train}}
    return ClassificationTask(load_config(ClassificationTask, raw))


def test_flat_tree_is_split_into_train_and_val(tmp_path):
    write_image_folder(tmp_path / "flat", CLASSES, per_class=4, size=20)
    task = image_folder_task(f"imagefolder:{tmp_path / 'flat'}")
    splits = task.datasets(CPU)
    assert (len(splits.train), len(splits.val), splits.test) == (9, 3, None)
    train_paths = {p for p, _ in splits.train.samples}
    assert not train_paths & {p for p, _ in splits.val.samples}
    assert task.classes == CLASSES and task.num_classes == 3
    image, label = splits.train[0]
    assert image.shape == (3, 16, 16)


def test_tree_with_train_and_test_takes_val_from_train(tmp_path):
    write_image_folder(tmp_path / "t" / "train", CLASSES, per_class=4, size=20)
    write_image_folder(tmp_path / "t" / "test", CLASSES, per_class=2, size=20, seed=9)
    splits = image_folder_task(f"imagefolder:{tmp_path / 't'}").datasets(CPU)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (9, 3, 6)
    assert all("/test/" in p for p, _ in splits.test.samples)
    assert all("/train/" in p for p, _ in splits.val.samples)


def test_tree_with_train_val_test_uses_them_as_given(tmp_path):
    for name, n in (("train", 4), ("val", 1), ("test", 2)):
        write_image_folder(tmp_path / "t" / name, CLASSES, per_class=n, size=20)
    splits = image_folder_task(f"imagefolder:{tmp_path / 't'}").datasets(CPU)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (12, 3, 6)


def test_num_classes_before_datasets_comes_from_the_folder(tmp_path):
    write_image_folder(tmp_path / "t" / "train", CLASSES + ["dog"], per_class=1, size=20)
    task = image_folder_task(f"imagefolder:{tmp_path / 't'}", channels_last=False)
    assert task.build_model()(torch.zeros(1, 3, 16, 16)).shape == (1, 4)


def test_grayscale_image_folder(tmp_path):
    write_image_folder(tmp_path / "flat", CLASSES, per_class=4, size=20)
    raw = {"task": "classification", "data": {"source": f"imagefolder:{tmp_path / 'flat'}", "channels": 1,
                                              "image_size": 12}}
    task = ClassificationTask(load_config(ClassificationTask, raw))
    image, _ = task.datasets(CPU).train[0]
    assert image.shape == (1, 12, 12)
    assert task.example_inputs()[0].shape == (1, 1, 12, 12)


def test_prepare_batch_normalises_with_the_data_set_statistics(tmp_path):
    task = ClassificationTask(build_tiny_cfg(tmp_path))
    splits = task.datasets(CPU)
    raw_images, labels = splits.val.get_batch(torch.arange(8))
    x, y = task.prepare_batch((raw_images, labels), None)
    mean, std = NORMALISATION["fashion-mnist"]
    torch.testing.assert_close(x, (raw_images.float() / 255 - mean[0]) / std[0], atol=1e-6, rtol=0)
    assert x.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(y, labels)


def test_tta_flip_averages_an_image_and_its_mirror(tmp_path):
    task = ClassificationTask(build_tiny_cfg(tmp_path, **{"model.tta": "flip"}))
    model = task.build_model().eval()
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        expected = (model(x) + model(x.flip(-1))) / 2
        torch.testing.assert_close(task.logits(model, x), expected)


def test_tta_flip_shift_adds_the_two_views_shifted_by_one_pixel(tmp_path):
    task = ClassificationTask(build_tiny_cfg(tmp_path, **{"model.tta": "flip_shift"}))
    model = task.build_model().eval()
    x = torch.randn(4, 1, 28, 28)
    down_right = torch.zeros_like(x)
    down_right[..., 1:, 1:] = x[..., :-1, :-1]
    mirror = x.flip(-1)
    up_left = torch.zeros_like(x)
    up_left[..., :-1, :-1] = mirror[..., 1:, 1:]
    with torch.no_grad():
        expected = (model(x) + model(mirror) + model(down_right) + model(up_left)) / 4
        torch.testing.assert_close(task.logits(model, x), expected)


def test_no_tta_is_the_plain_model(tmp_path):
    task = ClassificationTask(build_tiny_cfg(tmp_path))
    assert task.cfg.model.tta == "none"
    model = task.build_model().eval()
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(task.logits(model, x), model(x))


def test_evaluate_with_a_report_dir_writes_plots_and_per_class_accuracy(tmp_path):
    task = ClassificationTask(build_tiny_cfg(tmp_path))
    splits = task.datasets(CPU)
    model = task.build_model().eval()
    batches = (task.prepare_batch(b, None) for b in fetch(splits.test, eval_indices(len(splits.test), 100, 0, 1), CPU))
    report_dir = tmp_path / "report"
    report_dir.mkdir()
    with torch.no_grad():
        metrics = task.evaluate(model, batches, report_dir)
    assert {"acc1", "acc5", "ece", "loss"} <= set(metrics)
    assert {f"acc1/{name}" for name in task.classes} <= set(metrics)
    assert all(0.0 <= metrics[k] <= 1.0 for k in ("acc1", "acc5", "ece"))
    for name in ("confusion_matrix.png", "worst_errors.png"):
        assert (report_dir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    confusion = json.loads((report_dir / "confusion_matrix.json").read_text())
    assert len(confusion) == 10 and sum(map(sum, confusion)) == 256  # every test image counted once


def test_accuracy_and_loss_are_computed_over_all_samples_not_averaged_per_batch(tmp_path):
    """A model right on classes 0-4 and wrong on 5-9, fed batches of different sizes and accuracies (10/10,
    10/40, 0/50): acc1 is 20/100, not the mean of the batches' accuracies (0.42) nor the last batch's (0)."""
    task = ClassificationTask(build_tiny_cfg(tmp_path))
    splits = task.datasets(CPU)

    class BandReaderForFiveClasses(torch.nn.Module):
        def forward(self, x):  # B, 1, 28, 28: the class-k band fills rows 2k, 2k+1
            rows = x.mean(dim=(1, 3))  # B, 28
            logits = rows[:, :20].reshape(len(x), 10, 2).mean(-1) * 10  # B, 10
            return torch.cat([logits[:, :5], logits[:, 5:] - 100], 1)  # never answers 5-9

    (batch,) = list(fetch(splits.test, eval_indices(len(splits.test), len(splits.test), 0, 1), CPU))
    x, y = task.prepare_batch(batch, None)
    right, wrong = (y < 5).nonzero().flatten(), (y >= 5).nonzero().flatten()
    parts = [right[:10], torch.cat([right[10:20], wrong[:30]]), wrong[30:80]]
    batches = [(x[index], y[index]) for index in parts]
    model = BandReaderForFiveClasses()
    with torch.no_grad():
        assert [(model(bx).argmax(1) == by).float().mean().item() for bx, by in batches] == [1.0, 0.25, 0.0]
        metrics = task.evaluate(model, batches)
        everything = torch.cat(parts)
        loss = torch.nn.functional.cross_entropy(model(x[everything]), y[everything]).item()
    assert metrics["acc1"] == pytest.approx(0.2)
    assert metrics["loss"] == pytest.approx(loss, rel=1e-5)


def test_worst_errors_keep_the_most_confident_mistakes_with_their_probability():
    from modelworks.tasks.classification.report import WorstErrors, describe_error

    worst = WorstErrors(keep=2)
    logits = torch.tensor([[0.0, 4.0, 0.0], [2.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, 9.0]])
    worst.update(torch.zeros(4, 1, 2, 2), logits, torch.tensor([0, 0, 1, 2]))  # the first and third are wrong
    worst.update(torch.zeros(1, 1, 2, 2), torch.tensor([[0.0, 0.0, 6.0]]), torch.tensor([1]))
    assert worst.labels.tolist() == [1, 0] and worst.predictions.tolist() == [2, 1]  # largest loss first
    expected = [torch.tensor([0.0, 0.0, 6.0]).softmax(0)[2].item(), torch.tensor([0.0, 4.0, 0.0]).softmax(0)[1].item()]
    assert worst.probabilities.tolist() == pytest.approx(expected)
    assert describe_error(CLASSES, 0, 1, 0.9641, 3.3) == "true ant\npred bee 96%\nloss 3.3"
