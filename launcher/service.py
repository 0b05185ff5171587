"""The service layer: validate and plan a config, print its dry run, create its run directory, and
refuse a run directory with a live job. Everything here raises (ConfigError) instead of exiting:
the entry points (`sft`, the Hydra sweep launcher, the search controller) decide what an error ends.
"""

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.markup import escape

from launcher import plan_report
from launcher.backends import slurm as slurm_backend
from launcher.errors import ConfigError, problem
from launcher.facts import find
from launcher.plan import Plan, deepspeed_config, make_plan
from launcher.resume import check_resume, fingerprint, set_aside_newer
from launcher import rundir
from launcher.rundir import RunFiles, submission_record, versions_changed
from launcher.secret_mask import mask_file, mask_secrets, secret_values
from launcher.validate import Checked, check_config

log = logging.getLogger("launcher")


def write_run_files(run_dir: Path, resolved: dict, overrides: list, checked, plan, ds_config: dict, fingerprint: dict) -> None:
    """The files a run is started, inspected and resumed from (secrets masked in each)."""
    files = RunFiles(run_dir, resolved)
    files.write_yaml(rundir.CONFIG, resolved)
    files.write_yaml(rundir.OVERRIDES, overrides)
    files.write_json(rundir.PLAN, {**plan.to_dict(), "train_files": checked.train_files, "eval_files": checked.eval_files,
                                   "fingerprint": fingerprint})
    files.write_json(rundir.DS_CONFIG, ds_config)
    record = submission_record(resolved["cluster"]["backend"], overrides)
    earlier = rundir.submission(run_dir)  # submitted again (sft run_dir=...): the earlier jobs and first versions stay
    record["jobs"] = earlier.get("jobs") or []
    record["first_versions"] = earlier.get("first_versions") or earlier.get("versions") or record["versions"]
    changed = versions_changed(record)
    if changed:  # a warning, not a refusal: the resume fingerprint decides what would make it inexact
        log.warning("warning: packages differ from the run's first submission: %s",
                    ", ".join(f"{k} {v}" for k, v in changed.items()))
    files.write_json(rundir.SUBMISSION, record)


@dataclass
class Prepared:
    """A validated config with everything derived from it, ready to write and launch."""

    cfg: DictConfig
    checked: Checked
    plan: Plan
    ds_config: dict
    resolved: dict


def prepare(cfg: DictConfig) -> Prepared:
    """Validate and plan; raises ConfigError with every problem on bad input (never exits: a caller
    such as the search controller tells a bad point from its own exit). Writes nothing."""
    problems, warnings, checked = [], [], None
    try:
        checked = check_config(cfg, dry_run=cfg.dry_run)
    except ConfigError as error:
        problems += error.problems
    if cfg.cluster.backend == "slurm":
        try:
            slurm_backend.preflight(cfg)
        except ConfigError as error:
            (warnings if cfg.dry_run else problems).extend(error.problems)
    if problems:
        raise ConfigError(problems)
    checked.warnings += warnings
    plan = make_plan(cfg, checked.model, checked.train_examples, find(cfg))
    refusal = memory_refusal(cfg, plan)
    if refusal and cfg.dry_run:
        checked.warnings.append(refusal)
    elif refusal:
        raise ConfigError([refusal])
    return Prepared(cfg, checked, plan, deepspeed_config(cfg, plan), OmegaConf.to_container(cfg, resolve=True, enum_to_str=True))


