"""Peak memory per GPU, by part: model states, ZeRO working buffers, activations, the loss's logits.

Model states follow DeepSpeed's own estimators (`estimate_zero3_model_states_mem_needs`,
`estimate_zero2_model_states_mem_needs`): 18 bytes per parameter sharded over the ranks (16-bit
params and grads, fp32 master weights and Adam moments, and DeepSpeed's fp32 gradient allowance)
plus the largest layer gathered whole with its gradient. Buffers come from the DeepSpeed JSON.

Activations count what autograd saves in one decoder layer of the transformers implementation
(Korthikanti et al. 2022 derive the same terms for GPT; here for RMSNorm, rotary attention with
grouped KV heads and a gated MLP, no dropout), per token, for the attention kernel:
  each RMSNorm: its fp32 input 4h, the normalised and the weighted output 2eh
  q/k norms:    (qwen3, olmoe) the fp32 input and the normalised output of each, over q and k:
                (4 + e)(q + kv) (the weighted output goes to the rotary embedding, which keeps only cos, sin)
  attention:    rotated q, k, v, the kernel's output and o_proj's input e(3q + 2kv), the
                softmax statistics 4 bytes per head; eager adds the fp32 probabilities (and their
                16-bit copy) per head and key; eager, and sdpa with a mask (packed rows), repeat k
                and v to all heads; flash_attention_2 and flex_attention take one row per
                micro-batch with its sequence boundaries and build no mask
  sdpa's mask:  packed rows give sdpa a boolean (seq x seq) mask per row, which sdpa converts to
                the compute dtype and saves, in every layer: L e seq^2 per row without
                checkpointing; with it the boolean is kept (an input of every layer) and a
                recomputed layer adds its copy
  gated MLP:    gate, up, silu(gate) and the product 4eI
With activation checkpointing each layer keeps only its input (eh per token). Backward then adds
the larger of two transients: the loss's logits, or, with checkpointing, one layer's recomputed
activations. The loss's logits (launcher.loss) are, per token and vocabulary entry, the fp32
log-softmax output and its gradient, the 16-bit gradient when the model is 16-bit, and the
slice's gradient buffer: (8 + e) or (8 + 2e) bytes, for every token with trainer.loss=full (held
from the forward on), for one chunk of trained tokens with chunked (plus the output weight's gradient, summed over
the chunks in a buffer of its own); Liger's fused kernel holds
the weight's gradient and logits of about tokens x hidden / vocabulary positions at a time.
Measured against torch's profiler on CPU: tests/unit/test_plan_memory.py.

Sequence parallelism (trainer.sequence_parallel=N, launcher.plan.ulysses) gives each rank seq_len / N
tokens of every row: layers, their checkpointed inputs, the final norm and the loss's logits count
those. Inside attention the rank holds the whole row for heads / N heads: the kernel's q, k, v and
output after the all-to-all, as many elements per local token as q, k, v and the output at N=1 (the
local q, k, v before the exchange are saved by nothing and freed), except that k and v carry
max(kv_heads, N) heads (DeepSpeed replicates KV heads when fewer than N); the softmax statistics
likewise. sdpa's mask stays whole-row (seq x seq) per row; Ulysses drops transformers' mask, so
each layer builds its own from the gathered position ids (launcher.sequence_parallel): with
checkpointing none is kept, and a recomputed layer holds the boolean and sdpa's copy.
TiledMLP (trainer.tiled_mlp, DeepSpeed's `TiledMLP`) saves only its input (the norm's output,
counted) and computes the MLP without autograd; backward recomputes it slice by slice, holding one
slice's intermediates: 1/shards of them, shards = ceil(local sequence / hidden), DeepSpeed's default.

Mixture of experts (launcher.plan.shape, launcher.moe): model states count every parameter, all
experts included, and the gathered layer is a whole MoE block (a ZeRO-3 leaf: its experts, router
and shared expert at once), when larger than the embedding. A prefetch adds tensors until it passes
`stage3_prefetch_bucket_size`, so one that reaches a MoE block takes an expert tensor whole on top
of the bucket. A MoE layer saves, per token (transformers' grouped_mm experts, as eager's loop):
  router:       its fp32 probabilities 4E, the top-k weights (fp32) and indices (int64) 12k
  each of the k experts the token is sent to: its copy of the input and the weighted output 2eh,
                the gated MLP's 4eI (I the expert's width), the routing weight e and three
                int64 indices (the sort's, its inverse's, the gather's) 24
  shared expert (qwen2_moe): its gated MLP 4eI_s, its output eh (the sigmoid gate multiplies it)
The load-balancing loss (launcher.moe) keeps, from the forward to its backward and with
checkpointing too, the softmax of every MoE layer's router logits in fp32: 4E per token and layer.
"""

