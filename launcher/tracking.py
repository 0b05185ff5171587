"""Experiment tracking: one W&B run per training run, opened on rank 0 only and never prompting."""

from __future__ import annotations

import json
import logging
import netrc
import os
import secrets
import shutil
import string
from pathlib import Path
from typing import Any, Callable, Optional
from urllib.parse import urlsplit

from launcher.errors import problem
from launcher import rundir
from launcher.rundir import versions_changed
from launcher.schema import Choice, TrackingBackend, TrackingMode, one_of, plain

log = logging.getLogger(__name__)
STEP_METRIC = "trainer/global_step"
RUN_ID_FILE = rundir.WANDB_RUN_ID


class TrackingError(RuntimeError):
    """Tracking is misconfigured in a way that would otherwise hang or prompt."""


def wandb_row(row: dict) -> dict:
    """A metrics row as W&B keys: train/loss, eval/accuracy, ... (empty values left out)."""
    return {f"{row['kind']}/{k}": v for k, v in row.items() if k not in ("kind", "step") and v is not None}


class Tracker:
    """A W&B run, or a no-op when `run` is None (other ranks, tracking disabled).

    Tracking never fails the training. Slurm signals every process of a job, W&B's service
    included, and the service exits on SIGTERM without writing what it buffered (measured: an
    offline segment of 13 steps left a 7-byte .wandb file). When a call fails, the run goes on;
    at finish the segment is rebuilt in a new service from the rows this process appended to
    the metrics file, which holds every row.
    """

    def __init__(self, run: Any = None, reopen: Optional[Callable[[], Any]] = None,
                 metrics: Optional[Path] = None, offline: bool = False) -> None:
        self._run = run
        self._run_id = run.id if run is not None else None
        self._reopen = reopen
        self._metrics = metrics
        self._metrics_start = metrics.stat().st_size if metrics is not None and metrics.exists() else 0
        self._offline = offline
        self._summary: dict = {}
        self._lost = False  # the service is gone: calls are kept for the rebuild, not sent

    @property
    def run_id(self) -> Optional[str]:
        return self._run_id

    def log(self, metrics: dict, step: int) -> None:
        if self._run is not None and not self._lost:
            # W&B's own step is our global step: segments of a resumed run never collide.
            self._guarded("log", lambda: self._run.log({**metrics, STEP_METRIC: step}, step=step))

    def log_without_step(self, metrics: dict) -> None:
        """A row at W&B's next step (metrics name their own x in trainer/global_step): a benchmark eval
        of an earlier checkpoint, logged while the run may be further along."""
        if self._run is not None and not self._lost:
            self._guarded("log", lambda: self._run.log(metrics))

    def summary(self, values: dict) -> None:
        if self._run is not None:
            self._summary.update(values)
            if not self._lost:
                self._guarded("summary", lambda: self._run.summary.update(values))

    def add_tags(self, tags: list) -> None:
        if self._run is not None and not self._lost:
            self._guarded("tags", lambda: setattr(self._run, "tags", tuple(dict.fromkeys([*self._run.tags, *tags]))))

    def alert(self, title: str, text: str) -> None:
        """A W&B alert (email/Slack as the user set them up); online runs only: offline nobody would see it."""
        if self._run is not None and not self._lost and not self._offline:
            self._guarded("alert", lambda: self._run.alert(title=title, text=text))

    def finish(self, exit_code: int = 0) -> None:
        if self._run is None:
            return
        import wandb

        run, self._run = self._run, None
        if not self._lost:
            # run.finish() only informs wandb-core, which may still be writing the run's files;
            # teardown waits for it, so an offline run-<id>.wandb is complete once we return.
            self._guarded("finish", lambda: (run.finish(exit_code=exit_code), wandb.teardown()))
        if self._lost:
            self._rebuild(run, exit_code)

    def _guarded(self, what: str, call) -> None:
        try:
            call()
        except Exception as error:  # noqa: BLE001 - whatever W&B raises, the run goes on
            log.warning("W&B %s failed (%s: %s): its service is gone; this segment is rebuilt from "
                        "%s when the run ends or stops", what, type(error).__name__, error, rundir.METRICS)
            self._lost = True

    def _rebuild(self, dead: Any, exit_code: int) -> None:
        """Open the same run in a new service and replay this process's rows and summary."""
        import wandb

        try:
            wandb.teardown()
        except Exception:  # noqa: BLE001 - the old service is gone; nothing to wait for
            pass
        if self._offline:  # the dead segment's file holds at most part of what is replayed
            shutil.rmtree(Path(dead.dir).parent, ignore_errors=True)
        rows = []
        if self._metrics is not None and self._metrics.exists():
            with open(self._metrics, "rb") as f:
                f.seek(self._metrics_start)
                rows = [json.loads(line) for line in f.read().decode().splitlines() if line.strip()]
        try:
            from launcher.signals import STOP

            with STOP.blocked():  # the new service keeps the mask: a later USR2 does not reach it
                run = self._reopen()
            for row in rows:
                run.log({**wandb_row(row), STEP_METRIC: row["step"]}, step=row["step"])
            run.summary.update(self._summary)
            run.finish(exit_code=exit_code)
            wandb.teardown()
            log.warning("W&B: rebuilt this segment from %s (%d rows) in a new service", rundir.METRICS, len(rows))
        except Exception as error:  # noqa: BLE001
            log.warning("W&B could not be reopened (%s: %s): %s has every row", type(error).__name__, error, rundir.METRICS)


