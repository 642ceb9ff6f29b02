"""wandb for comparisons: run names, groups, tags, Hydra choices, metric axes and best summaries, the config of
eval runs, scores and artifacts; a recorder stands in for wandb, and one test runs the real wandb offline."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf, open_dict

from common.tracking.run_info import RunInfo, run_info, short_name
from common.tracking.tracker import Tracker, logged_config, make_tracker
from tests import fake_wandb
from tests.cli import REPO, TOY, run_cli
from tests.test_roadwork_e2e import SMALL


def _compose(overrides, tmp_path):
    """The job config and Hydra's runtime config as Hydra sets them for a run (choices, overrides, mode)."""
    from sweeps.workers import register_resolvers
    register_resolvers()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", return_hydra_config=True,
                      overrides=[*overrides, f"paths.log_dir={tmp_path / 'logs'}",
                                 f"paths.cache_dir={tmp_path / 'cache'}", f"paths.output_dir={tmp_path / 'run'}"])
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


def test_short_name_drops_paths_and_rounds_floats():
    overrides = ["task=sclera", "peft=lora", "peft.lr=0.00012345678901234", "data.root=/data/ssbc",
                 "ckpt_path=logs/x/checkpoints/best.pt", "hydra.run.dir=/tmp/r", "+trainer.grad_clip=1.5",
                 "backbone.weights=~/w.pth", "model/sclera=cgdseg", "loss.weights=[0.333333333,2]",
                 "trainer.max_epochs=70", "peft.dropout=1e-05"]
    assert short_name(overrides) == ("task=sclera,peft=lora,peft.lr=0.0001235,trainer.grad_clip=1.5,"
                                     "model/sclera=cgdseg,loss.weights=[0.3333,2],trainer.max_epochs=70,"
                                     "peft.dropout=1e-05")


def test_tags_choices_and_group_of_an_experiment(tmp_path):
    cfg = _compose(["experiment=sclera_cgdseg_synthetic", "tags=[mine]", "seed=3"], tmp_path)
    info = run_info(cfg)
    assert info.tags == ["task:sclera", "mode:train", "experiment:sclera_cgdseg_synthetic", "mine"]
    assert info.group == "sclera_cgdseg_synthetic" and info.name == "experiment=sclera_cgdseg_synthetic,seed=3"
    assert info.choices["experiment"] == "sclera_cgdseg_synthetic" and info.choices["peft"] == "lora"
    assert "hydra/output" not in info.choices and info.choices["hydra/sweeper"] == "basic"


def test_grid_jobs_are_grouped_per_multirun_directory(tmp_path):
    cfg = _compose([*TOY, "hydra.mode=MULTIRUN", "hydra.sweep.dir=/somewhere/2026-01-02_03-04-05", "seed=1"],
                   tmp_path)
    info = run_info(cfg)
    assert info.group == "multirun-2026-01-02_03-04-05"
    assert info.name == "task=toy,seed=1"


def test_sweep_job_is_named_after_its_optuna_trial(tmp_path):
    # sweeps/shared_study.py launches Optuna trial n as hydra.job.num = n (test_sweeps checks the trial-<n> dirs)
    cfg = _compose([*TOY, "sweeps=toy_lr", "hydra.mode=MULTIRUN", "hydra.job.num=7", "trainer.optim.lr=0.0012345"],
                   tmp_path)
    info = run_info(cfg)
    assert info.name == "trial-7 trainer.optim.lr=0.001234"
    assert info.group == "sweep-toy_lr" and "sweeps:toy_lr" in info.tags


def _tracker(monkeypatch, tmp_path, overrides=()):
    """The tracker of the composed logger=wandb option, wandb replaced by the recorder."""
    fake_wandb.install(monkeypatch)
    from common.tracking.wandb_tracker import WandbTracker
    cfg = _compose([*TOY, "logger=wandb", *overrides], tmp_path)
    tracker = make_tracker(cfg, tmp_path / "run", is_main=True)
    assert type(tracker) is WandbTracker
    return tracker, cfg


