"""`sft cluster=slurm` on the real local cluster: non-blocking submit, multi-node, sweeps as one
array, preemption and time-limit requeues with exact resume, and checks before the queue."""

import contextlib
import json
import os
import re
import subprocess
import signal
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import SFT_JOBS, run_sft
from tests.utils.ports import held_ports
from tests.utils.wandb_file import find_runs, read_run

pytestmark = pytest.mark.slurm

# Two tasks on one node, fp32 CPU training of the tiny model; steps logged one by one.
SLURM = ["cluster=slurm", "cluster.gpus_per_node=0", "cluster.procs_per_node=2", "cluster.cpus_per_task=1",
         "cluster.time_min=10", "cluster.partition=debug"]
TINY = ["recipe=tiny_sft", "trainer.log_every=1", "trainer.micro_batch_size=4", "trainer.global_batch_size=16",
        "optim.warmup_steps=2", "eval.every_steps=0", "eval.generate_samples=0", "eval.max_batches=2"]
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "PREEMPTED", "BOOT_FAIL", "DEADLINE"}


def sacct(job_id: str, fields: str = "State") -> list:
    out = subprocess.run(["sacct", "-n", "-P", "-X", "-j", job_id, "-o", fields], capture_output=True, text=True).stdout
    return [line.split("|") for line in out.splitlines() if line]


def restarts(job_id: str) -> int:
    """Requeues of a job: sacct -D lists every incarnation, the requeued ones as REQUEUED."""
    out = subprocess.run(["sacct", "-D", "-X", "-n", "-P", "-j", job_id, "-o", "State"], capture_output=True, text=True).stdout
    return sum(line.startswith("REQUEUED") for line in out.splitlines())


def wait_for_state(job_id: str, states=TERMINAL, timeout: float = 400) -> str:
    deadline = time.monotonic() + timeout
    state = "?"
    while time.monotonic() < deadline:
        rows = sacct(job_id)
        state = rows[0][0].split()[0] if rows else "?"
        if state in states:
            return state
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} still {state} after {timeout} s")


def submit(tmp: Path, overrides, name: str, env=None):
    run_dir = tmp / name
    result = run_sft([*overrides, f"run_dir={run_dir}"], cwd=tmp, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    job_id = json.loads((run_dir / "submission.json").read_text())["jobs"][-1]["job_id"]  # the newest: a resubmitted run keeps its earlier jobs
    assert f"submitted job {job_id}" in result.stdout and f"sft-jobs logs {run_dir} -f" in result.stdout
    assert (result.stdout + result.stderr).count("run directory:") == 1
    # `sft` returns once the job is queued, never after it: the job (tens of seconds at least) is still there.
    queued = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True).stdout.strip()
    assert queued in ("PENDING", "CONFIGURING", "RUNNING"), f"sft returned when job {job_id} was {queued!r}"
    return run_dir, job_id


def job_ids_of(run_dir: Path) -> list:
    return [j["job_id"] for j in json.loads((run_dir / "submission.json").read_text())["jobs"]]


def wait_for_line(path: Path, text: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not (path.exists() and text in path.read_text(errors="replace")):
        assert time.monotonic() < deadline, f"{text!r} never appeared in {path}"
        time.sleep(0.1)


def status_row(run_dir: Path) -> list:
    """`sft-jobs status RUN` as its user sees it: the job's cells (job, state, from, requeues, ...)."""
    out = subprocess.run([SFT_JOBS, "status", str(run_dir)], capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"})
    row = next(line for line in out.stdout.splitlines() if line.startswith("│"))
    return [c.strip() for c in row.strip("│ ").split("│")]


def rank_pids(run_dir: Path) -> list:
    """The job's rank processes on this host (the local cluster's nodes share it)."""
    needle = f"submitit.core._submit {run_dir}/submitit".encode()
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            if proc.name.isdigit() and Path(argv[0].decode()).name.startswith("python") and needle in b" ".join(argv):
                pids.append(int(proc.name))  # the ranks, not the srun that started them
        except OSError:
            pass
    return pids


@contextlib.contextmanager
def frozen_ranks(run_dir: Path):
    """The job's ranks stopped (SIGSTOP) meanwhile: a signal sent to them lands where they were when
    frozen, whatever the machine's speed; SIGCONT at the end lets them handle it."""
    pids = rank_pids(run_dir)
    assert len(pids) == 2, pids
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)


def losses(run_dir: Path) -> dict:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r["kind"] == "train"}


