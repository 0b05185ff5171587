"""The trainer on a real 2-rank DeepSpeed ZeRO-3 engine (CPU, gloo): losses, resume, export, W&B."""

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from launcher.facts import find
from launcher.plan import make_plan
from launcher.validate import check_config
from tests.conftest import SFT, run_sft
from tests.utils.ports import held_ports
from tests.utils.stop import usr2_after
from tests.utils.wandb_file import find_runs, read_run

REFERENCE = Path(__file__).with_name("reference_losses.json")
# A short deterministic run: fp32, every parameter gathered (persistence threshold 0), logged each step.
SHORT = [
    "recipe=tiny_sft", "trainer.max_steps=12", "trainer.log_every=1", "trainer.micro_batch_size=4",
    "trainer.global_batch_size=16", "optim.warmup_steps=2", "eval.every_steps=0", "eval.generate_samples=0",
    "eval.max_batches=2", "checkpoint.every_steps=4", "checkpoint.keep=3",
]


def losses(run_dir: Path) -> dict:
    """Train loss by step; a resumed run appends, so the last row of a step wins."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r["kind"] == "train"}


def train(tmp: Path, overrides, name: str) -> Path:
    run_dir = tmp / name
    result = run_sft([*overrides, f"run_dir={run_dir}"], cwd=tmp)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def state_with_log_lines_reworded(run_dir: Path):
    """`sft-jobs status`'s (state, source) of a run after every line of its logs is reworded: the
    state comes from the run's events and files, never from what a log line says."""
    from launcher import jobs

    for log in (run_dir / "logs").iterdir():
        log.write_text("".join(f"{i}: a line reworded\n" for i, _ in enumerate(log.read_text().splitlines())))
    return jobs.local_state(run_dir, jobs.Progress.of(run_dir))


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reference")
    # DeepSpeed's comms logger only counts (and synchronises): the losses stay those of SHORT. The
    # configured rendezvous port is held, as another job on the node would hold it.
    with held_ports(1) as port:
        return train(tmp, [*SHORT, "+deepspeed.extra.comms_logger={enabled: true, prof_all: true}",
                           f"cluster.master_port={port}"], "uninterrupted")


def test_losses_match_the_pinned_reference(reference_run):
    got = losses(reference_run)
    if os.environ.get("SFT_UPDATE_REFERENCE"):
        REFERENCE.write_text(json.dumps({str(k): v for k, v in got.items()}, indent=1) + "\n")
    want = {int(k): v for k, v in json.loads(REFERENCE.read_text()).items()}
    assert sorted(got) == sorted(want) == list(range(1, 13))
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-6, abs=0), step
    assert got[12] < got[1]


def test_run_directory_holds_the_contract(reference_run):
    names = {p.name for p in reference_run.iterdir()}
    assert {"config.yaml", "overrides.yaml", "plan.json", "ds_config.json", "submission.json", "metrics.jsonl",
            "checkpoints", "export", "logs", "wandb", "wandb_run_id"} <= names
    assert {p.name for p in (reference_run / "logs").glob("rank-*.log")} == {"rank-0.log", "rank-1.log"}
    # The ranks ran the code `sft` copied at the start, not the checkout.
    assert (reference_run / "code" / "launcher" / "trainer.py").is_file()
    for rank in (0, 1):
        assert f"code: {reference_run / 'code' / 'launcher'}\n" in (reference_run / "logs" / f"rank-{rank}.log").read_text()
    assert sorted(p.name for p in (reference_run / "checkpoints").glob("step-*")) == ["step-000004", "step-000008", "step-000012"]
    plan = json.loads((reference_run / "plan.json").read_text())
    for ckpt in (reference_run / "checkpoints").glob("step-*"):
        marker = json.loads((ckpt / "COMPLETE").read_text())
        assert marker["world_size"] == 2 and marker["fingerprint"] == plan["fingerprint"]
    assert plan["fingerprint"]["global_batch_size"] == 16 and plan["fingerprint"]["micro_batch_size"] == 4
    assert not (reference_run / "checkpoints" / ".partial").exists()
    # What happened, as events: both ranks started (the total known), then rank 0 completed.
    events = [json.loads(l) for l in (reference_run / "events.jsonl").read_text().splitlines()]
    assert sorted((e["event"], e.get("rank"), e.get("total_steps")) for e in events[:-1]) == [("started", 0, 12), ("started", 1, 12)]
    assert (events[-1]["event"], events[-1]["step"]) == ("completed", 12)
    rows = [json.loads(l) for l in (reference_run / "metrics.jsonl").read_text().splitlines()]
    train_row = next(r for r in rows if r["kind"] == "train")
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "tokens_per_s_per_rank", "trained_tokens_per_s",
                "step_time_s", "samples_seen", "epoch", "peak_mem_gib"):
        assert train_row[key] is not None, key
    assert train_row["mfu"] is None  # no known peak FLOP/s on a CPU
    assert train_row["samples_seen"] == 16 and train_row["lr"] == pytest.approx(3e-3 / 2)
    final_eval = [r for r in rows if r["kind"] == "eval"][-1]
    assert final_eval["step"] == 12 and final_eval["perplexity"] == pytest.approx(torch.tensor(final_eval["loss"]).exp().item())


