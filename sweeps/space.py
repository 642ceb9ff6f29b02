"""A sweep's search space from its overrides (`hydra.sweeper.params` and the command line), through Hydra's public
override parser, as Optuna distributions; the same distributions on both dependency lines (optuna 2.10 names them
UniformDistribution, IntUniformDistribution, ...; optuna >= 3 FloatDistribution and IntDistribution).

    choice(a, b, ...)                      categorical
    range(start, stop[, step])             int (float if any bound or the step is a float) with that step, from
                                           the first to the last value Hydra's range lists (stop excluded);
                                           shuffle(range(...)): categorical
    interval(low, high)                    uniform, int if both bounds are ints
    tag(log, interval(low, high))          log-uniform
    key=value                              fixed: passed to every trial as it is
    ~key / ~key=value                      deleted in every trial

These are the rules of hydra-optuna-sweeper's create_params_from_overrides (a private function the suite no longer
imports) in 1.4.0rc3; 1.3.0 differs only in range(), whose `stop` it took as Optuna's (inclusive) high, and in
`~key`, which it did not handle. tests/test_sweep_space.py compares with it on every search space of sweeps/.
"""
from __future__ import annotations

from typing import Any, NamedTuple

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override, Transformer
from optuna import distributions as od

MODERN = hasattr(od, "FloatDistribution")  # optuna >= 3
INTS = (od.IntDistribution,) if MODERN else (od.IntUniformDistribution, od.IntLogUniformDistribution)
FLOATS = (od.FloatDistribution,) if MODERN else (od.UniformDistribution, od.LogUniformDistribution,
                                                 od.DiscreteUniformDistribution)


class SearchSpace(NamedTuple):
    distributions: dict[str, od.BaseDistribution]
    fixed: dict[str, str]
    deletions: list[str]          # `~key` overrides, as given


def float_distribution(low: float, high: float, log: bool = False, step: float | None = None):
    if MODERN:
        return od.FloatDistribution(low, high, log=log, step=step)
    if log:
        return od.LogUniformDistribution(low, high)
    return od.UniformDistribution(low, high) if step is None else od.DiscreteUniformDistribution(low, high, step)


def int_distribution(low: int, high: int, log: bool = False, step: int = 1):
    if MODERN:
        return od.IntDistribution(low, high, log=log, step=step)
    return od.IntLogUniformDistribution(low, high) if log else od.IntUniformDistribution(low, high, step=step)


def step_of(distribution: od.BaseDistribution) -> float | int | None:
    """The grid step of a numeric distribution (None: continuous)."""
    return getattr(distribution, "step", None) or getattr(distribution, "q", None)


def _choices(override: Override) -> od.CategoricalDistribution:
    return od.CategoricalDistribution(list(override.sweep_iterator(transformer=Transformer.encode)))


def distribution(override: Override) -> od.BaseDistribution:
    """The Optuna distribution of one sweep override (choice, range or interval)."""
    value = override.value()
    if override.is_choice_sweep() or (override.is_range_sweep() and value.shuffle):
        return _choices(override)
    if override.is_range_sweep():
        values = list(override.sweep_iterator())
        if not values:
            raise ValueError(f"{override.input_line}: the range holds no value")
        if all(isinstance(v, int) for v in values):
            return int_distribution(min(values), max(values), step=abs(int(value.step)))
        return float_distribution(float(min(values)), float(max(values)), step=abs(float(value.step)))
    if override.is_interval_sweep():
        ints = isinstance(value.start, int) and isinstance(value.end, int)
        log = "log" in value.tags
        if ints:
            return int_distribution(int(value.start), int(value.end), log=log)
        return float_distribution(value.start, value.end, log=log)
    raise ValueError(f"{override.input_line}: not a sweep Optuna can sample (choice, range or interval expected)")


def search_space(arguments: list[str]) -> SearchSpace:
    """Sweeps, fixed values and deletions of `arguments` (key=value strings); a key given twice keeps the last."""
    space = SearchSpace({}, {}, [])
    for override in OverridesParser.create().parse_overrides(arguments):
        key = override.get_key_element()
        space.distributions.pop(key, None)
        space.fixed.pop(key, None)
        if override.is_delete():
            space.deletions.append(override.input_line)
        elif override.is_sweep_override():
            space.distributions[key] = distribution(override)
        else:
            space.fixed[key] = override.get_value_element_as_str()
    return space


def as_overrides(params: dict[str, Any], space: SearchSpace) -> list[str]:
    """A trial's command-line overrides: its sampled parameters, the fixed values and the deletions."""
    return [f"{name}={value}" for name, value in {**params, **space.fixed}.items()] + space.deletions
