"""Layer, compile and loss promises each checked alone: which tensors activation offload moves, two DoRA adapters'
merge, dequantize groups (sizes, mixed block sizes and dtypes, regrouping), the blocks compile finds and its option
checks, DoRA magnitudes on a float base, an NF4 tensor's clone, and the chunked loss's label and head checks."""

import pytest
import torch
from torch import nn

import lightning_nf4 as L
from lightning_nf4 import NF4Linear, NF4Precision
from lightning_nf4.layers import DequantGroup, group_nf4_layers
from lightning_nf4.layers.lora import NF4LoraLinear, lora_config
from lightning_nf4.layers.offload import ActivationOffload
from lightning_nf4.plugins.compile import CompileConfigError, compile_option, find_blocks


# -- activation offload ----------------------------------------------------------------------------------------
def test_an_activation_of_exactly_min_bytes_moves():
    """``min_bytes`` is the smallest activation that moves ("at least min_bytes large")."""
    hooks = ActivationOffload(min_bytes=32 * 32 * 4)
    assert hooks.is_activation(torch.randn(32, 32, requires_grad=True) * 2)
    assert not hooks.is_activation(torch.randn(31, 32, requires_grad=True) * 2)


def test_a_contiguous_view_of_a_trained_parameter_stays():
    """A row slice of a trained parameter is contiguous, large and has a grad_fn, yet it is model state: it stays."""
    hooks = ActivationOffload(min_bytes=1 << 16)
    trained = nn.Parameter(torch.randn(256, 256))
    rows = trained[:128]
    assert rows.is_contiguous() and rows.grad_fn is not None and rows.numel() * 4 >= 1 << 16
    assert not hooks.is_activation(rows)


# -- DoRA with two adapters -------------------------------------------------------------------------------------
def _two_dora_adapters(dropout: float) -> NF4LoraLinear:
    torch.manual_seed(0)
    base = NF4Linear.from_linear(nn.Linear(64, 48), compute_dtype=torch.float32)
    config = lora_config(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=["x"], use_dora=True)
    layer = NF4LoraLinear(base, "a", config, r=4, lora_alpha=8, lora_dropout=dropout)
    layer.update_layer("b", 4, lora_alpha=8, config=config, lora_dropout=dropout)
    with torch.no_grad():
        for name in ("a", "b"):
            layer.lora_B[name].weight.normal_(std=0.2)
            layer.lora_magnitude_vector[name].weight.mul_(1.1)
    layer.set_adapter(["a", "b"])
    return layer


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_two_active_dora_adapters_merge_to_the_weight_the_forward_computes(dropout):
    """With two DoRA adapters active, the eval forward (dropout off, whatever its rate) and ``merged_weight`` are the
    same linear map: each adapter rescales the output so far, with its norm taken on the unmerged base."""
    layer = _two_dora_adapters(dropout).eval()
    x = torch.randn(5, 64)
    with torch.no_grad():
        out = layer(x)
        merged = x @ layer.merged_weight(torch.float32).t() + layer.merged_bias(torch.float32)
    torch.testing.assert_close(out, merged, atol=1e-5, rtol=1e-5)


# -- dequantize groups ------------------------------------------------------------------------------------------
def _block(n: int) -> nn.Module:
    return nn.Sequential(*[nn.Linear(64, 64) for _ in range(n)])


def test_a_block_of_exactly_max_members_is_grouped_and_regrouping_drops_old_groups():
    model = nn.Module()
    model.layers = nn.ModuleList([_block(8), _block(3)])
    NF4Precision(device="cpu", group_dequantize=False).convert_module(model)
    assert group_nf4_layers(model) == 2
    assert all(isinstance(m._group, DequantGroup) for m in model.layers[0])
    assert group_nf4_layers(model, max_members=2) == 0  # regrouped: blocks of 8 and 3 are now too large
    assert all(m._group is None for block in model.layers for m in block)


def _grouped_calls_match_ungrouped(settings) -> None:
    torch.manual_seed(0)
    layers = [NF4Linear.from_linear(nn.Linear(64, 64), blocksize=bs, compute_dtype=dt) for bs, dt in settings]
    x = torch.randn(4, 64)
    with torch.no_grad():
        expected = [layer(x) for layer in layers]
        group_nf4_layers(nn.Sequential(nn.ModuleList([nn.Sequential(*layers)])))
        assert layers[0]._group is not None and all(layer._group is layers[0]._group for layer in layers)
        for i in (0, 1, 2, 2, 1, 0):  # each first call starts a round that the next layers take from
            assert torch.equal(layers[i](x), expected[i]), i


def test_members_with_other_blocksizes_get_their_own_weights():
    """A group may hold layers quantized with different block sizes: each still gets its own weight."""
    _grouped_calls_match_ungrouped([(64, torch.float32), (128, torch.float32), (64, torch.float32)])


def test_members_with_other_compute_dtypes_get_their_weight_in_their_own_dtype():
    """A round dequantizes in the dtype of the layer that started it; a member computing in another dtype starts its
    own round rather than taking a weight in the wrong dtype."""
    _grouped_calls_match_ungrouped([(64, torch.float32), (64, torch.float32), (64, torch.bfloat16)])


