"""PEFT's own workflows on a model loaded into NF4, against PEFT on the same network in float: merging an adapter
and then exporting or disabling it, ``lora_bias``, merging an adapter some layers lack, and mixed-adapter batches.
Each was wrong here before (an export with the update twice, a "disabled" adapter still applied, a dropped bias)."""

import warnings

import pytest
import torch
import transformers
from peft import LoraConfig, get_peft_model
from transformers import BitsAndBytesConfig

from lightning_nf4.export import save_merged
from lightning_nf4.layers.linear import NF4Linear
from lightning_nf4.layers.lora import lora_config
from lightning_nf4.loading import AutoModelForCausalLM

FP32 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    """A tiny Qwen2: its q/k/v projections have biases (for lora_bias)."""
    path = tmp_path_factory.mktemp("qwen2")
    torch.manual_seed(0)
    config = transformers.Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=256, tie_word_embeddings=False)
    transformers.Qwen2ForCausalLM(config).save_pretrained(path)
    return path


def nf4_model(path):
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=FP32, dtype=torch.float32, progress=False)


def float_twin(path, nf4):
    """The float model with the NF4 model's dequantized weights: the same network, for PEFT's float behaviour."""
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    state = model.state_dict()
    for name, module in nf4.named_modules():
        if isinstance(module, NF4Linear):
            state[name + ".weight"] = module.dequantize(torch.float32)
    model.load_state_dict(state)
    return model


def trained(peft_model, seed=1):
    """Adapters as training leaves them: B (and its bias) away from zero."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    return peft_model.eval()


IDS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def test_a_float_export_after_merge_adapter_holds_the_update_once(qwen_dir, tmp_path):
    """``merge_adapter`` warns and names ``save_merged``; a user who then calls it exported base + 2 x update."""
    model = trained(get_peft_model(nf4_model(qwen_dir), lora_config(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])))
    with pytest.warns(UserWarning, match="re-quantizes"):
        model.merge_adapter()
    merged_nf4 = logits(model)
    exported = transformers.AutoModelForCausalLM.from_pretrained(save_merged(model, tmp_path / "merged"), dtype=torch.float32)
    torch.testing.assert_close(logits(exported), merged_nf4, rtol=0, atol=1e-5)


def test_disabling_merged_adapters_is_refused_not_ignored(qwen_dir):
    """PEFT unmerges before it disables; an NF4 base cannot be unmerged, so the "disabled" model was the adapted one."""
    model = trained(get_peft_model(nf4_model(qwen_dir), lora_config(r=4, lora_alpha=8, target_modules=["q_proj"])))
    with pytest.warns(UserWarning):
        model.merge_adapter()
    with pytest.raises(RuntimeError, match="merged into this NF4 base, so they cannot be switched off"):
        with model.disable_adapter():
            logits(model)


def test_lora_bias_is_merged_as_peft_merges_it(qwen_dir, tmp_path):
    targets = ["q_proj", "k_proj", "v_proj"]
    nf4 = nf4_model(qwen_dir)
    twin = float_twin(qwen_dir, nf4)
    torch.manual_seed(0)  # the same A init for both
    reference = trained(get_peft_model(twin, LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_bias=True)))
    torch.manual_seed(0)
    model = trained(get_peft_model(nf4, lora_config(r=4, lora_alpha=8, target_modules=targets, lora_bias=True)))
    adapted = logits(model)
    torch.testing.assert_close(adapted, logits(reference), rtol=0, atol=1e-5)
    exported = transformers.AutoModelForCausalLM.from_pretrained(save_merged(model, tmp_path / "merged"), dtype=torch.float32)
    torch.testing.assert_close(logits(exported), adapted, rtol=0, atol=1e-5)  # the float export: no re-quantization
    with pytest.warns(UserWarning):
        merged = model.merge_and_unload()
    merged_reference = reference.merge_and_unload()
    for name in ("q_proj", "k_proj", "v_proj"):
        ours, theirs = (getattr(m.model.layers[0].self_attn, name).bias for m in (merged, merged_reference))
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


def test_merging_an_adapter_leaves_layers_without_it_alone(qwen_dir):
    """Merging "b" (on v_proj only) marked q_proj merged too, which then skipped its active, unmerged "default"."""
    model = get_peft_model(nf4_model(qwen_dir), lora_config(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    model.add_adapter("b", lora_config(r=4, lora_alpha=8, target_modules=["v_proj"]))
    trained(model)
    model.base_model.set_adapter(["default", "b"])
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    before = q_proj.get_base_layer().quant.packed.clone()
    with pytest.warns(UserWarning):
        model.merge_adapter(adapter_names=["b"])
    assert not q_proj.merged and q_proj.merged_adapters == []
    assert torch.equal(q_proj.get_base_layer().quant.packed, before)  # not re-quantized either


def test_a_mixed_adapter_batch_runs_each_row_through_its_own_adapter(qwen_dir):
    """``model(..., adapter_names=[...])`` (PEFT's mixed batches) raised an unexpected-keyword TypeError here."""
    model = get_peft_model(nf4_model(qwen_dir), lora_config(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    model.add_adapter("other", lora_config(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    trained(model)
    with torch.no_grad():
        mixed = model(input_ids=IDS, adapter_names=["other", "__base__"]).logits
        model.set_adapter("other")
        other = model(input_ids=IDS[:1]).logits
        with model.disable_adapter():
            base = model(input_ids=IDS[1:]).logits
    torch.testing.assert_close(mixed[:1], other, rtol=0, atol=1e-5)
    torch.testing.assert_close(mixed[1:], base, rtol=0, atol=1e-5)
    assert (other - base[:1]).abs().max() > 1e-2  # the adapter changes the output, so the rows tell them apart
    with model.disable_adapter(), torch.no_grad():  # disabled wins over adapter_names, as in PEFT
        torch.testing.assert_close(model(input_ids=IDS, adapter_names=["other", "other"]).logits, logits(model), rtol=0, atol=0)


def test_injecting_onto_nf4_layers_says_nothing_alarming(qwen_dir):
    """PEFT's "Unsupported layer type ... proceed at your own risk" came with every NF4 layer wrapped."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        get_peft_model(nf4_model(qwen_dir), lora_config(r=4, lora_alpha=8, target_modules=["q_proj"]))
    assert not [w for w in caught if "Unsupported layer type" in str(w.message)]


def test_lora_config_all_linear_names_the_fix():
    """PEFT's "all-linear" finds nn.Linear only, so PEFT then said no target_modules were passed."""
    with pytest.raises(ValueError, match="'all-linear' finds nn.Linear layers only, not NF4Linear. Name the modules"):
        lora_config(r=4, target_modules="all-linear")
