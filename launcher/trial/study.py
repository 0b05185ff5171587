"""A search's files and its Optuna study.

The sweep directory holds everything a controller (or its requeue) continues from:
    search.json     the space, the fixed overrides and the sweep.* settings
    base.yaml       the composed config every trial starts from
    study.journal   the Optuna study (journal file storage: no database server, works on a shared
                    file system); each trial's run dir is <sweep dir>/<trial number>
A trial's own rank 0 reports its metric to the study at each rung and asks whether to go on
(launcher.trial.rungs), so a promoted trial never waits for the controller.
"""

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import List, Optional

import optuna

from launcher.atomic import write_text_atomic
from launcher.trial.space import Dimension

SPEC_FILE = "search.json"
BASE_FILE = "base.yaml"
JOURNAL_FILE = "study.journal"
STUDY_NAME = "search"


@dataclass
class SearchSpec:
    dims: List[Dimension]
    fixed: List[str]  # the command's other overrides, applied to every trial
    trials: int
    parallel: int
    metric: str
    direction: str
    rungs: List[int]
    reduction: int
    sampler_seed: int
    poll_s: float
    backend: str
    name: str
    # What the rungs compare, when not `metric` (a harness/... metric is judged only after the
    # trial, on its final eval): sweep.rung_metric and sweep.rung_direction; None: metric, direction
    rung_metric: Optional[str] = None
    rung_direction: Optional[str] = None

    @property
    def compared(self) -> str:
        """The metric the rungs report and compare."""
        return self.rung_metric or self.metric

    @property
    def compared_direction(self) -> str:
        return self.rung_direction or self.direction

    @property
    def rung_maximize(self) -> bool:
        return self.compared_direction == "maximize"

    def save(self, sweep_dir: Path) -> None:
        data = {**asdict(self), "dims": [d.to_dict() for d in self.dims]}
        write_text_atomic(Path(sweep_dir) / SPEC_FILE, json.dumps(data, indent=2) + "\n")

    @classmethod
    def load(cls, sweep_dir: Path) -> "SearchSpec":
        data = json.loads((Path(sweep_dir) / SPEC_FILE).read_text())
        return cls(**{**data, "dims": [Dimension.from_dict(d) for d in data["dims"]]})


def trial_dir(sweep_dir: Path, number: int) -> Path:
    return Path(sweep_dir) / str(number)


def is_search(path: Path) -> bool:
    return (Path(path) / SPEC_FILE).is_file()


def storage(sweep_dir: Path):
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

    # The open lock (O_CREAT|O_EXCL) is the one Optuna documents for NFS; a holder killed while
    # holding it is broken after its grace period (30 s).
    path = str(Path(sweep_dir) / JOURNAL_FILE)
    return JournalStorage(JournalFileBackend(path, lock_obj=JournalFileOpenLock(path)))


def make_sampler(seed: int):
    # constant_liar: trials still training count as bad guesses, so parallel asks spread out.
    return optuna.samplers.TPESampler(seed=seed, constant_liar=True)


def open_study(sweep_dir: Path, spec: SearchSpec, sampler=None, create: bool = False):
    """The study; `sampler` only matters to whoever asks for trials (the controller)."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    kwargs = dict(study_name=STUDY_NAME, storage=storage(sweep_dir), sampler=sampler,
                  pruner=RungPruner(spec.rungs, spec.reduction, spec.rung_maximize))
    if create:
        return optuna.create_study(direction=spec.direction, load_if_exists=True, **kwargs)
    return optuna.load_study(**kwargs)


def default_rungs(total_steps: int, reduction: int) -> List[int]:
    """Three rungs: total / reduction^2, total / reduction and the end (ASHA's geometric spacing)."""
    rungs = [max(1, round(total_steps / reduction ** 2)), max(1, round(total_steps / reduction)), total_steps]
    return sorted(set(rungs))


def is_promoted(value: float, competing: List[float], reduction: int, maximize: bool) -> bool:
    """ASHA's rule: a trial goes on past a rung when its value is among the best
    len(competing) // reduction values reported there so far (`competing` includes its own).
    With fewer than `reduction` values nobody goes on yet: the trial waits at the rung."""
    if value is None or math.isnan(value):
        return False
    ranked = sorted((v for v in competing if v is not None and not math.isnan(v)), reverse=maximize)
    keep = len(ranked) // reduction
    if keep == 0:
        return False
    cutoff = ranked[keep - 1]
    return value >= cutoff if maximize else value <= cutoff


def promotable(study, trial, step: int, reduction: int, maximize: Optional[bool] = None) -> bool:
    """Whether `trial`'s value at rung `step` is now in the best 1/reduction reported there;
    `maximize`: the rungs' direction (None: the study's, which ranks the final values)."""
    competing = [t.intermediate_values[step] for t in study.get_trials(deepcopy=False) if step in t.intermediate_values]
    if maximize is None:
        maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE
    return is_promoted(trial.intermediate_values[step], competing, reduction, maximize)


class RungPruner(optuna.pruners.BasePruner):
    """An Optuna pruner over user-given rungs (Optuna's own needs geometric ones). "Prune" here
    means: stop at this rung for now. The controller later promotes the trial (it resumes from
    its checkpoint) once enough trials have reported for it to rank in the best 1/reduction, and
    prunes it for good when the search has nothing left to start."""

    def __init__(self, rungs: List[int], reduction: int, maximize: Optional[bool] = None):
        self.rungs = list(rungs)
        self.reduction = reduction
        self.maximize = maximize  # the rungs' direction; None: the study's

    def prune(self, study, trial) -> bool:
        step = trial.last_step
        if step is None or step not in self.rungs or step == self.rungs[-1]:
            return False  # the last rung is the end of training: nothing left to save
        return not promotable(study, trial, step, self.reduction, self.maximize)
