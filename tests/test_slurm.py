"""The suite on a real Slurm cluster (one node, `.ci/slurm_up.sh`): sweep arrays, preemption and requeue through
the time limit's signal, hydra/launcher=slurm, `srun -n 2` DDP, and requests the partition cannot satisfy.

Marked `slurm`: `make test-slurm` runs them (`make test` leaves them out). Skipped with a loud reason where `sinfo`
is missing; a failure instead when CI=true (CI must run them).
"""
import json
import os
import re
import shutil
import subprocess
import sys
import time

import optuna
import pytest
import torch
from optuna.trial import TrialState

from sweeps.storage import creation_lock, load_study, make_storage
from tests.cli import REPO, TOY, run_cli

pytestmark = [pytest.mark.slow, pytest.mark.slurm,    # make test-slurm runs them, make test leaves them out
              pytest.mark.xdist_group("slurm")]    # with -n: its jobs share the one-node cluster: one test at a time

TERMINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE")
SMALL = ["--cpus-per-task=1", "--mem=2G"]
IDLE_WAIT_S = 180


@pytest.fixture
def slurm():
    """A working Slurm client and an idle node, or a skip (a failure under CI=true)."""
    problem = None
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        problem = "sinfo / sbatch not found: start a one-node cluster with `sudo .ci/slurm_up.sh`"
    else:
        deadline = time.time() + IDLE_WAIT_S        # the previous test's job may still be completing
        while True:
            proc = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True)
            if proc.returncode == 0 and re.search(r"idle|mixed", proc.stdout):
                break
            if time.time() > deadline:
                problem = (f"no idle Slurm node after {IDLE_WAIT_S} s (sinfo: {proc.stdout.strip()} "
                           f"{proc.stderr.strip()}): run .ci/slurm_up.sh")
                break
            time.sleep(2)
    if problem:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true but the Slurm cluster is not usable: {problem}")
        pytest.skip(f"SLURM TESTS SKIPPED: {problem}")


def _env(**extra) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1",
            "NO_ALBUMENTATIONS_UPDATE": "1", "PYTHONPATH": str(REPO), **extra}


def _sbatch(args: list[str], cwd, env=None) -> str:
    proc = subprocess.run(["sbatch", "--parsable", *args], cwd=cwd, env=env or _env(), capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().split(";")[0]


def _jobs(job: str) -> list[dict]:
    """One dict per job (array task) from `scontrol show job -o`."""
    out = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True).stdout
    return [dict(re.findall(r"(\w+)=(\S*)", line)) for line in out.splitlines() if line.strip()]


def _wait(job: str, timeout: float, until=None) -> list[dict]:
    """Poll until every task of `job` ended (or `until(jobs)` holds); fail with the job's state on timeout."""
    deadline, jobs = time.time() + timeout, []
    while time.time() < deadline:
        jobs = _jobs(job)
        if jobs and (until(jobs) if until else all(j["JobState"] in TERMINAL for j in jobs)):
            return jobs
        time.sleep(2)
    subprocess.run(["scancel", job])
    raise AssertionError(f"job {job} did not get there in {timeout}s: {jobs}")


def _toy(tmp_path, *extra) -> list[str]:
    return [*TOY, "logger=none", "trainer.progress=plain", f"paths.log_dir={tmp_path / 'logs'}",
            f"paths.cache_dir={tmp_path / 'cache'}", *extra]


def _log(tmp_path, job) -> str:
    logs = list(tmp_path.glob(f"slurm-*-{job}.out")) + list((REPO / "logs" / "slurm").glob(f"*-{job}*.out"))
    return "\n".join(p.read_text() for p in logs)


def _metrics(run_dir) -> dict:
    """metrics.json without wall-clock fields."""
    final = json.loads((run_dir / "metrics.json").read_text())
    return {part: {k: v for k, v in final[part].items() if "seconds" not in k and "samples_per_s" not in k}
            for part in ("best", "last")}


def _study(tmp_path, name="toy_lr"):
    """The study, read as sweeps.report does: a plain optuna.load_study polling a worker that is creating the schema
    can insert Optuna's schema version a second time (UNIQUE constraint failed)."""
    return load_study(f"sqlite:///{tmp_path / 'logs' / 'sweeps' / name / 'optuna.db'}", name)


def _assert_budget_without_duplicates(study, budget: int):
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert len(complete) == budget, [(t.number, t.state, t.user_attrs) for t in study.trials]
    params = [tuple(sorted(t.params.items())) for t in study.trials if t.state != TrialState.PRUNED]
    assert len(params) == len(set(params)), params


