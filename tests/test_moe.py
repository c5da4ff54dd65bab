"""Mixture-of-experts models: transformers 5 stacks each layer's experts into ``[experts, out, in]`` parameters, which
``NF4Precision`` quantizes to ``NF4Tensor`` (bitsandbytes' layout of the whole tensor), leaving the experts module and
its forward (eager, ``batched_mm``, ``grouped_mm``) as transformers wrote them."""

import copy
import io
import json
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from lightning_nf4 import LoRACallback, NF4Precision, dequantize_model
from lightning_nf4.format import quantize_nf4
from lightning_nf4.format.tensor import NF4Tensor, expert_slice
from lightning_nf4.layers.experts import dequantize_experts
from lightning_nf4.plugins.convert import convert_experts, convert_linears
from tests import isolated
from tests.lightning_models import CausalLM, token_loader

aten = torch.ops.aten


def tiny_moe(kind: str = "mixtral", implementation: str = "eager", seed: int = 0):
    """A two-layer MoE model of ``kind`` with 4 experts, top-2 routing."""
    import transformers

    torch.manual_seed(seed)
    common = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  num_experts_per_tok=2, max_position_embeddings=64, tie_word_embeddings=False)
    if kind == "mixtral":
        config = transformers.MixtralConfig(intermediate_size=128, num_local_experts=4, **common)
        cls = transformers.MixtralForCausalLM
    elif kind == "qwen3_moe":
        config = transformers.Qwen3MoeConfig(moe_intermediate_size=128, intermediate_size=128, num_experts=4, head_dim=16, **common)
        cls = transformers.Qwen3MoeForCausalLM
    else:  # gpt-oss: experts stored transposed ([experts, in, out]) and with biases
        config = transformers.GptOssConfig(intermediate_size=64, num_local_experts=4, head_dim=16, layer_types=["full_attention"] * 2, **common)
        cls = transformers.GptOssForCausalLM
    return cls._from_config(config, experts_implementation=implementation).float()


def expert_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if n.endswith(("gate_up_proj", "down_proj")) and p.dim() == 3}


