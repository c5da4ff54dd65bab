"""``tests/isolated.py``: a test's child process and whatever it starts end with the test."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests import isolated

# the child starts a grandchild that would sleep for a minute, prints its pid, then sleeps itself or exits
_FAMILY = """
import subprocess, sys, time
grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
print(grandchild.pid, flush=True)
if sys.argv[1] == "hang":
    time.sleep(60)
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as stat:  # a killed child not reaped yet by its (dead) parent is a zombie
        return stat.read().split(") ")[1][0] != "Z"


def _gone(pid: int, within: float = 5.0) -> bool:
    end = time.monotonic() + within
    while time.monotonic() < end:
        if not _alive(pid):
            return True
        time.sleep(0.05)
    return False


def test_a_child_that_returns_leaves_nothing_running():
    done = isolated.run([sys.executable, "-c", _FAMILY, "exit"], timeout=60, capture_output=True, text=True)
    assert done.returncode == 0
    assert _gone(int(done.stdout.split()[0]))


def test_a_child_that_hangs_is_killed_with_what_it_started(tmp_path):
    out = tmp_path / "out.txt"
    with open(out, "w") as sink:
        started = time.monotonic()
        with pytest.raises(subprocess.TimeoutExpired):
            isolated.run([sys.executable, "-c", _FAMILY, "hang"], timeout=3, stdout=sink)
    assert time.monotonic() - started < 40
    assert _gone(int(out.read_text().split()[0]))


def test_check_raises_on_failure():
    with pytest.raises(subprocess.CalledProcessError):
        isolated.run([sys.executable, "-c", "raise SystemExit(3)"], timeout=60, check=True)


_SPAN = "import sys, time; start = time.monotonic(); time.sleep(0.5); print(start, time.monotonic()); sys.exit(int(sys.argv[1]))"


def test_run_many_runs_at_most_at_once_at_a_time_and_returns_each_result():
    done = isolated.run_many({f"run{i}": [sys.executable, "-c", _SPAN, str(i)] for i in range(3)}, timeout=60, at_once=1)
    assert [done[f"run{i}"].returncode for i in range(3)] == [0, 1, 2]
    spans = sorted(tuple(map(float, done[f"run{i}"].stdout.split())) for i in range(3))
    assert all(end <= next_start for (_, end), (next_start, _) in zip(spans, spans[1:])), spans  # one after another
    assert isolated.failure(done["run1"]).startswith("exit 1")


def test_run_many_kills_every_running_family_when_one_times_out(tmp_path):
    # each child starts a grandchild, writes its pid to a file, and sleeps past the timeout
    family = _FAMILY.replace("print(grandchild.pid, flush=True)", "open(sys.argv[2], 'w').write(str(grandchild.pid))")
    commands = {name: [sys.executable, "-c", family, "hang", str(tmp_path / name)] for name in ("a", "b")}
    started = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired):
        isolated.run_many(commands, timeout=3, at_once=2)
    assert time.monotonic() - started < 40
    for name in ("a", "b"):
        assert _gone(int((tmp_path / name).read_text()))


ROOT = str(Path(__file__).resolve().parent.parent)


def _terminate_once_started(proc: subprocess.Popen, out: Path) -> tuple[int, int]:
    """Wait until ``proc``'s grandchild has written its pid to ``out``, send ``proc`` SIGTERM, and return the
    grandchild's pid and ``proc``'s exit status."""
    end = time.monotonic() + 60
    while not (out.exists() and out.read_text().strip()) and time.monotonic() < end:
        time.sleep(0.1)
    grandchild = int(out.read_text().split()[0])
    proc.send_signal(signal.SIGTERM)
    # an interrupted pytest session takes a few seconds to end here; 90 s leaves room for a loaded 2-core machine
    # (30 s ran out once while other multi-process tests shared the cores)
    return grandchild, proc.wait(timeout=90)


def test_a_terminated_run_still_kills_what_its_children_started(tmp_path):
    """SIGTERM to the process running the tests (CI's time limit, a kill): the child's own session, and what it
    started, went on running after pytest died; it now ends as Ctrl-C does, through run()'s cleanup."""
    out = tmp_path / "out.txt"
    code = (f"import sys; sys.path.insert(0, {ROOT!r}); from tests import isolated; "
            f"isolated.run([sys.executable, '-c', {_FAMILY!r}, 'hang'], timeout=60, stdout=open({str(out)!r}, 'w'))")
    parent = isolated.popen([sys.executable, "-c", code])
    try:
        grandchild, _ = _terminate_once_started(parent, out)
        assert _gone(grandchild, within=10)
    finally:
        isolated.kill(parent)


_SLEEPY_TESTS = """
import sys
sys.path.insert(0, {root!r})
from tests import isolated

def test_first():
    isolated.run([sys.executable, "-c", {family!r}, "hang"], timeout=60, stdout=open({out!r}, "w"))

def test_second():
    open({ran!r}, "w").write("ran")
"""


def test_a_terminated_pytest_session_ends_there_with_its_childrens_families(tmp_path):
    """The same through pytest itself: SIGTERM ends the session (the next test does not start; a SystemExit inside a
    test would only have failed that test) and the child's family goes with it."""
    out, ran = tmp_path / "out.txt", tmp_path / "second_ran.txt"
    (tmp_path / "test_sleepy.py").write_text(_SLEEPY_TESTS.format(root=ROOT, family=_FAMILY, out=str(out), ran=str(ran)))
    session = isolated.popen([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_sleepy.py"], cwd=tmp_path,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        grandchild, status = _terminate_once_started(session, out)
        assert status != 0
        assert _gone(grandchild, within=10) and not ran.exists()
    finally:
        isolated.kill(session)
