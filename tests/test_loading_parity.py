"""What transformers 5 does on load, the loader does too, where it once differed silently: the default dtype (the
checkpoint's), tied weights the checkpoint stores untied or only as the head, a pre-quantized checkpoint's output head
of any name, non-persistent buffers a checkpoint also holds; and transformers' loading arguments it does not take
are named as such."""

import json
import warnings

import pytest
import torch
import peft
import transformers
from safetensors.torch import load_file, save_file
from transformers import BitsAndBytesConfig, GenerationConfig

from lightning_nf4 import NF4Linear
from lightning_nf4.format import NF4FormatError
from lightning_nf4.loading import AutoModelForCausalLM, materialize

BARE = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")  # what most users pass: compute dtype left out
FP32 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
IDS = torch.randint(0, 128, (1, 8), generator=torch.Generator().manual_seed(0))


def llama(tie: bool = False, dtype: torch.dtype = torch.float32):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=128, tie_word_embeddings=tie)
    return transformers.LlamaForCausalLM(config).to(dtype)


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def both_paths(folder, **kwargs):
    """The streaming load and the deferred one (``device="meta"``, then ``materialize``)."""
    eager = AutoModelForCausalLM.from_pretrained(folder, progress=False, **kwargs)
    lazy = materialize(AutoModelForCausalLM.from_pretrained(folder, device="meta", **kwargs), "cpu")
    return eager, lazy


def test_without_dtype_the_float_parts_keep_the_checkpoints_dtype(tmp_path):
    """transformers 5 loads with ``dtype="auto"`` by default. The loader took ``bnb_4bit_compute_dtype`` instead, whose
    default is float32: a bf16 checkpoint came back all float32, twice the memory of transformers' load."""
    llama(dtype=torch.bfloat16).save_pretrained(tmp_path)
    for model in both_paths(tmp_path, quantization_config=BARE):
        assert model.model.embed_tokens.weight.dtype == torch.bfloat16 and model.lm_head.weight.dtype == torch.bfloat16
        layer = model.model.layers[0].mlp.up_proj
        assert layer.quant.dtype == torch.bfloat16 and layer.compute_dtype == torch.float32  # computes as bitsandbytes would
    assert AutoModelForCausalLM.from_pretrained(tmp_path, progress=False).dtype == torch.bfloat16  # a float load too
    # a config that names no dtype: the checkpoint's first float tensor in key order decides, as in transformers (in
    # byte order a pre-quantized checkpoint's float32 scales come first: float32 float parts, twice the memory)
    AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=BARE, progress=False).save_pretrained(tmp_path / "nf4")
    for folder in (tmp_path, tmp_path / "nf4"):
        config = json.loads((folder / "config.json").read_text())
        del config["dtype"]
        (folder / "config.json").write_text(json.dumps(config))
        assert AutoModelForCausalLM.from_pretrained(folder, quantization_config=BARE, progress=False).dtype == torch.bfloat16
    assert transformers.AutoModelForCausalLM.from_pretrained(tmp_path).dtype == torch.bfloat16  # transformers' reading


def _with_head(folder, head):
    state = load_file(folder / "model.safetensors")
    state.pop("lm_head.weight", None)
    if head == "different":
        state["lm_head.weight"] = torch.randn_like(state["model.embed_tokens.weight"])
    elif head == "only":
        state["lm_head.weight"] = state.pop("model.embed_tokens.weight")
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    return state


def test_a_tied_config_over_two_different_checkpoint_tensors_loads_them_untied(tmp_path):
    """transformers 5 keeps both and warns when the config ties two tensors the checkpoint holds with different
    values; the loader tied the head to the embeddings again, dropping the checkpoint's head (logits 1.9 off)."""
    llama(tie=True).save_pretrained(tmp_path)
    state = _with_head(tmp_path, "different")
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    assert torch.equal(reference.lm_head.weight, state["lm_head.weight"])
    with pytest.warns(UserWarning, match="ties lm_head.weight to model.embed_tokens.weight, but the checkpoint holds both"):
        lazy = materialize(AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=FP32, device="meta"), "cpu")
    eager = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=FP32, progress=False)
    for model in (eager, lazy):
        assert torch.equal(model.lm_head.weight, state["lm_head.weight"]), "the checkpoint's head"
        assert torch.equal(model.model.embed_tokens.weight, state["model.embed_tokens.weight"])
        assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert torch.equal(logits(eager), logits(lazy))


