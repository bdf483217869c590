"""Study specs: TOML files that say what a study searches, what it fixes and what it runs first.

A spec (see study/specs/*.toml) has:
    description = "..."
    [fixed]       TrainConfig settings shared by every trial
    [search]      name = { low, high, log, step } for numbers, name = { choices = [...] } for categories
    [conditional.ARCH]  numeric ranges searched only when the trial's arch is ARCH (the zoo: resize
                  and ratio depend on the architecture); Optuna cannot vary a categorical's choices
    [[enqueue]]   settings tried first (the notes' defaults): searched settings only, each among its choices or
                  inside its range (a preset's narrower ranges move them inside theirs)
    [pruner]      name = one of study.strategies.PRUNERS, plus that pruner's arguments (default: median)
    [sampler]     name = one of study.strategies.SAMPLERS, plus that sampler's arguments (default: tpe);
                  grid runs every combination of [search] choices and integer ranges
    [presets.P]   P is `cpu` or `full`: TrainConfig settings that replace [fixed] ones (data subsets,
                  batch size...), [presets.P.search] ranges that replace [search] ones of the same name,
                  and [presets.P.conditional.ARCH] tables that replace the whole [conditional]. A preset
                  narrows what Optuna samples from (a range with low == high is one value), so every
                  param Optuna records is the value that trained.
Every name in [fixed], [search] and [[enqueue]] is a TrainConfig field, so the same names appear in
TOML, Optuna, MLflow and the reports.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from objectives.models import get_architecture
from objectives.train import TrainConfig
from study.strategies import PRUNERS, SAMPLERS

if TYPE_CHECKING:
    import optuna

SPEC_DIR = Path(__file__).parent / "specs"
TOP_LEVEL_KEYS = {"description", "fixed", "search", "conditional", "enqueue", "pruner", "sampler", "presets"}
PRESETS = ("cpu", "full")
CONFIG_FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}


class SpecError(ValueError):
    """A spec that cannot be run: unknown name, bad TOML, impossible range."""


# --- the search space: one class per kind of distribution -------------------------------------------

@dataclass(frozen=True)
class Range:
    """A numeric range: integers when low and high are both integers, else floats."""

    low: int | float
    high: int | float
    log: bool = False
    step: int | float | None = None

    @property
    def integer(self) -> bool:
        return isinstance(self.low, int) and isinstance(self.high, int)

    def suggest(self, trial: optuna.Trial, name: str):
        if self.integer:
            return trial.suggest_int(name, self.low, self.high, step=self.step or 1, log=self.log)
        return trial.suggest_float(name, self.low, self.high, step=self.step, log=self.log)

    def grid(self, name: str) -> list:
        if not self.integer or self.log:
            raise SpecError(f"the grid sampler needs choices or an integer range for {name}; got {self.describe()}")
        return list(range(self.low, self.high + 1, self.step or 1))

    def edges(self) -> list:
        """The values whose configs must build: the range's ends."""
        return [self.low, self.high]

    def clip(self, value):
        """An enqueued value moved inside this range."""
        return type(value)(min(max(value, self.low), self.high))

    def contains(self, value) -> bool:
        """Whether Optuna could draw `value` from this range: a number of the range's kind, between its ends, on its step."""
        if isinstance(value, bool) or not isinstance(value, int if self.integer else (int, float)):
            return False
        if not self.low <= value <= self.high:
            return False
        if self.step is None:
            return True
        steps = (value - self.low) / self.step
        return math.isclose(steps, round(steps), abs_tol=1e-9)

    def describe(self) -> str:
        step = f" step {self.step}" if self.step is not None else ""
        return f"{self.low}..{self.high}{' log' if self.log else ''}{step}"


