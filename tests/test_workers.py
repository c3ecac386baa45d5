"""`tfmeta.cli.workers.run_units`: at most `jobs` children at once, in order; failures and Ctrl-C.

The children are small Python programs that leave files behind, so every
claim is checked on what they did, not on timings: two children wait for
each other (they can only both finish if they ran at the same time), a
third starts only once one of them has ended, a failure stops the
launching, and SIGINT or SIGTERM reaches each running child exactly once.
"""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from tfmeta.cli import workers

# Child i: writes started-i, optionally waits (up to 60 s) for the files in WAIT, writes ended-i.
CHILD = textwrap.dedent("""
    import os, sys, time
    folder, index, code = sys.argv[1], sys.argv[2], int(sys.argv[3])
    wait = sys.argv[4:]
    ended = sorted(f for f in os.listdir(folder) if f.startswith("ended-"))
    open(os.path.join(folder, f"started-{index}"), "w").write(",".join(ended))
    deadline = time.time() + 60
    while any(not os.path.exists(os.path.join(folder, f)) for f in wait):
        if time.time() > deadline:
            sys.exit(9)
        time.sleep(0.05)
    open(os.path.join(folder, f"ended-{index}"), "w").close()
    sys.exit(code)
""")


def child(folder, index, code=0, wait=()):
    return [sys.executable, "-c", CHILD, str(folder), str(index), str(code), *wait]


def test_two_jobs_run_two_children_at_once_and_the_third_after_one_ended(tmp_path):
    commands = [child(tmp_path, 0, wait=["started-1"]), child(tmp_path, 1, wait=["started-0"]),
                child(tmp_path, 2)]
    workers.run_units(commands, jobs=2)
    assert all((tmp_path / f"ended-{i}").exists() for i in range(3))
    # Child 2 started after child 0 or 1 had ended: never three at once.
    assert (tmp_path / "started-2").read_text() in ("ended-0", "ended-1", "ended-0,ended-1")


def test_one_job_runs_the_children_one_after_another_in_order(tmp_path):
    workers.run_units([child(tmp_path, i) for i in range(3)], jobs=1)
    assert [(tmp_path / f"started-{i}").read_text() for i in range(3)] == [
        "", "ended-0", "ended-0,ended-1"]


def test_a_failing_child_stops_the_launching_and_the_running_one_finishes(tmp_path):
    commands = [child(tmp_path, 0, code=3), child(tmp_path, 1, wait=["ended-0"]), child(tmp_path, 2)]
    with pytest.raises(workers.UnitFailed, match="exit code 3.*--resume") as failed:
        workers.run_units(commands, jobs=2)
    assert failed.value.returncode == 3 and failed.value.command == commands[0]
    assert (tmp_path / "ended-1").exists()       # the one running went on to its end
    assert not (tmp_path / "started-2").exists()  # nothing new after the failure


