"""The lock of this repository's own environment (requirements.lock): write it, and check an install.

    python tools/lock.py write [--torch VERSION]   # `make lock`: newest within pyproject's ranges
    python tools/lock.py check                     # `make` after each install: installed == locked

The lock pins every package `make` installs (the project's dependencies, the dev, bench and eval extras, pip
and setuptools) to one version. `make` installs it as a constraints file over `pip install -e '.[dev,bench,eval]'`,
so pyproject.toml keeps its ranges for people who install the package into their own environment.
torch is written without its local label (2.13.0, not 2.13.0+cpu): a machine without a GPU installs
the CPU build of that version first, a GPU machine takes the CUDA build of the same version (and its
nvidia-* / triton packages, which the lock does not list). torch stays at the locked version unless
--torch names another: the newest release within the range is a multi-GB CUDA build.
"""

import argparse
import json
import re
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Dict

REPO = Path(__file__).resolve().parent.parent
LOCK = REPO / "requirements.lock"
PROJECT = "launcher"
# Packages a CUDA build of torch brings with it: not in a lock written on a CPU machine.
GPU_ONLY = re.compile(r"^(nvidia-.*|cuda-.*|triton)$")
HEADER = """\
# The exact versions `make` installs (constraints over `pip install -e '.[dev,bench,eval]'`); see tools/lock.py.
# Upgrade on purpose: `make lock`, then `make test` (re-pin what the guards ask), then commit this
# file on its own. pyproject.toml keeps the ranges for installs into other environments.
"""


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def public(version: str) -> str:
    """2.13.0+cpu -> 2.13.0: the local label names a build, not a release."""
    return version.split("+", 1)[0]


def read_lock(path: Path = LOCK) -> Dict[str, str]:
    pins = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        if not sep or not version.strip():
            raise SystemExit(f"{path}:{number}: {line!r} is not NAME==VERSION")
        pins[canonical(name.strip())] = version.strip()
    return pins


def render(pins: Dict[str, str]) -> str:
    return HEADER + "".join(f"{name}=={pins[name]}\n" for name in sorted(pins))


def installed() -> Dict[str, str]:
    return {canonical(d.metadata["Name"]): d.version for d in metadata.distributions() if d.metadata["Name"]}


def mismatches(pins: Dict[str, str], have: Dict[str, str]) -> Dict[str, str]:
    """What is wrong with an install against the lock: package -> 'locked X, installed Y'."""
    wrong = {}
    for name, version in pins.items():
        got = have.get(name)
        if got is None:
            wrong[name] = f"locked {version}, not installed"
        elif public(got) != version:
            wrong[name] = f"locked {version}, installed {got}"
    return wrong


def unlocked(pins: Dict[str, str], have: Dict[str, str]) -> list:
    return sorted(n for n in have if n not in pins and n != PROJECT and not GPU_ONLY.match(n))


def changes(old: Dict[str, str], new: Dict[str, str]) -> list:
    lines = []
    for name in sorted(set(old) | set(new)):
        before, after = old.get(name), new.get(name)
        if before == after:
            continue
        lines.append(f"  + {name} {after}" if before is None else
                     f"  - {name} {before}" if after is None else f"  ~ {name} {before} -> {after}")
    return lines


def resolve(torch: str) -> Dict[str, str]:
    """The newest versions within pyproject's ranges, by pip's own resolver (nothing is installed)."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--dry-run", "--ignore-installed",
                        "--report", str(report), "-e", f"{REPO}[dev,bench,eval]", f"torch=={torch}", "pip", "setuptools"],
                       check=True)
        items = json.loads(report.read_text())["install"]
    pins = {canonical(i["metadata"]["name"]): public(i["metadata"]["version"]) for i in items}
    pins.pop(PROJECT, None)
    return pins


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    write = sub.add_parser("write", help="resolve the newest versions within pyproject's ranges and rewrite the lock")
    write.add_argument("--torch", help="the torch version to lock (default: the one locked now)")
    sub.add_parser("check", help="every locked package is installed at its locked version")
    args = parser.parse_args(argv)

    old = read_lock() if LOCK.exists() else {}
    if args.command == "check":
        have = installed()
        wrong = mismatches(old, have)
        for name, why in sorted(wrong.items()):
            print(f"{LOCK.name}: {name}: {why}", file=sys.stderr)
        extra = unlocked(old, have)
        if extra:
            print(f"{LOCK.name}: installed but not locked (left from another install?): {', '.join(extra)}", file=sys.stderr)
        if wrong:
            print(f"the environment does not match {LOCK.name}: rm -rf .venv && make", file=sys.stderr)
            return 1
        print(f"{sum(1 for n in old)} packages installed at the versions in {LOCK.name}")
        return 0

    torch = args.torch or old.get("torch")
    if not torch:
        raise SystemExit(f"{LOCK.name} locks no torch: name one with --torch VERSION")
    new = resolve(torch)
    LOCK.write_text(render(new))
    diff = changes(old, new)
    print(f"{LOCK.name}: {len(new)} packages, torch held at {torch}" + (" (make lock TORCH=VERSION to change it)" if not args.torch else ""))
    print("\n".join(diff) if diff else "  no change")
    if diff:
        print("next: rm -rf .venv && make test (SFT_UPDATE_REFERENCE=1 where a pin guard asks), then commit the lock alone")
    return 0


if __name__ == "__main__":
    sys.exit(main())
