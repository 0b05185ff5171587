"""Elastic runs on Slurm (cluster.min_nodes): `sbatch --nodes=MIN-MAX` starts a run on what is free.

Slurm starts a range job on its fewest nodes even where more are idle (measured on Slurm 22.05), so
each job of an elastic run asks for the nodes it can count on as its lower bound (first_bound for
the first, spare_nodes for the next). A job requeued in place keeps its first start's task count
(measured on Slurm 22.05), which pins
every later start to that many nodes, so an elastic run's next start is a new job its rank 0
submits (launcher.backends.slurm_rank.submit_again), asking for at least the nodes it can count on
(spare_nodes here). With cluster.grow, rank 0 asks at checkpoints (at most every
cluster.grow_check_s) whether idle nodes of the partition outnumber what its pending jobs want; if
so the run stops at its next step boundary, saved, and starts again on more nodes.
"""

import logging
import subprocess
import time
from typing import Optional

log = logging.getLogger(__name__)


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
    extra = dict(getattr(cluster, "sbatch_extra", None) or {})
    return bool(getattr(cluster, "exclude", None) or getattr(cluster, "constraint", None)
                or any(extra.get(k) for k in NARROWING))


def first_bound(cluster, starting: int = 1) -> int:
    """The fewest nodes an elastic run's first job asks for: the partition's idle, unclaimed nodes,
    shared among the `starting` jobs that start together (a sweep's array), within the range. Slurm
    (22.05, select/cons_tres, measured) starts a `--nodes=MIN-MAX` job on MIN nodes even on an idle
    cluster, so the range's own minimum would start a 2-8 node run on 2 of 8 idle nodes. A job that
    narrows the nodes it may use (cluster.exclude, cluster.constraint, a nodelist in sbatch_extra)
    cannot count the partition's idle nodes as its own: it asks for the range's minimum."""
    if narrows_nodes(cluster):
        return cluster.min_nodes
    spare = spare_nodes(cluster.partition)
    if not spare or spare <= 0:
        return cluster.min_nodes
    return max(cluster.min_nodes, min(cluster.nodes, spare // max(1, starting)))


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
