"""MoE checkpoints streamed straight into NF4 stacked experts: per-expert tensors fused as transformers fuses them,
quantized piece by piece to the bytes of the whole stacked weight, on the streaming and the meta path."""

from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import BitsAndBytesConfig

from lightning_nf4 import LoRACallback, NF4Precision
from lightning_nf4.format.tensor import NF4Tensor
from lightning_nf4.loading import AutoModelForCausalLM, CheckpointError, materialize
from lightning_nf4.loading.experts import ExpertSources
from lightning_nf4.plugins.convert import convert_experts, convert_linears
from tests.lightning_models import CausalLM, token_loader
from tests.test_moe import expert_weights, tiny_moe

NF4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)
IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(5))
KINDS = ["mixtral", "qwen3_moe", "gpt_oss"]  # per-expert checkpoints (Mixtral's w1/w3/w2, Qwen's gate/up/down), gpt-oss stacked


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Each kind saved by transformers in its checkpoint layout, in shards small enough that one layer's experts
    span several files."""
    folders = {}
    for kind in KINDS:
        folder = tmp_path_factory.mktemp(kind)
        tiny_moe(kind).save_pretrained(folder, max_shard_size="60KB")
        assert len(list(folder.glob("*.safetensors"))) > 4
        folders[kind] = folder
    return folders


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits.float()


def float_then_converted(folder: Path):
    """transformers' own float load, then converted as NF4Precision converts it (``lm_head`` and what the model keeps
    in float32 stay float): what the plugin trains on, and what the loader must equal."""
    from lightning_nf4.plugins.convert import kept_in_float_by_model

    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    skip = ("lm_head", *kept_in_float_by_model(model))
    convert_linears(model, skip_modules=skip, compute_dtype=torch.bfloat16)
    convert_experts(model, skip_modules=skip, compute_dtype=torch.bfloat16)
    return model


def assert_same_experts(ours, reference):
    mine, theirs = expert_weights(ours), expert_weights(reference)
    assert mine.keys() == theirs.keys() and len(mine) == 4
    for name, weight in mine.items():
        assert isinstance(weight, NF4Tensor) and not weight.requires_grad, name
        a, b = weight.quant, theirs[name].quant
        for x, y in zip(a.tensors(), b.tensors()):
            assert torch.equal(x, y), name
        assert (a.shape, a.dtype, weight.dtype) == (b.shape, b.dtype, theirs[name].dtype), name


@pytest.mark.parametrize("kind", KINDS)
def test_a_moe_checkpoint_streams_into_the_experts_the_plugin_would_make(saved, kind):
    ours = AutoModelForCausalLM.from_pretrained(saved[kind], quantization_config=NF4, dtype=torch.float32, progress=False)
    reference = float_then_converted(saved[kind])
    assert_same_experts(ours, reference)
    assert torch.equal(logits(ours), logits(reference))


@pytest.mark.parametrize("kind", KINDS)
def test_the_meta_path_fills_the_same_experts(saved, kind):
    """``device="meta"`` reads nothing and holds NF4 placeholders; ``materialize`` fills them, expert by expert."""
    deferred = AutoModelForCausalLM.from_pretrained(saved[kind], quantization_config=NF4, dtype=torch.float32, device="meta", progress=False)
    placeholders = expert_weights(deferred)
    assert all(isinstance(w, NF4Tensor) and w.is_meta for w in placeholders.values())
    streamed = AutoModelForCausalLM.from_pretrained(saved[kind], quantization_config=NF4, dtype=torch.float32, progress=False)
    filled = materialize(deferred, "cpu")
    assert_same_experts(filled, streamed)
    assert torch.equal(logits(filled), logits(streamed))


@pytest.mark.parametrize("kind", ["mixtral", "gpt_oss"])
def test_a_float_load_fuses_the_experts_as_transformers_does(saved, kind):
    ours = AutoModelForCausalLM.from_pretrained(saved[kind], dtype=torch.float32, progress=False)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(saved[kind], dtype=torch.float32)
    for name, weight in expert_weights(theirs).items():
        assert torch.equal(ours.get_parameter(name), weight), name
    lazy = materialize(AutoModelForCausalLM.from_pretrained(saved[kind], dtype=torch.float32, device="meta", progress=False), "cpu")
    assert torch.equal(logits(lazy), logits(theirs))


class LargestFloat(TorchDispatchMode):
    """The most elements of any floating-point tensor an op read or wrote while active, leaving out what only
    reserves memory (``empty``), the skeleton's parameters moving to ``meta`` as they are built, and NF4 weights (codes)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outs = out if isinstance(out, (tuple, list)) else (out,)
        if func.overloadpacket in (torch.ops.aten.empty, torch.ops.aten.empty_strided) or any(
                isinstance(t, torch.Tensor) and t.is_meta for t in outs):
            return out
        for t in [*outs, *torch.utils._pytree.tree_leaves((args, kwargs))]:
            if isinstance(t, torch.Tensor) and t.is_floating_point() and not t.is_meta and not isinstance(t, NF4Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_no_stacked_float_weight_is_ever_whole(saved):
    """The point of streaming: the loader holds one expert's matrix at a time, never a layer's stacked experts in
    float (what transformers builds before any quantizer sees them)."""
    with LargestFloat() as mode:
        model = AutoModelForCausalLM.from_pretrained(saved["mixtral"], quantization_config=NF4, dtype=torch.float32, progress=False)
    expert = model.model.layers[0].mlp.experts
    one_matrix = expert.gate_up_proj.shape[1] // 2 * expert.gate_up_proj.shape[2]
    assert mode.largest <= max(one_matrix, model.lm_head.weight.numel(), model.model.embed_tokens.weight.numel())
    assert mode.largest < expert.gate_up_proj.numel()


def test_experts_named_in_skip_modules_load_in_float(saved):
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", llm_int8_skip_modules=["lm_head", "mlp.experts"])
    ours = AutoModelForCausalLM.from_pretrained(saved["mixtral"], quantization_config=config, dtype=torch.float32, progress=False)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(saved["mixtral"], dtype=torch.float32)
    for name, weight in expert_weights(theirs).items():
        assert not isinstance(ours.get_parameter(name), NF4Tensor) and torch.equal(ours.get_parameter(name), weight), name


def test_the_loaded_moe_model_trains_under_the_plugin(saved):
    """Loaded in NF4, the experts are kept as they are (not quantized again) and frozen; LoRA trains around them."""
    model = AutoModelForCausalLM.from_pretrained(saved["qwen3_moe"], quantization_config=NF4, dtype=torch.float32, progress=False).train()
    before = {n: w.quant.packed.clone() for n, w in expert_weights(model).items()}
    import lightning.pytorch as pl

    trainer = pl.Trainer(accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, plugins=NF4Precision(),
                         callbacks=[LoRACallback(r=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])])
    module = CausalLM(model)
    trainer.fit(module, train_dataloaders=token_loader())
    for name, weight in expert_weights(module.model).items():
        assert isinstance(weight, NF4Tensor) and torch.equal(weight.quant.packed, before[name.removeprefix("base_model.model.")]), name
    assert any("lora_B" in n and p.abs().sum() > 0 for n, p in module.named_parameters())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("kind", ["mixtral", "gpt_oss"])
