"""Cross-field checks that run on the login node before anything starts or is submitted.

Hydra already rejected unknown keys, wrong types and values outside a key's choices
(launcher.schema); this module checks ranges and combinations, collecting every problem so one
attempt shows them all.
"""

import importlib.util
import os
from dataclasses import dataclass, field
from typing import List, Optional

from launcher.bundled import is_bundled
from launcher.data.check import check_files
from launcher.data.files import HUB, count_rows, expand_files, file_specs
from launcher.devices import GPUS, local_gpu_count
from launcher.errors import ConfigError, problem
from launcher.harness_tasks import check_tasks
from launcher.model_info import ModelFacts, looks_like_hub_id, read_model_facts
from launcher.attention import attention_problems, loss_problems
from launcher.plan import accelerator, batch_math, data_parallel_ranks, default_procs_per_node, ulysses
from launcher.plan.shape import MOE_FAMILIES
from launcher.schema import MIN_SEQ_LEN
from launcher.rundir import COMPLETE


@dataclass
class Checked:
    """What validation learned on the way, reused by the plan."""

    model: ModelFacts
    train_files: List[str] = field(default_factory=list)
    eval_files: List[str] = field(default_factory=list)
    train_examples: Optional[int] = None
    warnings: List[str] = field(default_factory=list)


def get(cfg, dotted: str):
    node = cfg
    for part in dotted.split("."):
        node = node[part]
    return node


