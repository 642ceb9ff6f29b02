"""A trial read back from the study database is data: before a worker resumes a RUNNING trial, its parameters
must be exactly what this worker's search space can propose (the same names; each value of the distribution's
type, inside its range and step, or one of its choices) and its run directory the one its number gives.
Anything else (a `_target_` string, an out-of-range value, an extra key, another folder) fails the trial with the
reason; it is never turned into command-line overrides."""
from __future__ import annotations

import math
from typing import Any, Optional

from optuna import distributions as od

from sweeps.space import FLOATS, INTS, step_of


def _same_choice(value: Any, choice: Any) -> bool:
    return type(value) is type(choice) and value == choice


def value_problem(name: str, value: Any, distribution: od.BaseDistribution) -> Optional[str]:
    """Why `value` is not something `distribution` proposes, or None."""
    if isinstance(distribution, od.CategoricalDistribution):
        if any(_same_choice(value, choice) for choice in distribution.choices):
            return None
        return f"{name}={value!r} is not one of its choices {list(distribution.choices)}"
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(distribution, INTS):
        if not isinstance(value, int) or isinstance(value, bool):
            return f"{name}={value!r} is not an integer"
    elif isinstance(distribution, FLOATS):
        if not number or not math.isfinite(value):
            return f"{name}={value!r} is not a finite number"
    else:
        return f"{name}: distribution {type(distribution).__name__} is not one the suite's search spaces use"
    if not distribution.low <= value <= distribution.high:
        return f"{name}={value!r} is outside [{distribution.low}, {distribution.high}]"
    step = step_of(distribution)
    if step and abs(round((value - distribution.low) / step) * step - (value - distribution.low)) > 1e-8 * step:
        return f"{name}={value!r} is not on the grid {distribution.low} + k * {step}"
    return None


def resume_problem(params: dict, space: dict[str, od.BaseDistribution], run_dir: Any,
                   expected_run_dir: str) -> Optional[str]:
    """Why a stored RUNNING trial must not be resumed, or None when it is one this worker could have proposed."""
    extra, missing = sorted(set(params) - set(space)), sorted(set(space) - set(params))
    if extra or missing:
        return (f"its parameters {sorted(params)} are not the search space's {sorted(space)} (extra {extra}, "
                f"missing {missing})")
    for name, distribution in space.items():
        problem = value_problem(name, params[name], distribution)
        if problem is not None:
            return problem
    if run_dir != expected_run_dir:
        return f"its run_dir {run_dir!r} is not {expected_run_dir!r}, the directory of its trial number"
    return None
