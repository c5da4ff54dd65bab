"""Tensors that end just before an unreadable page, for the bounds checks (``*_bounds_check.py``, run in
subprocesses): a kernel that reads past a tensor's end then dies of SIGSEGV instead of reading a neighbour."""

import ctypes
import mmap
import os
import sys
from pathlib import Path

import torch

PAGE = mmap.PAGESIZE
_libc = ctypes.CDLL(None)
_libc.mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
_held = []  # the mappings outlive the tensors viewing them


def at_page_end(t: torch.Tensor) -> torch.Tensor:
    """A copy of ``t`` whose last byte is the last readable one: the next page is mapped unreadable."""
    nbytes = t.numel() * t.element_size()
    pages = -(-nbytes // PAGE) + 1
    region = mmap.mmap(-1, (pages + 1) * PAGE)
    base = ctypes.addressof(ctypes.c_char.from_buffer(region))
    assert _libc.mprotect(base + pages * PAGE, PAGE, 0) == 0, "mprotect failed"
    _held.append(region)
    view = torch.frombuffer(region, dtype=torch.uint8, count=nbytes, offset=pages * PAGE - nbytes)
    view.copy_(t.reshape(-1).view(torch.uint8))
    return view.view(t.dtype).view(t.shape)


def guarded(q) -> tuple:
    """An ``NF4Weight``'s arguments for the ops after ``code``'s blocksize, each tensor a guarded copy:
    ``(packed, absmax, code, nested_absmax, nested_code, offset, nested_blocksize)``."""
    nested_absmax, nested_code, offset, nested_blocksize = q.nested_args()
    return (at_page_end(q.packed), at_page_end(q.absmax), at_page_end(q.code),
            None if nested_absmax is None else at_page_end(nested_absmax),
            None if nested_code is None else at_page_end(nested_code), offset, nested_blocksize)


def run_bounds_check(script: str, done_line: str, **env: str) -> None:
    """Run ``tests/<script>`` in a subprocess (with ``env`` added) and assert it finished and printed ``done_line``;
    a death by signal is reported as what it means here: a read past a tensor's end hit the unreadable page."""
    from tests import isolated

    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, **env, PYTHONPATH=os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])))
    done = isolated.run([sys.executable, str(root / "tests" / script)], env=env, cwd=root, capture_output=True, text=True,
                        timeout=300)
    assert done.returncode == 0, (
        f"exit status {done.returncode}" + (" (killed by a signal: a read past a tensor's end hit the unreadable page)"
                                            if done.returncode < 0 else "") + f"\n{done.stderr[-3000:]}")
    assert done_line in done.stdout
