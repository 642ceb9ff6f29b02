#!/usr/bin/env bash
# The body of sweeps/train.sbatch and sweeps/worker.sbatch: slurm_job.sh <repo> [-m] <run.py overrides...>
# Runs run.py from the repository with its .venv (or VFM_PYTHON), exec'd so that the batch shell's signals
# (--signal=B:USR1@N) reach Python. A single run (no -m) gets the run directory
# logs/<task>/<mode>/slurm-<job id>/ unless hydra.run.dir is given: a requeued job finds its last.pt there.
set -euo pipefail
repo=$1; shift
cd "$repo"
python=${VFM_PYTHON:-$repo/.venv/bin/python}
if [ ! -x "$python" ]; then
  echo "slurm_job.sh: $python not found: run 'make install' in $repo or set VFM_PYTHON" >&2
  exit 2
fi
extra=()
if [ "${1:-}" != "-m" ] && [ "${1:-}" != "--multirun" ] && ! printf '%s\n' "$@" | grep -q '^hydra\.run\.dir='; then
  extra=("hydra.run.dir=\${paths.log_dir}/\${task.name}/\${mode}/slurm-${SLURM_JOB_ID}")
fi
echo "[slurm] job ${SLURM_JOB_ID} (restart ${SLURM_RESTART_COUNT:-0}) on $(hostname): $python run.py $* ${extra[*]}"
exec "$python" run.py "$@" "${extra[@]}"
