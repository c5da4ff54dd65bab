"""QLoRA under Lightning Fabric: ``Fabric(plugins=NF4FabricPrecision())`` with a model wrapped by PEFT, on the CPU.
The base is quantized bit for bit as ``quantize_nf4`` does and stays so, the adapters learn, Fabric's own checkpoint
and PEFT's adapter folder carry them, and the Trainer's plugin given to Fabric says which one to use."""

import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from lightning_nf4 import NF4FabricPrecision, NF4Linear, NF4Precision, dequantize_model, quantize_nf4
from lightning_nf4.layers.lora import lora_config
from lightning_nf4.plugins import NF4PrecisionError
from lightning_nf4.plugins.convert import convert_linears
from tests import isolated

WORKER = Path(__file__).with_name("fabric_ddp_worker.py")


class Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(64, 128)
        self.down = nn.Linear(128, 64)
        self.head = nn.Linear(64, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.down(torch.relu(self.up(x)))))


def _peft_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["up", "down"], init_lora_weights=True)
    return get_peft_model(Mlp(), config)


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(32, 64, generator=g), torch.randint(0, 8, (32,), generator=g)


def _fit(fabric: L.Fabric, model: nn.Module, optimizer: torch.optim.Optimizer, steps: int) -> list[float]:
    x, y = _data()
    losses = []
    for _ in range(steps):
        loss = nn.functional.cross_entropy(model(x).float(), y)
        fabric.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def _dtypes_seen(model: nn.Module, x: torch.Tensor) -> tuple[torch.dtype, torch.dtype]:
    """The dtype the first adapted layer receives, and the dtype the float head returns, in one forward."""
    seen = []
    hooks = [model.get_submodule("base_model.model.up").register_forward_hook(lambda m, args, out: seen.append(args[0].dtype)),
             model.get_submodule("base_model.model.head").register_forward_hook(lambda m, args, out: seen.append(out.dtype))]
    with torch.no_grad():
        model(x)
    for hook in hooks:
        hook.remove()
    return seen[0], seen[1]


def _setup(precision: NF4FabricPrecision, seed: int = 0):
    model = _peft_mlp(seed)
    fabric = L.Fabric(accelerator="cpu", devices=1, plugins=precision)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model, optimizer = fabric.setup(model, optimizer)
    return fabric, model, optimizer


def test_fabric_quantizes_the_base_exactly_and_trains_only_the_adapters():
    float_weights = {name: _peft_mlp().get_submodule(name).base_layer.weight.detach().clone()
                     for name in ("base_model.model.up", "base_model.model.down")}
    fabric, model, optimizer = _setup(NF4FabricPrecision(skip_modules=("head",)))
    layers = {name: model.get_submodule(name).base_layer for name in float_weights}
    for name, layer in layers.items():
        assert isinstance(layer, NF4Linear)
        assert torch.equal(layer.weight, quantize_nf4(float_weights[name], 64, True).packed)
    assert type(model.get_submodule("base_model.model.head")) is nn.Linear  # skip_modules honoured
    before = {name: layer.weight.clone() for name, layer in layers.items()}
    adapters = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert adapters and all("lora_" in n for n in adapters)

    assert _dtypes_seen(model, _data()[0]) == (torch.bfloat16, torch.bfloat16)  # inputs cast, the float head autocast
    assert model(_data()[0]).dtype == torch.float32  # Fabric's output conversion
    assert layers["base_model.model.up"].compute_dtype == torch.bfloat16
    losses = _fit(fabric, model, optimizer, steps=15)

    assert losses[-1] < 0.7 * losses[0], losses
    for name, layer in layers.items():
        assert torch.equal(layer.weight, before[name])  # the base never moves
    moved = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, adapters[n])]
    assert any("lora_A" in n for n in moved) and any("lora_B" in n for n in moved)


def test_peft_merge_and_unload_after_setup_requantizes_the_nf4_base():
    """The layers PEFT wrapped before ``setup`` are NF4 LoRA layers after it (``NF4LoraLinear``, as LoRACallback and
    ``lora_config`` build them): PEFT's ``merge_and_unload`` re-quantizes each base with the update added, with a
    warning, and the model computes as before to NF4 rounding. (PEFT's own merge added the update to the packed codes,
    a shape error.)"""
    from lightning_nf4.layers.lora import NF4LoraLinear

    fabric, model, optimizer = _setup(NF4FabricPrecision(skip_modules=("head",)))
    _fit(fabric, model, optimizer, steps=5)
    peft_model = model.module
    assert all(type(peft_model.get_submodule(f"base_model.model.{n}")) is NF4LoraLinear for n in ("up", "down"))
    x = _data()[0]
    with torch.no_grad():
        before = model(x)
        expected = {}
        for n in ("up", "down"):
            layer = peft_model.get_submodule(f"base_model.model.{n}")
            expected[n] = quantize_nf4(layer.merged_weight().to(layer.get_base_layer().quant.dtype), 64, True).packed
    with pytest.warns(UserWarning, match="re-quantizes the weight"):
        merged = peft_model.merge_and_unload()
    assert type(merged.up) is NF4Linear and type(merged.down) is NF4Linear
    assert torch.equal(merged.up.weight, expected["up"]) and torch.equal(merged.down.weight, expected["down"])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        after = merged(x).float()
    assert (after - before).abs().mean() < 0.1 * before.abs().mean()  # NF4 rounding of the merged weights only


