"""Numbers derived from a validated config: world size, batch math, steps, memory, DeepSpeed JSON."""

import math
from dataclasses import asdict, dataclass
from typing import Any, Dict, Optional

from launcher import ops
from launcher.errors import problem

# Bytes per parameter of model states (ZeRO paper, Adam): parameters, gradients, optimizer states.
# Mixed precision keeps 16-bit params/grads plus fp32 master weights, momentum and variance (12).
BYTES_PER_PARAM = {"bf16": (2, 2, 12), "fp16": (2, 2, 12), "fp32": (4, 4, 8)}


@dataclass
class Plan:
    world_size: int
    nodes: int
    procs_per_node: int
    micro_batch_size: int
    grad_accum_steps: int
    global_batch_size: int
    seq_len: int
    tokens_per_step: int  # global batch x seq_len: exact when packing, an upper bound when padding
    train_examples: Optional[int]  # rows in the train files, when countable before tokenising
    steps_per_epoch: Optional[int]  # from rows: an upper bound with packing (packed rows are fewer)
    total_steps: Optional[int]
    params: Optional[int]
    model_facts_source: str
    zero_stage: int
    precision: str
    gib_per_gpu: Dict[str, float]  # model states only: params, grads, optimizer, total
    gib_offloaded_per_node: float  # model states held in CPU memory by offload
    compiled_ops: Dict[str, str]  # DeepSpeed ops the run JIT-compiles -> built here already or not

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


def default_procs_per_node(cluster) -> int:
    if cluster.procs_per_node is not None:
        return cluster.procs_per_node
    if cluster.backend == "slurm":
        return cluster.gpus_per_node or 1
    import torch

    return torch.cuda.device_count() or 2  # CPU: 2 ranks exercise real sharding


def accelerator(cluster) -> str:
    """What the ranks will train on: 'cuda' or 'cpu'."""
    if cluster.backend == "slurm":
        return "cuda" if cluster.gpus_per_node else "cpu"
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def batch_math(trainer, world_size: int) -> tuple[int, int, list[str]]:
    """(grad_accum_steps, global_batch_size, problems): global = micro x ranks x accumulation."""
    mb, accum, gb = trainer.micro_batch_size, trainer.grad_accum_steps, trainer.global_batch_size
    if mb < 1:
        return 1, world_size, [problem("trainer.micro_batch_size", mb, "must be >= 1")]
    per_step = mb * world_size
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
                f"must equal micro_batch_size x data-parallel ranks x grad_accum_steps = "
                f"{mb} x {world_size} x {accum} = {per_step * accum} (or leave one of them unset)",
            )
        ]
    if gb < 1 or gb % per_step:
        return 1, gb, [
            problem(
                "trainer.global_batch_size",
                gb,
                f"must be a positive multiple of micro_batch_size x data-parallel ranks = "
                f"{mb} x {world_size} = {per_step} (e.g. {per_step * max(1, round(gb / per_step))})",
            )
        ]
    return gb // per_step, gb, []


def memory_gib(params: Optional[int], precision: str, stage: int, world_size: int, ds) -> tuple[dict, float]:
    """Per-GPU model-state memory for the ZeRO stage; what offload moves to CPU, per node."""
    if params is None:
        return {}, 0.0
    p_bytes, g_bytes, o_bytes = (params * b for b in BYTES_PER_PARAM[precision])
    shard = lambda b, from_stage: b / world_size if stage >= from_stage else b  # noqa: E731
    on_gpu = {"params": shard(p_bytes, 3), "grads": shard(g_bytes, 2), "optimizer": shard(o_bytes, 1)}
    offloaded = 0.0
    if ds.offload_optimizer != "none":
        offloaded += on_gpu.pop("optimizer")
        on_gpu["optimizer"] = 0.0
    if ds.offload_param != "none":
        offloaded += on_gpu["params"]
        on_gpu["params"] = 0.0
    on_gpu["total"] = sum(on_gpu.values())
    gib = {k: round(v / 2**30, 6) for k, v in on_gpu.items()}
    return gib, offloaded / 2**30


def make_plan(cfg, facts, train_examples: Optional[int]) -> Plan:
    procs = default_procs_per_node(cfg.cluster)
    world = cfg.cluster.nodes * procs
    accum, gb, _ = batch_math(cfg.trainer, world)
    steps_per_epoch = math.ceil(train_examples / gb) if train_examples else None
    if cfg.trainer.max_steps is not None:
        total = cfg.trainer.max_steps
    else:
        total = steps_per_epoch * cfg.trainer.epochs if steps_per_epoch else None
    gib, offloaded = memory_gib(facts.params, cfg.trainer.precision, cfg.deepspeed.stage, world, cfg.deepspeed)
    return Plan(
        world_size=world,
        nodes=cfg.cluster.nodes,
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
        model_facts_source=facts.source,
        zero_stage=cfg.deepspeed.stage,
        precision=cfg.trainer.precision,
        gib_per_gpu=gib,
        gib_offloaded_per_node=round(offloaded * procs, 6),
        compiled_ops=ops.plan(cfg.optim.name, accelerator(cfg.cluster)),
    )


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
    return deep_merge(config, dict(ds.extra))


def deep_merge(base: Dict[str, Any], extra: Dict[str, Any]) -> Dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        out[key] = deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out
