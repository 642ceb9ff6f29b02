"""Submit sweeps/train.sbatch, worker.sbatch or multinode.sbatch with the resources you name, checked before queueing.

    python -m common.cluster.slurm_submit [--nodes N] [--gpus N] [--cpus N] [--mem 32G] [--time 24:00:00] [--partition P]
                                  [--account A] [--array 0-7] [--signal-s 120] [--dry-run] SCRIPT [overrides...]

Defaults come from VFM_SLURM_GPUS (1), VFM_SLURM_CPUS (8), VFM_SLURM_MEM (32G), VFM_SLURM_TIME (24:00:00),
VFM_SLURM_PARTITION (the cluster's default) and VFM_SLURM_ACCOUNT (none). A request the partition cannot satisfy
(too many GPUs, CPUs or memory for its largest node, a time over its MaxTime, an unknown partition) is refused
here with the reason and the flag to change, instead of pending forever; then `sbatch --test-only` checks the
rest. Logs: <repo>/logs/slurm/<job name>-<job id>.out (an array task's: <job name>-<array job id>_<task>.out),
appended across requeues.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[2]
DEFAULTS = {"gpus": "1", "cpus": "8", "mem": "32G", "time": "24:00:00", "partition": "", "account": ""}


class RequestError(ValueError):
    """A resource request the cluster cannot satisfy."""


@dataclass
class Partition:
    name: str
    max_minutes: float            # inf when UNLIMITED
    max_cpus: int                 # of its largest node (and MaxCPUsPerNode)
    max_mem_mb: int               # of its largest node (and MaxMemPerNode)
    max_gpus: int                 # GPUs (gres gpu) of its best-equipped node
    max_nodes: int                # its nodes (and MaxNodes)


def minutes(value: str) -> float:
    """Slurm time formats: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S; UNLIMITED / INFINITE."""
    if value.upper() in ("UNLIMITED", "INFINITE"):
        return float("inf")
    days, _, rest = value.rpartition("-")
    parts = [int(p) for p in rest.split(":")]
    if days:
        h, m, s = (parts + [0, 0])[:3]
    elif len(parts) == 3:
        h, m, s = parts
    else:
        h, m, s = 0, parts[0], parts[1] if len(parts) == 2 else 0
    return int(days or 0) * 1440 + h * 60 + m + s / 60


def megabytes(value: str) -> int:
    found = re.fullmatch(r"(\d+)([KMGT]?)B?", value.strip().upper())
    if not found:
        raise RequestError(f"--mem {value!r}: expected a size such as 32G, 16000M or 16000 (MB)")
    scale = {"K": 1 / 1024, "": 1, "M": 1, "G": 1024, "T": 1024 ** 2}[found.group(2)]
    return int(int(found.group(1)) * scale)


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except FileNotFoundError as err:
        raise RequestError(f"{cmd[0]} not found: is this a Slurm login node? ({err})") from err


def _gpus_of(gres: str) -> int:
    return sum(int(n) for n in re.findall(r"gpu(?::[^:(,]+)?:(\d+)", gres))


def partition_info(name: str, flag: str = "--partition ") -> Partition:
    """The partition's limits (`scontrol show partition`) and its largest nodes (`sinfo`); '' = the default.
    flag: how the caller's users name the partition (with its separator)."""
    listed = _run(["sinfo", "-h", "-o", "%P"]).stdout.split()
    names = [p.rstrip("*") for p in listed]
    if not name:
        defaults = [p.rstrip("*") for p in listed if p.endswith("*")]
        if not defaults:
            raise RequestError(f"the cluster has no default partition: pass {flag}<name> (one of {', '.join(names)})")
        name = defaults[0]
    if name not in names:
        raise RequestError(f"{flag}{name}: no such partition; available: {', '.join(names)}")
    fields = dict(re.findall(r"(\w+)=(\S+)", _run(["scontrol", "show", "partition", name, "-o"]).stdout))
    nodes = [line.split("|") for line in _run(["sinfo", "-h", "-N", "-p", name, "-o", "%c|%m|%G"]).stdout.split()]
    max_cpus = max(int(c) for c, _, _ in nodes)
    max_mem = max(int(m.rstrip("+")) for _, m, _ in nodes)
    if fields.get("MaxCPUsPerNode", "UNLIMITED") != "UNLIMITED":
        max_cpus = min(max_cpus, int(fields["MaxCPUsPerNode"]))
    if fields.get("MaxMemPerNode", "UNLIMITED") != "UNLIMITED":
        max_mem = min(max_mem, int(fields["MaxMemPerNode"]))
    max_nodes = len(nodes)
    if fields.get("MaxNodes", "UNLIMITED") != "UNLIMITED":
        max_nodes = min(max_nodes, int(fields["MaxNodes"]))
    return Partition(name, minutes(fields.get("MaxTime", "UNLIMITED")), max_cpus, max_mem,
                     max(_gpus_of(g) for _, _, g in nodes), max_nodes)


