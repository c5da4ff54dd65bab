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
from typing import Any, Sequence


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


def _end_process_groups() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def end_process_groups_at_exit() -> None:
    """For a worker script: destroy its process group when it exits, before the interpreter's own teardown. Left to
    destructors at exit, gloo can abort a finished run ("terminate called without an active exception", seen once
    under load)."""
    atexit.register(_end_process_groups)
