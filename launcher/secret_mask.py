"""Secrets in what a run writes: names that hold one (HF_TOKEN, api_key) and the values to scrub."""

import os
import re
from enum import Enum
from pathlib import Path
from typing import Any, Dict, Iterable, Optional

SECRET_WORDS = ("TOKEN", "KEY", "SECRET", "PASSWORD")
MASK = "***"
ASSIGNMENT = re.compile(r"([A-Za-z_][\w.]*)=[\"']?([^\s\"']+)")


def is_secret_name(name: str) -> bool:
    """A whole word of the name is a secret word: HF_TOKEN, api_key, AWS_SECRET_ACCESS_KEY, but
    not max_new_tokens or keep."""
    words = [w for w in re.split(r"[^A-Z0-9]+", str(name).upper()) if w]
    # KEY only as the last word: api_key, SSH_KEY, but not a model's num_key_value_heads.
    return any(word in SECRET_WORDS and (word != "KEY" or i == len(words) - 1) or word in ("APIKEY", "PASSWD")
               for i, word in enumerate(words))


def secret_values(config: Any, environ: Optional[Dict[str, str]] = None) -> set:
    """Values of secret-named config keys and environment variables, to scrub wherever they appear."""
    found = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if is_secret_name(key) and isinstance(value, (str, int)) and len(str(value)) >= 3:
                    found.add(str(value))
                walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)
        elif isinstance(node, str):  # `export HF_TOKEN=abc` in a setup line, `tracking.api_key=abc` in argv
            for name, value in ASSIGNMENT.findall(node):
                if is_secret_name(name) and len(value) >= 3:
                    found.add(value)

    walk(config)
    for name, value in (os.environ if environ is None else environ).items():
        if is_secret_name(name) and len(value) >= 3:
            found.add(value)
    return found


def mask_secrets(obj: Any, secrets: Iterable[str] = ()) -> Any:
    """A copy with secret-named keys set to *** and any known secret value scrubbed from strings.

    The copy holds plain values only: a config's Choice members (launcher.schema) become their str
    values, which yaml.safe_dump can write.
    """
    secrets = sorted(set(secrets), key=len, reverse=True)

    def scrub(text: str) -> str:
        for secret in secrets:
            text = text.replace(secret, MASK)
        return text

    def walk(node: Any) -> Any:
        if isinstance(node, Enum):
            node = node.value
        if isinstance(node, dict):
            return {k: (MASK if is_secret_name(k) and v is not None else walk(v)) for k, v in node.items()}
        if isinstance(node, (list, tuple)):
            return [walk(item) for item in node]
        if isinstance(node, str):
            key = node.split("=", 1)[0]
            if "=" in node and " " not in key and is_secret_name(key):
                return node.split("=", 1)[0] + "=" + MASK  # an override like tracking.api_key=abc
            return scrub(node)
        return node

    return walk(obj)


def mask_file(path: Path, secrets: Iterable[str]) -> None:
    """Scrub known secret values from a file someone else wrote (Hydra's multirun.yaml)."""
    text = Path(path).read_text()
    masked = mask_secrets(text, secrets)
    if masked != text:
        Path(path).write_text(masked)
