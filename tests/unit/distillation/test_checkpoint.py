"""Checkpoints: what goes in comes out, only the latest and the best are kept, damage is skipped."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline.distillation.checkpoint import (
    Checkpoint,
    checkpoint_files,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from pipeline.distillation.summary import EpochRecord


def _checkpoint(epoch: int, best: int) -> Checkpoint:
    """A checkpoint after `epoch` epochs whose history scores best at epoch `best`."""
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    history = [
        EpochRecord(epoch=e, learning_rate=0.1, train_loss=1.0 / e, score=0.9 if e == best else 0.5, seconds=0.1)
        for e in range(1, epoch + 1)
    ]
    return Checkpoint(model.state_dict(), optimizer.state_dict()["state"], history)


def test_round_trip(tmp_path: Path) -> None:
    saved = _checkpoint(epoch=3, best=2)
    loaded = load_checkpoint(save_checkpoint(tmp_path, saved))
    assert (loaded.epoch, loaded.best_epoch) == (3, 2)
    assert loaded.history == saved.history
    assert loaded.student.keys() == saved.student.keys()
    assert all(torch.equal(loaded.student[name], tensor) for name, tensor in saved.student.items())
    for index, state in saved.optimizer.items():  # Adam: step, exp_avg, exp_avg_sq per parameter
        assert loaded.optimizer[index].keys() == state.keys()
        assert all(torch.equal(loaded.optimizer[index][key], value) for key, value in state.items())


def test_keeps_the_latest_and_the_best_epoch_only(tmp_path: Path) -> None:
    for epoch, best in ((1, 1), (2, 2), (3, 2), (4, 2)):
        save_checkpoint(tmp_path, _checkpoint(epoch, best))
    assert [path.name for path in checkpoint_files(tmp_path)] == ["epoch-0002.safetensors", "epoch-0004.safetensors"]


def test_a_damaged_latest_checkpoint_falls_back_to_the_one_before(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, _checkpoint(1, 1))
    save_checkpoint(tmp_path, _checkpoint(2, 1))
    (tmp_path / "epoch-0002.safetensors").write_bytes(b"torn write")
    latest = latest_checkpoint(tmp_path)
    assert latest is not None and latest.epoch == 1
    assert latest_checkpoint(tmp_path / "missing") is None


def test_a_plain_safetensors_file_is_not_a_checkpoint(tmp_path: Path) -> None:
    import safetensors.torch

    path = tmp_path / "epoch-0001.safetensors"
    safetensors.torch.save_file({"w": torch.ones(2)}, str(path))
    with pytest.raises(ValueError, match="not an onnxforge distillation checkpoint"):
        load_checkpoint(path)
