"""A search space over config keys, read from YAML, checked before anything runs, sampled through an Optuna trial.

    optim.lr:           {low: 1.0e-3, high: 1.0e-2, log: true}     # a float range (log or linear; step: for a grid)
    model.n_layer:      {low: 2, high: 6}                          # an int range: the key's field is an int
    model.mlp:          {choices: [gelu, swiglu]}                  # a choice
    optim.warmup_steps: {fraction_of: train.max_steps, low: 0.0, high: 0.1}   # a fraction of another key's value
    model.rope_theta:   {low: 1.0e+3, high: 1.0e+5, log: true, when: {model.pos_encoding: rope}}   # conditional

Keys are any `section.key` of the run config (config.check_value refuses unknown ones and names the closest);
each end of a range and each choice is checked against the field's own rules, so a value the config would refuse
is an error here, not a failed trial. A `fraction_of` parameter samples the fraction (its Optuna name is
`key/of`) and sets the key to fraction x the other key's value (rounded for an integer key); a `when` parameter is
sampled only when the earlier choice parameters it names took one of the given values (Optuna's define-by-run
conditional space).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Optional

from lmforge.config import check_value, parse_yaml
from lmforge.errors import ConfigError

SPEC_KEYS = ("low", "high", "log", "step", "choices", "fraction_of", "when")
OWNED_BY_SWEEP = ("train.run_dir", "train.resume", "train.init_from")  # one run directory per trial, fresh


@dataclasses.dataclass(frozen=True)
class Param:
    """One searched key: a range (low, high, log, step; integer when the field is) or choices, maybe a fraction
    of another key (`fraction_of`) and maybe conditional (`when`: {earlier choice key: allowed values})."""

    key: str
    low: Optional[float] = None
    high: Optional[float] = None
    log: bool = False
    step: Optional[float] = None
    integer: bool = False
    choices: Optional[tuple[Any, ...]] = None
    fraction_of: Optional[str] = None
    when: tuple[tuple[str, tuple[Any, ...]], ...] = ()

    @property
    def name(self) -> str:
        """The Optuna parameter name: the key, or key/of for a fraction."""
        return f"{self.key}/{self.fraction_of}" if self.fraction_of else self.key


def read_space(path: str | Path, base: dict[str, Any]) -> tuple[dict[str, Any], list[Param]]:
    """(the file's mapping, its parameters) for the space file `path`, checked against `base` (the run config as
    nested dicts, to_dict of a RunConfig). ConfigError, one line naming the file, for anything wrong."""
    path = Path(path)
    try:
        raw = parse_yaml(path.read_text(encoding="utf-8"), "search space", path)
    except (FileNotFoundError, IsADirectoryError):
        raise ConfigError(f"search space {path} does not exist; pass a YAML file of `section.key: {{low, high}}` "
                          f"or `{{choices: [...]}}`") from None
    except UnicodeDecodeError:
        raise ConfigError(f"search space {path} is not UTF-8 text; save it as UTF-8") from None
    return raw, parse_space(raw, base, f"search space {path}")


def parse_space(raw: Any, base: dict[str, Any], source: str) -> list[Param]:
    """The parameters of a space mapping, in order; ConfigError `source: problem` for anything wrong."""
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f"{source} must map config keys to ranges or choices, e.g. "
                          f"`optim.lr: {{low: 1.0e-3, high: 1.0e-2, log: true}}`")
    params: list[Param] = []
    for key, spec in raw.items():
        try:
            params.append(parse_param(str(key), spec, base, params))
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None
    keys = [p.key for p in params]
    for i, p in enumerate(params):
        if p.fraction_of in keys[i:]:
            raise ConfigError(f"{source}: {p.key} is a fraction of {p.fraction_of}, which is searched below it: "
                              f"move {p.fraction_of} above {p.key}")
    return params


def parse_param(key: str, spec: Any, base: dict[str, Any], earlier: list[Param]) -> Param:
    """One entry of a space file; `earlier` are the parameters above it (what `when` and `fraction_of` may use)."""
    if key in OWNED_BY_SWEEP:
        raise ConfigError(f"{key} is set by the sweep (each trial is a fresh run directory): remove it")
    _, integer = check_value(key, _base_value(base, key))
    if not isinstance(spec, dict):
        raise ConfigError(f"{key}: give a mapping, {{low: A, high: B}} or {{choices: [A, B]}}, not {spec!r}")
    for field in spec:
        if field not in SPEC_KEYS:
            raise ConfigError(f"{key}: unknown setting {field!r}; the settings are "
                              f"{', '.join(SPEC_KEYS)}")
    when = _parse_when(key, spec.get("when"), earlier)
    if "choices" in spec:
        if any(k in spec for k in ("low", "high", "log", "step", "fraction_of")):
            raise ConfigError(f"{key}: give either choices or a range (low, high), not both")
        choices = spec["choices"]
        if not isinstance(choices, list) or not choices:
            raise ConfigError(f"{key}: choices must be a non-empty list, got {choices!r}")
        checked = tuple(_checked(key, c, f"choice {c!r}") for c in choices)
        if len(set(map(repr, checked))) < len(checked):
            raise ConfigError(f"{key}: choices {choices!r} repeat a value; list each once")
        return Param(key, choices=checked, when=when)
    if "low" not in spec or "high" not in spec:
        raise ConfigError(f"{key}: a range needs low and high (or give choices: [...])")
    log, step, of = spec.get("log", False), spec.get("step"), spec.get("fraction_of")
    if not isinstance(log, bool):
        raise ConfigError(f"{key}: log must be true or false, got {log!r}")
    low, high = _number(key, "low", spec["low"]), _number(key, "high", spec["high"])
    if not low < high:
        raise ConfigError(f"{key}: the range [{low:g}, {high:g}] is empty: low must be below high")
    if log and low <= 0:
        raise ConfigError(f"{key}: a log range must lie above 0, but low is {low:g}: raise low or set log: false")
    if step is not None:
        step = _number(key, "step", step)
        if step <= 0 or log:
            raise ConfigError(f"{key}: step must be a positive number and cannot go with log: true")
    if of is not None:  # the range is a fraction; the key's value follows from the other key's
        ref = _reference(key, of, base, earlier)
        for r in ref:
            for f in (low, high):
                _checked(key, _scaled(f, r, integer), f"{f:g} x {of}={r!r}")
        return Param(key, low, high, log, step, False, fraction_of=of, when=when)
    if integer:
        if not (float(low).is_integer() and float(high).is_integer() and (step is None or float(step).is_integer())):
            raise ConfigError(f"{key} is an integer: give whole numbers for low, high and step "
                              f"(or a fraction_of another key)")
        low, high, step = int(low), int(high), int(step) if step is not None else None
    for end in (low, high):
        _checked(key, end, f"range end {end!r}")
    return Param(key, low, high, log, step, integer, when=when)


def sample(trial: Any, params: list[Param], base: dict[str, Any]) -> dict[str, Any]:
    """{key: value} for one Optuna trial (suggest_* in file order, skipping parameters whose `when` fails)."""
    values: dict[str, Any] = {}
    for p in params:
        if any(values.get(k, _base_value(base, k)) not in allowed for k, allowed in p.when):
            continue
        if p.choices is not None:
            values[p.key] = trial.suggest_categorical(p.name, list(p.choices))
        elif p.integer:
            values[p.key] = trial.suggest_int(p.name, p.low, p.high, step=p.step or 1, log=p.log)
        else:
            value = trial.suggest_float(p.name, p.low, p.high, step=p.step, log=p.log)
            if p.fraction_of:
                ref = values.get(p.fraction_of, _base_value(base, p.fraction_of))
                value = _scaled(value, ref, check_value(p.key, _base_value(base, p.key))[1])
            values[p.key] = value
    return values


def apply_values(base: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """A copy of the nested config dict `base` with the sampled {section.key: value} set."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in base.items()}
    for dotted, value in values.items():
        section, key = dotted.split(".", 1)
        out[section] = dict(out.get(section) or {}, **{key: value})
    return out