def test_children_get_their_thread_counts_unless_set_and_unbuffered_output():
    env = workers.child_environment(2, {"PATH": "/bin"})
    threads = str(max(1, workers.usable_cpus() // 2))
    assert env["TF_NUM_INTRAOP_THREADS"] == env["TF_NUM_INTEROP_THREADS"] == threads
    assert env["PYTHONUNBUFFERED"] == "1" and env["PATH"] == "/bin"
    assert workers.child_environment(2, {"TF_NUM_INTRAOP_THREADS": "7"})["TF_NUM_INTRAOP_THREADS"] == "7"
    with pytest.raises(ValueError, match="jobs must be >= 1"):
        workers.run_units([], jobs=0)


# A child that records the signals it gets (waiting 1 s after the first for a second one).
COUNTING = textwrap.dedent("""
    import os, signal, sys, time
    folder, index = sys.argv[1], sys.argv[2]
    got = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: got.append(str(signum)))
    open(os.path.join(folder, "ready-" + index), "w").close()
    while not got:
        time.sleep(0.05)
    time.sleep(1.0)
    open(os.path.join(folder, "signals-" + index), "w").write(",".join(got))
    sys.exit(130)
""")
# The parent: three such children, two at a time; exit 42 on KeyboardInterrupt.
PARENT = textwrap.dedent("""
    import signal, sys
    from tfmeta.cli import workers
    # As the tools' run_tool does: started from a process that ignores SIGINT
    # (pytest-xdist's workers), Python would inherit the ignoring.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    folder, counting = sys.argv[1], sys.argv[2]
    try:
        workers.run_units([[sys.executable, "-c", counting, folder, str(i)] for i in range(3)], jobs=2)
    except KeyboardInterrupt:
        sys.exit(42)
""")


@pytest.mark.parametrize("sig, exit_code", [(signal.SIGINT, 42), (signal.SIGTERM, 128 + signal.SIGTERM)])
def test_a_signal_to_the_parent_reaches_each_running_child_once_and_stops_the_rest(tmp_path, sig,
                                                                                exit_code):
    """SIGINT (Ctrl-C, `timeout -s INT`): KeyboardInterrupt after the children; SIGTERM: exit 128 + 15."""
    parent = subprocess.Popen([sys.executable, "-c", PARENT, str(tmp_path), COUNTING],
                              env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    deadline = time.time() + 120
    while not all((tmp_path / f"ready-{i}").exists() for i in (0, 1)):
        assert time.time() < deadline and parent.poll() is None, "the children did not start"
        time.sleep(0.05)
    parent.send_signal(sig)
    assert parent.wait(timeout=120) == exit_code
    assert [(tmp_path / f"signals-{i}").read_text() for i in (0, 1)] == [str(int(sig))] * 2
    assert not (tmp_path / "ready-2").exists()


def test_a_failing_child_calls_on_failure_once_before_the_others_end(tmp_path):
    # Child 0 fails at once; child 1 waits for the mark on_failure leaves, so it can
    # only end (and run_units return) if on_failure ran while it was still running.
    calls = []

    def on_failure():
        calls.append(1)
        (tmp_path / "closed").write_text("")

    commands = [child(tmp_path, 0, code=3), child(tmp_path, 1, wait=["closed"])]
    with pytest.raises(workers.UnitFailed):
        workers.run_units(commands, jobs=2, on_failure=on_failure)
    assert calls == [1] and (tmp_path / "ended-1").exists()


# Claims units from the queue at argv[1] until none is left; prints them.
CLAIMER = textwrap.dedent("""
    import sys
    from tfmeta.cli.workers import UnitQueue
    queue, claimed = UnitQueue(sys.argv[1]), []
    while (unit := queue.claim()) is not None:
        claimed.append(unit)
    print(" ".join(claimed))
""")


def test_the_queue_hands_out_each_unit_once_in_order(tmp_path):
    units = [f"unit-{i}" for i in range(40)]
    queue = workers.UnitQueue.create(tmp_path / "units.json", units)
    assert [queue.claim(), queue.claim()] == units[:2]
    # three processes take the rest at once: each unit once, each process's in order
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    procs = [subprocess.Popen([sys.executable, "-c", CLAIMER, str(queue.path)], env=env,
                              stdout=subprocess.PIPE, text=True) for _ in range(3)]
    taken = [p.communicate(timeout=120)[0].split() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert sorted(sum(taken, []), key=units.index) == units[2:]
    assert all(part == sorted(part, key=units.index) for part in taken)
    assert queue.claim() is None
    queue.remove()
    assert list(tmp_path.iterdir()) == []


def test_a_closed_queue_hands_out_nothing_more(tmp_path):
    queue = workers.UnitQueue.create(tmp_path / "units.json", [["reptile", 0], ["leap", 0]])
    assert queue.claim() == ["reptile", 0]
    queue.close()
    assert queue.claim() is None
    # create replaces an old queue: a new run hands out its units from the first
    assert workers.UnitQueue.create(tmp_path / "units.json", [["leap", 1]]).claim() == ["leap", 1]
