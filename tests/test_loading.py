"""Streaming NF4 loading: equality with load-then-convert, pre-quantized bitsandbytes checkpoints, errors."""

import json
import logging

import pytest
import torch
import transformers
from transformers import BitsAndBytesConfig

from lightning_nf4 import LoRACallback, NF4Linear, NF4Precision, quantize_nf4
from lightning_nf4.format import NF4FormatError
from lightning_nf4.loading import AutoModelForCausalLM, CheckpointError
from tests.lightning_models import CausalLM, tiny_llama, token_loader

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
NF4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)
IDS = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def float_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    tiny_llama().to(torch.bfloat16).save_pretrained(path, max_shard_size="100KB")  # sharded, with an index
    return path


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def nf4_state(model):
    return {n: (m.weight.clone(), m.quant.absmax.clone()) for n, m in model.named_modules() if isinstance(m, NF4Linear)}


def test_streaming_load_equals_load_then_convert(float_dir):
    assert (float_dir / "model.safetensors.index.json").exists()
    ours = AutoModelForCausalLM.from_pretrained(float_dir, quantization_config=NF4, progress=False)
    reference = transformers.AutoModelForCausalLM.from_pretrained(float_dir, dtype=torch.bfloat16)
    NF4Precision().convert_module(reference)
    a, b = nf4_state(ours), nf4_state(reference)
    assert a.keys() == b.keys() and len(a) == 14
    for name in a:
        assert torch.equal(a[name][0], b[name][0]) and torch.equal(a[name][1], b[name][1]), name
    assert type(ours.lm_head) is torch.nn.Linear and ours.lm_head.weight.dtype == torch.bfloat16
    assert torch.equal(logits(ours), logits(reference.eval()))
    assert ours.config.quantization_config.bnb_4bit_quant_type == "nf4"
    assert not any(p.device.type == "meta" for p in ours.parameters())
    assert ours.generate(IDS[:1, :4], max_new_tokens=4, do_sample=False).shape == (1, 8)


def test_the_config_carries_the_same_bitsandbytes_config_object_as_transformers(float_dir):
    """Code written for transformers + bitsandbytes reads ``model.config.quantization_config.load_in_4bit`` or its
    ``bnb_4bit_compute_dtype`` (a dtype): the same object and settings as theirs, the float modules listed besides."""
    ours = AutoModelForCausalLM.from_pretrained(float_dir, quantization_config=NF4, progress=False)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(float_dir, quantization_config=NF4)
    config = ours.config.quantization_config
    assert type(config) is BitsAndBytesConfig and config.load_in_4bit and config.bnb_4bit_compute_dtype is torch.bfloat16
    mine, reference = config.to_dict(), theirs.config.quantization_config.to_dict()
    assert mine.pop("llm_int8_skip_modules") == ["lm_head"] and reference.pop("llm_int8_skip_modules") is None
    assert mine == reference


def test_a_default_device_set_by_the_caller_does_not_reach_the_loader(float_dir):
    """Lightning runs configure_model under ``torch.device(root_device)`` (CUDA on a GPU run): the loader must still
    read into host memory and place each tensor itself. ``meta`` stands in for the GPU on a CPU machine."""
    outside = AutoModelForCausalLM.from_pretrained(float_dir, quantization_config=NF4, progress=False)
    with torch.device("meta"):
        inside = AutoModelForCausalLM.from_pretrained(float_dir, quantization_config=NF4, device="cpu", progress=False)
    assert all(t.device.type == "cpu" for t in [*inside.parameters(), *inside.buffers()])
    a, b = nf4_state(outside), nf4_state(inside)
    assert a.keys() == b.keys() and all(torch.equal(a[n][0], b[n][0]) and torch.equal(a[n][1], b[n][1]) for n in a)
    assert torch.equal(logits(outside), logits(inside))


