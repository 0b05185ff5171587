"""Login-node checks of a Slurm submission: the partition exists and can hold the job."""

import functools
import re
import subprocess
from dataclasses import dataclass
from typing import List, Optional

from launcher.errors import ConfigError, problem
from launcher.plan import default_procs_per_node


@dataclass
class Partition:
    name: str
    default: bool
    max_time_min: Optional[int]  # None: unlimited
    total_nodes: int
    max_nodes: Optional[int]  # per job; None: unlimited
    gpus_per_node: int
    cpus_per_node: int
    gpu_type: Optional[str] = None  # a launcher.devices.GPUS name, when the GRES type says it


def gpu_type(gres: str) -> Optional[str]:
    """The known GPU a partition's GRES names ("gpu:h100:8" -> "h100"), if any; "a100" alone is
    ambiguous (40 or 80 GB) and names none."""
    from launcher.devices import GPUS

    for kind in re.findall(r"gpu:([A-Za-z][\w-]*):\d+", gres):
        kind = kind.lower().replace("-", "_").replace("gb", "g")
        if kind in GPUS:
            return kind
    return None


def parse_slurm_minutes(text: str) -> Optional[int]:
    """Slurm's [days-]hours:minutes:seconds (or minutes, or UNLIMITED) as minutes."""
    if text.upper() in ("UNLIMITED", "INFINITE", "NONE"):
        return None
    days, _, rest = text.rpartition("-")
    parts = [int(p) for p in rest.split(":")]
    if len(parts) == 1:
        h, m, s = 0, parts[0], 0
    elif len(parts) == 2:
        h, m, s = 0, parts[0], parts[1]
    else:
        h, m, s = parts
    return int(days or 0) * 1440 + h * 60 + m + (1 if s else 0)


@functools.lru_cache(maxsize=1)  # once per command, however many sweep points
def read_partitions() -> tuple:
    try:
        out = subprocess.run(["scontrol", "show", "partition", "-o"], capture_output=True, text=True, timeout=30, check=True).stdout
    except FileNotFoundError:
        raise ConfigError([problem("cluster", "slurm", "scontrol is not on PATH: submit from a Slurm login node (or cluster=local)")])
    except subprocess.CalledProcessError as exc:
        raise ConfigError([problem("cluster", "slurm", f"cannot reach the Slurm controller: {exc.stderr.strip()}")])
    except subprocess.TimeoutExpired:
        raise ConfigError([problem("cluster", "slurm", "the Slurm controller did not answer `scontrol show partition` in 30 s")])
    partitions = []
    for line in out.splitlines():
        fields = dict(item.split("=", 1) for item in line.split() if "=" in item)
        node_info = subprocess.run(["sinfo", "-h", "-p", fields["PartitionName"], "-o", "%G|%c"], capture_output=True, text=True, timeout=30).stdout
        gpus = max((int(m) for m in re.findall(r"gpu(?::[\w-]+)?:(\d+)", node_info)), default=0)
        cpus = max((int(m) for m in re.findall(r"\|(\d+)", node_info)), default=0)
        partitions.append(Partition(
            name=fields["PartitionName"], default=fields.get("Default") == "YES",
            max_time_min=parse_slurm_minutes(fields.get("MaxTime", "UNLIMITED")),
            total_nodes=int(fields.get("TotalNodes", 0)), gpus_per_node=gpus, cpus_per_node=cpus,
            max_nodes=None if fields.get("MaxNodes", "UNLIMITED") == "UNLIMITED" else int(fields["MaxNodes"]),
            gpu_type=gpu_type(node_info),
        ))
    return tuple(partitions)


def partition_gpu(cluster) -> Optional[str]:
    """The known GPU of the partition a job would land on, or None (no Slurm here, untyped GRES)."""
    try:
        partitions = read_partitions()
    except ConfigError:
        return None
    wanted = [p for p in partitions if (p.name == cluster.partition if cluster.partition else p.default)]
    return wanted[0].gpu_type if wanted else None


def find_partition(key: str, name: Optional[str], partitions: List[Partition]) -> Partition:
    """The partition `name` (None: the default one); else ConfigError naming `key` and the valid ones."""
    names = [p.name for p in partitions]
    if name is None:
        chosen = next((p for p in partitions if p.default), None)
        if chosen is None:
            raise ConfigError([problem(key, None, f"the cluster has no default partition; choose one of {', '.join(names)}")])
    else:
        chosen = next((p for p in partitions if p.name == name), None)
        if chosen is None:
            raise ConfigError([problem(key, name, f"no such partition; valid: {', '.join(names)}")])
    return chosen


def check_partition(cluster, partitions: List[Partition]) -> Partition:
    """The partition the job would land on, if it fits; else ConfigError naming what does not."""
    chosen = find_partition("cluster.partition", cluster.partition, partitions)
    problems = []
    if chosen.max_time_min is not None and cluster.time_min > chosen.max_time_min:
        problems.append(problem("cluster.time_min", cluster.time_min, f"must be <= partition {chosen.name}'s MaxTime ({chosen.max_time_min} min)"))
    if cluster.nodes > chosen.total_nodes:
        problems.append(problem("cluster.nodes", cluster.nodes, f"must be <= the {chosen.total_nodes} nodes of partition {chosen.name}"))
    elif chosen.max_nodes is not None and cluster.nodes > chosen.max_nodes:
        problems.append(problem("cluster.nodes", cluster.nodes, f"must be <= partition {chosen.name}'s MaxNodes ({chosen.max_nodes}) per job"))
    if cluster.gpus_per_node > chosen.gpus_per_node:
        problems.append(problem("cluster.gpus_per_node", cluster.gpus_per_node, f"must be <= the {chosen.gpus_per_node} GPUs per node of partition {chosen.name}"))
    tasks = default_procs_per_node(cluster)
    if chosen.cpus_per_node and tasks * cluster.cpus_per_task > chosen.cpus_per_node:
        problems.append(problem("cluster.cpus_per_task", cluster.cpus_per_task, f"x {tasks} tasks per node must be <= the {chosen.cpus_per_node} CPUs per node of partition {chosen.name}"))
    if problems:
        raise ConfigError(problems)
    return chosen


def check_eval_partition(cfg, partitions: List[Partition]) -> Optional[Partition]:
    """eval.harness's jobs (one node, one task) fit the partition they go to, checked with the training's
    so that a typo there is not found when the first checkpoint's eval is submitted. None: no evals."""
    h = cfg.eval.harness
    if not h.tasks:
        return None
    key = "eval.harness.partition" if h.partition else "cluster.partition"
    chosen = find_partition(key, h.partition or cfg.cluster.partition, partitions)
    problems = []
    if chosen.max_time_min is not None and h.time_min > chosen.max_time_min:
        problems.append(problem("eval.harness.time_min", h.time_min, f"must be <= partition {chosen.name}'s MaxTime ({chosen.max_time_min} min)"))
    if h.gpus > chosen.gpus_per_node:
        problems.append(problem("eval.harness.gpus", h.gpus, f"must be <= the {chosen.gpus_per_node} GPUs per node of partition {chosen.name}"
                                + (" (0: score on CPUs)" if not chosen.gpus_per_node else "")))
    if chosen.cpus_per_node and h.cpus > chosen.cpus_per_node:
        problems.append(problem("eval.harness.cpus", h.cpus, f"must be <= the {chosen.cpus_per_node} CPUs per node of partition {chosen.name}"))
    if problems:
        raise ConfigError(problems)
    return chosen