def start_now_if_selected(request, fixture: str, test: str) -> None:
    """Set up `fixture`, a run submitted and left to run, now rather than when `test` (which checks
    it) starts, if this session runs `test`: its jobs fill a wait of the calling test, when the host's
    CPUs would idle. A failed submission is reported by `test` (pytest keeps a fixture's error)."""
    if any(getattr(item, "originalname", item.name) == test for item in request.session.items):
        with contextlib.suppress(Exception):
            request.getfixturevalue(fixture)


def same_weights(a: Path, b: Path) -> bool:
    x, y = load_file(a / "export" / "model.safetensors"), load_file(b / "export" / "model.safetensors")
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


# The runs below are stopped from step 12 on (a node fails at step 14) and compared with the
# uninterrupted one: periodic checkpoints at steps 10 and 20, and steps after them to resume and train.
LAST_STEP = 24
STEPS = [f"trainer.max_steps={LAST_STEP}", "checkpoint.every_steps=10"]


@pytest.fixture(scope="module")
def runs(slurm_cluster, tmp_path_factory):
    """Submit the uninterrupted and the preempted runs together; they share the wait."""
    tmp = tmp_path_factory.mktemp("slurm")
    preempted = submit(tmp, [*TINY, *SLURM, *STEPS], "preempted")
    plain = submit(tmp, [*TINY, *SLURM, *STEPS], "plain")
    # Preempt mid-run, as a time-limit warning or a preempting job would: USR2 to every task.
    run_dir, job_id = preempted
    deadline = time.monotonic() + 300
    while not ((run_dir / "metrics.jsonl").exists() and len(losses(run_dir)) >= 12):
        assert time.monotonic() < deadline, "the run did not reach step 12"
        time.sleep(0.2)
    # Twice in quick succession (Slurm may repeat it; a user may too): one checkpoint, one requeue.
    # The ranks are frozen meanwhile, so both signals reach this incarnation whatever the machine's
    # speed (a second scancel during the requeue is retried by scancel and hits the next one).
    with frozen_ranks(run_dir):
        subprocess.run(["scancel", "--signal=USR2", job_id], check=True)
        subprocess.run(["scancel", "--signal=USR2", job_id], check=True)
    return tmp, plain, preempted


def test_submit_returns_at_once_and_the_run_completes(runs):
    _, (run_dir, job_id), _ = runs
    assert wait_for_state(job_id) == "COMPLETED"
    assert (run_dir / "export" / "model.safetensors").is_file()
    assert max(losses(run_dir)) == LAST_STEP
    log = (run_dir / "logs" / "rank-1.log").read_text()
    assert "[rank 1]" in log
    status = subprocess.run([SFT_JOBS, "status", str(run_dir)], capture_output=True, text=True)
    assert "COMPLETED" in status.stdout, status.stdout + status.stderr


def test_preemption_checkpoints_requeues_and_resumes_exactly(runs):
    _, (plain_dir, plain_id), (run_dir, job_id) = runs
    assert wait_for_state(job_id, {"COMPLETED", "FAILED", "CANCELLED"}, timeout=500) == "COMPLETED"
    assert wait_for_state(plain_id) == "COMPLETED"
    assert restarts(job_id) == 1
    log = (run_dir / "logs" / "rank-0.log").read_text()
    assert "stop signal received: saving a checkpoint" in log and "resumed from" in log
    assert losses(run_dir) == losses(plain_dir)
    assert same_weights(run_dir, plain_dir)
    assert_one_wandb_run_across_segments(run_dir, 2)