def with_float_experts(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A copy of ``model`` whose NF4 expert weights are float ``dtype`` parameters: what the NF4 model stands for."""
    reference = copy.deepcopy(model)
    for sub in reference.modules():
        dequantize_experts(sub, dtype)
    return reference


# -- the weight's type: one expert, transposes, and the matmuls on the stacked weight ------------------------
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("shape", [(4, 128, 128), (3, 64, 96)], ids=["whole_groups", "experts_across_scale_groups"])
def test_each_expert_reads_as_its_part_of_the_whole_weight(shape, double_quant):
    """An expert is its rows of the dequantized stack, bit for bit, also when it starts inside a group of nested scales
    (3 x 64 x 96: 6144 elements an expert, 16384 a group)."""
    torch.manual_seed(0)
    quant = quantize_nf4(torch.randn(shape), 64, double_quant)
    whole = quant.dequantize(torch.float32)
    weight = NF4Tensor(quant, dtype=torch.bfloat16)
    for e in range(shape[0]):
        expert = weight[e]
        assert isinstance(expert, NF4Tensor) and expert.shape == shape[1:]
        assert torch.equal(expert.dequantize(torch.float32), whole[e])
        assert torch.equal(expert_slice(quant, e - shape[0]).dequantize(torch.float32), whole[e])  # negative index
    with pytest.raises(IndexError, match="out of"):
        weight[shape[0]]
    with pytest.raises(IndexError, match=f"index {shape[0]} is out of range for {shape[0]} experts"):
        expert_slice(quant, shape[0])


def test_matmuls_on_the_stacked_weight_equal_those_on_its_float_form():
    torch.manual_seed(0)
    quant = quantize_nf4(torch.randn(4, 32, 64), 64, True)
    weight, plain = NF4Tensor(quant, dtype=torch.float32), quant.dequantize(torch.float32)
    x = torch.randn(5, 64)
    assert torch.equal(nn.functional.linear(x, weight[2]), nn.functional.linear(x, plain[2]))  # t + mm
    assert torch.equal(torch.addmm(torch.ones(32), x, weight[1].t()), torch.addmm(torch.ones(32), x, plain[1].t()))
    assert weight.transpose(-2, -1).shape == (4, 64, 32) and weight.transpose(-2, -1).transpose(1, 2).shape == (4, 32, 64)
    assert torch.equal(torch.bmm(weight, torch.randn(4, 64, 3).fill_(0.5)), torch.bmm(plain, torch.full((4, 64, 3), 0.5)))
    ids = torch.tensor([3, 0, 3])
    assert torch.equal(weight[ids], plain[ids])
    offs = torch.tensor([2, 2, 4, 5], dtype=torch.int32)
    got = torch._grouped_mm(x, weight.transpose(-2, -1), offs=offs)
    assert torch.equal(got, torch._grouped_mm(x, plain.transpose(-2, -1), offs=offs))
    # what grouped-matmul fallbacks do with the stacked weight (transformers' custom op, or a loop with out= buffers)
    buffer, expect = torch.empty(5, 32), torch.empty(5, 32)
    torch.mm(x, weight.transpose(-2, -1)[3], out=buffer)  # one expert of the transposed stack (transformers 5.17's loop)
    assert torch.equal(buffer, torch.mm(x, plain[3].t(), out=expect))
    grad = torch.randn(5, 32)
    assert torch.equal(torch.mm(grad, weight.transpose(-2, -1)[3].T), torch.mm(grad, plain[3]))  # .T is a permute
    assert weight.permute(0, 2, 1).shape == (4, 64, 32) and weight.permute(0, 1, 2).shape == (4, 32, 64)
    with pytest.raises(NotImplementedError, match="permutes its last two dims only"):
        weight.permute(1, 0, 2)
    assert torch.equal(torch.zeros_like(weight), torch.zeros(4, 32, 64)) and torch.empty_like(weight).shape == (4, 32, 64)
    import transformers.integrations.moe  # noqa: F401  (registers transformers::grouped_mm_fallback)

    if hasattr(torch.ops.transformers, "grouped_mm_fallback"):
        xs = x.clone().requires_grad_()
        out = torch.ops.transformers.grouped_mm_fallback(xs, weight.transpose(-2, -1), offs)
        assert torch.equal(out, torch._grouped_mm(x, plain.transpose(-2, -1), offs=offs))
        out.sum().backward()
        ref = x.clone().requires_grad_()
        torch.ops.transformers.grouped_mm_fallback(ref, plain.transpose(-2, -1), offs).sum().backward()
        torch.testing.assert_close(xs.grad, ref.grad)
    with pytest.raises(NotImplementedError, match="Dequantize it first"):
        weight + 1
    with pytest.raises(NotImplementedError, match="last two dims only"):
        weight.transpose(0, 1)


def test_autograd_keeps_the_nf4_weight_not_a_float_copy():
    """The input's gradient is right, and what the matmul saves for it is the NF4 weight (its packed bytes)."""
    torch.manual_seed(0)
    quant = quantize_nf4(torch.randn(2, 32, 64), 64, True)
    weight, plain = NF4Tensor(quant, dtype=torch.float32), quant.dequantize(torch.float32)
    saved = []
    x = torch.randn(5, 64, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(type(t)) or t, lambda t: t):
        y = nn.functional.linear(x, weight[1])
    y.sum().backward()
    ref = torch.randn(5, 64).copy_(x.detach()).requires_grad_()
    nn.functional.linear(ref, plain[1]).sum().backward()
    assert torch.equal(x.grad, ref.grad)
    assert NF4Tensor in saved and all(t is NF4Tensor for t in saved)


# -- the plugin: experts quantized, the model as transformers runs it --------------------------------------
@pytest.mark.parametrize("kind,implementation", [
    ("mixtral", "eager"), ("mixtral", "grouped_mm"), ("mixtral", "batched_mm"), ("qwen3_moe", "grouped_mm"), ("gpt_oss", "eager"),
])
def test_trainer_quantizes_experts_and_trains_lora_around_them(kind, implementation):
    model = tiny_moe(kind, implementation)
    floats = {n: p.detach().clone() for n, p in expert_weights(model).items()}
    module = CausalLM(model)
    trainer = pl.Trainer(max_steps=2, accelerator="cpu", plugins=NF4Precision(device="cpu"), logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[LoRACallback(r=4, alpha=8, target_modules=["q_proj", "v_proj"])])
    trainer.fit(module, token_loader(n=8))
    experts = expert_weights(model)
    assert experts.keys() == floats.keys() and len(experts) == 4
    for name, param in experts.items():  # quantized as bitsandbytes quantizes the whole stack, and frozen
        assert isinstance(param, NF4Tensor) and not param.requires_grad and param.dtype == torch.bfloat16
        expect = quantize_nf4(floats[name], 64, True)
        assert torch.equal(param.quant.packed, expect.packed) and torch.equal(param.quant.absmax, expect.absmax), name
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)  # the adapters trained through the NF4 experts
    # the model computes exactly what the same model with the dequantized experts in float computes
    reference = with_float_experts(model.eval(), torch.bfloat16)  # eval: LoRA's dropout off
    ids = torch.randint(0, 128, (2, 16))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(model(ids).logits, reference(ids).logits)