@dataclass(frozen=True)
class Flags:
    """How a launch path spells each resource (for its messages) and reads the value given for it."""
    nodes: str
    gpus: str
    cpus: str
    mem: str
    time: str
    sep: str                                  # between flag and value: " " (a command line) or "=" (an override)
    mem_mb: Callable[[str], int]              # the given memory value -> MB
    mem_value: Callable[[int], str]           # MB -> the value to pass
    time_minutes: Callable[[str], float]


CLI_FLAGS = Flags("--nodes", "--gpus", "--cpus", "--mem", "--time", " ", lambda v: megabytes(str(v)), lambda mb: f"{mb}M",
                  lambda v: minutes(str(v)))


def check_request(args, part: Partition, flags: Flags = CLI_FLAGS) -> None:
    """Refuse, naming the flag to change and the limit, what the partition cannot run. `args` holds nodes, gpus and
    cpus (per node) and mem / time as given."""
    def given(name: str, value=None) -> str:
        return f"{getattr(flags, name)}{flags.sep}{getattr(args, name) if value is None else value}"

    problems = []
    if args.nodes > part.max_nodes:
        problems.append(f"{given('nodes')}: partition {part.name} has {part.max_nodes} nodes (or MaxNodes); "
                        f"pass {given('nodes', part.max_nodes)} or less")
    if args.gpus > part.max_gpus:
        have = f"at most {part.max_gpus} GPUs per node" if part.max_gpus else "no GPUs (no gpu GRES)"
        problems.append(f"{given('gpus')}: partition {part.name} has {have}; pass {given('gpus', part.max_gpus)} "
                        f"or a GPU partition")
    if args.cpus > part.max_cpus:
        problems.append(f"{given('cpus')}: the largest node of partition {part.name} has {part.max_cpus} CPUs; "
                        f"pass {given('cpus', part.max_cpus)} or less")
    if flags.mem_mb(args.mem) > part.max_mem_mb:
        problems.append(f"{given('mem')}: the largest node of partition {part.name} has {part.max_mem_mb} MB; "
                        f"pass {given('mem', flags.mem_value(part.max_mem_mb))} or less")
    if flags.time_minutes(args.time) > part.max_minutes:
        problems.append(f"{given('time')}: partition {part.name} allows at most {part.max_minutes:g} minutes "
                        f"(MaxTime); pass a shorter {flags.time}")
    if problems:
        raise RequestError("the request cannot run on this cluster:\n  " + "\n  ".join(problems))


# scripts whose work runs in srun steps: the signal goes to every process of the steps, not to the batch shell
SRUN_SCRIPTS = ("multinode.sbatch",)


def sbatch_options(args: argparse.Namespace, partition: str) -> list[str]:
    log_dir = REPO / "logs" / "slurm"
    signal = "" if Path(args.script).name in SRUN_SCRIPTS else "B:"
    options = [f"--partition={partition}", f"--nodes={args.nodes}", f"--cpus-per-task={args.cpus}",
               f"--mem={args.mem}", f"--time={args.time}", f"--signal={signal}USR1@{args.signal_s}", "--requeue",
               "--open-mode=append",
               f"--output={log_dir}/%x-{'%A_%a' if args.array else '%j'}.out", f"--export=ALL,VFM_REPO={REPO}"]
    if args.gpus:
        options.append(f"--gres=gpu:{args.gpus}")
    if args.account:
        options.append(f"--account={args.account}")
    if args.array:
        options.append(f"--array={args.array}")
    return options


