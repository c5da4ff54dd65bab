"""Vocabulary-parallel embeddings, head and loss (``lightning_nf4.strategies.vocab_parallel``) under NF4FSDPStrategy.

On two gloo ranks (each run a subprocess with a timeout, tests/vocab_parallel_worker.py): the lookup, the head's
logits and the loss against the single-process ones with different batches per rank; a CausalLMModule fit with
the tables split by vocabulary against the same fit with them as FSDP units (losses, perplexities, adapters,
greedy generation); no all-gather of either table; the merged export still holds the whole tables.
"""

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lightning_nf4.strategies import NF4FSDPStrategy, NF4ShardingConfigError
from lightning_nf4.strategies.vocab_parallel import vocabulary_tables
from tests.lightning_models import tiny_llama
from tests import isolated

pytestmark = pytest.mark.timeout(600)  # the first test to use ``fits`` waits for its three two-rank runs, two at a time

WORKER = Path(__file__).with_name("vocab_parallel_worker.py")


def _run(args: list[str], timeout: int = 420) -> None:
    done = isolated.run([sys.executable, str(WORKER), *args], capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-4000:]


# -- which tables, and the errors ---------------------------------------------------------------------------------
def _frozen(model):
    model.requires_grad_(False)
    return model


def test_auto_takes_frozen_untied_tables_that_split_evenly():
    model = _frozen(tiny_llama())
    assert vocabulary_tables(model, 2, "auto") == (model.get_input_embeddings(), model.get_output_embeddings())
    assert vocabulary_tables(model, 2, False) is None
    assert vocabulary_tables(model, 1, True) is None  # one rank: nothing to split


@pytest.mark.parametrize("case, message", [
    ("tied", "tied to the input embeddings"),
    ("trained", "a vocabulary table is trained"),
    ("uneven", "does not split evenly across 3 ranks"),
    ("offload", "cpu_offload=True"),
    ("bias", "with a bias"),
])
def test_what_cannot_be_split_keeps_todays_path_or_is_named(case, message):
    from torch import nn

    model = _frozen(tiny_llama())
    world, offload = (3 if case == "uneven" else 2), case == "offload"
    if case == "tied":
        model.lm_head.weight = model.model.embed_tokens.weight
    elif case == "trained":
        model.lm_head.weight.requires_grad_(True)
    elif case == "bias":
        model.lm_head = nn.Linear(64, 128, bias=True).requires_grad_(False)
    assert vocabulary_tables(model, world, "auto", cpu_offload=offload) is None
    with pytest.raises(NF4ShardingConfigError, match=f"vocab_parallel=True cannot.*{message}.*vocab_parallel='auto'"):
        vocabulary_tables(model, world, True, cpu_offload=offload)


def test_the_knob_takes_true_false_or_auto():
    assert NF4FSDPStrategy().vocab_parallel == "auto"
    with pytest.raises(NF4ShardingConfigError, match="vocab_parallel='yes': give True, False or 'auto'"):
        NF4FSDPStrategy(vocab_parallel="yes")


# -- the operations on two ranks -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ops(tmp_path_factory):
    out = tmp_path_factory.mktemp("vp_ops")
    _run(["ops", str(out)])
    return [torch.load(out / f"rank{r}.pt") for r in (0, 1)]


def test_each_rank_keeps_half_the_rows_and_looks_up_its_own_tokens(ops):
    for rank in ops:
        assert rank["local_rows"] == (250, 250)
        got, want = rank["lookup"]  # rank 1 has longer sequences than rank 0
        assert torch.equal(got, want)


def test_head_gives_each_rank_its_full_logits_and_their_gradient(ops):
    for rank in ops:
        logits, want, grad, want_grad = rank["logits"]
        assert logits.shape == want.shape and logits.shape[-1] == 500
        torch.testing.assert_close(logits, want, rtol=1e-5, atol=1e-5)  # fp32, the same products in another order
        torch.testing.assert_close(grad, want_grad, rtol=1e-5, atol=1e-4)  # sums of 500 products of size ~7


