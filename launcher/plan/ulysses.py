"""Sequence parallelism (DeepSpeed Ulysses, `trainer.sequence_parallel=N`): the N a run can use, and
what its all-to-all moves.

Groups of N consecutive ranks (so within a node) share each micro-batch; each rank holds seq_len / N
tokens of every row. In every decoder layer `UlyssesSPAttentionHF`
(deepspeed/runtime/sequence_parallel/ulysses_sp.py) exchanges q, k and v from sequence shards to
head shards (`_combine_local_sequences`) and the attention output back (`_partition_global_sequence`):
four `all_to_all_single` calls, each of the rank's local tensor, [seq_len / N, micro, heads,
head_dim]. K and v go at max(kv_heads, N) heads: with fewer KV heads than N each is repeated
N / kv_heads times before the exchange (`kv_replication_factor`). The comms logger counts an
all-to-all by its input, this local tensor. Backward exchanges each one's gradient (the same size);
activation checkpointing's recomputed forward exchanges all four again. Each attention forward also
all-gathers the position ids (int64, [micro, seq_len / N]) so the kernel sees the whole row's.
"""

import math
from typing import Dict, List, Optional

from launcher.errors import problem
from launcher.plan.shape import ModelShape

KEY = "trainer.sequence_parallel"
POSITION_ID_BYTES = 8  # int64


def heads_allow(n: int, heads: Optional[int], kv_heads: Optional[int]) -> bool:
    """Whether DeepSpeed can split these heads over n ranks (unknown heads: no objection)."""
    if heads is None:
        return True
    kv = kv_heads or heads
    return heads % n == 0 and (kv % n == 0 or n % kv == 0)


def valid_sizes(procs_per_node: int, seq_len: int, heads: Optional[int], kv_heads: Optional[int]) -> List[int]:
    """Every N this run could use: dividing the ranks per node, seq_len and the heads."""
    return [n for n in range(1, max(1, procs_per_node) + 1)
            if procs_per_node % n == 0 and seq_len % n == 0 and heads_allow(n, heads, kv_heads)]


def size_problems(n: int, procs_per_node: int, seq_len: int, heads: Optional[int], kv_heads: Optional[int]) -> List[str]:
    """Why N cannot train this run, one message per broken rule; [] when it can."""
    if n < 1:
        return [problem(KEY, n, "must be >= 1 (1: no sequence parallelism)")]
    if n == 1:
        return []
    valid = f"valid here: {', '.join(map(str, valid_sizes(procs_per_node, seq_len, heads, kv_heads)))}"
    found = []
    if procs_per_node % n:
        found.append(problem(KEY, n, f"must divide the {procs_per_node} ranks per node (cluster.procs_per_node, else "
                                     f"cluster.gpus_per_node) so each group's all-to-all stays within a node; {valid}"))
    if seq_len % n:
        multiple = math.ceil(seq_len / n) * n
        found.append(problem("data.seq_len", seq_len, f"must be a multiple of trainer.sequence_parallel={n}: each rank of "
                                                       f"a group holds seq_len / {n} tokens of every row (e.g. {multiple})"))
    if heads is not None and heads % n:
        found.append(problem(KEY, n, f"must divide the model's {heads} attention heads (num_attention_heads): Ulysses "
                                     f"gives each rank of a group heads / N of them; {valid}"))
    elif heads is not None and not heads_allow(n, heads, kv_heads):
        kv = kv_heads or heads
        found.append(problem(KEY, n, f"and the model's {kv} KV heads (num_key_value_heads) must divide one another: "
                                     f"DeepSpeed splits KV heads over the group, or replicates them when fewer than N, "
                                     f"and {kv} and {n} allow neither; {valid}"))
    return found


def exchanged_kv_heads(shape: ModelShape, n: int) -> int:
    """KV heads each k and v all-to-all carries: replicated up to N when the model has fewer."""
    return max(shape.kv_heads, n)


def message_bytes(shape: ModelShape, micro_batch_size: int, seq_len: int, n: int, e: int,
                  activation_checkpointing: bool, micro_batches: int) -> Dict[str, float]:
    """Bytes per rank per optimizer step of `micro_batches` micro-batches, as DeepSpeed's comms logger
    counts them: {"all_to_all_single": q, k, v and the output, "all_gather": the position ids}."""
    if n <= 1:
        return {}
    local_tokens = micro_batch_size * seq_len // n
    per_layer = local_tokens * shape.head_dim * e * (2 * shape.heads + 2 * exchanged_kv_heads(shape, n))
    forwards = 2 if activation_checkpointing else 1  # the recomputed forward exchanges again
    passes = forwards + 1  # backward exchanges every gradient
    return {"all_to_all_single": float(micro_batches * shape.layers * passes * per_layer),
            "all_gather": float(micro_batches * shape.layers * forwards * local_tokens * POSITION_ID_BYTES)}


def traffic_per_gpu(messages: Dict[str, float], n: int) -> float:
    """Bytes each GPU sends (and receives): an all-to-all keeps 1/N of its input; an all-gather
    of an input of S bytes brings in the other N - 1 ranks' S each."""
    return (n - 1) / n * messages.get("all_to_all_single", 0.0) + (n - 1) * messages.get("all_gather", 0.0) if n > 1 else 0.0