def test_transformers_load_arguments_are_honoured_or_refused(tmp_path):
    """What a transformers user passes: ``torch_dtype`` (the older name), ``dtype="auto"`` (the checkpoint's) or a
    string, ``device_map`` naming one device; a map over devices and a non-float dtype are refused by name; and the
    folder's ``generation_config.json`` (an instruct model's end-of-turn token) comes with the model."""
    from transformers import GenerationConfig

    tiny_llama().to(torch.float16).save_pretrained(tmp_path)
    GenerationConfig(eos_token_id=[2, 77], temperature=0.6, do_sample=True).save_pretrained(tmp_path)

    def load(**kw):
        return AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=NF4, progress=False, **kw)

    assert load(torch_dtype=torch.float16).model.norm.weight.dtype == torch.float16
    assert load(dtype="auto").model.norm.weight.dtype == torch.float16  # the checkpoint's own
    assert load(dtype="float32").model.norm.weight.dtype == torch.float32
    model = load(device_map={"": "cpu"})
    assert model.model.norm.weight.device.type == "cpu" and model.generation_config.eos_token_id == [2, 77]
    with pytest.raises(ValueError, match="spreads the model over devices"):
        load(device_map="auto")
    # a map listing modules, all on one device (accelerate's infer_auto_device_map on one GPU): that device, as transformers
    assert load(device_map={"model.embed_tokens": "cpu", "model.layers": "cpu", "lm_head": "cpu"}).lm_head.weight.device.type == "cpu"
    with pytest.raises(ValueError, match="spreads the model over devices"):
        load(device_map={"model.embed_tokens": "cpu", "lm_head": "meta"})
    with pytest.raises(ValueError, match="not a floating-point torch dtype"):
        load(dtype="int8")
    with pytest.raises(ValueError, match="not both"):
        load(dtype=torch.float16, torch_dtype=torch.float16)


def _edit_saved(folder, edit_tensors, edit_quantization):
    from safetensors.torch import load_file, save_file

    state = load_file(folder / "model.safetensors")
    edit_tensors(state)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    edit_quantization(config["quantization_config"])
    (folder / "config.json").write_text(json.dumps(config))


def test_a_prequantized_checkpoint_with_codes_stored_as_bf16_loads_bit_exactly(float_dir, tmp_path):
    """bitsandbytes' ``bnb_4bit_quant_storage=bfloat16`` (the FSDP-QLoRA setting) stores the same code bytes viewed as
    bf16: a floating tensor that is not a float weight. The loader waits for its quant state instead of quantizing it."""
    ours = AutoModelForCausalLM.from_pretrained(float_dir, quantization_config=NF4, progress=False)
    ours.save_pretrained(tmp_path)

    def as_bf16(state):
        for key in [k for k in state if k + ".quant_state.bitsandbytes__nf4" in state]:
            state[key] = state[key].reshape(-1).view(torch.bfloat16).reshape(-1, 1)

    _edit_saved(tmp_path, as_bf16, lambda q: q.update(bnb_4bit_quant_storage="bfloat16"))
    again = AutoModelForCausalLM.from_pretrained(tmp_path, progress=False)
    assert nf4_state(again).keys() == nf4_state(ours).keys()
    assert torch.equal(logits(again), logits(ours))


def test_a_prequantized_checkpoint_follows_its_own_skip_list(float_dir, tmp_path):
    """transformers + bitsandbytes quantize ``lm_head`` too when ``llm_int8_skip_modules`` is given without it; such a
    checkpoint loads with ``lm_head`` in NF4 (bit-exact), and a layer its list skipped stays float."""
    from lightning_nf4.format import to_bnb_tensors

    skip = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32, llm_int8_skip_modules=["down_proj"])
    model = AutoModelForCausalLM.from_pretrained(float_dir, quantization_config=skip, progress=False)
    model.save_pretrained(tmp_path)
    head = quantize_nf4(model.lm_head.weight.detach().float(), 64, False)

    def quantized_head(state):
        state.pop("lm_head.weight")
        for suffix, tensor in to_bnb_tensors(head).items():
            state["lm_head.weight" + (f".{suffix}" if suffix else "")] = tensor.contiguous()

    _edit_saved(tmp_path, quantized_head, lambda q: q.update(llm_int8_skip_modules=["down_proj"]))
    again = AutoModelForCausalLM.from_pretrained(tmp_path, progress=False)
    assert isinstance(again.lm_head, NF4Linear) and torch.equal(again.lm_head.quant.packed, head.packed)
    assert type(again.model.layers[0].mlp.down_proj) is torch.nn.Linear
    assert isinstance(again.model.layers[0].mlp.up_proj, NF4Linear)


