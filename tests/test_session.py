"""Creating and joining a study: flags checked once, settings recorded on the study and read back from it."""

import dataclasses

import optuna
import pytest

from study.session import RECORDED, Request, choose_preset, open_session
from study.specs import SpecError, load_spec
from study.strategies import SAMPLERS
from tests.conftest import ROOT, TINY_SPEC, make_spec, run_main


def _request(tmp_path, join=False, **flags) -> Request:
    values = {"trials": None if join else 3, "preset": None if join else "cpu", "storage": str(tmp_path / "optuna.journal")} | flags
    return Request(name=str(tmp_path / "tiny.toml"), join=join, **values)


@pytest.fixture
def spec(tmp_path):
    (tmp_path / "tiny.toml").write_text(TINY_SPEC)
    return load_spec(str(tmp_path / "tiny.toml"))


@pytest.mark.parametrize("flags, message", [
    ({"trials": 0}, "--trials must be >= 1"),
    ({"heartbeat": 0}, "--heartbeat must be >= 1 second"),
    ({"objective": "cost"}, "--objective cost: use accuracy or accuracy,cost"),
    ({"cost": "train_flops"}, "--cost train_flops needs --objective accuracy,cost"),
    ({"objective": "accuracy,cost", "cost": "memory"}, "--cost memory: use train_seconds or train_flops"),
    ({"sampler": "cmaes"}, f"--sampler cmaes: choose one of {', '.join(SAMPLERS)}"),
])
def test_flags_are_checked_before_anything_is_written(tmp_path, flags, message):
    with pytest.raises(ValueError, match=message):
        _request(tmp_path, **flags)
    assert not (tmp_path / "optuna.journal").exists()


def test_the_flags_reach_the_request_by_their_names():
    """Each field of Request is read from the flag of its name; a command without one (create's --heartbeat, the
    worker's --trials and --objective) leaves the field's default."""
    from study.cli import build_parser

    def parsed(*words):
        return build_parser().parse_args(list(words))

    flags = set().union(*(vars(parsed(command, "tiny")) for command in ("launch", "create", "worker")))
    assert {field.name for field in dataclasses.fields(Request)} - {"join"} <= flags  # join: the command, not a flag
    launch = Request.from_args(parsed("launch", "tiny", "--trials", "7", "--preset", "cpu", "--objective", "accuracy,cost", "--cost", "train_flops",
                                      "--sampler", "random", "--pruner", "none", "--storage", "s.db", "--heartbeat", "3"))
    assert launch == Request(name="tiny", trials=7, preset="cpu", objective="accuracy,cost", cost="train_flops", sampler="random",
                             pruner="none", storage="s.db", heartbeat=3)
    assert launch.wanted_objective == "accuracy,train_flops"
    create = Request.from_args(parsed("create", "tiny", "--objective", "accuracy,cost"))
    assert create == Request(name="tiny", objective="accuracy,cost") and create.wanted_objective == "accuracy,train_seconds"
    assert Request.from_args(parsed("worker", "tiny", "--heartbeat", "5"), join=True) == Request(name="tiny", join=True, heartbeat=5)


def test_launch_records_the_settings_and_a_worker_reads_them_back(tmp_path, spec):
    created = open_session(_request(tmp_path, objective="accuracy,cost", cost="train_flops", sampler="random"), spec)
    assert created.settings.cost == "train_flops" and created.settings.sampler == {"name": "random"}
    assert created.settings.pruner == {"name": "median", "n_startup_trials": 2}  # the spec's arguments for the spec's pruner
    recorded = dict(created.study.user_attrs)
    assert len(recorded.pop("study_uid")) == 32  # the study's identity, keying its MLflow parent run
    assert recorded.pop("spec") == spec.path.read_text()  # so that `worker tiny` finds the spec by the study's name
    assert recorded == {"preset": "cpu", "objective": "accuracy,train_flops", "sampler": "random", "pruner": "median", "trials": 3}
    assert recorded == created.settings.record and tuple(recorded) == RECORDED  # what `create` compares a study's record with
    joined = open_session(_request(tmp_path, join=True), spec)
    assert joined.settings == dataclasses.replace(created.settings, preset_reason="the study's")
    assert len(joined.study.directions) == 2


def test_a_study_keeps_its_preset_and_objective(tmp_path, spec):
    open_session(_request(tmp_path), spec)
    with pytest.raises(SpecError, match="was created with preset cpu; relaunch with --preset cpu"):
        open_session(_request(tmp_path, preset="full"), spec)
    with pytest.raises(SpecError, match="optimises accuracy; it cannot change to accuracy,train_seconds"):
        open_session(_request(tmp_path, objective="accuracy,cost"), spec)
    optuna.load_study(study_name="tiny", storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(tmp_path / "optuna.journal")))).set_user_attr("preset", "smoke")
    with pytest.raises(SpecError, match="created with preset 'smoke', which no longer exists"):
        open_session(_request(tmp_path), spec)


def test_a_worker_needs_a_launched_study(tmp_path, spec):
    with pytest.raises(SpecError, match="no study named 'tiny'"):
        open_session(_request(tmp_path, join=True), spec)


def test_without_a_gpu_the_cpu_preset_is_chosen_and_said_why():
    import torch

    preset, why = choose_preset(None)
    if torch.cuda.is_available():
        assert preset == "full" and why.startswith("CUDA device")
    else:
        assert preset == "cpu" and why.startswith("no CUDA device")
    assert choose_preset("full") == ("full", "as requested")


def test_settle_says_what_will_run_without_writing(tmp_path, spec):
    from study.session import settle

    assert settle(_request(tmp_path), spec).preset == "cpu" and not (tmp_path / "optuna.journal").exists()  # a launch: its flags
    open_session(_request(tmp_path, objective="accuracy,cost", sampler="random"), spec)
    before = (tmp_path / "optuna.journal").read_bytes()
    settings = settle(_request(tmp_path, join=True), spec)  # a worker: the study's record
    assert (settings.preset, settings.objective, settings.sampler, settings.total) == ("cpu", "accuracy,train_seconds", {"name": "random"}, 3)
    assert (tmp_path / "optuna.journal").read_bytes() == before


def test_samplers_and_pruners_are_named_from_one_table(tmp_path):
    """study.strategies is the one list: the flags' help, the command reference and the spec check name exactly its
    entries, and each entry is an Optuna sampler or pruner class."""
    from study.strategies import PRUNERS, SAMPLERS, strategy_class

    for table, kind in ((SAMPLERS, optuna.samplers.BaseSampler), (PRUNERS, optuna.pruners.BasePruner)):
        assert all(issubclass(strategy_class(table, name), kind) for name in table)
    for command in ("launch", "create"):
        shown = " ".join(run_main(command, "--help").stdout.split())
        either = [", ".join(names[:-1]) + f" or {names[-1]}" for names in (list(SAMPLERS), list(PRUNERS))]
        assert f"Optuna sampler: {either[0]} (" in shown and f"Optuna pruner: {either[1]};" in shown, command
    assert f"[--sampler {'|'.join(SAMPLERS)}] [--pruner {'|'.join(PRUNERS)}]" in (ROOT / "docs" / "commands.md").read_text()
    with pytest.raises(SpecError, match=f"sampler 'cmaes' is not supported; use {', '.join(SAMPLERS)}$"):
        load_spec(str(make_spec(tmp_path, "cmaes", {"fixed": {"arch": "lenet"}}, sampler={"name": "cmaes"})))
