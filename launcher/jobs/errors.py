"""The errors that end an `sft-jobs` command."""

from launcher.backends.slurm_queue import SlurmError


class JobsError(Exception):
    """Ends the command with its message and exit code (2: bad RUN or usage)."""

    def __init__(self, message: str, code: int = 2):
        super().__init__(message)
        self.code = code


__all__ = ["JobsError", "SlurmError"]
