"""Numbers derived from a validated config: world size, batch math, steps, memory, DeepSpeed JSON."""

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Dict, List, Optional, Tuple

from omegaconf import DictConfig, OmegaConf

from launcher.attention import ONE_ROW_KERNELS, SP_REFUSED, resolve_attn_implementation
from launcher.devices import GPUS, by_device_name
from launcher.plan import comm, memory, stop_window, ulysses
from launcher.plan.memory import MemoryEstimate, Workload
from launcher.errors import problem

# Share of GPU memory a run may plan to use: the CUDA context, NCCL's buffers and the caching
# allocator's fragmentation are not modelled and take the rest.
USABLE_FRACTION = 0.9


@dataclass(frozen=True)
class Found:
    """What was found outside the config, handed to the plan by its caller (launcher.facts reads
    Slurm, CUDA, the ops cache and the run's metrics): the plan itself reads nothing."""

    local_gpus: int = 0  # GPUs a local run's ranks would see
    partition_gpu: Optional[str] = None  # the Slurm partition's GPU (its GRES), asked when cluster.gpu is unset
    local_device: Optional[Tuple[str, float]] = None  # this machine's GPU: its name and memory in GiB
    write_gb_s: Optional[float] = None  # median write speed per node of this run's earlier checkpoint saves
    compiled_ops: Dict[str, str] = field(default_factory=dict)  # DeepSpeed ops the run compiles -> built here or not


@dataclass
class Plan:
    world_size: int
    data_parallel: int  # ranks that take micro-batches of their own: world / sequence_parallel
    sequence_parallel: int  # ranks sharing each row (trainer.sequence_parallel)
    nodes: int
    procs_per_node: int
    micro_batch_size: int
    grad_accum_steps: int
    global_batch_size: int
    seq_len: int
    tokens_per_step: int  # global batch x seq_len (each token once): exact when packing, an upper bound when padding
    train_examples: Optional[int]  # rows in the train files, when countable before tokenising
    steps_per_epoch: Optional[int]  # from rows: an upper bound with packing (packed rows are fewer)
    total_steps: Optional[int]
    params: Optional[int]
    model_facts_source: str
    zero_stage: int
    precision: str
    compiled_ops: Dict[str, str]  # DeepSpeed ops the run JIT-compiles -> built here already or not
    device: str = "unknown"  # what memory and speed are predicted for, and where that came from
    attention: str = ""  # the kernel the ranks will use and the batch layout it gets; the loss
    memory: Optional[Dict[str, Any]] = None  # launcher.plan.memory.MemoryEstimate
    comm: Optional[Dict[str, Any]] = None  # launcher.plan.comm.CommEstimate
    stop_window: Optional[Dict[str, Any]] = None  # launcher.plan.stop_window.StopWindow
    scaling: List[Dict[str, Any]] = field(default_factory=list)  # plan.scaling=true: per node count
    active_params: Optional[int] = None  # per token (a mixture of experts: its top-k experts); None: unknown
    experts: Optional[Dict[str, Any]] = None  # a mixture of experts' layout (experts_summary); None when dense
    # cluster.min_nodes: the plan is for the fewest nodes (the most memory per GPU); this holds the range
    # and the most nodes' world size, accumulation and step time. None: a fixed node count.
    elastic: Optional[Dict[str, Any]] = None

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


def default_procs_per_node(cluster, local_gpus: int = 0) -> int:
    if cluster.procs_per_node is not None:
        return cluster.procs_per_node
    if cluster.backend == "slurm":
        return cluster.gpus_per_node or 1
    return local_gpus or 2  # CPU: 2 ranks exercise real sharding


def accelerator(cluster, local_gpus: int = 0) -> str:
    """What the ranks will train on: 'cuda' or 'cpu' (local_gpus: what this machine has, for a local run)."""
    if cluster.backend == "slurm":
        return "cuda" if cluster.gpus_per_node else "cpu"
    return "cuda" if local_gpus else "cpu"


