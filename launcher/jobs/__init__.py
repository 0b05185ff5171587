"""`sft-jobs`: list, inspect, follow, cancel and plot runs from their run directories (and Slurm)."""

from launcher.jobs.cli import main
from launcher.jobs.runs import resolve_run
from launcher.run_state import Progress, local_state
from launcher.backends.slurm_queue import parse_sacct
from launcher.metrics import read_metrics

__all__ = ["main", "Progress", "local_state", "resolve_run", "parse_sacct", "read_metrics"]
