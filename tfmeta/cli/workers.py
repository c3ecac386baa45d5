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

A failing child stops the launching of further units (and `on_failure` is
called, e.g. `UnitQueue.close`); the others finish their unit, then
`UnitFailed` names the command and its exit code. Any
other exception stops the running children (SIGINT) before it propagates;
SIGTERM or SIGHUP to this process is passed on to them as it came, and
this process then exits with 128 + the signal's number. Ctrl-C
(or SIGINT to this process, as `timeout -s INT` sends it) is passed on, once,
to the running children (each in its own session, so a terminal's Ctrl-C
reaches them only this way), which save their finished cells and stop; then
KeyboardInterrupt propagates, for `errors.resumable` to say how to continue.

A `UnitQueue` lets a few long-lived workers share many units instead: each
child takes the next unit from the queue's file when it finishes one, so
TensorFlow starts, and functions are traced, once per worker, not per unit.

Example::

    commands = [[sys.executable, __file__, "--methods", m, "--seeds", str(s), "--resume"]
                for s in seeds for m in methods]
    run_units(commands, jobs=2)
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import signal
import subprocess
import threading
import time

from tfmeta import atomic

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


def run_units(commands, jobs, environ=None, on_failure=None):
    """Run every argv of `commands` as a child process, at most `jobs` at once; raise on the first failure.

    `on_failure()`, when given, is called once, at the first failure, while
    the other children still run (`UnitQueue.close`: they take no new unit).
    """
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
                        if on_failure is not None:
                            on_failure()
                if failed is not None and not running:
                    raise failed
    except _Terminated as stop:
        _stop(running, stop.signum)
        raise SystemExit(128 + stop.signum) from None
    except BaseException:  # Ctrl-C, or anything else: no child goes on alone
        _stop(running, signal.SIGINT)
        raise


class UnitQueue:
    """Units of work handed out once each, in order, to worker processes sharing one file.

    The launching process `create`s it with the units; every worker, started
    with the file's path, `claim`s the next unit nobody has taken until there
    is none left, so a worker that finishes early takes the next unit without
    a new process (one TensorFlow start-up and one set of traces per worker,
    not per unit). `close()` hands out nothing more (`run_units`' `on_failure`).
    Claims take turns on a lock file beside it (`atomic.exclusive_lock`).

    Example::

        queue = UnitQueue.create(out / ".units.json", ["reptile 0", "leap 0", "scratch 0"])
        run_units([worker_command] * 2, jobs=2, on_failure=queue.close)
        # in each worker:
        while (unit := UnitQueue(path).claim()) is not None:
            run(unit)
    """

    def __init__(self, path):
        self.path = pathlib.Path(path)

    @classmethod
    def create(cls, path, units):
        """A queue at `path` (replacing any) of `units` (JSON-friendly values), none claimed."""
        queue = cls(path)
        with queue._turn():
            atomic.write_text(queue.path, json.dumps({"units": list(units), "claimed": 0}))
        return queue

    def claim(self):
        """The next unclaimed unit, now claimed by the caller; None when every unit is taken."""
        with self._turn():
            state = json.loads(self.path.read_text())
            if state["claimed"] >= len(state["units"]):
                return None
            atomic.write_text(self.path, json.dumps({**state, "claimed": state["claimed"] + 1}))
            return state["units"][state["claimed"]]

    def close(self):
        """Hand out no more units (the claimed ones run on)."""
        with self._turn():
            state = json.loads(self.path.read_text())
            atomic.write_text(self.path, json.dumps({**state, "claimed": len(state["units"])}))

    def remove(self):
        """Delete the queue's files."""
        for path in (self.path, self._lock_path()):
            path.unlink(missing_ok=True)

    def _lock_path(self):
        return self.path.with_name(self.path.name + ".lock")

    def _turn(self):
        return atomic.exclusive_lock(self._lock_path())


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
