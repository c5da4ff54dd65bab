"""Child processes for the tests, each started in a session of its own and ended with everything it started.

``subprocess.run(..., timeout=...)`` kills only the child it started: the ranks a Lightning launcher or
``torch.multiprocessing`` forked from it live on, blocked in a collective, after the test has failed. Here the
child leads a new process group, and when it returns, times out or the test is interrupted, the whole group is
killed, so no process outlives its test.
"""

from __future__ import annotations

import atexit
import os
import signal
import subprocess
import tempfile
import threading
import time
from typing import Any, Mapping, Sequence


def _terminated(signum: int, frame: Any) -> None:
    # as Ctrl-C: pytest ends the session (a SystemExit inside a test would only fail that test, and the run go on),
    # unwinding through run()'s and run_many()'s cleanup, which kill the children's process groups
    raise KeyboardInterrupt(f"signal {signum}")


# A run stopped from outside (CI's time limit, a kill of pytest) ends as an interrupt, not abruptly: the children, each
# in a session of its own, would otherwise outlive it, blocked in a collective.
if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
    signal.signal(signal.SIGTERM, _terminated)


def popen(args: Sequence[str], **kwargs: Any) -> subprocess.Popen:
    """``subprocess.Popen`` in a new session (its own process group); end it with ``kill``."""
    return subprocess.Popen(args, start_new_session=True, **kwargs)


def kill(proc: subprocess.Popen) -> None:
    """Kill ``proc``'s process group (the child and whatever it started and left running) and reap the child."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):  # nothing of the group is left
        pass
    if proc.poll() is None:
        proc.kill()
    try:
        proc.communicate(timeout=30)
    except (subprocess.TimeoutExpired, ValueError):  # ValueError: its pipes were already read and closed
        pass


def run(args: Sequence[str], *, timeout: float, capture_output: bool = False, check: bool = False, **kwargs: Any) -> subprocess.CompletedProcess:
    """``subprocess.run`` with a required ``timeout``, whose child's process group is killed when it returns, times
    out (``subprocess.TimeoutExpired`` is raised, as by ``subprocess.run``) or the caller is interrupted."""
    if capture_output:
        kwargs.setdefault("stdout", subprocess.PIPE)
        kwargs.setdefault("stderr", subprocess.PIPE)
    proc = popen(args, **kwargs)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except BaseException:  # the timeout, Ctrl-C, or pytest-timeout failing the test
        kill(proc)
        raise
    kill(proc)  # whatever the child started and did not wait for
    done = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    if check:
        done.check_returncode()
    return done


def run_many(commands: Mapping[str, Sequence[str]], *, timeout: float, at_once: int = 2) -> dict[str, subprocess.CompletedProcess]:
    """Run ``commands`` (name -> argv), at most ``at_once`` at a time, each with ``timeout`` seconds from its start,
    and return each one's text result. Multi-rank runs side by side oversubscribe a 2-core machine: ten ranks at
    once ran when a rank aborted in CI (a collective mismatch, see test_losses; fewer at once is cheap insurance).
    Output goes to files (no pipe to fill while another run is waited on). A run past its timeout raises
    ``subprocess.TimeoutExpired``; the others are killed with it."""
    pending, running, done = list(commands.items()), {}, {}
    try:
        while pending or running:
            while pending and len(running) < at_once:
                name, args = pending.pop(0)
                out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
                running[name] = (popen(args, stdout=out, stderr=err, text=True), out, err, time.monotonic() + timeout)
            for name, (proc, out, err, deadline) in list(running.items()):
                if proc.poll() is None:
                    if time.monotonic() > deadline:
                        raise subprocess.TimeoutExpired(proc.args, timeout)
                    continue
                kill(proc)  # whatever it started and left running
                out.seek(0), err.seek(0)
                done[name] = subprocess.CompletedProcess(proc.args, proc.returncode, out.read(), err.read())
                out.close(), err.close()
                del running[name]
            time.sleep(0.2)
    finally:  # a timeout, a failed assertion in the caller's loop or Ctrl-C: nothing outlives the call
        for proc, out, err, _ in running.values():
            kill(proc)
            out.close(), err.close()
    return done


def failure(done: subprocess.CompletedProcess, tail: int = 3000) -> str:
    """What a failed multi-rank run printed that says why: every line naming an error, from any rank (the first
    rank to fail is often not the last to print), then the end of its stderr."""
    marks = ("Error", "Exception", "terminate called", "what():", "Fatal Python", "Timeout", "timed out", "Aborted")
    named = [line for line in done.stderr.splitlines() if any(mark in line for mark in marks)]
    return f"exit {done.returncode}; lines naming an error:\n" + "\n".join(named[:30]) + f"\n... stderr's end:\n{done.stderr[-tail:]}"


def _end_process_groups() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def end_process_groups_at_exit() -> None:
    """For a worker script: destroy its process group when it exits, before the interpreter's own teardown. Left to
    destructors at exit, gloo can abort a finished run ("terminate called without an active exception", seen once
    under load)."""
    atexit.register(_end_process_groups)
