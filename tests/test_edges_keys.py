"""Edges of ``lightning_nf4.loading.keys`` the main tests leave open: how a checkpoint key is split into a layer
and a bitsandbytes part, which of ``key`` / ``model.<key>`` / ``key`` without ``model.`` names a module (bare-model
and Lightning-wrapper checkpoints, eager and deferred), and what ``load_layer`` does to a weight before it is
quantized (a float weight alone is cast to the load dtype; packed parts are left as they are)."""

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

from lightning_nf4 import NF4Linear
from lightning_nf4.format import NF4FormatError, quantize_nf4, to_bnb_tensors
from lightning_nf4.loading import AutoModelForCausalLM, materialize
from lightning_nf4.loading.keys import NF4_KEY, KeyMap, load_layer

NF4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)


def _same_quant(a, b, name=""):
    assert a.dtype == b.dtype and a.shape == b.shape and a.blocksize == b.blocksize, name
    assert len(a.tensors()) == len(b.tensors()), name
    for x, y in zip(a.tensors(), b.tensors()):
        assert x.dtype == y.dtype and torch.equal(x, y), name


def model_key(key, known, layers):
    """A key as a plain module (no transformers renames, prefix ``model``) with these names maps it."""
    return KeyMap(torch.nn.Module(), known, layers)(key)


# -- NF4_KEY and KeyMap, on their own ------------------------------------------------------------------------


def test_a_key_splits_into_its_layer_and_bitsandbytes_part():
    """``<layer>.weight`` and ``<layer>.weight.<part>`` name a layer's weight and its parts; ``<layer>.weight_scale``
    (fp8 / weight-norm checkpoints) or ``<layer>.bias`` are other tensors, not parts of the weight."""
    plain = NF4_KEY.match("model.layers.0.mlp.up_proj.weight")
    assert (plain["layer"], plain["suffix"]) == ("model.layers.0.mlp.up_proj", None)
    part = NF4_KEY.match("model.layers.0.mlp.up_proj.weight.quant_state.bitsandbytes__nf4")
    assert (part["layer"], part["suffix"]) == ("model.layers.0.mlp.up_proj", "quant_state.bitsandbytes__nf4")
    for other in ("model.layers.0.mlp.up_proj.weight_scale", "model.layers.0.mlp.up_proj.bias", "model.layers.0.mlp.up_proj.weights"):
        assert NF4_KEY.match(other) is None, other


def test_a_key_the_model_has_is_never_renamed():
    """The key as written wins over ``model.<key>`` and over ``<key>`` without ``model.``, even when those are model
    names too: a renamed key would fill the wrong tensor."""
    known = {"norm.weight", "model.norm.weight", "model.x.bias", "x.bias"}
    assert model_key("norm.weight", known, set()) == "norm.weight"
    assert model_key("model.x.bias", known, set()) == "model.x.bias"
    layers = {"q", "model.q"}
    assert model_key("q.weight.absmax", set(), layers) == "q.weight.absmax"
    assert model_key("model.q.weight", set(), layers) == "model.q.weight"


def test_bare_and_wrapped_keys_find_their_module():
    """A bare-model key (``layers.0...``) gets ``model.`` when that names a parameter, a buffer, or the weight or a
    bitsandbytes part of an NF4 layer (those are not in ``known``); a Lightning wrapper's ``model.`` is dropped;
    a key naming nothing comes back unchanged."""
    known = {"model.embed_tokens.weight", "lm_head.weight"}
    layers = {"model.layers.0.q"}
    assert model_key("embed_tokens.weight", known, layers) == "model.embed_tokens.weight"
    assert model_key("layers.0.q.weight", known, layers) == "model.layers.0.q.weight"
    assert model_key("layers.0.q.weight.absmax", known, layers) == "model.layers.0.q.weight.absmax"
    assert model_key("model.lm_head.weight", known, layers) == "lm_head.weight"
    assert model_key("layers.1.q.weight", known, layers) == "layers.1.q.weight"  # not a layer of this model
    assert model_key("layers.0.q.bias", known, layers) == "layers.0.q.bias"  # a layer, but not its weight
    assert model_key("rotary_emb.inv_freq", known, layers) == "rotary_emb.inv_freq"


