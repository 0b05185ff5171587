"""Where a rank runs, read once from the environment its launcher set (launcher.backends: local
ranks or a Slurm task): its place among the ranks and, under Slurm, the job's restart count."""

import os
from dataclasses import dataclass
from typing import Mapping, Optional

# An elastic run's next start is a new job (launcher.backends.slurm_rank.submit_again), whose
# SLURM_RESTART_COUNT starts at 0 again: the restart count it continues with comes in this variable.
RESTARTS_ENV = "SFT_RESTARTS"


@dataclass
class RankEnv:
    rank: int
    local_rank: int
    world_size: int
    local_world_size: Optional[int] = None  # ranks per node (LOCAL_WORLD_SIZE); None: every rank on one node
    restarts: int = 0  # SLURM_RESTART_COUNT: how many times Slurm requeued the job (0 outside Slurm)
    under_slurm: bool = False  # SLURM_JOB_ID is set: a Slurm task, which can be requeued

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] = os.environ) -> "RankEnv":
        world = int(environ["WORLD_SIZE"])
        return cls(
            rank=int(environ["RANK"]), local_rank=int(environ["LOCAL_RANK"]), world_size=world,
            local_world_size=int(environ.get("LOCAL_WORLD_SIZE", world)),
            restarts=int(environ.get(RESTARTS_ENV) or environ.get("SLURM_RESTART_COUNT", "0")),
            under_slurm=bool(environ.get("SLURM_JOB_ID")),
        )

    @property
    def requeued(self) -> bool:
        """A requeued Slurm job: this start continues the run an earlier start of the job began."""
        return self.restarts > 0

    @property
    def nodes(self) -> int:
        return max(1, self.world_size // (self.local_world_size or self.world_size))
