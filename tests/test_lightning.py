"""NF4Precision + LoRACallback through the real Lightning Trainer, on CPU."""

import os

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from lightning_nf4 import LoRACallback, NF4Linear, NF4Precision
from lightning_nf4.plugins import NF4PrecisionError
from tests.lightning_models import CausalLM, Regressor, regression_loader, tiny_llama, token_loader


def trainer(tmp_path=None, **kw):
    defaults = dict(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, max_epochs=2, default_root_dir=str(tmp_path) if tmp_path else None,
    )
    defaults.update(kw)
    return pl.Trainer(**defaults)


def nf4_snapshot(module):
    return {n: (m.weight.detach().clone(), m.quant.absmax.clone()) for n, m in module.named_modules() if isinstance(m, NF4Linear)}


@torch.no_grad()
def lm_loss(module, loader):
    module.eval()
    losses = [module.model(input_ids=ids, labels=ids).loss for (ids,) in loader]
    module.train()
    return torch.stack(losses).mean().item()


def test_qlora_fit_trains_only_adapters(tmp_path):
    model = CausalLM(lr=1e-2)
    t = trainer(tmp_path, max_epochs=4, plugins=NF4Precision(), callbacks=[LoRACallback(r=4, alpha=8, dropout=0.0)])
    loader = token_loader()
    t.fit(model, loader)
    snapshot_after = nf4_snapshot(model)
    assert len(snapshot_after) == 14  # 2 layers x 7 projections; lm_head stays float
    assert isinstance(model.model.lm_head, nn.Linear) and not model.model.lm_head.weight.requires_grad
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if n in trainable)
    # base weights are bit-identical to a fresh quantization of the same initial weights
    reference = nf4_snapshot(_converted(CausalLM()))
    assert reference.keys() == {k.replace(".base_layer", "") for k in snapshot_after}
    for name, (packed, absmax) in snapshot_after.items():
        ref_packed, ref_absmax = reference[name.replace(".base_layer", "")]
        assert torch.equal(packed, ref_packed) and torch.equal(absmax, ref_absmax), name
    # the LoRA-B matrices moved away from their zero init, and the loss went down: against the same model
    # converted but untrained, which is what the LoRA-initialised model computes (B = 0)
    assert any(p.abs().sum() > 0 for n, p in model.named_parameters() if ".lora_B." in n)
    fresh = _converted(CausalLM())
    assert lm_loss(model, loader) < lm_loss(fresh, loader) - 0.5


def _converted(module):
    NF4Precision().convert_module(module)
    return module


def test_plain_sequential_module(tmp_path):
    model = Regressor()
    t = trainer(tmp_path, max_epochs=15, plugins=NF4Precision(compute_dtype=torch.float32), callbacks=[LoRACallback(r=8, alpha=16, dropout=0.0)])
    loader = regression_loader()
    x, y = next(iter(loader))
    with torch.no_grad():
        start = nn.functional.mse_loss(NF4Precision(compute_dtype=torch.float32).convert_module(Regressor())(x), y).item()
    t.fit(model, loader)
    assert all(isinstance(model.net[i].base_layer, NF4Linear) for i in (0, 2, 4))
    with torch.no_grad():
        end = nn.functional.mse_loss(model(x).float(), y).item()
    assert end < 0.5 * start


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_compute_dtypes(tmp_path, dtype):
    model = CausalLM(lr=1e-3)
    precision = NF4Precision(compute_dtype=dtype)
    t = trainer(tmp_path, max_steps=2, plugins=precision, callbacks=[LoRACallback(r=2, alpha=4)])
    t.fit(model, token_loader(n=8))
    assert torch.isfinite(t.callback_metrics["train_loss"])
    assert all(m.compute_dtype == dtype for m in model.modules() if isinstance(m, NF4Linear))
    assert (precision.scaler is not None) == (dtype == torch.float16)
    if precision.scaler is not None:
        assert precision.scaler._device == "cpu"  # built for the device the trainer trains on
    with precision.forward_context():
        out = model(next(iter(token_loader(n=4)))[0])
    assert out.dtype == (torch.float32 if dtype == torch.float32 else dtype)


