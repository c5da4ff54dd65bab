"""``linear_cross_entropy`` and ``causal_lm_loss``: the same loss and gradients as the plain logits path (fp32
to float rounding, bf16 to bf16 rounding), ignore_index and all-ignored batches, memory that stays
O(chunk x vocab) (measured on CPU by counting the live tensors every op makes, and the tensors saved for
backward), the HF glue (tied heads, trained heads, LoRA on lm_head, FSDP2 in two gloo processes), and
liger-kernel's fused kernel where it is installed (under Triton's interpreter on CPU)."""

import os
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from lightning_nf4 import LoRACallback, NF4Precision
from lightning_nf4.losses import (
    LinearCrossEntropyError,
    causal_lm_loss,
    chunked_loss_unsupported,
    default_chunk_size,
    linear_cross_entropy,
)
from tests.lightning_models import tiny_llama
from tests import isolated

ROOT = Path(__file__).resolve().parents[1]


def _case(n=150, h=32, v=500, dtype=torch.float32, weight_grad=True, bias=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=g) * 0.3).to(dtype).requires_grad_(weight_grad)
    b = (torch.randn(v, generator=g) * 0.1).to(dtype).requires_grad_() if bias else None
    labels = torch.randint(0, v, (n,), generator=g)
    labels[::5] = -100
    return hidden, weight, b, labels


def _grads(loss, *tensors):
    return torch.autograd.grad(loss, [t for t in tensors if t is not None and t.requires_grad])


def _close_to_bf16(got, want):
    """bf16 tolerance: each value within 2^-6 (1.6%) of the largest magnitude of the plain result."""
    scale = want.float().abs().max()
    torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=float(scale) * 2**-6)


# -- the tensor-level helper ---------------------------------------------------------------------------
@pytest.mark.parametrize("chunk_size", [1, 37, 64, 1000])  # one token, uneven, even, one chunk
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_fp32_matches_cross_entropy(chunk_size, bias, reduction):
    hidden, weight, b, labels = _case(bias=bias)
    want = F.cross_entropy(F.linear(hidden, weight, b), labels, reduction=reduction)
    got = linear_cross_entropy(hidden, weight, labels, bias=b, reduction=reduction, chunk_size=chunk_size, backend="chunked")
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    for a, w in zip(_grads(got, hidden, weight, b), _grads(want, hidden, weight, b)):
        torch.testing.assert_close(a, w, rtol=1e-5, atol=1e-6)


def test_shift_is_hugging_face_shift_and_frozen_weight_gets_no_gradient():
    hidden, weight, _, labels = _case(n=4 * 30, weight_grad=False)
    hidden3, labels2 = hidden.reshape(4, 30, -1), labels.reshape(4, 30)
    got = linear_cross_entropy(hidden3, weight, labels2, shift=True, chunk_size=16)
    logits = F.linear(hidden3, weight)
    want = F.cross_entropy(logits[:, :-1].reshape(-1, weight.shape[0]), labels2[:, 1:].reshape(-1))
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    (g,) = torch.autograd.grad(got, hidden3)
    (w,) = torch.autograd.grad(want, hidden3)
    torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7)
    assert weight.grad is None


@pytest.mark.parametrize("dtype", ["bfloat16", "autocast"])
def test_bf16_matches_to_bf16_rounding(dtype):
    low = dtype == "bfloat16"
    hidden, weight, _, labels = _case(n=300, h=64, v=1000, dtype=torch.bfloat16 if low else torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=not low):
        want = F.cross_entropy(F.linear(hidden, weight).float(), labels)
        got = linear_cross_entropy(hidden, weight, labels, chunk_size=64, backend="chunked")
    # the logits are the same bf16 matmul; only the fp32 sums run in another order
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    got_grads, want_grads = _grads(got, hidden, weight), _grads(want, hidden, weight)
    for a, w in zip(got_grads, want_grads):
        assert a.dtype == w.dtype
        _close_to_bf16(a, w)


