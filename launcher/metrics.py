"""Training metrics: throughput, MFU against a table of device peaks, peak memory, metrics.jsonl."""

import json
import resource
from pathlib import Path
from typing import Any, Dict, Optional

import torch

# Dense bf16 peak FLOP/s per device (vendor datasheets, without sparsity).
PEAK_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 125e12,
    "L4": 121e12,
    "V100": 125e12,
}


def device_peak_flops() -> Optional[float]:
    """Peak FLOP/s of this rank's device, or None where unknown (CPUs, unlisted GPUs)."""
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, flops in PEAK_FLOPS.items():
        if key in name:
            return flops
    return None


def mfu(params: int, tokens_per_s_per_device: float, peak: Optional[float]) -> Optional[float]:
    """Model FLOPs utilisation: 6 x parameters x tokens/s over the device peak (no attention term)."""
    return 6 * params * tokens_per_s_per_device / peak if peak else None


def peak_memory_gib() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class MetricsFile:
    """Rank 0's metrics.jsonl: one JSON object per logged step or eval, appended and flushed."""

    def __init__(self, path: Path):
        self.file = open(path, "a", buffering=1)

    def write(self, row: Dict[str, Any]) -> None:
        self.file.write(json.dumps(row, default=float) + "\n")

    def close(self) -> None:
        self.file.close()
