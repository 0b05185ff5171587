"""Fixtures for tests against the local Slurm cluster (slurm/start-cluster.sh).

``slurm_cluster`` (session scope) runs ``slurm/start-cluster.sh``, which is idempotent:
it installs the Debian packages when missing (~35 s the very first time), starts the
daemons that are not running (~3 s) or just checks them (<1 s). A cluster that cannot be
started makes the tests fail (error), never skip.

The cluster is left RUNNING after the session, so that the next run (and users trying the
launcher) do not pay the start again. Stop it with ``slurm/stop-cluster.sh``. Set
``SFT_SLURM_STOP_AFTER_TESTS=1`` to stop it at the end of the session, but only when this
session was the one that started it. ``SFT_SLURM_STATE`` selects the state dir (default
``/var/tmp/sft-slurm``); it is passed on to the scripts.

The tests need root (the scripts install packages and run the daemons as root).
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
START_SCRIPT = REPO_ROOT / "slurm" / "start-cluster.sh"
STOP_SCRIPT = REPO_ROOT / "slurm" / "stop-cluster.sh"


@dataclass(frozen=True)
class SlurmCluster:
    state_dir: Path
    slurm_conf: Path
    partition: str = "debug"  # default partition, MaxTime 60 min, node[1-2]
    limits_partition: str = "short"  # MaxTime 5 min, MaxNodes 1
    nodes: tuple[str, ...] = ("node1", "node2")
    cpus_per_node: int = 2
    gpus_per_node: int = 2  # fake, count-only GRES (no real devices)
    env: dict[str, str] = field(default_factory=dict)  # exports a client needs


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "slurm: needs the local Slurm cluster (slurm/start-cluster.sh, root)"
    )


def _start_cluster() -> tuple[subprocess.CompletedProcess[str], bool]:
    if os.geteuid() != 0:
        pytest.fail(f"the local Slurm cluster needs root: run `sudo {START_SCRIPT}` / pytest as root")
    try:
        proc = subprocess.run(
            [str(START_SCRIPT)], capture_output=True, text=True, timeout=900, check=False
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{START_SCRIPT} timed out:\n{exc.stderr}")
    if proc.returncode != 0:
        pytest.fail(
            f"{START_SCRIPT} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}\n{proc.stdout}"
        )
    started_ctld = "starting slurmctld" in proc.stderr
    return proc, started_ctld


def _cancel_leftover_test_jobs(pytest_root: Path, timeout_s: float = 90) -> None:
    """Cancel jobs that earlier test sessions left queued or running, and wait until they are gone.

    A session killed half-way (a CI timeout, a cut-off shell) leaves its jobs in the cluster's
    saved state; a restarted slurmctld recovers them, and the requeueable ones run again and hold
    the nodes, so this session's jobs would pend behind them ("PENDING (Priority)"). Only jobs whose
    output goes under pytest's temp root are touched: a user's own jobs on this cluster are not.
    """
    listing = subprocess.run(["squeue", "-h", "-O", "JobID:|,StdOut:|"], capture_output=True, text=True, check=False)
    leftovers = [
        row.split("|")[0].split("_")[0]
        for row in listing.stdout.splitlines()
        if row.count("|") >= 2 and row.split("|")[1].startswith(str(pytest_root))
    ]
    if not leftovers:
        return
    subprocess.run(["scancel", *sorted(set(leftovers))], check=False)
    deadline = time.monotonic() + timeout_s  # KillWait is 30 s: a job that ignores SIGTERM takes that long
    while time.monotonic() < deadline:
        queued = subprocess.run(["squeue", "-h", "-o", "%i", "-j", ",".join(sorted(set(leftovers)))],
                                capture_output=True, text=True, check=False).stdout.split()
        if not queued:
            return
        time.sleep(1)
    pytest.fail(f"jobs left by an earlier test session did not end within {timeout_s}s: {queued}")


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    proc, started_here = _start_cluster()
    exports = dict(re.findall(r"^export (\w+)=(\S+)$", proc.stdout, flags=re.M))
    if "SLURM_CONF" not in exports:
        pytest.fail(f"{START_SCRIPT} printed no SLURM_CONF export:\n{proc.stdout}")
    slurm_conf = Path(exports["SLURM_CONF"])
    previous = {k: os.environ.get(k) for k in exports}
    # Clients (sbatch, sacct, submitit) and the jobs they submit find the cluster via this.
    os.environ.update(exports)
    # pytest-of-<user>/ holds every session's temp dirs, this one's included (it has submitted
    # nothing yet); with a --basetemp of the user's choosing, only that one is ours to clean.
    basetemp = tmp_path_factory.getbasetemp()
    _cancel_leftover_test_jobs(basetemp.parent if basetemp.parent.name.startswith("pytest-of-") else basetemp)
    cluster = SlurmCluster(state_dir=slurm_conf.parent.parent, slurm_conf=slurm_conf, env=exports)
    yield cluster
    for key, value in previous.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    if started_here and os.environ.get("SFT_SLURM_STOP_AFTER_TESTS") == "1":
        subprocess.run([str(STOP_SCRIPT)], check=False, timeout=120)


@pytest.fixture
def submitit_folder(tmp_path: Path) -> Path:
    """A fresh submitit log folder per test.

    Never reuse a folder across cluster restarts: job ids restart after the state dir is
    wiped, and submitit would then read an old job's result from the folder.
    """
    folder = tmp_path / "submitit"
    folder.mkdir()
    return folder


@pytest.fixture
def slurm_executor(slurm_cluster: SlurmCluster, submitit_folder: Path):
    """Factory: ``slurm_executor(**params)`` -> submitit.AutoExecutor on the local cluster."""
    import submitit

    def make(**params):
        executor = submitit.AutoExecutor(folder=submitit_folder, cluster="slurm")
        defaults = dict(slurm_partition=slurm_cluster.partition, timeout_min=10, cpus_per_task=1)
        defaults.update(params)
        executor.update_parameters(**defaults)
        return executor

    return make
