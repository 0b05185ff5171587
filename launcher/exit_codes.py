"""Every exit code the launcher's processes end with, in one table: `sft` returns them, rank
processes end with them, and Slurm records them as the job's exit code (sft-jobs reads 75 back)."""

EXIT_OK = 0
EXIT_FAILED = 1  # a rank raised (its traceback is in logs/rank-N.log), or a local sweep point failed
# The input is wrong, and no retry helps: a bad config or an unfit plan (`sft`, before anything is
# written or submitted), or bad data or a refused resume (a rank, at start-up, with the file and line).
EXIT_BAD_INPUT = 2
EXIT_STOPPED = 75  # EX_TEMPFAIL: stopped by a signal after saving a checkpoint; start it again to resume


def exit_without_teardown(code: int) -> None:
    """End a rank or eval process whose files, W&B run and process group are all closed, without the
    interpreter's teardown of torch, DeepSpeed, transformers and lm-eval (~1.8 s per process, measured)."""
    import logging
    import os
    import sys

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