def test_a_checkpoint_whose_keys_transformers_renames_loads_as_transformers_loads_it(tmp_path):
    """GPT-NeoX's checkpoint stores its head as ``embed_out`` (transformers' save writes it so), which transformers
    renames to ``lm_head`` as it loads: the NF4 load does the same, and equals transformers' float load quantized."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM
    from lightning_nf4.plugins.convert import convert_linears

    torch.manual_seed(0)
    GPTNeoXForCausalLM(GPTNeoXConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=128)).save_pretrained(tmp_path)
    from safetensors import safe_open
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as saved:
        assert "embed_out.weight" in saved.keys() and "lm_head.weight" not in saved.keys()
    fp32 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    ours = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=fp32, progress=False)
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    convert_linears(reference, double_quant=False, compute_dtype=torch.float32)
    assert isinstance(ours.gpt_neox.layers[0].attention.query_key_value, NF4Linear)
    assert torch.equal(ours.lm_head.weight, reference.lm_head.weight)
    assert torch.equal(logits(ours), logits(reference))
    from lightning_nf4.loading import materialize

    deferred = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=fp32, device="meta", progress=False)
    assert torch.equal(logits(materialize(deferred, "cpu")), logits(reference))  # the meta path maps keys the same way


def test_bin_fallback_and_float_load(tmp_path):
    model = tiny_llama()
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")  # the legacy format, as older checkpoints ship it
    ours = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=NF4, progress=False)
    assert isinstance(ours.model.layers[1].mlp.down_proj, NF4Linear)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, progress=False)  # no quantization asked
    torch.testing.assert_close(logits(plain), logits(tiny_llama().eval()))


def test_tied_embeddings_stay_float_and_tied(tmp_path):
    config = tiny_llama().config
    config.tie_word_embeddings = True
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path)
    ours = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=NF4, progress=False)
    assert ours.lm_head.weight is ours.model.embed_tokens.weight


def test_skip_modules_are_honoured(float_dir):
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", llm_int8_skip_modules=["down_proj"])
    ours = AutoModelForCausalLM.from_pretrained(float_dir, quantization_config=config, progress=False)
    assert type(ours.model.layers[0].mlp.down_proj) is torch.nn.Linear
    assert isinstance(ours.model.layers[0].mlp.up_proj, NF4Linear) and not ours.model.layers[0].mlp.up_proj.double_quant


def assert_same_quant_state(ours: NF4Linear, theirs, name: str) -> None:
    """Every tensor and field of an NF4 layer's state equals bitsandbytes' ``Params4bit`` and its ``QuantState``
    (read before bitsandbytes' CPU forward repacks them for its own kernel)."""
    state = theirs.quant_state
    q = ours.quant
    assert torch.equal(ours.weight, theirs.data), name
    assert torch.equal(q.absmax, state.absmax), name  # the uint8 scale codes
    assert torch.equal(q.code, state.code), name
    assert (q.blocksize, q.dtype, tuple(q.shape)) == (state.blocksize, state.dtype, tuple(state.shape)), name
    assert q.double_quant and state.nested, name
    assert torch.equal(q.nested.absmax, state.state2.absmax), name
    assert torch.equal(q.nested.offset, state.offset), name
    assert torch.equal(q.nested.code, state.state2.code), name
    assert q.nested.blocksize == state.state2.blocksize, name


def test_prequantized_bitsandbytes_checkpoint_loads_bit_exactly(float_dir, tmp_path):
    """A bnb-4bit checkpoint written by transformers + bitsandbytes loads without re-quantizing: every NF4 layer's
    codes, scale codes, nested absmax, offset and tables equal bitsandbytes' own, so the weights decode to exactly
    what ``bitsandbytes.functional.dequantize_4bit`` gives, and the model's logits equal those of a float model
    holding bitsandbytes' dequantized weights, bit for bit."""
    pytest.importorskip("bitsandbytes")
    from bitsandbytes.functional import dequantize_4bit

    reference = transformers.AutoModelForCausalLM.from_pretrained(float_dir, quantization_config=NF4, device_map="cpu", dtype=torch.bfloat16)
    reference.save_pretrained(tmp_path)
    ours = AutoModelForCausalLM.from_pretrained(tmp_path, progress=False)  # the quantization config comes from the checkpoint
    dequantized = transformers.AutoModelForCausalLM.from_pretrained(float_dir, dtype=torch.bfloat16).eval()
    layers = {name: layer for name, layer in ours.named_modules() if isinstance(layer, NF4Linear)}
    assert len(layers) == 14
    with torch.no_grad():
        for name, layer in layers.items():
            theirs = reference.get_submodule(name).weight
            assert_same_quant_state(layer, theirs, name)
            weight = dequantize_4bit(theirs.data, theirs.quant_state)
            assert torch.equal(layer.dequantize(torch.bfloat16), weight), name
            dequantized.get_submodule(name).weight.copy_(weight)
    floats = {n: p for n, p in ours.named_parameters() if p.dtype != torch.uint8}
    assert floats.keys() == {n for n, p in reference.named_parameters() if p.dtype != torch.uint8}
    for n, p in floats.items():
        assert torch.equal(p, reference.get_parameter(n)), n
    assert torch.equal(logits(ours), logits(dequantized))


def test_our_model_saves_a_checkpoint_transformers_bitsandbytes_loads(float_dir, tmp_path):
    pytest.importorskip("bitsandbytes")
    ours = AutoModelForCausalLM.from_pretrained(float_dir, quantization_config=NF4, progress=False)
    ours.save_pretrained(tmp_path)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, device_map="cpu", dtype=torch.bfloat16)
    layers = {name: layer for name, layer in ours.named_modules() if isinstance(layer, NF4Linear)}
    assert len(layers) == 14
    for name, layer in layers.items():  # before bitsandbytes' first forward repacks its weights for its CPU kernel
        assert type(theirs.get_submodule(name)).__name__ == "Linear4bit", name
        assert_same_quant_state(layer, theirs.get_submodule(name).weight, name)
    # bitsandbytes' CPU kernel then computes with the scales rounded to bf16 (its repacked absmax is bf16), so its
    # logits are those of slightly other weights: within that rounding (measured: 4e-3 of logits up to ~1), not equal
    torch.testing.assert_close(logits(theirs), logits(ours), atol=1e-2, rtol=1e-2)


