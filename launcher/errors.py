"""The one error type a bad config raises: every problem names the key, the bad value and what is valid."""

from typing import Any, List


def problem(key: str, value: Any, valid: str) -> str:
    return f"{key}={value!r}: {valid}"


class ConfigError(ValueError):
    def __init__(self, problems: List[str]):
        self.problems = list(problems)
        super().__init__("invalid config:\n" + "\n".join(f"  - {p}" for p in self.problems))
