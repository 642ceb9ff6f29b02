"""The app and its run-directory contract: config composition, modes, bad input, tracking."""
import json

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from common.data.folds import assign_folds
from common.tracking.tracker import redact
from tests.cli import REPO, TOY, run_cli

TASKS = sorted(p.stem for p in (REPO / "conf" / "task").glob("*.yaml"))
EXPERIMENTS = sorted(p.stem for p in (REPO / "conf" / "experiment").glob("*.yaml"))


def _compose(overrides):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


@pytest.mark.parametrize("task", TASKS)
def test_task_config_composes(task):
    cfg = _compose([f"task={task}"])
    assert cfg.task.name == task and cfg.optimized_metric.startswith("val/")
    assert cfg.backbone.weights is None and cfg.data.root is None  # the embedded default
    for group in ("data", "model", "loss", "metric"):
        assert group in cfg, f"task {task} selects no {group} config"


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_preset_composes(experiment):
    cfg = _compose([f"experiment={experiment}"])
    OmegaConf.to_container(cfg.model, resolve=False)
    assert cfg.task.name in TASKS


def test_wrong_option_lists_valid_ones(tmp_path):
    proc = run_cli([*TOY, "backbone=nope"], tmp_path / "r", tmp_path / "c", check=False)
    assert proc.returncode != 0 and "tiny" in proc.stderr and "backbone" in proc.stderr


def test_unknown_key_fails_loudly(tmp_path):
    proc = run_cli([*TOY, "trainer.max_epochz=3"], tmp_path / "r", tmp_path / "c", check=False)
    assert proc.returncode != 0 and "max_epochz" in proc.stderr


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("toy")
    run_cli([*TOY], base / "train", base / "cache")
    return base


@pytest.mark.slow
def test_run_directory_contract_toy(toy_run):
    run = toy_run / "train"
    assert (run / ".hydra" / "config.yaml").is_file()
    epochs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in epochs] == [0, 1]
    for key in ("step", "train/loss", "val/neg_mse", "lr/head", "train/seconds", "train/samples_per_s"):
        assert key in epochs[0], key
    final = json.loads((run / "metrics.json").read_text())
    assert final["best"]["val/neg_mse"] == max(e["val/neg_mse"] for e in epochs)
    ckpt = torch.load(run / "checkpoints" / "best.pt", weights_only=True)
    for key in ("model", "optimizer", "rng", "config", "stats", "epoch", "step", "ema", "task"):
        assert key in ckpt, key
    assert not any(k.startswith("backbone.") for k in ckpt["model"])  # frozen weights are not stored


@pytest.mark.slow
def test_eval_predict_from_checkpoint(toy_run):
    ckpt = toy_run / "train" / "checkpoints" / "best.pt"
    run_cli([*TOY, "mode=eval", f"ckpt_path={ckpt}"], toy_run / "eval", toy_run / "cache")
    best = json.loads((toy_run / "train" / "metrics.json").read_text())["best"]["val/neg_mse"]
    evaluated = json.loads((toy_run / "eval" / "metrics.json").read_text())["eval/neg_mse"]
    assert evaluated == pytest.approx(best, rel=1e-5)
    run_cli([*TOY, "mode=predict", f"ckpt_path={ckpt}"], toy_run / "pred", toy_run / "cache")
    assert (toy_run / "pred" / "predictions.csv").read_text().startswith("id,pred\n")


@pytest.mark.slow
def test_cv_writes_folds_and_oof(tmp_path):
    run_cli([*TOY, "mode=cv", "cv.folds=3", "trainer=debug"], tmp_path / "cv", tmp_path / "cache")
    folds = np.genfromtxt(tmp_path / "cv" / "folds.csv", delimiter=",", names=True, dtype=int)
    for group in np.unique(folds["group"]):
        assert len(np.unique(folds["fold"][folds["group"] == group])) == 1
    oof = (tmp_path / "cv" / "oof.csv").read_text().splitlines()
    assert oof[0] == "fold,id,pred,target" and len(oof) == 1 + 24
    assert "oof/neg_mse" in json.loads((tmp_path / "cv" / "metrics.json").read_text())


def test_assign_folds_grouped_and_balanced():
    groups = np.repeat(np.arange(20), 3)
    folds = assign_folds(groups, 5, seed=0)
    assert all(len(set(folds[groups == g])) == 1 for g in range(20))
    assert sorted(np.bincount(folds)) == [12] * 5
    with pytest.raises(ValueError, match="only 20 groups"):
        assign_folds(groups, 21, seed=0)


@pytest.mark.slow
def test_bad_inputs_give_one_clear_message(toy_run, tmp_path):
    cache = toy_run / "cache"
    missing = run_cli([*TOY, "data.root=/nonexistent/data"], tmp_path / "a", cache, check=False)
    assert missing.returncode != 0 and "data.root=/nonexistent/data does not exist" in missing.stderr
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    bad = run_cli([*TOY, "mode=eval", f"ckpt_path={garbage}"], tmp_path / "b", cache, check=False)
    assert bad.returncode != 0 and f"checkpoint {garbage} could not be read" in bad.stderr
    other = toy_run / "train" / "checkpoints" / "best.pt"
    foreign = run_cli(["task=toy2", TOY[1], "mode=eval", f"ckpt_path={other}"], tmp_path / "c", cache, check=False)
    assert foreign.returncode != 0 and "trained for task 'toy', not 'toy2'" in foreign.stderr
    nockpt = run_cli([*TOY, "mode=eval"], tmp_path / "d", cache, check=False)
    assert "needs ckpt_path" in nockpt.stderr


