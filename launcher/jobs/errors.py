"""The errors that end an `sft-jobs` command."""

from typing import List


class JobsError(Exception):
    """Ends the command with its message and exit code (2: bad RUN or usage, 1: a Slurm command failed)."""

    def __init__(self, message: str, code: int = 2):
        super().__init__(message)
        self.code = code


class SlurmError(JobsError):
    def __init__(self, cmd: List[str], stderr: str, unavailable: bool = False):
        super().__init__(f"`{' '.join(cmd)}` failed: {stderr.strip()}", 1)
        self.unavailable = unavailable  # not installed here, or no accounting: not a failure of the cluster
