"""Bad data stops `sft` on the login side with a clean error (file, line, fix; exit 2) before anything is
written or started."""

from tests.conftest import run_sft
from tests.unit.test_data_errors import ROWS, jsonl

ALPACA = [{"instruction": f"add {i} {i}", "input": "", "output": str(2 * i)} for i in range(4)]


def sft_fails(tmp_path, *overrides, env=None):
    """Run `sft` as a user would; assert the clean failure: exit 2, an error block, no traceback, nothing written."""
    result = run_sft([*overrides, f"runs_root={tmp_path}/runs"], cwd=tmp_path, env=env)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "error:" in result.stderr
    for noise in ("Traceback", "HYDRA_FULL_ERROR", "Error executing job"):
        assert noise not in result.stderr, result.stderr[-3000:]
    assert not (tmp_path / "runs").exists()
    return " ".join(result.stderr.split())  # rich may wrap long lines


# --- 1. an empty file ----------------------------------------------------------------------------

def test_an_empty_file_is_named_before_anything_starts(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n  \n")
    err = sft_fails(tmp_path, "data=chat", f"data.train_files={empty}", "data.eval_files=null")
    assert f"data.train_files: {empty}: the file is empty (no rows)" in err
    err = sft_fails(tmp_path, "data=chat", f"data.train_files={empty}", "data.eval_files=null", "data.preview=2")
    assert f"{empty}: the file is empty (no rows)" in err


# --- 3. a bad row in error mode ------------------------------------------------------------------

def test_a_bad_row_stops_sft_cleanly_with_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(jsonl(ROWS[:2]) + '{"messages": [{"role": "robot", "content": "hi"}]}\n' + "{not json\n")
    err = sft_fails(tmp_path, "data=chat", f"data.train_files={bad}", "data.eval_files=null")
    assert (f"data.train_files: {bad}, line 3: messages[0] has unknown role 'robot' (valid: system, user, assistant; "
            "ShareGPT human, gpt) [unknown_role]; line 4: invalid JSON at column 2") in err
    assert "(2 bad of 4 rows; fix them, or data.on_bad_row=skip skips and counts them)" in err


def test_a_file_of_only_bad_rows_in_skip_mode_is_refused(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": ""}\n{"messages": []}\n')
    err = sft_fails(tmp_path, "data=chat", f"data.train_files={bad}", "data.eval_files=null", "data.on_bad_row=skip")
    assert "no row can be trained on: every row is bad (data.on_bad_row=skip skipped them all; data.format=auto)" in err


# --- 4. a recipe's pinned format and bundled eval split ------------------------------------------

def test_the_tiny_recipe_with_alpaca_rows_names_both_formats_and_the_eval_split(tmp_path):
    mine = tmp_path / "my_alpaca.jsonl"
    mine.write_text(jsonl(ALPACA))
    err = sft_fails(tmp_path, "recipe=tiny_sft", f"data.train_files={mine}")
    assert (f"{mine}, line 1: missing field 'conversations' (read as data.format=messages; this row looks like "
            "alpaca: set data.format=alpaca or data.format=auto) [missing_field]") in err
    assert ("data.eval_files='bundled://tiny-tasks/eval.jsonl': the recipe's bundled eval split does not belong to "
            "your data.train_files: set data.eval_files=<your eval file>, or data.eval_files=null "
            "data.eval_fraction=0.02 to hold out rows of your own") in err
