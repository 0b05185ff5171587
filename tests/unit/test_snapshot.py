"""launcher.snapshot: a run's ranks import the launcher copied at submission, not the checkout."""

import os
import subprocess
import sys
from pathlib import Path

from launcher.snapshot import import_env, setup_lines, snapshot_code

REPO = Path(__file__).resolve().parents[2]


def test_a_process_started_in_the_repository_imports_the_snapshot(tmp_path):
    code = snapshot_code(tmp_path)
    assert (code / "launcher" / "trainer.py").read_bytes() == (REPO / "launcher" / "trainer.py").read_bytes()
    assert not list(code.rglob("__pycache__"))
    (code / "launcher" / "marker.py").write_text("WHERE = 'snapshot'\n")  # only the copy has it
    env = {**os.environ, **import_env(code, {})}
    probe = "import launcher, launcher.marker; print(launcher.__file__, launcher.marker.WHERE)"
    result = subprocess.run([sys.executable, "-c", probe], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [str(code / "launcher" / "__init__.py"), "snapshot"]


def test_a_new_snapshot_replaces_the_old_one(tmp_path):
    code = snapshot_code(tmp_path)
    (code / "launcher" / "stale.py").write_text("")
    assert snapshot_code(tmp_path) == code
    assert not (code / "launcher" / "stale.py").exists()
    assert [p.name for p in code.iterdir()] == ["launcher"]


def test_a_batch_script_in_a_run_dir_with_a_space_imports_the_snapshot(tmp_path):
    code = snapshot_code(tmp_path / "my runs")
    (code / "launcher" / "marker.py").write_text("WHERE = 'snapshot'\n")
    script = "\n".join([*setup_lines(code), f"cd {REPO}", f"{sys.executable} -c 'import launcher.marker; print(launcher.marker.WHERE)'"])
    for inherited in ("", "/elsewhere"):
        result = subprocess.run(["bash", "-c", script], env={**os.environ, "PYTHONPATH": inherited},
                                capture_output=True, text=True, timeout=60)
        assert result.stdout.strip() == "snapshot", result.stderr