def test_all_ignored_is_zero_without_nan():
    hidden, weight, _, labels = _case()
    labels[:] = -100
    loss = linear_cross_entropy(hidden, weight, labels, chunk_size=32)
    assert loss.item() == 0.0
    gh, gw = _grads(loss, hidden, weight)
    assert torch.isfinite(gh).all() and gh.abs().max() == 0 and gw.abs().max() == 0
    assert torch.isnan(F.cross_entropy(F.linear(hidden, weight), labels))  # what the plain mean gives


def test_no_grad_computes_no_gradient():
    hidden, weight, _, labels = _case()
    with torch.no_grad():
        loss = linear_cross_entropy(hidden, weight, labels, chunk_size=32)
    assert loss.grad_fn is None
    torch.testing.assert_close(loss, F.cross_entropy(F.linear(hidden, weight), labels).detach(), rtol=1e-6, atol=1e-6)


def test_bad_input_is_named():
    hidden, weight, _, labels = _case()
    with pytest.raises(LinearCrossEntropyError, match="agree on H"):
        linear_cross_entropy(hidden, weight[:, :5], labels)
    with pytest.raises(LinearCrossEntropyError, match="labels must have hidden's shape"):
        linear_cross_entropy(hidden, weight, labels[:-1])
    with pytest.raises(LinearCrossEntropyError, match="integer class indices"):
        linear_cross_entropy(hidden, weight, labels.float())
    with pytest.raises(LinearCrossEntropyError, match="reduction must be 'mean' or 'sum'"):
        linear_cross_entropy(hidden, weight, labels, reduction="none")
    with pytest.raises(LinearCrossEntropyError, match="chunk_size must be a positive"):
        linear_cross_entropy(hidden, weight, labels, chunk_size=0)
    with pytest.raises(LinearCrossEntropyError, match="backend must be"):
        linear_cross_entropy(hidden, weight, labels, backend="triton")
    assert default_chunk_size(128256) == 256 and default_chunk_size(32000) == 1024 and default_chunk_size(2**22) == 8


# -- memory, counted on CPU -------------------------------------------------------------------------------
class LiveBytes(TorchDispatchMode):
    """Peak bytes of the tensors that ops create while the mode is on (forward and backward), each storage
    counted from the op that made it until it is freed."""

    def __init__(self) -> None:
        super().__init__()
        self.refs: dict[int, tuple[StorageWeakRef, int]] = {}
        self.now = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        for key, (ref, size) in list(self.refs.items()):
            if ref.expired():
                del self.refs[key]
                self.now -= size
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                ref = StorageWeakRef(storage)
                if ref.cdata not in self.refs and storage.nbytes():
                    self.refs[ref.cdata] = (ref, storage.nbytes())
                    self.now += storage.nbytes()
                    self.peak = max(self.peak, self.now)
        return out


def test_peak_memory_stays_at_a_chunk():
    n, h, v, chunk = 512, 64, 32000, 64
    hidden, weight, _, labels = _case(n=n, h=h, v=v, weight_grad=False)
    logits_bytes, chunk_bytes = n * v * 4, chunk * v * 4

    def peak(fn) -> int:
        hidden.grad = None
        with LiveBytes() as mode:
            fn().backward()
        return mode.peak

    plain = peak(lambda: F.cross_entropy(F.linear(hidden, weight), labels))
    chunked = peak(lambda: linear_cross_entropy(hidden, weight, labels, chunk_size=chunk, backend="chunked"))
    assert plain >= 2 * logits_bytes  # logits and their log-softmax (then the gradient) are whole
    assert chunked <= 4 * chunk_bytes + 2 * n * h * 4  # a few chunk-sized buffers, and the hidden-sized gradient
    assert chunked * 5 < plain


def test_saved_for_backward_is_hidden_sized():
    n, h, v = 256, 32, 8000

    def saved(fn, weight_grad):
        hidden, weight, _, labels = _case(n=n, h=h, v=v, weight_grad=weight_grad)
        sizes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
            fn(hidden, weight, labels)
        return max(sizes)

    assert saved(lambda hs, w, y: F.cross_entropy(F.linear(hs, w), y), False) >= n * v
    assert saved(lambda hs, w, y: linear_cross_entropy(hs, w, y, chunk_size=32), False) == n * h  # the input gradient
    assert saved(lambda hs, w, y: linear_cross_entropy(hs, w, y, chunk_size=32), True) == v * h  # and the weight's


