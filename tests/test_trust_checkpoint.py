"""A checkpoint cannot run code: its config is checked before eval / predict build anything from it."""
import copy

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from common.inference.checkpoint_config import UntrustedCheckpoint, check_checkpoint_config
from common.inference.predictor import load_for_inference
from common.training.checkpoint import FORMAT_VERSION
from tests.cli import REPO, run_cli

SECTIONS = ("backbone", "peft", "model", "task", "adapt", "data")


def _cfg(tmp_path, overrides):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=[f"paths.root_dir={tmp_path}",
                                                        f"paths.output_dir={tmp_path / 'run'}", *overrides])


def _payload(victim):
    """The issue's exploit: instantiate() would call Path(victim).write_text(<python code>)."""
    return {"_target_": "pathlib.Path.write_text",
            "_args_": [{"_target_": "pathlib.Path", "_args_": [str(victim)]}, "import os; os.system('id')"]}


def _checkpoint(tmp_path, cfg, edit):
    config = OmegaConf.to_container(cfg, resolve=True)
    edit(config)
    path = tmp_path / "crafted.pt"
    torch.save({"format": FORMAT_VERSION, "task": str(cfg.task.name), "config": config, "model": {},
                "stats": {}, "ema": None}, path)
    return path


def _set(dotted, value):
    def edit(config):
        *parents, last = dotted.split(".")
        node = config
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        node[int(last) if isinstance(node, list) else last] = value
    return edit


def test_issue_exploit_is_refused_and_writes_nothing(tmp_path):
    victim = tmp_path / "site-packages" / "x.pth"
    victim.parent.mkdir()
    cfg = _cfg(tmp_path, ["task=biomass"])
    path = _checkpoint(tmp_path, cfg, _set("model.payload", _payload(victim)))
    with pytest.raises(UntrustedCheckpoint, match=r"unknown key model\.payload"):
        load_for_inference(cfg, path)
    assert not victim.exists()


EXPLOIT = "<the issue's exploit>"
VARIANTS = [  # (task, key set to the exploit or to a value, expected message)
    ("biomass", "backbone.payload", EXPLOIT, r"unknown key backbone\.payload"),
    ("biomass", "peft.payload", EXPLOIT, r"unknown key peft\.payload"),
    ("biomass", "task.payload", EXPLOIT, r"unknown key task\.payload"),
    ("biomass", "adapt.payload", EXPLOIT, r"unknown key adapt\.payload"),
    ("biomass", "data.payload", EXPLOIT, r"unknown key data\.payload"),
    ("biomass", "model.head", EXPLOIT, r"model\.head\._target_='pathlib\.Path\.write_text' is not a target this suite configures at model\.head"),
    ("biomass", "model.views", EXPLOIT, r"model\.views\._target_=.*nested _target_ is not expected at model\.views"),
    ("biomass", "model.aux.0", EXPLOIT, r"nested _target_ is not expected at model\.aux\[0\]"),
    ("biomass", "backbone.name", EXPLOIT, r"nested _target_ is not expected at backbone\.name"),
    ("biomass", "task._target_", "pathlib.Path.write_text", r"task class comes from task="),
    ("biomass", "model.head._target_", "common.utils.atomic.atomic_write_text", r"not a target this suite configures"),
    ("biomass", "model.head._target_", "common.runs.app.Path", r"not a target this suite configures"),
    ("biomass", "model.head._target_", "common.data.image_cache.ImageCache", r"not a target this suite"),
    ("biomass", "backbone.name", "${oc.env:HOME}", r"backbone\.name=.*holds an interpolation"),
    ("biomass", "model.head._target_", None, r"model\.head\._target_=None is not a target"),
    ("roadwork", "data.augment.0", EXPLOIT, r"data\.augment\[0\]\._target_='pathlib\.Path\.write_text'"),
    ("roadwork", "data.augment.5.transforms.1", EXPLOIT, r"data\.augment\[5\]\.transforms\[1\]\._target_="),
    ("biomass", "data.augment.0.transforms.3", EXPLOIT, r"data\.augment\[0\]\.transforms\[3\]\._target_="),
    ("sclera", "data.augment.7.transforms.0", EXPLOIT, r"data\.augment\[7\]\.transforms\[0\]\._target_="),
    ("sclera", "model.payload", EXPLOIT, r"unknown key model\.payload"),
    ("sclera", "model.grounding", EXPLOIT, r"nested _target_ is not expected at model\.grounding"),
    ("roadwork", "model._target_", "roadwork.model.Tensor", r"model\._target_='roadwork\.model\.Tensor' is not a target"),
]


@pytest.mark.parametrize("task,key,value,message", VARIANTS)
def test_every_copied_section_is_checked(tmp_path, task, key, value, message):
    victim = tmp_path / "victim.py"
    cfg = _cfg(tmp_path, [f"task={task}"])
    path = _checkpoint(tmp_path, cfg, _set(key, _payload(victim) if value == EXPLOIT else value))
    with pytest.raises(UntrustedCheckpoint, match=message):
        load_for_inference(cfg, path)
    assert not victim.exists()


def test_allowed_class_with_a_smuggled_argument_is_refused(tmp_path):
    """Another head class of the suite is fine, but its arguments are checked against its signature."""
    cfg = _cfg(tmp_path, ["task=biomass"])
    config = OmegaConf.to_container(cfg, resolve=True)
    config["model"]["head"] = {"_target_": "biomass.heads_pool.LayerFusion", "_partial_": True,
                               "head": _payload(tmp_path / "victim.py")}
    with pytest.raises(UntrustedCheckpoint, match=r"model\.head\.head\._target_='pathlib"):
        check_checkpoint_config(config, OmegaConf.to_container(cfg, resolve=True), SECTIONS, "x.pt")
    config["model"]["head"] = {"_target_": "biomass.heads.PooledMLP", "_partial_": True, "payload": 1}
    with pytest.raises(UntrustedCheckpoint, match=r"unknown key model\.head\.payload"):
        check_checkpoint_config(config, OmegaConf.to_container(cfg, resolve=True), SECTIONS, "x.pt")


@pytest.mark.parametrize("trained,current", [
    (["task=biomass", "model/biomass=fusion"], ["task=biomass"]),
    (["experiment=biomass_csiro_vitdet"], ["task=biomass"]),
    (["task=biomass", "model/biomass=dpt", "peft=dora"], ["task=biomass"]),
    (["experiment=roadwork_adapt"], ["task=roadwork"]),
    (["experiment=sclera_cgdseg_mixed"], ["task=sclera"]),
])
def test_checkpoints_of_other_presets_are_accepted(tmp_path, trained, current):
    """What the suite itself writes (other model options, presets) still loads into a plain task= run."""
    written = OmegaConf.to_container(_cfg(tmp_path, trained), resolve=True)
    check_checkpoint_config(copy.deepcopy(written), OmegaConf.to_container(_cfg(tmp_path, current), resolve=True),
                            SECTIONS, "ok.pt")


@pytest.mark.slow
def test_cli_eval_of_crafted_checkpoint_fails_and_writes_nothing(tmp_path):
    victim = tmp_path / "victim.pth"
    cfg = _cfg(tmp_path, ["task=biomass"])
    path = _checkpoint(tmp_path, cfg, _set("model.payload", _payload(victim)))
    proc = run_cli(["task=biomass", "mode=eval", f"ckpt_path={path}", f"data.root={tmp_path}"],
                   tmp_path / "eval", tmp_path / "cache", check=False)
    assert proc.returncode != 0 and "unknown key model.payload" in proc.stderr
    assert not victim.exists()