def run_until(run_dir: Path, step: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not ((run_dir / "metrics.jsonl").exists() and len(losses(run_dir)) >= step):
        assert time.monotonic() < deadline, f"the run did not reach step {step}"
        time.sleep(0.2)


def stopped_and_resumed_at(run_dir: Path) -> tuple:
    """(step saved on the stop, step resumed from): equal when no step was lost."""
    log = (run_dir / "logs" / "rank-0.log").read_text()
    saved = [int(m) for m in re.findall(r"stop signal received: saving a checkpoint at step (\d+)", log)]
    resumed = [int(m) for m in re.findall(r"resumed from \S+ at step (\d+)", log)]
    assert len(saved) == 1 and len(resumed) == 1, log[-3000:]
    return saved[0], resumed[0]


def assert_one_wandb_run_across_segments(run_dir: Path, segments: int, last_step: int = LAST_STEP) -> None:
    """One W&B run id, one complete .wandb file per segment, and every step's train row exactly
    once, in order, with W&B's own step equal to ours (a SIGTERM kills W&B's service; the
    segment is rebuilt from metrics.jsonl)."""
    files = find_runs(run_dir)
    runs_read = [read_run(f) for f in files]
    assert len(files) == segments and {r["run_id"] for r in runs_read} == {(run_dir / "wandb_run_id").read_text().strip()}
    assert all(r["exit_code"] is not None for r in runs_read)  # each segment's file ends with its exit record
    steps = [row["_step"] for r in runs_read for row in r["history"] if "train/loss" in row]
    assert steps == list(range(1, last_step + 1)), steps


@pytest.fixture(scope="module")
def sigterm_runs(runs):
    """SIGTERM as Slurm sends it (W&B on): `scontrol requeue` on one run, `scancel --signal=TERM` on another."""
    tmp = runs[0]
    requeued = submit(tmp, [*TINY, *SLURM, *STEPS], "requeued")
    terminated = submit(tmp, [*TINY, *SLURM, *STEPS], "terminated")
    faults = {requeued: ["scontrol", "requeue", requeued[1]], terminated: ["scancel", "--signal=TERM", terminated[1]]}
    deadline = time.monotonic() + 300
    while faults:  # each fault as soon as its run reaches step 12 (the two run at once)
        for (run_dir, job_id), cmd in list(faults.items()):
            if (run_dir / "metrics.jsonl").exists() and len(losses(run_dir)) >= 12:
                subprocess.run(cmd, check=True)
                del faults[(run_dir, job_id)]
        assert time.monotonic() < deadline, f"never reached step 12: {list(faults)}"
        time.sleep(0.1)
    return requeued, terminated


def test_scontrol_requeue_checkpoints_and_the_job_resumes_exactly(sigterm_runs, runs):
    (run_dir, job_id), _ = sigterm_runs
    _, (plain_dir, plain_id), _ = runs
    assert wait_for_state(job_id, {"COMPLETED", "FAILED", "CANCELLED"}, timeout=500) == "COMPLETED"
    assert restarts(job_id) == 1 and status_row(run_dir)[1:4] == ["COMPLETED", "sacct", "1"]
    saved, resumed = stopped_and_resumed_at(run_dir)
    assert saved == resumed >= 12  # no step lost
    assert wait_for_state(plain_id) == "COMPLETED"
    assert losses(run_dir) == losses(plain_dir) and same_weights(run_dir, plain_dir)
    assert_one_wandb_run_across_segments(run_dir, 2)
    # Each segment says which Slurm job, which requeue and which nodes, and why it ended.
    first, second = (read_run(f) for f in find_runs(run_dir))
    for segment, requeues in ((first, 0), (second, 1)):
        meta = segment["config"]["run"]
        assert (meta["backend"], meta["slurm_job_id"], meta["requeues"], meta["world_size"]) == ("slurm", job_id, requeues, 2)
        assert meta["nodes"] in ("node1", "node2") and f"slurm_job:{job_id}" in segment["tags"]
    assert first["summary"]["end_reason"] == "stopped" and first["exit_code"] == 75
    assert second["summary"]["end_reason"] == "completed"
    last = [row for row in second["history"] if "train/loss" in row][-1]
    assert last["train/slowest_rank"] in (0, 1) and last["train/step_time_max_s"] >= last["train/step_time_min_s"] > 0
    assert last["train/peak_mem_gib_max"] > 0 and last["train/data_wait_s_max"] >= 0


def test_scancel_term_stops_the_run_resumable_and_a_new_start_finishes_it_exactly(sigterm_runs, runs):
    _, (run_dir, job_id) = sigterm_runs
    _, (plain_dir, plain_id), _ = runs
    assert wait_for_state(job_id) == "FAILED"
    assert sacct(job_id, "State,ExitCode") == [["FAILED", "75:0"]]  # the stop code, not a crash
    row = status_row(run_dir)
    assert row[1:3] == ["STOPPED", "sacct"], row
    log = (run_dir / "logs" / "rank-0.log").read_text()
    saved = int(re.findall(r"stop signal received: saving a checkpoint at step (\d+)", log)[-1])
    assert (run_dir / "checkpoints" / f"step-{saved:06d}" / "COMPLETE").is_file()
    assert_one_wandb_run_across_segments(run_dir, 1, last_step=saved)

    # A changed global batch would replay data: refused, with nothing submitted or rewritten.
    config = (run_dir / "config.yaml").read_bytes()
    result = run_sft([*TINY, *SLURM, *STEPS, "trainer.global_batch_size=32", f"run_dir={run_dir}"], cwd=run_dir.parent)
    assert result.returncode == 2 and "global_batch_size: 16 in the checkpoint, 32 now" in " ".join(result.stderr.split())
    assert (run_dir / "config.yaml").read_bytes() == config

    _, again = submit(run_dir.parent, [*TINY, *SLURM, *STEPS], run_dir.name)
    jobs = [j["job_id"] for j in json.loads((run_dir / "submission.json").read_text())["jobs"]]
    assert jobs == [job_id, again]  # the first job stays in the run's history
    assert wait_for_state(again) == "COMPLETED"
    assert stopped_and_resumed_at(run_dir) == (saved, saved)
    assert wait_for_state(plain_id) == "COMPLETED"
    assert losses(run_dir) == losses(plain_dir) and same_weights(run_dir, plain_dir)
    assert_one_wandb_run_across_segments(run_dir, 2)


def test_a_real_preemption_checkpoints_and_slurm_requeues_the_run(runs, tmp_path):
    """A job of the higher-priority `urgent` partition takes the node: Slurm sends SIGTERM, the run
    checkpoints within the grace time, Slurm requeues it, and it resumes where it stopped."""
    _, (plain_dir, plain_id), _ = runs
    run_dir, job_id = submit(tmp_path, [*TINY, *SLURM, *STEPS], "preempted")
    run_until(run_dir, 12)
    node = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%N"], capture_output=True, text=True).stdout.strip()
    # Frozen until Slurm has chosen the job for preemption (its PreemptTime is set as it sends the
    # SIGTERM): the stop lands at this step whatever the machine's speed, long before the last one.
    with frozen_ranks(run_dir):
        urgent = subprocess.run(["sbatch", "--parsable", "-p", "urgent", "-w", node, "--exclusive", "-n", "1", "-t", "1",
                                 "-o", "/dev/null", "--wrap", "sleep 5"], capture_output=True, text=True, check=True).stdout.strip()
        deadline = time.monotonic() + 120
        while "PreemptTime=None" in subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True,
                                                    text=True).stdout:
            assert time.monotonic() < deadline, f"job {job_id} was never chosen for preemption"
            time.sleep(0.2)
    assert wait_for_state(urgent) == "COMPLETED"
    assert wait_for_state(job_id, {"COMPLETED", "FAILED", "CANCELLED"}, timeout=500) == "COMPLETED"
    assert restarts(job_id) == 1
    saved, resumed = stopped_and_resumed_at(run_dir)
    assert saved == resumed >= 12
    assert wait_for_state(plain_id) == "COMPLETED"
    assert losses(run_dir) == losses(plain_dir) and same_weights(run_dir, plain_dir)
    assert_one_wandb_run_across_segments(run_dir, 2)