@dataclass(frozen=True)
class Choices:
    """A set of values, searched as a categorical."""

    values: tuple

    def suggest(self, trial: optuna.Trial, name: str):
        return trial.suggest_categorical(name, list(self.values))

    def grid(self, name: str) -> list:
        return list(self.values)

    def edges(self) -> list:
        return list(self.values)

    def clip(self, value):
        """An enqueued value, or the nearest of these choices when it is not one of them; None when nothing is near
        (an architecture the choices leave out)."""
        if self.contains(value):
            return value
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (value, *self.values)):
            return None
        return min(self.values, key=lambda choice: abs(choice - value))

    def contains(self, value) -> bool:
        """Whether `value` is one of these choices (true is not 1, as TOML tells them apart)."""
        return any(value == choice and isinstance(value, bool) == isinstance(choice, bool) for choice in self.values)

    def describe(self) -> str:
        return f"{{{', '.join(map(str, self.values))}}}"


Distribution = Range | Choices


def parse_distribution(where: str, name: str, raw) -> Distribution:
    """A TOML table, `{ low, high, log, step }` or `{ choices = [...] }`, as a checked Range or Choices."""
    if not isinstance(raw, dict):
        raise SpecError(f"{where}: search.{name} must be a table like {{ low = 1, high = 10 }} or {{ choices = [...] }}")
    if "choices" in raw:
        if set(raw) != {"choices"} or not isinstance(raw["choices"], list) or not raw["choices"]:
            raise SpecError(f"{where}: search.{name} needs a non-empty list `choices` and nothing else")
        return Choices(tuple(raw["choices"]))
    if not {"low", "high"} <= set(raw) <= {"low", "high", "log", "step"}:
        raise SpecError(f"{where}: search.{name} needs `low` and `high` (and optionally `log` or `step`)")
    low, high = raw["low"], raw["high"]
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high)) or low > high:
        raise SpecError(f"{where}: search.{name} needs numbers with low <= high; got low={low!r}, high={high!r}")
    if not all(math.isfinite(v) for v in (low, high)):
        raise SpecError(f"{where}: search.{name} needs finite bounds; got low={low!r}, high={high!r}")
    if raw.get("log") and low <= 0:
        raise SpecError(f"{where}: search.{name} is on a log scale, so low must be > 0; got {low}")
    step = raw.get("step")
    if step is not None:
        if isinstance(step, bool) or not isinstance(step, (int, float)) or not math.isfinite(step) or step <= 0:
            raise SpecError(f"{where}: search.{name} needs a step > 0; got {step!r}")
        if raw.get("log"):
            raise SpecError(f"{where}: search.{name} cannot have both a step and a log scale (Optuna samples one or the other)")
        if isinstance(low, int) and isinstance(high, int) and not isinstance(step, int):
            raise SpecError(f"{where}: search.{name} is an integer range, so its step must be an integer; got {step!r}")
    if not isinstance(raw.get("log", False), bool):
        raise SpecError(f"{where}: search.{name}: log must be true or false; got {raw['log']!r}")
    return Range(low, high, bool(raw.get("log", False)), step)


# --- specs and presets ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Preset:
    fixed: dict                                           # TrainConfig settings replacing [fixed] ones
    search: dict[str, Distribution]                       # ranges replacing [search] ones of the same name
    conditional: dict[str, dict[str, Distribution]] | None  # None: the spec's [conditional] as it is


@dataclass(frozen=True)
class Spec:
    name: str
    description: str
    fixed: dict
    search: dict[str, Distribution]
    conditional: dict[str, dict[str, Distribution]]
    enqueue: list[dict]
    pruner: dict
    sampler: dict
    presets: dict[str, Preset]
    path: Path
    text: str  # the TOML as read: what a launch records on the study (study.session.SPEC_TEXT)

    def summary(self) -> str:
        """The search space in one line, e.g. `lr 0.005..0.2 log, ratio {1, 2, 4}`."""
        return _summary(self.fixed, self.search, self.conditional)


def _summary(fixed: dict, search: dict[str, Distribution], conditional: dict[str, dict[str, Distribution]]) -> str:
    parts = [f"arch {fixed['arch']}"] if "arch" in fixed else []
    parts += [f"{name} {dist.describe()}" for name, dist in search.items()]
    for arch, ranges in conditional.items():
        parts.append(f"[{arch}: {', '.join(f'{name} {dist.describe()}' for name, dist in ranges.items())}]")
    return ", ".join(parts)