def test_a_cuda_load_quantizes_the_experts_on_the_gpu_to_the_cpu_bytes(saved, kind):
    """Streamed and meta-loaded onto a GPU, each expert's matrix is quantized there: the same bytes as on the CPU."""
    on_cpu = AutoModelForCausalLM.from_pretrained(saved[kind], quantization_config=NF4, dtype=torch.bfloat16, progress=False)
    streamed = AutoModelForCausalLM.from_pretrained(saved[kind], quantization_config=NF4, dtype=torch.bfloat16, device="cuda", progress=False)
    deferred = AutoModelForCausalLM.from_pretrained(saved[kind], quantization_config=NF4, dtype=torch.bfloat16, device="meta", progress=False)
    lazy = materialize(deferred, "cuda")
    reference = expert_weights(on_cpu)
    for model in (streamed, lazy):
        for name, weight in expert_weights(model).items():
            assert weight.device.type == "cuda", name
            for x, y in zip(weight.quant.tensors(), reference[name].quant.tensors()):
                assert torch.equal(x.cpu(), y), name
    with torch.no_grad():
        assert torch.equal(streamed(input_ids=IDS.cuda()).logits, lazy(input_ids=IDS.cuda()).logits)


def _rewrite(folder: Path, edit) -> None:
    for file in folder.glob("*.safetensors"):
        tensors = load_file(file)
        save_file(edit(tensors), file, metadata={"format": "pt"})


