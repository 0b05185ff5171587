"""A search's trials, best first: what `sft-jobs sweep SWEEP` prints (read-only: the study and the run dirs)."""

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from launcher.harness_results import final_step, harness_scores
from launcher.rundir import read_json
from launcher.trial.rungs import EVALUATING, TrialRungs, trial_end
from launcher.trial.study import SearchSpec, open_study, trial_dir

STATES = {"COMPLETE": "completed", "PRUNED": "pruned", "RUNNING": "running", "FAIL": "failed", "WAITING": "waiting"}


@dataclass
class Entry:
    trial: int
    params: Dict[str, Any]
    last_rung: Optional[int]  # the last step at which the trial reported its rungs' metric
    # sweep.metric's final value (completed); before that, when the rungs compare sweep.metric
    # itself, its value at the last rung (else None: rung_value has it)
    value: Optional[float]
    state: str
    run_dir: str
    start_failures: List[str] = field(default_factory=list)  # starts that failed not of its own doing (submitted again)
    rung_value: Optional[float] = None  # the rungs' metric (sweep.rung_metric, else sweep.metric) at the last rung
    harness: Dict[str, float] = field(default_factory=dict)  # its final eval's benchmark scores (harness/<task>/<metric>)


def finite(value) -> Optional[float]:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


def final_harness(run_dir: Path) -> Tuple[Optional[int], Dict[str, float]]:
    """The run's final eval (at its last step) and its scores; {} until that eval is done."""
    last = final_step(run_dir)
    scores = harness_scores(run_dir)
    if last is None and scores:
        last = max(scores)
    return last, dict(scores.get(last, {}))


def entries(sweep_dir: Path) -> Tuple[SearchSpec, List[Entry]]:
    sweep_dir = Path(sweep_dir)
    spec = SearchSpec.load(sweep_dir)
    study = open_study(sweep_dir, spec)
    same = spec.compared == spec.metric
    rows = []
    for t in study.get_trials(deepcopy=False):
        run_dir = trial_dir(sweep_dir, t.number)
        reported = sorted(t.intermediate_values)
        rung_value = t.intermediate_values[reported[-1]] if reported else None
        end = trial_end(run_dir)
        if t.state.name == "PRUNED" and end.get("value") is not None:
            rung_value = end["value"]
        # A pruned trial's value in the study is its last rung's (Optuna's): sweep.metric's only when the rungs compare it
        value = t.value if t.state.name == "COMPLETE" else (rung_value if same else None)
        state = STATES.get(t.state.name, t.state.name.lower())
        if state == "running" and end.get("state") == "paused":
            state = "paused"  # stopped at a rung: promoted later, or pruned
        if state == "running" and end.get("state") == EVALUATING:
            state = "evaluating"  # trained to the end: its final eval gives its value
        record = TrialRungs.load(run_dir)
        rows.append(Entry(t.number, dict(t.params), reported[-1] if reported else None, finite(value), state,
                          str(run_dir), record.start_failures if record else [], finite(rung_value),
                          final_harness(run_dir)[1]))
    sign = -1 if spec.direction == "maximize" else 1
    rung_sign = -1 if spec.rung_maximize else 1
    order = {"completed": 0, "evaluating": 1, "running": 1, "paused": 2, "pruned": 3, "waiting": 4, "failed": 5}

    def key(e: Entry):
        if e.state == "completed":  # by value alone
            return (0, 0, sign * e.value if e.value is not None else math.inf, e.trial)
        value = rung_sign * e.rung_value if e.rung_value is not None else math.inf
        return (order.get(e.state, 6), -(e.last_rung or 0), value, e.trial)

    return spec, sorted(rows, key=key)


def best(rows: List[Entry]) -> Optional[Entry]:
    done = [e for e in rows if e.state == "completed" and e.value is not None]
    return done[0] if done else None


def search_end(sweep_dir: Path) -> Dict[str, Any]:
    return read_json(Path(sweep_dir) / "search_end.json")


def controller_jobs(sweep_dir: Path) -> List[str]:
    jobs = read_json(Path(sweep_dir) / "controller.json").get("jobs") or []
    return [str(j["job_id"]) for j in jobs if isinstance(j, dict) and j.get("job_id")]


def as_json(spec: SearchSpec, rows: List[Entry]) -> str:
    return json.dumps({"metric": spec.metric, "direction": spec.direction, "rung_metric": spec.compared,
                       "rung_direction": spec.compared_direction, "rungs": spec.rungs,
                       "trials": [asdict(e) for e in rows]}, indent=2)