@dataclass(frozen=True)
class Plan:
    """A spec with one preset applied: what the launcher actually runs."""

    spec: Spec
    preset: str
    fixed: dict                                     # TrainConfig settings for every trial, subsets included
    search: dict[str, Distribution]                 # ranges as the preset narrowed them
    conditional: dict[str, dict[str, Distribution]]  # arch -> ranges searched only for that arch
    enqueue: list[dict]                             # first trials, moved inside the preset's ranges

    @property
    def where(self) -> str:
        """Where a setting this plan runs comes from, for error messages: the spec, and its preset's table if it has one."""
        return f"{self.spec.path} [presets.{self.preset}]" if self.preset in self.spec.presets else str(self.spec.path)

    def archs(self) -> tuple:
        """Every architecture a trial can draw."""
        arch_dist = self.search.get("arch")
        return arch_dist.values if isinstance(arch_dist, Choices) else (self.fixed.get("arch", TrainConfig.arch),)

    def space(self, arch: str | None) -> dict[str, Distribution]:
        """Every distribution a trial of `arch` draws from."""
        return {**self.search, **self.conditional.get(arch, {})}

    def suggest(self, trial: optuna.Trial) -> dict:
        """The trial's params: the spec's search, then the ranges that depend on the drawn architecture."""
        params = {name: dist.suggest(trial, name) for name, dist in self.search.items()}
        arch = params.get("arch", self.fixed.get("arch"))
        params |= {name: dist.suggest(trial, name) for name, dist in self.conditional.get(arch, {}).items()}
        return params

    def config(self, params: dict) -> TrainConfig:
        """The resolved TrainConfig for one trial's params: resize filled in with the architecture's default."""
        settings = {**self.fixed, **params}
        if settings.get("resize") is None:
            settings["resize"] = get_architecture(settings.get("arch", TrainConfig.arch)).default_resize
        return TrainConfig.from_dict(settings)

    def trial_config(self, trial: optuna.Trial) -> TrainConfig:
        """What one Optuna trial trains: its params drawn and resolved into a TrainConfig."""
        return self.config(self.suggest(trial))

    def grid(self) -> dict[str, list]:
        """Every value of every searched setting, for the grid sampler."""
        if self.conditional:
            raise SpecError(f"{self.spec.name}: the grid sampler cannot search ranges that depend on the architecture ([conditional])")
        try:
            return {name: dist.grid(name) for name, dist in self.search.items()}
        except SpecError as error:
            raise SpecError(f"{self.spec.name}: {error}") from None

    def summary(self) -> str:
        return _summary(self.fixed, self.search, self.conditional)


def available() -> list[str]:
    return sorted(path.stem for path in SPEC_DIR.glob("*.toml"))


def study_name(name: str) -> str:
    """The study a command's NAME argument means: a path to a .toml spec names the study after its file, as
    load_spec does (so every command takes the path `launch` took); anything else is the study's name."""
    return Path(name).stem if name.endswith(".toml") else name


def load_spec(name: str) -> Spec:
    """A shipped spec by name, or a user's spec from a path to a .toml file (named after the file)."""
    path = Path(name)
    if name.endswith(".toml"):
        if not path.is_file():
            raise SpecError(f"spec file {path} does not exist")
        from study.names import check_study_name

        check_study_name(path.stem, f"spec file {path}")  # the study's name, before anything of it is written
    else:
        path = SPEC_DIR / f"{name}.toml"
        if not path.is_file():
            raise SpecError(f"unknown study {name!r}; choose one of {', '.join(available())} or give a path to a .toml spec")
    try:
        text = path.read_text()
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise SpecError(f"{path}: {error}") from None
    except (OSError, UnicodeDecodeError) as error:
        raise SpecError(f"cannot read {path}: {error}") from None
    return _parse(path, raw, text)


def recorded_spec(name: str, text: str) -> Spec:
    """The spec a study recorded when it was launched (study.session.SPEC_TEXT): what `worker NAME` and `confirm NAME`
    run when NAME is neither a shipped study nor a path, e.g. a study launched from a spec file on another machine."""
    try:
        return _parse(Path(f"{name}.toml"), tomllib.loads(text), text)
    except tomllib.TOMLDecodeError as error:
        raise SpecError(f"study {name}: its recorded spec does not parse ({error})") from None


