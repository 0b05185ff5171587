"""`sft-jobs` commands (list, status, logs, cancel, report), their output and the argument parser."""

import argparse
import json
import os
import shutil
import signal
import sys
import time
from dataclasses import replace
from collections import Counter
from pathlib import Path
from typing import Dict, Iterable, List, Optional

import yaml
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from launcher.atomic import write_text_atomic
from launcher.harness_results import JOB as EVAL_JOB, PREFIX as HARNESS_PREFIX, eval_states, harness_scores, step_dir
from launcher.jobs.errors import JobsError, SlurmError
from launcher.jobs.runs import discover, is_sweep, rel, resolve_run, run_dirs, started_key, sweep_points
from launcher.backends.slurm_queue import SLURM_TERMINAL, cancel, query_jobs
from launcher.run_state import LOCAL, Progress, RunJob, describe, is_terminal, nodes_per_job, rank_pids
from launcher.metrics import read_metrics
from launcher import rundir
from launcher.rundir import CANCELLED, EXPORT, OVERRIDES, read_text, versions_changed

POLL_S = 3.0  # how often `logs -f` asks whether the job has ended


def show_errors(errors: Iterable[SlurmError]) -> int:
    """Slurm failures go to stderr; exit 1 when one was a real failure (not a missing command)."""
    code = 0
    for error in errors:
        print(f"sft-jobs: {'note' if error.unavailable else 'error'}: {error}", file=sys.stderr)
        code = code or (0 if error.unavailable else 1)
    return code


# ------------------------------------------------------------------ output
def fmt(value, digits: int = 4) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def step_cell(p: Progress) -> str:
    return f"{fmt(p.step)} / {fmt(p.total) if p.total else '?'}"


def read_overrides(run_dir: Path) -> List[str]:
    try:
        data = yaml.safe_load((run_dir / OVERRIDES).read_text())
    except (OSError, yaml.YAMLError):
        return []
    return [str(o) for o in data] if isinstance(data, list) else []


def point_labels(dirs: List[Path]) -> Dict[Path, str]:
    """Each sweep point's overrides that differ between points (the shared ones say nothing)."""
    overrides = {d: read_overrides(d) for d in dirs}
    shared = set.intersection(*(set(o) for o in overrides.values())) if len(dirs) > 1 else set()
    return {d: " ".join(o for o in overrides[d] if o not in shared) or f"point {d.name}" for d in dirs}


def new_table(title: str, columns: Iterable[str]) -> Table:
    table = Table(title=title, title_justify="left")
    for column in columns:
        table.add_column(column, overflow="fold")
    return table


def add_row(table: Table, *cells) -> None:
    table.add_row(*(escape(str(c)) for c in cells))  # job ids like 12_[0-3] are not markup


def summarize_states(tasks: List[RunJob]) -> str:
    return ", ".join(f"{n} {state}" for state, n in Counter(t.state for t in tasks).most_common())


# ------------------------------------------------------------------ commands
def task_row(task: RunJob, name: str) -> List[str]:
    p = task.progress
    return [name, task.backend, task.job_id, task.state, step_cell(p), fmt(p.loss), fmt(p.checkpoint)]


def list_rows(entry: Path, by_dir: Dict[Path, List[RunJob]], root: Path) -> List[List[str]]:
    """A run's rows, or a sweep's summary row followed by its points' rows."""
    if not is_sweep(entry):
        return [task_row(t, rel(entry, root)) for t in by_dir.get(entry, [])]
    tasks = [t for d in sweep_points(entry) for t in by_dir.get(d, [])]
    arrays = " ".join(sorted({t.job_id.split("_")[0] for t in tasks})) or "-"
    head = [f"{rel(entry, root)}/ (sweep, {len(tasks)} points)", tasks[0].backend if tasks else "-", arrays,
            summarize_states(tasks) or "-", "", "", ""]
    return [head] + [task_row(t, "  " + rel(t.run_dir, root)) for t in tasks]


def cmd_list(args, out: Console) -> int:
    root = args.root
    entries = sorted(discover(root), key=started_key, reverse=True)[: args.limit] if root.is_dir() else []
    if not entries:
        out.print(f"no runs under {root}", markup=False)
        return 0
    tasks, errors = describe([d for e in entries for d in run_dirs(e)])
    by_dir: Dict[Path, List[RunJob]] = {}
    for task in tasks:
        by_dir.setdefault(task.run_dir, []).append(task)
    table = new_table(f"runs under {root} (newest first)", ("run", "backend", "job", "state", "step", "loss", "checkpoint"))
    for entry in entries:
        for row in list_rows(entry, by_dir, root):
            add_row(table, *row)
    out.print(table)
    return show_errors(errors)


