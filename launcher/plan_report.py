"""Terminal output of the plan: the resolved config, a rich table of derived numbers, the DeepSpeed JSON."""

import json
from typing import Any, Dict, List, Optional, Tuple

import yaml
from rich.console import Console
from rich.syntax import Syntax
from rich.table import Table

from launcher.metrics import read_metrics
from launcher.plan import Plan
from launcher.plan.memory import GIB, element_bytes


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
    rows = [
        ("world size", world_size_text(plan)),
        ("global batch", global_batch_text(plan)),
        *elastic_rows(plan.elastic),
        ("sequence length", str(plan.seq_len)),
        ("tokens per step", f"{plan.tokens_per_step:,}"),
        ("train examples", fmt_count(plan.train_examples)),
        ("steps per epoch", f"<= {plan.steps_per_epoch}" if plan.steps_per_epoch else "n/a (counted after tokenising)"),
        ("total steps", str(plan.total_steps) if plan.total_steps else "n/a"),
        ("parameters", f"{parameters_text(plan)} (from {plan.model_facts_source})"),
        *experts_rows(plan),
        ("ZeRO stage / precision", f"{plan.zero_stage} / {plan.precision}"),
        ("attention / loss", plan.attention),
        ("predicted for", plan.device),
    ]
    rows += memory_rows(plan.memory) + speed_rows(plan.comm) + stop_rows(plan.stop_window)
    rows.append(("compiled ops", "; ".join(f"{name} ({state})" for name, state in plan.compiled_ops.items()) or "none"))
    for row in rows:
        table.add_row(*row)
    return table


def parameters_text(plan: Plan) -> str:
    moe = plan.experts
    if not moe:
        return fmt_count(plan.params)
    if not moe["tested"]:
        return (f"{fmt_count(plan.params)} (a mixture of experts of model_type {moe['model_type']}: which are active per "
                "token is not known here; compute is counted at all of them)")
    return f"{fmt_count(plan.params)} ({fmt_count(plan.active_params)} active per token: {moe['top_k']} of {moe['experts']} experts)"


def experts_rows(plan: Plan) -> List[Tuple[str, str]]:
    """A mixture of experts: where its parameters are, what ZeRO-3 gathers and moves of them."""
    moe = plan.experts
    if not moe or not moe["tested"]:
        return []
    share = moe["expert_params"] / plan.params
    layers = f"{moe['moe_layers']} of {moe['layers']} layers" if moe["moe_layers"] < moe["layers"] else f"all {moe['layers']} layers"
    states = ""
    if plan.memory:  # the sharded parts grow with the parameters; the gathered block is counted below
        sharded = sum(gib for name, gib in plan.memory["parts_gib"]["model states"].items() if not name.startswith("largest layer"))
        states = f", {fmt_gib(sharded * share)} per GPU of the sharded model states"
    experts = (f"{moe['experts']} experts in each MoE block ({layers}), {moe['top_k']} per token"
               + (", and a shared expert every token runs" if moe["shared_expert"] else "")
               + f"; the routed experts hold {fmt_count(moe['expert_params'])} parameters: {share:.0%} of the model{states}. "
               "ZeRO-3 gathers and reduces every expert each micro-batch (communication counts all parameters); "
               "compute counts the active ones")
    e = element_bytes(plan.precision)
    block, embedding = moe["block_params"], moe["embedding_params"]
    than = f"larger than the embedding ({fmt_count(embedding)})" if block > embedding else f"the embedding ({fmt_count(embedding)}) is larger"
    gathered = (f"a MoE block, {fmt_count(block)} parameters (its {moe['experts']} experts and router"
                + (" and shared expert" if moe["shared_expert"] else "") + f"), gathered whole (a ZeRO-3 leaf): "
                f"{fmt_gib(e * block / GIB)}, twice that with its gradient in backward; {than}")
    return [("experts", experts), ("largest gathered layer", gathered)]


def world_size_text(plan: Plan) -> str:
    text = f"{plan.world_size} = {plan.nodes} node(s) x {plan.procs_per_node} rank(s)"
    if plan.sequence_parallel > 1:
        text += f"; sequence parallel {plan.sequence_parallel} -> {plan.data_parallel} data-parallel"
    return text


