"""Terminal output of the plan: the resolved config, a rich table of derived numbers, the DeepSpeed JSON."""

import json
from typing import Any, Dict

import yaml
from rich.console import Console
from rich.syntax import Syntax
from rich.table import Table

from launcher.metrics import read_metrics
from launcher.plan import Plan


def fmt_count(n: Any) -> str:
    if n is None:
        return "n/a"
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def fmt_gib(gib: float) -> str:
    return f"{gib:.2f} GiB" if gib >= 1 else f"{gib * 1024:.1f} MiB"


def plan_table(plan: Plan) -> Table:
    table = Table(title="Plan", show_header=False, title_justify="left")
    table.add_column("what", style="bold")
    table.add_column("value")
    mem = plan.gib_per_gpu
    rows = [
        ("world size", f"{plan.world_size} = {plan.nodes} node(s) x {plan.procs_per_node} rank(s)"),
        ("global batch", f"{plan.global_batch_size} = micro {plan.micro_batch_size} x ranks {plan.world_size} x accum {plan.grad_accum_steps}"),
        ("sequence length", str(plan.seq_len)),
        ("tokens per step", f"{plan.tokens_per_step:,}"),
        ("train examples", fmt_count(plan.train_examples)),
        ("steps per epoch", f"<= {plan.steps_per_epoch}" if plan.steps_per_epoch else "n/a (counted after tokenising)"),
        ("total steps", str(plan.total_steps) if plan.total_steps else "n/a"),
        ("parameters", f"{fmt_count(plan.params)} (from {plan.model_facts_source})"),
        ("ZeRO stage / precision", f"{plan.zero_stage} / {plan.precision}"),
        ("model states per GPU", f"{fmt_gib(mem['total'])} (params {fmt_gib(mem['params'])}, grads {fmt_gib(mem['grads'])}, optimizer {fmt_gib(mem['optimizer'])})" if mem else "n/a"),
    ]
    if plan.gib_offloaded_per_node:
        rows.append(("offloaded to CPU per node", fmt_gib(plan.gib_offloaded_per_node)))
    rows.append(("compiled ops", "; ".join(f"{name} ({state})" for name, state in plan.compiled_ops.items()) or "none"))
    for row in rows:
        table.add_row(*row)
    return table


def eval_summary(run_dir) -> str:
    """The first and last eval of a run, e.g. for the end of `make demo`."""
    evals = [r for r in read_metrics(run_dir) if r.get("kind") == "eval"]
    if not evals:
        return ""
    first, last = evals[0], evals[-1]
    lines = [f"eval loss: {first['loss']:.4f} (step {first['step']}) -> {last['loss']:.4f} (step {last['step']})"]
    if "accuracy" in first and "accuracy" in last:
        lines.append(f"eval accuracy: {first['accuracy']:.1%} -> {last['accuracy']:.1%}")
    return "\n".join(lines)


def print_dry_run(console: Console, config: Dict[str, Any], plan: Plan, ds_config: Dict[str, Any], extra: str = "") -> None:
    console.rule("resolved config")
    console.print(Syntax(yaml.safe_dump(config, sort_keys=False), "yaml", background_color="default"))
    console.print(plan_table(plan))
    console.rule("DeepSpeed config")
    console.print_json(json.dumps(ds_config))
    if extra:
        console.print(extra, highlight=False, soft_wrap=True, markup=False)
    console.print("dry run: nothing written, nothing started")