def test_conversion_reports_and_shrinks_the_experts(caplog):
    model = tiny_moe()
    before = sum(p.numel() * 4 for p in expert_weights(model).values())
    module = CausalLM(model)
    plugin = NF4Precision(device="cpu")
    with caplog.at_level("INFO"):
        plugin.convert_module(module)
    assert "quantized 8 linear layers and 4 stacked expert weights" in caplog.text
    after = sum(p.quant.nbytes for p in expert_weights(model).values())
    assert after < 0.15 * before  # 4.5 bits of 32
    assert plugin.convert_module(module) is module and all(isinstance(p, NF4Tensor) for p in expert_weights(model).values())


def test_skip_modules_keeps_experts_in_float():
    model = tiny_moe()
    NF4Precision(device="cpu", skip_modules=["lm_head", "experts"]).convert_module(CausalLM(model))
    assert not any(isinstance(p, NF4Tensor) for p in expert_weights(model).values())
    assert convert_experts(model, skip_modules=()) == 0  # marked: no later conversion takes them either


def test_a_model_of_experts_only_is_converted():
    """No nn.Linear to quantize is no error when the model has expert weights."""
    model = tiny_moe()
    NF4Precision(device="cpu", skip_modules=["self_attn", "lm_head"]).convert_module(CausalLM(model))
    assert all(isinstance(p, NF4Tensor) for p in expert_weights(model).values())


# -- state dicts, checkpoints, exports ----------------------------------------------------------------------
def test_state_dict_holds_bitsandbytes_keys_and_loads_back():
    model = tiny_moe()
    convert_linears(model)
    convert_experts(model)
    state = model.state_dict()
    key = "model.layers.0.mlp.experts.gate_up_proj"
    assert state[key].dtype == torch.uint8 and type(state[key]) is torch.Tensor
    assert {f"{key}.absmax", f"{key}.quant_map", f"{key}.nested_absmax", f"{key}.quant_state.bitsandbytes__nf4"} <= set(state)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)  # plain tensors only
    fresh = tiny_moe(seed=1)
    convert_linears(fresh)
    convert_experts(fresh)
    param = fresh.get_parameter(key)
    assert not torch.equal(param.quant.packed, model.get_parameter(key).quant.packed)
    assert fresh.load_state_dict(loaded, strict=True).unexpected_keys == []
    assert fresh.get_parameter(key) is param  # loaded in place
    for name, value in expert_weights(model).items():
        assert torch.equal(fresh.get_parameter(name).dequantize(), value.dequantize()), name


@pytest.mark.parametrize("kind,device", [
    ("mixtral", "cpu"), ("gpt_oss", "cpu"),
    pytest.param("mixtral", "cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")),
])
def test_to_empty_keeps_nf4_experts_for_load_state_dict_to_fill(kind, device):
    """``model.to("meta")`` then ``to_empty(device=...)`` (how a model is rebuilt before loading a checkpoint): the
    experts stay NF4 placeholders of their layout, so that the checkpoint's bitsandbytes keys fill them byte for byte."""
    model = tiny_moe(kind)
    convert_linears(model)
    convert_experts(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    buffers = {n: b.clone() for n, b in model.named_buffers()}  # non-persistent (rotary): to_empty loses them
    shapes = {n: w.shape for n, w in expert_weights(model).items()}
    ids = torch.randint(0, 128, (2, 8))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    model.to("meta").to_empty(device=device)
    for name, weight in expert_weights(model).items():
        assert isinstance(weight, NF4Tensor) and weight.device.type == device, name
        assert weight.shape == shapes[name], name
    assert model.load_state_dict(state, strict=True).unexpected_keys == []
    for name, buffer in model.named_buffers():
        buffer.copy_(buffers[name])
    for name, weight in expert_weights(model).items():
        assert torch.equal(weight.quant.packed.cpu(), state[name]) and torch.equal(weight.quant.absmax.cpu(), state[name + ".absmax"]), name
    model.cpu()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, expected)


