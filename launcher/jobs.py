"""`sft-jobs`: inspect and control runs from their run directories (and Slurm, for Slurm runs)."""

import argparse
import sys
from typing import List, Optional


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sft-jobs",
        description="Inspect and control runs started by `sft`. RUN is a run directory or a unique prefix of its name.",
    )
    parser.add_argument("--runs-root", default="./runs", help="where runs live (default: ./runs)")
    parser.add_subparsers(dest="command", metavar="COMMAND")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
