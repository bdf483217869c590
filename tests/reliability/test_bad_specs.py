"""Specs that used to pass the checks, write a study, then fail: each is now one line, exit 1 and nothing
written, on the journal file and on PostgreSQL alike. They run in-process against real storages."""

from __future__ import annotations

import optuna
import pytest

from conftest import LENET, spec_text
from reliability.checks import record_bad_inputs

LENET_SPEC = spec_text("kill", LENET)
LR = "lr = { low = 0.01, high = 0.1, log = true }"
BAD_SPECS = {
    "no arch": LENET_SPEC.replace('arch = "lenet"\n', ""),
    "zero step": LENET_SPEC.replace(LR, "lr = { low = 0.01, high = 0.1, step = 0 }"),
    "negative step": LENET_SPEC.replace(LR, f"{LR}\nepochs = {{ low = 1, high = 3, step = -1 }}").replace("epochs = 1\n", ""),
    "step and log": LENET_SPEC.replace(LR, "lr = { low = 0.01, high = 0.1, log = true, step = 0.01 }"),
    "infinite high": LENET_SPEC.replace(LR, "lr = { low = 0.01, high = inf }"),
    "nan low": LENET_SPEC.replace(LR, "lr = { low = nan, high = 0.1 }"),
    "float epochs fixed": LENET_SPEC.replace("epochs = 1\n", "epochs = 1.5\n"),
    "float epochs range": LENET_SPEC.replace("epochs = 1\n", "").replace(LR, f"{LR}\nepochs = {{ low = 1.0, high = 3.0 }}"),
    "n_train zero": LENET_SPEC.replace("n_train = 256", "n_train = 0"),
    "n_train above the split": LENET_SPEC.replace("n_train = 256", "n_train = 70000"),
    "n_val above the split": LENET_SPEC.replace("n_val = 128", "n_val = 6000"),
    "unknown device": LENET_SPEC.replace('arch = "lenet"', 'arch = "lenet"\ndevice = "tpu"'),
    "string resize": LENET_SPEC.replace('arch = "lenet"', 'arch = "lenet"\nresize = "32"'),
    "fractional resize": LENET_SPEC.replace('arch = "lenet"', 'arch = "lenet"\nresize = 32.5'),
    "resize below the minimum in a first trial": LENET_SPEC.replace(LR, f"{LR}\nresize = {{ choices = [28] }}") + "\n[[enqueue]]\nlr = 0.05\nresize = 4\n",
    "negative lr in a first trial": LENET_SPEC + "\n[[enqueue]]\nlr = -1.0\n",
    "string epochs in a first trial": LENET_SPEC.replace("epochs = 1\n", "").replace(LR, f"{LR}\nepochs = {{ low = 1, high = 2 }}") + '\n[[enqueue]]\nepochs = "x"\n',
    "enqueue not a table": LENET_SPEC.replace("[fixed]", "enqueue = 5\n\n[fixed]"),
    "empty choices": LENET_SPEC.replace(LR, f"{LR}\nratio = {{ choices = [] }}"),
    "table in choices": LENET_SPEC.replace(LR, f"{LR}\nratio = {{ choices = [{{ a = 1 }}] }}"),
    "log not a boolean": LENET_SPEC.replace(LR, 'lr = { low = 0.01, high = 0.1, log = "yes" }'),
    "pruner argument of the wrong type": LENET_SPEC.replace('name = "none"', 'name = "median"\nn_startup_trials = "x"'),
    "unknown pruner argument": LENET_SPEC.replace('name = "none"', 'name = "median"\nwarmup = 3'),
    "unknown sampler argument": LENET_SPEC + '\n[sampler]\nname = "random"\nseeds = 3\n',
    "bad preset value": LENET_SPEC + "\n[presets.cpu]\nn_train = -5\n",
    "bad momentum": LENET_SPEC.replace("momentum = 0.9", "momentum = -0.5"),
}


def _storages(tmp_path):
    from conftest import postgres_database

    yield "journal", None
    with postgres_database("badspec") as url:
        yield "postgresql", url


@pytest.mark.parametrize("case", list(BAD_SPECS), ids=list(BAD_SPECS))
def test_bad_spec_writes_nothing(case, tmp_path, monkeypatch, capsys):
    from study.cli import main

    spec = tmp_path / "bad.toml"
    spec.write_text(BAD_SPECS[case])
    tried = 0
    for kind, url in _storages(tmp_path):
        home = tmp_path / f"home-{kind}"
        monkeypatch.setenv("STUDY_HOME", str(home))
        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
        argv = ["launch", str(spec), "--trials", "1", *(["--storage", url] if url else [])]
        assert main(argv) == 1, f"{case} ({kind}) was accepted"
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
        assert not home.exists(), f"{case} ({kind}) wrote {sorted(p.name for p in home.iterdir())}"
        if url:
            assert optuna.get_all_study_names(optuna.storages.RDBStorage(url)) == []
        tried += 1
    record_bad_inputs(tried, 0)
