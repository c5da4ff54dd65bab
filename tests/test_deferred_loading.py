"""``from_pretrained(..., device="meta")``: a model that reads its checkpoint only when its parts get storage.

The sharded path (each rank filling one unit at a time and keeping its rows) runs in tests/test_fsdp.py; here the
single-device ``materialize`` and the checks made before anything is read."""

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

from lightning_nf4 import NF4Linear
from lightning_nf4.format import to_bnb_tensors
from lightning_nf4.loading import AutoModelForCausalLM, CheckpointError, materialize

NF4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)


def _save_llama(folder, tie: bool):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def _assert_same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key
    for (name, x), (_, y) in zip(a.named_modules(), b.named_modules()):
        if isinstance(x, NF4Linear):  # codes and every scale, not only what state_dict shows
            qx, qy = x.quant, y.quant
            for px, py in [(qx.packed, qy.packed), (qx.absmax, qy.absmax), (qx.nested.absmax, qy.nested.absmax), (qx.nested.offset, qy.nested.offset)]:
                assert torch.equal(px, py), name
    ids = torch.randint(0, 128, (1, 12))
    assert torch.equal(a(ids).logits, b(ids).logits)


@pytest.mark.parametrize("tie", [False, True])
def test_meta_load_reads_nothing_then_materializes_to_the_eager_load(tmp_path, tie):
    folder = _save_llama(tmp_path, tie)
    eager = AutoModelForCausalLM.from_pretrained(folder, quantization_config=NF4, progress=False)
    lazy = AutoModelForCausalLM.from_pretrained(folder, quantization_config=NF4, device="meta")
    assert all(p.is_meta for p in lazy.parameters())
    assert sum(isinstance(m, NF4Linear) for m in lazy.modules()) == 14
    materialize(lazy, "cpu")
    assert (lazy.lm_head.weight is lazy.model.embed_tokens.weight) == tie  # ties survive
    _assert_same(eager, lazy)


def test_materialize_reads_into_host_memory_under_a_default_device(tmp_path):
    """``materialize`` called where a default device is set (``meta`` standing in for the GPU of a Lightning
    configure_model) still reads the checkpoint into host memory, and equals the eager load."""
    folder = _save_llama(tmp_path, tie=False)
    eager = AutoModelForCausalLM.from_pretrained(folder, quantization_config=NF4, progress=False)
    lazy = AutoModelForCausalLM.from_pretrained(folder, quantization_config=NF4, device="meta")
    with torch.device("meta"):
        materialize(lazy, "cpu")
    _assert_same(eager, lazy)


def test_meta_load_of_a_prequantized_checkpoint(tmp_path):
    folder = _save_llama(tmp_path, tie=False)
    model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=NF4, progress=False)
    state = {k: v for k, v in load_file(folder / "model.safetensors").items()}
    for name, layer in model.named_modules():  # rewrite the file as bitsandbytes would save the quantized model
        if isinstance(layer, NF4Linear):
            del state[f"{name}.weight"]
            state.update({f"{name}.weight{'.' + k if k else ''}": v.contiguous() for k, v in to_bnb_tensors(layer.quant).items()})
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    eager = AutoModelForCausalLM.from_pretrained(folder, quantization_config=NF4, progress=False)
    lazy = AutoModelForCausalLM.from_pretrained(folder, quantization_config=NF4, device="meta")
    _assert_same(eager, materialize(lazy, "cpu"))
    _assert_same(model, eager)


def test_a_missing_tensor_is_named_before_anything_is_read(tmp_path):
    folder = _save_llama(tmp_path, tie=False)
    state = load_file(folder / "model.safetensors")
    del state["model.layers.1.mlp.down_proj.weight"], state["model.norm.weight"]
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"lacks tensors: \['model.norm.weight', 'model.layers.1.mlp.down_proj'\]"):
        AutoModelForCausalLM.from_pretrained(folder, quantization_config=NF4, device="meta")


def test_a_tensor_of_another_shape_is_named_not_broadcast(tmp_path):
    """A checkpoint whose norm weight has one element, which ``copy_`` would broadcast over the model's 128: the
    deferred load names the key and both shapes when the unit gets its storage, and fills nothing with it."""
    folder = _save_llama(tmp_path, tie=False)
    state = load_file(folder / "model.safetensors")
    state["model.layers.0.input_layernorm.weight"] = torch.full((1,), 3.0)
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    lazy = AutoModelForCausalLM.from_pretrained(folder, quantization_config=NF4, device="meta")
    with pytest.raises(CheckpointError, match=r"size mismatch for model\.layers\.0\.input_layernorm\.weight: checkpoint has \(1,\), "
                                              r"the model built from its config has \(128,\)"):
        materialize(lazy, "cpu")


def test_materialize_needs_a_meta_loaded_model(tmp_path):
    with pytest.raises(ValueError, match=r"from_pretrained\(\.\.\., device='meta'\)"):
        materialize(torch.nn.Linear(2, 2), "cpu")


def test_gguf_cannot_be_deferred(tmp_path):
    folder = _save_llama(tmp_path, tie=False)
    with pytest.raises(ValueError, match="GGUF file is dequantized whole"):
        AutoModelForCausalLM.from_pretrained(folder, quantization_config=NF4, device="meta", gguf_file="model.gguf")
