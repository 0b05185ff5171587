"""Elastic runs on Slurm (cluster.min_nodes): `sbatch --nodes=MIN-MAX` starts a run on what is free.

Slurm starts a range job on its fewest nodes even where more are idle (measured on Slurm 22.05), so
each job of an elastic run asks for the nodes it can count on as its lower bound (lower_bound). A job requeued in place keeps its first start's task count
(measured on Slurm 22.05), which pins
every later start to that many nodes, so an elastic run's next start is a new job its rank 0
submits (launcher.backends.slurm_rank.submit_again), asking for at least the nodes it can count on. With cluster.grow, rank 0 asks at checkpoints (at most every
cluster.grow_check_s) whether idle nodes of the partition outnumber what its pending jobs want; if
so the run stops at its next step boundary, saved, and starts again on more nodes.
"""

import logging
import subprocess
import time
from typing import Any, Callable, Dict, Optional, Tuple, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")


def _count(cmd) -> Optional[int]:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return sum(int(line) for line in out.stdout.split() if line.strip().isdigit())


def idle_nodes(partition: Optional[str]) -> Optional[int]:
    """The partition's idle nodes, each once (None: the default partition, marked * by sinfo)."""
    try:
        out = subprocess.run(["sinfo", "-h", "-N", "-t", "idle", "-o", "%N %P"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    names = set()
    for line in out.stdout.splitlines():
        node, _, part = line.strip().partition(" ")
        if (part.rstrip("*") == partition) if partition else part.endswith("*"):
            names.add(node)
    return len(names)


def spare_nodes(partition: Optional[str]) -> Optional[int]:
    """Idle nodes of the partition less the nodes its pending jobs ask for (None: Slurm did not answer)."""
    idle = idle_nodes(partition)
    wanted = _count(["squeue", "-h", "-t", "PENDING", "-o", "%D", *(["-p", partition] if partition else [])])
    if idle is None or wanted is None:
        return None
    return idle - wanted


NARROWING = ("exclude", "constraint", "nodelist", "nodefile", "clusters", "reservation")  # sbatch options


def narrows_nodes(cluster) -> bool:
    """Whether the job may use only some of its partition's nodes."""
    extra = dict(cluster.sbatch_extra or {})
    return bool(cluster.exclude or cluster.constraint or any(extra.get(k) for k in NARROWING))


def lower_bound(cluster, own: int = 0, sharing: int = 1) -> int:
    """The fewest nodes a job of an elastic run asks for: the nodes it can count on, within the range.
    Slurm (22.05, select/cons_tres, measured) starts a `--nodes=MIN-MAX` job on MIN nodes even on an
    idle cluster, so the range's own minimum would start a 2-8 node run on 2 of 8 idle nodes.
    `own`: the nodes the job before it holds and gives back (a restart); `sharing`: the jobs that start
    together (a sweep's array) and share the idle ones. A job that narrows the nodes it may use
    (cluster.exclude, cluster.constraint, a nodelist in sbatch_extra) cannot count the partition's
    idle nodes as its own."""
    spare = 0 if narrows_nodes(cluster) else max(0, spare_nodes(cluster.partition) or 0)
    return max(cluster.min_nodes, min(cluster.nodes, own + spare // max(1, sharing)))


def submit_with_bound(submit: Callable[[Dict[str, Any]], T], params: Dict[str, Any], low: int, cluster,
                      say: Callable[[str], None]) -> Tuple[T, int]:
    """submit(params) with --nodes=LOW-MAX, and with MIN-MAX if sbatch refuses that bound (the idle
    nodes counted were not all the job's to have: "Requested node configuration is not available").
    Returns what submit returned and the bound it was given."""
    params["additional_parameters"]["nodes"] = f"{low}-{cluster.nodes}"
    try:
        return submit(params), low
    except Exception as error:  # noqa: BLE001 - sbatch's refusal, as submitit raises it
        if low == cluster.min_nodes:
            raise
        reason = (str(error).strip().splitlines() or [type(error).__name__])[-1][:200]
        say(f"sbatch refused --nodes={low}-{cluster.nodes} ({reason}); asking for {cluster.min_nodes}-{cluster.nodes}")
        params["additional_parameters"]["nodes"] = f"{cluster.min_nodes}-{cluster.nodes}"
        return submit(params), cluster.min_nodes


class GrowCheck:
    """Rank 0's question at a checkpoint: would a requeue now start on more nodes?"""

    def __init__(self, partition: Optional[str], nodes_now: int, max_nodes: int, every_s: float):
        self.partition, self.nodes_now, self.max_nodes, self.every_s = partition, nodes_now, max_nodes, every_s
        self.asked_at = time.monotonic()  # the first question an interval after the start: no grow loop

    def __call__(self) -> bool:
        if self.nodes_now >= self.max_nodes:
            return False
        now = time.monotonic()
        if now - self.asked_at < self.every_s:
            return False
        self.asked_at = now
        spare = spare_nodes(self.partition)
        if spare is not None and spare > 0:
            log.info("%d node(s) of partition %s idle and unclaimed; this run holds %d of up to %d", spare,
                     self.partition or "(default)", self.nodes_now, self.max_nodes)
            return True
        return False