def test_a_missing_expert_is_named_on_both_paths(saved, tmp_path):
    import shutil

    folder = tmp_path / "damaged"
    shutil.copytree(saved["mixtral"], folder)
    gone = "model.layers.1.block_sparse_moe.experts.2.w3.weight"
    _rewrite(folder, lambda t: {k: v for k, v in t.items() if k != gone})
    with pytest.raises(CheckpointError, match=r"lacks tensors: \['model.layers.1.mlp.experts.gate_up_proj \(1 of its 8 expert matrices\)'\]"):
        AutoModelForCausalLM.from_pretrained(folder, quantization_config=NF4, progress=False)
    with pytest.raises(CheckpointError, match=r"lacks tensors: \['model.layers.1.mlp.experts.gate_up_proj'\]"):
        AutoModelForCausalLM.from_pretrained(folder, quantization_config=NF4, device="meta", progress=False)


def test_an_expert_of_another_shape_is_named(saved, tmp_path):
    import shutil

    folder = tmp_path / "resized"
    shutil.copytree(saved["mixtral"], folder)
    key = "model.layers.0.block_sparse_moe.experts.1.w2.weight"
    _rewrite(folder, lambda t: {k: (v[:, :64].contiguous() if k == key else v) for k, v in t.items()})
    with pytest.raises(CheckpointError, match=rf"size mismatch for {key}: checkpoint has \(64, 64\), expert 1 of model.layers.0.mlp.experts.down_proj"):
        AutoModelForCausalLM.from_pretrained(folder, quantization_config=NF4, progress=False)
    with pytest.raises(CheckpointError, match=rf"size mismatch for {key}"):
        materialize(AutoModelForCausalLM.from_pretrained(folder, quantization_config=NF4, device="meta", progress=False), "cpu")


def test_a_conversion_the_loader_does_not_do_is_refused_by_name():
    """transformers converts some checkpoints' experts otherwise (interleaved gate/up rows, transposed stacks); such a
    piece is refused naming the operation and the way round, not loaded into the wrong rows."""
    from transformers.core_model_loading import Interleave, WeightConverter

    model = tiny_moe("mixtral")
    interleaved = WeightConverter(source_patterns="mlp.experts.w13_weight", target_patterns="mlp.experts.gate_up_proj", operations=[Interleave(dim=1)])
    sources = ExpertSources(model, [interleaved], {n for n, _ in model.named_parameters()})
    with pytest.raises(CheckpointError, match=r"transformers converts model.layers.0.mlp.experts.w13_weight into model.layers.0.mlp.experts.gate_up_proj with Interleave.*NF4Precision quantize it"):
        sources.piece("model.layers.0.mlp.experts.w13_weight")
    assert sources.piece("model.layers.0.self_attn.q_proj.weight") is None


