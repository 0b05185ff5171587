"""How fast a missing W&B key is reported, measured side by side: `tracking.mode=online` with no
credentials (refused before wandb.init) against wandb.init(mode="online") failing on its own, both
without a TTY and with an empty home (no ~/.netrc, no W&B settings)."""

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parent.parent
OURS = """
import time
from omegaconf import OmegaConf
from launcher.tracking import TrackingError, start_tracking
cfg = OmegaConf.create(dict(backend="wandb", mode="online", project="p", entity=None, name=None, group=None,
                            job_type="sft", tags=[], api_key=None))
start = time.perf_counter()
try:
    start_tracking(cfg, __import__("pathlib").Path({run!r}), rank=0, config={{}}, resume=False)
except TrackingError:
    print(time.perf_counter() - start)
"""
PEER = """
import time, wandb
start = time.perf_counter()
try:
    wandb.init(mode="online", project="p", dir={run!r})
except Exception:
    print(time.perf_counter() - start)
"""


def seconds(code: str, home: Path) -> float:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(HOME=str(home), WANDB_CONFIG_DIR=str(home / "wandb"), PYTHONPATH=str(REPO), WANDB_SILENT="true")
    out = subprocess.run([sys.executable, "-c", code], env=env, stdin=subprocess.DEVNULL, capture_output=True,
                         text=True, timeout=120).stdout.strip().splitlines()
    return float(out[-1])


def main() -> None:
    home = Path(tempfile.mkdtemp(prefix="bench-tracking-"))
    ours = seconds(OURS.format(run=str(home / "ours")), home)
    peer = seconds(PEER.format(run=str(home / "peer")), home)
    table = Table(title="W&B tracking")
    for col in ("measure", "ours", "peer", "ratio (ours/peer)"):
        table.add_column(col)
    table.add_row("ms to report a missing key (online)", f"{ours * 1e3:.2f}", f"{peer * 1e3:.1f} (wandb.init)", f"{ours / peer:.4f}")
    Console(width=140).print(table)


if __name__ == "__main__":
    main()
