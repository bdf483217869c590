"""Specs that used to pass the checks, write a study, then fail: each is now one line, exit 1 and nothing
written, on the journal file and on PostgreSQL alike. They run in-process against real storages."""

from __future__ import annotations

import optuna
import pytest
import torch

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
    # They passed the checks, then created the study, a trial and a FAILED MLflow parent before failing.
    "device this machine lacks": LENET_SPEC.replace('arch = "lenet"', 'arch = "lenet"\ndevice = "cuda:99"'),
    "device the trainer does not run on": LENET_SPEC.replace('arch = "lenet"', 'arch = "lenet"\ndevice = "meta"'),
    "cuda_graph with compile": LENET_SPEC.replace('arch = "lenet"', 'arch = "lenet"\ncuda_graph = true\ncompile = true'),
    "first trial's value not among the choices": LENET_SPEC.replace(LR, f"{LR}\nresize = {{ choices = [28, 32] }}") + "\n[[enqueue]]\nlr = 0.05\nresize = 30\n",
    "first trial's architecture not among the choices": LENET_SPEC.replace('arch = "lenet"\n', "").replace(LR, f'{LR}\narch = {{ choices = ["lenet", "lenet_bn"] }}')
    + '\n[[enqueue]]\narch = "vgg11"\n',
    "sampler argument that fails at the first trial": LENET_SPEC + '\n[sampler]\nname = "tpe"\nn_startup_trials = "x"\n',
    "pruner argument that fails when pruning": LENET_SPEC.replace('name = "none"', 'name = "hyperband"\nreduction_factor = 1'),
    # They launched: the first trial ran outside the search space, or ignored; the size failed its trial.
    "first trial outside a range": LENET_SPEC + "\n[[enqueue]]\nlr = 5.0\n",
    "first trial off a range's step": LENET_SPEC.replace("epochs = 1\n", "").replace(LR, f"{LR}\nepochs = {{ low = 1, high = 5, step = 2 }}") + "\n[[enqueue]]\nepochs = 2\n",
    "first trial setting what is not searched": LENET_SPEC + "\n[[enqueue]]\nlr = 0.05\nmomentum = 0.5\n",
    "size beyond the machine's memory": LENET_SPEC.replace(LR, f"{LR}\nresize = {{ choices = [28, 20000] }}"),
}
if not torch.cuda.is_available():
    BAD_SPECS["cuda_graph without CUDA"] = LENET_SPEC.replace('arch = "lenet"', 'arch = "lenet"\ncuda_graph = true')
# Flags that make a good spec impossible: (spec, extra launch arguments).
BAD_FLAGS = {
    "grid sampler over a float range": (LENET_SPEC, ["--sampler", "grid"]),
}


def _storages(tmp_path):
    from conftest import postgres_database

    yield "journal", None
    with postgres_database("badspec") as url:
        yield "postgresql", url


@pytest.mark.parametrize("case", list(BAD_SPECS), ids=list(BAD_SPECS))
def test_bad_spec_writes_nothing(case, tmp_path, monkeypatch, capsys):
    _refused_and_nothing_written(case, BAD_SPECS[case], [], tmp_path, monkeypatch, capsys)


@pytest.mark.parametrize("case", list(BAD_FLAGS), ids=list(BAD_FLAGS))
def test_bad_flags_for_a_spec_write_nothing(case, tmp_path, monkeypatch, capsys):
    _refused_and_nothing_written(case, *BAD_FLAGS[case], tmp_path, monkeypatch, capsys)


def _refused_and_nothing_written(case: str, text: str, flags: list[str], tmp_path, monkeypatch, capsys) -> None:
    from study.cli import main

    spec = tmp_path / "bad.toml"
    spec.write_text(text)
    tried = 0
    for kind, url in _storages(tmp_path):
        home = tmp_path / f"home-{kind}"
        monkeypatch.setenv("STUDY_HOME", str(home))
        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
        argv = ["launch", str(spec), "--trials", "1", "--log-model", "none", *flags, *(["--storage", url] if url else [])]
        assert main(argv) == 1, f"{case} ({kind}) was accepted"
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
        assert not home.exists(), f"{case} ({kind}) wrote {sorted(p.name for p in home.iterdir())}"
        if url:
            assert optuna.get_all_study_names(optuna.storages.RDBStorage(url)) == []
        tried += 1
    record_bad_inputs(tried, 0)


def test_a_launched_study_is_left_as_it_was_by_what_cannot_run_here(tmp_path, monkeypatch):
    """A relaunch and a worker whose spec now asks for a GPU this machine lacks, and a confirm and a finalize of a trial
    that another machine trained on such a GPU: one line each, and the study home is byte for byte as it was."""
    from conftest import run_main
    from reliability.checks import changed, fingerprint

    home = tmp_path / "home"
    monkeypatch.setenv("STUDY_HOME", str(home))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    spec = tmp_path / "kill.toml"
    spec.write_text(LENET_SPEC)
    assert run_main("launch", str(spec), "--trials", "1", "--log-model", "none").returncode == 0
    # A trial as `launch --gpus 99` leaves it on a machine with a hundred GPUs: its config names cuda:99.
    study = optuna.load_study(study_name="kill", storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(home / "optuna.journal"))))
    first = study.trials[0]
    study.add_trial(optuna.trial.create_trial(params=first.params, distributions=first.distributions, value=0.99,
                                              user_attrs={**first.user_attrs, "config": {**first.user_attrs["config"], "device": "cuda:99"}}))
    before = fingerprint(home)
    spec.write_text(LENET_SPEC.replace('arch = "lenet"', 'arch = "lenet"\ndevice = "cuda:99"'))
    cases = [(["launch", str(spec), "--trials", "2"], "kill.toml: device = 'cuda:99'"), (["worker", str(spec)], "kill.toml: device = 'cuda:99'"),
             (["confirm", str(spec), "--top", "1"], "study kill, trial 1: device = 'cuda:99'"), (["finalize", "kill"], "study kill, trial 1: device = 'cuda:99'")]
    for argv, message in cases:
        result = run_main(*argv)
        assert result.returncode == 1 and result.stderr.startswith(f"error: {tmp_path}/{message}" if "toml" in message else f"error: {message}"), (argv, result.stderr)
        assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr + result.stdout
        assert not changed(before, fingerprint(home)), (argv, changed(before, fingerprint(home)))
    record_bad_inputs(len(cases), 0)