@pytest.mark.timeout(900)
def test_a_moe_checkpoint_streams_into_fsdp2_shards(tmp_path):
    """``device="meta"`` under NF4FSDPStrategy on two gloo ranks: each rank fills its units from the per-expert
    checkpoint and keeps 2 of the 4 experts, byte for byte its rows of transformers' float load quantized whole, and
    the run trains what one process trains on the whole load."""
    from tests.test_fsdp import load_worker, run_worker

    worker = load_worker()
    folder = tmp_path / "hf"
    worker.shardable_mixtral().save_pretrained(folder)
    sharded = run_worker(tmp_path / "deferred", "nf4_fsdp", 2, 2, 1, checkpoint=str(folder))
    whole = run_worker(tmp_path / "whole", "auto", 1, 4, 1, checkpoint=str(folder))[0]
    loaded = expert_weights(float_then_converted(folder))
    assert len(loaded) == 4
    for rank, result in enumerate(sharded):
        for name, weight in loaded.items():
            q = weight.quant
            expected = [t.chunk(2)[rank] for t in (q.packed, q.absmax, q.nested.absmax)] + [q.nested.offset]
            got = result["base"][f"model.{name}"]
            assert len(got) == 4 and all(torch.equal(a, b) for a, b in zip(got, expected)), (rank, name)
            assert result["held"][f"model.{name}"]["rows"] == 2
    torch.testing.assert_close((sharded[0]["first_loss"] + sharded[1]["first_loss"]) / 2, whole["first_loss"], atol=1e-5, rtol=1e-5)
    assert sharded[0]["trainable"].keys() == whole["trainable"].keys()
    for name, value in whole["trainable"].items():
        torch.testing.assert_close(sharded[0]["trainable"][name], value, atol=1e-4, rtol=1e-3, msg=name)


def test_a_bitsandbytes_moe_checkpoint_loads_its_linears_as_saved_and_quantizes_its_experts(saved, tmp_path):
    """A bnb-4bit MoE checkpoint (transformers + bitsandbytes quantize the linears only and save the experts in bf16,
    per expert): the linears load as bitsandbytes wrote them, the experts are fused and quantized as the plugin
    quantizes them, so the model is what NF4Precision trains on after transformers + bitsandbytes loaded it."""
    pytest.importorskip("bitsandbytes")
    from lightning_nf4 import NF4Linear

    reference = transformers.AutoModelForCausalLM.from_pretrained(saved["mixtral"], quantization_config=NF4, device_map="cpu", dtype=torch.bfloat16)
    reference.save_pretrained(tmp_path)
    ours = AutoModelForCausalLM.from_pretrained(tmp_path, progress=False)
    linears = {n: m for n, m in ours.named_modules() if isinstance(m, NF4Linear)}
    assert len(linears) == 8
    for name, layer in linears.items():
        assert torch.equal(layer.weight, reference.get_submodule(name).weight.data), name
    convert_experts(reference, compute_dtype=torch.bfloat16)
    assert_same_experts(ours, reference)


@pytest.mark.parametrize("kind", ["mixtral", "gpt_oss"])
def test_save_pretrained_writes_nf4_experts_stacked_and_they_load_back_as_saved(saved, kind, tmp_path):
    """transformers' save_pretrained splits stacked experts back into per-expert matrices, which NF4 codes cannot take
    (it failed with 'Undefined Operation encountered!'): NF4 experts are written stacked under bitsandbytes' keys, the
    rest as usual, and both load paths read them back byte for byte. Dequantized, the model saves per expert again."""
    from lightning_nf4 import dequantize_model

    ours = AutoModelForCausalLM.from_pretrained(saved[kind], quantization_config=NF4, dtype=torch.float32, progress=False)
    ours.save_pretrained(tmp_path / "nf4")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "nf4", progress=False)
    lazy = materialize(AutoModelForCausalLM.from_pretrained(tmp_path / "nf4", device="meta", progress=False), "cpu")
    for model in (again, lazy):
        assert_same_experts(model, ours)
        assert torch.equal(logits(model), logits(ours))
    dequantize_model(ours).save_pretrained(tmp_path / "float")
    names = set(load_file(next((tmp_path / "float").glob("*.safetensors"))))
    if kind == "mixtral":  # the checkpoint's own layout again: one matrix per expert, under Mixtral's names
        assert "model.layers.0.block_sparse_moe.experts.0.w1.weight" in names and not any("gate_up_proj" in n for n in names)
    else:  # gpt-oss's checkpoints hold the experts stacked
        assert "model.layers.0.mlp.experts.gate_up_proj" in names
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "float", dtype=torch.float32)
    assert torch.equal(logits(theirs), logits(dequantize_model(again)))