def test_a_node_failure_requeues_the_job_and_it_resumes_from_the_newest_checkpoint(runs, slurm_cluster, tmp_path, request):
    """The job's node dies (its slurmd, the job's step daemons and ranks killed, as a power loss
    would): Slurm marks the node down and the job NODE_FAIL, requeues it on the other node, and the
    run resumes from its newest complete checkpoint, losing at most one checkpoint interval."""
    _, (plain_dir, plain_id), _ = runs
    run_dir, job_id = submit(tmp_path, [*TINY, *SLURM, *STEPS], "node_failure")
    run_until(run_dir, 14)
    node = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%N"], capture_output=True, text=True).stdout.strip()
    slurmd = int((slurm_cluster.state_dir / "run" / f"slurmd.{node}.pid").read_text())
    stepds = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and _cmdline(p).startswith(f"slurmstepd: [{job_id}.")]
    lost_at = max(losses(run_dir))
    try:
        for pid in [slurmd, *stepds, *rank_pids(run_dir)]:
            with contextlib.suppress(ProcessLookupError):  # a rank may die with its step daemon first
                os.kill(pid, signal.SIGKILL)
        # For the ~30-50 s Slurm takes to notice (SlurmdTimeout) nothing runs on this host: the
        # time-limited run's first cycle trains on the other node meanwhile, and this job, requeued,
        # takes that node when the cycle ends.
        start_now_if_selected(request, "time_limited", "test_time_limit_requeues_until_done")
        assert wait_for_state(job_id, {"COMPLETED", "FAILED", "CANCELLED"}, timeout=600) == "COMPLETED"
    finally:
        restore = subprocess.run([str(Path(__file__).resolve().parents[2] / "slurm" / "start-cluster.sh")], capture_output=True, text=True)
        assert restore.returncode == 0, restore.stderr[-2000:]
    history = subprocess.run(["sacct", "-D", "-X", "-n", "-P", "-j", job_id, "-o", "State"], capture_output=True, text=True).stdout.split()
    assert history[0] == "NODE_FAIL" and history[-1] == "COMPLETED", history
    log = (run_dir / "logs" / "rank-0.log").read_text()
    resumed = int(re.findall(r"resumed from \S+ at step (\d+)", log)[-1])
    assert resumed == lost_at // 10 * 10 and lost_at - resumed < 10  # the newest periodic checkpoint
    assert wait_for_state(plain_id) == "COMPLETED"
    assert losses(run_dir) == losses(plain_dir) and same_weights(run_dir, plain_dir)