def test_a_tied_pair_stored_only_as_the_head_loads_tied_from_it(tmp_path):
    """transformers ties to whichever of the pair the checkpoint holds; the loader called the embeddings missing."""
    llama(tie=True).save_pretrained(tmp_path)
    state = _with_head(tmp_path, "only")
    for model in both_paths(tmp_path, quantization_config=FP32):
        assert model.lm_head.weight is model.model.embed_tokens.weight
        assert torch.equal(model.model.embed_tokens.weight, state["lm_head.weight"])


def test_a_prequantized_checkpoint_keeps_an_output_head_of_any_name_float(tmp_path):
    """A transformers-saved bnb-4bit checkpoint lists no skipped modules (``llm_int8_skip_modules: null``): transformers
    kept the output embeddings float by itself, whatever their name. Read back, only ``lm_head`` stayed float here,
    so BioGPT's ``output_projection`` (float in the checkpoint) was quantized on load (logits 5e-2 off)."""
    torch.manual_seed(0)
    config = transformers.BioGptConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                       vocab_size=128, tie_word_embeddings=False)
    transformers.BioGptForCausalLM(config).save_pretrained(tmp_path / "float")
    fresh = AutoModelForCausalLM.from_pretrained(tmp_path / "float", quantization_config=FP32, progress=False)
    assert type(fresh.output_projection) is torch.nn.Linear
    fresh.save_pretrained(tmp_path / "nf4")
    saved = json.loads((tmp_path / "nf4" / "config.json").read_text())
    saved["quantization_config"]["llm_int8_skip_modules"] = None  # as transformers + bitsandbytes writes it
    (tmp_path / "nf4" / "config.json").write_text(json.dumps(saved))
    for model in both_paths(tmp_path / "nf4"):
        assert type(model.output_projection) is torch.nn.Linear and torch.equal(model.output_projection.weight, fresh.output_projection.weight)
        assert torch.equal(logits(model), logits(fresh))


def test_a_non_persistent_buffer_in_the_checkpoint_is_ignored(tmp_path):
    """Rotary tables are built by the model in float32; a checkpoint's copy of ``inv_freq`` was read and cast to the
    load dtype (bf16), moving every rotary angle. transformers ignores it."""
    model = llama()
    model.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    state["model.rotary_emb.inv_freq"] = model.model.rotary_emb.inv_freq.clone()
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    kwargs = dict(quantization_config=FP32, dtype=torch.bfloat16)
    for loaded in both_paths(tmp_path, **kwargs):
        inv_freq = loaded.model.rotary_emb.inv_freq
        assert inv_freq.dtype == torch.float32 and torch.equal(inv_freq, model.model.rotary_emb.inv_freq)
    _, info = AutoModelForCausalLM.from_pretrained(tmp_path, progress=False, output_loading_info=True, **kwargs)
    assert info["unexpected_keys"] == ["model.rotary_emb.inv_freq"]


def test_transformers_loading_arguments_it_does_not_take_are_named_as_such(tmp_path):
    """``max_memory=`` and the like were refused as misspellings ("neither config attributes nor loading arguments")."""
    llama().save_pretrained(tmp_path)
    for kwargs, fix in [({"max_memory": {"cpu": "1GiB"}}, "onto one device"), ({"offload_folder": str(tmp_path)}, "onto one device"),
                        ({"tp_plan": "auto"}, "strategy='nf4_fsdp'"), ({"key_mapping": {"a": "b"}}, "rename them once"),
                        ({"adapter_name": "x"}, "PeftModel.from_pretrained")]:
        with pytest.raises(TypeError, match=rf"does not take transformers' {next(iter(kwargs))}= \(.*{fix}"):
            AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=FP32, progress=False, **kwargs)
    with pytest.raises(ValueError, match="weights_only=False: lightning-nf4 reads .bin checkpoints weights-only, always"):
        AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=FP32, progress=False, weights_only=False)
    given = GenerationConfig(max_new_tokens=3, eos_token_id=7)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=FP32, progress=False, weights_only=True,
                                                 generation_config=given)
    assert model.generation_config is given and isinstance(model.model.layers[0].mlp.up_proj, NF4Linear)


@pytest.mark.parametrize("other", [dict(load_in_8bit=True), dict(load_in_4bit=True, bnb_4bit_quant_type="fp4")])
def test_a_checkpoint_quantized_otherwise_names_its_float_original_as_the_fix(tmp_path, other):
    """Asking for NF4 cannot help a checkpoint already quantized another way; the message said to ask for NF4."""
    llama().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": False, "load_in_8bit": False, **other}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with warnings.catch_warnings(), pytest.raises(NF4FormatError, match=r"the checkpoint's quantization_config: .*Load the "
                                                                        r"model's float \(unquantized\) checkpoint"):
        warnings.simplefilter("ignore")
        AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=FP32, progress=False)