def test_ranks_meet_on_the_next_free_port_when_the_configured_one_is_held(reference_run):
    held = OmegaConf.load(reference_run / "config.yaml").cluster.master_port
    published = json.loads((reference_run / "rendezvous.json").read_text())
    assert published["port"] == held + 1 and published["world_size"] == 2 and published["attempt"].startswith("local-")
    assert f"rendezvous: rank 0 listens on 127.0.0.1:{held + 1} (attempt {published['attempt']}, 2 ranks)" in \
        (reference_run / "logs" / "rank-0.log").read_text()


def test_export_round_trips_and_equals_the_gathered_weights(reference_run):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import AutoModelForCausalLM, AutoTokenizer

    export = reference_run / "export"
    model = AutoModelForCausalLM.from_pretrained(export)
    AutoTokenizer.from_pretrained(export)
    assert (export / "model.safetensors").is_file() and (export / "generation_config.json").is_file()
    gathered = get_fp32_state_dict_from_zero_checkpoint(str(reference_run / "checkpoints"), tag="step-000012")
    exported = model.state_dict()
    assert model.config.tie_word_embeddings and exported["lm_head.weight"].data_ptr() == exported["model.embed_tokens.weight"].data_ptr()
    for name, tensor in gathered.items():
        assert torch.equal(exported[name], tensor), name
    raw = load_file(export / "model.safetensors")
    assert torch.equal(raw["model.embed_tokens.weight"], gathered["model.embed_tokens.weight"])


