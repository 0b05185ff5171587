"""`sft -m hydra/sweeper=search ...`: check the whole space, write the sweep dir, start the controller.

Nothing is written or submitted until every corner of the space (each choice, each bound) composes
into a config that validates and plans; on Slurm the command returns once the controller job is
queued, before any trial has started.
"""

import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from omegaconf import OmegaConf, open_dict
from rich.console import Console
from rich.markup import escape

from launcher.errors import ConfigError, problem
from launcher.harness_results import PREFIX as HARNESS_PREFIX
from launcher.harness_tasks import task_names
from launcher.schema import plain
from launcher.trial.space import Dimension, as_overrides, corner_points, split_overrides, with_params
from launcher.trial.study import BASE_FILE, SearchSpec, default_rungs, open_study

# Keys a search may not vary: the trials of one search share their cluster shape (one array), their
# sweep settings and their place on disk.
FIXED_PREFIXES = ("cluster.", "sweep.")
FIXED_KEYS = ("run_dir", "runs_root", "name", "dry_run", "resume")
# train rows: loss, lr, grad_norm, tokens_per_s, ...; eval rows: loss, perplexity, accuracy (eval.generate_samples)
METRIC_KINDS = ("eval", "train")


def settings_problems(cfg, dims: List[Dimension]) -> List[str]:
    s = cfg.sweep
    problems = [problem(d.key, "(searched)", "a search cannot vary cluster.*, sweep.*, run_dir, runs_root, name, dry_run "
                        "or resume: every trial shares them") for d in dims
                if d.key.startswith(FIXED_PREFIXES) or d.key in FIXED_KEYS]
    for key, value, low in (("trials", s.trials, 1), ("parallel", s.parallel, 1), ("reduction", s.reduction, 2),
                            ("controller_cpus", s.controller_cpus, 1)):
        if value < low:
            problems.append(problem(f"sweep.{key}", value, f"must be at least {low}"))
    if str(cfg.resume) != "auto":
        problems.append(problem("resume", cfg.resume, "a search starts each trial afresh and resumes it from its own "
                                "checkpoints: leave resume=auto"))
    if s.poll_s <= 0:
        problems.append(problem("sweep.poll_s", s.poll_s, "must be above 0"))
    return problems + metric_problems(cfg)


def harness_task(metric: str) -> Optional[str]:
    """The task of a harness/<task>/<metric>[/<filter>] key; None for a training-time metric."""
    if not str(metric).startswith(HARNESS_PREFIX):
        return None
    return str(metric)[len(HARNESS_PREFIX):].partition("/")[0]


def metric_problems(cfg) -> List[str]:
    """sweep.metric, sweep.rung_metric: what the study ranks and what the rungs compare.

    The rungs compare a training-time metric (<kind>/<key> of the trial's metrics rows): a
    benchmark eval (harness/<task>/<metric>) runs only after a checkpoint is saved, in a job of
    its own, so it can rank the trials (sweep.metric) but never stop one at a rung."""
    s = cfg.sweep
    problems = []
    task = harness_task(s.metric)
    if task is None:
        problems += training_metric_problems(cfg, "sweep.metric", s.metric)
    else:
        parts = str(s.metric)[len(HARNESS_PREFIX):].split("/")
        tasks = task_names(list(cfg.eval.harness.tasks or []))  # a YAML's tasks by its `task:`, as lm-eval reports them
        if len(parts) < 2 or not all(parts):
            problems.append(problem("sweep.metric", s.metric, "a benchmark metric is harness/<task>/<metric>[/<filter>], "
                                    "e.g. harness/tiny_tasks/exact_match"))
        elif task not in tasks:
            problems.append(problem("sweep.metric", s.metric, f"task {task!r} is not in eval.harness.tasks "
                                    f"({', '.join(tasks) or 'none'}): add it there, or rank by "
                                    + (", ".join(f"{HARNESS_PREFIX}{t}/<metric>" for t in tasks) or "a training-time metric")))
        if s.rung_metric is None:
            problems.append(problem("sweep.rung_metric", None, f"sweep.metric={s.metric} is a benchmark eval, judged "
                                    "only after a trial has trained: the rungs need a training-time metric to compare, "
                                    "e.g. sweep.rung_metric=eval/loss (or train/loss, eval/accuracy)"))
    if s.rung_metric is not None:
        if harness_task(s.rung_metric) is not None:
            problems.append(problem("sweep.rung_metric", s.rung_metric, "the rungs compare a training-time metric (a "
                                    "benchmark eval runs only after a save): eval/loss, eval/perplexity, eval/accuracy, "
                                    "train/loss"))
        else:
            problems += training_metric_problems(cfg, "sweep.rung_metric", s.rung_metric)
    return problems


