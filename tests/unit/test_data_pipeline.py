"""prepare_data end to end on small files: formats, bad rows, length policy, eval split, mixing, cache, ranks."""

import copy
import json
import threading

import numpy as np
import pandas as pd
import pytest
from transformers import AutoTokenizer

from launcher.bundled import resolve
from launcher.data import DataError, PreparedData, prepare_data
from launcher.data.errors import BAD_ROW_REASONS
from launcher.data.examples import ExampleBuilder
from launcher.data.masking import IGNORE
from launcher.errors import ConfigError

CHAT = [{"role": "user", "content": "add 2 3"}, {"role": "assistant", "content": "5"}]
GOOD = [{"messages": [{"role": "user", "content": f"add {i} {i}"}, {"role": "assistant", "content": str(2 * i)}]}
        for i in range(12)]


@pytest.fixture(scope="module")
def tok():
    # prepare_data installs data.template on the tokenizer: tests that set one pass a copy.
    return AutoTokenizer.from_pretrained(resolve("bundled://tiny-llama"))


def cfg(train, **kw):
    base = dict(train_files=train if isinstance(train, list) else str(train), eval_files=None, eval_fraction=0.0, format="auto", template=None,
                seq_len=64, packing=True, train_on="assistant", truncation="truncate", on_bad_row="error",
                num_proc=1, prepare_timeout_min=1.0)
    return {**base, **kw}


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def prep(tok, tmp_path, c, **kw) -> PreparedData:
    return prepare_data(c, tok, cache_root=str(tmp_path / "cache"), log=lambda m: None, **kw)


def rows(ds):
    return [ds[i] for i in range(len(ds))]


def test_file_types_give_the_same_rows(tok, tmp_path):
    pc = [{"prompt": f"add {i} {i}", "completion": str(2 * i)} for i in range(12)]
    files = {"a.jsonl": None, "b.json": None, "c.parquet": None, "d.csv": None, "e.jsonl": "sharegpt"}
    write_jsonl(tmp_path / "a.jsonl", GOOD)
    (tmp_path / "b.json").write_text(json.dumps(pc, indent=1))
    pd.DataFrame(pc).to_parquet(tmp_path / "c.parquet")
    pd.DataFrame({"messages": [json.dumps(r["messages"]) for r in GOOD]}).to_csv(tmp_path / "d.csv", index=False)
    write_jsonl(tmp_path / "e.jsonl", [{"conversations": [{"from": "human", "value": r["messages"][0]["content"]},
                                                          {"from": "gpt", "value": r["messages"][1]["content"]}]}
                                       for r in GOOD])
    results = [prep(tok, tmp_path, cfg(tmp_path / name)) for name in files]
    for r in results[1:]:
        assert rows(r.train) == rows(results[0].train)
    assert results[0].stats["rows_read"] == results[0].stats["rows_kept"] == 12
    packed = results[0].train[0]
    assert len(packed["input_ids"]) == len(packed["labels"]) == len(packed["position_ids"]) == 64


BAD = {
    "invalid_json": '{"messages": [',
    "missing_field": {"question": "q"},
    "wrong_type": {"messages": {"role": "user"}},
    "unknown_role": {"messages": [{"role": "robot", "content": "x"}, CHAT[1]]},
    "empty_content": {"messages": [CHAT[0], {"role": "assistant", "content": ""}]},
    "no_assistant_turn": {"messages": [CHAT[0]]},
}


@pytest.mark.parametrize("reason", sorted(BAD))
def test_error_mode_names_file_line_and_problem(tok, tmp_path, reason):
    path = write_jsonl(tmp_path / "bad.jsonl", [GOOD[0], "", BAD[reason], GOOD[1]])  # line 2 is blank
    with pytest.raises(DataError) as e:
        prep(tok, tmp_path, cfg(path))
    msg = str(e.value)
    assert str(path) in msg and "line 3:" in msg and f"[{reason}]" in msg and "on_bad_row=skip" in msg


def test_skip_mode_counts_every_reason(tok, tmp_path):
    template = "{% for m in messages %}{% if loop.last %}!{% endif %}{{ m['content'] }}{% endfor %}"
    path = write_jsonl(tmp_path / "bad.jsonl", [*GOOD[:3], *BAD.values(), ""])
    stats = prep(tok, tmp_path, cfg(path, on_bad_row="skip")).stats
    assert {r: stats[f"skipped_{r}"] for r in BAD} == {r: 1 for r in BAD}
    assert (stats["rows_read"], stats["rows_kept"], stats["rows_skipped"]) == (9, 3, 6)
    assert stats["train_examples"] == 3
    # A template that cannot be split into turns: every row is skipped, so there is nothing to train.
    with pytest.raises(DataError, match=r"no training example is left: data: 9 rows read, 0 kept.*template_error 3"):
        prep(copy.deepcopy(tok), tmp_path, cfg(path, on_bad_row="skip", template=template))
    assert set(BAD_ROW_REASONS) <= {k[len("skipped_"):] for k in stats if k.startswith("skipped_")}
    json.dumps(stats)  # flat and JSON-able for the log and W&B