def memory_refusal(cfg: DictConfig, plan: Plan) -> Optional[str]:
    """A run the plan predicts will not fit in GPU memory is refused before the queue, unless forced."""
    mem = plan.memory
    if not mem or mem["fits"] is not False or cfg.plan.force:
        return None
    # The key that set the budget: gpu_mem_gib, gpu, or (from the partition or this machine) the device found.
    key, value = ("cluster.gpu_mem_gib", cfg.cluster.gpu_mem_gib) if cfg.cluster.gpu_mem_gib is not None else ("cluster.gpu", cfg.cluster.gpu or plan.device)
    parts = ", ".join(f"{group} {gib:.2f}" for group, gib in mem["group_gib"].items())
    fixes = "; ".join(mem["advice"]) or "no single change: combine them, or use a larger GPU"
    return problem(key, value, f"the run does not fit: the plan predicts {mem['peak_gib']:.2f} GiB per GPU at peak ({parts} GiB) "
                   f"and {mem['gpu_mem_gib']:.2f} GiB is usable; it would fit with: {fixes}; or set plan.force=true to launch anyway")


def print_dry_run(prep: Prepared, console: Console) -> None:
    cfg = prep.cfg
    for warning in prep.checked.warnings:
        console.print(f"[yellow]warning (a real run would stop here):[/] {escape(warning)}", highlight=False, soft_wrap=True)
    secrets = secret_values(prep.resolved)
    sbatch = ""
    if cfg.cluster.backend == "slurm":
        sbatch = slurm_backend.sbatch_preview(cfg, prep.plan, Path(cfg.runs_root).expanduser().resolve() / cfg.name / "<timestamp>")
    plan_report.print_dry_run(Console(), mask_secrets(prep.resolved, secrets), prep.plan, prep.ds_config, mask_secrets(sbatch, secrets))


def create_run(prep: Prepared, run_dir: Path, overrides: list, sweep_group: Optional[str] = None) -> None:
    """Check what the start would resume, then fix the run directory (and a sweep's W&B group) into
    the config and write the run's files. A refused resume writes nothing."""
    current = fingerprint(prep.cfg, prep.plan)
    source = check_resume(prep.cfg, run_dir, current)
    run_dir.mkdir(parents=True, exist_ok=True)
    for node in (prep.cfg, prep.resolved):
        node["run_dir"] = str(run_dir)
        if sweep_group and node["tracking"]["group"] is None:
            node["tracking"]["group"] = sweep_group
    # Ranks get the W&B key from the environment, never from a file.
    if prep.cfg.tracking.api_key:
        os.environ["WANDB_API_KEY"] = prep.cfg.tracking.api_key
    write_run_files(run_dir, prep.resolved, overrides, prep.checked, prep.plan, prep.ds_config, current)
    if source is not None and prep.cfg.resume not in ("auto", "never"):
        aside = set_aside_newer(run_dir, source)
        if aside is not None:
            log.warning("resume=%s: the newer checkpoints of this run dir moved to %s", prep.cfg.resume, aside)
    if sweep_group and (run_dir.parent / "multirun.yaml").is_file():  # Hydra wrote it unmasked
        mask_file(run_dir.parent / "multirun.yaml", secret_values(prep.resolved) | secret_values(overrides))


def refuse_a_live_run(run_dir: Path) -> None:
    """One live job per run directory: a second would share its checkpoints, W&B run and code/ (the
    snapshot replaced under the queued job), and one's cleanup of a partial save can delete the other's."""
    from launcher.run_state import LOCAL, live_jobs

    live = live_jobs(run_dir)
    if not live:
        return
    jobs = ", ".join("local ranks" if t.job_id == LOCAL else f"job {t.job_id}" for t in live)
    raise ConfigError([problem("run_dir", str(run_dir), f"{jobs} {'is' if len(live) == 1 else 'are'} still {live[0].state} "
                               f"on it, and two jobs on one run directory overwrite each other; wait for it to end "
                               f"(sft-jobs status {run_dir}) or cancel it (sft-jobs cancel {run_dir}), then start again")])


def sweep_group(sweep_dir: Path) -> str:
    """Every point of a sweep shares one W&B group named after the sweep dir: <name>/<timestamp>."""
    sweep_dir = Path(sweep_dir)
    return f"{sweep_dir.parent.name}/{sweep_dir.name}"
