"""Every row of the data files read on the login side, before ranks start or a job is submitted.

No tokenizer is loaded: this finds what reading alone can (a missing, empty or unreadable file, a
bad row when data.on_bad_row=error, no row with an assistant turn to train on). What needs the
tokens (rows too long for data.seq_len) is found by the pipeline on rank 0 and reported by line.
"""

import functools
import gzip
import json
import os
import zlib
from typing import Any, Dict, Iterator, List, Optional, Tuple

from launcher.data.errors import BadRow, DataError
from launcher.data.files import HUB
from launcher.data.formats import JSONL_COLUMN, normalise, parse_row

MAX_BAD_SHOWN = 3


def check_files(key: str, files: List[str], fmt: str, on_bad_row: str) -> Tuple[List[str], int]:
    """(problems, usable rows) over the files of one data key; each problem names file and line."""
    problems, usable = [], 0
    for path in files:
        if path.startswith(HUB):
            continue  # read at tokenisation time, on a machine that may be online
        st = os.stat(path)
        problem, good = _check_file(path, st.st_mtime_ns, st.st_size, fmt, on_bad_row)
        usable += good
        if problem:
            problems.append(f"{key}: {problem}")
    return problems, usable


@functools.lru_cache(maxsize=256)  # keyed by mtime and size: a sweep reads each file once
def _check_file(path: str, mtime_ns: int, size: int, fmt: str, on_bad_row: str) -> Tuple[Optional[str], int]:
    rows, usable, bad = 0, 0, []
    try:
        for where, raw in read_rows(path):
            rows += 1
            try:
                normalise(parse_row(raw), fmt)
                usable += 1
            except BadRow as e:
                bad.append((where, e))
    except DataError as e:
        return str(e), 0
    if not rows:
        return f"{path}: the file is empty (no rows)", 0
    if bad and on_bad_row == "error":
        shown = "; ".join(f"{where}: {e.detail} [{e.reason}]" for where, e in bad[:MAX_BAD_SHOWN])
        more = f" and {len(bad) - MAX_BAD_SHOWN} more" if len(bad) > MAX_BAD_SHOWN else ""
        return (f"{path}, {shown}{more} ({len(bad)} bad of {rows} rows; fix them, or data.on_bad_row=skip "
                "skips and counts them)"), usable
    return None, usable


def read_rows(path: str) -> Iterator[Tuple[str, Dict[str, Any]]]:
    """(where, raw row) as the pipeline reads them: JSON Lines by line, others by row; UTF-8 with or without BOM."""
    plain = path[:-3] if path.endswith(".gz") else path
    kind = plain.rsplit(".", 1)[-1].lower()
    if kind in ("jsonl", "json"):
        f = _open_text(path)
        try:
            with f:
                if kind == "json" and _starts_an_array(f):
                    try:
                        items = json.load(f)
                    except json.JSONDecodeError as e:
                        raise DataError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
                    for i, item in enumerate(items):
                        yield f"row {i + 1}", {JSONL_COLUMN: json.dumps(item)}
                    return
                for n, line in enumerate(f, 1):  # universal newlines: CRLF lines are lines
                    if line.strip():
                        yield f"line {n}", {JSONL_COLUMN: line.rstrip("\n")}
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start} of a "
                            "block); save it as UTF-8") from None
        except (OSError, EOFError, zlib.error) as e:  # a truncated or mislabelled .gz, an unreadable disk
            raise DataError(f"{path}: cannot read it: {e}") from None
    elif kind == "parquet":
        import pyarrow.parquet

        try:
            batches = pyarrow.parquet.ParquetFile(path).iter_batches(batch_size=4096)
            rows = (row for batch in batches for row in batch.to_pylist())
            for i, row in enumerate(rows):
                yield f"row {i + 1}", row
        except Exception as e:  # noqa: BLE001 - arrow's own message says what is wrong
            raise DataError(f"{path}: cannot read it as parquet: {e}") from None
    elif kind == "csv":
        import pandas as pd

        # As the pipeline reads it (datasets' csv loader is pandas.read_csv with its defaults).
        try:
            frame = pd.read_csv(path, encoding="utf-8-sig")
        except pd.errors.EmptyDataError:
            return  # no rows: reported as an empty file
        except Exception as e:  # noqa: BLE001 - pandas' own message says what is wrong
            raise DataError(f"{path}: cannot read it as csv: {e}") from None
        for i, row in enumerate(frame.astype(object).where(frame.notna(), None).to_dict("records")):
            yield f"row {i + 1}", row
    else:
        raise DataError(f"{path}: unknown file type .{kind}; use .jsonl, .json, .parquet or .csv (optionally .gz)")


def _open_text(path: str):
    try:
        return (gzip.open if path.endswith(".gz") else open)(path, "rt", encoding="utf-8-sig", newline=None)
    except OSError as e:
        raise DataError(f"{path}: cannot read it: {e.strerror}") from None


def _starts_an_array(f) -> bool:
    """Peek at the first non-blank character, then rewind."""
    while chunk := f.read(4096):
        if chunk.strip():
            f.seek(0)
            return chunk.strip()[0] == "["
    f.seek(0)
    return False
