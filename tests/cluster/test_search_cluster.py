"""A search on the real local cluster: `sft -m hydra/sweeper=search` returns with the controller
queued, the controller is requeued mid-search, and the search still ends with every trial run once,
ranked by a benchmark score: each completed trial's final export is scored by its own lm-eval job,
while the rungs compare the eval loss."""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import optuna
import pytest

from launcher.trial.study import SearchSpec, open_study
from tests.conftest import SFT_JOBS, run_sft

pytestmark = pytest.mark.slurm

# Four trials take every path: the first two wait at the first rung (fewer than sweep.reduction=3
# values there) and the others find three, so the best goes on or is promoted from waiting; at the
# second rung too few arrive to compare, so they wait, the best goes on once nothing is left to
# start (a resume, always) and the others are pruned. At most 64 of 144 steps are trained.
MAX_STEPS, RUNGS, TRIALS = 36, [4, 12, 36], 4
METRIC = "harness/tiny_tasks_ll/perplexity"
# One rank per trial, two trials at a time: the 2-core cluster holds both and the controller.
SEARCH = ["-m", "hydra/sweeper=search", "recipe=tiny_sft", "cluster=slurm", "cluster.gpus_per_node=0",
          "cluster.procs_per_node=1", "cluster.cpus_per_task=1", "cluster.time_min=10", "cluster.partition=debug",
          "trainer.micro_batch_size=8", "trainer.global_batch_size=8", f"trainer.max_steps={MAX_STEPS}",
          "trainer.log_every=4", "optim.warmup_steps=2", "eval.every_steps=0", "eval.generate_samples=0",
          "checkpoint.every_steps=0", "tracking=none", "optim.lr=tag(log,interval(1e-4,3e-2))",
          f"sweep.trials={TRIALS}", "sweep.parallel=2", f"sweep.rungs=[{','.join(map(str, RUNGS))}]", "sweep.poll_s=1",
          # Ranked by the answers' perplexity on the bundled eval split (lm-eval, 16 examples, a 1-CPU job).
          f"sweep.metric={METRIC}", "sweep.rung_metric=eval/loss", "eval.harness.tasks=[tiny_tasks_ll]",
          "eval.harness.limit=16", "eval.harness.gpus=0", "eval.harness.cpus=1", "eval.harness.time_min=10"]