def elastic_rows(elastic: Optional[Dict[str, Any]]) -> List[Tuple[str, str]]:
    """An elastic run (cluster.min_nodes): memory is planned at its fewest nodes; speed at both ends."""
    if not elastic:
        return []
    low, high = elastic["min_nodes"], elastic["max_nodes"]
    worlds, accum = elastic["world_sizes"], elastic["grad_accum_steps"]

    def speed(i: int) -> str:
        step, tokens = elastic["step_s"][i], elastic["tokens_per_s"][i]
        return f"{step:.2f} s/step, {tokens:,.0f} tokens/s" if step is not None else "step time n/a"

    return [("elastic range", f"{low}..{high} nodes (sbatch --nodes={low}-{high}), each start on what Slurm gives: "
                              f"world {worlds[0]}..{worlds[1]}, accum {accum[0]}..{accum[1]}, same global batch; "
                              f"memory planned at {low} node(s), the most per GPU"),
            ("  speed at the ends", f"{low} node(s): {speed(0)}; {high} node(s): {speed(1)}")]


def global_batch_text(plan: Plan) -> str:
    ranks = "ranks" if plan.sequence_parallel == 1 else "data-parallel ranks"
    return f"{plan.global_batch_size} = micro {plan.micro_batch_size} x {ranks} {plan.data_parallel} x accum {plan.grad_accum_steps}"


def fit_verdict(mem: Dict[str, Any]) -> str:
    if mem["fits"] is None:
        return "no verdict: the GPU memory is unknown (set cluster.gpu or cluster.gpu_mem_gib)" if mem["gpu_mem_gib"] is None \
            else "no verdict: activations are not modelled for this architecture"
    budget = f"{fmt_gib(mem['gpu_mem_gib'])} usable"
    if mem["fits"]:
        return f"fits ({fmt_gib(mem['peak_gib'])} of {budget})"
    fixes = "; ".join(mem["advice"]) or ("no single change (micro batch, checkpointing, sequence parallelism, offload, nodes): "
                                         "combine them, or use a larger GPU")
    return f"DOES NOT FIT ({fmt_gib(mem['peak_gib'])} > {budget}); would fit with: {fixes}"


def memory_rows(mem: Optional[Dict[str, Any]]) -> List[Tuple[str, str]]:
    if not mem:
        return [("peak memory per GPU", "n/a (parameter count unknown)")]
    rows = [("peak memory per GPU", f"{fmt_gib(mem['peak_gib'])} (optimizer step: {fmt_gib(mem['step_peak_gib'])})"
             + ("" if "activations" in mem["parts_gib"] else "; without activations and the largest layer: not modelled for this architecture"))]
    for group, parts in mem["parts_gib"].items():
        shown = ", ".join(f"{name} {fmt_gib(gib)}" for name, gib in parts.items())
        rows.append((f"  {group}", f"{fmt_gib(mem['group_gib'][group])}: {shown}"))
    if mem["cpu_per_node_gib"]:
        rows.append(("offloaded to CPU per node", fmt_gib(mem["cpu_per_node_gib"])))
    rows.append(("fits?", fit_verdict(mem)))
    return rows


def fmt_bytes(n: float) -> str:
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"


def speed_rows(comm: Optional[Dict[str, Any]]) -> List[Tuple[str, str]]:
    if not comm:
        return []
    ops = ", ".join(f"{op} {fmt_bytes(b)}" for op, b in comm["message_bytes"].items())
    rows = [("communication per step", f"{fmt_bytes(comm['bytes_per_gpu'])} sent and received per GPU "
             f"({comm['comm_s']:.2f} s at {comm['link_gbps']:g} Gbit/s, {comm['link']}); DeepSpeed messages: {ops}")]
    if comm.get("sp_bytes_per_gpu"):
        rows.append(("  sequence parallel", f"{fmt_bytes(comm['sp_bytes_per_gpu'])} per GPU in all-to-alls within the node "
                     f"({comm['sp_comm_s']:.2f} s, added to the step: attention waits for them)"))
    if comm["step_s"] is None:
        rows.append(("step time", "n/a: the device's peak is unknown (set cluster.gpu or cluster.gpu_tflops)"))
    else:
        bound = "communication" if comm["comm_s"] > comm["compute_s"] else "compute"
        sp = f" + all-to-all {comm['sp_comm_s']:.2f} s" if comm.get("sp_comm_s") else ""
        rows.append(("step time (at best)", f"{comm['step_s']:.2f} s, {bound}-bound (compute {comm['compute_s']:.2f} s at peak{sp}); "
                     f"{comm['tokens_per_s']:,.0f} tokens/s; MFU ceiling {comm['mfu_ceiling']:.0%}"))
    return rows


