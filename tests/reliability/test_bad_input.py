"""Bad input through the CLI as a user types it: one line on stderr naming the problem, a non-zero exit,
and nothing written (no study home, no new study in the storage). tests/test_cli.py, test_specs.py and
test_data.py check many of these messages one layer down; here each goes through `main` end to end, and a
property-based test throws generated arguments and spec files at it: no input may show a traceback."""

from __future__ import annotations

import gzip
import itertools
import math
import os
import re
from pathlib import Path

import optuna
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import LENET, TINY_SPEC, run_main, spec_text
from reliability.checks import changed, fingerprint, record_bad_inputs

# A spec whose one line is replaced: (what replaces `arch = "vgg11"`, what the error must say).
SPEC_MISTAKES = {
    "TOML syntax error": ('arch = "vgg11\n', "line "),
    "lr <= 0": ('arch = "vgg11"\n[search.lr]\nlow = 0.0\nhigh = 0.1\n', "lr"),
    "epochs 0": ('arch = "vgg11"\nepochs = 0\n', "epochs"),
    "unknown architecture": ('arch = "vgg12"\n', "vgg12"),
    "unknown setting": ('arch = "vgg11"\nlearning_rate = 0.1\n', "learning_rate"),
}


def _tiny_without_lr_search(text: str) -> str:
    """TINY_SPEC with `text` for its architecture line, less its lr range and its first trials (which set lr)."""
    head, _, rows = TINY_SPEC.partition("[[enqueue]]")
    return re.sub(r"^lr = .*\n", "", head + rows[rows.index("[pruner]"):], flags=re.MULTILINE).replace('arch = "vgg11"\n', text)


def _one_line_error(capsys, argv: list[str], *fragments: str) -> str:
    from study.cli import main

    code = main(argv)
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code != 0, (argv, captured.out)
    assert len(lines) == 1 and lines[0].startswith("error: "), (argv, captured.err)
    assert "Traceback" not in captured.out + captured.err
    for fragment in fragments:
        assert fragment in lines[0], (argv, lines[0])
    return lines[0]


def _data_dir(tmp_path: Path, fashion_dir: Path, broken: str) -> Path:
    """A copy of the data directory (links) with one file missing, truncated or replaced."""
    directory = tmp_path / f"data-{broken}"
    directory.mkdir()
    files = sorted(p for p in fashion_dir.iterdir() if "idx" in p.name)
    for path in files:
        os.symlink(path, directory / path.name)
    victim = directory / files[0].name
    victim.unlink()
    if broken == "truncated":
        victim.write_bytes(files[0].read_bytes()[:1000] if files[0].suffix == ".gz" else gzip.compress(b"x")[:5])
        if files[0].suffix != ".gz":
            victim.rename(victim.with_name(victim.name + ".gz"))
    elif broken == "wrong":
        victim.write_bytes(gzip.compress(b"\x00" * 64) if victim.suffix == ".gz" else b"\x00" * 64)  # well-formed, wrong content
    return directory


def test_bad_inputs_are_one_line_errors_that_write_nothing(study_home, tmp_path, capsys, postgres_db, monkeypatch):
    from objectives.data import locate

    url, _, _ = postgres_db
    studies_before = optuna.get_all_study_names(url)
    tried = 0
    spec = tmp_path / "tiny.toml"
    spec.write_text(TINY_SPEC)
    cases = [
        (["launch", "vgg_ratoi"], ["unknown study 'vgg_ratoi'"]),
        (["show", "never_launched"], ["no study named 'never_launched'"]),
        (["report", "never_launched"], ["no study named 'never_launched'"]),
        (["report", "never_launched", "--storage", url], ["no study named 'never_launched'"]),
        (["launch", str(spec), "--storage", "nosuchdb://x/y"], ["cannot open storage"]),
        (["launch", str(spec), "--storage", "postgresql://nobody:secret@127.0.0.1:1/none"], ["cannot open storage", "***"]),
        (["launch", str(spec), "--storage", str(tmp_path / "no" / "such" / "optuna.journal")], ["does not exist"]),
        (["launch", str(spec), "-o", "/proc/report.html"], ["cannot write in /proc"]),
        (["launch", str(spec), "--data-dir", str(tmp_path / "nowhere")], ["does not exist"]),
        (["inspect", "vgg12"], ["vgg12"]),
        (["inspect", "vgg11", "--resize", "16"], ["32"]),
    ]
    for name, (line, message) in SPEC_MISTAKES.items():
        path = tmp_path / f"{name.replace(' ', '_').replace('<=', 'le')}.toml"
        path.write_text(_tiny_without_lr_search(line))
        cases.append((["launch", str(path)], [message]))
    small = tmp_path / "small.toml"
    small.write_text(TINY_SPEC.replace("resize = { choices = [32] }", "resize = { choices = [16, 32] }"))
    cases.append((["launch", str(small)], ["vgg11 needs resize >= 32"]))
    fashion_dir = locate()
    for broken, message in (("missing", "is missing"), ("truncated", "is truncated"), ("wrong", "is not the genuine Fashion-MNIST file")):
        cases.append((["launch", str(spec), "--data-dir", str(_data_dir(tmp_path, fashion_dir, broken))], [message]))
    for argv, fragments in cases:
        _one_line_error(capsys, argv, *fragments)
        tried += 1
        assert not study_home.exists(), f"{argv} created the study home"
    # A study home that cannot be created.
    monkeypatch.setenv("STUDY_HOME", "/proc/studies")
    _one_line_error(capsys, ["launch", str(spec), "--storage", url], "cannot create the study home")
    tried += 1
    assert optuna.get_all_study_names(url) == studies_before
    record_bad_inputs(tried, 0)


