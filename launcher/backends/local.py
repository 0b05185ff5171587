"""The local backend: N rank processes on this machine running launcher.rank, watched together.

Rank 0 inherits the terminal (progress bar); every rank's output also lands in logs/rank-N.log.
If a rank fails, the others are stopped and the failing rank's traceback is shown. Ctrl-C (or
SIGTERM, SIGUSR2) asks every rank to checkpoint and stop; a second Ctrl-C kills them.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from rich.console import Console

from launcher import harness_results, rundir
from launcher.devices import local_gpu_count
from launcher.rendezvous import RENDEZVOUS_ENV, new_attempt_id
from launcher.plan_report import eval_summary
from launcher.exit_codes import EXIT_BAD_INPUT, EXIT_STOPPED
from launcher.snapshot import import_env, snapshot_code
from launcher.trial.rungs import trial_end

GRACE_S = 60  # after a failure or Ctrl-C, how long ranks get to exit before SIGKILL


def rank_env(rank: int, world: int, attempt: str, procs: int, code: Optional[Path] = None) -> Dict[str, str]:
    """attempt: one id for every rank of this start (launcher.rendezvous: rank 0 publishes its port under it)."""
    env = dict(os.environ)
    if code is not None:
        env.update(import_env(code))
    env.pop("MASTER_PORT", None)
    env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
               MASTER_ADDR="127.0.0.1", **{RENDEZVOUS_ENV: attempt})
    # One OpenMP thread pool per rank, sized to share the cores (measured ~14% faster than unset on 2 cores).
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // procs)))
    if not local_gpu_count():
        env.setdefault("DS_ACCELERATOR", "cpu")
    env.setdefault("WANDB_SILENT", "true")  # the run's own summary is printed at the end
    return env


def start_ranks(run_dir: Path, world: int) -> List[subprocess.Popen]:
    attempt = new_attempt_id()
    code = snapshot_code(run_dir)  # the ranks run the code `sft` was started with
    rundir.rank_log(run_dir, 0).parent.mkdir(exist_ok=True)
    procs = []
    for rank in range(world):
        out = None if rank == 0 else open(rundir.rank_output(run_dir, rank), "w")
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "launcher.rank", str(run_dir)],
            env=rank_env(rank, world, attempt, world, code), stdout=out, stderr=subprocess.STDOUT if out else None,
            start_new_session=True,  # the terminal's Ctrl-C reaches us, and we decide what ranks get
        ))
    return procs


def signal_all(procs: List[subprocess.Popen], sig: int) -> None:
    for proc in procs:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                pass


def wait_all(procs: List[subprocess.Popen], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
        time.sleep(0.2)
    signal_all(procs, signal.SIGKILL)
    for proc in procs:
        proc.wait()


def last_traceback(log_file: Path, max_lines: int = 80) -> Tuple[str, bool]:
    """(the last traceback in a rank's output, True), or (its last lines, False) when there is none."""
    lines = log_file.read_text(errors="replace").splitlines()
    starts = [i for i, line in enumerate(lines) if "Traceback (most recent call last)" in line]
    return ("\n".join(lines[starts[-1]:][:max_lines]), True) if starts else ("\n".join(lines[-20:]), False)


def describe_exit(rank: int, code: int) -> str:
    """How a rank ended, in words: a signal by name (SIGKILL: most often the out-of-memory killer)."""
    if code == EXIT_BAD_INPUT:
        return f"rank {rank} stopped on a data problem (exit {code})"
    if code >= 0:
        return f"rank {rank} failed (exit {code})"
    try:
        name = signal.Signals(-code).name
    except ValueError:
        name = f"signal {-code}"
    text = f"rank {rank} was killed by {name} (exit {code})"
    if -code == signal.SIGKILL:
        text += ("; a SIGKILL nobody sent is most often the kernel's out-of-memory killer (`dmesg | grep -i oom`): "
                 "lower trainer.micro_batch_size, turn on trainer.activation_checkpointing or offload")
    return text


def run_local(cfg, run_dir: Path, plan) -> int:
    console = Console(stderr=True, soft_wrap=True)
    procs = start_ranks(run_dir, plan.world_size)
    interrupted = 0

    def on_sigint(signum, frame):
        nonlocal interrupted
        interrupted += 1
        signal_all(procs, signal.SIGTERM if interrupted == 1 else signal.SIGKILL)

    def forward(signum, frame):
        signal_all(procs, signum)

    handlers = {signal.SIGINT: on_sigint, signal.SIGTERM: on_sigint, signal.SIGUSR2: forward}  # USR2: as under Slurm
    previous = {sig: signal.signal(sig, handler) for sig, handler in handlers.items()}
    try:
        while True:
            codes = [p.poll() for p in procs]
            # A rank killed by a signal first: its peers then fail in a collective, which says less.
            failed = sorted((r for r, c in enumerate(codes) if c not in (None, 0, EXIT_STOPPED)), key=lambda r: codes[r] >= 0)
            if failed:
                signal_all(procs, signal.SIGTERM)
                wait_all(procs, GRACE_S)
                rank = failed[0]
                console.print(f"[bold red]{describe_exit(rank, codes[rank])}[/]; other ranks stopped", highlight=False, markup=True)
                if rank != 0:  # rank 0's output is on this terminal already
                    text, is_traceback = last_traceback(rundir.rank_output(run_dir, rank))
                    if not is_traceback:
                        console.print(f"rank {rank} left no traceback; the last lines of its output:", highlight=False)
                    console.print(text, highlight=False, markup=False)
                console.print(f"logs: {run_dir / rundir.LOGS}", highlight=False)
                return 1
            if all(c is not None for c in codes):
                break
            time.sleep(0.2)
    finally:
        for sig, handler in previous.items():  # a local sweep runs the next point in this process
            signal.signal(sig, handler)
    if any(c == EXIT_STOPPED for c in codes):
        at_rung = trial_end(run_dir).get("state") == "paused"
        console.print("stopped at a rung by the search: it resumes if later trials rank it among the best" if at_rung else
                      f"stopped; resume with: sft run_dir={run_dir} (and the same overrides)", highlight=False)
        return EXIT_STOPPED
    export = run_dir / rundir.EXPORT
    console.print(f"done: {run_dir}", highlight=False)
    console.print(eval_summary(run_dir), highlight=False)
    if export.is_dir():
        console.print(f"export: {export}", highlight=False)
    run_harness_evals(run_dir, console)
    return 0


def run_harness_evals(run_dir: Path, console: Console) -> None:
    """Locally the benchmark evals (eval.harness) run after training, one step at a time, each in a
    process of its own (as an eval job would). A failed one is the eval's: the run is done all the same."""
    for state in harness_results.eval_states(run_dir):
        if state.state != "ready":
            continue
        console.print(f"benchmark eval of step {state.step} (lm-eval) ...", highlight=False)
        env = {**os.environ, **import_env(run_dir / rundir.CODE)} if (run_dir / rundir.CODE).is_dir() else None
        proc = subprocess.run([sys.executable, "-m", "launcher.harness", str(run_dir), str(state.step)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        after = harness_results.read_state(harness_results.step_dir(run_dir, state.step))
        if proc.returncode == 0 and after is not None and after.state == "done":
            console.print(harness_results.one_line(state.step, after.scores), highlight=False)
        else:
            error = after.error if after is not None and after.error else f"exit {proc.returncode}"
            console.print(f"[bold red]benchmark eval of step {state.step} failed[/]: {error}; log: "
                          f"{harness_results.step_dir(run_dir, state.step) / harness_results.LOG}", highlight=False)
