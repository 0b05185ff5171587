"""Labels from character spans: a token is trained when any of its characters lies in a trained span.

Offsets come from tokenising the whole rendered conversation once (return_offsets_mapping), so
masks are exact at template boundaries; pieces are never tokenised separately.
"""

from bisect import bisect_left, bisect_right
from typing import List, Sequence, Tuple

IGNORE = -100  # the label that the loss skips


def span_labels(input_ids: Sequence[int], offsets: Sequence[Tuple[int, int]],
                spans: Sequence[Tuple[int, int]]) -> Tuple[List[int], int]:
    """(labels, trained count): input_ids where a token overlaps a span, IGNORE elsewhere.

    The first token is never a target: nothing predicts it, and in a packed row it must not be
    learned from the previous example's last token.
    """
    labels = [IGNORE] * len(input_ids)
    starts = [s for s, _ in offsets]
    # A zero-width token (some special tokens) counts as the character at its start.
    ends = [e if e > s else s + 1 for s, e in offsets]
    for s, e in spans:
        # Offsets are in order, so the overlapping tokens are one contiguous range.
        first, last = max(bisect_right(ends, s), 1), bisect_left(starts, e)
        if first < last:
            labels[first:last] = input_ids[first:last]
    return labels, len(labels) - labels.count(IGNORE)
