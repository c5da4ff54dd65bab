"""Two gloo ranks for tests/test_vocab_parallel.py (each run is a subprocess the test waits on with a timeout).

    python tests/vocab_parallel_worker.py ops OUT_DIR
        the vocabulary-parallel lookup, head and loss against the single-process ones, on two ranks with
        different batches (different token counts, ignored rows, one rank with every row ignored)
    python tests/vocab_parallel_worker.py fit MODEL_DIR OUT_DIR LOSS VOCAB_PARALLEL
        a CausalLMModule fit under NF4FSDPStrategy(vocab_parallel=...) with the usual frozen head, exports included

Each rank writes OUT_DIR/rank<r>.pt.
"""

import os
import sys
from datetime import timedelta
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests import isolated  # noqa: E402


# -- ops -------------------------------------------------------------------------------------------------------
def _batch(rank: int, n: int, h: int, v: int, dtype: torch.dtype, all_ignored: bool):
    g = torch.Generator().manual_seed(10 + rank)  # each rank its own batch
    hidden = torch.randn(n, h, generator=g).to(dtype)
    labels = torch.randint(0, v, (n,), generator=g)
    labels[::4] = -100
    if all_ignored:
        labels[:] = -100
    return hidden, labels


def sharded_tables(v: int, h: int, mesh):
    """Frozen input embeddings and output head of ``v`` rows, the same on every rank (a seeded generator, as a loaded
    checkpoint gives), split by vocabulary rows over ``mesh``; returned with copies of their whole weights."""
    from torch import nn

    from lightning_nf4.strategies.vocab_parallel import shard_by_vocabulary

    g = torch.Generator().manual_seed(0)
    embeddings, head = nn.Embedding(v, h), nn.Linear(h, v, bias=False)
    with torch.no_grad():
        embeddings.weight.copy_(torch.randn(v, h, generator=g))
        head.weight.copy_(torch.randn(v, h, generator=g) * 0.3)
    embeddings.requires_grad_(False)
    head.requires_grad_(False)
    full_embeddings, full_head = embeddings.weight.clone(), head.weight.clone()
    shard_by_vocabulary((embeddings, head), mesh)
    return embeddings, head, full_embeddings, full_head