# -- KeyMap inside the two loaders ---------------------------------------------------------------------------


def _config(tie):
    return LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tie)


def _nf4_layers(model):
    return {n: m.quant for n, m in model.named_modules() if isinstance(m, NF4Linear)}


def _assert_same_model(a, b):
    qa, qb = _nf4_layers(a), _nf4_layers(b)
    assert qa.keys() == qb.keys() and len(qa) == 14
    for name in qa:
        _same_quant(qa[name], qb[name], name)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def _reference(folder, tie):
    torch.manual_seed(0)
    model = LlamaForCausalLM(_config(tie))
    model.save_pretrained(folder)
    return AutoModelForCausalLM.from_pretrained(folder, quantization_config=NF4, progress=False), model


def test_a_bare_model_checkpoint_loads_into_the_causal_lm_eager_and_deferred(tmp_path):
    """A ``LlamaModel`` checkpoint (keys ``layers.0...``, ``embed_tokens.weight``, tied head) loads into
    ``LlamaForCausalLM`` as its ``model.`` keys, on the streaming path and through ``device="meta"`` +
    ``materialize`` (where NF4 weights are found as layers, not as known parameters): the same bytes as
    loading the ``*ForCausalLM`` checkpoint of the same weights."""
    reference, model = _reference(tmp_path / "full", tie=True)
    bare = tmp_path / "bare"
    model.model.save_pretrained(bare)
    assert "layers.0.self_attn.q_proj.weight" in load_file(bare / "model.safetensors")
    eager = AutoModelForCausalLM.from_pretrained(bare, quantization_config=NF4, progress=False)
    _assert_same_model(eager, reference)
    lazy = materialize(AutoModelForCausalLM.from_pretrained(bare, quantization_config=NF4, device="meta"), "cpu")
    _assert_same_model(lazy, reference)


def test_a_lightning_wrapper_checkpoint_loads_without_its_model_prefix(tmp_path):
    """Every key under one more ``model.`` (a LightningModule's ``self.model``, an untied float ``lm_head`` at
    ``model.lm_head.weight``) loads as the plain checkpoint does, eager and deferred."""
    reference, model = _reference(tmp_path / "full", tie=False)
    wrapped = tmp_path / "wrapped"
    wrapped.mkdir()
    model.config.save_pretrained(wrapped)
    state = load_file(tmp_path / "full" / "model.safetensors")
    save_file({f"model.{k}": v for k, v in state.items()}, wrapped / "model.safetensors", metadata={"format": "pt"})
    eager = AutoModelForCausalLM.from_pretrained(wrapped, quantization_config=NF4, progress=False)
    _assert_same_model(eager, reference)
    lazy = materialize(AutoModelForCausalLM.from_pretrained(wrapped, quantization_config=NF4, device="meta"), "cpu")
    _assert_same_model(lazy, reference)


def test_a_tensor_named_like_a_weight_part_is_not_one(tmp_path):
    """A stray ``<layer>.weight_scale`` beside a float weight is a tensor the model does not use (ignored), not a
    part of the layer's weight (which would make the float weight look corrupted)."""
    reference, _ = _reference(tmp_path, tie=False)
    state = load_file(tmp_path / "model.safetensors")
    state["model.layers.0.mlp.up_proj.weight_scale"] = torch.ones(1)
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    _assert_same_model(AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=NF4, progress=False), reference)


