"""Slurm benchmarks on the local cluster (slurm/start-cluster.sh), measured side by side:
- submitting a 100-point sweep: wall time and sbatch calls, against 100 plain `sbatch` calls;
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


def main() -> None:
    env = {**os.environ, **start_cluster(), "HF_HUB_OFFLINE": "1", "WANDB_SILENT": "true"}
    tmp = Path(tempfile.mkdtemp(prefix="bench-slurm-"))
    env["PATH"] = f"{counting_sbatch(tmp)}:{env['PATH']}"
    rows = []

    # 100 sweep points, held so that nothing runs, then cancelled.
    lrs = ",".join(f"{1e-4 * (i + 1):.6g}" for i in range(100))
    start = time.perf_counter()
    out = subprocess.run([BIN / "sft", "-m", *TINY, *SLURM, "+cluster.sbatch_extra.hold=true", f"optim.lr={lrs}",
                          f"runs_root={tmp}/runs"], env=env, cwd=tmp, capture_output=True, text=True, check=True).stdout
    sweep_s = time.perf_counter() - start
    array_id = re.search(r"submitted job array (\d+)", out).group(1)
    subprocess.run(["scancel", array_id], env=env, check=True)
    calls = len((tmp / "sbatch_calls").read_text().splitlines())
    start = time.perf_counter()
    ids = [subprocess.run(["sbatch", "--hold", "--parsable", "--wrap", "true"], env=env, capture_output=True, text=True, check=True).stdout.strip()
           for _ in range(100)]
    plain_s = time.perf_counter() - start
    subprocess.run(["scancel", *ids], env=env, check=True)
    rows.append(("100-point sweep: seconds to submit", f"{sweep_s:.1f} ({calls} sbatch call)", f"{plain_s:.1f} (100 sbatch calls)", sweep_s / plain_s))

    # Latency to the first step: ours, then the same run files by hand.
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
srun {BIN}/torchrun --nproc_per_node=2 --master_port=29533 -m launcher.task {peer_dir}
""")
    start = time.time()
    subprocess.run(["sbatch", str(script)], env=env, check=True, capture_output=True)
    peer = first_step_at(peer_dir / "logs" / "rank-0.log") - start
    rows.append(("seconds from submit to first step", f"{ours:.1f}", f"{peer:.1f} (sbatch+srun+torchrun)", ours / peer))

    table = Table(title="Slurm benchmarks (local cluster, 2 nodes)")
    for col in ("measure", "ours", "peer", "ratio (ours/peer)"):
        table.add_column(col)
    for name, a, b, ratio in rows:
        table.add_row(name, a, b, f"{ratio:.2f}")
    Console(width=140).print(table)


if __name__ == "__main__":
    main()
