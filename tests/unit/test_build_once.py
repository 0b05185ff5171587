"""launcher.atomic.build_once, the one lock + build + rename used by the bundled artifacts and the data cache."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launcher.atomic import MARKER, build_once, is_complete

REPO = Path(__file__).resolve().parents[2]


def test_builds_once_and_only_ever_appears_complete(tmp_path):
    calls = []

    def build(tmp: Path):
        calls.append(tmp)
        assert not (tmp_path / "thing").exists()  # nothing visible while building
        (tmp / "data").write_text("x")

    assert build_once(tmp_path / "thing", build) is False
    assert build_once(tmp_path / "thing", build) is True
    assert len(calls) == 1 and (tmp_path / "thing" / "data").read_text() == "x" and is_complete(tmp_path / "thing")


def test_a_failed_build_leaves_nothing_and_says_why(tmp_path):
    def build(tmp: Path):
        (tmp / "half").write_text("x")
        raise ValueError("bad input")

    with pytest.raises(ValueError):
        build_once(tmp_path / "thing", build)
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == ["thing.failed"]
    assert (tmp_path / "thing.failed").read_text() == "ValueError: bad input"


def test_a_killed_builder_is_cleaned_up_by_the_next(tmp_path):
    started = tmp_path / "started"
    code = (f"import time; from pathlib import Path; from launcher.atomic import build_once\n"
            f"def build(tmp):\n    (tmp / 'half').write_text('x'); Path({str(started)!r}).touch(); time.sleep(600)\n"
            f"build_once(Path({str(tmp_path / 'thing')!r}), build)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    deadline = time.monotonic() + 60
    while not started.exists():
        assert time.monotonic() < deadline and proc.poll() is None, "the builder did not start"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # no except/finally runs: its temporary directory stays
    proc.wait()
    assert [p.name for p in tmp_path.glob(".thing.tmp-*")], "the killed builder left nothing to clean"

    assert build_once(tmp_path / "thing", lambda tmp: (tmp / "whole").write_text("y")) is False
    assert not list(tmp_path.glob(".thing.tmp-*"))
    assert sorted(p.name for p in (tmp_path / "thing").iterdir()) == [MARKER, "whole"]
