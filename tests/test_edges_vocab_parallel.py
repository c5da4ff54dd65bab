"""Edges of the vocabulary-parallel tables and loss (lightning_nf4/strategies/vocab_parallel.py) that
tests/test_vocab_parallel.py does not reach.

In this process (no process group): which tables ``vocabulary_tables`` takes, the argument checks that must fail
on every rank before any collective, and ``local_logits``. On two gloo ranks (one subprocess with a timeout running
this file as a script, as tests/vocab_parallel_worker.py does): lookups of the ids on the rank boundary, the loss with
``shift=True`` and scaled before backward, and counts lists of the wrong length; each against the single-process
computation with the whole tables."""

import os
import re
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_nf4.losses import LinearCrossEntropyError  # noqa: E402
from lightning_nf4.strategies import NF4ShardingConfigError  # noqa: E402
from lightning_nf4.strategies.vocab_parallel import (  # noqa: E402
    VocabParallelHead,
    local_logits,
    vocab_parallel_cross_entropy,
    vocabulary_tables,
)
from tests import isolated  # noqa: E402


def _frozen_llama():
    from tests.lightning_models import tiny_llama

    return tiny_llama().requires_grad_(False)


# -- which tables ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case, message", [
    ("max_norm", "not a plain nn.Embedding (without max_norm)"),
    ("trained_embeddings", "a vocabulary table is trained"),
    ("uneven_embeddings", "does not split evenly across 2 ranks"),
])
def test_tables_the_lookup_cannot_split_are_left_to_fully_shard(case, message):
    """An embedding with max_norm renormalizes the rows it reads (the split lookup does not); a trained input table
    needs its whole gradient; an input table whose rows do not split evenly (even if the head's do)."""
    model = _frozen_llama()
    embeddings = model.get_input_embeddings()
    if case == "max_norm":
        embeddings.max_norm = 1.0
    elif case == "trained_embeddings":
        embeddings.weight.requires_grad_(True)
    else:
        model.set_input_embeddings(nn.Embedding(129, 64).requires_grad_(False))
    assert vocabulary_tables(model, 2, "auto") is None
    with pytest.raises(NF4ShardingConfigError, match=f"vocab_parallel=True cannot.*{re.escape(message)}"):
        vocabulary_tables(model, 2, True)


# -- checks made before any collective ------------------------------------------------------------------------------
def _head(v=16, h=8) -> VocabParallelHead:
    """A VocabParallelHead as far as the argument checks see it (they run before its weight is read as a DTensor)."""
    head = nn.Linear(h, v, bias=False).requires_grad_(False)
    head.__class__ = VocabParallelHead
    return head


def test_loss_arguments_are_checked_before_any_collective():
    hidden, labels = torch.randn(2, 5, 8), torch.randint(0, 16, (2, 5))
    with pytest.raises(LinearCrossEntropyError, match="needs a VocabParallelHead, got Linear"):
        vocab_parallel_cross_entropy(hidden, nn.Linear(8, 16, bias=False), labels)
    with pytest.raises(LinearCrossEntropyError, match="reduction must be 'mean' or 'sum', got 'none'"):
        vocab_parallel_cross_entropy(hidden, _head(), labels, reduction="none")
    with pytest.raises(LinearCrossEntropyError, match=r"hidden \[\.\.\., 8\] and labels \[\.\.\.\] must agree"):
        vocab_parallel_cross_entropy(torch.randn(2, 5, 7), _head(), labels)
    with pytest.raises(LinearCrossEntropyError, match=r"must agree: got hidden \(2, 5, 8\), labels \(2, 4\)"):
        vocab_parallel_cross_entropy(hidden, _head(), labels[:, :4])


def test_local_logits_is_undone_on_the_way_out():
    head = _head()
    with pytest.raises(KeyError):
        with local_logits(head):
            assert head.local_only
            raise KeyError("inside")
    assert head.local_only is False
    with local_logits(head):
        assert head.local_only
    assert head.local_only is False
    plain = nn.Linear(8, 16)
    with local_logits(plain):  # anything else: unchanged
        pass
    assert not hasattr(plain, "local_only")