def test_wandb_option_instantiates_wandb_tracker_with_exactly_its_keys(monkeypatch, tmp_path):
    """Every key of conf/logger/wandb.yaml but the run's description is an argument of WandbTracker, and every
    argument is a key or a run-time value; the run gets exactly the option's values."""
    import inspect

    from common.tracking.tracker import RUN_KEYS, RUNTIME_ARGS
    monkeypatch.delenv("WANDB_MODE")                       # logger.mode's default when WANDB_MODE is not set
    tracker, cfg = _tracker(monkeypatch, tmp_path)
    option = OmegaConf.to_container(cfg.logger, resolve=True)
    arguments = set(inspect.signature(type(tracker)).parameters)
    assert arguments == set(option) - {"_target_", "_partial_", *RUN_KEYS} | set(RUNTIME_ARGS)
    assert option["_target_"] == "common.tracking.wandb_tracker.WandbTracker"
    init = fake_wandb.calls("init")[0]
    assert {k: init[k] for k in ("project", "entity", "mode", "job_type")} == {
        "project": "vfm-suite", "entity": None, "mode": "offline", "job_type": "train"}
    assert {k: option[k] for k in ("project", "entity", "mode", "job_type")} == {
        k: init[k] for k in ("project", "entity", "mode", "job_type")}
    assert init["settings"] == {"silent": not option["verbose"], "console": option["console"]} \
        == {"silent": True, "console": "off"}
    assert tracker.artifacts is option["artifacts"] is False
    info = run_info(cfg)
    assert init["name"] == info.name and init["group"] == info.group == "toy" and init["tags"] == info.tags
    assert init["dir"] == str(tmp_path / "run") and init["config"] == fake_wandb._plain(logged_config(cfg, info))
    assert (tracker.monitor, tracker.direction) == ("val/neg_mse", "maximize")


class Recorder(Tracker):
    """A tracker of a test: takes one key of its own and two run-time values."""

    def __init__(self, *, label: str, run_dir: Path, monitor: str):
        self.label, self.run_dir, self.monitor = label, run_dir, monitor


def test_a_custom_target_from_the_command_line_is_used(tmp_path):
    cfg = _compose([*TOY, "logger=none", f"logger._target_={__name__}.Recorder", "+logger.label=mine",
                    "+logger.group=preset"], tmp_path)        # group (set by presets) describes the run only
    tracker = make_tracker(cfg, tmp_path / "run", is_main=True)
    assert isinstance(tracker, Recorder)
    assert (tracker.label, tracker.run_dir, tracker.monitor) == ("mine", tmp_path / "run", "val/neg_mse")
    assert type(make_tracker(cfg, tmp_path / "run", is_main=False)) is Tracker      # other DDP ranks: no-op


@pytest.mark.parametrize("overrides, message", [
    (["logger=wandb", "+logger.projekt=p"],
     r"logger\.projekt: not an argument of common\.tracking\.wandb_tracker\.WandbTracker"),
    (["logger=wandb", "~logger.console"], r"missing logger\.console"),
    (["logger=wandb", "+logger.run_dir=/tmp/x"], r"logger\.run_dir: .* is given by the run"),
    (["logger=none", "+logger.project=p"], r"logger\.project: not an argument of common\.tracking\.tracker\.Tracker"),
    (["logger=none", "logger._target_=common.tracking.tracker.RunFiles"],
     r"expected a subclass of common\.tracking\.tracker\.Tracker"),
    (["logger=none", "~logger._partial_"], r"needs `_target_` .* and `_partial_: true`"),
])
def test_a_key_the_tracker_does_not_take_fails_naming_it(monkeypatch, tmp_path, overrides, message):
    fake_wandb.install(monkeypatch)
    cfg = _compose([*TOY, *overrides], tmp_path)
    with pytest.raises((ValueError, TypeError), match=message):
        make_tracker(cfg, tmp_path / "run", is_main=True)
    assert not fake_wandb.calls("init")


@pytest.mark.parametrize("env_mode", ["disabled", "online"])
def test_wandb_mode_follows_the_environment_unless_given(monkeypatch, tmp_path, env_mode):
    monkeypatch.setenv("WANDB_MODE", env_mode)
    _tracker(monkeypatch, tmp_path)
    assert fake_wandb.calls("init")[0]["mode"] == env_mode
    _tracker(monkeypatch, tmp_path, ["logger.mode=offline"])          # the command line's wins
    assert fake_wandb.calls("init")[0]["mode"] == "offline"


