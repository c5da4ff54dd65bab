"""``NF4LoraLinear``'s forward: the fused update under autocast against the plain LoRA formula."""

import pytest
import torch
from torch import nn

from lightning_nf4 import NF4Linear
from lightning_nf4.layers.lora import NF4LoraLinear, lora_config


def _layer(lora_bias: bool = False, dropout: float = 0.0) -> NF4LoraLinear:
    torch.manual_seed(0)
    base = NF4Linear.from_linear(nn.Linear(128, 96, bias=True))
    kwargs = dict(r=8, lora_alpha=16, lora_dropout=dropout, target_modules=["x"])
    if lora_bias:
        kwargs["lora_bias"] = True
    layer = NF4LoraLinear(base, "default", lora_config(**kwargs), r=8, lora_alpha=16, lora_dropout=dropout, lora_bias=lora_bias)
    with torch.no_grad():  # B starts at zero; a non-zero B makes the update visible
        layer.lora_B["default"].weight.normal_(std=0.1)
        if lora_bias:
            layer.lora_B["default"].bias.normal_(std=0.1)
    return layer


def _reference(layer: NF4LoraLinear, x: torch.Tensor) -> torch.Tensor:
    """base(x) + scaling * B(A(x)) in fp32 from the same bf16-rounded operands autocast uses."""
    a, b = layer.lora_A["default"], layer.lora_B["default"]
    base = layer.base_layer
    bf = lambda t: t.bfloat16().float()  # noqa: E731
    out = bf(x) @ bf(base.dequantize(torch.bfloat16)).t() + bf(base.bias)
    update = bf(bf(bf(x) @ bf(a.weight).t()) @ bf(b.weight * layer.scaling["default"]).t())
    if b.bias is not None:
        update = update + b.bias.float() * layer.scaling["default"]
    return out + update


@pytest.mark.parametrize("lora_bias", [False, True])
def test_forward_under_autocast_matches_lora_formula(lora_bias):
    layer = _layer(lora_bias)
    x = torch.randn(2, 5, 128)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.shape == (2, 5, 96) and out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), _reference(layer, x), atol=3e-2, rtol=3e-2)


