"""Every architecture's study and the zoo run three smoke trials end to end; inspect agrees with the trainer."""

import json

import optuna
import pytest
from mlflow.tracking import MlflowClient

from conftest import journal, run_cli
from objectives import TrainConfig, train
from study.specs import available

ZOO_SPECS = sorted(name for name in available() if name.endswith("_lr_epochs")) + ["zoo"]


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    return tmp_path_factory.mktemp("zoo")


def test_every_architecture_has_a_study():
    assert len(ZOO_SPECS) == 10


@pytest.mark.parametrize("name", ZOO_SPECS)
def test_three_smoke_trials_end_to_end(home, name):
    result = run_cli("launch", name, "--trials", "3", "--preset", "cpu", env={"STUDY_HOME": str(home), "MLFLOW_TRACKING_URI": ""})
    assert result.returncode == 0, result.stderr
    storage = journal(home)
    trials = optuna.load_study(study_name=name, storage=storage).get_trials()
    assert len(trials) == 3 and all(t.state.name in ("COMPLETE", "PRUNED") for t in trials), [(t.state, t.user_attrs) for t in trials]
    client = MlflowClient(tracking_uri=f"sqlite:///{home / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name(name).experiment_id])
    assert sorted(r.info.run_name for r in runs if "mlflow.parentRunId" in r.data.tags) == ["trial-0", "trial-1", "trial-2"]
    assert (home / "reports" / f"{name}.html").exists()


@pytest.mark.parametrize("arch, resize, ratio", [("alexnet", 224, 1), ("resnet18", 32, 4), ("googlenet", 32, 4), ("densenet", 32, 2)])
def test_inspect_totals_match_rows_and_the_trainer(fashion, arch, resize, ratio):
    result = run_cli("inspect", arch, "--resize", str(resize), "--ratio", str(ratio), "--format", "json")
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    trained = train(TrainConfig(arch=arch, resize=resize, ratio=ratio, lr=0.01, epochs=1, batch_size=32, n_train=32, n_val=32, n_test=32), fashion)
    assert sum(row["flops"] for row in rows) == trained.flops_per_example
    assert sum(row["params"] for row in rows) == trained.params
    table = run_cli("inspect", arch, "--resize", str(resize), "--ratio", str(ratio))
    assert f"{sum(row['flops'] for row in rows):,}" in table.stdout  # the total row of the table
    assert "most compute: #" in table.stdout and "most activation memory: #" in table.stdout


def test_inspect_alexnet_names_the_costliest_layers():
    table = run_cli("inspect", "alexnet", "--resize", "224").stdout
    # The notes' answer: the second convolution needs the most computation, the first linear layer the most parameters.
    assert "most compute: #3 Conv2d (44% of the FLOPs)" in table
    assert "most parameters: #14 Linear (56% of the parameters)" in table
    assert "1,876,292,352" in table and "46,764,746" in table
    csv = run_cli("inspect", "alexnet_28", "--format", "csv").stdout.splitlines()
    assert csv[0] == "index,layer,output_shape,params,flops,activation_bytes" and csv[1].startswith("0,Conv2d,96x28x28,")


def test_inspect_refuses_a_too_small_input():
    result = run_cli("inspect", "vgg11", "--resize", "16")
    assert result.returncode == 1 and result.stderr.strip() == "error: vgg11 needs resize >= 32 (its feature maps vanish below that); got 16"
