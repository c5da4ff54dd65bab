"""LoRACallback(compile=...): each decoder layer compiled in place after NF4 conversion and LoRA injection, on
CPU (inductor, which needs the C compiler). A compiled fit trains like an eager one, resumes exactly from its
checkpoint, exports the same artifacts, and runs under DDP and NF4FSDPStrategy (two gloo processes, in a
subprocess with a timeout)."""

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from lightning_nf4 import LoRACallback, NF4Linear
from lightning_nf4.plugins.compile import CompileConfigError, compile_blocks, compile_option, compiled_blocks, find_blocks
from tests.lightning_models import Regressor, tiny_llama
from tests import isolated

pytestmark = pytest.mark.timeout(1300)  # the fixture's fits and two-rank run, and three two-rank runs of up to 400 s in one test

WORKER = Path(__file__).with_name("compile_worker.py")


def test_compile_option_is_checked():
    assert compile_option(False) is None and compile_option(None) is None and compile_option(True) == {}
    assert compile_option({"mode": "max-autotune-no-cudagraphs", "blocks": ["LlamaDecoderLayer"]}) == {"mode": "max-autotune-no-cudagraphs", "blocks": ["LlamaDecoderLayer"]}
    with pytest.raises(CompileConfigError, match=r"unknown option\(s\) \['mdoe'\]"):
        LoRACallback(compile={"mdoe": "max-autotune"})
    with pytest.raises(CompileConfigError, match="must be True, False or a mapping"):
        LoRACallback(compile="yes")
    with pytest.raises(CompileConfigError, match=r"compile\['blocks'\] must be"):
        compile_option({"blocks": [3]})
    for cuda_graphs in ({"mode": "reduce-overhead"}, {"mode": "max-autotune"}, {"options": {"triton.cudagraphs": True}}):
        with pytest.raises(CompileConfigError, match="records CUDA graphs.*max-autotune-no-cudagraphs"):
            LoRACallback(compile=cuda_graphs)
    assert compile_option({"mode": "max-autotune-no-cudagraphs"}) == {"mode": "max-autotune-no-cudagraphs"}


def test_blocks_are_the_decoder_layers_or_named_ones():
    model = tiny_llama()
    assert [type(b).__name__ for b in find_blocks(model)] == ["LlamaDecoderLayer"] * 2
    assert [type(b).__name__ for b in find_blocks(model, ["LlamaMLP"])] == ["LlamaMLP"] * 2
    with pytest.raises(CompileConfigError, match="matched no module.*LlamaDecoderLayer"):
        find_blocks(model, "GPTBlock")
    with pytest.raises(CompileConfigError, match="no repeated block.*compile=\\{'blocks'"):
        find_blocks(Regressor())  # an nn.Sequential of single layers: nothing repeats


def test_compiling_keeps_the_module_and_its_names():
    model = tiny_llama()
    keys = list(model.state_dict())
    LoRACallback(r=4, alpha=8, dropout=0.0, compile=True).inject(model)
    plain = tiny_llama()
    LoRACallback(r=4, alpha=8, dropout=0.0).inject(plain)
    injected_keys = list(plain.state_dict())
    blocks = compiled_blocks(model)
    assert blocks == list(model.model.layers) and all(type(b).__name__ == "LlamaDecoderLayer" for b in blocks)
    assert list(model.state_dict()) == injected_keys and len(injected_keys) > len(keys)  # no _orig_mod. prefix
    first = blocks[0]._compiled_call_impl
    compile_blocks(model)  # idempotent: the compiled calls stay
    assert blocks[0]._compiled_call_impl is first
    assert not isinstance(model, torch._dynamo.eval_frame.OptimizedModule) and isinstance(model.model.layers, nn.ModuleList)