def cmd_status(args, out: Console) -> int:
    root = args.root
    target = resolve_run(args.run, root)
    dirs = run_dirs(target)
    if not dirs:
        raise JobsError(f"{target}: a sweep with no points yet")
    tasks, errors = describe(dirs)
    submission = rundir.submission(dirs[0])
    out.print(f"run        {target}", highlight=False, markup=False, soft_wrap=True)
    out.print(f"backend    {submission.get('backend', '?')}   submitted {submission.get('submitted_at', '?')}", markup=False)
    out.print(f"command    {' '.join(submission.get('argv', []))}", highlight=False, markup=False, soft_wrap=True)
    changed = versions_changed(submission)
    if changed:
        out.print(f"packages   changed since the first submission: {', '.join(f'{k} {v}' for k, v in changed.items())}",
                  highlight=False, markup=False, soft_wrap=True)
    labels = point_labels(dirs) if is_sweep(target) else {}
    columns = (["point"] if labels else []) + ["job", "state", "from", "requeues", "step", "loss", "checkpoint", "nodes"]
    table = new_table("", columns)
    nodes = {d: nodes_per_job(d) for d in dirs}  # an elastic run's starts differ: the nodes each job's start got
    for task in tasks:
        p = task.progress
        first = [f"{task.run_dir.name}  {labels[task.run_dir]}"] if labels else []
        add_row(table, *first, task.job_id, task.state, task.source, fmt(task.requeues), step_cell(p), fmt(p.loss),
                fmt(p.checkpoint), fmt(nodes[task.run_dir].get(task.job_id)))
    out.print(table)
    for task in tasks if len(dirs) == 1 else []:
        if task.progress.health():
            out.print(f"health     {task.progress.health()}", highlight=False, markup=False, soft_wrap=True)
            break
    evals = {d: eval_states(d) for d in dirs}
    eval_jobs = [e.job_id for _, e in queued_eval_jobs(dirs)]
    eval_infos = {}
    if eval_jobs:
        eval_infos, eval_errors = query_jobs(eval_jobs)
        errors = [*errors, *eval_errors]
    for d in dirs:  # the benchmark evals of its checkpoints (eval.harness)
        for line in eval_lines(evals[d], eval_infos):
            out.print(f"point {d.name}: {line}" if labels else line, highlight=False, markup=False, soft_wrap=True)
    return show_errors(errors)


def queued_eval_jobs(dirs: Iterable[Path]) -> List[tuple]:
    """(run dir, eval state) of each eval job a Slurm run submitted that has no result yet. Only a Slurm
    run's evals are jobs: a local run's ran in its own command."""
    return [(d, e) for d in dirs if rundir.submission(d).get("backend") == "slurm"
            for e in eval_states(d) if e.state == "queued" and e.job_id]


UNKNOWN_JOB_GRACE_S = 300  # a job just submitted may not be in sacct or squeue yet


def live_eval_jobs(dirs: Iterable[Path]) -> tuple:
    """(the queued eval jobs that have not ended: (run dir, eval state), Slurm's errors). A job Slurm
    does not report counts as live only while just submitted; after that (its record purged,
    accounting off) it is taken as gone, as the training's jobs are."""
    queued = queued_eval_jobs(dirs)
    if not queued:
        return [], []
    infos, errors = query_jobs([e.job_id for _, e in queued])

    def live(d: Path, e) -> bool:
        info = infos.get(e.job_id)
        if info is None:
            recorded = step_dir(d, e.step) / EVAL_JOB
            return recorded.exists() and time.time() - recorded.stat().st_mtime < UNKNOWN_JOB_GRACE_S
        return info.state.split()[0] not in SLURM_TERMINAL

    return [(d, e) for d, e in queued if live(d, e)], errors