def test_loaded_model_trains_with_precision_and_lora(float_dir, tmp_path):
    import lightning.pytorch as pl

    model = CausalLM(model=AutoModelForCausalLM.from_pretrained(float_dir, quantization_config=NF4, progress=False))
    before = nf4_state(model)
    trainer = pl.Trainer(accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, plugins=NF4Precision(), callbacks=[LoRACallback(r=2, alpha=4)])
    trainer.fit(model, token_loader(n=8))
    after = {k.replace(".base_layer", ""): v for k, v in nf4_state(model).items()}
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k][0], before[k][0]) for k in before)


def test_bad_requests_fail_clearly(float_dir, tmp_path):
    with pytest.raises(NF4FormatError, match="load_in_8bit"):
        AutoModelForCausalLM.from_pretrained(float_dir, quantization_config=BitsAndBytesConfig(load_in_8bit=True))
    with pytest.raises(NF4FormatError, match="'fp4' is not supported"):
        AutoModelForCausalLM.from_pretrained(float_dir, quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="fp4"))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"cuda.* not available: (this PyTorch build|no CUDA device is visible)"):
            AutoModelForCausalLM.from_pretrained(float_dir, quantization_config=NF4, device="cuda")
    with pytest.raises(FileNotFoundError):
        AutoModelForCausalLM.from_pretrained(tmp_path / "nowhere", quantization_config=NF4)