def stop_rows(stop: Optional[Dict[str, Any]]) -> List[Tuple[str, str]]:
    if not stop:
        return []
    size = f"{fmt_bytes(stop['checkpoint_gb'] * 1e9)} ({fmt_bytes(stop['per_node_gb'] * 1e9)} per node)"
    need = f"needs {stop['needs_gb_s']:.2f} GB/s per node" if stop["needs_gb_s"] else "no time left to save"
    if stop["fits"] is None:
        verdict = f"{need} to save within cluster.signal_delay_s={stop['window_s']:g} (write speed unknown: set checkpoint.write_gb_s)"
    else:
        verdict = (f"{'fits' if stop['fits'] else 'DOES NOT FIT'}: {stop['save_s']:.0f} s at {stop['write_gb_s']:g} GB/s per node "
                   f"({stop['write_source']}) within cluster.signal_delay_s={stop['window_s']:g}; {need}")
    return [("checkpoint size", size), ("stop window", verdict)]


def scaling_table(plan: Plan, global_batch_fixed: bool) -> Table:
    title = "Scaling (same global batch)" if global_batch_fixed else "Scaling (global batch grows with the GPUs: trainer.global_batch_size is unset)"
    table = Table(title=title, title_justify="left")
    for column in ("nodes", "GPUs", "global batch", "accum", "peak GiB/GPU", "fits", "comm s", "compute s", "step s", "tokens/s", "MFU ceiling"):
        table.add_column(column, justify="right", no_wrap=True)
    fmt = lambda v, f: "n/a" if v is None else format(v, f)  # noqa: E731
    for r in plan.scaling:
        if not r["divides"]:
            table.add_row(str(r["nodes"]), str(r["gpus"]), "does not divide", *[""] * 8)
            continue
        fits = {True: "yes", False: "NO", None: "?"}[r["fits"]]
        table.add_row(str(r["nodes"]), str(r["gpus"]), str(r["global_batch"]), str(r["accum"]), f"{r['peak_gib']:.1f}", fits,
                      fmt(r["comm_s"], ".2f"), fmt(r["compute_s"], ".2f"), fmt(r["step_s"], ".2f"), fmt(r["tokens_per_s"], ",.0f"),
                      fmt(r["mfu_ceiling"], ".0%"))
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
    if plan.scaling:  # numbers are not wrapped: at least 130 columns even when piped
        console.print(scaling_table(plan, config["trainer"]["global_batch_size"] is not None), width=max(console.width, 130))
    console.rule("DeepSpeed config")
    console.print_json(json.dumps(ds_config))
    if extra:
        console.print(extra, highlight=False, soft_wrap=True, markup=False)
    evals = harness_line(config, plan)
    if evals:
        console.print(evals, highlight=False, soft_wrap=True, markup=False)
    console.print("dry run: nothing written, nothing started")


def harness_line(config: Dict[str, Any], plan: Plan) -> str:
    """What eval.harness will score, and where: one line of the dry run."""
    h = config["eval"]["harness"]
    if not h["tasks"]:
        return ""
    every = config["checkpoint"]["every_steps"]
    steps = [s for s in range(every, plan.total_steps, every)] if h["every_checkpoint"] and every and plan.total_steps else []
    what = f"the final export and {len(steps)} checkpoint(s) (steps {', '.join(map(str, steps[:6]))}{', ...' if len(steps) > 6 else ''})" \
        if steps else "the final export"
    where = (f"one Slurm job each ({h['gpus']} GPU(s), {h['cpus']} CPUs, {h['time_min']} min, partition "
             f"{h['partition'] or config['cluster']['partition'] or 'default'})" if config["cluster"]["backend"] == "slurm"
             else "after training, in this command")
    return f"benchmark evals (lm-eval): {', '.join(map(str, h['tasks']))} on {what}; {where}"
