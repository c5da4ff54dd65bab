"""Streaming NF4 loading: equality with load-then-convert, pre-quantized bitsandbytes checkpoints, errors."""

import json
import logging

import pytest
import torch
import transformers
from transformers import BitsAndBytesConfig

from lightning_nf4 import LoRACallback, NF4Linear, NF4Precision
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
    assert ours.config.quantization_config["bnb_4bit_quant_type"] == "nf4"
    assert not any(p.device.type == "meta" for p in ours.parameters())
    assert ours.generate(IDS[:1, :4], max_new_tokens=4, do_sample=False).shape == (1, 8)


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


def test_prequantized_bitsandbytes_checkpoint_loads_bit_exactly(float_dir, tmp_path):
    pytest.importorskip("bitsandbytes")
    reference = transformers.AutoModelForCausalLM.from_pretrained(float_dir, quantization_config=NF4, device_map="cpu", dtype=torch.bfloat16)
    reference.save_pretrained(tmp_path)
    ours = AutoModelForCausalLM.from_pretrained(tmp_path, progress=False)  # the quantization config comes from the checkpoint
    for name, layer in ours.named_modules():
        if isinstance(layer, NF4Linear):
            theirs = reference.get_submodule(name).weight
            assert torch.equal(layer.weight, theirs.data), name
            assert torch.equal(layer.quant.absmax, theirs.quant_state.absmax), name
    torch.testing.assert_close(logits(ours), logits(reference), atol=2e-2, rtol=2e-2)


def test_our_model_saves_a_checkpoint_transformers_bitsandbytes_loads(float_dir, tmp_path):
    pytest.importorskip("bitsandbytes")
    ours = AutoModelForCausalLM.from_pretrained(float_dir, quantization_config=NF4, progress=False)
    ours.save_pretrained(tmp_path)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, device_map="cpu", dtype=torch.bfloat16)
    assert type(theirs.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    torch.testing.assert_close(logits(theirs), logits(ours), atol=2e-2, rtol=2e-2)


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
        with pytest.raises(ValueError, match=r"cuda.* not available \(found 0 cuda device"):
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