def eval_lines(states, infos=None) -> List[str]:
    """One line per checkpoint's benchmark eval: done with its scores, queued (with its job's state),
    ready, or FAILED with why (an eval job that ended without a result too)."""
    lines = []
    for e in states:
        info = (infos or {}).get(e.job_id) if e.state == "queued" else None
        ended = info.state.split()[0] if info is not None else ""
        if ended == "CANCELLED":  # by sft-jobs cancel, or by hand
            lines.append(f"eval step {e.step}: cancelled (job {e.job_id}, without a result)")
            continue
        if ended in SLURM_TERMINAL:  # killed before it could write a result
            e = replace(e, state="failed", error=f"its job {e.job_id} ended {info.state} without a result")
        if e.state == "done":
            scores = ", ".join(f"{k[len(HARNESS_PREFIX):] if k.startswith(HARNESS_PREFIX) else k} {fmt(v)}"
                               for k, v in sorted(e.scores.items()))
            what = f"done  {scores}" if scores else "done (no scores)"
        elif e.state == "queued":
            what = f"queued (job {e.job_id}{', ' + info.state if info is not None else ''})"
        elif e.state == "ready":
            what = "ready (the model is exported; its eval has not started)"
        else:
            error = (e.error or "").strip().splitlines()
            what = f"FAILED: {error[0] if error else 'no error recorded'}" + (f"; log: {e.log}" if e.log else "")
        lines.append(f"eval step {e.step}: {what}")
    return lines


def single_run(args) -> Path:
    root = args.root
    target = resolve_run(args.run, root)
    if is_sweep(target):
        points = ", ".join(rel(p, root) for p in sweep_points(target)[:5])
        raise JobsError(f"RUN {args.run!r} is a sweep: name one of its points ({points} ...)")
    return target


def task_state(run_dir: Path) -> RunJob:
    tasks, _ = describe([run_dir])
    return tasks[0]


def submitit_logs(run_dir: Path, rank: int) -> List[Path]:
    """submitit's stdout/stderr of this rank: where a job that died before training left its words."""
    jobs = rundir.submission(run_dir).get("jobs") or []
    paths = [Path(j.get("submitit_folder", run_dir / "submitit")) / f"{j['job_id']}_{rank}_log.{ext}"
             for j in jobs for ext in ("out", "err")]
    return [p for p in paths if p.is_file()]


def cmd_logs(args, out: Console) -> int:
    run_dir = single_run(args)
    world = rundir.plan(run_dir).get("world_size")
    if args.rank < 0 or (world and args.rank >= world):
        raise JobsError(f"--rank {args.rank}: the run has ranks 0..{(world or 1) - 1}")
    log = rundir.rank_log(run_dir, args.rank)
    if not args.follow:
        if not log.exists():
            task = task_state(run_dir)
            hint = "".join(f"\n  see {p}" for p in submitit_logs(run_dir, args.rank))
            print(f"{log} does not exist yet (job {task.job_id} {task.state}){hint}", file=sys.stderr)
            return 0
        sys.stdout.write(read_text(log))
        return 0
    try:
        return follow(run_dir, log)
    except KeyboardInterrupt:
        return 0


def follow(run_dir: Path, log: Path) -> int:
    """Print the log as it grows until the job reaches a terminal state."""
    position, next_check, said_waiting = 0, 0.0, False
    while True:
        done = False
        if time.monotonic() >= next_check:
            task = task_state(run_dir)
            done, next_check = is_terminal(task), time.monotonic() + POLL_S
        if log.exists():
            with open(log, "rb") as f:
                f.seek(position)
                chunk = f.read()
            position += len(chunk)
            sys.stdout.write(chunk.decode(errors="replace"))
            sys.stdout.flush()
        elif not said_waiting:
            print(f"{log} does not exist yet (job {task.job_id} {task.state}): waiting", file=sys.stderr)
            said_waiting = True
        if done:
            print(f"job {task.job_id} {task.state}", file=sys.stderr)
            return 0
        time.sleep(0.5)


