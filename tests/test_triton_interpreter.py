"""The Triton kernels on the CPU, through Triton's interpreter (a subprocess: the switch is read at import)."""

import os
import sys
from pathlib import Path

import pytest
from tests import isolated
from tests.guarded import run_bounds_check

pytest.importorskip("triton")


@pytest.mark.timeout(360)  # its subprocess stops at 300 s
def test_triton_kernels_under_the_interpreter_match_the_cpu_kernels():
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])))
    done = isolated.run([sys.executable, str(root / "tests" / "interpreter_check.py")], env=env, cwd=root,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "interpreter kernels match" in done.stdout
    assert "interpreter prepared gemv ok" in done.stdout


def test_triton_kernels_read_nothing_past_their_tensors():
    """The kernels under the interpreter with every tensor they read ending just before an unreadable page: a read
    past a tensor's end (e.g. the gemv's rows past N left unclamped) kills the subprocess instead of passing."""
    run_bounds_check("interpreter_bounds_check.py", "interpreter kernels read within their tensors", TRITON_INTERPRET="1")
