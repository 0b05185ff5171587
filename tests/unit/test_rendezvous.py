"""launcher.rendezvous: rank 0 listens on a port nobody holds and publishes it under its start's id."""

import datetime
import json

import pytest

from launcher.rendezvous import MASTER_PORT_RANGE, START_FAILED_FILE, RendezvousError, listen, published_port, slurm_attempt_id
from launcher.sweep.controller import not_its_own
from tests.utils.ports import held_ports

TIMEOUT = datetime.timedelta(seconds=10)


def test_a_held_master_port_is_passed_over_for_the_next_free_one():
    with held_ports(3) as port:
        store = listen("127.0.0.1", 1, TIMEOUT, master_port=port)
        assert store.port == port + 3


def test_without_a_master_port_the_os_gives_one_nobody_holds():
    with held_ports(1) as port:
        store = listen("127.0.0.1", 1, TIMEOUT, master_port=None)
        assert store.port not in (0, port)


def test_a_range_all_held_names_the_key_the_ports_and_the_way_out():
    with held_ports(MASTER_PORT_RANGE) as port, pytest.raises(RendezvousError) as error:
        listen("127.0.0.1", 1, TIMEOUT, master_port=port)
    assert str(error.value) == (f"cluster.master_port={port}: ports {port}-{port + MASTER_PORT_RANGE - 1} are all in use "
                                "on 127.0.0.1; pick another range, or leave cluster.master_port unset (null) to take a port "
                                "the OS gives")


def test_the_other_ranks_read_only_their_own_starts_port(tmp_path):
    path = tmp_path / "rendezvous.json"
    path.write_text(json.dumps({"attempt": "slurm-7-0", "addr": "node1", "port": 40001}))  # the start before a requeue
    polls = []

    def publish_on_second_poll(seconds):
        polls.append(seconds)
        if len(polls) == 2:
            path.write_text(json.dumps({"attempt": "slurm-7-1", "addr": "node2", "port": 40002}))

    assert published_port(path, "slurm-7-1", timeout_s=60, sleep=publish_on_second_poll) == ("node2", 40002)
    assert len(polls) == 2


def test_a_rank_0_that_never_publishes_is_a_clear_error(tmp_path):
    with pytest.raises(RendezvousError, match=r"rank 0 did not publish its port for attempt slurm-7-1 in .*rendezvous.json "
                                              r"within 0 s \(trainer.dist_timeout_min\)"):
        published_port(tmp_path / "rendezvous.json", "slurm-7-1", timeout_s=0, sleep=lambda s: None)


def test_each_requeue_of_a_job_is_a_new_attempt():
    assert slurm_attempt_id({"SLURM_JOB_ID": "12", "SLURM_RESTART_COUNT": "2"}) == "slurm-12-2"
    assert slurm_attempt_id({"SLURM_JOB_ID": "12"}) == "slurm-12-0"
    # an array task by its array name, which sft-jobs status shows: its nodes column reads from it
    assert slurm_attempt_id({"SLURM_JOB_ID": "14", "SLURM_ARRAY_JOB_ID": "12", "SLURM_ARRAY_TASK_ID": "1"}) == "slurm-12_1-0"


def test_a_search_starts_again_only_trials_that_failed_for_a_reason_not_their_own(tmp_path):
    assert not_its_own(tmp_path, "FAILED") is None  # a crash, an out-of-memory: the trial's own
    assert not_its_own(tmp_path, "NODE_FAIL") == "its job ended NODE_FAIL"
    (tmp_path / START_FAILED_FILE).write_text(json.dumps({"attempt": "slurm-7-0", "rank": 1, "reason": "rank 1 could not meet"}))
    assert not_its_own(tmp_path, "FAILED") == "rank 1 could not meet"
