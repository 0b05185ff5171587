"""`make bench`: run every benchmarks/bench_*.py (or the ones named) in turn, each in its own process."""

import subprocess
import sys
from pathlib import Path

here = Path(__file__).resolve().parent
names = sys.argv[1:] or sorted(p.stem for p in here.glob("bench_*.py"))
failed = []
for name in names:
    print(f"\n=== {name} ===", flush=True)
    if subprocess.run([sys.executable, "-m", f"benchmarks.{name}"], cwd=here.parent).returncode:
        failed.append(name)
if failed:
    sys.exit(f"failed: {', '.join(failed)}")