def data_parallel_ranks(trainer, world_size: int) -> int:
    """Ranks that take micro-batches of their own: world / trainer.sequence_parallel, as a group of N
    shares each micro-batch (the whole world when N does not divide it: validate refuses that N)."""
    n = trainer.sequence_parallel
    return world_size // n if n >= 1 and world_size % n == 0 else world_size


def batch_math(trainer, world_size: int) -> tuple[int, int, list[str]]:
    """(grad_accum_steps, global_batch_size, problems): global = micro x data-parallel ranks x accumulation."""
    mb, accum, gb = trainer.micro_batch_size, trainer.grad_accum_steps, trainer.global_batch_size
    dp = data_parallel_ranks(trainer, world_size)
    n = trainer.sequence_parallel
    ranks = "data-parallel ranks" if n == 1 else f"data-parallel ranks (world / trainer.sequence_parallel = {world_size} / {n})"
    if mb < 1:
        return 1, dp, [problem("trainer.micro_batch_size", mb, "must be >= 1")]
    per_step = mb * dp
    if accum is not None and accum < 1:
        return 1, per_step, [problem("trainer.grad_accum_steps", accum, "must be >= 1")]
    if gb is None:
        accum = accum or 1
        return accum, per_step * accum, []
    if accum is not None and gb != per_step * accum:
        return accum, gb, [
            problem(
                "trainer.global_batch_size",
                gb,
                f"must equal micro_batch_size x {ranks} x grad_accum_steps = "
                f"{mb} x {dp} x {accum} = {per_step * accum} (or leave one of them unset)",
            )
        ]
    if gb < 1 or gb % per_step:
        return 1, gb, [
            problem(
                "trainer.global_batch_size",
                gb,
                f"must be a positive multiple of micro_batch_size x {ranks} = "
                f"{mb} x {dp} = {per_step} (e.g. {per_step * max(1, round(gb / per_step))})",
            )
        ]
    return gb // per_step, gb, []


def make_plan(cfg, facts, train_examples: Optional[int], found: Optional[Found] = None) -> Plan:
    """The plan of a validated config: facts are the model's (launcher.model_info), found what the
    caller found outside the config (nothing, when None)."""
    found = found or Found()
    procs = default_procs_per_node(cfg.cluster, found.local_gpus)
    nodes = cfg.cluster.min_nodes or cfg.cluster.nodes  # elastic: planned at the fewest, the worst case
    world = nodes * procs
    accum, gb, _ = batch_math(cfg.trainer, world)
    steps_per_epoch = math.ceil(train_examples / gb) if train_examples else None
    if cfg.trainer.max_steps is not None:
        total = cfg.trainer.max_steps
    else:
        total = steps_per_epoch * cfg.trainer.epochs if steps_per_epoch else None
    plan = Plan(
        world_size=world,
        data_parallel=data_parallel_ranks(cfg.trainer, world),
        sequence_parallel=cfg.trainer.sequence_parallel,
        nodes=nodes,
        procs_per_node=procs,
        micro_batch_size=cfg.trainer.micro_batch_size,
        grad_accum_steps=accum,
        global_batch_size=gb,
        seq_len=cfg.data.seq_len,
        tokens_per_step=gb * cfg.data.seq_len,
        train_examples=train_examples,
        steps_per_epoch=steps_per_epoch,
        total_steps=total,
        params=facts.params,
        active_params=facts.active_params,
        experts=experts_summary(facts),
        attention=attention_summary(cfg, found.local_gpus),
        model_facts_source=facts.source,
        zero_stage=cfg.deepspeed.stage,
        precision=cfg.trainer.precision,
        compiled_ops=dict(found.compiled_ops),
    )
    mem_gib, tflops, plan.device = device_budget(cfg.cluster, found)
    if facts.params is not None:
        predict(cfg, plan, facts, mem_gib, tflops, found)
    return plan


