"""How a rank's shard of a micro-batch is cut (launcher.sequence_parallel): pure tensor logic."""

import pytest
import torch

from launcher.data.collate import collate
from launcher.sequence_parallel import Layout, block_causal_mask, layout_for, shard


def packed(ids, positions, labels=None):
    return {"input_ids": ids, "labels": labels or ids, "position_ids": positions}


def test_groups_are_consecutive_ranks_and_share_a_data_parallel_rank():
    assert [layout_for(r, 8, 4) for r in (0, 3, 4, 7)] == [
        Layout(4, 0, 2, 0), Layout(4, 3, 2, 0), Layout(4, 0, 2, 1), Layout(4, 3, 2, 1)]
    with pytest.raises(ValueError, match="trainer.sequence_parallel=3 does not divide the 4 ranks"):
        layout_for(0, 4, 3)


def test_the_shards_targets_are_the_whole_rows_targets_cut_where_the_tokens_are():
    # Two rows of two packed examples each; the boundary between the shards falls inside an example,
    # so shard 0's last token predicts shard 1's first.
    rows = [packed([1, 2, 3, 4, 5, 6], [0, 1, 2, 3, 0, 1]), packed([7, 8, 9, 10, 11, 12], [0, 1, 0, 1, 2, 3])]
    whole = collate(rows, pad_id=0)
    whole["rows"] = 2
    parts = [shard(whole, Layout(2, r, 1, 0)) for r in range(2)]
    assert [p["input_ids"].tolist() for p in parts] == [[[1, 2, 3], [7, 8, 9]], [[4, 5, 6], [10, 11, 12]]]
    assert parts[1]["position_ids"].tolist() == [[3, 0, 1], [1, 2, 3]]
    # Row by row, the two shards' targets are the whole row's: 2 3 4 | - 6 -  and  8 - 10 | 11 12 -
    assert parts[0]["loss_labels"].tolist() == [2, 3, 4, 8, 10] and parts[1]["loss_labels"].tolist() == [6, 11, 12]
    assert parts[0]["trained"] + parts[1]["trained"] == whole["trained"] == 8
    assert sorted(parts[0]["loss_labels"].tolist() + parts[1]["loss_labels"].tolist()) == sorted(whole["loss_labels"].tolist())
    assert [p["rows"] for p in parts] == [2, 0]  # rows counted once


def test_padded_rows_are_padded_to_equal_shards_and_lose_their_mask():
    rows = [packed([1, 2, 3], [0, 1, 2]), packed([4, 5, 6, 7, 8], [0, 1, 2, 3, 4])]
    whole = collate(rows, pad_id=0, multiple_of=4)
    assert whole["input_ids"].tolist() == [[1, 2, 3, 0, 0, 0, 0, 0], [4, 5, 6, 7, 8, 0, 0, 0]]
    part = shard(whole, Layout(4, 1, 1, 0))
    assert "attention_mask" not in part and part["input_ids"].tolist() == [[3, 0], [6, 7]]
    assert part["loss_labels"].tolist() == [7, 8]  # row 0's 3 predicts padding: no target
    with pytest.raises(ValueError, match="a row of 5 tokens does not split into 2 equal shards"):
        shard(collate(rows, pad_id=0), Layout(2, 0, 1, 0))


def test_one_row_is_padded_as_a_sequence_of_its_own_and_keeps_the_whole_rows_boundaries():
    whole = collate([packed([1, 2, 3], [0, 1, 2]), packed([4, 5], [0, 1])], pad_id=9, one_row=True, multiple_of=4)
    assert whole["input_ids"].tolist() == [[1, 2, 3, 4, 5, 9, 9, 9]]
    assert whole["cu_seq_lens_q"].tolist() == [0, 3, 5, 8]
    part = shard(whole, Layout(2, 1, 1, 0))
    assert part["input_ids"].tolist() == [[5, 9, 9, 9]] and part["cu_seq_lens_q"] is whole["cu_seq_lens_q"]


def test_the_mask_is_causal_within_each_packed_example():
    mask = block_causal_mask(torch.tensor([[0, 1, 2, 0, 1]]))
    assert mask.shape == (1, 1, 5, 5)
    assert mask[0, 0].int().tolist() == [
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0],
        [0, 0, 0, 1, 0],
        [0, 0, 0, 1, 1],
    ]
    # A row that does not start at position 0 (a continued count) is still one example.
    assert block_causal_mask(torch.tensor([[3, 4, 5]]))[0, 0].all(-1).tolist() == [False, False, True]


def test_generation_gets_every_heads_kv_groups_back_from_ulysses(monkeypatch):
    """Ulysses leaves each attention's KV group count at its head shard's when it replicates KV heads
    (N > KV heads): greedy generation on whole rows must see the model's own again."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from launcher import sequence_parallel

    model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2, vocab_size=100))
    attention = [m for m in model.modules() if hasattr(m, "num_key_value_groups")]
    for module in attention:
        module.num_key_value_groups = 1  # as Ulysses leaves it at N=4: (4 heads / 4) / 1 replicated KV head
    core = ALL_ATTENTION_FUNCTIONS["sdpa"]
    monkeypatch.setattr(sequence_parallel, "_registered", {"attn": "sdpa", "core": core, "ulysses": core})
    with sequence_parallel.whole_rows(model):
        assert len(attention) == 2 and all(m.num_key_value_groups == 2 for m in attention)
