"""The typed config schema: one dataclass per group, registered in Hydra's ConfigStore.

Hydra rejects unknown keys and wrong types against these, and a value of a `Choice` key (an Enum
below) that is not one of its members, listing them; cross-field checks live in `launcher.validate`.
Field comments and the Choice types are the reference for every key and its valid values.
"""

import typing
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Dict, List, Optional, Tuple, Type

from omegaconf import MISSING

MIN_SEQ_LEN = 8  # data.seq_len's lower bound, checked at login (launcher.validate) and by the pipeline


class Choice(str, Enum):
    """A key whose value is one of a fixed list: Hydra rejects any other value, naming the valid ones.

    Members are their own names and are strs: `precision == "bf16"`, f-strings, json.dumps and dict
    lookups by string see the plain value. Containers for YAML (yaml.safe_dump refuses str
    subclasses) come from `OmegaConf.to_container(..., enum_to_str=True)` or `plain()`.
    """

    def __str__(self) -> str:
        return self.value

    @classmethod
    def values(cls) -> Tuple[str, ...]:
        return tuple(member.value for member in cls)


def choices(name: str, *values: str) -> type:
    """A Choice whose members are named by their values (OmegaConf reads and writes members by name)."""
    return Choice(name, [(v, v) for v in values], module=__name__, qualname=name)


# auto: flash_attention_2 on CUDA with flash-attn installed, else flex_attention; sdpa on CPU (launcher.attention)
AttnImplementation = choices("AttnImplementation", "auto", "sdpa", "eager", "flex_attention", "flash_attention_2")
LossKind = choices("LossKind", "chunked", "full", "liger")  # launcher.loss
DataFormat = choices("DataFormat", "auto", "messages", "prompt_completion", "alpaca", "text")
TrainOn = choices("TrainOn", "assistant", "last_assistant", "all")
Truncation = choices("Truncation", "truncate", "drop")
OnBadRow = choices("OnBadRow", "error", "skip")
Optimizer = choices("Optimizer", "adamw", "fused_adam", "cpu_adam")
Scheduler = choices("Scheduler", "cosine", "linear", "constant")
OffloadDevice = choices("OffloadDevice", "none", "cpu", "nvme")
Precision = choices("Precision", "bf16", "fp16", "fp32")
ResumeChange = choices("ResumeChange", "data", "model_path", "launcher")  # checkpoint.allow_changes (launcher.resume)
ClusterBackend = choices("ClusterBackend", "local", "slurm")
TrackingBackend = choices("TrackingBackend", "wandb", "none")
TrackingMode = choices("TrackingMode", "offline", "online", "disabled")
Direction = choices("Direction", "minimize", "maximize")  # sweep.direction (launcher.sweep)
HarnessBackend = choices("HarnessBackend", "hf", "vllm")  # eval.harness.backend: lm-eval's model type


@dataclass
class ModelConfig:
    path: str = MISSING  # local HF model dir, hub id, or bundled://tiny-llama
    attn_implementation: AttnImplementation = AttnImplementation.auto
    trust_remote_code: bool = False
    # config.json fields (hidden_size, num_hidden_layers, vocab_size, ...) the plan uses when the
    # model's own config.json cannot be read offline (a hub id on a laptop); the file wins when readable.
    config_hints: Dict[str, Any] = field(default_factory=dict)
    # Mixture-of-experts models: the router's load-balancing loss weight (None: the model config's
    # router_aux_loss_coef); the trained objective is loss + coef x aux_loss (launcher.moe).
    router_aux_loss_coef: Optional[float] = None
    # Train a model whose MoE layer (or architecture) this launcher has not tested (launcher.plan.shape's families).
    allow_untested: bool = False