def _cmdline(proc: Path) -> str:
    try:
        return (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def test_two_nodes_train_one_job(slurm_cluster, tmp_path):
    with held_ports(1) as port:  # the configured rendezvous port is taken on the node, as by another job
        overrides = [*TINY, *SLURM, "cluster.nodes=2", "cluster.procs_per_node=1", "trainer.max_steps=4",
                     "trainer.global_batch_size=8", "checkpoint.export=false", "tracking=none", f"cluster.master_port={port}"]
        run_dir, job_id = submit(tmp_path, overrides, "two_nodes")
        assert wait_for_state(job_id) == "COMPLETED"
    assert sacct(job_id, "NNodes,NodeList")[0] == ["2", "node[1-2]"]
    logs = [(run_dir / "logs" / f"rank-{r}.log").read_text() for r in (0, 1)]
    assert all("steps:" in text for text in logs)
    # Rank 0 took the next free port and rank 1, on the other node, read it from the run directory.
    published = json.loads((run_dir / "rendezvous.json").read_text())
    assert published == {"attempt": f"slurm-{job_id}-0", "addr": published["addr"], "port": port + 1, "world_size": 2}
    assert f"rendezvous: rank 0 listens on {published['addr']}:{port + 1} (attempt slurm-{job_id}-0, 2 ranks)" in logs[0]
    assert json.loads((run_dir / "plan.json").read_text())["world_size"] == 2
    assert max(losses(run_dir)) == 4


@pytest.fixture(scope="module")
def time_limited(slurm_cluster, tmp_path_factory):
    """The run of test_time_limit_requeues_until_done, submitted and left to run: each of its cycles
    lasts as long as Slurm's time limit lets it, whoever waits for it."""
    # A 2-minute limit with USR2 60 s before it. Slurm may signal up to a minute early (its event
    # granularity), so a cycle trains for at most ~60 s: 400 steps take at least two cycles on any
    # machine, and a loaded one needs more, so the requeue budget is generous.
    overrides = [*TINY, *SLURM, "cluster.time_min=2", "cluster.signal_delay_s=60", "cluster.max_requeues=10",
                 "trainer.max_steps=400", "checkpoint.export=false", "tracking=none"]
    return submit(tmp_path_factory.mktemp("time_limit"), overrides, "time_limited")


def test_time_limit_requeues_until_done(time_limited):
    run_dir, job_id = time_limited
    assert wait_for_state(job_id, timeout=900) == "COMPLETED"
    requeues = restarts(job_id)
    assert requeues >= 1
    assert max(losses(run_dir)) == 400
    assert (run_dir / "logs" / "rank-0.log").read_text().count("stop signal received") == requeues


def test_a_stop_during_start_up_requeues_and_the_run_completes(slurm_cluster, tmp_path):
    """USR2 while DeepSpeed compiles its comm op (an empty extensions folder, as on a new machine):
    the compiler survives, the task stops at its first step boundary without a checkpoint, the job
    is requeued once and the requeued job trains to the end."""
    env = {"TORCH_EXTENSIONS_DIR": str(tmp_path / "torch_extensions")}
    overrides = [*TINY, *SLURM, "trainer.max_steps=6", "checkpoint.every_steps=0", "checkpoint.export=false", "tracking=none"]
    run_dir, job_id = submit(tmp_path, overrides, "start_up", env=env)
    logs = [run_dir / "logs" / f"rank-{rank}.log" for rank in (0, 1)]
    deadline = time.monotonic() + 300
    while not any(p.exists() and "ops: building deepspeed_shm_comm" in p.read_text() for p in logs):  # either rank
        assert time.monotonic() < deadline, "the op build did not start"
        time.sleep(0.1)
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True)
    assert wait_for_state(job_id) == "COMPLETED"
    assert status_row(run_dir)[1:4] == ["COMPLETED", "sacct", "1"]
    log = "".join(p.read_text() for p in logs)
    assert "ops: a stop signal arrived during the build" in log  # it landed while the compiler ran
    assert log.count("stop signal received before the first step: exiting without a checkpoint") == 2  # both ranks
    assert log.count("ops: building deepspeed_shm_comm") == 1  # the requeued job loads what was built
    outputs = "".join(p.read_text(errors="replace") for p in (run_dir / "submitit").glob("*.out"))
    assert "Error building extension" not in outputs + log
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step-*")) == ["step-000006"]
    assert sorted(losses(run_dir)) == list(range(1, 7))


