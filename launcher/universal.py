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
from launcher.signals import STOP, StoppedDuringStartup

WAIT_MIN = 120  # how long other ranks wait for rank 0's conversion


def convert(checkpoint_dir: Path, out: Path) -> None:
    """ds_to_universal in a child process: it starts worker pools and keeps no state we want.
    Shielded like the op compiler: Slurm signals every process of the step, and the converter and
    its workers start with the stop signals blocked, so a stop lets it finish and the run stops at
    its first step boundary; one that still ends it is a stop, not a failure."""
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(checkpoint_dir),
           "--output_folder", str(out), "--num_extract_workers", "1", "--num_merge_workers", "1",
           "--inject_missing_state"]  # ZeRO-1/2 checkpoints lack the info the converter wants
    stopped_before = bool(STOP)
    with STOP.blocked():
        proc = subprocess.run(cmd, capture_output=True, text=True,
                              env={**os.environ, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")})
    if proc.returncode != 0 and STOP and not stopped_before:
        raise StoppedDuringStartup(f"a stop signal ended the conversion of {checkpoint_dir} (exit {proc.returncode})")
    if proc.returncode != 0:
        raise RuntimeError(f"converting {checkpoint_dir} to a universal checkpoint failed:\n{proc.stderr[-3000:]}")


def prepare(checkpoint_dir: Path, env: Any, log: Callable[[str], Any]) -> Path:
    """The checkpoint's universal form, converted by rank 0 if it is not there yet."""
    final = Path(checkpoint_dir) / UNIVERSAL
    if env.rank == 0:
        start = time.perf_counter()
        if not is_complete(final):
            log(f"converting {checkpoint_dir} to a universal checkpoint (once; a stop waits until it is done)")
        if not build_once(final, lambda tmp: convert(checkpoint_dir, tmp)):
            log(f"converted {checkpoint_dir} to a universal checkpoint in {time.perf_counter() - start:.1f} s")
        return final
    failed = final.with_name(final.name + FAILED)
    started, deadline = time.time(), time.monotonic() + WAIT_MIN * 60
    while not is_complete(final):
        if failed.exists() and failed.stat().st_mtime >= started - 5:  # not an earlier attempt's
            if STOP:  # the signal that stopped rank 0's conversion reached this rank too
                raise StoppedDuringStartup(f"rank 0's conversion of {checkpoint_dir} was stopped")
            raise RuntimeError(f"rank 0 failed to convert {checkpoint_dir}: {failed.read_text()}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"waited {WAIT_MIN} min for rank 0 to convert {checkpoint_dir} to a universal checkpoint")
        time.sleep(1)
    return final
