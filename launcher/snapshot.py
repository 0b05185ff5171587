"""The code a run was submitted with: a copy of the launcher package that its ranks and requeues run.

The install is editable, so without a copy a job waiting in the queue (or requeued a day later)
would run whatever is checked out when it starts. `sft` copies the package into `<dir>/code/` and
every rank runs with that folder first on its import path; PYTHONSAFEPATH keeps a job started in
the repository from importing the checkout through the working directory instead.
"""

import os
import shlex
import shutil
import tempfile
from pathlib import Path
from typing import Dict

from launcher.rundir import CODE

PACKAGE = Path(__file__).resolve().parent


def snapshot_code(dest: Path) -> Path:
    """Copy the launcher package to dest/code/launcher (replacing an older copy); returns dest/code."""
    code = Path(dest) / CODE
    code.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".launcher.tmp-", dir=code))
    shutil.copytree(PACKAGE, tmp / "launcher", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    final = code / "launcher"
    if final.exists():
        old = code / f".launcher.old-{os.getpid()}"
        os.rename(final, old)
        os.rename(tmp / "launcher", final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp / "launcher", final)
    tmp.rmdir()
    return code


def import_env(code: Path, environ: Dict[str, str] = os.environ) -> Dict[str, str]:
    """Environment entries that make a Python process import the launcher from `code`."""
    path = environ.get("PYTHONPATH")
    return {"PYTHONPATH": f"{code}{os.pathsep}{path}" if path else str(code), "PYTHONSAFEPATH": "1"}


def setup_lines(code: Path) -> list:
    """The same, as shell lines for a Slurm batch script."""
    # Quoted: a run directory with a space (or any shell character) must still import the snapshot.
    return [f"export PYTHONPATH={shlex.quote(str(code))}\"${{PYTHONPATH:+:$PYTHONPATH}}\"", "export PYTHONSAFEPATH=1"]
