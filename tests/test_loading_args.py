"""``AutoModelForCausalLM.from_pretrained``'s arguments mean what they mean in transformers: ``subfolder``, ``config``,
config overrides, unknown keywords, ``output_loading_info``, ``use_safetensors``, ``llm_int8_skip_modules``; and a
damaged or mislabelled quantized checkpoint is named precisely."""

import json

import pytest
import torch
import transformers
from transformers import BitsAndBytesConfig

from lightning_nf4 import NF4Linear
from lightning_nf4.loading import AutoModelForCausalLM, CheckpointError

FP32 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)


def llama(seed: int, layers: int = 2):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=128, tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(config)


def load(path, **kwargs):
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=FP32, progress=False, **kwargs)


def embeddings(model):
    return model.get_input_embeddings().weight


def test_subfolder_holds_the_config_and_the_weights(tmp_path):
    """Both come from ``<path>/<subfolder>`` (the weights came from ``<path>`` before: another model, silently)."""
    llama(0).save_pretrained(tmp_path)
    inner = llama(1, layers=3)
    inner.save_pretrained(tmp_path / "sub")
    model = load(tmp_path, subfolder="sub")
    assert len(model.model.layers) == 3 and torch.equal(embeddings(model), embeddings(inner))


def test_a_config_object_or_attribute_overrides_replace_the_folders_config(tmp_path):
    llama(0).save_pretrained(tmp_path)
    one_layer = transformers.LlamaConfig.from_pretrained(tmp_path, num_hidden_layers=1)
    assert len(load(tmp_path, config=one_layer).model.layers) == 1
    assert len(load(tmp_path, num_hidden_layers=1).model.layers) == 1  # as transformers: a config attribute
    assert load(tmp_path, attn_implementation="eager").config._attn_implementation == "eager"


def test_an_argument_that_is_neither_a_config_attribute_nor_a_loading_argument_is_refused(tmp_path):
    """transformers refuses it; taking it silently turned ``quantisation_config=`` into a float load."""
    llama(0).save_pretrained(tmp_path)
    with pytest.raises(TypeError, match=r"unexpected keyword arguments \['quantisation_config'\]"):
        AutoModelForCausalLM.from_pretrained(tmp_path, quantisation_config=FP32, progress=False)
    with pytest.raises(TypeError, match=r"\['num_layers'\]"):
        load(tmp_path, config=transformers.LlamaConfig.from_pretrained(tmp_path), num_layers=1)
    assert isinstance(load(tmp_path, low_cpu_mem_usage=True, revision="main").model.layers[0].mlp.up_proj, NF4Linear)


def test_output_loading_info_returns_the_keys_the_model_did_not_use(tmp_path):
    llama(0).save_pretrained(tmp_path)
    model, info = load(tmp_path, num_hidden_layers=1, output_loading_info=True)
    assert isinstance(model, transformers.LlamaForCausalLM)
    assert info["missing_keys"] == [] and sorted(info) == ["error_msgs", "mismatched_keys", "missing_keys", "unexpected_keys"]
    assert info["unexpected_keys"] and all(k.startswith("model.layers.1.") for k in info["unexpected_keys"])


def test_use_safetensors_chooses_the_format(tmp_path):
    llama(0).save_pretrained(tmp_path)
    other = llama(1)
    torch.save(other.state_dict(), tmp_path / "pytorch_model.bin")  # the same folder, another model's .bin
    assert torch.equal(embeddings(load(tmp_path)), embeddings(llama(0)))  # safetensors first
    assert torch.equal(embeddings(load(tmp_path, use_safetensors=False)), embeddings(other))
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"use_safetensors=True.*model.safetensors"):
        load(tmp_path, use_safetensors=True)


