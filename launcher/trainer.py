"""The SFT recipe every rank runs, in run order: setup -> train -> last checkpoint -> final eval -> export -> cleanup.

Features: DeepSpeed ZeRO 0-3 with the model partitioned at load; gradient accumulation with the loss
normalised by the trained tokens of the whole global batch (so micro 2 x accum 1 == micro 1 x accum 2);
clipping; activation checkpointing; bf16/fp16/fp32; micro-batches laid out for the attention kernel
(launcher.attention, launcher.data.collate); a loss without full-vocabulary logits (launcher.loss);
losses read back from the device only at log steps (launcher.log_window); warmup then cosine/linear decay; periodic and
signal-triggered checkpoints with exact resume (model, optimizer, scheduler, RNG, data position);
eval loss, perplexity and greedy-generation accuracy; metrics to the run's metrics file and W&B from rank 0;
a Hugging Face export at the end.

    global batch = micro_batch_size x data-parallel ranks x grad_accum_steps
    data-parallel ranks = world_size / trainer.sequence_parallel (launcher.sequence_parallel)
"""

import datetime
import enum
import json
import logging
import math
import os
import signal
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator
from omegaconf import OmegaConf
from torch.utils.data import DistributedSampler

from launcher import bundled, checkpoint, harness_results, moe, ops, rendezvous, sequence_parallel, universal
from launcher.atomic import write_text_atomic
from launcher.attention import ONE_ROW_KERNELS, resolve_attn_implementation
from launcher.data import collate, prepare_data
from launcher.export import DTYPES, export_dtype, export_model
from launcher.log_window import LogWindow
from launcher.loss import install_loss_head, token_loss_sum
from launcher.metrics import MetricsFile, device_peak_flops, reset_peak_memory
from launcher.optim import build_optimizer
from launcher.rank_env import RankEnv  # re-exported: the integration probes import it from here
from launcher.resume import refused_changes
from launcher.exit_codes import EXIT_STOPPED
from launcher.signals import STOP
from launcher.trial.rungs import END_FILE, SweepMetricError, TrialRungs, trial_end
from launcher.tracking import run_metadata, run_tags, start_tracking, wandb_row
from launcher import rundir

log = logging.getLogger(__name__)


class ResumeError(Exception):
    """The checkpoint to continue was written with settings that would make the resume inexact."""


class StopAgreed(Exception):
    """Every rank has the same answer: a stop signal came (`requeue`: a USR2 asked to start again)."""

    def __init__(self, requeue: bool) -> None:
        super().__init__("stop agreed")
        self.requeue = requeue


class RungVerdict(enum.IntEnum):
    """What every rank learns at a search's rung: rank 0's code, summed over the ranks as a float
    (the others add 0), so every rank leaves the collective with the same answer."""

    TRAIN_ON = 0  # in the best 1/reduction so far
    STOP = 1  # not (yet) in the best: stop at this rung
    NO_METRIC = 2  # sweep.metric is not logged at this step
    NO_STUDY = 3  # the search's study could not be reached


# How each ending closes a segment: W&B's end_reason, W&B's exit code, the process's exit code.
ENDINGS = {
    rundir.COMPLETED: ("completed", 0, 0),
    rundir.STOPPED: ("stopped", EXIT_STOPPED, EXIT_STOPPED),
    rundir.PAUSED: ("pruned", 0, EXIT_STOPPED),  # W&B shows it pruned; the search may resume it
}


