"""The trial's side of a search: at each rung its rank 0 reports the metric to the study and asks
whether to go on. A trial in the best 1/reduction so far trains on without leaving its GPUs;
any other stops at the rung the way a stopped run does (checkpoint, exit 75, no requeue) and
waits: the controller resumes it from that checkpoint if later trials rank it among the best, and
prunes it for good otherwise.

The controller writes <run dir>/trial.json when it creates the trial; a run without it is no trial.
"""

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from launcher.atomic import write_text_atomic
from launcher.rundir import TRIAL as TRIAL_FILE
from launcher.rundir import TRIAL_END as END_FILE  # why the trial stopped: paused at a rung, pruned, metric missing

log = logging.getLogger(__name__)


class SweepMetricError(RuntimeError):
    """sweep.metric is not among what the trial logs at a rung."""


@dataclass
class TrialRungs:
    run_dir: Path
    sweep_dir: str
    number: int
    trial_id: int
    rungs: List[int]
    metric: str  # what its rungs report: sweep.rung_metric, else sweep.metric
    stop_resumes: int = 0  # times the controller resumed it after a stop outside a rung
    start_failures: List[str] = field(default_factory=list)  # why starts failed that were not its own doing
    setting: str = "sweep.metric"  # the key that set `metric` (sweep.rung_metric when given), for messages

    @classmethod
    def load(cls, run_dir: Path) -> Optional["TrialRungs"]:
        path = Path(run_dir) / TRIAL_FILE
        if not path.is_file():
            return None
        data = json.loads(path.read_text())
        return cls(Path(run_dir), data["sweep_dir"], data["number"], data["trial_id"], list(data["rungs"]), data["metric"],
                   data.get("stop_resumes", 0), list(data.get("start_failures", [])), data.get("setting", "sweep.metric"))

    def write(self) -> None:
        data = {"sweep_dir": self.sweep_dir, "number": self.number, "trial_id": self.trial_id,
                "rungs": self.rungs, "metric": self.metric, "stop_resumes": self.stop_resumes,
                "start_failures": self.start_failures, "setting": self.setting}
        write_text_atomic(self.run_dir / TRIAL_FILE, json.dumps(data, indent=2) + "\n")

    def is_rung(self, step: int) -> bool:
        return step in self.rungs

    def metric_value(self, step: int, rows: Dict[str, Dict[str, Any]]) -> float:
        """The metric at this step from the rows just logged (kind -> row); a clear error if absent."""
        kind, _, key = self.metric.partition("/")
        row = rows.get(kind)
        if row is None or row.get("step") != step or not isinstance(row.get(key), (int, float)):
            logged = {k: sorted(n for n, v in r.items() if isinstance(v, (int, float)) and n != "step")
                      for k, r in rows.items() if r.get("step") == step}
            found = "; ".join(f"{k}: {', '.join(names)}" for k, names in sorted(logged.items())) or "nothing"
            message = (f"{self.setting}={self.metric!r}: the trial logged no {key!r} in its {kind!r} rows at rung step "
                       f"{step}; it logged {found}. Use one of those as <kind>/<key> (eval rows need an eval set: "
                       f"data.eval_fraction or data.eval_files)")
            write_text_atomic(self.run_dir / END_FILE, json.dumps({"state": "error", "step": step, "message": message}) + "\n")
            raise SweepMetricError(message)
        return float(row[key])

    def judge(self, step: int, rows: Dict[str, Dict[str, Any]]) -> bool:
        """Report the rung's value; True when the trial stops at this rung (recorded in trial_end.json)."""
        import optuna

        from launcher.trial.study import SearchSpec, open_study

        value = self.metric_value(step, rows)
        study = open_study(Path(self.sweep_dir), SearchSpec.load(Path(self.sweep_dir)))
        trial = optuna.trial.Trial(study, self.trial_id)
        try:
            trial.report(value if math.isfinite(value) else float("nan"), step)
        except optuna.exceptions.UpdateFinishedTrialError:
            log.warning("trial %d is no longer part of its search (pruned or failed there): it trains on", self.number)
            return False  # continued by hand (sft run_dir=...): a run like any other
        stop = trial.should_prune()
        if stop:
            write_end(self.run_dir, "paused", step, value)
        return stop


# trial_end.json's state of a trial ranked by a benchmark metric that has trained to the end: its
# final eval decides its value (the controller tells the study once that eval is done or failed)
EVALUATING = "evaluating"


def write_end(run_dir: Path, state: str, step: int, value: Optional[float]) -> None:
    write_text_atomic(Path(run_dir) / END_FILE, json.dumps({"state": state, "step": step, "value": value}) + "\n")


def trial_end(run_dir: Path) -> Dict[str, Any]:
    try:
        return json.loads((Path(run_dir) / END_FILE).read_text())
    except (OSError, ValueError):
        return {}
