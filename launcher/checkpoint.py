"""Checkpoints: DeepSpeed's sharded state in checkpoints/step-NNNNNN/, which appears only complete.

Every rank writes into checkpoints/.partial/step-NNNNNN/, the files are flushed to disk, all ranks
agree, and rank 0 writes the COMPLETE marker (with the run's resume fingerprint) and renames the
directory into place. A killed save leaves only .partial/, which is never resumed from and is
removed by the next start. A second save of a step replaces the first by rename.
"""

import json
import logging
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

# torch and numpy are imported where used: `sft` reads checkpoints on the login node without them.
from launcher.atomic import MARKER, fsync_path, rename_over, write_text_atomic
from launcher.rundir import CHECKPOINTS

log = logging.getLogger(__name__)
PARTIAL = ".partial"  # saves in progress, or killed half-way
STEP_DIR = re.compile(r"step-(\d+)")
RANK_IN_NAME = re.compile(r"(?:zero_pp_rank_|rng_rank)0*(\d+)")  # who wrote a file: its writer flushes it
UNIVERSAL = "universal"  # inside a checkpoint: its world-size-free form (DeepSpeed's universal checkpoint)


def checkpoints_dir(run_dir: Path) -> Path:
    return Path(run_dir) / CHECKPOINTS


def step_dir(run_dir: Path, step: int) -> Path:
    return checkpoints_dir(run_dir) / f"step-{step:06d}"


def is_complete(path: Path) -> bool:
    return (Path(path) / MARKER).is_file()


def marker_info(path: Path) -> Dict[str, Any]:
    return json.loads((Path(path) / MARKER).read_text())


def complete_checkpoints(run_dir: Path) -> List[Path]:
    """Complete checkpoints, oldest first (by step number, not by name)."""
    found = [p for p in checkpoints_dir(run_dir).glob("step-*") if STEP_DIR.fullmatch(p.name) and is_complete(p)]
    return sorted(found, key=lambda p: int(p.name[5:]))


def latest_complete(run_dir: Path) -> Optional[Path]:
    done = complete_checkpoints(run_dir)
    return done[-1] if done else None


def find_resume_point(resume: str, run_dir: Path) -> Optional[Path]:
    if resume == "never":
        return None
    if resume == "auto":
        return latest_complete(run_dir)
    path = Path(resume).expanduser().resolve()
    if not is_complete(path):
        raise FileNotFoundError(f"resume={resume}: not a complete checkpoint (no {MARKER} marker in it)")
    return path


def discard_partial(run_dir: Path) -> None:
    """Rank 0 at start: what a killed save left behind."""
    partial = checkpoints_dir(run_dir) / PARTIAL
    if partial.exists():
        log.warning("removing an interrupted save: %s", partial)
        shutil.rmtree(partial, ignore_errors=True)


def rng_state() -> Dict[str, Any]:
    import numpy as np
    import torch

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    import numpy as np
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save(engine, run_dir: Path, step: int, rank: int, world_size: int, client_state: Dict[str, Any],
         fingerprint: Dict[str, Any]) -> Path:
    """All ranks call this. Returns the checkpoint dir, which exists only once every rank's files are on disk."""
    import torch

    barrier = torch.distributed.barrier
    final = step_dir(run_dir, step)
    staging = final.parent / PARTIAL / final.name
    if rank == 0:
        shutil.rmtree(staging, ignore_errors=True)  # a killed save of the same step
    barrier()
    engine.save_checkpoint(str(staging.parent), tag=staging.name, client_state=client_state, save_latest=False)
    torch.save(rng_state(), staging / f"rng_rank{rank:05d}.pt")
    barrier()
    for path in staging.rglob("*"):
        if path.is_file() and writer_rank(path.name) == rank:  # on NFS/Lustre only the writer's flush reaches the server
            fsync_path(path)
    barrier()
    if rank == 0:
        info = {"step": step, "world_size": world_size, "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "fingerprint": fingerprint}
        write_text_atomic(staging / MARKER, json.dumps(info) + "\n", durable=True)
        fsync_path(staging)
        publish(staging, final)
    barrier()
    return final


def writer_rank(name: str) -> int:
    """The rank that wrote a checkpoint file: the one its name carries (DeepSpeed's zero_pp_rank_N_*,
    our rng_rankNNNNN), else rank 0 (DeepSpeed writes the rank-less files there)."""
    found = RANK_IN_NAME.search(name)
    return int(found.group(1)) if found else 0


def publish(staging: Path, final: Path) -> None:
    """Rename a finished save into place; an earlier save of the same step is replaced, not merged."""
    rename_over(staging, final, staging.with_name(staging.name + ".replaced"))
    for script in staging.parent.glob("*.py"):  # DeepSpeed's zero_to_fp32.py, beside the step dirs as usual
        os.replace(script, final.parent / script.name)
    fsync_path(final.parent)
    try:
        staging.parent.rmdir()  # .partial/ exists only while a save is in progress (or was killed)
    except OSError:
        pass


def prune(run_dir: Path, keep: int) -> None:
    """Rank 0: delete all but the newest `keep` complete checkpoints (the run dir holds one lineage)."""
    complete = complete_checkpoints(run_dir)
    if keep < 1 or len(complete) <= keep:
        return
    for path in complete[:-keep]:
        shutil.rmtree(path, ignore_errors=True)


def load(engine, path: Path, rank: int, universal: bool) -> Dict[str, Any]:
    """Restore model, optimizer, scheduler and this rank's RNG; returns the client state.

    universal: the checkpoint was written by another number of ranks and is read from its
    converted form, which has no per-rank RNG state (fresh ranks keep the seeded RNG).
    """
    import torch

    if universal:
        _, client_state = engine.load_checkpoint(str(path), tag=UNIVERSAL)
        if engine.zero_optimization_stage() == 3:
            _repair_zero3_universal_load(engine, path / UNIVERSAL)
        client_state = client_state or {}
        client_state.setdefault("global_step", marker_info(path)["step"])
        return client_state
    _, client_state = engine.load_checkpoint(str(path.parent), tag=path.name)
    rng_file = path / f"rng_rank{rank:05d}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=False))
    return client_state or {}


def _repair_zero3_universal_load(engine, universal_dir: Path) -> None:
    """DeepSpeed 0.19's ZeRO-3 universal load gives every param group group 0's hyperparameters (the
    weight decay of the no-decay group) and one shared Adam `step` tensor, which torch's AdamW then
    advances once per group: put back each group's settings and give each state its own step.
    Measured: without this a 2 -> 1 rank resume drifts by 4.5e-4 in loss; with it, 0."""
    import torch

    saved = torch.load(universal_dir / "zero" / "optimizer_state.pt", map_location="cpu", weights_only=False)
    saved_groups = saved["optimizer_state_dict"]["param_groups"]
    groups = engine.optimizer.optimizer.param_groups
    if len(saved_groups) != len(groups):
        raise RuntimeError(f"{universal_dir}: {len(saved_groups)} optimizer groups saved, {len(groups)} now")
    for group, saved_group in zip(groups, saved_groups):
        group.update({k: v for k, v in saved_group.items() if k != "params"})
    for state in engine.optimizer.optimizer.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()