def _base_value(base: dict[str, Any], dotted: str) -> Any:
    section, _, key = dotted.partition(".")
    return (base.get(section) or {}).get(key)


def _checked(key: str, value: Any, what: str) -> Any:
    try:
        return check_value(key, value)[0]
    except ConfigError as e:
        raise ConfigError(f"{key}: {what} is refused: {e}") from None


def _number(key: str, name: str, value: Any) -> float:
    """A range setting as a number (YAML reads 1e-3 without a dot as text: accept it as config files do)."""
    try:
        number = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number):
        raise ConfigError(f"{key}: {name} must be a finite number, got {value!r}")
    return number


def _scaled(fraction: float, ref: Any, integer: bool) -> float | int:
    value = fraction * ref
    return round(value) if integer else value


def _reference(key: str, of: Any, base: dict[str, Any], earlier: list[Param]) -> tuple[Any, ...]:
    """The values `of` can take in a trial (a range's ends, the choices, or its one base value)."""
    if not isinstance(of, str):
        raise ConfigError(f"{key}: fraction_of names another config key, e.g. train.max_steps, not {of!r}")
    value, _ = check_value(of, _base_value(base, of))
    for p in earlier:
        if p.key == of:
            if p.fraction_of:
                raise ConfigError(f"{key}: fraction_of {of}, itself a fraction: make it a fraction of a plain key")
            return p.choices if p.choices is not None else (p.low, p.high)
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ConfigError(f"{key}: fraction_of {of}, whose value {value!r} is not a number")
    return (value,)


def _parse_when(key: str, when: Any, earlier: list[Param]) -> tuple[tuple[str, tuple[Any, ...]], ...]:
    if when is None:
        return ()
    if not isinstance(when, dict) or not when:
        raise ConfigError(f"{key}: when maps earlier choice keys to their values, e.g. {{model.pos_encoding: rope}}")
    choices = {p.key: p.choices for p in earlier if p.choices is not None}
    out = []
    for other, allowed in when.items():
        if other not in choices:
            raise ConfigError(f"{key}: when names {other}, which is not a choice parameter above it in the space; "
                              f"move it below that parameter or search {other} by choices")
        allowed = tuple(allowed) if isinstance(allowed, list) else (allowed,)
        checked = tuple(_checked(other, a, f"when value {a!r}") for a in allowed)
        missing = [a for a in checked if a not in choices[other]]
        if missing:
            raise ConfigError(f"{key}: when {other} is {missing[0]!r}, which is not one of its choices "
                              f"{list(choices[other])}")
        out.append((other, checked))
    return tuple(out)
