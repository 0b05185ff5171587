"""Checkpoint size per node and whether a save fits between Slurm's warning signal and the kill.

A ZeRO checkpoint holds the fp32 optimizer shards: master weights and Adam's two moments, 12 bytes
per parameter (under ZeRO-3 the 16-bit weights are not in it: they are rebuilt from the masters;
measured: 12.1 bytes per parameter for the tiny model, the rest RNG and module metadata). Ranks
write their shards in parallel, so each node writes its share; below stage 3 rank 0 also writes
the whole 16-bit module (and below stage 1 the whole optimizer), so node 0 writes the most and
sets the time. After the signal a rank finishes its step (or, in an eval, the eval batch or
generation chunk under way: the ranks check between them), saves, W&B finishes (at most
tracking.finish_timeout_s) and rank 0 requeues the job: `EXIT_MARGIN_S`, or the finish timeout and
`REQUEUE_S` when that is longer, covers all after the save. After the last step the save comes
before the final eval and the export, so neither is in the window.
"""

from dataclasses import asdict, dataclass
from typing import Optional

CHECKPOINT_BYTES_PER_PARAM = 12
EXIT_MARGIN_S = 15.0
REQUEUE_S = 5.0  # scontrol requeue and the exit, after W&B's finish


@dataclass
class StopWindow:
    checkpoint_gb: float  # whole checkpoint, GB
    per_node_gb: float  # node 0's share, the largest
    window_s: float  # cluster.signal_delay_s
    write_gb_s: Optional[float]  # per node: configured, or measured by this run's earlier saves
    write_source: str  # "checkpoint.write_gb_s" | "measured by this run's saves" | "unknown"
    save_s: Optional[float]
    needs_gb_s: Optional[float]  # the write speed per node the window requires; None: no time left at all
    fits: Optional[bool]  # None when the write speed is unknown

    def to_dict(self):
        return asdict(self)


def estimate(params: int, nodes: int, stage: int, precision: str, signal_delay_s: float, step_s: Optional[float],
             write_gb_s: Optional[float], write_source: str, finish_s: float = 0.0) -> StopWindow:
    optimizer_gb = params * CHECKPOINT_BYTES_PER_PARAM / 1e9
    module_gb = 0.0 if stage == 3 else params * (4 if precision == "fp32" else 2) / 1e9
    total_gb = optimizer_gb + module_gb
    per_node = (optimizer_gb if stage == 0 else optimizer_gb / nodes) + module_gb
    left = signal_delay_s - (step_s or 0.0) - max(EXIT_MARGIN_S, finish_s + REQUEUE_S)
    needs = per_node / left if left > 0 else None
    save_s = per_node / write_gb_s if write_gb_s else None
    fits = None if save_s is None else save_s <= left
    return StopWindow(total_gb, per_node, signal_delay_s, write_gb_s, write_source if write_gb_s else "unknown",
                      save_s, needs, fits)