def test_a_float_state_dict_is_quantized_on_load_and_a_wrong_shape_is_named():
    model, source = tiny_moe(), tiny_moe(seed=1)
    convert_experts(model)
    floats = {k: v for k, v in source.state_dict().items()}
    model.load_state_dict(floats)
    key = "model.layers.1.mlp.experts.down_proj"
    assert torch.equal(model.get_parameter(key).quant.packed, quantize_nf4(floats[key], 64, True).packed)
    floats[key] = floats[key][:, :, :64]
    with pytest.raises(RuntimeError, match=r"size mismatch for model.layers.1.mlp.experts.down_proj: checkpoint has shape \(4, 64, 64\)"):
        model.load_state_dict(floats)


def test_dequantize_model_gives_float_experts_back():
    model = tiny_moe()
    convert_experts(model)
    quantized = {n: p.quant.dequantize(torch.float32) for n, p in expert_weights(model).items()}
    dequantize_model(model)
    for name, param in expert_weights(model).items():
        assert type(param) is nn.Parameter and param.dtype == torch.float32 and torch.equal(param.data, quantized[name])


def test_peft_lora_on_nf4_experts_with_target_parameters():
    """PEFT's ``target_parameters`` LoRA on the stacked experts adds its update to the dequantized weight (NF4Tensor
    answers its ``baddbmm``): same outputs and adapter gradients as on the float experts the NF4 ones stand for."""
    from peft import get_peft_model

    from lightning_nf4.layers.lora import lora_config

    model = tiny_moe()
    convert_linears(model)
    convert_experts(model, compute_dtype=torch.float32)
    reference = with_float_experts(model, torch.float32)
    config = dict(r=4, lora_alpha=8, target_modules=["q_proj"], target_parameters=["experts.gate_up_proj", "experts.down_proj"], init_lora_weights=False)
    ids = torch.randint(0, 128, (2, 16))
    grads = []
    for base in (model, reference):
        torch.manual_seed(3)
        peft_model = get_peft_model(base, lora_config(**config))
        loss = peft_model(ids, labels=ids).loss
        loss.backward()
        grads.append({n: p.grad for n, p in peft_model.named_parameters() if p.requires_grad})
    assert any("experts" in n for n in grads[0]) and grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-5, rtol=1e-4, msg=name)


