"""One benchmark eval (eval.harness) of one step's model: what an eval job runs, on Slurm in its own
allocation, locally after training (`python -m launcher.harness RUN_DIR STEP`).

It scores the model the trainer exported for the step (evals/step-N/model, or export/ for the last
step) with lm-evaluation-harness, writes lm-eval's results and a summary into evals/step-N/
(launcher.harness_results), and logs harness/<task>/<metric> to the run's W&B run at that step.
A failure is the eval's: failed.json says why, the run stays as it ended. Done once: an eval whose
summary exists is not run again (a requeued job). The checkpoint's model copy is deleted once scored.
"""

import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from omegaconf import OmegaConf

from launcher import harness_results as files
from launcher import harness_tasks, rundir
from launcher.exit_codes import exit_without_teardown

log = logging.getLogger("launcher.harness")


def model_args(backend: str, model: Path, gpus: int) -> str:
    if backend == "vllm":
        return f"pretrained={model},dtype=auto,tensor_parallel_size={max(1, gpus)}"
    return f"pretrained={model},dtype=auto"


def evaluate(model: Path, tasks: List[str], harness_cfg) -> Dict[str, Any]:
    """lm-eval's simple_evaluate over `tasks` (registered names, or paths to task YAMLs: their folders
    are lm-eval include paths, as `lm_eval --include_path DIR --tasks NAME` reads them)."""
    import lm_eval
    import torch
    from lm_eval.tasks import TaskManager

    folders = sorted({str(Path(t).expanduser().resolve().parent) for t in tasks if harness_tasks.is_path(t)})
    manager = TaskManager(include_path=folders or None)
    return lm_eval.simple_evaluate(
        model=str(harness_cfg.backend), model_args=model_args(str(harness_cfg.backend), model, harness_cfg.gpus),
        tasks=harness_tasks.task_names(tasks), task_manager=manager, limit=harness_cfg.limit,
        num_fewshot=harness_cfg.num_fewshot, batch_size=harness_cfg.batch_size,
        device="cuda" if torch.cuda.is_available() else "cpu", log_samples=False,
    )


def task_list(cfg, run_dir: Path, model: Path) -> List[str]:
    """eval.harness.tasks with each bundled task replaced by the path of its YAML (written once per run)."""
    from transformers import AutoTokenizer

    tasks = [str(t) for t in cfg.eval.harness.tasks]
    if any(t in harness_tasks.BUNDLED for t in tasks):
        tokenizer = AutoTokenizer.from_pretrained(str(model))
        written = {p.stem: str(p) for p in harness_tasks.write_bundled(tasks, files.evals_dir(run_dir) / files.TASKS,
                                                                        tokenizer, cfg.eval.max_new_tokens)}
        tasks = [written.get(t, t) for t in tasks]
    return tasks


def log_to_wandb(cfg, run_dir: Path, folder: Path, step: int, scores: Dict[str, float]) -> Optional[str]:
    """The scores in the training's W&B run at `step`: a segment of the same run id, its files under
    evals/step-N/wandb (sft-jobs sync uploads it). The step goes in trainer/global_step, not as W&B's
    own step: the run may be further along than this checkpoint."""
    from launcher.tracking import STEP_METRIC, start_tracking

    id_file = run_dir / rundir.WANDB_RUN_ID
    if not id_file.is_file():
        return None
    tracker = start_tracking(cfg.tracking, run_dir, 0, OmegaConf.to_container(cfg, resolve=True), resume=True,
                             files_dir=folder, second_writer=f"eval-step-{step}")
    if tracker.run_id is None:
        return None
    tracker.log_without_step({**scores, STEP_METRIC: step})
    tracker.finish()
    return tracker.run_id


def run_eval(run_dir: Path, step: int) -> int:
    run_dir = Path(run_dir)
    folder = files.step_dir(run_dir, step)
    folder.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True,
                        handlers=[logging.FileHandler(folder / files.LOG), logging.StreamHandler(sys.stderr)])
    cfg = OmegaConf.load(run_dir / rundir.CONFIG)
    ready = files.read_state(folder)
    model = Path(ready.model) if ready is not None and ready.model else run_dir / rundir.EXPORT
    if (folder / files.SUMMARY).is_file():  # a requeued job: scored already, perhaps not yet in W&B
        log.info("step %d is scored already: %s", step, folder / files.SUMMARY)
        scores = json.loads((folder / files.SUMMARY).read_text())["scores"]
    else:
        (folder / files.FAILED).unlink(missing_ok=True)  # a second try
        if not cfg.eval.harness.allow_hub:  # checked at submission; here a miss fails at once instead of waiting on the network
            os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
        try:
            scores = score(cfg, run_dir, folder, step, model)
        except Exception as error:  # noqa: BLE001 - the eval's failure is recorded, and is not the run's
            log.exception("the benchmark eval of step %d failed", step)
            files.write_json(folder / files.FAILED, {"step": step, "error": f"{type(error).__name__}: {error}"[:2000],
                                                     "log": str(folder / files.LOG)})
            return 1
    if not (folder / files.WANDB_DONE).is_file():
        try:
            run_id = log_to_wandb(cfg, run_dir, folder, step, scores)
            if run_id is not None:
                files.write_json(folder / files.WANDB_DONE, {"run_id": run_id, "step": step})
        except Exception:  # noqa: BLE001 - the scores are on disk; W&B is a copy
            log.exception("W&B did not take step %d's scores; they are in %s", step, folder / files.SUMMARY)
    if model.parent == folder:  # the checkpoint's copy; the checkpoint itself stays for resuming
        shutil.rmtree(model, ignore_errors=True)
    return 0


def score(cfg, run_dir: Path, folder: Path, step: int, model: Path) -> Dict[str, float]:
    """lm-eval on the step's model; its results and the summary written into the step's folder."""
    start = time.perf_counter()
    if not (model / "config.json").is_file():
        raise FileNotFoundError(f"no model to evaluate at {model} (the trainer exports it after the save)")
    results = evaluate(model, task_list(cfg, run_dir, model), cfg.eval.harness)
    scores = files.scores_of(results)
    if not scores:
        raise RuntimeError(f"lm-eval returned no scores (its results: {json.dumps(results.get('results'), default=str)[:500]})")
    files.write_json(folder / files.RESULTS, {k: v for k, v in results.items() if k != "samples"})
    summary = {"step": step, "scores": scores, "model": str(model), "seconds": round(time.perf_counter() - start, 2),
               "tasks": [str(t) for t in cfg.eval.harness.tasks], "limit": cfg.eval.harness.limit}
    (folder / files.SUMMARY_TEXT).write_text(files.one_line(step, scores) + "\n")
    files.write_json(folder / files.SUMMARY, summary)  # last: it says the eval is done
    log.info("%s", files.one_line(step, scores))
    return scores


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m launcher.harness RUN_DIR STEP", file=sys.stderr)
        return 2
    return run_eval(Path(argv[0]), int(argv[1]))


if __name__ == "__main__":
    # Scores, files and W&B are written.
    exit_without_teardown(main())
