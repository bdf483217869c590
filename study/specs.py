"""Study specs: TOML files that say what a study searches, what it fixes and what it runs first.

A spec (see study/specs/*.toml) has:
    description = "..."
    [fixed]       TrainConfig settings shared by every trial
    [search]      name = { low, high, log } for numbers, name = { choices = [...] } for categories
    [conditional.ARCH]  numeric ranges searched only when the trial's arch is ARCH (the zoo: resize
                  and ratio depend on the architecture); Optuna cannot vary a categorical's choices
    [[enqueue]]   settings tried first (the notes' defaults)
    [pruner]      name = "median" | "hyperband" | "none", plus that pruner's arguments (default: median)
    [sampler]     name = "tpe" | "gp" | "random" | "grid", plus that sampler's arguments (default: tpe);
                  grid runs every combination of [search] choices and integer ranges
    [presets.P]   settings that replace [fixed] ones (data subsets, batch size...), `max_resize`
                  (a cap on every input side), [presets.P.search] ranges that replace [search] ones,
                  and [presets.P.conditional] that replaces [conditional]
Every name in [fixed], [search] and [[enqueue]] is a TrainConfig field, so the same names appear in
TOML, Optuna, MLflow and the reports.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass
from pathlib import Path

from objectives.models import get_architecture
from objectives.train import TrainConfig

SPEC_DIR = Path(__file__).parent / "specs"
TOP_LEVEL_KEYS = {"description", "fixed", "search", "conditional", "enqueue", "pruner", "sampler", "presets"}
PRUNER_NAMES = ("median", "hyperband", "none")
SAMPLER_NAMES = ("tpe", "gp", "random", "grid")
PRESETS = ("smoke", "full")
CONFIG_FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}


class SpecError(ValueError):
    """A spec that cannot be run: unknown name, bad TOML, impossible range."""


@dataclass(frozen=True)
class Spec:
    name: str
    description: str
    fixed: dict
    search: dict[str, dict]
    enqueue: list[dict]
    pruner: dict
    presets: dict[str, dict]
    path: Path
    conditional: dict[str, dict[str, dict]]
    sampler: dict = dataclasses.field(default_factory=lambda: {"name": "tpe"})

    def summary(self) -> str:
        """The search space in one line, e.g. `lr 0.005..0.2 log, ratio {1, 2, 4}`."""
        parts = [f"arch {self.fixed['arch']}"] if "arch" in self.fixed else []
        parts += [_describe(name, dist) for name, dist in self.search.items()]
        for arch, search in self.conditional.items():
            parts.append(f"[{arch}: {', '.join(_describe(name, dist) for name, dist in search.items())}]")
        return ", ".join(parts)


def _describe(name: str, dist: dict) -> str:
    if "choices" in dist:
        return f"{name} {{{', '.join(map(str, dist['choices']))}}}"
    step = f" step {dist['step']}" if "step" in dist else ""
    return f"{name} {dist['low']}..{dist['high']}{' log' if dist.get('log') else ''}{step}"


@dataclass(frozen=True)
class Plan:
    """A spec with one preset applied: what the launcher actually runs."""

    spec: Spec
    preset: str
    fixed: dict               # TrainConfig settings for every trial, subsets included
    search: dict[str, dict]   # ranges after the preset's caps
    enqueue: list[dict]       # first trials, moved inside the capped ranges
    max_resize: int | None
    conditional: dict[str, dict[str, dict]]  # arch -> ranges searched only for that arch

    def config(self, params: dict) -> TrainConfig:
        """The TrainConfig for one trial's sampled params."""
        settings = {**self.fixed, **params}
        arch = get_architecture(settings["arch"])
        resize = settings.get("resize") or arch.default_resize
        if self.max_resize is not None:
            resize = max(arch.min_resize, min(resize, self.max_resize))
        return TrainConfig.from_dict({**settings, "resize": resize})


def available() -> list[str]:
    return sorted(path.stem for path in SPEC_DIR.glob("*.toml"))


def load_spec(name: str) -> Spec:
    """A shipped spec by name, or a user's spec from a path to a .toml file (named after the file)."""
    path = Path(name)
    if name.endswith(".toml"):
        if not path.is_file():
            raise SpecError(f"spec file {path} does not exist")
    else:
        path = SPEC_DIR / f"{name}.toml"
        if not path.is_file():
            raise SpecError(f"unknown study {name!r}; choose one of {', '.join(available())} or give a path to a .toml spec")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as error:
        raise SpecError(f"{path}: {error}") from None
    except (OSError, UnicodeDecodeError) as error:
        raise SpecError(f"cannot read {path}: {error}") from None
    spec = Spec(
        name=path.stem,
        description=str(raw.get("description", "")),
        fixed=raw.get("fixed", {}),
        search=raw.get("search", {}),
        enqueue=raw.get("enqueue", []),
        pruner=raw.get("pruner", {"name": "median"}),
        presets=raw.get("presets", {}),
        path=path,
        conditional=raw.get("conditional", {}),
        sampler=raw.get("sampler", {"name": "tpe"}),
    )
    _validate(spec, set(raw))
    return spec


