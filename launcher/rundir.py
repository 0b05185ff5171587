"""The run directory owns a run's state: this module knows every file in it, reads and writes them,
and keeps the run's event log.

A run directory (runs/<name>/<timestamp>/, or a point of a sweep):
  submission.json   who submitted what, from where, with which package versions, and the job ids
  config.yaml       the resolved config every rank loads (secrets masked)
  overrides.yaml    the command line's overrides
  plan.json         the plan (launcher.plan), the data files and the resume fingerprint
  ds_config.json    the exact DeepSpeed JSON
  events.jsonl      what happened, one JSON object per line: started, stopped, failed, requeued,
                    completed, paused, pruned (EVENTS); `sft-jobs` reads these, never log text
  metrics.jsonl     train, eval, checkpoint and rung rows (launcher.metrics)
  final_eval.json   the final eval is done: a requeued job does not run it again, and sft-jobs reads
                    a run without an export as COMPLETED only from it
  cancelled.json    `sft-jobs cancel` recorded the state it left
  trial.json, trial_end.json      a search trial: its number and study; why it stopped (launcher.trial)
  rendezvous.json, start_failed.json   where rank 0 listens; why a start's ranks could not meet
  wandb_run_id      the W&B run every segment continues
  logs/rank-N.log   each rank's log (text for people; nothing parses it)
  checkpoints/step-N/   a checkpoint, complete once its COMPLETE marker is in it
  export/           the Hugging Face model, built aside and renamed into place
  code/             the launcher's code snapshot the ranks import
"""

import functools
import getpass
import json
import os
import socket
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Dict, List, Optional

import yaml

from launcher.atomic import MARKER, write_text_atomic
from launcher.secret_mask import mask_secrets, secret_values

# libyaml's dumper where installed: a 100-point sweep writes 200 YAML files before it submits.
SAFE_DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)

SUBMISSION = "submission.json"
CONFIG = "config.yaml"
OVERRIDES = "overrides.yaml"
PLAN = "plan.json"
DS_CONFIG = "ds_config.json"
EVENTS = "events.jsonl"
METRICS = "metrics.jsonl"
FINAL_EVAL = "final_eval.json"
CANCELLED = "cancelled.json"
TRIAL = "trial.json"
TRIAL_END = "trial_end.json"
RENDEZVOUS = "rendezvous.json"
START_FAILED = "start_failed.json"
WANDB_RUN_ID = "wandb_run_id"
LOGS = "logs"
CHECKPOINTS = "checkpoints"
EXPORT = "export"
CODE = "code"
COMPLETE = MARKER  # written last inside a built directory (a checkpoint, a cache entry): present means complete

ENV_PREFIXES = ("SLURM_", "CUDA_", "NCCL_", "TORCH_", "HF_", "WANDB_", "TRANSFORMERS_", "OMP_", "SFT_")
PACKAGES = ("launcher", "torch", "deepspeed", "transformers", "datasets", "hydra-core", "omegaconf", "submitit", "wandb")


