"""A configuration too large for the machine fails its own trial with the memory it needs, before anything is
allocated; the launch goes on with the next trial."""

from __future__ import annotations

import optuna
from optuna.trial import TrialState

from conftest import LENET, journal, run_cli, spec_text
from objectives.inspect import training_bytes
from reliability.checks import check_consistent, record_fault, sqlite_uri

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


def test_impossible_size_fails_its_trial_only(study_home, tmp_path):
    spec = tmp_path / "huge.toml"
    spec.write_text(HUGE_SPEC)
    done = run_cli("launch", str(spec), "--trials", "2", "--log-model", "none", env={"STUDY_HOME": str(study_home)})
    assert done.returncode == 0, done.stderr
    trials = optuna.load_study(study_name="huge", storage=journal(study_home)).get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE]
    reason = trials[0].user_attrs["fail_reason"]
    assert "resize 20000" in reason and "needs at least" in reason and "GiB" in reason, reason
    record_fault("configuration larger than memory", 1, check_consistent("huge", journal(study_home), sqlite_uri(study_home), total=2))