def test_the_fp16_grad_scaler_keeps_its_scale_from_one_fit_to_the_next(tmp_path):
    """A second ``fit`` of the same trainer (more steps) started from a fresh GradScaler at 65536, redoing the
    overflowing steps that had brought the scale down; Lightning's own fp16 plugin keeps its scaler."""
    model, precision = CausalLM(lr=1e-3), NF4Precision(compute_dtype=torch.float16)
    t = trainer(tmp_path, max_steps=3, plugins=precision, callbacks=[LoRACallback(r=2, alpha=4)])
    t.fit(model, token_loader(n=16))
    scaler, scale = precision.scaler, precision.scaler.get_scale()
    precision.scaler.update(scale / 8)  # where overflowing steps would have brought it
    t.fit_loop.epoch_loop.max_steps = 4
    t.fit(model, token_loader(n=16))
    assert precision.scaler is scaler and precision.scaler.get_scale() <= scale / 8


def test_checkpoint_is_small_and_resume_is_exact(tmp_path):
    loader = token_loader()

    def run(max_epochs, ckpt_path=None, save=False):
        model = CausalLM(lr=1e-2)
        callbacks = [LoRACallback(r=4, alpha=8, dropout=0.0)]
        if save:
            callbacks.append(ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_epochs=1))
        t = trainer(tmp_path, max_epochs=max_epochs, plugins=NF4Precision(), callbacks=callbacks, enable_checkpointing=save)
        t.fit(model, loader, ckpt_path=ckpt_path)
        return model

    straight = run(4)
    run(2, save=True)
    last = tmp_path / "ckpt" / "last.ckpt"
    ckpt = torch.load(last, weights_only=False)
    assert all(".lora_" in k for k in ckpt["state_dict"])
    adapter_bytes = sum(v.numel() * v.element_size() for v in ckpt["state_dict"].values())
    # adapters + two AdamW moments + loop state; far below the base model
    assert os.path.getsize(last) < 3 * adapter_bytes + 100_000
    resumed = run(4, ckpt_path=str(last))
    a = {n: p for n, p in straight.named_parameters() if p.requires_grad}
    b = {n: p for n, p in resumed.named_parameters() if p.requires_grad}
    assert a.keys() == b.keys()
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=0, atol=0, msg=n)


def test_resume_with_wrong_rank_fails_clearly(tmp_path):
    model = CausalLM()
    t = trainer(tmp_path, max_epochs=1, plugins=NF4Precision(), callbacks=[LoRACallback(r=4)])
    t.fit(model, token_loader(n=4))
    t.save_checkpoint(tmp_path / "r4.ckpt")
    other = trainer(tmp_path, max_epochs=2, plugins=NF4Precision(), callbacks=[LoRACallback(r=8)])
    with pytest.raises(RuntimeError, match="size mismatch|does not fit"):
        other.fit(CausalLM(), token_loader(n=4), ckpt_path=str(tmp_path / "r4.ckpt"))


