"""Stop signals: SIGUSR2 (Slurm's time-limit warning) and SIGTERM (preemption, `scontrol requeue`,
`scancel`) set one flag.

The training loop reads the flag, agrees on it across ranks, saves a checkpoint and exits with
EXIT_STOPPED, so the run resumes from that checkpoint when started again. The flag remembers the
strongest request: a USR2 asks the job to requeue itself, and a SIGTERM after it (the time limit
itself, during a slow save) does not take that back. Slurm requeues a preempted job itself. A flag raised before
the first step (imports, compiling ops, tokenising, loading) stops the run at its first step
boundary; one raised after the last step is agreed after the last save, before the final eval and
before the export (the next start does what is left); one raised during the export changes nothing.

Slurm signals every process of the step, children included. A child that keeps the mask it
inherits (W&B's service) is started with the stop signals blocked; ninja resets its compilers'
mask, so launcher.ops runs it through a shim that ignores USR2 instead.
"""

import atexit
import contextlib
import signal
import threading
from typing import Callable, Optional

STOP_SIGNALS = (signal.SIGUSR2, signal.SIGTERM)


class StopFlag:
    def __init__(self) -> None:
        self.signum = 0  # the first stop signal
        self.requeue = False  # a USR2 came: the time limit is near and the job should requeue itself
        self.agreed_requeue = False  # what all ranks agreed at the stop (set by the trainer)
        # Set by the Slurm task on rank 0: requeues the job if the stop asks for it (True: requeued).
        # The trainer calls it after the stop's save and W&B's bounded finish.
        self.requeue_job: Optional[Callable[[], bool]] = None
        # Set by the Slurm task on rank 0 of an elastic run with cluster.grow: whether more of its
        # node range is idle now (the trainer asks at checkpoints); a yes stops it to requeue bigger.
        self.grow_check: Optional[Callable[[], bool]] = None
        self.grow = False  # this stop is to grow (not counted against cluster.max_requeues)
        self._installed = False

    def install(self) -> "StopFlag":
        """Idempotent: a signal caught before the trainer starts (e.g. during imports) stays set."""
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._set)
        if not self._installed:
            # Interpreter exit puts Python-handled signals back to their default (terminate): a
            # stop arriving while a finished run exits would turn it into a failed one.
            atexit.register(_ignore_stop_signals)
            self._installed = True
        return self

    def _set(self, signum, frame) -> None:
        self.signum = self.signum or signum
        self.requeue = self.requeue or signum == signal.SIGUSR2

    def ask_to_grow(self) -> None:
        """Stop at the next step boundary and requeue, as a USR2 would: the requeued job gets more nodes."""
        self.signum = self.signum or signal.SIGUSR2
        self.requeue = self.grow = True

    def __bool__(self) -> bool:
        return self.signum != 0

    @staticmethod
    @contextlib.contextmanager
    def blocked():
        """Hold stop signals back for the block: no handler runs inside it, and children started in it
        keep them blocked (exec keeps the mask). A mask alone holds back only its own thread: the
        kernel hands a process signal to any thread that has not blocked it (torch, OpenBLAS and
        Arrow start threads) and Python runs the handler in the main thread at once. So the
        handlers are swapped for one that only notes the signal; when the block ends the previous
        handlers are back and each noted signal goes to its handler, in the order they came.
        Yields those handlers (signal -> handler): set one to SIG_DFL and a stop that came inside
        the block, or comes later, ends the process. A nested block yields {}: the outermost decides."""
        previous_mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        if _held.depth or threading.current_thread() is not threading.main_thread():
            # Nested, the outer block holds them; another thread cannot swap handlers: its mask only.
            try:
                yield {}
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, previous_mask)
            return
        previous = {sig: signal.signal(sig, _hold) for sig in STOP_SIGNALS}
        _held.depth = 1
        try:
            yield previous
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            _held.depth = 0
            signal.pthread_sigmask(signal.SIG_SETMASK, previous_mask)  # one pending on this thread reaches its handler now
            noted, _held.signals = _held.signals, []
            for signum in noted:
                _deliver(signum, previous[signum])


class _Held:
    def __init__(self) -> None:
        self.depth = 0
        self.signals: list = []  # stop signals that came inside the block, each once, in order


_held = _Held()


def _hold(signum, frame) -> None:
    if signum not in _held.signals:
        _held.signals.append(signum)


def _deliver(signum: int, handler) -> None:
    if callable(handler):
        handler(signum, None)
    elif handler == signal.SIG_DFL:
        signal.raise_signal(signum)  # its default action, as if it had come now


class StoppedDuringStartup(Exception):
    """A stop signal ended something the run cannot start without (a compile): exit as stopped."""


def _ignore_stop_signals() -> None:
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


# One flag per process: installed first thing in a Slurm task (replacing submitit's own USR2
# handler, which would exit without a checkpoint), then used by the trainer.
STOP = StopFlag()
