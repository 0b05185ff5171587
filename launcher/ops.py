"""DeepSpeed's JIT-compiled ops: which ones a run needs, and building them once per node before ranks use them.

DeepSpeed compiles an op the first time it is loaded (20-40 s each) into one shared
~/.cache/torch_extensions. Left alone, every rank of a node races into that build, a killed build
leaves torch's lock file behind (every later load then waits forever), and a stop signal sent to
the job step kills the compiler with it. Here each rank loads the run's ops before DeepSpeed
needs them, one rank at a time per node (flock); the first rank builds, the others load what it
built, and DeepSpeed then finds the ops already loaded.

Slurm signals every process of the step. ninja starts each compiler with an empty signal mask
and default handlers, so blocking signals in the rank does not protect the compilers; ninja runs
through a shim that ignores USR2, which ninja's children inherit (the rank still gets the signal,
once the build is done). ninja stops the build on TERM whatever we do; a build stopped that way
ends the rank as a stop before the first step, not as a failure.
"""

import contextlib
import fcntl
import logging
import os
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

from launcher.atomic import write_text_atomic
from launcher.signals import STOP, StoppedDuringStartup

log = logging.getLogger(__name__)

# DeepSpeed builder class -> the op's name (its folder under the torch extensions root).
OP_NAMES: Dict[str, str] = {
    "ShareMemCommBuilder": "deepspeed_shm_comm",  # CPU collectives, loaded by init_distributed
    "FusedAdamBuilder": "fused_adam",
    "CPUAdamBuilder": "cpu_adam",
}
OPTIMIZER_OPS = {"fused_adam": "FusedAdamBuilder", "cpu_adam": "CPUAdamBuilder"}


def needed(optimizer: str, accelerator: str) -> List[str]:
    """Builder names a run compiles: the shared-memory comm op on CPU, and the optimizer's own op."""
    builders = ["ShareMemCommBuilder"] if accelerator == "cpu" else []
    if optimizer in OPTIMIZER_OPS:
        builders.append(OPTIMIZER_OPS[optimizer])
    return builders


def plan(optimizer: str, accelerator: str) -> Dict[str, str]:
    """For the plan: each op the run compiles and whether this host has it built already.

    Reads the extensions folder without importing torch (the plan must stay fast).
    """
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root:
        candidates = [Path(root)]
    else:
        cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "torch_extensions"
        candidates = list(cache.glob(f"py{sys.version_info.major}{sys.version_info.minor}*"))
    status = {}
    for builder in needed(optimizer, accelerator):
        name = OP_NAMES[builder]
        built = any((c / name / f"{name}.so").is_file() for c in candidates)
        status[name] = "built on this host" if built else "compiled on first use, once per node, 20-40 s"
    return status


def build_dir(op_name: str) -> Optional[Path]:
    """Where torch builds (or built) the op on this host; None if torch cannot say."""
    try:
        from torch.utils.cpp_extension import _get_build_directory

        return Path(_get_build_directory(op_name, verbose=False))
    except Exception:  # a private torch helper: never let the plan fail on it
        return None


def is_built(op_name: str) -> bool:
    d = build_dir(op_name)
    return bool(d and (d / f"{op_name}.so").is_file())


def build(builders: List[str], say: Callable[[str], None] = log.info) -> None:
    """Load each op once in this process, compiling it if needed, one process per node at a time."""
    if not builders:
        return
    from deepspeed.accelerator import get_accelerator
    import deepspeed.ops

    todo = []
    for name in builders:
        builder = get_accelerator().create_op_builder(name)
        # DeepSpeed's own test before it loads the comm op: skip what it would skip.
        if builder is not None and (name != "ShareMemCommBuilder" or deepspeed.ops.__compatible_ops__.get(builder.NAME)):
            todo.append(builder)
    if not todo:
        return
    root = build_dir(todo[0].NAME)
    lock_path = (root.parent if root else Path(os.environ.get("TORCH_EXTENSIONS_DIR", "/tmp"))) / "sft-ops.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as lock:
        held = _take(lock, lock_path, say)
        for builder in todo:
            d = build_dir(builder.NAME)
            baton = d / "lock" if d else None
            if held and baton and baton.exists():  # torch's lock, left by a build that was killed: we hold ours
                say(f"ops: removing a stale build lock {baton}")
                baton.unlink(missing_ok=True)
            fresh = not is_built(builder.NAME)
            say(f"ops: {'building' if fresh else 'loading'} {builder.NAME}"
                + (" (compiled once per node, 20-40 s; USR2 waits until it is done)" if fresh else ""))
            if fresh and STOP:  # the build of another rank of this node was stopped: stop with it
                raise StoppedDuringStartup(f"a stop signal arrived before {builder.NAME} was built")
            start, stopped_before = time.perf_counter(), bool(STOP)
            try:
                with STOP.blocked(), _ninja_ignores_usr2(lock_path.parent):
                    builder.load(verbose=False)
            except Exception as error:
                if STOP and not stopped_before:
                    log.info("ops: the build of %s ended with: %s", builder.NAME, error)
                    raise StoppedDuringStartup(f"a stop signal ended the build of {builder.NAME}") from None
                raise
            say(f"ops: {builder.NAME} ready in {time.perf_counter() - start:.1f} s")
            if STOP and not stopped_before:
                say("ops: a stop signal arrived during the build; the run stops at its first step boundary")


@contextlib.contextmanager
def _ninja_ignores_usr2(folder: Path):
    """Put a `ninja` first on PATH that ignores USR2, then runs the real one.

    ninja starts each command (`/bin/sh -c`, the compiler) with an empty signal mask and default
    handlers, except for signals it ignores itself: those its children ignore too. The rank's
    blocked mask carries over the moment between the shim's start and its `trap`.
    """
    real = shutil.which("ninja")
    if real is None:  # torch says what is missing
        yield
        return
    shim_dir = folder / "sft-bin"
    shim = shim_dir / "ninja"
    script = ("#!/bin/sh\n# launcher.ops: Slurm's USR2 reaches every process of the step; not the compilers.\n"
              f"trap '' USR2\nexec {shlex.quote(real)} \"$@\"\n")
    if not shim.is_file() or shim.read_text() != script:
        write_text_atomic(shim, script)
        shim.chmod(0o755)
    path = os.environ.get("PATH", "")
    os.environ["PATH"] = f"{shim_dir}{os.pathsep}{path}"
    try:
        yield
    finally:
        os.environ["PATH"] = path


def _take(lock, path: Path, say: Callable[[str], None]) -> bool:
    """flock, saying so when another process holds it; False on file systems without flock."""
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        start = time.perf_counter()
        say(f"ops: waiting for another process building ops (lock {path})")
        fcntl.flock(lock, fcntl.LOCK_EX)
        say(f"ops: lock taken after {time.perf_counter() - start:.1f} s")
    except OSError:
        return False
    return True