def test_fused_update_gradients_match_the_unfused_formula():
    layer = _layer()
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    x = torch.randn(3, 7, 128, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    nodes, stack = set(), [out.grad_fn]
    while stack:  # the update is added in place into a fresh tensor: no view bookkeeping (CopySlices) in the graph
        node = stack.pop()
        if node is not None and type(node).__name__ not in nodes:
            nodes.add(type(node).__name__)
            stack.extend(fn for fn, _ in node.next_functions)
    assert "AddmmBackward0" in nodes and "CopySlices" not in nodes, nodes
    out.float().square().sum().backward()
    grads = [t.grad.clone() for t in (x, a, b)]
    for t in (x, a, b):
        t.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the same computation, written as PEFT's lora.Linear does
        ref = layer.base_layer(x) + layer.lora_B["default"](layer.lora_A["default"](x)) * layer.scaling["default"]
    ref.float().square().sum().backward()
    for got, want in zip(grads, (x.grad, a.grad, b.grad)):  # bf16 operands rounded in another order: compare norms
        assert ((got - want).norm() / want.norm()).item() < 1e-2
    assert layer.base_layer.weight.grad is None


def test_outside_autocast_adapters_run_in_their_dtype():
    layer = _layer()
    x = torch.randn(4, 128)
    out = layer(x)
    assert out.dtype == torch.float32
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    h = x.to(a.dtype)
    expected = layer.base_layer(x) + ((h @ a.t() @ b.t()) * layer.scaling["default"]).float()
    torch.testing.assert_close(out, expected)


def test_disabled_adapters_give_the_base_output():
    layer = _layer()
    x = torch.randn(4, 128)
    layer.enable_adapters(False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.testing.assert_close(layer(x), layer.base_layer(x))


def test_unfused_update_gives_the_fused_result(monkeypatch):
    layer = _layer()
    x = torch.randn(2, 6, 128)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = layer(x).float()
        monkeypatch.setattr(NF4LoraLinear, "fuse_update", False)
        unfused = layer(x).float()
    assert ((fused - unfused).norm() / unfused.norm()).item() < 1e-2


# -- LoRACallback: argument checks and the parameter count -------------------------------------


def _fit(tmp_path, callback, precision=None, module=None):
    import lightning.pytorch as pl

    from lightning_nf4 import NF4Precision
    from tests.lightning_models import Regressor, regression_loader

    trainer = pl.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, max_steps=1, default_root_dir=str(tmp_path),
        plugins=precision or NF4Precision(compute_dtype=torch.float32), callbacks=[callback],
    )
    module = module if module is not None else Regressor()
    trainer.fit(module, regression_loader())
    return module


def test_modules_to_save_must_match_a_module(tmp_path):
    from lightning_nf4 import LoRACallback

    with pytest.raises(ValueError, match=r"modules_to_save entry 'nope' matched no module of Regressor"):
        _fit(tmp_path, LoRACallback(r=2, modules_to_save=["nope"]))


def test_modules_to_save_on_an_nf4_layer_says_to_skip_it(tmp_path):
    from lightning_nf4 import LoRACallback, NF4Precision
    from tests.lightning_models import Regressor

    module = Regressor()
    weight = module.net[0].weight.detach().clone()
    with pytest.raises(ValueError, match=r"modules_to_save entry 'net\.0' names the NF4 layer 'net\.0'.*skip_modules=\('lm_head', 'net\.0'\)"):
        _fit(tmp_path, LoRACallback(r=2, modules_to_save=["net.0"]), module=module)
    assert type(module.net[0]) is nn.Linear and torch.equal(module.net[0].weight, weight)  # refused before quantizing
    # the fix the message gives, on the same model: the module stays float and trains in full, beside LoRA on the others
    _fit(tmp_path, LoRACallback(r=2, modules_to_save=["net.0"]), NF4Precision(compute_dtype=torch.float32, skip_modules=("lm_head", "net.0")), module)
    assert type(module.net[0]) is nn.Linear and module.net[0].weight.requires_grad and module.net[0].bias.requires_grad
    assert isinstance(module.net[2].base_layer, NF4Linear) and not module.net[2].base_layer.weight.requires_grad


def _with_head():
    import lightning.pytorch as pl

    class WithHead(pl.LightningModule):
        """NF4 body, and a float head with a norm and a linear inside, trained in full through modules_to_save."""

        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.body = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32))
            self.head = nn.Sequential(nn.BatchNorm1d(32), nn.Linear(32, 1))

        def forward(self, x):
            return self.head(self.body(x))

        def training_step(self, batch, batch_idx):
            return nn.functional.mse_loss(self(batch[0]).float(), batch[1])

        def validation_step(self, batch, batch_idx):
            pass

        def configure_optimizers(self):
            return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-2)

    return WithHead()


def test_modules_to_save_and_skip_modules_cover_what_the_named_module_holds(tmp_path):
    """``skip_modules=["head"]`` keeps the linear inside ``head`` in float and ``modules_to_save=["head"]`` trains all
    that ``head`` holds (transformers' and PEFT's meaning of a parent's name); the head's buffers (the norm's running
    statistics) go into the adapter-only checkpoint and the adapter, and a checkpoint load restores them."""
    import lightning.pytorch as pl
    from safetensors.torch import load_file

    from lightning_nf4 import LoRACallback, NF4Precision
    from tests.lightning_models import regression_loader

    def trainer(save_dir=None):
        return pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                          enable_model_summary=False, default_root_dir=str(tmp_path), max_steps=3, plugins=NF4Precision(skip_modules=("head",)),
                          callbacks=[LoRACallback(r=2, target_modules=["body.0", "body.2"], modules_to_save=["head"], save_dir=save_dir)])

    model = _with_head()
    t = trainer(save_dir=str(tmp_path / "out"))
    t.fit(model, regression_loader())
    assert type(model.head[1]) is nn.Linear and all(p.requires_grad for p in model.head.parameters())
    assert isinstance(model.body[0].base_layer, NF4Linear)
    assert model.head[0].num_batches_tracked.item() == 3 and not torch.equal(model.head[0].running_mean, torch.zeros(32))
    t.save_checkpoint(tmp_path / "a.ckpt")
    saved = load_file(tmp_path / "out" / "adapter" / "adapter_model.safetensors")
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(saved[f"base_model.model.head.0.{name}"], getattr(model.head[0], name)), name
    restored = _with_head()
    trainer().validate(restored, regression_loader(), ckpt_path=str(tmp_path / "a.ckpt"), verbose=False)
    for name, value in model.head.state_dict().items():
        assert torch.equal(restored.head.state_dict()[name], value), name


