"""GPU check: a ~1B Llama (Llama 3.2 1B shapes, random init) trained with DeepSpeed ZeRO-3 on one device,
through the launcher's own batch and loss code, once per attention kernel; speed, memory, and losses
that must agree between kernels. Whole run < 8 minutes on one H200.

    python -m tests.gpu.gpu_check                 # from the repo root
    python -m tests.gpu.gpu_check --tiny          # CPU-size shapes (eager + sdpa, fp32), ~20 s

Under pytest: tests/gpu/test_gpu_kernels.py runs it at full size where a CUDA GPU is present (skipped
without one), tests/integration/test_gpu_check.py at CPU size (--tiny).

On the device machine (deepspeed, hydra & co. travel as wheels; build .whl/ here first with
shared/tools/gpu-wheels.sh), the command line of `run(carry=[".whl"], command=...)`:

    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD && python3 -m tests.gpu.gpu_check

What runs, per attention implementation (flash_attention_2 if the flash-attn package is installed,
flex_attention, sdpa on CUDA; eager and sdpa on CPU; --impls to choose, eager only when asked):
the model is rebuilt from the same initial weights, trained N steps (the first --warmup excluded
from timing) on the same synthetic packed rows (random token ids, examples of random lengths back
to back, position_ids restarting per example, labels = input ids), each micro-batch laid out by
launcher.data.collate as the trainer lays it out for that kernel (one row with sequence boundaries
for ONE_ROW_KERNELS, flex padded to micro_batch x seq_len), the loss from launcher.loss
(chunked LossHead, token_loss_sum), backward on summed / trained tokens, engine.step().

Printed per implementation: tokens/s, MFU (6 x params x tokens/s over the device's dense bf16 peak
from launcher.devices; n/a on CPU), peak memory (torch.cuda.max_memory_allocated, reset per
implementation; on CPU the process's peak resident memory since start) and the losses of the first 3
steps. Then PASS or FAIL: first-step losses of all implementations agree (relative difference below
2e-2 in bf16, 1e-5 in fp32) and no implementation failed; exit 1 on FAIL. The last line of stdout
is one JSON object with every number, also written to $OUT/gpu_check.json when OUT is set.

At random init attention barely moves the loss, so agreeing first losses catch a kernel that
fails, diverges or returns garbage, not a masking error. Isolation is checked on logits: before
training, the first tokens of each packed example against the example alone (must agree within
the precision's tolerance, relative to the largest logit), and against a control row whose
position ids run on with no boundaries, so examples see each other (must differ ten times more).
"""

import argparse
import gc
import json
import math
import os
import platform
import random
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Dict, List, Optional

SEED = 1234

# Llama 3.2 1B: 1.24 B parameters (embeddings tied).
LLAMA_1B = dict(
    vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
    num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=131072,
    rms_norm_eps=1e-5, tie_word_embeddings=True,
    rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "high_freq_factor": 4.0,
                     "low_freq_factor": 1.0, "original_max_position_embeddings": 8192},
)
TINY = dict(
    vocab_size=512, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=2048,
    rms_norm_eps=1e-5, tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
)
TOLERANCE = {"bf16": 2e-2, "fp32": 1e-5}
IMPLS = ("flash_attention_2", "flex_attention", "sdpa", "eager", "auto")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tests.gpu.gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true",
                   help="CPU-size shapes: hidden 64, 2 layers, vocab 512, seq 256, 3 steps, fp32, eager+sdpa")
    p.add_argument("--steps", type=int, help="optimizer steps per implementation (default 30; --tiny 3)")
    p.add_argument("--warmup", type=int, help="first steps excluded from timing (default 5; --tiny 1)")
    p.add_argument("--seq-len", type=int, help="tokens per packed row (default 4096; --tiny 256)")
    p.add_argument("--micro-batch", type=int, default=1, help="rows per step (default 1)")
    p.add_argument("--impls", help="comma list of flash_attention_2, flex_attention, sdpa, eager, auto "
                                   "(default: flash_attention_2 if flash-attn is installed, flex_attention, sdpa on "
                                   "CUDA; eager,sdpa on CPU)")
    p.add_argument("--precision", choices=("bf16", "fp32"), help="default bf16; --tiny fp32")
    p.add_argument("--optim", choices=("adamw", "fused_adam"), default="adamw",
                   help="torch.optim.AdamW, or DeepSpeed's FusedAdam (CUDA; compiles its op on first use)")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--checkpointing", action="store_true", help="activation checkpointing, as trainer.activation_checkpointing")
    p.add_argument("--loss-chunk-tokens", type=int, default=1024, help="trainer.loss_chunk_tokens")
    args = p.parse_args(argv)
    defaults = dict(steps=3, warmup=1, seq_len=256, precision="fp32") if args.tiny else \
        dict(steps=30, warmup=5, seq_len=4096, precision="bf16")
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.steps < 2:
        p.error("--steps must be at least 2 (one warm-up, one timed)")
    unknown = [n for n in (args.impls or "").split(",") if n.strip() and n.strip() not in IMPLS]
    if unknown:
        p.error(f"--impls: unknown {', '.join(unknown)}; choose from {', '.join(IMPLS)}")
    args.warmup = max(0, min(args.warmup, args.steps - 1))
    return args