def test_the_merged_export_of_nf4_experts_is_written_per_expert(saved, tmp_path):
    """The merged (float) export goes through save_pretrained too: its experts are written in the checkpoint's
    per-expert layout, as transformers writes a float model, while the NF4 model itself saves them stacked."""
    from lightning_nf4.export import save_merged

    ours = AutoModelForCausalLM.from_pretrained(saved["mixtral"], quantization_config=NF4, dtype=torch.float32, progress=False)
    save_merged(ours, tmp_path / "merged")
    names = set(load_file(next((tmp_path / "merged").glob("*.safetensors"))))
    assert "model.layers.0.block_sparse_moe.experts.0.w1.weight" in names and not any("gate_up_proj" in n for n in names)
    ours.save_pretrained(tmp_path / "nf4")  # the NF4 model's own save is still stacked afterwards
    assert "model.layers.0.block_sparse_moe.experts.gate_up_proj.absmax" in set(load_file(next((tmp_path / "nf4").glob("*.safetensors"))))
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    torch.testing.assert_close(logits(merged), logits(ours), atol=1e-2, rtol=1e-2)  # ours computes in bf16


# -- architectures with their own turns (found by using the loader on many) ---------------------------------------
SMALL = dict(vocab_size=128, hidden_size=64, intermediate_size=128, moe_intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=4, num_local_experts=4, n_routed_experts=4,
             num_experts_per_tok=2, max_position_embeddings=64, tie_word_embeddings=False, expert_intermediate_size=64,
             ffn_hidden_size=128, n_group=1, topk_group=1, first_k_dense_replace=1, n_shared_experts=1, kv_lora_rank=16,
             q_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16)


def tiny(model_type: str, folder: Path, **overrides) -> Path:
    """A random model of ``model_type`` at test size, saved by transformers in its checkpoint layout."""
    base = transformers.AutoConfig.for_model(model_type)
    config = transformers.AutoConfig.for_model(model_type, **{k: v for k, v in SMALL.items() if hasattr(base, k)}, **overrides)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(folder)
    return folder


def test_jamba_calls_its_nf4_dt_proj_as_on_a_bitsandbytes_model(tmp_path):
    """Jamba's mamba mixer reads ``dt_proj.weight`` itself unless ``config._is_quantized`` is set, as transformers'
    quantizers set it; the loader and the plugin's conversion set it (the forward failed on the packed codes), and
    ``dequantize_model`` takes it off."""
    from lightning_nf4 import dequantize_model

    folder = tiny("jamba", tmp_path / "jamba", attn_layer_offset=1, attn_layer_period=2, expert_layer_offset=1, expert_layer_period=2,
                  use_mamba_kernels=False)
    ours = AutoModelForCausalLM.from_pretrained(folder, quantization_config=NF4, dtype=torch.float32, progress=False)
    reference = float_then_converted(folder)
    assert ours.config._is_quantized and reference.config._is_quantized
    assert torch.equal(logits(ours), logits(reference))
    assert not hasattr(dequantize_model(ours).config, "_is_quantized")


def test_longcat_flash_keeps_its_router_float_on_the_loader_as_under_the_plugin(tmp_path):
    """LongcatFlash keeps ``classifier.weight`` in float32 (``_keep_in_fp32_modules``) and its router reads that weight
    itself: the loader keeps the module float, as NF4Precision does (it was quantized and the forward failed)."""
    from lightning_nf4 import NF4Linear

    folder = tiny("longcat_flash", tmp_path / "longcat")
    ours = AutoModelForCausalLM.from_pretrained(folder, quantization_config=NF4, dtype=torch.float32, progress=False)
    assert not isinstance(ours.model.layers[0].mlp.router.classifier, NF4Linear)
    assert "model.layers.0.mlp.router.classifier" in ours.config.quantization_config.llm_int8_skip_modules
    reference = float_then_converted(folder)
    assert torch.equal(logits(ours), logits(reference))


