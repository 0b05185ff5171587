"""Packing examples into rows of exactly seq_len tokens (best-fit decreasing), and writing rows as Arrow.

Inside a packed row position_ids restart at 0 for every example (and for the padding at the
end), which is how transformers isolates packed examples when attention_mask is None.
"""

from bisect import bisect_left, insort
from typing import List, Optional, Sequence

import numpy as np
import pyarrow as pa

from launcher.data.masking import IGNORE

COLUMNS = ("input_ids", "labels", "position_ids")
CHUNK_TOKENS = 1 << 24  # rows are built in slices of about this many tokens to bound memory


def best_fit_decreasing(lengths: Sequence[int], capacity: int, seed: int) -> List[List[int]]:
    """Bins of example indices, each summing to <= capacity, in an order shuffled by the seed.

    Longest first; each goes to the open bin it fills most tightly. Equal lengths are taken in a
    seeded random order, so the result depends only on (lengths, capacity, seed).
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) and lengths.max() > capacity:
        raise ValueError(f"an example of {lengths.max()} tokens does not fit in {capacity}")
    rng = np.random.default_rng(seed)
    order = np.lexsort((rng.permutation(len(lengths)), -lengths))
    bins: List[List[int]] = []
    free: List[int] = []  # sorted distinct free capacities of open bins
    open_bins = {}  # free capacity -> bins with exactly that much room
    for i, n in zip(order.tolist(), lengths[order].tolist()):
        j = bisect_left(free, n)
        if j == len(free):
            b, room = len(bins), capacity - n
            bins.append([i])
        else:
            room0 = free[j]
            b = open_bins[room0].pop()
            if not open_bins[room0]:
                del open_bins[room0], free[j]
            bins[b].append(i)
            room = room0 - n
        if room > 0:
            if room not in open_bins:
                open_bins[room] = []
                insort(free, room)
            open_bins[room].append(b)
    return [bins[k] for k in rng.permutation(len(bins))]


def write_rows(examples, lengths: Sequence[int], groups: Sequence[Sequence[int]], path: str,
               pad_to: Optional[int], pad_id: int) -> None:
    """Write one row per group of example indices (lengths: each example's tokens) to an Arrow stream file.

    pad_to=seq_len: packed rows padded to exactly seq_len (labels IGNORE on padding); None: rows are
    the groups' examples back to back with no padding (the padding mode uses one example per group).
    """
    schema = pa.schema([(c, pa.list_(pa.int32())) for c in COLUMNS])
    table = examples.select_columns(["input_ids", "labels"]).with_format("arrow")
    sizes = np.fromiter((len(g) for g in groups), dtype=np.int64, count=len(groups))
    flat = np.fromiter((i for g in groups for i in g), dtype=np.int64, count=int(sizes.sum()))
    group_tokens = np.bincount(np.repeat(np.arange(len(groups)), sizes),
                               weights=np.asarray(lengths, dtype=np.int64)[flat], minlength=len(groups))
    # Chunk boundaries: about CHUNK_TOKENS tokens of examples per record batch.
    cuts = np.searchsorted(np.cumsum(group_tokens), np.arange(CHUNK_TOKENS, group_tokens.sum(), CHUNK_TOKENS))
    bounds = sorted(set([0, *(int(c) + 1 for c in cuts), len(groups)]))
    with pa.OSFile(path, "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        for a, b in zip(bounds, bounds[1:]):
            if a < b:
                writer.write_batch(_rows(table, groups[a:b], pad_to, pad_id, schema))


def _rows(table, groups, pad_to, pad_id, schema) -> pa.RecordBatch:
    flat = [i for g in groups for i in g]
    part = table[flat]
    ids = part["input_ids"].combine_chunks()
    labels = part["labels"].combine_chunks()
    ex_len = np.diff(ids.offsets.to_numpy())
    ex_row = np.repeat(np.arange(len(groups)), [len(g) for g in groups])
    used = np.bincount(ex_row, weights=ex_len, minlength=len(groups)).astype(np.int64)
    row_len = np.full(len(groups), pad_to, dtype=np.int64) if pad_to else used
    row_start = np.concatenate([[0], np.cumsum(row_len)])
    total_ex = int(ex_len.sum())
    ex_start = np.concatenate([[0], np.cumsum(ex_len)])[:-1]  # in the flat token stream
    used_start = np.concatenate([[0], np.cumsum(used)])[:-1]
    within = np.arange(total_ex) - np.repeat(ex_start, ex_len)  # position inside its example
    dest = np.repeat(row_start[:-1][ex_row] + ex_start - used_start[ex_row], ex_len) + within
    out_ids = np.full(row_start[-1], pad_id, dtype=np.int32)
    out_labels = np.full(row_start[-1], IGNORE, dtype=np.int32)
    # Padding is its own segment: positions restart at 0 after the last example.
    out_pos = (np.arange(row_start[-1]) - np.repeat(row_start[:-1] + used, row_len)).astype(np.int32)
    out_ids[dest] = ids.flatten().to_numpy()
    out_labels[dest] = labels.flatten().to_numpy()
    out_pos[dest] = within
    offsets = pa.array(row_start, pa.int32())
    arrays = [pa.ListArray.from_arrays(offsets, pa.array(a)) for a in (out_ids, out_labels, out_pos)]
    return pa.RecordBatch.from_arrays(arrays, schema=schema)
