#!/usr/bin/env bash
# Start a one-node Slurm cluster on this machine (CI, or a laptop to try the suite's Slurm path), as root:
#   sudo .ci/slurm_up.sh            # installs slurm-wlm + munge with apt when missing, configures, starts, waits
#   sudo .ci/slurm_up.sh --down     # stops the daemons this script started
# The node offers this machine's CPUs and memory (no GPUs), one partition `debug`, requeue allowed
# (JobRequeue=1), process tracking without cgroups (proctrack/linuxproc, task/none). The config goes to
# /etc/slurm/slurm.conf (an existing one is kept as slurm.conf.bak once). Exits non-zero, with the daemons'
# logs, when the node is not idle within SLURM_UP_TIMEOUT seconds (default 60).
set -euo pipefail

CONF_DIR=/etc/slurm
LOG_DIR=/var/log/slurm
TIMEOUT=${SLURM_UP_TIMEOUT:-60}

die() { echo "slurm_up: $*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "run as root (sudo $0): it installs packages and starts slurmctld, slurmd and munged"

stop_daemons() {
  for pidfile in /run/slurmd.pid /run/slurmctld.pid; do
    if [ -s "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then kill "$(cat "$pidfile")"; fi
  done
}

if [ "${1:-}" = "--down" ]; then stop_daemons; exit 0; fi

install_packages() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null \
      && command -v sinfo >/dev/null; then return; fi
  command -v apt-get >/dev/null || die "slurm-wlm and munge are missing and apt-get is not available: install them"
  echo "slurm_up: installing slurm-wlm and munge (apt)"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
}

start_munge() {
  if munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then return; fi
  [ -s /etc/munge/munge.key ] || mungekey --create --keyfile=/etc/munge/munge.key
  chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
  mkdir -p /run/munge && chown munge:munge /run/munge
  runuser -u munge -- /usr/sbin/munged || die "munged did not start"
  munge -n </dev/null | unmunge >/dev/null || die "munge does not work (munge -n | unmunge failed)"
}

write_config() {
  local host node_line cpus mem slurm_user
  host=$(hostname -s)
  node_line=$(slurmd -C | head -n 1)                  # NodeName=<host> CPUs=.. ... RealMemory=..
  cpus=$(sed -n 's/.* CPUs=\([0-9]*\).*/\1/p' <<<"$node_line")
  mem=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$node_line")
  [ -n "$cpus" ] && [ -n "$mem" ] || die "could not read CPUs / RealMemory from 'slurmd -C': $node_line"
  slurm_user=slurm; id slurm >/dev/null 2>&1 || slurm_user=root
  mkdir -p "$CONF_DIR" "$LOG_DIR" /var/spool/slurmctld /var/spool/slurmd
  chown "$slurm_user" "$LOG_DIR" /var/spool/slurmctld
  if [ -f "$CONF_DIR/slurm.conf" ] && [ ! -f "$CONF_DIR/slurm.conf.bak" ]; then
    cp "$CONF_DIR/slurm.conf" "$CONF_DIR/slurm.conf.bak"
  fi
  cat >"$CONF_DIR/slurm.conf" <<EOF
# written by vfm-suite .ci/slurm_up.sh: one node, no GPUs, requeue allowed
ClusterName=vfm
SlurmctldHost=$host(127.0.0.1)
SlurmUser=$slurm_user
AuthType=auth/munge
AuthInfo=cred_expire=20
# ^ a requeued job waits cred_expire seconds before it may start again (default 120)
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobRequeue=1
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=$((mem / cpus))
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
KillWait=30
MinJobAge=600
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
  echo "slurm_up: $CONF_DIR/slurm.conf: node $host, $cpus CPUs, $mem MB, partition debug"
}

node_state() { sinfo -h -N -o %T 2>/dev/null | head -n 1 | tr -d '*~#'; }

show_logs_and_die() {
  echo "---- sinfo" >&2; sinfo -N -l >&2 || true
  for log in "$LOG_DIR/slurmctld.log" "$LOG_DIR/slurmd.log"; do
    echo "---- $log (last 30 lines)" >&2; tail -n 30 "$log" >&2 2>/dev/null || true
  done
  die "$1"
}

install_packages
if [ "$(node_state)" = "idle" ]; then echo "slurm_up: already up ($(sinfo -h -o '%P %D %T'))"; exit 0; fi
start_munge
stop_daemons
write_config
slurmctld || show_logs_and_die "slurmctld did not start"
slurmd || show_logs_and_die "slurmd did not start"
for _ in $(seq "$TIMEOUT"); do
  state=$(node_state)
  if [ "$state" = "idle" ]; then echo "slurm_up: node idle ($(sinfo -h -o '%P %D %c CPUs %m MB'))"; exit 0; fi
  if [ "$state" = "down" ] || [ "$state" = "drained" ]; then
    scontrol update nodename="$(hostname -s)" state=resume || true
  fi
  sleep 1
done
show_logs_and_die "the node is not idle after ${TIMEOUT}s (state: '$(node_state)')"
