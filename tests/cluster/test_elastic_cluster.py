"""An elastic run on the local two-node cluster (cluster.min_nodes=1, cluster.nodes=2): it starts on
the one node free while another job holds the second, a USR2 restarts it over the range (one node
still), and once the second node is free it grows to two by itself (cluster.grow) at a checkpoint;
the whole run's losses equal an uninterrupted two-rank run with the same global batch (the pinned
reference of tests/integration, which a local 2-rank run reproduces to 1e-6), and no step is
trained twice."""

import json
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import SFT_JOBS
from tests.cluster.test_slurm_backend import TINY, losses, sacct, submit, wait_for_state

pytestmark = pytest.mark.slurm
# TINY with 12 steps on 2 ranks: tests/integration/test_trainer.py's SHORT (its checkpoint cadence aside).
REFERENCE = Path(__file__).resolve().parents[1] / "integration" / "reference_losses.json"

# One rank per node, each owning its node's 2 CPUs: the run holds as many nodes as ranks.
NODES = ["cluster=slurm", "cluster.gpus_per_node=0", "cluster.procs_per_node=1", "cluster.cpus_per_task=2",
         "cluster.time_min=10", "cluster.partition=debug", "cluster.nodes=2", "trainer.max_steps=12",
         "checkpoint.every_steps=2", "checkpoint.keep=3"]
ELASTIC = [*NODES, "cluster.min_nodes=1", "cluster.grow=true", "cluster.grow_check_s=1"]


def rows(run_dir: Path, kind: str = "train") -> list:
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def jobs(run_dir: Path) -> list:
    return [j["job_id"] for j in json.loads((run_dir / "submission.json").read_text())["jobs"]]


def wait_until(condition, what: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.2)


@pytest.fixture(scope="module")
def elastic_run(slurm_cluster, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("elastic")
    holder = subprocess.run(["sbatch", "--parsable", "-p", "debug", "-w", "node2", "--exclusive", "-t", "10",
                             "-o", str(tmp / "holder.out"), "--wrap", "sleep 600"],
                            capture_output=True, text=True, check=True).stdout.strip()
    wait_for_state(holder, {"RUNNING"})
    run_dir, first = submit(tmp, [*TINY, *ELASTIC], "elastic")
    wait_until(lambda: len(rows(run_dir)) >= 3, "the first start trained no 3 steps")
    subprocess.run(["scancel", "--signal=USR2", first], check=True)  # the time limit is near: restart over the range
    wait_until(lambda: len(jobs(run_dir)) == 2, "the run was not submitted again")
    stopped_at = max(r["step"] for r in rows(run_dir))
    wait_until(lambda: max(r["step"] for r in rows(run_dir)) > stopped_at, "the second start trained no step")
    subprocess.run(["scancel", holder], check=True)  # node2 is free: the run grows at its next checkpoint
    wait_until(lambda: len(jobs(run_dir)) == 3, "the run did not grow")
    assert wait_for_state(jobs(run_dir)[-1], timeout=400) == "COMPLETED"
    return run_dir


def test_an_elastic_run_starts_small_restarts_over_the_range_and_grows(elastic_run):
    run_dir = elastic_run
    first, second, third = jobs(run_dir)
    assert [sacct(j)[0][0].split()[0] for j in (first, second)] == ["FAILED", "FAILED"]  # exit 75: stopped, continued
    assert [sacct(j, "ExitCode")[0][0] for j in (first, second)] == ["75:0", "75:0"]
    world = {}
    for r in rows(run_dir):
        world.setdefault(r["world_size"], []).append(r["step"])
    assert set(world) == {1, 2} and max(world[1]) < min(world[2]) and max(world[2]) == 12  # 1 node, then 2
    requeued = [e for e in map(json.loads, (run_dir / "events.jsonl").read_text().splitlines()) if e["event"] == "requeued"]
    assert [(e["job"], e["next_job"], e["grow"]) for e in requeued] == [(first, second, False), (second, third, True)]
    starts = [e for e in map(json.loads, (run_dir / "events.jsonl").read_text().splitlines()) if e["event"] == "started"]
    assert [(e["nodes"], e["world_size"]) for e in starts if e["rank"] == 0] == [(1, 1), (1, 1), (2, 2)]
    log = (run_dir / "logs" / "rank-0.log").read_text()
    assert "elastic start: 1 node(s), world size 1, 4 accumulation step(s) for the global batch of 16" in log
    assert "elastic start: 2 node(s), world size 2, 2 accumulation step(s) for the global batch of 16" in log
    assert "this run has 2: loading its universal form" in log  # written by 1 rank, resumed by 2
    status = subprocess.run([SFT_JOBS, "status", str(run_dir)], capture_output=True, text=True)
    table = [line for line in status.stdout.splitlines() if line.startswith("│")]
    cells = {line.split("│")[1].strip(): [c.strip() for c in line.split("│")[1:-1]] for line in table}
    assert [cells[j][-1] for j in (first, second, third)] == ["1", "1", "2"]  # nodes per start
    assert cells[third][1] == "COMPLETED" and cells[first][1] == "STOPPED"


def test_its_losses_equal_a_two_rank_run_and_no_step_is_trained_twice(elastic_run):
    run_dir = elastic_run
    steps = [r["step"] for r in rows(run_dir)]
    assert sorted(steps) == list(range(1, 13)) and len(set(steps)) == len(steps)
    want, got = {int(k): v for k, v in json.loads(REFERENCE.read_text()).items()}, losses(run_dir)
    assert sorted(got) == sorted(want) == list(range(1, 13))
    assert max(abs(got[s] - want[s]) for s in got) < 1e-4, {s: got[s] - want[s] for s in got}


def test_a_cancel_while_the_run_hands_over_to_its_next_job_ends_it(slurm_cluster, tmp_path):
    """USR2 (restart over the range) and at once `sft-jobs cancel`: the job sees itself cancelled when it
    would submit its successor, and submits none (or cancels the one it submitted): nothing trains on.
    Submitted on an idle cluster, it starts on both nodes: Slurm alone would start `--nodes=1-2` on one."""
    wait_until(lambda: not subprocess.run(["squeue", "-h"], capture_output=True, text=True).stdout.strip(),
               "the cluster did not become idle", timeout=120)
    run_dir, job = submit(tmp_path, [*TINY, *ELASTIC, "cluster.grow=false", "trainer.max_steps=200"], "cancelled")
    wait_until(lambda: len(rows(run_dir)) >= 2, "the run trained no 2 steps")
    assert json.loads((run_dir / "submission.json").read_text())["jobs"][0]["min_nodes"] == 2
    assert {r["world_size"] for r in rows(run_dir)} == {2}  # both nodes from its first start
    subprocess.run(["scancel", "--signal=USR2", job], check=True)
    result = subprocess.run([SFT_JOBS, "cancel", str(run_dir)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    wait_for_state(job, timeout=120)
    time.sleep(5)  # a successor submitted at the last moment would be queued by now
    # Whichever came first (the successor recorded before the cancel read the jobs, or the job found
    # itself cancelled), every job of the run is cancelled and none trains on.
    states = {j: sacct(j)[0][0].split()[0] if sacct(j) else "?" for j in jobs(run_dir)}
    assert all(state == "CANCELLED" for state in states.values()), states
    log = (run_dir / "logs" / "rank-0.log").read_text()
    assert len(states) == 2 or f"job {job} was cancelled" in log, log[-2000:]
    assert log.count("INFO launcher: code: ") == 1  # no second start
