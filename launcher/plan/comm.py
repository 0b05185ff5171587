"""Bytes each GPU moves per optimizer step, the compute beside it, and the step time both allow.

ZeRO-3 (Rajbhandari et al. 2019), per micro-batch: forward all-gathers every partitioned
parameter; backward all-gathers again those that forward released; gradients are
reduce-scattered. Measured on 2 ranks with the comms logger: DeepSpeed releases nothing while
the gathered parameters stay within `stage3_max_live_parameters`, nor a parameter whose next use
comes within `stage3_max_reuse_distance` elements (about half that distance's worth at the turn
from forward to backward); with both small, backward gathers everything again. Activation
checkpointing's recomputed forward adds no gather (measured). Tied embeddings released between
their two uses are gathered twice per pass (measured +7% on the tiny model; not modelled).
After the optimizer step the small persistent parameters are all-gathered. Stage 2
reduce-scatters gradients per micro-batch, stage 1 once per step, and both all-gather the
updated parameters once per step; stage 0 all-reduces gradients once per step.
A mixture of experts moves every expert: ZeRO-3 gathers a MoE block whole (a leaf module,
launcher.moe) whichever experts the tokens reach, and reduce-scatters every expert's gradient,
while its compute counts the active parameters only (a token runs k experts of E).

`message_bytes` follows DeepSpeed's comms logger (`"comms_logger": {"enabled": true}`), which
counts an all-gather by its input (this rank's shard) and a reduce-scatter or all-reduce by its
full tensor; `test_the_plan_predicts_the_bytes_deepspeeds_comms_logger_measures_within_5_percent`
(tests/integration/test_trainer.py) checks ZeRO-3 against it. A ring moves (N-1)/N of each full
tensor in and out of every GPU for an all-gather or reduce-scatter, twice that for an all-reduce.

With sequence parallelism ZeRO's collectives still span every rank (DeepSpeed shards over the
data-parallel x sequence-parallel ranks), and Ulysses adds per layer an `all_to_all_single` of q,
k, v and the attention output and an `all_gather` of the position ids, within the node
(launcher.plan.ulysses): attention waits for them, so their time adds to the step instead of
overlapping compute.
"""

from dataclasses import asdict, dataclass
from typing import Dict, Optional

from launcher.plan import ulysses
from launcher.plan.memory import ZERO_DEFAULTS, element_bytes
from launcher.plan.shape import ModelShape

REUSE_DEFAULT = 1_000_000_000  # DeepSpeed's stage3_max_reuse_distance
LIVE_DEFAULT = 1_000_000_000  # DeepSpeed's stage3_max_live_parameters


@dataclass
class CommEstimate:
    message_bytes: Dict[str, float]  # per optimizer step, per rank, as DeepSpeed's comms logger counts
    bytes_per_gpu: float  # sent (and received) per GPU per optimizer step
    link: str  # the link that carries it: "NVLink/intra-node" or "inter-node network"
    link_gbps: float
    comm_s: float
    compute_s: Optional[float]  # at the device's peak, including recomputation
    step_s: Optional[float]  # the larger of the two: ZeRO overlaps communication with compute at best
    mfu_ceiling: Optional[float]  # model FLOPs over peak FLOPs at that step time
    tokens_per_s: Optional[float]  # whole job
    sp_bytes_per_gpu: float = 0.0  # sequence parallelism's all-to-alls and all-gathers, within the node
    sp_comm_s: float = 0.0  # their time at the intra-node bandwidth, added to the step (not overlapped)

    def to_dict(self) -> Dict:
        return asdict(self)


def full_tensor_bytes(params: int, shape: Optional[ModelShape], zero: Dict, e: int, accum: int) -> Dict[str, float]:
    """Full-tensor bytes of each collective per optimizer step (before the logger's shard convention)."""
    stage = zero.get("stage", 0)
    p = params * e
    if stage == 3:
        threshold = zero.get("stage3_param_persistence_threshold", ZERO_DEFAULTS["stage3_param_persistence_threshold"])
        persistent = shape.persistent_params(threshold) if shape else 0
        partitioned = params - persistent
        live = zero.get("stage3_max_live_parameters", LIVE_DEFAULT)
        kept = min(partitioned, max(zero.get("stage3_max_reuse_distance", REUSE_DEFAULT) / 2, live))
        gathers = partitioned + (partitioned - kept)
        return {"all_gather_into_tensor": (accum * gathers + persistent) * e, "reduce_scatter_tensor": accum * p}
    if stage in (1, 2):
        return {"all_gather_into_tensor": p, "reduce_scatter_tensor": (accum if stage == 2 else 1) * p}
    return {"all_reduce": p}


def flops_per_token(params: int, shape: Optional[ModelShape], seq_len: int, recompute: bool, tiled_mlp: bool = False) -> float:
    """Training FLOPs per token: 6 per parameter the token runs through (a mixture of experts' active
    parameters: its top-k experts, not all) plus causal attention (8 and more with recomputation);
    TiledMLP computes the MLP's forward once more in backward."""
    active = shape.active_params if shape else params
    attention = 6 * shape.layers * shape.q_dim * seq_len if shape else 0  # QK^T and AV, causal half, x3 for backward
    mlp_forward = 2 * shape.active_mlp_params if shape and tiled_mlp else 0
    return (8 if recompute else 6) / 6 * (6 * active + attention) + mlp_forward


def estimate(params: int, shape: Optional[ModelShape], ds_json: Dict, precision: str, world: int, nodes: int,
             tokens_per_step: int, seq_len: int, activation_checkpointing: bool, tflops: Optional[float],
             net_gbps: float, intra_node_gbps: float, sequence_parallel: int = 1, micro_batch_size: int = 1,
             tiled_mlp: bool = False) -> CommEstimate:
    zero = ds_json.get("zero_optimization", {})
    e = element_bytes(precision)
    accum = ds_json.get("gradient_accumulation_steps", 1)
    full = full_tensor_bytes(params, shape, zero, e, accum)
    ring = (world - 1) / world
    per_gpu = ring * sum(b * (2 if op == "all_reduce" else 1) for op, b in full.items())
    messages = {op: (b / world if op == "all_gather_into_tensor" else b) for op, b in full.items()}
    link, gbps = ("inter-node network", net_gbps) if nodes > 1 else ("intra-node", intra_node_gbps)
    comm_s = per_gpu / (gbps / 8 * 1e9) if world > 1 else 0.0
    sp_messages = ulysses.message_bytes(shape, micro_batch_size, seq_len, sequence_parallel, e, activation_checkpointing,
                                        accum) if shape else {}
    messages.update(sp_messages)
    sp_per_gpu = ulysses.traffic_per_gpu(sp_messages, sequence_parallel)
    sp_comm_s = sp_per_gpu / (intra_node_gbps / 8 * 1e9)  # a group never leaves its node
    compute_s = step_s = mfu = tokens_s = None
    if tflops:
        hardware = flops_per_token(params, shape, seq_len, activation_checkpointing, tiled_mlp) * tokens_per_step
        model = flops_per_token(params, shape, seq_len, False) * tokens_per_step
        compute_s = hardware / world / (tflops * 1e12)
        step_s = max(compute_s, comm_s) + sp_comm_s
        mfu = model / world / (tflops * 1e12) / step_s
        tokens_s = tokens_per_step / step_s
    return CommEstimate(messages, per_gpu, link, gbps, comm_s, compute_s, step_s, mfu, tokens_s, sp_per_gpu, sp_comm_s)