def check_config(cfg, dry_run: bool = False) -> Checked:
    """Raise ConfigError listing every problem. Missing paths only warn in a dry run."""
    problems: List[str] = []
    missing: List[str] = []  # paths that must exist: errors for a run, warnings for a dry run

    ds = cfg.deepspeed
    if ds.stage not in (0, 1, 2, 3):
        problems.append(problem("deepspeed.stage", ds.stage, "must be a ZeRO stage 0, 1, 2 or 3"))
    if ds.offload_param != "none" and ds.stage != 3:
        problems.append(problem("deepspeed.offload_param", ds.offload_param, f"needs deepspeed.stage=3 (is {ds.stage}); use none"))
    if ds.offload_optimizer != "none" and ds.stage == 0:
        problems.append(problem("deepspeed.offload_optimizer", ds.offload_optimizer, "needs deepspeed.stage >= 1; use none"))
    if ds.offload_optimizer == "nvme" and ds.stage != 3:
        problems.append(problem("deepspeed.offload_optimizer", "nvme", f"NVMe offload needs deepspeed.stage=3 (is {ds.stage}); use cpu"))
    if "nvme" in (ds.offload_optimizer, ds.offload_param) and not ds.nvme_path:
        problems.append(problem("deepspeed.nvme_path", ds.nvme_path, "must name a local NVMe directory when offloading to nvme"))
    if ds.offload_optimizer != "none" and cfg.optim.name != "cpu_adam":
        problems.append(problem("optim.name", cfg.optim.name, f"must be cpu_adam with deepspeed.offload_optimizer={ds.offload_optimizer} (DeepSpeed steps offloaded states with its CPU Adam)"))
    if ds.param_persistence_threshold < 0:
        problems.append(problem("deepspeed.param_persistence_threshold", ds.param_persistence_threshold, "must be >= 0"))

    optim = cfg.optim
    if not optim.lr > 0:
        problems.append(problem("optim.lr", optim.lr, "must be > 0"))
    if optim.warmup_steps < 0:
        problems.append(problem("optim.warmup_steps", optim.warmup_steps, "must be >= 0"))
    if not 0 <= optim.min_lr_ratio <= 1:
        problems.append(problem("optim.min_lr_ratio", optim.min_lr_ratio, "must be in [0, 1]"))
    if len(optim.betas) != 2 or not all(0 <= b < 1 for b in optim.betas):
        problems.append(problem("optim.betas", list(optim.betas), "must be two numbers in [0, 1), e.g. [0.9, 0.95]"))

    trainer = cfg.trainer
    if trainer.max_steps is not None and trainer.max_steps < 1:
        problems.append(problem("trainer.max_steps", trainer.max_steps, "must be >= 1 (or null to use trainer.epochs)"))
    if trainer.epochs < 1:
        problems.append(problem("trainer.epochs", trainer.epochs, "must be >= 1"))
    if trainer.grad_clip < 0:
        problems.append(problem("trainer.grad_clip", trainer.grad_clip, "must be >= 0 (0 disables clipping)"))
    if trainer.log_every < 1:
        problems.append(problem("trainer.log_every", trainer.log_every, "must be >= 1"))
    if trainer.loss_chunk_tokens < 1:
        problems.append(problem("trainer.loss_chunk_tokens", trainer.loss_chunk_tokens, "must be >= 1"))
    if not trainer.dist_timeout_min > 0:
        problems.append(problem("trainer.dist_timeout_min", trainer.dist_timeout_min, "must be > 0 minutes"))
    # This machine's GPUs matter to a local run only (counting them can import torch: 1.5 s).
    local_gpus = local_gpu_count() if cfg.cluster.backend == "local" else 0
    device_type = accelerator(cfg.cluster, local_gpus)
    sequence_parallel = trainer.sequence_parallel
    problems += attention_problems(str(cfg.model.attn_implementation), device_type, str(trainer.precision), max(1, sequence_parallel))
    problems += loss_problems(str(trainer.loss), device_type)

    cluster = cfg.cluster
    if cluster.nodes < 1:
        problems.append(problem("cluster.nodes", cluster.nodes, "must be >= 1"))
    if cluster.backend == "local" and cluster.nodes != 1:
        problems.append(problem("cluster.nodes", cluster.nodes, "must be 1 with cluster=local; use cluster=slurm for several nodes"))
    if cluster.master_port is not None and not 1024 <= cluster.master_port <= 65535 - 63:
        problems.append(problem("cluster.master_port", cluster.master_port,
                                "must be in 1024..65472 (the first of 64 ports tried in turn), or null for a port the OS gives"))
    if cluster.gpu is not None and str(cluster.gpu).lower() not in GPUS:
        problems.append(problem("cluster.gpu", cluster.gpu, f"must be one of {', '.join(GPUS)} (or set cluster.gpu_mem_gib and cluster.gpu_tflops)"))
    for key in ("cluster.gpu_mem_gib", "cluster.gpu_tflops", "cluster.net_gbps", "cluster.intra_node_gbps", "checkpoint.write_gb_s"):
        value = get(cfg, key)
        if value is not None and not value > 0:
            problems.append(problem(key, value, "must be > 0"))
    if cfg.plan.max_nodes < 1:
        problems.append(problem("plan.max_nodes", cfg.plan.max_nodes, "must be >= 1"))
    procs = default_procs_per_node(cluster, local_gpus)
    if procs < 1:
        problems.append(problem("cluster.procs_per_node", procs, "must be >= 1"))
    world = max(1, cluster.nodes) * max(1, procs)
    if cluster.min_nodes is not None:  # every world size of the range, not only the largest
        problems += elastic_problems(cfg, max(1, procs))
    else:
        problems += batch_math(trainer, world)[2]
        if cluster.grow:
            problems.append(problem("cluster.grow", True, "needs a node range: set cluster.min_nodes (below cluster.nodes)"))

    data = cfg.data
    if data.seq_len < MIN_SEQ_LEN:
        problems.append(problem("data.seq_len", data.seq_len, f"must be >= {MIN_SEQ_LEN}"))
    if not 0 <= data.eval_fraction < 1:
        problems.append(problem("data.eval_fraction", data.eval_fraction, "must be in [0, 1)"))
    if data.split_seed < 0:
        problems.append(problem("data.split_seed", data.split_seed, "must be an integer >= 0"))
    if data.preview < 0:
        problems.append(problem("data.preview", data.preview, "must be >= 0"))

    checked = Checked(model=ModelFacts(cfg.model.path, None, None, "unknown"))
    model_path = os.path.expanduser(cfg.model.path)
    if not looks_like_hub_id(model_path) and not model_path.startswith("bundled://") and not os.path.isdir(model_path):
        missing.append(problem("model.path", cfg.model.path, "no such directory; give a Hugging Face model dir or a hub id"))
    else:
        checked.model = facts = read_model_facts(cfg.model)
        if facts.source != "config.json":
            missing.append(
                problem("model.path", cfg.model.path, f"cannot read its config.json offline ({facts.error}); "
                        "download it first (huggingface-cli download) or point model.path at a local dir")
            )
        if facts.max_positions is not None and data.seq_len > facts.max_positions:
            problems.append(problem("data.seq_len", data.seq_len, f"must be <= the model's max_position_embeddings ({facts.max_positions})"))
        if facts.moe and facts.model_type not in MOE_FAMILIES and not cfg.model.allow_untested:
            # Another family's MoE layers train without launcher.moe: no ZeRO-3 leaf block (a step routed
            # differently can hang the gathers), no load-balancing loss; the plan has no activations for it.
            problems.append(problem("model.path", cfg.model.path,
                                    f"is a mixture of experts of model_type {facts.model_type!r}, a family this launcher has "
                                    f"not tested (tested: {', '.join(MOE_FAMILIES)}); use one of those, or set "
                                    "model.allow_untested=true to train it without the launcher's MoE support (ZeRO-3 leaf "
                                    "blocks, the load-balancing loss) and without a fit verdict"))
        if facts.moe and cfg.trainer.tiled_mlp:
            # The tiled MLP would run each MoE block (and its router) once per slice: untested, and the
            # load-balancing loss expects one router output per layer and forward.
            problems.append(problem("trainer.tiled_mlp", True, f"is not supported for a mixture of experts "
                                    f"({facts.model_type}); use trainer.tiled_mlp=false"))
    if cfg.model.router_aux_loss_coef is not None and not cfg.model.router_aux_loss_coef >= 0:
        problems.append(problem("model.router_aux_loss_coef", cfg.model.router_aux_loss_coef,
                                "must be >= 0 (0 trains without the load-balancing loss; null: the model config's own)"))
    if sequence_parallel > 1 and ds.stage != 3:
        # The trainer's loss scale assumes ZeRO-3's reduction over every rank; stage 0 averages over
        # data-parallel ranks only, and stages 1-2 with Ulysses are untested here.
        problems.append(problem("deepspeed.stage", ds.stage, f"must be 3 with trainer.sequence_parallel={sequence_parallel} "
                                                             "(sequence parallelism is trained and tested with ZeRO-3 only)"))
    zero_extra = (ds.extra or {}).get("zero_optimization") or {}
    if sequence_parallel > 1 and zero_extra.get("reduce_scatter", True) is False:
        # That path averages gradients over data-parallel ranks, not all ranks: N times too large.
        problems.append(problem("deepspeed.extra.zero_optimization.reduce_scatter", False,
                                f"must stay true with trainer.sequence_parallel={sequence_parallel} (without it ZeRO-3 "
                                "averages gradients over the data-parallel ranks only, and the loss's scale would be off by N)"))
    # The heads are checked where known (config.json or the recipe's hints).
    problems += ulysses.size_problems(sequence_parallel, max(1, procs), data.seq_len, checked.model.heads, checked.model.kv_heads)

    for key in ("data.train_files", "data.eval_files"):
        spec = get(cfg, key)
        try:
            files = expand_files(spec)
        except FileNotFoundError as exc:
            missing.append(problem(key, spec, f"matches no file: {exc}"))
            continue
        # Every row read here, so a bad file stops the run before ranks start or a job is queued.
        data_problems, usable = check_files(key, files, data.format, data.on_bad_row)
        missing += data_problems
        if key == "data.train_files":
            checked.train_files = files
            counts = [count_rows(f) for f in files]
            checked.train_examples = sum(counts) if files and None not in counts else None
            if files and not data_problems and not usable and not any(f.startswith(HUB) for f in files):
                missing.append(problem(key, data.train_files, f"no row can be trained on: every row is bad "
                                       f"(data.on_bad_row=skip skipped them all; data.format={data.format})"))
        else:
            checked.eval_files = files
    if not file_specs(data.train_files):
        problems.append(problem("data.train_files", data.train_files, "must name at least one file"))
    elif any(map(is_bundled, file_specs(data.eval_files))) and not any(map(is_bundled, file_specs(data.train_files))):
        problems.append(problem("data.eval_files", data.eval_files,
                                "the recipe's bundled eval split does not belong to your data.train_files: set "
                                "data.eval_files=<your eval file>, or data.eval_files=null data.eval_fraction=0.02 "
                                "to hold out rows of your own"))

    # Warmup against the total, when the total is known before tokenising (an upper bound with packing).
    if trainer.max_steps is not None:
        total = trainer.max_steps
    elif checked.train_examples:
        gb = batch_math(trainer, world)[1]
        total = -(-checked.train_examples // gb) * trainer.epochs
    else:
        total = None
    if total is not None and optim.warmup_steps > total:
        problems.append(problem("optim.warmup_steps", optim.warmup_steps, f"must be <= total steps ({total})"))

    if cfg.resume not in ("auto", "never") and not os.path.isfile(os.path.join(os.path.expanduser(cfg.resume), COMPLETE)):
        problems.append(problem("resume", cfg.resume, "must be auto, never or a complete checkpoint directory (with its COMPLETE marker)"))
    if cfg.tracking.backend == "wandb" and cfg.tracking.mode == "online" and not cfg.tracking.api_key:
        from launcher.tracking import have_credentials

        if not have_credentials():
            problems.append(problem("tracking.mode", "online", "no W&B API key found (WANDB_API_KEY, tracking.api_key or ~/.netrc); set one or use tracking.mode=offline"))

    problems += harness_problems(cfg)

    if dry_run:
        checked.warnings += missing
    else:
        problems += missing
    if problems:
        raise ConfigError(problems)
    return checked


def elastic_problems(cfg, procs: int) -> List[str]:
    """cluster.min_nodes: a range Slurm may start (and restart) the run anywhere in, with one global batch."""
    cluster, trainer = cfg.cluster, cfg.trainer
    low, high = cluster.min_nodes, cluster.nodes
    if cluster.backend != "slurm":
        return [problem("cluster.min_nodes", low, "needs cluster=slurm (a node range is Slurm's: sbatch --nodes=MIN-MAX); use null")]
    if not 1 <= low <= high:
        return [problem("cluster.min_nodes", low, f"must be in 1..cluster.nodes ({high}), or null for exactly cluster.nodes")]
    if trainer.global_batch_size is None:
        return [problem("trainer.global_batch_size", None, f"must be set with cluster.min_nodes={low}: the global batch stays "
                        "fixed while the world size follows the nodes each start gets")]
    if trainer.grad_accum_steps is not None:
        return [problem("trainer.grad_accum_steps", trainer.grad_accum_steps, f"must be null with cluster.min_nodes={low}: "
                        "the accumulation follows the world size of each start (the global batch stays fixed)")]
    failing = [n for n in range(low, high + 1) if batch_math(trainer, n * procs)[2]]
    if failing:
        sizes = ", ".join(f"{n} node(s) = {data_parallel_ranks(trainer, n * procs)} data-parallel ranks" for n in failing)
        return [problem("trainer.global_batch_size", trainer.global_batch_size,
                        f"must divide by micro_batch_size ({trainer.micro_batch_size}) x the data-parallel ranks at every "
                        f"node count of cluster.min_nodes..cluster.nodes ({low}..{high}); it does not at {sizes}")]
    if cluster.grow and not cfg.checkpoint.every_steps:
        return [problem("cluster.grow", True, "needs checkpoint.every_steps > 0: the run looks for idle nodes after its checkpoints")]
    if cluster.grow_check_s <= 0:
        return [problem("cluster.grow_check_s", cluster.grow_check_s, "must be > 0 seconds")]
    return []


def harness_problems(cfg) -> List[str]:
    """eval.harness: its tasks run offline (launcher.harness_tasks), on a model the run writes, by an
    lm-eval this environment has."""
    h = cfg.eval.harness
    tasks = [str(t) for t in h.tasks]
    if not tasks:
        return []
    problems = [problem("eval.harness.tasks", tasks, found) for found in check_tasks(tasks, h.allow_hub)]
    if not cfg.checkpoint.export:
        problems.append(problem("checkpoint.export", False, "must be true with eval.harness.tasks (the final eval scores export/)"))
    if h.every_checkpoint and not cfg.checkpoint.every_steps:
        problems.append(problem("eval.harness.every_checkpoint", True, "needs checkpoint.every_steps > 0 (the steps it evaluates)"))
    if h.limit is not None and not h.limit > 0:
        problems.append(problem("eval.harness.limit", h.limit, "must be > 0 (examples per task, or a fraction if < 1), or null for all"))
    for key in ("batch_size", "cpus", "time_min"):
        if h[key] < 1:
            problems.append(problem(f"eval.harness.{key}", h[key], "must be >= 1"))
    if h.gpus < 0:
        problems.append(problem("eval.harness.gpus", h.gpus, "must be >= 0 (0: a CPU eval job)"))
    if h.num_fewshot is not None and h.num_fewshot < 0:
        problems.append(problem("eval.harness.num_fewshot", h.num_fewshot, "must be >= 0, or null for each task's own"))
    # The eval job imports lm-eval (and vllm) from this environment (or the run's container).
    needed = ["lm_eval"] + (["vllm"] if str(h.backend) == "vllm" else [])
    for module in needed:
        if importlib.util.find_spec(module) is None and not cfg.cluster.container_image:
            extra = "pip install -e '.[eval]'" if module == "lm_eval" else "pip install vllm, or use eval.harness.backend=hf"
            problems.append(problem("eval.harness.backend" if module == "vllm" else "eval.harness.tasks", tasks if module == "lm_eval" else "vllm",
                                    f"needs {module}, which this environment lacks: {extra}"))
    return problems