def test_the_logged_loss_is_the_mean_over_its_log_window(tmp_path, reference_run):
    """log_every=4: the loss logged at step 4 is the reference's steps 1-4 weighted by their trained tokens."""
    run = train(tmp_path, [*SHORT, "trainer.max_steps=4", "trainer.log_every=4", "checkpoint.export=false", "tracking=none"], "window")
    rows = {r["step"]: r for r in map(json.loads, (reference_run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "train"}
    (logged,) = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if '"train"' in l]
    tokens = sum(rows[s]["trained_tokens"] for s in range(1, 5))
    assert logged["step"] == 4 and logged["trained_tokens"] == tokens
    assert logged["loss"] == pytest.approx(sum(rows[s]["loss"] * rows[s]["trained_tokens"] for s in range(1, 5)) / tokens, rel=1e-9)
    assert logged["loss"] != pytest.approx(rows[4]["loss"], rel=1e-3)  # not the last step's


def test_accumulation_is_equivalent(tmp_path, reference_run):
    """The reference accumulates two micro-batches of 4 per rank and step; one micro-batch of 8 (the
    same rows) trains the same steps. Steps 1-3 take the warm-up's rates and the first decay step's,
    which no max_steps changes."""
    micro8 = train(tmp_path, [*SHORT, "trainer.max_steps=3", "trainer.micro_batch_size=8", "trainer.grad_accum_steps=1",
                              "checkpoint.export=false", "tracking=none"], "micro8")
    a, b = losses(micro8), losses(reference_run)
    assert sorted(a) == [1, 2, 3]
    plans = [json.loads((d / "plan.json").read_text()) for d in (micro8, reference_run)]
    assert [(p["micro_batch_size"], p["grad_accum_steps"], p["global_batch_size"]) for p in plans] == [(8, 1, 16), (4, 2, 16)]
    for step in a:
        assert a[step] == pytest.approx(b[step], abs=1e-6), step


def test_interrupt_then_resume_equals_an_uninterrupted_run(tmp_path, reference_run):
    run_dir = tmp_path / "interrupted"
    proc = subprocess.Popen([SFT, *SHORT, f"run_dir={run_dir}"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env={**os.environ, "TMPDIR": str(tmp_path)})
    out = usr2_after(proc, lambda: (run_dir / "metrics.jsonl").exists() and len(losses(run_dir)) >= 5)
    assert proc.returncode == 75, out[-3000:]
    stopped_at = max(losses(run_dir))
    assert 5 <= stopped_at < 12
    ckpts = sorted((run_dir / "checkpoints").glob("step-*"))
    assert ckpts[-1].name == f"step-{stopped_at:06d}" and (ckpts[-1] / "COMPLETE").is_file()
    # What a save killed half-way leaves: its files under .partial/, no step dir. Resume takes the
    # periodic checkpoint before and removes the leftovers.
    partial = run_dir / "checkpoints" / ".partial"
    partial.mkdir()
    ckpts[-1].rename(partial / ckpts[-1].name)
    first_id = (run_dir / "wandb_run_id").read_text().strip()
    assert state_with_log_lines_reworded(run_dir) == ("STOPPED", "events")

    result = run_sft([*SHORT, f"run_dir={run_dir}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    log = (run_dir / "logs" / "rank-0.log").read_text()
    assert f"removing an interrupted save: {partial}" in log and not partial.exists()
    previous = (stopped_at - 1) // 4 * 4  # the periodic checkpoint before the unmarked one
    assert f"resumed from {run_dir / 'checkpoints' / f'step-{previous:06d}'} at step {previous}" in log
    assert losses(run_dir) == losses(reference_run)  # bitwise, step by step
    want = load_file(reference_run / "export" / "model.safetensors")
    got = load_file(run_dir / "export" / "model.safetensors")
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)

    # One W&B run: the same id across both processes, our step continuing.
    assert (run_dir / "wandb_run_id").read_text().strip() == first_id
    files = find_runs(run_dir)
    assert len(files) == 2
    first, second = (read_run(f) for f in files)
    assert first["run_id"] == second["run_id"] == first_id
    steps = [row["trainer/global_step"] for row in second["history"] if "train/loss" in row]
    assert steps[0] <= stopped_at and steps[-1] == 12


def test_a_run_stopped_twice_is_one_wandb_run_whose_step_is_the_global_step(tmp_path):
    """USR2 twice (each a checkpoint at the stop), three offline segments of one run id: W&B's own
    step equals the global step in every row and rises strictly across the segments."""
    run_dir = tmp_path / "thrice"
    args = [SFT, *SHORT, "checkpoint.every_steps=0", "checkpoint.export=false", f"run_dir={run_dir}"]
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    for stop_at in (3, 7):
        proc = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        deadline = time.monotonic() + 300
        while not ((run_dir / "metrics.jsonl").exists() and max(losses(run_dir), default=0) >= stop_at):
            assert time.monotonic() < deadline and proc.poll() is None, "the run did not get far enough"
            time.sleep(0.02)
        proc.send_signal(signal.SIGUSR2)
        assert proc.wait(timeout=300) == 75
    result = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    segments = [read_run(f) for f in find_runs(run_dir)]
    assert len(segments) == 3 and len({s["run_id"] for s in segments}) == 1
    assert [s["summary"]["end_reason"] for s in segments] == ["stopped", "stopped", "completed"]
    assert [s["summary"].get("stop_signal") for s in segments] == ["SIGUSR2", "SIGUSR2", None]
    rows = [row for s in segments for row in s["history"]]
    assert all(row["_step"] == row["trainer/global_step"] for row in rows)
    steps = [row["_step"] for row in rows if "train/loss" in row]
    assert steps == list(range(1, 13))  # each step once, in order, across the three segments

    # `sft-jobs sync` hands the three real segments to W&B in order, once (W&B marks what it uploads).
    from launcher.jobs.sync import sync

    calls = []

    def wandb_cli(cmd):
        calls.append(cmd[-3:])
        for folder in cmd[3:]:
            for f in Path(folder).glob("run-*.wandb"):
                f.with_name(f.name + ".synced").write_text("")
        return 0

    assert sync([run_dir], lambda d: False, follow=False, run=wandb_cli, say=lambda t: None) == 3
    assert calls == [[str(f.parent) for f in find_runs(run_dir)]]
    assert sync([run_dir], lambda d: False, follow=False, run=wandb_cli, say=lambda t: None) == 0 and len(calls) == 1


def test_wandb_offline_run_holds_config_history_and_summary(reference_run):
    [path] = find_runs(reference_run)
    run = read_run(path)
    assert run["run_id"] == (reference_run / "wandb_run_id").read_text().strip()
    assert run["config"]["optim"]["lr"] == 3e-3 and run["config"]["tracking"]["api_key"] is None
    train_rows = [r for r in run["history"] if "train/loss" in r]
    assert [r["trainer/global_step"] for r in train_rows] == list(range(1, 13))
    by_step = losses(reference_run)
    assert all(r["train/loss"] == pytest.approx(by_step[r["trainer/global_step"]], rel=1e-12) for r in train_rows)
    assert run["summary"]["final/loss"] > 0 and run["summary"]["data/rows_kept"] > 0
    assert run["exit_code"] == 0
    # Where and what ran, and why it ended.
    meta = run["config"]["run"]
    submission = json.loads((reference_run / "submission.json").read_text())
    assert meta["backend"] == "local" and meta["world_size"] == 2 and meta["requeues"] == 0
    assert meta["git_sha"] == submission["git"]["sha"] and meta["launcher"].startswith("0.1.0+")
    assert {"backend:local", "world_size:2"} <= set(run["tags"])
    assert run["summary"]["end_reason"] == "completed" and run["summary"]["export_path"] == str(reference_run / "export")
    # Health of each log step, gathered from every rank.
    row = train_rows[-1]
    assert row["train/slowest_rank"] in (0, 1) and row["train/step_time_max_s"] >= row["train/step_time_min_s"] > 0
    assert row["train/peak_mem_gib_max"] >= row["train/peak_mem_gib"] > 0 and row["train/data_wait_s_max"] >= 0


def test_a_failing_rank_stops_all_and_shows_its_traceback(tmp_path):
    # DeepSpeed checks its batch sizes in the ranks: a conflicting one passed verbatim fails there.
    result = run_sft([*SHORT, "+deepspeed.extra.train_micro_batch_size_per_gpu=3", f"runs_root={tmp_path}/runs"],
                     cwd=tmp_path, timeout=300)
    assert result.returncode == 1
    assert "Traceback (most recent call last)" in result.stderr
    assert "AssertionError: Check batch related parameters" in result.stderr
    assert "rank 0 failed" in result.stderr or "rank 1 failed" in result.stderr
    run_dir = next((tmp_path / "runs").glob("*/*"))
    assert state_with_log_lines_reworded(run_dir) == ("FAILED", "events")


def test_demo_learns_the_bundled_task(tmp_path):
    """A shortened `make demo`: eval loss falls well below where it started; the CLI reports it."""
    # 30 steps take the eval loss from 6.04 to 2.43 (60 steps: 2.07): the halving has room either way.
    steps = 30
    overrides = ["recipe=tiny_sft", f"trainer.max_steps={steps}", "optim.warmup_steps=10", f"eval.every_steps={steps}",
                 "eval.generate_samples=16", "checkpoint.every_steps=0", "tracking=none"]
    run_dir = tmp_path / "demo"
    result = run_sft([*overrides, f"run_dir={run_dir}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if r["kind"] == "eval"]
    assert [e["step"] for e in evals] == [0, steps]
    assert evals[0]["accuracy"] == 0.0
    assert evals[-1]["loss"] < 0.5 * evals[0]["loss"]
    assert f"eval loss: {evals[0]['loss']:.4f} (step 0) -> {evals[-1]['loss']:.4f} (step {steps})" in result.stderr
    assert f"export: {run_dir / 'export'}" in result.stderr


def test_a_killed_rank_is_named_with_its_signal(tmp_path):
    """SIGKILL, as the out-of-memory killer sends it: the message names the signal and the likely cause."""
    run_dir = tmp_path / "killed"
    proc = subprocess.Popen([SFT, *SHORT, "trainer.max_steps=500", "checkpoint.every_steps=0", "tracking=none",
                             f"run_dir={run_dir}"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "TMPDIR": str(tmp_path)})
    deadline = time.monotonic() + 300
    while not ((run_dir / "metrics.jsonl").exists() and len(losses(run_dir)) >= 2):
        assert time.monotonic() < deadline and proc.poll() is None, "the run did not start"
        time.sleep(0.1)
    matches = {int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and _is_rank(p, run_dir, 1)}
    # A rank's forked children (a data worker, a compile pool) share its command line and environment.
    [rank1] = [pid for pid in matches if _parent(pid) not in matches]
    os.kill(rank1, signal.SIGKILL)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 1
    text = " ".join(err.split())
    assert "rank 1 was killed by SIGKILL (exit -9); a SIGKILL nobody sent is most often the kernel's out-of-memory killer" in text
    assert "rank 1 left no traceback; the last lines of its output:" in text


def _parent(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return -1


def _is_rank(proc: Path, run_dir: Path, rank: int) -> bool:
    try:
        return (b"launcher.rank\0" + str(run_dir).encode() in (proc / "cmdline").read_bytes()
                and f"\0RANK={rank}\0".encode() in b"\0" + (proc / "environ").read_bytes())
    except OSError:
        return False


def test_a_data_problem_found_by_the_ranks_is_one_clean_message(tmp_path):
    """Only tokens tell that every row is too long: rank 0 says which lines and the fix, without a traceback."""
    long = {"messages": [{"role": "user", "content": "reverse: " + " ".join("abcdefgh" * 8)}, {"role": "assistant", "content": "ok"}]}
    path = tmp_path / "long.jsonl"
    path.write_text(json.dumps(long) + "\n")
    result = run_sft(["data=chat", f"data.train_files={path}", "data.eval_files=null", "data.seq_len=32",
                      "trainer.micro_batch_size=1", "trainer.global_batch_size=2", "optim.warmup_steps=0",
                      "tracking=none", f"run_dir={tmp_path / 'run'}"], cwd=tmp_path, timeout=300)
    assert result.returncode == 1
    err = " ".join(result.stderr.split())
    assert "rank 0 stopped on a data problem: no training example is left" in err
    assert f"{path}: 1 row(s) dropped for length (line 1: no trained token in the first data.seq_len=32 tokens)" in err
    assert "Traceback" not in result.stderr
    assert state_with_log_lines_reworded(tmp_path / "run") == ("FAILED", "events")  # exit 2: fix the data


def test_sigterm_while_ops_compile_ends_as_a_stop(tmp_path):
    """SIGTERM to every process while DeepSpeed compiles (an empty extensions folder): both ranks end as
    stopped before the first step (exit 75), not as failed, and the next start builds and trains."""
    env = {**os.environ, "TMPDIR": str(tmp_path), "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext")}
    run_dir = tmp_path / "run"
    args = [SFT, *SHORT, "trainer.max_steps=2", "checkpoint.every_steps=0", "checkpoint.export=false",
            "tracking=none", f"run_dir={run_dir}"]
    proc = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    logs = [run_dir / "logs" / f"rank-{rank}.log" for rank in (0, 1)]
    deadline = time.monotonic() + 300
    while not any(p.exists() and "ops: building deepspeed_shm_comm" in p.read_text() for p in logs):  # either rank builds
        assert time.monotonic() < deadline and proc.poll() is None, "the op build did not start"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # forwarded to each rank's process group: ninja and compilers too
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 75, err[-3000:]
    for rank in (0, 1):
        log = (run_dir / "logs" / f"rank-{rank}.log").read_text()
        assert "stop signal received before the first step" in log and "rank %d failed" % rank not in log
    assert not (run_dir / "checkpoints").exists() or not list((run_dir / "checkpoints").iterdir())

    result = run_sft([*args[1:]], cwd=tmp_path, env={"TORCH_EXTENSIONS_DIR": str(tmp_path / "ext")})
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(losses(run_dir)) == [1, 2]


def test_a_two_rank_checkpoint_resumes_on_one_rank_and_continues_the_same_run(tmp_path, reference_run):
    """The checkpoint of step 4 of the 2-rank reference, resumed on 1 rank (4 accumulation steps instead
    of 2): converted once to DeepSpeed's universal form, it continues with the reference's losses.
    A SIGTERM to the rank and its converter during the conversion lets it finish and ends the start
    as stopped (75), not failed; the next start loads the conversion and trains."""
    source = tmp_path / "two-ranks" / "checkpoints" / "step-000004"
    shutil.copytree(reference_run / "checkpoints" / "step-000004", source)
    overrides = [*SHORT, "cluster.procs_per_node=1", f"resume={source}", "checkpoint.export=false"]
    run_dir = tmp_path / "one-rank"
    proc = subprocess.Popen([SFT, *overrides, "tracking=none", f"run_dir={run_dir}"], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    rank_log = run_dir / "logs" / "rank-0.log"
    deadline = time.monotonic() + 300
    while not (rank_log.exists() and "to a universal checkpoint (once" in rank_log.read_text()):
        assert time.monotonic() < deadline and proc.poll() is None, "the conversion did not start"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # forwarded to the rank's process group: the converter too, as under Slurm
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 75, err[-3000:]
    stopped = rank_log.read_text()
    assert f"converted {source} to a universal checkpoint in" in stopped and "rank 0 failed" not in stopped
    assert (source / "universal" / "COMPLETE").is_file() and not (run_dir / "metrics.jsonl").exists() or not losses(run_dir)

    run_dir = train(tmp_path, overrides, "one-rank")
    log = rank_log.read_text()[len(stopped):]
    assert "converting" not in log  # converted once
    assert f"{source} was written by 2 ranks; this run has 1: loading its universal form" in log
    assert f"resumed from {source} at step 4" in log
    assert (source / "universal" / "COMPLETE").is_file()
    want, got = losses(reference_run), losses(run_dir)
    assert sorted(got) == list(range(5, 13))
    assert max(abs(got[s] - want[s]) for s in got) < 1e-4, {s: got[s] - want[s] for s in got}

    # A later start that changes the global batch is refused before anything is rewritten.
    config = (run_dir / "config.yaml").read_bytes()
    logs = {p: p.read_bytes() for p in (run_dir / "logs").iterdir()}
    result = run_sft([*SHORT, "cluster.procs_per_node=1", "trainer.global_batch_size=32", f"run_dir={run_dir}"], cwd=tmp_path)
    assert result.returncode == 2
    err = " ".join(result.stderr.split())
    assert f"{run_dir / 'checkpoints' / 'step-000012'} was written with other settings" in err
    assert "global_batch_size: 16 in the checkpoint, 32 now" in err
    assert (run_dir / "config.yaml").read_bytes() == config
    assert {p: p.read_bytes() for p in (run_dir / "logs").iterdir()} == logs


def _bigger_model(path: Path) -> Path:
    """The bundled tokenizer with a 25M-parameter Llama: a save that takes long enough to be hit."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from launcher import bundled

    tiny = bundled.resolve("bundled://tiny-llama")
    config = AutoConfig.from_pretrained(tiny)
    config.update(dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
                       num_key_value_heads=8, head_dim=64))
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny).save_pretrained(path)
    return path


def test_a_rank_killed_in_the_middle_of_a_save_leaves_the_previous_checkpoint_to_resume(tmp_path):
    model = _bigger_model(tmp_path / "model")
    run_dir = tmp_path / "run"
    args = [SFT, "recipe=tiny_sft", f"model.path={model}", "data.seq_len=64", "trainer.micro_batch_size=1",
            "trainer.global_batch_size=2", "trainer.max_steps=3", "trainer.log_every=1", "optim.warmup_steps=0",
            "eval.max_batches=1", "eval.generate_samples=0", "checkpoint.every_steps=1", "checkpoint.export=false",
            "tracking=none", f"run_dir={run_dir}"]
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    proc = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    saving = run_dir / "checkpoints" / ".partial" / "step-000002"
    deadline = time.monotonic() + 600
    while not saving.exists():
        assert time.monotonic() < deadline and proc.poll() is None, "the run never started its second save"
        time.sleep(0.005)
    matches = {int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and _is_rank(p, run_dir, 1)}
    [rank1] = [pid for pid in matches if _parent(pid) not in matches]
    os.kill(rank1, signal.SIGKILL)
    proc.communicate(timeout=300)
    assert proc.returncode == 1
    assert [p.name for p in (run_dir / "checkpoints").glob("step-*")] == ["step-000001"]
    assert (run_dir / "checkpoints" / "step-000001" / "COMPLETE").is_file() and saving.is_dir()

    result = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    log = (run_dir / "logs" / "rank-0.log").read_text()
    assert f"removing an interrupted save: {saving.parent}" in log
    assert f"resumed from {run_dir / 'checkpoints' / 'step-000001'} at step 1" in log
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step-*")) == ["step-000002", "step-000003"]


def test_the_plan_predicts_the_bytes_deepspeeds_comms_logger_measures_within_5_percent(reference_run):
    """ZeRO-3 on 2 ranks, 2 micro-batches per step: per optimizer step the forward all-gathers every
    parameter once per micro-batch (the tiny model is within DeepSpeed's reuse distance, so backward
    gathers nothing) and gradients are reduce-scattered once per micro-batch."""
    predicted = json.loads((reference_run / "plan.json").read_text())["comm"]["message_bytes"]
    for rank in (0, 1):
        measured = json.loads((reference_run / "comms" / f"rank-{rank}.json").read_text())
        assert measured["optimizer_steps"] == 11  # 12 steps, the first (DeepSpeed's trace) left out
        per_step = {op: n / measured["optimizer_steps"] for op, n in measured["message_bytes"].items()}
        for op in ("all_gather_into_tensor", "reduce_scatter_tensor"):
            assert per_step[op] == pytest.approx(predicted[op], rel=0.05), (rank, op)
        assert sum(per_step.values()) == pytest.approx(sum(predicted.values()), rel=0.05)


def test_checkpoint_saves_record_their_write_speed_and_the_next_plan_uses_it(reference_run, compose_cfg):
    saves = [r for r in (json.loads(l) for l in (reference_run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "checkpoint"]
    assert [r["step"] for r in saves] == [4, 8, 12]
    on_disk = sum(f.stat().st_size for f in (reference_run / "checkpoints" / "step-000012").rglob("*") if f.is_file())
    assert saves[-1]["gb"] == pytest.approx(on_disk / 1e9, rel=1e-6) and all(r["write_gb_s_per_node"] > 0 for r in saves)
    cfg = compose_cfg([*SHORT, f"run_dir={reference_run}", "cluster=slurm", "cluster.gpus_per_node=2", "cluster.signal_delay_s=60"])
    window = make_plan(cfg, check_config(cfg, dry_run=True).model, None, find(cfg)).stop_window
    assert window["write_source"] == "measured by this run's saves"
    assert window["write_gb_s"] == sorted(r["write_gb_s_per_node"] for r in saves)[1] and window["fits"] is True
