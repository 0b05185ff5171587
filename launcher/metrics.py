"""Training metrics: throughput, MFU against a table of device peaks, peak memory, the metrics file."""

import json
import resource
from pathlib import Path
from typing import Any, Dict, List, Optional

from launcher.rundir import METRICS

# torch is imported where used: sft-jobs reads the metrics file through this module and stays light.


def device_peak_flops() -> Optional[float]:
    """Peak FLOP/s of this rank's device, or None where unknown (CPUs, unlisted GPUs)."""
    import torch

    if not torch.cuda.is_available():
        return None
    from launcher.devices import by_device_name

    device = by_device_name(torch.cuda.get_device_name())
    return device.tflops * 1e12 if device else None


def mfu(params: int, tokens_per_s_per_device: float, peak: Optional[float]) -> Optional[float]:
    """Model FLOPs utilisation: 6 x parameters x tokens/s over the device peak (no attention term)."""
    return 6 * params * tokens_per_s_per_device / peak if peak else None


def peak_memory_gib() -> float:
    """This rank's peak since reset_peak_memory(): the GPU's allocated memory, or on CPU the
    process's resident memory (Linux's VmHWM; ru_maxrss, since the start, elsewhere)."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return _proc_status_gib("VmHWM:") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def reset_peak_memory() -> float:
    """Start the peak over (training, not start-up's loading and tokenising) and return what the
    rank holds now, GiB: on CPU Linux through /proc/self/clear_refs (elsewhere the peak stays the
    process's)."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated() / 2**30
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    return _proc_status_gib("VmRSS:") or 0.0


def _proc_status_gib(field: str) -> Optional[float]:
    try:
        lines = Path("/proc/self/status").read_text().splitlines()
        return next(int(line.split()[1]) for line in lines if line.startswith(field)) / 2**20  # kB
    except (OSError, StopIteration, ValueError):
        return None


def read_metrics(run_dir: Path) -> List[dict]:
    """The run's metrics rows in step order. A resumed run appends from its checkpoint on: rows of the
    abandoned attempt past that point are dropped, and the last row of a (kind, step) wins."""
    path = Path(run_dir) / METRICS
    rows: List[dict] = []
    for line in (path.read_text(errors="replace") if path.is_file() else "").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a line still being written
        if not isinstance(row, dict) or not isinstance(row.get("step"), int):
            continue
        step, kind = row["step"], row.get("kind")
        while rows and rows[-1]["step"] > step:
            rows.pop()
        if rows and rows[-1]["step"] == step:
            rows = [r for r in rows if not (r["step"] == step and r.get("kind") == kind)]
        rows.append(row)
    return rows


class MetricsFile:
    """Rank 0's metrics file: one JSON object per logged step or eval, appended and flushed."""

    def __init__(self, path: Path):
        self.file = open(path, "a", buffering=1)

    def write(self, row: Dict[str, Any]) -> None:
        self.file.write(json.dumps(row, default=float) + "\n")

    def close(self) -> None:
        self.file.close()
