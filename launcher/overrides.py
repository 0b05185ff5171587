"""Command-line overrides checked against the schema before Hydra runs, so a typo gets suggestions
and a value outside a key's choices gets the same message as every other bad value."""

import dataclasses
import difflib
import typing
from typing import Any, List, Optional

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, Override

from launcher.errors import problem
from launcher.schema import Config, choice_type, one_of

GROUPS = ("model", "data", "optim", "deepspeed", "cluster", "tracking", "recipe")


def _field_type(cls: Any, name: str) -> Optional[Any]:
    hints = typing.get_type_hints(cls)
    return hints.get(name) if name in {f.name for f in dataclasses.fields(cls)} else None


def is_group_or_hydra_key(key: str) -> bool:
    """A config-group choice (model=..., hydra/launcher=...) or a Hydra setting, not a schema key."""
    return key in GROUPS or "/" in key or key.startswith("hydra")


def key_problem(key: str) -> Optional[str]:
    """None if `key` (dotted) is in the schema, else a message with the nearest valid keys."""
    node: Any = Config
    walked: List[str] = []
    for part in key.split("."):
        if not dataclasses.is_dataclass(node):
            return None  # below a Dict/Any field: free-form (deepspeed.extra, cluster.sbatch_extra)
        typ = _field_type(node, part)
        if typ is None:
            valid = [f.name for f in dataclasses.fields(node)]
            prefix = ".".join(walked)
            near = difflib.get_close_matches(part, valid, n=3, cutoff=0.5)
            hint = f"did you mean {', '.join(f'{prefix}.{n}' if prefix else n for n in near)}? " if near else ""
            where = f"keys of {prefix}" if prefix else "top-level keys"
            return problem(key, None, f"unknown key; {hint}valid {where}: {', '.join(valid)}").replace("=None:", ":", 1)
        walked.append(part)
        node = typ
    return None


def schema_type(key: str) -> Optional[Any]:
    """The annotation of a dotted schema key; None for a key that is not one (or is below a free-form dict)."""
    node: Any = Config
    for part in key.split("."):
        if not dataclasses.is_dataclass(node):
            return None
        node = _field_type(node, part)
        if node is None:
            return None
    return node


def value_problem(override: Override) -> Optional[str]:
    """None unless the override gives a Choice key (launcher.schema) a value outside its choices.

    Hydra refuses such a value too, but with its own message and exit code; this one reads like
    every other config problem: trainer.precision='bf17': must be one of bf16, fp16, fp32.
    """
    choice = choice_type(schema_type(override.key_or_group))
    if choice is None:
        return None
    if override.is_sweep_override():
        value = override.value()
        if not isinstance(value, ChoiceSweep):
            return None  # a range or interval of a Choice key: Hydra says what is wrong
        values = list(value.list)
    else:
        values = [override.value()]
    bad = []
    for value in values:
        items = value if isinstance(value, list) else [value]  # List[Choice] keys: checkpoint.allow_changes
        bad += [item for item in items if item is not None and not _interpolation(item)
                and str(item).removeprefix(f"{choice.__name__}.") not in choice.values()]
    if not bad:
        return None
    return problem(override.key_or_group, bad[0] if len(bad) == 1 else bad, one_of(choice))


def _interpolation(value: Any) -> bool:
    return isinstance(value, str) and "${" in value


def override_problems(args: List[str]) -> List[str]:
    """Problems with the keys of `key=value`, `+key=value` and `++key=value` overrides.

    Hydra lets `+` add any key even to a typed config; in ours only free-form dicts take new keys.
    """
    overrides = [a for a in args if "=" in a and not a.startswith("-")]
    problems = []
    for override in OverridesParser.create().parse_overrides(overrides):
        key = override.key_or_group
        if override.is_delete():
            continue
        if is_group_or_hydra_key(key):
            continue
        message = key_problem(key) or value_problem(override)
        if message:
            problems.append(message)
    return problems