@pytest.mark.parametrize("pattern, float_layers", [
    (r"model\.layers\.0\..*", {"model.layers.0"}),  # a regular expression from the start
    ("model.layers.1", {"model.layers.1"}),  # a module path from the start
    ("down_proj", {"model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"}),  # a suffix
    ("self_attn", set()),  # neither: transformers quantizes the projections inside, and so does the loader
])
def test_llm_int8_skip_modules_are_read_as_transformers_reads_them(tmp_path, pattern, float_layers):
    """A saved config's list means the same to transformers + bitsandbytes as to this loader."""
    from transformers.quantizers.quantizers_utils import should_convert_module

    llama(0).save_pretrained(tmp_path / "float")
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32, llm_int8_skip_modules=[pattern])
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "float", quantization_config=config, progress=False)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, NF4Linear)) and n != "lm_head"}
    kept = {n for n, m in linears.items() if not isinstance(m, NF4Linear)}
    assert kept == {n for n in linears if any(n == f or n.startswith(f + ".") for f in float_layers)}
    assert kept == {n for n in linears if not should_convert_module(n, [pattern])}
    model.save_pretrained(tmp_path / "nf4")
    assert json.loads((tmp_path / "nf4" / "config.json").read_text())["quantization_config"]["llm_int8_skip_modules"] == ["lm_head", pattern]
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "nf4", progress=False)
    assert {n for n, m in again.named_modules() if n in linears and not isinstance(m, NF4Linear)} == kept


def test_a_bare_model_checkpoint_loads_under_the_architectures_own_prefix(tmp_path):
    """BLOOM's base model is ``transformer``: a checkpoint of ``BloomModel`` (keys ``h.0...``) loads into
    ``BloomForCausalLM`` as transformers loads it (only ``model.`` was tried before)."""
    config = transformers.BloomConfig(hidden_size=64, n_layer=2, n_head=4, vocab_size=128)
    torch.manual_seed(0)
    full = transformers.BloomForCausalLM(config)
    full.transformer.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**saved, "architectures": ["BloomForCausalLM"]}))
    model = load(tmp_path)
    assert isinstance(model.transformer.h[0].self_attention.query_key_value, NF4Linear)
    assert torch.equal(embeddings(model), embeddings(full))


