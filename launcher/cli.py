"""`sft`: compose the config with Hydra, then validate, plan and create the run (launcher.service) and
launch it (launcher.backends); errors end here, with exit code 2 and the problems listed."""

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig
from rich.console import Console
from rich.markup import escape

from launcher.backends import launch
from launcher.errors import ConfigError
from launcher.exit_codes import EXIT_BAD_INPUT
from launcher.overrides import override_problems
from launcher.rundir import new_run_dir
from launcher.schema import register_configs
from launcher.service import create_run, prepare, print_dry_run, refuse_a_live_run, sweep_group

log = logging.getLogger("launcher")
CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def fail(console: Console, error: Exception) -> None:
    console.print(f"[bold red]error:[/] {escape(str(error))}", highlight=False, soft_wrap=True)  # [reason] is text
    sys.exit(EXIT_BAD_INPUT)


def run(cfg: DictConfig) -> None:
    """One run, or one point of a local sweep: validate, plan, write the run dir, launch."""
    console = Console(stderr=True, soft_wrap=True)
    hydra_cfg = HydraConfig.get()
    try:
        prep = prepare(cfg)
    except ConfigError as error:
        fail(console, error)
    if cfg.dry_run:
        return print_dry_run(prep, console)
    if cfg.data.preview:
        from launcher.data import DataError
        from launcher.data.preview import print_preview

        try:
            return print_preview(cfg, prep.checked)
        except (DataError, ConfigError) as error:
            fail(console, error)

    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    if multirun:
        run_dir = Path(hydra_cfg.runtime.output_dir).resolve()
    elif cfg.run_dir:
        run_dir = Path(cfg.run_dir).expanduser().resolve()
    else:
        run_dir = new_run_dir(cfg.runs_root, cfg.name)
    try:
        refuse_a_live_run(run_dir)
        create_run(prep, run_dir, list(hydra_cfg.overrides.task), sweep_group(hydra_cfg.sweep.dir) if multirun else None)
    except (ConfigError, FileNotFoundError) as error:
        fail(console, error)
    if cfg.cluster.backend == "local":  # a Slurm submission prints it with the job id
        console.print(f"run directory: {run_dir}", highlight=False)

    code = launch(cfg, run_dir, prep.plan)
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
        fail(Console(stderr=True, soft_wrap=True), ConfigError(problems))
    _hydra_main()


if __name__ == "__main__":
    main()
