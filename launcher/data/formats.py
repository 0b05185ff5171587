"""Reading data files (JSONL, JSON, Parquet, CSV, hub) and normalising every row shape to `messages`.

Row shapes: `messages` (role/content; ShareGPT `conversations` with from/value and human/gpt),
`prompt`/`completion`, alpaca (`instruction`, optional `input`, `output`) and plain `text`.
"""

import json
import unicodedata
from typing import Any, Dict, List, Tuple

from launcher.data.errors import BadRow, DataError
from launcher.data.files import HUB
from launcher.errors import problem
from launcher.schema import DataFormat, one_of
ROLES = {"system": "system", "user": "user", "assistant": "assistant", "human": "user", "gpt": "assistant"}
JSONL_COLUMN = "_jsonl"  # JSON Lines are read as text so a bad line is a bad row with its line number


def load_raw(path: str, scratch: str):
    """(dataset, numbered_by_line): a JSONL file has one `_jsonl` string per line; others their columns."""
    import datasets

    if path.startswith(HUB):
        name, _, split = path[len(HUB):].partition(":")
        return datasets.load_dataset(name, split=split or "train"), False
    plain = path[:-3] if path.endswith(".gz") else path
    kind = plain.rsplit(".", 1)[-1].lower()
    if kind in ("jsonl", "json", "csv") and not _first_char(path):
        raise DataError(f"{path}: the file is empty (no rows)")
    if kind == "json" and _first_char(path) == "[":
        return _load_json_array(path, scratch), False
    if kind in ("jsonl", "json"):
        ds = datasets.load_dataset("text", data_files=path, split="train", cache_dir=scratch)
        return ds.rename_column("text", JSONL_COLUMN), True
    if kind in ("parquet", "csv"):
        return datasets.load_dataset(kind, data_files=path, split="train", cache_dir=scratch), False
    raise DataError(f"{path}: unknown file type .{kind}; use .jsonl, .json, .parquet or .csv")


def _first_char(path: str) -> str:
    import gzip

    with (gzip.open if path.endswith(".gz") else open)(path, "rt", encoding="utf-8-sig") as f:
        while chunk := f.read(4096):
            if chunk.strip():
                return chunk.strip()[0]
    return ""


def _load_json_array(path: str, scratch: str):
    """A JSON array of rows; rows pyarrow cannot unify (mixed types) are kept one JSON string each."""
    import datasets

    try:
        return datasets.load_dataset("json", data_files=path, split="train", cache_dir=scratch)
    except Exception:  # noqa: BLE001 - find the precise problem below
        pass
    import gzip

    with (gzip.open if path.endswith(".gz") else open)(path, "rt", encoding="utf-8-sig") as f:
        try:
            rows = json.load(f)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    return datasets.Dataset.from_dict({JSONL_COLUMN: [json.dumps(r) for r in rows]})


def parse_row(row: Dict[str, Any]) -> Dict[str, Any]:
    """A raw row as a dict: JSON-decoded when it is a JSON line; raises BadRow(invalid_json)."""
    if JSONL_COLUMN not in row:
        return row
    try:
        value = json.loads(row[JSONL_COLUMN].lstrip("\ufeff"))  # a UTF-8 byte-order mark opens line 1
    except json.JSONDecodeError as e:
        raise BadRow("invalid_json", f"invalid JSON at column {e.colno}: {e.msg}") from None
    if not isinstance(value, dict):
        raise BadRow("wrong_type", f"expected a JSON object, got {type(value).__name__}")
    return value


def detect_format(row: Dict[str, Any]) -> str:
    present = {k for k, v in row.items() if v is not None}
    if present & {"messages", "conversations"}:
        return "messages"
    if {"prompt", "completion"} <= present:
        return "prompt_completion"
    if {"instruction", "output"} <= present:
        return "alpaca"
    if "text" in present:
        return "text"
    raise BadRow("missing_field", "no messages, conversations, prompt/completion, instruction/output or text "
                 f"field (found: {', '.join(sorted(present)) or 'nothing'})")


