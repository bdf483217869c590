import re

import pytest

from study.specs import PRESETS, Choices, Range, SpecError, available, load_spec, resolve


def _spec(tmp_path, text, name="custom"):
    path = tmp_path / f"{name}.toml"
    path.write_text(text)
    return str(path)


BASE = """
[fixed]
arch = "vgg11"
[search]
lr = { low = 0.01, high = 0.1, log = true }
epochs = { low = 1, high = 10 }
resize = { choices = [32, 224] }
[[enqueue]]
lr = 0.05
epochs = 10
resize = 224
[presets.cpu]
n_train = 512
[presets.cpu.search]
epochs = { low = 1, high = 2 }
resize = { choices = [32] }
"""


def test_shipped_specs_load_and_resolve_for_every_preset():
    assert {"vgg_ratio", "alexnet_resize"} <= set(available())
    for name in available():
        spec = load_spec(name)
        for preset in PRESETS:
            plan = resolve(spec, preset)
            for row in plan.enqueue:
                plan.config(row)  # builds a valid TrainConfig


def test_notes_defaults_are_the_first_trials():
    vgg = resolve(load_spec("vgg_ratio"), "full")
    assert vgg.enqueue == [{"lr": 0.05, "epochs": 10, "resize": 224, "ratio": 4}]
    alexnet = resolve(load_spec("alexnet_resize"), "full")
    assert [(r["arch"], r["lr"], r["epochs"]) for r in alexnet.enqueue] == [("alexnet", 0.01, 10), ("alexnet_28", 0.01, 20)]
    assert [alexnet.config(r).resize for r in alexnet.enqueue] == [224, 28]
    assert alexnet.config(alexnet.enqueue[0]).batch_size == 128


def test_preset_replaces_settings_and_moves_first_trials_inside(tmp_path):
    spec = load_spec(_spec(tmp_path, BASE))
    cpu = resolve(spec, "cpu")
    assert cpu.fixed["n_train"] == 512 and cpu.search["epochs"] == Range(1, 2)
    assert cpu.enqueue == [{"lr": 0.05, "epochs": 2, "resize": 32}]
    assert resolve(spec, "full").enqueue == [{"lr": 0.05, "epochs": 10, "resize": 224}]


@pytest.mark.parametrize("old, new, message", [
    ("lr = { low = 0.01,", "lr = { low = 0.0,", "log scale, so low must be > 0"),
    ("epochs = { low = 1, high = 10 }", "epochs = { low = 0, high = 10 }", "epochs must be >= 1"),
    ("epochs = { low = 1, high = 10 }", "epochs = { low = 10, high = 1 }", "low <= high"),
    ("resize = { choices = [32, 224] }", "resize = { choices = [16, 224] }", "vgg11 needs resize >= 32"),
    ('arch = "vgg11"', 'arch = "vgg12"', "unknown architecture 'vgg12'"),
    ("[fixed]", "[fixed]\nlearning_rate = 0.1", "unknown setting 'learning_rate'"),
    ("[presets.cpu]\n", "[presets.tiny]\n", "unknown preset 'tiny'"),
    ("[presets.cpu]\n", "[presets.smoke]\n", "unknown preset 'smoke' (renamed `cpu`)"),
    ("n_train = 512", "max_resize = 32", "a preset narrows [search] ranges instead of capping them"),
    ("resize = { choices = [32] }", "resize = { choices = [8] }", "[presets.cpu]: vgg11 needs resize >= 32"),
    ("[search]", "[serch]\n[search]", "unknown section(s) serch"),
])
def test_impossible_specs_are_refused_with_the_reason(tmp_path, old, new, message):
    assert old in BASE
    with pytest.raises(SpecError) as error:
        load_spec(_spec(tmp_path, BASE.replace(old, new)))
    assert message in str(error.value) and "custom.toml" in str(error.value)


def test_unknown_study_lists_the_choices():
    with pytest.raises(SpecError, match="unknown study 'nope'; choose one of alexnet_28_lr_epochs, .*, vgg_ratio, zoo or give a path"):
        load_spec("nope")


ZOO_LIKE = """
[search]
arch = { choices = ["lenet", "vgg11"] }
lr = { low = 0.01, high = 0.1, log = true }
[conditional.vgg11]
resize = { low = 32, high = 96, step = 32 }
"""


def test_conditional_ranges_are_checked_per_architecture(tmp_path):
    plan = resolve(load_spec(_spec(tmp_path, ZOO_LIKE)), "full")
    assert plan.conditional == {"vgg11": {"resize": Range(32, 96, step=32)}}
    for old, new, message in [
        ("low = 32, high = 96", "low = 16, high = 96", "vgg11 needs resize >= 32"),
        ("[conditional.vgg11]", "[conditional.nin]", "[conditional.nin] names an architecture that search.arch does not offer"),
        ("resize = { low = 32, high = 96, step = 32 }", "resize = { choices = [32, 64] }", "Optuna cannot vary a categorical's choices"),
        ("resize = { low = 32", "lr = { low = 32", "must be a setting that [search] does not already search"),
    ]:
        with pytest.raises(SpecError, match=re.escape(message)):
            load_spec(_spec(tmp_path, ZOO_LIKE.replace(old, new)))