import math
from dataclasses import dataclass, field, replace
from typing import Dict, List, Optional, Sequence, Tuple

from launcher.plan.shape import ModelShape

GIB = 2**30
TRANSIENT = "backward transient (the larger)"
ZERO_DEFAULTS = {"stage3_prefetch_bucket_size": 50_000_000, "reduce_bucket_size": 500_000_000,
                 "stage3_param_persistence_threshold": 100_000, "sub_group_size": 1_000_000_000}


def element_bytes(precision: str) -> int:
    return 4 if precision == "fp32" else 2


@dataclass
class Workload:
    """What one rank computes per micro-batch."""

    micro_batch_size: int
    seq_len: int
    precision: str
    activation_checkpointing: bool
    attn_implementation: str  # resolved: never auto
    packing: bool
    loss: str = "full"
    loss_chunk_tokens: int = 1024
    sequence_parallel: int = 1  # ranks sharing each row (launcher.plan.ulysses)
    tiled_mlp: bool = False

    @property
    def local_seq_len(self) -> int:
        """Tokens of each row on this rank."""
        return self.seq_len // self.sequence_parallel

    @property
    def tokens(self) -> int:
        """Tokens of the micro-batch on this rank."""
        return self.micro_batch_size * self.local_seq_len


def model_states_bytes(params: int, largest_layer: int, stage: int, world: int, nodes: int,
                       offload_optimizer: bool, offload_param: bool, e: int = 2) -> Dict[str, float]:
    """Per-GPU model states and per-node CPU memory for offload, as DeepSpeed's estimators count them.

    For 16-bit training (e=2) the parts sum to DeepSpeed's `gpu_mem` and `cpu_per_node` is its
    `cpu_mem` (with its 1.5x buffer factor) when something is offloaded. In fp32 the same 18 bytes
    split as params 4, grads 4 and Adam's moments 8 (the params are the master weights).
    """
    bits = "16-bit" if e == 2 else "fp32"
    optimizer = ("optimizer (fp32 master, Adam m, v)", 12) if e == 2 else ("optimizer (Adam m, v)", 8)
    largest = 2 * e * largest_layer  # the largest layer gathered whole, with its gradient
    if stage == 3:
        shard = {f"params ({bits} shard)": e * params / world, f"grads ({bits} shard)": e * params / world,
                 f"{optimizer[0]} shard": optimizer[1] * params / world, "fp32 grad allowance (shard)": 2 * params / world}
        if offload_param and offload_optimizer:  # everything but the gathered layer lives in CPU memory
            return {"largest layer (gathered)": largest, "cpu_per_node": params * 18 / nodes * 1.5}
        if offload_param:  # the params' shards only
            shard.pop(f"params ({bits} shard)")
            return {"largest layer (gathered)": largest, **shard, "cpu_per_node": e * params / nodes * 1.5}
        if offload_optimizer:
            return {"largest layer (gathered)": largest, f"params ({bits} shard)": e * params / world,
                    "cpu_per_node": params * 16 / nodes * 1.5}
        return {"largest layer (gathered)": largest, **shard, "cpu_per_node": 0.0}
    whole = {f"params ({bits}, whole)": e * params}
    grads_shard = world if stage == 2 else 1  # stage 2 shards gradients; 0 and 1 keep them whole
    opt_shard = world if stage >= 1 else 1
    if offload_optimizer:
        cpu = params * max(4 * world, 16) * 1.5 if stage == 2 else (optimizer[1] + 4) * params * (world // nodes) / opt_shard * 1.5
        return {**whole, **({} if stage == 2 else {f"grads ({bits}, whole)": e * params}), "cpu_per_node": cpu}
    grads = {f"grads ({bits}{' shard' if stage == 2 else ', whole'}) and fp32 copy": (e + (4 if e == 2 else 0)) * params / grads_shard}
    return {**whole, **grads, f"{optimizer[0]}{' shard' if opt_shard > 1 else ''}": optimizer[1] * params / opt_shard, "cpu_per_node": 0.0}


def zero_buffers_bytes(zero: Dict, e: int, shape: Optional[ModelShape], params: int) -> Dict[str, float]:
    """DeepSpeed's working buffers, from the JSON's zero_optimization section (its defaults where unset)."""
    get = lambda key: zero.get(key, ZERO_DEFAULTS[key])  # noqa: E731
    if zero.get("stage", 0) == 3:
        # The reduce bucket is allocated whole; prefetching gathers at most the model ahead.
        prefetch = get("stage3_prefetch_bucket_size") + (shape.largest_expert_tensor if shape is not None else 0)
        parts = {"prefetch bucket": e * min(prefetch, params), "reduce bucket": e * get("reduce_bucket_size")}
        if shape is not None:  # small tensors (norms, biases) stay whole on every rank, with their grads
            parts["persistent params"] = 2 * e * shape.persistent_params(get("stage3_param_persistence_threshold"))
        return parts
    if zero.get("stage", 0) in (1, 2):
        # Two reduce buckets when communication overlaps compute; params are gathered in place.
        return {"reduce buckets": e * get("reduce_bucket_size") * (2 if zero.get("overlap_comm") else 1)}
    return {}


def layer_kinds(shape: ModelShape) -> List[Tuple[int, bool]]:
    """(how many, MoE or not) of the model's decoder layers, for each kind it has."""
    return [(n, moe) for n, moe in ((shape.dense_layers, False), (shape.moe_layers, True)) if n]


def layer_activation_bytes_per_token(shape: ModelShape, work: Workload, moe: bool = False) -> float:
    """Bytes autograd saves per (local) token in one decoder layer (a MoE layer with moe=True) without
    checkpointing (module docstring)."""
    e, h, q = element_bytes(work.precision), shape.hidden, shape.q_dim
    norm = 4 * h + 2 * e * h
    kernel = work.attn_implementation
    masked = work.packing and kernel == "sdpa"  # packed rows give sdpa a 4D mask: k and v are repeated
    kv = max(shape.kv_heads, work.sequence_parallel) * shape.head_dim  # Ulysses replicates KV heads up to N
    k_v = 2 * (q if masked or kernel == "eager" else kv)  # flash and flex attend grouped heads as they are
    attention = e * (3 * q + k_v) + 4 * shape.heads
    if shape.q_norm:  # q and k normalised (qwen3, olmoe): their fp32 inputs and normalised copies
        attention += (4 + e) * (q + shape.kv_dim)
    if kernel == "eager":  # softmax in fp32, cast back for the matmul (no copy when training in fp32)
        attention += (4 + (e if e < 4 else 0)) * shape.heads * work.seq_len
    mlp = 0 if work.tiled_mlp else mlp_bytes_per_token(shape, work, moe)  # TiledMLP saves only its input
    return 2 * norm + attention + mlp


def mlp_bytes_per_token(shape: ModelShape, work: Workload, moe: bool = False) -> float:
    """The gated MLP's intermediates: gate, up, silu(gate) and their product; in a MoE layer, the
    router's and those of the k experts a token runs (and of the shared expert) (module docstring)."""
    e = element_bytes(work.precision)
    if not moe:
        return 4 * e * shape.intermediate
    router = 4 * shape.experts + 12 * shape.top_k
    expert = 2 * e * shape.hidden + 4 * e * shape.moe_intermediate + e + 24
    shared = e * (4 * shape.shared_intermediate + shape.hidden) if shape.shared_expert else 0
    return router + shape.top_k * expert + shared


def largest_mlp_bytes_per_token(shape: ModelShape, work: Workload) -> float:
    return max(mlp_bytes_per_token(shape, work, moe) for _, moe in layer_kinds(shape))


def tiled_mlp_shards(shape: ModelShape, work: Workload) -> int:
    """Slices DeepSpeed's TiledMLP computes the MLP in: ceil(local sequence / hidden size)."""
    return max(1, math.ceil(work.local_seq_len / shape.hidden))


def tiled_mlp_slice_bytes(shape: ModelShape, work: Workload) -> float:
    """One slice's MLP intermediates, recomputed in backward (trainer.tiled_mlp)."""
    return largest_mlp_bytes_per_token(shape, work) * work.tokens / tiled_mlp_shards(shape, work)


def activation_bytes(shape: ModelShape, work: Workload) -> Dict[str, float]:
    """Activations of one micro-batch saved for backward, by part."""
    e, t = element_bytes(work.precision), work.tokens
    parts: Dict[str, float] = {}
    if work.activation_checkpointing:
        parts[f"{shape.layers} layer inputs (checkpointed)"] = shape.layers * e * shape.hidden * t
    elif not shape.moe:
        parts[f"{shape.layers} layers"] = shape.layers * layer_activation_bytes_per_token(shape, work) * t
    else:
        for n, moe in layer_kinds(shape):
            name = f"{n} MoE layers ({shape.top_k} of {shape.experts} experts per token)" if moe else f"{n} dense layers"
            parts[name] = n * layer_activation_bytes_per_token(shape, work, moe) * t
    if shape.moe:  # held outside the layers: checkpointing does not drop it
        parts[f"router probabilities for the load-balancing loss (fp32, {shape.moe_layers} layers)"] = \
            shape.moe_layers * 4 * shape.experts * t
    parts["final norm"] = (4 * shape.hidden + 2 * e * shape.hidden) * t
    mask = packed_mask_bytes(work)
    if mask and not work.activation_checkpointing:
        parts[f"attention masks (packed rows): sdpa's {work.precision} copy in each of {shape.layers} layers"] = shape.layers * e * mask
    elif mask and work.sequence_parallel == 1:
        parts["attention mask (packed rows)"] = mask  # transformers' one mask, an input of every checkpointed layer
    return parts


def packed_mask_bytes(work: Workload) -> float:
    """The boolean whole-row (seq x seq) mask sdpa keeps packed examples apart with, for every row of the
    micro-batch (also with sequence parallelism: attention sees the whole row); other kernels need none."""
    return work.micro_batch_size * work.seq_len**2 if work.packing and work.attn_implementation == "sdpa" else 0.0


def recomputed_mask_bytes(work: Workload) -> float:
    """What a recomputed layer adds for its mask: sdpa's copy in the compute dtype, and with sequence
    parallelism the boolean itself (built inside each layer from the gathered position ids)."""
    mask = packed_mask_bytes(work)
    return mask * element_bytes(work.precision) + (mask if work.sequence_parallel > 1 else 0.0)


def backward_transients(shape: ModelShape, work: Workload) -> Dict[str, float]:
    """What backward adds on top of the saved activations; the peak holds the larger (module docstring)."""
    e = element_bytes(work.precision)
    per_position = (8 + e + (e if e < 4 else 0)) * shape.vocab
    if work.loss == "full":
        parts = {"loss logits (full vocabulary)": per_position * work.tokens}
    elif work.loss == "chunked":
        # Autograd sums the output weight's gradient over the chunks in a buffer of its own.
        parts = {f"loss logits (chunks of {work.loss_chunk_tokens} tokens) and the weight's gradient sum":
                 per_position * min(work.loss_chunk_tokens, work.tokens) + e * shape.vocab * shape.hidden}
    else:  # liger: the weight's gradient, the input's gradient and its chunk's fp32 logits
        parts = {"fused loss (weight gradient and a chunk)": e * shape.vocab * shape.hidden + (e + 4) * work.tokens * shape.hidden}
    slice_ = tiled_mlp_slice_bytes(shape, work) if work.tiled_mlp else 0.0
    exchange = exchange_bytes(shape, work)
    if work.activation_checkpointing:
        layer = max(layer_activation_bytes_per_token(shape, work, moe) for _, moe in layer_kinds(shape))
        parts["one layer recomputed"] = (layer * work.tokens + slice_
                                         + recomputed_mask_bytes(work) + exchange)
    elif work.tiled_mlp:
        parts[f"tiled MLP: one of {tiled_mlp_shards(shape, work)} slices recomputed"] = slice_
    if exchange and not work.activation_checkpointing:
        parts["sequence-parallel exchange (one layer's backward)"] = exchange
    return parts


def exchange_bytes(shape: ModelShape, work: Workload) -> float:
    """Ulysses' all-to-all in one layer's backward: the input and the output of each exchanged gradient
    (q, k, v, the attention output; k and v at the exchanged KV heads) held at once (measured with
    torch's profiler on CPU, tests/integration/test_sequence_parallel.py). None without SP."""
    if work.sequence_parallel == 1:
        return 0.0
    kv = max(shape.kv_heads, work.sequence_parallel) * shape.head_dim
    return 2 * element_bytes(work.precision) * (2 * shape.q_dim + 2 * kv) * work.tokens


@dataclass
class MemoryEstimate:
    parts_gib: Dict[str, Dict[str, float]]  # group -> part -> GiB per GPU
    group_gib: Dict[str, float]  # group -> what it adds to the peak (the transient group: its larger part)
    peak_gib: float  # per GPU, at the start of backward or in the optimizer step, whichever is larger
    step_peak_gib: float  # in the optimizer step (activations freed; fp32 grads of one sub-group)
    cpu_per_node_gib: float  # offloaded model states, per node
    gpu_mem_gib: Optional[float] = None  # the budget it is checked against, when known
    fits: Optional[bool] = None
    advice: List[str] = field(default_factory=list)  # what would make it fit

    def to_dict(self) -> Dict:
        return dict(self.__dict__)


def estimate(shape: Optional[ModelShape], params: Optional[int], work: Workload, ds_json: Dict,
             world: int, nodes: int) -> Optional[MemoryEstimate]:
    """Peak memory per GPU; None when the parameter count is unknown."""
    if params is None:
        return None
    zero = ds_json.get("zero_optimization", {})
    stage = zero.get("stage", 0)
    offload_opt = zero.get("offload_optimizer", {}).get("device", "none") != "none"
    offload_par = zero.get("offload_param", {}).get("device", "none") != "none"
    largest = shape.largest_layer_params if shape else 0
    e = element_bytes(work.precision)
    states = model_states_bytes(params, largest, stage, world, nodes, offload_opt, offload_par, e)
    cpu = states.pop("cpu_per_node")
    groups: Dict[str, Dict[str, float]] = {"model states": states, "ZeRO buffers": zero_buffers_bytes(zero, e, shape, params)}
    if shape is not None:
        groups["activations"] = activation_bytes(shape, work)
        groups[TRANSIENT] = backward_transients(shape, work)
    adds = {g: (max if g == TRANSIENT else sum)(parts.values()) for g, parts in groups.items()}
    total = lambda names: sum(adds[n] for n in names if n in adds)  # noqa: E731
    backward = total(adds)
    # The optimizer step converts one sub-group of the gradient shard to fp32 (stage 3).
    sub_group = min(zero.get("sub_group_size", ZERO_DEFAULTS["sub_group_size"]), params / world)
    step = total(["model states", "ZeRO buffers"]) + (4 * sub_group if stage == 3 and not offload_opt else 0)
    gib = {g: {k: v / GIB for k, v in parts.items()} for g, parts in groups.items()}
    return MemoryEstimate(gib, {g: v / GIB for g, v in adds.items()}, max(backward, step) / GIB, step / GIB, cpu / GIB)


def nodes_advice(nodes: int, max_nodes: Optional[int]) -> str:
    """The override that runs on `nodes` nodes: cluster.nodes, or for an elastic run the range's floor."""
    if max_nodes is None:
        return f"cluster.nodes={nodes}"
    return f"cluster.min_nodes={nodes}" + (f" cluster.nodes={nodes}" if nodes > max_nodes else "")


def check_fit(mem: MemoryEstimate, budget_gib: Optional[float], shape: Optional[ModelShape], work: Workload,
              world: int, nodes: int, ds_json: Dict, params: int, more_nodes: bool,
              sequence_parallel_tries: Sequence[Tuple[str, Workload]] = (),
              max_nodes: Optional[int] = None) -> MemoryEstimate:
    """Compare with the budget; when over it, say which single change would bring it under.
    `more_nodes`: whether adding nodes is an option (Slurm; the global batch must still divide).
    `max_nodes`: an elastic run's cluster.nodes, whose `nodes` is its cluster.min_nodes: the advice
    raises the floor of the range (and the top with it where the floor would pass it).
    `sequence_parallel_tries`: (override, workload) for each larger valid trainer.sequence_parallel,
    smallest first; the smallest that fits is advised."""
    mem.gpu_mem_gib = budget_gib
    if budget_gib is None or shape is None:  # no budget, or activations unknown: no verdict
        return mem
    mem.fits = mem.peak_gib <= budget_gib
    if mem.fits:
        return mem
    tries = []
    if work.micro_batch_size > 1:
        tries.append(("trainer.micro_batch_size=1", replace(work, micro_batch_size=1), world, nodes, ds_json))
    if not work.activation_checkpointing:
        tries.append(("trainer.activation_checkpointing=true", replace(work, activation_checkpointing=True), world, nodes, ds_json))
    tries += [(label, tried, world, nodes, ds_json) for label, tried in sequence_parallel_tries]
    zero = ds_json.get("zero_optimization", {})
    if zero.get("stage", 0) < 3:
        tries.append(("deepspeed=zero3", work, world, nodes, dict(ds_json, zero_optimization=dict(zero, stage=3))))
    elif zero.get("offload_optimizer", {}).get("device", "none") == "none":
        cpu = {"device": "cpu"}
        tries.append(("deepspeed.offload_optimizer=cpu optim.name=cpu_adam", work, world, nodes,
                      dict(ds_json, zero_optimization=dict(zero, offload_optimizer=cpu))))
        tries.append(("deepspeed=zero3_offload optim.name=cpu_adam", work, world, nodes,
                      dict(ds_json, zero_optimization=dict(zero, offload_optimizer=cpu, offload_param=cpu))))
    if more_nodes:
        per_step = work.micro_batch_size * world // work.sequence_parallel  # rows per micro-step: data-parallel ranks
        for more in (2, 4, 8, 16):
            if ds_json.get("train_batch_size", per_step) % (per_step * more) == 0:
                tries.append((nodes_advice(nodes * more, max_nodes), work, world * more, nodes * more, ds_json))
    advised = set()
    for label, tried, w, n, ds in tries:
        key = label.split("=")[0]
        if key in ("cluster.nodes", "cluster.min_nodes", "trainer.sequence_parallel") and key in advised:
            continue  # the fewest nodes, the smallest group that fit
        other = estimate(shape, params, tried, ds, w, n)
        if other.peak_gib <= budget_gib:
            mem.advice.append(f"{label} (predicted {other.peak_gib:.1f} GiB)")
            advised.add(key)
    return mem