def test_exports_open_in_peft_and_transformers(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = CausalLM(lr=1e-2)
    t = trainer(tmp_path, max_epochs=3, plugins=NF4Precision(compute_dtype=torch.float32),
                callbacks=[LoRACallback(r=4, alpha=8, dropout=0.0, save_dir=str(tmp_path / "export"))])
    t.fit(model, token_loader())
    adapter, merged = tmp_path / "export" / "adapter", tmp_path / "export" / "merged"
    assert sorted(os.listdir(adapter)) == ["adapter_config.json", "adapter_model.safetensors"]
    assert not [p for p in os.listdir(tmp_path / "export") if p.startswith(".")]  # no temporary leftovers

    ids = next(iter(token_loader(n=4)))[0]
    model.eval()
    with torch.no_grad():
        ours = model(ids).float()
        peft_model = PeftModel.from_pretrained(tiny_llama(), str(adapter)).eval()
        via_peft = peft_model(input_ids=ids).logits
        via_merged = AutoModelForCausalLM.from_pretrained(str(merged)).eval()(input_ids=ids).logits
        float_base = tiny_llama().eval()(input_ids=ids).logits
    # merged = dequantized base + delta: equal to ours up to float rounding
    torch.testing.assert_close(via_merged, ours, atol=1e-4, rtol=1e-4)
    # the float base carries no NF4 error: close, within what NF4 costs (measured against the base alone)
    nf4_gap = (via_peft - ours).abs().mean()
    assert nf4_gap < 0.1 * ours.abs().mean()
    assert (via_peft - float_base).abs().mean() > nf4_gap  # the adapter itself made a difference


def test_convert_module_is_idempotent_and_skips_lm_head():
    module = CausalLM()
    precision = NF4Precision()
    precision.convert_module(module)
    first = nf4_snapshot(module)
    precision.convert_module(module)
    assert nf4_snapshot(module).keys() == first.keys()
    assert type(module.model.lm_head) is nn.Linear
    custom = NF4Precision(skip_modules=("lm_head", "re:.*mlp\\..*"))
    other = CausalLM()
    custom.convert_module(other)
    assert type(other.model.model.layers[0].mlp.up_proj) is nn.Linear
    assert isinstance(other.model.model.layers[0].self_attn.q_proj, NF4Linear)


def test_bad_configurations_fail_clearly(tmp_path):
    with pytest.raises(NF4PrecisionError, match="compute_dtype must be"):
        NF4Precision(compute_dtype=torch.int8)
    with pytest.raises(ValueError, match="precision"):
        pl.Trainer(accelerator="cpu", precision="bf16-mixed", plugins=NF4Precision(), logger=False)

    class NoLinear(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(4, 4)

    with pytest.raises(NF4PrecisionError, match="no nn.Linear layer to quantize"):
        NF4Precision().convert_module(NoLinear())

    class GreedyOptimizer(Regressor):
        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    with pytest.raises(NF4PrecisionError, match="optimizer holds the frozen NF4 weights"):
        trainer(tmp_path, max_steps=1, plugins=NF4Precision(), callbacks=[LoRACallback(r=2)]).fit(GreedyOptimizer(), regression_loader())
    with pytest.raises(ValueError, match="matched no linear layer"):
        trainer(tmp_path, max_steps=1, plugins=NF4Precision(), callbacks=[LoRACallback(target_modules=["nope"])]).fit(Regressor(), regression_loader())
    with pytest.raises(ValueError, match="rank r must be"):
        LoRACallback(r=0)


def test_configure_model_builds_are_converted_then_wrapped(tmp_path):
    class Lazy(CausalLM):
        def __init__(self):
            pl.LightningModule.__init__(self)
            self.model = None
            self.lr = 1e-2

        def configure_model(self):
            if self.model is None:
                self.model = tiny_llama()

    model = Lazy()
    t = trainer(tmp_path, max_steps=2, plugins=NF4Precision(), callbacks=[LoRACallback(r=2, alpha=4)])
    t.fit(model, token_loader(n=8))
    q_proj = model.model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj.base_layer, NF4Linear)
    assert next(p for n, p in model.named_parameters() if ".lora_A." in n).requires_grad


def test_bf16_lora_without_nf4(tmp_path):
    model = Regressor()
    t = trainer(tmp_path, max_steps=3, precision="bf16-mixed", callbacks=[LoRACallback(r=2)])
    t.fit(model, regression_loader())
    assert type(model.net[0].base_layer) is nn.Linear and not model.net[0].base_layer.weight.requires_grad
