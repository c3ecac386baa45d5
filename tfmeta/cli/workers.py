"""Run a tool's independent units of work in child processes, a few at a time.

An experiment whose cells are independent (many_shot's method x seed
meta-trainings) runs faster as several single-threaded processes than as
one process with several threads: a small network's kernels use one core
well and two badly (docs/performance.md, "Experiments: cells side by side").
`run_units(commands, jobs)` starts each command (an argv list, usually the
tool itself for one unit, with ``--resume`` into the shared output folder)
as a child, at most `jobs` at once, in order, and returns when all ended.
Each child gets `threads_per_job(jobs)` TensorFlow threads (unless the
caller's environment sets them) and unbuffered output, which goes to this
process's stdout and stderr as it comes.

A failing child stops the launching of further units; the others finish
their unit, then `UnitFailed` names the command and its exit code. Any
other exception stops the running children (SIGINT) before it propagates;
SIGTERM or SIGHUP to this process is passed on to them as it came, and
this process then exits with 128 + the signal's number. Ctrl-C
(or SIGINT to this process, as `timeout -s INT` sends it) is passed on, once,
to the running children (each in its own session, so a terminal's Ctrl-C
reaches them only this way), which save their finished cells and stop; then
KeyboardInterrupt propagates, for `errors.resumable` to say how to continue.

Example::

    commands = [[sys.executable, __file__, "--methods", m, "--seeds", str(s), "--resume"]
                for s in seeds for m in methods]
    run_units(commands, jobs=2)
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time

#: Seconds between two looks at the running children.
_POLL = 0.5


class UnitFailed(RuntimeError):
    """A child of `run_units` ended with an error (its output says which)."""

    def __init__(self, command, returncode):
        self.command, self.returncode = command, returncode
        super().__init__(f"a worker process ended with exit code {returncode} (its error is "
                         "printed above); the finished cells are saved: run the same command with "
                         f"--resume to continue (the worker was: {' '.join(command)})")


def usable_cpus():
    """CPUs this process may run on (its affinity where the OS tells it)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def default_jobs(cap=4):
    """Worker processes by default: one per usable CPU, at most `cap` (memory: ~1 GB each)."""
    return max(1, min(usable_cpus(), cap))


def threads_per_job(jobs):
    """TensorFlow's intra- and inter-op threads for each of `jobs` side-by-side processes."""
    return max(1, usable_cpus() // jobs)


def child_environment(jobs, environ=None):
    """`environ` (default: this process's) with each worker's thread counts and unbuffered output."""
    env = dict(os.environ if environ is None else environ)
    threads = str(threads_per_job(jobs))
    env.setdefault("TF_NUM_INTRAOP_THREADS", threads)
    env.setdefault("TF_NUM_INTEROP_THREADS", threads)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_units(commands, jobs, environ=None):
    """Run every argv of `commands` as a child process, at most `jobs` at once; raise on the first failure."""
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    env = child_environment(jobs, environ)
    waiting, running, failed = list(commands), [], None
    try:
        with _terminating_children():
            while waiting or running:
                while waiting and len(running) < jobs and failed is None:
                    command = waiting.pop(0)
                    # Its own session: a terminal's Ctrl-C reaches this process only, which
                    # passes it on once (a second SIGINT could cut a child's saving short).
                    running.append((command, subprocess.Popen(command, env=env, start_new_session=True)))
                time.sleep(_POLL)
                for command, child in list(running):
                    if child.poll() is None:
                        continue
                    running.remove((command, child))
                    if child.returncode != 0 and failed is None:
                        failed = UnitFailed(command, child.returncode)
                if failed is not None and not running:
                    raise failed
    except _Terminated as stop:
        _stop(running, stop.signum)
        raise SystemExit(128 + stop.signum) from None
    except BaseException:  # Ctrl-C, or anything else: no child goes on alone
        _stop(running, signal.SIGINT)
        raise


class _Terminated(BaseException):
    def __init__(self, signum):
        super().__init__(signum)
        self.signum = signum


@contextlib.contextmanager
def _terminating_children():
    """Within the block, SIGTERM and SIGHUP (`timeout`, a closed terminal) stop the children too.

    The children have sessions of their own, so these signals reach them only
    this way; they get the same signal.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def raise_terminated(signum, frame):
        raise _Terminated(signum)

    previous = {sig: signal.signal(sig, raise_terminated) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)


def _stop(running, signum):
    """`signum` to each running child, then wait for them to save and stop."""
    for _, child in running:
        if child.poll() is None:
            try:
                child.send_signal(signum)
            except ProcessLookupError:
                pass
    for _, child in running:
        while True:
            try:
                child.wait()
                break
            except KeyboardInterrupt:  # a second Ctrl-C while they save: keep waiting
                continue