def test_zoo_cpu_narrows_each_architectures_resize_to_its_small_input():
    plan = resolve(load_spec("zoo"), "cpu")
    assert isinstance(plan.search["arch"], Choices)
    resizes = {arch: plan.space(arch)["resize"] for arch in plan.search["arch"].values}
    assert all(dist.low == dist.high for dist in resizes.values())
    resizes = {arch: dist.low for arch, dist in resizes.items()}
    assert resizes == {"lenet": 28, "lenet_bn": 28, "alexnet": 65, "alexnet_28": 28, "vgg11": 32, "nin": 67, "googlenet": 32, "resnet18": 32, "densenet": 32}


def test_range_and_choices_suggest_grid_and_describe():
    import optuna

    trial = optuna.create_study().ask()
    assert Range(1, 4).suggest(trial, "epochs") in range(1, 5)
    assert 0.01 <= Range(0.01, 0.1, log=True).suggest(trial, "lr") <= 0.1
    assert Choices((32, 64)).suggest(trial, "resize") in (32, 64)
    assert trial.distributions["epochs"] == optuna.distributions.IntDistribution(1, 4)
    assert Range(32, 96, step=32).grid("resize") == [32, 64, 96] and Choices((1, 2)).grid("ratio") == [1, 2]
    with pytest.raises(SpecError, match="grid sampler needs choices or an integer range for lr"):
        Range(0.01, 0.1, log=True).grid("lr")
    assert Range(0.01, 0.1, log=True).describe() == "0.01..0.1 log" and Range(32, 96, step=32).describe() == "32..96 step 32"
    assert Choices((4, 8)).describe() == "{4, 8}"
    assert Range(1, 2).clip(10) == 2 and Choices((32, 64)).clip(224) == 64


def test_config_fills_in_the_architectures_resize_once():
    plan = resolve(load_spec("alexnet_resize"), "full")
    config = plan.config({"arch": "alexnet_28", "lr": 0.01, "epochs": 5})
    assert config.resize == 28 and config.batch_size == 128


@pytest.mark.parametrize("preset", PRESETS)
def test_optuna_params_are_the_values_that_train(preset):
    """A preset narrows what Optuna samples, so each param Optuna holds is the setting the trial trains with."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    for name in available():
        plan = resolve(load_spec(name), preset)
        study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
        for row in plan.enqueue:
            study.enqueue_trial(row)
        for _ in range(len(plan.enqueue) + 8):
            trial = study.ask()
            config = plan.trial_config(trial)
            assert trial.params and {k: getattr(config, k) for k in trial.params} == trial.params, (name, preset)
            study.tell(trial, 0.5)


@pytest.mark.parametrize("row, message", [
    ("lr = 0.05\nresize = 64", "[[enqueue]] row 2: resize = 64 is not among the choices of search.resize {32, 224}"),
    ("lr = 0.5", "[[enqueue]] row 2: lr = 0.5 is not inside the range of search.lr 0.01..0.1 log"),
    ("epochs = 2.0", "[[enqueue]] row 2: epochs = 2.0 is not inside the range of search.epochs 1..10"),
    ('lr = "0.05"', "[[enqueue]] row 2: lr = '0.05' is not inside the range"),
    ("momentum = 0.5", "[[enqueue]] row 2: momentum is not searched, so Optuna would ignore it"),
])
def test_first_trials_lie_in_the_specs_own_search_space(tmp_path, row, message):
    """Optuna fails on a first trial's value that is not among a categorical's choices only after the trial exists, and
    runs one outside a range as written: both are refused when the spec is read, naming the row and the setting."""
    with pytest.raises(SpecError) as error:
        load_spec(_spec(tmp_path, BASE.replace("[presets.cpu]", f"[[enqueue]]\n{row}\n\n[presets.cpu]")))
    assert message in str(error.value) and "custom.toml" in str(error.value)


def test_first_trials_are_checked_against_their_architectures_ranges(tmp_path):
    good = ZOO_LIKE + '\n[[enqueue]]\narch = "vgg11"\nresize = 64\n'
    assert resolve(load_spec(_spec(tmp_path, good)), "full").enqueue == [{"arch": "vgg11", "resize": 64}]
    for row, message in [('arch = "vgg11"\nresize = 48', "resize = 48 is not inside the range of conditional.vgg11.resize 32..96 step 32"),
                         ('arch = "lenet"\nresize = 64', "resize is not searched for arch lenet"),
                         ('arch = "nin"\nresize = 64', "arch = 'nin' is not among the choices of search.arch {lenet, vgg11}")]:
        with pytest.raises(SpecError, match=re.escape(message)):
            load_spec(_spec(tmp_path, ZOO_LIKE + f"\n[[enqueue]]\n{row}\n"))


def test_edge_configs_cover_every_choice_and_range_end(tmp_path):
    from study.specs import edge_configs

    plan = resolve(load_spec(_spec(tmp_path, BASE)), "full")
    configs = edge_configs(plan)
    assert {c.resize for c in configs} == {32, 224} and {c.epochs for c in configs} >= {1, 10} and {c.lr for c in configs} >= {0.01, 0.1}
    assert plan.where.endswith("custom.toml") and resolve(plan.spec, "cpu").where.endswith("custom.toml [presets.cpu]")


def test_a_preset_that_leaves_out_a_first_trials_architecture_does_not_run_that_trial(tmp_path):
    spec = load_spec(_spec(tmp_path, ZOO_LIKE + '\n[[enqueue]]\narch = "vgg11"\nresize = 64\n\n[presets.cpu.search]\narch = { choices = ["lenet"] }\n'))
    assert resolve(spec, "cpu").enqueue == [] and resolve(spec, "full").enqueue == [{"arch": "vgg11", "resize": 64}]