@pytest.mark.slow
def test_logger_none_never_imports_wandb(tmp_path):
    fake = tmp_path / "fake" / "wandb"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('wandb was imported with logger=none')\n")
    run_cli([*TOY, "trainer=debug"], tmp_path / "r", tmp_path / "c", env={"PYTHONPATH": str(fake.parent)})


@pytest.mark.slow
def test_wandb_offline_run_is_written(tmp_path):
    run_cli([*TOY, "trainer=debug", "logger=wandb"], tmp_path / "r", tmp_path / "c", env={"WANDB_MODE": "offline"})
    assert list((tmp_path / "r" / "wandb").glob("offline-run-*"))


@pytest.mark.slow
def test_wandb_mode_disabled_writes_no_wandb_folder(tmp_path):
    """WANDB_MODE=disabled is logger.mode's default: the real wandb starts a disabled run, which writes nothing."""
    run_cli([*TOY, "trainer=debug", "logger=wandb"], tmp_path / "r", tmp_path / "c", env={"WANDB_MODE": "disabled"})
    assert (tmp_path / "r" / "metrics.json").is_file() and not (tmp_path / "r" / "wandb").exists()


def test_redaction_of_secrets():
    cfg = {"storage": "postgresql://optuna:s3cret@db.example:5432/study", "api_key": "abc",
           "nested": {"db_password": "hunter2", "name": "ok"}}
    red = redact(cfg)
    assert red["storage"] == "postgresql://optuna:***@db.example:5432/study"
    assert red["api_key"] == "***" and red["nested"]["db_password"] == "***" and red["nested"]["name"] == "ok"


SWEEPS = sorted(p.stem for p in (REPO / "sweeps").glob("*.yaml") if not p.stem.startswith("_"))


@pytest.mark.parametrize("space", SWEEPS)
def test_search_space_composes_and_names_real_keys(space):
    from hydra.core.hydra_config import HydraConfig

    from sweeps.workers import register_resolvers
    register_resolvers()
    task = space.split("_")[0]
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"task={task}", f"sweeps={space}"], return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    sweeper = cfg.hydra.sweeper
    assert sweeper.study_name == space and sweeper.budget > 0 and sweeper.n_jobs == 1
    assert sweeper.storage.startswith("sqlite:///") and sweeper.storage.endswith(f"sweeps/{space}/optuna.db")
    assert cfg.optimized_metric.startswith("val/") and cfg.logger.group == f"sweep-{space}"
    for key in sweeper.params:
        assert OmegaConf.select(cfg, key, default="<missing>") != "<missing>", f"{space} sweeps unknown key {key}"


def test_slurm_launcher_preset_composes():
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["task=sclera", "hydra/launcher=slurm"],
                      return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    # gpus_per_node null: the checked launcher asks for 1 on a partition with GPUs, 0 on one without
    assert launcher.gpus_per_node is None and launcher.max_num_timeout == 3 and launcher.signal_delay_s == 120


@pytest.mark.slow
def test_predict_averages_cv_fold_checkpoints(tmp_path):
    import csv
    run_cli([*TOY, "mode=cv", "cv.folds=2", "trainer=debug"], tmp_path / "cv", tmp_path / "cache")
    run_cli([*TOY, "mode=predict", f"ckpt_path={tmp_path / 'cv'}"], tmp_path / "ens", tmp_path / "cache")
    folds = [tmp_path / "cv" / f"fold_{k}" / "checkpoints" / "best.pt" for k in range(2)]
    singles = []
    for k, ckpt in enumerate(folds):
        run_cli([*TOY, "mode=predict", f"ckpt_path={ckpt}"], tmp_path / f"single{k}", tmp_path / "cache")
        singles.append([float(r["pred"]) for r in csv.DictReader(open(tmp_path / f"single{k}" / "predictions.csv"))])
    ensemble = [float(r["pred"]) for r in csv.DictReader(open(tmp_path / "ens" / "predictions.csv"))]
    assert ensemble == pytest.approx([(a + b) / 2 for a, b in zip(*singles)], abs=2e-6)
    assert json.loads((tmp_path / "ens" / "metrics.json").read_text())["ckpt_path"] == [str(p) for p in folds]


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.slow
def test_run_directory_contract_every_task(task, tmp_path_factory):
    base = tmp_path_factory.mktemp(task)
    run_cli([f"task={task}", "trainer=debug"], base / "run", base / "cache")
    run = base / "run"
    epochs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in epochs] == [0, 1]
    metric_key = _compose([f"task={task}"]).optimized_metric
    assert all(metric_key in e and "train/loss" in e and "lr/head" in e for e in epochs)
    final = json.loads((run / "metrics.json").read_text())
    assert final["monitor"] == metric_key and final["best_epoch"] in (0, 1)
    for name in ("best.pt", "last.pt"):
        ckpt = torch.load(run / "checkpoints" / name, weights_only=True)
        assert ckpt["task"] == task and ckpt["stats"] is not None and "optimizer" in ckpt
        assert not any(k.startswith("backbone.") for k in ckpt["model"])


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.slow
def test_cross_validation_every_task(task, tmp_path_factory):
    import csv
    base = tmp_path_factory.mktemp(f"cv-{task}")
    run_cli([f"task={task}", "mode=cv", "cv.folds=2", "trainer=debug", "trainer.limit_val_batches=null"],
            base / "cv", base / "cache")
    folds = list(csv.DictReader(open(base / "cv" / "folds.csv")))
    oof = list(csv.DictReader(open(base / "cv" / "oof.csv")))
    assert {r["fold"] for r in folds} == {"0", "1"} and {r["fold"] for r in oof} == {"0", "1"}
    metric_key = "oof/" + _compose([f"task={task}"]).optimized_metric.split("/", 1)[-1]
    assert metric_key in json.loads((base / "cv" / "metrics.json").read_text())