def test_fabric_checkpoint_and_peft_adapter_folder_give_the_trained_model_back(tmp_path):
    fabric, model, optimizer = _setup(NF4FabricPrecision(skip_modules=("head",)))
    _fit(fabric, model, optimizer, steps=5)
    x = _data()[0]
    with torch.no_grad():
        trained = model(x)
    fabric.save(tmp_path / "run.ckpt", {"model": model, "optimizer": optimizer, "step": 5})

    # Fabric's checkpoint, into a fresh run set up the same way (other random adapters)
    fabric2, model2, optimizer2 = _setup(NF4FabricPrecision(skip_modules=("head",)), seed=3)
    state = {"model": model2, "optimizer": optimizer2}
    remainder = fabric2.load(tmp_path / "run.ckpt", state)
    assert remainder == {"step": 5}
    with torch.no_grad():
        assert torch.equal(model2(x), trained)
    assert optimizer2.state_dict()["state"][0]["step"] == 5

    # PEFT's adapter folder, onto the float base the NF4 weights stand for
    model.save_pretrained(tmp_path / "adapter")
    torch.manual_seed(0)  # the same base as _peft_mlp's, through NF4 and back
    float_base = Mlp()
    assert convert_linears(float_base, skip_modules=("head",)) == 2
    dequantize_model(float_base)
    reloaded = PeftModel.from_pretrained(float_base, tmp_path / "adapter").float()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        plain = reloaded(x).float()
    torch.testing.assert_close(plain, trained, atol=2e-2, rtol=2e-2)
    assert (trained - _setup(NF4FabricPrecision(skip_modules=("head",)))[1](x)).abs().max() > 0.1  # training moved it


@pytest.mark.parametrize("compute_dtype", [torch.float16, torch.float32])
def test_fabric_float16_scales_the_loss_and_float32_runs_without_autocast(compute_dtype):
    precision = NF4FabricPrecision(compute_dtype=compute_dtype, skip_modules=("head",))
    fabric, model, optimizer = _setup(precision)
    assert (precision.scaler is not None) == (compute_dtype == torch.float16)
    assert _dtypes_seen(model, _data()[0]) == (compute_dtype, compute_dtype)  # float32: no cast and no autocast
    losses = _fit(fabric, model, optimizer, steps=10)
    assert losses[-1] < losses[0]
    if precision.scaler is not None:
        assert precision.scaler.get_scale() > 1.0  # Fabric's backward scaled the loss with the plugin's scaler


def test_the_trainer_plugin_under_fabric_names_the_fabric_one():
    model = _peft_mlp()
    fabric = L.Fabric(accelerator="cpu", devices=1, plugins=NF4Precision(skip_modules=("head",)))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model, optimizer = fabric.setup(model, optimizer)
    loss = model(_data()[0]).sum()
    with pytest.raises(NF4PrecisionError, match=r"Trainer's plugin.*Fabric\(plugins=NF4FabricPrecision\(\)\)"):
        fabric.backward(loss)


@pytest.mark.timeout(540)  # two runs, each stopped at 240 s
def test_fabric_ddp_on_two_ranks_matches_one_process(tmp_path):
    """Fabric's DDP over gloo: the packed NF4 weights stay out of DDP's sync, and both ranks end with the adapters
    of one process that saw the whole batch."""
    def run(out: Path, strategy: str, devices: int) -> None:
        out.mkdir()
        result = isolated.run([sys.executable, str(WORKER), str(out), strategy, str(devices)], capture_output=True, text=True, timeout=240)
        assert result.returncode == 0, result.stderr[-3000:]

    run(tmp_path / "one", "auto", 1)
    run(tmp_path / "ddp", "ddp", 2)
    single = torch.load(tmp_path / "one" / "rank0.pt")
    rank0, rank1 = torch.load(tmp_path / "ddp" / "rank0.pt"), torch.load(tmp_path / "ddp" / "rank1.pt")
    assert rank0["wrapper"] == "DistributedDataParallel"
    assert rank0["ddp_ignored"] and all(n.endswith("base_layer.weight") for n in rank0["ddp_ignored"])
    assert rank0["trainable"].keys() == single["trainable"].keys()
    start = {n: p.detach() for n, p in _peft_mlp().named_parameters() if p.requires_grad}
    for name, value in rank0["trainable"].items():
        assert torch.equal(value, rank1["trainable"][name]), name
        # bf16 activations of 16 rows against 32 round apart (4e-5 here); ranks without the sync end 2e-3 apart or more
        torch.testing.assert_close(value, single["trainable"][name], atol=1e-4, rtol=1e-3)
    assert max((v - start[n]).abs().max() for n, v in single["trainable"].items()) > 0.02


