"""The shared config sections against their schemas (common/runs/config_schema.py), checked right after composition."""
from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from common.runs.config_schema import SchemaError, check_schema
from tests.cli import REPO

PRESETS = sorted(p.stem for p in (REPO / "conf" / "experiment").glob("*.yaml"))


def _compose(overrides: list[str], searchpath: Path | None = None):
    extra = [f"hydra.searchpath=[file://{searchpath}]"] if searchpath else []
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        return compose("config", ["paths.output_dir=/tmp/out", *extra, *overrides])


@pytest.mark.parametrize("overrides", [[f"task={t}", f"logger={lg}"] for t in ("biomass", "sclera", "roadwork")
                                       for lg in ("none", "wandb")]
                         + [[f"experiment={p}", "adapt.split=adapt"] for p in PRESETS]
                         + [[f"backbone={p.stem}", f"peft={peft}"] for p in sorted((REPO / "conf" / "backbone")
                                                                                    .glob("*.yaml"))
                            for peft in ("none", "lora", "dora")])
def test_every_shipped_option_matches_the_schema(overrides):
    check_schema(_compose(overrides))


@pytest.mark.parametrize("yaml_text, expected", [
    ("source: timm\nname: vit_small_patch14_dinov2\nweights: null\nlayer: [1]\nlr: 1.0e-5\n",
     "backbone.layer: Key 'layer' not in 'BackboneSchema'"),                          # a misspelt key
    ("source: timm\nname: vit_small_patch14_dinov2\nweights: null\nlr: 1.0e-5\n", "missing backbone.layers"),
    ("source: timm\nname: vit_small_patch14_dinov2\nweights: null\nlayers: last\nlr: 1.0e-5\n", "backbone.layers: "),
])
def test_a_new_backbone_option_is_checked(tmp_path, yaml_text, expected):
    (tmp_path / "backbone").mkdir()
    (tmp_path / "backbone" / "mine.yaml").write_text(yaml_text)
    with pytest.raises(SchemaError, match=expected):
        check_schema(_compose(["task=sclera", "backbone=mine"], searchpath=tmp_path))


def test_a_value_of_the_wrong_type_names_its_key():
    with pytest.raises(SchemaError, match=r"^peft.r: "):
        check_schema(_compose(["task=sclera", "peft=lora", "peft.r=eight"]))
    check_schema(_compose(["task=sclera", "peft=lora", "peft.r=16"]))


def test_run_py_refuses_a_bad_section_before_anything_runs(tmp_path):
    from tests.cli import run_cli
    proc = run_cli(["task=sclera", "peft=lora", "peft.r=eight"], tmp_path / "run", tmp_path / "cache", check=False)
    assert proc.returncode == 1 and "error: peft.r: " in proc.stderr
    assert not (tmp_path / "run").exists()            # refused before Hydra creates the run folder


def test_a_logger_option_names_its_tracker_class_and_may_add_its_arguments():
    """The logger section is open (a tracker class's own arguments; common.tracking.tracker.make_tracker checks them
    against its constructor) but `_target_` and `_partial_` are required, and the shared keys typed."""
    check_schema(_compose(["task=sclera", "logger=none", "+logger.label=mine"]))
    with pytest.raises(SchemaError, match=r"missing logger\._target_"):
        check_schema(_compose(["task=sclera", "logger=none", "~logger._target_"]))
    with pytest.raises(SchemaError, match=r"^logger\.artifacts: "):
        check_schema(_compose(["task=sclera", "logger=wandb", "logger.artifacts=maybe"]))
