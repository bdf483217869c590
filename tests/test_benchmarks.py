"""The benchmark's yardstick is faithful, and its commands run. Speed itself is measured in benchmarks/, not here."""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.prediction import main as prediction_main
from benchmarks.prediction import measure as measure_prediction
from benchmarks.presets import format_row, run_study
from benchmarks.presets import main as presets_main
from benchmarks.reference import _TextbookDataset, train_ch6
from benchmarks.throughput import PRESET_SHAPES, counted_operator_time, measure_preset_shape
from conftest import ROOT, make_spec
from objectives import TrainConfig, train
from objectives.train import _prepare, cpu_bf16_pays, native_bf16
from study.specs import available, load_spec, resolve


@pytest.mark.parametrize("resize", [224, 96, 32, 28])
def test_resize_on_the_device_matches_the_textbooks_pil_resize(fashion, resize):
    images, labels = fashion.test_images[:32], fashion.test_labels[:32]
    textbook = torch.stack([_TextbookDataset(images, labels, resize)[i][0] for i in range(32)])
    ours = _prepare(images, resize, channels_last=False)
    assert ours.shape == textbook.shape == (32, 1, resize, resize)
    # PIL rounds its output to 8 bits; the device keeps floats. Nothing else differs.
    assert (ours - textbook).abs().max().item() <= 1 / 255 + 1e-6


def test_reference_trains_the_same_network_to_a_similar_accuracy(fashion):
    # LeNet-BN leaves chance (0.1) within 16 steps, so a small run shows both loops really train.
    n_train, n_eval = 4096, 1000
    reference = train_ch6("lenet_bn", 28, 1, lr=1.0, epochs=1, batch_size=256, train_images=fashion.train_images[:n_train],
                          train_labels=fashion.train_labels[:n_train], test_images=fashion.val_images[:n_eval], test_labels=fashion.val_labels[:n_eval])
    ours = train(TrainConfig(arch="lenet_bn", lr=1.0, epochs=1, batch_size=256, n_train=n_train, n_val=n_eval, n_test=64), fashion)
    assert reference.test_accuracy > 0.3 and ours.val_accuracy > 0.3
    assert abs(reference.test_accuracy - ours.val_accuracy) < 0.15


def test_cpu_precision_and_layout_are_resolved_and_reported(fashion):
    # 17 steps of 16 images: bf16 only where the CPU multiplies bf16 and, timed for this shape, it trains faster than fp32.
    result = train(TrainConfig(arch="lenet", lr=0.9, epochs=1, batch_size=16, n_train=272, n_val=64, n_test=64), fashion)
    assert result.precision == ("bf16" if native_bf16(torch.device("cpu")) and cpu_bf16_pays("lenet", 28, 1, 16, True) else "fp32")
    assert result.channels_last
    # 16 steps, what timing the shape takes: fp32, untimed.
    timed = cpu_bf16_pays.cache_info().misses
    result = train(TrainConfig(arch="lenet", lr=0.9, epochs=2, batch_size=32, n_train=256, n_val=64, n_test=64), fashion)
    assert result.precision == "fp32" and cpu_bf16_pays.cache_info().misses == timed
    result = train(TrainConfig(arch="lenet_bn", lr=0.9, epochs=1, n_train=256, n_val=64, n_test=64, precision="fp32", channels_last=False), fashion)
    assert result.precision == "fp32" and not result.channels_last


def test_throughput_command_runs_and_ends_with_the_geometric_mean(tmp_path):
    out = tmp_path / "throughput.json"
    run = subprocess.run([sys.executable, "-m", "benchmarks.throughput", "--device", "cpu", "--quick", "--arch", "lenet", "--no-preset-shapes", "--json", str(out)],
                         capture_output=True, text=True, cwd=ROOT, timeout=300, check=False)
    assert run.returncode == 0, run.stderr
    last = run.stdout.strip().splitlines()[-1]
    speedup = float(re.fullmatch(r"geometric-mean speed-up over 1 networks: ([0-9.]+)x", last).group(1))
    rows = json.loads(out.read_text())["rows"]
    assert [row["arch"] for row in rows] == ["lenet"]
    assert speedup == pytest.approx(rows[0]["speedup"], rel=0.01) and speedup > 0
    assert 0 <= rows[0]["reference_test_accuracy"] <= 1 and rows[0]["examples"] > 0


def test_throughput_refuses_cuda_without_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    run = subprocess.run([sys.executable, "-m", "benchmarks.throughput", "--device", "cuda"], capture_output=True, text=True, cwd=ROOT, timeout=120, check=False)
    assert run.returncode == 1 and run.stderr.strip() == "error: --device cuda, but torch sees no CUDA device"


def _cpu_preset_shapes() -> set[tuple[str, int, int, int]]:
    """(arch, resize, ratio, batch size) of every trial any shipped study's cpu preset can run."""
    shapes = set()
    for name in available():
        plan = resolve(load_spec(name), "cpu")
        archs = plan.search["arch"].grid("arch") if "arch" in plan.search else [plan.fixed["arch"]]
        for arch in archs:
            space = plan.space(arch)
            resizes = space["resize"].grid("resize") if "resize" in space else [plan.fixed.get("resize")]
            ratios = space["ratio"].grid("ratio") if "ratio" in space else [plan.fixed.get("ratio", 1)]
            for resize in resizes:
                config = plan.config({"arch": arch, "resize": resize, "lr": 0.01, "epochs": 1})
                shapes |= {(arch, config.resize, ratio, config.batch_size) for ratio in ratios}
    return shapes


