"""Known accelerators: memory and dense 16-bit peak, for the plan's fit and speed predictions and MFU."""

import glob
import os
import re
from typing import Dict, NamedTuple, Optional


class Device(NamedTuple):
    mem_gib: float  # total memory as torch reports it
    tflops: float  # dense bf16/fp16 peak (no sparsity)
    match: tuple  # substrings of torch.cuda.get_device_name(), all present


GPUS: Dict[str, Device] = {
    "h200": Device(140.4, 989, ("H200",)),
    "h100": Device(79.6, 989, ("H100",)),
    "a100_80g": Device(79.2, 312, ("A100", "80GB")),
    "a100_40g": Device(39.4, 312, ("A100", "40GB")),
    "l40s": Device(44.4, 362, ("L40S",)),
    "a10g": Device(22.1, 125, ("A10G",)),
    "l4": Device(22.0, 121, ("L4",)),
    "v100": Device(31.7, 125, ("V100",)),
}


def by_device_name(name: str) -> Optional[Device]:
    """The entry all of whose match strings are whole words of a CUDA device name (an L40 is no L4)."""
    for device in sorted(GPUS.values(), key=lambda d: -sum(map(len, d.match))):
        if all(re.search(rf"(?<![A-Za-z0-9]){part}(?![A-Za-z0-9])", name) for part in device.match):
            return device
    return None


def local_gpu_count() -> int:
    """GPUs a local run's ranks would see. A machine without GPU device nodes answers without
    importing torch (1.5 s of a dry run's 3 s on CPU)."""
    if not glob.glob("/dev/nvidia[0-9]*") and not os.path.exists("/dev/kfd"):
        return 0
    import torch

    return torch.cuda.device_count()