def test_a_sweep_array_reaches_the_budget(slurm, tmp_path):
    """Two array workers submitted with common.cluster.slurm_submit (no GPU) share one study: exactly the budget."""
    cmd = [sys.executable, "-m", "common.cluster.slurm_submit", "--gpus", "0", "--cpus", "1", "--mem", "2G", "--time", "10",
           "--array", "0-1", str(REPO / "sweeps" / "worker.sbatch"),
           *_toy(tmp_path, "sweeps=toy_lr", "hydra.sweeper.budget=3")]
    proc = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    job = proc.stdout.strip()
    jobs = _wait(job, 300)
    assert [j["JobState"] for j in jobs] == ["COMPLETED", "COMPLETED"], [_log(tmp_path, j["JobId"]) for j in jobs]
    _assert_budget_without_duplicates(_study(tmp_path), 3)
    for task in (0, 1):                              # %A_%a: the array's id and the index, not the task's own id
        assert "trial" in (REPO / "logs" / "slurm" / f"vfm-sweep-{job}_{task}.out").read_text()


def test_b_time_limit_signal_requeues_and_resumes_exactly(slurm, tmp_path):
    """--time=1 with --signal=B:USR1@55: signalled while training, writes last.pt, requeues itself (exit 0, not
    FAILED), resumes in logs/<task>/<mode>/slurm-<job id>/ without flags, ends as an uninterrupted run."""
    args = _toy(tmp_path, "trainer.max_epochs=3", "model.dropout=0.3")
    baseline = subprocess.Popen([sys.executable, str(REPO / "run.py"), *args,
                                 f"hydra.run.dir={tmp_path / 'straight'}"], cwd=REPO, env=_env(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    submit_dir = tmp_path / "elsewhere"            # submitted from outside the repository
    submit_dir.mkdir()
    job = _sbatch([*SMALL, "--time=1", "--signal=B:USR1@55", str(REPO / "sweeps" / "train.sbatch"), *args,
                   "loss.sleep_s=2.0"], cwd=submit_dir)
    _wait(job, 120, until=lambda jobs: int(jobs[0]["Restarts"]) >= 1 or jobs[0]["JobState"] in TERMINAL)
    subprocess.run(["scontrol", "update", f"jobid={job}", "TimeLimit=10"], check=True)  # room to finish now
    final = _wait(job, 240)[0]
    log = _log(submit_dir, job)
    assert final["JobState"] == "COMPLETED" and int(final["Restarts"]) >= 1, log
    assert "caught SIGUSR1" in log and f"requeued job {job}" in log and "resumed from" in log, log
    assert log.count(f"[slurm] job {job} (restart") >= 2, log        # --open-mode=append kept the first run
    assert baseline.wait(timeout=300) == 0, baseline.stderr.read()[-3000:]
    run_dir = tmp_path / "logs" / "toy" / "train" / f"slurm-{job}"
    assert _metrics(run_dir) == _metrics(tmp_path / "straight")
    a = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "straight" / "checkpoints" / "last.pt", weights_only=True)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in b["model"])


def test_c_signalled_sweep_worker_resumes_its_trial(slurm, tmp_path):
    """A sweep worker signalled in the middle of a trial is requeued; that trial resumes and completes (same
    number, same parameters), nothing FAILs, nothing is duplicated. Needs the sweeps engineer's trial resume."""
    job = _sbatch([*SMALL, "--time=10", str(REPO / "sweeps" / "worker.sbatch"),
                   *_toy(tmp_path, "sweeps=toy_lr", "hydra.sweeper.budget=2", "trainer.max_epochs=3",
                         "loss.sleep_s=1.0")], cwd=tmp_path)
    db = tmp_path / "logs" / "sweeps" / "toy_lr" / "optuna.db"
    deadline = time.time() + 120
    while time.time() < deadline and not (db.exists() and any(
            t.state == TrialState.RUNNING for t in _study(tmp_path).trials)):
        time.sleep(1)
    time.sleep(8)                                    # inside trial 0's training
    first = _study(tmp_path).trials[0]
    subprocess.run(["scancel", "--batch", "--signal=USR1", job], check=True)
    final = _wait(job, 300)[0]
    assert final["JobState"] == "COMPLETED" and int(final["Restarts"]) >= 1, _log(tmp_path, job)
    study = _study(tmp_path)
    assert not [t for t in study.trials if t.state == TrialState.FAIL], [t.user_attrs for t in study.trials]
    assert study.trials[0].state == TrialState.COMPLETE and study.trials[0].params == first.params
    _assert_budget_without_duplicates(study, 2)


