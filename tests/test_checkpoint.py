"""Checkpoints and resumed trials: a trial interrupted after epoch K and resumed ends exactly as it would have without
the interruption (CPU, fp32, bit for bit), and a checkpoint that cannot be trusted is refused with its reason."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from objectives import CheckpointError, TrainConfig, read_checkpoint, train

# VGG-11 at a sixteenth of its width: dropout (torch's global random state), momentum (the optimiser's state) and
# a shuffled data order (the generator) all carry over from one epoch to the next, so each must be restored.
VGG = TrainConfig(arch="vgg11", resize=32, ratio=16, lr=0.05, momentum=0.9, epochs=3, batch_size=64, n_train=256, n_val=128, n_test=128,
                  precision="fp32", device="cpu", seed=3)


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def test_a_resumed_run_ends_bit_for_bit_as_the_uninterrupted_one(fashion, tmp_path):
    whole = train(VGG, fashion)
    path = tmp_path / "trial.pt"
    stopped = train(VGG, fashion, on_epoch=lambda metrics: metrics.epoch == 1, checkpoint=path)
    assert stopped.epochs_run == 1 and path.exists()
    checkpoint = read_checkpoint(path, VGG)
    assert checkpoint.epoch == 1 and [m["val_accuracy"] for m in checkpoint.history] == [whole.history[0].val_accuracy]
    seen = []
    resumed = train(VGG, fashion, on_epoch=seen.append, checkpoint=path, resume=checkpoint)
    assert [m.epoch for m in seen] == [2, 3]  # only the remaining epochs train
    assert resumed.val_accuracy == whole.val_accuracy and resumed.test_accuracy == whole.test_accuracy
    assert [m.val_accuracy for m in resumed.history] == [m.val_accuracy for m in whole.history]
    assert [m.train_loss for m in resumed.history] == [m.train_loss for m in whole.history]
    assert resumed.epochs_run == 3 and resumed.train_flops == whole.train_flops
    assert _same_weights(resumed.model, whole.model)
    # After the last epoch the run is whole: the checkpoint left is the one of epoch 2, not a third.
    assert read_checkpoint(path, VGG).epoch == 2


def test_a_checkpoint_of_another_configuration_torn_or_missing_is_refused(fashion, tmp_path):
    path = tmp_path / "trial.pt"
    config = dataclasses.replace(VGG, epochs=2)
    train(config, fashion, checkpoint=path)
    assert read_checkpoint(path, dataclasses.replace(config, device="cuda:1")).epoch == 1  # where it trains is no part of what
    with pytest.raises(CheckpointError, match=r"another configuration \(lr 0.05 != 0.1\)"):
        read_checkpoint(path, dataclasses.replace(config, lr=0.1))
    with pytest.raises(CheckpointError, match=r"another configuration \(epochs 2 != 1\)"):
        read_checkpoint(path, dataclasses.replace(config, epochs=1))
    torn = tmp_path / "torn.pt"
    torn.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="is torn or unreadable"):
        read_checkpoint(torn, config)
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        read_checkpoint(tmp_path / "missing.pt", config)