@pytest.mark.parametrize("dtype", [torch.bfloat16, None])
def test_an_fp32_checkpoint_is_quantized_from_its_rounding_to_the_load_dtype(tmp_path, dtype):
    """``from_pretrained`` of an fp32 checkpoint with ``dtype=torch.bfloat16``: every NF4 layer, eager and deferred,
    holds ``quantize_nf4(weight.to(bf16))``, as transformers' load-in-dtype-then-quantize gives. With no ``dtype``,
    transformers 5's default (the checkpoint's own, fp32) whatever the compute dtype: ``quantize_nf4(weight)``, and
    the float parts stay fp32."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(_config(False))
    model.save_pretrained(tmp_path)
    kwargs = dict(quantization_config=NF4, dtype=dtype)
    eager = AutoModelForCausalLM.from_pretrained(tmp_path, progress=False, **kwargs)
    lazy = materialize(AutoModelForCausalLM.from_pretrained(tmp_path, device="meta", **kwargs), "cpu")
    weights = dict(model.named_parameters())
    assert weights["model.layers.0.mlp.up_proj.weight"].dtype == torch.float32
    expected = dtype or torch.float32
    for loaded in (eager, lazy):
        assert loaded.model.embed_tokens.weight.dtype == expected and loaded.dtype == expected
        for name, quant in _nf4_layers(loaded).items():
            _same_quant(quant, quantize_nf4(weights[f"{name}.weight"].detach().to(expected)), name)


# -- load_layer ---------------------------------------------------------------------------------------------------


def _empty_layer(out_features=24, in_features=40):
    return NF4Linear(in_features, out_features, bias=False, compute_dtype=torch.bfloat16, dtype=torch.float32)


@pytest.mark.parametrize("stored", [torch.float32, torch.float16])
def test_a_float_weight_is_cast_to_the_load_dtype_then_quantized(stored):
    """An fp32 or fp16 checkpoint weight loaded with dtype bf16 is rounded to bf16 first: the NF4 codes and scales
    are those of ``quantize_nf4(weight.to(bf16))`` and the layer remembers bf16 as its original dtype (the dtype of
    ``dequantize()`` and of a merged export)."""
    g = torch.Generator().manual_seed(0)
    weight = (torch.randn(24, 40, generator=g) * 3).to(stored)
    layer = _empty_layer()
    load_layer(layer, {"": weight}, "model.layers.0.q", torch.device("cpu"), torch.bfloat16)
    expected = quantize_nf4(weight.to(torch.bfloat16), layer.blocksize, layer.double_quant)
    _same_quant(layer.quant, expected)
    assert layer.dequantize().dtype == torch.bfloat16
    assert not torch.equal(quantize_nf4(weight).absmax, expected.absmax)  # the cast is visible in the bytes


def test_packed_parts_are_moved_but_not_cast():
    """Pre-quantized parts (uint8 codes, fp32 scales, the quant-state blob) load as they are whatever the load
    dtype: the layer holds the same weight, original dtype (fp16) included."""
    g = torch.Generator().manual_seed(1)
    quant = quantize_nf4(torch.randn(24, 40, generator=g).to(torch.float16))
    parts = {k: v.clone() for k, v in to_bnb_tensors(quant).items()}
    layer = _empty_layer()
    load_layer(layer, parts, "q", torch.device("cpu"), torch.bfloat16)
    _same_quant(layer.quant, quant)


def test_a_float_weight_with_stray_parts_or_a_lone_packed_weight_is_refused():
    """A float weight next to bitsandbytes parts without a quant state is not quietly quantized without them, and
    a uint8 weight alone is not cast to float and quantized: both are named as corrupted, with the layer's name."""
    weight = torch.randn(24, 40)
    absmax = torch.ones(15)
    with pytest.raises(NF4FormatError, match=r"model\.layers\.0\.q\.weight: float weight given together with \['absmax'\]"):
        load_layer(_empty_layer(), {"": weight, "absmax": absmax}, "model.layers.0.q", torch.device("cpu"), torch.bfloat16)
    codes = torch.zeros(480, 1, dtype=torch.uint8)
    with pytest.raises(NF4FormatError, match=r"model\.layers\.0\.q\.weight has dtype torch\.uint8 but no"):
        load_layer(_empty_layer(), {"": codes}, "model.layers.0.q", torch.device("cpu"), torch.bfloat16)
