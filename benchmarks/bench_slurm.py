"""Slurm benchmarks on the local cluster (slurm/start-cluster.sh), measured side by side:
- submitting one run: seconds until `sft` returns, against one plain `sbatch`;
- submitting a 100-point sweep: wall time and sbatch calls, against 100 plain `sbatch` calls;
- requeue: seconds from USR2 to the run's job RUNNING again, against `scontrol requeue` of a plain job;
- latency from `sft ... cluster=slurm` to the first training step, against a hand-written
  sbatch + srun + torchrun of the same training (same run files, same entry point).
"""

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import yaml
from rich.console import Console
from rich.table import Table

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parent.parent
SLURM = ["cluster=slurm", "cluster.gpus_per_node=0", "cluster.procs_per_node=2", "cluster.cpus_per_task=1",
         "cluster.time_min=10", "cluster.partition=debug"]
TINY = ["recipe=tiny_sft", "tracking=none", "trainer.max_steps=3", "trainer.log_every=1", "optim.warmup_steps=1",
        "eval.every_steps=0", "eval.generate_samples=0", "eval.max_batches=1", "checkpoint.export=false"]


def start_cluster() -> dict:
    out = subprocess.run([REPO / "slurm" / "start-cluster.sh"], check=True, capture_output=True, text=True).stdout
    return dict(re.findall(r"^export (\w+)=(\S+)$", out, flags=re.M))


def counting_sbatch(tmp: Path) -> Path:
    """A PATH dir whose `sbatch` logs each call, then runs the real one."""
    shim = tmp / "shim"
    shim.mkdir()
    (shim / "sbatch").write_text(f'#!/bin/sh\necho call >> {tmp}/sbatch_calls\nexec {shutil.which("sbatch")} "$@"\n')
    (shim / "sbatch").chmod(0o755)
    return shim


def first_step_at(log: Path, timeout: float = 300) -> float:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if log.exists():
            for line in log.read_text().splitlines():
                if " train step 1 " in line:
                    return datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
        time.sleep(0.2)
    raise TimeoutError(log)


def job_field(job_id: str, field: str, env: dict) -> str:
    out = subprocess.run(["scontrol", "show", "job", job_id], env=env, capture_output=True, text=True).stdout
    match = re.search(rf"\b{field}=(\S+)", out)
    return match.group(1) if match else ""


def running_again(job_id: str, env: dict, timeout: float = 300) -> float:
    """Seconds until the job runs again after a requeue (Restarts=1, JobState=RUNNING)."""
    start = time.perf_counter()
    while time.perf_counter() - start < timeout:
        if job_field(job_id, "Restarts", env) == "1" and job_field(job_id, "JobState", env) == "RUNNING":
            return time.perf_counter() - start
        time.sleep(0.2)
    raise TimeoutError(job_id)


def requeue_latency(env: dict, tmp: Path) -> tuple:
    """USR2 to a running `sft` job (it checkpoints, requeues itself) against `scontrol requeue` of a plain job."""
    run_dir = tmp / "requeued"
    out = subprocess.run([BIN / "sft", *TINY, *SLURM, "trainer.max_steps=2000", f"run_dir={run_dir}"], env=env, cwd=tmp,
                         capture_output=True, text=True, check=True).stdout
    ours_id = re.search(r"submitted job (\d+)", out).group(1)
    first_step_at(run_dir / "logs" / "rank-0.log")
    subprocess.run(["scancel", "--signal=USR2", ours_id], env=env, check=True)
    ours = running_again(ours_id, env)
    subprocess.run(["scancel", ours_id], env=env, check=True)
    peer_id = subprocess.run(["sbatch", "--parsable", "--requeue", "--partition=debug", f"--output={tmp}/peer-%j.out",
                              "--wrap", "sleep 300"], env=env, capture_output=True, text=True, check=True).stdout.strip()
    while job_field(peer_id, "JobState", env) != "RUNNING":
        time.sleep(0.2)
    subprocess.run(["scontrol", "requeue", peer_id], env=env, check=True)
    peer = running_again(peer_id, env)
    subprocess.run(["scancel", peer_id], env=env, check=True)
    return ("requeue: seconds until the job runs again", f"{ours:.1f} (USR2, checkpoint)", f"{peer:.1f} (scontrol requeue)", ours / peer)


