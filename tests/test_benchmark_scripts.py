"""The GPU benchmarks of issue 12 run end to end on the CPU, so that the one GPU run that fills their tables does
not stop on a bug in the scripts: ``kernels.py --dequant-shapes`` (its launch-setting sweep through Triton's
interpreter) and ``generate.py --compiled`` (eager, compiled and loop decoding of a tiny random Llama)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run(args: list[str], env: dict | None = None, timeout: int = 240) -> str:
    done = subprocess.run([sys.executable, *args], cwd=ROOT, env=dict(os.environ, **(env or {})),
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def _rows(out: str, first: str) -> list[list[str]]:
    """Data rows of the markdown table whose header starts with ``first``."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first}"))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return rows


@pytest.mark.slow
def test_kernels_dequant_shapes_sweeps_every_setting_under_the_interpreter():
    pytest.importorskip("triton")
    out = _run(["benchmarks/kernels.py", "--device", "cpu", "--threads", "1", "--dtype", "fp32",
                "--dequant-shapes", "64x128,24x96", "--reps", "1"], env={"TRITON_INTERPRET": "1"})
    main, detail = _rows(out, "weight"), _rows(out.split("Sweep detail")[1], "weight")
    assert [(r[0], r[1]) for r in main] == [("64x128", "True"), ("64x128", "False"), ("24x96", "True"), ("24x96", "False")]
    for row in main:
        assert re.fullmatch(r"\d+/[48]", row[9]), row  # the sweep's best setting (outputs/warps)
    for row in detail:  # each setting ran and gave the reference's bits (a wrong output would read "wrong")
        assert len(row) == 10 and all(cell.endswith("%") for cell in row[2:]), row


@pytest.mark.slow
def test_kernels_dequant_shapes_on_the_cpu_times_the_c_kernel():
    out = _run(["benchmarks/kernels.py", "--device", "cpu", "--threads", "1", "--dequant-shapes", "128x256", "--reps", "1"],
               env={"TRITON_INTERPRET": "0"})
    rows = _rows(out, "weight")
    assert [r[4] for r in rows] == ["C kernel", "C kernel"] and all(float(r[5]) > 0 for r in rows)
    assert "Sweep detail" not in out


@pytest.mark.slow
def test_generate_compiled_rows_on_the_cpu():
    """Every model and mode gives a rate; the compiled NF4 decode step has no graph break and does not recompile."""
    out = _run(["benchmarks/generate.py", "--preset", "tiny", "--compiled", "--modes", "eager,compiled,loop",
                "--new-tokens", "12", "--repeats", "1", "--threads", "1", "--one-token", "128x128"], timeout=400)
    assert re.search(r"1-token call at 128x128 .*NF4Linear [\d.]+ us, F.linear [\d.]+ us", out)
    rows = {(r[0], r[1]): r for r in _rows(out, "model")}
    assert sorted(rows) == sorted((m, mode) for m in ("bf16", "lightning-nf4") for mode in ("eager", "compiled", "loop"))
    for (model, mode), row in rows.items():
        assert float(row[2]) > 0 and float(row[4]) > 0, row  # decode and end-to-end tokens/s
        if mode != "eager":
            assert row[8:12] == ["1", "0", "0", "0"], row  # graphs, graph breaks, CUDA-graph skips, recompiles
