"""Backends start the ranks of a run: `local` (processes on this machine) or `slurm` (submitit)."""

from pathlib import Path


def launch(cfg, run_dir: Path, plan) -> int:
    """Start the run; returns the exit code for `sft` (Slurm returns at once after submitting)."""
    if cfg.cluster.backend == "slurm":
        from launcher.backends.slurm import submit

        return submit(cfg, run_dir, plan)
    from launcher.backends.local import run_local

    return run_local(cfg, run_dir, plan)