# -- real fits: eager and compiled in this process, DDP in two gloo processes ------------------------------
def _load(out: Path, rank: int = 0) -> dict:
    return torch.load(out / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from tests.compile_worker import run

    root = tmp_path_factory.mktemp("compile")
    run(root / "eager", "auto", 1, 4, compile=False)
    torch._dynamo.reset()  # the counters and graphs below are this fit's own
    run(root / "compiled", "auto", 1, 4, compile=True)
    ckpt = next((root / "compiled" / "ckpt").glob("epoch=0-*.ckpt"))
    run(root / "resumed", "auto", 1, 4, compile=True, resume=str(ckpt))
    done = isolated.run([sys.executable, str(WORKER), str(root / "ddp"), "ddp", "2", "2", "1"],
                          capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-4000:]
    return root


def test_compiled_fit_trains_like_eager_without_graph_breaks(runs):
    eager, compiled = _load(runs / "eager"), _load(runs / "compiled")
    assert eager["compiled"] == [] and compiled["compiled"] == ["LlamaDecoderLayer"] * 2
    assert compiled["graphs"] >= 1 and compiled["graph_breaks"] == 0  # NF4 + LoRA layers trace whole
    assert compiled["trainable"].keys() == eager["trainable"].keys()
    for name, value in compiled["trainable"].items():
        assert not torch.equal(value, torch.zeros_like(value)) or "lora_B" not in name, name  # it trained
        torch.testing.assert_close(value, eager["trainable"][name], atol=1e-4, rtol=1e-3)  # fp32; fused kernels round apart


def test_compiled_resume_continues_exactly(runs):
    resumed, compiled = _load(runs / "resumed"), _load(runs / "compiled")
    assert resumed["compiled"] == ["LlamaDecoderLayer"] * 2
    for name, value in compiled["trainable"].items():
        torch.testing.assert_close(resumed["trainable"][name], value, rtol=0, atol=0)


def test_compiled_exports_match_eager(runs):
    for part in ("adapter/adapter_model.safetensors", "merged/model.safetensors"):
        a, b = load_file(runs / "compiled" / "export" / part), load_file(runs / "eager" / "export" / part)
        assert a.keys() == b.keys() and not any("_orig_mod" in k for k in a), part
        for key in a:
            torch.testing.assert_close(a[key], b[key], atol=1e-4, rtol=1e-3)


def test_compiled_ddp_matches_one_process(runs):
    rank0, rank1, single = _load(runs / "ddp", 0), _load(runs / "ddp", 1), _load(runs / "compiled")
    assert rank0["wrapper"] == "DistributedDataParallel" and rank0["compiled"] == rank1["compiled"] == ["LlamaDecoderLayer"] * 2
    for name, value in rank0["trainable"].items():
        assert torch.equal(value, rank1["trainable"][name]), name
        torch.testing.assert_close(value, single["trainable"][name], atol=1e-5, rtol=1e-4)
    assert (runs / "ddp" / "export" / "adapter" / "adapter_model.safetensors").exists()


def test_compiled_fit_under_fsdp2_trains_like_eager_without_graph_breaks(tmp_path):
    """Under NF4FSDPStrategy each weight is an all-gathered NF4Tensor: the compiled layers must read it through
    the dequantize op, whole (no graph break, one graph for every layer), and train as the eager fit does; so does
    the setting the README gives for host-bound steps (adapters whole, ``offload_activations=True``)."""
    results = {}
    for run, strategy, compile in (("eager", "nf4_fsdp", "0"), ("compiled", "nf4_fsdp", "1"), ("whole", "nf4_fsdp_whole", "1")):
        done = isolated.run([sys.executable, str(WORKER), str(tmp_path / run), strategy, "2", "2", compile],
                              capture_output=True, text=True, timeout=400)
        assert done.returncode == 0, done.stderr[-4000:]
        results[run] = [_load(tmp_path / run, rank) for rank in (0, 1)]
    eager = results["eager"]
    for compiled in (results["compiled"], results["whole"]):
        for rank in compiled:
            assert rank["compiled"] == ["FSDPLlamaDecoderLayer"] * 2
            assert rank["graph_breaks"] == 0 and 1 <= rank["graphs"] <= 2  # forward graph(s) shared by both layers
        for name, value in compiled[0]["trainable"].items():
            assert torch.equal(value, compiled[1]["trainable"][name]), name
            assert "lora_B" not in name or value.abs().max() > 0, name  # it trained
            torch.testing.assert_close(value, eager[0]["trainable"][name], atol=2e-4, rtol=1e-3)  # fp32; inductor's fused order


@pytest.mark.parametrize("double_quant", [True, False])
def test_compiled_dequantize_is_fused_and_exact(double_quant, monkeypatch):
    """Compiled code dequantizes through the plain-PyTorch form (no custom-op call left in the graph, so no
    per-weight Python dispatch at run time), plain weights and FSDP's NF4Tensor alike, with the eager values
    bit for bit; ``ops.COMPILED_DEQUANTIZE = "op"`` keeps the op. A weight that ends in a partial block keeps the
    op in both modes: inductor's kernel for the plain form read garbage scales for that block (1e27 off)."""
    from lightning_nf4.format import quantize_nf4

    torch.manual_seed(0)
    for shape in [(96, 320), (5, 96)]:  # whole blocks of 64 (480 of them, a partial nested group); 7.5 blocks
        _check_compiled_dequantize(quantize_nf4(torch.randn(*shape) * 0.02, 64, double_quant), shape[0] * shape[1] % 64 == 0, monkeypatch)


def _check_compiled_dequantize(quant, whole_blocks, monkeypatch):
    from torch._dynamo.backends.common import aot_autograd

    from lightning_nf4.format.tensor import NF4Tensor, dequantize_weight
    from lightning_nf4.kernels import ops

    eager = quant.dequantize(torch.bfloat16)
    for mode in ("fused", "op"):
        monkeypatch.setattr(ops, "COMPILED_DEQUANTIZE", mode)
        graphs: list[str] = []

        def keep(gm, inputs):
            graphs.append(str(gm.graph))
            return gm

        torch._dynamo.reset()
        plain = torch.compile(lambda: quant.dequantize(torch.bfloat16), backend=aot_autograd(fw_compiler=keep))()
        weight = NF4Tensor(quant, dtype=torch.bfloat16)
        sharded_form = torch.compile(lambda: dequantize_weight(weight, torch.bfloat16), backend=aot_autograd(fw_compiler=keep))()
        assert len(graphs) == 2
        assert all(("lightning_nf4.dequantize_4bit" in g) == (mode == "op" or not whole_blocks) for g in graphs), mode
        assert torch.equal(plain, eager) and torch.equal(sharded_form, eager), mode
        torch._dynamo.reset()
        compiled = torch.compile(lambda: quant.dequantize(torch.bfloat16))()  # inductor's own kernel
        assert torch.equal(compiled, eager), mode


@pytest.mark.parametrize("nf4_tensor", [False, True])
@pytest.mark.parametrize("double_quant", [False, True])
def test_a_compiled_layer_whose_weight_ends_in_a_partial_block_is_exact(nf4_tensor, double_quant):
    """A 5 x 96 layer is 7.5 blocks of 64: under inductor its output was 1e3 off (garbage scales for the last block),
    forward and gradients, for the packed weight and the NF4Tensor form alike."""
    torch.manual_seed(0)
    layer = NF4Linear.from_linear(torch.nn.Linear(96, 5, bias=False), blocksize=64, double_quant=double_quant, compute_dtype=torch.float32)
    if nf4_tensor:
        layer.to_nf4_tensor()
    x = torch.randn(3, 96, requires_grad=True)
    weight = layer.dequantize(torch.float32)
    torch._dynamo.reset()
    y = torch.compile(layer, fullgraph=True)(x)
    torch.testing.assert_close(y, torch.nn.functional.linear(x, weight), rtol=1e-5, atol=1e-5)
    y.sum().backward()
    torch.testing.assert_close(x.grad, weight.sum(0).expand(3, 96), rtol=1e-5, atol=1e-5)


def test_compile_applies_to_a_model_that_carries_its_adapters_already(tmp_path):
    """A model with its own adapters (PEFT's, or an earlier fit's) took setup's already-injected branch, which
    compiled nothing: ``compile=True`` was silently an eager run."""
    import lightning.pytorch as pl

    from lightning_nf4 import NF4Precision
    from tests.lightning_models import CausalLM, token_loader

    model = CausalLM()
    LoRACallback(r=4, alpha=8).inject(model)  # adapters before the trainer sees the model
    assert compiled_blocks(model) == []
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, max_steps=0, default_root_dir=str(tmp_path),
                         plugins=NF4Precision(compute_dtype=torch.float32), callbacks=[LoRACallback(r=4, alpha=8, compile=True)])
    trainer.fit(model, token_loader(n=4))  # setup only: no step, so nothing is traced here
    assert compiled_blocks(model) == list(model.model.model.layers)
