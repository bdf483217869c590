import dataclasses

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from objectives import DivergedError, InputTooSmallError, TrainConfig, build_model, train


def test_short_training_beats_chance_clearly(fashion):
    # The notes' LeNet (sigmoid, lr 0.9, batch 256) sits on a plateau for about one epoch, then learns.
    config = TrainConfig(arch="lenet", lr=0.9, epochs=3, batch_size=256, n_val=2000, n_test=2000)
    seen = []
    result = train(config, fashion, on_epoch=seen.append)
    assert result.val_accuracy > 0.5 and result.test_accuracy > 0.5  # chance is 0.1
    assert [m.epoch for m in seen] == [1, 2, 3] and result.history == seen
    assert result.epochs_run == 3 and not result.stopped_early
    assert seen[-1].train_loss < seen[0].train_loss


def test_cost_fields_agree_with_torchs_counter(fashion):
    config = TrainConfig(arch="vgg11", resize=32, ratio=16, lr=0.05, epochs=1, batch_size=64, n_train=256, n_val=64, n_test=64)
    result = train(config, fashion)
    net = build_model("vgg11", 32, 16)
    with FlopCounterMode(display=False) as counter:
        net(torch.zeros(1, 1, 32, 32))
    assert result.flops_per_example == counter.get_total_flops() > 0
    # Training FLOPs: forward + backward (about three forwards) for every example seen.
    assert 2.5 * result.flops_per_example * 256 < result.train_flops < 3.5 * result.flops_per_example * 256
    assert result.param_count == sum(p.numel() for p in net.parameters())
    assert result.train_seconds > 0 and result.wall_seconds >= result.train_seconds
    assert result.examples_per_second == pytest.approx(256 / result.train_seconds)
    assert result.peak_memory_bytes > 0 and result.device_name == "cpu"


def test_on_epoch_can_stop_training(fashion):
    config = TrainConfig(arch="lenet", lr=0.1, epochs=5, n_train=256, n_val=64, n_test=64)
    result = train(config, fashion, on_epoch=lambda metrics: metrics.epoch == 2)
    assert result.epochs_run == 2 and result.stopped_early


def test_divergence_raises_a_specific_error(fashion):
    config = TrainConfig(arch="vgg11", resize=32, ratio=16, lr=1e12, momentum=0.9, epochs=2, batch_size=32, n_train=256, n_val=64, n_test=64)
    with pytest.raises(DivergedError, match="training loss became (nan|inf) in epoch 1"):
        train(config, fashion)


def test_bad_configs_are_refused_before_training():
    with pytest.raises(InputTooSmallError, match="vgg11 needs resize >= 32"):
        TrainConfig(arch="vgg11", resize=28)
    with pytest.raises(ValueError, match="lr must be > 0"):
        TrainConfig(lr=0)
    with pytest.raises(ValueError, match="epochs must be >= 1"):
        TrainConfig(epochs=0)
    with pytest.raises(ValueError, match="unknown setting.*learning_rate"):
        TrainConfig.from_dict({"learning_rate": 0.1})


def test_cuda_graphs_need_a_cuda_device(fashion):
    config = TrainConfig(arch="lenet", epochs=1, n_train=64, n_val=64, n_test=64, device="cpu", cuda_graph=True)
    with pytest.raises(ValueError, match="cuda_graph needs a CUDA device"):
        train(config, fashion)
    assert not train(TrainConfig(arch="lenet", epochs=1, n_train=64, n_val=64, n_test=64, device="cpu"), fashion).cuda_graph


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(("arch", "resize", "ratio"), [("lenet_bn", 28, 1), ("googlenet", 32, 8), ("vgg11", 32, 16)])
def test_cuda_graph_replays_train_as_eager_steps_do(fashion, arch, resize, ratio):
    # 300 images at batch 64: per epoch four full batches (the first three warm up eagerly in epoch 1, then one graph
    # is recorded and replayed) and a short one of 44 that trains eagerly; over three epochs both paths must agree.
    common = TrainConfig(arch=arch, resize=resize, ratio=ratio, lr=0.05, momentum=0.9, epochs=3, batch_size=64, n_train=300, n_val=256,
                         n_test=256, precision="fp32", device="cuda", seed=1)
    eager = train(dataclasses.replace(common, cuda_graph=False), fashion)
    graphed = train(common, fashion)
    assert graphed.cuda_graph and not eager.cuda_graph
    for ours, theirs in zip(graphed.history, eager.history, strict=True):
        # cuDNN's backward kernels add in no fixed order, and VGG's dropout draws other masks inside a graph.
        assert ours.train_loss == pytest.approx(theirs.train_loss, rel=0.05)
        assert abs(ours.val_accuracy - theirs.val_accuracy) <= 0.1
    assert graphed.history[-1].train_loss < graphed.history[0].train_loss