# ---- property-based: generated arguments and spec files never produce a traceback ----

WORDS = st.sampled_from(["launch", "show", "report", "inspect", "list", "export", "worker", "ui", "vgg_ratio", "zoo", "lenet", "vgg11", "nope",
                         "--trials", "--storage", "--preset", "--top", "--resize", "--ratio", "--workers", "--objective", "--cost",
                         "--sampler", "--pruner", "--format", "-o", "0", "-1", "3", "1e9", "abc", "sqlite:///", "x.html", "", "::", "%s"])
VALUES = st.one_of(st.integers(-5, 300), st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8), st.booleans(),
                   st.lists(st.integers(-2, 64), max_size=3))
KEYS = st.sampled_from(["arch", "lr", "epochs", "resize", "ratio", "batch_size", "low", "high", "choices", "log", "name", "step", "n_train"])
TABLES = st.sampled_from(["fixed", "search", "search.lr", "search.resize", "pruner", "sampler", "presets.cpu", "conditional.vgg11", "enqueue"])


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else ("inf" if value == math.inf else "-inf" if value == -math.inf else repr(value))
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    if isinstance(value, list):
        return "[" + ", ".join(map(str, value)) + "]"
    return str(value)


@st.composite
def spec_files(draw) -> str:
    lines = ['description = "generated"']
    for _ in range(draw(st.integers(0, 4))):
        lines.append(f"[{draw(TABLES)}]")
        for _ in range(draw(st.integers(0, 4))):
            lines.append(f"{draw(KEYS)} = {_toml_value(draw(VALUES))}")
    if draw(st.booleans()):  # sometimes plain garbage
        lines.insert(draw(st.integers(0, len(lines))), draw(st.text(max_size=12)))
    return "\n".join(lines) + "\n"


def _no_traceback(capsys, argv: list[str]) -> None:
    from study.cli import main

    try:
        main(argv)
    except SystemExit:
        pass  # argparse: --help, or a usage error (one line and exit 1)
    captured = capsys.readouterr()
    traceback = "Traceback" in captured.out + captured.err or "(run with --debug" in captured.err
    record_bad_inputs(1, int(traceback))  # each generated input counts in the figures as it is tried
    if traceback:
        pytest.fail(f"{argv}: {captured.err[-2000:]}")


# Specs near a tiny one that launches in seconds (LeNet, or VGG-11 at ratio 16; one epoch on at most 256 images), with a
# few settings drawn from values that run and values that cannot run here: each launch reaches a real storage.
FIXED_VALUES = {"device": ["cpu", "auto", "cuda", "cuda:7", "meta"], "cuda_graph": [False, True], "precision": ["fp32", "bf16", "fp16"],
                "channels_last": [False, True], "n_train": [128, 0, 70000], "batch_size": [32, 0], "epochs": [1, 0, 1.5],
                "momentum": [0.0, -1.0], "resize": [28, 32, 4, 20000, "32"], "init": ["kaiming", "zeros"], "eval_batch_size": [256, 0],
                "compile": [False, "yes"], "arch": ["lenet_bn", "vgg12"]}
VGG = {"arch": "vgg11", "resize": 32, "ratio": 16}
SEARCH_VALUES = {"lr": [{"low": 0.01, "high": 0.1, "log": True}, {"low": 0.0, "high": 0.1, "log": True}, {"low": 0.1, "high": 0.01},
                        {"choices": [0.02, 0.05]}],
                 "resize": [{"choices": [28, 32]}, {"choices": [28, 20000]}, {"low": 28, "high": 36, "step": 4}, {"choices": [4, 28]}],
                 "batch_size": [{"choices": [32, 64]}, {"low": 16, "high": 64, "step": 16}], "ratio": [{"choices": [1, 2]}]}