def test_rwkv_layers_rescaled_in_place_are_named_with_both_ways_out(tmp_path):
    """RWKV divides ``attention.output`` and ``feed_forward.value`` in place when it turns to eval: on NF4 codes the
    first forward failed with a dtype error naming nothing. Refused at load, and both fixes it names load and run."""
    torch.manual_seed(0)
    config = transformers.RwkvConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, attention_hidden_size=64,
                                     intermediate_size=128, context_length=64)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"RWKV rescales rwkv.blocks.0.attention.output .*rescale_every=0.*llm_int8_skip_modules"):
        AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=FP32, progress=False)
    skip = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32,
                              llm_int8_skip_modules=["attention.output", "feed_forward.value"])
    for kwargs in (dict(quantization_config=FP32, rescale_every=0), dict(quantization_config=skip)):
        model = AutoModelForCausalLM.from_pretrained(tmp_path, progress=False, **kwargs)
        assert isinstance(model.rwkv.blocks[0].attention.key, NF4Linear)
        assert torch.isfinite(logits(model)).all()


def test_the_deferred_tie_check_reads_no_tensor_whole(tmp_path, monkeypatch):
    """``device="meta"`` reads nothing until sharding; the tie check read both tensors of a tied pair whole on every
    rank (2 GiB for a 128k x 4096 bf16 table). A ``.bin`` pair of one storage is equal unread; safetensors ranges
    are compared a chunk at a time."""
    from lightning_nf4.loading.checkpoint import CheckpointIndex

    model = llama(tie=True)
    model.config.save_pretrained(tmp_path)
    state = model.state_dict()
    assert state["lm_head.weight"].data_ptr() == state["model.embed_tokens.weight"].data_ptr()
    torch.save(state, tmp_path / "pytorch_model.bin")  # as torch.save writes a tied pair: both keys, one storage
    reads = []
    original = CheckpointIndex.read
    monkeypatch.setattr(CheckpointIndex, "read", lambda self, name: reads.append(name) or original(self, name))
    AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=FP32, device="meta")
    assert reads == []
    a = torch.randn(300, 70)
    b, c = a.clone(), a.clone()
    c[-1, -1] += 1  # differs in the last chunk only
    save_file({"a": a, "b": b, "c": c}, tmp_path / "three.safetensors")
    index = CheckpointIndex([tmp_path / "three.safetensors"])
    assert index.same_values("a", "b", chunk=1000) and not index.same_values("a", "c", chunk=1000) and reads == []


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_dequantize_model_gives_back_the_float_model_as_transformers_dequantize_does(tmp_path, arch):
    """transformers' ``model.dequantize()`` knows bitsandbytes models only (for these it says the model is not
    quantized): ``lightning_nf4.dequantize_model`` puts back float layers (GPT-2's ``Conv1D`` in its own layout) with
    the dequantized weights, drops the quantization config, and the model computes as the NF4 one did; saved, it loads
    in plain transformers as that model. LoRA on an NF4 layer is refused, naming the export."""
    from lightning_nf4 import dequantize_model
    from lightning_nf4.layers.lora import lora_config

    torch.manual_seed(0)
    if arch == "llama":
        model = llama()
    else:
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=32))
    model.save_pretrained(tmp_path / "float")
    nf4 = AutoModelForCausalLM.from_pretrained(tmp_path / "float", quantization_config=FP32, progress=False)
    expected = logits(nf4)
    float_kind = (transformers.pytorch_utils.Conv1D if arch == "gpt2" else torch.nn.Linear)
    wrapped = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(tmp_path / "float", quantization_config=FP32, progress=False),
                                  lora_config(r=2, target_modules=["c_attn"] if arch == "gpt2" else ["q_proj"]))
    with pytest.raises(ValueError, match=r"carries LoRA on an NF4 layer.*save_merged"):
        dequantize_model(wrapped)

    assert dequantize_model(nf4) is nf4 and not any(isinstance(m, NF4Linear) for m in nf4.modules())
    kinds = {type(m) for n, m in nf4.named_modules() if n.endswith(("q_proj", "c_attn", "down_proj", "c_proj"))}
    assert kinds == {float_kind}
    assert getattr(nf4.config, "quantization_config", None) is None
    torch.testing.assert_close(logits(nf4), expected, atol=1e-5, rtol=1e-5)
    nf4.save_pretrained(tmp_path / "dequantized")
    plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "dequantized")
    torch.testing.assert_close(logits(plain), expected, atol=1e-5, rtol=1e-5)