def record_cancelled(run_dir: Path, what: List[str]) -> None:
    record = {"state": "CANCELLED", "at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "jobs": what}
    write_text_atomic(run_dir / CANCELLED, json.dumps(record, indent=2) + "\n")


def cancel_slurm(tasks: List[RunJob], root: Path, out: Console) -> None:
    """One scancel for every job that has not ended (raises SlurmError, recording nothing, if it fails)."""
    live = [t for t in tasks if t.job_id != "-" and not is_terminal(t)]
    for task in (t for t in tasks if t not in live):
        out.print(f"job {task.job_id} ({rel(task.run_dir, root)}) already {task.state}: not cancelled", markup=False)
    if live:
        cancel([t.job_id for t in live])
    for task in live:
        record_cancelled(task.run_dir, [task.job_id])
        out.print(f"cancelled job {task.job_id} ({rel(task.run_dir, root)})", markup=False)


def cancel_local(task: RunJob, root: Path, out: Console) -> None:
    """SIGTERM to the run's ranks, as a first Ctrl-C would send: they save a checkpoint and exit."""
    pids = rank_pids(task.run_dir)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass  # ended since we looked
    if not pids:
        out.print(f"local run {rel(task.run_dir, root)} ({task.state}) has no rank process on this machine: "
                  "nothing to cancel", markup=False)
        return
    record_cancelled(task.run_dir, [f"pid {pid}" for pid in pids])
    out.print(f"sent SIGTERM to the {len(pids)} rank processes of {rel(task.run_dir, root)}: they checkpoint and stop", markup=False)


def cmd_cancel(args, out: Console) -> int:
    from launcher.jobs.leaderboard import controller_jobs

    target = resolve_run(args.run, args.root)
    controller = controller_jobs(target)
    if controller:  # a search: its controller first, or it would start trials in place of those cancelled
        cancel([controller[-1]])
        out.print(f"cancelled the search's controller job {controller[-1]}")
    tasks, errors = describe(run_dirs(target))
    show_errors(errors)  # states only spare jobs that have ended: the others are cancelled regardless
    cancel_slurm([t for t in tasks if t.job_id != LOCAL], args.root, out)
    for task in (t for t in tasks if t.job_id == LOCAL):
        cancel_local(task, args.root, out)
    cancel_evals(run_dirs(target), args.root, out)
    return 0


def cancel_evals(dirs: List[Path], root: Path, out: Console) -> None:
    """The run's eval jobs that have no result yet: they are the run's jobs too. An eval job the run's
    rank 0 submits after this (its save was under way) is not seen here: a second cancel ends it."""
    live, errors = live_eval_jobs(dirs)
    show_errors(errors)
    if live:
        cancel([e.job_id for _, e in live])
    for d, e in live:
        out.print(f"cancelled eval job {e.job_id} (step {e.step} of {rel(d, root)})", markup=False)


def cmd_report(args, out: Console) -> int:
    from launcher.jobs.plots import HARNESS, harness_rows, plot_runs

    root = args.root
    target = resolve_run(args.run, root)
    dirs = run_dirs(target)
    labels = point_labels(dirs) if is_sweep(target) else {target: ""}
    series = [(labels[d], [*(r for r in read_metrics(d) if r.get("kind") != HARNESS), *harness_rows(harness_scores(d))])
              for d in dirs]
    if not any(rows for _, rows in series):
        print(f"sft-jobs: note: no metrics yet in {target}: the panels are empty", file=sys.stderr)
    path = plot_runs(series, Path(args.out) if args.out else target / "report.png", rel(target, root))
    print(path)
    return 0


def cmd_sync(args, out: Console) -> int:
    from launcher.jobs.sync import sync

    dirs = run_dirs(resolve_run(args.run, args.root))

    def is_live(run_dir: Path) -> bool:
        tasks, errors = describe([run_dir])
        return any(not is_terminal(t) for t in tasks) and not errors

    def say(text: str) -> None:
        out.print(text, highlight=False, markup=False, soft_wrap=True)

    def evals_pending(dirs: List[Path]) -> bool:
        live, errors = live_eval_jobs(dirs)
        show_errors(errors)  # Slurm did not answer: stop following, as for the training's jobs
        return bool(live) and not errors

    synced = sync(dirs, is_live, args.follow, say=say, evals_pending=evals_pending)
    say(f"{synced} segment(s) handed to W&B" if synced else "nothing to sync: every finished segment is synced")
    return 0


def cmd_sweep(args, out: Console) -> int:
    from launcher.jobs import leaderboard as lb
    from launcher.trial.study import is_search

    target = resolve_run(args.run, args.root)
    if not is_search(target):
        raise JobsError(f"{target} is not a search (no search.json): `sft-jobs status {rel(target, args.root)}` shows a grid sweep")
    spec, rows = lb.entries(target)
    if args.json:
        print(lb.as_json(spec, rows))
        return 0
    counts = Counter(e.state for e in rows)
    separate = spec.compared != spec.metric  # the rungs compare another metric than the one ranking the trials
    title = (f"{rel(target, args.root)}: {len(rows)} of {spec.trials} trials ({', '.join(f'{n} {s}' for s, n in counts.items()) or 'none yet'}); "
             + (f"{spec.metric} ({spec.direction}) of the final eval, {spec.compared} ({spec.compared_direction}) "
                f"at steps {spec.rungs}" if separate else f"{spec.metric} ({spec.direction}) at steps {spec.rungs}"))
    table = new_table(title, ["trial", "parameters", "last rung", *([f"{spec.compared} at rung"] if separate else []),
                              spec.metric, "state"])
    for e in rows:
        params = " ".join(f"{k}={fmt(v)}" for k, v in e.params.items())
        state = f"{e.state}, started {len(e.start_failures) + 1}x" if e.start_failures else e.state
        add_row(table, e.trial, params, fmt(e.last_rung), *([fmt(e.rung_value)] if separate else []), fmt(e.value), state)
    out.print(table)
    for e in rows:  # not the trial's own doing: the controller submitted it again
        for reason in e.start_failures:
            out.print(f"trial {e.trial}: a start failed: {escape(reason)}", highlight=False)
    code = 0
    jobs = lb.controller_jobs(target)
    if jobs:
        infos, errors = query_jobs(jobs)
        code = show_errors(errors)
        info = infos.get(jobs[-1])
        out.print(f"controller: job {jobs[-1]} {info.state if info else '?'}"
                  + (f", requeued {info.restarts} time(s)" if info and info.restarts else ""))
    end = lb.search_end(target)
    if end:
        out.print(f"search {end['state']}" + (f": {escape(end['message'])}" if end.get("message") else ""))
    top = lb.best(rows)
    if top:
        export = Path(top.run_dir) / EXPORT
        out.print(f"best: trial {top.trial} ({spec.metric} {fmt(top.value)}), run dir {top.run_dir}"
                  f"\nexport: {export if export.is_dir() else 'none (checkpoint.export=false)'}")
        step, scores = lb.final_harness(Path(top.run_dir))
        if scores:
            out.print(f"its final eval (step {step}):", highlight=False)
            for key, value in sorted(scores.items()):
                out.print(f"  {escape(key[len(HARNESS_PREFIX):])}  {fmt(value)}", highlight=False)
    return code


COMMANDS = {"sweep": cmd_sweep, "list": cmd_list, "status": cmd_status, "logs": cmd_logs, "cancel": cmd_cancel, "report": cmd_report,
            "sync": cmd_sync}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sft-jobs",
        description="Inspect and control runs started by `sft`. RUN is a run (or sweep) directory, or a unique "
                    "prefix of its path under --runs-root, e.g. tiny_sft or tiny_sft/20261124-2103.",
    )
    parser.add_argument("--runs-root", default="./runs", help="where runs live (default: ./runs)")
    # Also accepted after the command; SUPPRESS keeps the top-level value when it is not given there.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--runs-root", default=argparse.SUPPRESS, help="where runs live (default: ./runs)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser("list", parents=[common], help="recent runs and sweeps, newest first")
    p.add_argument("--limit", type=int, default=20, help="how many runs and sweeps (default: 20)")
    p = sub.add_parser("status", parents=[common], help="state, requeues, step, loss and checkpoint of each job of RUN")
    p.add_argument("run", metavar="RUN")
    p = sub.add_parser("logs", parents=[common], help="print a rank's log; -f follows it until the job ends")
    p.add_argument("run", metavar="RUN")
    p.add_argument("--rank", type=int, default=0, help="whose log (default: 0)")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing until the job ends (Ctrl-C stops)")
    p = sub.add_parser("cancel", parents=[common],
                       help="scancel the jobs of RUN (local runs: ask the ranks to checkpoint and stop)")
    p.add_argument("run", metavar="RUN")
    p = sub.add_parser("report", parents=[common],
                       help="PNG of loss, lr, eval metrics and tokens/s (a sweep: every point overlaid)")
    p.add_argument("run", metavar="RUN")
    p.add_argument("--out", help="where to write the PNG (default: RUN/report.png)")
    p = sub.add_parser("sweep", parents=[common],
                       help="a search's leaderboard: each trial's parameters, last rung, metric and state; the best run")
    p.add_argument("run", metavar="SWEEP")
    p.add_argument("--json", action="store_true", help="the leaderboard as JSON")
    p = sub.add_parser("sync", parents=[common],
                       help="upload RUN's offline W&B segments (a sweep: every point) in order, each once")
    p.add_argument("run", metavar="RUN")
    p.add_argument("-f", "--follow", action="store_true", help="follow the live segment and keep syncing until the jobs end")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    args.root = Path(args.runs_root).expanduser().resolve()
    try:
        # COLUMNS, else the terminal, else 120 for pipes (rich's own default of 80 wraps run names).
        return COMMANDS[args.command](args, Console(highlight=False, width=shutil.get_terminal_size((120, 24)).columns))
    except (JobsError, SlurmError) as error:
        print(f"sft-jobs: error: {error}", file=sys.stderr)
        return error.code