def test_wandb_init_names_groups_tags_and_silences(monkeypatch, tmp_path):
    _tracker(monkeypatch, tmp_path, ["trainer.optim.lr=0.0033333333", "logger.project=p"])
    init = fake_wandb.calls("init")[0]
    assert init["name"] == "task=toy,trainer.optim.lr=0.003333"
    assert init["group"] == "toy" and init["tags"] == ["task:toy", "mode:train"] and init["job_type"] == "train"
    assert init["settings"] == {"silent": True, "console": "off"} and init["project"] == "p"
    assert init["config"]["hydra"]["choices"]["task"] == "toy"
    assert init["config"]["trainer"]["optim"]["lr"] == pytest.approx(0.0033333333)


def test_trainer_logs_step_and_epoch_losses_on_their_axes(monkeypatch, tmp_path):
    from common.cluster import distributed
    from common.training.dataset_root import data_root
    from common.training.parts import build_parts, load_task
    from common.training.trainer import Trainer
    tracker, cfg = _tracker(monkeypatch, tmp_path, ["trainer=debug", "trainer.log_every_n_steps=1",
                                                   "trainer.device=cpu"])
    task = load_task(cfg)
    sets = task.datasets(data_root(cfg, task), "fit")
    model, criterion, metric = build_parts(task, {})
    Trainer(cfg, tmp_path / "run", tracker, distributed.setup("cpu")).fit(task, model, criterion, metric,
                                                                         sets["train"], sets["val"], {})
    defined = {c["name"]: c for c in fake_wandb.calls("define_metric")}
    assert defined["train/loss_step"]["step_metric"] == "step" and defined["train/mse_step"]["step_metric"] == "step"
    assert defined["lr/head"]["step_metric"] == "step"
    assert defined["train/loss"]["step_metric"] == "epoch" and defined["train/loss"]["summary"] is None
    assert defined["val/neg_mse"] == {"call": "define_metric", "name": "val/neg_mse", "step_metric": "epoch",
                                      "summary": "max,last"}
    rows = [c["row"] for c in fake_wandb.calls("log")]
    step_rows = [r for r in rows if "train/loss_step" in r]
    epoch_rows = [r for r in rows if "train/loss" in r]
    assert step_rows and all("train/loss" not in r and "epoch" not in r for r in step_rows)
    assert [r["epoch"] for r in epoch_rows] == [0, 1] and all(r["step"] > 0 for r in epoch_rows)
    assert not (tmp_path / "run" / "curves.png").exists()       # curves: end, not while training
    from common.tracking.reports import curves_setting, finish_run
    finish_run(tracker, tmp_path / "run", True, str(cfg.trainer.monitor), curves_setting(cfg))
    assert (tmp_path / "run" / "curves.png").is_file()


def test_fold_metrics_keep_their_best_summary(monkeypatch, tmp_path):
    from common.training.cv import FoldTracker
    tracker, _ = _tracker(monkeypatch, tmp_path, ["optimized_direction=minimize"])
    FoldTracker(tracker, 1, step_offset=100).log_metrics({"epoch": 2, "val/neg_mse": -1.0, "step": 5}, 5)
    defined = {c["name"]: c for c in fake_wandb.calls("define_metric")}
    assert defined["fold1/val/neg_mse"]["summary"] == "min,last"
    assert fake_wandb.calls("log")[-1] == {"call": "log", "step": None, "at": 0, "dropped": False, "row": {
        "fold1/epoch": 2, "fold1/val/neg_mse": -1.0, "fold1/step": 5, "step": 105, "epoch": 2}}


