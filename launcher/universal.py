"""Resume on another number of ranks: DeepSpeed's universal checkpoint, made once per checkpoint.

A ZeRO checkpoint is sharded by rank; `deepspeed.checkpoint.ds_to_universal` rewrites it per
parameter (fp32 weights and both Adam moments), which any world size can load with
`"checkpoint": {"load_universal": true}` (launcher.checkpoint.load repairs two ZeRO-3 load bugs).
Checkpoints saved after such a resume are ordinary ones of the new world size. Rank 0 converts into <checkpoint>/universal/ (built in a
temporary directory and renamed into place, so a killed conversion is redone); other ranks, on any
node, wait for its marker: a collective would time out on a large model.
"""

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

from launcher.atomic import FAILED, build_once, is_complete
from launcher.checkpoint import UNIVERSAL

WAIT_MIN = 120  # how long other ranks wait for rank 0's conversion


def convert(checkpoint_dir: Path, out: Path) -> None:
    """ds_to_universal in a child process: it starts worker pools and keeps no state we want."""
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(checkpoint_dir),
           "--output_folder", str(out), "--num_extract_workers", "1", "--num_merge_workers", "1",
           "--inject_missing_state"]  # ZeRO-1/2 checkpoints lack the info the converter wants
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")})
    if proc.returncode != 0:
        raise RuntimeError(f"converting {checkpoint_dir} to a universal checkpoint failed:\n{proc.stderr[-3000:]}")


def prepare(checkpoint_dir: Path, env: Any, log: Callable[[str], Any]) -> Path:
    """The checkpoint's universal form, converted by rank 0 if it is not there yet."""
    final = Path(checkpoint_dir) / UNIVERSAL
    if env.rank == 0:
        start = time.perf_counter()
        if not build_once(final, lambda tmp: convert(checkpoint_dir, tmp)):
            log(f"converted {checkpoint_dir} to a universal checkpoint in {time.perf_counter() - start:.1f} s")
        return final
    failed = final.with_name(final.name + FAILED)
    started, deadline = time.time(), time.monotonic() + WAIT_MIN * 60
    while not is_complete(final):
        if failed.exists() and failed.stat().st_mtime >= started - 5:  # not an earlier attempt's
            raise RuntimeError(f"rank 0 failed to convert {checkpoint_dir}: {failed.read_text()}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"waited {WAIT_MIN} min for rank 0 to convert {checkpoint_dir} to a universal checkpoint")
        time.sleep(1)
    return final
