"""A Hydra launcher that turns a multirun sweep into ONE Slurm job array and returns at once.

Selected by `cluster=slurm` (conf/cluster/slurm.yaml) or `hydra/launcher=sft_slurm`. Unlike the
stock Submitit launcher it never waits for the jobs: it validates every point, writes every run
directory, makes a single sbatch call, prints the array id and exits.
"""

from pathlib import Path
from typing import List, Sequence

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobReturn, JobStatus, setup_globals
from hydra.plugins.launcher import Launcher
from omegaconf import OmegaConf, open_dict
from rich.console import Console
from rich.markup import escape

from launcher.overrides import is_group_or_hydra_key


class SlurmSweeper(BasicSweeper):
    """Hydra's basic sweeper, minus its own composition of every point before launching: our
    launcher composes and validates each point anyway (Hydra's check doubled a sweep's cost)."""

    def validate_batch_is_legal(self, batch) -> None:
        pass


def is_value_override(override) -> bool:
    """`key=value` for a plain config key: applied on a composed config, no recomposition needed."""
    return not (override.is_add() or override.is_force_add() or override.is_delete() or override.package
                or is_group_or_hydra_key(override.key_or_group))


class SlurmSweepLauncher(Launcher):
    def __init__(self, **kwargs) -> None:
        self.config = None
        self.hydra_context = None
        self._parser = OverridesParser.create()
        self._parsed: dict = {}  # override line -> parsed Override

    def setup(self, *, hydra_context, task_function, config) -> None:
        self.config = config
        self.hydra_context = hydra_context

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from launcher.backends.slurm import offline_wandb, submit_runs
        from launcher.service import create_run, print_dry_run

        setup_globals()
        console = Console(stderr=True, soft_wrap=True)
        sweep_dir = Path(str(self.config.hydra.sweep.dir)).resolve()
        try:
            points = self._prepare_points(job_overrides, initial_job_idx, console)
        except SystemExit:
            remove_unused_sweep_dir(sweep_dir)
            raise
        first = points[0][-1]
        if first.cfg.dry_run:
            remove_unused_sweep_dir(sweep_dir)
            print_dry_run(first, console)
            for idx, overrides, _, prep in points[1:]:  # the first point's warnings came with its plan
                for warning in prep.checked.warnings:
                    console.print(f"[yellow]point {idx} ({' '.join(overrides)}): warning (a real run would stop here):[/] "
                                  f"{escape(warning)}", highlight=False, soft_wrap=True)
            console.print(f"dry run: {len(points)} points would be one job array", highlight=False)
            return []

        run_dirs: List[Path] = []
        group = f"{sweep_dir.parent.name}/{sweep_dir.name}"
        for idx, overrides, _, prep in points:
            run_dir = sweep_dir / str(idx)
            create_run(prep, run_dir, overrides, sweep_group=group)
            run_dirs.append(run_dir)
        job_ids = submit_runs(first.cfg, first.plan, run_dirs, sweep_dir / "submitit", first.cfg.name)
        array_id = job_ids[0].split("_")[0]
        print(f"submitted job array {array_id} with {len(job_ids)} tasks\nsweep directory: {sweep_dir}\n"
              f"W&B group: {group}\nfollow it: sft-jobs status {sweep_dir}", flush=True)
        if offline_wandb(first.cfg):
            print(f"upload W&B from this node as it runs: sft-jobs sync {sweep_dir} --follow", flush=True)
        # Hydra's sweeper reads only the return values; the points' Hydra configs are not rebuilt.
        return [
            JobReturn(overrides=overrides, cfg=task_cfg, hydra_cfg=None, _return_value=job_id, status=JobStatus.COMPLETED)
            for (_, overrides, task_cfg, _), job_id in zip(points, job_ids)
        ]

    def _compose(self, overrides: List[str], cache: dict):
        """The point's task config (no `hydra` node). Hydra composes each distinct set of group
        choices once (~0.2 s each); value overrides (optim.lr=..., seed=...; never hydra.* keys)
        are then applied to a copy of its task part (~2 ms), type-checked by the schema."""
        # Points share all but a few overrides: parse each distinct one once (~1 ms each).
        parsed = [self._parsed.get(line) or self._parsed.setdefault(line, self._parser.parse_override(line)) for line in overrides]
        structural = tuple(o.input_line for o in parsed if not is_value_override(o))
        if structural not in cache:
            composed = self.hydra_context.config_loader.load_sweep_config(self.config, list(structural))
            with open_dict(composed):
                del composed["hydra"]
            cache[structural] = composed
        cfg = cache[structural].copy()
        for override in parsed:
            if is_value_override(override):
                OmegaConf.update(cfg, override.key_or_group, override.value(), merge=True)
        return cfg

    def _prepare_points(self, job_overrides, initial_job_idx: int, console: Console) -> list:
        """Validate and plan every point before writing anything: one bad point submits nothing."""
        from launcher.cli import fail
        from launcher.service import prepare
        from launcher.errors import ConfigError

        points, cache = [], {}
        for idx, overrides in enumerate(job_overrides, start=initial_job_idx):
            task_cfg = self._compose(list(overrides), cache)
            try:
                points.append((idx, list(overrides), task_cfg, prepare(task_cfg)))
            except ConfigError as error:
                fail(console, error)
        shapes = {(p.plan.nodes, p.plan.procs_per_node, OmegaConf.to_yaml(p.cfg.cluster)) for *_, p in points}
        if len(shapes) > 1:
            console.print("[bold red]error:[/] a Slurm sweep is one job array, so every point needs the same cluster.* "
                          "settings; sweep cluster keys in separate commands", highlight=False, soft_wrap=True)
            raise SystemExit(2)
        return points


def remove_unused_sweep_dir(sweep_dir: Path) -> None:
    """Hydra wrote multirun.yaml into the sweep dir; a dry or failed sweep leaves nothing behind."""
    if sweep_dir.is_dir() and {p.name for p in sweep_dir.iterdir()} <= {"multirun.yaml"}:
        for path in sweep_dir.iterdir():
            path.unlink()
        sweep_dir.rmdir()
        for parent in (sweep_dir.parent, sweep_dir.parent.parent):
            if parent.is_dir() and not any(parent.iterdir()):
                parent.rmdir()
