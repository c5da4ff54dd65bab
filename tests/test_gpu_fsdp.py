"""Sharded QLoRA on two CUDA GPUs (NCCL): the same adapters as one GPU and as DDP, and a checkpoint streamed
into the shards. Skipped without two GPUs; each run is a subprocess with a timeout (tests/fsdp_worker.py)."""

import os
import sys

import pytest
import torch

from tests.test_fsdp import assert_ranks_hold_their_rows, load_worker, run_worker

pytestmark = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")


@pytest.fixture(scope="module")
def gpu_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu_fsdp")
    os.environ["FSDP_WORKER_ACCELERATOR"] = "gpu"
    try:
        return {
            "single": run_worker(root / "single", "auto", 1, 4, timeout=600),
            "fsdp": run_worker(root / "fsdp", "nf4_fsdp", 2, 2, timeout=600),
            "ddp": run_worker(root / "ddp", "ddp", 2, 2, timeout=600),
            "root": root,
        }
    finally:
        del os.environ["FSDP_WORKER_ACCELERATOR"]


def test_two_gpu_sharded_run_matches_one_gpu_and_ddp(gpu_runs):
    single, fsdp, ddp = gpu_runs["single"][0], gpu_runs["fsdp"], gpu_runs["ddp"][0]
    assert fsdp[0]["strategy"] == "NF4FSDPStrategy" and fsdp[0]["trainable"].keys() == single["trainable"].keys()
    for name, value in fsdp[0]["trainable"].items():
        assert torch.equal(value, fsdp[1]["trainable"][name]), name
        # fp32 adapters and compute; NCCL's reduce-scatter, DDP's all-reduce and one GPU's sum over the global
        # batch add in different orders (and the vocabulary-parallel loss sums its normalizer over two halves),
        # and AdamW at lr 1e-2 divides tiny gradients by their own size, magnifying those rounding differences:
        # 5e-4 absolute, as the CPU test (test_vocab_parallel). Seen on 2 x H100: 1.2e-4 in one of 1024 elements.
        torch.testing.assert_close(value, ddp["trainable"][name], atol=5e-4, rtol=1e-3)
        torch.testing.assert_close(value, single["trainable"][name], atol=5e-4, rtol=1e-3)


def test_two_gpu_sharded_resume_continues_exactly(gpu_runs, tmp_path, monkeypatch):
    """Resumed from the end of the first epoch on two GPUs, the second epoch ends on the same adapters, to the bit
    (as tests/test_fsdp.py checks on gloo)."""
    ckpt = next((gpu_runs["root"] / "fsdp" / "ckpt").glob("epoch=0-*.ckpt"))
    monkeypatch.setenv("FSDP_WORKER_ACCELERATOR", "gpu")
    resumed = run_worker(tmp_path, "nf4_fsdp", 2, 2, 2, str(ckpt), timeout=600)
    for name, value in gpu_runs["fsdp"][0]["trainable"].items():
        torch.testing.assert_close(resumed[0]["trainable"][name], value, rtol=0, atol=0)


def test_two_gpu_ranks_hold_half_of_every_weight(gpu_runs):
    for rank in gpu_runs["fsdp"]:
        for name, h in rank["held"].items():
            assert h["rows"] * 2 == h["full_rows"], name
        assert sum(h["dtype"] == "torch.uint8" for h in rank["held"].values()) == 14


def test_two_gpu_checkpoint_streams_into_shards(tmp_path, monkeypatch):
    load_worker().shardable_llama().save_pretrained(tmp_path / "hf")
    monkeypatch.setenv("FSDP_WORKER_ACCELERATOR", "gpu")
    sharded = run_worker(tmp_path / "deferred", "nf4_fsdp", 2, 2, 1, checkpoint=str(tmp_path / "hf"), timeout=600)
    whole = run_worker(tmp_path / "whole", "auto", 1, 4, 1, checkpoint=str(tmp_path / "hf"), timeout=600)[0]
    # quantized on each GPU as the unit is filled: compared with the whole checkpoint quantized on a GPU (the
    # double quantization's offset is a mean, whose last bit depends on the device's reduction order)
    assert_ranks_hold_their_rows(sharded, tmp_path / "hf", device="cuda")
    loss = (sharded[0]["first_loss"].cpu() + sharded[1]["first_loss"].cpu()) / 2  # each rank's loss on its own GPU
    torch.testing.assert_close(loss, whole["first_loss"].cpu(), atol=1e-4, rtol=1e-4)


@pytest.mark.timeout(1300)  # four two-rank runs, one at a time, each stopped at 300 s
def test_two_gpu_chunked_loss_ranks_take_one_path(tmp_path, monkeypatch):
    """CausalLMModule (the CLI's module) under NCCL, with its validation metric: the chunked loss with lm_head frozen
    equals the plain loss, gathered by FSDP or split by vocabulary rows (the default); and when rank 1 alone finds
    the logits unlike lm_head's, both ranks take the plain path together (an all-reduce on the logits' device).
    tests/test_losses.py and tests/test_vocab_parallel.py run the same on gloo."""
    from tests import isolated
    from tests.test_losses import ROOT, save_shardable_llama

    model_dir = save_shardable_llama(tmp_path / "model")
    runs = {"frozen_plain": ("plain", "nf4_fsdp"), "frozen": ("chunked", "nf4_fsdp"), "disagree": ("chunked", "nf4_fsdp", "disagree"),
            "vocab": ("chunked", "nf4_fsdp_vocab")}
    worker = ROOT / "tests" / "losses_fsdp_worker.py"
    monkeypatch.setenv("LOSSES_WORKER_ACCELERATOR", "gpu")
    done = isolated.run_many({name: [sys.executable, str(worker), str(model_dir), str(tmp_path / name), mode,
                                     f"{strategy}_frozen_head", "2", "2", *rest] for name, (mode, strategy, *rest) in runs.items()},
                             timeout=300, at_once=1)
    for name, result in done.items():
        assert result.returncode == 0, f"{name}: {isolated.failure(result)}"
    out = {name: [torch.load(tmp_path / name / f"rank{r}.pt") for r in (0, 1)] for name in runs}
    assert [rank["fell_back"] for rank in out["disagree"]] == [True, True]
    assert not any(rank["fell_back"] for name in ("frozen", "vocab") for rank in out[name])
    assert out["frozen"][0]["unsharded"] > 0  # the chunked loss gathered the head itself
    assert out["vocab"][0]["unsharded"] == 0  # split by vocabulary: never gathered
    for name in ("frozen", "disagree", "vocab"):
        for got, want in zip(out[name], out["frozen_plain"]):
            torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(want["losses"]), rtol=1e-4, atol=1e-4)


def test_two_gpu_cli_fit_under_nf4_fsdp(tmp_path):
    """The CLI's sharded fit (tests/test_fsdp.py runs it on gloo) on two GPUs, started as ``python -m``."""
    from tests.test_fsdp import cli_fit_on_two_ranks

    cli_fit_on_two_ranks(tmp_path, "gpu", [sys.executable, "-m", "lightning_nf4.cli"])


def test_two_gpu_cli_fit_under_ddp(tmp_path):
    """The CLI's DDP fit on two GPUs (configs/ddp-2gpu.yaml's setup): each rank loads the whole model in
    configure_model, under Lightning's default device for that rank."""
    from tests.test_fsdp import cli_fit_on_two_ranks

    cli_fit_on_two_ranks(tmp_path, "gpu", [sys.executable, "-m", "lightning_nf4.cli"], strategy="ddp")