SWEEP = ["sweeps=toy_lr", "hydra.sweeper.budget=3", "loss.sleep_s=1.0", "hydra.sweeper.heartbeat_interval=2",
         "hydra.sweeper.grace_period=8"]


def _sweep_array(tmp_path, epochs: int = 3) -> str:
    """Two workers submitted as the README says (common.cluster.slurm_submit); the array's job id. A trial trains
    `epochs` epochs of about 8 s."""
    cmd = [sys.executable, "-m", "common.cluster.slurm_submit", "--gpus", "0", "--cpus", "1", "--mem", "2G", "--time",
           "10", "--array", "0-1", str(REPO / "sweeps" / "worker.sbatch"),
           *_toy(tmp_path, *SWEEP, f"trainer.max_epochs={epochs}")]
    proc = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def _trials_of(tmp_path, worker: str) -> list:
    """RUNNING trials of `worker` that have their last.pt (an epoch done)."""
    db = tmp_path / "logs" / "sweeps" / "toy_lr" / "optuna.db"
    if not db.exists():
        return []
    with creation_lock(f"sqlite:///{db}"):          # the workers may be creating the schema right now
        storage = make_storage(f"sqlite:///{db}")
    if "toy_lr" not in [s.study_name for s in optuna.study.get_all_study_summaries(storage)]:
        return []
    return [t for t in optuna.load_study(study_name="toy_lr", storage=storage).trials if t.state == TrialState.RUNNING and t.user_attrs.get("worker") == worker
            and (tmp_path / "logs" / "sweeps" / "toy_lr" / f"trial-{t.number}" / "checkpoints" / "last.pt").exists()]


def _poll(condition, what: str, timeout: float):
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = condition()
        if found:
            return found
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def _epochs(tmp_path, number: int) -> list[int]:
    lines = (tmp_path / "logs" / "sweeps" / "toy_lr" / f"trial-{number}" / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["epoch"] for line in lines]


def _assert_resumed_from_last_pt(tmp_path, before, logs: str, epochs: int = 3) -> None:
    """The interrupted trials ended COMPLETE with their numbers and parameters, resumed from their last.pt (each
    epoch trained once), nothing FAIL, the budget exact."""
    study = _study(tmp_path)
    assert not [t for t in study.trials if t.state == TrialState.FAIL], [(t.number, t.user_attrs) for t in study.trials]
    _assert_budget_without_duplicates(study, 3)
    for old in before:
        trial = study.trials[old.number]
        assert trial.state == TrialState.COMPLETE and trial.params == old.params, (trial, logs[-4000:])
        assert trial.user_attrs["resumed"] >= 1 and "preempted" in trial.user_attrs
        last_pt = tmp_path / "logs" / "sweeps" / "toy_lr" / f"trial-{old.number}" / "checkpoints" / "last.pt"
        resumed = re.findall(rf"resumed from {re.escape(str(last_pt))} at epoch (\d+) batch (\d+)", logs)
        assert resumed, logs[-4000:]
        assert _epochs(tmp_path, old.number) == list(range(epochs))
        print(f"trial {old.number} {old.params}: RUNNING (preempted: {trial.user_attrs['preempted']}) -> "
              f"{trial.state.name} by {trial.user_attrs['worker']}, resumed from last.pt at (epoch, batch) {resumed}")


def _logs(*arrays: str) -> str:
    return "\n".join(p.read_text() for a in arrays for p in sorted((REPO / "logs" / "slurm").glob(f"vfm-sweep-{a}_*.out")))


@pytest.fixture
def cancel_at_end():
    """Job ids to scancel when the test ends (a failed test leaves no job behind for the next one)."""
    jobs = []
    yield jobs
    for job in jobs:
        subprocess.run(["scancel", job])


