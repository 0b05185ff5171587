"""Best-fit-decreasing packing, packed/padded row layout, and collate."""

import numpy as np
import pyarrow as pa
import pytest
from datasets import Dataset

from launcher.data import collate
from launcher.data.masking import IGNORE
from launcher.data.packing import best_fit_decreasing, write_rows


def long_tail(n=3000, seed=0, cap=512):
    rng = np.random.default_rng(seed)
    return np.clip(rng.lognormal(np.log(60), 1.0, n).astype(int), 4, cap)


def test_bins_hold_every_example_once_within_capacity():
    lengths = long_tail()
    bins = best_fit_decreasing(lengths, 512, seed=1)
    flat = sorted(i for b in bins for i in b)
    assert flat == list(range(len(lengths)))
    assert max(lengths[b].sum() for b in bins) <= 512
    assert lengths.sum() / (len(bins) * 512) >= 0.95


def test_packing_is_deterministic_with_the_seed():
    lengths = long_tail()
    assert best_fit_decreasing(lengths, 512, 1) == best_fit_decreasing(lengths, 512, 1)
    assert best_fit_decreasing(lengths, 512, 1) != best_fit_decreasing(lengths, 512, 2)
    with pytest.raises(ValueError, match="does not fit"):
        best_fit_decreasing([3, 9], 8, 0)


@pytest.fixture
def examples():
    ids = [[5, 6, 7], [8, 9], [10, 11, 12, 13], [14]]
    labels = [[IGNORE, 6, 7], [IGNORE, 9], [IGNORE, IGNORE, 12, 13], [IGNORE]]
    return Dataset.from_dict({"input_ids": ids, "labels": labels}), [len(i) for i in ids]


def read(path):
    with pa.memory_map(str(path)) as f:
        return pa.ipc.open_stream(f).read_all().to_pylist()


def test_packed_rows_are_exactly_seq_len_with_positions_restarting(examples, tmp_path):
    ds, lengths = examples
    write_rows(ds, lengths, [[2, 0], [1, 3]], str(tmp_path / "p.arrow"), pad_to=8, pad_id=0)
    rows = read(tmp_path / "p.arrow")
    assert rows[0] == {"input_ids": [10, 11, 12, 13, 5, 6, 7, 0], "labels": [IGNORE, IGNORE, 12, 13, IGNORE, 6, 7, IGNORE],
                       "position_ids": [0, 1, 2, 3, 0, 1, 2, 0]}
    assert rows[1] == {"input_ids": [8, 9, 14, 0, 0, 0, 0, 0], "labels": [IGNORE, 9] + [IGNORE] * 6,
                       "position_ids": [0, 1, 0, 0, 1, 2, 3, 4]}


def test_padding_mode_rows_are_the_examples(examples, tmp_path):
    ds, lengths = examples
    write_rows(ds, lengths, [[i] for i in range(4)], str(tmp_path / "u.arrow"), pad_to=None, pad_id=0)
    rows = read(tmp_path / "u.arrow")
    assert [r["input_ids"] for r in rows] == ds["input_ids"]
    assert [r["labels"] for r in rows] == ds["labels"]
    assert [r["position_ids"] for r in rows] == [list(range(n)) for n in lengths]


def test_rows_are_written_in_chunks(examples, tmp_path, monkeypatch):
    import launcher.data.packing as packing

    ds, lengths = examples
    monkeypatch.setattr(packing, "CHUNK_TOKENS", 3)
    write_rows(ds, lengths, [[0], [1, 3], [2]], str(tmp_path / "c.arrow"), pad_to=5, pad_id=0)
    assert [r["input_ids"] for r in read(tmp_path / "c.arrow")] == [[5, 6, 7, 0, 0], [8, 9, 14, 0, 0], [10, 11, 12, 13, 0]]


def test_collate_packed_has_no_attention_mask():
    row = {"input_ids": [1, 2, 3, 4], "labels": [IGNORE, 2, IGNORE, 4], "position_ids": [0, 1, 0, 1]}
    batch = collate([row, row], pad_id=0)
    assert set(batch) == {"input_ids", "labels", "position_ids", "loss_index", "loss_labels", "trained"}
    assert batch["position_ids"].tolist() == [[0, 1, 0, 1]] * 2
    assert batch["input_ids"].dtype == batch["labels"].dtype == batch["position_ids"].dtype == __import__("torch").long


def test_collate_padded_has_attention_mask_and_ignored_pads():
    a = {"input_ids": [1, 2, 3], "labels": [IGNORE, 2, 3], "position_ids": [0, 1, 2]}
    b = {"input_ids": [4], "labels": [IGNORE], "position_ids": [0]}
    batch = collate([a, b], pad_id=9)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 9, 9]]
    assert batch["labels"].tolist() == [[IGNORE, 2, 3], [IGNORE, IGNORE, IGNORE]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2], [0, 1, 2]]  # padding never restarts at 0


def test_collate_targets_are_the_next_tokens_and_never_cross_examples():
    row = {"input_ids": [1, 2, 3, 4, 5], "labels": [IGNORE, 2, 3, 4, 5], "position_ids": [0, 1, 2, 0, 1]}
    batch = collate([row], pad_id=0)
    # Position t predicts token t+1; token 4 starts an example, so nothing predicts it.
    assert batch["loss_index"].tolist() == [0, 1, 3] and batch["loss_labels"].tolist() == [2, 3, 5]
    assert batch["trained"] == 3


def test_collate_one_row_gives_the_sequence_boundaries_flash_attention_derives():
    """One row per micro-batch, no padding between sequences, and cu_seq_lens equal to what
    transformers computes from position_ids for a packed batch of size 1."""
    import torch
    from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids

    packed = {"input_ids": [1, 2, 3, 4, 0], "labels": [IGNORE, 2, IGNORE, 4, IGNORE], "position_ids": [0, 1, 0, 1, 0]}
    unpacked = {"input_ids": [7, 8, 9], "labels": [IGNORE, 8, 9], "position_ids": [0, 1, 2]}
    batch = collate([packed, unpacked], pad_id=0, one_row=True)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 0, 7, 8, 9]]
    assert batch["position_ids"].tolist() == [[0, 1, 0, 1, 0, 0, 1, 2]]
    assert "attention_mask" not in batch
    assert batch["cu_seq_lens_q"].tolist() == [0, 2, 4, 5, 8] and batch["cu_seq_lens_k"] is batch["cu_seq_lens_q"]
    assert batch["max_length_q"] == batch["max_length_k"] == 3
    (cu_q, cu_k), (max_q, max_k) = prepare_fa_kwargs_from_position_ids(batch["position_ids"])
    assert cu_q.tolist() == batch["cu_seq_lens_q"].tolist() and int(max_q) == batch["max_length_q"]
    # The same targets as the row layout of the same sequences.
    rows = collate([packed, unpacked], pad_id=0)
    assert batch["trained"] == rows["trained"] == 4
    assert batch["loss_labels"].tolist() == rows["loss_labels"].tolist() == [2, 4, 8, 9]
    assert batch["input_ids"].dtype == torch.long and batch["cu_seq_lens_q"].dtype == torch.int32


def test_collate_one_row_pads_its_end_as_a_sequence_of_its_own():
    row = {"input_ids": [1, 2, 3], "labels": [IGNORE, 2, 3], "position_ids": [0, 1, 2]}
    batch = collate([row], pad_id=9, one_row=True, pad_to=6)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 9, 9, 9]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2]]
    assert batch["cu_seq_lens_q"].tolist() == [0, 3, 6] and batch["trained"] == 2