# ------------------------------------------------------------------ reading
def read_json(path: Path) -> dict:
    """A JSON object file; {} when it is missing, unreadable or not an object."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def read_text(path: Path, tail: Optional[int] = None) -> str:
    """A text file (its last `tail` bytes); "" when it is missing."""
    try:
        with open(path, "rb") as f:
            if tail is not None and f.seek(0, os.SEEK_END) > tail:
                f.seek(-tail, os.SEEK_END)
            else:
                f.seek(0)
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def submission(run_dir: Path) -> dict:
    return read_json(Path(run_dir) / SUBMISSION)


def plan(run_dir: Path) -> dict:
    return read_json(Path(run_dir) / PLAN)


def is_run(path: Path) -> bool:
    return (Path(path) / SUBMISSION).is_file()


def rank_log(run_dir: Path, rank: int) -> Path:
    return Path(run_dir) / LOGS / f"rank-{rank}.log"


def rank_output(run_dir: Path, rank: int) -> Path:
    """What a local rank other than 0 printed (rank 0's output is the terminal)."""
    return Path(run_dir) / LOGS / f"rank-{rank}.out"


def rank_logs(run_dir: Path) -> List[Path]:
    return sorted((Path(run_dir) / LOGS).glob("rank-*.log"))


def complete_checkpoints(run_dir: Path) -> Dict[int, Path]:
    """step -> directory of each checkpoint with its COMPLETE marker (unmarked ones are interrupted saves)."""
    found = {}
    for path in (Path(run_dir) / CHECKPOINTS).glob("step-*"):
        if (path / COMPLETE).is_file() and path.name[5:].isdigit():
            found[read_json(path / COMPLETE).get("step", int(path.name[5:]))] = path
    return found


def last_checkpoint(run_dir: Path) -> Optional[int]:
    """Step of the newest complete checkpoint."""
    return max(complete_checkpoints(run_dir), default=None)


# ------------------------------------------------------------------ events
# What happened to a run, appended by whoever saw it: each rank (started, stopped, failed, and rank 0:
# completed, paused, pruned), rank 0's Slurm task (requeued), the search controller (pruned).
STARTED = "started"  # rank, restart, step (resumed from), total_steps
STOPPED = "stopped"  # rank, signal, step: saved and exited, resumable
FAILED = "failed"  # rank, reason
REQUEUED = "requeued"  # job, restart: the job went back to the queue
COMPLETED = "completed"  # step: trained, evaluated and exported
PAUSED = "paused"  # step, rung: a search trial waits at a rung for its verdict
PRUNED = "pruned"  # step, rung (or by the controller): a search trial ended by its search
EVENT_NAMES = (STARTED, STOPPED, FAILED, REQUEUED, COMPLETED, PAUSED, PRUNED)


ATTEMPT_ENV = "SFT_RENDEZVOUS"  # the id every rank of one start shares (launcher.rendezvous sets it)


def append_event(run_dir: Path, event: str, **fields: Any) -> None:
    """One line appended in one write (O_APPEND), so ranks and processes appending at once never interleave.
    A rank's events carry its start's id (`attempt`): an elastic run's starts differ in their ranks."""
    assert event in EVENT_NAMES, event
    attempt = {"attempt": os.environ[ATTEMPT_ENV]} if os.environ.get(ATTEMPT_ENV) else {}
    line = json.dumps({"time": round(time.time(), 3), "event": event, "host": socket.gethostname(), **attempt, **fields},
                      default=str)
    fd = os.open(Path(run_dir) / EVENTS, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


def read_events(run_dir: Path) -> Optional[List[dict]]:
    """The run's events in order; None for a run directory older than events (no events.jsonl)."""
    try:
        text = (Path(run_dir) / EVENTS).read_text()
    except FileNotFoundError:
        return None
    except OSError:
        return []
    events = []
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except ValueError:  # a line cut by a full disk or a crash mid-write
            continue
        if isinstance(row, dict) and row.get("event") in EVENT_NAMES:
            events.append(row)
    return events


# ------------------------------------------------------------------ writing a new run
def new_run_dir(runs_root: str, name: str) -> Path:
    """runs/<name>/<timestamp>/, with a suffix when two runs start in the same second."""
    base = Path(runs_root).expanduser().resolve() / name / time.strftime("%Y%m%d-%H%M%S")
    run_dir, n = base, 1
    while True:
        try:
            run_dir.mkdir(parents=True)
            return run_dir
        except FileExistsError:
            run_dir, n = base.with_name(f"{base.name}-{n}"), n + 1


@functools.lru_cache(maxsize=4)  # once per command, however many sweep points
def git_state(repo: Path) -> Dict[str, Any]:
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=10).stdout.strip()

    try:
        return {"sha": git("rev-parse", "HEAD") or None, "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.SubprocessError):
        return {"sha": None, "dirty": None}


@functools.lru_cache(maxsize=1)
def package_versions() -> Dict[str, Optional[str]]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def versions_changed(submission: Dict[str, Any]) -> Dict[str, str]:
    """Packages whose version differs from the run's first submission: name -> 'first -> now'."""
    first, now = submission.get("first_versions") or {}, submission.get("versions") or {}
    return {name: f"{first.get(name)} -> {now.get(name)}" for name in sorted(set(first) | set(now))
            if name != "launcher" and first.get(name) != now.get(name)}  # the launcher's own edits: the resume fingerprint


def submission_record(backend: str, overrides: List[str]) -> Dict[str, Any]:
    return {
        "backend": backend,
        "argv": [Path(sys.argv[0]).name, *sys.argv[1:]],
        "overrides": overrides,
        "cwd": os.getcwd(),
        "host": socket.gethostname(),
        "user": getpass.getuser(),
        "submitted_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "git": dict(git_state(Path(__file__).resolve().parent.parent)),
        "versions": dict(package_versions()),
        "env": {k: v for k, v in sorted(os.environ.items()) if k.startswith(ENV_PREFIXES)},
        "jobs": [],
    }


class RunFiles:
    """Writes a run's files; every write goes through the same secret mask."""

    def __init__(self, run_dir: Path, config: Dict[str, Any]):
        self.run_dir = Path(run_dir)
        self.secrets = secret_values(config)

    def write_json(self, name: str, obj: Any) -> Path:
        return self._write(name, json.dumps(mask_secrets(obj, self.secrets), indent=2, default=str) + "\n")

    def write_yaml(self, name: str, obj: Any) -> Path:
        return self._write(name, yaml.dump(mask_secrets(obj, self.secrets), Dumper=SAFE_DUMPER, sort_keys=False))

    def _write(self, name: str, text: str) -> Path:
        return write_text_atomic(self.run_dir / name, text)