def _copy(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_damaged_checkpoints_fail_clearly(float_dir, tmp_path):
    missing = _copy(float_dir, tmp_path / "missing")
    shard = sorted(missing.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"missing .*{shard.name}"):
        AutoModelForCausalLM.from_pretrained(missing, quantization_config=NF4, progress=False)

    truncated = _copy(float_dir, tmp_path / "truncated")
    shard = sorted(truncated.glob("model-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"model-00001-of-00002\.safetensors is truncated: its header needs \d+ bytes, the file has \d+"):
        AutoModelForCausalLM.from_pretrained(truncated, quantization_config=NF4, progress=False)

    mismatch = _copy(float_dir, tmp_path / "mismatch")
    config = json.loads((mismatch / "config.json").read_text())
    config["intermediate_size"] = 96
    (mismatch / "config.json").write_text(json.dumps(config))
    with pytest.raises((CheckpointError, NF4FormatError, RuntimeError), match="size mismatch"):
        AutoModelForCausalLM.from_pretrained(mismatch, quantization_config=NF4, progress=False)

    incomplete = _copy(float_dir, tmp_path / "incomplete")
    index = json.loads((incomplete / "model.safetensors.index.json").read_text())
    config = json.loads((incomplete / "config.json").read_text())
    config["num_hidden_layers"] = 3  # the checkpoint has only two
    (incomplete / "config.json").write_text(json.dumps(config))
    del index
    with pytest.raises(CheckpointError, match="lacks tensors"):
        AutoModelForCausalLM.from_pretrained(incomplete, quantization_config=NF4, progress=False)


@pytest.mark.parametrize("meta", [False, True], ids=["streamed", "meta_then_materialize"])
def test_an_integer_weight_of_a_layer_to_quantize_is_named_as_such(float_dir, tmp_path, meta):
    """A float checkpoint with one projection stored as int32 (transformers casts it to the model's dtype): the error
    names the weight and its dtype, not a missing quant state."""
    from safetensors.torch import load_file, save_file

    from lightning_nf4.loading import materialize

    folder = _copy(float_dir, tmp_path / "ints")
    key = "model.layers.0.self_attn.q_proj.weight"
    for shard in folder.glob("model-*.safetensors"):
        tensors = load_file(str(shard))
        if key in tensors:
            tensors[key] = tensors[key].float().mul(100).to(torch.int32)
            save_file(tensors, str(shard), metadata={"format": "pt"})
    with pytest.raises((CheckpointError, NF4FormatError), match=rf"{key}.*int32.*must be float") as info:
        model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=NF4, progress=False, device="meta" if meta else "cpu")
        materialize(model, "cpu")
    assert "bitsandbytes__nf4'; a packed" not in str(info.value)


def _llama_cpp_rows(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's converter stores q/k projections with each head's rows interleaved for its rope layout;
    transformers' GGUF reader undoes it."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def write_tiny_gguf(path, model) -> None:
    """``model`` (a tiny Llama) as a llama.cpp GGUF file: linear weights in Q8_0, norms in F32."""
    import gguf

    cfg = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"] if getattr(cfg, "rope_parameters", None) else 10000.0)
    writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_tokenizer_model("llama")
    writer.add_token_list([f"t{i}".encode() for i in range(cfg.vocab_size)])
    writer.add_token_scores([0.0] * cfg.vocab_size)
    writer.add_token_types([1] * cfg.vocab_size)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}
    per_layer = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
                 "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
                 "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for i in range(cfg.num_hidden_layers):
        names.update({f"model.layers.{i}.{hf}.weight": f"blk.{i}.{gg}.weight" for hf, gg in per_layer.items()})
    state = model.state_dict()
    for hf_name, gguf_name in names.items():
        tensor = state[hf_name].detach().float()
        if "q_proj" in hf_name or "k_proj" in hf_name:
            tensor = _llama_cpp_rows(tensor, cfg.num_attention_heads if "q_proj" in hf_name else cfg.num_key_value_heads)
        if tensor.dim() == 2:
            writer.add_tensor(gguf_name, gguf.quants.quantize(tensor.numpy(), gguf.GGMLQuantizationType.Q8_0),
                              raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(gguf_name, tensor.numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_gguf_file_is_dequantized_by_transformers_then_quantized(tmp_path):
    """``gguf_file=``: transformers reads (and dequantizes) the GGUF file, then every linear is quantized to NF4. The
    NF4 bytes equal those of transformers' own float load quantized by NF4Precision, and each weight decodes to
    the original model's within what Q8_0 plus NF4 cost (a weight read in the wrong row order would not)."""
    original = tiny_llama()
    write_tiny_gguf(tmp_path / "tiny.gguf", original)
    ours = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="tiny.gguf", quantization_config=NF4, dtype=torch.bfloat16, progress=False)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="tiny.gguf", dtype=torch.bfloat16)
    NF4Precision().convert_module(theirs)
    default = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="tiny.gguf", quantization_config=NF4, progress=False)
    assert default.dtype == transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="tiny.gguf").dtype == torch.float32
    a, b = nf4_state(ours), nf4_state(theirs)
    assert a.keys() == b.keys() and len(a) == 14
    for name in a:
        assert torch.equal(a[name][0], b[name][0]) and torch.equal(a[name][1], b[name][1]), name
        weight, reference = ours.get_submodule(name).dequantize(torch.float32), original.get_submodule(name).weight.detach()
        assert (weight - reference).norm() / reference.norm() < 0.12, name  # NF4 alone: about 0.09
    for n, p in ours.named_parameters():
        if p.dtype != torch.uint8:
            assert p.dtype == torch.bfloat16 and torch.equal(p, theirs.get_parameter(n)), n
    assert type(ours.lm_head) is torch.nn.Linear and ours.config.quantization_config.bnb_4bit_quant_type == "nf4"
    torch.testing.assert_close(logits(ours), logits(theirs.eval()), rtol=0, atol=0)
    ours.save_pretrained(tmp_path / "saved")  # no GGUF quantizer left on the model: it saves as a bnb-4bit folder
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "saved", progress=False)
    assert torch.equal(logits(again), logits(ours))


def test_a_config_that_a_prequantized_checkpoint_overrides_is_said(float_dir, tmp_path):
    """The saved codes are already quantized (double quantization on, bf16 compute): a requested config without it
    cannot change that, and the loader took the checkpoint's settings silently where transformers warns. The compute
    dtype is the caller's, in every form of the config (object, its dict), and the float parts keep the checkpoint's
    dtype (they became float32 with a bare config's default compute dtype: twice the memory)."""
    import warnings

    AutoModelForCausalLM.from_pretrained(float_dir, quantization_config=NF4, progress=False).save_pretrained(tmp_path)
    single = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=False)
    for config in (single, single.to_dict()):
        with pytest.warns(UserWarning, match="already quantized with bnb_4bit_use_double_quant=True.*False cannot change that"):
            model = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=config, progress=False)
        layer = model.model.layers[0].mlp.up_proj
        assert layer.double_quant and layer.compute_dtype == torch.float32 and model.model.embed_tokens.weight.dtype == torch.bfloat16
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=NF4, progress=False)
    assert model.model.layers[0].mlp.up_proj.compute_dtype == torch.bfloat16