def training_metric_problems(cfg, setting: str, metric: str) -> List[str]:
    kind, _, key = str(metric).partition("/")
    if kind not in METRIC_KINDS or not key:
        return [problem(setting, metric, "must be <kind>/<key> with kind eval or train: eval/loss, eval/perplexity, "
                        "eval/accuracy (with eval.generate_samples), train/loss"
                        + (", or a benchmark eval harness/<task>/<metric>" if setting == "sweep.metric" else ""))]
    if kind == "eval" and not cfg.data.eval_files and not cfg.data.eval_fraction:
        return [problem(setting, metric, "the trials have no eval set: set data.eval_fraction (e.g. 0.05) "
                        "or data.eval_files, or use a train/ metric")]
    return []


def rung_steps(cfg, total_steps) -> List[int]:
    """sweep.rungs, checked against the trials' length; by default three rungs ending at the end."""
    rungs = cfg.sweep.rungs
    if rungs is None:
        if not total_steps:
            raise ConfigError([problem("sweep.rungs", None, "give the steps at which trials are compared, "
                                       "or trainer.max_steps so they can be derived")])
        return default_rungs(int(total_steps), cfg.sweep.reduction)
    rungs = [int(r) for r in rungs]
    if not rungs or rungs != sorted(set(rungs)) or rungs[0] < 1:
        raise ConfigError([problem("sweep.rungs", rungs, "must be steps above 0, in increasing order, e.g. [30,90,270]")])
    if total_steps and rungs[-1] > total_steps:
        raise ConfigError([problem("sweep.rungs", rungs, f"the last rung is past the trials' end (step {total_steps}): "
                                   f"lower it, or raise trainer.max_steps")])
    return rungs


def check_space(base, dims: List[Dimension], console: Console):
    """Compose, validate and plan every corner of the space; exits (2) naming the first bad point.
    Returns the first point's preparation."""
    from launcher.cli import fail
    from launcher.service import prepare

    preps = []
    for point in corner_points(dims):
        where = f"the search space holds an invalid point: {' '.join(as_overrides(point))}"
        try:
            preps.append(prepare(with_params(base, point)))
        except ConfigError as error:
            fail(console, ConfigError([f"{where}: {p}" for p in error.problems]))
    # Rungs compare equal budgets: every trial must train the same number of steps.
    totals = {p.plan.total_steps for p in preps}
    if len(totals) > 1:
        fail(console, ConfigError([problem("sweep.rungs", base.sweep.rungs, (
            f"the space's points train different numbers of steps ({', '.join(map(str, sorted(totals, key=str)))}), so "
            f"their rungs would not compare equal budgets: set trainer.max_steps, or do not search what sets the length")
        )]))
    return preps[0]