def _validate(spec: Spec, keys: set[str]) -> None:
    where = str(spec.path)
    unknown = keys - TOP_LEVEL_KEYS
    if unknown:
        raise SpecError(f"{where}: unknown section(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(TOP_LEVEL_KEYS))}")
    for section in ("fixed", "search", "pruner", "sampler", "presets"):
        if not isinstance(getattr(spec, section), dict):
            raise SpecError(f"{where}: [{section}] must be a table")
    for name in [*spec.fixed, *spec.search, *(k for row in spec.enqueue for k in row)]:
        if name not in CONFIG_FIELDS:
            raise SpecError(f"{where}: unknown setting {name!r}; known: {', '.join(sorted(CONFIG_FIELDS))}")
    for name, dist in spec.search.items():
        _check_distribution(where, name, dist)
    _check_conditional(where, spec.conditional, spec.search)
    for preset, caps in spec.presets.items():
        if preset not in PRESETS:
            raise SpecError(f"{where}: unknown preset {preset!r}; presets are {', '.join(PRESETS)}")
        bad = set(caps) - CONFIG_FIELDS - {"max_resize", "search", "conditional"}
        if bad:
            raise SpecError(f"{where}: [presets.{preset}] has unknown setting(s) {', '.join(sorted(bad))}")
        for name, dist in caps.get("search", {}).items():
            if name not in spec.search:
                raise SpecError(f"{where}: [presets.{preset}.search] sets {name!r}, which [search] does not search")
            _check_distribution(where, name, dist)
        _check_conditional(f"{where} [presets.{preset}]", caps.get("conditional", {}), spec.search)
    if spec.pruner.get("name", "median") not in PRUNER_NAMES:
        raise SpecError(f"{where}: pruner {spec.pruner.get('name')!r} is not supported; use {', '.join(PRUNER_NAMES)}")
    if spec.sampler.get("name", "tpe") not in SAMPLER_NAMES:
        raise SpecError(f"{where}: sampler {spec.sampler.get('name')!r} is not supported; use {', '.join(SAMPLER_NAMES)}")
    _check_values(where, spec.fixed, spec.search, spec.enqueue, spec.conditional)
    for preset in spec.presets:
        plan = resolve(spec, preset)
        _check_values(f"{where} [presets.{preset}]", plan.fixed, plan.search, plan.enqueue, plan.conditional)


def _check_conditional(where: str, conditional, search: dict[str, dict]) -> None:
    if not isinstance(conditional, dict):
        raise SpecError(f"{where}: [conditional] must be a table of architectures")
    archs = search.get("arch", {}).get("choices", [])
    for arch, ranges in conditional.items():
        if arch not in archs:
            raise SpecError(f"{where}: [conditional.{arch}] names an architecture that search.arch does not offer")
        for name, dist in ranges.items():
            if name not in CONFIG_FIELDS or name in search:
                raise SpecError(f"{where}: conditional.{arch}.{name} must be a setting that [search] does not already search")
            _check_distribution(where, f"conditional.{arch}.{name}", dist)
            if "choices" in dist:
                raise SpecError(f"{where}: conditional.{arch}.{name} needs a numeric range: Optuna cannot vary a categorical's choices between trials")


def _check_values(where: str, fixed: dict, search: dict[str, dict], enqueue: list[dict], conditional: dict) -> None:
    """Every value a trial can draw must build: check each against every reachable architecture."""
    archs = search.get("arch", {}).get("choices") or [fixed.get("arch", TrainConfig.arch)]
    candidates = [dict(row) for row in enqueue]
    for arch in archs:
        candidates.append({"arch": arch})
        for name, dist in {**search, **conditional.get(arch, {})}.items():
            if name != "arch":
                candidates += [{"arch": arch, name: value} for value in (dist["choices"] if "choices" in dist else [dist["low"], dist["high"]])]
    for candidate in candidates:
        try:
            TrainConfig.from_dict({**fixed, **candidate})
        except (ValueError, TypeError) as error:
            raise SpecError(f"{where}: {error}") from None


def _check_distribution(where: str, name: str, dist) -> None:
    if not isinstance(dist, dict):
        raise SpecError(f"{where}: search.{name} must be a table like {{ low = 1, high = 10 }} or {{ choices = [...] }}")
    if "choices" in dist:
        if set(dist) != {"choices"} or not isinstance(dist["choices"], list) or not dist["choices"]:
            raise SpecError(f"{where}: search.{name} needs a non-empty list `choices` and nothing else")
        return
    if not {"low", "high"} <= set(dist) <= {"low", "high", "log", "step"}:
        raise SpecError(f"{where}: search.{name} needs `low` and `high` (and optionally `log` or `step`)")
    low, high = dist["low"], dist["high"]
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high)) or low > high:
        raise SpecError(f"{where}: search.{name} needs numbers with low <= high; got low={low!r}, high={high!r}")
    if dist.get("log") and low <= 0:
        raise SpecError(f"{where}: search.{name} is on a log scale, so low must be > 0; got {low}")


def _clip(value, dist: dict):
    """Move an enqueued value inside a preset's narrower distribution."""
    if "choices" in dist:
        if value in dist["choices"]:
            return value
        return min(dist["choices"], key=lambda choice: abs(choice - value))
    return type(value)(min(max(value, dist["low"]), dist["high"]))


def resolve(spec: Spec, preset: str) -> Plan:
    """Apply a preset to a spec: its settings replace fixed ones, its ranges replace searched ones."""
    if preset not in PRESETS:
        raise SpecError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    overrides = dict(spec.presets.get(preset, {}))
    conditional = overrides.pop("conditional", spec.conditional)
    replaced = overrides.pop("search", {})
    search = {**spec.search, **replaced}
    max_resize = overrides.pop("max_resize", None)
    # First trials move inside ranges the preset narrowed; elsewhere they run as written (Optuna accepts them).
    # Settings the preset no longer searches are dropped: Optuna would ignore them anyway.
    enqueue = []
    for row in spec.enqueue:
        searched = {**search, **conditional.get(row.get("arch", spec.fixed.get("arch")), {})}
        enqueue.append({name: _clip(value, replaced[name]) if name in replaced else value for name, value in row.items() if name in searched})
    return Plan(spec=spec, preset=preset, fixed={**spec.fixed, **overrides}, search=search, enqueue=enqueue, max_resize=max_resize,
                conditional=conditional)