def sacct_states(job_id: str) -> list:
    out = subprocess.run(["sacct", "-D", "-X", "-n", "-P", "-j", job_id, "-o", "State"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def trials(sweep_dir: Path) -> list:
    return open_study(sweep_dir, SearchSpec.load(sweep_dir)).get_trials(deepcopy=False)


def trained_steps(run_dir: Path) -> int:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return max(r["step"] for r in rows if r["kind"] == "train")


def test_a_search_prunes_and_survives_a_controller_requeue(slurm_cluster, tmp_path):
    result = run_sft([*SEARCH, f"runs_root={tmp_path}/runs"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    # It returns with the controller queued: no trial has ended (none may even exist yet).
    job_id = result.stdout.split("submitted search controller job ")[1].split()[0]
    sweep_dir = Path(result.stdout.split("sweep directory: ")[1].split()[0])
    assert not [t for t in trials(sweep_dir) if t.state.is_finished()]
    assert f"follow it: sft-jobs sweep {sweep_dir}" in result.stdout

    # Mid-search (a trial waits at a rung, not all have started): requeue the controller.
    deadline = time.monotonic() + 300
    while not (list(sweep_dir.glob("*/trial_end.json")) and len(trials(sweep_dir)) < TRIALS):
        assert time.monotonic() < deadline and len(trials(sweep_dir)) < TRIALS, "no point to requeue the controller at"
        time.sleep(0.2)
    subprocess.run(["scontrol", "requeue", job_id], check=True)

    deadline = time.monotonic() + 600
    while sacct_states(job_id)[-1:] != ["COMPLETED"]:
        assert time.monotonic() < deadline, f"controller {job_id}: {sacct_states(job_id)}"
        assert sacct_states(job_id)[-1:] not in (["FAILED"], ["CANCELLED"]), (sweep_dir / "controller").iterdir()
        time.sleep(0.5)
    assert "REQUEUED" in sacct_states(job_id)

    # Every trial ran once: one run dir each, none lost; each job of a trial (the first, and one
    # per resume after waiting at a rung) trained its own steps, none twice.
    done = trials(sweep_dir)
    assert len(done) == TRIALS and {t.state for t in done} == {optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED}
    dirs = sorted(p for p in sweep_dir.iterdir() if p.is_dir() and p.name.isdigit())
    assert [int(p.name) for p in dirs] == sorted(t.number for t in done)
    assert len({t.params["optim.lr"] for t in done}) == TRIALS
    resumes = 0
    for d in dirs:
        jobs = json.loads((d / "submission.json").read_text())["jobs"]
        starts = (d / "logs" / "rank-0.log").read_text().count("INFO launcher: code: ")
        assert len(jobs) == starts, f"{d}: {len(jobs)} jobs submitted, {starts} started"  # none submitted twice
        steps = [json.loads(line)["step"] for line in (d / "metrics.jsonl").read_text().splitlines()
                 if json.loads(line)["kind"] == "train"]
        assert len(steps) == len(set(steps)), f"{d}: a step trained twice"
        resumes += len(jobs) - 1
    assert resumes >= 1  # some trial waited at a rung and was resumed from its checkpoint

    # Pruned trials stopped through the checkpoint path at their rung and were not requeued.
    for t in done:
        run_dir = sweep_dir / str(t.number)
        if t.state == optuna.trial.TrialState.PRUNED:
            end = json.loads((run_dir / "trial_end.json").read_text())
            assert end["state"] == "pruned" and end["step"] in RUNGS[:-1]
            assert trained_steps(run_dir) == end["step"] == max(t.intermediate_values)
            assert (run_dir / "checkpoints" / f"step-{end['step']:06d}").is_dir()
        else:
            assert trained_steps(run_dir) == MAX_STEPS and sorted(t.intermediate_values) == RUNGS
            # Its value is its final eval's score, from the eval job of its export.
            summary = json.loads((run_dir / "evals" / f"step-{MAX_STEPS:06d}" / "summary.json").read_text())
            assert t.value == summary["scores"][METRIC] and summary["model"] == str(run_dir / "export")

    spent = sum(trained_steps(sweep_dir / str(t.number)) for t in done)
    assert spent <= TRIALS * MAX_STEPS / 2, f"{spent} steps spent of {TRIALS * MAX_STEPS}"

    board = subprocess.run([SFT_JOBS, "sweep", str(sweep_dir)], capture_output=True, text=True,
                           env={**os.environ, "COLUMNS": "200"})
    assert board.returncode == 0, board.stderr
    rows = [[c.strip() for c in line.strip("│ ").split("│")] for line in board.stdout.splitlines() if line.startswith("│")]
    assert {r[5] for r in rows} == {"completed", "pruned"} and len(rows) == TRIALS
    completed = sorted((t for t in done if t.state == optuna.trial.TrialState.COMPLETE), key=lambda t: t.value)
    # Ordered by the benchmark score (lower perplexity first), the best trial's scores below the table.
    assert [r[0] for r in rows[:len(completed)]] == [str(t.number) for t in completed]
    assert rows[0][0] == str(completed[0].number) and f"best: trial {completed[0].number}" in board.stdout
    assert "tiny_tasks_ll/perplexity" in board.stdout.split(f"best: trial {completed[0].number}")[1]
    assert f"controller: job {job_id} COMPLETED, requeued 1 time(s)" in board.stdout
    assert "search completed" in board.stdout


def array_task_pids(job: str) -> list:
    """The rank processes of one array task (`ARRAY_TASK`) on this host: the local cluster's nodes share it."""
    array, task = job.split("_")
    want = {f"SLURM_ARRAY_JOB_ID={array}".encode(), f"SLURM_ARRAY_TASK_ID={task}".encode()}
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            if (proc.name.isdigit() and Path(argv[0].decode()).name.startswith("python") and b"submitit.core._submit" in argv
                    and want <= set((proc / "environ").read_bytes().split(b"\0"))):
                pids.append(int(proc.name))
        except OSError:
            pass
    return pids


def test_a_trial_preempted_while_it_pauses_at_a_rung_is_not_requeued_past_it(slurm_cluster, tmp_path):
    """Preempted between its rung verdict and its exit, a paused trial exits stopped (75) and waits
    for its search: a requeue would train it past its rung without a promotion. Its ranks are
    frozen (SIGSTOP) from the moment trial_end.json says paused until Slurm has set the job's
    PreemptTime, so the preemption lands in that window whatever the machine's speed."""
    search = [a for a in SEARCH if a != "tracking=none" and not a.startswith(("sweep.trials=", "sweep.rungs="))]
    # Two trials, both pause at step 8 (fewer than sweep.reduction there); W&B on makes the exit take a while.
    result = run_sft([*search, "sweep.trials=2", f"sweep.rungs=[8,{MAX_STEPS}]", f"runs_root={tmp_path}/runs"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    controller = result.stdout.split("submitted search controller job ")[1].split()[0]
    sweep_dir = Path(result.stdout.split("sweep directory: ")[1].split()[0])
    try:
        deadline = time.monotonic() + 300
        paused = []
        while not paused:
            assert time.monotonic() < deadline, "no trial paused at its rung"
            paused = [p.parent for p in sweep_dir.glob("*/trial_end.json") if "paused" in p.read_text()]
            time.sleep(0.01)
        run_dir = paused[0]
        job = json.loads((run_dir / "submission.json").read_text())["jobs"][-1]["job_id"]
        pids = array_task_pids(job)
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        try:
            assert pids, f"trial {run_dir.name}'s ranks exited before they could be frozen"
            node = subprocess.run(["squeue", "-h", "-j", job, "-o", "%N"], capture_output=True, text=True).stdout.strip()
            subprocess.run(["sbatch", "--parsable", "-p", "urgent", "-w", node, "--exclusive", "-n", "1", "-t", "1",
                            "-o", "/dev/null", "--wrap", "sleep 5"], capture_output=True, text=True, check=True)
            deadline = time.monotonic() + 120
            while "PreemptTime=None" in subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True,
                                                        text=True).stdout:
                assert time.monotonic() < deadline, f"job {job} was never chosen for preemption"
                time.sleep(0.2)
        finally:
            for pid in pids:
                os.kill(pid, signal.SIGCONT)
        deadline = time.monotonic() + 120
        while sacct_states(job)[-1:] not in (["FAILED"], ["COMPLETED"], ["CANCELLED"]):
            assert time.monotonic() < deadline, f"trial job {job}: {sacct_states(job)}"
            time.sleep(1)
        log = (run_dir / "logs" / "rank-0.log").read_text()
        assert sacct_states(job) == ["FAILED"], sacct_states(job)  # exit 75: stopped, never requeued
        assert "requeued job" not in log and log.count("INFO launcher: code: ") == 1
        assert trained_steps(run_dir) == 8
    finally:
        jobs = [j["job_id"] for p in sweep_dir.glob("*/submission.json") for j in json.loads(p.read_text())["jobs"]]
        subprocess.run(["scancel", controller, *jobs], check=False)
