"""common.models.option_groups: the flat keys of a model's yaml (as checkpoints store them) -> the small option groups its
constructor takes (RoadworkModel, CGDSeg)."""
import dataclasses
import inspect
from dataclasses import dataclass
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from common.models.option_groups import group_options, instantiate_grouped
from roadwork import model as roadwork_model
from sclera import model as sclera_model

CONF = Path(__file__).resolve().parents[1] / "conf" / "model"


@dataclass(frozen=True)
class First:
    x: int
    y: int = 2


@dataclass(frozen=True)
class Second:
    z: str


def test_each_option_goes_to_the_group_with_its_field():
    assert group_options({"x": 1, "z": "a"}, {"a": First, "b": Second}, "m") == {"a": First(1), "b": Second("a")}


def test_unknown_missing_or_doubly_grouped_options_are_errors():
    groups = {"a": First, "b": Second}
    with pytest.raises(TypeError, match=r"m: unknown option\(s\) \['w'\]"):
        group_options({"x": 1, "z": "a", "w": 0}, groups, "m")
    with pytest.raises(TypeError, match="'z'"):
        group_options({"x": 1}, groups, "m")
    with pytest.raises(TypeError, match="option 'x' is in groups 'a' and 'c'"):
        group_options({"x": 1, "z": "a"}, {**groups, "c": First}, "m")


@pytest.mark.parametrize("yaml,module,cls,inputs", [
    ("roadwork/gated.yaml", roadwork_model, roadwork_model.RoadworkModel, roadwork_model.ModelInputs),
    ("sclera/cgdseg.yaml", sclera_model, sclera_model.CGDSeg, None)])
def test_every_yaml_key_has_one_group_and_constructors_stay_short(yaml, module, cls, inputs):
    keys = set(OmegaConf.load(CONF / yaml)) - {"_target_", "defaults"}
    fields = {f.name for group in module.OPTION_GROUPS.values() for f in dataclasses.fields(group)}
    data_derived = {f.name for f in dataclasses.fields(inputs)} if inputs else set()
    assert keys <= fields and fields - keys == data_derived          # the rest the task derives from data.*
    assert len(inspect.signature(cls).parameters) <= 10
    assert all(len(dataclasses.fields(group)) <= 10 for group in module.OPTION_GROUPS.values())


def test_a_target_that_is_not_the_model_class_is_refused():
    with pytest.raises(ValueError, match=r"_target_='roadwork.model.TokenMlpPool': expected roadwork.model.RoadworkModel"):
        instantiate_grouped({"_target_": "roadwork.model.TokenMlpPool", "in_dim": 4}, roadwork_model.RoadworkModel)
