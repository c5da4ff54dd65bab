"""Multi-process QLoRA with Lightning's DDP on CPU (gloo): same result as one process, NF4 kept out of
DDP's sync, artifacts written once, and a failing rank ends the run instead of hanging it."""

import sys
from pathlib import Path

import pytest
import torch
from tests import isolated

pytestmark = pytest.mark.timeout(540)  # the fixture's run and the test's, each stopped at 240 s

WORKER = Path(__file__).with_name("ddp_worker.py")


def run_worker(out: Path, strategy: str, devices: int, batch_size: int, fail_on_rank: int = -1, timeout: int = 240):
    return isolated.run(
        [sys.executable, str(WORKER), str(out), strategy, str(devices), str(batch_size), str(fail_on_rank)],
        capture_output=True, text=True, timeout=timeout,
    )


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    result = run_worker(out, "auto", 1, 4)
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(out / "rank0.pt")


@pytest.mark.parametrize("strategy", ["ddp", "ddp_spawn"])
def test_ddp_matches_single_process(tmp_path, single, strategy):
    result = run_worker(tmp_path, strategy, 2, 2)  # 2 ranks x 2 = the single run's batch of 4
    assert result.returncode == 0, result.stderr[-3000:]
    rank0, rank1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert rank0["trainable"].keys() == single["trainable"].keys()
    for name, value in rank0["trainable"].items():
        assert torch.equal(value, rank1["trainable"][name]), name  # every rank ends with the same adapters
        torch.testing.assert_close(value, single["trainable"][name], atol=1e-5, rtol=1e-4)
    # the DDP wrapper skipped every packed NF4 weight (no start-up broadcast), and nothing else
    assert rank0["wrapper"] == "DistributedDataParallel"
    assert len(rank0["ddp_ignored"]) == 14 and all(n.endswith(".base_layer.weight") for n in rank0["ddp_ignored"])
    assert (tmp_path / "export" / "adapter" / "adapter_model.safetensors").exists()
    assert (tmp_path / "exporters.txt").read_text().split() == ["0"]  # written once, by rank 0
    # spawned workers cannot hand LoRA back to the launching process's float model: the user is told where it is
    assert ("LoRACallback under a spawned or forked strategy" in result.stderr) == (strategy == "ddp_spawn")


def test_failing_rank_stops_the_run(tmp_path):
    result = run_worker(tmp_path, "ddp", 2, 2, fail_on_rank=1, timeout=200)
    assert result.returncode != 0
    assert "injected failure on rank 1" in result.stderr
    assert not (tmp_path / "rank0.pt").exists()


def test_cli_fit_under_ddp_on_two_ranks(tmp_path):
    """``lightning-nf4 fit`` with ``strategy: ddp`` on two gloo ranks (configs/ddp-2gpu.yaml's setup; on two GPUs in
    tests/test_gpu_fsdp.py): each rank loads the whole model in configure_model, validation and generation run, and
    rank 0 writes the exports."""
    from tests.test_fsdp import cli_fit_on_two_ranks

    cli_fit_on_two_ranks(tmp_path, strategy="ddp")