def experts_summary(facts) -> Optional[Dict[str, Any]]:
    """A mixture of experts' layout, for the report; None for a dense model. Only model_type and
    tested=False for a family launcher.plan.shape does not know."""
    if not facts.moe:
        return None
    shape = facts.shape
    if shape is None:
        return {"model_type": facts.model_type, "tested": False}
    return {"model_type": shape.model_type, "tested": True, "experts": shape.experts, "top_k": shape.top_k,
            "moe_layers": shape.moe_layers, "layers": shape.layers, "expert_params": shape.expert_params,
            "block_params": shape.moe_block_params, "embedding_params": shape.embedding_params,
            "shared_expert": shape.shared_expert}


def device_budget(cluster, found: "Found") -> Tuple[Optional[float], Optional[float], str]:
    """(memory GiB, peak TFLOP/s, description) of the device the ranks will train on, where known."""
    mem, tflops, source = cluster.gpu_mem_gib, cluster.gpu_tflops, []
    gpu, origin = cluster.gpu, "cluster.gpu"
    if gpu is None and found.partition_gpu:
        gpu, origin = found.partition_gpu, "the partition's GRES"
    if gpu:
        known = GPUS.get(str(gpu).lower())  # validate.py names the valid ones
        if known:
            mem, tflops = mem or known.mem_gib, tflops or known.tflops
        source.append(f"{gpu} ({origin})")
    elif found.local_device is not None:
        name, device_mem = found.local_device
        known = by_device_name(name)
        mem = mem or device_mem
        tflops = tflops or (known.tflops if known else None)
        source.append(f"this machine's {name}")
    if cluster.gpu_mem_gib is not None:
        source.append("cluster.gpu_mem_gib")
    if cluster.gpu_tflops is not None:
        source.append("cluster.gpu_tflops")
    return mem, tflops, ", ".join(source) or "unknown: set cluster.gpu (or cluster.gpu_mem_gib, cluster.gpu_tflops)"


def attention_kernel(cfg, local_gpus: int, sequence_parallel: int) -> str:
    return resolve_attn_implementation(str(cfg.model.attn_implementation), accelerator(cfg.cluster, local_gpus),
                                       str(cfg.trainer.precision), sequence_parallel)


def attention_summary(cfg, local_gpus: int) -> str:
    name = str(cfg.model.attn_implementation)
    n = cfg.trainer.sequence_parallel
    kernel = attention_kernel(cfg, local_gpus, n)
    layout = "one row per micro-batch with its sequence boundaries" if kernel in ONE_ROW_KERNELS else "one row per sequence"
    loss = str(cfg.trainer.loss) + (f" ({cfg.trainer.loss_chunk_tokens} tokens per chunk)" if str(cfg.trainer.loss) == "chunked" else "")
    sp = f"; sequence parallel {n} (Ulysses all-to-all, seq_len / {n} tokens per rank)" if n > 1 else ""
    mlp = "; MLP tiled over the sequence" if cfg.trainer.tiled_mlp else ""
    return f"{kernel}{' (auto)' if name == 'auto' else ''}, {layout}; loss: {loss}{sp}{mlp}"


def workload(cfg, local_gpus: int) -> Workload:
    n = cfg.trainer.sequence_parallel
    return Workload(cfg.trainer.micro_batch_size, cfg.data.seq_len, str(cfg.trainer.precision),
                    cfg.trainer.activation_checkpointing, attention_kernel(cfg, local_gpus, n), cfg.data.packing,
                    str(cfg.trainer.loss), cfg.trainer.loss_chunk_tokens, n, cfg.trainer.tiled_mlp)


def sequence_parallel_tries(cfg, facts, procs_per_node: int, local_gpus: int) -> List[Tuple[str, Workload]]:
    """(override, workload) for each valid trainer.sequence_parallel above the current one, smallest first:
    what the advice tries when a run does not fit. A kernel Ulysses refuses is swapped for sdpa, and said so."""
    current = cfg.trainer.sequence_parallel
    sizes = ulysses.valid_sizes(procs_per_node, cfg.data.seq_len, facts.heads, facts.kv_heads)
    work, tries = workload(cfg, local_gpus), []
    for n in (k for k in sizes if k > current):
        label = f"trainer.sequence_parallel={n}"
        kernel = attention_kernel(cfg, local_gpus, n)
        if kernel in SP_REFUSED:
            kernel, label = "sdpa", f"{label} model.attn_implementation=sdpa"
        tries.append((label, replace(work, sequence_parallel=n, attn_implementation=kernel)))
    return tries