def test_a_quantized_layer_missing_one_part_names_that_part(tmp_path):
    from safetensors.torch import load_file, save_file

    load(_saved_float(tmp_path)).save_pretrained(tmp_path / "nf4")
    state = load_file(tmp_path / "nf4" / "model.safetensors")
    del state["model.layers.0.mlp.down_proj.weight.absmax"]
    save_file(state, str(tmp_path / "nf4" / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"lacks tensors: \['model.layers.0.mlp.down_proj.weight.absmax'\]\."):
        AutoModelForCausalLM.from_pretrained(tmp_path / "nf4", progress=False)


def test_a_quantized_checkpoint_without_its_config_is_named_and_loads_when_told(tmp_path):
    """Codes under a config.json that lost its quantization_config: the size mismatch says what the tensor is and
    the fix; with the config passed, the codes load bit for bit."""
    ours = load(_saved_float(tmp_path))
    ours.save_pretrained(tmp_path / "nf4")
    saved = json.loads((tmp_path / "nf4" / "config.json").read_text())
    saved.pop("quantization_config")
    (tmp_path / "nf4" / "config.json").write_text(json.dumps(saved))
    with pytest.raises(CheckpointError, match="packed 4-bit codes.*no quantization_config; pass quantization_config="):
        AutoModelForCausalLM.from_pretrained(tmp_path / "nf4", progress=False)
    told = load(tmp_path / "nf4")
    for name, layer in ours.named_modules():
        if isinstance(layer, NF4Linear):
            assert torch.equal(told.get_submodule(name).quant.packed, layer.quant.packed), name


def test_a_dict_config_without_compute_dtype_computes_as_bitsandbytes_config_does(tmp_path):
    as_dict = AutoModelForCausalLM.from_pretrained(_saved_float(tmp_path), quantization_config={"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}, progress=False)
    default = BitsAndBytesConfig(load_in_4bit=True).bnb_4bit_compute_dtype
    assert as_dict.model.layers[0].mlp.up_proj.compute_dtype == default == torch.float32


def _saved_float(tmp_path):
    folder = tmp_path / "float"
    if not folder.exists():
        llama(0).save_pretrained(folder)
    return folder


def test_a_requested_storage_dtype_is_named_as_ignored(tmp_path):
    """``bnb_4bit_quant_storage`` is a bitsandbytes + FSDP1 setting; the codes stay uint8 and the load says so."""
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_quant_storage=torch.bfloat16)
    with pytest.warns(UserWarning, match="bnb_4bit_quant_storage='bfloat16' is ignored"):
        model = AutoModelForCausalLM.from_pretrained(_saved_float(tmp_path), quantization_config=config, progress=False)
    assert model.model.layers[0].mlp.up_proj.weight.dtype == torch.uint8
    assert model.config.quantization_config.bnb_4bit_quant_storage is torch.uint8


def test_variant_reads_the_variants_weights_as_transformers_does(tmp_path):
    """``variant="v2"`` reads ``model.v2.safetensors`` (single or sharded) beside the plain ``model.safetensors``, and
    names ``variant=None`` when only plain weights exist (it was an unknown keyword)."""
    plain, other = llama(0), llama(1)
    plain.save_pretrained(tmp_path)
    other.save_pretrained(tmp_path, variant="v2", max_shard_size="40KB")
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, variant="v2")
    assert torch.equal(embeddings(reference), embeddings(other))
    assert torch.equal(embeddings(load(tmp_path, variant="v2")), embeddings(other))
    assert torch.equal(embeddings(load(tmp_path)), embeddings(plain))
    with pytest.raises(CheckpointError, match="pass variant=None"):
        load(tmp_path, variant="v3")


def test_prepare_model_for_kbit_training_turns_gradient_checkpointing_on_as_for_bitsandbytes(tmp_path):
    """PEFT's own function leaves checkpointing off on these models (it looks for bitsandbytes' flag, which they cannot
    keep: transformers would import bitsandbytes to count parameters). Ours runs it with the flag for the call only."""
    import peft

    from lightning_nf4.layers.lora import lora_config
    from lightning_nf4.loading import prepare_model_for_kbit_training

    llama(0).save_pretrained(tmp_path)
    bf16 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    theirs = peft.prepare_model_for_kbit_training(AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=bf16, progress=False))
    assert not theirs.is_gradient_checkpointing  # why ours exists
    model = prepare_model_for_kbit_training(AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=bf16, progress=False))
    assert model.is_gradient_checkpointing and not hasattr(model, "is_loaded_in_4bit")
    assert model.num_parameters() > 0 and model.model.norm.weight.dtype == torch.float32
    assert not any(p.requires_grad for p in model.parameters())
    model = peft.get_peft_model(model, lora_config(r=4, target_modules=["q_proj", "v_proj"]))
    model.train()
    ids = torch.randint(0, 128, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()  # through the checkpointed layers into the adapters
    grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]  # lora_A gets none while B is zero
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("arch", ["bert", "xlnet"])
def test_a_tied_output_head_of_any_name_stays_float_as_in_transformers(tmp_path, arch):
    """transformers keeps the output embeddings and tied weights in float whatever their names; only ``lm_head`` was
    kept here, so BERT's ``cls.predictions.decoder`` and XLNet's ``lm_loss`` were quantized, and tying then put the
    float embedding table where the packed codes go: every logit 0."""
    torch.manual_seed(0)
    small = dict(vocab_size=256)
    if arch == "bert":
        config = transformers.BertConfig(is_decoder=True, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, **small)
    else:
        config = transformers.XLNetConfig(d_model=64, n_layer=2, n_head=4, d_inner=128, **small)
    reference = transformers.AutoModelForCausalLM.from_config(config).eval()
    reference.save_pretrained(tmp_path)
    model = load(tmp_path)
    head = model.get_output_embeddings()
    assert type(head) is torch.nn.Linear and head.weight is model.get_input_embeddings().weight
    head_name = next(n for n, m in model.named_modules() if m is head)
    assert head_name in model.config.quantization_config.llm_int8_skip_modules  # so transformers reads it as float
    assert any(isinstance(m, NF4Linear) for m in model.modules())
    ids = torch.randint(0, 256, (1, 8))
    with torch.no_grad():
        ours, theirs = model(input_ids=ids).logits, reference(input_ids=ids).logits
    assert (ours - theirs).abs().max() < 0.2 * theirs.abs().max()  # NF4 rounding of the body only
