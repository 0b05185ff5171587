"""Elastic runs (cluster.min_nodes..cluster.nodes): the checks before submission, the plan at both
ends of the range, the sbatch line, each start's accumulation, and how a shrunk run's state reads."""

import os

import pytest

from launcher.backends.slurm import executor_parameters
from launcher.errors import ConfigError
from launcher.facts import find
from launcher.plan import fit_to_world, make_plan
from launcher.plan.memory import nodes_advice
from launcher.run_state import outcome
from launcher.service import memory_refusal
from launcher.validate import check_config
from tests.conftest import compose_config

SLURM = ["cluster=slurm", "cluster.gpus_per_node=0", "cluster.procs_per_node=2", "cluster.partition=null"]


def problems(overrides):
    with pytest.raises(ConfigError) as info:
        check_config(compose_config(["recipe=tiny_sft", *overrides]), dry_run=True)
    return info.value.problems


def test_a_global_batch_that_does_not_divide_somewhere_in_the_range_is_refused_naming_the_sizes():
    [found] = problems([*SLURM, "cluster.nodes=4", "cluster.min_nodes=1", "trainer.micro_batch_size=4",
                        "trainer.global_batch_size=48"])
    assert found.startswith("trainer.global_batch_size=48: must divide by micro_batch_size (4) x the data-parallel ranks")
    assert found.endswith("(1..4); it does not at 4 node(s) = 8 data-parallel ranks")  # 48 = 4 x 2, 4 x 4 and 4 x 6 (x accum)


@pytest.mark.parametrize("overrides, message", [
    (["cluster.min_nodes=1", "cluster.nodes=2"], "cluster.min_nodes=1: needs cluster=slurm"),
    ([*SLURM, "cluster.min_nodes=3", "cluster.nodes=2"], "cluster.min_nodes=3: must be in 1..cluster.nodes (2)"),
    ([*SLURM, "cluster.min_nodes=1", "cluster.nodes=2", "trainer.global_batch_size=null", "trainer.grad_accum_steps=2"],
     "trainer.global_batch_size=None: must be set with cluster.min_nodes=1"),
    ([*SLURM, "cluster.min_nodes=1", "cluster.nodes=2", "trainer.grad_accum_steps=2"],
     "trainer.grad_accum_steps=2: must be null with cluster.min_nodes=1"),
    ([*SLURM, "cluster.grow=true"], "cluster.grow=True: needs a node range"),
    ([*SLURM, "cluster.min_nodes=1", "cluster.nodes=2", "cluster.grow=true", "checkpoint.every_steps=0"],
     "cluster.grow=True: needs checkpoint.every_steps > 0"),
])
def test_a_bad_range_is_refused_naming_the_key(overrides, message):
    assert any(p.startswith(message) for p in problems(overrides)), problems(overrides)


def test_the_plan_is_at_the_fewest_nodes_and_shows_the_speed_at_both_ends():
    cfg = compose_config(["recipe=tiny_sft", *SLURM, "cluster.nodes=4", "cluster.min_nodes=2", "cluster.gpu=h100",
                          "trainer.micro_batch_size=4", "trainer.global_batch_size=96"])
    plan = make_plan(cfg, check_config(cfg, dry_run=True).model, None, find(cfg))
    assert (plan.nodes, plan.world_size, plan.grad_accum_steps) == (2, 4, 6)  # memory planned where it is most per GPU
    elastic = plan.elastic
    assert (elastic["min_nodes"], elastic["max_nodes"], elastic["world_sizes"], elastic["grad_accum_steps"]) == (2, 4, [4, 8], [6, 3])
    assert elastic["step_s"][0] == plan.comm["step_s"] and elastic["step_s"][1] is not None
    assert elastic["tokens_per_s"][1] > elastic["tokens_per_s"][0]
    params = executor_parameters(cfg, plan, "tiny")
    assert params["additional_parameters"]["nodes"] == "2-4"  # sbatch --nodes=2-4 (submitit writes it over --nodes)


def test_a_range_whose_fewest_nodes_do_not_fit_is_refused_with_the_plans_numbers():
    cfg = compose_config(["recipe=qwen3_30b_a3b_sft", "cluster.min_nodes=1", "cluster.partition=null"])
    plan = make_plan(cfg, check_config(cfg, dry_run=True).model, None, find(cfg))
    refusal = memory_refusal(cfg, plan)
    assert plan.nodes == 1 and plan.memory["fits"] is False
    assert refusal is not None and "the run does not fit" in refusal and f"{plan.memory['peak_gib']:.2f} GiB" in refusal
    # the advice raises the range's floor, the key that sets the planned (fewest) nodes
    assert any(a.startswith("cluster.min_nodes=2 (predicted") for a in plan.memory["advice"]), plan.memory["advice"]
    assert not any(a.startswith("cluster.nodes=") for a in plan.memory["advice"])
    assert nodes_advice(4, 2) == "cluster.min_nodes=4 cluster.nodes=4" and nodes_advice(4, None) == "cluster.nodes=4"
    fine = compose_config(["recipe=qwen3_30b_a3b_sft", "cluster.partition=null"])  # 2 nodes: fits
    assert memory_refusal(fine, make_plan(fine, check_config(fine, dry_run=True).model, None, find(fine))) is None