def start_tracking(tracking_cfg: Any, run_dir: Path, rank: int, config: dict, resume: bool,
                   metrics: Optional[Path] = None, files_dir: Optional[Path] = None,
                   second_writer: Optional[str] = None) -> Tracker:
    """Open the run's tracker: a real W&B run on rank 0, a no-op everywhere else.
    files_dir: where this segment's W&B files go (default: the run dir; a benchmark eval: its own folder).
    second_writer: a label for a process that writes the run while training may write it too (a
    benchmark eval): online it joins in W&B's shared mode and leaves the run's finish state alone."""
    backend = _choice("tracking.backend", tracking_cfg.backend, TrackingBackend)
    mode = _choice("tracking.mode", tracking_cfg.mode, TrackingMode)
    # Only rank 0 opens the run: two processes writing one run id would corrupt it.
    if rank != 0 or backend == "none" or mode == "disabled":
        return Tracker()

    api_key = getattr(tracking_cfg, "api_key", None) or None
    if mode == "online" and not api_key and not have_credentials():
        raise TrackingError(
            "tracking.mode=online but no W&B API key was found (tracking.api_key, WANDB_API_KEY "
            "or ~/.netrc); set WANDB_API_KEY, or use tracking.mode=offline and `wandb sync` later"
        )

    import wandb  # imported late: ranks and runs without tracking never pay for it

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    id_file = run_dir / RUN_ID_FILE
    if resume and id_file.is_file() and id_file.read_text().strip():
        run_id = id_file.read_text().strip()
    else:
        # wandb's own style of id (8 of [a-z0-9]); wandb.util.generate_id is gone in recent releases.
        run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
        id_file.write_text(run_id + "\n")

    init = dict(
        project=tracking_cfg.project,
        entity=getattr(tracking_cfg, "entity", None),
        group=getattr(tracking_cfg, "group", None),
        name=getattr(tracking_cfg, "name", None),
        job_type=getattr(tracking_cfg, "job_type", None),
        tags=list(getattr(tracking_cfg, "tags", None) or []),
        config=plain(config),  # W&B gets str values, not the schema's Choice members
        id=run_id,
        resume="allow",  # a restart continues the same run (online: one curve)
        mode=mode,
        dir=str(files_dir or run_dir),  # W&B files land in run_dir/wandb
        # The key goes to wandb in memory only: unlike wandb.login(key=...), it is not saved to ~/.netrc.
        # console="off": stdout is the trainer's, and wrapping it would interfere with its own logging.
        # A server that does not answer costs at most init_timeout_s, then the run goes on offline.
        settings=wandb.Settings(api_key=api_key if mode == "online" else None, console="off",
                                init_timeout=float(getattr(tracking_cfg, "init_timeout_s", 60.0)),
                                finish_timeout=float(getattr(tracking_cfg, "finish_timeout_s", 10.0)),
                                **({"x_primary": False, "x_label": second_writer, "x_update_finish_state": False}
                                   if second_writer else {})),
    )

    def open_run(mode: str = mode):
        run = wandb.init(**{**init, "mode": "shared" if second_writer and mode == "online" else mode})
        run.define_metric(STEP_METRIC)
        run.define_metric("*", step_metric=STEP_METRIC)
        return run

    wandb_dir = Path(files_dir or run_dir) / "wandb"
    before = set(wandb_dir.glob("run-*"))
    try:
        run = open_run()
    except Exception as error:  # noqa: BLE001 - W&B's errors for an unreachable or refusing server vary
        if mode != "online":
            raise
        for attempt in set(wandb_dir.glob("run-*")) - before:  # the failed attempt's empty folder
            shutil.rmtree(attempt, ignore_errors=True)
        log.warning("W&B did not start online (%s: %s): this run logs offline instead; upload it later "
                    "with `wandb sync %s`", type(error).__name__, error, wandb_dir)
        try:
            wandb.teardown()
        except Exception:  # noqa: BLE001
            pass
        mode = "offline"
        run = open_run(mode)
    return Tracker(run, reopen=lambda: open_run(mode), metrics=metrics, offline=mode == "offline")