# -- liger-kernel -------------------------------------------------------------------------------------------
LIGER_CHECK = """
import torch, torch.nn.functional as F
from lightning_nf4.losses import linear_cross_entropy
torch.manual_seed(0)
hidden = torch.randn(40, 16, requires_grad=True); weight = (torch.randn(70, 16) * 0.3).requires_grad_()
labels = torch.randint(0, 70, (40,)); labels[::3] = -100
for reduction in ("mean", "sum"):
    got = linear_cross_entropy(hidden, weight, labels, reduction=reduction, backend="liger")
    want = F.cross_entropy(F.linear(hidden, weight), labels, reduction=reduction)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for a, b in zip(torch.autograd.grad(got, (hidden, weight)), torch.autograd.grad(want, (hidden, weight))):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
labels[:] = -100
loss = linear_cross_entropy(hidden, weight, labels, backend="liger")
assert loss.item() == 0.0 and torch.isfinite(torch.autograd.grad(loss, hidden)[0]).all()
print("liger matches")
"""


@pytest.mark.timeout(360)  # its subprocess stops at 300 s
def test_liger_backend_matches_under_the_triton_interpreter():
    pytest.importorskip("liger_kernel.transformers.functional")
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = isolated.run([sys.executable, "-c", LIGER_CHECK], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "liger matches" in done.stdout


def test_liger_backend_without_liger_names_the_install(monkeypatch):
    import lightning_nf4.losses as losses

    monkeypatch.setattr(losses, "liger_available", lambda: False)
    hidden, weight, _, labels = _case()
    with pytest.raises(LinearCrossEntropyError, match="pip install liger-kernel"):
        linear_cross_entropy(hidden, weight, labels, backend="liger")
    linear_cross_entropy(hidden, weight, labels)  # "auto" falls back to the chunked path


# -- a Hugging Face causal LM ----------------------------------------------------------------------------------
def _llm(tied=False, train_head=False, lora_targets=("q_proj", "v_proj", "down_proj"), compute=torch.float32):
    torch.manual_seed(0)
    model = tiny_llama()
    if tied:
        model.config.tie_word_embeddings = True
        model.lm_head.weight = model.model.embed_tokens.weight
    NF4Precision(compute_dtype=compute).convert_module(model)
    LoRACallback(r=4, alpha=8, dropout=0.0, target_modules=list(lora_targets)).inject(model)
    with torch.no_grad():  # LoRA B starts at zero; give it values so its gradient paths carry something
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    model.lm_head.weight.requires_grad_(train_head)
    return model


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 128, (3, 20), generator=g)
    labels = ids.clone()
    labels[:, :6] = -100
    mask = torch.ones_like(ids)
    mask[2, 15:] = 0
    labels[2, 15:] = -100
    return ids, labels, mask


@pytest.mark.parametrize("tied,train_head", [(False, False), (False, True), (True, True)])
@pytest.mark.parametrize("compute", ["float32", "bfloat16"])
def test_causal_lm_loss_matches_the_model_loss(tied, train_head, compute):
    dtype = getattr(torch, compute)
    model = _llm(tied=tied, train_head=train_head, compute=dtype)
    assert chunked_loss_unsupported(model) is None
    ids, labels, mask = _batch()
    params = [p for p in model.parameters() if p.requires_grad]
    results = {}
    for mode in ("plain", "chunked"):
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            loss = causal_lm_loss(model, ids, labels, mask, mode=mode, chunk_size=8)
        results[mode] = (loss.detach(), torch.autograd.grad(loss, params))
    (loss_p, grads_p), (loss_c, grads_c) = results["plain"], results["chunked"]
    if dtype == torch.float32:
        torch.testing.assert_close(loss_c, loss_p, rtol=1e-6, atol=1e-6)
        for a, b in zip(grads_c, grads_p):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    else:
        torch.testing.assert_close(loss_c, loss_p, rtol=1e-3, atol=1e-3)
        for a, b in zip(grads_c, grads_p):
            _close_to_bf16(a, b)
    if train_head:  # the head's weight gradient went through the chunked loss (and, tied, the embedding's with it)
        head = [g for p, g in zip(params, grads_c) if p is model.lm_head.weight]
        assert len(head) == 1 and head[0].abs().sum() > 0


