"""Checkpoints: DeepSpeed's sharded state in checkpoints/step-NNNNNN/, a COMPLETE marker written last.

A checkpoint without its marker (a save interrupted by a crash) is never resumed from.
"""

import json
import logging
import random
import shutil
import time
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import torch

from launcher.atomic import write_text_atomic

log = logging.getLogger(__name__)
MARKER = "COMPLETE"


def step_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step-{step:06d}"


def is_complete(path: Path) -> bool:
    return (Path(path) / MARKER).is_file()


def marker_info(path: Path) -> Dict[str, Any]:
    return json.loads((Path(path) / MARKER).read_text())


def latest_complete(run_dir: Path) -> Optional[Path]:
    """The newest checkpoint with its marker; unmarked ones are skipped with a warning."""
    root = Path(run_dir) / "checkpoints"
    for path in sorted(root.glob("step-*"), reverse=True):
        if is_complete(path):
            return path
        log.warning("skipping checkpoint without a %s marker (an interrupted save): %s", MARKER, path)
    return None


def find_resume_point(resume: str, run_dir: Path) -> Optional[Path]:
    if resume == "never":
        return None
    if resume == "auto":
        return latest_complete(run_dir)
    path = Path(resume).expanduser()
    if not is_complete(path):
        raise FileNotFoundError(f"resume={resume}: not a complete checkpoint (no {MARKER} marker in it)")
    return path


def rng_state() -> Dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save(engine, run_dir: Path, step: int, rank: int, world_size: int, client_state: Dict[str, Any]) -> Path:
    """All ranks call this. Returns the checkpoint dir, marked complete once every rank has written."""
    path = step_dir(run_dir, step)
    engine.save_checkpoint(str(path.parent), tag=path.name, client_state=client_state, save_latest=False)
    torch.save(rng_state(), path / f"rng_rank{rank:05d}.pt")
    torch.distributed.barrier()
    if rank == 0:
        info = {"step": step, "world_size": world_size, "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
        write_text_atomic(path / MARKER, json.dumps(info) + "\n")
    torch.distributed.barrier()
    return path


def prune(run_dir: Path, keep: int) -> None:
    """Rank 0: delete all but the newest `keep` complete checkpoints (and older unmarked ones)."""
    root = Path(run_dir) / "checkpoints"
    complete = sorted(p for p in root.glob("step-*") if is_complete(p))
    if keep < 1 or len(complete) <= keep:
        return
    oldest_kept = complete[-keep]
    for path in root.glob("step-*"):
        if path < oldest_kept:
            shutil.rmtree(path, ignore_errors=True)


def load(engine, path: Path, rank: int, world_size: int) -> Dict[str, Any]:
    """Restore model, optimizer, scheduler and this rank's RNG; returns the client state."""
    saved_world = marker_info(path).get("world_size")
    if saved_world is not None and saved_world != world_size:
        raise RuntimeError(
            f"checkpoint {path} was written by {saved_world} ranks but this run has {world_size}: "
            f"resume on {saved_world} ranks (cluster.nodes x cluster.procs_per_node), or start fresh with "
            f"resume=never. Changing the world size needs DeepSpeed's universal checkpoint "
            f"(python -m deepspeed.checkpoint.ds_to_universal), which the launcher does not apply yet."
        )
    _, client_state = engine.load_checkpoint(str(path.parent), tag=path.name)
    rng_file = path / f"rng_rank{rank:05d}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=False))
    return client_state or {}
