"""Bad data is named by the login-side check and the pipeline (the clean stop of `sft` itself:
tests/integration/test_data_errors_cli.py); odd but valid files load with the same rows as their plain versions."""

import gzip
import json
import unicodedata

import pandas as pd
import pytest
from transformers import AutoTokenizer

from launcher.bundled import resolve
from launcher.data import DataError, prepare_data
from launcher.data.check import check_files

ROWS = [
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Où est le café ?"},
                  {"role": "assistant", "content": "Ici. 東京 🙂"}]},
    *({"messages": [{"role": "user", "content": f"add {i} {i}"}, {"role": "assistant", "content": str(2 * i)}]}
      for i in range(7)),
]


def jsonl(rows) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(resolve("bundled://tiny-llama"))


def prepared_rows(tok, path, tmp_path, **kw):
    cfg = {**dict(train_files=str(path), eval_files=None, eval_fraction=0.0, format="auto", template=None, seq_len=64,
                  packing=False, train_on="assistant", truncation="truncate", on_bad_row="error", num_proc=1,
                  prepare_timeout_min=1.0), **kw}
    data = prepare_data(cfg, tok, cache_root=str(tmp_path / "cache" / path.name), log=lambda m: None)
    return [data.train[i] for i in range(len(data.train))]


# --- 1. an empty file ----------------------------------------------------------------------------

def test_the_pipeline_names_an_empty_file_too(tok, tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match="empty.jsonl: the file is empty"):
        prepared_rows(tok, tmp_path / "empty.jsonl", tmp_path)


# --- 2. odd but valid files ----------------------------------------------------------------------

def odd_files(tmp_path):
    plain = tmp_path / "plain.jsonl"
    plain.write_text(jsonl(ROWS), encoding="utf-8")
    text = jsonl(ROWS)
    nfd = jsonl([json.loads(unicodedata.normalize("NFD", json.dumps(r, ensure_ascii=False))) for r in ROWS])
    files = {
        "bom.jsonl": b"\xef\xbb\xbf" + text.encode(),
        "crlf.jsonl": text.replace("\n", "\r\n").encode(),
        "bom_crlf.jsonl": b"\xef\xbb\xbf" + text.replace("\n", "\r\n").encode(),
        "blank_lines.jsonl": ("\n" + text.replace("\n", "\n\n  \n")).encode(),
        "array.json": json.dumps(ROWS, ensure_ascii=False, indent=1).encode(),
        "bom_array.json": b"\xef\xbb\xbf" + json.dumps(ROWS, ensure_ascii=False).encode(),
        "nfd.jsonl": nfd.encode(),
        "gzipped.jsonl.gz": gzip.compress(text.encode()),
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    pd.DataFrame({"messages": [json.dumps(r["messages"], ensure_ascii=False) for r in ROWS]}).to_csv(
        tmp_path / "bom.csv", index=False, encoding="utf-8-sig")
    return plain, [tmp_path / n for n in files] + [tmp_path / "bom.csv"]


def test_odd_but_valid_files_give_the_same_rows_as_plain_ones(tok, tmp_path):
    plain, odd = odd_files(tmp_path)
    want = prepared_rows(tok, plain, tmp_path)
    assert len(want) == len(ROWS)
    for path in odd:
        assert check_files("data.train_files", [str(path)], "auto", "error") == ([], len(ROWS)), path.name
        assert prepared_rows(tok, path, tmp_path) == want, path.name
    # A byte-order mark is not a bad row when bad rows are skipped either: nothing is lost.
    assert len(prepared_rows(tok, tmp_path / "bom.jsonl", tmp_path, on_bad_row="skip")) == len(ROWS)


# --- 5. rows dropped for length ------------------------------------------------------------------

def test_rows_dropped_for_length_are_named_with_the_setting_that_keeps_them(tok, tmp_path):
    long_prompt = {"messages": [{"role": "user", "content": "reverse: " + " ".join("abcdefgh" * 4)},
                                {"role": "assistant", "content": "ok"}]}
    path = tmp_path / "t.jsonl"
    path.write_text(jsonl([ROWS[1], ROWS[2], long_prompt]))
    logged = []
    cfg = dict(train_files=str(path), eval_files=None, eval_fraction=0.0, format="auto", template=None, seq_len=32,
               packing=True, train_on="assistant", truncation="truncate", on_bad_row="error", num_proc=1,
               prepare_timeout_min=1.0)
    data = prepare_data(cfg, tok, cache_root=str(tmp_path / "c"), log=logged.append)
    note = (f"data: {path}: 1 row(s) dropped for length (line 3: no trained token in the first data.seq_len=32 "
            "tokens); raise data.seq_len (now 32) so the answer fits after the prompt")
    assert note in logged and data.stats["dropped_for_length"] == 1
    path.write_text(jsonl([long_prompt]))
    with pytest.raises(DataError) as e:
        prepare_data(cfg, tok, cache_root=str(tmp_path / "c"), log=lambda m: None)
    assert "no training example is left" in str(e.value) and "line 1: no trained token in the first" in str(e.value)
    with pytest.raises(DataError) as e:
        prepare_data({**cfg, "truncation": "drop"}, tok, cache_root=str(tmp_path / "c"), log=lambda m: None)
    assert "or data.truncation=truncate to keep their first tokens" in str(e.value)


def test_the_login_check_and_the_pipeline_read_the_same_rows(tok, tmp_path):
    """Where the two readers could differ (an Arrow table's merged keys, pandas' NA strings, a BOM before a
    blank line, a broken .gz), they agree on which rows are usable or both report the file."""
    mixed = [{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]},
             {"messages": [{"role": "user", "content": "add 1 1"}, {"role": "assistant", "content": "2"}]}]
    (tmp_path / "mixed.json").write_text(json.dumps(mixed))
    pd.DataFrame({"instruction": ["say NA", "say None", "add 1 1"], "output": ["NA", "None", "two"]}).to_csv(
        tmp_path / "na.csv", index=False)
    (tmp_path / "bom_blank.jsonl").write_bytes(b"\xef\xbb\xbf\n" + jsonl(ROWS[:3]).encode())
    for name in ("mixed.json", "na.csv", "bom_blank.jsonl"):
        path = tmp_path / name
        problems, usable = check_files("data.train_files", [str(path)], "auto", "skip")
        cfg = dict(train_files=str(path), eval_files=None, eval_fraction=0.0, format="auto", template=None, seq_len=64,
                   packing=False, train_on="assistant", truncation="truncate", on_bad_row="skip", num_proc=1,
                   prepare_timeout_min=1.0)
        stats = prepare_data(cfg, tok, cache_root=str(tmp_path / "c" / name), log=lambda m: None).stats
        assert problems == [] and usable == stats["rows_kept"], (name, usable, stats)
    (tmp_path / "broken.jsonl.gz").write_bytes(gzip.compress(jsonl(ROWS).encode())[:40])
    [problem], _ = check_files("data.train_files", [str(tmp_path / "broken.jsonl.gz")], "auto", "error")
    assert problem.startswith(f"data.train_files: {tmp_path / 'broken.jsonl.gz'}: cannot read it:")
