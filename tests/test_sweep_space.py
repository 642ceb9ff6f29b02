"""sweeps.space (Hydra's public override parser + the suite's mapping to Optuna distributions) gives exactly what
hydra-optuna-sweeper's private create_params_from_overrides gave, on every search space of sweeps/ and on each kind
of sweep, whichever dependency line is installed (1.3.0 + optuna 2.10, or 1.4.0rc3 + optuna 5)."""
from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from hydra_plugins.hydra_optuna_sweeper._impl import create_params_from_overrides  # the reference, tests only
from omegaconf import OmegaConf

from common.utils.hydra_lines import HYDRA_WHITELIST
from sweeps.space import as_overrides, search_space, step_of

SWEEPS = Path(__file__).resolve().parents[1] / "sweeps"
SPACES = sorted(p for p in SWEEPS.glob("*.yaml") if not p.stem.startswith("_"))
KINDS = ["a=choice(1, 2.5, x, true, [1,2])", "d=interval(1, 8)",
         "e=interval(0.0, 0.4)", "f=tag(log, interval(1e-4, 1e-2))", "g=tag(log, interval(2, 64))",
         "h=shuffle(range(1, 4))", "i=fixed_value", "j=[1,2]"]


def _params(path: Path) -> list[str]:
    params = OmegaConf.load(path).hydra.sweeper.params
    return [f"{k}={v}" for k, v in params.items()]


def _reference(arguments: list[str]):
    distributions, fixed, *_ = create_params_from_overrides(arguments)
    return distributions, fixed


def test_every_search_space_of_sweeps_is_found():
    assert len(SPACES) == 8 and all(_params(p) for p in SPACES)


@pytest.mark.parametrize("path", SPACES, ids=lambda p: p.stem)
def test_search_spaces_equal_the_sweepers_own(path):
    distributions, fixed = _reference(_params(path))
    space = search_space(_params(path))
    assert space.distributions == distributions and space.fixed == fixed and space.deletions == []
    assert all(isinstance(d, optuna.distributions.BaseDistribution) for d in space.distributions.values())


@pytest.mark.parametrize("argument", KINDS)
def test_each_kind_of_sweep_equals_the_sweepers_own(argument):
    distributions, fixed = _reference([argument])
    space = search_space([argument])
    if argument.startswith("h=shuffle"):   # choices in a random order
        distributions["h"] = optuna.distributions.CategoricalDistribution(sorted(distributions["h"].choices))
        space.distributions["h"] = optuna.distributions.CategoricalDistribution(sorted(space.distributions["h"].choices))
    assert (space.distributions, space.fixed) == (distributions, fixed)
    assert type(next(iter({**space.distributions, **space.fixed}.values()))) is \
        type(next(iter({**distributions, **fixed}.values())))


def test_a_range_spans_the_values_hydra_lists():
    ranges = ["b=range(1, 9, 2)", "c=range(0.5, 2.5, 0.5)", "n=range(5, 0, -2)"]
    space = search_space(ranges)
    assert [(d.low, d.high, step_of(d)) for d in space.distributions.values()] == \
        [(1, 7, 2), (0.5, 2.0, 0.5), (1, 5, 2)]
    reference, _ = _reference(ranges[:2])
    # hydra-optuna-sweeper 1.4 agrees; 1.3 took `stop` as Optuna's inclusive high, a value the range never lists
    assert (reference["b"].high, reference["c"].high) == ((7, 2.0) if HYDRA_WHITELIST else (9, 2.5))
    with pytest.raises(ValueError, match=r"e=range\(3, 3\): the range holds no value"):
        search_space(["e=range(3, 3)"])


def test_steps_and_deletions():
    space = search_space(["b=range(1, 9, 2)", "c=range(0.5, 2.5, 0.5)", "e=interval(0.0, 0.4)", "~model.head.x",
                          "k=3"])
    assert [step_of(space.distributions[k]) for k in "bce"] == [2, 0.5, None]
    assert space.deletions == ["~model.head.x"]
    assert as_overrides({"b": 3}, space) == ["b=3", "k=3", "~model.head.x"]


def test_a_command_line_value_replaces_the_configs_sweep():
    space = search_space(["model.head.hidden=choice(128, 256)", "model.head.hidden=256"])
    assert space.distributions == {} and space.fixed == {"model.head.hidden": "256"}