ROWS = [{"lr": 0.05}, {"lr": 0.02}, {"lr": 5.0}, {"lr": -1.0}, {"lr": 0.05, "resize": 30}, {"lr": 0.05, "momentum": 0.5}, {"resize": 32}]
SAMPLERS = [{"name": "random", "seed": 1}, {"name": "tpe", "n_startup_trials": "x"}, {"name": "tpe", "seed": "x"}, {"name": "grid"}, {"name": "cmaes"}]
PRUNERS = [{"name": "median", "n_startup_trials": 1}, {"name": "hyperband"}, {"name": "hyperband", "reduction_factor": 1}, {"name": "median", "warmup": 3}]
PRESETS = [{"n_train": 128}, {"n_train": -5}, {"batch_size": 0}]


@st.composite
def tiny_spec_files(draw) -> str:
    tables: dict = {"fixed": {}, "search": {}}
    for _ in range(draw(st.integers(1, 3))):
        part = draw(st.sampled_from(["fixed", "search", "enqueue", "sampler", "pruner", "preset", "vgg11"]))
        if part == "fixed":
            name = draw(st.sampled_from(sorted(FIXED_VALUES)))
            tables["fixed"][name] = draw(st.sampled_from(FIXED_VALUES[name]))
        elif part == "search":
            name = draw(st.sampled_from(sorted(SEARCH_VALUES)))
            tables["search"][name] = draw(st.sampled_from(SEARCH_VALUES[name]))
        elif part == "enqueue":
            tables["enqueue"] = draw(st.lists(st.sampled_from(ROWS), min_size=1, max_size=2))
        elif part == "vgg11":
            tables["fixed"] |= VGG
        else:
            table = {"sampler": "sampler", "pruner": "pruner", "preset": "presets.cpu"}[part]
            tables[table] = draw(st.sampled_from({"sampler": SAMPLERS, "pruner": PRUNERS, "preset": PRESETS}[part]))
    return spec_text("generated", LENET, **tables)


_generated = itertools.count()


def _launch_generated(spec: str, storage: str, objective: list[str], root: Path, capsys) -> None:
    """Launch a generated spec into the study home and storage under `root`, shared by every example: it launches (exit 0),
    or it fails in one line and `root` (home, SQLite file, specs) is byte for byte as it was."""
    path = root / f"g{next(_generated)}.toml"
    path.write_text(spec)
    (root / "storage").mkdir(exist_ok=True)
    _no_traceback(capsys, ["show", str(path)])
    flags = [] if storage == "journal" else ["--storage", f"sqlite:///{root / 'storage' / 'optuna.db'}"]
    before = fingerprint(root)
    result = run_main("launch", str(path), "--trials", "1", "--log-model", "none", *flags, *objective,
                      env={"STUDY_HOME": str(root / "home"), "MLFLOW_TRACKING_URI": None})
    output = result.stdout + result.stderr
    traceback = "Traceback" in output or "(run with --debug" in result.stderr
    record_bad_inputs(1, int(traceback))
    assert not traceback, f"{spec}\n{output[-2000:]}"
    if result.returncode != 0:
        assert result.returncode == 1 and result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, f"{spec}\n{result.stderr}"
        assert not changed(before, fingerprint(root)), f"{spec}\n{result.stderr}\nchanged: {changed(before, fingerprint(root))}"


# Twice as many specs near a launch as garbage ones.
GENERATED = {"spec": st.one_of(tiny_spec_files(), tiny_spec_files(), spec_files()), "storage": st.sampled_from(["journal", "sqlite"]),
             "objective": st.sampled_from([[], ["--objective", "accuracy,cost"]])}


@settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(**GENERATED)
def test_generated_spec_files_launch_or_write_nothing(spec, storage, objective, tmp_path_factory, capsys):
    _launch_generated(spec, storage, objective, _shared_root(tmp_path_factory, "generated"), capsys)


@pytest.mark.slow
@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(**GENERATED)
def test_many_generated_spec_files_launch_or_write_nothing(spec, storage, objective, tmp_path_factory, capsys):
    _launch_generated(spec, storage, objective, _shared_root(tmp_path_factory, "generated-many"), capsys)


def _shared_root(tmp_path_factory, name: str) -> Path:
    """One directory for every example of a test: launches after the first reuse its MLflow store, as a user's do."""
    root = tmp_path_factory.getbasetemp() / name
    root.mkdir(exist_ok=True)
    return root


@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(argv=st.lists(WORDS, min_size=1, max_size=5))
def test_generated_command_lines_never_show_a_traceback(argv, tmp_path_factory, capsys, monkeypatch):
    if argv[0] in ("launch", "worker", "ui") or "launch" in argv[:1]:
        argv = [*argv, "--storage", "nosuchdb://x/y"]  # stop before training or serving
    if argv[0] == "ui":
        return
    home = tmp_path_factory.mktemp("argv")
    monkeypatch.setenv("STUDY_HOME", str(home / "studies"))
    _no_traceback(capsys, argv)
