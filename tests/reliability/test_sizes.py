"""A configuration too large for the machine: a spec that can draw one is refused before anything is written,
naming the memory it needs (study.validate, against all the device's memory); a trainer handed one refuses it
before anything is allocated (against the memory free at that moment)."""

from __future__ import annotations

import pytest

from conftest import LENET, run_main, spec_text
from objectives import DeviceOutOfMemoryError, TrainConfig, train
from objectives.inspect import training_bytes
from reliability.checks import record_bad_inputs

LENET_SPEC = spec_text("kill", LENET)
HUGE_SPEC = LENET_SPEC.replace('lr = { low = 0.01, high = 0.1, log = true }', 'lr = { low = 0.01, high = 0.1, log = true }\nresize = { choices = [28, 20000] }') + """
[[enqueue]]
lr = 0.05
resize = 20000

[[enqueue]]
lr = 0.05
resize = 28
"""


def test_memory_estimate_grows_with_the_input_and_the_batch():
    small = training_bytes("lenet", 28, 1, 64)
    assert training_bytes("lenet", 56, 1, 64) > small and training_bytes("lenet", 28, 1, 128) > small
    assert training_bytes("vgg11", 20000, 1, 128) > 2**40  # a terabyte: estimated on the meta device, nothing allocated


def test_a_spec_that_can_draw_an_impossible_size_is_refused_before_anything_is_written(study_home, tmp_path):
    spec = tmp_path / "huge.toml"
    spec.write_text(HUGE_SPEC)
    done = run_main("launch", str(spec), "--trials", "2", "--log-model", "none")
    assert done.returncode == 1 and done.stderr.count("\n") == 1 and done.stderr.startswith("error: "), done.stderr
    assert "resize 20000" in done.stderr and "needs at least" in done.stderr and "GiB in all" in done.stderr, done.stderr
    assert not study_home.exists()
    record_bad_inputs(1, 0)


def test_the_trainer_refuses_a_size_beyond_the_free_memory_before_allocating(fashion):
    config = TrainConfig(arch="lenet", resize=20000, epochs=1, batch_size=64, n_train=64, n_val=64, n_test=64, device="cpu")
    with pytest.raises(DeviceOutOfMemoryError, match=r"lenet at resize 20000, ratio 1, batch 64 needs at least [0-9.]+ GiB to train; cpu has [0-9.]+ GiB free"):
        train(config, fashion)
