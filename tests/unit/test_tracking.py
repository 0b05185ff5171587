"""Tracking with real offline W&B runs, read back from their `.wandb` files."""

import json
import os
import signal
import socket
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import wandb
from omegaconf import OmegaConf

from launcher.schema import TrackingConfig
from launcher.tracking import RUN_ID_FILE, STEP_METRIC, TrackingError, have_credentials, start_tracking
from tests.utils.wandb_file import BLOCK, find_runs, read_run

KEY = "f00d" * 11  # 44 characters, a valid shape for a W&B key (40+), unlikely to occur by chance


def tracking_cfg(**overrides):
    fields = dict(backend="wandb", mode="offline", project="sft-test", entity=None, group="sweep-a",
                  name="run-a", job_type="sft", tags=["unit", "tiny"], api_key=None)
    return SimpleNamespace(**{**fields, **overrides})


def user_keys(row: dict) -> dict:
    """A row without wandb's own `_step`, `_runtime`, `_timestamp`, `_wandb`."""
    return {k: v for k, v in row.items() if not k.startswith("_")}


@pytest.fixture(autouse=True)
def isolated_wandb(tmp_path, monkeypatch):
    """No real home, key or netrc; a fresh wandb singleton so each test's environment is read."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for name in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "NETRC", "WANDB_BASE_URL", "WANDB_MODE", "WANDB_DIR"):
        monkeypatch.delenv(name, raising=False)
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(name, str(home / name.lower()))
    monkeypatch.setenv("WANDB_SILENT", "true")
    wandb.teardown()
    yield home
    wandb.teardown()


def test_rank0_run_reads_back_exactly(tmp_path):
    run_dir = tmp_path / "run"
    # A value over one 32 KiB block makes wandb split its record FIRST/MIDDLE/LAST across blocks.
    config = {"optim": {"lr": 1e-4, "betas": [0.9, 0.95]}, "model": "tiny", "notes": "x" * (BLOCK + 5000),
              "tracking": {"api_key": "***"}}
    # The trainer passes the composed DictConfig; tags come as a ListConfig.
    cfg = OmegaConf.structured(TrackingConfig(project="sft-test", group="sweep-a", name="run-a", tags=["unit", "tiny"]))
    tracker = start_tracking(cfg, run_dir, rank=0, config=config, resume=False)
    rows = [{"train/loss": 2.5, "train/lr": 1e-4}, {"train/loss": 2.0}, {"eval/loss": 1.75, "eval/ppl": 5.75}]
    for step, row in enumerate(rows, start=1):
        tracker.log(row, step=step)
    tracker.summary({"final/loss": 1.75, "status": "completed"})
    tracker.finish()

    assert (run_dir / RUN_ID_FILE).read_text().strip() == tracker.run_id
    [path] = find_runs(run_dir)
    assert path.stat().st_size > BLOCK
    run = read_run(path)
    assert run["run_id"] == tracker.run_id
    assert run["exit_code"] == 0
    assert (run["project"], run["group"], run["name"], run["job_type"]) == ("sft-test", "sweep-a", "run-a", "sft")
    assert run["tags"] == ["unit", "tiny"]
    assert run["config"] == config
    assert [user_keys(r) for r in run["history"]] == [{**row, STEP_METRIC: s} for s, row in enumerate(rows, 1)]
    assert user_keys(run["summary"]) == {"train/loss": 2.0, "train/lr": 1e-4, "eval/loss": 1.75, "eval/ppl": 5.75,
                                         STEP_METRIC: 3, "final/loss": 1.75, "status": "completed"}

    # The reader checks every chunk's CRC: one flipped byte in the spanning config record is caught.
    data = bytearray(path.read_bytes())
    data[BLOCK + 100] ^= 0xFF
    corrupt = tmp_path / "corrupt.wandb"
    corrupt.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="CRC"):
        read_run(corrupt)


@pytest.mark.parametrize("rank, overrides", [(1, {}), (3, {"mode": "online"}), (0, {"backend": "none"}),
                                             (0, {"mode": "disabled"})])
def test_noop_tracker_writes_nothing(tmp_path, rank, overrides):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    tracker = start_tracking(tracking_cfg(**overrides), run_dir, rank=rank, config={"a": 1}, resume=False)
    tracker.log({"train/loss": 1.0}, step=1)
    tracker.summary({"final/loss": 1.0})
    tracker.finish(exit_code=1)
    assert tracker.run_id is None
    assert list(run_dir.iterdir()) == []


def test_resume_reuses_the_run_id_and_continues_our_step(tmp_path):
    run_dir = tmp_path / "run"
    first = start_tracking(tracking_cfg(), run_dir, rank=0, config={"a": 1}, resume=False)
    for step in (1, 2, 3):
        first.log({"train/loss": 1.0 / step}, step=step)
    first.finish(exit_code=1)  # say it failed, and is restarted from its checkpoint

    second = start_tracking(tracking_cfg(), run_dir, rank=0, config={"a": 1}, resume=True)
    for step in (4, 5):
        second.log({"train/loss": 1.0 / step}, step=step)
    second.finish(exit_code=0)

    assert second.run_id == first.run_id == (run_dir / RUN_ID_FILE).read_text().strip()
    old, new = (read_run(p) for p in find_runs(run_dir))
    assert old["run_id"] == new["run_id"] == first.run_id
    assert (old["exit_code"], new["exit_code"]) == (1, 0)
    assert [r[STEP_METRIC] for r in old["history"]] == [1, 2, 3]
    assert [r[STEP_METRIC] for r in new["history"]] == [4, 5]
    assert [r["train/loss"] for r in new["history"]] == [0.25, 0.2]
    # W&B's own step is the global step: the segments of one run never collide.
    assert [r["_step"] for r in old["history"]] == [1, 2, 3] and [r["_step"] for r in new["history"]] == [4, 5]


def test_a_killed_wandb_service_costs_no_row_and_never_fails_the_run(tmp_path, caplog):
    """SIGTERM to W&B's service, as Slurm sends it to every process of a job: the calls after it
    fail quietly, and finish rebuilds the segment in a new service from metrics.jsonl."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    metrics = run_dir / "metrics.jsonl"
    metrics.write_text(json.dumps({"kind": "train", "step": 1, "loss": 9.0}) + "\n")  # an earlier segment's row
    tracker = start_tracking(tracking_cfg(), run_dir, rank=0, config={"a": 1}, resume=True, metrics=metrics)
    rows = [{"kind": "train", "step": s, "loss": 1.0 / s} for s in (2, 3, 4, 5)] + [{"kind": "eval", "step": 5, "loss": 0.5}]
    for i, row in enumerate(rows):
        if i == 2:
            [service] = [pid for pid in _children() if b"wandb-core" in Path(f"/proc/{pid}/cmdline").read_bytes()]
            os.kill(service, signal.SIGTERM)
            time.sleep(1)
        with metrics.open("a") as f:
            f.write(json.dumps(row) + "\n")
        tracker.log({f"{row['kind']}/loss": row["loss"]}, step=row["step"])
    tracker.summary({"final/loss": 0.5})
    tracker.finish(exit_code=0)
    assert "W&B log failed" in caplog.text and "rebuilt this segment from metrics.jsonl (5 rows)" in caplog.text
    [segment] = [read_run(p) for p in find_runs(run_dir)]  # the dead segment's partial file is gone
    assert segment["exit_code"] == 0 and segment["summary"]["final/loss"] == 0.5
    assert [(r["_step"], r.get("train/loss"), r.get("eval/loss")) for r in segment["history"]] == [
        (2, 0.5, None), (3, 1 / 3, None), (4, 0.25, None), (5, 0.2, 0.5)]