def normalise(row: Dict[str, Any], fmt: str = "auto") -> Tuple[str, Any]:
    """("messages", [{role, content}, ...]) with an assistant turn, or ("text", str); raises BadRow.

    Text is NFC-normalised: the same words typed on another system give the same tokens.
    """
    if fmt == "auto":
        return _normalise(row, detect_format(row))
    try:
        return _normalise(row, fmt)
    except BadRow as bad:
        if bad.reason in ("missing_field", "wrong_type"):
            try:
                looks = detect_format(row)
            except BadRow:
                looks = None
            if looks and looks != fmt:
                raise BadRow(bad.reason, f"{bad.detail} (read as data.format={fmt}; this row looks like "
                                         f"{looks}: set data.format={looks} or data.format=auto)") from None
        raise


def _normalise(row: Dict[str, Any], fmt: str) -> Tuple[str, Any]:
    if fmt == "text":
        return "text", _text(row, "text")
    if fmt == "messages":
        key = "messages" if row.get("messages") is not None else "conversations"
        messages = _messages(row, key)
    elif fmt == "prompt_completion":
        messages = _turns(row, "prompt", "user") + _turns(row, "completion", "assistant")
    elif fmt == "alpaca":
        instruction, extra = _text(row, "instruction"), row.get("input")
        if extra is not None and not isinstance(extra, str):
            raise BadRow("wrong_type", f"field 'input' must be a string, got {type(extra).__name__}")
        user = f"{instruction}\n\n{unicodedata.normalize('NFC', extra)}" if extra and extra.strip() else instruction
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": _text(row, "output")}]
    else:
        raise DataError(problem("data.format", fmt, one_of(DataFormat)))
    if not any(m["role"] == "assistant" for m in messages):
        raise BadRow("no_assistant_turn", "the conversation has no assistant turn")
    return "messages", messages


def _text(row: Dict[str, Any], key: str) -> str:
    value = row.get(key)
    if value is None:
        raise BadRow("missing_field", f"missing field {key!r}")
    if not isinstance(value, str):
        raise BadRow("wrong_type", f"field {key!r} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise BadRow("empty_content", f"field {key!r} is empty")
    return unicodedata.normalize("NFC", value)


def _turns(row: Dict[str, Any], key: str, role: str) -> List[Dict[str, str]]:
    # TRL's conversational prompt/completion: lists of messages instead of strings.
    if isinstance(row.get(key), list):
        return _messages(row, key)
    return [{"role": role, "content": _text(row, key)}]


def _messages(row: Dict[str, Any], key: str) -> List[Dict[str, str]]:
    value = row.get(key)
    if isinstance(value, str):  # CSV cells hold conversations as JSON text
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise BadRow("wrong_type", f"field {key!r} is a string that is not a JSON list of messages") from None
    if value is None:
        raise BadRow("missing_field", f"missing field {key!r}")
    if not isinstance(value, list) or not value:
        raise BadRow("wrong_type", f"field {key!r} must be a non-empty list of messages")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise BadRow("wrong_type", f"{key}[{i}] must be an object with role and content")
        # A key holding None is absent: a JSON array read as one Arrow table gives every message
        # every key of every other message (ShareGPT's from/value next to role/content).
        role = m.get("role") if m.get("role") is not None else m.get("from")
        content = m.get("content") if m.get("content") is not None else m.get("value")
        if role is None or content is None and "content" not in m and "value" not in m:
            raise BadRow("missing_field", f"{key}[{i}] needs role and content (or ShareGPT from and value)")
        if not isinstance(role, str) or role.lower() not in ROLES:
            raise BadRow("unknown_role", f"{key}[{i}] has unknown role {role!r} "
                         "(valid: system, user, assistant; ShareGPT human, gpt)")
        if not isinstance(content, str):
            raise BadRow("wrong_type", f"{key}[{i}] content must be a string, got {type(content).__name__}")
        if not content.strip():
            raise BadRow("empty_content", f"{key}[{i}] ({ROLES[role.lower()]}) has empty content")
        out.append({"role": ROLES[role.lower()], "content": unicodedata.normalize("NFC", content)})
    return out