@dataclass
class DataConfig:
    # A path, a glob or a list of them (bundled://tiny-tasks/train.jsonl, hub://org/name:split); a list
    # item may be {path: ..., weight: 2.0} (repeat x2) or {path: ..., samples: N} to mix data sets.
    train_files: Any = MISSING
    eval_files: Any = None  # same forms; None: hold out eval_fraction of train
    eval_fraction: float = 0.0  # held-out fraction of train when eval_files is None
    # Seeds the eval_fraction holdout, the mixing (weight, samples) and the packing; the top-level seed
    # orders the samples only, so a seed sweep shares one eval set and one data cache. 42: seed's default.
    split_seed: int = 42
    format: DataFormat = DataFormat.auto  # auto: detected per file from its rows
    template: Optional[str] = None  # None: tokenizer's own; chatml | llama3 | a Jinja string
    seq_len: int = 512  # >= MIN_SEQ_LEN
    packing: bool = True
    train_on: TrainOn = TrainOn.assistant  # the tokens with a loss
    truncation: Truncation = Truncation.truncate  # over-long examples
    on_bad_row: OnBadRow = OnBadRow.error
    preview: int = 0  # >0: print N processed examples and exit
    num_proc: int = 1  # tokenisation processes (datasets.map num_proc)
    cache_dir: Optional[str] = None  # None: $SFT_CACHE_DIR/data or ~/.cache/sft-launcher/data
    prepare_timeout_min: float = 120.0  # how long other local ranks wait for local rank 0 to tokenise


