"""The unit tier runs in-process and never talks to a Slurm controller.

A plan for cluster=slurm without cluster.gpu asks the partition's GPU (`scontrol show partition`,
launcher.facts): with no Slurm installed that fails at once, and so it must here, whatever this
host has. Where the local cluster's packages are installed but its controller is down, each call
would wait ~9 s for the connection to fail; with a real cluster, the answer would depend on it.
So `scontrol` and `sinfo` answer as an unreachable controller does, at once.
"""

import os
import stat

import pytest

UNREACHABLE = "#!/bin/sh\necho \"$(basename \"$0\"): Unable to contact slurm controller (connect failure)\" >&2\nexit 1\n"


@pytest.fixture(scope="session")
def _unreachable_slurm_bin(tmp_path_factory):
    bin_dir = tmp_path_factory.mktemp("unreachable-slurm-bin")
    for name in ("scontrol", "sinfo"):
        path = bin_dir / name
        path.write_text(UNREACHABLE)
        path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return bin_dir


@pytest.fixture(autouse=True)
def _no_slurm_controller(_unreachable_slurm_bin, monkeypatch):
    monkeypatch.setenv("PATH", f"{_unreachable_slurm_bin}{os.pathsep}{os.environ.get('PATH', '')}")
