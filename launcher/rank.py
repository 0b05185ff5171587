"""The entry point every rank runs, locally or under Slurm: rank environment + run dir -> trainer."""

import json
import logging
import sys
import warnings
from pathlib import Path
from typing import Callable, Optional

from omegaconf import OmegaConf

from launcher import rundir
from launcher.exit_codes import EXIT_BAD_INPUT, EXIT_STOPPED, exit_without_teardown

log = logging.getLogger("launcher")


def setup_logging(run_dir: Path, rank: int) -> None:
    """Every rank logs to logs/rank-N.log; rank 0 also speaks on stderr."""
    log_file = rundir.rank_log(run_dir, rank)
    log_file.parent.mkdir(exist_ok=True)
    handlers = [logging.FileHandler(log_file)]
    if rank == 0:
        handlers.append(logging.StreamHandler(sys.stderr))
    fmt = f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=logging.INFO, format=fmt, handlers=handlers, force=True)
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed", "datasets", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # DeepSpeed calls the deprecated *_into_tensor collectives: one warning per call site per rank.
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")


def run_rank(run_dir: str, on_eval_model: Optional[Callable[[int], None]] = None) -> int:
    """Train one rank of the run whose files are in run_dir. Returns the process exit code.
    on_eval_model: rank 0 calls it with each step exported for the benchmark evals (the Slurm backend submits them)."""
    from launcher.signals import STOP, StoppedDuringStartup

    STOP.install()  # before the slow imports: a stop during them must not kill the rank
    from launcher.data import DataError
    from launcher.rank_env import RankEnv
    from launcher.trainer import ResumeError, SFTTrainer

    run_dir = Path(run_dir)
    env = RankEnv.from_environ()
    setup_logging(run_dir, env.rank)
    log.info("code: %s", Path(__file__).resolve().parent)  # the run's snapshot (launcher.snapshot)
    cfg = OmegaConf.load(run_dir / rundir.CONFIG)
    ds_config = json.loads((run_dir / rundir.DS_CONFIG).read_text())
    if cfg.cluster.get("min_nodes") is not None:  # elastic: this start's ranks, the same global batch
        from launcher.plan import fit_to_world

        ds_config = fit_to_world(ds_config, env.world_size, cfg.trainer.sequence_parallel)
        log.info("elastic start: %d node(s), world size %d, %d accumulation step(s) for the global batch of %d",
                 env.nodes, env.world_size, ds_config["gradient_accumulation_steps"], ds_config["train_batch_size"])
    trainer = SFTTrainer(cfg, run_dir, ds_config, env, on_eval_model)
    try:
        trainer.setup()
        return trainer.train()
    except StoppedDuringStartup as stop:
        STOP.agreed_requeue = STOP.requeue  # no collective yet: Slurm signals every rank alike
        log.warning("stop signal received before the first step: %s; exiting without a checkpoint (%d)", stop, EXIT_STOPPED)
        rundir.append_event(run_dir, rundir.STOPPED, rank=env.rank, signal=str(stop), step=None, saved=False)
        return EXIT_STOPPED
    except (DataError, ResumeError) as error:
        # The message names the file, the line and the fix: a traceback would only hide it.
        what = "a data problem" if isinstance(error, DataError) else "a resume it refused"
        log.error("rank %d stopped on %s: %s", env.rank, what, error)
        rundir.append_event(run_dir, rundir.FAILED, rank=env.rank, reason=f"{what}: {error}"[:500], exit_code=EXIT_BAD_INPUT)
        if trainer.tracker is not None:
            trainer.tracker.summary({"end_reason": "failed", "error": str(error)[:500]})
            trainer.tracker.finish(exit_code=EXIT_BAD_INPUT)
        raise SystemExit(EXIT_BAD_INPUT) from None  # a failed task under Slurm; locally the launcher names it
    except BaseException as error:
        log.exception("rank %d failed", env.rank)
        rundir.append_event(run_dir, rundir.FAILED, rank=env.rank, reason=f"{type(error).__name__}: {error}"[:500])
        if trainer.tracker is not None:
            trainer.tracker.summary({"end_reason": "failed", "error": f"{type(error).__name__}: {error}"[:500]})
            trainer.tracker.alert("run failed", f"{run_dir}: rank {env.rank} failed: {type(error).__name__}: {error}"[:1000])
            trainer.tracker.finish(exit_code=1)
        raise
    finally:
        trainer.cleanup()


if __name__ == "__main__":
    # Everything is written and closed (metrics, W&B, the process group).
    exit_without_teardown(run_rank(sys.argv[1]))
