"""`sft-jobs sync RUN|SWEEP [--follow]`: upload offline W&B runs from a login node, in order, once each.

Compute nodes without internet log offline: every start of a run (a requeue, a resume) is one
segment folder, `wandb/offline-run-<time>-<id>`, of the same run id. W&B's own `wandb beta sync`
uploads a segment and marks it (`run-<id>.wandb.synced`); a marked segment is never uploaded again,
so running this twice duplicates nothing. A segment still being written (the newest of a run
whose job is alive) is left for later: a partial upload leaves no marker and would be uploaded
again. With --follow it is followed live (`--live`), and new segments are synced as they appear,
until every job of RUN has ended.
"""

import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, List, Sequence

POLL_S = 30


def segments(run_dir: Path) -> List[Path]:
    """The run's offline segment folders, oldest first (wandb adds -<n> to a folder of the same second)."""
    def order(folder: Path):
        match = re.match(r"offline-run-(\d{8}_\d{6})-.+?(?:-(\d+))?$", folder.name)
        return (match.group(1), int(match.group(2) or 0)) if match else (folder.name, 0)

    return sorted((p for p in Path(run_dir, "wandb").glob("offline-run-*") if p.is_dir()), key=order)


def is_synced(folder: Path) -> bool:
    return any(folder.glob("run-*.wandb.synced"))


def wandb_cli() -> List[str]:
    return [str(Path(sys.executable).with_name("wandb"))]


def sync_run(run_dir: Path, live: bool, follow: bool, run: Callable[[Sequence[str]], int], say: Callable[[str], None]) -> int:
    """Upload the run's finished, unmarked segments in order; the newest one too when the job has
    ended, or live with follow. Returns how many segments were handed to W&B."""
    todo = [s for s in segments(run_dir) if not is_synced(s)]
    if live and todo and todo[-1] == segments(run_dir)[-1]:
        newest = todo.pop()
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
         run: Callable[[Sequence[str]], int] = None, say: Callable[[str], None] = print, poll_s: float = POLL_S) -> int:
    """Every run of a run or sweep; with follow, again every POLL_S until no job is alive."""
    run = run or (lambda cmd: subprocess.run(list(cmd)).returncode)
    total = 0
    while True:
        live = {d: is_live(d) for d in dirs}
        for d in dirs:
            total += sync_run(d, live[d], follow, run, say)
        if not (follow and any(live.values())):
            return total
        time.sleep(poll_s)