def test_a_key_that_a_rename_does_not_fit_loads_under_its_own_name(tmp_path):
    """DeepSeek-V4's rename ``.norm.`` -> ``.kv_norm.`` also meets the final ``model.norm.weight``; transformers keeps a
    key under its own name when only that fits the model, and so does the loader (it reported the norm missing)."""
    folder = tiny("deepseek_v4", tmp_path / "dsv4")
    ours = AutoModelForCausalLM.from_pretrained(folder, quantization_config=NF4, dtype=torch.float32, progress=False)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    assert torch.equal(ours.model.norm.weight, theirs.model.norm.weight)
    lazy = materialize(AutoModelForCausalLM.from_pretrained(folder, quantization_config=NF4, dtype=torch.float32, device="meta", progress=False), "cpu")
    assert torch.equal(lazy.model.norm.weight, theirs.model.norm.weight)


@pytest.mark.parametrize(("pattern", "experts_float"), [(r".*\.mlp", True), ("mlp", False), ("model.layers.1", True)])
def test_skip_patterns_read_the_same_for_experts_as_for_linears(tmp_path, pattern, experts_float):
    """``llm_int8_skip_modules`` follows transformers' reading (a path from the start, a regular expression, a suffix)
    for the experts as for the linears: a regex that keeps a layer's MLP linears float keeps its experts float too (it
    quantized them), and ``mlp`` alone, which keeps no linear, keeps no experts."""
    from lightning_nf4.plugins.convert import nf4_expert_weights, nf4_layers

    folder = tiny("qwen2_moe", tmp_path / "qwen2", shared_expert_intermediate_size=64)
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", llm_int8_skip_modules=["lm_head", pattern])
    ours = AutoModelForCausalLM.from_pretrained(folder, quantization_config=config, progress=False)
    float_linears = {n for n, m in ours.named_modules() if type(m) is torch.nn.Linear and ".mlp." in n}
    quantized = {n for n, _ in nf4_expert_weights(ours)}
    layer = "model.layers.1" if pattern == "model.layers.1" else "model.layers.0"
    assert bool(float_linears) == experts_float
    assert (f"{layer}.mlp.experts.gate_up_proj" not in quantized) == experts_float
    assert any(".mlp." in n for n, _ in nf4_layers(ours)) or experts_float


def test_the_meta_path_names_a_config_with_fewer_experts_than_the_checkpoint(saved, tmp_path):
    import json
    import shutil

    folder = tmp_path / "fewer"
    shutil.copytree(saved["mixtral"], folder)
    config = json.loads((folder / "config.json").read_text())
    config["num_local_experts"] = 2
    (folder / "config.json").write_text(json.dumps(config))
    for device in ("cpu", "meta"):
        with pytest.raises(CheckpointError, match=r"names expert [23], but model.layers.\d.mlp.experts.\w+ holds 2 experts: the config's expert count"):
            AutoModelForCausalLM.from_pretrained(folder, quantization_config=NF4, device=device, progress=False)


# -- after loading: what users do next ------------------------------------------------------------------------
def test_a_meta_loaded_model_trains_under_one_process_as_if_loaded_on_the_device(saved):
    """Outside nf4_fsdp a model loaded with device="meta" is read whole onto the training device when the plugin
    converts it (the strategy's move failed with 'Cannot copy out of meta tensor'): the run equals one from a model
    loaded on the CPU."""
    import lightning.pytorch as pl

    def run(device):
        pl.seed_everything(0)
        model = AutoModelForCausalLM.from_pretrained(saved["mixtral"], quantization_config=NF4, dtype=torch.float32, device=device, progress=False)
        module = CausalLM(model.train())
        trainer = pl.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False, plugins=NF4Precision(),
                             callbacks=[LoRACallback(r=4, target_modules=["q_proj", "v_proj"], init_seed=0)])
        trainer.fit(module, train_dataloaders=token_loader())
        return {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}, expert_weights(module.model)

    (deferred, deferred_experts), (loaded, loaded_experts) = run("meta"), run("cpu")
    assert deferred.keys() == loaded.keys() and deferred
    for name, value in loaded.items():
        assert torch.equal(deferred[name], value), name
    for name, weight in loaded_experts.items():
        assert torch.equal(deferred_experts[name].quant.packed, weight.quant.packed), name