def test_lora_on_lm_head_takes_the_plain_path():
    model = _llm(lora_targets=("q_proj", "lm_head"))
    assert "not a plain nn.Linear" in chunked_loss_unsupported(model)
    ids, labels, mask = _batch()
    with pytest.warns(UserWarning, match="takes the plain loss path"):
        loss = causal_lm_loss(model, ids, labels, mask)
    assert torch.equal(loss, model(input_ids=ids, attention_mask=mask, labels=labels).loss)


def test_logit_transforms_take_the_plain_path():
    model = tiny_llama()
    model.config.final_logit_softcapping = 30.0
    assert "final_logit_softcapping=30.0" in chunked_loss_unsupported(model)

    class Scaled(type(tiny_llama())):  # a head the config does not announce: found by comparing the logits once
        def forward(self, *args, logits_to_keep=0, **kwargs):
            out = super().forward(*args, logits_to_keep=logits_to_keep, **kwargs)
            out.logits = out.logits * 0.5
            if out.loss is not None:
                out.loss = F.cross_entropy(out.logits[:, :-1].flatten(0, 1).float(), kwargs["labels"][:, 1:].flatten())
            return out

    scaled = Scaled(tiny_llama().config)
    ids, labels, mask = _batch()
    with pytest.warns(UserWarning, match="not lm_head"):
        loss = causal_lm_loss(scaled, ids, labels, mask)
    want = scaled(input_ids=ids, attention_mask=mask, labels=labels).loss
    torch.testing.assert_close(loss, want, rtol=0, atol=0)
    assert "not lm_head" in chunked_loss_unsupported(scaled)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once
        causal_lm_loss(scaled, ids, labels, mask)


# -- CausalLMModule -------------------------------------------------------------------------------------------
def _validate(model_dir, loss, compute="bfloat16"):
    import lightning.pytorch as pl

    from lightning_nf4.models import CausalLMModule
    from tests.losses_fsdp_worker import batches

    module = CausalLMModule(str(model_dir), compute_dtype=compute, loss=loss, loss_chunk_size=16)
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                         plugins=NF4Precision(compute_dtype=getattr(torch, compute)), callbacks=[LoRACallback(r=4, alpha=8)])
    (metrics,) = trainer.validate(module, torch.utils.data.DataLoader(batches(), batch_size=4), verbose=False)
    return metrics["val_perplexity"]


