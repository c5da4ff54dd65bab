"""GPT-2's ``Conv1D`` layers (``x @ W + b``, ``W`` stored ``[in, out]``) in NF4: quantized as bitsandbytes quantizes
them (the transposed weight), loaded, converted, trained with LoRA and exported in the float model's own layout."""

import lightning.pytorch as pl
import pytest
import torch
import transformers
from transformers import BitsAndBytesConfig

from lightning_nf4 import LoRACallback, NF4Linear, NF4Precision, quantize_nf4
from lightning_nf4.loading import AutoModelForCausalLM, materialize
from lightning_nf4.plugins.convert import convert_linears
from tests.lightning_models import CausalLM, token_loader

FP32 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
IDS = torch.tensor([[1, 5, 9, 30, 2, 77, 3, 8]])


def tiny_gpt2(seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=64)
    return transformers.GPT2LMHeadModel(config).eval()


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gpt2")
    tiny_gpt2().save_pretrained(folder)
    return folder


def test_a_conv1d_quantizes_its_transposed_weight_and_computes_as_the_float_layer():
    conv = tiny_gpt2().transformer.h[0].attn.c_attn  # [64 in, 192 out]
    layer = NF4Linear.from_linear(conv, compute_dtype=torch.float32, name="c_attn")
    assert (layer.in_features, layer.out_features) == (64, 192) and layer.stored_transposed
    reference = quantize_nf4(conv.weight.detach().t().contiguous(), 64, True)
    assert torch.equal(layer.quant.packed, reference.packed) and torch.equal(layer.quant.absmax, reference.absmax)
    x = torch.randn(3, 5, 64)
    expected = x @ reference.dequantize(torch.float32).t() + conv.bias
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
    # a float state dict in the Conv1D's own layout loads into the NF4 layer to the same bytes
    again = NF4Linear.from_linear(tiny_gpt2(seed=1).transformer.h[0].attn.c_attn, compute_dtype=torch.float32)
    again.load_state_dict(conv.state_dict())
    assert torch.equal(again.quant.packed, reference.packed)


def test_gpt2_loads_into_nf4_as_transformers_float_load_quantized(gpt2_dir, tmp_path):
    """All eight Conv1D projections come out NF4 (as with transformers + bitsandbytes), with the same bytes as the
    float model converted by NF4Precision's conversion; bnb-4bit save and reload and the meta path agree."""
    ours = AutoModelForCausalLM.from_pretrained(gpt2_dir, quantization_config=FP32, progress=False)
    assert sum(isinstance(m, NF4Linear) for m in ours.modules()) == 8
    reference = transformers.AutoModelForCausalLM.from_pretrained(gpt2_dir, dtype=torch.float32).eval()
    convert_linears(reference, compute_dtype=torch.float32)
    for name, layer in ours.named_modules():
        if isinstance(layer, NF4Linear):
            assert torch.equal(layer.quant.packed, reference.get_submodule(name).quant.packed), name
    assert torch.equal(logits(ours), logits(reference))
    float_model = tiny_gpt2()
    error = (logits(ours) - logits(float_model)).norm() / logits(float_model).norm()
    assert 0 < error < 0.1, error  # NF4's error, not a transposed weight's garbage

    ours.save_pretrained(tmp_path / "bnb")
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "bnb", progress=False)), logits(ours))
    deferred = AutoModelForCausalLM.from_pretrained(gpt2_dir, quantization_config=FP32, device="meta", progress=False)
    assert torch.equal(logits(materialize(deferred, "cpu")), logits(ours))


def test_lora_on_gpt2_exports_an_adapter_and_a_merged_model_in_the_float_layout(tmp_path):
    """QLoRA on GPT-2 with NF4Precision and LoRACallback: the merged export is a float GPT-2 (Conv1D weights
    ``[in, out]``) computing what the trained model computes, and the adapter, on the dequantized float base,
    computes it too, merged or not (its config says fan_in_fan_out, as PEFT's Conv1D LoRA needs)."""
    module = CausalLM(tiny_gpt2().train(), lr=1e-2)
    callback = LoRACallback(r=4, alpha=8, dropout=0.0, target_modules=["c_attn", "c_proj", "c_fc"], save_dir=str(tmp_path / "out"))
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, plugins=NF4Precision(compute_dtype=torch.float32), callbacks=[callback])
    trainer.fit(module, token_loader())
    trained = module.model.eval()
    lora_b = [p for n, p in trained.named_parameters() if "lora_B" in n]
    assert len(lora_b) == 8 and all(p.abs().sum() > 0 for p in lora_b)  # every Conv1D got LoRA, and it trained

    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "merged", dtype=torch.float32).eval()
    assert type(merged.transformer.h[0].attn.c_attn).__name__ == "Conv1D"
    torch.testing.assert_close(logits(merged), logits(trained), atol=1e-4, rtol=1e-4)

    from peft import PeftConfig, PeftModel

    assert PeftConfig.from_pretrained(tmp_path / "out" / "adapter").fan_in_fan_out
    base = tiny_gpt2()
    with torch.no_grad():  # the float base the adapter trained on: each Conv1D weight as its NF4 layer dequantizes it
        for name, layer in trained.named_modules():
            if isinstance(layer, NF4Linear):
                base.get_submodule(name.replace(".base_layer", "")).weight.copy_(layer.dequantize(torch.float32).t())
    adapted = PeftModel.from_pretrained(base, tmp_path / "out" / "adapter").eval()
    torch.testing.assert_close(logits(adapted), logits(trained), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(logits(adapted.merge_and_unload()), logits(trained), atol=1e-4, rtol=1e-4)


def test_a_gpt2_that_carries_peft_lora_exports_its_merged_conv1d_weights_the_right_way_round(tmp_path):
    """PEFT's own LoRA on a Conv1D (``fan_in_fan_out``: its delta is ``[in, out]``) around a base NF4Precision then
    quantizes (``[out, in]``): the merged export adds the two the same way round and writes the Conv1D's layout."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_gpt2().train(), LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True))
    module = CausalLM(model, lr=1e-2)
    callback = LoRACallback(r=4, alpha=8, dropout=0.0, target_modules=["c_attn"], save_dir=str(tmp_path / "out"))
    trainer = pl.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, plugins=NF4Precision(compute_dtype=torch.float32), callbacks=[callback])
    trainer.fit(module, token_loader())
    c_attn = model.base_model.model.transformer.h[0].attn.c_attn
    assert isinstance(c_attn.base_layer, NF4Linear) and c_attn.lora_B["default"].weight.abs().sum() > 0
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "merged", dtype=torch.float32).eval()
    torch.testing.assert_close(logits(merged), logits(model.eval()), atol=1e-4, rtol=1e-4)


def test_lora_callback_targets_float_conv1d_layers_too(tmp_path):
    """Without NF4 (the float LoRA baseline: any precision plugin), ``all-linear`` finds GPT-2's Conv1D layers, as
    PEFT's own ``all-linear`` does, and the merged export is the float model with the update added."""
    module = CausalLM(tiny_gpt2().train(), lr=1e-2)
    callback = LoRACallback(r=4, alpha=8, dropout=0.0, save_dir=str(tmp_path / "out"))
    trainer = pl.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[callback])
    trainer.fit(module, token_loader())
    wrapped = [n for n, m in module.model.named_modules() if hasattr(m, "lora_A") and type(m.get_base_layer()).__name__ == "Conv1D"]
    assert len(wrapped) == 8, wrapped
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "merged", dtype=torch.float32).eval()
    torch.testing.assert_close(logits(merged), logits(module.model.eval()), atol=1e-4, rtol=1e-4)
