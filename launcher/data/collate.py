"""Rows -> one micro-batch of CPU tensors, with its next-token targets, in the layout the attention kernel needs.

Two layouts:
- rows (sdpa, eager): one row per sequence. Packed rows (all seq_len long) need no padding and get no
  attention_mask: position_ids restarting per example make transformers build a block-diagonal
  causal mask. Rows of different lengths are padded and get an attention_mask.
- one row (flash_attention_2, flex_attention): every sequence of the micro-batch back to back in a
  single row, no padding between them, with the sequence boundaries given explicitly
  (cu_seq_lens_q/k, max_length_q/k, transformers' varlen arguments). flash_attention_2 infers
  packed sequences from position_ids only when the batch size is 1, and then so does nothing else.
  A row can be padded at its end to a fixed length (pad_to) so compiled kernels see one shape.

Targets are computed here, on the CPU: the positions that have a loss and their labels, so the
trainer counts trained tokens without reading anything back from the GPU.
"""

from typing import Dict, List, Optional

from launcher.data.masking import IGNORE


def collate(rows: List[dict], pad_id: int, one_row: bool = False, pad_to: Optional[int] = None, multiple_of: int = 1) -> Dict:
    """input_ids, labels, position_ids (attention_mask when rows were padded; varlen arguments with one_row),
    loss_index/loss_labels (flat positions of the logits that have a loss, and their labels) and
    trained (their count, an int). multiple_of: rows (one_row: the row) padded to a multiple of it
    (sequence parallelism splits each row into equal shards)."""

    if one_row:
        tokens = max(pad_to or 0, sum(len(r["input_ids"]) for r in rows))
        batch = _one_row(rows, pad_id, -(-tokens // multiple_of) * multiple_of)
    else:
        batch = _rows(rows, pad_id, multiple_of)
    batch.update(loss_targets(next_token_targets(batch["labels"], batch["position_ids"])))
    return batch


def next_token_targets(labels, position_ids):
    """What each position predicts: the next token's label, IGNORE where the next token starts a packed
    example (it is no target of the one before) and at the last position (it predicts nothing).
    Same shape as the row, so a slice of its columns is the targets of that slice of the sequence."""
    targets = labels.roll(-1, dims=1)
    targets[:, -1] = IGNORE
    targets[:, :-1][position_ids[:, 1:] == 0] = IGNORE
    return targets


def loss_targets(targets) -> Dict:
    """loss_index/loss_labels (flat positions of the (rows x tokens) grid that have a loss, and their
    labels) and trained (their count)."""
    flat = targets.reshape(-1)
    index = (flat != IGNORE).nonzero().view(-1)
    return {"loss_index": index, "loss_labels": flat[index], "trained": int(index.numel())}


def _rows(rows: List[dict], pad_id: int, multiple_of: int = 1) -> Dict:
    import torch

    lengths = [len(r["input_ids"]) for r in rows]
    width = -(-max(lengths) // multiple_of) * multiple_of
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    # Padding continues the count (it never restarts at 0), so it cannot look like a packed example.
    position_ids = torch.arange(width, dtype=torch.long).repeat(len(rows), 1)
    for i, (row, n) in enumerate(zip(rows, lengths)):
        input_ids[i, :n] = torch.as_tensor(row["input_ids"], dtype=torch.long)
        labels[i, :n] = torch.as_tensor(row["labels"], dtype=torch.long)
        position_ids[i, :n] = torch.as_tensor(row["position_ids"], dtype=torch.long)
    batch = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}
    if min(lengths) != width:
        batch["attention_mask"] = (torch.arange(width) < torch.tensor(lengths)[:, None]).long()
    return batch


def _one_row(rows: List[dict], pad_id: int, pad_to: Optional[int]) -> Dict:
    import torch

    ids = [t for r in rows for t in r["input_ids"]]
    labels = [t for r in rows for t in r["labels"]]
    positions = [t for r in rows for t in r["position_ids"]]
    if pad_to is not None and len(ids) < pad_to:
        # The padding is sequences of their own, nothing trained, none longer than the row's longest
        # (positions stay within what the model was given).
        n = pad_to - len(ids)
        piece = max(len(r["input_ids"]) for r in rows)
        ids, labels, positions = ids + [pad_id] * n, labels + [IGNORE] * n, positions + [i % piece for i in range(n)]
    position_ids = torch.tensor([positions], dtype=torch.long)
    starts = (position_ids[0] == 0).nonzero().view(-1).tolist()
    if not starts or starts[0] != 0:
        raise ValueError("a row's position_ids must start at 0")
    bounds = [*starts, len(positions)]
    cu_seq_lens = torch.tensor(bounds, dtype=torch.int32)
    longest = max(b - a for a, b in zip(bounds, bounds[1:]))
    return {
        "input_ids": torch.tensor([ids], dtype=torch.long),
        "labels": torch.tensor([labels], dtype=torch.long),
        "position_ids": position_ids,
        "cu_seq_lens_q": cu_seq_lens, "cu_seq_lens_k": cu_seq_lens,
        "max_length_q": longest, "max_length_k": longest,
    }