def save_shardable_llama(path: Path) -> Path:
    """A tiny untied Llama whose every NF4 layer splits into whole scale groups on two ranks, with a tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.test_cli import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    tokenizer.save_pretrained(path)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=320, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_shardable_llama(tmp_path_factory.mktemp("shardable-llama"))


def test_module_validation_perplexity_is_unchanged(model_dir):
    from lightning_nf4.models import CausalLMModule

    plain, chunked = _validate(model_dir, "plain"), _validate(model_dir, "chunked")
    assert abs(chunked / plain - 1) < 2e-3, (plain, chunked)  # the same bf16 logits, fp32 sums in another order
    with pytest.raises(ValueError, match="loss must be 'chunked' or 'plain'"):
        CausalLMModule(str(model_dir), loss="fused")


@pytest.mark.timeout(700)  # six two-rank runs, two at a time, each stopped at 200 s
def test_module_under_fsdp2_matches_the_plain_loss(model_dir, tmp_path):
    """Two gloo ranks each, side by side: the plain loss, the chunked loss with lm_head in the FSDP root (the
    strategy's layout) and with lm_head a unit of its own. lm_head is trained too, so its gradient goes through
    the units the chunked loss gathers again after the forward; and both losses with lm_head frozen, where the
    chunked loss reshards the head before backward. Last, the frozen chunked run where rank 1 alone finds the
    logits unlike lm_head's: both ranks take the plain path together (apart, their collectives would not pair)."""
    worker = ROOT / "tests" / "losses_fsdp_worker.py"
    runs = {"plain": ("plain", "nf4_fsdp"), "chunked": ("chunked", "nf4_fsdp"), "head_unit": ("chunked", "nf4_fsdp_head_unit"),
            "frozen_plain": ("plain", "nf4_fsdp_frozen_head"), "frozen": ("chunked", "nf4_fsdp_frozen_head"),
            "disagree": ("chunked", "nf4_fsdp_frozen_head", "disagree")}
    done = isolated.run_many({name: [sys.executable, str(worker), str(model_dir), str(tmp_path / name), mode, strategy, "2", "2", *rest]
                              for name, (mode, strategy, *rest) in runs.items()}, timeout=200)
    for name, result in done.items():
        assert result.returncode == 0, f"{name}: {isolated.failure(result)}"
    out = {name: [torch.load(tmp_path / name / f"rank{r}.pt") for r in (0, 1)] for name in runs}
    assert out["plain"][0]["unsharded"] == 0
    assert [rank["fell_back"] for rank in out["disagree"]] == [True, True]
    assert not any(rank["fell_back"] for name in ("chunked", "head_unit", "frozen") for rank in out[name])
    for got, want in zip(out["disagree"], out["frozen_plain"]):
        torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(want["losses"]), rtol=1e-5, atol=1e-5)
    for name in ("chunked", "head_unit", "frozen"):
        chunked, plain = out[name], out["frozen_plain" if name == "frozen" else "plain"]
        assert chunked[0]["unsharded"] > 0, name  # the chunked loss gathered FSDP's units itself
        # the head had been resharded after the forward (if this fails, the case is no longer covered)
        assert chunked[0]["resharded"] > 0, f"{name}: the head is no longer resharded after the forward here"
        for c, p in zip(chunked, plain):
            torch.testing.assert_close(torch.tensor(c["losses"]), torch.tensor(p["losses"]), rtol=1e-5, atol=1e-5)
            for when in ("before", "after"):
                assert abs(c[when] / p[when] - 1) < 1e-5, (name, when, c[when], p[when])
        # a frozen head is let go as soon as the loss is computed; a trained one stays gathered for its gradient
        assert (chunked[0]["released"] == len(chunked[0]["losses"])) if name == "frozen" else chunked[0]["released"] == 0, name
        assert ("model.lm_head.weight" in chunked[0]["trainable"]) == (name != "frozen"), name
        for key, value in chunked[0]["trainable"].items():
            assert torch.equal(value, chunked[1]["trainable"][key]), key
            # fp32, four AdamW steps at lr 1e-2: Adam's normalisation magnifies float-rounding differences in tiny gradients
            torch.testing.assert_close(value, plain[0]["trainable"][key], rtol=1e-2, atol=2e-3)


# -- CUDA (run by the GPU lease; skipped here) -------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["chunked", "liger"])
def test_cuda_matches_and_saves_memory(backend):
    from tests.conftest import cuda_or_skip

    device = cuda_or_skip()
    if backend == "liger":
        pytest.importorskip("liger_kernel.transformers.functional")
    n, h, v = 2048, 1024, 32000
    g = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(n, h, device=device, generator=g, dtype=torch.bfloat16).requires_grad_()
    weight = (torch.randn(v, h, device=device, generator=g) * 0.02).to(torch.bfloat16)
    labels = torch.randint(0, v, (n,), device=device, generator=g)
    labels[::7] = -100

    def run(fn):
        hidden.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        loss = fn()
        loss.backward()
        torch.cuda.synchronize()
        return loss.detach(), hidden.grad.clone(), torch.cuda.max_memory_allocated() - base

    with torch.autocast("cuda", dtype=torch.bfloat16):
        want, want_grad, plain_peak = run(lambda: F.cross_entropy(F.linear(hidden, weight).float(), labels))
        got, got_grad, peak = run(lambda: linear_cross_entropy(hidden, weight, labels, chunk_size=256, backend=backend))
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)
    _close_to_bf16(got_grad, want_grad)
    assert peak * 3 < plain_peak, (peak, plain_peak)