def test_the_throughput_benchmark_lists_every_shape_the_cpu_presets_train():
    assert _cpu_preset_shapes() <= set(PRESET_SHAPES)


def test_a_preset_shape_is_measured_in_flops_per_second(fashion):
    flops_per_second, steps_per_second = measure_preset_shape("lenet", 28, 1, 64, fashion, "cpu", "auto", None, steps=2)
    assert flops_per_second > 0 and steps_per_second > 0


def test_the_share_of_a_step_in_convolutions_and_matrix_products_is_measured(fashion):
    # LeNet-BN spends much of its step in batch norm and pooling, which the FLOP counter does not count;
    # AlexNet-28 at batch 128 is mostly large convolutions and matrix products.
    small_share, small_flops = counted_operator_time("lenet_bn", 28, 1, 64, fashion, "fp32", None, steps=2)
    large_share, large_flops = counted_operator_time("alexnet_28", 28, 8, 128, fashion, "fp32", None, steps=2)
    assert 0 < small_share < large_share <= 1
    assert small_flops > 0 and large_flops > 0


def test_presets_benchmark_refuses_an_unknown_study(capsys):
    assert presets_main(["--study", "no_such_study"]) == 1
    assert capsys.readouterr().err.startswith("error: unknown study no_such_study; shipped: ")
    assert presets_main(["--workers", "0"]) == 1
    assert capsys.readouterr().err == "error: --workers must be >= 1; got 0\n"


def test_prediction_benchmark_refuses_an_unknown_study(capsys):
    assert prediction_main(["no_such_study"]) == 1
    assert capsys.readouterr().err.startswith("error: unknown study no_such_study; shipped: ")


@pytest.mark.slow
def test_prediction_benchmark_reads_the_start_prediction_and_the_real_time_from_the_storage(tmp_path):
    spec = make_spec(tmp_path, "tiny_prediction", {
        "fixed": {"arch": "lenet", "batch_size": 64, "n_train": 256, "n_val": 128, "n_test": 128, "epochs": 1, "precision": "fp32"},
        "search": {"lr": {"low": 0.01, "high": 0.1, "log": True}}, "presets.cpu": {}, "presets.full": {},
    })
    home = tmp_path / "home"
    home.mkdir()
    predicted, real = measure_prediction(str(spec), 2, home)
    assert predicted > 0 and real > 0


@pytest.mark.slow
def test_presets_benchmark_reads_a_launched_study_from_its_journal(tmp_path):
    spec = make_spec(tmp_path, "tiny_presets", {
        "fixed": {"arch": "lenet_bn", "batch_size": 64, "n_train": 512, "n_val": 128, "n_test": 128},
        "search": {"lr": {"low": 0.5, "high": 1.0, "log": True}, "epochs": {"low": 1, "high": 1}},
        "presets.cpu": {}, "presets.full": {},
    })
    home = tmp_path / "home"
    home.mkdir()
    row = run_study(str(spec), 2, "none", home)
    assert (row.complete, row.pruned, row.failed) == (2, 0, 0)
    assert 0 <= row.best_val <= 1 and 0 <= row.best_test <= 1
    assert 0 < row.train_share < 1
    assert format_row(row).startswith(f"| {spec} | 2 / 0 / 0 | ")


def test_the_cpu_precision_is_timed_once_per_shape():
    cpu_bf16_pays.cache_clear()
    state = torch.random.get_rng_state()
    first = cpu_bf16_pays("lenet_bn", 28, 1, 64, True)
    assert torch.equal(torch.random.get_rng_state(), state)  # a trial's seed still decides its initial weights
    assert cpu_bf16_pays("lenet_bn", 28, 1, 64, True) == first
    cpu_bf16_pays("lenet_bn", 28, 1, 32, True)
    assert cpu_bf16_pays.cache_info().misses == 2 and cpu_bf16_pays.cache_info().hits == 1


def _processes_with(marker: str) -> list[int]:
    """The processes whose environment holds `marker`: every process a command started, whatever its session or group."""
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if marker.encode() in environ.read_bytes():
                found.append(int(environ.parent.name))
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return found


def test_load_benchmark_records_a_failed_run_as_a_row_and_leaves_no_process(tmp_path):
    # A --timeout no tracking server starts within: each run fails, and is a row with the reason, not a traceback.
    out, marker = tmp_path / "load.json", f"LOAD_TEST_MARK={secrets.token_hex(8)}"
    name, value = marker.split("=")
    run = subprocess.run([sys.executable, "-m", "benchmarks.load", "--workers", "2", "--storages", "direct", "proxy", "--timeout", "0.5",
                          "-o", str(out)], capture_output=True, text=True, cwd=ROOT, timeout=300, check=False, env={**os.environ, name: value})
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr
    rows = json.loads(out.read_text())["rows"]
    assert [(row["storage"], row["workers"], row["finished"]) for row in rows] == [("direct", 2, 0), ("proxy", 2, 0)]
    assert all("after 0.5 s (--timeout)" in row["failure"] and row["workers_failed"] == 2 for row in rows), rows
    assert "after 0.5 s (--timeout)" in run.stdout.splitlines()[-1]  # the table says why
    assert _processes_with(marker) == []


def test_load_benchmarks_trainer_takes_the_arguments_of_the_real_one():
    # Its workers call the stub where a worker calls objectives.train (study/messages.py passes the checkpoint and the resume).
    import inspect

    import objectives
    from benchmarks.load import instant_train

    assert list(inspect.signature(instant_train).parameters) == list(inspect.signature(objectives.train).parameters)
