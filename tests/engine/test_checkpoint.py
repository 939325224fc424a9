"""Checkpoints: atomic replacement, clear errors for unusable files, and no code execution on load."""

from __future__ import annotations

import os
import pickle

import pytest
import torch

from modelworks.engine import checkpoint
from modelworks.errors import CheckpointError


def test_save_and_load_round_trip(tmp_path):
    state = {"step": 7, "model": {"w": torch.arange(6.0).view(2, 3)}, "best": {"val/acc1": 0.5}, "ema": None}
    checkpoint.save_atomic(state, tmp_path / "sub" / "last.pt")  # creates the folder
    loaded = checkpoint.load(tmp_path / "sub" / "last.pt")
    assert loaded["step"] == 7 and loaded["best"] == {"val/acc1": 0.5} and loaded["ema"] is None
    assert torch.equal(loaded["model"]["w"], state["model"]["w"])


def test_failed_write_leaves_the_old_file_intact_and_no_temporary_files(tmp_path):
    path = tmp_path / "last.pt"
    checkpoint.save_atomic({"step": 1, "w": torch.ones(3)}, path)
    before = path.read_bytes()
    with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):
        checkpoint.save_atomic({"step": 2, "w": torch.zeros(3), "bad": lambda: None}, path)  # unpicklable
    assert path.read_bytes() == before
    assert checkpoint.load(path)["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


def test_successful_write_replaces_the_file(tmp_path):
    path = tmp_path / "last.pt"
    checkpoint.save_atomic({"step": 1}, path)
    checkpoint.save_atomic({"step": 2}, path)
    assert checkpoint.load(path)["step"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


def test_truncated_checkpoint_is_a_checkpoint_error(tmp_path):
    path = tmp_path / "last.pt"
    checkpoint.save_atomic({"step": 1, "w": torch.randn(1000)}, path)
    path.write_bytes(path.read_bytes()[:1500])
    with pytest.raises(CheckpointError, match=rf"{path}: cannot be loaded as a modelworks checkpoint \(.*\); it is "
                                              r"corrupt or not ours"):
        checkpoint.load(path)


def test_missing_checkpoint_says_when_one_is_written(tmp_path):
    with pytest.raises(CheckpointError, match=rf"{tmp_path / 'last.pt'}: checkpoint not found; a run saves "
                                              r"checkpoints/last.pt after its first evaluation"):
        checkpoint.load(tmp_path / "last.pt")


class RunsACommand:
    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_load_refuses_a_pickle_that_would_run_code(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "last.pt"
    torch.save({"step": 1, "payload": RunsACommand(f"touch {marker}")}, path)
    with pytest.raises(CheckpointError, match=rf"{path}: refused to load: the file holds a Python object"):
        checkpoint.load(path)
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the payload is live: an unrestricted load runs it
    assert marker.exists()


def test_rng_state_round_trip():
    state = checkpoint.rng_state()
    expected = torch.rand(5)
    checkpoint.restore_rng_state(state)
    assert torch.equal(torch.rand(5), expected)


def test_load_refuses_a_file_that_is_not_a_dict_or_lacks_keys(tmp_path):
    path = tmp_path / "last.pt"
    torch.save(torch.zeros(3), path)
    with pytest.raises(CheckpointError, match=rf"^{path}: holds a Tensor, not a modelworks checkpoint \(a dict with "
                                              r"'model'\); use a checkpoint `modelworks train` wrote for this run$"):
        checkpoint.load(path, keys=("model",))
    torch.save({"step": 1, "rng": None}, path)
    with pytest.raises(CheckpointError, match=rf"^{path}: not a complete modelworks checkpoint \(missing 'model', "
                                              r"'optimizer'; it has 'step', 'rng'\); use a checkpoint"):
        checkpoint.load(path, keys=("step", "model", "optimizer"))


def test_load_model_weights_lists_the_first_few_of_each_problem(tmp_path):
    path = tmp_path / "best.pt"
    model = torch.nn.Sequential(*[torch.nn.Linear(2, 2) for _ in range(4)])
    other = {f"layer{i}.weight": torch.zeros(2, 2) for i in range(7)}
    with pytest.raises(CheckpointError, match=rf"^{path}: the weights in 'model' do not fit the model the run's config "
                                              r"builds \(missing 8: 0\.weight, 0\.bias, 1\.weight, 1\.bias, 2\.weight, "
                                              r"\.\.\.; unexpected 7: layer0\.weight, layer1\.weight, layer2\.weight, "
                                              r"layer3\.weight, layer4\.weight, \.\.\.\); was the checkpoint copied"):
        checkpoint.load_model_weights(model, other, path)
    weights = {**model.state_dict(), "0.bias": torch.zeros(3), "1.weight": "text"}
    with pytest.raises(CheckpointError, match=r"\(wrong shape 2: 0\.bias \(3,\) in the file, \(2,\) in the model, "
                                              r"1\.weight str in the file, \(2, 2\) in the model\)"):
        checkpoint.load_model_weights(model, weights, path)
    with pytest.raises(CheckpointError, match=r"'ema\.module' holds a NoneType, not the model's weights"):
        checkpoint.load_model_weights(model, None, path, "ema.module")
    checkpoint.load_model_weights(model, {k: v + 1 for k, v in model.state_dict().items()}, path)  # a fit loads


class SomeObject:
    pass


@pytest.mark.parametrize("payload, refused", [
    (RunsACommand("true"), f"{os.system.__module__}.system"),  # torch: "... unsupported GLOBAL posix.system whose
    (SomeObject(), f"{SomeObject.__module__}.SomeObject"),       # module posix is blocked" / "Unsupported global: ..."
])
def test_a_refused_global_is_named_and_no_unsafe_load_is_suggested(tmp_path, payload, refused):
    path = tmp_path / "last.pt"
    torch.save({"step": 1, "payload": payload}, path)
    with pytest.raises(CheckpointError) as info:
        checkpoint.load(path)
    assert str(info.value) == (
        f"{path}: refused to load: the file holds a Python object, {refused}, that unpickling would import and could "
        "run as code; a modelworks checkpoint never holds one (only tensors and plain values), so the file was not "
        "written by modelworks or was tampered with: do not load it, use a checkpoint `modelworks train` wrote for "
        "this run")
    assert "weights_only" not in str(info.value)


def test_a_pickle_the_safe_loader_cannot_read_suggests_no_unsafe_load(tmp_path):
    path = tmp_path / "last.pt"
    path.write_bytes(pickle.dumps({"step": 1}, protocol=4))  # a plain pickle, not torch.save's format
    with pytest.warns(UserWarning, match="pickle protocol"), pytest.raises(CheckpointError) as info:
        checkpoint.load(path)
    assert str(info.value) == (f"{path}: cannot be loaded as a modelworks checkpoint (UnpicklingError: Unsupported "
                               "operand 149); it is corrupt or not ours")
