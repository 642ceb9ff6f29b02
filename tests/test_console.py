"""What a person reads: one short line per epoch, a summary block, run.log holding the same, no colour codes;
bad modes and another task's config options refused right after composition."""
import re
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir

from common.runs.choices import ChoiceError, check_choices, task_options
from common.tracking.console import HEADLINE_METRICS, epoch_line, results_block, summary_block
from tests.cli import REPO, TOY, run_cli

ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def test_epoch_line_holds_epoch_loss_monitor_best_and_seconds():
    record = {"epoch": 3, "train/loss": 0.41234, "val/f1": 0.81234, "val/iou": 0.7, "epoch_seconds": 12.34,
              **{f"val/set{i}/f1": 0.5 for i in range(60)}}
    line = epoch_line(record, 16, "f1", 0.81234, 3)
    assert line == "[epoch 3/16] loss 0.4123 | val/f1 0.8123 | best 0.8123 @ 3 | 12.3 s"


def test_summary_block_names_run_dir_best_files_and_commands(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "best.pt").write_bytes(b"x")
    (tmp_path / "metrics.json").write_text("{}")
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "config.yaml").write_text("")
    block = summary_block(tmp_path, "val/f1", 0.5, 2, 4, ["cmd-eval", "cmd-predict"])
    assert f"run dir   {tmp_path}" in block
    assert "val/f1 = 0.5000 at epoch 2 (4 epochs run)" in block
    assert "checkpoints/best.pt, metrics.json" in block and ".hydra" not in block
    assert "evaluate  cmd-eval" in block and "predict   cmd-predict" in block


def test_results_block_puts_the_monitored_metric_first_and_keeps_lines_short(tmp_path):
    """eval / cv / predict end like train: run dir, rows, a short table of the headline numbers, files."""
    (tmp_path / "metrics.json").write_text("{}")
    metrics = {f"eval/set{i}/f1": 0.25 for i in range(40)} | {"eval/Binary/F1": 0.875, "eval/note": "text"}
    block = results_block(tmp_path, metrics, "Binary/F1", [("checkpoint", "best.pt")])
    lines = block.splitlines()
    assert lines[1] == f"run dir     {tmp_path}" and lines[2] == "checkpoint  best.pt"
    assert lines[3].split() == ["metrics", "eval/Binary/F1", "0.8750"]
    assert sum("eval/set" in line for line in lines) == HEADLINE_METRICS - 1
    assert "(all 42 values in metrics.json)" in block and "files       metrics.json" in block
    assert max(len(line) for line in lines) <= 100


@pytest.mark.slow
def test_training_console_and_run_log(tmp_path):
    proc = run_cli([*TOY], tmp_path / "run", tmp_path / "cache")
    lines = proc.stdout.splitlines()
    epochs = [line for line in lines if line.startswith("[epoch ")]
    assert len(epochs) == 2 and all(len(line) < 100 for line in epochs)
    assert re.fullmatch(r"\[epoch 1/2\] loss [0-9.]+ \| val/neg_mse -?[0-9.]+ \| best -?[0-9.]+ @ [01] \| [0-9.]+ s",
                        epochs[1])
    assert f"run dir   {tmp_path / 'run'}" in proc.stdout
    assert f"mode=eval ckpt_path={tmp_path / 'run' / 'checkpoints' / 'best.pt'}" in proc.stdout
    assert not ANSI.search(proc.stdout + proc.stderr)
    log = (tmp_path / "run" / "run.log").read_text()
    assert all(line in log for line in epochs) and "run dir" in log


def _compose(overrides):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=overrides, return_hydra_config=False)


def _choices(overrides):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides, return_hydra_config=True)
    return cfg, dict(cfg.hydra.runtime.choices)


def test_check_choices_refuses_another_tasks_model_and_lists_valid_ones():
    cfg, choices = _choices(["task=sclera", "+model/biomass=fpn"])      # appended, as Hydra's error suggests
    assert choices["model/biomass"] == "fpn" and choices["model/sclera"] == "cgdseg_tiny"
    with pytest.raises(ChoiceError, match="model/biomass=fpn belongs to another task than task=sclera") as err:
        check_choices(cfg, choices)
    assert all(option in str(err.value) for option in task_options("model", "sclera"))
    assert "model/sclera=cgdseg_tiny" in task_options("model", "sclera")
    cfg, choices = _choices(["task=sclera", "+model=biomass/fpn"])      # the group itself, the form before 1.4
    with pytest.raises(ChoiceError, match="model=biomass/fpn belongs to another task than task=sclera"):
        check_choices(cfg, choices)
    cfg, choices = _choices(["task=sclera", "model/sclera=cgdseg"])      # the task's own: accepted
    check_choices(cfg, choices)


@pytest.mark.parametrize("args, expected", [
    (["mode=trian"], "mode=trian: expected one of train, eval, predict, cv, synth"),
    (["task=sclera", "+model/biomass=fpn"], "model/biomass=fpn belongs to another task than task=sclera"),
    (["task=sclera", "model/biomass=fpn"], "Could not override 'model/biomass'. No match in the defaults list."),
    (["task=sclera", "peft=lora", "peft.r=eight"], "error: peft.r: Value 'eight'"),            # a schema's type
    (["task=sclera", "+backbone.layr=3"], "error: backbone.layr: Key 'layr' not in 'BackboneSchema'"),   # a typo
])
def test_run_py_refuses_bad_choices_before_importing_the_suite(tmp_path, args, expected):
    """Refused before Hydra creates the run folder (common.runs.choices.CheckBeforeRun): nothing is left behind."""
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(REPO / "run.py"), *args, f"hydra.run.dir={run_dir}"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and expected in proc.stderr
    assert "Traceback" not in proc.stderr and not run_dir.exists()


def _help(*overrides: str) -> str:
    proc = subprocess.run([sys.executable, str(REPO / "run.py"), "--help", *overrides], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_help_lists_every_config_group_without_private_options():
    """`--help` lists Hydra's own group list ($APP_CONFIG_GROUPS, the reference) minus the options whose file name
    starts with `_` (model/biomass/_common, sweeps/_base), which are composed by other options, never chosen."""
    shown = _help()
    groups_part = shown.split("== Configuration groups ==", 1)[1].split("== Config ==", 1)[0]
    listed = dict(line.split(": ", 1) for line in groups_part.splitlines() if ": " in line)
    hydra_groups = dict(line.split(": ", 1) for line in _help("hydra.help.template='$APP_CONFIG_GROUPS'")
                        .splitlines() if ": " in line)
    assert "_common" in hydra_groups["model/biomass"] and "_base" in hydra_groups["sweeps"]   # what Hydra shows
    reference = {group: ", ".join(o for o in options.split(", ") if not o.startswith("_"))
                 for group, options in hydra_groups.items()}
    assert listed == {group: options for group, options in reference.items() if options}
    assert not [o for options in listed.values() for o in options.split(", ") if o.startswith("_")]
    assert "sweeps" in listed and "mode: train" in shown and shown.startswith("vfm-suite: ")
