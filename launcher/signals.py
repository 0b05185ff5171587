"""Stop signals: SIGUSR2 (Slurm's time-limit warning, preemption) and SIGTERM set one flag.

The training loop reads the flag, agrees on it across ranks, saves a checkpoint and exits with
EXIT_STOPPED, so the run resumes from that checkpoint when started again.
"""

import signal

EXIT_STOPPED = 75  # EX_TEMPFAIL: stopped by a signal after saving a checkpoint; start it again to resume


class StopFlag:
    def __init__(self) -> None:
        self.signum = 0

    def install(self) -> "StopFlag":
        """Idempotent: a signal caught before the trainer starts (e.g. during imports) stays set."""
        for sig in (signal.SIGUSR2, signal.SIGTERM):
            signal.signal(sig, self._set)
        return self

    def _set(self, signum, frame) -> None:
        self.signum = signum

    def __bool__(self) -> bool:
        return self.signum != 0


# One flag per process: installed first thing in a Slurm task (replacing submitit's own USR2
# handler, which would exit without a checkpoint), then used by the trainer.
STOP = StopFlag()