def test_report_run_logs_scores_pictures_and_artifacts(monkeypatch, tmp_path):
    tracker, _ = _tracker(monkeypatch, tmp_path, ["logger.artifacts=true"])
    run = tmp_path / "run"
    run.mkdir()
    (run / "curves.png").write_bytes(b"png")
    (run / "scores.json").write_text(json.dumps({"r2_weighted": 0.61, "note": "x"}))
    (run / "submission.csv").write_text("sample_id,target\n")
    (run / "metrics.json").write_text(json.dumps({"outputs": {"submission": str(run / "submission.csv"),
                                                              "scores": str(run / "scores.json")}}))
    tracker.report_run(run)
    tracker.finish()
    assert fake_wandb.calls("finish")[0]["summary"] == {"predict/r2_weighted": 0.61}
    assert [list(c["row"]) for c in fake_wandb.calls("log")] == [["files/curves"]]
    assert sorted(c["type"] for c in fake_wandb.calls("log_artifact")) == ["predictions", "predictions"]


def test_confusion_matrix_counts_become_pairs():
    from common.tracking.wandb_tracker import confusion_pairs
    true, pred = confusion_pairs([[2, 1], [0, 3]], 2)
    assert list(zip(true, pred)) == [(0, 0), (0, 0), (0, 1), (1, 1), (1, 1), (1, 1)]
    with pytest.raises(ValueError, match="expected 3x3"):
        confusion_pairs([[1, 0], [0, 1]], 3)


@pytest.mark.slow
def test_eval_logs_the_checkpoints_config_not_the_command_lines(tmp_path):
    """A LoRA checkpoint evaluated with a command line that says nothing about peft."""
    fake = fake_wandb.write_package(tmp_path / "fake")
    env = {"PYTHONPATH": f"{fake}:{REPO}"}
    run_cli([*TOY, "trainer=debug", "peft=lora", "peft.r=2"], tmp_path / "train", tmp_path / "cache")
    record = tmp_path / "eval.json"
    ckpt = tmp_path / "train" / "checkpoints" / "best.pt"
    run_cli([*TOY, "mode=eval", f"ckpt_path={ckpt}", "logger=wandb"], tmp_path / "eval", tmp_path / "cache",
            env={**env, "FAKE_WANDB_RECORD": str(record)})
    calls = json.loads(record.read_text())
    init = calls[0]
    assert init["name"] == "eval:task=toy,trainer=debug,peft=lora,peft.r=2,trainer.progress=plain"
    assert init["job_type"] == "eval" and "experiment:" not in str(init["tags"])
    assert init["config"]["peft"]["name"] == "none"                    # the command line's, before loading
    assert init["config"]["checkpoint"]["choices"]["peft"] == "lora"
    update = [c for c in calls if c["call"] == "config.update"][0]["values"]
    assert update["peft"]["name"] == "lora" and update["peft"]["r"] == 2
    assert init["config"]["hydra"]["choices"]["peft"] == "none"      # the command line's, before loading
    assert update["hydra"]["choices"]["peft"] == "lora"             # then the checkpoint's, as its config
    assert update["hydra"]["choices"]["trainer"] == "default"       # trainer: this run's section, this run's choice
    summary = [c for c in calls if c["call"] == "finish"][0]["summary"]
    assert "eval/neg_mse" in summary


def test_eval_choices_of_checkpoint_sections_are_the_checkpoints():
    from common.inference.predictor import FROM_CHECKPOINT
    from common.tracking.run_info import inherited_choices
    run = {"task": "biomass", "model": "biomass/fpn", "model/biomass": "fpn", "peft": "none", "trainer": "gpu",
           "inference": "biomass", "experiment": None}
    checkpoint = {"choices": {"task": "biomass", "model": "biomass/mil", "peft": "lora", "trainer": "debug",
                              "data": "biomass/csiro"}}
    assert inherited_choices(run, checkpoint, FROM_CHECKPOINT) == {
        "task": "biomass", "model": "biomass/mil", "model/biomass": None, "peft": "lora", "data": "biomass/csiro",
        "trainer": "gpu", "inference": "biomass", "experiment": None}
    assert inherited_choices(run, {}, ("peft",))["peft"] is None     # a checkpoint without its run: unknown


