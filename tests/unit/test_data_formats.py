"""Row shapes normalise to one `messages` form; each bad-row case is recognised with its reason."""

import json

import pytest

from launcher.data.errors import BadRow
from launcher.data.formats import normalise, parse_row

CHAT = [{"role": "user", "content": "add 2 3"}, {"role": "assistant", "content": "5"}]


@pytest.mark.parametrize("row", [
    {"messages": CHAT},
    {"conversations": [{"from": "human", "value": "add 2 3"}, {"from": "gpt", "value": "5"}]},
    {"prompt": "add 2 3", "completion": "5"},
    {"prompt": [CHAT[0]], "completion": [CHAT[1]]},  # TRL's conversational prompt/completion
    {"instruction": "add 2 3", "output": "5"},
    {"instruction": "add 2 3", "input": "", "output": "5"},
    {"messages": json.dumps(CHAT)},  # a CSV cell
    {"_jsonl": json.dumps({"messages": CHAT})},  # a JSON line
])
def test_every_shape_gives_the_same_messages(row):
    assert normalise(parse_row(row)) == ("messages", CHAT)


def test_sharegpt_system_and_alpaca_input():
    row = {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "hi"},
                             {"from": "gpt", "value": "hello"}]}
    assert [m["role"] for m in normalise(row)[1]] == ["system", "user", "assistant"]
    _, messages = normalise({"instruction": "Translate.", "input": "chat", "output": "cat"})
    assert messages[0] == {"role": "user", "content": "Translate.\n\nchat"}


def test_text_rows_and_explicit_formats():
    assert normalise({"text": "a document"}) == ("text", "a document")
    assert normalise({"text": "x", "prompt": "p", "completion": "c"}, "text") == ("text", "x")
    with pytest.raises(BadRow) as e:
        normalise({"messages": CHAT}, "alpaca")
    assert e.value.reason == "missing_field" and "instruction" in e.value.detail


@pytest.mark.parametrize("row, reason, words", [
    ({"_jsonl": '{"messages": [oops'}, "invalid_json", "invalid JSON"),
    ({"_jsonl": "[1, 2]"}, "wrong_type", "JSON object"),
    ({"question": "q", "answer": "a"}, "missing_field", "found: answer, question"),
    ({"messages": [{"role": "user"}]}, "missing_field", "messages[0] needs role and content"),
    ({"messages": "not json"}, "wrong_type", "not a JSON list"),
    ({"messages": [{"role": "user", "content": 3}, CHAT[1]]}, "wrong_type", "content must be a string"),
    ({"messages": [{"role": "tool", "content": "x"}, CHAT[1]]}, "unknown_role", "unknown role 'tool'"),
    ({"messages": [CHAT[0], {"role": "assistant", "content": "  "}]}, "empty_content", "messages[1] (assistant)"),
    ({"prompt": "p", "completion": ""}, "empty_content", "'completion' is empty"),
    ({"messages": [CHAT[0]]}, "no_assistant_turn", "no assistant turn"),
])
def test_bad_rows_name_reason_and_problem(row, reason, words):
    with pytest.raises(BadRow) as e:
        normalise(parse_row(row))
    assert e.value.reason == reason
    assert words in e.value.detail
