"""data.split_seed, not the training seed, decides the data: the eval holdout, the mixing and the packing.

A seed sweep's points are evaluated on one eval set and share one tokenised cache entry; a changed
split_seed is a change of data, for the cache and for a resume.
"""

import json

import pytest
from transformers import AutoTokenizer

from launcher import checkpoint
from launcher.bundled import resolve
from launcher.data import prepare_data
from launcher.errors import ConfigError
from launcher.resume import check_resume, data_fingerprint
from launcher.schema import DataConfig
from tests.conftest import compose_config

TRAIN = "bundled://tiny-tasks/train.jsonl"


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(resolve("bundled://tiny-llama"))


def cfg(**kw):
    base = dict(train_files=TRAIN, eval_files=None, eval_fraction=0.1, format="messages", template=None,
                seq_len=128, packing=True, train_on="assistant", truncation="truncate", on_bad_row="error",
                num_proc=1, prepare_timeout_min=1.0, split_seed=7)
    return {**base, **kw}


def prep(tok, root, c):
    """prepare_data and the log lines that say a file was tokenised."""
    logged = []
    data = prepare_data(c, tok, cache_root=str(root), log=logged.append)
    return data, [m for m in logged if m.startswith("data: tokenising")]


def rows(ds):
    return [ds[i] for i in range(len(ds))]


def built_entries(root):
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and p.name != "digests")


def test_a_seed_sweeps_points_share_the_rows_the_eval_set_and_the_cache_entry(tok, tmp_path):
    """What the trainer passes for `seed=1` and `seed=2` (cfg.data): the same rows, tokenised once."""
    root = tmp_path / "cache"
    points = [compose_config(["recipe=tiny_sft", f"seed={seed}", f"data.train_files={TRAIN}", "data.eval_files=null",
                              "data.eval_fraction=0.1"]).data for seed in (1, 2)]
    first, tokenised = prep(tok, root, points[0])
    assert first.stats["cache_hit"] is False and len(tokenised) == 1
    assert (first.stats["train_examples"], first.stats["eval_examples"]) == (1800, 200)
    second, tokenised = prep(tok, root, points[1])
    assert second.stats["cache_hit"] is True and tokenised == []  # not tokenised again
    assert second.stats["cache_key"] == first.stats["cache_key"] and built_entries(root) == [first.stats["cache_key"]]
    assert rows(second.eval) == rows(first.eval) and second.eval_prompts == first.eval_prompts
    assert rows(second.train) == rows(first.train)


def test_another_split_seed_holds_out_other_rows_in_another_cache_entry(tok, tmp_path):
    root = tmp_path / "cache"
    a, _ = prep(tok, root, cfg())
    b, tokenised = prep(tok, root, cfg(split_seed=8))
    assert b.stats["cache_hit"] is False and len(tokenised) == 1
    assert b.stats["cache_key"] != a.stats["cache_key"] and len(built_entries(root)) == 2
    assert b.stats["eval_examples"] == a.stats["eval_examples"] == 200 and rows(b.eval) != rows(a.eval)
    held = {json.dumps(p) for p in a.eval_prompts}
    other = {json.dumps(p) for p in b.eval_prompts}
    assert held != other and len(held & other) < len(held) // 2  # a fresh draw, not a reshuffle


def test_mixing_and_packing_follow_the_split_seed_only(tok, tmp_path):
    root = tmp_path / "cache"
    mixed = cfg(train_files=[{"path": TRAIN, "weight": 1.5}], eval_fraction=0.0)
    a, _ = prep(tok, root, mixed)
    b, _ = prep(tok, root, mixed)
    c, _ = prep(tok, root, {**mixed, "split_seed": 8})
    assert a.stats["train_examples"] == c.stats["train_examples"] == 3000
    assert rows(a.train) == rows(b.train) and b.stats["cache_hit"] is True
    assert rows(a.train) != rows(c.train)  # other repeated examples, packed in another order


def test_a_plain_dict_without_split_seed_gets_the_schema_default(tok, tmp_path):
    root = tmp_path / "cache"
    c = cfg()
    del c["split_seed"]
    a, _ = prep(tok, root, c)
    b, tokenised = prep(tok, root, cfg(split_seed=DataConfig.split_seed))
    assert b.stats["cache_key"] == a.stats["cache_key"] and tokenised == []


@pytest.mark.parametrize("bad", [-1, 1.5, "7", True])
def test_a_bad_split_seed_is_a_config_error(tok, tmp_path, bad):
    with pytest.raises(ConfigError, match=r"data.split_seed=.*must be an integer >= 0"):
        prep(tok, tmp_path / "cache", cfg(split_seed=bad))


def test_the_default_split_seed_is_the_default_seed():
    # The bundled recipe's rows (and the pinned reference losses) were packed with the default seed.
    c = compose_config(["recipe=tiny_sft"])
    assert c.data.split_seed == c.seed == 42


def test_a_changed_split_seed_is_a_data_change_on_resume(tmp_path):
    base = ["recipe=tiny_sft", f"data.cache_dir={tmp_path / 'cache'}"]
    same = compose_config(base)
    assert data_fingerprint(compose_config([*base, "seed=1"]).data) == data_fingerprint(same.data)
    other = data_fingerprint(compose_config([*base, "data.split_seed=1"]).data)
    assert other != data_fingerprint(same.data)

    saved = {"seed": 42, "data": data_fingerprint(same.data)}
    path = checkpoint.step_dir(tmp_path / "run", 10)
    path.mkdir(parents=True)
    (path / checkpoint.MARKER).write_text(json.dumps({"step": 10, "world_size": 2, "fingerprint": saved}))
    cfg = compose_config([*base, "data.split_seed=1"])
    with pytest.raises(ConfigError, match=r"data: '\w+' in the checkpoint, '\w+' now.*allow_changes=\[data\]"):
        check_resume(cfg, tmp_path / "run", {**saved, "data": other})
    cfg.checkpoint.allow_changes = ["data"]
    assert check_resume(cfg, tmp_path / "run", {**saved, "data": other}) == path.resolve()