def test_logger_none_imports_no_wandb():
    code = ("import sys; from omegaconf import OmegaConf; from common.tracking.tracker import make_tracker; "
            "t = make_tracker(OmegaConf.create({'logger': {'_target_': 'common.tracking.tracker.Tracker', "
            "'_partial_': True, 'group': 'g'}}), '.', True); assert type(t).__name__ == 'Tracker'; "
            "import common.tracking.reports, common.tracking.run_info; "
            "assert 'wandb' not in sys.modules and 'common.tracking.wandb_tracker' not in sys.modules, 'wandb imported'")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_real_wandb_offline_accepts_every_call(monkeypatch, tmp_path):
    """The real wandb (offline): every tracker call is valid, and the run file holds the names logged."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.delitem(sys.modules, "common.tracking.wandb_tracker", raising=False)
    from common.tracking.wandb_tracker import WandbTracker
    cfg = OmegaConf.create({"task": {"name": "toy"}, "mode": "train", "optimized_metric": "val/f1"})
    run = tmp_path / "run"
    run.mkdir()
    info = RunInfo("name-test", "g-test", ["task:toy"], {"experiment": None})
    tracker = WandbTracker(run_dir=run, info=info, config=logged_config(cfg, info), monitor="val/f1",
                           direction="maximize", project="vfm-test", entity=None, mode="offline", job_type="train",
                           artifacts=True, verbose=False, console="off")
    tracker.log_metrics({"train/loss_step": 1.0, "lr/head": 1e-3}, 1)
    tracker.log_metrics({"epoch": 0, "train/loss": 0.9, "val/f1": 0.5}, 1)
    tracker.log_images("val/overlay", [np.zeros((8, 8, 3), np.uint8)], 1, captions=["c"])
    tracker.log_image("worst", np.zeros((8, 8), np.uint8))
    tracker.log_table("breakdown", ["field", "n"], [["rain", 3]])
    tracker.log_confusion_matrix("confusion", [[2, 1], [0, 3]], ["no roadwork", "roadwork"])
    tracker.set_config(cfg, ("peft",))
    tracker.add_tags(["pruned"])
    (run / "best.pt").write_bytes(b"weights")
    (run / "metrics.json").write_text(json.dumps({"checkpoints": {"best": str(run / "best.pt")}}))
    tracker.report_run(run)
    tracker.finish()
    import wandb
    wandb.teardown()          # waits until the service has written the run file
    blobs = b"".join(p.read_bytes() for p in run.glob("wandb/offline-run-*/run-*.wandb"))
    for name in (b"name-test", b"g-test", b"task:toy", b"train/loss_step", b"val/f1", b"confusion", b"best", b"pruned"):
        assert name in blobs, name



def _logged_rows(args, run_dir, cache, fake):
    """The log calls the recorder saw in one run.py run (a process of its own: one where the real wandb was
    imported keeps parts of it)."""
    record = run_dir.with_suffix(".json")
    run_cli([*args, "logger=wandb"], run_dir, cache, env={"PYTHONPATH": f"{fake}:{REPO}",
                                                         "FAKE_WANDB_RECORD": str(record)})
    return [c for c in json.loads(record.read_text()) if c["call"] == "log"]


@pytest.mark.slow
@pytest.mark.parametrize("task", ["biomass", "sclera", "roadwork"])
def test_train_then_eval_never_log_to_an_earlier_step(tmp_path, task):
    """wandb drops a row logged to a step below its current one (the recorder keeps wandb's steps): train and then
    eval of every task log every row, on non-decreasing `step` values, roadwork's eval its worst-errors grid."""
    fake = fake_wandb.write_package(tmp_path / "fake")
    smoke = ["trainer=debug", "trainer.max_epochs=1", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1"]
    data = SMALL if task == "roadwork" else []            # roadwork's test set of tests/test_roadwork_e2e.py
    train = _logged_rows([f"task={task}", *smoke, *data], tmp_path / "train", tmp_path / "cache", fake)
    ckpt = tmp_path / "train" / "checkpoints" / "best.pt"
    evaluate = _logged_rows([f"task={task}", "mode=eval", f"ckpt_path={ckpt}", *data], tmp_path / "eval",
                            tmp_path / "cache", fake)
    assert [c for c in train if "val/loss" in c["row"] or "train/loss" in c["row"]]
    for logs in (train, evaluate):
        assert not [c["row"] for c in logs if c["dropped"]]
        steps = [c["row"]["step"] for c in logs if "step" in c["row"]]
        assert steps == sorted(steps)
    if task == "roadwork":
        assert [c for c in evaluate if "worst_errors" in c["row"]]