def predict_at(cfg, plan: Plan, facts, nodes: int, mem_gib, tflops, local_gpus: int = 0) -> Tuple[Optional[MemoryEstimate], Optional[comm.CommEstimate], Optional[Plan]]:
    """Memory and communication for the run on `nodes` nodes, with the same global batch."""
    world = nodes * plan.procs_per_node
    accum, gb, problems = batch_math(cfg.trainer, world)
    if problems:
        return None, None, None
    at = Plan(**{**plan.to_dict(), "world_size": world, "data_parallel": data_parallel_ranks(cfg.trainer, world), "nodes": nodes,
                 "grad_accum_steps": accum, "global_batch_size": gb, "memory": None, "comm": None, "stop_window": None, "scaling": []})
    ds_json = deepspeed_config(cfg, at)
    work = workload(cfg, local_gpus)
    mem = memory.estimate(facts.shape, facts.params, work, ds_json, world, nodes)
    budget = mem_gib * USABLE_FRACTION if mem_gib else None
    mem = memory.check_fit(mem, budget, facts.shape, work, world, nodes, ds_json, facts.params,
                           more_nodes=cfg.cluster.backend == "slurm" and cfg.trainer.global_batch_size is not None,
                           sequence_parallel_tries=sequence_parallel_tries(cfg, facts, plan.procs_per_node, local_gpus),
                           max_nodes=cfg.cluster.nodes if cfg.cluster.min_nodes is not None else None)
    traffic = comm.estimate(facts.params, facts.shape, ds_json, str(cfg.trainer.precision), world, nodes, gb * cfg.data.seq_len,
                            cfg.data.seq_len, cfg.trainer.activation_checkpointing, tflops, cfg.cluster.net_gbps,
                            cfg.cluster.intra_node_gbps, work.sequence_parallel, work.micro_batch_size, work.tiled_mlp)
    return mem, traffic, at


def predict(cfg, plan: Plan, facts, mem_gib: Optional[float], tflops: Optional[float], found: Found) -> None:
    """Fill the plan's memory, communication, stop-window (Slurm) and (plan.scaling) per-node-count predictions."""
    mem, traffic, _ = predict_at(cfg, plan, facts, plan.nodes, mem_gib, tflops, found.local_gpus)
    if mem is not None:
        plan.memory, plan.comm = mem.to_dict(), traffic.to_dict()
    if cfg.cluster.min_nodes is not None:
        plan.elastic = elastic_range(cfg, plan, facts, traffic, mem_gib, tflops, found.local_gpus)
    speed, source = cfg.checkpoint.write_gb_s, "checkpoint.write_gb_s"
    if speed is None and cfg.run_dir:
        speed, source = found.write_gb_s, "measured by this run's saves"
    if cfg.cluster.backend == "slurm":  # only Slurm warns before it kills
        tracked = cfg.tracking.backend != "none" and cfg.tracking.mode != "disabled"
        plan.stop_window = stop_window.estimate(facts.params, plan.nodes, cfg.deepspeed.stage, plan.precision,
                                                cfg.cluster.signal_delay_s, traffic.step_s if traffic else None,
                                                speed, source, cfg.tracking.finish_timeout_s if tracked else 0.0).to_dict()
    if cfg.plan.scaling:
        counts = sorted({n for n in (1, 2, 4, 8, 16, 32, 64, 128, 256) if n <= cfg.plan.max_nodes} | {plan.nodes})
        for nodes in counts:
            m, t, at = predict_at(cfg, plan, facts, nodes, mem_gib, tflops, found.local_gpus)
            row = {"nodes": nodes, "gpus": nodes * plan.procs_per_node, "divides": at is not None}
            if at is not None:
                row.update(accum=at.grad_accum_steps, global_batch=at.global_batch_size, peak_gib=m.peak_gib, fits=m.fits,
                           comm_s=t.comm_s + t.sp_comm_s, compute_s=t.compute_s, step_s=t.step_s, tokens_per_s=t.tokens_per_s,
                           mfu_ceiling=t.mfu_ceiling)
            plan.scaling.append(row)


