"""The GPU benchmarks run end to end on the CPU, so that the one GPU run that fills their tables does
not stop on a bug in the scripts: ``kernels.py --dequant-shapes`` (its launch-setting sweep through Triton's
interpreter), ``gemv_sweep.py`` (every gemv setting and the old kernel checked against dequantize + matvec under the
interpreter, a probe kernel run), ``generate.py --compiled`` (eager, compiled and loop decoding of a tiny random Llama), and the
sharded step's phase reports (``fsdp_scaling.py`` on two gloo ranks, ``fsdp_host_overhead.py``), and the research
tensor-core kernel of ``gemv_mma.py`` with its probes, built for sm_90 by nvcc where there is one."""

import os
import re
import sys
from pathlib import Path

import pytest
from tests import isolated

ROOT = Path(__file__).resolve().parent.parent


def _run(args: list[str], env: dict | None = None, timeout: int = 240) -> str:
    done = isolated.run([sys.executable, *args], cwd=ROOT, env=dict(os.environ, **(env or {})),
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


@pytest.mark.timeout(660)  # its subprocess stops at 600 s
@pytest.mark.slow
def test_gemv_sweep_checks_every_setting_and_the_other_kernels_under_the_interpreter(tmp_path):
    """Every setting of the package's and the old kernel matches dequantize + matvec; a probe_* kernel runs unchecked;
    a variant that is not a probe and gives wrong numbers (the probe under another name) is reported wrong."""
    pytest.importorskip("triton")
    (tmp_path / "gemv_kernel_unchecked.py").write_text((ROOT / "benchmarks" / "gemv_kernel_probe_loads.py").read_text())
    out = _run(["benchmarks/gemv_sweep.py", "--device", "cpu", "--shapes", "8x4096,6x320", "--quick", "--before",
                "--variant", "probe_loads,unchecked"],
               env={"TRITON_INTERPRET": "1", "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"},
               timeout=600)
    detail = {row[0]: row[1:] for row in _rows(out.split("Sweep detail")[1], "setting")}
    assert any(label.startswith("before/") for label in detail) and any(label.startswith("probe_loads/") for label in detail)
    for label, cells in detail.items():
        if label.startswith("unchecked/"):
            assert all(cell.startswith("wrong (") for cell in cells), (label, cells)
        else:  # ran and matched the reference (else "wrong (...)"); a probe ran
            assert all(cell == "ok" for cell in cells), (label, cells)


@pytest.mark.slow
def test_kernels_dequant_shapes_on_the_cpu_times_the_c_kernel():
    out = _run(["benchmarks/kernels.py", "--device", "cpu", "--threads", "1", "--dequant-shapes", "128x256", "--reps", "1"],
               env={"TRITON_INTERPRET": "0"})
    rows = _rows(out, "weight")
    assert [r[4] for r in rows] == ["C kernel", "C kernel"] and all(float(r[5]) > 0 for r in rows)
    assert "Sweep detail" not in out


@pytest.mark.timeout(460)  # its subprocess stops at 400 s
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


@pytest.mark.timeout(460)  # its subprocess stops at 400 s
def test_fsdp_host_overhead_times_each_phase_of_ddp_and_sharded_steps():
    """The CPU stand-in for the sharded step's host time (a fake 2-rank group) runs DDP and nf4_fsdp variants,
    the what-if among them, and prints a positive time for every phase of each."""
    out = _run(["benchmarks/fsdp_host_overhead.py", "--specs", "ddp,nf4_fsdp+whole+one_nf4", "--layers", "2", "--steps", "1",
                "--warmup", "1"], timeout=400)
    rows = {r[0]: r for r in _rows(out, "configuration")}
    assert sorted(rows) == ["ddp", "nf4_fsdp+whole+one_nf4"]
    for row in rows.values():
        assert all(float(x) > 0 for x in row[1:5]), row  # forward, backward, optimizer, step
    assert float(rows["ddp"][5]) == 0.0  # extra per layer against the first configuration


@pytest.mark.timeout(460)  # its subprocess stops at 400 s
def test_fsdp_scaling_reports_host_and_device_time_of_each_phase(tmp_path):
    """Two gloo ranks of the sharded step: each rank prints the host time it took to issue forward, backward and
    optimizer step (the device column is NaN without a GPU)."""
    out = _run(["benchmarks/fsdp_scaling.py", "--specs", "tiny:nf4_fsdp:2", "--rounds", "1", "--steps", "1", "--warmup", "1",
                "--seq", "16", "--profile-rounds", "0", "--out", str(tmp_path)], env={"OMP_NUM_THREADS": "1"}, timeout=400)
    phases = re.findall(r"rank (\d) forward/backward/optimizer ms, median step: host issues (\d+)/(\d+)/(\d+), device runs nan/nan/nan", out)
    assert sorted(p[0] for p in phases) == ["0", "1"], out[-2000:]
    assert all(int(p[1]) + int(p[2]) > 0 for p in phases)


def test_fsdp_scaling_lanes_of_different_sizes_get_disjoint_gpus():
    """Two configurations run at once must not share a GPU: a 2-GPU one beside a 1-GPU one takes GPUs 0-1 and 2
    (the 1-GPU one used to land on GPU 1, inside the other's pair)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from fsdp_scaling import lane_first_gpus
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    assert lane_first_gpus(["70b:nf4_fsdp:2", "70b:nf4_fsdp:1"]) == [0, 2]
    assert lane_first_gpus(["8b:ddp:2", "8b:nf4_fsdp:2"]) == [0, 2]
    assert lane_first_gpus(["70b:nf4_fsdp:1", "70b:nf4_fsdp:2"]) == [0, 1]


def test_mma_research_kernel_and_its_probes_build_for_hopper(tmp_path):
    """``gemv_mma.py`` compiles ``gemv_kernel_mma.cu`` on the GPU (NVRTC): here nvcc builds it for sm_90 at each 8B
    row length, with and without double quantization, and each probe's text substitution applies exactly once."""
    import shutil
    import subprocess

    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("no nvcc on this machine")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import gemv_mma
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    source = gemv_mma.SOURCE.read_text()
    builds = [(source, blocks, nested, gemv_mma.MMA_SETTINGS[0]) for blocks in (64, 128, 224) for nested in (1, 0)]
    for old, new in gemv_mma.PROBES.values():
        assert source.count(old) == 1, old
        builds.append((source.replace(old, new), 128, 1, gemv_mma.PROBE_SETTINGS[0]))
    for i, (text, blocks, nested, (warps, ring, ctas)) in enumerate(builds):
        cu = tmp_path / f"k{i}.cu"
        cu.write_text(text)
        done = subprocess.run([nvcc, "-arch=sm_90", "-cubin", "-o", str(tmp_path / f"k{i}.cubin"), str(cu), f"-DBLOCKS={blocks}",
                               f"-DWARPS={warps}", f"-DRING={ring}", f"-DCTAS={ctas}", f"-DNESTED={nested}", "-DNESTED_SHIFT=8"],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]


def test_lora_step_moe_preset_compares_nf4_experts_with_bf16():
    """``lora_step.py --preset tiny-moe``: the MoE rows (Qwen3-MoE's stacked experts, LoRA on attention) run and report
    a ratio and a peak for each configuration."""
    out = _run(["benchmarks/lora_step.py", "--preset", "tiny-moe", "--configs", "bf16,nf4", "--steps", "2", "--warmup", "1"])
    rows = _rows(out, "configuration")
    assert [r[0] for r in rows] == ["bf16 LoRA", "lightning-nf4 QLoRA"] and rows[0][3] == "1.00"
    assert "LoRA r=16 on q_proj,k_proj,v_proj,o_proj" in out and all(r[7].endswith("GiB") for r in rows)
