"""A search space written in Hydra's own sweep grammar, as Optuna distributions.

    optim.lr=tag(log,interval(1e-6,1e-4))    -> a float, sampled on a log scale
    trainer.global_batch_size=choice(64,128)  -> one of the values (also: 64,128)
    seed=range(1,3)                           -> an int in [1, 3) (Hydra's range excludes its end)
    tag(int,interval(1,8))                    -> an int in [1, 8]

Only plain config keys are searched: a config group (model=..., deepspeed=...) changes the whole
composition, so a search over one is a separate search per choice.
"""

import itertools
from dataclasses import dataclass
from typing import Any, Dict, List, Sequence, Tuple

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import (
    ChoiceSweep,
    IntervalSweep,
    Override,
    RangeSweep,
)

from launcher.errors import ConfigError, problem
from launcher.overrides import is_group_or_hydra_key

PLAIN = (str, int, float, bool, type(None))
MAX_CHECKED_POINTS = 64  # corners of the space composed and validated before submitting


@dataclass(frozen=True)
class Dimension:
    """One searched key: kind is 'float', 'int' or 'choice'; low/high bound the numeric kinds."""

    key: str
    kind: str
    low: Any = None
    high: Any = None
    step: Any = None
    log: bool = False
    values: Tuple[Any, ...] = ()

    def distribution(self):
        from optuna.distributions import (
            CategoricalDistribution,
            FloatDistribution,
            IntDistribution,
        )

        if self.kind == "choice":
            return CategoricalDistribution(self.values)
        if self.kind == "int":
            return IntDistribution(self.low, self.high, log=self.log, step=self.step or 1)
        return FloatDistribution(self.low, self.high, log=self.log)

    def corners(self) -> List[Any]:
        """The values a check of the space composes: every choice, the bounds of a range."""
        return list(self.values) if self.kind == "choice" else list(dict.fromkeys([self.low, self.high]))

    def to_dict(self) -> Dict[str, Any]:
        return {"key": self.key, "kind": self.kind, "low": self.low, "high": self.high, "step": self.step,
                "log": self.log, "values": list(self.values)}

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "Dimension":
        return cls(**{**data, "values": tuple(data["values"])})


def split_overrides(arguments: Sequence[str]) -> Tuple[List[str], List[Dimension]]:
    """The fixed overrides (applied to every trial) and the searched dimensions, in command order."""
    fixed, dims, problems = [], [], []
    for override in OverridesParser.create().parse_overrides(list(arguments)):
        if not override.is_sweep_override():
            fixed.append(override.input_line)
            continue
        try:
            dims.append(dimension(override))
        except ConfigError as error:
            problems += error.problems
    if problems:
        raise ConfigError(problems)
    return fixed, dims


def dimension(override: Override) -> Dimension:
    key, sweep = override.key_or_group, override.value()
    text = override.input_line.partition("=")[2]  # as typed
    if is_group_or_hydra_key(key):
        raise ConfigError([problem(key, text, (
            "a search covers plain config keys; a config group or Hydra setting changes the whole "
            "composition: run one search per choice"))])
    tags = set(sweep.tags)
    unknown = tags - {"log", "int"}
    if unknown:
        raise ConfigError([problem(key, text, f"unknown tag {sorted(unknown)[0]!r}: the tags are log (sample on a log scale) and int")])
    if isinstance(sweep, IntervalSweep):
        low, high = sweep.start, sweep.end
        if not low < high:
            raise ConfigError([problem(key, text, "the interval's start must be below its end")])
        if "log" in tags and low <= 0:
            raise ConfigError([problem(key, text, "a log-scale interval must be above 0")])
        if "int" in tags:
            return Dimension(key, "int", int(low), int(high), 1, "log" in tags)
        return Dimension(key, "float", float(low), float(high), None, "log" in tags)
    if isinstance(sweep, RangeSweep):
        start, stop, step = sweep.start, sweep.stop, sweep.step
        if all(isinstance(v, int) for v in (start, stop, step)) and step > 0 and stop > start and "log" not in tags:
            return Dimension(key, "int", start, start + step * ((stop - 1 - start) // step), step, False)
        values = _float_range(start, stop, step)
        if not values:
            raise ConfigError([problem(key, text, "the range holds no value")])
        return Dimension(key, "choice", values=tuple(values))
    if isinstance(sweep, ChoiceSweep):
        values = tuple(sweep.list)
        bad = [v for v in values if not isinstance(v, PLAIN)]
        if bad:
            raise ConfigError([problem(key, bad[0], "a choice's values must be plain (numbers, strings, booleans, null)")])
        if len(set(values)) != len(values):
            raise ConfigError([problem(key, list(values), "a choice lists a value twice")])
        return Dimension(key, "choice", values=values)
    raise ConfigError([problem(key, text, "not a sweep this search understands: "
                               "use choice(...), a,b,..., range(...) or interval(...), optionally in tag(log, ...)")])


def _float_range(start, stop, step) -> List[float]:
    values, value = [], start
    while (step > 0 and value < stop) or (step < 0 and value > stop):
        values.append(value)
        value += step
    return values


def corner_points(dims: Sequence[Dimension]) -> List[Dict[str, Any]]:
    """Points to validate before submitting: every combination of every dimension's corners when
    there are at most MAX_CHECKED_POINTS, else each dimension's corners with the others at their first."""
    grids = [d.corners() for d in dims]
    total = 1
    for grid in grids:
        total *= len(grid)
    if total <= MAX_CHECKED_POINTS:
        return [dict(zip((d.key for d in dims), combo)) for combo in itertools.product(*grids)]
    first = {d.key: grid[0] for d, grid in zip(dims, grids)}
    points = [first]
    for d, grid in zip(dims, grids):
        points += [{**first, d.key: value} for value in grid[1:]]
    return points


def as_overrides(params: Dict[str, Any]) -> List[str]:
    """A trial's values as key=value overrides (what its run dir records)."""
    return [f"{key}={_literal(value)}" for key, value in params.items()]


def _literal(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return repr(value)
    return str(value)


def with_params(base, params: Dict[str, Any]):
    """A copy of the composed config with the point's values; a value the schema refuses for its
    key (a float for an int key) is a ConfigError naming both."""
    from omegaconf import OmegaConf
    from omegaconf.errors import ValidationError

    cfg = base.copy()
    for key, value in params.items():
        try:
            OmegaConf.update(cfg, key, value, merge=True)
        except ValidationError as error:
            hint = "; for an int key write tag(int,interval(a,b)), range(a,b) or choice(...)" if isinstance(value, float) else ""
            raise ConfigError([problem(key, value, f"the schema refuses it ({str(error).splitlines()[0]}){hint}")])
    return cfg