def signal_frozen_ranks(run_dir: Path, job_id: str) -> None:
    """USR2 to a job whose ranks are frozen (SIGSTOP) meanwhile: the signal reaches them where they
    were when frozen, whatever the machine's speed; SIGCONT lets them handle it."""
    with frozen_ranks(run_dir):
        assert sacct(job_id)[0][0] == "RUNNING"
        subprocess.run(["scancel", "--signal=USR2", job_id], check=True)


def rows_of(run_dir: Path, kind: str) -> list:
    return [r["step"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


# A generation eval of a few seconds: two chunks of prompts per rank, the stop checked between them.
LONG_EVAL = ["eval.generate_samples=64", "eval.max_new_tokens=48", "checkpoint.every_steps=0", "tracking=none"]


@pytest.fixture(scope="module")
def eval_stops(slurm_cluster, tmp_path_factory):
    """USR2 during the final eval of one run and during a cadence eval (step 3) of another."""
    tmp = tmp_path_factory.mktemp("eval_stops")
    final = submit(tmp, [*TINY, *SLURM, *LONG_EVAL, "trainer.max_steps=4"], "final_eval")
    cadence = submit(tmp, [*TINY, *SLURM, *LONG_EVAL, "trainer.max_steps=6", "eval.every_steps=3"], "cadence_eval")
    # The final eval starts once the last checkpoint is saved; the cadence eval once step 3 is logged.
    ready = {final: lambda d: (d / "checkpoints" / "step-000004").is_dir(),
             cadence: lambda d: (d / "metrics.jsonl").exists() and 3 in losses(d)}
    deadline = time.monotonic() + 300
    while ready:
        for (run_dir, job_id), is_ready in list(ready.items()):
            if is_ready(run_dir):
                signal_frozen_ranks(run_dir, job_id)
                del ready[(run_dir, job_id)]
        assert time.monotonic() < deadline, f"never reached the eval: {[d for d, _ in ready]}"
        time.sleep(0.02)
    for _, job_id in (final, cadence):
        assert wait_for_state(job_id) == "COMPLETED"
    return {"final": final, "cadence": cadence}


def test_a_stop_during_the_final_eval_saves_first_and_the_requeued_job_evaluates_and_exports(eval_stops):
    run_dir, job_id = eval_stops["final"]
    assert restarts(job_id) == 1
    assert status_row(run_dir)[1:4] == ["COMPLETED", "sacct", "1"]
    log = (run_dir / "logs" / "rank-0.log").read_text()
    assert "stop signal received: step 4 is saved already" in log  # saved before the eval, not again
    assert log.count(" saved in ") == 1
    assert log.index("resumed from") < log.index("eval step 4")  # the eval ran in the requeued job, once
    assert rows_of(run_dir, "train") == [1, 2, 3, 4] and rows_of(run_dir, "eval") == [4]  # no step trained twice
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step-*")) == ["step-000004"]
    assert (run_dir / "export" / "model.safetensors").is_file()
    assert json.loads((run_dir / "final_eval.json").read_text())["step"] == 4


def test_a_stop_during_a_cadence_eval_saves_it_as_due_and_the_requeued_job_runs_it_first(eval_stops):
    run_dir, job_id = eval_stops["cadence"]
    assert restarts(job_id) == 1
    assert stopped_and_resumed_at(run_dir) == (3, 3)
    log = (run_dir / "logs" / "rank-0.log").read_text()
    assert "running step 3's eval, which the last segment gave up for a stop" in log
    assert rows_of(run_dir, "train") == [1, 2, 3, 4, 5, 6] and rows_of(run_dir, "eval") == [0, 3, 6]  # each once
    assert (run_dir / "export" / "model.safetensors").is_file()


def test_partition_max_nodes_is_checked(slurm_cluster, tmp_path):
    """The training's partition and its eval jobs' (eval.harness), each problem named, nothing written."""
    result = run_sft([*TINY, *SLURM, "cluster.partition=short", "cluster.time_min=5", "cluster.nodes=2",
                      "cluster.procs_per_node=1", "trainer.global_batch_size=8", f"runs_root={tmp_path}/runs",
                      "eval.harness.tasks=[tiny_tasks]", "eval.harness.time_min=30", "eval.harness.gpus=4"], cwd=tmp_path)
    assert result.returncode == 2
    assert "cluster.nodes=2: must be <= partition short's MaxNodes (1) per job" in result.stderr
    assert "eval.harness.time_min=30: must be <= partition short's MaxTime (5 min)" in result.stderr
    assert "eval.harness.gpus=4: must be <= the 2 GPUs per node of partition short" in result.stderr
    assert not (tmp_path / "runs").exists()


def files_of(run_dir: Path) -> dict:
    """What a submission writes: the run's files, the code snapshot and the batch scripts."""
    written = [run_dir / n for n in ("submission.json", "config.yaml", "plan.json", "overrides.yaml", "ds_config.json")]
    written += [*(run_dir / "code").rglob("*.py"), *(run_dir / "submitit").glob("*.sh")]
    return {str(p): p.read_bytes() for p in written if p.is_file()}


def test_a_second_start_on_a_live_run_is_refused_and_scancel_cancels_without_requeue(slurm_cluster, tmp_path, request):
    overrides = [*TINY, *SLURM, "trainer.max_steps=2000", "tracking=none"]
    run_dir, job_id = submit(tmp_path, overrides, "cancelled")
    before = files_of(run_dir)
    second = run_sft([*overrides, f"run_dir={run_dir}"], cwd=tmp_path)
    assert second.returncode == 2, second.stdout + second.stderr
    assert f"run_dir={str(run_dir)!r}: job {job_id} is still" in " ".join(second.stderr.split())
    assert f"sft-jobs cancel {run_dir}" in " ".join(second.stderr.split())
    assert files_of(run_dir) == before and job_ids_of(run_dir) == [job_id]
    deadline = time.monotonic() + 300
    while not ((run_dir / "metrics.jsonl").exists() and len(losses(run_dir)) >= 2):
        assert time.monotonic() < deadline, "the run did not start"
        time.sleep(0.5)
    subprocess.run(["scancel", job_id], check=True)
    assert wait_for_state(job_id) == "CANCELLED"
    start_now_if_selected(request, "packed_sweep", "test_a_sweep_is_one_array_whose_eight_trials_share_a_node_at_once")  # it trains meanwhile
    time.sleep(15)  # a wrongly requeued job would be PENDING or RUNNING again by now
    assert sacct(job_id)[0][0].startswith("CANCELLED") and restarts(job_id) == 0


@pytest.fixture(scope="module")
def packed_sweep(slurm_cluster, tmp_path_factory):
    """The sweep of test_a_sweep_is_one_array_whose_eight_trials_share_a_node_at_once, submitted and left to run."""
    # Eight 1-rank trials packed on one node (partition pack: node1, each core shared by up to four
    # jobs), as 1-GPU trials are on an 8-GPU node: every trial's rank 0 listens on that node at once.
    tmp_path = tmp_path_factory.mktemp("sweep")
    lrs = [f"{n}e-3" for n in range(1, 9)]
    result = run_sft(["-m", *TINY, *SLURM, "cluster.partition=pack", "cluster.procs_per_node=1", "cluster.array_parallelism=8",
                      "trainer.max_steps=2", "trainer.global_batch_size=8", "checkpoint.export=false",
                      f"optim.lr={','.join(lrs)}", "tracking.api_key=sw33p-s3cret", f"runs_root={tmp_path}/runs"], cwd=tmp_path)
    return tmp_path, lrs, result


def test_a_sweep_is_one_array_whose_eight_trials_share_a_node_at_once(packed_sweep):
    tmp_path, lrs, result = packed_sweep
    assert result.returncode == 0, result.stderr[-3000:]
    assert "submitted job array" in result.stdout and "with 8 tasks" in result.stdout
    [sweep_dir] = (tmp_path / "runs" / "tiny_sft").iterdir()
    # The follow-up commands work from anywhere: they name the sweep, not a runs root.
    assert f"follow it: sft-jobs status {sweep_dir}" in result.stdout
    assert f"upload W&B from this node as it runs: sft-jobs sync {sweep_dir} --follow" in result.stdout
    points = sorted((p for p in sweep_dir.iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
    assert [p.name for p in points] == [str(n) for n in range(8)]
    job_ids = [json.loads((p / "submission.json").read_text())["jobs"][0]["job_id"] for p in points]
    assert len({j.split("_")[0] for j in job_ids}) == 1  # one array, one sbatch
    assert [wait_for_state(job_id) for job_id in job_ids] == ["COMPLETED"] * 8, [p / "logs" for p in points]
    rows = [sacct(job_id, "NodeList,Start,End")[0] for job_id in job_ids]
    assert {node for node, _, _ in rows} == {"node1"}
    assert max(start for _, start, _ in rows) < min(end for _, _, end in rows)  # all eight were running at once
    ports = [json.loads((p / "rendezvous.json").read_text())["port"] for p in points]
    assert len(set(ports)) == 8
    groups = {read_run(find_runs(p)[0])["group"] for p in points}
    assert groups == {f"tiny_sft/{sweep_dir.name}"}
    assert [read_run(find_runs(p)[0])["config"]["optim"]["lr"] for p in points] == [float(lr) for lr in lrs]
    leaked = [str(p) for p in sweep_dir.rglob("*") if p.is_file() and b"sw33p-s3cret" in p.read_bytes()]
    assert leaked == []


@pytest.mark.parametrize(
    "override, message",
    [
        ("cluster.partition=nope", "cluster.partition='nope': no such partition; valid: debug, short, urgent"),
        ("cluster.time_min=61", "cluster.time_min=61: must be <= partition debug's MaxTime (60 min)"),
        ("cluster.nodes=4", "cluster.nodes=4: must be <= the 2 nodes of partition debug"),
        ("cluster.gpus_per_node=4", "cluster.gpus_per_node=4: must be <= the 2 GPUs per node of partition debug"),
        ("cluster.partition=short", "cluster.time_min=10: must be <= partition short's MaxTime (5 min)"),
        ("cluster.cpus_per_task=8", "cluster.cpus_per_task=8: x 2 tasks per node must be <= the 2 CPUs per node of partition debug"),
    ],
)
def test_bad_cluster_settings_fail_before_the_queue(slurm_cluster, tmp_path, override, message):
    before = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout.split()
    result = run_sft([*TINY, *SLURM, override, f"runs_root={tmp_path}/runs"], cwd=tmp_path)
    assert result.returncode == 2
    assert message in result.stderr
    assert not (tmp_path / "runs").exists()
    after = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout.split()
    assert set(after) <= set(before)


def test_bad_data_fails_before_the_queue(slurm_cluster, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    before = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout.split()
    result = run_sft([*TINY, *SLURM, f"data.train_files={empty}", "data.eval_files=null", "data.eval_fraction=0.1",
                      f"runs_root={tmp_path}/runs"], cwd=tmp_path)
    assert result.returncode == 2
    assert f"data.train_files: {empty}: the file is empty (no rows)" in " ".join(result.stderr.split())
    assert not (tmp_path / "runs").exists()
    after = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout.split()
    assert set(after) <= set(before)