def ops(rank: int, out: str, port: int) -> None:
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.distributed.device_mesh import init_device_mesh

    from lightning_nf4.losses import linear_cross_entropy
    from lightning_nf4.strategies.vocab_parallel import vocab_parallel_cross_entropy

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=120))
    try:
        mesh = init_device_mesh("cpu", (2,))
        h, v = 32, 500
        embeddings, head, full_embeddings, full_head = sharded_tables(v, h, mesh)
        result: dict = {"local_rows": (embeddings.weight.to_local().shape[0], head.weight.to_local().shape[0])}

        # the lookup: ids of different shapes per rank, each rank gets its own rows
        ids = torch.randint(0, v, (2, 7 + 3 * rank), generator=torch.Generator().manual_seed(rank))
        result["lookup"] = (embeddings(ids), F.embedding(ids, full_embeddings))

        # the head's full logits and their gradient
        hidden, _ = _batch(rank, 9 + 4 * rank, h, v, torch.float32, False)
        x = hidden.clone().requires_grad_()
        logits = head(x)
        probe = torch.randn(logits.shape, generator=torch.Generator().manual_seed(5 + rank))
        (logits * probe).sum().backward()
        y = hidden.clone().requires_grad_()
        want = F.linear(y, full_head)
        (want * probe).sum().backward()
        result["logits"] = (logits.detach(), want.detach(), x.grad, y.grad)

        # the loss: fp32 and bf16 (autocast), chunked unevenly and by default, one case with rank 1 all ignored
        for name, dtype, chunk, ignored in [("fp32", torch.float32, 7, False), ("fp32_default", torch.float32, None, False),
                                            ("fp32_ignored", torch.float32, 5, rank == 1), ("bf16", torch.bfloat16, 16, False),
                                            ("sum", torch.float32, 11, False)]:
            hidden, labels = _batch(rank, 37 + 20 * rank, h, v, torch.float32, ignored)
            reduction = "sum" if name == "sum" else "mean"
            a = hidden.clone().requires_grad_()
            with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
                got = vocab_parallel_cross_entropy(a, head, labels, chunk_size=chunk, reduction=reduction)
            got.backward()
            b = hidden.clone().requires_grad_()
            with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
                want = linear_cross_entropy(b, full_head, labels, chunk_size=chunk, backend="chunked", reduction=reduction)
            want.backward()
            c = hidden.clone().requires_grad_()
            with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
                plain = F.cross_entropy(F.linear(c, full_head).float(), labels, reduction=reduction)
            plain.backward()
            result[name] = {"got": got.detach(), "want": want.detach(), "plain": plain.detach(),
                            "grad": a.grad, "want_grad": b.grad, "plain_grad": c.grad, "count": int((labels != -100).sum())}
        # every rank's token count passed in (as causal_lm_loss passes the lookup's): the same loss, no exchange
        hidden, labels = _batch(rank, 37 + 20 * rank, h, v, torch.float32, False)
        result["counts"] = (vocab_parallel_cross_entropy(hidden, head, labels, chunk_size=7, counts=[37, 57]),
                            vocab_parallel_cross_entropy(hidden, head, labels, chunk_size=7))
        try:  # a count that is not this rank's: refused on each rank before any collective
            vocab_parallel_cross_entropy(hidden, head, labels, chunk_size=7, counts=[57, 37])
        except Exception as error:  # noqa: BLE001 - the test checks the type and message
            result["wrong_counts"] = f"{type(error).__name__}: {error}"
        # without a gradient (evaluation): the same loss, and nothing is saved
        with torch.no_grad():
            hidden, labels = _batch(rank, 37 + 20 * rank, h, v, torch.float32, False)
            result["no_grad"] = (vocab_parallel_cross_entropy(hidden, head, labels, chunk_size=7),
                                 linear_cross_entropy(hidden, full_head, labels, chunk_size=7, backend="chunked"))
        torch.save(result, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


# -- fit -------------------------------------------------------------------------------------------------------
def fit(model_dir: str, out: Path, loss: str, vocab_parallel: str) -> None:
    import lightning.pytorch as pl

    from lightning_nf4 import LoRACallback, NF4Precision
    from lightning_nf4.models import CausalLMModule
    from lightning_nf4.strategies import NF4FSDPStrategy
    from tests.losses_fsdp_worker import Data

    class Record(pl.Callback):
        def __init__(self) -> None:
            self.losses, self.sharded_in_forward, self.profile, self.gathers = [], [], None, {}

        def on_train_start(self, trainer, pl_module):
            from torch.distributed.tensor import DTensor

            hf = pl_module.model

            def sharded(module, args, output):  # the table's weight is still this rank's rows while it is used
                w = module.weight
                self.sharded_in_forward.append((type(module).__name__, isinstance(w, DTensor) and w.to_local().shape[0] * 2 == w.shape[0]))

            for table in (hf.get_input_embeddings(), hf.get_output_embeddings()):
                table.register_forward_hook(sharded)
            self.kinds = [type(hf.get_input_embeddings()).__name__, type(hf.get_output_embeddings()).__name__]

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == 1 and trainer.current_epoch == 0:
                self.exchanges_before = len(exchanges)
            if batch_idx == 1 and trainer.current_epoch == 0:  # one whole step profiled: FSDP2 names each all-gather after its unit
                self.profile = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
                self.profile.__enter__()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.losses.append(float(outputs["loss"]))
            if batch_idx == 1 and trainer.current_epoch == 0:
                self.exchanges = len(exchanges) - self.exchanges_before
            if self.profile is not None:
                self.profile.__exit__(None, None, None)
                self.gathers = {e.key.removeprefix("FSDP::all_gather").strip() or "(root)": e.count for e in self.profile.key_averages()
                                if e.key == "FSDP::all_gather" or e.key.startswith("FSDP::all_gather (")}
                self.profile = None

        def on_train_end(self, trainer, pl_module):
            pl_module.eval()
            with torch.no_grad():
                self.completion = pl_module.generate(["the quick brown fox"])  # every rank generates (a collective here)
            pl_module.train()

        def on_fit_end(self, trainer, pl_module):
            from lightning_nf4.strategies.fsdp import full_trainable_state

            torch.save({"losses": self.losses, "before": pl_module.perplexity_before, "after": pl_module.perplexity_after,
                        "trainable": full_trainable_state(pl_module), "gathers": self.gathers, "kinds": self.kinds,
                        "sharded_in_forward": self.sharded_in_forward, "completion": self.completion,
                        "count_exchanges": self.exchanges},
                       out / f"rank{trainer.global_rank}.pt")

    from lightning_nf4.strategies import vocab_parallel as vp

    exchanges: list[int] = []  # token-count exchanges (a host-side wait on the other rank each)
    exchange = vp._counts

    def counted(n, group, device):
        exchanges.append(n)
        return exchange(n, group, device)

    vp._counts = counted
    pl.seed_everything(0)
    module = CausalLMModule(model_dir, compute_dtype="float32", loss=loss, loss_chunk_size=16, learning_rate=1e-2, max_new_tokens=4)
    setting = {"true": True, "false": False}.get(vocab_parallel, vocab_parallel)
    strategy = NF4FSDPStrategy(timeout=timedelta(seconds=120), vocab_parallel=setting)
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy=strategy, max_epochs=2, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False, num_sanity_val_steps=0,
        plugins=NF4Precision(compute_dtype=torch.float32),
        callbacks=[LoRACallback(r=4, alpha=8, dropout=0.0, save_dir=str(out / "export"), export_merged=True), Record()],
    )
    trainer.fit(module, datamodule=Data(2))


isolated.end_process_groups_at_exit()


if __name__ == "__main__":
    out_dir = Path(sys.argv[3] if sys.argv[1] == "fit" else sys.argv[2])
    out_dir.mkdir(parents=True, exist_ok=True)
    if sys.argv[1] == "ops":
        import torch.multiprocessing as mp

        port = 29500 + os.getpid() % 2000
        mp.spawn(ops, args=(str(out_dir), port), nprocs=2)
    else:
        fit(sys.argv[2], out_dir, sys.argv[4], sys.argv[5])