@dataclass
class OptimConfig:
    name: Optimizer = Optimizer.adamw  # adamw: torch; fused_adam, cpu_adam: DeepSpeed kernels
    lr: float = 2e-5
    weight_decay: float = 0.0
    betas: List[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    scheduler: Scheduler = Scheduler.cosine
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0  # final lr as a fraction of lr (cosine/linear)


@dataclass
class DeepSpeedConfig:
    stage: int = 3  # ZeRO stage 0..3
    offload_optimizer: OffloadDevice = OffloadDevice.none  # stage >= 1
    offload_param: OffloadDevice = OffloadDevice.none  # stage 3 only
    nvme_path: Optional[str] = None  # required when offloading to nvme
    param_persistence_threshold: int = 100000  # stage3_param_persistence_threshold; 0 gathers all
    overlap_comm: bool = True
    reduce_bucket_size: int = 50_000_000
    extra: Dict[str, Any] = field(default_factory=dict)  # merged verbatim into the DeepSpeed JSON


@dataclass
class TrainerConfig:
    precision: Precision = Precision.bf16
    micro_batch_size: int = 1  # sequences per rank per forward
    grad_accum_steps: Optional[int] = None  # give this or global_batch_size (or neither: 1)
    global_batch_size: Optional[int] = None  # = micro_batch_size x data-parallel ranks x accum
    epochs: int = 1
    max_steps: Optional[int] = None  # optimizer steps; overrides epochs when set
    grad_clip: float = 1.0  # 0 disables
    activation_checkpointing: bool = False
    log_every: int = 10
    loss: LossKind = LossKind.chunked  # chunked: no full-vocabulary logits; liger: fused kernel (GPU); full
    loss_chunk_tokens: int = 1024  # trained tokens per chunk of the chunked loss
    dist_timeout_min: float = 30.0  # a collective waiting longer than this fails the job (process-group timeout)
    # Ranks per sequence-parallel group (DeepSpeed Ulysses): each holds 1/N of every row's tokens and
    # attention runs over the whole row through all-to-all; data-parallel ranks = world / N.
    sequence_parallel: int = 1
    tiled_mlp: bool = False  # the MLP over slices of the sequence (DeepSpeed's TiledMLP): long rows' MLP activations


@dataclass
class HarnessConfig:
    """Benchmark evals with lm-evaluation-harness (launcher.harness), each in its own job after a save."""

    # lm-eval task names, paths to task YAMLs, or bundled ones (tiny_tasks: exact match of greedy
    # answers on the bundled eval split; tiny_tasks_ll: the answers' log-likelihood). Empty: none.
    tasks: List[str] = field(default_factory=list)
    every_checkpoint: bool = False  # false: the final export only; true: every checkpoint.every_steps save too
    limit: Optional[float] = None  # examples per task (a fraction if < 1); None: all
    batch_size: int = 8
    num_fewshot: Optional[int] = None  # None: each task's own
    backend: HarnessBackend = HarnessBackend.hf  # vllm where installed
    gpus: int = 1  # GPUs of an eval job (Slurm); 0 on a CPU cluster
    cpus: int = 2  # CPUs of an eval job (Slurm)
    time_min: int = 60  # an eval job's time limit (Slurm)
    partition: Optional[str] = None  # None: cluster.partition
    allow_hub: bool = False  # tasks may read their data from the Hugging Face Hub (compute nodes online)


@dataclass
class EvalConfig:
    every_steps: int = 0  # 0: only at the end
    max_batches: Optional[int] = None  # None: the whole eval split
    generate_samples: int = 0  # >0: exact-match accuracy of greedy generation on N eval prompts
    max_new_tokens: int = 16
    harness: HarnessConfig = field(default_factory=HarnessConfig)


@dataclass
class CheckpointConfig:
    every_steps: int = 0  # 0: only on stop signals and at the end
    keep: int = 2  # newest complete checkpoints kept
    export: bool = True  # write a Hugging Face model to export/ at the end
    export_dtype: Optional[Precision] = None  # None: bf16 on GPU, fp32 on CPU
    allow_changes: List[ResumeChange] = field(default_factory=list)  # resume despite a change of these
    # Write speed of one node's checkpoint shards, GB/s (the plan's stop-window check). None: the
    # speed this run's own earlier saves measured (their metrics rows), else unknown.
    write_gb_s: Optional[float] = None


@dataclass
class ClusterConfig:
    backend: ClusterBackend = ClusterBackend.local
    nodes: int = 1
    # Elastic (Slurm): start as soon as min_nodes are free, with up to `nodes`; each start (a requeue)
    # takes what it gets, same global batch (accumulation follows the world size). None: exactly `nodes`.
    min_nodes: Optional[int] = None
    grow: bool = False  # elastic: at checkpoints, stop and requeue when more of the range's nodes are idle
    grow_check_s: float = 300.0  # look at the queue at most this often
    procs_per_node: Optional[int] = None  # ranks per node; None: GPUs per node, or 2 on CPU
    gpus_per_node: int = 0  # Slurm: GPUs requested per node (one task per GPU)
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    time_min: int = 60  # Slurm time limit in minutes
    cpus_per_task: int = 1
    mem: Optional[str] = None  # e.g. 200G; None: partition default
    constraint: Optional[str] = None
    exclude: Optional[str] = None
    signal_delay_s: int = 120  # USR2 this long before the time limit: checkpoint and requeue
    max_requeues: int = 3  # preemption/time-limit requeues before giving up
    array_parallelism: int = 64  # sweep points running at once
    sbatch_extra: Dict[str, Any] = field(default_factory=dict)  # more #SBATCH options
    setup: List[str] = field(default_factory=list)  # shell lines run before the job (module load, ...)
    srun_args: List[str] = field(default_factory=list)
    container_image: Optional[str] = None  # pyxis --container-image
    container_mounts: Optional[str] = None  # pyxis --container-mounts
    master_port: Optional[int] = None  # None: rank 0 listens on a port the OS gives; P: the first free of P..P+63
    # What the plan predicts with (memory fit, step time); gpu names a known device (h100, h200,
    # a100_80g, a100_40g, l40s, ...); gpu_mem_gib / gpu_tflops override or replace it.
    gpu: Optional[str] = None
    gpu_mem_gib: Optional[float] = None  # memory per GPU (the plan uses 90% of it)
    gpu_tflops: Optional[float] = None  # dense bf16/fp16 peak per GPU
    net_gbps: float = 400.0  # inter-node bandwidth per GPU, Gbit/s (one 400G NIC per GPU on HGX nodes)
    intra_node_gbps: float = 3600.0  # GPU-to-GPU inside a node, Gbit/s per direction (NVLink 4: 450 GB/s)


@dataclass
class TrackingConfig:
    backend: TrackingBackend = TrackingBackend.wandb
    mode: TrackingMode = TrackingMode.offline
    project: str = "sft"
    entity: Optional[str] = None
    group: Optional[str] = None  # None: the sweep name for sweeps
    name: Optional[str] = None  # None: the run's name and timestamp
    job_type: str = "sft"
    tags: List[str] = field(default_factory=list)
    api_key: Optional[str] = None  # prefer the WANDB_API_KEY environment variable
    init_timeout_s: float = 60.0  # online: a W&B server that does not answer in this time -> offline
    # At the end of a segment W&B waits at most this long for its upload, then leaves the rest on
    # disk for `sft-jobs sync`. A stopped segment requeues after it: the plan's stop window counts it.
    finish_timeout_s: float = 10.0


@dataclass
class PlanConfig:
    force: bool = False  # launch even when the plan predicts the run does not fit in GPU memory
    scaling: bool = False  # dry runs: print step time and memory for 1..max_nodes nodes
    max_nodes: int = 16  # the scaling table's last row (powers of two up to it, and cluster.nodes)


@dataclass
class SweepConfig:
    """A search (`sft -m hydra/sweeper=search ...`, launcher.sweep); a single run ignores it."""

    trials: int = 16  # trials sampled in all
    parallel: int = 4  # trials training at once (Slurm; a local search runs one at a time)
    # <kind>/<key> of the run's metrics rows (eval/loss, eval/accuracy, train/loss), or a benchmark
    # eval's harness/<task>/<metric>: judged once the trial's final eval job is done
    metric: str = "eval/loss"
    # What rungs compare (a training-time metric: a harness eval runs only after the trial); None:
    # sweep.metric, which must then be a training-time one; rung_direction None: sweep.direction
    rung_metric: Optional[str] = None
    rung_direction: Optional[Direction] = None
    direction: Direction = Direction.minimize
    rungs: Optional[List[int]] = None  # steps at which trials are compared; None: max_steps/reduction^2, /reduction, max_steps
    reduction: int = 3  # at each rung a trial goes on only if it is in the best 1/reduction seen there
    sampler_seed: Optional[int] = None  # None: seed
    poll_s: float = 30.0  # how often the controller looks at the trials
    controller_cpus: int = 1
    controller_time_min: Optional[int] = None  # None: cluster.time_min (the controller requeues itself at its limit)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    name: str = "sft"  # run name: runs/<name>/<timestamp>/
    seed: int = 42
    runs_root: str = "./runs"
    dry_run: bool = False  # print config, plan and DeepSpeed JSON (and sbatch script); run nothing
    resume: str = "auto"  # auto | never | a checkpoint path
    run_dir: Optional[str] = None  # set by the launcher; give it to reuse a run directory


@dataclass
class SlurmSweepLauncherConfig:
    _target_: str = "hydra_plugins.sft_launcher.slurm_sweep.SlurmSweepLauncher"


@dataclass
class SearchSweeperConfig:
    _target_: str = "hydra_plugins.sft_launcher.search_sweeper.SearchSweeper"


@dataclass
class SlurmSweeperConfig:
    _target_: str = "hydra_plugins.sft_launcher.slurm_sweep.SlurmSweeper"
    max_batch_size: Optional[int] = None
    params: Optional[Dict[str, str]] = None


def choice_type(hint: Any) -> Optional[Type[Choice]]:
    """The Choice type of a field annotation, also inside Optional[...] or List[...]; None if it has none."""
    if isinstance(hint, type):
        return hint if issubclass(hint, Choice) else None
    for arg in typing.get_args(hint):
        found = choice_type(arg)
        if found is not None:
            return found
    return None


def choice_fields(cls: Any) -> Dict[str, Type[Choice]]:
    """{field name: Choice type} of a schema dataclass."""
    hints = typing.get_type_hints(cls)
    return {name: choice for name, hint in hints.items() if (choice := choice_type(hint)) is not None}


def one_of(choice: Type[Choice]) -> str:
    """The error text for a value outside `choice`: must be one of bf16, fp16, fp32."""
    return f"must be one of {', '.join(choice.values())}"


def plain(obj: Any) -> Any:
    """`obj` with every Choice member replaced by its str value, in dicts, lists and tuples too."""
    if isinstance(obj, Enum):
        return obj.value
    if isinstance(obj, dict):
        return {key: plain(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(item) for item in obj]
    return obj


def register_configs() -> None:
    from hydra.core.config_store import ConfigStore  # here: the ranks and the data code import this module too

    store = ConfigStore.instance()
    store.store(name="sft_schema", node=Config)
    store.store(group="hydra/launcher", name="sft_slurm", node=SlurmSweepLauncherConfig)
    store.store(group="hydra/sweeper", name="sft_slurm", node=SlurmSweeperConfig)
    store.store(group="hydra/sweeper", name="search", node=SearchSweeperConfig)