def test_each_start_accumulates_to_the_same_global_batch():
    ds = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 4, "train_batch_size": 32}
    assert fit_to_world(ds, 2)["gradient_accumulation_steps"] == 4
    assert fit_to_world(ds, 4)["gradient_accumulation_steps"] == 2
    assert fit_to_world(ds, 8, sequence_parallel=2)["gradient_accumulation_steps"] == 2
    with pytest.raises(ValueError, match="world size 3 is outside the checked range"):
        fit_to_world(ds, 3)


def test_after_a_shrink_the_ranks_the_run_no_longer_has_do_not_make_it_stopped(tmp_path):
    events = [{"event": "started", "rank": 0, "attempt": "a"}, {"event": "started", "rank": 1, "attempt": "a"},
              {"event": "stopped", "rank": 0, "attempt": "a"}, {"event": "stopped", "rank": 1, "attempt": "a"},
              {"event": "started", "rank": 0, "attempt": "b"}]
    assert outcome(tmp_path, events) == (None, "events")  # rank 0 of the one-rank start trains
    assert outcome(tmp_path, [*events, {"event": "failed", "rank": 0, "attempt": "b"}]) == ("FAILED", "events")
    assert outcome(tmp_path, events[:4]) == ("STOPPED", "events")


def fake_slurm(tmp_path, monkeypatch, sinfo: str, squeue: str) -> None:
    for name, out in (("sinfo", sinfo), ("squeue", squeue)):
        script = tmp_path / name
        script.write_text(f"#!/bin/sh\nprintf '{out}'\n")
        script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")


def test_spare_nodes_count_each_idle_node_once_less_what_pending_jobs_want(tmp_path, monkeypatch):
    from launcher.backends.slurm_elastic import GrowCheck, idle_nodes, spare_nodes

    # sinfo -N lists a node once per partition it is in; the default partition is marked *.
    fake_slurm(tmp_path, monkeypatch, "node1 debug*\\nnode1 short\\nnode2 debug*\\nnode2 short\\nnode3 short\\n", "1\\n")
    assert (idle_nodes(None), idle_nodes("debug"), idle_nodes("short"), idle_nodes("gpu")) == (2, 2, 3, 0)
    assert spare_nodes("debug") == 1 and spare_nodes("short") == 2
    check = GrowCheck("debug", nodes_now=1, max_nodes=4, every_s=0.0)
    assert check() is True
    assert GrowCheck("debug", nodes_now=4, max_nodes=4, every_s=0.0)() is False  # at the range's top
    assert GrowCheck("debug", nodes_now=1, max_nodes=4, every_s=3600)() is False  # not before an interval from its start
    fake_slurm(tmp_path, monkeypatch, "node1 debug*\\n", "3\\n")  # one idle node, three wanted by pending jobs
    assert spare_nodes(None) == -2 and check() is False


def test_an_elastic_job_is_never_requeued_in_place():
    cfg = compose_config(["recipe=tiny_sft", *SLURM, "cluster.nodes=2", "cluster.min_nodes=1", "trainer.global_batch_size=32"])
    plan = make_plan(cfg, check_config(cfg, dry_run=True).model, None, find(cfg))
    extra = executor_parameters(cfg, plan, "tiny")["additional_parameters"]
    assert extra["no_requeue"] is True and "requeue" not in extra and extra["nodes"] == "1-2"
    fixed = compose_config(["recipe=tiny_sft", *SLURM])
    assert executor_parameters(fixed, make_plan(fixed, check_config(fixed, dry_run=True).model, None, find(fixed)),
                               "tiny")["additional_parameters"]["requeue"] is True


def test_only_this_submissions_grows_are_left_out_of_the_requeue_count(tmp_path):
    """cluster.max_requeues counts a submission's restarts (from 0 again after a resume by hand), less
    its grows: an earlier submission's grows would let the new one restart more often than allowed."""
    import json

    from launcher import rundir
    from launcher.backends.slurm_rank import grown

    def jobs(*records):
        (tmp_path / rundir.SUBMISSION).write_text(json.dumps({"backend": "slurm", "jobs": list(records)}))

    rundir.append_event(tmp_path, rundir.REQUEUED, job="1", restart=1, next_job="2", grow=True)
    rundir.append_event(tmp_path, rundir.REQUEUED, job="2", restart=2, next_job="3", grow=False)
    jobs({"job_id": "1"}, {"job_id": "2", "restart": 1}, {"job_id": "3", "restart": 2})
    assert grown(tmp_path) == 1
    # stopped for good, resumed by hand: job 4 is a new submission, even before its ranks write a start
    jobs({"job_id": "1"}, {"job_id": "2", "restart": 1}, {"job_id": "3", "restart": 2}, {"job_id": "4"})
    assert grown(tmp_path) == 0
    rundir.append_event(tmp_path, rundir.REQUEUED, job="4", restart=1, next_job="5", grow=True)
    jobs({"job_id": "1"}, {"job_id": "2", "restart": 1}, {"job_id": "3", "restart": 2}, {"job_id": "4"},
         {"job_id": "5", "restart": 1})
    assert grown(tmp_path) == 1


