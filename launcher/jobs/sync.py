"""`sft-jobs sync RUN|SWEEP [--follow]`: upload offline W&B runs from a login node, in order, once each.

Compute nodes without internet log offline: every start of a run (a requeue, a resume) is one
segment folder, `wandb/offline-run-<time>-<id>`, of the same run id. W&B's own `wandb beta sync`
uploads a segment and marks it (`run-<id>.wandb.synced`); a marked segment is never uploaded again,
so running this twice duplicates nothing. A segment still being written (the newest of a run
whose job is alive) is left for later: a partial upload leaves no marker and would be uploaded
again. With --follow it is followed live (`--live`), and new segments are synced as they appear,
until every job of RUN has ended, its eval jobs included.

A run's benchmark eval jobs (eval.harness) log segments of the same run id into
`evals/step-N/wandb/offline-run-*`: each is uploaded once its eval has ended (summary.json or
failed.json in evals/step-N), in one time order with the training segments (their folder names).
The rule on the segment still being written holds for the training segments alone: an eval's
segment is finished exactly when its eval is (an ended eval's segment newer than the training
segment still being written waits for that one, to keep the time order).
"""

import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, List, Sequence

from launcher.harness_results import FAILED, SUMMARY, evals_dir

POLL_S = 30


def order(folder: Path):
    """A segment's place in time: its folder name's stamp (wandb adds -<n> to a folder of the same second)."""
    match = re.match(r"offline-run-(\d{8}_\d{6})-.+?(?:-(\d+))?$", folder.name)
    return (match.group(1), int(match.group(2) or 0)) if match else (folder.name, 0)


def segments(run_dir: Path) -> List[Path]:
    """The run's training segment folders, oldest first."""
    return sorted((p for p in Path(run_dir, "wandb").glob("offline-run-*") if p.is_dir()), key=order)


def eval_segments(run_dir: Path) -> List[Path]:
    """The segment folders of the run's benchmark evals that have ended (done or failed), oldest first."""
    ended = [d for d in evals_dir(run_dir).glob("step-*") if (d / SUMMARY).is_file() or (d / FAILED).is_file()]
    return sorted((p for d in ended for p in (d / "wandb").glob("offline-run-*") if p.is_dir()), key=order)


def is_synced(folder: Path) -> bool:
    return any(folder.glob("run-*.wandb.synced"))


def wandb_cli() -> List[str]:
    return [str(Path(sys.executable).with_name("wandb"))]


def sync_run(run_dir: Path, live: bool, follow: bool, run: Callable[[Sequence[str]], int], say: Callable[[str], None]) -> int:
    """Upload the run's finished, unmarked segments in order (its ended evals' too); the newest
    training segment too when the job has ended, or live with follow. Returns how many segments
    were handed to W&B."""
    training = segments(run_dir)
    todo = [s for s in training if not is_synced(s)]
    newest = todo.pop() if live and todo and todo[-1] == training[-1] else None
    evals = [s for s in eval_segments(run_dir) if not is_synced(s)]
    # An eval's segment newer than the training segment still being written waits for it: one time order.
    later = [s for s in evals if newest is not None and order(s) > order(newest)]
    todo = sorted([*todo, *(s for s in evals if s not in later)], key=order)
    for folder in later:
        say(f"{folder}: waits for the older {newest.name}, still being written (one run's segments go in time order)")
    if newest is not None:
        if follow:
            todo_cmd = [*wandb_cli(), "beta", "sync", *map(str, todo)] if todo else None
            if todo_cmd and run(todo_cmd) != 0:
                return 0
            say(f"following {newest} while the job runs")
            run([*wandb_cli(), "beta", "sync", "--live", str(newest)])
            return len(todo) + 1
        say(f"{newest}: still being written (the job runs); sync it when the job ends, or use --follow")
    if not todo:
        return 0
    for folder in todo:
        say(f"sync {folder}")
    # One call, oldest first: W&B uploads the segments of one run id in order.
    return len(todo) if run([*wandb_cli(), "beta", "sync", *map(str, todo)]) == 0 else 0


def sync(dirs: List[Path], is_live: Callable[[Path], bool], follow: bool,
         run: Callable[[Sequence[str]], int] = None, say: Callable[[str], None] = print, poll_s: float = POLL_S,
         evals_pending: Callable[[List[Path]], bool] = lambda dirs: False) -> int:
    """Every run of a run or sweep; with follow, again every POLL_S until no job is alive, the
    eval jobs included (`evals_pending`: whether one of them may still write a segment)."""
    run = run or (lambda cmd: subprocess.run(list(cmd)).returncode)
    total, said = 0, False
    while True:
        live = {d: is_live(d) for d in dirs}
        for d in dirs:
            total += sync_run(d, live[d], follow, run, say)
        if not follow:
            return total
        if not any(live.values()):
            if not evals_pending(dirs):
                return total
            if not said:  # the training has ended; its last evals are still to come
                say("following the run's eval jobs until they end")
                said = True
        time.sleep(poll_s)