def single_rank_env() -> None:
    """A world of one, so a plain `python -m` runs what torchrun would start."""
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    if "MASTER_PORT" not in os.environ:  # not torchrun: rank 0 takes a port the OS gives (launcher.rendezvous)
        from launcher.rendezvous import RENDEZVOUS_ENV, new_attempt_id

        os.environ.setdefault(RENDEZVOUS_ENV, new_attempt_id())
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded; never try


def synthetic_rows(n_rows: int, seq_len: int, vocab: int, seed: int) -> List[Dict[str, List[int]]]:
    """Packed rows of exactly seq_len: examples of random lengths (100..2000 tokens at 4k) back to
    back, the last one cut to fit; positions restart at 0 per example; labels = input ids."""
    rng = random.Random(seed)
    lo, hi = min(100, max(1, seq_len // 8)), min(2000, max(1, seq_len // 2))
    rows = []
    for _ in range(n_rows):
        ids: List[int] = []
        positions: List[int] = []
        while len(ids) < seq_len:
            n = min(rng.randint(lo, hi), seq_len - len(ids))
            ids += [rng.randrange(vocab) for _ in range(n)]
            positions += range(n)
        rows.append({"input_ids": ids, "labels": list(ids), "position_ids": positions})
    return rows


def default_impls(device_type: str, precision: str) -> List[str]:
    from importlib.util import find_spec

    from launcher.attention import attention_problems

    if device_type != "cuda":
        return ["eager", "sdpa"]
    names = (["flash_attention_2"] if find_spec("flash_attn") else []) + ["flex_attention", "sdpa"]
    return [n for n in names if not attention_problems(n, device_type, precision)]


def ds_config(micro_batch: int, precision: str) -> Dict[str, Any]:
    """What launcher.plan.deepspeed_config writes for deepspeed=zero3 with the schema's defaults
    (written out here: launcher.plan imports omegaconf)."""
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": 1,
        "train_batch_size": micro_batch,
        "gradient_clipping": 1.0,
        "zero_optimization": {
            "stage": 3, "overlap_comm": True, "contiguous_gradients": True, "reduce_bucket_size": 50_000_000,
            "stage3_param_persistence_threshold": 100_000, "stage3_gather_16bit_weights_on_model_save": True,
        },
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": False},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


class Check:
    def __init__(self, args: argparse.Namespace):
        import torch

        self.args = args
        self.device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
        self.dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
        from launcher.data import collate

        self.collate = collate
        self.initial_state: Optional[Dict[str, Any]] = None
        self.n_params = 0
        self.shape = TINY if args.tiny else LLAMA_1B
        self.rows = synthetic_rows(args.steps * args.micro_batch, args.seq_len, self.shape["vocab_size"], SEED)

    def setup(self) -> None:
        import datetime
        import tempfile

        import torch
        from deepspeed.accelerator import get_accelerator

        from launcher import ops, rendezvous

        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        accelerator = get_accelerator().device_name()
        if accelerator == "cpu" and int(os.environ["WORLD_SIZE"]) == 1:
            # The CPU comm op only speeds up collectives between the ranks of a host, and a world of one
            # has none; compiling it takes 20-100 s. DeepSpeed (and launcher.ops) load it only where
            # this table says it is compatible.
            import deepspeed.ops

            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        # As the trainer: DeepSpeed's ops this run loads (FusedAdam's with --optim fused_adam), built once per host.
        ops.build(ops.needed(self.args.optim, accelerator), lambda m: print(m, flush=True))
        rendezvous.init_distributed(Path(tempfile.mkdtemp(prefix="gpu-check-")), int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]),
                                    "nccl" if self.device.type == "cuda" else "gloo", datetime.timedelta(minutes=10))

    def build_model(self, impl: str):
        import torch
        from transformers import AutoModelForCausalLM, LlamaConfig

        config = LlamaConfig(**self.shape, use_cache=False)
        torch.manual_seed(SEED)
        with torch.device(self.device):  # random init where it trains: seconds for 1B on a GPU
            model = AutoModelForCausalLM.from_config(config, dtype=self.dtype, attn_implementation=impl)
        if self.initial_state is None:
            self.initial_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
            self.n_params = sum(p.numel() for p in model.parameters())  # tied embeddings counted once
        else:
            model.load_state_dict(self.initial_state)  # the same weights for every implementation
        if model.config._attn_implementation != impl:
            raise RuntimeError(f"asked for {impl}, the model runs {model.config._attn_implementation}")
        if self.args.checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return model

    def optimizer(self, model):
        import torch

        decay, no_decay = [], []
        for name, param in model.named_parameters():
            (no_decay if name.endswith("bias") or "norm" in name else decay).append(param)
        groups = [{"params": decay, "weight_decay": 0.0}, {"params": no_decay, "weight_decay": 0.0}]
        kwargs = dict(lr=self.args.lr, betas=(0.9, 0.95), eps=1e-8)
        if self.args.optim == "fused_adam":
            from deepspeed.ops.adam import FusedAdam

            return FusedAdam(groups, adam_w_mode=True, **kwargs)
        return torch.optim.AdamW(groups, **kwargs)

    def run(self, impl: str) -> Dict[str, Any]:
        import deepspeed
        import torch

        from launcher.attention import ONE_ROW_KERNELS
        from launcher.loss import install_loss_head, token_loss_sum
        from launcher.metrics import mfu, peak_memory_gib

        args, device = self.args, self.device
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        # The trainer's layout for this kernel (SFTTrainer._attention_layout and _batch).
        one_row = impl in ONE_ROW_KERNELS
        pad_to = args.micro_batch * args.seq_len if impl == "flex_attention" else None
        batches = [self.collate(self.rows[i:i + args.micro_batch], 0, one_row=one_row, pad_to=pad_to)
                   for i in range(0, len(self.rows), args.micro_batch)]

        start = time.perf_counter()
        engine = None
        try:
            model = self.build_model(impl)
            head = install_loss_head(model, "chunked", args.loss_chunk_tokens)
            engine, _, _, _ = deepspeed.initialize(model=model, optimizer=self.optimizer(model),
                                                   config=ds_config(args.micro_batch, args.precision))
            del model
            isolation = self.isolation(engine, self.rows[:args.micro_batch], one_row, pad_to)
            engine.train()
            sync()
            setup_s = time.perf_counter() - start

            losses, step_ends = [], []
            tokens = trained = 0
            t0 = time.perf_counter()
            for step, cpu_batch in enumerate(batches):
                if step == args.warmup:
                    sync()
                    timed_start = time.perf_counter()
                batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in cpu_batch.items()}
                summed = token_loss_sum(engine, head, batch)
                engine.backward(summed / max(batch["trained"], 1))
                engine.step()
                losses.append(summed.detach() / max(batch["trained"], 1))
                if step >= args.warmup:
                    tokens += batch["input_ids"].numel()
                    trained += batch["trained"]
                if step < args.warmup or step == len(batches) - 1:
                    sync()
                    step_ends.append(time.perf_counter())
            timed_s = step_ends[-1] - timed_start
            losses = [float(x) for x in torch.stack(losses).float().cpu()]
            timed_steps = len(batches) - args.warmup
            tokens_per_s = tokens / timed_s
            return {
                "tokens_per_s": tokens_per_s,
                "trained_tokens_per_s": trained / timed_s,
                "step_s": timed_s / timed_steps,
                "mfu": mfu(self.n_params, tokens_per_s, self.peak_flops),
                "peak_mem_gib": peak_memory_gib(),  # launcher.metrics: the current GPU's, or the process's RSS
                "losses": losses[:3],
                "final_loss": losses[-1],
                "all_losses": losses,
                "setup_s": setup_s,
                "warmup_s": (step_ends[args.warmup - 1] - t0) if args.warmup else 0.0,
                "timed_steps": timed_steps,
                "layout": "one row" if one_row else "rows",
                "isolation": isolation,
            }
        finally:
            if engine is not None and hasattr(engine, "destroy"):
                try:
                    engine.destroy()
                except Exception as error:  # the measurement stands; say what may be left behind
                    print(f"{impl}: engine.destroy() failed: {type(error).__name__}: {error}", file=sys.stderr)
            del engine
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()

    def isolation(self, engine, rows: List[Dict[str, List[int]]], one_row: bool, pad_to: Optional[int]) -> Dict[str, Any]:
        """Whether packed examples stay apart in this kernel, from logits rather than the loss (which
        random init makes blind to attention): the first tokens of each example packed against the
        example alone, and against a row where position ids run on and no boundaries are given, so
        examples see each other (the negative control, which must differ clearly)."""
        import torch

        from launcher.loss import MODEL_INPUTS

        first = 16
        engine.eval()

        def logits(batch):
            inputs = {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in batch.items() if k in MODEL_INPUTS}
            return engine(**inputs, use_cache=False).logits.float()

        with torch.no_grad():
            packed = self.collate(rows, 0, one_row=one_row, pad_to=pad_to)
            leaky = {k: v for k, v in packed.items() if not k.startswith(("cu_seq_lens", "max_length"))}
            leaky["position_ids"] = torch.arange(packed["input_ids"].size(1)).expand_as(packed["input_ids"]).contiguous()
            got, leaked = logits(packed), logits(leaky)
            diff = leak = scale = 0.0
            for r, positions in enumerate(packed["position_ids"].tolist()):
                starts = [i for i, p in enumerate(positions) if p == 0] + [len(positions)]
                ids = packed["input_ids"][r].tolist()
                for a, b in zip(starts, starts[1:]):
                    alone = self.collate([{"input_ids": ids[a:b], "labels": ids[a:b], "position_ids": list(range(b - a))}], 0,
                                         one_row=one_row, pad_to=pad_to)
                    want = logits(alone)[0, :min(first, b - a)]
                    n = want.size(0)
                    scale = max(scale, want.abs().max().item())
                    diff = max(diff, (got[r, a:a + n] - want).abs().max().item())
                    if a > 0:  # the row's first example has nothing before it to see
                        leak = max(leak, (leaked[r, a:a + n] - want).abs().max().item())
        return {"rel_diff": diff / scale, "leak_rel_diff": leak / scale}

    @property
    def peak_flops(self) -> Optional[float]:
        import torch

        from launcher.devices import by_device_name

        if self.device.type != "cuda":
            return None
        found = by_device_name(torch.cuda.get_device_name(self.device))
        return found.tflops * 1e12 if found else None


