"""sft-jobs against real jobs on the local Slurm cluster: states from sacct/squeue, cancel, logs -f."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from launcher import jobs

pytestmark = pytest.mark.slurm


def sbatch(cluster, tmp_path: Path, *args: str) -> str:
    out = subprocess.run(
        ["sbatch", "--parsable", "-p", cluster.partition, "-t", "5", "-c", "1", "-o", "/dev/null", "--chdir", str(tmp_path), *args],
        capture_output=True, text=True, check=True,
    ).stdout
    return out.strip().split(";")[0]


def sacct_states(job_id: str) -> set[str]:
    """States of a job, or of every task of an array (pending tasks share one record)."""
    out = subprocess.run(["sacct", "-n", "-P", "-X", "-o", "State", "-j", job_id], capture_output=True, text=True, check=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def wait_until(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.5)
    return value


def slurm_run(run_dir: Path, job_ids: list[str], log: str = "") -> Path:
    """A run directory whose submission.json names real jobs, as the Slurm backend records them."""
    (run_dir / "logs").mkdir(parents=True)
    (run_dir / "plan.json").write_text(json.dumps({"world_size": 1, "total_steps": 20}))
    (run_dir / "overrides.yaml").write_text("- cluster=slurm\n")
    jobs_ = [{"job_id": j, "submitit_folder": str(run_dir / "submitit"), "submitted_at": "now"} for j in job_ids]
    (run_dir / "submission.json").write_text(json.dumps({"backend": "slurm", "argv": ["sft", "cluster=slurm"], "jobs": jobs_}))
    if log:
        (run_dir / "logs" / "rank-0.log").write_text(log)
    return run_dir


def status_cells(capsys, root: Path, run: str, key: str) -> list[str]:
    assert jobs.main(["--runs-root", str(root), "status", run]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if key in line and line.startswith("│"))
    return [c.strip() for c in row.strip("│ ").split("│")]


@pytest.fixture(autouse=True)
def wide_terminal(monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")


def test_status_and_cancel_of_a_running_job(slurm_cluster, tmp_path, capsys):
    from launcher import harness_results as evals

    root = tmp_path / "runs"
    job = sbatch(slurm_cluster, tmp_path, "--wrap", "sleep 300")
    eval_job = sbatch(slurm_cluster, tmp_path, "--wrap", "sleep 300")  # as rank 0 submits a checkpoint's eval
    run = slurm_run(root / "long" / "20261124-210300", [job])
    evals.mark_ready(run, 10, run / "model")
    evals.write_json(evals.step_dir(run, 10) / evals.JOB, {"job_id": eval_job, "step": 10})
    try:
        # Right after sbatch sacct may have no record yet: squeue answers, then sacct.
        # A pending job's state names Slurm's reason, "PENDING (Priority)"; the first word is the state.
        assert status_cells(capsys, root, "long", job)[1].split()[0] in ("PENDING", "RUNNING")
        wait_until(lambda: status_cells(capsys, root, "long", job)[1:3] == ["RUNNING", "sacct"], 60, f"sacct to know job {job} RUNNING")

        assert jobs.main(["--runs-root", str(root), "cancel", "long"]) == 0
        out = capsys.readouterr().out
        assert f"cancelled job {job} (long/20261124-210300)" in out
        assert f"cancelled eval job {eval_job} (step 10 of long/20261124-210300)" in out  # the run's evals are its jobs too
        assert json.loads((run / "cancelled.json").read_text())["state"] == "CANCELLED"
        wait_until(lambda: sacct_states(job) == {"CANCELLED"}, 20, f"sacct to show job {job} CANCELLED")
        wait_until(lambda: sacct_states(eval_job) == {"CANCELLED"}, 20, f"sacct to show eval job {eval_job} CANCELLED")
        assert status_cells(capsys, root, "long", job)[1:3] == ["CANCELLED", "sacct"]
        assert jobs.main(["--runs-root", str(root), "status", "long"]) == 0
        assert f"eval step 10: cancelled (job {eval_job}, without a result)" in capsys.readouterr().out

        assert jobs.main(["--runs-root", str(root), "cancel", "long"]) == 0  # again: nothing left to cancel
        out = capsys.readouterr().out
        assert f"job {job} (long/20261124-210300) already CANCELLED: not cancelled" in out
        assert "cancelled eval job" not in out
    finally:
        subprocess.run(["scancel", job, eval_job], check=False)


def test_sweep_array_tasks_and_cancel_of_the_sweep(slurm_cluster, tmp_path, capsys):
    root = tmp_path / "runs"
    array = sbatch(slurm_cluster, tmp_path, "--array", "0-1", "--wrap", "sleep 300")
    sweep = root / "sw" / "20261124-220000"
    for i in (0, 1):
        slurm_run(sweep / str(i), [f"{array}_{i}"])
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    try:
        assert status_cells(capsys, root, "sw", f"{array}_1")[2].split()[0] in ("PENDING", "RUNNING")
        assert jobs.main(["--runs-root", str(root), "cancel", "sw"]) == 0
        out = capsys.readouterr().out
        assert f"cancelled job {array}_0 (sw/20261124-220000/0)" in out and f"cancelled job {array}_1" in out
        wait_until(lambda: sacct_states(array) == {"CANCELLED"}, 20, f"sacct to show every task of {array} CANCELLED")
        for i in (0, 1):
            assert status_cells(capsys, root, "sw", f"{array}_{i}")[2] == "CANCELLED"
        assert jobs.main(["--runs-root", str(root), "list"]) == 0
        assert "2 CANCELLED" in capsys.readouterr().out
    finally:
        subprocess.run(["scancel", array], check=False)


def test_quick_job_completes_and_logs_follow_stops(slurm_cluster, tmp_path, capsys, monkeypatch):
    root = tmp_path / "runs"
    job = sbatch(slurm_cluster, tmp_path, "--wrap", "true")
    slurm_run(root / "quick" / "20261124-210300", [job], log="train step 20  loss 1.5\n")
    wait_until(lambda: sacct_states(job) == {"COMPLETED"}, 120, f"sacct to show job {job} COMPLETED")  # slow under load
    assert status_cells(capsys, root, "quick", job)[1:4] == ["COMPLETED", "sacct", "0"]

    monkeypatch.setattr(jobs.cli, "POLL_S", 0.5)  # follow() polls at launcher.jobs.cli.POLL_S
    assert jobs.main(["--runs-root", str(root), "logs", "quick", "-f"]) == 0  # returns: the job has ended
    captured = capsys.readouterr()
    assert captured.out == "train step 20  loss 1.5\n" and f"job {job} COMPLETED" in captured.err