def lr_lambda(scheduler: str, warmup: int, total: int, min_ratio: float):
    """Linear warmup from lr/warmup to lr, then cosine or linear decay to min_ratio x lr at `total`."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if scheduler == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        decay = 0.5 * (1 + math.cos(math.pi * progress)) if scheduler == "cosine" else 1 - progress
        return min_ratio + (1 - min_ratio) * decay

    return factor


class SFTTrainer:
    def __init__(self, cfg, run_dir: Path, ds_config: Dict[str, Any], env: RankEnv,
                 on_eval_model: Optional[Callable[[int], None]] = None):
        self.cfg = cfg
        # Rank 0 calls it with a step whose model is exported for the benchmark evals (eval.harness):
        # under Slurm it submits the eval job; locally the evals run after training (launcher.backends.local).
        self.on_eval_model = on_eval_model
        self.run_dir = Path(run_dir)
        self.ds_config = ds_config
        self.env = env
        self.is_main = env.rank == 0
        # Sequence parallelism: groups of consecutive ranks share each row; data parallelism is world / N.
        self.sp = sequence_parallel.layout_for(env.rank, env.world_size, cfg.trainer.get("sequence_parallel"))
        self.stop = STOP.install()
        # Modulo: a cluster that binds one GPU per task shows each task a single device 0.
        self.device = torch.device("cuda", env.local_rank % torch.cuda.device_count()) if torch.cuda.is_available() else torch.device("cpu")
        self.global_step = 0
        self.last_saved_step = None  # in memory: every rank must agree on whether to save (a collective)
        self.eval_due = False  # an eval of this step has not finished: a checkpoint saved now says so
        self.engine = None
        self.routers = None  # a mixture of experts' routers (launcher.moe), set when the model loads
        self.tracker = None
        self.metrics_file = None
        self._alerted_nonfinite = False
        self._epoch_cache: Dict[int, List[int]] = {}  # epoch -> this rank's row order (the current epoch only)
        self.last_rows: Dict[str, Dict[str, Any]] = {}  # kind -> the newest row logged (rank 0)
        self.trial = TrialRungs.load(self.run_dir)  # a search's trial: judged at its rungs
        if self.trial and self.is_main and trial_end(self.run_dir).get("state") == "paused":
            # Training again (promoted, or requeued by a preemption while stopping at a rung): no longer waiting.
            (self.run_dir / END_FILE).unlink(missing_ok=True)
        # What a checkpoint of this run records and a resume is checked against (written by `sft`).
        self.fingerprint = rundir.plan(self.run_dir).get("fingerprint") or {}

    # The batch geometry, from the config (the resume point's ds_config keeps it).
    @property
    def micro_batch(self) -> int:
        return self.cfg.trainer.micro_batch_size

    @property
    def accum(self) -> int:
        return self.ds_config["gradient_accumulation_steps"]

    @property
    def rows_per_step(self) -> int:
        """This rank's rows per optimizer step."""
        return self.micro_batch * self.accum

    # ---------------------------------------------------------------- setup
    def setup(self) -> None:
        """The run's parts in the order they are built, each step given what the steps before it built."""
        self._setup_distributed()
        self.model_path, self.tokenizer = self._load_tokenizer()
        self.pad_id = self.tokenizer.pad_token_id
        self.data, self.steps_per_epoch, self.total_steps = self._load_data(self.tokenizer)
        self._record_start()
        # Before the model loads: a refused resume costs nothing.
        self.resumed_from, self.universal = self._find_resume_point()
        if self.universal:
            self.ds_config = {**self.ds_config, "checkpoint": {**self.ds_config.get("checkpoint", {}), "load_universal": True}}
        self._hf_ds_config = self._partition_at_load()  # held for the model's lifetime
        self.attn, self.one_row, self.row_tokens = self._attention_layout()
        self.model, self.loss_head, self.n_params = self._load_model(self.model_path, self.attn)
        self.engine, self.optimizer, self.scheduler = self._build_engine(self.model, self.total_steps)
        if self.resumed_from is not None:
            self.global_step, self.eval_due = self._load_checkpoint(self.resumed_from, self.universal)
            self.last_saved_step = self.global_step
        self.tracker = self._start_tracking(resumed=self.resumed_from is not None)
        if self.is_main:
            self.metrics_file = MetricsFile(self.run_dir / rundir.METRICS)
            self.tracker.summary({f"data/{k}": v for k, v in self.data.stats.items()})

    def _setup_distributed(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
            # DeepSpeed picks its device from LOCAL_RANK (engine, zero.Init): the same GPU as ours.
            os.environ["LOCAL_RANK"] = str(self.device.index)
        # Compile what DeepSpeed will load (init_distributed loads the CPU comm op) once per node,
        # out of reach of stop signals.
        ops.build(ops.needed(self.cfg.optim.name, get_accelerator().device_name()), log.info)
        rendezvous.init_distributed(self.run_dir, self.env.rank, self.env.world_size,
                                    "nccl" if self.device.type == "cuda" else "gloo",
                                    datetime.timedelta(minutes=self.cfg.trainer.dist_timeout_min),
                                    self.cfg.cluster.get("master_port"))
        torch.manual_seed(self.cfg.seed)

    def _load_tokenizer(self) -> Tuple[str, Any]:
        """The model's path (a bundled model resolved) and its tokenizer, padding with EOS when it has no pad token."""
        from transformers import AutoTokenizer

        model_path = bundled.resolve(self.cfg.model.path)
        tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=self.cfg.model.trust_remote_code)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        return model_path, tokenizer

    def _load_data(self, tokenizer) -> Tuple[Any, int, int]:
        """The tokenised splits, the optimizer steps per epoch and in total."""
        cfg, env = self.cfg, self.env
        data = prepare_data(cfg.data, tokenizer, local_rank=env.local_rank, log=log.info)
        steps_per_epoch = len(data.train) // self.sp.data_parallel_size // self.rows_per_step
        if steps_per_epoch == 0:
            raise ValueError(
                f"the train split has {len(data.train)} sequences, fewer than one global batch "
                f"({self.ds_config['train_batch_size']}): lower trainer.global_batch_size or add data"
            )
        t = cfg.trainer
        total_steps = t.max_steps if t.max_steps is not None else t.epochs * steps_per_epoch
        if cfg.optim.warmup_steps > total_steps:
            raise ValueError(f"optim.warmup_steps={cfg.optim.warmup_steps}: must be <= total steps ({total_steps})")
        log.info("data: %s", data.stats)
        log.info("steps: %d per epoch, %d in total", steps_per_epoch, total_steps)
        return data, steps_per_epoch, total_steps

    def _record_start(self) -> None:
        rundir.append_event(self.run_dir, rundir.STARTED, rank=self.env.rank, restart=self.env.restarts,
                            total_steps=self.total_steps, world_size=self.env.world_size, nodes=self.env.nodes)

    def _find_resume_point(self) -> Tuple[Optional[Path], bool]:
        """The checkpoint to continue (None: none), checked against this run's fingerprint, and whether it
        loads in DeepSpeed's universal form (converted here: it was written by another number of ranks)."""
        if self.is_main:
            checkpoint.discard_partial(self.run_dir)
        resume = self.cfg.resume
        # A requeued job continues its own run, whatever resume= said for the first start.
        if self.env.requeued and checkpoint.latest_complete(self.run_dir):
            resume = "auto"
        resumed_from = checkpoint.find_resume_point(resume, self.run_dir)
        if resumed_from is None:
            return None, False
        info = checkpoint.marker_info(resumed_from)
        refused = refused_changes(info.get("fingerprint") or {}, self.fingerprint, list(self.cfg.checkpoint.allow_changes))
        if refused:
            raise ResumeError(f"{resumed_from} was written with other settings: " + "; ".join(
                f"{k}: {info['fingerprint'][k]!r} then, {self.fingerprint[k]!r} now" for k in refused))
        saved_world = info.get("world_size", self.env.world_size)
        if saved_world == self.env.world_size:
            return resumed_from, False
        log.info("%s was written by %d ranks; this run has %d: loading its universal form",
                 resumed_from, saved_world, self.env.world_size)
        universal.prepare(resumed_from, self.env, log.info)
        return resumed_from, True

    def _partition_at_load(self):
        """Under ZeRO-3, the config from_pretrained partitions each layer by as it loads (else None)."""
        from transformers.integrations import HfDeepSpeedConfig

        return HfDeepSpeedConfig(self.ds_config) if self.ds_config["zero_optimization"]["stage"] == 3 else None

    def _attention_layout(self) -> Tuple[str, bool, Optional[int]]:
        """The attention kernel, whether a micro-batch is one row, and the tokens each row is padded to."""
        attn = resolve_attn_implementation(str(self.cfg.model.attn_implementation), self.device.type, str(self.cfg.trainer.precision),
                                           sequence_parallel=self.sp.size)
        # Varlen kernels get each micro-batch as one row with explicit sequence boundaries; flex
        # compiles per shape, so its rows are padded to one length.
        one_row = attn in ONE_ROW_KERNELS
        row_tokens = self.micro_batch * self.cfg.data.seq_len if attn == "flex_attention" else None
        log.info("attention: %s (%s)", attn, "one row per micro-batch" if one_row else "one row per sequence")
        return attn, one_row, row_tokens

    def _load_model(self, model_path: str, attn: str) -> Tuple[Any, Any, int]:
        """The pretrained model, its loss head and its parameter count (whole, when ZeRO-3 partitions it)."""
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(
            model_path,
            dtype=DTYPES[self.cfg.trainer.precision],
            attn_implementation=attn,
            trust_remote_code=self.cfg.model.trust_remote_code,
        )
        if self.cfg.trainer.activation_checkpointing:
            enable_activation_checkpointing(model)
        model.config.use_cache = False
        # Mixture of experts: ZeRO-3 leaf blocks and the routers' outputs for the load-balancing loss (launcher.moe).
        self.routers = moe.find_routers(model, self.cfg.model.get("router_aux_loss_coef"))
        if self.cfg.trainer.get("tiled_mlp"):
            log.info("tiled MLP: %d layers", sequence_parallel.tile_mlps(model))
        # Ulysses' groups, for DeepSpeed's engine (None without sequence parallelism).
        # One-row kernels see a micro-batch as one row (launcher.data.collate): Ulysses checks that batch size.
        self.mpu = sequence_parallel.register(model, attn, self.sp.size, 1 if self.one_row else self.micro_batch)
        loss_head = install_loss_head(model, str(self.cfg.trainer.loss), self.cfg.trainer.loss_chunk_tokens)
        params = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
        if self.routers is not None:  # tokens/s and MFU count what a token runs through
            active = self.routers.active_params(params)
            log.info("mixture of experts: %d MoE layers, %d experts, %d per token; %d parameters, %d active per token; "
                     "router_aux_loss_coef %g", self.routers.layers, self.routers.experts, self.routers.top_k, params,
                     active, self.routers.coef)
            return model, loss_head, active
        return model, loss_head, params

    def _build_engine(self, model, total_steps: int) -> Tuple[Any, Any, Any]:
        """DeepSpeed's engine over the model, with the optimizer (launcher.optim) and the LR schedule."""
        o = self.cfg.optim
        schedule = lr_lambda(o.scheduler, o.warmup_steps, total_steps, o.min_lr_ratio)
        engine, optimizer, _, scheduler = deepspeed.initialize(
            model=model,
            optimizer=build_optimizer(o, model.named_parameters()),
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule),
            config=self.ds_config,
            mpu=self.mpu,
        )
        return engine, optimizer, scheduler

    def _load_checkpoint(self, resumed_from: Path, universal_form: bool) -> Tuple[int, bool]:
        """Load the resume point into the engine: the step it saved and whether that step's eval was due."""
        start = time.perf_counter()
        state = checkpoint.load(self.engine, resumed_from, self.env.rank, universal_form)
        log.info("resumed from %s at step %d in %.2f s", resumed_from, state["global_step"], time.perf_counter() - start)
        return state["global_step"], bool(state.get("eval_due"))

    def _start_tracking(self, resumed: bool):
        """The run's tracker (W&B on rank 0, a no-op elsewhere), continuing the W&B run of a resumed run."""
        config = OmegaConf.to_container(self.cfg, resolve=True)
        tracking = OmegaConf.to_container(self.cfg.tracking, resolve=True)
        tracking["api_key"] = None  # masked on disk; wandb reads WANDB_API_KEY from the environment
        if tracking["name"] is None:
            tracking["name"] = f"{self.cfg.name}/{self.run_dir.name}"
        config["data_stats"] = self.data.stats
        config["run"] = run_metadata(self.run_dir, self.env.world_size, self.fingerprint.get("launcher"))
        tracking["tags"] = [*tracking["tags"], *run_tags(config["run"])]
        with STOP.blocked():  # W&B's service process inherits the mask: Slurm's stop signals miss it
            # A requeued job continues its W&B run even when it stopped before its first checkpoint.
            return start_tracking(
                OmegaConf.create(tracking), self.run_dir, self.env.rank, config,
                resume=resumed or self.env.requeued, metrics=self.run_dir / rundir.METRICS,
            )

    # ---------------------------------------------------------------- data order
    def _epoch_indices(self, epoch: int) -> List[int]:
        """This rank's row order for an epoch: a function of (seed, epoch) only, so resume is exact."""
        if epoch not in self._epoch_cache:
            # Over data-parallel ranks: a sequence-parallel group shares its rows.
            sampler = DistributedSampler(
                self.data.train, num_replicas=self.sp.data_parallel_size, rank=self.sp.data_parallel_rank,
                shuffle=True, seed=self.cfg.seed, drop_last=True,
            )
            sampler.set_epoch(epoch)
            self._epoch_cache = {epoch: list(sampler)}
        return self._epoch_cache[epoch]

    def _step_batches(self, step: int) -> List[Dict[str, torch.Tensor]]:
        epoch, offset = divmod(step, self.steps_per_epoch)
        rows = self._epoch_indices(epoch)[offset * self.rows_per_step:(offset + 1) * self.rows_per_step]
        chunks = [rows[i:i + self.micro_batch] for i in range(0, len(rows), self.micro_batch)]
        return [self._batch([self.data.train[i] for i in chunk]) for chunk in chunks]

    def _batch(self, rows: List[dict]) -> Dict[str, Any]:
        """Collated rows on the device; targets and the trained-token count computed on the CPU."""
        batch = collate(rows, self.pad_id, one_row=self.one_row, pad_to=self.row_tokens, multiple_of=self.sp.size)
        batch["rows"] = len(rows)
        if self.sp.size > 1:  # this rank's shard of every row, its targets from the whole row
            batch = sequence_parallel.shard(batch, self.sp)
        return {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}

    # ---------------------------------------------------------------- train
    def train(self) -> int:
        """Steps until the end of the run or an agreed stop; eval, checkpoint and export at their cadence.
        Every rank checks for a stop at the same points: before each step, before and between eval
        batches, and after the last step's save (before the final eval and the export)."""
        try:
            return self._train()
        except StopAgreed as stop:
            return self._end(rundir.STOPPED, requeue=stop.requeue)

    def _train(self) -> int:
        cfg = self.cfg
        peak = device_peak_flops()
        self.engine.train()
        # A stop that came during start-up (imports, compiling, tokenising, loading) ends the run
        # here, before the first eval and step, the way a stop at a step boundary does.
        self._check_stop()
        progress = self._progress()
        if self.global_step == 0 and cfg.eval.every_steps:
            self._eval_this_step()
        elif self.eval_due and self.global_step < self.total_steps:  # the last segment stopped in this step's eval
            log.info("running step %d's eval, which the last segment gave up for a stop", self.global_step)
            self._eval_this_step()
            if self._stops_at_rung():
                return self._end(rundir.PAUSED)
        if self._harness_export_missed():  # the last segment stopped between this step's save and its export
            self._export_for_harness()
        if self.is_main and self.global_step < self.total_steps:  # steps to train: an earlier final eval is not of these weights
            (self.run_dir / rundir.FINAL_EVAL).unlink(missing_ok=True)
        window = LogWindow(self.device, self.env.world_size)
        # The logged peak is the training's, not start-up's.
        log.info("memory held before training: %.3f GiB", reset_peak_memory())
        comms_at_start, steps_at_start = None, self.global_step
        while self.global_step < self.total_steps:
            data_start = time.perf_counter()
            batches = self._step_batches(self.global_step)
            data_wait = time.perf_counter() - data_start
            # One collective per step: the global trained-token count, whether any rank was signalled
            # and whether any was asked to requeue (USR2): every rank acts on the same answer.
            agree = self._sum_over_ranks(torch.tensor(
                [sum(b["trained"] for b in batches), bool(self.stop), self.stop.requeue], dtype=torch.float64))
            if agree[1] > 0:
                raise StopAgreed(agree[2] > 0)
            lr = self.scheduler.get_last_lr()[0]  # the rate this step uses
            window.begin_step()
            self._train_step(batches, agree[0].item(), window)
            window.end_step(agree[0].item(), data_wait)
            self.global_step += 1
            if self.global_step == steps_at_start + 1:  # DeepSpeed traces the module order in the first step
                comms_at_start = comms_bytes()
            if progress:
                progress.update(progress.task_ids[0], completed=self.global_step)
            rung = self._at_rung()  # a rung's verdict needs its train row and its eval
            if self.global_step % cfg.trainer.log_every == 0 or self.global_step == self.total_steps or rung:
                self._log_train(window, lr, peak, progress)
                window.reset()
            every = cfg.eval.every_steps
            if ((every and self.global_step % every == 0) or rung) and self.global_step < self.total_steps:
                self._eval_this_step()
            if self._stops_at_rung():
                return self._end(rundir.PAUSED)
            if cfg.checkpoint.every_steps and self.global_step % cfg.checkpoint.every_steps == 0:
                self.save_checkpoint()
                if self._scores_checkpoints() and self.global_step < self.total_steps:
                    self._export_for_harness()  # the last step's eval runs on export/
                if self.stop.grow_check is not None and self.global_step < self.total_steps and self.stop.grow_check():
                    log.warning("more of the node range is idle than this run holds: stopping at step %d (saved) "
                                "to requeue on more nodes", self.global_step)
                    self.stop.ask_to_grow()  # agreed at the next step boundary, as a USR2
        if progress:
            progress.stop()
        write_comms_report(self.run_dir, self.env.rank, comms_at_start, self.global_step - steps_at_start - 1)
        return self._end(rundir.COMPLETED)

    def _train_step(self, batches: List[Dict[str, Any]], global_trained: float, window: LogWindow) -> None:
        """One optimizer step over this rank's micro-batches; the losses stay on the device."""
        for batch in batches:
            summed, objective, routing = self.micro_batch_loss(batch, global_trained)
            self.engine.backward(objective)
            self.engine.step()
            window.add_micro_batch(summed, batch, routing)

    def micro_batch_loss(self, batch: Dict[str, Any], global_trained: float):
        """A micro-batch's summed loss, what backward takes, and for MoE models (this rank's share of the
        load-balancing loss, the selections per MoE layer and expert); None for a dense model.

        DeepSpeed averages gradients over ranks and accumulation steps. The loss is scaled to undo both,
        so its gradient is the mean over every trained token of the global batch. The ranks' aux shares
        sum to the micro-step's aux loss, so scaled by the world size only, it is averaged over accumulation steps."""
        world = self.env.world_size
        with moe.capturing(self.routers):
            summed = token_loss_sum(self.engine, self.loss_head, batch)
        objective = summed * (world * self.accum / max(global_trained, 1))
        if self.routers is None:
            return summed, objective, None
        aux, counts = moe.load_balancing(self.routers, self.routers.take(), batch["loss_index"])
        return summed, objective + self.routers.coef * world * aux, (aux, counts)

    def _log_train(self, window: LogWindow, lr: float, peak: Optional[float], progress) -> None:
        row = {
            "step": self.global_step,
            "epoch": self.global_step / self.steps_per_epoch,
            **window.row(self.n_params, peak),
            "lr": lr,
            "grad_norm": _float(self.engine.get_global_grad_norm()),
            "samples_seen": self.global_step * self.ds_config["train_batch_size"],
            # This segment's ranks (an elastic run's vary by start): tokens/s and MFU above are theirs.
            "world_size": self.env.world_size,
        }
        self._log("train", row)
        if progress:
            progress.update(progress.task_ids[0], description=f"loss {row['loss']:.4f}  {row['tokens_per_s']:.0f} tok/s")

    def _final_eval(self) -> Dict[str, float]:
        """The final eval (and the last rung's report), or its result from the segment that ran it."""
        done = self.run_dir / rundir.FINAL_EVAL
        earlier = json.loads(done.read_text()) if self.is_main and done.is_file() else {}
        # Rank 0 alone reads it (it alone writes the summary) and tells the others.
        ran = self._sum_over_ranks(torch.tensor([float(earlier.get("step") == self.global_step)], dtype=torch.float64))
        if ran[0] > 0:
            log.info("the final eval of step %d ran in an earlier segment", self.global_step)
            return earlier.get("result", {})
        final = self._eval_this_step()
        if self._at_rung():
            self._judge_rung()  # the end: reported, never pruned
        if self.is_main:
            write_text_atomic(done, json.dumps({"step": self.global_step, "result": final}) + "\n")
        return final

    def _eval_this_step(self) -> Dict[str, float]:
        """Evaluate and log; a checkpoint saved while it runs (a stop gave it up) records it as due."""
        self.eval_due = True
        result = self.evaluate()
        self._log_eval(result)
        self.eval_due = False
        return result

    def _check_stop(self) -> None:
        """A collective: every rank raises StopAgreed when any rank got a stop signal."""
        agree = self._sum_over_ranks(torch.tensor([bool(self.stop), self.stop.requeue], dtype=torch.float64))
        if agree[0] > 0:
            raise StopAgreed(agree[1] > 0)

    # ---------------------------------------------------------------- the search's rungs
    def _at_rung(self) -> bool:
        """This step is a rung of a search's trial: its train row and its eval are logged for the verdict."""
        return self.trial is not None and self.trial.is_rung(self.global_step)

    def _stops_at_rung(self) -> bool:
        """The search's hook, once per step after its eval: at a rung before the last step, the trial's
        verdict (launcher.trial.rungs); True when the trial stops here. The last step's rung is judged
        in the final eval: reported, never pruned."""
        return self._at_rung() and self.global_step < self.total_steps and self._judge_rung()

    def _judge_rung(self) -> bool:
        """Rank 0 reports the rung's metric to the search's study; every rank gets its verdict."""
        verdict = float(RungVerdict.TRAIN_ON)
        if self.is_main:
            try:
                verdict = float(RungVerdict.STOP if self.trial.judge(self.global_step, self.last_rows) else RungVerdict.TRAIN_ON)
            except SweepMetricError:
                verdict = float(RungVerdict.NO_METRIC)
            except Exception:  # noqa: BLE001 - every rank must leave the collective below, and all fail alike
                log.exception("the search's study could not judge rung step %d", self.global_step)
                verdict = float(RungVerdict.NO_STUDY)
        verdict = self._sum_over_ranks(torch.tensor([verdict], dtype=torch.float64))[0].item()
        if verdict == RungVerdict.NO_METRIC:
            raise SweepMetricError(f"sweep.metric={self.trial.metric!r} is not logged at rung step {self.global_step} "
                                   f"(see {self.run_dir / rundir.TRIAL_END})")
        if verdict == RungVerdict.NO_STUDY:
            raise RuntimeError(f"the search's study could not judge rung step {self.global_step} (rank 0's log says why)")
        return verdict == RungVerdict.STOP

    # ---------------------------------------------------------------- the end of a segment
    def _end(self, reason: str, requeue: bool = False) -> int:
        """How every segment ends, `reason` one of rundir's events: COMPLETED (trained to the end),
        STOPPED (a stop signal every rank agreed on; `requeue`: a USR2 asked to start again) or PAUSED
        (a search's trial not in the best at its rung: stopped as a stopped run is, not requeued; the
        search resumes it if later trials rank it among the best, else prunes it). In order: the step
        saved unless it is, W&B's summary, its finish, the run's event; returns the exit code."""
        end_reason, wandb_exit, exit_code = ENDINGS[reason]
        if reason == rundir.STOPPED:  # the summary before the save
            self.stop.agreed_requeue = requeue
            if requeue and not self.stop.grow and self.env.restarts >= self.cfg.cluster.max_requeues and self.env.under_slurm:
                self.tracker.alert("requeues exhausted", f"{self.run_dir}: stopped at step {self.global_step} after "
                                   f"{self.env.restarts} requeues (cluster.max_requeues); resume it by hand")
            signame = signal.Signals(self.stop.signum).name if self.stop.signum else None
            self.tracker.summary({"end_reason": end_reason, "stop_signal": signame, "stopped_at_step": self.global_step})
        self._save_at_end(reason)
        if reason == rundir.COMPLETED:
            # After the last checkpoint (a stop agreed in what follows loses no step, and ends the
            # segment stopped: the next one finds the run trained to the end and does what is left).
            final = self._final_eval()
            if self.cfg.checkpoint.export:
                self._check_stop()
                self.export()
                if self.is_main and self.cfg.eval.harness.tasks:
                    self._harness_ready(self.global_step, self.run_dir / rundir.EXPORT)
            if self.is_main:
                export = str(self.run_dir / rundir.EXPORT) if self.cfg.checkpoint.export else None
                self.tracker.summary({**{f"final/{k}": v for k, v in final.items()}, "end_reason": end_reason, "export_path": export})
        if reason == rundir.PAUSED:  # a resumed segment starts with the config's tags again
            self.tracker.add_tags(["pruned"])
            self.tracker.summary({"end_reason": end_reason, "stopped_at_rung": self.global_step})
        if reason == rundir.STOPPED:
            rundir.append_event(self.run_dir, rundir.STOPPED, rank=self.env.rank, signal=signame, step=self.global_step,
                                saved=self.last_saved_step == self.global_step)
        # W&B first, then the requeue: the requeue's SIGTERM reaches W&B's service too, and a service
        # killed mid-write loses the segment. The wait is bounded (tracking.finish_timeout_s), and the
        # plan's stop window counts it.
        self.tracker.finish(exit_code=wandb_exit)
        if reason == rundir.STOPPED:
            if self.stop.requeue_job is not None:
                self.stop.requeue_job()
            return exit_code
        if self.is_main:
            trial = {"trial": self.trial.number} if reason == rundir.PAUSED else {}
            rundir.append_event(self.run_dir, reason, step=self.global_step, **trial)
        if reason == rundir.COMPLETED and self.stop:
            # during the export or W&B's finish: the run is complete, whatever the signal asked
            log.warning("a stop signal arrived during the export: the run is complete, not stopped")
        return exit_code

    def _save_at_end(self, reason: str) -> None:
        """The last checkpoint of a segment, unless its step is saved already (or, stopped, none was trained)."""
        if reason == rundir.STOPPED:
            if self.global_step == 0:  # nothing trained yet: a restart starts from scratch all the same
                log.warning("stop signal received before the first step: exiting without a checkpoint (%d)", EXIT_STOPPED)
                return
            if self.last_saved_step == self.global_step:
                log.warning("stop signal received: step %d is saved already; exiting (%d)", self.global_step, EXIT_STOPPED)
                return
            log.warning("stop signal received: saving a checkpoint at step %d and exiting (%d)", self.global_step, EXIT_STOPPED)
        if reason == rundir.PAUSED:
            log.warning("trial %d stops at rung step %d, not in the best so far: saving a checkpoint and exiting (%d); "
                        "the search resumes it if later trials rank it among the best", self.trial.number,
                        self.global_step, EXIT_STOPPED)
        if self.last_saved_step != self.global_step:
            self.save_checkpoint()

    # ---------------------------------------------------------------- evaluate
    @torch.no_grad()
    def evaluate(self) -> Dict[str, float]:
        """Eval loss and perplexity over the held-out split; generation accuracy when asked."""
        if self.data.eval is None or len(self.data.eval) == 0:
            return {}
        self.engine.eval()
        world, rank, n = self.sp.data_parallel_size, self.sp.data_parallel_rank, len(self.data.eval)
        # Every rank runs the same number of forwards (ZeRO-3 gathers are collective); rows past
        # the end are padding with no trained token. A sequence-parallel group shares its rows.
        per_rank = -(-n // world)
        if self.sp.size > 1:  # Ulysses expects micro_batch_size rows in every forward
            per_rank = -(-per_rank // self.micro_batch) * self.micro_batch
        rows = list(range(rank, per_rank * world, world))
        batches = [rows[i:i + self.micro_batch] for i in range(0, len(rows), self.micro_batch)]
        if self.cfg.eval.max_batches:
            batches = batches[:self.cfg.eval.max_batches]
        loss_sum, trained = torch.zeros((), dtype=torch.float64, device=self.device), 0
        for chunk in batches:
            self._check_stop()  # the same count of batches on every rank: they agree at the same points
            items = []
            for i in chunk:
                row = dict(self.data.eval[i % n])
                if i >= n:
                    row["labels"] = [-100] * len(row["labels"])
                items.append(row)
            batch = self._batch(items)
            loss_sum += token_loss_sum(self.engine, self.loss_head, batch)
            trained += batch["trained"]
        totals = self._sum_over_ranks(torch.stack([loss_sum, torch.tensor(float(trained), dtype=torch.float64, device=self.device)]))
        loss = totals[0].item() / max(totals[1].item(), 1)
        result = {"loss": loss, "perplexity": math.exp(min(loss, 50))}
        if self.cfg.eval.generate_samples and self.data.eval_prompts:
            result["accuracy"] = self._generation_accuracy()
        self.engine.train()
        return result

    def _generation_accuracy(self) -> float:
        """Exact match of greedy answers on the first N eval prompts, split over ranks."""
        prompts = self.data.eval_prompts[: self.cfg.eval.generate_samples]
        world, rank = self.env.world_size, self.env.rank
        per_rank = -(-len(prompts) // world)
        mine = [(i, prompts[i % len(prompts)]) for i in range(rank, per_rank * world, world)]
        tok = self.tokenizer
        correct = 0
        for start in range(0, len(mine), 16):
            self._check_stop()
            chunk = mine[start:start + 16]
            texts = [tok.apply_chat_template(p["messages"], tokenize=False, add_generation_prompt=True) for _, p in chunk]
            tok.padding_side = "left"
            enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
            tok.padding_side = "right"
            with sequence_parallel.whole_rows(self.engine.module):  # each rank decodes its own prompts
                out = self.engine.module.generate(
                    **enc, max_new_tokens=self.cfg.eval.max_new_tokens, do_sample=False, pad_token_id=self.pad_id,
                    synced_gpus=world > 1 and self.ds_config["zero_optimization"]["stage"] == 3,
                )
            answers = tok.batch_decode(out[:, enc["input_ids"].size(1):], skip_special_tokens=True)
            correct += sum(i < len(prompts) and a.strip() == p["answer"].strip() for (i, p), a in zip(chunk, answers))
        return self._sum_over_ranks(torch.tensor([correct], dtype=torch.float64)).item() / len(prompts)

    def _sum_over_ranks(self, values: torch.Tensor) -> torch.Tensor:
        """All-reduce a small CPU tensor on the training device (NCCL takes no CPU tensors)."""
        on_device = values.to(self.device)
        dist.all_reduce(on_device)
        return on_device.cpu()

    # ---------------------------------------------------------------- checkpoint, export
    def save_checkpoint(self) -> None:
        start = time.perf_counter()
        path = checkpoint.save(
            self.engine, self.run_dir, self.global_step, self.env.rank, self.env.world_size,
            {"global_step": self.global_step, "eval_due": self.eval_due},
            {**self.fingerprint, "world_size": self.env.world_size, "micro_batch_size": self.micro_batch},
        )
        self.last_saved_step = self.global_step
        seconds = time.perf_counter() - start
        if self.is_main:
            checkpoint.prune(self.run_dir, self.cfg.checkpoint.keep)
            self._log("checkpoint", checkpoint_row(Path(path), self.global_step, seconds, self.env.nodes))
        log.info("checkpoint %s saved in %.2f s", path, seconds)

    def export(self, out: Optional[Path] = None) -> Optional[Path]:
        dtype = export_dtype(self.cfg.checkpoint.export_dtype)
        return export_model(self.engine, self.tokenizer, out or self.run_dir / rundir.EXPORT, dtype, self.env.rank)

    def _scores_checkpoints(self) -> bool:
        h = self.cfg.eval.harness
        return bool(h.tasks) and h.every_checkpoint and bool(self.cfg.checkpoint.every_steps)

    def _harness_export_missed(self) -> bool:
        """A cadence checkpoint this segment resumed from whose model was never exported for its eval
        (a stop during the step's eval, a node lost after the save); rank 0 decides for all."""
        every = self.cfg.checkpoint.every_steps
        if not self._scores_checkpoints() or not 0 < self.global_step < self.total_steps or self.global_step % every:
            return False
        missed = self.is_main and harness_results.read_state(harness_results.step_dir(self.run_dir, self.global_step)) is None
        return self._sum_over_ranks(torch.tensor([float(missed)], dtype=torch.float64))[0].item() > 0

    def _export_for_harness(self) -> None:
        """A checkpoint's benchmark evals (eval.harness.every_checkpoint) run on a Hugging Face model of
        it, written by the same export as the final one; its eval job deletes it once scored. Rank 0's
        write failing (a full disk) is the eval's failure, not the run's: the gather before it is
        every rank's, and done."""
        start = time.perf_counter()
        folder = harness_results.step_dir(self.run_dir, self.global_step)
        try:
            out = self.export(folder / harness_results.MODEL)
        except OSError as error:
            log.exception("the model of step %d could not be written for its benchmark evals", self.global_step)
            harness_results.write_json(folder / harness_results.FAILED, {
                "step": self.global_step, "error": f"not exported: {type(error).__name__}: {error}"[:2000],
                "log": str(rundir.rank_log(self.run_dir, self.env.rank))})
            return
        if self.is_main:
            log.info("exported step %d for its benchmark evals in %.2f s", self.global_step, time.perf_counter() - start)
            self._harness_ready(self.global_step, out)

    def _harness_ready(self, step: int, model: Path) -> None:
        harness_results.mark_ready(self.run_dir, step, model)
        if self.on_eval_model is not None:
            try:
                self.on_eval_model(step)
            except Exception as error:  # noqa: BLE001 - an eval that cannot be submitted is the eval's failure, not the run's
                log.exception("the benchmark eval of step %d could not be submitted", step)
                harness_results.write_json(harness_results.step_dir(self.run_dir, step) / harness_results.FAILED, {
                    "step": step, "error": f"not submitted: {type(error).__name__}: {error}"[:2000],
                    "log": str(rundir.rank_log(self.run_dir, 0)),
                    "retry": f"python -m launcher.harness {self.run_dir} {step} (here, or in a job of your own)"})

    # ---------------------------------------------------------------- logging, cleanup
    def _log(self, kind: str, row: Dict[str, Any]) -> None:
        if not self.is_main:
            return
        self.metrics_file.write({"kind": kind, **row})
        self.last_rows[kind] = row
        if kind == "train" and not math.isfinite(row["loss"]) and not self._alerted_nonfinite:
            self._alerted_nonfinite = True
            self.tracker.alert("loss is not finite", f"{self.run_dir}: train loss {row['loss']} at step {row['step']}")
        self.tracker.log(wandb_row({"kind": kind, **row}), step=row["step"])
        shown = "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items() if v is not None)
        log.info("%s %s", kind, shown)

    def _log_eval(self, result: Dict[str, float]) -> None:
        if result:
            self._log("eval", {"step": self.global_step, **result})

    def _progress(self):
        if not (self.is_main and os.isatty(2)):
            return None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
        progress.add_task("training", total=self.total_steps, completed=self.global_step)
        progress.start()
        return progress

    def cleanup(self) -> None:
        if self.metrics_file:
            self.metrics_file.close()
        if self.engine is not None:
            self.engine.destroy()
        if dist.is_initialized():
            dist.destroy_process_group()


def enable_activation_checkpointing(model) -> None:
    """Non-reentrant, per decoder layer; transformers renamed the call (gradient_ goes in v6)."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _float(value) -> Optional[float]:
    return None if value is None else float(value)


# ---------------------------------------------------------------- plan calibration: what the plan's predictions are checked against
def checkpoint_row(path: Path, step: int, seconds: float, nodes: int) -> Dict[str, Any]:
    """The metrics row of a checkpoint save: its write speed per node is what the plan's stop-window
    check uses on the next submission of this run."""
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return {"step": step, "seconds": seconds, "gb": size / 1e9, "write_gb_s_per_node": size / 1e9 / nodes / max(seconds, 1e-9)}


def write_comms_report(run_dir: Path, rank: int, at_start: Optional[Dict[str, int]], steps: int) -> None:
    """With DeepSpeed's comms logger on, what this rank's collectives moved per optimizer step in
    steady state (after the first step, not eval, save or export): comms/rank-N.json, the
    measurement the plan's bytes are checked against."""
    if at_start is None or not steps:
        return
    moved = {op: n - at_start.get(op, 0) for op, n in comms_bytes().items()}
    (run_dir / "comms").mkdir(exist_ok=True)
    report = {"optimizer_steps": steps, "message_bytes": {op: n for op, n in moved.items() if n}}
    (run_dir / "comms" / f"rank-{rank}.json").write_text(json.dumps(report, indent=1))


def comms_bytes() -> Optional[Dict[str, int]]:
    """Message bytes per collective so far, as DeepSpeed's comms logger counts them; None when it is off."""
    from deepspeed.comm.comm import comms_logger

    if not comms_logger.enabled:
        return None
    return {op: sum(size * record[0] for size, record in sizes.items()) for op, sizes in comms_logger.comms_dict.items()}