def main() -> None:
    env = {**os.environ, **start_cluster(), "HF_HUB_OFFLINE": "1", "WANDB_SILENT": "true"}
    tmp = Path(tempfile.mkdtemp(prefix="bench-slurm-"))
    env["PATH"] = f"{counting_sbatch(tmp)}:{env['PATH']}"
    rows = []

    # One run, held so that nothing runs, then cancelled.
    start = time.perf_counter()
    out = subprocess.run([BIN / "sft", *TINY, *SLURM, "+cluster.sbatch_extra.hold=true", f"run_dir={tmp}/one"],
                         env=env, cwd=tmp, capture_output=True, text=True, check=True).stdout
    one_s = time.perf_counter() - start
    subprocess.run(["scancel", re.search(r"submitted job (\d+)", out).group(1)], env=env, check=True)
    start = time.perf_counter()
    held = subprocess.run(["sbatch", "--hold", "--parsable", "--wrap", "true"], env=env, capture_output=True, text=True, check=True).stdout.strip()
    plain_one_s = time.perf_counter() - start
    subprocess.run(["scancel", held], env=env, check=True)
    rows.append(("one run: seconds until the command returns", f"{one_s:.2f}", f"{plain_one_s:.3f} (sbatch)", one_s / plain_one_s))
    calls_before = len((tmp / "sbatch_calls").read_text().splitlines())

    # 100 sweep points, held so that nothing runs, then cancelled.
    lrs = ",".join(f"{1e-4 * (i + 1):.6g}" for i in range(100))
    start = time.perf_counter()
    out = subprocess.run([BIN / "sft", "-m", *TINY, *SLURM, "+cluster.sbatch_extra.hold=true", f"optim.lr={lrs}",
                          f"runs_root={tmp}/runs"], env=env, cwd=tmp, capture_output=True, text=True, check=True).stdout
    sweep_s = time.perf_counter() - start
    array_id = re.search(r"submitted job array (\d+)", out).group(1)
    subprocess.run(["scancel", array_id], env=env, check=True)
    calls = len((tmp / "sbatch_calls").read_text().splitlines()) - calls_before
    start = time.perf_counter()
    ids = [subprocess.run(["sbatch", "--hold", "--parsable", "--wrap", "true"], env=env, capture_output=True, text=True, check=True).stdout.strip()
           for _ in range(100)]
    plain_s = time.perf_counter() - start
    subprocess.run(["scancel", *ids], env=env, check=True)
    rows.append(("100-point sweep: seconds to submit", f"{sweep_s:.1f} ({calls} sbatch call)", f"{plain_s:.1f} (100 sbatch calls)", sweep_s / plain_s))

    # Latency to the first step: ours, then the same run files by hand; both with DeepSpeed's ops
    # already compiled (a first build costs 20-40 s, once per machine).
    subprocess.run([sys.executable, "-c", "from launcher import ops; ops.build(ops.needed('adamw', 'cpu'), print)"],
                   env={**env, "DS_ACCELERATOR": "cpu"}, cwd=REPO, check=True, capture_output=True)
    run_dir = tmp / "ours"
    start = time.time()
    subprocess.run([BIN / "sft", *TINY, *SLURM, f"run_dir={run_dir}"], env=env, cwd=tmp, check=True, capture_output=True)
    ours = first_step_at(run_dir / "logs" / "rank-0.log") - start

    peer_dir = tmp / "by_hand"
    peer_dir.mkdir()
    for name in ("ds_config.json", "plan.json"):
        shutil.copy(run_dir / name, peer_dir / name)
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    config["run_dir"] = str(peer_dir)
    (peer_dir / "config.yaml").write_text(yaml.safe_dump(config))
    script = peer_dir / "job.sbatch"
    script.write_text(f"""#!/bin/bash
#SBATCH --nodes=1 --ntasks-per-node=1 --cpus-per-task=2 --time=10 --partition=debug --output={peer_dir}/slurm-%j.out
export OMP_NUM_THREADS=1 DS_ACCELERATOR=cpu PYTHONPATH={REPO}
srun {BIN}/torchrun --nproc_per_node=2 --master_port=29533 -m launcher.rank {peer_dir}
""")
    start = time.time()
    subprocess.run(["sbatch", str(script)], env=env, check=True, capture_output=True)
    peer = first_step_at(peer_dir / "logs" / "rank-0.log") - start
    rows.append(("seconds from submit to first step", f"{ours:.1f}", f"{peer:.1f} (sbatch+srun+torchrun)", ours / peer))

    rows.append(requeue_latency(env, tmp))

    table = Table(title="Slurm benchmarks (local cluster, 2 nodes)")
    for col in ("measure", "ours", "peer", "ratio (ours/peer)"):
        table.add_column(col)
    for name, a, b, ratio in rows:
        table.add_row(name, a, b, f"{ratio:.2f}")
    Console(width=140).print(table)


if __name__ == "__main__":
    main()