def test_fabric_reads_a_meta_loaded_model_with_its_peft_adapters(saved):
    """Fabric (no sharding) reads a meta-loaded model wrapped by PEFT whole at setup: the base from the checkpoint,
    the adapters drawn as PEFT draws them for their ``init_lora_weights`` ("gaussian": A of std 1/r, B zero)."""
    import lightning as L
    from peft import get_peft_model

    from lightning_nf4 import NF4FabricPrecision
    from lightning_nf4.layers.lora import lora_config

    deferred = AutoModelForCausalLM.from_pretrained(saved["mixtral"], quantization_config=NF4, dtype=torch.float32, device="meta", progress=False)
    model = get_peft_model(deferred, lora_config(r=8, target_modules=["q_proj", "v_proj"], init_lora_weights="gaussian"))
    fabric = L.Fabric(accelerator="cpu", devices=1, plugins=NF4FabricPrecision(device="cpu"))  # where the reference quantizes
    model = fabric.setup_module(model)
    assert not any(p.is_meta for p in model.parameters())
    a = torch.cat([p.detach().flatten() for n, p in model.named_parameters() if "lora_A" in n])
    assert abs(float(a.std()) - 1 / 8) < 0.02
    assert all(not p.any() for n, p in model.named_parameters() if "lora_B" in n)
    loaded = AutoModelForCausalLM.from_pretrained(saved["mixtral"], quantization_config=NF4, dtype=torch.float32, progress=False)
    assert_same_experts(model.module.base_model.model, loaded)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=IDS).logits.float(), logits(loaded), atol=1e-2, rtol=1e-2)


def test_peft_inits_on_a_meta_loaded_model_are_drawn_or_refused(saved):
    """PEFT's ``init_lora_weights=False`` draws both matrices (nn.Linear's init: B is not zero); an init computed from
    the base weights cannot run on a model read piece by piece and is refused by name."""
    from peft import get_peft_model

    from lightning_nf4.layers.lora import lora_config
    from lightning_nf4.strategies import NF4ShardingConfigError
    from lightning_nf4.strategies.fsdp import init_adapter, read_deferred

    deferred = AutoModelForCausalLM.from_pretrained(saved["mixtral"], quantization_config=NF4, dtype=torch.float32, device="meta", progress=False)
    model = get_peft_model(deferred, lora_config(r=4, target_modules=["q_proj"], init_lora_weights=False))
    assert read_deferred(model, torch.device("cpu"))
    assert all(p.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    with pytest.raises(NF4ShardingConfigError, match=r"init_lora_weights='olora' \(adapter 'default'\) computes the adapters from the base weights"):
        init_adapter(layer, "default", "olora")


def test_a_plugin_setting_that_cannot_change_loaded_weights_is_said(saved):
    loaded = AutoModelForCausalLM.from_pretrained(saved["qwen3_moe"], quantization_config=NF4, dtype=torch.float32, progress=False)
    with pytest.warns(UserWarning, match=r"NF4Precision\(blocksize=64, double_quant=False\) applies to the weights it quantizes; 12 NF4 weights came"):
        NF4Precision(double_quant=False).convert_module(loaded)


def test_dequantize_model_of_a_peft_model_with_expert_lora_is_refused_or_done_cleanly(saved):
    """PEFT wrappers forward attribute reads to the model they wrap; the record of the conversions left out for NF4
    experts is each model's own (dequantize_model of a PeftModel failed with AttributeError on it)."""
    from peft import LoraConfig, get_peft_model

    from lightning_nf4 import dequantize_model

    loaded = AutoModelForCausalLM.from_pretrained(saved["mixtral"], quantization_config=BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", llm_int8_skip_modules=["lm_head", "self_attn", "gate"]), dtype=torch.float32, progress=False)
    model = get_peft_model(loaded, LoraConfig(r=4, target_modules=[], target_parameters=["experts.gate_up_proj"]))
    with torch.no_grad():
        before = model(input_ids=IDS).logits
    dequantize_model(model)
    assert not any(isinstance(p, NF4Tensor) for p in model.parameters())
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=IDS).logits, before, atol=1e-2, rtol=1e-2)