def test_fp16_adapters_under_a_grad_scaler_are_refused_before_training(tmp_path):
    from lightning_nf4 import LoRACallback, NF4Precision

    with pytest.raises(ValueError, match=r"adapter_dtype=torch.float16\) under fp16 mixed precision.*float32"):
        _fit(tmp_path, LoRACallback(r=2, adapter_dtype=torch.float16), NF4Precision(compute_dtype=torch.float16))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(r=2.5), r"LoRA rank r must be a positive integer, got 2\.5"),
        (dict(r="8"), r"LoRA rank r must be a positive integer, got '8'"),
        (dict(r=True), r"LoRA rank r must be a positive integer, got True"),
        (dict(r=0), r"LoRA rank r must be a positive integer, got 0"),
        (dict(dropout="0.1"), r"dropout must be a number in \[0, 1\), got '0\.1'"),
        (dict(alpha="16"), r"alpha must be a number \(scaling = alpha / r\), got '16'"),
        (dict(target_modules=["re:q_proj("]), r"target_modules: 're:q_proj\(' is not a valid regular expression"),
        (dict(target_modules=[3]), r"target_modules must be 'all-linear', a name or pattern, or a list of them; got \[3\]"),
        (dict(modules_to_save=["re:*"]), r"modules_to_save: 're:\*' is not a valid regular expression"),
        (dict(modules_to_save=[None]), r"modules_to_save must be a list of module names or patterns; got \[None\]"),
    ],
)
def test_bad_lora_arguments_name_the_argument(kwargs, message):
    from lightning_nf4 import LoRACallback

    with pytest.raises(ValueError, match=message):
        LoRACallback(**kwargs)


def test_modules_to_save_as_one_string_is_one_name():
    from lightning_nf4 import LoRACallback

    assert LoRACallback(modules_to_save="lm_head").modules_to_save == ["lm_head"]


def test_trainable_count_counts_tied_weights_once(caplog):
    """The logged "trainable parameters X of Y" counts a tied embedding / lm_head once (and an NF4 weight as the
    float weight it stands for)."""
    import logging
    import re

    from transformers import LlamaConfig, LlamaForCausalLM

    from lightning_nf4 import LoRACallback, NF4Precision

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    NF4Precision().convert_module(model)
    with caplog.at_level(logging.INFO):
        LoRACallback(r=2).inject(model)
    logged = re.search(r"trainable parameters ([\d,]+) of ([\d,]+)", caplog.text)
    trainable, total = (int(g.replace(",", "")) for g in logged.groups())
    unique = {id(p): p for p in model.parameters()}.values()
    nf4 = {id(m.weight): m.in_features * m.out_features for m in model.modules() if isinstance(m, NF4Linear)}
    assert total == sum(nf4.get(id(p), p.numel()) for p in unique)
    assert trainable == sum(p.numel() for p in unique if p.requires_grad) > 0
    every_name = sum(nf4.get(id(p), p.numel()) for _, p in model.named_parameters(remove_duplicate=False))
    assert every_name - total == 128 * 64  # the tied matrix, once


def test_olora_init_splits_the_dequantized_weight_between_adapters_and_a_requantized_base():
    """``init_lora_weights="olora"`` (PEFT runs it on bitsandbytes 4-bit bases by dequantizing): the adapters hold
    the rank-r QR part of the dequantized weight, the base is re-quantized from the rest, and the layer still computes
    (to NF4's error) what it did before."""
    from lightning_nf4 import quantize_nf4

    torch.manual_seed(0)
    base = NF4Linear.from_linear(nn.Linear(128, 96, bias=False), compute_dtype=torch.float32)
    before = base.dequantize(torch.float32)
    config = lora_config(r=8, lora_alpha=16, target_modules=["x"], init_lora_weights="olora")
    layer = NF4LoraLinear(base, "default", config, r=8, lora_alpha=16, init_lora_weights="olora")
    q, r = torch.linalg.qr(before)
    torch.testing.assert_close(layer.lora_A["default"].weight, r[:8])
    torch.testing.assert_close(layer.lora_B["default"].weight, q[:, :8])
    residual = quantize_nf4(before - 2.0 * q[:, :8] @ r[:8], 64, True)
    assert torch.equal(layer.base_layer.quant.packed, residual.packed)
    x = torch.randn(4, 128)
    error = (layer(x) - x @ before.t()).norm() / (x @ before.t()).norm()
    assert error < 0.1, error
