"""The one error type a bad config raises: every problem names the key, the bad value and what is valid."""

from enum import Enum
from typing import Any, List


def problem(key: str, value: Any, valid: str) -> str:
    if isinstance(value, Enum):  # a Choice member reads as its value: 'cpu', not <OffloadDevice.cpu: 'cpu'>
        value = value.value
    return f"{key}={value!r}: {valid}"


class ConfigError(ValueError):
    def __init__(self, problems: List[str]):
        self.problems = list(problems)
        super().__init__("invalid config:\n" + "\n".join(f"  - {p}" for p in self.problems))
