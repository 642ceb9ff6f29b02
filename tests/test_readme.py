"""Every command in README.md's bash blocks runs as written from a fresh copy of the repository.

Commands that train are made smoke-sized by appending overrides (never by editing them): one short epoch, and a
budget of two trials for sweeps. Each block runs as one bash script, in order, so a block may use what an
earlier command of it wrote; blocks that use one Optuna study (`sweeps=<space>`, `logs/sweeps/<space>`) run in README
order in one copy (one xdist group), as a reader runs them. Blocks indented in a list item run too. `make test` is
the command running this test, so it is the one command not run. One block (OFFLINE_BLOCK, the first experiment
commands) runs with the default tracker as a user has it, wandb offline, and its offline run must hold the summary.
"""
from __future__ import annotations

import glob
import json
import os
import re
import textwrap
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cli import REPO

pytestmark = pytest.mark.slow   # runs run.py end to end (make test-fast leaves it out)

SMOKE_TRAIN = ["trainer.max_epochs=1", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1"]
SMOKE_SWEEP = ["hydra.sweeper.budget=2"]
SMOKE_DEMO = "DEMO_ARGS='trainer.max_epochs=1 trainer.limit_train_batches=2 trainer.limit_val_batches=1'"
NOT_RUN = {"make test": "the command that runs this test"}
OFFLINE_BLOCK = ".venv/bin/python run.py task=sclera"      # its first line; its training run: logs/readme/sclera
OFFLINE_RUN = "logs/readme/sclera"


def bash_blocks(markdown: str) -> list[str]:
    """Fenced bash blocks, those indented inside list items included (their indentation removed)."""
    return [textwrap.dedent(body) for _, body in
            re.findall(r"^( *)```bash\n(.*?)^\1```", markdown, flags=re.MULTILINE | re.DOTALL)]


def logical_lines(block: str) -> list[str]:
    """Lines with backslash continuations joined and comments dropped; blank lines left out."""
    joined = re.sub(r"\\\n\s*", " ", block)
    lines = []
    for line in joined.splitlines():
        tokens = shlex.split(line, comments=True)
        if tokens:
            lines.append(line.split(" #", 1)[0].strip() if " #" in line else line.strip())
    return lines


def smoke_sized(line: str) -> str:
    """The line with smoke overrides appended to each run.py / make demo invocation."""
    background = line.endswith("&")
    command = line[:-1].rstrip() if background else line
    tokens = shlex.split(command)
    if any(t.endswith("run.py") for t in tokens) and not any(t in ("--help", "-h", "--cfg") for t in tokens):
        mode = next((t.split("=", 1)[1] for t in tokens if t.startswith("mode=")), "train")
        if mode in ("train", "cv"):
            command += " " + " ".join(SMOKE_TRAIN)
        if "-m" in tokens and any(t.startswith("sweeps=") for t in tokens):
            command += " " + " ".join(SMOKE_SWEEP)
    if tokens[:2] == ["make", "demo"]:
        command += " " + SMOKE_DEMO
    return command + (" &" if background else "")


def readme_scripts() -> list:
    """(first line, script) per block; the blocks of one Optuna study share an xdist group (module docstring)."""
    scripts = []
    for block in bash_blocks((REPO / "README.md").read_text()):
        lines = [line for line in logical_lines(block) if line not in NOT_RUN]
        if lines:
            body = "\n".join(smoke_sized(line) for line in lines)
            studies = sorted(set(re.findall(r"sweeps[=/](\w+)", block)))
            marks = [pytest.mark.xdist_group(f"readme-study-{studies[0]}")] if studies else []
            scripts.append(pytest.param(lines[0][:60], f"set -euo pipefail\n{body}\nwait\n", marks=marks,
                                        id=lines[0][:60]))
    return scripts


def summary_value(run_file: Path, key: str) -> float:
    """The last value of `key` in the run summaries a wandb offline run file holds (protobuf SummaryItem: the key,
    then field 16, value_json, length-prefixed: `\\x82\\x01<length><json>`; values here are under 128 bytes)."""
    blob = run_file.read_bytes()
    found = [m.end() for m in re.finditer(re.escape(key.encode()) + rb"\x82\x01", blob)]
    assert found, f"no summary item {key} in {run_file}"
    return float(blob[found[-1] + 1: found[-1] + 1 + blob[found[-1]]].decode())


@pytest.fixture(scope="module")
def fresh_copy(tmp_path_factory) -> Path:
    """The tracked and untracked-but-not-ignored files (a clone of the working tree), sharing the running venv
    (.venv/, or .venv-modern/ when the modern line runs the test)."""
    copy = tmp_path_factory.mktemp("clone")
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, check=True,
                            capture_output=True, text=True).stdout.split("\0")
    for rel in filter(None, listed):
        source, target = REPO / rel, copy / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_symlink():                                # e.g. conf/sweeps -> ../sweeps
            target.symlink_to(os.readlink(source))
        elif source.is_file():
            shutil.copy2(source, target)                       # mtimes kept: make sees the .venv up to date
    (copy / ".venv").symlink_to(sys.prefix)        # the venv of the dependency line running this test
    return copy


