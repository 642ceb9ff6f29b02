#!/usr/bin/env bash
# The body of sweeps/train.sbatch, sweeps/worker.sbatch and sweeps/multinode.sbatch:
#   slurm_job.sh <repo> [-m] <run.py overrides...>              one process: run.py
#   slurm_job.sh <repo> --torchrun <head node> <overrides...>   this node's torchrun (one srun task per node):
#     --nnodes=$SLURM_NNODES, --nproc_per_node=$VFM_NPROC_PER_NODE (default: $SLURM_GPUS_ON_NODE, else 1), c10d
#     rendezvous at <head node>:$VFM_RDZV_PORT (default 29500) with id $SLURM_JOB_ID
# Runs run.py from the repository with its .venv (or VFM_PYTHON), exec'd so that the batch shell's signals
# (--signal=B:USR1@N) reach Python; torchrun itself ignores USR1 (it would die of it) and its workers install their
# own handler. A single run (not -m) gets the run directory logs/<task>/<mode>/slurm-<job id>/ unless
# hydra.run.dir is given: a requeued job finds its last.pt there.
set -euo pipefail
repo=$1; shift
cd "$repo"
python=${VFM_PYTHON:-$repo/.venv/bin/python}
if [ ! -x "$python" ]; then
  echo "slurm_job.sh: $python not found: run 'make install' in $repo or set VFM_PYTHON" >&2
  exit 2
fi
launcher=("$python")
if [ "${1:-}" = "--torchrun" ]; then
  head=$2; shift 2
  trap "" USR1
  launcher=("$python" -m torch.distributed.run --nnodes="${SLURM_NNODES:-1}"
            --nproc_per_node="${VFM_NPROC_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}" --rdzv_backend=c10d
            --rdzv_endpoint="$head:${VFM_RDZV_PORT:-29500}" --rdzv_id="${SLURM_JOB_ID}")
fi
extra=()
if [ "${1:-}" != "-m" ] && [ "${1:-}" != "--multirun" ] && ! printf '%s\n' "$@" | grep -q '^hydra\.run\.dir='; then
  extra=("hydra.run.dir=\${paths.log_dir}/\${task.name}/\${mode}/slurm-${SLURM_JOB_ID}")
fi
echo "[slurm] job ${SLURM_JOB_ID} (restart ${SLURM_RESTART_COUNT:-0}) on $(hostname): ${launcher[*]} run.py $* ${extra[*]}"
exec "${launcher[@]}" run.py "$@" "${extra[@]}"
