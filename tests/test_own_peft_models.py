"""A model the user wrapped with PEFT before training (``get_peft_model`` in ``__init__``), trained by LoRACallback:
the exports describe that model's own adapter. Its LoraConfig's rsLoRA scaling, per-layer ranks, dropout, modules
trained in full and base-rewriting init reach the adapter folder, so PEFT loads it as trained; what the folder cannot
hold is refused before training, as is running another adapter than the callback's. Each of these was exported
wrong, silently, before (the adapter loaded as another model than the merged one)."""

import json
import shutil

import lightning.pytorch as pl
import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM

from lightning_nf4 import LoRACallback, NF4Linear, NF4Precision
from lightning_nf4.layers.lora import lora_config
from tests.lightning_models import CausalLM, tiny_llama, token_loader

IDS = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(3))


def _fit(module: pl.LightningModule, callback: LoRACallback, tmp_path, steps: int = 3) -> None:
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, max_steps=steps, default_root_dir=str(tmp_path),
                         plugins=NF4Precision(compute_dtype=torch.float32), callbacks=[callback])
    trainer.fit(module, token_loader(n=8))


def _float_base(make=tiny_llama) -> nn.Module:
    """The float network the NF4 model stands for: tiny_llama with each quantized linear's weight dequantized."""
    model = make()
    with torch.no_grad():
        for name, layer in model.named_modules():
            if type(layer) is nn.Linear and name != "lm_head":
                layer.weight.copy_(NF4Linear.from_linear(layer, 64, True, torch.float32).dequantize(torch.float32))
    return model.eval()


def _biased_llama(seed: int = 0) -> nn.Module:
    """tiny_llama with a bias on every projection (Qwen2's attention has them)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False, attention_bias=True, mlp_bias=True,
    ))


def _logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def test_the_adapter_of_a_peft_wrapped_model_loads_as_trained(tmp_path):
    """rsLoRA (scaling alpha/sqrt(r)), a rank pattern, the model's own dropout and PEFT's own ``modules_to_save``:
    the adapter folder, opened by PEFT on the float base, gives the trained model's logits."""
    own = lora_config(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], use_rslora=True,
                      rank_pattern={"v_proj": 2}, modules_to_save=["lm_head"])
    module = CausalLM(get_peft_model(tiny_llama(), own))
    _fit(module, LoRACallback(r=4, alpha=8, save_dir=str(tmp_path / "export")), tmp_path)  # the callback's dropout: 0.05
    trained = _logits(module.model.eval())

    folder = tmp_path / "export" / "adapter"
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["use_rslora"] is True and config["rank_pattern"] == {"v_proj": 2} and config["lora_dropout"] == 0.0
    assert config["modules_to_save"] == ["lm_head"]
    loaded = PeftModel.from_pretrained(_float_base(), str(folder)).eval()
    assert not torch.equal(_logits(_float_base()), trained)  # training moved it
    torch.testing.assert_close(_logits(loaded), trained, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("settings, trained", [
    ({"bias": "all"}, {"q_proj.base_layer.bias", "k_proj.bias", "down_proj.bias"}),
    ({"bias": "lora_only"}, {"q_proj.base_layer.bias", "v_proj.base_layer.bias"}),
    ({"lora_bias": True}, {"q_proj.lora_B.bias", "v_proj.lora_B.bias"}),
], ids=["all", "lora_only", "lora_bias"])
def test_the_biases_a_peft_wrapped_model_trains_are_exported(tmp_path, settings, trained):
    """PEFT's ``bias="all"`` / ``"lora_only"`` (base biases trained, on quantized layers too) and ``lora_bias`` (a
    bias on lora_B): the folder holds them by PEFT's names and its config says so, so PEFT loads the trained model."""
    own = lora_config(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], **settings)
    module = CausalLM(get_peft_model(_biased_llama(), own))
    start = {n: p.detach().clone() for n, p in module.model.named_parameters() if "bias" in n}
    _fit(module, LoRACallback(r=4, alpha=8, save_dir=str(tmp_path / "export")), tmp_path)
    trained_logits = _logits(module.model.eval())
    moved = {n.split("layers.0.", 1)[-1].split(".", 1)[-1].replace(".default", "")
             for n, p in module.model.named_parameters() if n in start and not torch.equal(p, start[n])}
    assert trained <= moved, moved  # the biases trained, on NF4 layers (q_proj) as on float ones (k_proj)

    folder = tmp_path / "export" / "adapter"
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["bias"] == settings.get("bias", "none") and config["lora_bias"] == settings.get("lora_bias", False)
    loaded = PeftModel.from_pretrained(_float_base(_biased_llama), str(folder)).eval()
    torch.testing.assert_close(_logits(loaded), trained_logits, atol=1e-4, rtol=1e-4)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "export" / "merged").eval()  # transformers' own, in float
    torch.testing.assert_close(_logits(merged), trained_logits, atol=1e-4, rtol=1e-4)
    # the biases carry part of what was trained: the folder without them loads as another model
    shutil.copytree(folder, tmp_path / "unbiased")
    tensors = load_file(folder / "adapter_model.safetensors")
    save_file({k: v for k, v in tensors.items() if not k.endswith(".bias")}, tmp_path / "unbiased" / "adapter_model.safetensors")
    unbiased = PeftModel.from_pretrained(_float_base(_biased_llama), str(tmp_path / "unbiased")).eval()
    assert (_logits(unbiased) - trained_logits).abs().max() > 1e-3


def test_a_base_rewriting_init_is_recorded_for_peft_to_repeat(tmp_path):
    """OLoRA rewrites the base at init (PEFT on the float base repeats it as it loads the adapter): the config says so."""
    module = CausalLM(get_peft_model(tiny_llama(), lora_config(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights="olora")))
    LoRACallback(r=4, alpha=8).save_adapter(module, tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["init_lora_weights"] == "olora"


def _own(**settings):
    settings = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], **settings}
    return lambda: get_peft_model(tiny_llama(), lora_config(**settings))


def _another_adapter_active():
    model = _own()()
    model.add_adapter("other", lora_config(r=4, lora_alpha=8, target_modules=["q_proj"]))
    model.set_adapter("other")
    return model


@pytest.mark.parametrize("make, match", [
    (_own(trainable_token_indices=[1, 2]), r"sets trainable_token_indices=\[1, 2\]"),
    (_own(layer_replication=[[0, 2], [1, 2]]), r"sets layer_replication"),
    (_own(rank_pattern={"v_proj": 2}, r=2), r"with r=2, lora_alpha=8, but LoRACallback has r=4, alpha=8.*LoRACallback\(r=2, alpha=8\)"),
    (lambda: get_peft_model(tiny_llama(), lora_config(r=4, lora_alpha=8, target_modules=[], target_parameters=["q_proj.weight"])),
     r"target_parameters LoRA on a linear that NF4Precision quantizes"),
    (_another_adapter_active, r"runs LoRA adapter\(s\) \['other'\], but LoRACallback trains and exports 'default'"),
], ids=["trainable_tokens", "layer_replication", "rank", "target_parameters", "other_adapter"])
def test_what_the_adapter_folder_cannot_hold_is_refused_before_training(tmp_path, make, match):
    module = CausalLM(make())
    with pytest.raises(ValueError, match=match):
        _fit(module, LoRACallback(r=4, alpha=8, save_dir=str(tmp_path / "export")), tmp_path)
    assert not any(isinstance(m, NF4Linear) for m in module.modules())  # refused before quantizing: the float model is whole
