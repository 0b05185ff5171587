"""Real tests against the local two-node Slurm cluster (see slurm/README.md).

They prove what the launcher relies on: submitit round trips, sacct accounting,
multi-node jobs, scancel, and the USR2 -> checkpoint -> requeue path.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import cloudpickle
import pytest
import submitit

pytestmark = pytest.mark.slurm

# The job functions below are defined in this test module, which the jobs cannot import
# (tests/ is not a package on their sys.path): ship them by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

JOB_TIMEOUT_S = 60


# ----------------------------------------------------------------- helpers
def wait_until(predicate, timeout: float, what: str, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def wait_result(job: submitit.Job, timeout: float = JOB_TIMEOUT_S):
    """job.results() with a deadline (a job that never finishes must not hang the suite)."""
    try:
        wait_until(lambda: job.done(force_check=True), timeout, f"job {job.job_id} to finish")
    except AssertionError as timed_out:
        # Say what held it: the queue (pending reasons) and the nodes.
        queue = subprocess.run(["squeue", "-o", "%i %T %r %N %j"], capture_output=True, text=True).stdout
        nodes = subprocess.run(["sinfo", "-N", "-o", "%N %t %E"], capture_output=True, text=True).stdout
        raise AssertionError(f"{timed_out}\nsqueue:\n{queue}\nsinfo:\n{nodes}") from None
    return job.results()


def sacct_states(job_id: str, duplicates: bool = False) -> list[str]:
    """States of the job allocation (not its steps), oldest first when duplicates=True."""
    cmd = ["sacct", "-n", "-X", "-P", "-o", "State", "-j", job_id]
    if duplicates:
        cmd.append("--duplicates")
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def wait_sacct_state(job_id: str, prefix: str, timeout: float = 20) -> list[str]:
    # slurmctld sends records to slurmdbd asynchronously: allow a short lag.
    return wait_until(
        lambda: (states := sacct_states(job_id)) and states[-1].startswith(prefix) and states,
        timeout,
        f"sacct to show job {job_id} as {prefix}",
    )


def force_state(job: submitit.Job) -> str:
    # job.state is cached by submitit's watcher; force a fresh sacct call.
    return job.get_info(mode="force").get("State", "UNKNOWN")


# ----------------------------------------------------------------- job functions
def add(a: int, b: int) -> int:
    return a + b


def node_identity() -> dict[str, str]:
    env = submitit.JobEnvironment()
    keys = ["SLURM_NNODES", "SLURM_NODEID", "SLURMD_NODENAME", "SLURM_PROCID", "SLURM_JOB_NODELIST"]
    info = {k: os.environ.get(k, "") for k in keys}
    info["hostnames"] = ",".join(env.hostnames)
    # torch.distributed takes MASTER_ADDR from the first node name: it must resolve.
    info["master_addr"] = socket.gethostbyname(env.hostnames[0])
    return info


def sleep_forever(marker: str) -> None:
    Path(marker).touch()
    time.sleep(600)


class Resumable(submitit.helpers.Checkpointable):
    """First run: signals it is running and waits to be preempted. After requeue: returns."""

    def __call__(self, workdir: str) -> dict[str, str]:
        work = Path(workdir)
        with (work / "attempts").open("a") as f:
            f.write(f"{os.environ.get('SLURM_RESTART_COUNT', '0')}\n")
        attempts = (work / "attempts").read_text().split()
        if len(attempts) == 1:
            (work / "running").touch()
            time.sleep(300)  # the test sends USR2 long before this ends
            return {"attempts": "1", "requeued": "no"}
        return {"attempts": str(len(attempts)), "restart_count": attempts[-1]}


# ----------------------------------------------------------------- tests
def test_sinfo_shows_both_nodes_up(slurm_cluster):
    out = subprocess.run(
        ["sinfo", "-h", "-N", "-p", slurm_cluster.partition, "-o", "%N %t"],
        capture_output=True, text=True, check=True,
    ).stdout
    states = dict(line.split() for line in out.splitlines())
    assert set(states) == set(slurm_cluster.nodes), out
    # "idle" on a quiet cluster; mix/alloc/comp while other jobs run or end right now.
    for node, state in states.items():
        assert state in {"idle", "mix", "alloc", "comp"}, f"{node} is {state!r}:\n{out}"
    partitions = subprocess.run(
        ["sinfo", "-h", "-o", "%P %l %D"], capture_output=True, text=True, check=True
    ).stdout.split("\n")
    assert f"{slurm_cluster.partition}* 1:00:00 2" in partitions
    assert f"{slurm_cluster.limits_partition} 5:00 2" in partitions


def test_submitit_roundtrip_and_sacct(slurm_executor):
    executor = slurm_executor()
    job = executor.submit(add, 2, 3)
    assert wait_result(job) == [5]
    assert wait_sacct_state(job.job_id, "COMPLETED")[-1] == "COMPLETED"


def test_two_node_job(slurm_executor, slurm_cluster):
    executor = slurm_executor(nodes=2, tasks_per_node=1)
    job = executor.submit(node_identity)
    results = wait_result(job)
    assert len(results) == 2
    assert {r["SLURM_NNODES"] for r in results} == {"2"}
    assert sorted(r["SLURM_NODEID"] for r in results) == ["0", "1"]
    assert sorted(r["SLURMD_NODENAME"] for r in results) == sorted(slurm_cluster.nodes)
    assert sorted(r["SLURM_PROCID"] for r in results) == ["0", "1"]
    assert {r["hostnames"] for r in results} == {",".join(slurm_cluster.nodes)}
    assert {r["master_addr"] for r in results} == {"127.0.0.1"}


def test_partition_limits_rejected_at_submit(slurm_executor, slurm_cluster):
    # EnforcePartLimits=ALL: a job over the partition limits fails at sbatch time.
    executor = slurm_executor(slurm_partition=slurm_cluster.limits_partition, nodes=2)
    with pytest.raises(Exception, match="Node count specification invalid"):
        executor.submit(add, 1, 1)
    executor = slurm_executor(slurm_partition=slurm_cluster.limits_partition, timeout_min=6)
    with pytest.raises(Exception, match="time limit"):
        executor.submit(add, 1, 1)


def test_scancel_gives_cancelled(slurm_executor, tmp_path):
    executor = slurm_executor()
    marker = tmp_path / "started"
    job = executor.submit(sleep_forever, str(marker))
    wait_until(marker.exists, JOB_TIMEOUT_S, "the sleeping job to start")
    # sacct (what submitit reads) lags slurmctld by a moment.
    wait_until(lambda: force_state(job) == "RUNNING", 20, "submitit to see RUNNING")
    subprocess.run(["scancel", job.job_id], check=True)
    wait_until(lambda: force_state(job).startswith("CANCELLED"), 30, "submitit to see CANCELLED")
    assert wait_sacct_state(job.job_id, "CANCELLED")[-1].startswith("CANCELLED")
    assert job.done(force_check=True)


def test_usr2_checkpoint_requeue(slurm_executor, tmp_path):
    executor = slurm_executor(timeout_min=20)
    job = executor.submit(Resumable(), str(tmp_path))
    wait_until((tmp_path / "running").exists, JOB_TIMEOUT_S, "the checkpointable job to start")
    # What Slurm sends before the time limit / on preemption (submitit: --signal=USR2@90).
    # (How fast the requeued job starts again is measured in benchmarks/bench_slurm.py.)
    subprocess.run(["scancel", "--signal=USR2", job.job_id], check=True)
    (result,) = wait_result(job, timeout=180)
    assert result == {"attempts": "2", "restart_count": "1"}
    assert wait_sacct_state(job.job_id, "COMPLETED")[-1] == "COMPLETED"
    assert "REQUEUED" in sacct_states(job.job_id, duplicates=True)