def fmt(value: Optional[float], spec: str, scale: float = 1.0, unit: str = "") -> str:
    return "n/a" if value is None else f"{value * scale:{spec}}{unit}"


def main(argv=None) -> int:
    args = parse_args(argv)
    began = time.perf_counter()
    single_rank_env()
    import torch
    import transformers

    import deepspeed

    from launcher.attention import attention_problems, resolve_attn_implementation

    check = Check(args)
    device_type = check.device.type
    names = [n.strip() for n in args.impls.split(",") if n.strip()] if args.impls else default_impls(device_type, args.precision)
    impls = list(dict.fromkeys(resolve_attn_implementation(n, device_type) for n in names))
    device_name = torch.cuda.get_device_name(check.device) if device_type == "cuda" else platform.processor() or "cpu"
    print(f"gpu_check: {device_name}, torch {torch.__version__}, transformers {transformers.__version__}, "
          f"deepspeed {deepspeed.__version__}; {args.precision}, ZeRO-3, micro batch {args.micro_batch} x "
          f"{args.seq_len} tokens, {args.steps} steps ({args.warmup} warm-up), impls {','.join(impls)}", flush=True)
    check.setup()

    results: Dict[str, Dict[str, Any]] = {}
    for impl in impls:
        problems = attention_problems(impl, device_type, args.precision)
        if problems:
            results[impl] = {"error": "; ".join(problems)}
            print(f"{impl}: refused: {results[impl]['error']}", flush=True)
            continue
        try:
            results[impl] = r = check.run(impl)
        except Exception as error:  # one kernel failing still measures the others
            traceback.print_exc()
            results[impl] = {"error": f"{type(error).__name__}: {error}"}
            print(f"{impl}: FAILED: {results[impl]['error']}", flush=True)
            continue
        if device_type == "cuda":  # what the destroyed engine left behind: the next peak includes it
            r["mem_left_gib"] = torch.cuda.memory_allocated(check.device) / 2**30
        print(f"{impl}: {r['tokens_per_s']:,.0f} tok/s, MFU {fmt(r['mfu'], '.1f', 100, '%')}, "
              f"peak mem {r['peak_mem_gib']:.2f} GiB{'' if device_type == 'cuda' else ' (process maxrss)'}, "
              f"losses {' '.join(f'{x:.5f}' for x in r['losses'])} ({r['layout']}; setup {r['setup_s']:.1f} s, "
              f"warm-up {r['warmup_s']:.1f} s, {r['timed_steps']} steps x {r['step_s']:.3f} s); "
              f"packed vs alone {r['isolation']['rel_diff']:.1e}, examples seeing each other "
              f"{r['isolation']['leak_rel_diff']:.1e}", flush=True)
        if sum("error" not in v for v in results.values()) == 1:  # after the first that ran
            print(f"  model: {check.n_params:,} parameters", flush=True)

    ok = [k for k, r in results.items() if "error" not in r]
    firsts = {k: results[k]["losses"][0] for k in ok}
    ref = firsts[ok[0]] if ok else float("nan")
    rel = max((abs(v - ref) / abs(ref) for v in firsts.values()), default=float("nan")) if ok else float("nan")
    tolerance = TOLERANCE[args.precision]
    finite = all(math.isfinite(x) for k in ok for x in results[k]["all_losses"])
    # Packed equals alone within the precision's noise, and the control that lets examples see each
    # other differs at least ten times more: the check can tell isolation from its absence.
    isolated = {k: results[k]["isolation"]["rel_diff"] < tolerance
                and results[k]["isolation"]["leak_rel_diff"] > 10 * max(results[k]["isolation"]["rel_diff"], tolerance)
                for k in ok}
    passed = bool(ok) and len(ok) == len(results) and finite and rel < tolerance and all(isolated.values())
    why = [] if passed else [m for m in (
        "no implementation ran" if not ok else None,
        f"failed: {', '.join(k for k in results if k not in ok)}" if len(ok) != len(results) else None,
        "non-finite loss" if not finite else None,
        f"first-step losses differ by {rel:.2e} (relative) >= {tolerance:g}" if ok and not rel < tolerance else None,
        f"packed examples not isolated: {', '.join(k for k, v in isolated.items() if not v)}" if not all(isolated.values()) else None,
    ) if m]
    print(f"{'PASS' if passed else 'FAIL'}: first-step losses {', '.join(f'{k} {v:.6f}' for k, v in firsts.items())}; "
          f"max relative difference {rel:.2e} (tolerance {tolerance:g})" + (f"; {'; '.join(why)}" if why else ""), flush=True)

    summary = {
        "pass": passed,
        "device": device_name,
        "device_type": device_type,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "deepspeed": deepspeed.__version__,
                     "python": platform.python_version()},
        "params": check.n_params,
        "model": {k: v for k, v in check.shape.items()},
        "precision": args.precision,
        "micro_batch": args.micro_batch,
        "seq_len": args.seq_len,
        "steps": args.steps,
        "warmup": args.warmup,
        "optim": args.optim,
        "checkpointing": args.checkpointing,
        "peak_tflops": check.peak_flops / 1e12 if check.peak_flops else None,
        "impls": results,
        "first_step_losses": firsts,
        "first_step_rel_diff": rel if ok else None,
        "tolerance": tolerance,
        "total_s": time.perf_counter() - began,
    }
    line = json.dumps(summary, allow_nan=True)
    if os.environ.get("OUT"):
        out = Path(os.environ["OUT"])
        out.mkdir(parents=True, exist_ok=True)
        (out / "gpu_check.json").write_text(json.dumps(summary, indent=1, allow_nan=True) + "\n")
    try:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    except Exception:
        pass
    print(line, flush=True)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
