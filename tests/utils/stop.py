"""Stopping a running `sft` for real: USR2 (checkpoint and requeue) once a condition on its run directory holds."""

import signal
import subprocess
import time
from typing import Callable


def usr2_after(proc: subprocess.Popen, ready: Callable[[], bool], timeout: float = 300) -> str:
    """Send USR2 as soon as `ready()` (polled every 20 ms) and return the process's output once it exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if ready():
            proc.send_signal(signal.SIGUSR2)
            break
        time.sleep(0.02)
    out, _ = proc.communicate(timeout=timeout)
    return out