def test_peft_wrapped_experts_are_converted_under_their_lora():
    """A model wrapped with PEFT's ``target_parameters`` LoRA before the plugin runs: the experts under it are quantized,
    not refused (only a linear under such LoRA is refused)."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_moe(), LoraConfig(r=4, target_modules=[], target_parameters=["experts.gate_up_proj"]))
    NF4Precision(device="cpu", compute_dtype=torch.float32).convert_module(CausalLM(model))
    assert sum(isinstance(p, NF4Tensor) for p in model.parameters()) == 4
    ids = torch.randint(0, 128, (2, 16))
    model(ids, labels=ids).loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "experts.lora_B" in n)


# -- several processes: DDP and FSDP2 on two gloo ranks, against one process -----------------------------------
WORKER = Path(__file__).with_name("fsdp_worker.py")


def _run(out: Path, strategy: str, devices: int, batch_size: int):
    args = [sys.executable, str(WORKER), str(out), strategy, str(devices), str(batch_size), "2"]
    done = isolated.run(args, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    return [torch.load(out / f"rank{r}.pt") for r in range(devices)]


@pytest.mark.timeout(900)
def test_moe_under_ddp_and_fsdp2_matches_one_process(tmp_path):
    single = _run(tmp_path / "single", "auto+moe", 1, 4)[0]
    ddp = _run(tmp_path / "ddp", "ddp+moe", 2, 2)
    fsdp = _run(tmp_path / "fsdp", "nf4_fsdp+moe", 2, 2)
    experts = [n for n in single["held"] if n.endswith(("gate_up_proj", "down_proj"))]
    assert len(experts) == 4
    # DDP leaves the NF4 experts out of its sync; FSDP2 gives each rank 2 of the 4 experts, still packed
    assert set(experts) <= set(ddp[0]["ddp_ignored"])
    for name in experts:
        held = fsdp[0]["held"][name]
        assert (held["rows"], held["full_rows"], held["dtype"]) == (2, 4, "torch.uint8")
        assert held["bytes"] < single["held"][name]["bytes"] * 0.6
    for run in (ddp, fsdp):
        assert run[0]["trainable"].keys() == single["trainable"].keys()
        for name, value in run[0]["trainable"].items():
            torch.testing.assert_close(value, single["trainable"][name], atol=1e-4, rtol=1e-3, msg=name)
    # the merged exports hold the checkpoint's per-expert layout (the sharded one too), load in transformers and
    # compute the same model
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    def keys(run):
        files = sorted((tmp_path / run / "export" / "merged").glob("*.safetensors"))
        return sorted(k for f in files for k in safe_open(str(f), "pt").keys())

    assert "model.layers.0.block_sparse_moe.experts.3.w2.weight" in keys("single")
    assert keys("fsdp") == keys("single") == keys("ddp")
    for run in ("single", "fsdp"):  # as save_pretrained records it (FSDP2's class is FSDPMixtralForCausalLM)
        config = json.loads((tmp_path / run / "export" / "merged" / "config.json").read_text())
        assert config["architectures"] == ["MixtralForCausalLM"], run

    ids = torch.randint(0, 128, (2, 16))
    logits = [AutoModelForCausalLM.from_pretrained(tmp_path / run / "export" / "merged").eval()(ids).logits for run in ("single", "ddp", "fsdp")]
    for other in logits[1:]:
        torch.testing.assert_close(other, logits[0], atol=1e-3, rtol=1e-3)


def test_fabric_trains_peft_lora_on_nf4_experts():
    """Fabric with a model wrapped by PEFT (attention projections and the stacked experts): the experts become NF4 at
    ``setup``, an optimizer made before it over every parameter is refused (it would keep the float experts alive),
    and one made after trains the adapters with the experts unchanged."""
    import lightning as L
    from peft import LoraConfig, get_peft_model

    from lightning_nf4 import NF4FabricPrecision

    model = get_peft_model(tiny_moe(), LoraConfig(r=4, target_modules=["q_proj"], target_parameters=["experts.down_proj"]))
    fabric = L.Fabric(accelerator="cpu", devices=1, plugins=NF4FabricPrecision(skip_modules=("lm_head", "self_attn")))  # experts only
    stale = torch.optim.AdamW(model.parameters())
    model = fabric.setup_module(model)
    experts = {n: p.quant.packed.clone() for n, p in model.named_parameters() if isinstance(p, NF4Tensor)}
    assert len(experts) == 4
    stale_opt = fabric.setup_optimizers(stale)
    ids = torch.randint(0, 128, (2, 16))
    fabric.backward(model(ids, labels=ids).loss)
    with pytest.raises(Exception, match="holds 4 weights that NF4FabricPrecision quantized"):  # the 4 float expert stacks
        stale_opt.step()
    optimizer = fabric.setup_optimizers(torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2))
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    for _ in range(2):
        optimizer.zero_grad()
        fabric.backward(model(ids, labels=ids).loss)
        optimizer.step()
    moved = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, trained[n])]
    assert any("experts.lora" in n for n in moved) and any("q_proj.lora" in n for n in moved)
    for name, packed in experts.items():
        assert torch.equal(model.get_parameter(name).quant.packed, packed)
    # an optimizer made after setup over every parameter holds the NF4 expert stacks themselves: refused as well
    every = fabric.setup_optimizers(torch.optim.AdamW(model.parameters()))
    fabric.backward(model(ids, labels=ids).loss)
    with pytest.raises(Exception, match="holds 4 weights that NF4FabricPrecision quantized"):
        every.step()


def test_compiled_decoder_layers_run_nf4_experts():
    """``torch.compile`` on each decoder layer (``LoRACallback(compile=True)``'s switch) traces through the NF4 experts'
    grouped matmul (before torch 2.13 runs them eagerly between compiled parts): the same outputs and input gradients
    as eager."""
    from lightning_nf4.plugins.compile import compile_blocks

    model = tiny_moe(implementation="grouped_mm")
    convert_experts(model, compute_dtype=torch.float32)
    eager = copy.deepcopy(model)
    compile_blocks(model)
    assert_same_outputs_and_input_gradients(model, eager)


def assert_same_outputs_and_input_gradients(model: nn.Module, eager: nn.Module) -> None:
    """A compiled model against its eager copy: logits and the embeddings' gradient of one step, to 1e-5."""
    ids = torch.randint(0, 128, (2, 16))
    results = []
    for m in (model, eager):
        m.model.embed_tokens.weight.requires_grad_(True)
        out = m(ids, labels=ids)
        out.loss.backward()
        results.append((out.logits.detach(), m.model.embed_tokens.weight.grad))
    torch.testing.assert_close(results[0][0], results[1][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(results[0][1], results[1][1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("implementation", ["grouped_mm", "eager"])
def test_before_torch_2_13_nf4_experts_run_eagerly_inside_compiled_layers(monkeypatch, implementation):
    """torch 2.11's compiler fails inside transformers' experts on an NF4Tensor weight; there ``compile_blocks`` leaves
    the experts' forward out of the graph (the rest of the layer compiled): the same outputs and gradients as eager,
    and the experts' code runs outside the compiler. (Here on torch 2.13 the fallback is switched on by hand.)"""
    from lightning_nf4.plugins import compile as compiling

    model = tiny_moe(implementation=implementation)
    convert_experts(model, compute_dtype=torch.float32)
    cls = type(model.model.layers[0].mlp.experts)
    seen = []
    original = cls.forward

    def probed(self, *args, **kwargs):
        seen.append(torch.compiler.is_compiling())
        return original(self, *args, **kwargs)

    monkeypatch.setattr(cls, "forward", probed)  # the class's own forward comes back after the test
    monkeypatch.setattr(compiling, "COMPILER_TRACES_NF4_EXPERTS", False)
    eager = copy.deepcopy(model)
    compiling.compile_blocks(model)
    assert getattr(cls.forward, "_nf4_eager", False)
    assert_same_outputs_and_input_gradients(model, eager)
    assert seen and not any(seen)  # every experts call ran eagerly, the compiled layers' included
    torch._dynamo.reset()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("implementation", ["grouped_mm", "eager"])
def test_cuda_quantizes_experts_on_the_gpu_and_trains(implementation):
    """On a GPU: the experts are quantized there (the codes as on the CPU), transformers' grouped matmul (torch's own
    kernel on the GPU) or eager loop reads them, and the model computes what it computes with the experts in float."""
    model = tiny_moe("qwen3_moe", implementation)
    floats = {n: p.detach().clone() for n, p in expert_weights(model).items()}
    trainer = pl.Trainer(max_steps=2, accelerator="gpu", devices=1, plugins=NF4Precision(), logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[LoRACallback(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])])
    devices = []

    class Where(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            devices.extend(p.quant.packed.device.type for p in expert_weights(pl_module).values())

    trainer.callbacks.append(Where())
    trainer.fit(CausalLM(model), token_loader(n=8))
    assert devices == ["cuda"] * 4  # quantized and trained there (Lightning moves the model back to the CPU after fit)
    for name, param in expert_weights(model).items():
        assert isinstance(param, NF4Tensor)
        assert torch.equal(param.quant.packed.cpu(), quantize_nf4(floats[name], 64, True).packed), name
    model.cuda().eval()
    reference = with_float_experts(model, torch.bfloat16)
    ids = torch.randint(0, 128, (2, 16), device="cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        assert torch.equal(model(ids).logits, reference(ids).logits)


def test_experts_quantized_earlier_compute_in_the_plugins_dtype():
    """Experts already in NF4 for bf16 (``convert_experts``' default) under a float32 plugin: they dequantize to
    float32, as NF4 layers take the plugin's compute dtype, and the model runs without autocast."""
    model = tiny_moe()
    convert_experts(model)
    assert {p.dtype for p in expert_weights(model).values()} == {torch.bfloat16}
    NF4Precision(device="cpu", compute_dtype=torch.float32).convert_module(CausalLM(model))
    assert {p.dtype for p in expert_weights(model).values()} == {torch.float32}
    reference = with_float_experts(model, torch.float32)
    ids = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)


@pytest.mark.parametrize("implementation", ["eager", "batched_mm", "grouped_mm"])
def test_float32_activations_outside_autocast_run_against_bf16_experts(implementation):
    """After training in bf16 (the default compute dtype), the model runs outside autocast too, as its NF4 layers do
    (``generate`` or a check after ``fit``): the experts dequantize to the activations' float32, or to the dtype they
    were quantized from where a gather meets no activations."""
    model = tiny_moe(implementation=implementation).eval()
    NF4Precision(device="cpu").convert_module(CausalLM(model))
    reference = with_float_experts(model, torch.float32)
    ids = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.dtype == torch.float32
    tolerance = 2e-2 if implementation == "grouped_mm" else 1e-5  # transformers casts grouped_mm's input to the weight's bf16
    with torch.no_grad():
        torch.testing.assert_close(logits, reference(ids).logits, atol=tolerance, rtol=tolerance)


def test_experts_without_whole_blocks_read_from_the_whole_weight():
    """An expert of 36 x 18 elements (not whole 64-element blocks) cannot be sliced: the eager loop gets it dequantized
    from the whole weight, so such a model runs (and matches its float form) instead of failing at its first forward."""
    import transformers

    torch.manual_seed(0)
    config = transformers.Qwen3MoeConfig(vocab_size=64, hidden_size=36, moe_intermediate_size=18, intermediate_size=36, num_experts=4,
                                         num_experts_per_tok=2, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=18)
    float_model = transformers.Qwen3MoeForCausalLM._from_config(config, experts_implementation="eager").float().eval()
    model = copy.deepcopy(float_model)
    convert_experts(model, compute_dtype=torch.float32)
    reference = with_float_experts(model, torch.float32)
    ids = torch.randint(0, 64, (2, 8))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)
    # computing in bf16 (the default), float32 activations outside autocast still run: such an expert comes in the
    # dtype the weight was quantized from (it came in bf16 and the matmul failed), as whole-block experts follow them
    bf16 = copy.deepcopy(float_model)
    convert_experts(bf16, compute_dtype=torch.bfloat16)
    with torch.no_grad():
        assert bf16(ids).logits.dtype == torch.float32
        assert torch.equal(bf16(ids).logits, model(ids).logits)


def test_share_memory_shares_the_codes():
    """``model.share_memory()`` (torch.multiprocessing's Hogwild pattern) moves the NF4 codes and scales to shared
    memory instead of crashing on the weight's empty wrapper storage."""
    model = tiny_moe()
    convert_experts(model)
    model.share_memory()
    weight = expert_weights(model)["model.layers.0.mlp.experts.gate_up_proj"]
    assert weight.is_shared() and weight.quant.packed.is_shared() and weight.quant.absmax.is_shared()


def test_one_stacked_weight_is_skipped_by_its_path():
    model = tiny_moe()
    convert_experts(model, skip_modules=["experts.down_proj"])  # as PEFT's target_parameters names it
    kinds = {n.rsplit(".", 1)[-1]: isinstance(p, NF4Tensor) for n, p in expert_weights(model).items()}
    assert kinds == {"gate_up_proj": True, "down_proj": False}


def test_target_parameters_lora_merges_into_the_export_and_its_adapter_is_peft_s(tmp_path):
    """PEFT's ``target_parameters`` LoRA on NF4 experts: ``save_merged`` adds each update to its dequantized stack (the
    folder transformers loads computes what PEFT computes on the float experts); the adapter folder is PEFT's own
    ``save_pretrained`` (ours refuses, naming it); LoRACallback refuses such a model before training, since its
    exports could not hold it."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    from lightning_nf4.export import save_adapter, save_merged

    config = dict(r=4, lora_alpha=8, target_modules=["q_proj"], target_parameters=["experts.gate_up_proj", "experts.down_proj"],
                  init_lora_weights=False)
    torch.manual_seed(5)
    model = get_peft_model(tiny_moe(), LoraConfig(**config))
    NF4Precision(device="cpu", compute_dtype=torch.float32).convert_module(CausalLM(model))
    model.eval()
    save_merged(model, tmp_path / "merged")
    with pytest.raises(ValueError, match="target_parameters LoRA, which this adapter folder cannot describe.*save_pretrained"):
        save_adapter(model, tmp_path / "ours", r=4, lora_alpha=8, lora_dropout=0.0)
    model.save_pretrained(tmp_path / "adapter")
    # the float model the NF4 one stands for: experts and linears dequantized, PEFT's adapter loaded on it
    float_base = tiny_moe()
    for name, param in expert_weights(model.base_model.model).items():
        float_base.get_parameter(name.replace(".base_layer", "")).data = param.quant.dequantize(torch.float32)
    for name, module in model.named_modules():
        if name.endswith("q_proj.base_layer") or (name.endswith(("k_proj", "v_proj", "o_proj")) and hasattr(module, "dequantize")):
            target = name.removeprefix("base_model.model.").removesuffix(".base_layer")
            float_base.get_submodule(target).weight.data = module.dequantize(torch.float32)
    peft_float = PeftModel.from_pretrained(float_base, tmp_path / "adapter").eval()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    ids = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        expect = peft_float(ids).logits
        torch.testing.assert_close(model(ids).logits, expect, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(merged(ids).logits, expect, atol=1e-4, rtol=1e-4)
    trainer = pl.Trainer(max_steps=1, accelerator="cpu", plugins=NF4Precision(device="cpu"), logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[LoRACallback(r=4, alpha=8)])
    with pytest.raises(ValueError, match="target_parameters="):
        trainer.fit(CausalLM(get_peft_model(tiny_moe(), LoraConfig(**config))), token_loader(n=4))


def test_modules_a_model_keeps_in_float32_stay_float():
    """LongcatFlash lists its router's ``classifier.weight`` in ``_keep_in_fp32_modules`` and reads that weight itself:
    the plugin leaves such modules in float, as transformers + bitsandbytes does, and the model runs."""
    import transformers

    torch.manual_seed(0)
    config = transformers.LongcatFlashConfig(
        vocab_size=128, hidden_size=64, num_attention_heads=4, num_key_value_heads=4, num_layers=1, ffn_hidden_size=128,
        expert_ffn_hidden_size=64, n_routed_experts=4, zero_expert_num=2, moe_topk=2, head_dim=8, q_lora_rank=32, kv_lora_rank=16,
        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16)
    model = transformers.LongcatFlashForCausalLM(config)
    assert "classifier.weight" in model._keep_in_fp32_modules
    NF4Precision(device="cpu").convert_module(CausalLM(model))
    router = model.model.layers[0].mlp.router.classifier
    assert type(router) is nn.Linear
    assert any(type(m).__name__ == "NF4Linear" for m in model.modules())
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.isfinite(model(torch.randint(0, 128, (2, 8))).logits).all()


def test_a_transposed_stacked_weight_refuses_views_that_would_misplace_its_elements():
    """``weight.transpose(1, 2).reshape(-1)`` reported 8192 elements yet dequantized to [4, 64, 32]; a view of a
    transposed NF4 weight other than its own shape is refused, naming the ways that work."""
    weight = NF4Tensor(quantize_nf4(torch.randn(4, 32, 64), 64, True))
    flipped = weight.transpose(1, 2)
    for shape in ((-1,), (4 * 64, 32)):
        with pytest.raises(NotImplementedError, match=r"a transposed weight \(4, 64, 32\) cannot be viewed as .*dequantize it first"):
            flipped.reshape(*shape)
    assert flipped.reshape(4, 64, 32).shape == (4, 64, 32)  # its own shape: unchanged
    assert weight.reshape(-1).shape == (8192,)  # the untransposed weight's flat view (FSDP's) stays


def test_the_matmul_operator_reads_a_stacked_weight_through_its_batch_dims():
    """``x @ w.mT`` on a stacked weight: torch.matmul expands both sides to the common batch shape first (a no-op
    here), which NF4Tensor refused ('does not support aten.expand.default'); the same values and input gradient as
    the float weight, and an expand that would copy is refused."""
    plain = torch.randn(4, 32, 64)
    weight = NF4Tensor(quantize_nf4(plain, 64, True))
    dense = weight.dequantize()
    x = torch.randn(4, 5, 64, requires_grad=True)
    reference = x.detach().clone().requires_grad_()
    out = x @ weight.mT
    expected = reference @ dense.mT
    torch.testing.assert_close(out, expected)
    out.sum().backward()
    expected.sum().backward()
    torch.testing.assert_close(x.grad, reference.grad)
    with pytest.raises(NotImplementedError, match=r"cannot be expanded from \(4, 32, 64\) to \(2, 4, 32, 64\)"):
        weight.expand(2, 4, 32, 64)
