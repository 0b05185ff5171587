"""Elastic runs on Slurm (cluster.min_nodes): `sbatch --nodes=MIN-MAX` starts a run on what is free,
and each requeue takes what is free then.

- Growing: with cluster.grow, rank 0 asks at checkpoints (at most every cluster.grow_check_s) whether
  more of the range's nodes are idle than queued jobs of the partition want; if so the run stops at
  its next step boundary, saved, and requeues itself to start again on more nodes.
- Requeued jobs keep the task count of their first start, which would pin every later start to
  that many nodes: before it is requeued, the job's task count is set back to the range's minimum
  (Slurm then gives it as many nodes of the range as are free, one task per node times
  ntasks-per-node).
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


def spare_nodes(partition: Optional[str]) -> Optional[int]:
    """Idle nodes of the partition less the nodes its pending jobs ask for (None: Slurm did not answer)."""
    where = ["-p", partition] if partition else []
    idle = _count(["sinfo", "-h", "-t", "idle", "-o", "%D", *where])
    wanted = _count(["squeue", "-h", "-t", "PENDING", "-o", "%D", *where])
    if idle is None or wanted is None:
        return None
    return idle - wanted


class GrowCheck:
    """Rank 0's question at a checkpoint: would a requeue now start on more nodes?"""

    def __init__(self, partition: Optional[str], nodes_now: int, max_nodes: int, every_s: float):
        self.partition, self.nodes_now, self.max_nodes, self.every_s = partition, nodes_now, max_nodes, every_s
        self.asked_at: Optional[float] = None

    def __call__(self) -> bool:
        if self.nodes_now >= self.max_nodes:
            return False
        now = time.monotonic()
        if self.asked_at is not None and now - self.asked_at < self.every_s:
            return False
        self.asked_at = now
        spare = spare_nodes(self.partition)
        if spare is not None and spare > 0:
            log.info("%d node(s) of partition %s idle and unclaimed; this run holds %d of up to %d", spare,
                     self.partition or "(default)", self.nodes_now, self.max_nodes)
            return True
        return False