def parse_args(argv: list[str]) -> argparse.Namespace:
    env = {k: os.environ.get(f"VFM_SLURM_{k.upper()}", v) for k, v in DEFAULTS.items()}
    parser = argparse.ArgumentParser(prog="python -m common.cluster.slurm_submit", description=__doc__.split("\n")[0])
    parser.add_argument("--nodes", type=int, default=1, help="nodes (sweeps/multinode.sbatch: one torchrun each)")
    parser.add_argument("--gpus", type=int, default=int(env["gpus"]), help="GPUs per node, 0 allowed (VFM_SLURM_GPUS)")
    parser.add_argument("--cpus", type=int, default=int(env["cpus"]), help="CPUs per task (VFM_SLURM_CPUS)")
    parser.add_argument("--mem", default=env["mem"], help="memory per node, e.g. 32G (VFM_SLURM_MEM)")
    parser.add_argument("--time", default=env["time"], help="time limit, e.g. 24:00:00 (VFM_SLURM_TIME)")
    parser.add_argument("--partition", default=env["partition"], help="partition (VFM_SLURM_PARTITION)")
    parser.add_argument("--account", default=env["account"], help="account (VFM_SLURM_ACCOUNT)")
    parser.add_argument("--array", default="", help="job array indices, e.g. 0-7 (sweep workers)")
    parser.add_argument("--signal-s", type=int, default=120, help="SIGUSR1 this many seconds before the limit")
    parser.add_argument("--dry-run", action="store_true", help="check and print the sbatch command only")
    parser.add_argument("script", help="sweeps/train.sbatch or sweeps/worker.sbatch")
    parser.add_argument("overrides", nargs=argparse.REMAINDER, help="run.py overrides")
    args = parser.parse_args(argv)
    if args.gpus < 0 or args.cpus < 1 or args.nodes < 1:
        parser.error(f"--gpus {args.gpus} / --cpus {args.cpus} / --nodes {args.nodes}: expected --gpus >= 0, "
                     f"--cpus >= 1 and --nodes >= 1")
    return args


def submit(argv: list[str]) -> str:
    """Check, then sbatch; returns the job id (or the command, with --dry-run)."""
    args = parse_args(argv)
    script = Path(args.script).resolve()
    if not script.is_file():
        raise RequestError(f"script {args.script}: no such file (expected sweeps/train.sbatch or sweeps/worker.sbatch)")
    part = partition_info(args.partition)
    check_request(args, part)
    cmd = ["sbatch", *sbatch_options(args, part.name)]
    test = _run([*cmd, "--test-only", str(script), *args.overrides])
    if test.returncode != 0:
        raise RequestError(f"sbatch --test-only refused the request: {(test.stderr + test.stdout).strip()}")
    if args.dry_run:
        return " ".join([*cmd, str(script), *args.overrides])
    (REPO / "logs" / "slurm").mkdir(parents=True, exist_ok=True)
    proc = _run([*cmd, "--parsable", str(script), *args.overrides])
    if proc.returncode != 0:
        raise RequestError(f"sbatch failed: {proc.stderr.strip()}")
    job = proc.stdout.strip().split(";")[0]
    log_name = "<name>-<job id>_<task>.out" if args.array else "<name>-<job id>.out"
    print(f"submitted job {job} to partition {part.name}; log: {REPO / 'logs' / 'slurm'}/{log_name}", file=sys.stderr)
    return job


def main() -> None:
    try:
        print(submit(sys.argv[1:]))
    except RequestError as err:
        sys.exit(f"slurm_submit: {err}")


if __name__ == "__main__":
    main()