@pytest.mark.parametrize("case", ["fp32", "fp32_default", "fp32_ignored", "sum"])
def test_fp32_loss_and_hidden_gradient_equal_the_single_process_ones(ops, case):
    """fp32: the same logits, the max/normalizer summed over two halves: equal to float rounding (1e-6 relative)."""
    for rank, result in enumerate(ops):
        r = result[case]
        torch.testing.assert_close(r["got"], r["want"], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(r["grad"], r["want_grad"], rtol=1e-5, atol=1e-7)
        if r["count"]:
            torch.testing.assert_close(r["got"], r["plain"], rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(r["grad"], r["plain_grad"], rtol=1e-5, atol=1e-7)
        else:  # every row ignored on this rank: 0 and no gradient, where F.cross_entropy gives NaN
            assert case == "fp32_ignored" and rank == 1
            assert float(r["got"]) == 0.0 and not r["grad"].any()
    assert ops[0]["fp32_ignored"]["count"] > 0 and ops[1]["fp32_ignored"]["count"] == 0  # the case is covered


def test_bf16_loss_matches_to_bf16_rounding(ops):
    """bf16 under autocast: the same bf16 logits (loss to fp32 rounding); the gradient's two halves are summed
    in fp32 before one rounding to bf16, the single-process one rounds once too: within 2^-6 of its largest value."""
    for result in ops:
        r = result["bf16"]
        torch.testing.assert_close(r["got"], r["want"], rtol=1e-6, atol=1e-6)
        scale = float(r["want_grad"].abs().max())
        torch.testing.assert_close(r["grad"].float(), r["want_grad"].float(), rtol=0, atol=scale * 2**-6)


def test_without_gradient_the_loss_is_the_same(ops):
    for result in ops:
        got, want = result["no_grad"]
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_given_counts_give_the_same_loss_and_wrong_ones_are_named(ops):
    for result in ops:
        got, exchanged = result["counts"]
        assert torch.equal(got, exchanged)
        assert result["wrong_counts"].startswith("LinearCrossEntropyError") and "every rank's token count" in result["wrong_counts"]


# -- a Lightning fit under NF4FSDPStrategy -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny untied Llama whose NF4 layers split into whole scale groups on two ranks, with a tokenizer."""
    from tests.test_losses import save_shardable_llama

    return save_shardable_llama(tmp_path_factory.mktemp("vp-llama"))


@pytest.fixture(scope="module")
def fits(model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("vp_fit")
    runs = {"vocab_parallel": ("chunked", "auto"), "plain": ("plain", "true"), "units": ("chunked", "false")}
    done = isolated.run_many({name: [sys.executable, str(WORKER), "fit", str(model_dir), str(root / name), loss, setting]
                              for name, (loss, setting) in runs.items()}, timeout=200)
    for name, result in done.items():
        assert result.returncode == 0, f"{name}: {isolated.failure(result)}"
    out = {name: [torch.load(root / name / f"rank{r}.pt") for r in (0, 1)] for name in runs}
    out["root"] = root
    return out


def test_fit_matches_the_fit_with_the_tables_as_units(fits):
    """Same steps, losses and perplexities (fp32 to 1e-5), and the same adapters after four AdamW steps at lr 1e-2
    (Adam's normalisation magnifies float-rounding differences of tiny gradients: 5e-4 absolute), for the chunked
    loss (vocab_parallel_cross_entropy) and HF's plain loss (the head's full logits)."""
    units = fits["units"]
    assert units[0]["kinds"] == ["FSDPEmbedding", "Linear"]  # the reference really is today's path
    for name in ("vocab_parallel", "plain"):
        run = fits[name]
        assert run[0]["kinds"] == ["VocabParallelEmbedding", "VocabParallelHead"], name
        for got, want in zip(run, units):  # each rank had its own batches
            assert len(got["losses"]) == 4
            torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(want["losses"]), rtol=1e-5, atol=1e-5)
            for when in ("before", "after"):
                assert abs(got[when] / want[when] - 1) < 1e-5, (name, when, got[when], want[when])
            assert got["completion"] == want["completion"]  # greedy generate() through the vocabulary-parallel head
        assert run[0]["trainable"].keys() == units[0]["trainable"].keys() and all(".lora_" in k for k in units[0]["trainable"])
        for key, value in run[0]["trainable"].items():
            assert torch.equal(value, run[1]["trainable"][key]), key
            torch.testing.assert_close(value, units[0]["trainable"][key], rtol=1e-3, atol=5e-4)
    assert fits["units"][0]["after"] < fits["units"][0]["before"]  # it trained


def test_the_chunked_loss_reuses_the_lookups_token_counts(fits):
    """Token counts are exchanged on the host (each rank waits for the slowest there): the chunked loss takes them
    from the lookup of the same tokens, so a step exchanges them once. HF's plain loss goes through the head's full
    logits, which exchange again."""
    for rank in fits["vocab_parallel"]:
        assert rank["count_exchanges"] == 1, rank["count_exchanges"]
    for rank in fits["plain"]:
        assert rank["count_exchanges"] == 2, rank["count_exchanges"]


def test_the_tables_are_never_gathered(fits):
    """One profiled step: FSDP2 all-gathers each decoder layer and the backbone (final norm) for forward and
    backward, and nothing else: no table, and the root holds nothing to gather. Every call of either table saw
    its weight as this rank's rows. With the tables as units, the profile does show their gathers."""
    for rank in fits["vocab_parallel"] + fits["plain"]:
        assert rank["gathers"] == {"(model)": 2, "(model.layers.0)": 2, "(model.layers.1)": 2}, rank["gathers"]
        seen = rank["sharded_in_forward"]
        assert {name for name, _ in seen} == {"VocabParallelEmbedding", "VocabParallelHead"} and all(ok for _, ok in seen)
    units = fits["units"][0]
    assert units["gathers"]["(model.embed_tokens)"] == 1 and units["gathers"]["(root)"] >= 1, units["gathers"]
    assert not all(ok for _, ok in units["sharded_in_forward"])


def test_merged_export_holds_the_whole_tables(fits, model_dir):
    original = load_file(model_dir / "model.safetensors")
    merged = {}
    folder = fits["root"] / "vocab_parallel" / "export" / "merged"
    for file in set(json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"].values()):
        merged.update(load_file(folder / file))
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        assert merged[key].shape == (320, 256), key
        assert torch.equal(merged[key], original[key]), key  # frozen fp32 tables: written as they were read
    reference = {}
    units = fits["root"] / "units" / "export" / "merged"
    for file in set(json.loads((units / "model.safetensors.index.json").read_text())["weight_map"].values()):
        reference.update(load_file(units / file))
    assert merged.keys() == reference.keys()
    for key in reference:
        torch.testing.assert_close(merged[key], reference[key], rtol=1e-3, atol=5e-4)  # the adapters' tolerance, merged
    adapter = load_file(fits["root"] / "vocab_parallel" / "export" / "adapter" / "adapter_model.safetensors")
    assert adapter and all(".lora_" in k for k in adapter)  # the frozen tables are not in the adapter
