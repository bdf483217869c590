"""Every architecture trains end to end through a study (one launch, one trial per architecture, each at its smallest
input); every shipped spec is there by name; inspect agrees with the trainer."""

import json
import re

import optuna
import pytest
from mlflow.tracking import MlflowClient

from conftest import ROOT, journal, make_spec, run_main
from objectives import ARCHITECTURES, TrainConfig, get_architecture, train

SHIPPED_SPECS = {"vgg_ratio", "alexnet_resize", "zoo", *(f"{arch}_lr_epochs" for arch in ARCHITECTURES)}


def test_every_shipped_spec_is_listed_by_name():
    listed = run_main("list")
    assert listed.returncode == 0, listed.stderr
    assert set(re.findall(r"^(\w+) +arch ", listed.stdout, re.MULTILINE)) == SHIPPED_SPECS
    assert {name.removesuffix("_lr_epochs") for name in SHIPPED_SPECS if name.endswith("_lr_epochs")} == set(ARCHITECTURES)


def test_every_architecture_trains_through_a_study(study_home, tmp_path):
    """A zoo of tiny trials, one enqueued per architecture at its smallest input and ratio 4 (as a CPU preset
    shrinks the zoo): each trial is asked, trained, told, logged to MLflow and drawn in the report."""
    rows = [{"arch": arch, "lr": 0.05, "resize": max(28, get_architecture(arch).min_resize), "ratio": 4} for arch in sorted(ARCHITECTURES)]
    conditional = {f"conditional.{row['arch']}": {"resize": {"low": row["resize"], "high": row["resize"]}, "ratio": {"low": 4, "high": 4}} for row in rows}
    spec = make_spec(tmp_path, "zoo_tiny", {
        "fixed": {"batch_size": 32, "momentum": 0.9, "epochs": 1, "n_train": 64, "n_val": 64, "n_test": 64},
        "search": {"arch": {"choices": sorted(ARCHITECTURES)}, "lr": {"low": 0.01, "high": 0.1, "log": True}},
        **conditional, "pruner": {"name": "none"}}, enqueue=rows)
    result = run_main("launch", str(spec), "--trials", str(len(rows)))
    assert result.returncode == 0, result.stderr
    trials = optuna.load_study(study_name="zoo_tiny", storage=journal(study_home)).get_trials()
    assert {t.params["arch"]: t.state.name for t in trials} == dict.fromkeys(ARCHITECTURES, "COMPLETE"), [(t.params, t.user_attrs) for t in trials]
    client = MlflowClient(tracking_uri=f"sqlite:///{study_home / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("zoo_tiny").experiment_id])
    children = {r.data.params["arch"]: r.info.status for r in runs if "mlflow.parentRunId" in r.data.tags}
    assert children == dict.fromkeys(ARCHITECTURES, "FINISHED")
    report = (study_home / "reports" / "zoo_tiny.html").read_text()
    for arch in ARCHITECTURES:  # a point of its own on the cost plot, a row in the trials table
        assert f'"name":"{arch}"' in report and f"<td>{arch}</td>" in report, arch


@pytest.mark.parametrize("arch, resize, ratio", [("alexnet", 224, 1), ("resnet18", 32, 4), ("googlenet", 32, 4), ("densenet", 32, 2)])
def test_inspect_totals_match_rows_and_the_trainer(fashion, arch, resize, ratio):
    result = run_main("inspect", arch, "--resize", str(resize), "--ratio", str(ratio), "--format", "json")
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    trained = train(TrainConfig(arch=arch, resize=resize, ratio=ratio, lr=0.01, epochs=1, batch_size=8, n_train=8, n_val=1, n_test=1), fashion)
    assert sum(row["flops"] for row in rows) == trained.flops_per_example
    assert sum(row["params"] for row in rows) == trained.param_count
    table = run_main("inspect", arch, "--resize", str(resize), "--ratio", str(ratio))
    assert f"{sum(row['flops'] for row in rows):,}" in table.stdout  # the total row of the table
    assert "most compute: #" in table.stdout and "most activation memory: #" in table.stdout


def test_inspect_alexnet_names_the_costliest_layers():
    table = run_main("inspect", "alexnet", "--resize", "224").stdout
    # The notes' answer: the second convolution needs the most computation, the first linear layer the most parameters.
    assert "most compute: #3 Conv2d (44% of the FLOPs)" in table
    assert "most parameters: #14 Linear (56% of the parameters)" in table
    assert "1,876,292,352" in table and "46,764,746" in table
    csv = run_main("inspect", "alexnet_28", "--format", "csv").stdout.splitlines()
    assert csv[0] == "index,layer,output_shape,params,flops,activation_bytes" and csv[1].startswith("0,Conv2d,96x28x28,")


def test_inspect_refuses_a_too_small_input():
    result = run_main("inspect", "vgg11", "--resize", "16")
    assert result.returncode == 1 and result.stderr.strip() == "error: vgg11 needs resize >= 32 (its feature maps vanish below that); got 16"


def test_an_unknown_architecture_is_refused_with_every_name():
    result = run_main("inspect", "resnet99")
    assert result.returncode == 1 and result.stderr.strip() == f"error: unknown architecture 'resnet99'; choose one of {', '.join(ARCHITECTURES)}"


def test_the_presets_doc_names_exactly_the_registered_architectures():
    # docs/presets.md's paragraph on the architectures annotates each one by hand, so this keeps its names the registry's.
    names = re.search(r"^Architectures \(`objectives/models.py`[^:]*:(.*?)\. Each declares", (ROOT / "docs" / "presets.md").read_text(), re.MULTILINE | re.DOTALL)
    assert names is not None
    named = re.findall(r"`(\w+)`", names.group(1))
    assert sorted(named) == sorted(ARCHITECTURES)