def test_json_array_with_invalid_json_names_the_position(tok, tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[{"prompt": "a", "completion": "b"},\n {"prompt": "c" "completion": "d"}]')
    with pytest.raises(DataError, match=r"bad.json: invalid JSON at line 2 column"):
        prep(tok, tmp_path, cfg(path))


def test_length_policy_is_counted(tok, tmp_path):
    words = {"role": "user", "content": "x " * 80}  # far more than seq_len=64 tokens
    late_answer = {"messages": [words, {"role": "assistant", "content": "y"}]}
    early_answer = {"messages": [*CHAT, words]}
    path = write_jsonl(tmp_path / "d.jsonl", [*GOOD[:4], late_answer])
    stats = prep(tok, tmp_path, cfg(path)).stats  # its answer lies past seq_len: dropped, counted
    assert (stats["truncated"], stats["dropped_for_length"], stats["rows_kept"]) == (0, 1, 4)
    path = write_jsonl(tmp_path / "d.jsonl", [*GOOD[:4], early_answer])
    kept = prep(tok, tmp_path, cfg(path))
    assert (kept.stats["truncated"], kept.stats["dropped_for_length"], kept.stats["rows_kept"]) == (1, 0, 5)
    assert max(len(r["input_ids"]) for r in rows(kept.train)) == 64
    dropped = prep(tok, tmp_path, cfg(path, truncation="drop")).stats
    assert (dropped["truncated"], dropped["dropped_for_length"], dropped["rows_kept"]) == (0, 1, 4)


def test_padding_mode_rows_are_single_examples(tok, tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", GOOD)
    data = prep(tok, tmp_path, cfg(path, packing=False))
    assert len(data.train) == 12 and "train_packing_efficiency" not in data.stats
    for r in rows(data.train):
        assert r["position_ids"] == list(range(len(r["input_ids"])))
        assert r["input_ids"][-1] == tok.eos_token_id or r["input_ids"][-2] == tok.eos_token_id


def test_eval_fraction_is_held_out_with_the_split_seed(tok, tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", GOOD)
    c = cfg(path, eval_fraction=0.25, packing=False, split_seed=1)
    # The training seed does not choose the held-out rows; data.split_seed does.
    a, b, other = prep(tok, tmp_path, c), prep(tok, tmp_path, c), prep(tok, tmp_path, {**c, "split_seed": 2})
    assert (len(a.train), len(a.eval)) == (9, 3)
    assert rows(a.eval) == rows(b.eval) and rows(a.eval) != rows(other.eval)
    train_ids = {tuple(r["input_ids"]) for r in rows(a.train)}
    assert not train_ids & {tuple(r["input_ids"]) for r in rows(a.eval)}
    assert len(a.eval_prompts) == 3
    for p in a.eval_prompts:
        (user,) = p["messages"]
        x = int(user["content"].split()[1])
        assert user["role"] == "user" and p["answer"] == str(2 * x)


def test_eval_files_and_prompts_in_file_order(tok, tmp_path):
    train = write_jsonl(tmp_path / "t.jsonl", GOOD)
    multi = {"messages": [*CHAT, {"role": "user", "content": "add 1 1"}, {"role": "assistant", "content": "2"}]}
    ev = write_jsonl(tmp_path / "e.jsonl", [GOOD[5], multi, {"text": "not a chat"}])
    data = prep(tok, tmp_path, cfg(train, eval_files=str(ev)))
    assert data.stats["eval_examples"] == 3 and all(len(r["input_ids"]) == 64 for r in rows(data.eval))
    assert data.eval_prompts == [{"messages": GOOD[5]["messages"][:1], "answer": "10"},
                                 {"messages": multi["messages"][:3], "answer": "2"}]


def test_mixing_by_weight_and_samples(tok, tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", GOOD[:6])
    b = write_jsonl(tmp_path / "b.jsonl", GOOD[6:])
    mix = [{"path": str(a), "weight": 2.5}, {"path": str(b), "samples": 4}]
    data = prep(tok, tmp_path, cfg(mix, packing=False))
    firsts = [r["input_ids"] for r in rows(data.train)]
    assert data.stats["train_examples"] == len(firsts) == 15 + 4
    assert len({tuple(x) for x in firsts[:15]}) == 6 and len({tuple(x) for x in firsts[15:]}) == 4
    with pytest.raises(ConfigError, match="at most one of"):
        prep(tok, tmp_path, cfg([{"path": str(a), "weight": 1, "samples": 2}]))


def test_cache_hit_skips_tokenising_and_misses_on_changes(tok, tmp_path, monkeypatch):
    path = write_jsonl(tmp_path / "t.jsonl", GOOD)
    first = prep(tok, tmp_path, cfg(path))
    assert first.stats["cache_hit"] is False

    def no_tokenising(*a, **k):
        raise AssertionError("tokenised again")

    with monkeypatch.context() as m:
        m.setattr(ExampleBuilder, "__call__", no_tokenising)
        second = prep(tok, tmp_path, cfg(path))
    assert second.stats["cache_hit"] is True and rows(second.train) == rows(first.train)
    assert {k: v for k, v in second.stats.items() if k not in ("cache_hit", "prepare_seconds")} == \
           {k: v for k, v in first.stats.items() if k not in ("cache_hit", "prepare_seconds")}
    assert prep(copy.deepcopy(tok), tmp_path, cfg(path, template="llama3", seq_len=256)).stats["cache_hit"] is False
    write_jsonl(path, GOOD[:-1])
    assert prep(tok, tmp_path, cfg(path)).stats["cache_hit"] is False
    assert prep(tok, tmp_path, cfg(path)).stats["cache_hit"] is True  # the training seed is not in the key
    assert prep(tok, tmp_path, cfg(path, split_seed=3)).stats["cache_hit"] is False


def test_template_choice_is_installed_on_the_tokenizer(tok, tmp_path):
    tok = copy.deepcopy(tok)
    path = write_jsonl(tmp_path / "t.jsonl", GOOD)
    data = prep(tok, tmp_path, cfg(path, template="llama3", seq_len=256))
    assert data.stats["template"] == "llama3" and "<|eot_id|>" in tok.chat_template  # generation uses it too


def test_num_proc_does_not_change_the_result(tok, tmp_path):
    path = resolve("bundled://tiny-tasks/train.jsonl")
    one = prep(tok, tmp_path / "1", cfg(path, seq_len=128))
    two = prep(tok, tmp_path / "2", cfg(path, seq_len=128, num_proc=2))
    assert one.stats["cache_key"] == two.stats["cache_key"]  # num_proc is not part of the key
    assert rows(one.train) == rows(two.train)


def test_other_local_ranks_wait_for_rank_zero(tok, tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", GOOD)
    got = {}
    waiter = threading.Thread(target=lambda: got.update(d=prep(tok, tmp_path, cfg(path), local_rank=1)))
    waiter.start()
    built = prep(tok, tmp_path, cfg(path), local_rank=0)
    waiter.join(timeout=60)
    assert rows(got["d"].train) == rows(built.train) and got["d"].stats["cache_hit"] is True


def test_waiting_rank_sees_rank_zero_fail_or_times_out(tok, tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [BAD["unknown_role"]])
    with pytest.raises(DataError, match="unknown role"):
        prep(tok, tmp_path, cfg(bad))
    with pytest.raises(DataError, match="local rank 0 failed.*unknown role"):
        prep(tok, tmp_path, cfg(bad), local_rank=1)
    good = write_jsonl(tmp_path / "t.jsonl", GOOD)
    with pytest.raises(DataError, match="prepare_timeout_min"):
        prep(tok, tmp_path, cfg(good, prepare_timeout_min=0.001), local_rank=1)


def test_composed_config_and_bundled_data(tok, tmp_path):
    from tests.conftest import compose_config

    c = compose_config(["data.seq_len=256", f"data.cache_dir={tmp_path / 'c'}"])
    data = prepare_data(c.data, tok, log=lambda m: None)
    assert data.stats["train_examples"] == 2000 and data.stats["eval_prompts"] == 200
    assert data.stats["train_packing_efficiency"] >= 0.95
    labels = np.concatenate([np.asarray(r["labels"]) for r in rows(data.train)])
    assert int((labels != IGNORE).sum()) == data.stats["train_trained_tokens"]


def test_bad_settings_raise_config_errors(tok, tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", GOOD)
    with pytest.raises(ConfigError, match="data.train_on"):
        prep(tok, tmp_path, cfg(path, train_on="everything"))
    with pytest.raises(DataError, match="no file matches"):
        prep(tok, tmp_path, cfg(tmp_path / "missing.jsonl"))


def test_hub_datasets_go_through_load_dataset(tok, tmp_path, monkeypatch):
    import datasets

    calls = []
    real = datasets.load_dataset

    def fake(name, *a, **k):
        if name == "org/chat":
            calls.append(k.get("split"))
            return datasets.Dataset.from_list(GOOD)
        return real(name, *a, **k)

    monkeypatch.setattr(datasets, "load_dataset", fake)
    data = prep(tok, tmp_path, cfg(["hub://org/chat:train_sft"]))
    assert calls == ["train_sft"] and data.stats["train_examples"] == 12
