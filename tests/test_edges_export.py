"""Edges of ``lightning_nf4.export`` the main tests leave open: which layers an adapter's ``target_modules`` picks
out when a leaf name is shared, the dtypes and keys of the merged state dict (NF4 and float bases), tied weights
in a plain safetensors export, and the quantization config kept out of a merged model's ``config.json``."""

import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from lightning_nf4 import LoRACallback
from lightning_nf4.export import merged_state_dict, save_adapter, save_merged
from lightning_nf4.plugins.convert import convert_linears


def _peft_selects(name, targets):
    """PEFT's rule for a list of target names: the module's name, or its tail after a dot."""
    return any(name == t or name.endswith("." + t) for t in targets)


class Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.ModuleDict({"proj": nn.Linear(32, 32)})
        self.b = nn.ModuleDict({"proj": nn.Linear(32, 32)})


def test_adapter_targets_select_exactly_the_adapted_layers(tmp_path):
    """Only ``a.proj`` has an adapter; ``b.proj`` shares its leaf name. The saved ``target_modules`` must not be
    the bare leaf ``proj``, which would make ``PeftModel.from_pretrained`` wrap ``b.proj`` too."""
    torch.manual_seed(0)
    model = Shared()
    convert_linears(model, compute_dtype=torch.float32, skip_modules=())
    LoRACallback(r=2, alpha=4, dropout=0.0, target_modules=["a.proj"]).inject(model)
    folder = save_adapter(model, tmp_path / "adapter", r=2, lora_alpha=4, lora_dropout=0.0)
    targets = json.loads((folder / "adapter_config.json").read_text())["target_modules"]
    selected = {n for n, m in Shared().named_modules() if isinstance(m, nn.Linear) and _peft_selects(n, targets)}
    assert selected == {"a.proj"}, targets
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    assert set(tensors) == {"base_model.model.a.proj.lora_A.weight", "base_model.model.a.proj.lora_B.weight"}


class Small(nn.Module):
    def __init__(self, dtype):
        super().__init__()
        self.q = nn.Linear(64, 32, dtype=dtype)
        self.plain = nn.Linear(32, 32, dtype=dtype)
        self.register_buffer("scale", torch.ones(4, dtype=dtype))
        self.register_buffer("cache", torch.zeros(4), persistent=False)


def _nf4_small(dtype=torch.bfloat16):
    torch.manual_seed(0)
    model = Small(dtype)
    convert_linears(model, compute_dtype=torch.float32, skip_modules=())
    LoRACallback(r=2, alpha=4, dropout=0.0, target_modules=["q"]).inject(model)
    with torch.no_grad():
        model.q.lora_B["default"].weight.normal_()
    return model


def test_merged_state_dict_keeps_the_original_dtype_and_persistent_keys():
    """By default the merged weights are in the dtype the base was quantized from (bf16 here), with the LoRA delta
    in: ``dequantize(fp32) + B @ A * scaling``, rounded once. Non-persistent buffers are not part of it, as in
    ``state_dict()``."""
    model = _nf4_small()
    state = merged_state_dict(model)
    assert set(state) == {"q.weight", "q.bias", "plain.weight", "plain.bias", "scale"}
    assert all(v.dtype == torch.bfloat16 for v in state.values())
    q = model.q
    a, b = q.lora_A["default"].weight, q.lora_B["default"].weight
    expected = (q.base_layer.dequantize(torch.float32) + b @ a * 2.0).to(torch.bfloat16)
    assert torch.equal(state["q.weight"], expected)
    assert torch.equal(state["plain.weight"], model.plain.dequantize())


def test_merged_state_dict_in_a_given_dtype_casts_every_float_tensor():
    """``dtype=float16``: weights and biases, of adapted and of plain NF4 layers, all come out float16."""
    state = merged_state_dict(_nf4_small(), torch.float16)
    params = ("q.weight", "q.bias", "plain.weight", "plain.bias")
    assert {k: state[k].dtype for k in params} == dict.fromkeys(params, torch.float16)


def test_float_base_lora_merges_its_delta():
    """With a float base (the bf16 LoRA baseline) the merged weight is ``W + B @ A * scaling`` too."""
    torch.manual_seed(0)
    model = Small(torch.float32)
    LoRACallback(r=2, alpha=4, dropout=0.0, target_modules=["q"]).inject(model)
    with torch.no_grad():
        model.q.lora_B["default"].weight.normal_()
    q = model.q
    expected = q.base_layer.weight + q.lora_B["default"].weight @ q.lora_A["default"].weight * 2.0
    torch.testing.assert_close(merged_state_dict(model)["q.weight"], expected)


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(16, 32)
        self.body = nn.Linear(32, 32)
        self.head = nn.Linear(32, 16, bias=False)
        self.head.weight = self.embed.weight


def test_tied_weights_are_written_under_each_key(tmp_path):
    """A plain (non-transformers) module with a tied embedding and head saves to safetensors, which refuses shared
    memory: each key gets the tied values."""
    torch.manual_seed(0)
    model = Tied()
    convert_linears(model, compute_dtype=torch.float32, skip_modules=("head",))
    LoRACallback(r=2, alpha=4, dropout=0.0, target_modules=["body"]).inject(model)
    folder = save_merged(model, tmp_path / "merged")
    saved = load_file(str(folder / "model.safetensors"))
    assert torch.equal(saved["embed.weight"], model.embed.weight) and torch.equal(saved["head.weight"], model.embed.weight)