def _children() -> list:
    me, found = os.getpid(), []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1]) == me:
                found.append(int(proc.name))
        except (OSError, ValueError):
            pass
    return found


def test_a_fresh_start_gets_a_new_run_id(tmp_path):
    run_dir = tmp_path / "run"
    first = start_tracking(tracking_cfg(), run_dir, rank=0, config={}, resume=False)
    first.finish()
    second = start_tracking(tracking_cfg(), run_dir, rank=0, config={}, resume=False)
    second.finish()
    assert second.run_id != first.run_id
    assert (run_dir / RUN_ID_FILE).read_text().strip() == second.run_id


def all_files_containing(root, needle: bytes):
    return [p for p in root.rglob("*") if p.is_file() and needle in p.read_bytes()]


def test_api_key_is_written_nowhere(tmp_path, monkeypatch, isolated_wandb):
    run_dir = tmp_path / "run"
    tracker = start_tracking(tracking_cfg(api_key=KEY), run_dir, rank=0, config={"a": 1}, resume=False)
    tracker.log({"train/loss": 1.0}, step=1)
    tracker.finish()

    # Online the key is really handed to wandb; a dead local server stands in for W&B (nothing leaves the host).
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{port}")
    # It cannot reach the server, and goes on offline.
    start_tracking(tracking_cfg(api_key=KEY, mode="online", init_timeout_s=2), run_dir, rank=0, config={"a": 1}, resume=True).finish()

    assert len(find_runs(run_dir)) == 2
    assert all_files_containing(run_dir, KEY.encode()) == []
    assert all_files_containing(isolated_wandb, KEY.encode()) == []  # no ~/.netrc, no wandb settings