def _table(where: str, raw: dict, section: str, default=None) -> dict:
    value = raw.get(section, {} if default is None else default)
    if not isinstance(value, dict):
        raise SpecError(f"{where}: [{section}] must be a table")
    return value


def _parse(path: Path, raw: dict, text: str) -> Spec:
    where = str(path)
    unknown = set(raw) - TOP_LEVEL_KEYS
    if unknown:
        raise SpecError(f"{where}: unknown section(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(TOP_LEVEL_KEYS))}")
    fixed = _table(where, raw, "fixed")
    search = {name: parse_distribution(where, name, dist) for name, dist in _table(where, raw, "search").items()}
    enqueue = raw.get("enqueue", [])
    if not isinstance(enqueue, list) or not all(isinstance(row, dict) for row in enqueue):
        raise SpecError(f"{where}: [[enqueue]] must be a list of tables, one per first trial")
    for name in [*fixed, *search, *(k for row in enqueue for k in row)]:
        if name not in CONFIG_FIELDS:
            raise SpecError(f"{where}: unknown setting {name!r}; known: {', '.join(sorted(CONFIG_FIELDS))}")
    if "arch" not in fixed and "arch" not in search:
        raise SpecError(f"{where}: no architecture: set `arch` in [fixed] (e.g. arch = \"lenet\") or search it in [search]")
    archs = search["arch"].values if isinstance(search.get("arch"), Choices) else ()
    conditional = _parse_conditional(where, raw.get("conditional", {}), search, archs)
    _check_enqueue(where, enqueue, fixed, search, conditional)
    presets = {}
    for preset, table in _table(where, raw, "presets").items():
        if preset not in PRESETS:
            hint = " (renamed `cpu`)" if preset == "smoke" else ""
            raise SpecError(f"{where}: unknown preset {preset!r}{hint}; presets are {', '.join(PRESETS)}")
        presets[preset] = _parse_preset(f"{where} [presets.{preset}]", table, search, archs)
    pruner, sampler = _table(where, raw, "pruner", {"name": "median"}), _table(where, raw, "sampler", {"name": "tpe"})
    if pruner.get("name", "median") not in PRUNERS:
        raise SpecError(f"{where}: pruner {pruner.get('name')!r} is not supported; use {', '.join(PRUNERS)}")
    if sampler.get("name", "tpe") not in SAMPLERS:
        raise SpecError(f"{where}: sampler {sampler.get('name')!r} is not supported; use {', '.join(SAMPLERS)}")
    spec = Spec(name=path.stem, description=str(raw.get("description", "")), fixed=fixed, search=search, conditional=conditional,
                enqueue=enqueue, pruner=pruner, sampler=sampler, presets=presets, path=path, text=text)
    for preset in PRESETS:
        edge_configs(resolve(spec, preset))
    return spec


def _parse_preset(where: str, table: dict, search: dict[str, Distribution], archs: tuple) -> Preset:
    fixed = {name: value for name, value in table.items() if name not in ("search", "conditional")}
    bad = set(fixed) - CONFIG_FIELDS
    if bad:
        raise SpecError(f"{where}: unknown setting(s) {', '.join(sorted(bad))}; a preset narrows [search] ranges instead of capping them")
    ranges = {}
    for name, dist in _table(where, table, "search").items():
        if name not in search:
            raise SpecError(f"{where}: [search] does not search {name!r}, so the preset cannot narrow it")
        ranges[name] = parse_distribution(where, name, dist)
    conditional = _parse_conditional(where, table["conditional"], search, archs) if "conditional" in table else None
    return Preset(fixed=fixed, search=ranges, conditional=conditional)


