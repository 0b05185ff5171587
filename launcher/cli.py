"""`sft`: compose the config with Hydra, validate it, plan, write the run directory, launch."""

import logging
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from rich.console import Console

from launcher import report
from launcher.errors import ConfigError
from launcher.overrides import override_problems
from launcher.plan import deepspeed_config, make_plan
from launcher.rundir import RunFiles, mask_secrets, new_run_dir, secret_values, submission_record
from launcher.schema import register_configs
from launcher.validate import check_config

log = logging.getLogger("launcher")
EXIT_BAD_CONFIG = 2
CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def fail(console: Console, error: Exception) -> None:
    console.print(f"[bold red]error:[/] {error}", highlight=False, soft_wrap=True)
    sys.exit(EXIT_BAD_CONFIG)


def write_run_files(run_dir: Path, resolved: dict, overrides: list, checked, plan, ds_config: dict) -> None:
    """The files a run is started, inspected and resumed from (secrets masked in each)."""
    files = RunFiles(run_dir, resolved)
    files.write_yaml("config.yaml", resolved)
    files.write_yaml("overrides.yaml", overrides)
    files.write_json("plan.json", {**plan.to_dict(), "train_files": checked.train_files, "eval_files": checked.eval_files})
    files.write_json("ds_config.json", ds_config)
    files.write_json("submission.json", submission_record(resolved["cluster"]["backend"], overrides))


def run(cfg: DictConfig) -> None:
    """One run (or one sweep point): everything before the first rank starts."""
    console = Console(stderr=True)
    hydra_cfg = HydraConfig.get()
    overrides = list(hydra_cfg.overrides.task)
    try:
        checked = check_config(cfg, dry_run=cfg.dry_run)
    except ConfigError as error:
        fail(console, error)
    plan = make_plan(cfg, checked.model, checked.train_examples)
    ds_config = deepspeed_config(cfg, plan)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    secrets = secret_values(resolved)

    slurm = cfg.cluster.backend == "slurm"
    if slurm:
        from launcher.backends import slurm as slurm_backend

        try:
            slurm_backend.preflight(cfg)
        except ConfigError as error:
            if not cfg.dry_run:
                fail(console, error)
            checked.warnings += error.problems

    if cfg.dry_run:
        for warning in checked.warnings:
            console.print(f"[yellow]warning (a real run would stop here):[/] {warning}", highlight=False, soft_wrap=True)
        sbatch = slurm_backend.sbatch_preview(cfg, plan, Path(cfg.runs_root).expanduser().resolve() / cfg.name / "<timestamp>") if slurm else ""
        report.print_dry_run(Console(), mask_secrets(resolved, secrets), plan, ds_config, mask_secrets(sbatch, secrets))
        return

    if cfg.data.preview:
        from launcher.data.preview import print_preview

        print_preview(cfg, checked)
        return

    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    if multirun:
        run_dir = Path(hydra_cfg.runtime.output_dir).resolve()
        if cfg.tracking.group is None:  # every point of a sweep in one W&B group
            cfg.tracking.group = resolved["tracking"]["group"] = f"{cfg.name}/{Path(hydra_cfg.sweep.dir).name}"
    elif cfg.run_dir:
        run_dir = Path(cfg.run_dir).expanduser().resolve()
        run_dir.mkdir(parents=True, exist_ok=True)
    else:
        run_dir = new_run_dir(cfg.runs_root, cfg.name)
    cfg.run_dir = str(run_dir)
    resolved["run_dir"] = str(run_dir)
    # Ranks get the W&B key from the environment, never from a file.
    if cfg.tracking.api_key:
        os.environ["WANDB_API_KEY"] = cfg.tracking.api_key

    write_run_files(run_dir, resolved, overrides, checked, plan, ds_config)
    console.print(f"run directory: {run_dir}", highlight=False)

    from launcher.backends import launch

    code = launch(cfg, run_dir, plan)
    if code and multirun:
        raise RuntimeError(f"sweep point {run_dir} exited with {code}")
    if code:
        sys.exit(code)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def _hydra_main(cfg: DictConfig) -> None:
    run(cfg)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    register_configs()
    try:
        problems = override_problems(sys.argv[1:])
    except Exception:  # noqa: BLE001 - a grammar error: Hydra reports those itself, below
        problems = []
    if problems:
        fail(Console(stderr=True), ConfigError(problems))
    _hydra_main()


if __name__ == "__main__":
    main()
