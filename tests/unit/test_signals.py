"""launcher.signals: stop signals held back from children, and harmless once the process is exiting."""

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from launcher.signals import StopFlag

REPO = Path(__file__).resolve().parents[2]


def test_children_started_while_blocked_survive_stop_signals_and_the_parent_gets_them():
    flag = StopFlag()
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGUSR2, signal.SIGTERM)}
    try:
        flag.install()
        with flag.blocked():
            child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1.5)"])
            os.kill(os.getpid(), signal.SIGUSR2)  # what Slurm does: every process of the step
            os.kill(child.pid, signal.SIGUSR2)
            os.kill(child.pid, signal.SIGTERM)
            time.sleep(0.2)
        # Handled on unblocking (or at once by another thread of ours that does not block it).
        assert flag.signum == signal.SIGUSR2
        assert child.wait(timeout=30) == 0  # the child (a compiler, W&B's service) was not killed
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def test_no_handler_runs_inside_the_block_whichever_thread_gets_the_signal():
    """A thread started before the block does not block stop signals: the kernel may hand it one
    (pthread_kill makes sure), and the handler must still wait for the end of the block."""
    flag = StopFlag()
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGUSR2, signal.SIGTERM)}
    done = threading.Event()
    worker = threading.Thread(target=done.wait, daemon=True)  # as torch's, OpenBLAS's and Arrow's threads
    worker.start()
    try:
        flag.install()
        with flag.blocked():
            signal.pthread_kill(worker.ident, signal.SIGUSR2)
            signal.pthread_kill(worker.ident, signal.SIGTERM)
            time.sleep(0.2)  # the main thread runs Python handlers between bytecodes: plenty of chances
            inside = (flag.signum, flag.requeue)
        assert inside == (0, False)
        assert flag.signum == signal.SIGUSR2 and flag.requeue  # handled at the end of the block, in order
    finally:
        done.set()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def test_a_stop_signal_during_interpreter_exit_does_not_kill_the_process():
    # atexit runs handlers last-in first-out: this one runs after the flag's own exit handler,
    # when Python is about to put signal dispositions back to their defaults.
    code = ("import atexit, os, signal, time\n"
            "def late():\n"
            "    print(signal.getsignal(signal.SIGUSR2) is signal.SIG_IGN, flush=True)\n"
            "    os.kill(os.getpid(), signal.SIGUSR2); os.kill(os.getpid(), signal.SIGTERM); time.sleep(0.1)\n"
            "atexit.register(late)\n"
            "from launcher.signals import STOP\n"
            "STOP.install()\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "True"



def test_the_flag_remembers_a_requeue_request_through_a_later_sigterm():
    """USR2 (time limit near) then SIGTERM (the limit itself, during a slow save): still a requeue."""
    flag = StopFlag()
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGUSR2, signal.SIGTERM)}
    try:
        flag.install()
        os.kill(os.getpid(), signal.SIGTERM)
        assert flag and flag.signum == signal.SIGTERM and not flag.requeue  # preemption: Slurm requeues
        os.kill(os.getpid(), signal.SIGUSR2)
        os.kill(os.getpid(), signal.SIGTERM)
        assert flag.signum == signal.SIGTERM and flag.requeue
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def test_a_sigterm_held_in_a_block_that_restores_its_default_ends_the_process_after_the_block():
    """The requeue: Slurm's SIGTERM comes while W&B finishes (held back), and ends the task after."""
    script = (
        "import os, signal, threading, time\n"
        "from launcher.signals import STOP\n"
        "STOP.install()\n"
        "worker = threading.Thread(target=time.sleep, args=(5,), daemon=True); worker.start()\n"
        "with STOP.blocked() as after:\n"
        "    after[signal.SIGTERM] = signal.SIG_DFL\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    time.sleep(0.3)\n"
        "    print('finished inside', bool(STOP), flush=True)\n"
        "print('after the block', flush=True)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == -signal.SIGTERM, proc.stderr
    assert proc.stdout == "finished inside False\n"  # the stop flag never saw it; the process ended on it