def start_search(config, hydra_context, arguments: List[str]) -> None:
    from launcher.cli import fail
    from launcher.service import print_dry_run
    from launcher.secret_mask import mask_secrets, secret_values

    console = Console(stderr=True, soft_wrap=True)
    try:
        fixed, dims = split_overrides(arguments)
        if not dims:
            raise ConfigError([problem("hydra/sweeper", "search", "a search needs a searched key, e.g. "
                                       "optim.lr=tag(log,interval(1e-5,1e-3)) or trainer.global_batch_size=choice(64,128)")])
        base = hydra_context.config_loader.load_sweep_config(config, list(fixed))
        with open_dict(base):
            del base["hydra"]
        problems = settings_problems(base, dims)
        if problems:
            raise ConfigError(problems)
    except ConfigError as error:
        fail(console, error)
    first = check_space(base, dims, console)
    try:
        rungs = rung_steps(base, first.plan.total_steps)
    except ConfigError as error:
        fail(console, error)
    s = base.sweep
    spec = SearchSpec(dims=dims, fixed=fixed, trials=s.trials, parallel=s.parallel, metric=s.metric,
                      direction=str(plain(s.direction)), rungs=rungs, reduction=s.reduction,
                      sampler_seed=s.sampler_seed if s.sampler_seed is not None else base.seed, poll_s=s.poll_s,
                      backend=str(plain(base.cluster.backend)), name=base.name, rung_metric=s.rung_metric,
                      rung_direction=None if s.rung_direction is None else str(plain(s.rung_direction)))
    summary = (f"search: {spec.trials} trials over {', '.join(d.key for d in dims)}; {spec.compared} "
               f"({spec.compared_direction}) compared at steps {rungs}, the best 1/{spec.reduction} going on at each")
    if spec.compared != spec.metric or spec.compared_direction != spec.direction:
        summary += f"; ranked by {spec.metric} ({spec.direction})" + (
            " of each trial's final eval" if harness_task(spec.metric) else "")
    if base.dry_run:
        print_dry_run(first, console)
        console.print(f"dry run: {summary}; {len(corner_points(dims))} corners of the space checked", highlight=False)
        return

    sweep_dir = Path(str(config.hydra.sweep.dir)).resolve()
    sweep_dir.mkdir(parents=True, exist_ok=True)
    secrets = secret_values(OmegaConf.to_container(base, resolve=True, enum_to_str=True))
    if base.tracking.api_key:  # trials get the key from the environment, never from a file
        os.environ["WANDB_API_KEY"] = base.tracking.api_key
        base.tracking.api_key = None
    spec.fixed = mask_secrets(spec.fixed, secrets)
    (sweep_dir / BASE_FILE).write_text(OmegaConf.to_yaml(base))
    spec.save(sweep_dir)
    open_study(sweep_dir, spec, create=True)
    print(summary, flush=True)
    if spec.backend == "local":
        from launcher.sweep.controller import Controller, SearchFailed

        print(f"sweep directory: {sweep_dir}\nthe trials run here, one at a time; the leaderboard: "
              f"sft-jobs sweep {sweep_dir}", flush=True)
        try:
            code = Controller(sweep_dir).run()
        except SearchFailed as error:
            console.print(f"[bold red]error:[/] the search failed: {escape(str(error))}", highlight=False, soft_wrap=True)
            sys.exit(1)
        from launcher.jobs.cli import main as jobs_main

        jobs_main(["sweep", str(sweep_dir)])
        if code:
            sys.exit(code)
        return
    job_id = submit_controller(base, sweep_dir)
    print(f"submitted search controller job {job_id} ({spec.parallel} trials at a time)\nsweep directory: {sweep_dir}\n"
          f"W&B group: {sweep_dir.parent.name}/{sweep_dir.name}\nfollow it: sft-jobs sweep {sweep_dir}", flush=True)


def submit_controller(cfg, sweep_dir: Path) -> str:
    """One small requeueable job: 1 task, sweep.controller_cpus CPUs, no GPU, the code snapshot."""
    from launcher import snapshot
    from launcher.atomic import write_text_atomic
    from launcher.backends.slurm import make_executor
    from launcher.sweep.controller import SweepController

    c = cfg.cluster
    code = snapshot.snapshot_code(sweep_dir)
    params: Dict[str, Any] = dict(
        job_name=f"{cfg.name}-search", nodes=1, ntasks_per_node=1, cpus_per_task=cfg.sweep.controller_cpus,
        time=cfg.sweep.controller_time_min or c.time_min, signal_delay_s=min(c.signal_delay_s, 60),
        setup=[*snapshot.setup_lines(code), *c.setup], additional_parameters={"requeue": True},
    )
    for key in ("partition", "account", "qos"):
        if c[key] is not None:
            params[key] = c[key]
    # It requeues itself at each time limit (submitit's checkpoint), as often as the search needs.
    job = make_executor(sweep_dir / "controller", params, max_num_timeout=10_000).submit(SweepController(str(sweep_dir)))
    record = {"job_id": job.job_id, "submitted_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    write_text_atomic(sweep_dir / "controller.json", json.dumps({"jobs": [record]}, indent=2) + "\n")
    return job.job_id
