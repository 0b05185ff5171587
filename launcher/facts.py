"""What a plan needs from outside the config, read here so the plan stays arithmetic: the Slurm
partition's GPU (scontrol), this machine's GPUs (CUDA), the DeepSpeed ops built on this host, and
the checkpoint write speed this run's earlier saves measured (their metrics rows)."""

from typing import Optional

from launcher import ops
from launcher.devices import local_gpu_count
from launcher.metrics import read_metrics
from launcher.plan import Found, accelerator


def find(cfg) -> Found:
    cluster = cfg.cluster
    local_gpus = local_gpu_count() if cluster.backend == "local" else 0
    budget_unset = cluster.gpu is None and (cluster.gpu_mem_gib is None or cluster.gpu_tflops is None)
    partition_gpu = local_device = None
    if budget_unset and cluster.backend == "slurm":
        from launcher.backends.slurm_partitions import partition_gpu as read_partition_gpu

        partition_gpu = read_partition_gpu(cluster)
    elif budget_unset and local_gpus:
        import torch

        local_device = (torch.cuda.get_device_name(), torch.cuda.get_device_properties(0).total_memory / 2**30)
    write_gb_s = measured_write_speed(cfg.run_dir) if cfg.checkpoint.write_gb_s is None and cfg.run_dir else None
    return Found(local_gpus, partition_gpu, local_device, write_gb_s,
                 ops.plan(cfg.optim.name, accelerator(cluster, local_gpus)))


def measured_write_speed(run_dir: str) -> Optional[float]:
    """Median write speed per node of this run's earlier checkpoint saves, GB/s."""
    speeds = sorted(r["write_gb_s_per_node"] for r in read_metrics(run_dir) if r.get("kind") == "checkpoint")
    return speeds[len(speeds) // 2] if speeds else None
