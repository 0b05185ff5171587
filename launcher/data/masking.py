"""Labels from character spans: a token is trained when any of its characters lies in a trained span.

Offsets come from tokenising the whole rendered conversation once (return_offsets_mapping), so
masks are exact at template boundaries; pieces are never tokenised separately.
"""

from typing import List, Sequence, Tuple

import numpy as np

IGNORE = -100  # the label that the loss skips


def span_labels(input_ids: Sequence[int], offsets: Sequence[Tuple[int, int]],
                spans: Sequence[Tuple[int, int]]) -> List[int]:
    """input_ids where a token overlaps a span, IGNORE elsewhere; the first token is never a target."""
    ids = np.asarray(input_ids, dtype=np.int64)
    trained = np.zeros(len(ids), dtype=bool)
    if len(ids) and spans:
        off = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
        # A zero-width token (some special tokens) counts as the character at its start.
        starts, ends = off[:, 0], np.maximum(off[:, 1], off[:, 0] + 1)
        for s, e in spans:
            trained |= (ends > s) & (starts < e)
    labels = np.where(trained, ids, IGNORE)
    # Nothing predicts position 0; masking it also stops a packed example's first token from being
    # learned from the previous example's last one.
    if len(labels):
        labels[0] = IGNORE
    return labels.tolist()