# -- compile blocks ----------------------------------------------------------------------------------------------
class _Inner(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)


class _Wrapper(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = _Inner()
        self.norm = nn.LayerNorm(8)


class _NoSplitModel(nn.Module):
    _no_split_modules = ["_Inner"]

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([_Wrapper(), _Wrapper()])


def test_auto_blocks_are_the_no_split_classes_not_the_list_elements():
    """``"auto"`` takes a model's ``_no_split_modules`` classes first: the list elements only when there are none."""
    model = _NoSplitModel()
    assert find_blocks(model) == [w.inner for w in model.layers]
    model._no_split_modules = []
    assert find_blocks(model) == list(model.layers)


# -- more of compile's option checks ----------------------------------------------------------------------------------
def test_compile_options_are_checked_and_copied():
    with pytest.raises(CompileConfigError, match="compile\\['blocks'\\] must be"):
        compile_option({"blocks": []})
    options = {"dynamic": False, "blocks": ["_Inner"]}
    checked = compile_option(options)
    options["mode"] = "reduce-overhead"  # changed after the check: the checked copy keeps what was checked
    assert checked == {"dynamic": False, "blocks": ["_Inner"]}


class _Nested(nn.Module):
    def __init__(self, depth: int) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)
        if depth:
            self.inner = _Nested(depth - 1)


def test_named_blocks_inside_named_blocks_are_compiled_with_them():
    model = nn.Module()
    model.layers = nn.ModuleList([_Nested(1), _Nested(2)])
    assert find_blocks(model, ["_Nested"]) == list(model.layers)
    assert find_blocks(model, _Nested) == list(model.layers)


# -- DoRA magnitudes on a float base, NF4Tensor.clone ------------------------------------------------------------------
def test_reset_magnitudes_on_peft_dora_over_a_float_base():
    from peft import LoraConfig, get_peft_model

    from lightning_nf4.layers.dora import reset_magnitudes

    torch.manual_seed(0)
    peft = get_peft_model(nn.Sequential(nn.Linear(64, 48)), LoraConfig(r=4, lora_alpha=8, target_modules=["0"], use_dora=True))
    layer = peft.base_model.model[0]
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(std=0.2)
    reset_magnitudes(layer)
    weight = layer.get_base_layer().weight + layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    torch.testing.assert_close(layer.lora_magnitude_vector["default"].weight, weight.detach().norm(dim=1), atol=1e-5, rtol=1e-5)


def test_a_clone_of_an_nf4_tensor_owns_its_bytes():
    from lightning_nf4.format.tensor import NF4Tensor

    torch.manual_seed(0)
    original = NF4Tensor(L.quantize_nf4(torch.randn(8, 64)))
    before = original.dequantize().clone()
    copy = original.clone()
    copy.copy_(NF4Tensor(L.quantize_nf4(torch.randn(8, 64))))
    assert torch.equal(original.dequantize(), before)
    assert all(a.data_ptr() != b.data_ptr() for a, b in zip(copy.quant.tensors(), original.quant.tensors()))


# -- losses ----------------------------------------------------------------------------------------------------------
def test_labels_of_another_shape_with_the_same_count_are_refused():
    """Labels ``[T, B]`` for hidden states ``[B, T, H]`` hold as many targets but pair them with the wrong tokens."""
    from lightning_nf4.losses import LinearCrossEntropyError, linear_cross_entropy

    hidden, weight = torch.randn(2, 6, 16), torch.randn(40, 16)
    labels = torch.randint(0, 40, (2, 6))
    with pytest.raises(LinearCrossEntropyError, match="labels must have hidden's shape"):
        linear_cross_entropy(hidden, weight, labels.t())
    with pytest.raises(LinearCrossEntropyError, match="labels must have hidden's shape"):
        linear_cross_entropy(hidden, weight, labels.reshape(-1))


def test_logits_ten_percent_off_the_head_take_the_plain_path():
    """A model whose logits are lm_head(hidden) scaled by 1.1 (unannounced by its config) fails the head check: the
    chunked loss of lm_head(hidden) would be another loss than the model's."""
    import torch.nn.functional as F
    import warnings

    from lightning_nf4.losses import causal_lm_loss, chunked_loss_unsupported
    from tests.lightning_models import tiny_llama

    class Scaled(type(tiny_llama())):
        def forward(self, *args, logits_to_keep=0, **kwargs):
            out = super().forward(*args, logits_to_keep=logits_to_keep, **kwargs)
            out.logits = out.logits * 1.1
            if out.loss is not None:
                out.loss = F.cross_entropy(out.logits[:, :-1].flatten(0, 1).float(), kwargs["labels"][:, 1:].flatten())
            return out

    torch.manual_seed(0)
    model = Scaled(tiny_llama().config)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 128, (2, 12), generator=g)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loss = causal_lm_loss(model, ids, ids, torch.ones_like(ids))
    assert "not lm_head" in (chunked_loss_unsupported(model) or "")
    torch.testing.assert_close(loss, model(input_ids=ids, labels=ids).loss, rtol=0, atol=0)
