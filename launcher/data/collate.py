"""Rows -> a batch of tensors: padded batches get an attention_mask, packed (equal-length) ones do not."""

from typing import TYPE_CHECKING, Dict, List

from launcher.data.masking import IGNORE

if TYPE_CHECKING:
    import torch


def collate(rows: List[dict], pad_id: int) -> Dict[str, "torch.Tensor"]:
    """input_ids, labels (IGNORE on padding), position_ids, and attention_mask only when rows were padded.

    Packed rows are all seq_len long, so they need no padding and get no attention_mask: with
    position_ids restarting per example and no mask, transformers keeps examples apart.
    """
    import torch  # here, not at the top: the login node imports this package to check data files

    lengths = [len(r["input_ids"]) for r in rows]
    width = max(lengths)
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