def test_readme_has_the_two_commands_and_ci_runs_the_test_one():
    lines = [line for block in bash_blocks((REPO / "README.md").read_text()) for line in logical_lines(block)]
    assert "make demo" in lines and "make test" in lines
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    assert "make test" in ci and "make test-slurm" in ci     # the Slurm tests make test leaves out


def test_synthetic_datasets_default_to_the_cache_folder(monkeypatch, tmp_path):
    from hydra import compose, initialize_config_dir
    monkeypatch.delenv("VFM_SYNTH_DIR")
    monkeypatch.delenv("VFM_ROOT", raising=False)
    monkeypatch.delenv("VFM_CACHE", raising=False)
    monkeypatch.chdir(tmp_path)
    from common.utils.hydra_lines import version_base
    with initialize_config_dir(str(REPO / "conf"), **version_base()):
        cfg = compose("config", ["task=sclera"])
    assert cfg.paths.synth_dir == str(tmp_path / ".cache" / "synthetic")


def test_smoke_sizing_only_appends():
    line = ".venv/bin/python run.py -m task=sclera sweeps=sclera_adapters peft.r=8 &"
    sized = smoke_sized(line)
    assert sized.startswith(line[:-2]) and sized.endswith(" &")
    assert all(o in sized for o in SMOKE_TRAIN + SMOKE_SWEEP)
    assert smoke_sized(".venv/bin/python run.py task=sclera mode=eval ckpt_path=x") == \
        ".venv/bin/python run.py task=sclera mode=eval ckpt_path=x"


def test_indented_blocks_are_found_and_dedented():
    markdown = "- item:\n  ```bash\n  echo one \\\n      two\n  ```\n\n```bash\necho three\n```\n"
    assert bash_blocks(markdown) == ["echo one \\\n    two\n", "echo three\n"]
    indented = [s for s in readme_scripts() if "task.submission.team=CGDSeg" in s.values[1]]
    assert len(indented) == 1 and "\n  " not in indented[0].values[1]


@pytest.mark.parametrize("first_line, script", readme_scripts())
def test_readme_block_runs_as_written(fresh_copy, first_line, script):
    # A fresh environment, except the session's synthetic datasets (VFM_SYNTH_DIR): generating them again in the
    # copy's .cache/synthetic/ took a minute of each block (the default location is tested in
    # test_synthetic_datasets_default_to_the_cache_folder).
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("VFM_", "OPTUNA_", "SWEEP_")) or k == "VFM_SYNTH_DIR"}
    offline = first_line == OFFLINE_BLOCK[:60]
    env.update(WANDB_MODE="offline" if offline else "disabled", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(["bash", "-c", script], cwd=fresh_copy, env=env, capture_output=True, text=True,
                          timeout=1200)
    assert proc.returncode == 0, f"{script}\n--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-5000:]}"
    if offline:             # the default tracker: the training run's offline wandb run holds its best value
        run = fresh_copy / OFFLINE_RUN
        best = json.loads((run / "metrics.json").read_text())["best"]
        [run_file] = glob.glob(str(run / "wandb" / "offline-run-*" / "run-*.wandb"))
        monitor = str(json.loads((run / "metrics.json").read_text())["monitor"])
        assert summary_value(Path(run_file), f"best/{monitor}") == pytest.approx(best[monitor], rel=1e-12)


def test_one_block_runs_with_wandb_offline():
    assert [s for s in readme_scripts() if s.values[0] == OFFLINE_BLOCK[:60] and OFFLINE_RUN in s.values[1]]