def _parse_conditional(where: str, raw, search: dict[str, Distribution], archs: tuple) -> dict[str, dict[str, Distribution]]:
    if not isinstance(raw, dict):
        raise SpecError(f"{where}: [conditional] must be a table of architectures")
    conditional = {}
    for arch, ranges in raw.items():
        if arch not in archs:
            raise SpecError(f"{where}: [conditional.{arch}] names an architecture that search.arch does not offer")
        conditional[arch] = {}
        for name, dist in ranges.items():
            if name not in CONFIG_FIELDS or name in search:
                raise SpecError(f"{where}: conditional.{arch}.{name} must be a setting that [search] does not already search")
            parsed = parse_distribution(where, f"conditional.{arch}.{name}", dist)
            if isinstance(parsed, Choices):
                raise SpecError(f"{where}: conditional.{arch}.{name} needs a numeric range: Optuna cannot vary a categorical's choices between trials")
            conditional[arch][name] = parsed
    return conditional


def _check_enqueue(where: str, enqueue: list[dict], fixed: dict, search: dict[str, Distribution],
                   conditional: dict[str, dict[str, Distribution]]) -> None:
    """Every first trial inside the spec's own search space: Optuna fails on a value that is not among a categorical's
    choices only once the trial exists, and runs one outside a range as written. (A preset's narrower ranges move
    the rows inside them instead: `resolve`.)"""
    for number, row in enumerate(enqueue, 1):
        arch = row.get("arch", fixed.get("arch"))
        for_arch = f" for arch {arch}" if "arch" in search and arch else ""
        space = {**{name: (f"search.{name}", dist) for name, dist in search.items()},
                 **{name: (f"conditional.{arch}.{name}", dist) for name, dist in conditional.get(arch, {}).items()}}
        for name in sorted(row, key=lambda name: name != "arch"):  # the architecture first: it decides what else is searched
            value = row[name]
            if name not in space:
                raise SpecError(f"{where}: [[enqueue]] row {number}: {name} is not searched{for_arch}, so Optuna would "
                                f"ignore it; a first trial sets searched settings only (search {name}, or set it in [fixed])")
            table, dist = space[name]
            if not dist.contains(value):
                kind = "among the choices" if isinstance(dist, Choices) else "inside the range"
                raise SpecError(f"{where}: [[enqueue]] row {number}: {name} = {value!r} is not {kind} of {table} {dist.describe()}")


def edge_configs(plan: Plan) -> list[TrainConfig]:
    """The TrainConfigs at the edges of what a trial of `plan` can draw, each built (so checked): for every reachable
    architecture its fixed settings, each choice and both ends of each range; and every first trial. A SpecError
    names the spec (and preset) when one does not build."""
    candidates = [dict(row) for row in plan.enqueue]
    for arch in plan.archs():
        candidates.append({"arch": arch})
        for name, dist in plan.space(arch).items():
            if name != "arch":
                candidates += [{"arch": arch, name: value} for value in dist.edges()]
    try:
        return [plan.config(candidate) for candidate in candidates]
    except (ValueError, TypeError) as error:
        raise SpecError(f"{plan.where}: {error}") from None


def resolve(spec: Spec, preset: str) -> Plan:
    """Apply a preset to a spec: its settings replace fixed ones, its ranges replace searched ones."""
    if preset not in PRESETS:
        raise SpecError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    chosen = spec.presets.get(preset) or Preset(fixed={}, search={}, conditional=None)
    search = {**spec.search, **chosen.search}
    conditional = spec.conditional if chosen.conditional is None else chosen.conditional
    # First trials, inside the spec's own space (_check_enqueue), move inside the ranges the preset narrowed. Settings
    # a preset's [conditional] no longer searches are dropped: Optuna would ignore them anyway.
    enqueue = []
    for row in spec.enqueue:
        arch = row.get("arch", spec.fixed.get("arch"))
        space = {**search, **conditional.get(arch, {})}
        narrowed = {**chosen.search, **(chosen.conditional or {}).get(arch, {})}
        moved = {name: narrowed[name].clip(value) if name in narrowed else value for name, value in row.items() if name in space}
        if None not in moved.values():  # a first trial for a choice the preset leaves out (an architecture) does not run under it
            enqueue.append(moved)
    return Plan(spec=spec, preset=preset, fixed={**spec.fixed, **chosen.fixed}, search=search, conditional=conditional, enqueue=enqueue)