def elastic_range(cfg, plan: Plan, facts, at_min, mem_gib, tflops, local_gpus: int) -> Dict[str, Any]:
    """The node range of an elastic run: the plan itself is at its fewest nodes; here the most."""
    high = cfg.cluster.nodes
    m, t, at = predict_at(cfg, plan, facts, high, mem_gib, tflops, local_gpus)
    return {"min_nodes": plan.nodes, "max_nodes": high, "world_sizes": [plan.world_size, high * plan.procs_per_node],
            "grad_accum_steps": [plan.grad_accum_steps, at.grad_accum_steps if at else None],
            "step_s": [at_min.step_s if at_min else None, t.step_s if t else None],
            "tokens_per_s": [at_min.tokens_per_s if at_min else None, t.tokens_per_s if t else None],
            "peak_gib_at_max": m.peak_gib if m else None}


def fit_to_world(ds_config: Dict[str, Any], world_size: int, sequence_parallel: int = 1) -> Dict[str, Any]:
    """An elastic run's DeepSpeed JSON for the ranks a start got: the same global batch, the
    accumulation steps that make it (validate checked it divides at every size of the range)."""
    dp = world_size // max(1, sequence_parallel)
    per_step = ds_config["train_micro_batch_size_per_gpu"] * dp
    if ds_config["train_batch_size"] % per_step:
        raise ValueError(f"global batch {ds_config['train_batch_size']} does not divide by micro batch x "
                         f"{dp} data-parallel ranks ({per_step}): this start's world size {world_size} is outside the checked range")
    return {**ds_config, "gradient_accumulation_steps": ds_config["train_batch_size"] // per_step}


def deepspeed_config(cfg, plan: Plan) -> Dict[str, Any]:
    """The exact DeepSpeed JSON: the optimizer and schedule are ours, passed to initialize()."""
    ds = cfg.deepspeed
    zero: Dict[str, Any] = {
        "stage": ds.stage,
        "overlap_comm": ds.overlap_comm,
        "contiguous_gradients": True,
        "reduce_bucket_size": ds.reduce_bucket_size,
    }
    if ds.stage == 3:
        zero["stage3_param_persistence_threshold"] = ds.param_persistence_threshold
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    for kind, device in (("offload_optimizer", ds.offload_optimizer), ("offload_param", ds.offload_param)):
        if device != "none":
            zero[kind] = {"device": device, "pin_memory": True}
            if device == "nvme":
                zero[kind]["nvme_path"] = ds.nvme_path
    config: Dict[str, Any] = {
        "train_micro_batch_size_per_gpu": plan.micro_batch_size,
        "gradient_accumulation_steps": plan.grad_accum_steps,
        "train_batch_size": plan.global_batch_size,
        "gradient_clipping": cfg.trainer.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": cfg.trainer.precision == "bf16"},
        "fp16": {"enabled": cfg.trainer.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,  # we log; DeepSpeed's own prints would interleave across ranks
        "wall_clock_breakdown": False,
    }
    if plan.sequence_parallel > 1:
        # DeepSpeed divides the world by it where no SP mpu is given (zero.Init from this config) to check
        # train_batch_size = micro x accumulation x data-parallel ranks.
        config["sequence_parallel_size"] = plan.sequence_parallel
    # Plain containers all the way down: a nested DictConfig would reach the JSON as its repr string.
    extra = OmegaConf.to_container(ds.extra, resolve=True) if isinstance(ds.extra, DictConfig) else dict(ds.extra)
    return deep_merge(config, extra)


def deep_merge(base: Dict[str, Any], extra: Dict[str, Any]) -> Dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        out[key] = deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out