def test_merged_config_has_no_quantization_config_and_the_model_keeps_its_own(tmp_path):
    """The merged model is float: its ``config.json`` must not carry the bitsandbytes ``quantization_config`` (it
    would be re-quantized or refused on load), while the live model's config keeps it."""
    pytest.importorskip("transformers")
    from tests.lightning_models import tiny_llama

    model = tiny_llama()
    model.config.quantization_config = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    convert_linears(model, compute_dtype=torch.float32)
    LoRACallback(r=2, alpha=4, dropout=0.0).inject(model)
    folder = save_merged(model, tmp_path / "merged")
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config
    assert model.config.quantization_config["quant_method"] == "bitsandbytes"


def test_the_named_adapter_alone_is_exported_when_a_model_has_two(tmp_path):
    """A PEFT model (``get_peft_model`` on a plain module with NF4 bases) with two adapters: ``save_adapter(...,
    adapter_name="other")`` writes that adapter's tensors only, under PEFT's adapter-free names, and PEFT loads them
    back into a fresh model as its adapter; the merged export keeps the plain module's own names."""
    from peft import PeftModel, get_peft_model

    from lightning_nf4.layers.lora import lora_config, register_nf4_lora

    def base():
        torch.manual_seed(0)
        model = Small(torch.float32)
        convert_linears(model, compute_dtype=torch.float32, skip_modules=())
        return model

    model = get_peft_model(base(), lora_config(r=2, lora_alpha=4, target_modules=["q"]))
    model.add_adapter("other", lora_config(r=2, lora_alpha=4, target_modules=["q"]))
    with torch.no_grad():
        for name in ("default", "other"):
            model.base_model.model.q.lora_B[name].weight.normal_()
    folder = save_adapter(model, tmp_path / "adapter", r=2, lora_alpha=4, lora_dropout=0.0, adapter_name="other")
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    assert set(tensors) == {"base_model.model.q.lora_A.weight", "base_model.model.q.lora_B.weight"}
    q = model.base_model.model.q
    assert torch.equal(tensors["base_model.model.q.lora_B.weight"], q.lora_B["other"].weight)
    assert not torch.equal(q.lora_B["other"].weight, q.lora_B["default"].weight)
    config = register_nf4_lora(lora_config(r=2, lora_alpha=4, target_modules=["q"]))
    loaded = PeftModel.from_pretrained(base(), str(folder), config=config)
    assert torch.equal(loaded.base_model.model.q.lora_B["default"].weight, q.lora_B["other"].weight)
    # the merged export of the PEFT-wrapped model has the user's model's names, not PEFT's wrapper's
    merged = load_file(str(save_merged(model, tmp_path / "merged") / "model.safetensors"))
    assert set(merged) == set(Small(torch.float32).state_dict())
    torch.testing.assert_close(merged["q.weight"], q.merged_weight(torch.float32, ["default"]))


_SHARDED_PEFT_EXPORT = """
import sys, torch, torch.distributed as dist
from datetime import timedelta
from pathlib import Path
from safetensors.torch import load_file
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
sys.path.insert(0, sys.argv[1])
from peft import get_peft_model
from tests.test_edges_export import Small
from lightning_nf4.export import save_merged, save_merged_sharded
from lightning_nf4.layers.lora import lora_config
from lightning_nf4.plugins.convert import convert_linears
from lightning_nf4.strategies.fsdp import _prepare_nf4

def build():
    torch.manual_seed(0)
    model = Small(torch.float32)
    convert_linears(model, compute_dtype=torch.float32, skip_modules=())
    model = get_peft_model(model, lora_config(r=2, lora_alpha=4, target_modules=["q"]))
    with torch.no_grad():
        model.base_model.model.q.lora_B["default"].weight.normal_()
    return model

out = Path(sys.argv[2])
whole = load_file(str(save_merged(build(), out / "whole") / "model.safetensors"))
dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1, timeout=timedelta(seconds=60))
mesh = init_device_mesh("cpu", (1,))
model = build()
inner = model.base_model.model
for unit in (inner.q, inner):  # a unit, then the user's model as the root, as NF4FSDPStrategy shards
    _prepare_nf4(unit)
    fully_shard(unit, mesh=mesh)
folder = save_merged_sharded(model, out / "sharded", write=True)
index = __import__("json").loads((folder / "model.safetensors.index.json").read_text())
sharded = {}
for file in sorted(set(index["weight_map"].values())):
    sharded.update(load_file(str(folder / file)))
assert set(sharded) == set(whole) == set(Small(torch.float32).state_dict()), (sorted(sharded), sorted(whole))
for key, value in whole.items():
    assert torch.equal(sharded[key], value), key
del model, inner
dist.destroy_process_group()
print("ok")
"""


def test_sharded_merged_export_of_a_peft_wrapped_plain_module_keeps_its_own_names(tmp_path):
    """The sharded merged export (one FSDP unit at a time) of ``get_peft_model`` around a plain module writes the
    same keys and values as the unsharded one: the module's own names, without PEFT's ``base_model.model.``. One
    gloo process in a child with a timeout, so no process group outlives the test."""
    import sys
    from pathlib import Path

    from tests import isolated

    root = Path(__file__).resolve().parents[1]
    done = isolated.run([sys.executable, "-c", _SHARDED_PEFT_EXPORT, str(root), str(tmp_path)], capture_output=True, text=True, timeout=240)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]