def test_a_model_loaded_in_nf4_computes_in_the_plugins_dtype():
    """Layers that came quantized with another compute dtype (a loader's bnb_4bit_compute_dtype) compute in the
    plugin's, as Lightning's BitsandbytesPrecision sets it: the same outputs as layers the plugin quantized itself."""
    torch.manual_seed(0)
    loaded = Mlp()
    assert convert_linears(loaded, skip_modules=("head",), compute_dtype=torch.bfloat16) == 2
    model = get_peft_model(loaded, lora_config(r=4, lora_alpha=8, target_modules=["up", "down"]))  # PEFT's dispatch to NF4
    fabric = L.Fabric(accelerator="cpu", devices=1, plugins=NF4FabricPrecision(compute_dtype=torch.float32, skip_modules=("head",)))
    model = fabric.setup_module(model)
    assert {model.get_submodule(f"base_model.model.{n}").base_layer.compute_dtype for n in ("up", "down")} == {torch.float32}
    torch.manual_seed(0)
    direct = Mlp()  # quantized on the CPU too (a GPU's double-quantization offset may differ in its last bits)
    assert convert_linears(direct, skip_modules=("head",), compute_dtype=torch.float32) == 2
    with torch.no_grad():
        assert torch.equal(model(_data()[0]), direct(_data()[0]))


def test_fabric_init_module_keeps_what_trains_in_float32():
    """Built under ``fabric.init_module()`` (the compute dtype, float16 here), a head trained in full and the adapters
    train in float32, and the GradScaler steps them (it refuses to unscale float16 gradients)."""
    precision = NF4FabricPrecision(compute_dtype=torch.float16, skip_modules=("head",))
    fabric = L.Fabric(accelerator="cpu", devices=1, plugins=precision)
    with fabric.init_module():
        torch.manual_seed(0)
        base = Mlp()
    assert base.head.weight.dtype == torch.float16
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["up", "down"], modules_to_save=["head"]))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model, optimizer = fabric.setup(model, optimizer)
    trained = {n: p.dtype for n, p in model.named_parameters() if p.requires_grad}
    assert any("modules_to_save" in n for n in trained) and set(trained.values()) == {torch.float32}
    losses = _fit(fabric, model, optimizer, steps=5)
    assert losses[-1] < losses[0]


def test_fabric_refuses_peft_dora_on_a_base_it_quantizes():
    model = get_peft_model(Mlp(), LoraConfig(r=4, lora_alpha=8, target_modules=["up"], use_dora=True))
    fabric = L.Fabric(accelerator="cpu", devices=1, plugins=NF4FabricPrecision(skip_modules=("head",)))
    with pytest.raises(ValueError, match=r"carries PEFT's DoRA on a base that NF4Precision quantizes.*with Fabric, wrap a model already in NF4"):
        fabric.setup_module(model)
    assert type(model.base_model.model.up.base_layer) is nn.Linear  # refused before quantizing


def test_fabric_refuses_an_optimizer_that_holds_the_quantized_weights():
    """An optimizer over every parameter, made before setup, keeps the float weights conversion replaced alive: the
    first step says so (the Trainer's plugin refuses it in connect)."""
    model = _peft_mlp()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    fabric = L.Fabric(accelerator="cpu", devices=1, plugins=NF4FabricPrecision(skip_modules=("head",)))
    model, optimizer = fabric.setup(model, optimizer)
    loss = model(_data()[0]).sum()
    fabric.backward(loss)
    with pytest.raises(NF4PrecisionError, match=r"optimizer holds 2 weights that NF4FabricPrecision quantized.*if p.requires_grad"):
        optimizer.step()


def test_fabric_plugin_arguments_and_an_empty_model_are_named():
    with pytest.raises(NF4PrecisionError, match=r"skip_modules must be a module name or a list of names \(\(\) for none\), got None"):
        NF4FabricPrecision(skip_modules=None)
    with pytest.raises(NF4PrecisionError, match=r"double_quant must be True or False, got 'no'"):
        NF4FabricPrecision(double_quant="no")
    fabric = L.Fabric(accelerator="cpu", devices=1, plugins=NF4FabricPrecision())
    with pytest.raises(NF4PrecisionError, match=r"has no nn.Linear layer.*Build the model before fabric.setup"):
        fabric.setup_module(nn.Sequential(nn.ReLU()))


@pytest.mark.parametrize("plugin", [NF4Precision, NF4FabricPrecision])
def test_the_plugins_pickle_after_converting_a_model(plugin):
    """ddp_spawn sends the plugin to each process: its record of the weights it replaced (weak references) stays
    behind, and the copy starts an empty one."""
    import pickle

    precision, model = plugin(skip_modules=("head",)), Mlp()
    precision.convert_module(model)
    if plugin is NF4FabricPrecision:
        assert len(precision._replaced) == 2  # the model's NF4 codes
    copy = pickle.loads(pickle.dumps(precision))
    assert copy.compute_dtype == precision.compute_dtype and copy.skip_modules == ("head",) and len(copy._replaced) == 0
