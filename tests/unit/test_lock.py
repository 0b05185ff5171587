"""requirements.lock: consistent with pyproject's ranges, and the install check's rules."""

import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tools"))
import lock  # noqa: E402


def test_every_dependency_is_locked_within_its_range():
    pins = lock.read_lock()
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    requirements = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["dev"]
                    + project["optional-dependencies"]["bench"]]
    for req in requirements:
        name = lock.canonical(req.name)
        assert name in pins, f"{req.name} is a dependency but {lock.LOCK.name} does not lock it"
        assert req.specifier.contains(pins[name], prereleases=True), f"{name}=={pins[name]} is outside {req}"
    assert {"pip", "setuptools", "torch"} <= set(pins)
    assert "+" not in pins["torch"]  # no local label: a GPU machine takes the CUDA build of the version
    assert lock.render(pins) == lock.LOCK.read_text()  # as `make lock` writes it: sorted, one pin a line


def test_the_makefile_installs_the_locked_torch():
    makefile = (REPO / "Makefile").read_text()
    assert "TORCH_CPU := $(shell grep -m1 '^torch==' $(LOCK))" in makefile
    assert "-c $(LOCK) -e '.[dev,bench,eval]'" in makefile and "tools/lock.py check" in makefile


def test_check_rules():
    pins = {"torch": "2.13.0", "transformers": "5.25.0", "pip": "26.3"}
    have = {"torch": "2.13.0+cpu", "transformers": "5.26.0", "launcher": "0.1.0", "nvidia-cublas-cu12": "12.9", "triton": "3.6",
            "lm-eval": "0.4.13"}
    assert lock.mismatches(pins, have) == {"transformers": "locked 5.25.0, installed 5.26.0", "pip": "locked 26.3, not installed"}
    assert lock.unlocked(pins, have) == ["lm-eval"]  # the project itself and a CUDA torch's own packages are not extras


def test_changes_are_listed_for_the_upgrade():
    old = {"a": "1", "b": "2", "c": "3"}
    new = {"a": "1", "b": "2.1", "d": "4"}
    assert lock.changes(old, new) == ["  ~ b 2 -> 2.1", "  - c 3", "  + d 4"]


def test_a_bad_line_names_the_file_and_line(tmp_path):
    path = tmp_path / "requirements.lock"
    path.write_text("# header\ntorch==2.13.0\ntransformers>=5\n")
    with pytest.raises(SystemExit, match=r"requirements.lock:3: 'transformers>=5' is not NAME==VERSION"):
        lock.read_lock(path)