def test_online_without_a_key_fails_fast_and_says_how_to_fix(tmp_path):
    assert not have_credentials()
    # Refused before wandb.init, so it can neither prompt nor wait on a server (the time it takes
    # is measured in benchmarks/bench_tracking.py).
    with pytest.raises(TrackingError) as err:
        start_tracking(tracking_cfg(mode="online"), tmp_path / "run", rank=0, config={}, resume=False)
    assert "tracking.mode" in str(err.value)
    assert "WANDB_API_KEY" in str(err.value) and "tracking.mode=offline" in str(err.value)
    assert not (tmp_path / "run").exists()


def test_credentials_are_found_in_env_or_netrc(monkeypatch, isolated_wandb):
    monkeypatch.setenv("WANDB_API_KEY", KEY)
    assert have_credentials()
    monkeypatch.delenv("WANDB_API_KEY")
    (isolated_wandb / ".netrc").write_text(f"machine api.wandb.ai\n  login user\n  password {KEY}\n")
    assert have_credentials()
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.com")
    assert not have_credentials()  # the entry is for another host


def test_an_unreachable_server_falls_back_to_offline_within_the_init_timeout(tmp_path, monkeypatch, caplog):
    """Online with a server that refuses connections (a closed port on loopback): after
    tracking.init_timeout_s the run logs offline, with a warning that says how to upload it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the socket is: nothing listens there
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{port}")
    run_dir = tmp_path / "run"
    tracker = start_tracking(tracking_cfg(mode="online", api_key=KEY, init_timeout_s=2), run_dir, rank=0, config={"a": 1}, resume=False)
    tracker.log({"train/loss": 1.0}, step=1)
    tracker.finish()
    assert "W&B did not start online" in caplog.text and f"wandb sync {run_dir / 'wandb'}" in caplog.text
    [run] = [read_run(p) for p in find_runs(run_dir)]
    assert run["exit_code"] == 0 and [r["train/loss"] for r in run["history"]] == [1.0]


def test_wandb_waits_at_most_tracking_finish_timeout_s_at_the_end_of_a_segment(tmp_path):
    """A stopped segment requeues once W&B has finished, before the time limit: the upload must
    give up in time (what it leaves stays on disk for `sft-jobs sync`)."""
    tracker = start_tracking(tracking_cfg(finish_timeout_s=7), tmp_path / "run", rank=0, config={}, resume=False)
    assert tracker._run.settings.finish_timeout == 7.0
    tracker.finish()
    default = start_tracking(tracking_cfg(), tmp_path / "run2", rank=0, config={}, resume=False)
    assert default._run.settings.finish_timeout == 10.0  # inside the plan's exit margin (launcher.plan.stop_window)
    default.finish()