def test_the_first_job_asks_for_the_idle_nodes_it_can_count_on_within_the_range(tmp_path, monkeypatch):
    """Slurm starts `--nodes=MIN-MAX` on MIN even on an idle cluster (measured, 22.05): the first job's
    lower bound is what is idle and unclaimed now, shared by the jobs that start together."""
    from types import SimpleNamespace

    from launcher.backends.slurm_elastic import lower_bound

    unnarrowed = dict(exclude=None, constraint=None, sbatch_extra={})
    cluster = SimpleNamespace(partition="debug", min_nodes=2, nodes=8, **unnarrowed)
    idle = "".join(f"node{i} debug*\\n" for i in range(6))
    fake_slurm(tmp_path, monkeypatch, idle, "1\\n")  # 6 idle, 1 wanted by a pending job: 5 to count on
    assert lower_bound(cluster) == 5
    assert lower_bound(cluster, sharing=2) == 2  # a sweep's two tasks share them
    assert lower_bound(cluster, sharing=4) == 2  # never below the range
    assert lower_bound(SimpleNamespace(partition="debug", min_nodes=1, nodes=4, **unnarrowed)) == 4  # nor above it
    assert lower_bound(cluster, own=1) == 6  # a restart counts the nodes its job gives back too
    fake_slurm(tmp_path, monkeypatch, "", "0\\n")  # nothing idle
    assert lower_bound(cluster) == 2
    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))  # Slurm does not answer: the range's own minimum
    assert lower_bound(cluster) == 2


def test_a_job_that_narrows_its_nodes_asks_for_the_ranges_minimum(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from launcher.backends.slurm_elastic import lower_bound

    fake_slurm(tmp_path, monkeypatch, "".join(f"node{i} debug*\\n" for i in range(6)), "0\\n")
    base = dict(partition="debug", min_nodes=2, nodes=8, exclude=None, constraint=None, sbatch_extra={})
    assert lower_bound(SimpleNamespace(**base)) == 6
    for narrowed in ({"exclude": "node3"}, {"constraint": "h100"}, {"sbatch_extra": {"nodelist": "node[0-3]"}}):
        assert lower_bound(SimpleNamespace(**{**base, **narrowed})) == 2, narrowed


def test_a_refused_bound_is_submitted_again_with_the_ranges_minimum(tmp_path, monkeypatch, capsys):
    """The idle nodes counted may not all be the job's to have: sbatch refuses ("Requested node
    configuration is not available"), and the run is submitted with MIN-MAX instead."""
    import json
    from types import SimpleNamespace

    from launcher.backends import slurm as backend

    cfg = compose_config(["recipe=tiny_sft", *SLURM, "cluster.nodes=4", "cluster.min_nodes=1", "trainer.global_batch_size=192"])
    plan = make_plan(cfg, check_config(cfg, dry_run=True).model, None, find(cfg))
    asked = []

    class Executor:
        def __init__(self, params):
            self.nodes = params["additional_parameters"]["nodes"]

        def submit(self, task):
            asked.append(self.nodes)
            if self.nodes != "1-4":
                raise RuntimeError("sbatch: error: Batch job submission failed: Requested node configuration is not available")
            return SimpleNamespace(job_id="42")

    monkeypatch.setattr(backend, "lower_bound", lambda cluster, sharing: 3)
    monkeypatch.setattr(backend, "make_executor", lambda folder, params: Executor(params))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "submission.json").write_text(json.dumps({"backend": "slurm", "jobs": []}))
    assert backend.submit_runs(cfg, plan, [run_dir], run_dir / "submitit", "tiny", code=tmp_path) == ["42"]
    assert asked == ["3-4", "1-4"]
    assert json.loads((run_dir / "submission.json").read_text())["jobs"][0]["min_nodes"] == 1
    assert "sbatch refused --nodes=3-4 (sbatch: error: Batch job submission failed: Requested node configuration " \
           "is not available); asking for 1-4" in capsys.readouterr().out


def test_each_jobs_nodes_are_read_from_its_starts_array_tasks_included(tmp_path):
    from launcher import rundir
    from launcher.run_state import nodes_per_job

    for attempt, nodes in (("slurm-12_1-0", 1), ("slurm-14-0", 2), ("slurm-14-1", 1)):
        rundir.append_event(tmp_path, rundir.STARTED, rank=0, restart=0, attempt=attempt, nodes=nodes, world_size=nodes)
    assert nodes_per_job(tmp_path) == {"12_1": 1, "14": 1}  # a job's newest start
