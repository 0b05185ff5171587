"""A search's trials, best first: what `sft-jobs sweep SWEEP` prints (read-only: the study and the run dirs)."""

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from launcher.rundir import read_json
from launcher.trial.rungs import TrialRungs, trial_end
from launcher.trial.study import SearchSpec, open_study, trial_dir

STATES = {"COMPLETE": "completed", "PRUNED": "pruned", "RUNNING": "running", "FAIL": "failed", "WAITING": "waiting"}


@dataclass
class Entry:
    trial: int
    params: Dict[str, Any]
    last_rung: Optional[int]  # the last step at which the trial reported its metric
    value: Optional[float]  # the final value (completed), else the value at the last rung
    state: str
    run_dir: str
    start_failures: List[str] = field(default_factory=list)  # starts that failed not of its own doing (submitted again)


def entries(sweep_dir: Path) -> Tuple[SearchSpec, List[Entry]]:
    sweep_dir = Path(sweep_dir)
    spec = SearchSpec.load(sweep_dir)
    study = open_study(sweep_dir, spec)
    rows = []
    for t in study.get_trials(deepcopy=False):
        reported = sorted(t.intermediate_values)
        value = t.value if t.value is not None else (t.intermediate_values[reported[-1]] if reported else None)
        end = trial_end(trial_dir(sweep_dir, t.number))
        if t.state.name == "PRUNED" and end.get("value") is not None:
            value = end["value"]
        state = STATES.get(t.state.name, t.state.name.lower())
        if state == "running" and end.get("state") == "paused":
            state = "paused"  # stopped at a rung: promoted later, or pruned
        record = TrialRungs.load(trial_dir(sweep_dir, t.number))
        rows.append(Entry(t.number, dict(t.params), reported[-1] if reported else None,
                          None if value is None or (isinstance(value, float) and math.isnan(value)) else value,
                          state, str(trial_dir(sweep_dir, t.number)), record.start_failures if record else []))
    sign = -1 if spec.direction == "maximize" else 1
    order = {"completed": 0, "running": 1, "paused": 2, "pruned": 3, "waiting": 4, "failed": 5}

    def key(e: Entry):
        value = sign * e.value if e.value is not None else math.inf
        further = 0 if e.state == "completed" else -(e.last_rung or 0)  # completed: by value alone
        return (order.get(e.state, 6), further, value, e.trial)

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
    return json.dumps({"metric": spec.metric, "direction": spec.direction, "rungs": spec.rungs,
                       "trials": [asdict(e) for e in rows]}, indent=2)