# -- two ranks ----------------------------------------------------------------------------------------------------------
def _ranks(rank: int, out: str, init: str) -> None:
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.distributed.device_mesh import init_device_mesh

    from lightning_nf4.losses import linear_cross_entropy
    from tests.vocab_parallel_worker import sharded_tables

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2, timeout=timedelta(seconds=60))
    try:
        mesh = init_device_mesh("cpu", (2,))
        h, v = 16, 40
        embeddings, head, full_embeddings, full_head = sharded_tables(v, h, mesh)  # the same tables on both ranks
        result: dict = {}

        # every id on and around the boundary between the ranks' rows (19 | 20), and both ends
        ids = torch.tensor([[0, 19, 20, 39, 21 + rank], [18, 20, 19, 1, 38]])[:, : 4 + rank]
        result["lookup"] = (embeddings(ids), F.embedding(ids, full_embeddings))

        # the head's local columns only, under local_logits: this rank's vocabulary rows, no exchange
        x = torch.randn(3, h, generator=torch.Generator().manual_seed(rank))
        with local_logits(head):
            result["local"] = (head(x), F.linear(x, full_head[rank * 20:(rank + 1) * 20]))

        # shift=True on [B, T, H] (a causal LM's labels), a loss scaled before backward, different lengths per rank
        gen = torch.Generator().manual_seed(3 + rank)
        hidden = torch.randn(2, 6 + 3 * rank, h, generator=gen)
        labels = torch.randint(0, v, (2, 6 + 3 * rank), generator=gen)
        labels[0, 2] = -100
        for name, factor in (("shift", 1.0), ("scaled", 0.25)):
            a = hidden.clone().requires_grad_()
            got = vocab_parallel_cross_entropy(a, head, labels, shift=True, chunk_size=5)
            (got * factor).backward()
            b = hidden.clone().requires_grad_()
            want = linear_cross_entropy(b, full_head, labels, shift=True, chunk_size=5, backend="chunked")
            (want * factor).backward()
            c = hidden.clone().requires_grad_()
            plain = F.cross_entropy(F.linear(c[:, :-1], full_head).reshape(-1, v), labels[:, 1:].reshape(-1))
            (plain * factor).backward()
            result[name] = (got.detach(), want.detach(), plain.detach(), a.grad, b.grad, c.grad)

        # counts that name a third rank: refused on every rank, before any collective (no rank waits)
        errors = []  # (a list missing a rank is not tried: the rank whose entry is missing fails, the other waits)
        for counts in ([12, 18, 18], [12, 18, 0]):
            try:
                vocab_parallel_cross_entropy(hidden, head, labels, counts=counts)
                errors.append(None)
            except LinearCrossEntropyError as error:
                errors.append(str(error))
        result["wrong_counts"] = errors
        dist.barrier()
        torch.save(result, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("vp_edges")
    done = isolated.run([sys.executable, __file__, str(out)], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-4000:]
    return [torch.load(out / f"rank{r}.pt") for r in (0, 1)]


def test_ids_on_the_rank_boundary_are_looked_up_by_their_rank(two_ranks):
    for rank in two_ranks:
        got, want = rank["lookup"]
        assert got.shape == want.shape and torch.equal(got, want)


def test_local_logits_are_this_ranks_columns(two_ranks):
    for rank in two_ranks:
        got, want = rank["local"]
        assert got.shape == (3, 20) and torch.equal(got, want)


@pytest.mark.parametrize("case", ["shift", "scaled"])
def test_shifted_and_scaled_loss_match_one_process(two_ranks, case):
    """``shift=True`` shifts each sequence as Hugging Face does; the hidden-state gradient, computed in forward,
    is scaled by what the loss was multiplied by before backward."""
    for rank in two_ranks:
        got, want, plain, grad, want_grad, plain_grad = rank[case]
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(got, plain, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grad, want_grad, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(grad, plain_grad, rtol=1e-5, atol=1e-7)


def test_counts_for_another_world_size_are_refused_on_every_rank(two_ranks):
    for rank in two_ranks:
        assert len(rank["wrong_counts"]) == 2
        assert all(e is not None and "must hold every rank's token count" in e for e in rank["wrong_counts"]), rank["wrong_counts"]


if __name__ == "__main__":
    import socket

    import torch.multiprocessing as mp

    Path(sys.argv[1]).mkdir(parents=True, exist_ok=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # fork: the ranks inherit this process's imports (the package, torch) instead of importing them again
    mp.start_processes(_ranks, args=(sys.argv[1], f"tcp://127.0.0.1:{port}"), nprocs=2, start_method="fork")
