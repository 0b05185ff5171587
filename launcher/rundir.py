"""The run directory, the contract of a run: its files are written here, with secrets masked."""

import functools
import getpass
import json
import os
import re
import socket
import subprocess
import sys
import time
from enum import Enum
from importlib import metadata
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional

import yaml

# libyaml's dumper where installed: a 100-point sweep writes 200 YAML files before it submits.
SAFE_DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)

from launcher.atomic import write_text_atomic

SECRET_WORDS = ("TOKEN", "KEY", "SECRET", "PASSWORD")
MASK = "***"
ASSIGNMENT = re.compile(r"([A-Za-z_][\w.]*)=[\"']?([^\s\"']+)")
ENV_PREFIXES = ("SLURM_", "CUDA_", "NCCL_", "TORCH_", "HF_", "WANDB_", "TRANSFORMERS_", "OMP_", "SFT_")
PACKAGES = ("launcher", "torch", "deepspeed", "transformers", "datasets", "hydra-core", "omegaconf", "submitit", "wandb")


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


def new_run_dir(runs_root: str, name: str) -> Path:
    """runs/<name>/<timestamp>/, with a suffix when two runs start in the same second."""
    base = Path(runs_root).expanduser().resolve() / name / time.strftime("%Y%m%d-%H%M%S")
    run_dir, n = base, 1
    while True:
        try:
            run_dir.mkdir(parents=True)
            return run_dir
        except FileExistsError:
            run_dir, n = base.with_name(f"{base.name}-{n}"), n + 1


@functools.lru_cache(maxsize=4)  # once per command, however many sweep points
def git_state(repo: Path) -> Dict[str, Any]:
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=10).stdout.strip()

    try:
        return {"sha": git("rev-parse", "HEAD") or None, "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.SubprocessError):
        return {"sha": None, "dirty": None}


@functools.lru_cache(maxsize=1)
def package_versions() -> Dict[str, Optional[str]]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def versions_changed(submission: Dict[str, Any]) -> Dict[str, str]:
    """Packages whose version differs from the run's first submission: name -> 'first -> now'."""
    first, now = submission.get("first_versions") or {}, submission.get("versions") or {}
    return {name: f"{first.get(name)} -> {now.get(name)}" for name in sorted(set(first) | set(now))
            if name != "launcher" and first.get(name) != now.get(name)}  # the launcher's own edits: the resume fingerprint


def submission_record(backend: str, overrides: List[str]) -> Dict[str, Any]:
    return {
        "backend": backend,
        "argv": [Path(sys.argv[0]).name, *sys.argv[1:]],
        "overrides": overrides,
        "cwd": os.getcwd(),
        "host": socket.gethostname(),
        "user": getpass.getuser(),
        "submitted_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "git": dict(git_state(Path(__file__).resolve().parent.parent)),
        "versions": dict(package_versions()),
        "env": {k: v for k, v in sorted(os.environ.items()) if k.startswith(ENV_PREFIXES)},
        "jobs": [],
    }


def mask_file(path: Path, secrets: Iterable[str]) -> None:
    """Scrub known secret values from a file someone else wrote (Hydra's multirun.yaml)."""
    text = Path(path).read_text()
    masked = mask_secrets(text, secrets)
    if masked != text:
        Path(path).write_text(masked)


class RunFiles:
    """Writes a run's files; every write goes through the same secret mask."""

    def __init__(self, run_dir: Path, config: Dict[str, Any]):
        self.run_dir = Path(run_dir)
        self.secrets = secret_values(config)

    def write_json(self, name: str, obj: Any) -> Path:
        return self._write(name, json.dumps(mask_secrets(obj, self.secrets), indent=2, default=str) + "\n")

    def write_yaml(self, name: str, obj: Any) -> Path:
        return self._write(name, yaml.dump(mask_secrets(obj, self.secrets), Dumper=SAFE_DUMPER, sort_keys=False))

    def _write(self, name: str, text: str) -> Path:
        return write_text_atomic(self.run_dir / name, text)