def _choice(key: str, value: Any, choice: type[Choice]) -> str:
    """`value` as a plain str if it is one of `choice` (a config composed by Hydra always is)."""
    if plain(value) not in choice.values():
        raise TrackingError(problem(key, value, one_of(choice)))
    return plain(value)


def run_metadata(run_dir: Path, world_size: int, launcher: Optional[str]) -> dict:
    """Where and what ran: the Slurm job (array task, requeues, nodes), world size, code version."""
    env = os.environ
    submission = rundir.submission(run_dir)
    git = submission.get("git") or {}
    array = env.get("SLURM_ARRAY_JOB_ID")
    job = f"{array}_{env.get('SLURM_ARRAY_TASK_ID')}" if array else env.get("SLURM_JOB_ID")
    return {"backend": submission.get("backend"), "slurm_job_id": job, "slurm_array_task_id": env.get("SLURM_ARRAY_TASK_ID"),
            "requeues": int(env.get("SLURM_RESTART_COUNT", "0")), "nodes": env.get("SLURM_JOB_NODELIST"),
            "world_size": world_size, "git_sha": git.get("sha"), "git_dirty": git.get("dirty"), "launcher": launcher,
            "versions": submission.get("versions"), "versions_changed": versions_changed(submission)}


def run_tags(meta: dict) -> list:
    """Tags to filter runs by in W&B's table."""
    tags = [f"backend:{meta['backend']}", f"world_size:{meta['world_size']}"]
    if meta["slurm_job_id"]:
        tags.append(f"slurm_job:{meta['slurm_job_id']}")
    if meta["git_dirty"]:
        tags.append("git:dirty")
    return tags


def have_credentials() -> bool:
    """Whether wandb would find a key without prompting: environment or a netrc entry for its host."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlsplit(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").netloc
    candidates = [os.environ["NETRC"]] if os.environ.get("NETRC") else ["~/.netrc", "~/_netrc"]
    for candidate in candidates:
        path = Path(candidate).expanduser()
        try:
            entry = netrc.netrc(str(path)).authenticators(host)
        except (OSError, netrc.NetrcParseError):
            continue
        if entry and entry[2]:
            return True
    return False