def test_c_requeued_worker_held_past_grace_period_loses_no_work(slurm, tmp_path, cancel_at_end):
    """Task 0 of a sweep array is signalled mid-trial (USR1: last.pt, self-requeue) and its requeued job held in
    the queue well past grace_period: its trial is not failed; it is released, and task 1 adopts it at its next
    trial and resumes it from last.pt (same number and parameters); released, task 0 ends cleanly; budget exact."""
    array = _sweep_array(tmp_path)
    cancel_at_end.append(array)
    first = _poll(lambda: _trials_of(tmp_path, f"slurm-{array}_0"), "task 0 to finish an epoch of its trial", 180)
    subprocess.run(["scancel", "--batch", "--signal=USR1", f"{array}_0"], check=True)

    def held():
        subprocess.run(["scontrol", "hold", f"{array}_0"], capture_output=True)
        job = _jobs(f"{array}_0")[0]
        return job["JobState"] == "PENDING" and int(job["Restarts"]) >= 1 and job["Reason"].startswith("JobHeld")
    _poll(held, "task 0 requeued and held", 120)
    held_at = time.time()
    number = first[0].number
    _poll(lambda: _study(tmp_path).trials[number].state == TrialState.COMPLETE, f"trial {number} adopted and done", 240)
    assert time.time() - held_at > 8                     # held past grace_period, and the trial is not lost
    subprocess.run(["scontrol", "release", f"{array}_0"], check=True)
    jobs = _wait(array, 300)
    logs = _logs(array)
    assert [j["JobState"] for j in jobs] == ["COMPLETED", "COMPLETED"], logs[-4000:]
    _assert_resumed_from_last_pt(tmp_path, first, logs)
    assert _study(tmp_path).trials[number].user_attrs["worker"] == f"slurm-{array}_1"


def test_c_cancelled_sweep_array_resubmitted_resumes_its_trials(slurm, tmp_path, cancel_at_end):
    """scancel of a sweep array in the middle of two trials (SIGTERM: last.pt, the trials released, not FAIL),
    then the same array submitted again, as the README says: the new workers resume both trials from last.pt
    (same numbers and parameters) and run only what the budget still lacks. Trials of 6 epochs: with 3 a task
    that started its first trial 50 s after the other (seen under load) found no trial of the other still running."""
    array = _sweep_array(tmp_path, epochs=6)
    cancel_at_end.append(array)
    interrupted = _poll(lambda: len(both := _trials_of(tmp_path, f"slurm-{array}_0")
                                    + _trials_of(tmp_path, f"slurm-{array}_1")) == 2 and both,
                        "both tasks to finish an epoch of a trial", 240)
    subprocess.run(["scancel", array], check=True)
    jobs = _wait(array, 120)
    assert {j["JobState"] for j in jobs} == {"CANCELLED"}, jobs
    study = _study(tmp_path)
    assert [study.trials[t.number].state for t in interrupted] == [TrialState.RUNNING] * 2
    assert all(study.trials[t.number].system_attrs["owner"].startswith("released ") for t in interrupted)
    again = _sweep_array(tmp_path, epochs=6)
    cancel_at_end.append(again)
    jobs = _wait(again, 300)
    logs = _logs(array, again)
    assert [j["JobState"] for j in jobs] == ["COMPLETED", "COMPLETED"], logs[-4000:]
    _assert_resumed_from_last_pt(tmp_path, interrupted, logs, epochs=6)


