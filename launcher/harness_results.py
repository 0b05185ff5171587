"""A run's benchmark evals (eval.harness): the files under <run dir>/evals/, their writers and readers.

  evals/step-000100/           one checkpoint's eval (the final one evaluates export/)
    ready.json                 the trainer exported the model for it: {"step", "model"}
    model/                     that model (Hugging Face safetensors), for a checkpoint before the last
    job.json                   the Slurm eval job that evaluates it: {"job_id", "submitted_at", ...}
    results.json               lm-eval's own results JSON (the per-sample records left out)
    summary.json               {"step", "scores": {"harness/<task>/<metric>": value}, "model", "seconds"}
    summary.txt                the same on one line, for people
    wandb.json                 the scores are in the run's W&B run (its segment is in wandb/)
    failed.json                the eval failed: {"step", "error", "log"}
    eval.log                   the eval's own log
  evals/tasks/                 the bundled tasks' lm-eval YAMLs and data, written by the first eval

sft-jobs, the search controller and the eval jobs read these files only.
"""

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from launcher import rundir
from launcher.atomic import write_text_atomic

EVALS = "evals"
TASKS = "tasks"
READY = "ready.json"
MODEL = "model"
JOB = "job.json"
RESULTS = "results.json"
SUMMARY = "summary.json"
SUMMARY_TEXT = "summary.txt"
FAILED = "failed.json"
LOG = "eval.log"
WANDB_DONE = "wandb.json"  # the scores are in W&B (a requeued eval that finds only summary.json logs them)
PREFIX = "harness/"


def evals_dir(run_dir: Path) -> Path:
    return Path(run_dir) / EVALS


def step_dir(run_dir: Path, step: int) -> Path:
    return evals_dir(run_dir) / f"step-{int(step):06d}"


def _read(path: Path) -> Dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_json(path: Path, data: Dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(data, indent=2, default=str) + "\n")


def mark_ready(run_dir: Path, step: int, model: Path) -> Path:
    """The trainer's side: the model of `step` is complete on disk and may be evaluated."""
    path = step_dir(run_dir, step) / READY
    write_json(path, {"step": int(step), "model": str(model), "at": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    return path


def metric_key(task: str, metric: str) -> str:
    """lm-eval's "<metric>,<filter>" as a W&B key: harness/<task>/<metric> (filter "none"),
    harness/<task>/<metric>/<filter> otherwise."""
    name, _, filt = metric.partition(",")
    return f"{PREFIX}{task}/{name}" + (f"/{filt}" if filt and filt != "none" else "")


def scores_of(results: Dict[str, Any]) -> Dict[str, float]:
    """The numbers of lm-eval's `results` section as harness/<task>/<metric> (standard errors left out)."""
    scores = {}
    for task, values in (results.get("results") or {}).items():
        for metric, value in values.items():
            # lm-eval names each number "<metric>,<filter>"; "alias", "name", "sample_len" are not scores
            if "," not in metric or "_stderr" in metric or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            scores[metric_key(task, metric)] = float(value)
    return scores


@dataclass
class EvalState:
    """One checkpoint's eval as its files say: queued (submitted, no result), done, failed, or
    ready (exported, never submitted: a local run's evals run after training)."""

    step: int
    state: str
    scores: Dict[str, float] = field(default_factory=dict)
    job_id: Optional[str] = None
    error: Optional[str] = None
    log: Optional[str] = None
    model: Optional[str] = None


def read_state(folder: Path) -> Optional[EvalState]:
    ready, job, summary, failed = (_read(folder / name) for name in (READY, JOB, SUMMARY, FAILED))
    if not (ready or job or summary or failed):
        return None
    step = next((d["step"] for d in (summary, failed, job, ready) if isinstance(d.get("step"), int)), None)
    if step is None:
        return None
    job_id = str(job["job_id"]) if job.get("job_id") else None
    log = failed.get("log") or (str(folder / LOG) if (folder / LOG).exists() else None)
    if summary:
        return EvalState(step, "done", dict(summary.get("scores") or {}), job_id, model=summary.get("model"))
    if failed:
        return EvalState(step, "failed", {}, job_id, error=failed.get("error"), log=log)
    return EvalState(step, "queued" if job_id else "ready", {}, job_id, log=log, model=ready.get("model"))


def eval_states(run_dir: Path) -> List[EvalState]:
    """Every checkpoint's eval of the run, by step."""
    found = (read_state(d) for d in sorted(evals_dir(run_dir).glob("step-*")) if d.is_dir())
    return sorted((s for s in found if s is not None), key=lambda s: s.step)


def harness_scores(run_dir: Path) -> Dict[int, Dict[str, float]]:
    """{step: {harness/<task>/<metric>: value}} of the evals that are done."""
    return {s.step: s.scores for s in eval_states(run_dir) if s.state == "done"}


def final_step(run_dir: Path) -> Optional[int]:
    """The step of the run's final eval: where it completed (its event), else the total the trainer
    counted once it had tokenised the data (an epoch-based total differs from plan.json's estimate),
    else the plan's."""
    events = rundir.read_events(Path(run_dir)) or []
    for kind in (rundir.COMPLETED, rundir.STARTED):
        found = [e.get("step" if kind == rundir.COMPLETED else "total_steps") for e in events if e.get("event") == kind]
        found = [f for f in found if isinstance(f, int)]
        if found:
            return found[-1]
    total = rundir.plan(Path(run_dir)).get("total_steps")
    return total if isinstance(total, int) else None


def final_score(run_dir: Path, metric: str, last_step: Optional[int]) -> Optional[float]:
    """The metric at the run's last step (its final export's eval), None while not done."""
    if last_step is None:
        return None
    return harness_scores(run_dir).get(last_step, {}).get(metric)


def one_line(step: int, scores: Dict[str, float]) -> str:
    return f"step {step}: " + ", ".join(f"{k[len(PREFIX):]} {v:.4g}" for k, v in sorted(scores.items()))
