"""Tests for launcher.bundled: offline tiny Llama, tokenizer, synthetic tasks and bundled:// resolution."""

import json
import math
import os
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"

from launcher.bundled import TASKS_DIR, is_bundled, resolve  # noqa: E402
from launcher.bundled.tasks import generate_examples, main as tasks_main, write_dataset  # noqa: E402


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SFT_CACHE_DIR", str(root))
        mp.setenv("HF_HUB_OFFLINE", "1")
        yield root


@pytest.fixture(scope="module")
def model_dir(cache):
    return resolve("bundled://tiny-llama")


def _user_prompts(path):
    rows = [json.loads(line) for line in Path(path).read_text().splitlines()]
    return rows, {m["content"] for r in rows for m in r["messages"] if m["role"] == "user"}


# --- tasks -------------------------------------------------------------------------------------

def test_dataset_is_byte_deterministic(tmp_path):
    a = write_dataset(tmp_path / "a", seed=0)
    b = write_dataset(tmp_path / "b", seed=0)
    c = write_dataset(tmp_path / "c", seed=1)
    for pa, pb, pc in zip(a, b, c):
        assert pa.read_bytes() == pb.read_bytes()
        assert pa.read_bytes() != pc.read_bytes()
        assert pa.read_bytes().endswith(b"\n") and b"\r" not in pa.read_bytes()


def test_dataset_counts_shape_and_disjoint(tmp_path):
    tasks_main(["--out", str(tmp_path), "--seed", "3"])
    train, train_prompts = _user_prompts(tmp_path / "train.jsonl")
    evl, eval_prompts = _user_prompts(tmp_path / "eval.jsonl")
    assert len(train) >= 2000 and len(evl) >= 200
    assert not (train_prompts & eval_prompts)
    roles = [[m["role"] for m in r["messages"]] for r in train]
    assert any(r[0] == "system" for r in roles)
    assert any(r.count("user") >= 2 for r in roles)
    for r in roles:
        body = r[1:] if r[0] == "system" else r
        assert body == ["user", "assistant"] * (len(body) // 2) and body
    assert all(len(m["content"]) <= 12 for r in train for m in r["messages"] if m["role"] == "assistant")


def test_generate_examples_prefix_stable():
    assert generate_examples(50, seed=7) == generate_examples(200, seed=7)[:50]


# --- resolve / cache ---------------------------------------------------------------------------

def test_resolve_passthrough_and_is_bundled():
    assert resolve("meta-llama/Llama-3.2-1B") == "meta-llama/Llama-3.2-1B"
    assert resolve("/data/x.jsonl") == "/data/x.jsonl"
    assert is_bundled("bundled://tiny-llama") and not is_bundled("tiny-llama") and not is_bundled(None)
    with pytest.raises(ValueError):
        resolve("bundled://nope")


def test_resolve_data_paths(cache):
    train = Path(resolve("bundled://tiny-tasks/train.jsonl"))
    evl = Path(resolve("bundled://tiny-tasks/eval.jsonl"))
    assert train.is_file() and evl.is_file() and train.parent == evl.parent == cache / TASKS_DIR
    assert train.read_bytes() == write_dataset(cache / "check")[0].read_bytes()


def test_resolve_does_not_rebuild(cache, model_dir):
    weights = Path(model_dir) / "model.safetensors"
    before = (weights.stat().st_mtime_ns, Path(model_dir).stat().st_mtime_ns)
    assert resolve("bundled://tiny-llama") == model_dir
    assert (weights.stat().st_mtime_ns, Path(model_dir).stat().st_mtime_ns) == before
    assert not list(cache.glob(".*.tmp-*"))


# --- model + tokenizer -------------------------------------------------------------------------

def test_model_roundtrip(model_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    assert type(model).__name__ == "LlamaForCausalLM"
    n_params = sum(p.numel() for p in model.parameters())  # tied weights counted once
    assert 500_000 <= n_params <= 2_000_000
    assert model.config.tie_word_embeddings
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    assert model.config.vocab_size == len(tok) and 400 <= len(tok) <= 1000
    assert model.generation_config.eos_token_id == tok.eos_token_id == model.config.eos_token_id
    assert model.generation_config.pad_token_id == tok.pad_token_id == model.config.pad_token_id

    msgs = [{"role": "user", "content": "add 1 2"}, {"role": "assistant", "content": "3"}]
    enc = tok.apply_chat_template(msgs, return_dict=True, return_tensors="pt")
    loss = model(input_ids=enc["input_ids"], labels=enc["input_ids"]).loss
    assert torch.isfinite(loss) and abs(loss.item() - math.log(len(tok))) < 1.5  # ~uniform at init


def test_tokenizer_special_tokens_and_chat_template(model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    assert tok.is_fast
    assert tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [0, 1, 2]
    assert (tok.eos_token, tok.pad_token, tok.bos_token) == ("<|im_end|>", "<|endoftext|>", None)

    msgs = [{"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "reverse: a b c"},
            {"role": "assistant", "content": "c b a"}]
    text = tok.apply_chat_template(msgs, tokenize=False)
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                    "<|im_start|>user\nreverse: a b c<|im_end|>\n"
                    "<|im_start|>assistant\nc b a<|im_end|>\n")
    prompt = tok.apply_chat_template(msgs[:2], tokenize=False, add_generation_prompt=True)
    assert prompt == text[: text.index("c b a")]

    enc = tok(text, return_offsets_mapping=True, add_special_tokens=False)
    assert tok.decode(enc["input_ids"]) == text
    pieces = "".join(text[a:b] for a, b in enc["offset_mapping"])
    assert pieces == text  # offsets tile the string exactly
    # Every letter in a reverse task is its own token; digits are split one per token.
    assert tok.tokenize(" a b c") == ["Ġa", "Ġb", "Ġc"]
    assert tok.tokenize("1234") == ["1", "2", "3", "4"]

    masked = tok.apply_chat_template(msgs, return_dict=True, return_assistant_tokens_mask=True)
    answer = [i for i, m in zip(masked["input_ids"], masked["assistant_masks"]) if m]
    assert tok.decode(answer) == "c b a<|im_end|>"