def test_d_submitit_launcher_survives_a_requeue(slurm, tmp_path):
    """hydra/launcher=slurm with data.num_workers=2: SIGUSR2 (submitit's signal) mid-training, the job requeues,
    resumes from last.pt and the multirun ends successfully."""
    env = _env(VFM_SLURM_CPUS="1", VFM_SLURM_MEM_GB="2", VFM_SLURM_TIME_MIN="10")   # GPUs: 0, the partition has none
    driver = subprocess.Popen([sys.executable, str(REPO / "run.py"), "-m", "hydra/launcher=slurm",
                               *_toy(tmp_path, "trainer.max_epochs=3", "loss.sleep_s=1.0", "data.num_workers=2",
                                     f"hydra.sweep.dir={tmp_path / 'multirun'}")],
                              cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = tmp_path / "multirun" / "0" / "metrics.jsonl"
    deadline = time.time() + 180
    while time.time() < deadline and not (metrics.is_file() and metrics.read_text().strip()):
        time.sleep(1)
    job = next(p.name for p in (tmp_path / "multirun" / ".submitit").iterdir() if p.name.isdigit())
    time.sleep(2)                                    # inside epoch 1
    subprocess.run(["scancel", "--signal=USR2", job], check=True)
    out = driver.communicate(timeout=300)[0]
    assert driver.returncode == 0, out[-4000:]
    final = _wait(job, 60)[0]                        # the result file comes just before the job ends
    assert final["JobState"] == "COMPLETED" and int(final["Restarts"]) >= 1, final
    ckpt = torch.load(tmp_path / "multirun" / "0" / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["epoch"] == 3 and ckpt["step"] == 18
    log = "".join(p.read_text() for p in (tmp_path / "multirun" / ".submitit" / job).glob("*.out"))
    assert "resumed from" in log and "DataLoader worker" not in log, log[-4000:]


def test_e_srun_ddp_matches_one_process(slurm, tmp_path):
    """srun -n 2 (no torchrun): ranks from SLURM_*; the same global batch trains the same weights as one process."""
    common = [*TOY, "model.dropout=0.0", "trainer.max_epochs=1", "trainer.device=cpu"]
    run_cli([*common, "data.batch_size=8"], tmp_path / "single", tmp_path / "cache")
    cmd = ["srun", "-n", "2", "--cpus-per-task=1", "--mem-per-cpu=1G", "--time=5", sys.executable,
           str(REPO / "run.py"), *common, "data.batch_size=4", f"hydra.run.dir={tmp_path / 'ddp'}",
           f"paths.cache_dir={tmp_path / 'cache'}", "logger=none", "trainer.progress=plain"]
    env = {k: v for k, v in _env().items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    single = torch.load(tmp_path / "single" / "checkpoints" / "last.pt", weights_only=True)
    ddp = torch.load(tmp_path / "ddp" / "checkpoints" / "last.pt", weights_only=True)
    assert single["step"] == ddp["step"] == 3
    for key, value in single["model"].items():
        torch.testing.assert_close(ddp["model"][key], value, rtol=1e-4, atol=1e-5)


def test_unsatisfiable_request_fails_at_submission(slurm, tmp_path):
    """GPUs on a CPU partition, more CPUs / memory than a node has: refused before queueing, naming the flag."""
    cmd = [sys.executable, "-m", "common.cluster.slurm_submit", "--gpus", "1", "--cpus", "64", "--mem", "100000G",
           str(REPO / "sweeps" / "train.sbatch"), "task=toy"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and proc.stdout == ""
    for flag in ("--gpus 1", "--cpus 64", "--mem 100000G"):
        assert flag in proc.stderr, proc.stderr
    nope = subprocess.run([*cmd[:3], "--gpus", "0", "--cpus", "1", "--mem", "1G", "--partition", "nope",
                           *cmd[-2:]], cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=60)
    assert nope.returncode != 0 and "--partition nope: no such partition" in nope.stderr


def test_submitit_launcher_refuses_what_the_partition_cannot_run(slurm, tmp_path):
    """hydra/launcher=slurm with more CPUs than the node has: the driver stops before queueing, naming the key
    and the limit (no .submitit folder, no job), instead of waiting for ever on a pending job."""
    cmd = [sys.executable, str(REPO / "run.py"), "-m", "hydra/launcher=slurm", "hydra.launcher.cpus_per_task=64",
           "hydra.launcher.mem_gb=1", *_toy(tmp_path, f"hydra.sweep.dir={tmp_path / 'multirun'}")]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert re.search(r"hydra.launcher.cpus_per_task=64: the largest node of partition \S+ has \d+ CPUs",
                     proc.stderr), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and not (tmp_path / "multirun" / ".submitit").exists()


def test_multinode_script_runs_its_torchrun_step_with_the_log_folder_created(slurm, tmp_path):
    """sweeps/multinode.sbatch through slurm_submit on the one-node cluster (two processes on the node): the log
    lands in logs/slurm/ (created by the wrapper), the srun step's torchrun gives ranks 0 and 1 of 2, the run ends."""
    run_dir = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "common.cluster.slurm_submit", "--nodes", "1", "--gpus", "0", "--cpus", "2",
           "--mem", "2G", "--time", "10", str(REPO / "sweeps" / "multinode.sbatch"),
           *_toy(tmp_path, "model.dropout=0.0", "trainer.max_epochs=1", "trainer.device=cpu", "data.batch_size=4",
                 f"hydra.run.dir={run_dir}")]
    proc = subprocess.run(cmd, cwd=tmp_path, env=_env(VFM_NPROC_PER_NODE="2"), capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    job = proc.stdout.strip()
    final = _wait(job, 300)[0]
    log = (REPO / "logs" / "slurm" / f"vfm-ddp-{job}.out").read_text()
    assert final["JobState"] == "COMPLETED", log[-4000:]
    assert "torch.distributed.run --nnodes=1 --nproc_per_node=2 --rdzv_backend=c10d" in log, log[-4000:]
    run_log = (run_dir / "run.log").read_text()
    assert "[ddp] rank 0 of 2 (local rank 0)" in run_log and "[ddp] rank 1 of 2 (local rank 1)" in run_log
    assert torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["step"] == 3
