"""What a resume may continue: the fingerprint a checkpoint carries, and one lineage per run directory.

The data position is derived from the step, so a resume is exact only when everything that maps
steps to rows is unchanged. Each checkpoint's marker records a fingerprint of those settings; a
start that would continue from it with different ones is refused on the login side, before a file
of the run directory is rewritten, naming each key with its old and new value.
"""

import functools
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from launcher import caches, checkpoint
from launcher.errors import ConfigError, problem
from launcher.schema import ResumeChange, plain

# Changes the launcher absorbs: the global batch (and so the rows of each step) is kept.
ADAPTS = {
    "world_size": "the checkpoint is converted to DeepSpeed's universal form once and loaded on the new ranks",
    "micro_batch_size": "gradient accumulation changes to keep the global batch",
    # The rows of a step follow the data-parallel ranks and the global batch; ZeRO-3 shards every
    # parameter over all ranks, whatever the groups, so the checkpoint does not depend on it.
    "sequence_parallel": "the same rows per step; the ZeRO-3 shards do not depend on the groups",
}
# Changes a user may accept with checkpoint.allow_changes=[...] (the schema refuses others); the
# rest would replay or skip data.
ALLOWABLE = ResumeChange.values()
# What shapes the rows; split_seed picks the held-out, mixed and packed rows (launcher.data.pipeline).
DATA_KEYS = ("format", "template", "train_on", "truncation", "on_bad_row", "split_seed", "eval_fraction")


@functools.lru_cache(maxsize=1)  # once per command, however many sweep points
def launcher_version() -> str:
    """The package version and a digest of its code: an edited launcher is a different launcher."""
    from importlib import metadata

    try:
        version = metadata.version("launcher")
    except metadata.PackageNotFoundError:
        version = "unknown"
    package = Path(__file__).resolve().parent
    return f"{version}+{caches.code_digest(str(package), recursive=True)}"


def data_fingerprint(data_cfg) -> str:
    """The train files by content (not by path: a copied data set is the same data) and the row settings."""
    from launcher.data.token_cache import cache_key, cache_root, file_digest
    from launcher.data.files import HUB, sources

    root = cache_root(data_cfg.cache_dir)
    files = [[f if f.startswith(HUB) else file_digest(f, root) for f in src.files] + [src.weight, src.samples]
             for src in sources(data_cfg.train_files)]
    return cache_key([files, {k: plain(data_cfg[k]) for k in DATA_KEYS}])


def fingerprint(cfg, plan) -> Dict[str, Any]:
    return {
        "world_size": plan.world_size,
        "micro_batch_size": plan.micro_batch_size,
        "sequence_parallel": cfg.trainer.sequence_parallel,
        "global_batch_size": plan.global_batch_size,
        "seq_len": cfg.data.seq_len,
        "packing": bool(cfg.data.packing),
        "data": data_fingerprint(cfg.data),
        "model_path": str(cfg.model.path),
        "seed": cfg.seed,
        "launcher": launcher_version(),
    }


def refused_changes(saved: Dict[str, Any], current: Dict[str, Any], allowed: List[str]) -> List[str]:
    """Each key whose change would make the resume inexact, with its old and new value."""
    return [key for key, old in saved.items()
            if key in current and current[key] != old and key not in ADAPTS and key not in allowed]


def check_resume(cfg, run_dir: Path, current: Dict[str, Any]) -> Optional[Path]:
    """Login side, before the run directory is written: the checkpoint this start continues, if any.

    Refuses starting over in a directory that holds checkpoints and continuing from a checkpoint of
    another run there: either would put two lineages in one directory, and pruning and requeues
    would then mix them.
    """
    run_dir = Path(run_dir)
    own = checkpoint.latest_complete(run_dir)
    if cfg.resume == "never":
        if own is not None:
            raise ConfigError([problem("resume", "never", (
                f"run_dir {run_dir} already holds checkpoints (newest: {own.name}); resume=auto continues "
                f"that run; to start over, use a new run_dir (or leave run_dir unset), or move "
                f"{checkpoint.checkpoints_dir(run_dir)} away first"))])
        return None
    source = checkpoint.find_resume_point(cfg.resume, run_dir)
    if source is None:
        return None
    if own is not None and source.parent != checkpoint.checkpoints_dir(run_dir).resolve() and cfg.resume != "auto":
        raise ConfigError([problem("resume", cfg.resume, (
            f"run_dir {run_dir} holds checkpoints of its own run (newest: {own.name}); continuing another "
            f"run's checkpoint there would mix the two: use a new run_dir"))])
    saved = checkpoint.marker_info(source).get("fingerprint")
    if saved is None:
        return source  # written before fingerprints: nothing to compare
    allowed = plain(list(cfg.checkpoint.allow_changes))
    refused = refused_changes(saved, current, allowed)
    if refused:
        lines = "; ".join(f"{k}: {saved[k]!r} in the checkpoint, {current[k]!r} now" for k in refused)
        allowable = [k for k in refused if k in ALLOWABLE]
        hint = (f"; if that is intended, add checkpoint.allow_changes=[{','.join(allowable)}]" if allowable else "")
        raise ConfigError([problem("resume", cfg.resume, (
            f"{source} was written with other settings, and resuming it would replay or skip data: {lines}. "
            f"Resume with the checkpoint's settings, or start a new run (a new run_dir, resume=never){hint}"))])
    return source


def set_aside_newer(run_dir: Path, source: Path) -> Optional[Path]:
    """resume=PATH to an earlier step of this run dir: its newer checkpoints move to a folder named as
    such, so the new lineage never prunes or resumes them."""
    root = checkpoint.checkpoints_dir(run_dir)
    if source.parent != root.resolve():
        return None
    newer = [p for p in root.glob("step-*") if checkpoint.STEP_DIR.fullmatch(p.name) and int(p.name[5:]) > int(source.name[5:])]
    if not newer:
        return None
    aside = Path(run_dir) / f"checkpoints-set-aside-{time.strftime('%Y%m%d-%H%M%S')}"
    aside.mkdir()
    for path in newer:
        path.rename(aside / path.name)
    return aside
