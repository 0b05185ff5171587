"""Where the ranks of one start meet: rank 0 listens on a port the OS gives it, the others read it.

A port computed in advance (29500 + job id) can be taken by anything on the node by the time the
job starts: another job's rank, or any outgoing connection, since such ports lie in the ephemeral
range. So rank 0 opens torch's TCPStore on port 0 (or, with `cluster.master_port`, on the first
free port of `MASTER_PORT_RANGE` from it) and writes where it listens to `rendezvous.json` in the
run directory, which every rank of every node already reads; the other ranks wait for that file's
attempt id (one per start: a requeue never reads the last start's port) and connect. Both backends
set the attempt id (`SFT_RENDEZVOUS`); a rank started without one (torchrun) uses env:// as before.
A rank that fails to meet the others writes `start_failed.json`: not the trial's own failure, so a
search submits it again (launcher.sweep.controller).
"""

import datetime
import json
import logging
import os
import time
import uuid
from pathlib import Path
from typing import Callable, Optional

from launcher.atomic import write_text_atomic
from launcher.rundir import RENDEZVOUS as RENDEZVOUS_FILE
from launcher.rundir import ATTEMPT_ENV, START_FAILED as START_FAILED_FILE  # a rank that could not meet its peers says why

RENDEZVOUS_ENV = ATTEMPT_ENV  # the attempt id every rank of one start shares
MASTER_PORT_RANGE = 64  # cluster.master_port=P: the ports P .. P+63 are tried in turn

log = logging.getLogger(__name__)


class RendezvousError(RuntimeError):
    """The ranks could not meet: no free port in the configured range, or rank 0 never published one."""


def new_attempt_id() -> str:
    return f"local-{uuid.uuid4().hex[:12]}"


def slurm_attempt_id(environ=os.environ) -> str:
    """The same on every task of one start of a job, different after each requeue. An array task is
    named as sacct and submission.json name it (<array job>_<task>), so its starts map to its job."""
    job = environ.get('SLURM_JOB_ID', '0')
    if environ.get("SLURM_ARRAY_JOB_ID") and environ.get("SLURM_ARRAY_TASK_ID"):
        job = f"{environ['SLURM_ARRAY_JOB_ID']}_{environ['SLURM_ARRAY_TASK_ID']}"
    return f"slurm-{job}-{environ.get('SLURM_RESTART_COUNT', '0')}"


def listen(addr: str, world: int, timeout: datetime.timedelta, master_port: Optional[int]):
    """Rank 0's TCPStore, on a port nobody holds: the OS's choice, or the first free one of the range."""
    import torch.distributed as dist  # here: `sft` (which imports this module) never loads torch

    ports = [0] if master_port is None else range(master_port, min(master_port + MASTER_PORT_RANGE, 65536))
    taken = []
    for port in ports:
        try:
            return dist.TCPStore(addr, port, world, is_master=True, timeout=timeout, wait_for_workers=False)
        except dist.DistNetworkError as error:
            if "EADDRINUSE" not in str(error):
                raise
            taken.append(port)
    raise RendezvousError(f"cluster.master_port={master_port}: ports {taken[0]}-{taken[-1]} are all in use on {addr}; "
                          "pick another range, or leave cluster.master_port unset (null) to take a port the OS gives")


def published_port(path: Path, attempt: str, timeout_s: float, sleep: Callable[[float], None] = time.sleep) -> tuple:
    """(addr, port) from rank 0's rendezvous file once it names this attempt."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            found = json.loads(path.read_text())
            if found.get("attempt") == attempt:
                return found["addr"], int(found["port"])
        except (OSError, ValueError):
            pass  # not written yet (the write is atomic: never half a file)
        if time.monotonic() > deadline:
            raise RendezvousError(f"rank 0 did not publish its port for attempt {attempt} in {path} within {timeout_s:.0f} s "
                                  "(trainer.dist_timeout_min): did rank 0 start? Its log says why not")
        sleep(0.2)


def init_distributed(run_dir: Path, rank: int, world: int, backend: str, timeout: datetime.timedelta,
                     master_port: Optional[int] = None) -> Optional[int]:
    """The process group of this start, and DeepSpeed's comm on it. Returns the port the ranks met on."""
    import deepspeed

    attempt = os.environ.get(RENDEZVOUS_ENV)
    if attempt is None:  # torchrun or a hand-made environment: MASTER_ADDR/MASTER_PORT as given
        deepspeed.init_distributed(dist_backend=backend, timeout=timeout)
        return int(os.environ["MASTER_PORT"]) if "MASTER_PORT" in os.environ else None
    try:
        port = _meet(Path(run_dir), attempt, rank, world, backend, timeout, master_port)
    except Exception as error:
        failure = error if isinstance(error, RendezvousError) else \
            RendezvousError(f"rank {rank} could not meet the other ranks: {type(error).__name__}: {error}")
        write_text_atomic(Path(run_dir) / START_FAILED_FILE,
                          json.dumps({"attempt": attempt, "rank": rank, "reason": str(failure)[:500]}) + "\n")
        raise failure from error
    deepspeed.init_distributed(dist_backend=backend, timeout=timeout)  # adopts the group _meet made
    return port


def _meet(run_dir: Path, attempt: str, rank: int, world: int, backend: str, timeout: datetime.timedelta,
          master_port: Optional[int]) -> int:
    import torch.distributed as dist

    path = run_dir / RENDEZVOUS_FILE
    if rank == 0:
        addr = os.environ["MASTER_ADDR"]
        store = listen(addr, world, timeout, master_port)
        write_text_atomic(path, json.dumps({"attempt": attempt, "addr": addr, "port": store.port, "world_size": world}) + "\n")
        log.info("rendezvous: rank 0 listens on %s:%d (attempt %s, %d ranks)", addr, store.port, attempt, world)
    else:
        addr, port = published_port(path, attempt, timeout.total_seconds())
        store = dist.TCPStore(addr, port, world, is_master=False, timeout=timeout)
    # DeepSpeed's CPU shared-memory op names its segment after MASTER_ADDR:MASTER_PORT: unique per live job on a node.
    os.environ.update(MASTER_ADDR=addr, MASTER_PORT=str(store.port))
    dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)
    return store.port


def start_failure(run_dir: Path) -> Optional[str]:
    """Why a rank of the run's latest start could not meet the others, if one could not."""
    try:
        return str(json.loads((Path(run_dir) / START_FAILED_FILE).read_text())["reason"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
